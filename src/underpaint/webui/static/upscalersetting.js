// A1111's "Upscaler for img2img" (Settings → Upscaling): what enlarges an init picture, or an "Only
// masked" crop, when the img2img resize makes it larger. "None" is Lanczos alone; the others come
// from /upscalers (the built-in Lanczos and Nearest, and the upscaling models in the models folder).
// Read from and saved to /options, so it holds for every client of the server, as in A1111; shown
// on the img2img and Inpaint tabs, the ones it applies to.

import { get } from "./api.js";
import { $, fillSelect } from "./dom.js";
import { saveOptionOnChange } from "./optionsetting.js";

const SETTING = "upscaler_for_img2img";

/** ``options``: a pending GET /options to share (the page's first load asks once for every setting). */
export async function loadImg2imgUpscaler(options = get("/sdapi/v1/options")) {
  const [upscalers, settings] = await Promise.all([get("/sdapi/v1/upscalers"), options]);
  const names = (upscalers ?? []).map((u) => u.name).filter(Boolean);
  if (!names.includes("None")) names.unshift("None");
  const current = settings?.[SETTING] ?? "None";
  // The server's choice is shown even when its model is no longer listed (the next job says so).
  if (!names.includes(current)) names.push(current);
  const select = $("#img2img-upscaler");
  fillSelect(select, names.map((name) => ({ value: name, label: name === "None" ? "None (Lanczos)" : name })), current);
  select.value = current;
}

/** Shown on the tabs whose requests it changes: img2img and Inpaint. */
export function img2imgUpscalerFor(tab) {
  $("#img2img-upscaler").closest(".field").hidden = !["img2img", "inpaint"].includes(tab);
}

export function setupImg2imgUpscaler() {
  saveOptionOnChange($("#img2img-upscaler"), SETTING, loadImg2imgUpscaler);
}
