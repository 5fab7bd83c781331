// The token merging ratio (A1111's Settings → Optimizations): read from and saved to /options, so it
// holds for every client of the server, as in A1111. txt2img runs with token_merging_ratio; img2img
// and inpaint with token_merging_ratio_img2img when it is not 0, else the same general ratio. The
// select shows and saves the one the current tab runs with.

import { get, post } from "./api.js";
import { $, el } from "./dom.js";
import { clearFieldErrors, showFieldErrors } from "./fielderrors.js";

const GENERAL = "token_merging_ratio";
const IMG2IMG = "token_merging_ratio_img2img";

/** The ratio img2img runs with: its own setting when not 0, else the general one (A1111's order). */
export function img2imgRatio(options) {
  const own = Number(options?.[IMG2IMG] ?? 0);
  return own || Number(options?.[GENERAL] ?? 0);
}

/** Show `ratio` in the select, adding an option for a value set elsewhere (0.35 through the API). */
function showRatio(select, ratio) {
  const value = String(ratio);
  if (!Array.from(select.options).some((o) => o.value === value)) {
    const later = Array.from(select.options).find((o) => Number(o.value) > ratio) ?? null;
    select.insertBefore(el("option", { value }, value), later);
  }
  select.value = value;
}

const current = { [GENERAL]: 0, [IMG2IMG]: 0 };  // the server's two settings, as last read or saved
let txt2img = false;  // which tab's ratio the select shows

const setting = () => (txt2img ? GENERAL : IMG2IMG);

function show() {
  const select = $("#token-merging");
  select.dataset.field = setting();
  showRatio(select, txt2img ? current[GENERAL] : img2imgRatio(current));
}

/** ``options``: a pending GET /options to share (the page's first load asks once for every setting). */
export async function loadTokenMerging(options = get("/sdapi/v1/options")) {
  const settings = await options;
  for (const key of [GENERAL, IMG2IMG]) current[key] = Number(settings?.[key] ?? 0);
  show();
}

/** Follow the generate tab: "txt2img" shows the general ratio, img2img and inpaint their own. */
export function tokenMergingFor(tab) {
  const next = tab === "txt2img";
  if (next === txt2img || tab === "pnginfo" || tab === "extras") return;
  txt2img = next;
  show();
}

export function setupTokenMerging() {
  const select = $("#token-merging");
  const field = select.closest(".field");
  select.addEventListener("change", async () => {
    clearFieldErrors(field);
    const ratio = Number(select.value);
    const body = { [setting()]: ratio };
    // img2img's 0 means "use token_merging_ratio": Off must clear that one too, or img2img still merges.
    if (!txt2img && ratio === 0 && current[GENERAL] !== 0) body[GENERAL] = 0;
    try {
      await post("/sdapi/v1/options", body);
      Object.assign(current, body);
    } catch (err) {
      const name = setting();
      showFieldErrors(err, { root: field, rename: () => name });
      await loadTokenMerging().catch(() => {});
    }
  });
}
