// Getting pictures in (drop, paste, pick) and out (data URLs, blobs) of the page.

export function readFileAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

export function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser cannot decode this image"));
    img.src = src;
  });
}

/** The API takes plain base64; strip a "data:image/...;base64," prefix. */
export const stripDataUrl = (url) => (url ? url.replace(/^data:[^,]*,/, "") : url);

/** The picture type of plain base64 image data, from its first bytes (the API answers PNG, or JPEG or
 * WebP when the server's "File format for images" setting says so). */
export const imageType = (b64) => (b64.startsWith("/9j/") ? "jpeg" : b64.startsWith("UklGR") ? "webp" : "png");

/** The API answers plain base64; make it displayable. */
export const pngDataUrl = (b64) => (b64.startsWith("data:") ? b64 : `data:image/${imageType(b64)};base64,${b64}`);

export function dataUrlToBlob(url) {
  const [head, body] = url.split(",", 2);
  const mime = (head.match(/^data:([^;,]+)/) || [])[1] || "application/octet-stream";
  const bytes = Uint8Array.from(atob(body), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type: mime });
}

/** The first image file in a paste or drop, if any. */
export function imageFileFrom(dataTransfer) {
  if (!dataTransfer) return null;
  for (const item of dataTransfer.items || []) {
    if (item.kind === "file" && item.type.startsWith("image/")) return item.getAsFile();
  }
  for (const file of dataTransfer.files || []) {
    if (file.type.startsWith("image/") || file.type === "") return file;
  }
  return null;
}

/** Say beside `zone` (right after it) that a picture could not be read; `message` null takes it back. */
export function imageError(zone, message) {
  let note = zone.parentElement.querySelector(":scope > .image-error");
  if (message === null) {
    note?.remove();
    return;
  }
  if (!note) {
    note = document.createElement("p");
    note.className = "image-error field-error";
    note.setAttribute("role", "alert");
    zone.after(note);
  }
  note.textContent = message;
}

/** Make `zone` accept dropped image files; `onFile(file)` gets the first one. */
export function acceptDrops(zone, onFile) {
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragover");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragover"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragover");
    const file = imageFileFrom(event.dataTransfer);
    if (file) onFile(file);
  });
}

/** Enter or Space on a focused drop zone opens the file picker (keyboard users cannot drag). */
export function openPickerOnKey(zone, fileInput) {
  zone.addEventListener("keydown", (event) => {
    if (event.target === zone && (event.key === "Enter" || event.key === " ")) {
      event.preventDefault();
      fileInput.click();
    }
  });
}

/**
 * One image slot: a drop zone with a preview, a file picker and a data URL.
 * `onChange(input)` runs after every change (set or clear).
 */
export class ImageInput {
  constructor({ zone, fileInput, preview, onChange = () => {} }) {
    this.zone = zone;
    this.preview = preview;
    this.onChange = onChange;
    this.dataUrl = null;
    this.width = 0;
    this.height = 0;
    this.name = "";
    acceptDrops(zone, (file) => this.setFile(file));
    if (fileInput) openPickerOnKey(zone, fileInput);
    fileInput?.addEventListener("change", () => {
      if (fileInput.files[0]) this.setFile(fileInput.files[0]);
      fileInput.value = "";
    });
  }

  /** Take a picked, dropped or pasted file; one the browser cannot read empties the slot and says so. */
  async setFile(file) {
    try {
      await this.set(await readFileAsDataURL(file), file.name, file);
    } catch (err) {
      this.clear();
      imageError(this.zone, `${file.name || "This file"}: ${err.message || err}`);
    }
  }

  /** Show `dataUrl`; `file`, when given, is the original file (its bytes keep all metadata). */
  async set(dataUrl, name = "", file = null) {
    const img = await loadImage(dataUrl);
    imageError(this.zone, null);
    this.dataUrl = dataUrl;
    this.file = file;
    this.width = img.naturalWidth;
    this.height = img.naturalHeight;
    this.name = name;
    this.preview.src = dataUrl;
    this.preview.hidden = false;
    this.zone.classList.add("has-image");
    this.onChange(this);
  }

  clear() {
    this.dataUrl = null;
    this.file = null;
    this.width = this.height = 0;
    this.preview.hidden = true;
    this.preview.removeAttribute("src");
    this.zone.classList.remove("has-image");
    this.onChange(this);
  }
}

/**
 * A1111's batch of pictures beside one image slot: `fileInput` (multiple) picks them and the first shows in
 * `input`; while two or more are chosen, `box` shows and `text` says `describe(count)`; `endButton` ends the
 * batch. Any other picture put in the slot ends it too: the slot's onChange calls `end()`.
 */
export class PictureBatch {
  constructor({ input, fileInput, box, text, endButton, describe }) {
    Object.assign(this, { box, text, describe });
    this.files = [];
    fileInput.addEventListener("change", async () => {
      const files = [...fileInput.files].filter((f) => f.type.startsWith("image/") || f.type === "");
      fileInput.value = "";
      if (!files.length) return;
      await input.setFile(files[0]);  // its onChange ends any batch before this one starts
      this.set(files.length > 1 ? files : []);
    });
    endButton.addEventListener("click", () => this.end());
  }

  set(files) {
    this.files = files;
    this.box.hidden = files.length === 0;
    this.text.textContent = files.length ? this.describe(files.length) : "";
  }

  end() {
    this.set([]);
  }
}
