// The generation settings: fill the drop-downs from the API, read the form into A1111 request
// fields, and set it back from fields (infotext, PNG Info).

import { $, fillSelect, numberValue, radioValue, setNumber, setRadio } from "./dom.js";

/** Spellings that name the same sampler or schedule: "DPM++ 2M", "dpmpp_2m", "k_dpmpp_2m", "Euler a"/"euler_ancestral". */
export function normalizeName(name) {
  return String(name)
    .toLowerCase()
    .replace(/^k_/, "")
    .replace(/\+\+/g, "pp")
    .replace(/[^a-z0-9]+/g, "_")
    .replace(/(^|_)a(?=_|$)/g, "$1ancestral")
    .replace(/_/g, "");
}

/** The option of `select` that `wanted` names, by value, label or any of its aliases. */
export function matchOption(select, wanted) {
  if (wanted === undefined || wanted === null || wanted === "") return null;
  const key = normalizeName(wanted);
  for (const option of select.options) {
    const names = [option.value, option.textContent, ...(option.dataset.aliases ?? "").split("|")];
    if (names.some((n) => n && normalizeName(n) === key)) return option.value;
  }
  return null;
}

const SCHEDULE_SUFFIXES = ["Karras", "Exponential", "Uniform", "SGM Uniform", "Polyexponential"];

export class GenerationForm {
  constructor(root = document) {
    this.root = root;
    this.controls = {};
    for (const name of ["prompt", "negative_prompt", "sampler_name", "scheduler", "steps", "width", "height",
      "n_iter", "batch_size", "cfg_scale", "distilled_cfg_scale", "denoising_strength", "seed", "mask_blur",
      "inpaint_full_res_padding", "deepcache_interval", "deepcache_branch"]) {
      this.controls[name] = $(`#${name}`, root);
    }
    this.hint = $("#denoise-hint", root);
    this.family = "sd";
    this.controls.denoising_strength.addEventListener("input", () => this.updateDenoiseHint());
    $('input[data-sync="denoising_strength"]', root).addEventListener("input", () => this.updateDenoiseHint());
    this.updateDenoiseHint();
    this.controls.deepcache_interval.addEventListener("input", () => this.updateDeepCache());
    this.updateDeepCache();
  }

  /** DeepCache's interval when it is on (2 or more), else null: 0 and 1 both run every step in full. */
  deepCacheInterval() {
    const interval = numberValue(this.controls.deepcache_interval);
    return interval !== null && interval >= 2 ? interval : null;
  }

  /** The branch only means something while DeepCache is on. */
  updateDeepCache() {
    this.controls.deepcache_branch.disabled = this.deepCacheInterval() === null;
  }

  fillSamplers(samplers) {
    const select = this.controls.sampler_name;
    fillSelect(select, samplers.map((s) => ({ value: s.name, label: s.name })), this.family === "flux" ? "Euler" : "DPM++ 2M");
    samplers.forEach((s, i) => { select.options[i].dataset.aliases = (s.aliases ?? []).join("|"); });
  }

  fillSchedulers(schedulers) {
    const select = this.controls.scheduler;
    const items = schedulers.map((s) => ({ value: s.label ?? s.name, label: s.label ?? s.name }));
    fillSelect(select, items, this.family === "flux" ? "Simple" : "Automatic");
    schedulers.forEach((s, i) => { select.options[i].dataset.aliases = [s.name, ...(s.aliases ?? [])].join("|"); });
  }

  /**
   * Switch the controls to a model family's usual settings when the family changes, as Forge's
   * presets do: FLUX runs Euler on the simple schedule at CFG 1 with its distilled guidance shown;
   * Stable Diffusion goes back to DPM++ 2M, Automatic, CFG 7. Settings within a family are kept.
   */
  applyFamily(family) {
    if (family === this.family) return;
    this.family = family;
    const c = this.controls;
    const flux = family === "flux";
    $("#distilled-field", this.root).hidden = !flux;
    $("#deepcache-row", this.root).hidden = flux;  // FLUX has no UNet to cache
    setNumber(c.cfg_scale, flux ? 1 : 7);
    for (const [select, value] of [[c.sampler_name, flux ? "Euler" : "DPM++ 2M"], [c.scheduler, flux ? "Simple" : "Automatic"]]) {
      if (matchOption(select, value) !== null) select.value = matchOption(select, value);
    }
  }

  /** The denoising strength's band (subtle / balanced / overhaul) in words, for the hint under the slider. */
  updateDenoiseHint() {
    const value = numberValue(this.controls.denoising_strength) ?? 0;
    let text;
    if (value < 0.1) text = "almost no change: the output stays the input";
    else if (value < 0.4) text = "subtle: keeps composition and colours, refines details";
    else if (value <= 0.7) text = "balanced: keeps the composition, repaints details and style";
    else text = "overhaul: only the rough layout of the input survives";
    this.hint.textContent = `${value.toFixed(2)} — ${text}`;
  }

  /** Per-request settings (A1111's override_settings), or undefined when there are none. */
  overrideSettings() {
    const interval = this.family === "flux" ? null : this.deepCacheInterval();
    if (interval === null) return undefined;
    return { deepcache_interval: interval, deepcache_branch: numberValue(this.controls.deepcache_branch) ?? 0 };
  }

  /** Fields shared by img2img and inpaint, with A1111's request names. */
  values() {
    const c = this.controls;
    return {
      prompt: c.prompt.value,
      negative_prompt: c.negative_prompt.value,
      sampler_name: c.sampler_name.value || undefined,
      scheduler: c.scheduler.value || undefined,
      steps: numberValue(c.steps),
      cfg_scale: numberValue(c.cfg_scale),
      distilled_cfg_scale: this.family === "flux" ? numberValue(c.distilled_cfg_scale) : undefined,
      denoising_strength: numberValue(c.denoising_strength),
      seed: numberValue(c.seed) ?? -1,
      width: numberValue(c.width),
      height: numberValue(c.height),
      resize_mode: Number(radioValue(this.root, "resize_mode") ?? 0),
      batch_size: numberValue(c.batch_size),
      n_iter: numberValue(c.n_iter),
      override_settings: this.overrideSettings(),
    };
  }

  inpaintValues() {
    return {
      mask_blur: numberValue(this.controls.mask_blur),
      inpainting_fill: Number(radioValue(this.root, "inpainting_fill") ?? 1),
      inpaint_full_res: radioValue(this.root, "inpaint_full_res") === "1",
      inpaint_full_res_padding: numberValue(this.controls.inpaint_full_res_padding),
      inpainting_mask_invert: Number(radioValue(this.root, "inpainting_mask_invert") ?? 0),
    };
  }

  /** Set every control named in `fields`; returns notes about values this server does not offer. */
  apply(fields) {
    const c = this.controls;
    const notes = [];
    for (const name of ["prompt", "negative_prompt"]) {
      if (fields[name] !== undefined) c[name].value = fields[name];
    }
    for (const name of ["steps", "cfg_scale", "distilled_cfg_scale", "denoising_strength", "seed", "width", "height",
      "batch_size",
      "mask_blur", "inpaint_full_res_padding", "deepcache_interval", "deepcache_branch"]) {
      if (typeof fields[name] === "number") setNumber(c[name], fields[name]);
    }
    let { sampler_name: sampler, scheduler } = fields;
    if (sampler !== undefined && matchOption(c.sampler_name, sampler) === null) {
      // Legacy combined names ("DPM++ 2M Karras") carry the schedule in the sampler.
      const suffix = SCHEDULE_SUFFIXES.find((s) => sampler.endsWith(` ${s}`));
      if (suffix) {
        scheduler ??= suffix;
        sampler = sampler.slice(0, -suffix.length - 1);
      }
    }
    for (const [select, wanted, label] of [[c.sampler_name, sampler, "sampler"], [c.scheduler, scheduler, "schedule"]]) {
      if (wanted === undefined) continue;
      const value = matchOption(select, wanted);
      if (value !== null) select.value = value;
      else notes.push(`${label} "${wanted}" is not offered by this server`);
    }
    if (fields.scheduler === undefined && sampler !== undefined && fields.sampler_name !== undefined) {
      const automatic = matchOption(c.scheduler, "Automatic");
      if (automatic !== null && scheduler === undefined) c.scheduler.value = automatic;
    }
    for (const name of ["resize_mode", "inpainting_fill", "inpainting_mask_invert"]) {
      if (fields[name] !== undefined) setRadio(this.root, name, Number(fields[name]));
    }
    if (fields.inpaint_full_res !== undefined) setRadio(this.root, "inpaint_full_res", fields.inpaint_full_res ? 1 : 0);
    this.updateDenoiseHint();
    return notes;
  }
}
