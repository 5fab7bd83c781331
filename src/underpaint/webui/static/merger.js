// A1111's "Checkpoint Merger" tab: two or three checkpoints into a new one through POST
// /underpaint/v1/merge-checkpoints (run on the server's queue), then the checkpoint lists read again.

import { get, post } from "./api.js";
import { $, $$, fillSelect, numberValue, radioValue } from "./dom.js";
import { checkpointName } from "./extranetworks.js";
import { clearFieldErrors, showFieldErrors } from "./fielderrors.js";

const FORMULAS = {
  "No interpolation": "Result = A (to convert it, or bake a VAE into it)",
  "Weighted sum": "Result = A · (1 − M) + B · M",
  "Add difference": "Result = A + (B − C) · M",
};

/** Wire the tab; `onMerged()` runs after a new checkpoint is written (the page's lists go stale). */
export function setupMerger({ onMerged }) {
  const panel = $("#panel-merger");
  const status = $("#merge-status");
  const errorBox = $("#merge-error");
  const button = $("#merge-run");
  const method = () => radioValue(panel, "interp_method");

  const showMethod = () => {
    $("#merge-formula").textContent = FORMULAS[method()] ?? "";
    $("#merge_secondary").disabled = method() === "No interpolation";
    $("#merge_tertiary").disabled = method() !== "Add difference";
  };
  $$('input[name="interp_method"]', panel).forEach((radio) => radio.addEventListener("change", showMethod));
  showMethod();

  async function load() {
    const [models, vaes] = await Promise.all([get("/sdapi/v1/sd-models"), get("/sdapi/v1/sd-vae")]);
    const items = (models ?? []).map((m) => ({ value: m.title, label: m.title }));
    const none = { value: "", label: "None" };
    // the choice stays when the title changes (a checkpoint gains its short hash once loaded)
    const same = (select, fallback) => {
      const name = checkpointName(select.value);
      return items.find((i) => name && checkpointName(i.value) === name)?.value ?? fallback;
    };
    fillSelect($("#merge_primary"), items, same($("#merge_primary"), items[0]?.value));
    fillSelect($("#merge_secondary"), [none, ...items], same($("#merge_secondary"), items[1]?.value));
    fillSelect($("#merge_tertiary"), [none, ...items], same($("#merge_tertiary"), ""));
    fillSelect($("#merge_bake_in_vae"), [{ value: "None", label: "None" },
      ...(vaes ?? []).map((v) => ({ value: v.model_name, label: v.model_name }))], "None");
  }

  button.addEventListener("click", async () => {
    clearFieldErrors(panel);
    errorBox.hidden = true;
    button.disabled = true;
    status.textContent = "Merging…";
    try {
      const answer = await post("/underpaint/v1/merge-checkpoints", {
        primary_model_name: $("#merge_primary").value,
        secondary_model_name: method() === "No interpolation" ? null : $("#merge_secondary").value || null,
        tertiary_model_name: method() === "Add difference" ? $("#merge_tertiary").value || null : null,
        interp_method: method(),
        multiplier: numberValue($("#merge_multiplier")),
        save_as_half: $("#merge_save_as_half").checked,
        custom_name: $("#merge_custom_name").value,
        checkpoint_format: radioValue(panel, "checkpoint_format"),
        bake_in_vae: $("#merge_bake_in_vae").value,
        discard_weights: $("#merge_discard_weights").value,
      });
      status.textContent = answer.info;
      await Promise.all([load(), onMerged()]);
    } catch (err) {
      status.textContent = "";
      showFieldErrors(err, { root: panel, generalBox: errorBox });
    } finally {
      button.disabled = false;
    }
  });

  return { load };
}
