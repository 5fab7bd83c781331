// A1111's "Extra networks" panel: cards for the models folder's embeddings, hypernetworks, checkpoints
// and LoRAs (GET /underpaint/v1/extra-networks), with the preview pictures and card metadata A1111 keeps
// beside the files. A card adds its prompt text (`<lora:name:weight>` and its activation text,
// `<hypernet:name:weight>`, an embedding's name; its negative text to the negative prompt), or takes it
// out again when it is there; a checkpoint card selects that checkpoint. Embeddings go to the prompt box
// used last (the negative prompt too), the others to the prompt.

import { get } from "./api.js";
import { $, $$, el } from "./dom.js";

/** The strength a LoRA or hypernetwork card writes without a preferred weight, unless the server's
 * "Default multiplier for extra networks" setting says otherwise. */
const MULTIPLIER = 1;
/** Put between the prompt and added text (A1111's "Extra networks separator"). */
const SEPARATOR = " ";

/** What an empty card list says, by kind. */
const EMPTY = {
  embeddings: "No embeddings in the models folder's embeddings/.",
  hypernetworks: "No hypernetworks (.pt) in the models folder's hypernetworks/.",
  checkpoints: "No checkpoints in the models folder.",
  loras: "No LoRAs in the models folder's loras/.",
};

/** A checkpoint's title without the short hash a loaded one gains ("name.safetensors [abcd1234]"). */
export const checkpointName = (title) => String(title ?? "").replace(/\s*\[[0-9a-f]+\]$/i, "");

const escapeRegExp = (text) => text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

/** The tag for ``name`` of ``kind`` ("lora", "hypernet") anywhere in ``text``, with whatever arguments. */
function tagPattern(kind, name) {
  return new RegExp(`${escapeRegExp(SEPARATOR)}?<${kind}:${escapeRegExp(name)}(?::[^>]*)?>`, "g");
}

/** An embedding's name as a whole word (not inside a longer name). */
function wordPattern(name) {
  return new RegExp(`(^|[\\s,(\\[{])${escapeRegExp(name)}(?=$|[\\s,:)\\]}])`, "g");
}

/** ``text`` with ``words`` added at the end (after the separator). */
export function withText(text, words) {
  if (!words) return text;
  return text + (text === "" || /\s$/.test(text) ? "" : SEPARATOR) + words;
}

/** ``text`` without the first occurrence of ``words`` (and the separator in front of it). */
export function withoutText(text, words) {
  const at = words ? text.indexOf(words) : -1;
  if (at < 0) return text;
  const start = at > 0 && text[at - 1] === SEPARATOR ? at - 1 : at;
  return text.slice(0, start) + text.slice(at + words.length);
}

/**
 * ``text`` with a card's ``insert`` (and its ``extra`` words) added at the end, or, when its tag (whatever
 * its weight) or name is already there, with both taken out; [new text, added?].
 */
export function toggleInPrompt(text, { tag, name, insert, extra = "" }) {
  const pattern = tag ? tagPattern(tag, name) : wordPattern(name);
  if (pattern.test(text)) {
    // the separator in front goes with it; other punctuation in front (a comma, a bracket) stays
    let removed = tag ? text.replace(pattern, "") : text.replace(pattern, (_, before) => (before === SEPARATOR ? "" : before));
    removed = withoutText(removed, extra);
    if (!/^\s/.test(text)) removed = removed.replace(/^\s+/, "");
    return [removed, false];
  }
  return [withText(withText(text, insert), extra), true];
}

export class ExtraNetworks {
  constructor({ onCheckpoint }) {
    this.box = $("#extra-networks");
    this.toggle = $("#extra-networks-toggle");
    this.cards = $("#extra-networks-cards");
    this.empty = $("#extra-networks-empty");
    this.search = $("#extra-networks-search");
    this.onCheckpoint = onCheckpoint;
    this.kind = "loras";
    this.lists = null;  // kind → [{name, title, insert, disabled}], filled when first shown
    this.lastPrompt = $("#prompt");
    for (const id of ["#prompt", "#negative_prompt"]) {
      $(id).addEventListener("focus", (event) => { this.lastPrompt = event.target; });
      $(id).addEventListener("input", () => this.markActive());
    }
    this.toggle.addEventListener("click", () => this.show(this.box.hidden));
    $$(".en-tabs button", this.box).forEach((b) => b.addEventListener("click", () => this.select(b.dataset.kind)));
    this.search.addEventListener("input", () => this.render());
    $("#extra-networks-refresh").addEventListener("click", () => this.load());
  }

  async show(open) {
    this.box.hidden = !open;
    this.toggle.setAttribute("aria-expanded", String(open));
    if (open && this.lists === null) await this.load();
  }

  /** The checkpoint changed: which embeddings fit is read again next time the panel shows. */
  stale() {
    if (this.box.hidden) this.lists = null;
    else this.load();
  }

  select(kind) {
    this.kind = kind;
    $$(".en-tabs button", this.box).forEach((b) => b.setAttribute("aria-pressed", String(b.dataset.kind === kind)));
    this.render();
  }

  async load() {
    this.box.setAttribute("aria-busy", "true");  // until the cards are drawn again
    try {
      await this.fill();
    } finally {
      this.box.removeAttribute("aria-busy");
    }
  }

  async fill() {
    const [cards, options] = await Promise.all([get("/underpaint/v1/extra-networks"),
                                                get("/sdapi/v1/options").catch(() => ({}))]);
    const multiplier = options.extra_networks_default_multiplier ?? MULTIPLIER;
    const item = (card, tag) => ({
      name: card.name, tag, preview: card.preview, extra: card.activation_text, negative: card.negative_text,
      insert: tag ? `<${tag}:${card.name}:${card.preferred_weight ?? multiplier}>` : card.name,
      title: card.fits ? (card.description || card.path) : `${card.name}: made for another model family`,
      disabled: !card.fits,
    });
    this.lists = {
      loras: cards.loras.map((card) => item(card, "lora")),
      hypernetworks: cards.hypernetworks.map((card) => item(card, "hypernet")),
      embeddings: cards.embeddings.map((card) => item(card, null)),
      checkpoints: cards.checkpoints.map((card) => ({
        name: checkpointName(card.name).replace(/\.[^.]+$/, ""), title: card.description || card.name,
        preview: card.preview, checkpoint: card.name,
      })),
    };
    this.render();
  }

  render() {
    if (!this.lists) return;
    const wanted = this.search.value.trim().toLowerCase();
    const items = this.lists[this.kind].filter((i) => !wanted || `${i.name} ${i.title}`.toLowerCase().includes(wanted));
    this.cards.replaceChildren(...items.map((item) => el("li", {},
      el("button", { type: "button", class: "en-card", title: item.title, disabled: item.disabled,
                     "data-name": item.name, "data-checkpoint": item.checkpoint, onclick: () => this.use(item) },
      item.preview ? el("img", { src: item.preview, alt: "", loading: "lazy" }) : null, el("span", {}, item.name)))));
    this.empty.textContent = items.length ? "" : (wanted ? "Nothing matches the search." : EMPTY[this.kind]);
    this.empty.hidden = items.length > 0;
    this.markActive();
  }

  use(item) {
    if (item.checkpoint) {
      this.onCheckpoint(item.checkpoint);
      return;
    }
    // Embeddings may go to the negative prompt (the box used last); networks belong in the prompt.
    const box = item.tag ? $("#prompt") : this.lastPrompt;
    let added;
    [box.value, added] = toggleInPrompt(box.value, item);
    box.dispatchEvent(new Event("input", { bubbles: true }));
    if (item.negative) {  // the card's negative text comes and goes with it
      const negative = $("#negative_prompt");
      negative.value = added ? withText(negative.value, item.negative) : withoutText(negative.value, item.negative);
      negative.dispatchEvent(new Event("input", { bubbles: true }));
    }
  }

  /** Cards whose text is in the prompt (either prompt, for embeddings) show as pressed. */
  markActive() {
    if (!this.lists || this.box.hidden) return;
    const prompt = $("#prompt").value;
    const negative = $("#negative_prompt").value;
    for (const button of $$(".en-card", this.cards)) {
      const item = this.lists[this.kind].find((i) => i.name === button.dataset.name);
      if (!item || item.checkpoint) {
        const selected = Boolean(item) && checkpointName($("#checkpoint").value) === checkpointName(item.checkpoint);
        button.setAttribute("aria-pressed", String(selected));
        continue;
      }
      const inText = (text) => (item.tag ? tagPattern(item.tag, item.name) : wordPattern(item.name)).test(text);
      button.setAttribute("aria-pressed", String(inText(prompt) || (!item.tag && inText(negative))));
    }
  }
}
