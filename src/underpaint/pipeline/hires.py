"""Hires. fix: txt2img's second pass over the first picture, upscaled, as AUTOMATIC1111 1.10 runs it.

The first pass is a plain txt2img at the request's size. Its latent is then upscaled in latent
space (``torch.nn.functional.interpolate`` with the mode and antialias of A1111's "Latent ..."
upscalers), or its decoded picture is upscaled (Pillow's "None", "Lanczos", "Nearest", or an
upscaling model such as ESRGAN: pipeline/upscale.py) and encoded again. When both hires width
and height are given the upscaled latent is cropped to them. The second pass is img2img on that latent: A1111 hands it ``steps`` explicitly, which
makes it run exactly that many steps whatever the strength (the ``img2img_fix_steps`` rule,
whatever that setting says), with new noise from the same seeds at the hires size.

Only the second pass's pictures are returned (A1111 saves the first ones only with its
"save images before highres fix" setting, and never returns them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image

from ..params import HIRES_LATENT_MODES, GenerationParams, HiresOptions
from ..sampling.names import infotext_schedule, sampler_info

if TYPE_CHECKING:
    from .upscale import OnePass


@dataclass(frozen=True)
class HiresSize:
    """Where the second pass runs: the upscale size, the latent crop, the final picture size."""

    upscale_width: int
    upscale_height: int
    crop_x: int  # latent columns cut off (half, rounded down, on the left)
    crop_y: int
    width: int  # the final pictures'
    height: int


def hires_size(hires: HiresOptions, width: int, height: int, *, multiple: int = 8) -> HiresSize:
    """The second pass's geometry for a first pass requested at ``width`` x ``height``.

    ``multiple`` is the size step of the model's latent patches (8; FLUX 16, where an odd
    latent row or column left after the crop is dropped at the end).
    """
    up_w, up_h, crop_x, crop_y = hires.target(width, height)
    out_w, out_h = hires.output_size(width, height, multiple=multiple)
    return HiresSize(up_w, up_h, crop_x, crop_y, out_w, out_h)


def upscale_latents(latents: torch.Tensor, upscaler: str, width: int, height: int) -> torch.Tensor:
    """A1111's latent upscale: interpolate to (height // 8, width // 8) with the upscaler's mode."""
    mode, antialias = HIRES_LATENT_MODES[upscaler]
    return F.interpolate(latents, size=(height // 8, width // 8), mode=mode, antialias=antialias)


def crop_latents(latents: torch.Tensor, size: HiresSize) -> torch.Tensor:
    """Cut the excess of a cover-then-crop hires resize, then any rows or columns beyond the final size."""
    h, w = latents.shape[-2:]
    top, left = size.crop_y // 2, size.crop_x // 2
    cropped = latents[..., top : h - (size.crop_y + 1) // 2, left : w - (size.crop_x + 1) // 2]
    return cropped[..., : size.height // 8, : size.width // 8]


def upscale_picture(image: Image.Image, width: int, height: int, upscaler: str,
                    one_pass: "OnePass | None" = None) -> Image.Image:
    """A1111's ``resize_image(0, image, width, height, upscaler_name)``.

    "None": one Lanczos resize. Any other upscaler, when enlarging by s = max(width/w, height/h):
    :func:`~underpaint.pipeline.upscale.upscale_by` by s (a built-in's resize, or an upscaling
    model's passes, then Lanczos to s·size rounded down to a multiple of 8), then Lanczos to the
    target, each step only if the size differs. ``one_pass``: the upscaler's pass (default: the
    built-in one of that name).
    """
    from ..imageio.resize import scale_to
    from .upscale import builtin_pass, enlarger

    if upscaler == "None":
        return scale_to(image, width, height)
    return scale_to(image, width, height, enlarger(one_pass or builtin_pass(upscaler)))


def second_pass_params(params: GenerationParams, size: HiresSize) -> GenerationParams:
    """The second pass as an img2img request: hires prompts, sampler, steps, strength and token
    merging ratio, exactly ``steps`` steps (fix_steps), at the final size. Its pictures come from
    the first pass."""
    h = params.hires
    assert h is not None
    return params.replace(
        prompt=h.prompt or params.prompt, negative_prompt=h.negative_prompt or params.negative_prompt,
        sampler=params.hires_sampler, scheduler=params.hires_scheduler, steps=h.steps or params.steps,
        strength=h.strength, fix_steps=True, width=size.width, height=size.height, hires=None,
        token_merging_ratio=params.hires_token_merging_ratio,
    )


def check_checkpoint(model, other, params: GenerationParams) -> None:
    """Refuse a Hires checkpoint underpaint cannot run with the request's model, naming the field."""
    from ..errors import InvalidParameter

    family, second = model.spec.family.value, other.spec.family.value
    name = params.hires.checkpoint
    if "flux" in (family, second):
        raise InvalidParameter("hires_checkpoint", name, "an SD 1.x/2.x or SDXL checkpoint with an SD or SDXL model")
    if not model.spec.family.shares_latents(other.spec.family):
        raise InvalidParameter("hires_checkpoint", name,
                               f"a checkpoint of the same latent space as the model ({family}; this one is {second})")
    if model.spec.is_inpaint != other.spec.is_inpaint:
        raise InvalidParameter("hires_checkpoint", name, "an inpainting checkpoint only with an inpainting model, "
                                                         "and a normal one with a normal one")
    if params.control_units:
        raise InvalidParameter("hires_checkpoint", name, "the same checkpoint with ControlNet units (another "
                                                         "checkpoint for the second pass is not available with them)")


def hires_infotext(params: GenerationParams) -> dict[str, object]:
    """A1111's hires keys, in the order its ``txt2img`` adds them (None values are left out).

    "Hires schedule type" is written when the second pass's schedule differs from the first's
    ("Automatic" for the model's own, where A1111 writes nothing and its reader would take the
    first pass's instead).
    """
    h = params.hires
    if h is None:
        return {}
    hires_sampler = params.hires_sampler
    schedule = None
    if "timestep" not in sampler_info(hires_sampler).flags:
        first = infotext_schedule(params.sampler, params.scheduler) or "Automatic"
        second = infotext_schedule(hires_sampler, params.hires_scheduler) or "Automatic"
        schedule = second if second != first else None
    resized = h.resize_x != 0 or h.resize_y != 0
    return {
        "Hires checkpoint": h.checkpoint_title if h.checkpoint is not None else None,
        "Hires sampler": hires_sampler if hires_sampler != params.sampler else None,
        "Hires prompt": h.prompt if h.prompt and h.prompt != params.prompt else None,
        "Hires negative prompt": (h.negative_prompt if h.negative_prompt and h.negative_prompt != params.negative_prompt
                                  else None),
        "Hires schedule type": schedule,
        "Hires upscale": None if resized else h.scale,
        "Hires resize": f"{h.resize_x}x{h.resize_y}" if resized else None,
        "Hires steps": h.steps or None,
        "Hires upscaler": h.upscaler,
    }
