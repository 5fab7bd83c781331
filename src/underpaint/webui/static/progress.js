// Progress while a request runs: GET /sdapi/v1/progress every so often (step, ETA, live preview).

import { get } from "./api.js";
import { pngDataUrl } from "./images.js";

const POLL_MS = 500;

export function describeProgress(p) {
  const state = p?.state ?? {};
  if (!state.sampling_steps && p?.textinfo) return p.textinfo;  // e.g. "Waiting for the model"
  const parts = [];
  if (state.job_count > 1) parts.push(`Batch ${Math.min((state.job_no ?? 0) + 1, state.job_count)}/${state.job_count}`);
  if (state.sampling_steps) parts.push(`Step ${state.sampling_step ?? 0}/${state.sampling_steps}`);
  parts.push(`${Math.round((p?.progress ?? 0) * 100)}%`);
  if (p?.eta_relative > 0) parts.push(`ETA ${formatSeconds(p.eta_relative)}`);
  if (state.interrupted) parts.push("interrupting…");
  if (state.skipped) parts.push("skipping…");
  return parts.join(" · ");
}

export function formatSeconds(s) {
  const whole = Math.max(1, Math.round(s));  // rounded first: 299.6 s is "5 min 0 s", not "4 min 60 s"
  if (whole < 60) return `${whole} s`;
  return `${Math.floor(whole / 60)} min ${whole % 60} s`;
}

export class ProgressView {
  constructor({ box, bar, text, preview }) {
    Object.assign(this, { box, bar, text, preview });
    this.running = false;
    this.timer = null;
  }

  start() {
    this.running = true;
    this.box.hidden = false;
    this.bar.value = 0;
    this.text.textContent = "Waiting…";
    this.preview.hidden = true;
    this.preview.removeAttribute("src");
    this.schedule();
  }

  schedule() {
    this.timer = setTimeout(() => this.poll(), POLL_MS);
  }

  async poll() {
    if (!this.running) return;
    try {
      const p = await get("/sdapi/v1/progress?skip_current_image=false");
      if (!this.running) return;
      this.bar.value = p?.progress ?? 0;
      this.text.textContent = describeProgress(p);
      if (p?.current_image) {
        this.preview.src = pngDataUrl(p.current_image);
        this.preview.hidden = false;
      }
    } catch {
      // a missed poll is not worth reporting; the request itself reports real failures
    }
    if (this.running) this.schedule();
  }

  /** Stop polling; `message` stays shown (e.g. "Done in 3 s", "Interrupted"). */
  stop(message = "") {
    this.running = false;
    clearTimeout(this.timer);
    this.preview.hidden = true;
    if (message) {
      this.bar.value = 1;
      this.text.textContent = message;
    } else {
      this.box.hidden = true;
    }
  }
}
