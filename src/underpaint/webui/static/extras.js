// The Extras tab (A1111's "Extras", single image): upscale a picture through POST
// /sdapi/v1/extra-single-image with the upscalers GET /sdapi/v1/upscalers lists, and show the result
// with its postprocessing text. Its settings are kept in the browser like the generation settings.

import { ApiError, post } from "./api.js";
import { $, $$, el, fillSelect, numberValue, radioValue, setNumber } from "./dom.js";
import { clearFieldErrors, showFieldErrors } from "./fielderrors.js";
import { ImageInput, PictureBatch, dataUrlToBlob, pngDataUrl, readFileAsDataURL, stripDataUrl } from "./images.js";
import { formatSeconds } from "./progress.js";
import { SettingsStore } from "./persist.js";

const BREAK = "\u0000";
/** Pictures sent in one /extra-batch-images request (the server takes at most 16 pictures a request). */
const BATCH_REQUEST = 8;

/** The server's html_info ("<p>line<br>\nline</p>") as plain lines of text, read without running it as HTML. */
export function htmlInfoText(html) {
  const doc = new DOMParser().parseFromString(String(html ?? ""), "text/html");
  doc.querySelectorAll("br").forEach((br) => br.replaceWith(BREAK));
  doc.querySelectorAll("p").forEach((p) => p.append(BREAK));
  return doc.body.textContent.replace(/\s+/g, " ").split(BREAK).map((line) => line.trim()).filter(Boolean).join("\n");
}

/**
 * Wire the Extras panel. Returns the picture input (for "→ Extras" and pasted pictures), `run()`
 * (the Generate button, Ctrl+Enter on this tab), `result()` (the upscaled picture, which the
 * caller's "→ img2img" / "→ Inpaint" buttons send on), `fillUpscalers(names)` and `restore()` (the
 * kept settings, once the upscaler lists are filled).
 */
export function setupExtras() {
  const panel = $("#panel-extras");
  const errorBox = $("#extras-error");
  const status = $("#extras-status");
  const button = $("#extras-generate");
  const download = $("#extras-download");
  const selects = [$("#upscaler_1"), $("#upscaler_2")];
  const store = new SettingsStore(panel, { key: "underpaint.extras.v1" });
  const sendButtons = [$("#extras-send-img2img"), $("#extras-send-inpaint")];
  let busy = false;
  let objectUrl = null;
  let resultUrl = null;

  const input = new ImageInput({
    zone: $("#extras-drop"),
    fileInput: $("#extras-file"),
    preview: $("#extras-preview"),
    onChange: (picture) => {
      $("#extras-size").textContent = picture.width ? `${picture.width}×${picture.height} px` : "";
      batch.end();  // another picture, or none, ends a batch; a new batch sets it after
      clearFieldErrors($("#extras-drop").closest(".field"));
    },
  });
  $("#extras-clear").addEventListener("click", () => input.clear());

  // A1111's "Batch Process": several pictures upscaled with the same settings through
  // /sdapi/v1/extra-batch-images (BATCH_REQUEST of them to a request), every result in a row to pick from.
  const batch = new PictureBatch({
    input, fileInput: $("#extras-batch-file"), box: $("#extras-batch"), text: $("#extras-batch-count"),
    endButton: $("#extras-batch-clear"), describe: (n) => `Batch: ${n} pictures to upscale.`,
  });

  async function runBatch(settings) {
    const pictures = [];
    const files = batch.files;
    for (let i = 0; i < files.length; i += BATCH_REQUEST) {
      const imageList = await Promise.all(files.slice(i, i + BATCH_REQUEST).map(async (file) => ({
        name: file.name, data: stripDataUrl(await readFileAsDataURL(file)),
      })));
      status.textContent = `Upscaling pictures ${i + 1} to ${i + imageList.length} of ${files.length}…`;
      const answer = await post("/sdapi/v1/extra-batch-images", { ...settings, imageList });
      answer.images.forEach((b64, j) => pictures.push({ b64, name: imageList[j]?.name ?? "", info: answer.html_info }));
    }
    const row = $("#extras-batch-results");
    row.replaceChildren(...pictures.map((picture, i) => el("button", {
      type: "button", title: picture.name, "aria-label": `Upscaled ${picture.name || `picture ${i + 1}`}`,
      onclick: () => showResult(picture.b64, picture.info),
    }, el("img", { src: pngDataUrl(picture.b64), alt: "" }))));
    row.hidden = false;
    return pictures;
  }

  // "Scale by" shows the factor, "Scale to" the size; only the shown one's fields are sent.
  const mode = () => (radioValue(panel, "extras_resize_mode") === "1" ? 1 : 0);
  const showMode = () => {
    $("#extras-scale-by").hidden = mode() !== 0;
    $("#extras-scale-to").hidden = mode() !== 1;
  };
  $$('input[name="extras_resize_mode"]', panel).forEach((radio) => radio.addEventListener("change", showMode));
  showMode();

  $("#extras-swap-size").addEventListener("click", () => {
    const [w, h] = [$("#upscaling_resize_w").value, $("#upscaling_resize_h").value];
    setNumber($("#upscaling_resize_w"), h);
    setNumber($("#upscaling_resize_h"), w);
  });

  /** The request's settings (A1111's field names), without the picture. */
  function values() {
    const body = {
      resize_mode: mode(),
      upscaler_1: selects[0].value,
      upscaler_2: selects[1].value,
      extras_upscaler_2_visibility: numberValue($("#extras_upscaler_2_visibility")),
      gfpgan_visibility: numberValue($("#gfpgan_visibility")) || undefined,
      codeformer_visibility: numberValue($("#codeformer_visibility")) || undefined,
      codeformer_weight: numberValue($("#codeformer_visibility")) ? numberValue($("#codeformer_weight")) : undefined,
    };
    if (body.resize_mode === 0) {
      body.upscaling_resize = numberValue($("#upscaling_resize"));
    } else {
      body.upscaling_resize_w = numberValue($("#upscaling_resize_w"));
      body.upscaling_resize_h = numberValue($("#upscaling_resize_h"));
      body.upscaling_crop = $("#upscaling_crop").checked;
    }
    return body;
  }

  function showResult(b64, info) {
    const dataUrl = pngDataUrl(b64);
    const image = el("img", { id: "extras-result-image", src: dataUrl, alt: "The upscaled picture" });
    $("#extras-result").replaceChildren(image);
    $("#extras-info").value = htmlInfoText(info);
    if (objectUrl) URL.revokeObjectURL(objectUrl);
    objectUrl = URL.createObjectURL(dataUrlToBlob(dataUrl));
    const stamp = new Date().toISOString().replace(/[-:]/g, "").replace("T", "-").slice(0, 15);
    download.href = objectUrl;
    download.download = `underpaint-extras-${stamp}.png`;
    download.hidden = false;
    resultUrl = dataUrl;
    sendButtons.forEach((b) => { b.disabled = false; });
    return image;
  }

  function setBusy(on) {
    busy = on;
    button.disabled = on;
    button.textContent = on ? "Upscaling…" : "Generate";
  }

  async function run() {
    if (busy) return;
    clearFieldErrors(panel);
    errorBox.hidden = true;
    status.textContent = "";
    if (!input.dataUrl) {
      showFieldErrors({ errors: [{ field: "image", message: "Drop, paste or pick an image first." }] }, { root: panel })?.focus();
      return;
    }
    store.save();
    const body = { ...values(), image: stripDataUrl(input.dataUrl) };
    setBusy(true);
    const started = performance.now();
    try {
      if (batch.files.length > 1) {
        const pictures = await runBatch(values());
        showResult(pictures[0].b64, pictures[0].info);
        status.textContent = `Done in ${formatSeconds((performance.now() - started) / 1000)}: ${pictures.length} pictures`;
        return;
      }
      $("#extras-batch-results").hidden = true;
      const answer = await post("/sdapi/v1/extra-single-image", body);
      const image = showResult(answer.image, answer.html_info);
      await image.decode().catch(() => {});
      const seconds = formatSeconds((performance.now() - started) / 1000);
      const size = `${image.naturalWidth}×${image.naturalHeight} px`;
      status.textContent = body.upscaler_1 === "None"
        ? `Upscaler 1 is None: the picture comes back as it was (${size}).`
        : `Done in ${seconds}: ${size}`;
    } catch (err) {
      if (err instanceof ApiError) {
        showFieldErrors(err, { root: panel, generalBox: errorBox })?.focus();
      } else {
        errorBox.textContent = String(err.message ?? err);
        errorBox.hidden = false;
      }
    } finally {
      setBusy(false);
    }
  }
  button.addEventListener("click", run);

  return {
    input,
    run,
    /** The upscaled picture shown (a data URL), for "→ img2img" and "→ Inpaint"; null before the first. */
    result: () => resultUrl,
    /** Offer `names` (GET /upscalers' order) in both selects; "None" stays chosen until another is. */
    fillUpscalers(names) {
      if (!names.length) return;  // keep the built-in list the page starts with
      selects.forEach((select) => fillSelect(select, names.map((name) => ({ value: name })), "None"));
    },
    restore() {
      store.restore();
      showMode();
    },
  };
}
