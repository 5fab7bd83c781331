// Wires the page together: tabs, lists from the API, generate / interrupt, results, send-to
// (txt2img, img2img and Inpaint share one panel; PNG Info and Extras have their own).

import { ApiError, get, getOptional, post } from "./api.js";
import { setupAttentionKeys } from "./attention.js";
import { loadCheckpoints, onFamily, setupCheckpointSwitch } from "./checkpoints.js";
import { loadClipSkip, setClipSkip, setupClipSkip } from "./clipskip.js";
import { loadVae, setupVae } from "./vae.js";
import { loadPreviewSetting, setupPreviewSetting } from "./previewsetting.js";
import { loadTokenMerging, setupTokenMerging, tokenMergingFor } from "./tomesetting.js";
import { img2imgUpscalerFor, loadImg2imgUpscaler, setupImg2imgUpscaler } from "./upscalersetting.js";
import { $, $$, numberValue, radioValue, setNumber, syncSliders } from "./dom.js";
import { ControlNetSection } from "./controlnet.js";
import { setupExtras } from "./extras.js";
import { clearFieldErrors, showFieldErrors } from "./fielderrors.js";
import { GenerationForm } from "./form.js";
import { Gallery, entriesFromResponse, parseInfo } from "./gallery.js";
import { ImageInput, PictureBatch, imageFileFrom, readFileAsDataURL, stripDataUrl } from "./images.js";
import { setupInpaint } from "./inpaint.js";
import { infotextToFields, parseInfotext } from "./infotext.js";
import { SettingsStore } from "./persist.js";
import { parametersIn, setupPngInfo } from "./pnginfo.js";
import { ProgressView, formatSeconds } from "./progress.js";
import { setupScripts } from "./scripts.js";
import { ExtraNetworks, checkpointName } from "./extranetworks.js";
import { StylesPicker } from "./styles.js";
import { setupMerger } from "./merger.js";
import { setupSettings } from "./settings.js";
import { setupTokenCounters } from "./tokencount.js";

const panel = $("#panel-generate");
const generalBox = $("#general-error");
const notice = $("#notice");
const form = new GenerationForm(panel);
const state = { tab: "img2img", busy: false, interrupted: false, again: false, lastSeed: null, outdirs: {} };
const store = new SettingsStore(panel, { family: () => form.family });
const styles = new StylesPicker();
const settings = setupSettings({
  onApplied: () => {  // the top bar's quick settings show the settings as they are now
    const loading = loadQuickSettings(get("/sdapi/v1/options"));
    extraNetworks.stale();  // the cards' default multiplier
    return Promise.all(loading.map(([, promise]) => promise)).catch(() => {});
  },
});
const merger = setupMerger({
  onMerged: async () => {  // the new checkpoint joins the lists
    await loadCheckpoints().catch(() => {});
    extraNetworks.stale();
  },
});
const extraNetworks = new ExtraNetworks({
  onCheckpoint: (title) => {  // a checkpoint card: as if chosen in the checkpoint drop-down
    const select = $("#checkpoint");
    const option = [...select.options].find((o) => checkpointName(o.value) === checkpointName(title));
    if (!option || select.disabled || select.value === option.value) return;
    select.value = option.value;
    select.dispatchEvent(new Event("change"));
  },
});
onFamily((family, edit) => {
  form.applyFamily(family);
  form.setEditModel(edit);  // InstructPix2Pix: A1111's Image CFG Scale appears
  extraNetworks.stale();  // which embeddings fit depends on the checkpoint
});

// -- tabs ------------------------------------------------------------------------------------
const tabs = $$('[role="tab"]');

function selectTab(name, focus = false) {
  state.tab = name;
  for (const tab of tabs) {
    const on = tab.dataset.tab === name;
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
    if (on && focus) tab.focus();
  }
  const generating = !["pnginfo", "extras", "merger", "settings"].includes(name);
  tokenMergingFor(name);
  img2imgUpscalerFor(name);
  panel.hidden = !generating;
  $("#panel-pnginfo").hidden = name !== "pnginfo";
  $("#panel-extras").hidden = name !== "extras";
  $("#panel-merger").hidden = name !== "merger";
  $("#panel-settings").hidden = name !== "settings";
  if (name === "settings") settings.load().catch((err) => { $("#settings-status").textContent = err.message; });
  if (name === "merger") merger.load().catch((err) => { $("#merge-status").textContent = err.message; });
  if (generating) {
    panel.dataset.mode = name;
    panel.setAttribute("aria-labelledby", `tab-${name}`);
    // data-show lists the tabs a part belongs to ("img2img inpaint").
    $$("[data-show]", panel).forEach((node) => { node.hidden = !node.dataset.show.split(" ").includes(name); });
    if (name === "inpaint" && editor.hasImage) editor.fit();
    updateResizeBy();
    showControlNetHiresOption();
  }
  scripts.setTab(name);  // each tab's own Script choice (Inpaint, Extras and PNG Info: none)
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
}

tabs.forEach((tab, i) => {
  tab.addEventListener("click", () => selectTab(tab.dataset.tab));
  tab.addEventListener("keydown", (e) => {
    const to = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[e.key];
    if (to === undefined) return;
    e.preventDefault();
    selectTab(tabs[(to + tabs.length) % tabs.length].dataset.tab, true);
  });
});

// -- source images -----------------------------------------------------------------------------
const img2img = new ImageInput({
  zone: $("#img2img-drop"),
  fileInput: $("#img2img-file"),
  preview: $("#img2img-preview"),
  onChange: (input) => {
    $("#img2img-size").textContent = input.width ? `${input.width}×${input.height} px` : "";
    scripts.update();  // SD upscale's line says what the picture becomes
    updateResizeBy();
    batch.end();  // another picture (picked, dropped, pasted, sent) or none ends a batch; a new batch sets it after
  },
});
$("#img2img-clear").addEventListener("click", () => img2img.clear());

// A1111's img2img "Batch", from the browser: several pictures, each an img2img request of its own with the
// same settings (the first one shows as the image).
const batch = new PictureBatch({
  input: img2img, fileInput: $("#img2img-batch-file"), box: $("#img2img-batch"), text: $("#img2img-batch-count"),
  endButton: $("#img2img-batch-clear"), describe: (n) => `Batch: ${n} pictures; Generate runs img2img on each in turn.`,
});

/** The requests one Generate sends: the built one, or in an img2img batch one per picture (with its file name). */
async function requestsFor(built) {
  if (state.tab !== "img2img" || batch.files.length < 2) return [{ request: built.request, label: "" }];
  const requests = [];
  for (const file of batch.files) {
    const picture = stripDataUrl(await readFileAsDataURL(file));
    requests.push({ request: { ...built.request, init_images: [picture] }, label: file.name });
  }
  return requests;
}

const { editor, setImageFile: setInpaintImage } = setupInpaint({
  active: () => state.tab === "inpaint",
  onChange: () => updateResizeBy(),  // "Resize by" says what the picture becomes
});

/** The picture the current tab works on (none in txt2img). */
function sourceImage() {
  if (state.tab === "txt2img") return null;
  return state.tab === "inpaint" ? editor.sketchedDataUrl() : img2img.dataUrl;
}
function sourceSize() {
  return state.tab === "inpaint" ? [editor.width, editor.height] : [img2img.width, img2img.height];
}

// A1111's "Resize to" / "Resize by" (img2img and Inpaint): by a scale, the size sent is the picture's
// times the scale (whole pixels, as A1111 takes them), shown under the slider.
const resizingBy = () => state.tab !== "txt2img" && radioValue(panel, "resize_tab") === "by";

function scaledSize() {
  const [w, h] = sourceSize();
  const scale = numberValue($("#scale_by")) ?? 1;
  return w ? [Math.floor(w * scale), Math.floor(h * scale)] : null;
}

function updateResizeBy() {
  const by = resizingBy();
  $("#resize-by").hidden = !by;
  $("#size-row").hidden = by;
  const size = scaledSize();
  const [w, h] = sourceSize();
  $("#resize-by-size").textContent = size ? `Resize: from ${w}×${h} to ${size[0]}×${size[1]}` : "No picture yet.";
}
$$('input[name="resize_tab"]', panel).forEach((radio) => radio.addEventListener("change", updateResizeBy));
for (const control of [$("#scale_by"), $('input[data-sync="scale_by"]')]) control.addEventListener("input", updateResizeBy);

// -- ControlNet, PNG Info and Extras --------------------------------------------------------------
const controlnet = new ControlNetSection({
  section: $("#controlnet-section"),
  container: $("#controlnet-units"),
  addButton: $("#controlnet-add"),
  template: $("#controlnet-unit-template"),
  sourceImage,
});

/** ControlNet units' hires-fix option shows where the extension shows it: txt2img with Hires. fix on. */
function showControlNetHiresOption() {
  controlnet.showHiresOption(state.tab === "txt2img" && $("#enable_hr").checked);
}
$("#enable_hr").addEventListener("change", showControlNetHiresOption);

// The Script choices (both tabs: Prompt matrix, Prompts from file, X/Y/Z plot; img2img also Loopback and SD
// upscale), at the bottom of the settings.
const scripts = setupScripts({ root: panel, sourceSize: () => [img2img.width, img2img.height] });

/** Set the controls from a picture's parameters for the `target` tab, and say what could not be set. */
async function applyFields(fields, target) {
  if (typeof fields.prompt === "string" && typeof fields.negative_prompt === "string") {
    const { prompt, negative } = styles.takeFrom(fields.prompt, fields.negative_prompt);
    fields = { ...fields, prompt, negative_prompt: negative };
  }
  const notes = form.apply(fields, target);
  countTokens();
  showControlNetHiresOption();  // Hires. fix may have been turned on or off
  if (fields.sd_model_name && $("#checkpoint").value && !$("#checkpoint").value.includes(fields.sd_model_name)) {
    notes.push(`made with the model "${fields.sd_model_name}"`);
  }
  store.save();
  notice.textContent = notes.length ? `Parameters set; note: ${notes.join("; ")}.` : "Parameters set.";
  if (fields.clip_skip !== undefined) await setClipSkip(fields.clip_skip);
}

const pngInput = setupPngInfo({
  onSend: async (dataUrl, fields, target) => {
    if (Object.keys(fields).length) await applyFields(fields, target);
    else notice.textContent = "The picture holds no generation parameters: the settings are unchanged.";
    await sendImage(dataUrl, target);
  },
});

const extras = setupExtras();
$("#extras-send-img2img").addEventListener("click", () => sendImage(extras.result(), "img2img"));
$("#extras-send-inpaint").addEventListener("click", () => sendImage(extras.result(), "inpaint"));
// A1111's Sketch: the Inpaint picture with its colour strokes goes to img2img, to be repainted whole.
$("#sketch-to-img2img").addEventListener("click", () => {
  if (editor.hasImage) sendImage(editor.sketchedDataUrl(), "img2img");
});

// "Paste parameters" (A1111's ↙): an infotext typed or pasted into the prompt, else the selected result's.
$("#paste-parameters").addEventListener("click", async () => {
  const typed = $("#prompt").value.trim();
  const parsed = parseInfotext(typed || gallery.selected?.infotext || "");
  if (!Object.keys(parsed.params).length) {
    notice.textContent = typed
      ? "The prompt holds no generation parameters (an infotext ends with a line such as “Steps: 20, Sampler: …”)."
      : "No result selected whose parameters could be read.";
    return;
  }
  clearFieldErrors(panel);
  await applyFields(infotextToFields(parsed), state.tab);
});

// A picture dropped on the prompts fills the settings from its parameters, as in A1111.
$(".prompts").addEventListener("drop", async (event) => {
  const file = imageFileFrom(event.dataTransfer);
  if (!file) return;  // dropped text goes into the box as usual
  event.preventDefault();
  try {
    const found = await parametersIn(file);
    if (found) await applyFields(found.fields, state.tab);
    else notice.textContent = `${file.name || "The picture"} holds no generation parameters.`;
  } catch (err) {
    generalBox.textContent = `Cannot read the parameters of ${file.name || "the picture"}: ${err.message}`;
    generalBox.hidden = false;
  }
});

async function sendImage(dataUrl, target) {
  selectTab(target);
  if (target === "txt2img") return;  // the parameters only: txt2img starts from noise
  if (target === "inpaint") {
    await editor.setImage(dataUrl);
    $("#mask-stage").scrollIntoView({ block: "nearest" });  // the editor grows the column: keep it in sight
  } else if (target === "extras") await extras.input.set(dataUrl, "result.png");
  else await img2img.set(dataUrl, "result.png");
}

/** A pasted or stray-dropped picture goes to the focused ControlNet unit, else to the current tab's image. */
function takeImage(file, focused) {
  const unitZone = focused?.closest?.(".cn-drop");
  const unit = unitZone && controlnet.units.find((u) => u.root.contains(unitZone));
  if (unit) unit.image.setFile(file);
  else if (state.tab === "inpaint") setInpaintImage(file);
  else if (state.tab === "pnginfo") pngInput.setFile(file);
  else if (state.tab === "extras") extras.input.setFile(file);
  else if (state.tab === "merger" || state.tab === "settings") return;
  else if (state.tab !== "txt2img") img2img.setFile(file);
  else notice.textContent = "txt2img takes no picture: drop it on the prompt to read its parameters, or on img2img, Inpaint, Extras or PNG Info.";
}

document.addEventListener("paste", (event) => {
  const file = imageFileFrom(event.clipboardData);
  if (!file) return;
  event.preventDefault();
  takeImage(file, document.activeElement);
});
// A file dropped outside a drop zone would make the browser leave the page (and lose the work).
document.addEventListener("dragover", (event) => event.preventDefault());
document.addEventListener("drop", (event) => {
  if (event.defaultPrevented) return;
  event.preventDefault();
  const file = imageFileFrom(event.dataTransfer);
  if (file) takeImage(file, null);
});

// -- lists from the API ------------------------------------------------------------------------
/**
 * Hires. fix's upscalers: GET /latent-upscale-modes, then GET /upscalers (A1111's order); Extras'
 * and SD upscale's: the latter.
 */
async function loadUpscalers() {
  const [latent, pictures] = await Promise.all([
    getOptional("/sdapi/v1/latent-upscale-modes", []), getOptional("/sdapi/v1/upscalers", []),
  ]);
  form.fillUpscalers([...(latent ?? []), ...(pictures ?? [])].map((u) => u.name).filter(Boolean));
  const names = (pictures ?? []).map((u) => u.name).filter(Boolean);
  extras.fillUpscalers(names);
  scripts.fillUpscalers(names);  // SD upscale enlarges with the same picture upscalers
}

/** The top bar's quick settings, each from the same pending GET /options: [what, its loading] pairs. */
function loadQuickSettings(options) {
  return [["VAEs", loadVae(options)], ["live preview setting", loadPreviewSetting(options)],
    ["clip skip setting", loadClipSkip(options)], ["token merging setting", loadTokenMerging(options)],
    ["img2img upscaler setting", loadImg2imgUpscaler(options)]];
}

async function loadLists() {
  generalBox.hidden = true;
  const failures = [];
  const attempt = (what, promise) => promise.catch((err) => failures.push(`${what}: ${err.message}`));
  const options = get("/sdapi/v1/options");  // one request for the settings below
  options.catch(() => {});  // each of them reports a failure in its own words
  options.then((o) => {  // where the server saves pictures, to say so after a generation
    state.outdirs = { txt2img: o?.outdir_txt2img_samples, img2img: o?.outdir_img2img_samples };
  }, () => {});
  await Promise.all([
    attempt("samplers", get("/sdapi/v1/samplers").then((s) => form.fillSamplers(s ?? []))),
    attempt("schedules", getOptional("/sdapi/v1/schedulers", []).then((s) => form.fillSchedulers(s ?? []))),
    attempt("upscalers", loadUpscalers()),
    attempt("ADetailer models", getOptional("/adetailer/v1/ad_model", { ad_model: [] })
      .then((m) => form.fillDetailerModels(m?.ad_model ?? []))),
    attempt("checkpoints", loadCheckpoints(options)),
    ...loadQuickSettings(options).map(([what, promise]) => attempt(what, promise)),
    attempt("ControlNet", controlnet.load().then(() => form.fillDetailerControlNets(controlnet.models))),
    attempt("styles", styles.load()),
  ]);
  if (failures.length) {
    generalBox.textContent = `Could not load ${failures.join("; ")}`;
    generalBox.hidden = false;
  }
}

$("#refresh-models").addEventListener("click", async () => {
  await post("/sdapi/v1/refresh-checkpoints").catch(() => {});
  await loadLists();
});

setupPreviewSetting();
setupClipSkip();
setupVae();
setupTokenMerging();
setupImg2imgUpscaler();

setupCheckpointSwitch({
  onSwitching: (switching) => {
    $("#checkpoint").disabled = switching || state.busy;
    $("#generate").disabled = switching || state.busy;
  },
});

// -- generating ------------------------------------------------------------------------------
const progress = new ProgressView({
  box: $("#progress"), bar: $("#progress-bar"), text: $("#progress-text"), preview: $("#progress-preview"),
});

function inputError(field, message) {
  showFieldErrors({ errors: [{ field, message }] }, { root: panel })?.focus();
  return null;
}

/** The img2img / inpaint request fields, or null after marking what is missing. */
function img2imgRequest() {
  const source = sourceImage();
  if (!source) return inputError("init_images", "Drop, paste or pick an image first.");
  const request = { ...form.values(state.tab), init_images: [stripDataUrl(source)] };
  if (resizingBy()) [request.width, request.height] = scaledSize();
  if (state.tab === "inpaint") {
    const inpaint = form.inpaintValues();
    if (editor.coverage() === 0 && !inpaint.inpainting_mask_invert) {
      return inputError("mask", "Paint over the area to repaint (or sketch on it) first, or choose “Inpaint not masked”.");
    }
    Object.assign(request, inpaint, { mask: stripDataUrl(editor.maskDataUrl()) });
  } else {
    Object.assign(request, scripts.values("img2img"));  // script_name / script_args while a script is chosen
  }
  return request;
}

// A1111's "Interrogate CLIP" (the picture's caption: BLIP, then CLIP's word-list matches) and "Interrogate
// DeepBooru" (its Danbooru tags): the reading becomes the prompt.
async function interrogateInto(button, model) {
  if (state.busy) return;
  clearFieldErrors(panel);
  generalBox.hidden = true;
  const source = sourceImage();
  if (!source) {
    inputError("init_images", "Drop, paste or pick an image first.");
    return;
  }
  button.disabled = true;
  notice.textContent = "Reading the picture…";
  try {
    const { caption } = await post("/sdapi/v1/interrogate", { image: stripDataUrl(source), model });
    const prompt = $("#prompt");
    prompt.value = caption ?? "";
    prompt.dispatchEvent(new Event("input", { bubbles: true }));
    store.save();
    notice.textContent = "Prompt written from the picture.";
  } catch (err) {
    notice.textContent = "";
    generalBox.textContent = err.message;
    generalBox.hidden = false;
  } finally {
    button.disabled = false;
  }
}
$("#interrogate").addEventListener("click", (event) => interrogateInto(event.currentTarget, "clip"));
$("#interrogate-deepbooru").addEventListener("click", (event) => interrogateInto(event.currentTarget, "deepdanbooru"));

/** The A1111 request for the current tab and the route it goes to, or null after marking what is missing. */
function buildRequest() {
  const txt2img = state.tab === "txt2img";
  const request = txt2img ? { ...form.values("txt2img"), ...scripts.values("txt2img") } : img2imgRequest();
  if (!request) return null;
  Object.assign(request, styles.values(), { send_images: true, save_images: $("#save_images").checked });
  const cn = controlnet.payload();
  const alwaysOn = form.alwaysOnScripts();
  if (cn.args.length) alwaysOn.controlnet = { args: cn.args };
  if (Object.keys(alwaysOn).length) request.alwayson_scripts = alwaysOn;
  return { request, rename: cn.rename, path: txt2img ? "/sdapi/v1/txt2img" : "/sdapi/v1/img2img" };
}

function setBusy(busy) {
  state.busy = busy;
  $("#generate").disabled = busy;
  $("#generate").textContent = busy ? "Generating…" : "Generate";
  $("#interrupt").disabled = !busy;
  $("#skip").disabled = !busy;
  $("#checkpoint").disabled = busy;
}

async function generate() {
  if (state.busy) return;
  clearFieldErrors(panel);
  generalBox.hidden = true;
  notice.textContent = "";
  const built = buildRequest();
  if (!built) return;
  store.save();
  setBusy(true);
  state.interrupted = false;
  progress.start();
  const started = performance.now();
  let current = "";
  try {
    const requests = await requestsFor(built);
    let count = 0;
    let saveError = null;
    for (const [i, { request, label }] of requests.entries()) {
      if (state.interrupted) break;
      current = label;
      if (requests.length > 1) notice.textContent = `Batch: picture ${i + 1} of ${requests.length} (${label})`;
      const response = await post(built.path, request);
      const entries = entriesFromResponse(response);
      gallery.add(entries);
      count += entries.filter((entry) => !entry.grid).length;  // a batch's grid is not one of its pictures
      saveError ??= parseInfo(response.info).save_error;
      if (entries.length && $("#gallery-main").getBoundingClientRect().top > window.innerHeight) {
        $("#gallery-main").scrollIntoView({ block: "nearest" });  // one-column layout: results are below
      }
    }
    if (requests.length > 1) notice.textContent = "";
    const seconds = formatSeconds((performance.now() - started) / 1000);
    const what = count === 1 ? "1 image" : `${count} images`;
    const kind = built.path.endsWith("txt2img") ? "txt2img" : "img2img";
    const saved = built.request.save_images && count && !saveError
      ? `, saved in ${state.outdirs[kind] || "the server's outputs folder"}` : "";
    progress.stop(state.interrupted ? `Interrupted after ${seconds}: ${what} returned` : `Done in ${seconds}: ${what}${saved}`);
    if (saveError) {
      generalBox.textContent = `The pictures were not all saved on the server: ${saveError}`;
      generalBox.hidden = false;
    }
  } catch (err) {
    progress.stop(state.interrupted ? "Interrupted" : "");
    if (current) notice.textContent = `Batch stopped at ${current}.`;
    if (err instanceof ApiError) {
      showFieldErrors(err, { root: panel, generalBox, rename: built.rename })?.focus();
    } else {
      generalBox.textContent = String(err.message ?? err);
      generalBox.hidden = false;
    }
  } finally {
    setBusy(false);
  }
  if (state.again) {  // Ctrl+Enter came while it ran: start again with the settings now shown
    state.again = false;
    generate();
  }
}

$("#generate").addEventListener("click", generate);
$("#interrupt").addEventListener("click", async () => {
  state.interrupted = true;
  $("#interrupt").disabled = true;
  await post("/sdapi/v1/interrupt").catch((err) => { notice.textContent = `Interrupt failed: ${err.message}`; });
});
$("#skip").addEventListener("click", () => post("/sdapi/v1/skip").catch(() => {}));

// A1111's keys: Ctrl+Enter generates (while a picture is being made: interrupts it and starts
// again), Alt+Enter skips the current picture, Escape interrupts.
document.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
    if (["pnginfo", "merger", "settings"].includes(state.tab)) return;
    e.preventDefault();
    if (state.tab === "extras") {  // Extras' own Generate (an upscale is not interrupted)
      extras.run();
      return;
    }
    if (!state.busy) {
      generate();
      return;
    }
    state.again = true;
    if (!$("#interrupt").disabled) $("#interrupt").click();
  } else if (e.key === "Enter" && e.altKey && state.busy) {
    e.preventDefault();
    $("#skip").click();
  } else if (e.key === "Escape" && state.busy && !$("#interrupt").disabled) {
    e.preventDefault();
    $("#interrupt").click();
  }
});

// -- results ------------------------------------------------------------------------------------
const resultButtons = ["#send-img2img", "#send-inpaint", "#send-extras", "#send-pnginfo"].map((id) => $(id));
const gallery = new Gallery({
  main: $("#gallery-main"),
  thumbs: $("#gallery-thumbs"),
  infotext: $("#result-infotext"),
  download: $("#result-download"),
  onSelect: (entry) => {
    resultButtons.forEach((b) => { b.disabled = false; });
    $("#result-seed").disabled = entry.seed === null;
    if (entry.seed !== null) state.lastSeed = entry.seed;
  },
});
$("#send-img2img").addEventListener("click", () => sendImage(gallery.selected.dataUrl, "img2img"));
$("#send-inpaint").addEventListener("click", () => sendImage(gallery.selected.dataUrl, "inpaint"));
$("#send-extras").addEventListener("click", () => sendImage(gallery.selected.dataUrl, "extras"));
$("#send-pnginfo").addEventListener("click", async () => {
  selectTab("pnginfo");
  await pngInput.set(gallery.selected.dataUrl, gallery.selected.fileName);
});
$("#result-seed").addEventListener("click", () => setNumber($("#seed"), gallery.selected.seed));

setupAttentionKeys(["#prompt", "#negative_prompt", "#hr_prompt", "#hr_negative_prompt"].map((id) => $(id)));
const countTokens = setupTokenCounters(() => Math.min(150, Math.max(1, Math.round(numberValue($("#steps")) || 20))));

// -- seed and size helpers ------------------------------------------------------------------------
$("#seed-random").addEventListener("click", () => setNumber($("#seed"), -1));
$("#subseed-random").addEventListener("click", () => setNumber($("#subseed"), -1));
$("#subseed-reuse").addEventListener("click", () => {
  const subseed = gallery.selected?.subseed;
  if (subseed !== null && subseed !== undefined) setNumber($("#subseed"), subseed);
  else notice.textContent = "No result yet whose variation seed could be reused.";
});
$("#seed-reuse").addEventListener("click", () => {
  const seed = gallery.selected?.seed ?? state.lastSeed;
  if (seed !== null && seed !== undefined) setNumber($("#seed"), seed);
  else notice.textContent = "No result yet whose seed could be reused.";
});
$("#swap-size").addEventListener("click", () => {
  const [w, h] = [numberValue($("#width")), numberValue($("#height"))];
  setNumber($("#width"), h);
  setNumber($("#height"), w);
});
$("#size-from-image").addEventListener("click", () => {
  const [w, h] = sourceSize();
  if (!w) return;
  const round8 = (v) => Math.max(64, Math.round(v / 8) * 8);
  setNumber($("#width"), round8(w));
  setNumber($("#height"), round8(h));
});

// -- start ------------------------------------------------------------------------------------
syncSliders();
const initial = location.hash.slice(1);
selectTab(tabs.some((t) => t.dataset.tab === initial) ? initial : "img2img");
loadLists().finally(() => {
  store.restore();  // the last used settings, once the drop-downs they choose from are filled
  extras.restore();
  document.body.dataset.ready = "true";
});
