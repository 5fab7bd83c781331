// Ctrl+↑ / Ctrl+↓ in a prompt box raise or lower the attention weight of the selected words,
// written in A1111's prompt syntax "(words:1.1)", as A1111's prompt boxes do. With nothing
// selected, the "(…:weight)" group around the caret is changed, else the word at the caret.

const STEP = 0.1;
/** Characters that end a word when the caret picks one. */
const WORD_END = /[\s,.;:!?()[\]{}<>|"]/;
const WEIGHTED = /^\(([\s\S]*):\s*(-?\d+(?:\.\d+)?)\s*\)$/;

/** The "(…:weight)" group around `caret` as [start, end) or null. */
function groupAround(text, caret) {
  const open = text.lastIndexOf("(", caret - 1);
  if (open < 0) return null;
  const close = text.indexOf(")", caret);
  if (close < 0 || text.slice(open + 1, caret).includes(")") || text.slice(caret, close).includes("(")) return null;
  return WEIGHTED.test(text.slice(open, close + 1)) ? [open, close + 1] : null;
}

/** The word at `caret` as [start, end), or null when the caret is between words. */
function wordAt(text, caret) {
  let start = caret;
  let end = caret;
  while (start > 0 && !WORD_END.test(text[start - 1])) start--;
  while (end < text.length && !WORD_END.test(text[end])) end++;
  return start < end ? [start, end] : null;
}

/** "1.2000000000000002" → "1.2"; two decimals at most. */
function formatWeight(weight) {
  return String(Math.round(weight * 100) / 100);
}

/**
 * The prompt `text` with the attention of [start, end) moved one step up (`direction` 1) or down (-1):
 * {text, start, end} with the words selected, or null when there is nothing to weigh.
 */
export function adjustAttention(text, start, end, direction) {
  if (start === end) {
    [start, end] = groupAround(text, start) ?? wordAt(text, start) ?? [start, end];
    if (start === end) return null;
  }
  while (start < end && /\s/.test(text[start])) start++;
  while (end > start && /\s/.test(text[end - 1])) end--;
  if (start === end) return null;

  let inner = text.slice(start, end);
  let weight = 1;
  const selectedGroup = WEIGHTED.exec(inner);
  const around = text[start - 1] === "(" ? /^:\s*(-?\d+(?:\.\d+)?)\s*\)/.exec(text.slice(end)) : null;
  if (selectedGroup) {  // the whole "(words:1.1)" was selected
    [, inner, weight] = selectedGroup;
  } else if (around) {  // the words inside "(words:1.1)" were selected
    start -= 1;
    end += around[0].length;
    weight = around[1];
  }
  const next = Number(formatWeight(Number(weight) + direction * STEP));
  const replacement = next === 1 ? inner : `(${inner}:${formatWeight(next)})`;
  const innerStart = start + (next === 1 ? 0 : 1);
  return {
    text: text.slice(0, start) + replacement + text.slice(end),
    start: innerStart,
    end: innerStart + inner.length,
  };
}

/** Ctrl+↑ / Ctrl+↓ (⌘ on a Mac) in each of `boxes` change the attention of the selection. */
export function setupAttentionKeys(boxes) {
  for (const box of boxes) {
    box.addEventListener("keydown", (e) => {
      if (!(e.ctrlKey || e.metaKey) || (e.key !== "ArrowUp" && e.key !== "ArrowDown")) return;
      const changed = adjustAttention(box.value, box.selectionStart, box.selectionEnd, e.key === "ArrowUp" ? 1 : -1);
      if (!changed) return;
      e.preventDefault();
      box.value = changed.text;
      box.setSelectionRange(changed.start, changed.end);
      box.dispatchEvent(new Event("input", { bubbles: true }));
    });
  }
}
