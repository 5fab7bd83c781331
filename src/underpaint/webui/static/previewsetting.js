// The live preview method (A1111's "Live preview" settings): read from and saved to /options, so it
// holds for every client of the server, as in A1111.

import { get } from "./api.js";
import { $ } from "./dom.js";
import { saveOptionOnChange } from "./optionsetting.js";

const OFF = "off";

/** The select's value for the server's two settings. */
function valueFor(options) {
  if (options?.live_previews_enable === false) return OFF;
  return options?.show_progress_type ?? "Approx NN";
}

/** ``options``: a pending GET /options to share (the page's first load asks once for every setting). */
export async function loadPreviewSetting(options = get("/sdapi/v1/options")) {
  $("#preview-method").value = valueFor(await options);
}

export function setupPreviewSetting() {
  const select = $("#preview-method");
  saveOptionOnChange(select, "show_progress_type", loadPreviewSetting, () => (select.value === OFF
    ? { live_previews_enable: false }
    : { live_previews_enable: true, show_progress_type: select.value }));
}
