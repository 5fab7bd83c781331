// The inpainting canvas: the picture with a mask layer painted over it at the picture's own
// resolution, so the mask sent to the API lines up pixel for pixel whatever the zoom. Between them
// a sketch layer takes colour strokes (the "Sketch" tool, A1111's Inpaint sketch): they are painted
// into the picture sent, and the area they cover is repainted as if masked.

import { loadImage } from "./images.js";

const MAX_HISTORY = 30;
/** How the mask is shown over the picture; only its alpha matters for the mask sent. */
const MASK_RGB = [255, 60, 170];
const ZOOM_STEPS = [0.1, 0.125, 0.25, 0.33, 0.5, 0.67, 0.75, 1, 1.5, 2, 3, 4, 6, 8];

export class MaskEditor {
  constructor({ stage, layer, imageCanvas, sketchCanvas, maskCanvas, cursor, hint, onChange = () => {},
    onZoom = () => {} }) {
    Object.assign(this, { stage, layer, imageCanvas, sketchCanvas, maskCanvas, cursor, hint, onChange, onZoom });
    this.ctx = maskCanvas.getContext("2d", { willReadFrequently: true });
    this.sketchCtx = sketchCanvas.getContext("2d", { willReadFrequently: true });
    this.tool = "brush";
    this.color = "#000000";
    this.brushSize = 40;
    this.zoom = 1;
    this.undoStack = [];
    this.redoStack = [];
    this.dataUrl = null;
    this.stroke = null;
    this.bindPointer();
  }

  get width() { return this.maskCanvas.width; }
  get height() { return this.maskCanvas.height; }
  get hasImage() { return this.dataUrl !== null; }

  /** Load the picture to paint on; the mask starts empty. */
  async setImage(dataUrl) {
    const img = await loadImage(dataUrl);
    for (const canvas of [this.imageCanvas, this.sketchCanvas, this.maskCanvas]) {
      canvas.width = img.naturalWidth;
      canvas.height = img.naturalHeight;
    }
    this.imageCanvas.getContext("2d").drawImage(img, 0, 0);
    this.dataUrl = dataUrl;
    this.undoStack = [];
    this.redoStack = [];
    this.layer.hidden = false;
    this.hint.hidden = true;
    this.fit();
    this.onChange(this);
  }

  /** Load a mask picture: white (or opaque, for RGBA masks with transparency) = repaint. */
  async loadMask(dataUrl) {
    if (!this.hasImage) return;
    const img = await loadImage(dataUrl);
    const scratch = document.createElement("canvas");
    scratch.width = this.width;
    scratch.height = this.height;
    const sctx = scratch.getContext("2d", { willReadFrequently: true });
    sctx.drawImage(img, 0, 0, this.width, this.height);
    const src = sctx.getImageData(0, 0, this.width, this.height);
    this.remember();
    const out = this.ctx.createImageData(this.width, this.height);
    for (let i = 0; i < src.data.length; i += 4) {
      const d = src.data;
      const luminance = (d[i] * 299 + d[i + 1] * 587 + d[i + 2] * 114) / 1000;
      out.data.set(MASK_RGB, i);
      out.data[i + 3] = d[i + 3] < 255 ? 255 - d[i + 3] : luminance;
    }
    this.ctx.putImageData(out, 0, 0);
    this.onChange(this);
  }

  // -- painting --------------------------------------------------------------------------
  bindPointer() {
    const canvas = this.maskCanvas;
    canvas.addEventListener("pointerdown", (e) => {
      if (e.button !== 0 || !this.hasImage) return;
      e.preventDefault();
      canvas.setPointerCapture(e.pointerId);
      this.remember();
      this.stroke = this.toImage(e);
      this.paint(this.stroke, this.stroke);
    });
    canvas.addEventListener("pointermove", (e) => {
      this.moveCursor(e);
      if (!this.stroke) return;
      const point = this.toImage(e);
      this.paint(this.stroke, point);
      this.stroke = point;
    });
    const end = () => {
      if (this.stroke) {
        this.stroke = null;
        this.onChange(this);
      }
    };
    canvas.addEventListener("pointerup", end);
    canvas.addEventListener("pointercancel", end);
    canvas.addEventListener("pointerleave", () => { this.cursor.hidden = true; });
    this.stage.addEventListener("wheel", (e) => {
      if (!e.ctrlKey || !this.hasImage) return;  // plain wheel scrolls; Ctrl+wheel zooms
      e.preventDefault();
      this.stepZoom(e.deltaY < 0 ? 1 : -1);
    }, { passive: false });
  }

  /** Pointer position in picture pixels. */
  toImage(e) {
    const rect = this.maskCanvas.getBoundingClientRect();
    return {
      x: ((e.clientX - rect.left) * this.width) / rect.width,
      y: ((e.clientY - rect.top) * this.height) / rect.height,
    };
  }

  moveCursor(e) {
    if (!this.hasImage) return;
    const rect = this.maskCanvas.getBoundingClientRect();
    const size = (this.brushSize * rect.width) / this.width;
    Object.assign(this.cursor.style, {
      left: `${e.clientX - rect.left}px`, top: `${e.clientY - rect.top}px`, width: `${size}px`, height: `${size}px`,
    });
    this.cursor.hidden = false;
  }

  /** One stroke segment: the mask brush, the sketch's colour, or the eraser (which clears both layers). */
  paint(from, to) {
    const targets = this.tool === "eraser" ? [this.ctx, this.sketchCtx]
      : [this.tool === "sketch" ? this.sketchCtx : this.ctx];
    const colour = this.tool === "sketch" ? this.color : `rgb(${MASK_RGB.join(",")})`;
    for (const ctx of targets) {
      ctx.save();
      ctx.globalCompositeOperation = this.tool === "eraser" ? "destination-out" : "source-over";
      ctx.strokeStyle = ctx.fillStyle = colour;
      ctx.lineWidth = this.brushSize;
      ctx.lineCap = ctx.lineJoin = "round";
      ctx.beginPath();
      if (from.x === to.x && from.y === to.y) {
        ctx.arc(to.x, to.y, this.brushSize / 2, 0, Math.PI * 2);
        ctx.fill();
      } else {
        ctx.moveTo(from.x, from.y);
        ctx.lineTo(to.x, to.y);
        ctx.stroke();
      }
      ctx.restore();
    }
  }

  // -- history and whole-mask edits ---------------------------------------------------------
  snapshot() {
    return this.ctx.getImageData(0, 0, this.width, this.height);
  }

  /** Both layers, as the undo history keeps them. */
  state() {
    return [this.snapshot(), this.sketchCtx.getImageData(0, 0, this.width, this.height)];
  }

  remember() {
    this.undoStack.push(this.state());
    if (this.undoStack.length > MAX_HISTORY) this.undoStack.shift();
    this.redoStack = [];
  }

  undo() { this.travel(this.undoStack, this.redoStack); }
  redo() { this.travel(this.redoStack, this.undoStack); }

  travel(from, to) {
    if (!from.length) return;
    to.push(this.state());
    const [mask, sketch] = from.pop();
    this.ctx.putImageData(mask, 0, 0);
    this.sketchCtx.putImageData(sketch, 0, 0);
    this.onChange(this);
  }

  invert() {
    if (!this.hasImage) return;
    this.remember();
    const data = this.snapshot();
    for (let i = 0; i < data.data.length; i += 4) {
      data.data.set(MASK_RGB, i);
      data.data[i + 3] = 255 - data.data[i + 3];
    }
    this.ctx.putImageData(data, 0, 0);
    this.onChange(this);
  }

  /** Clear the mask and the sketch. */
  clear() {
    if (!this.hasImage) return;
    this.remember();
    this.ctx.clearRect(0, 0, this.width, this.height);
    this.sketchCtx.clearRect(0, 0, this.width, this.height);
    this.onChange(this);
  }

  /** Per pixel, how much is to be repainted (0..255): the mask's alpha, or the sketch's where higher. */
  repaintAlpha() {
    const mask = this.snapshot().data;
    const sketch = this.sketchCtx.getImageData(0, 0, this.width, this.height).data;
    const out = new Uint8ClampedArray(this.width * this.height);
    for (let p = 0, i = 3; p < out.length; p += 1, i += 4) out[p] = Math.max(mask[i], sketch[i]);
    return out;
  }

  /** Share of the picture that is masked or sketched over, 0..1 (partly painted pixels count in part). */
  coverage() {
    if (!this.hasImage) return 0;
    let sum = 0;
    for (const a of this.repaintAlpha()) sum += a;
    return sum / 255 / (this.width * this.height);
  }

  /** Whether any colour stroke is on the picture. */
  sketched() {
    if (!this.hasImage) return false;
    const data = this.sketchCtx.getImageData(0, 0, this.width, this.height).data;
    for (let i = 3; i < data.length; i += 4) if (data[i]) return true;
    return false;
  }

  /** The picture with the sketch painted in, as a PNG data URL (the picture itself when nothing is sketched). */
  sketchedDataUrl() {
    if (!this.sketched()) return this.dataUrl;
    const out = document.createElement("canvas");
    out.width = this.width;
    out.height = this.height;
    const octx = out.getContext("2d");
    octx.drawImage(this.imageCanvas, 0, 0);
    octx.drawImage(this.sketchCanvas, 0, 0);
    return out.toDataURL("image/png");
  }

  /** The mask as the API wants it: a black picture, white where to repaint (masked or sketched); PNG data URL. */
  maskDataUrl() {
    const out = document.createElement("canvas");
    out.width = this.width;
    out.height = this.height;
    const octx = out.getContext("2d");
    const pixels = octx.createImageData(this.width, this.height);
    const alpha = this.repaintAlpha();
    for (let p = 0; p < alpha.length; p += 1) {
      pixels.data[4 * p] = pixels.data[4 * p + 1] = pixels.data[4 * p + 2] = alpha[p];
      pixels.data[4 * p + 3] = 255;
    }
    octx.putImageData(pixels, 0, 0);
    return out.toDataURL("image/png");
  }

  // -- zoom ---------------------------------------------------------------------------------
  setZoom(zoom) {
    this.zoom = Math.min(8, Math.max(0.05, zoom));
    this.layer.style.width = `${Math.round(this.width * this.zoom)}px`;
    this.layer.style.height = `${Math.round(this.height * this.zoom)}px`;
    this.onZoom(this.zoom);
  }

  stepZoom(direction) {
    const next = direction > 0
      ? ZOOM_STEPS.find((z) => z > this.zoom + 1e-6)
      : [...ZOOM_STEPS].reverse().find((z) => z < this.zoom - 1e-6);
    if (next) {
      this.fitted = false;
      this.setZoom(next);
    }
  }

  /** The zoom at which the whole picture fills the stage (large pictures shrink, small ones grow). */
  fit() {
    if (!this.hasImage) return;
    const maxWidth = Math.max(100, this.stage.clientWidth - 8);
    const maxHeight = Math.max(100, Math.min(window.innerHeight * 0.65, 560) - 8);
    this.fitted = true;
    this.setZoom(Math.min(maxWidth / this.width, maxHeight / this.height));
  }
}
