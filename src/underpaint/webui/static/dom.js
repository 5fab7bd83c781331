// Small DOM helpers shared by the modules.

export const $ = (selector, root = document) => root.querySelector(selector);
export const $$ = (selector, root = document) => Array.from(root.querySelectorAll(selector));

/** Create an element: el("option", {value: "x"}, "label"). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key in node && typeof value !== "string") node[key] = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

/** Replace a <select>'s options, keeping the current choice when it is still offered. */
export function fillSelect(select, items, preferred) {
  const keep = select.value;
  select.replaceChildren(...items.map(({ value, label }) => el("option", { value }, label ?? value)));
  const values = items.map((i) => i.value);
  for (const candidate of [keep, preferred, values[0]]) {
    if (candidate !== undefined && values.includes(candidate)) {
      select.value = candidate;
      break;
    }
  }
}

/** The value of the checked radio button in a group. */
export function radioValue(root, name) {
  const checked = root.querySelector(`input[type="radio"][name="${name}"]:checked`);
  return checked ? checked.value : null;
}

export function setRadio(root, name, value) {
  const input = root.querySelector(`input[type="radio"][name="${name}"][value="${CSS.escape(String(value))}"]`);
  if (input) input.checked = true;
  return Boolean(input);
}

/** Keep a range slider and its number box (data-sync="<id>") showing the same value. */
export function syncSliders(root = document) {
  for (const box of $$("input[data-sync]", root)) {
    const slider = document.getElementById(box.dataset.sync);
    slider.addEventListener("input", () => { box.value = slider.value; });
    box.addEventListener("input", () => {
      if (box.value !== "") slider.value = box.value;
    });
  }
}

/**
 * Read a number control; the number box wins over its slider (it can go past the slider's range). A control
 * of whole steps (step 1, 8, 64, or none given) gives a whole number, as A1111's do (a typed 1.5 seed is 2).
 */
export function numberValue(control) {
  const input = document.querySelector(`input[data-sync="${control.id}"]`) ?? control;
  if (input.value === "") return null;
  const value = Number(input.value);
  const step = input.getAttribute("step") ?? "1";
  return step !== "any" && Number.isInteger(Number(step)) && Number(step) >= 1 ? Math.round(value) : value;
}

export function setNumber(control, value) {
  control.value = value;
  const box = document.querySelector(`input[data-sync="${control.id}"]`);
  if (box) box.value = value;
  control.dispatchEvent(new Event("input", { bubbles: true }));
}
