// The PNG Info tab: read any image's generation parameters and send them to txt2img / img2img / inpaint.

import { ApiError, post } from "./api.js";
import { $, el } from "./dom.js";
import { ImageInput, dataUrlToBlob, readFileAsDataURL, stripDataUrl } from "./images.js";
import { comfyToFields, fieldsToInfotext, infotextToFields, parseInfotext } from "./infotext.js";
import { readPngText } from "./pngchunks.js";

/** Metadata from the file itself (PNG chunks) or, for JPEG/WebP EXIF, from POST /png-info. */
async function readMetadata(input) {
  const blob = input.file ?? dataUrlToBlob(input.dataUrl);
  const chunks = await readPngText(await blob.arrayBuffer());
  if (chunks) return { items: chunks, parameters: chunks.parameters ?? null };
  const answer = await post("/sdapi/v1/png-info", { image: stripDataUrl(input.dataUrl) });
  const items = answer?.items ?? {};
  return { items, parameters: answer?.info || items.parameters || null };
}

/** Turn the metadata into request fields and the text to show, or null if it holds none. */
export function interpret({ items, parameters }) {
  if (parameters) {
    return { source: "A1111 parameters", text: parameters, fields: infotextToFields(parseInfotext(parameters)) };
  }
  if (items.prompt) {
    try {
      const fields = comfyToFields(JSON.parse(items.prompt));
      if (fields) return { source: "ComfyUI workflow", text: fieldsToInfotext(fields), fields };
    } catch {
      // not JSON: fall through to "nothing found"
    }
  }
  return null;
}

/** The generation parameters a picture file holds ({source, text, fields}), or null when it holds none. */
export async function parametersIn(file) {
  return interpret(await readMetadata({ file, dataUrl: await readFileAsDataURL(file) }));
}

export function setupPngInfo({ onSend }) {
  const out = $("#pnginfo-parameters");
  const source = $("#pnginfo-source");
  const list = $("#pnginfo-items");
  const errorBox = $("#pnginfo-error");
  const targets = ["txt2img", "img2img", "inpaint"];
  const sendButtons = targets.map((target) => $(`#pnginfo-send-${target}`));
  let found = null;

  const show = async (input) => {
    found = null;
    out.value = "";
    list.replaceChildren();
    errorBox.hidden = true;
    sendButtons.forEach((b) => { b.disabled = true; });
    if (!input.dataUrl) {
      source.textContent = "";
      return;
    }
    source.textContent = "Reading…";
    try {
      const metadata = await readMetadata(input);
      for (const [key, value] of Object.entries(metadata.items)) {
        list.append(el("dt", {}, key), el("dd", {}, typeof value === "string" ? value : JSON.stringify(value)));
      }
      found = interpret(metadata);
      out.value = found ? found.text : "";
      source.textContent = found ? `Found: ${found.source}` : "This image holds no generation parameters.";
      sendButtons.forEach((b) => { b.disabled = false; });
    } catch (err) {
      source.textContent = "";
      errorBox.textContent = err instanceof ApiError ? err.message : `Cannot read this image: ${err.message}`;
      errorBox.hidden = false;
    }
  };

  const input = new ImageInput({
    zone: $("#pnginfo-drop"),
    fileInput: $("#pnginfo-file"),
    preview: $("#pnginfo-preview"),
    onChange: show,
  });
  sendButtons.forEach((button, i) => button.addEventListener("click", () => onSend(input.dataUrl, found?.fields ?? {}, targets[i])));
  return input;
}
