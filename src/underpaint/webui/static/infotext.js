// Reading generation parameters back out of images: A1111 infotext and ComfyUI's prompt graph.

/**
 * Split A1111's parameter line ("Steps: 20, Sampler: Euler a, Lora hashes: "a: 1, b: 2"")
 * into [key, value] pairs. Values containing "," or ":" are written JSON-quoted by A1111.
 */
export function parsePairs(line) {
  const pairs = [];
  let i = 0;
  while (i < line.length) {
    while (line[i] === " " || line[i] === ",") i++;
    const colon = line.indexOf(":", i);
    if (colon < 0) break;
    const key = line.slice(i, colon).trim();
    i = colon + 1;
    while (line[i] === " ") i++;
    let value;
    if (line[i] === '"') {
      let end = i + 1;
      while (end < line.length && line[end] !== '"') end += line[end] === "\\" ? 2 : 1;
      const quoted = line.slice(i, end + 1);
      try {
        value = JSON.parse(quoted);
      } catch {
        value = quoted.slice(1, -1);
      }
      i = end + 1;
    } else {
      const comma = line.indexOf(",", i);
      const end = comma < 0 ? line.length : comma;
      value = line.slice(i, end).trim();
      i = end;
    }
    if (!/^[\w][\w \-/+.()]*$/.test(key)) return pairs;  // not a parameter line after all
    pairs.push([key, value]);
  }
  return pairs;
}

/**
 * A1111's infotext → {prompt, negativePrompt, params}. The last line holds the parameters
 * only when it has at least three "key: value" pairs (otherwise it is part of the prompt).
 */
export function parseInfotext(text) {
  const lines = String(text ?? "").replace(/\r\n?/g, "\n").trim().split("\n");
  let params = {};
  const lastPairs = parsePairs(lines[lines.length - 1] ?? "");
  if (lines.length && lastPairs.length >= 3) {
    params = Object.fromEntries(lastPairs);
    lines.pop();
  }
  const prompt = [];
  const negative = [];
  let target = prompt;
  for (const line of lines) {
    if (line.startsWith("Negative prompt:")) {
      target = negative;
      target.push(line.slice("Negative prompt:".length).trimStart());
    } else {
      target.push(line);
    }
  }
  return { prompt: prompt.join("\n").trim(), negativePrompt: negative.join("\n").trim(), params };
}

const MASKED_CONTENT = { fill: 0, original: 1, "latent noise": 2, "latent nothing": 3 };

const number = (text) => {
  const value = Number(text);
  return text !== undefined && text !== "" && Number.isFinite(value) ? value : undefined;
};

/** Parsed infotext → A1111 request fields the form knows (absent keys are left out). */
export function infotextToFields({ prompt, negativePrompt, params }) {
  const fields = { prompt, negative_prompt: negativePrompt };
  const size = /^(\d+)\s*x\s*(\d+)$/.exec(params.Size ?? "");
  const set = (name, value) => {
    if (value !== undefined && value !== null) fields[name] = value;
  };
  set("steps", number(params.Steps));
  set("sampler_name", params.Sampler);
  set("scheduler", params["Schedule type"]);
  set("cfg_scale", number(params["CFG scale"]));
  set("distilled_cfg_scale", number(params["Distilled CFG Scale"]));
  set("seed", number(params.Seed));
  // A1111's "Extra": on with a variation seed or a seed resize, off (and back to its defaults) without.
  const resizeFrom = /^(\d+)\s*x\s*(\d+)$/.exec(params["Seed resize from"] ?? "");
  fields.seed_extra = params["Variation seed"] !== undefined || resizeFrom !== null;
  set("subseed", number(params["Variation seed"]));
  set("subseed_strength", number(params["Variation seed strength"]));
  if (resizeFrom) {
    fields.seed_resize_from_w = Number(resizeFrom[1]);
    fields.seed_resize_from_h = Number(resizeFrom[2]);
  }
  if (size) {
    fields.width = Number(size[1]);
    fields.height = Number(size[2]);
  }
  set("denoising_strength", number(params["Denoising strength"]));
  set("mask_blur", number(params["Mask blur"]));
  set("inpainting_fill", MASKED_CONTENT[params["Masked content"]]);
  if (params["Inpaint area"]) fields.inpaint_full_res = params["Inpaint area"] === "Only masked" ? 1 : 0;
  set("inpaint_full_res_padding", number(params["Masked area padding"]));
  if (params["Mask mode"]) fields.inpainting_mask_invert = params["Mask mode"] === "Inpaint not masked" ? 1 : 0;
  set("batch_size", number(params["Batch size"]));
  // A1111 leaves "Clip skip" out at its default: a picture without it was made with 1.
  set("clip_skip", number(params["Clip skip"]) ?? 1);
  // A picture made without DeepCache says nothing of it: reproducing it means turning it off.
  set("deepcache_interval", number(params["DeepCache interval"]) ?? 0);
  set("deepcache_branch", number(params["DeepCache branch"]));
  set("first_block_cache", number(params["First block cache"]) ?? 0);
  // Like DeepCache: a picture that does not name these was made with them off.
  set("s_min_uncond", number(params.NGMS) ?? 0);
  fields.s_min_uncond_all = params["NGMS all steps"] === "True";
  set("skip_early_cond", number(params["Skip Early CFG"]) ?? 0);
  fields.sd_vae_decode_method = params["VAE Decoder"] === "TAESD" ? "TAESD" : "Full";
  fields.sd_vae_encode_method = params["VAE Encoder"] === "TAESD" ? "TAESD" : "Full";
  fields.tiling = params.Tiling === "True";
  fields.restore_faces = Boolean(params["Face restoration"]);
  if (params["Face restoration"]) fields.face_restoration_model = params["Face restoration"];
  set("initial_noise_multiplier", number(params["Noise multiplier"]) ?? 1);
  set("img2img_extra_noise", number(params["Extra noise"]) ?? 0);
  // A1111 records the refiner only when it took over; a picture without it was made without one.
  fields.refiner_enabled = Boolean(params.Refiner);
  if (params.Refiner) fields.refiner_checkpoint = params.Refiner;
  set("refiner_switch_at", number(params["Refiner switch at"]));
  // A1111 writes "Hires refiner" only away from its default, the second pass.
  fields.hires_fix_refiner_pass = params["Hires refiner"] ?? "second pass";
  // Forge's FreeU keys; a picture without them was made with FreeU off.
  fields.freeu_enabled = params.freeu_enabled === "True";
  for (const name of ["freeu_b1", "freeu_b2", "freeu_s1", "freeu_s2"]) set(name, number(params[name]));
  // ADetailer's first tab, as its own paste reads it; a picture without its keys was made with it off.
  fields.ad_enable = params["ADetailer model"] !== undefined;
  if (fields.ad_enable) {
    fields.ad_model = params["ADetailer model"];
    fields.ad_prompt = params["ADetailer prompt"] ?? "";
    fields.ad_negative_prompt = params["ADetailer negative prompt"] ?? "";
    set("ad_confidence", number(params["ADetailer confidence"]));
    set("ad_denoising_strength", number(params["ADetailer denoising strength"]));
    set("ad_inpaint_only_masked_padding", number(params["ADetailer inpaint padding"]));
    // ADetailer's key since its "Confidence" filter, and the one before it
    fields.ad_mask_k = number(params["ADetailer mask only top k"] ?? params["ADetailer mask only top k largest"]) ?? 0;
    fields.ad_mask_filter_method = params["ADetailer method to decide top k masks"] ?? "Area";
    fields.ad_model_classes = params["ADetailer model classes"] ?? "";
    fields.ad_controlnet_model = params["ADetailer ControlNet model"] ?? "None";
    fields.ad_controlnet_weight = number(params["ADetailer ControlNet weight"]) ?? 1;
    fields.ad_checkpoint = String(params["ADetailer use separate checkpoint"]).toLowerCase() === "true"
      ? params["ADetailer checkpoint"] ?? "" : "";
    fields.ad_vae = String(params["ADetailer use separate VAE"]).toLowerCase() === "true"
      ? params["ADetailer VAE"] ?? "" : "";
  }
  Object.assign(fields, hiresFields(params));
  set("sd_model_hash", params["Model hash"]);
  set("sd_model_name", params.Model);
  return fields;
}

const HIRES_KEYS = ["Hires upscale", "Hires upscaler", "Hires resize"];

/**
 * Hires. fix's fields from infotext: on when any of its size or upscaler keys is there (the keys
 * A1111's txt2img always writes with it), off otherwise. The keys A1111 leaves out when they
 * equal the default or the first pass's value come back as that default: upscaler "Latent",
 * steps 0 (as many as the first pass), no resize, the first pass's sampler, schedule and prompts.
 */
export function hiresFields(params) {
  if (!HIRES_KEYS.some((key) => params[key] !== undefined)) return { enable_hr: false };
  const resize = /^(\d+)\s*x\s*(\d+)$/.exec(params["Hires resize"] ?? "");
  const fields = {
    enable_hr: true,
    hr_upscaler: params["Hires upscaler"] ?? "Latent",
    hr_second_pass_steps: number(params["Hires steps"]) ?? 0,
    hr_resize_x: resize ? Number(resize[1]) : 0,
    hr_resize_y: resize ? Number(resize[2]) : 0,
    hr_checkpoint_name: params["Hires checkpoint"] && params["Hires checkpoint"] !== "Use same checkpoint"
      ? params["Hires checkpoint"] : "",
    hr_sampler_name: params["Hires sampler"] ?? "",
    hr_scheduler: params["Hires schedule type"] ?? "",
    hr_prompt: params["Hires prompt"] ?? "",
    hr_negative_prompt: params["Hires negative prompt"] ?? "",
  };
  const scale = number(params["Hires upscale"]);
  if (scale !== undefined) fields.hr_scale = scale;
  return fields;
}

const input = (graph, ref) => (Array.isArray(ref) ? graph[String(ref[0])] : null);

/** The text of a conditioning input, following links through nodes that pass it on. */
function textOf(graph, ref, depth = 0) {
  const node = input(graph, ref);
  if (!node || depth > 8) return undefined;
  const inputs = node.inputs ?? {};
  for (const key of ["text", "text_g", "prompt", "string"]) {
    if (typeof inputs[key] === "string") return inputs[key];
    if (Array.isArray(inputs[key])) return textOf(graph, inputs[key], depth + 1);
  }
  for (const key of ["conditioning", "conditioning_1", "positive", "negative"]) {
    if (Array.isArray(inputs[key])) return textOf(graph, inputs[key], depth + 1);
  }
  return undefined;
}

/**
 * ComfyUI's "prompt" chunk (its API graph: {id: {class_type, inputs}}) → request fields,
 * read from the first sampler node and the nodes its inputs link to.
 */
export function comfyToFields(graph) {
  if (!graph || typeof graph !== "object") return null;
  const nodes = Object.values(graph);
  const sampler = nodes.find((n) => /KSampler/i.test(n?.class_type ?? "") && n.inputs);
  if (!sampler) return null;
  const s = sampler.inputs;
  const fields = {};
  const scalar = (v) => (Array.isArray(v) ? undefined : v);
  const put = (name, value) => {
    if (value !== undefined && value !== null) fields[name] = value;
  };
  put("prompt", textOf(graph, s.positive));
  put("negative_prompt", textOf(graph, s.negative));
  put("seed", scalar(s.seed ?? s.noise_seed));
  put("steps", scalar(s.steps));
  put("cfg_scale", scalar(s.cfg));
  put("sampler_name", scalar(s.sampler_name));
  put("scheduler", scalar(s.scheduler));
  put("denoising_strength", scalar(s.denoise));
  const latent = nodes.find((n) => /EmptyLatentImage/i.test(n?.class_type ?? ""));
  if (latent) {
    put("width", scalar(latent.inputs?.width));
    put("height", scalar(latent.inputs?.height));
  }
  const loader = nodes.find((n) => /CheckpointLoader/i.test(n?.class_type ?? ""));
  put("sd_model_name", scalar(loader?.inputs?.ckpt_name));
  return fields;
}

/** Request fields → an A1111-style infotext, to show ComfyUI parameters the way A1111 users read them. */
export function fieldsToInfotext(fields) {
  const keys = [
    ["Steps", "steps"], ["Sampler", "sampler_name"], ["Schedule type", "scheduler"], ["CFG scale", "cfg_scale"],
    ["Seed", "seed"], ["Model", "sd_model_name"], ["Denoising strength", "denoising_strength"],
  ];
  const parts = keys.filter(([, f]) => fields[f] !== undefined).map(([k, f]) => `${k}: ${quote(fields[f])}`);
  if (fields.width && fields.height) parts.splice(5, 0, `Size: ${fields.width}x${fields.height}`);
  const lines = [fields.prompt ?? ""];
  if (fields.negative_prompt) lines.push(`Negative prompt: ${fields.negative_prompt}`);
  lines.push(parts.join(", "));
  return lines.join("\n");
}

function quote(value) {
  const text = String(value);
  return /[,:\n]/.test(text) ? JSON.stringify(text) : text;
}
