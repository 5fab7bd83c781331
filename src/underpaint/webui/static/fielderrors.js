// Show an API error next to the control for the field it names (A1111 field names).

/** Names the server may use for a field, mapped to the A1111 request name the form uses. */
const ALIASES = {
  strength: "denoising_strength",
  sampler: "sampler_name",
  sampler_index: "sampler_name",
  image: "init_images",
  images: "init_images",
  masked_content: "inpainting_fill",
  mask_blur_x: "mask_blur",
  mask_blur_y: "mask_blur",
  full_res: "inpaint_full_res",
  full_res_padding: "inpaint_full_res_padding",
  invert: "inpainting_mask_invert",
  model: "sd_model_checkpoint",
  checkpoint: "sd_model_checkpoint",
  size: "width",
  // SD upscale's own names, should an error about the script come from deeper in the engine
  sd_upscale: "script_name",
  sd_upscale_overlap: "script_args[1]",
  sd_upscale_upscaler: "script_args[2]",
  sd_upscale_scale: "script_args[3]",
  loopback: "script_name",
  loopback_loops: "script_args[0]",
  loopback_final_strength: "script_args[1]",
  loopback_curve: "script_args[2]",
  loopback_interrogate: "script_args[3]",
  // X/Y/Z plot's (the server's names for its script_args items)
  xyz_plot: "script_name",
  xyz_x_type: "script_args[0]",
  xyz_x_values: "script_args[1]",
  xyz_y_type: "script_args[3]",
  xyz_y_values: "script_args[4]",
  xyz_z_type: "script_args[6]",
  xyz_z_values: "script_args[7]",
  xyz_margin_size: "script_args[16]",
  // Prompt matrix's and Prompts from file's
  prompt_matrix: "script_name",
  prompt_matrix_prompt_type: "script_args[2]",
  prompt_matrix_joiner: "script_args[3]",
  prompt_matrix_margin_size: "script_args[4]",
  prompts_from_file: "script_name",
  prompts_position: "script_args[2]",
  prompts_text: "script_args[3]",
};

/** "alwayson_scripts.controlnet.args[0].weight" → itself, "…args[0]", "alwayson_scripts.controlnet", … */
export function candidateNames(field) {
  const names = [];
  let name = field;
  while (name) {
    names.push(name, ALIASES[name]);
    const cut = Math.max(name.lastIndexOf("."), name.lastIndexOf("["));
    name = cut > 0 ? name.slice(0, cut) : "";
  }
  return names.filter(Boolean);
}

const isShown = (node) => node.getClientRects().length > 0;
// Hidden only by a closed <details> (which showFieldErrors opens), not by another tab's section.
const isAvailable = (node) => !node.closest("[hidden]");

/**
 * The control (or group) that stands for `field`, or null: the visible one when several share the
 * name (txt2img's Hires. fix denoising strength and img2img's), else one in a closed section.
 */
export function controlFor(field, root = document) {
  if (!field) return null;
  for (const name of candidateNames(field)) {
    const matches = Array.from(root.querySelectorAll(`[data-field="${CSS.escape(name)}"]`));
    const found = matches.find(isShown) ?? matches.find(isAvailable) ?? matches[0];
    if (found) return found;
  }
  return null;
}

let counter = 0;

function mark(target, note) {
  const described = (target.getAttribute("aria-describedby") || "").split(" ").filter(Boolean);
  target.dataset.errorDescribedby = described.join(" ");
  target.setAttribute("aria-describedby", [...described, note.id].join(" "));
  target.setAttribute("aria-invalid", "true");
  target.classList.add("invalid");
}

function unmark(target) {
  target.removeAttribute("aria-invalid");
  target.classList.remove("invalid");
  if (target.dataset.errorDescribedby !== undefined) {
    const before = target.dataset.errorDescribedby;
    if (before) target.setAttribute("aria-describedby", before);
    else target.removeAttribute("aria-describedby");
    delete target.dataset.errorDescribedby;
  }
}

/** Open the closed <details> around `control`, so its message can be seen and the control focused. */
function reveal(control) {
  for (let node = control.closest("details:not([open])"); node; node = node.parentElement?.closest("details:not([open])")) {
    node.open = true;
  }
}

function attachMessage(control, message) {
  reveal(control);
  const holder = control.closest(".field") ?? control.parentElement;
  const note = document.createElement("p");
  note.className = "field-error";
  note.id = `field-error-${++counter}`;
  note.setAttribute("role", "alert");
  note.textContent = message;
  holder.append(note);
  // A slider's number box is where the value is typed: mark it too.
  const partner = control.id ? document.querySelector(`input[data-sync="${CSS.escape(control.id)}"]`) : null;
  const targets = [control, partner].filter(Boolean);
  targets.forEach((t) => mark(t, note));
  // Editing anything in the field (the slider, its number box, a radio) retracts the message.
  const forget = () => {
    note.remove();
    targets.forEach(unmark);
    holder.removeEventListener("input", forget);
    holder.removeEventListener("change", forget);
  };
  holder.addEventListener("input", forget);
  holder.addEventListener("change", forget);
  note.forget = forget;
}

export function clearFieldErrors(root = document) {
  for (const note of root.querySelectorAll(".field-error")) note.forget?.() ?? note.remove();
  for (const target of root.querySelectorAll('[aria-invalid="true"]')) unmark(target);
}

/**
 * Put each of the error's messages next to its field; what names no known field goes to
 * `generalBox`. `rename(field)` lets a caller translate indices (ControlNet units sent vs shown).
 * Returns the first control marked, so the caller can focus it.
 */
export function showFieldErrors(error, { root = document, generalBox = null, rename = (f) => f } = {}) {
  const general = [];
  let first = null;
  for (const { field, message } of error.errors ?? [{ field: error.field, message: error.message }]) {
    const control = controlFor(field ? rename(field) : null, root);
    if (control && isAvailable(control)) {  // a control hidden by the mode chosen (Width under "Resize by"): below
      // Beside the field its name is redundant: "steps: got 1000, ..." reads "got 1000, ...".
      const text = message || error.message;
      attachMessage(control, field && text.startsWith(`${field}: `) ? text.slice(field.length + 2) : text);
      first ??= control;
    } else {
      general.push(message || error.message);
    }
  }
  if (generalBox) {
    generalBox.textContent = general.join("\n");
    generalBox.hidden = general.length === 0;
  }
  return first;
}
