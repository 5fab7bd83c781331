// The results: every image the API returned, with its infotext and seed; newest first.

import { el } from "./dom.js";
import { dataUrlToBlob, imageType, pngDataUrl } from "./images.js";

const MAX_KEPT = 48;

/** A1111's `info` is a JSON *string*; tolerate an object, or nothing. */
export function parseInfo(info) {
  if (!info) return {};
  if (typeof info === "object") return info;
  try {
    return JSON.parse(info);
  } catch {
    return {};
  }
}

/**
 * One entry per returned image; extra images (e.g. ControlNet maps) get no seed or infotext, and neither
 * does a batch's grid, which comes before the pictures (`index_of_first_image`).
 */
export function entriesFromResponse(response) {
  const info = parseInfo(response.info);
  const stamp = new Date().toISOString().replace(/[-:]/g, "").replace("T", "-").slice(0, 15);
  const first = Number.isInteger(info.index_of_first_image) ? info.index_of_first_image : 0;
  return (response.images ?? []).map((b64, i) => {
    const n = i - first;  // the picture's place among the seeds (a grid: before them)
    const seed = n < 0 ? undefined : info.all_seeds?.[n] ?? (n === 0 ? info.seed : undefined);
    const subseed = n < 0 ? undefined : info.all_subseeds?.[n] ?? (n === 0 ? info.subseed : undefined);
    return {
      dataUrl: pngDataUrl(b64),
      infotext: info.infotexts?.[i] ?? (i === 0 ? response.infotext ?? "" : ""),
      seed: Number.isInteger(seed) ? seed : null,
      grid: n < 0,
      subseed: Number.isInteger(subseed) ? subseed : null,
      fileName: `underpaint-${stamp}-${n < 0 ? "grid" : n}${seed !== undefined ? `-${seed}` : ""}.${
        imageType(b64).replace("jpeg", "jpg")}`,
    };
  });
}

export class Gallery {
  constructor({ main, thumbs, infotext, download, onSelect = () => {} }) {
    Object.assign(this, { main, thumbs, infotext, download, onSelect });
    this.entries = [];
    this.index = -1;
    this.objectUrl = null;
    thumbs.addEventListener("keydown", (e) => {
      const move = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 }[e.key];
      if (move && this.entries.length) {
        e.preventDefault();
        this.select(Math.max(0, Math.min(this.entries.length - 1, this.index + move)), true);
      }
    });
  }

  get selected() {
    return this.entries[this.index] ?? null;
  }

  /** Show a request's images first; the first of them is selected. */
  add(entries) {
    if (!entries.length) return;
    this.entries = [...entries, ...this.entries].slice(0, MAX_KEPT);
    this.render();
    this.select(0);
  }

  render() {
    this.thumbs.replaceChildren(...this.entries.map((entry, i) => {
      const button = el("button", {
        type: "button", role: "option", "aria-selected": "false", tabindex: "-1",
        "aria-label": `Result ${i + 1}${entry.seed !== null ? `, seed ${entry.seed}` : ""}`,
      }, el("img", { src: entry.dataUrl, alt: "" }));
      button.addEventListener("click", () => this.select(i));
      return button;
    }));
  }

  select(i, focus = false) {
    const entry = this.entries[i];
    if (!entry) return;
    this.index = i;
    this.thumbs.querySelectorAll("button").forEach((b, j) => {
      b.setAttribute("aria-selected", String(j === i));
      b.tabIndex = j === i ? 0 : -1;
      if (j === i && focus) b.focus();
    });
    this.main.replaceChildren(el("img", {
      src: entry.dataUrl, alt: `Result ${i + 1}${entry.seed !== null ? ` (seed ${entry.seed})` : ""}`, id: "result-image",
    }));
    this.infotext.value = entry.infotext;
    if (this.objectUrl) URL.revokeObjectURL(this.objectUrl);
    this.objectUrl = URL.createObjectURL(dataUrlToBlob(entry.dataUrl));
    this.download.href = this.objectUrl;
    this.download.download = entry.fileName;
    this.download.hidden = false;
    this.onSelect(entry);
  }
}
