// The last used generation settings, kept in the browser (localStorage) so that a reload or a new
// tab starts from them, as A1111 starts from the values in its ui-config.json (the Extras tab's
// under an entry of its own). Pictures, masks and
// ControlNet units are not kept; the server's own settings (checkpoint, SD VAE, live preview, clip
// skip, token merging) live in its /options.

import { $$, setRadio } from "./dom.js";

const KEY = "underpaint.settings.v1";
/** Settings that the model family chooses (FLUX: CFG 1, Euler, Simple): kept only within that family. */
const FAMILY_SETTINGS = ["cfg_scale", "distilled_cfg_scale", "sampler_name", "scheduler"];

/** A control's key in the stored settings, or null for one that is not kept. */
function keyOf(control) {
  if (control.type === "file" || control.readOnly || control.closest("#controlnet-section, .mask-toolbar")) return null;
  if (control.type === "radio") return control.name ? `radio:${control.name}` : null;
  if (control.dataset.sync) return control.dataset.sync;  // a slider's number box: it can go past the slider
  if (control.type === "range" && document.querySelector(`input[data-sync="${CSS.escape(control.id)}"]`)) return null;
  return control.id || null;
}

function readStore(key) {
  try {
    const stored = JSON.parse(localStorage.getItem(key) ?? "null");
    return stored && typeof stored === "object" && stored.values ? stored : null;
  } catch {
    return null;  // no storage (a locked-down browser) or a damaged entry: start from the page's defaults
  }
}

export class SettingsStore {
  /**
   * `family()` names the model family the settings are made for ("sd" or "flux"); `key` is the
   * storage entry (each panel with its own settings, such as Extras, keeps them under its own).
   */
  constructor(root, { family = () => null, key = KEY } = {}) {
    this.root = root;
    this.family = family;
    this.key = key;
    this.restoring = true;  // until restore() has run
    for (const type of ["input", "change"]) root.addEventListener(type, () => this.save());
  }

  controls() {
    return $$("input, select, textarea", this.root).map((control) => [keyOf(control), control]).filter(([key]) => key);
  }

  /** Remember every kept control's value (called on each edit, and after values are set by script). */
  save() {
    if (this.restoring) return;
    const values = {};
    for (const [key, control] of this.controls()) {
      if (control.type === "radio") {
        if (control.checked) values[key] = control.value;
      } else {
        values[key] = control.type === "checkbox" ? control.checked : control.value;
      }
    }
    try {
      localStorage.setItem(this.key, JSON.stringify({ family: this.family(), values }));
    } catch {
      // storage full or refused: the settings simply are not kept
    }
  }

  /**
   * Put the stored values back (once the drop-downs are filled), firing the events a user's edit
   * would, so that everything that follows a control (hints, Hires. fix, DeepCache) follows it.
   * Saving starts only after this, so the page's defaults never replace the stored values.
   */
  restore() {
    const stored = readStore(this.key);
    this.restoring = true;
    try {
      if (stored) this.apply(stored);
    } finally {
      this.restoring = false;
    }
  }

  apply(stored) {
    const sameFamily = stored.family === this.family();
    for (const [key, control] of this.controls()) {
      if (!(key in stored.values) || (!sameFamily && FAMILY_SETTINGS.includes(key))) continue;
      const value = stored.values[key];
      if (control.type === "radio") {
        if (control.value === value && setRadio(this.root, control.name, value)) fire(control, "change");
      } else if (control.type === "checkbox") {
        control.checked = value === true;
        fire(control, "change");
      } else if (control.tagName === "SELECT") {
        if (Array.from(control.options).some((o) => o.value === value)) {
          control.value = value;
          fire(control, "change");
        }
      } else if (typeof value === "string") {
        control.value = value;
        fire(control, "input");
      }
    }
  }
}

function fire(control, type) {
  control.dispatchEvent(new Event(type, { bubbles: true }));
}
