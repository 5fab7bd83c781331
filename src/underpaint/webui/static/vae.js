// The SD VAE quick setting (A1111's sd_vae, which A1111 users keep beside the checkpoint): "Automatic",
// "None" or a file from /sd-vae, read from and saved to /options, so it holds for every client of the
// server, as in A1111. Saving only records the choice: the next generation loads that VAE.

import { get } from "./api.js";
import { $, fillSelect } from "./dom.js";
import { saveOptionOnChange } from "./optionsetting.js";

const SETTING = "sd_vae";
const FIXED = [
  { value: "Automatic", label: "Automatic" },
  { value: "None", label: "None" },
];

/** ``options``: a pending GET /options to share (the page's first load asks once for every setting). */
export async function loadVae(options = get("/sdapi/v1/options")) {
  const [vaes, settings] = await Promise.all([get("/sdapi/v1/sd-vae"), options]);
  const items = [...FIXED, ...(vaes ?? []).map((v) => ({ value: v.model_name, label: v.model_name }))];
  const current = settings?.[SETTING] ?? "Automatic";
  // The server's choice is shown even when its file is no longer listed (the next job says so).
  if (!items.some((i) => i.value === current)) items.push({ value: current, label: current });
  const select = $("#sd-vae");
  fillSelect(select, items, current);
  select.value = current;  // the server's value, not what the select showed before
  // ADetailer's separate VAE for its passes: the same one, the checkpoint's own (None) or a file
  const detailer = $("#ad_vae");
  const chosen = detailer.value;
  fillSelect(detailer, [{ value: "", label: "Use same VAE" }, ...items.slice(1)], "");
  if ([...detailer.options].some((o) => o.value === chosen)) detailer.value = chosen;
}

export function setupVae() {
  saveOptionOnChange($("#sd-vae"), SETTING, loadVae);
}
