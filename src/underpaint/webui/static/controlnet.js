// ControlNet units, sent as alwayson_scripts.controlnet.args[] (the A1111 extension's wire format).

import { ApiError, getOptional, post } from "./api.js";
import { $, $$, el, fillSelect, radioValue } from "./dom.js";
import { clearFieldErrors, showFieldErrors } from "./fielderrors.js";
import { ImageInput, pngDataUrl, readFileAsDataURL, stripDataUrl } from "./images.js";

const CONTROL_MODES = ["Balanced", "My prompt is more important", "ControlNet is more important"];
const RESIZE_MODES = ["Just Resize", "Crop and Resize", "Resize and Fill"];
/** The extension's hires-fix options: the passes of a Hires. fix run that the unit steers. */
const HR_OPTIONS = ["Both", "Low res only", "High res only"];
/** The extension's union_control_type values (xinsir's SDXL order), then the FLUX union models' own. */
const UNION_TYPES = ["OpenPose", "Depth", "Soft Edge", "Hard Edge", "Normal Map", "Segmentation", "Tile", "Inpaint",
  "Blur", "Gray", "Low Quality"];
const BASE_SLIDERS = [
  { key: "weight", name: "Control Weight", min: 0, max: 2, step: 0.05, value: 1 },
  { key: "guidance_start", name: "Starting Control Step", min: 0, max: 1, step: 0.01, value: 0 },
  { key: "guidance_end", name: "Ending Control Step", min: 0, max: 1, step: 0.01, value: 1 },
];
/** The extension's module_detail lists a module's sliders in this order. */
const MODULE_SLIDER_KEYS = ["processor_res", "threshold_a", "threshold_b"];

let uid = 0;

function slider(unitId, { key, name, min, max, step, value }) {
  const id = `cn-${unitId}-${key}`;
  const range = el("input", { type: "range", id, min, max, step: step ?? 1, value, "data-key": key });
  const box = el("input", { type: "number", min, max, step: step ?? 1, value, "aria-label": `${name} value`, "data-sync": id });
  range.addEventListener("input", () => { box.value = range.value; });
  box.addEventListener("input", () => { if (box.value !== "") range.value = box.value; });
  range.readValue = () => Number(box.value === "" ? range.value : box.value);
  return el("div", { class: "field slider-field", "data-slider": key },
    el("label", { for: id }, name), el("div", { class: "slider" }, range, box));
}

function radios(fieldset, name, values, checked) {
  fieldset.append(...values.map((value) => el("label", {},
    el("input", { type: "radio", name, value, checked: value === checked }), ` ${value}`)));
}

class Unit {
  constructor(section, enabled) {
    this.section = section;
    this.id = ++uid;
    this.root = section.template.content.firstElementChild.cloneNode(true);
    const r = this.root;
    $(".cn-enabled", r).checked = enabled;
    for (const [cls, key] of [["cn-module", "module"], ["cn-model", "model"], ["cn-union-type", "union-type"],
      ["cn-hr-option", "hr-option"]]) {
      $(`.${cls}`, r).id = `cn-${this.id}-${key}`;
      $(`.${cls}-label`, r).htmlFor = `cn-${this.id}-${key}`;
    }
    const imageLabel = $(".cn-image-label", r);
    imageLabel.id = `cn-${this.id}-image-label`;
    $(".cn-drop", r).setAttribute("aria-labelledby", imageLabel.id);
    // Giving a unit its own control image turns it on, as the A1111 extension does: it is plainly meant to be used.
    this.image = new ImageInput({
      zone: $(".cn-drop", r), fileInput: $(".cn-file", r), preview: $(".cn-preview", r),
      onChange: (input) => { if (input.dataUrl) $(".cn-enabled", r).checked = true; },
    });
    radios($('[data-key="control_mode"]', r), `cn-${this.id}-control-mode`, CONTROL_MODES, CONTROL_MODES[0]);
    radios($('[data-key="resize_mode"]', r), `cn-${this.id}-resize-mode`, RESIZE_MODES, RESIZE_MODES[1]);
    // The model list does not say which models are union ones, so the choice is always offered.
    fillSelect($(".cn-union-type", r), [{ value: "", label: "Automatic" }, ...UNION_TYPES.map((value) => ({ value }))], "");
    fillSelect($(".cn-hr-option", r), HR_OPTIONS.map((value) => ({ value })), HR_OPTIONS[0]);
    this.showHiresOption(section.hiresOption);
    $(".cn-sliders", r).append(...BASE_SLIDERS.map((s) => slider(this.id, s)));
    $(".cn-remove", r).addEventListener("click", () => section.remove(this));
    $(".cn-detect", r).addEventListener("click", () => this.detect());
    $(".cn-module", r).addEventListener("change", () => this.moduleSliders());
    // IP-Adapter units take more reference pictures (the extension's Multi-Inputs), kept as data URLs.
    this.more = [];
    const moreFile = $(".cn-more-file", r);
    moreFile.addEventListener("change", async () => {
      const files = [...moreFile.files];
      moreFile.value = "";
      for (const file of files) this.more.push(await readFileAsDataURL(file));
      if (files.length) $(".cn-enabled", r).checked = true;
      this.showMore();
    });
    $(".cn-more-clear", r).addEventListener("click", () => { this.more = []; this.showMore(); });
    this.fillLists();
  }

  /** Whether the chosen preprocessor is an IP-Adapter one (the units that take several pictures). */
  get isImagePrompt() {
    return $(".cn-module", this.root).value.startsWith("ip-adapter");
  }

  showMore() {
    const r = this.root;
    $(".cn-more-field", r).hidden = !this.isImagePrompt;
    $(".cn-more-clear", r).hidden = this.more.length === 0;
    $(".cn-more-count", r).textContent = this.more.length ? `${this.more.length} more` : "";
    $(".cn-more-previews", r).replaceChildren(...this.more.map((src, i) => el("img",
      { src, class: "cn-more-preview", alt: `Reference picture ${i + 2}` })));
  }

  fillLists() {
    const { modules, models } = this.section;
    fillSelect($(".cn-module", this.root), modules.map((m) => ({ value: m })), "none");
    fillSelect($(".cn-model", this.root), models.map((m) => ({ value: m })), "None");
    this.moduleSliders();
  }

  /** Resolution and thresholds as the extension describes them for the chosen preprocessor. */
  moduleSliders() {
    $$("[data-slider]", this.root).filter((n) => MODULE_SLIDER_KEYS.includes(n.dataset.slider)).forEach((n) => n.remove());
    const detail = this.section.details[$(".cn-module", this.root).value];
    const sliders = (detail?.sliders ?? []).filter((s) => s && typeof s === "object");
    sliders.slice(0, 3).forEach((s, i) => {
      $(".cn-sliders", this.root).append(slider(this.id, {
        key: MODULE_SLIDER_KEYS[i], name: s.name ?? MODULE_SLIDER_KEYS[i], min: s.min ?? 0, max: s.max ?? 2048,
        step: s.step ?? 1, value: s.value ?? s.min ?? 0,
      }));
    });
    this.showMore();
    this.section.renumber();
  }

  /** The hires-fix option is shown where it matters, as in the extension: txt2img with Hires. fix on. */
  showHiresOption(shown) {
    $(".cn-hr-option-field", this.root).hidden = !shown;
  }

  number(key, fallback) {
    const range = $(`input[type="range"][data-key="${key}"]`, this.root);
    return range ? range.readValue() : fallback;
  }

  get enabled() {
    return $(".cn-enabled", this.root).checked;
  }

  /** The image to control with: this unit's own, else the img2img / inpaint picture. */
  controlImage() {
    return this.image.dataUrl ?? this.section.sourceImage();
  }

  /** The unit's picture, or with more reference pictures the extension's list of {image} entries (the first
   * being the unit's own picture, else the img2img / inpaint one where there is one). */
  imageArg() {
    const own = this.image.dataUrl ? stripDataUrl(this.image.dataUrl) : null;
    if (!this.isImagePrompt || !this.more.length) return own;
    const first = this.image.dataUrl ?? this.section.sourceImage();
    return [first, ...this.more].filter(Boolean).map((picture) => ({ image: stripDataUrl(picture) }));
  }

  toArg() {
    const unionType = $(".cn-union-type", this.root).value;
    return {
      enabled: true,
      image: this.imageArg(),
      module: $(".cn-module", this.root).value,
      model: $(".cn-model", this.root).value,
      weight: this.number("weight", 1),
      guidance_start: this.number("guidance_start", 0),
      guidance_end: this.number("guidance_end", 1),
      processor_res: this.number("processor_res", 512),
      threshold_a: this.number("threshold_a", undefined),
      threshold_b: this.number("threshold_b", undefined),
      pixel_perfect: $(".cn-pixel-perfect", this.root).checked,
      control_mode: radioValue(this.root, `cn-${this.id}-control-mode`),
      resize_mode: radioValue(this.root, `cn-${this.id}-resize-mode`),
      // Sent whether shown or not, as the extension does: without hires. fix it changes nothing.
      hr_option: $(".cn-hr-option", this.root).value,
      ...(unionType ? { union_control_type: unionType } : {}),
    };
  }

  /** Run the preprocessor alone (POST /controlnet/detect) to preview the map it makes. */
  async detect() {
    clearFieldErrors(this.root);
    const map = $(".cn-map", this.root);
    const hint = $(".cn-map-hint", this.root);
    const source = this.controlImage();
    const moduleField = `${this.prefix}.module`;
    if (!source) {
      showFieldErrors({ errors: [{ field: `${this.prefix}.image`, message: "Add a control image (or an img2img image) first." }] });
      return;
    }
    const arg = this.toArg();
    hint.textContent = "Detecting…";
    try {
      const answer = await post("/controlnet/detect", {
        controlnet_module: arg.module,
        controlnet_input_images: [stripDataUrl(source)],
        controlnet_processor_res: arg.processor_res,
        controlnet_threshold_a: arg.threshold_a,
        controlnet_threshold_b: arg.threshold_b,
      });
      const image = answer?.images?.[0];
      if (!image) throw new ApiError(200, answer?.info || "the preprocessor returned no image");
      map.src = pngDataUrl(image);
      map.hidden = false;
      hint.textContent = "";
    } catch (err) {
      hint.textContent = "Press Preview to see the detected map.";
      const rename = (f) => (/input_images?|image/.test(f) ? `${this.prefix}.image` : moduleField);
      showFieldErrors(err instanceof ApiError ? err : { errors: [{ field: moduleField, message: err.message }] },
        { rename });
    }
  }
}

export class ControlNetSection {
  constructor({ section, container, addButton, template, sourceImage }) {
    Object.assign(this, { section, container, template, sourceImage });
    this.units = [];
    this.modules = [];
    this.models = [];
    this.details = {};
    this.hiresOption = false;
    addButton.addEventListener("click", () => this.add(true));
  }

  /** Fill the lists from the API; the section stays hidden when the server offers no ControlNet. */
  async load() {
    const [modules, models] = await Promise.all([
      getOptional("/controlnet/module_list?alias_names=false", null).catch(() => null),
      getOptional("/controlnet/model_list", null).catch(() => null),
    ]);
    this.modules = modules?.module_list ?? [];
    this.details = modules?.module_detail ?? {};
    this.models = models?.model_list ?? [];
    if (this.models.length && !this.models.includes("None")) this.models = ["None", ...this.models];
    const available = this.modules.length > 0 && this.models.length > 0;
    this.section.hidden = !available;
    if (!available) return;
    if (!this.units.length) this.add(false);
    this.units.forEach((u) => u.fillLists());
  }

  /** Show or hide every unit's hires-fix option (new units follow). */
  showHiresOption(shown) {
    this.hiresOption = shown;
    this.units.forEach((unit) => unit.showHiresOption(shown));
  }

  add(enabled) {
    const unit = new Unit(this, enabled);
    this.units.push(unit);
    this.container.append(unit.root);
    this.renumber();
    return unit;
  }

  remove(unit) {
    unit.root.remove();
    this.units = this.units.filter((u) => u !== unit);
    this.renumber();
  }

  /** Titles and error names follow each unit's position. */
  renumber() {
    this.units.forEach((unit, i) => {
      unit.prefix = `alwayson_scripts.controlnet.args[${i}]`;
      unit.root.dataset.field = unit.prefix;
      $(".cn-title", unit.root).textContent = `ControlNet Unit ${i}`;
      $$("[data-key]", unit.root).forEach((node) => { node.dataset.field = `${unit.prefix}.${node.dataset.key}`; });
    });
  }

  /** The enabled units as request args, and a function mapping an error's field back to its unit. */
  payload() {
    const sent = this.units.filter((u) => u.enabled);
    const rename = (field) => field.replace(/^alwayson_scripts\.controlnet\.args\[(\d+)\]/,
      (whole, k) => (sent[Number(k)] ? sent[Number(k)].prefix : whole));
    return { args: sent.map((u) => u.toArg()), rename };
  }
}
