// The "Script" choice at the bottom of the settings, as in A1111, each tab with its own: txt2img's
// "None", "Prompt matrix", "Prompts from file or textbox" or "X/Y/Z plot", img2img's those and "Loopback" and
// "SD upscale" (Inpaint has none), sent as the request's script_name / script_args only while a script is chosen.

import { get } from "./api.js";
import { $, el, fillSelect, numberValue } from "./dom.js";

/** The names GET /sdapi/v1/scripts lists for the scripts (A1111 matches them in any case). */
export const SD_UPSCALE = "sd upscale";
export const XYZ_PLOT = "x/y/z plot";
export const LOOPBACK = "loopback";
export const PROMPT_MATRIX = "prompt matrix";
export const OUTPAINTING = "poor man's outpainting";
export const OUTPAINTING_MK2 = "outpainting mk2";
export const PROMPTS_FROM_FILE = "prompts from file or textbox";

/**
 * The X/Y/Z plot axis types the server runs (underpaint.pipeline.xyz_plot.AXES, in A1111's order),
 * each with the one tab it is offered on, or null for both. They are sent by name.
 */
export const XYZ_AXES = [
  ["Nothing", null], ["Seed", null], ["Var. seed", null], ["Var. strength", null], ["Steps", null],
  ["Hires steps", "txt2img"], ["CFG Scale", null], ["Image CFG Scale", "img2img"], ["Prompt S/R", null], ["Prompt order", null], ["Sampler", null],
  ["Hires sampler", "txt2img"], ["Checkpoint name", null], ["Negative Guidance minimum sigma", null],
  ["Sigma Churn", null], ["Sigma min", null], ["Sigma max", null], ["Sigma noise", null], ["Schedule type", null],
  ["Schedule min sigma", null], ["Schedule max sigma", null], ["Schedule rho", null],
  ["Beta schedule alpha", null], ["Beta schedule beta", null], ["Eta", null],
  ["Clip skip", null], ["Denoising", null], ["Initial noise multiplier", null], ["Extra noise", null],
  ["Hires upscaler", "txt2img"], ["Cond. Image Mask Weight", "img2img"], ["VAE", null], ["Styles", null], ["UniPC Order", null],
  ["Face restore", null], ["Token merging ratio", null],
  ["Token merging ratio high-res", null], ["Always discard next-to-last sigma", null], ["SGM noise multiplier", null],
  ["Refiner checkpoint", null], ["Refiner switch at", null], ["RNG source", null], ["Size", null],
];

/**
 * The axis types whose values are the server's model names, with how to list them all (A1111's
 * "Fill" button beside the values): the checkpoints' titles from /sd-models; Automatic, None and
 * the VAE files' names from /sd-vae.
 */
export const XYZ_NAME_AXES = {
  "Checkpoint name": async () => ((await get("/sdapi/v1/sd-models")) ?? []).map((m) => m.title),
  "Refiner checkpoint": async () => ["None", ...((await get("/sdapi/v1/sd-models")) ?? [])
    .filter((m) => m.family !== "flux").map((m) => m.title)],
  "VAE": async () => ["Automatic", "None", ...((await get("/sdapi/v1/sd-vae")) ?? []).map((v) => v.model_name)],
};

/** `names` as one comma-separated values text, a name with a comma or a quote in quotes (CSV, as the server reads it). */
export function csvValues(names) {
  return names.map((name) => (/[",\n]/.test(name) ? `"${name.replaceAll('"', '""')}"` : name)).join(", ");
}

/**
 * The size SD upscale makes of a `width` x `height` picture, as the server works it out: `scale`
 * times the size, rounded down to whole blocks of 8 pixels; the "None" upscaler keeps the size.
 */
export function sdUpscaleSize(width, height, scale, upscaler) {
  if (upscaler === "None") return [width, height];
  return [Math.floor((width * scale) / 8) * 8, Math.floor((height * scale) / 8) * 8];
}

/**
 * Wire the Script selects, SD upscale's and X/Y/Z plot's controls inside `root` (the generation
 * panel). `sourceSize()` gives the img2img picture's [width, height] (0 without one), for the line
 * that says what the script will make. Returns `values(tab)` (the request's script fields),
 * `update()` (call when the picture changes), `setTab(tab)` and `fillUpscalers(names)`.
 */
export function setupScripts({ root, sourceSize }) {
  const select = $("#script_name", root);
  const selects = { txt2img: $("#txt2img_script_name", root), img2img: select };
  let tab = "img2img";
  const xyzGroup = $("#xyz-plot", root);
  const axisTypes = ["x", "y", "z"].map((letter) => $(`#xyz_${letter}_type`, root));
  const axisValues = ["x", "y", "z"].map((letter) => $(`#xyz_${letter}_values`, root));
  const [legend, lone, subGrids, keepSeeds, margin] = ["#xyz_draw_legend", "#xyz_include_lone_images",
    "#xyz_include_sub_grids", "#xyz_no_fixed_seeds", "#xyz_margin_size"].map((id) => $(id, root));
  for (const typeSelect of axisTypes) {
    typeSelect.replaceChildren(...XYZ_AXES.map(([name, only]) => el("option", { value: name, "data-tab": only }, name)));
  }
  const chosen = (name) => selects[name]?.value ?? "";
  const fillButtons = ["x", "y", "z"].map((letter) => $(`#xyz_${letter}_fill`, root));
  fillButtons.forEach((button, i) => button.addEventListener("click", async () => {
    const list = XYZ_NAME_AXES[axisTypes[i].value];
    if (!list) return;
    button.disabled = true;
    try {
      axisValues[i].value = csvValues(await list());
      axisValues[i].dispatchEvent(new Event("input", { bubbles: true }));  // kept over a reload, as typed text
      axisValues[i].dispatchEvent(new Event("change", { bubbles: true }));
    } catch {
      // the lists could not be read: the values stay as they are, to be typed
    } finally {
      button.disabled = false;
    }
  }));

  /** Offer the current tab's axes only; a type the tab lacks (Hires steps on img2img) goes back to Nothing. */
  function showAxes() {
    for (const typeSelect of axisTypes) {
      for (const option of typeSelect.options) {
        const other = Boolean(option.dataset.tab) && option.dataset.tab !== tab;
        option.hidden = other;
        option.disabled = other;
      }
      if (typeSelect.selectedOptions[0]?.disabled) typeSelect.value = "Nothing";
    }
    axisTypes.forEach((typeSelect, i) => { fillButtons[i].hidden = !(typeSelect.value in XYZ_NAME_AXES); });
  }
  const group = $("#sd-upscale", root);
  const upscaler = $("#sd_upscale_upscaler", root);
  const [overlap, scale, width, height] = ["#sd_upscale_overlap", "#sd_upscale_scale", "#width", "#height"]
    .map((id) => $(id, root));
  const outcome = $("#sd-upscale-size", root);
  const loopGroup = $("#loopback", root);
  const [loops, finalStrength, curve, appendReading] = ["#loopback_loops", "#loopback_final_strength",
    "#loopback_curve", "#loopback_interrogate"].map((id) => $(id, root));
  const outpaintGroup = $("#outpainting", root);
  const [outpaintPixels, outpaintBlur, outpaintFill] = ["#outpaint_pixels", "#outpaint_mask_blur", "#outpaint_fill"]
    .map((id) => $(id, root));
  const mk2Group = $("#outpainting-mk2", root);
  const [mk2Pixels, mk2Blur, mk2Falloff, mk2Variation] = ["#mk2_pixels", "#mk2_mask_blur", "#mk2_falloff",
    "#mk2_color_variation"].map((id) => $(id, root));
  const matrixGroup = $("#prompt-matrix", root);
  const [atStart, differentSeeds, promptType, joiner, matrixMargin] = ["#matrix_put_at_start",
    "#matrix_different_seeds", "#matrix_prompt_type", "#matrix_joiner", "#matrix_margin_size"].map((id) => $(id, root));
  const linesGroup = $("#prompts-from-file", root);
  const [iterateSeed, sameSeed, combined, position, lines, linesFile] = ["#prompts_iterate_seed", "#prompts_same_seed",
    "#prompts_combined", "#prompts_position", "#prompts_text", "#prompts_file"].map((id) => $(id, root));
  // A1111's "Upload prompt inputs": the file's text goes into the box, where it can still be edited.
  linesFile.addEventListener("change", async () => {
    const file = linesFile.files?.[0];
    if (!file) return;
    lines.value = (await file.text()).split("\n").map((line) => line.trim()).join("\n");
    lines.dispatchEvent(new Event("input", { bubbles: true }));
    lines.dispatchEvent(new Event("change", { bubbles: true }));
    linesFile.value = "";
  });

  function update() {
    matrixGroup.hidden = chosen(tab) !== PROMPT_MATRIX;
    outpaintGroup.hidden = tab !== "img2img" || select.value !== OUTPAINTING;
    mk2Group.hidden = tab !== "img2img" || select.value !== OUTPAINTING_MK2;
    linesGroup.hidden = chosen(tab) !== PROMPTS_FROM_FILE;
    xyzGroup.hidden = chosen(tab) !== XYZ_PLOT;
    if (!xyzGroup.hidden) showAxes();
    group.hidden = tab !== "img2img" || select.value !== SD_UPSCALE;
    loopGroup.hidden = tab !== "img2img" || select.value !== LOOPBACK;
    const [w, h] = group.hidden ? [0, 0] : sourceSize();
    const [tileW, tileH] = [numberValue(width), numberValue(height)];
    const factor = numberValue(scale);
    if (!w || !h || !tileW || !tileH || !factor) {
      outcome.textContent = "";
      return;
    }
    const [outW, outH] = sdUpscaleSize(w, h, factor, upscaler.value);
    const kept = upscaler.value === "None" ? " (the upscaler None keeps the size: the tiles are only repainted)" : "";
    outcome.textContent = `${w}×${h} → ${outW}×${outH} px${kept}, in tiles of ${tileW}×${tileH} overlapping by `
      + `${numberValue(overlap) ?? 0} px`;
  }

  for (const control of [...Object.values(selects), ...axisTypes]) control.addEventListener("change", update);
  for (const control of [overlap, scale, width, height]) {
    for (const input of [control, $(`input[data-sync="${control.id}"]`, root)]) input.addEventListener("input", update);
  }
  upscaler.addEventListener("change", update);
  update();

  return {
    update,
    /** Show the script chosen on `tab` ("txt2img", "img2img" or another: none) and its axis types. */
    setTab(name) {
      tab = name;
      update();
    },
    /**
     * The `tab`'s script_name and script_args while a script is chosen there, else none. SD upscale's:
     * [info, tile overlap, upscaler, scale factor]; Loopback's: [loops, final denoising strength, curve,
     * append interrogated prompt ("None", "CLIP" or "DeepBooru")]; Prompt matrix's: [put at start, different seeds, prompt, joining char,
     * margins]; Prompts from file's: [iterate seed, same seed, position, the lines, combined]; X/Y/Z plot's: A1111's 18, with the axis types by
     * name and csv_mode on, so that each axis's text is its values (the dropdown lists stay empty).
     */
    values(name) {
      const script = chosen(name);
      if (script === SD_UPSCALE && name === "img2img") {
        return { script_name: SD_UPSCALE, script_args: ["", numberValue(overlap), upscaler.value, numberValue(scale)] };
      }
      if (script === LOOPBACK && name === "img2img") {
        return { script_name: LOOPBACK, script_args: [numberValue(loops), numberValue(finalStrength), curve.value,
          appendReading.value] };
      }
      if (script === OUTPAINTING && name === "img2img") {
        const directions = Array.from(root.querySelectorAll('input[name="outpaint_direction"]:checked'), (box) => box.value);
        return { script_name: OUTPAINTING, script_args: [numberValue(outpaintPixels), numberValue(outpaintBlur),
          Number(outpaintFill.value), directions] };
      }
      if (script === OUTPAINTING_MK2 && name === "img2img") {
        const directions = Array.from(root.querySelectorAll('input[name="mk2_direction"]:checked'), (box) => box.value);
        return { script_name: OUTPAINTING_MK2, script_args: ["", numberValue(mk2Pixels), numberValue(mk2Blur), directions,
          numberValue(mk2Falloff), numberValue(mk2Variation)] };
      }
      if (script === PROMPT_MATRIX) {
        return { script_name: PROMPT_MATRIX, script_args: [atStart.checked, differentSeeds.checked, promptType.value,
          joiner.value, numberValue(matrixMargin)] };
      }
      if (script === PROMPTS_FROM_FILE) {
        return { script_name: PROMPTS_FROM_FILE, script_args: [iterateSeed.checked, sameSeed.checked, position.value,
          lines.value, combined.checked] };
      }
      if (script !== XYZ_PLOT) return {};
      const axes = axisTypes.flatMap((typeSelect, i) => [typeSelect.value, axisValues[i].value, []]);
      return {
        script_name: XYZ_PLOT,
        script_args: [...axes, legend.checked, lone.checked, subGrids.checked, keepSeeds.checked, false, false, false,
          numberValue(margin), true],
      };
    },
    /** Offer GET /upscalers' `names`; Lanczos is chosen until another is. */
    fillUpscalers(names) {
      if (!names.length) return;  // keep the built-in list the page starts with
      fillSelect(upscaler, names.map((name) => ({ value: name })), "Lanczos");
      update();
    },
  };
}
