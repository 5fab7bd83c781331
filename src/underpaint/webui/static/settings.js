// A1111's "Settings" tab: the server's settings (GET /sdapi/v1/options) that change pictures, in A1111's
// sections and words; "Apply settings" posts the ones changed (POST /sdapi/v1/options), and the server's
// refusals show beside their fields. The top bar's quick settings are the same settings.

import { get, post } from "./api.js";
import { $, $$, el } from "./dom.js";
import { clearFieldErrors, showFieldErrors } from "./fielderrors.js";

// [key, label, kind, ...]: "int"/"float" with min, max and step; "bool"; "select" with its choices, or the
// list URL whose entries' names follow "None".
const SECTIONS = [
  ["Saving images/grids", [
    ["samples_format", "File format for images", "select", ["png", "jpg", "jpeg", "webp"]],
    ["jpeg_quality", "Quality for saved jpeg and webp images", "int", 1, 100, 1],
  ]],
  ["Stable Diffusion", [
    ["CLIP_stop_at_last_layers", "Clip skip", "int", 1, 12, 1],
    ["eta_noise_seed_delta", "Eta noise seed delta (ENSD)", "int", 0, 4294967295, 1],
    ["randn_source", "Random number generator source", "select", ["GPU", "CPU", "NV"]],
    ["enable_prompt_comments", "Enable comments (# hides the rest of its line of a prompt)", "bool"],
    ["tiling", "Tiling", "bool"],
    ["sgm_noise_multiplier", "SGM noise multiplier (match Stability's SGM code for SDXL)", "bool"],
  ]],
  ["img2img", [
    ["img2img_fix_steps", "With img2img, do exactly the amount of steps the slider specifies", "bool"],
    ["initial_noise_multiplier", "Noise multiplier for img2img", "float", 0, 4, 0.01],
    ["img2img_extra_noise", "Extra noise multiplier for img2img and hires fix", "float", 0, 1, 0.01],
    ["img2img_color_correction", "Apply color correction to img2img results to match original colors", "bool"],
  ]],
  ["Sampler parameters", [
    ["eta_ddim", "Eta for DDIM (noise multiplier; 0 = deterministic)", "float", 0, 1, 0.01],
    ["eta_ancestral", "Eta for k-diffusion samplers (noise multiplier for ancestral samplers)", "float", 0, 1, 0.01],
    ["s_churn", "sigma churn", "float", 0, 100, 0.01],
    ["s_tmin", "sigma tmin", "float", 0, 10, 0.01],
    ["s_tmax", "sigma tmax (0 = no upper bound)", "float", 0, 999, 0.01],
    ["s_noise", "sigma noise", "float", 0, 1.1, 0.001],
    ["sigma_min", "sigma min (0 = the model's)", "float", 0, 1000, 0.01],
    ["sigma_max", "sigma max (0 = the model's)", "float", 0, 1000, 0.01],
    ["rho", "rho (0 = the schedule's own)", "float", 0, 100, 0.01],
    ["always_discard_next_to_last_sigma", "Always discard next-to-last sigma", "bool"],
    ["uni_pc_order", "UniPC order", "int", 1, 50, 1],
    ["beta_dist_alpha", "Beta scheduler - alpha", "float", 0.01, 10, 0.01],
    ["beta_dist_beta", "Beta scheduler - beta", "float", 0.01, 10, 0.01],
    ["s_min_uncond", "Negative Guidance minimum sigma", "float", 0, 1000, 0.01],
    ["s_min_uncond_all", "NGMS: skip every step", "bool"],
    ["skip_early_cond", "Ignore negative prompt during early sampling", "float", 0, 1, 0.01],
  ]],
  ["Optimizations", [
    ["token_merging_ratio", "Token merging ratio", "float", 0, 0.9, 0.1],
    ["token_merging_ratio_img2img", "Token merging ratio for img2img (0: the one above)", "float", 0, 0.9, 0.1],
    ["token_merging_ratio_hr", "Token merging ratio for high-res pass (0: the ones above)", "float", 0, 0.9, 0.1],
  ]],
  ["SDXL", [
    ["sdxl_crop_top", "Crop top coordinate", "int", 0, 8192, 1],
    ["sdxl_crop_left", "Crop left coordinate", "int", 0, 8192, 1],
    ["sdxl_refiner_high_aesthetic_score", "SDXL high aesthetic score", "float", 0, 10, 0.5],
    ["sdxl_refiner_low_aesthetic_score", "SDXL low aesthetic score", "float", 0, 10, 0.5],
    ["hires_fix_refiner_pass", "Hires fix: which pass to enable refiner for", "select",
      ["first pass", "second pass", "both passes"]],
  ]],
  ["VAE", [
    ["sd_vae_encode_method", "VAE type for encode", "select", ["Full", "TAESD"]],
    ["sd_vae_decode_method", "VAE type for decode", "select", ["Full", "TAESD"]],
  ]],
  ["Extra Networks", [
    ["extra_networks_default_multiplier", "Default multiplier for extra networks", "float", 0, 2, 0.01],
    ["sd_hypernetwork", "Add hypernetwork to prompt", "select", "/sdapi/v1/hypernetworks"],
  ]],
  ["Face restoration", [
    ["face_restoration", "Restore faces", "bool"],
    ["face_restoration_model", "Face restoration model", "select", ["CodeFormer", "GFPGAN"]],
    ["code_former_weight", "CodeFormer weight (0 = maximum effect, 1 = minimum effect)", "float", 0, 1, 0.01],
  ]],
  ["Interrogate", [
    ["interrogate_return_ranks", "Include ranks of model tags matches in results", "bool"],
    ["interrogate_clip_num_beams", "BLIP: num_beams", "int", 1, 16, 1],
    ["interrogate_clip_min_length", "BLIP: minimum description length", "int", 1, 128, 1],
    ["interrogate_clip_max_length", "BLIP: maximum description length", "int", 1, 256, 1],
    ["interrogate_clip_dict_limit", "CLIP: maximum number of lines in text file (0 = no limit)", "int", 0, 100000, 1],
    ["interrogate_deepbooru_score_threshold", "deepbooru: score threshold", "float", 0, 1, 0.01],
    ["deepbooru_sort_alpha", "deepbooru: sort tags alphabetically", "bool"],
    ["deepbooru_use_spaces", "deepbooru: use spaces in tags", "bool"],
    ["deepbooru_escape", "deepbooru: escape brackets with a backslash", "bool"],
    ["deepbooru_filter_tags", "deepbooru: filter out those tags (comma-separated)", "text"],
  ]],
  ["Saving images/grids", [
    ["return_grid", "Show grid in gallery (a saved batch's grid, first)", "bool"],
    ["grid_save", "Always save all generated image grids", "bool"],
  ]],
  ["Live previews", [
    ["live_previews_enable", "Show live previews of the created image", "bool"],
    ["show_progress_type", "Live preview method", "select", ["Full", "Approx NN", "Approx cheap", "TAESD"]],
  ]],
];

function control([key, label, kind, ...rest]) {
  const id = `setting_${key}`;
  if (kind === "bool") {
    return el("label", { class: "check-field" }, el("input", { type: "checkbox", id, "data-field": key, "data-key": key }),
      label);
  }
  let input;
  if (kind === "select" && typeof rest[0] === "string") {
    input = el("select", { id, "data-field": key, "data-key": key, "data-choices": rest[0] });
  } else if (kind === "select") {
    input = el("select", { id, "data-field": key, "data-key": key }, ...rest[0].map((v) => el("option", { value: v }, v)));
  } else if (kind === "text") {
    input = el("input", { type: "text", id, "data-field": key, "data-key": key });
  } else {
    const [min, max, step] = rest;
    input = el("input", { type: "number", id, "data-field": key, "data-key": key, min: String(min), max: String(max),
                          step: String(step), "data-kind": kind });
  }
  return el("div", { class: "field" }, el("label", { for: id }, label), input);
}

/** What a control holds, typed as the server's options are. */
function valueOf(input) {
  if (input.type === "checkbox") return input.checked;
  if (input.type === "number") return input.value === "" ? null : Number(input.value);
  return input.value;
}

/** Wire the tab; `onApplied()` runs after settings changed (the top bar's quick settings read them again). */
export function setupSettings({ onApplied }) {
  const panel = $("#panel-settings");
  const form = $("#settings-form");
  const status = $("#settings-status");
  const errorBox = $("#settings-error");
  form.replaceChildren(...SECTIONS.map(([title, items]) => el("fieldset", { class: "group" },
    el("legend", {}, title), ...items.map(control))));
  let loaded = {};
  // Settings edited while a load is on its way keep the user's values (a load starts at every visit of the tab).
  const editedDuringLoad = new Set();
  form.addEventListener("input", (event) => editedDuringLoad.add(event.target.dataset?.key));
  form.addEventListener("change", (event) => editedDuringLoad.add(event.target.dataset?.key));

  async function load() {
    editedDuringLoad.clear();
    const listed = $$("select[data-choices]", form);
    const [options, ...lists] = await Promise.all([get("/sdapi/v1/options"),
                                                   ...listed.map((select) => get(select.dataset.choices))]);
    loaded = options;
    listed.forEach((select, i) => {
      const chosen = select.value;
      const names = ["None", ...lists[i].map((entry) => entry.name)];
      select.replaceChildren(...names.map((name) => el("option", { value: name }, name)));
      if (editedDuringLoad.has(select.dataset.key) && names.includes(chosen)) select.value = chosen;
    });
    for (const input of $$("[data-key]", form)) {
      const value = loaded[input.dataset.key];
      if (value === undefined || value === null || editedDuringLoad.has(input.dataset.key)) continue;
      if (input.type === "checkbox") input.checked = Boolean(value);
      else input.value = String(value);
    }
  }

  $("#settings-apply").addEventListener("click", async () => {
    clearFieldErrors(panel);
    errorBox.hidden = true;
    const changed = {};
    for (const input of $$("[data-key]", form)) {
      const value = valueOf(input);
      if (value !== null && value !== loaded[input.dataset.key]) changed[input.dataset.key] = value;
    }
    const count = Object.keys(changed).length;
    if (!count) {
      status.textContent = "Nothing changed.";
      return;
    }
    try {
      await post("/sdapi/v1/options", changed);
      status.textContent = count === 1 ? "1 setting changed." : `${count} settings changed.`;
      await Promise.all([load(), onApplied()]);
    } catch (err) {
      status.textContent = "";
      showFieldErrors(err, { root: panel, generalBox: errorBox })?.focus();
    }
  });
  $("#settings-reload").addEventListener("click", () => load().then(() => { status.textContent = ""; }));
  return { load };
}
