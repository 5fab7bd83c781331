// Clip skip (A1111's CLIP_stop_at_last_layers, the quick setting most A1111 users keep beside the
// checkpoint): read from and saved to /options, so it holds for every client of the server, as in A1111.

import { get, post } from "./api.js";
import { $ } from "./dom.js";
import { clearFieldErrors, showFieldErrors } from "./fielderrors.js";

const SETTING = "CLIP_stop_at_last_layers";
let current = 1;  // the server's value, as last read or saved

/** ``options``: a pending GET /options to share (the page's first load asks once for every setting). */
export async function loadClipSkip(options = get("/sdapi/v1/options")) {
  current = Number((await options)?.[SETTING] ?? 1);
  $("#clip-skip").value = String(current);
}

/** Save what the box shows unless the server has it already; a refusal lands beside the box. */
async function save() {
  const box = $("#clip-skip");
  const field = box.closest(".field");
  clearFieldErrors(field);
  if (box.value.trim() === "") {  // an emptied box means no change
    box.value = String(current);
    return;
  }
  const value = Number(box.value);
  if (value === current) return;
  try {
    await post("/sdapi/v1/options", { [SETTING]: value });
    current = value;
  } catch (err) {
    showFieldErrors(err, { root: field, rename: () => SETTING });
    await loadClipSkip().catch(() => {});
  }
}

/** Set the clip skip a pasted infotext was made with (its absence means 1, as A1111 reads it). */
export async function setClipSkip(value) {
  $("#clip-skip").value = String(value);
  await save();
}

export function setupClipSkip() {
  $("#clip-skip").addEventListener("change", save);
}
