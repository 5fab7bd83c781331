// The generation settings: fill the drop-downs from the API, read the form into A1111 request
// fields (txt2img with its Hires. fix, img2img, inpaint), and set it back from fields (infotext,
// PNG Info).

import { $, fillSelect, numberValue, radioValue, setNumber, setRadio } from "./dom.js";

/** Give each option of `select` its other names ("a|b"), for matchOption. */
function setAliases(select, aliases) {
  aliases.forEach((names, i) => { if (select.options[i]) select.options[i].dataset.aliases = names; });
}

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

/**
 * The option of a checkpoint select (values are /sd-models titles, "dir/name.safetensors [hash]") that an
 * infotext's "name [hash]" (A1111's short title: no folder, no extension) means, or null.
 */
export function matchCheckpoint(select, wanted) {
  const split = (text) => {
    const [, name, hash] = /^(.*?)(?:\s*\[([0-9a-f]+)\])?$/i.exec(text.trim());
    return [name.replace(/^.*[\\/]/, "").replace(/\.(safetensors|ckpt|gguf)$/i, "").toLowerCase(), hash?.toLowerCase()];
  };
  const [name, hash] = split(wanted);
  for (const option of select.options) {
    const [optionName, optionHash] = split(option.value);
    if (optionName === name && (!hash || !optionHash || hash === optionHash)) return option.value;
  }
  return null;
}

const SCHEDULE_SUFFIXES = ["Karras", "Exponential", "Uniform", "SGM Uniform", "Polyexponential"];

/** A legacy combined name ("DPM++ 2M Karras") split into [sampler, schedule]; others come back whole. */
function splitLegacySampler(select, sampler) {
  if (sampler === undefined || sampler === "" || matchOption(select, sampler) !== null) return [sampler, undefined];
  const suffix = SCHEDULE_SUFFIXES.find((s) => sampler.endsWith(` ${s}`));
  return suffix ? [sampler.slice(0, -suffix.length - 1), suffix] : [sampler, undefined];
}

/**
 * The Hires. fix pass's size for a first pass of `width` x `height`, as the server works it out
 * (A1111's rule): `scale` times the size, unless a resize width/height is given (the other 0 keeps
 * the aspect ratio; both: cover that size, then crop), in whole blocks of `multiple` pixels (8; FLUX 16).
 */
export function hiresOutputSize(width, height, { scale, resizeX, resizeY, multiple = 8 }) {
  let upW;
  let upH;
  let cropX = 0;
  let cropY = 0;
  if (!resizeX && !resizeY) {
    [upW, upH] = [Math.floor(width * scale), Math.floor(height * scale)];
  } else if (!resizeY) {
    [upW, upH] = [resizeX, Math.floor((resizeX * height) / width)];
  } else if (!resizeX) {
    [upW, upH] = [Math.floor((resizeY * width) / height), resizeY];
  } else {
    if (width / height < resizeX / resizeY) [upW, upH] = [resizeX, Math.floor((resizeX * height) / width)];
    else [upW, upH] = [Math.floor((resizeY * width) / height), resizeY];
    [cropX, cropY] = [Math.floor((upW - resizeX) / 8), Math.floor((upH - resizeY) / 8)];
  }
  const cells = multiple / 8;
  return [Math.floor((Math.floor(upW / 8) - cropX) / cells) * multiple,
    Math.floor((Math.floor(upH / 8) - cropY) / cells) * multiple];
}

/** FreeU's factors, in the order of Forge's "FreeU Integrated" script arguments after its switch. */
const FREEU_FACTORS = ["freeu_b1", "freeu_b2", "freeu_s1", "freeu_s2"];

const HIRES_NUMBERS = ["hr_scale", "hr_resize_x", "hr_resize_y", "hr_second_pass_steps", "hr_denoising_strength"];

export class GenerationForm {
  constructor(root = document) {
    this.root = root;
    this.controls = {};
    for (const name of ["prompt", "negative_prompt", "sampler_name", "scheduler", "steps", "width", "height",
      "n_iter", "batch_size", "cfg_scale", "distilled_cfg_scale", "image_cfg_scale", "denoising_strength", "seed", "mask_blur",
      "seed_extra", "subseed", "subseed_strength", "seed_resize_from_w", "seed_resize_from_h",
      "inpaint_full_res_padding", "deepcache_interval", "deepcache_branch", "first_block_cache", "s_min_uncond",
      "s_min_uncond_all", "skip_early_cond", "sd_vae_decode_method", "sd_vae_encode_method", "tiling", "restore_faces", "face_restoration_model", "code_former_weight",
      "img2img_color_correction", "initial_noise_multiplier", "img2img_extra_noise", "freeu_enabled", ...FREEU_FACTORS,
      "ad_enable", "ad_model", "ad_prompt", "ad_negative_prompt", "ad_confidence", "ad_denoising_strength",
      "ad_inpaint_only_masked_padding", "ad_mask_k", "ad_mask_filter_method", "ad_model_classes",
      "ad_controlnet_model", "ad_controlnet_weight", "ad_checkpoint", "ad_vae", "refiner_enabled", "refiner_checkpoint", "refiner_switch_at", "aesthetic_score", "negative_aesthetic_score", "enable_hr", "hr_upscaler",
      ...HIRES_NUMBERS, "hr_extra_noise", "hires_fix_refiner_pass", "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt"]) {
      this.controls[name] = $(`#${name}`, root);
    }
    this.hint = $("#denoise-hint", root);
    this.family = "sd";
    this.editModel = false;
    this.controls.denoising_strength.addEventListener("input", () => this.updateDenoiseHint());
    $('input[data-sync="denoising_strength"]', root).addEventListener("input", () => this.updateDenoiseHint());
    this.updateDenoiseHint();
    this.controls.deepcache_interval.addEventListener("input", () => this.updateDeepCache());
    this.updateDeepCache();
    this.controls.s_min_uncond.addEventListener("input", () => this.updateGuidanceSkip());
    this.updateGuidanceSkip();
    this.controls.seed_extra.addEventListener("change", () => this.updateSeedExtra());
    this.updateSeedExtra();
    this.controls.enable_hr.addEventListener("change", () => this.updateHires());
    const sizeInputs = ["width", "height", "hr_scale", "hr_resize_x", "hr_resize_y"]
      .flatMap((name) => [this.controls[name], $(`input[data-sync="${name}"]`, root)]);
    sizeInputs.forEach((input) => input.addEventListener("input", () => this.updateHiresSize()));
    this.updateHires();
  }

  /** The Hires. fix settings show (and are sent) only while it is on, as A1111's accordion. */
  updateHires() {
    $("#hires-body", this.root).hidden = !this.controls.enable_hr.checked;
    this.updateHiresSize();
  }

  /** "64×96 → 128×192": the size the second pass will make, under the Hires. fix checkbox. */
  updateHiresSize() {
    const c = this.controls;
    const [width, height] = [numberValue(c.width), numberValue(c.height)];
    const out = $("#hires-size", this.root);
    if (!width || !height) {
      out.textContent = "";
      return;
    }
    const [w, h] = hiresOutputSize(width, height, {
      scale: numberValue(c.hr_scale) ?? 0, resizeX: numberValue(c.hr_resize_x) ?? 0, resizeY: numberValue(c.hr_resize_y) ?? 0,
      multiple: this.family === "flux" ? 16 : 8,
    });
    out.textContent = `Upscale from ${width}×${height} to ${w}×${h}`;
  }

  /** DeepCache's interval when it is on (2 or more), else null: 0 and 1 both run every step in full. */
  deepCacheInterval() {
    const interval = numberValue(this.controls.deepcache_interval);
    return interval !== null && interval >= 2 ? interval : null;
  }

  /** "All steps" only means something while NGMS is on. */
  /** A1111's "Extra" shows the variation seed's controls; they are sent only while it is on. */
  updateSeedExtra() {
    $("#seed-extra", this.root).hidden = !this.controls.seed_extra.checked;
  }

  variationValues() {
    const c = this.controls;
    if (!c.seed_extra.checked) return {};
    return {
      subseed: numberValue(c.subseed) ?? -1,
      subseed_strength: numberValue(c.subseed_strength) ?? 0,
      seed_resize_from_w: numberValue(c.seed_resize_from_w) || undefined,
      seed_resize_from_h: numberValue(c.seed_resize_from_h) || undefined,
    };
  }

  updateGuidanceSkip() {
    this.controls.s_min_uncond_all.disabled = !numberValue(this.controls.s_min_uncond);
  }

  /** The branch only means something while DeepCache is on. */
  updateDeepCache() {
    this.controls.deepcache_branch.disabled = this.deepCacheInterval() === null;
  }

  fillSamplers(samplers) {
    const items = samplers.map((s) => ({ value: s.name, label: s.name }));
    const aliases = samplers.map((s) => (s.aliases ?? []).join("|"));
    fillSelect(this.controls.sampler_name, items, this.family === "flux" ? "Euler" : "DPM++ 2M");
    fillSelect(this.controls.hr_sampler_name, [{ value: "", label: "Use same sampler" }, ...items], "");
    setAliases(this.controls.sampler_name, aliases);
    setAliases(this.controls.hr_sampler_name, ["", ...aliases]);
  }

  fillSchedulers(schedulers) {
    const items = schedulers.map((s) => ({ value: s.label ?? s.name, label: s.label ?? s.name }));
    const aliases = schedulers.map((s) => [s.name, ...(s.aliases ?? [])].join("|"));
    fillSelect(this.controls.scheduler, items, this.family === "flux" ? "Simple" : "Automatic");
    fillSelect(this.controls.hr_scheduler, [{ value: "", label: "Use same scheduler" }, ...items], "");
    setAliases(this.controls.scheduler, aliases);
    setAliases(this.controls.hr_scheduler, ["", ...aliases]);
  }

  /** The Hires. fix upscalers: the latent modes first, then the picture upscalers (A1111's order). */
  /** ADetailer's models as /adetailer/v1/ad_model lists them (its files first, then the face models' names). */
  fillDetailerModels(names) {
    const models = names.filter((name) => name !== "None");
    if (!models.length) return;
    fillSelect(this.controls.ad_model, models.map((name) => ({ value: name, label: name })), "face_yolov8n.pt");
  }

  /** ADetailer's ControlNet choices: None, Passthrough (the request's own units), then the ControlNet models. */
  fillDetailerControlNets(models) {
    const names = models.filter((name) => name !== "None");
    fillSelect(this.controls.ad_controlnet_model,
      ["None", "Passthrough", ...names].map((name) => ({ value: name, label: name })), "None");
  }

  fillUpscalers(names) {
    if (!names.length) return;  // keep the built-in list the page starts with
    fillSelect(this.controls.hr_upscaler, names.map((name) => ({ value: name, label: name })), "Latent");
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
    $("#fbcache-row", this.root).hidden = !flux;  // and First Block Cache is for its transformer only
    $("#tiling-field", this.root).hidden = flux;  // its transformer has no convolutions to wrap around
    $("#freeu-section", this.root).hidden = flux;  // FreeU works on a UNet's decoder
    $("#adetailer-section", this.root).hidden = flux;  // and face detailing inpaints with SD models
    $("#refiner-section", this.root).hidden = flux;  // and the refiner switch is for SD and SDXL models
    this.updateHiresSize();  // FLUX's latent patches make sizes whole blocks of 16
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
  overrideSettings(mode = "img2img") {
    const settings = {};
    if (this.family === "flux") {
      const threshold = numberValue(this.controls.first_block_cache);
      if (threshold) settings.first_block_cache_threshold = threshold;
    } else {
      const interval = this.deepCacheInterval();
      if (interval !== null) {
        settings.deepcache_interval = interval;
        settings.deepcache_branch = numberValue(this.controls.deepcache_branch) ?? 0;
      }
    }
    // Sent only when on, so the server's own settings apply otherwise (as A1111's Settings page).
    const sigma = numberValue(this.controls.s_min_uncond);
    if (sigma) {
      settings.s_min_uncond = sigma;
      if (this.controls.s_min_uncond_all.checked) settings.s_min_uncond_all = true;
    }
    const early = numberValue(this.controls.skip_early_cond);
    if (early) settings.skip_early_cond = early;
    for (const name of ["sd_vae_decode_method", "sd_vae_encode_method"]) {
      if (this.controls[name].value !== "Full") settings[name] = this.controls[name].value;
    }
    if (this.controls.restore_faces.checked) {  // the restorer's settings, away from A1111's defaults
      if (this.controls.face_restoration_model.value !== "CodeFormer") {
        settings.face_restoration_model = this.controls.face_restoration_model.value;
      }
      const weight = numberValue(this.controls.code_former_weight);
      if (weight !== null && weight !== 0.5) settings.code_former_weight = weight;
    }
    if (this.family !== "flux") {  // the SDXL refiner's scores, where they differ from A1111's defaults
      const high = numberValue(this.controls.aesthetic_score);
      const low = numberValue(this.controls.negative_aesthetic_score);
      if (high !== null && high !== 6) settings.sdxl_refiner_high_aesthetic_score = high;
      if (low !== null && low !== 2.5) settings.sdxl_refiner_low_aesthetic_score = low;
    }
    if (mode !== "txt2img") {  // img2img's own settings, shown on its tabs only
      if (this.controls.img2img_color_correction.checked) settings.img2img_color_correction = true;
      const extraNoise = numberValue(this.controls.img2img_extra_noise);
      if (extraNoise) settings.img2img_extra_noise = extraNoise;
    } else if (this.controls.enable_hr.checked) {  // the same settings for Hires. fix's second pass
      const extraNoise = numberValue(this.controls.hr_extra_noise);
      if (extraNoise) settings.img2img_extra_noise = extraNoise;
      const pass = this.controls.hires_fix_refiner_pass.value;
      if (pass !== "second pass" && this.family !== "flux") settings.hires_fix_refiner_pass = pass;
    }
    return Object.keys(settings).length ? settings : undefined;
  }

  /** Forge's "FreeU Integrated" always-on script while FreeU is on (Stable Diffusion models), else none. */
  alwaysOnScripts() {
    const c = this.controls;
    const scripts = {};
    if (this.family !== "flux" && c.freeu_enabled.checked) {
      scripts["FreeU Integrated"] = { args: [true, ...FREEU_FACTORS.map((name) => numberValue(c[name]))] };
    }
    if (this.family !== "flux" && c.ad_enable.checked) {  // ADetailer's face tab
      scripts.ADetailer = { args: [true, false, {
        ad_model: c.ad_model.value || "face_yolov8n.pt", ad_prompt: c.ad_prompt.value,
        ad_negative_prompt: c.ad_negative_prompt.value,
        ad_confidence: numberValue(c.ad_confidence), ad_denoising_strength: numberValue(c.ad_denoising_strength),
        ad_inpaint_only_masked_padding: numberValue(c.ad_inpaint_only_masked_padding),
        ad_mask_k: numberValue(c.ad_mask_k), ad_mask_filter_method: c.ad_mask_filter_method.value,
        ad_model_classes: c.ad_model_classes.value,
        ad_controlnet_model: c.ad_controlnet_model.value || "None",
        ad_controlnet_weight: numberValue(c.ad_controlnet_weight),
        ...(c.ad_checkpoint.value ? { ad_use_checkpoint: true, ad_checkpoint: c.ad_checkpoint.value } : {}),
        ...(c.ad_vae.value ? { ad_use_vae: true, ad_vae: c.ad_vae.value } : {}),
      }] };
    }
    return scripts;
  }

  /** The request fields of `mode` (txt2img, img2img, inpaint), with A1111's names. */
  values(mode = "img2img") {
    const c = this.controls;
    const common = {
      prompt: c.prompt.value,
      negative_prompt: c.negative_prompt.value,
      sampler_name: c.sampler_name.value || undefined,
      scheduler: c.scheduler.value || undefined,
      steps: numberValue(c.steps),
      cfg_scale: numberValue(c.cfg_scale),
      distilled_cfg_scale: this.family === "flux" ? numberValue(c.distilled_cfg_scale) : undefined,
      seed: numberValue(c.seed) ?? -1,
      ...this.variationValues(),
      width: numberValue(c.width),
      height: numberValue(c.height),
      batch_size: numberValue(c.batch_size),
      n_iter: numberValue(c.n_iter),
      override_settings: this.overrideSettings(mode),
      tiling: this.family !== "flux" && c.tiling.checked ? true : undefined,
      restore_faces: c.restore_faces.checked ? true : undefined,
      ...this.refinerValues(),
    };
    if (mode === "txt2img") return { ...common, ...this.hiresValues() };
    const multiplier = numberValue(c.initial_noise_multiplier);
    return {
      ...common,
      initial_noise_multiplier: multiplier !== null && multiplier !== 1 ? multiplier : undefined,
      denoising_strength: numberValue(c.denoising_strength),
      image_cfg_scale: this.editModel ? numberValue(c.image_cfg_scale) : undefined,
      resize_mode: Number(radioValue(this.root, "resize_mode") ?? 0),
    };
  }

  /** Show A1111's Image CFG Scale (img2img and Inpaint) for an InstructPix2Pix edit model, hide it otherwise. */
  setEditModel(edit) {
    this.editModel = Boolean(edit);
    $("#image-cfg-field", this.root).hidden = !this.editModel;
  }

  /** A1111's refiner_checkpoint and refiner_switch_at while the Refiner is enabled (SD models), else none. */
  refinerValues() {
    const c = this.controls;
    if (this.family === "flux" || !c.refiner_enabled.checked || !c.refiner_checkpoint.value) return {};
    return { refiner_checkpoint: c.refiner_checkpoint.value, refiner_switch_at: numberValue(c.refiner_switch_at) };
  }

  /** Hires. fix's fields while it is on, else none (the server's default is off). */
  hiresValues() {
    const c = this.controls;
    if (!c.enable_hr.checked) return {};
    return {
      enable_hr: true,
      hr_upscaler: c.hr_upscaler.value,
      hr_second_pass_steps: numberValue(c.hr_second_pass_steps),
      denoising_strength: numberValue(c.hr_denoising_strength),  // txt2img's strength is the second pass's
      hr_scale: numberValue(c.hr_scale),
      hr_resize_x: numberValue(c.hr_resize_x),
      hr_resize_y: numberValue(c.hr_resize_y),
      hr_checkpoint_name: c.hr_checkpoint_name.value || undefined,
      hr_sampler_name: c.hr_sampler_name.value || undefined,
      hr_scheduler: c.hr_scheduler.value || undefined,
      hr_prompt: c.hr_prompt.value,
      hr_negative_prompt: c.hr_negative_prompt.value,
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

  /**
   * Set every control named in `fields` for the `target` tab; returns notes about values this server
   * does not offer. In txt2img the denoising strength is Hires. fix's (as A1111 reads infotext).
   */
  apply(fields, target = "img2img") {
    const c = this.controls;
    const notes = [];
    for (const name of ["prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt", "ad_prompt",
      "ad_negative_prompt", "ad_model_classes"]) {
      if (fields[name] !== undefined) c[name].value = fields[name];
    }
    const numbers = { ...fields };
    if (target === "txt2img") {
      numbers.hr_denoising_strength = fields.denoising_strength;
      delete numbers.denoising_strength;
      numbers.hr_extra_noise = fields.img2img_extra_noise;  // on txt2img, Extra noise is the second pass's
      delete numbers.img2img_extra_noise;
    }
    for (const name of ["steps", "cfg_scale", "distilled_cfg_scale", "denoising_strength", "seed", "width", "height",
      "batch_size",
      "mask_blur", "inpaint_full_res_padding", "deepcache_interval", "deepcache_branch", "first_block_cache",
      "s_min_uncond", "skip_early_cond", "initial_noise_multiplier", "img2img_extra_noise", "hr_extra_noise",
      "ad_confidence", "ad_denoising_strength", "ad_inpaint_only_masked_padding", "ad_mask_k", "ad_controlnet_weight",
      ...HIRES_NUMBERS]) {
      if (typeof numbers[name] === "number") setNumber(c[name], numbers[name]);
    }
    if (typeof fields.seed_extra === "boolean") {
      c.seed_extra.checked = fields.seed_extra;
      for (const name of ["subseed", "subseed_strength", "seed_resize_from_w", "seed_resize_from_h"]) {
        setNumber(c[name], typeof fields[name] === "number" ? fields[name] : Number(c[name].defaultValue));
      }
      this.updateSeedExtra();
    }
    if (typeof fields.s_min_uncond_all === "boolean") c.s_min_uncond_all.checked = fields.s_min_uncond_all;
    for (const name of ["sd_vae_decode_method", "sd_vae_encode_method"]) {
      if (fields[name] === "Full" || fields[name] === "TAESD") c[name].value = fields[name];
    }
    // Legacy combined names ("DPM++ 2M Karras") carry the schedule in the sampler.
    const [sampler, legacySchedule] = splitLegacySampler(c.sampler_name, fields.sampler_name);
    const scheduler = fields.scheduler ?? legacySchedule;
    const [hiresSampler, hiresLegacySchedule] = splitLegacySampler(c.hr_sampler_name, fields.hr_sampler_name);
    // Infotext without "Hires schedule type" reads "" (the first pass's), unless the hires sampler carries one.
    const hiresScheduler = (fields.hr_scheduler || hiresLegacySchedule) ?? fields.hr_scheduler;
    for (const [select, wanted, label] of [[c.sampler_name, sampler, "sampler"], [c.scheduler, scheduler, "schedule"],
      [c.hr_sampler_name, hiresSampler, "hires sampler"], [c.hr_scheduler, hiresScheduler, "hires schedule"],
      [c.hr_upscaler, fields.hr_upscaler, "hires upscaler"]]) {
      if (wanted === undefined) continue;
      const value = wanted === "" ? "" : matchOption(select, wanted);
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
    if (typeof fields.enable_hr === "boolean") c.enable_hr.checked = fields.enable_hr;
    if (typeof fields.tiling === "boolean") c.tiling.checked = fields.tiling;
    if (typeof fields.restore_faces === "boolean") c.restore_faces.checked = fields.restore_faces;
    if (typeof fields.face_restoration_model === "string") {
      const option = matchOption(c.face_restoration_model, fields.face_restoration_model);
      if (option === null) notes.push(`face restorer ${fields.face_restoration_model} is not available`);
      else c.face_restoration_model.value = option;
    }
    if (typeof fields.freeu_enabled === "boolean") c.freeu_enabled.checked = fields.freeu_enabled;
    if (typeof fields.ad_enable === "boolean") c.ad_enable.checked = fields.ad_enable;
    if (typeof fields.ad_model === "string") {
      const option = matchOption(c.ad_model, fields.ad_model);
      if (option === null) notes.push(`ADetailer model ${fields.ad_model} is not on this server`);
      else c.ad_model.value = option;
    }
    if (typeof fields.ad_controlnet_model === "string") {  // "name" or "name [hash]", as either lists it
      const bare = (text) => text.replace(/\s*\[[0-9a-fA-F]{8,10}\]$/, "");
      const option = [...c.ad_controlnet_model.options].map((o) => o.value)
        .find((value) => bare(value) === bare(fields.ad_controlnet_model)) ?? null;
      if (option === null) notes.push(`ADetailer ControlNet model ${fields.ad_controlnet_model} is not on this server`);
      else c.ad_controlnet_model.value = option;
    }
    if (typeof fields.ad_checkpoint === "string") {  // a title as the infotext writes it, or "": the same checkpoint
      const option = fields.ad_checkpoint ? matchOption(c.ad_checkpoint, fields.ad_checkpoint)
        ?? matchCheckpoint(c.ad_checkpoint, fields.ad_checkpoint) : "";
      if (option === null) notes.push(`ADetailer checkpoint ${fields.ad_checkpoint} is not on this server`);
      else c.ad_checkpoint.value = option;
    }
    if (typeof fields.ad_vae === "string") {  // a VAE's name, "None" (the checkpoint's own) or "": the same
      const option = fields.ad_vae ? matchOption(c.ad_vae, fields.ad_vae) : "";
      if (option === null) notes.push(`ADetailer VAE ${fields.ad_vae} is not on this server`);
      else c.ad_vae.value = option;
    }
    if (typeof fields.ad_mask_filter_method === "string") {
      const option = matchOption(c.ad_mask_filter_method, fields.ad_mask_filter_method);
      if (option !== null) c.ad_mask_filter_method.value = option;
    }
    if (typeof fields.refiner_enabled === "boolean") c.refiner_enabled.checked = fields.refiner_enabled;
    if (typeof fields.refiner_switch_at === "number") setNumber(c.refiner_switch_at, fields.refiner_switch_at);
    if (typeof fields.hires_fix_refiner_pass === "string") {
      const option = matchOption(c.hires_fix_refiner_pass, fields.hires_fix_refiner_pass);
      if (option === null) notes.push(`Hires refiner "${fields.hires_fix_refiner_pass}" is not a pass`);
      else c.hires_fix_refiner_pass.value = option;
    }
    if (typeof fields.hr_checkpoint_name === "string") {
      const option = fields.hr_checkpoint_name === "" ? ""
        : matchOption(c.hr_checkpoint_name, fields.hr_checkpoint_name) ?? matchCheckpoint(c.hr_checkpoint_name, fields.hr_checkpoint_name);
      if (option === null) notes.push(`hires checkpoint ${fields.hr_checkpoint_name} is not on this server`);
      else c.hr_checkpoint_name.value = option;
    }
    if (fields.refiner_checkpoint) {
      const option = matchOption(c.refiner_checkpoint, fields.refiner_checkpoint)
        ?? matchCheckpoint(c.refiner_checkpoint, fields.refiner_checkpoint);
      if (option === null) notes.push(`refiner checkpoint ${fields.refiner_checkpoint} is not on this server`);
      else c.refiner_checkpoint.value = option;
    }
    for (const name of FREEU_FACTORS) {
      if (typeof fields[name] === "number") setNumber(c[name], fields[name]);
    }
    this.updateHires();
    this.updateDenoiseHint();
    this.updateGuidanceSkip();
    return notes;
  }
}
