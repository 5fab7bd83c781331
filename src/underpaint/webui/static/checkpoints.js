// The checkpoint drop-down: filled from /sd-models and /options, switched with POST /options.

import { get, post } from "./api.js";
import { $, fillSelect } from "./dom.js";
import { clearFieldErrors, showFieldErrors } from "./fielderrors.js";

export async function loadCheckpoints() {
  const [models, options] = await Promise.all([get("/sdapi/v1/sd-models"), get("/sdapi/v1/options")]);
  const items = (models ?? []).map((m) => ({ value: m.title ?? m.model_name, label: m.title ?? m.model_name }));
  const current = options?.sd_model_checkpoint;
  const match = items.find((i) => i.value === current) ?? items.find((i) => current && i.value.startsWith(current));
  fillSelect($("#checkpoint"), items, match?.value);
  $("#checkpoint-status").textContent = items.length ? "" : "No checkpoints found in the models folder.";
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
    } catch (err) {
      status.textContent = "";
      showFieldErrors(err, { root: topbar, rename: () => "sd_model_checkpoint" });
      await loadCheckpoints().catch(() => {});
    } finally {
      onSwitching(false);
    }
  });
}
