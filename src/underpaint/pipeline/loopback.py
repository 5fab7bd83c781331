"""A1111's img2img script "Loopback": img2img run again on its own result, ``loops`` times.

As A1111 1.10 runs it:

* each pass makes one picture (a batch size above 1 is taken as 1) from the last pass's picture;
  batch count runs the whole loop that many times, each from the request's picture and strength;
* seeds count on by one per pass, across batch counts too: pass ``i`` of batch ``n`` uses
  ``seed + n·loops + i``; the variation seed stays;
* the first pass runs at the request's denoising strength, pass ``i`` at
  ``strength + (final - strength)·c(i / (loops - 1))`` with ``c`` the curve: Linear ``x``,
  Aggressive ``sin(x·π/2)`` (most of the change early), Lazy ``1 - cos(x·π/2)`` (late), so the
  last pass runs at the final strength;
* inpainting fills the masked area from the picture ("original") on every pass after the first;
* with colour correction on (pipeline/color_correction.py), every pass is matched to the request's
  own picture, not to the last pass's, so the colours cannot drift;
* the result: with one batch, every pass's picture in order, with more, each batch's last one; and
  before them, when there are two or more, all of them side by side in one row (A1111's grid).
  Each picture carries the infotext of the pass that made it (A1111 gives every one the first
  pass's), with "Final denoising strength" and "Denoising curve"; the grid carries the first one's.

With "Append interrogated prompt at each iteration" set to CLIP or DeepBooru, each pass's prompt is the
request's prompt, ", ", and what Interrogate CLIP (models/interrogate.py) or DeepBooru
(models/deepbooru.py) reads in the picture the pass starts from (the reading alone when the request
has no prompt), as A1111 does.

An interrupt ends the loops (the pass it stopped is left out); a skip ends the current batch's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from .records import Progress, Result

if TYPE_CHECKING:
    from PIL.Image import Image

    from ..params import GenerationParams


def strength_at(loop: int, loops: int, initial: float, final: float, curve: str) -> float:
    """The denoising strength of pass ``loop`` (0-based) of ``loops``."""
    if loops == 1:
        return initial
    x = loop / (loops - 1)
    shape = {"Aggressive": math.sin(x * math.pi / 2), "Lazy": 1 - math.cos(x * math.pi / 2)}.get(curve, x)
    return initial + (final - initial) * shape


def run(params: "GenerationParams", img2img: Callable[["GenerationParams", Callable], Result], *, info,
        progress: Callable[[Progress], None] | None = None, cancel=None) -> Result:
    """The Loopback request ``params`` (seeds fixed): ``img2img(pass_params, progress)`` runs one pass."""
    from .xyz_plot import draw_grid

    opts = params.loopback
    assert opts is not None and params.seed >= 0
    extra = (*params.extra_infotext, ("Final denoising strength", opts.final_strength),
             ("Denoising curve", opts.curve))
    kept: list[tuple[Image, str, int]] = []
    seed = params.seed
    jobs = opts.loops * params.n_iter
    for n in range(params.n_iter):
        picture, inpaint, last, stopped = params.init_images[:1], params.inpaint, None, False
        for i in range(opts.loops):
            if cancel is not None and cancel.interrupted:
                break
            prompt = params.prompt
            if opts.interrogate != "None":
                prompt = (f"{params.prompt}, " if params.prompt else "") + opts.interrogator(picture[0])
            pass_params = params.replace(
                prompt=prompt, init_images=picture, inpaint=inpaint, seed=seed, batch_size=1, n_iter=1, loopback=None,
                color_reference=params.color_reference or params.init_images[0],
                strength=strength_at(i, opts.loops, params.strength, opts.final_strength, opts.curve),
                extra_infotext=extra)
            result = img2img(pass_params, Progress.relay(progress, n * opts.loops + i, jobs))
            seed += 1
            if result.unfinished or result.interrupted:  # stopped before its last step: not a picture to go on from
                stopped = True
                break
            last = (result.images[0], result.infotexts[0], result.seeds[0], prompt)
            picture = (last[0],)
            inpaint = replace(inpaint, masked_content="original")
            if params.n_iter == 1:
                kept.append(last)
        if params.n_iter > 1 and last is not None and not stopped:
            kept.append(last)
        if cancel is not None and cancel.interrupted:
            break
    images = [image for image, _, _, _ in kept]
    infotexts = [text for _, text, _, _ in kept]
    seeds = [s for _, _, s, _ in kept]
    prompts = [p for _, _, _, p in kept]
    if len(kept) > 1:
        images.insert(0, draw_grid(images, len(images), [], [], legend=False))
        infotexts.insert(0, infotexts[0])
        seeds.insert(0, seeds[0])
        prompts.insert(0, prompts[0])
    count = len(images)
    return Result(tuple(images), tuple(infotexts), tuple(seeds), (params.subseed,) * count, params,
                  info, interrupted=bool(cancel and cancel.interrupted),
                  prompts=tuple(prompts), negative_prompts=(params.negative_prompt,) * count)
