// The Inpaint tab's picture and mask: file pickers, drop, tool bar and keyboard shortcuts.

import { $, $$ } from "./dom.js";
import { acceptDrops, imageError, openPickerOnKey, readFileAsDataURL } from "./images.js";
import { MaskEditor } from "./maskcanvas.js";

/** Build the mask editor from the page and wire its controls; `active()` says whether its tab is shown. */
export function setupInpaint({ active, onChange = () => {} }) {
  const editor = new MaskEditor({
    stage: $("#mask-stage"),
    layer: $("#mask-layer"),
    imageCanvas: $("#inpaint-image"),
    sketchCanvas: $("#inpaint-sketch"),
    maskCanvas: $("#inpaint-mask"),
    cursor: $("#brush-cursor"),
    hint: $("#mask-hint"),
    onChange: (ed) => {
      $("#inpaint-size").textContent = ed.width ? `${ed.width}×${ed.height} px` : "";
      onChange(ed);
    },
    onZoom: (zoom) => { $("#zoom-value").textContent = `${Math.round(zoom * 100)}%`; },
  });
  const loadInto = (target) => async (file) => {
    try {
      await target(await readFileAsDataURL(file));
      imageError($("#mask-stage"), null);
    } catch (err) {  // a file the browser cannot decode: said under the canvas
      imageError($("#mask-stage"), `${file.name || "This file"}: ${err.message || err}`);
    }
  };
  const setImageFile = loadInto((url) => editor.setImage(url));
  acceptDrops($("#mask-stage"), setImageFile);
  openPickerOnKey($("#mask-stage"), $("#inpaint-file"));
  for (const [id, load] of [["#inpaint-file", setImageFile], ["#inpaint-mask-file", loadInto((url) => editor.loadMask(url))]]) {
    const picker = $(id);
    picker.addEventListener("change", () => {
      if (picker.files[0]) load(picker.files[0]);
      picker.value = "";
    });
  }

  $$('input[name="mask-tool"]').forEach((r) => r.addEventListener("change", () => { editor.tool = r.value; }));
  const colour = $("#sketch-color");
  editor.color = colour.value;
  colour.addEventListener("input", () => { editor.color = colour.value; });
  $("#brush-size").addEventListener("input", (e) => {
    editor.brushSize = Number(e.target.value);
    $("#brush-size-value").textContent = e.target.value;
  });
  const actions = {
    "#mask-undo": () => editor.undo(), "#mask-redo": () => editor.redo(), "#mask-invert": () => editor.invert(),
    "#mask-clear": () => editor.clear(), "#zoom-in": () => editor.stepZoom(1), "#zoom-out": () => editor.stepZoom(-1),
    "#zoom-fit": () => editor.fit(),
  };
  for (const [id, action] of Object.entries(actions)) $(id).addEventListener("click", action);

  // Ctrl+Z / Ctrl+Y (or Ctrl+Shift+Z) undo and redo strokes, except while typing in a field.
  document.addEventListener("keydown", (e) => {
    const typing = e.target.matches?.("input[type=text], input[type=number], textarea, select");
    if (!active() || typing || !(e.ctrlKey || e.metaKey)) return;
    const key = e.key.toLowerCase();
    if (key === "z" && !e.shiftKey) editor.undo();
    else if (key === "y" || (key === "z" && e.shiftKey)) editor.redo();
    else return;
    e.preventDefault();
  });
  window.addEventListener("resize", () => { if (active() && editor.fitted) editor.fit(); });
  return { editor, setImageFile };
}
