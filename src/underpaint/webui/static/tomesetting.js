// The token merging ratio img2img and inpaint use (A1111's Settings → Optimizations): read from and
// saved to /options, so it holds for every client of the server, as in A1111.

import { get, post } from "./api.js";
import { $, el } from "./dom.js";
import { clearFieldErrors, showFieldErrors } from "./fielderrors.js";

const SETTING = "token_merging_ratio_img2img";

/** The ratio img2img runs with: its own setting when not 0, else the general one (A1111's order). */
export function img2imgRatio(options) {
  const own = Number(options?.token_merging_ratio_img2img ?? 0);
  return own || Number(options?.token_merging_ratio ?? 0);
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

let general = 0;  // the server's token_merging_ratio, as last read

export async function loadTokenMerging() {
  const options = await get("/sdapi/v1/options");
  general = Number(options?.token_merging_ratio ?? 0);
  showRatio($("#token-merging"), img2imgRatio(options));
}

export function setupTokenMerging() {
  const select = $("#token-merging");
  const field = select.closest(".field");
  select.addEventListener("change", async () => {
    clearFieldErrors(field);
    const ratio = Number(select.value);
    const body = { [SETTING]: ratio };
    // img2img's 0 means "use token_merging_ratio": Off must clear that one too, or img2img still merges.
    if (ratio === 0 && general !== 0) body.token_merging_ratio = 0;
    try {
      await post("/sdapi/v1/options", body);
      if (body.token_merging_ratio === 0) general = 0;
    } catch (err) {
      showFieldErrors(err, { root: field, rename: () => SETTING });
      await loadTokenMerging().catch(() => {});
    }
  });
}
