// img2img's "Script" choice at the bottom of the settings, as in A1111: "None" or "SD upscale",
// sent as the request's script_name / script_args only while a script is chosen.

import { $, fillSelect, numberValue } from "./dom.js";

/** The name GET /sdapi/v1/scripts lists for the script (A1111 matches it in any case). */
export const SD_UPSCALE = "sd upscale";

/**
 * The size SD upscale makes of a `width` x `height` picture, as the server works it out: `scale`
 * times the size, rounded down to whole blocks of 8 pixels; the "None" upscaler keeps the size.
 */
export function sdUpscaleSize(width, height, scale, upscaler) {
  if (upscaler === "None") return [width, height];
  return [Math.floor((width * scale) / 8) * 8, Math.floor((height * scale) / 8) * 8];
}

/**
 * Wire the Script select and SD upscale's controls inside `root` (the generation panel).
 * `sourceSize()` gives the img2img picture's [width, height] (0 without one), for the line that
 * says what the script will make. Returns `values()` (the request's script fields), `update()`
 * (call when the picture changes) and `fillUpscalers(names)`.
 */
export function setupScripts({ root, sourceSize }) {
  const select = $("#script_name", root);
  const group = $("#sd-upscale", root);
  const upscaler = $("#sd_upscale_upscaler", root);
  const [overlap, scale, width, height] = ["#sd_upscale_overlap", "#sd_upscale_scale", "#width", "#height"]
    .map((id) => $(id, root));
  const outcome = $("#sd-upscale-size", root);

  function update() {
    group.hidden = select.value !== SD_UPSCALE;
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

  select.addEventListener("change", update);
  for (const control of [overlap, scale, width, height]) {
    for (const input of [control, $(`input[data-sync="${control.id}"]`, root)]) input.addEventListener("input", update);
  }
  upscaler.addEventListener("change", update);
  update();

  return {
    update,
    /** script_name and script_args ([info, tile overlap, upscaler, scale factor]) while SD upscale is chosen, else none. */
    values() {
      if (select.value !== SD_UPSCALE) return {};
      return { script_name: SD_UPSCALE, script_args: ["", numberValue(overlap), upscaler.value, numberValue(scale)] };
    },
    /** Offer GET /upscalers' `names`; Lanczos is chosen until another is. */
    fillUpscalers(names) {
      if (!names.length) return;  // keep the built-in list the page starts with
      fillSelect(upscaler, names.map((name) => ({ value: name })), "Lanczos");
      update();
    },
  };
}
