// A1111's "Styles" under Generate: the styles of the server's styles.csv (GET /prompt-styles) sent with
// each request as `styles`, in the order they were chosen, and "Apply styles", which writes them into
// the prompts (A1111's rule: a style's `{prompt}` is replaced by the prompt, else the two are joined
// with ", ") and clears the choice. The choice is kept with the page's other settings.

import { del, getOptional, post } from "./api.js";
import { $, $$, el } from "./dom.js";

const PROMPT_MARK = "{prompt}";

/** One style's text applied to a prompt, as the server (and A1111) applies it. */
export function mergeStyle(styleText, prompt) {
  if (styleText.includes(PROMPT_MARK)) return styleText.replaceAll(PROMPT_MARK, prompt);
  return [prompt.trim(), styleText.trim()].filter(Boolean).join(", ");
}

/** ``prompt`` without one style's text, as applying it would have added it: [matched?, what is left]. */
function withoutStyle(styleText, prompt) {
  const text = styleText.trim();
  const typed = prompt.trim();
  if (text.includes(PROMPT_MARK)) {
    const at = text.indexOf(PROMPT_MARK);
    const [left, right] = [text.slice(0, at), text.slice(at + PROMPT_MARK.length)];
    if (typed.length >= left.length + right.length && typed.startsWith(left) && typed.endsWith(right)) {
      return [true, typed.slice(left.length, typed.length - right.length)];
    }
    return [false, prompt];
  }
  if (!typed.endsWith(text)) return [false, prompt];
  const rest = typed.slice(0, typed.length - text.length);
  return [true, rest.endsWith(", ") ? rest.slice(0, -2) : rest];
}

/**
 * A1111's reading of styles out of pasted parameters ("Apply if any"): styles whose texts the prompt and
 * the negative prompt end with (or are wrapped in, for a `{prompt}` style) are taken out, again and
 * again; returns the styles in the order they were applied and the prompts as typed before them.
 */
export function extractStyles(prompt, negative, styles) {
  const found = [];
  const left = [...styles];
  for (;;) {
    const index = left.findIndex((style) => {
      if (!style.prompt && !style.negative_prompt) return false;
      const [inPrompt] = withoutStyle(style.prompt ?? "", prompt);
      const [inNegative] = withoutStyle(style.negative_prompt ?? "", negative);
      return inPrompt && inNegative;
    });
    if (index < 0) break;
    const [style] = left.splice(index, 1);
    prompt = withoutStyle(style.prompt ?? "", prompt)[1];
    negative = withoutStyle(style.negative_prompt ?? "", negative)[1];
    found.push(style.name);
  }
  return { styles: found.reverse(), prompt, negative };
}

export class StylesPicker {
  constructor() {
    this.list = $("#styles-list");
    this.summary = $("#styles-summary");
    this.value = $("#styles-value");  // the chosen names as JSON: a hidden field the settings store keeps
    this.styles = new Map();
    this.value.addEventListener("input", () => this.show());
    this.list.addEventListener("change", (event) => {
      const name = event.target.dataset.style;
      const names = this.chosen().filter((n) => n !== name);
      this.choose(event.target.checked ? [...names, name] : names);
    });
    $("#apply-styles").addEventListener("click", () => this.applyToPrompts());
    $("#style-save").addEventListener("click", () => this.edit("save"));
    $("#style-delete").addEventListener("click", () => this.edit("delete"));
  }

  /** A1111's style editor: the prompts saved as a style of the typed name, or that style deleted. */
  async edit(action) {
    const name = $("#style-name").value.trim();
    const status = $("#style-status");
    if (!name) {
      status.textContent = "Type the style's name first.";
      return;
    }
    try {
      if (action === "save") {
        await post("/underpaint/v1/prompt-styles", { name, prompt: $("#prompt").value,
                                                     negative_prompt: $("#negative_prompt").value });
      } else {
        await del(`/underpaint/v1/prompt-styles?name=${encodeURIComponent(name)}`);
      }
      await this.load();
      status.textContent = action === "save" ? `Saved the style “${name}”.` : `Deleted the style “${name}”.`;
    } catch (err) {
      status.textContent = err.message;
    }
  }

  async load() {
    const styles = await getOptional("/sdapi/v1/prompt-styles", []);
    this.styles = new Map((styles ?? []).map((s) => [s.name, s]));
    this.list.replaceChildren(...[...this.styles.keys()].map((name) => el("li", {},
      el("label", { class: "check-field" }, el("input", { type: "checkbox", "data-style": name }), name))));
    $("#styles-empty").hidden = this.styles.size > 0;
    $("#style-names").replaceChildren(...[...this.styles.keys()].map((name) => el("option", { value: name })));
    this.show();
  }

  /** The chosen style names that the server lists, in the order they were chosen. */
  chosen() {
    let names;
    try {
      names = JSON.parse(this.value.value || "[]");
    } catch {
      names = [];
    }
    return Array.isArray(names) ? names.filter((n) => this.styles.has(n)) : [];
  }

  choose(names) {
    this.value.value = JSON.stringify(names);
    this.value.dispatchEvent(new Event("input", { bubbles: true }));
  }

  show() {
    const names = this.chosen();
    $$("input[data-style]", this.list).forEach((box) => { box.checked = names.includes(box.dataset.style); });
    this.summary.textContent = names.length ? names.join(", ") : "None";
  }

  /**
   * Pasted prompts: the styles they were made with, taken out and chosen (A1111's default for pasted
   * parameters); returns the prompts to show.
   */
  takeFrom(prompt, negative) {
    const found = extractStyles(prompt, negative, [...this.styles.values()]);
    if (!found.styles.length) return { prompt, negative };
    this.choose(found.styles);
    return found;
  }

  /** The request's `styles`, when any are chosen. */
  values() {
    const names = this.chosen();
    return names.length ? { styles: names } : {};
  }

  applyToPrompts() {
    const names = this.chosen();
    if (!names.length) return;
    for (const [id, key] of [["#prompt", "prompt"], ["#negative_prompt", "negative_prompt"]]) {
      const box = $(id);
      box.value = names.reduce((text, name) => mergeStyle(this.styles.get(name)[key] ?? "", text), box.value);
      box.dispatchEvent(new Event("input", { bubbles: true }));
    }
    this.choose([]);
  }
}
