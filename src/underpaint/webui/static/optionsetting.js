// A quick setting saved in the server's /options when its control changes, as A1111's quick settings
// are: they hold for every client of the server. A refusal is shown beside the control, and the
// control goes back to the server's value.

import { post } from "./api.js";
import { clearFieldErrors, showFieldErrors } from "./fielderrors.js";

/**
 * Save ``control``'s value as ``setting`` on each change. ``reload()`` reads the server's value back
 * after a refusal; ``bodyOf()`` builds the POST body where one control sets more than one setting.
 */
export function saveOptionOnChange(control, setting, reload, bodyOf = () => ({ [setting]: control.value })) {
  const field = control.closest(".field");
  control.addEventListener("change", async () => {
    clearFieldErrors(field);
    try {
      await post("/sdapi/v1/options", bodyOf());
    } catch (err) {
      showFieldErrors(err, { root: field, rename: () => setting });
      await reload().catch(() => {});
    }
  });
}
