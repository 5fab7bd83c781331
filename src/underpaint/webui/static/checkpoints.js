// The checkpoint drop-down: filled from /sd-models and /options, switched with POST /options.

import { get, post } from "./api.js";
import { $, fillSelect } from "./dom.js";
import { clearFieldErrors, showFieldErrors } from "./fielderrors.js";

// title → model family ("flux" or "sd", as the server reads it from each file); the InstructPix2Pix edit models.
const families = new Map();
const edits = new Set();
const familyListeners = [];

/** `listener(family, edit)` runs when the selected checkpoint's family is known, and again when it changes;
 * `edit` says whether it is an InstructPix2Pix edit model. */
export function onFamily(listener) {
  familyListeners.push(listener);
}

function announceFamily() {
  const family = families.get($("#checkpoint").value) ?? "sd";
  const edit = edits.has($("#checkpoint").value);
  familyListeners.forEach((listener) => listener(family, edit));
}

/** ``options``: a pending GET /options to share (the page's first load asks once for every setting). */
export async function loadCheckpoints(options = get("/sdapi/v1/options")) {
  const [models, settings] = await Promise.all([get("/sdapi/v1/sd-models"), options]);
  const items = (models ?? []).map((m) => ({ value: m.title ?? m.model_name, label: m.title ?? m.model_name }));
  families.clear();
  edits.clear();
  (models ?? []).forEach((m) => families.set(m.title ?? m.model_name, m.family ?? "sd"));
  (models ?? []).filter((m) => m.edit).forEach((m) => edits.add(m.title ?? m.model_name));
  const current = settings?.sd_model_checkpoint;
  const match = items.find((i) => i.value === current) ?? items.find((i) => current && i.value.startsWith(current));
  fillSelect($("#checkpoint"), items, match?.value);
  // The refiner is another Stable Diffusion checkpoint (FLUX has no refiner here).
  const sd = items.filter((i) => families.get(i.value) !== "flux");
  fillSelect($("#refiner_checkpoint"), sd);
  fillSelect($("#hr_checkpoint_name"), [{ value: "", label: "Use same checkpoint" }, ...sd], "");
  fillSelect($("#ad_checkpoint"), [{ value: "", label: "Use same checkpoint" }, ...sd], "");
  $("#checkpoint-status").textContent = items.length ? "" : "No checkpoints found in the models folder.";
  announceFamily();
}

/** Loading a checkpoint waits its turn in the server's queue; `onSwitching(true/false)` brackets it. */
export function setupCheckpointSwitch({ onSwitching }) {
  const select = $("#checkpoint");
  const status = $("#checkpoint-status");
  const topbar = $(".topbar");
  select.addEventListener("change", async () => {
    clearFieldErrors(topbar);
    onSwitching(true);
    status.textContent = `Loading ${select.value}…`;
    try {
      await post("/sdapi/v1/options", { sd_model_checkpoint: select.value });
      status.textContent = "";
      announceFamily();
    } catch (err) {
      status.textContent = "";
      showFieldErrors(err, { root: topbar, rename: () => "sd_model_checkpoint" });
      await loadCheckpoints().catch(() => {});
    } finally {
      onSwitching(false);
    }
  });
}
