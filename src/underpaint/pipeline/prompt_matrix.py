"""A1111's script "Prompt matrix": one picture for every combination of a prompt's optional parts,
in a labelled grid.

The prompt (or the negative prompt) is cut at each "|": the first part is in every picture, and
each later part is in or out, so n parts after the first give 2**n prompts. Prompt i takes the
parts whose bit is set in i (part 1 is bit 0), each stripped of surrounding spaces and commas,
after the first part (before it with "put at start"), all joined by ", " or " ". The first part is
kept as written, so "a cat | red" gives "a cat , red" as in A1111.

Each prompt is one request with the request's settings (styles applied to the prompt it makes, as
A1111 styles each picture's prompt), the same seed for all unless "different seeds" (prompt i:
seed + i) and variation seed + i. The result is the grid, then every picture with its own infotext;
the grid's infotext is the first picture's. The grid has 2**(n // 2) rows; the first ceil(n / 2)
parts vary along a row, the others down a column, and each column's and row's label lists those
parts, the ones it leaves out grey and struck through.

Where underpaint differs: A1111 runs the prompts in batches of the batch size; here each is a
request of batch size 1 (every picture is the same, since each has its own seed's noise).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from .xyz_plot import Annotation, draw_grid

if TYPE_CHECKING:
    from ..params import GenerationParams, PromptMatrixOptions
    from .records import Progress, Result


def combinations(text: str, options: "PromptMatrixOptions") -> list[str]:
    """The 2**n prompts of ``text``'s n variable parts, in A1111's order."""
    from ..params import PROMPT_MATRIX_JOINERS

    first, *parts = text.split("|")
    joiner = PROMPT_MATRIX_JOINERS[options.joiner]
    prompts = []
    for number in range(2 ** len(parts)):
        chosen = [part.strip().strip(",") for bit, part in enumerate(parts) if number >> bit & 1]
        prompts.append(joiner.join(chosen + [first] if options.put_at_start else [first] + chosen))
    return prompts


def requests(params: "GenerationParams") -> list["GenerationParams"]:
    """Each combination's request (seeds fixed), in A1111's order."""
    options = params.prompt_matrix
    assert options is not None
    base = params.replace(prompt_matrix=None, batch_size=1, n_iter=1).with_seed()
    positive = options.prompt_type == "positive"
    out = []
    for i, text in enumerate(combinations(base.prompt if positive else base.negative_prompt, options)):
        prompt, negative = (text, base.negative_prompt) if positive else (base.prompt, text)
        if options.styles is not None:
            prompt, negative = options.styles(prompt, negative)
        if options.add_to_prompt is not None:
            prompt = options.add_to_prompt(prompt)
        out.append(base.replace(prompt=prompt, negative_prompt=negative,
                                seed=(base.seed + (i if options.different_seeds else 0)) % 2**64,
                                subseed=(base.subseed + i) % 2**64))
    return out


def labels(text: str) -> tuple[list[list[Annotation]], list[list[Annotation]]]:
    """The grid's column and row labels: every variable part of the first ceil(n / 2) on each
    column, of the rest on each row, the parts of that column or row active."""
    parts = text.split("|")[1:]
    across, down = parts[:math.ceil(len(parts) / 2)], parts[math.ceil(len(parts) / 2):]

    def label(group: list[str], position: int) -> list[Annotation]:
        return [Annotation(part, bool(position >> bit & 1)) for bit, part in enumerate(group)]

    return ([label(across, i) for i in range(2 ** len(across))], [label(down, i) for i in range(2 ** len(down))])


def run(generate: Callable[["GenerationParams", Callable], "Result"], params: "GenerationParams", *, info,
        progress: Callable[["Progress"], None] | None = None, cancel=None) -> "Result":
    """The Prompt matrix request ``params``: ``generate(request, report)`` runs one combination."""
    from PIL import Image

    from .records import Progress, Result

    options = params.prompt_matrix
    assert options is not None
    jobs = requests(params)
    results: list[Result] = []
    for i, job in enumerate(jobs):
        if cancel is not None and cancel.interrupted:
            break
        results.append(generate(job, Progress.relay(progress, i, len(jobs))))
    interrupted = bool(cancel is not None and cancel.interrupted)
    done = [r for r in results if r.images]
    if not done:
        return Result((), (), (), (), params, info, interrupted=interrupted)
    size = done[0].images[0].size
    pictures = [r.images[0] if r.images else Image.new("RGB", size) for r in results]
    pictures += [Image.new("RGB", size)] * (len(jobs) - len(pictures))  # an interrupted matrix: black cells
    text = params.prompt if options.prompt_type == "positive" else params.negative_prompt
    columns, rows = labels(text)
    grid = draw_grid(pictures, len(columns), columns, rows, margin=options.margin_size)
    unfinished = [i for i, r in enumerate(results) if not r.images or 0 in r.unfinished]
    shown = [r if r.images else done[0] for r in results]
    texts = [shown[0]] + shown
    return Result(
        images=(grid, *pictures[:len(results)]), infotexts=tuple(r.infotexts[0] for r in texts),
        seeds=tuple(r.seeds[0] for r in texts), subseeds=tuple(r.subseeds[0] for r in texts), params=params,
        model=done[0].model, interrupted=interrupted,
        prompts=tuple(r.prompts[0] if r.prompts else r.params.prompt for r in texts),
        negative_prompts=tuple(r.negative_prompts[0] if r.negative_prompts else r.params.negative_prompt
                               for r in texts),
        unfinished=tuple(([0] if unfinished or len(results) < len(jobs) else []) + [i + 1 for i in unfinished]))
