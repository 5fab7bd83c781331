// A1111's token counters at the prompt boxes ("12/75"): the server counts (POST /underpaint/v1/token-count,
// with the tokenizer and the embeddings the model uses) a moment after the typing stops.

import { post } from "./api.js";
import { $ } from "./dom.js";

const PAUSE_MS = 300;

/**
 * Count for the prompt and the negative prompt; `steps()` gives the steps a schedule is counted over.
 * Returns `refresh()`, for prompts set by script (typing and the steps' changes count by themselves).
 */
export function setupTokenCounters(steps) {
  const updates = [];
  for (const [id, negative] of [["prompt", false], ["negative_prompt", true]]) {
    const box = $(`#${id}`);
    const counter = $(`#${id}-tokens`);
    let timer = null;
    let asked = 0;
    const update = () => {
      clearTimeout(timer);
      timer = setTimeout(async () => {
        const mine = ++asked;
        try {
          const { tokens, limit } = await post("/underpaint/v1/token-count", { prompt: box.value, steps: steps(), negative });
          if (mine === asked) counter.textContent = `${tokens}/${limit}`;
        } catch {
          if (mine === asked) counter.textContent = "";  // a prompt past the server's limits: its error shows on Generate
        }
      }, PAUSE_MS);
    };
    box.addEventListener("input", update);
    updates.push(update);
  }
  const refresh = () => updates.forEach((update) => update());
  for (const control of [$("#steps"), $('input[data-sync="steps"]')]) control?.addEventListener("input", refresh);
  refresh();
  return refresh;
}
