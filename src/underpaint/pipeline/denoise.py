"""The denoiser for one request: UNet call ∘ eps/v scaling ∘ classifier-free guidance."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..models.ip_adapter import adapters_applied
from ..models.optimize import attention_for, begin_call, owned
from ..prompts.encoder import Conditioning
from ..sampling._common import LAST_UNCOND_NOISE
from ..sampling.denoisers import cfg_denoiser, eps_denoiser, lcm_denoiser, v_denoiser
from ..sampling.names import sampler_info
from ..sampling.schedules import ModelSchedule
from .conditioning import CondSchedule
from .guidance import UncondSkip, parts_alone, prompt_alone
from .inpaint import concat_channels


def unet_fn(model, control=None) -> Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]:
    """``model_fn(x_in, t, cond)``: the diffusers UNet in its dtype, answering in float32; ``control``
    (a :class:`~underpaint.pipeline.control.ControlStack`) adds its ControlNet residuals."""
    unet = model.unet
    dtype = model.dtype

    def call(x_in: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        extra = None
        if cond.time_ids is not None:  # SDXL: each row's pooled text and size ids (made with the text)
            extra = {"text_embeds": cond.pooled.to(dtype), "time_ids": cond.time_ids.to(dtype)}
        down = mid = intra = None
        pictures = []
        if control is not None:
            is_prompt = control.prompt_rows(cond, x_in.shape[0], device=x_in.device)
            down, mid = control.residuals(x_in.to(dtype), t.to(x_in.device), cond.cross_attn.to(dtype), extra, is_prompt)
            intra = control.intrablock(x_in.shape[0], is_prompt)  # T2I-Adapter features
            pictures = control.image_prompts(x_in.shape[0], is_prompt)  # IP-Adapter tokens
        begin_call(model)
        with attention_for(model), adapters_applied(unet, pictures):
            out = unet(
                x_in.to(dtype),
                t.to(x_in.device),
                encoder_hidden_states=cond.cross_attn.to(dtype),
                added_cond_kwargs=extra,
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
                down_intrablock_additional_residuals=intra,
                return_dict=False,
            )[0]
        return owned(out, model)

    return call


def make_denoiser(model, conds: CondSchedule, cfg_scale: float, schedule: ModelSchedule, sampler: str, *,
                  image_conditioning: torch.Tensor | None = None, control=None,
                  skip: UncondSkip | None = None, image_cfg_scale: float | None = None) -> Callable:
    """``denoiser(x, sigma) -> denoised`` with guidance against the step's negative prompt.

    ``image_conditioning`` is appended to the UNet's input channels after the input scaling
    (a 9-channel inpainting checkpoint's mask and masked-picture latents, an InstructPix2Pix
    model's picture latent); ``control`` adds ControlNet residuals (pipeline/control.py); ``skip``
    says which evaluations run the prompt alone (pipeline/guidance.py). ``image_cfg_scale`` (edit
    models) guides against the picture too, as A1111 and diffusers do (:func:`edit_cfg`), unless 1.
    """
    flags = sampler_info(sampler).flags
    if "lcm" in flags:
        wrap = lcm_denoiser
    else:
        wrap = v_denoiser if model.spec.prediction == "v" else eps_denoiser
    plain_fn = unet_fn(model, control)
    model_fn = plain_fn
    if image_conditioning is not None:
        model_fn = concat_channels(plain_fn, image_conditioning)
    base = wrap(model_fn, schedule)
    edit = image_cfg_scale is not None and image_cfg_scale != 1.0 and image_conditioning is not None
    if edit:
        rows = torch.cat([image_conditioning, image_conditioning, torch.zeros_like(image_conditioning)])
        three = wrap(concat_channels(plain_fn, rows), schedule)  # [cond, uncond] on the picture, uncond on none
        without = wrap(concat_channels(plain_fn, torch.zeros_like(image_conditioning)), schedule)
    cfgpp = "cfgpp" in flags
    if cfgpp:  # CFG++: the sampler steps along the uncond noise; A1111's DDIM CFG++ divides the scale by 12.5
        if "cfgpp_scaled" in flags:
            cfg_scale = cfg_scale / CFGPP_SCALE_DIVISOR
        last: list[torch.Tensor] = []
        base = _keeping_last(base, last)
        if edit:
            three, without = _keeping_last(three, last), _keeping_last(without, last)

    def guide(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        cond, uncond = conds.current()
        if conds.parts:  # composable diffusion: every AND part, stacked
            cond, weights = stack_parts(conds.current_parts())
        if control is not None:
            control.set_conds(cond, uncond)
        # A1111 advances prompt editing once per model evaluation, not per sampler step.
        evaluation = conds.step
        conds.step += 1
        if skip is not None and skip.skips(evaluation, sigma):
            return parts_alone(base, cond, weights, x, sigma) if conds.parts else prompt_alone(base, cond, x, sigma)
        if conds.parts:
            return composable_cfg(base, cond, weights, uncond, cfg_scale, joint=control is None)(x, sigma)
        if edit:
            return edit_cfg(three, base, without, cond, uncond, cfg_scale, image_cfg_scale,
                            joint=control is None)(x, sigma)
        return cfg_denoiser(base, cond, uncond, cfg_scale)(x, sigma)

    if not cfgpp:
        return guide

    def recording(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The guided prediction; ε_∅ of the evaluation left for the sampler. Every guidance runs the
        negative prompt last (or alone), so the last model call's last rows are it; an evaluation that
        ran the prompt alone leaves the prompt's own, as A1111's does."""
        last.clear()
        out = guide(x, sigma)
        uncond = last[-1][-x.shape[0]:]
        LAST_UNCOND_NOISE.value = (x - uncond) / sigma.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
        return out

    return recording


#: A1111's DDIM CFG++ divides the CFG scale by this (CFG 7 guides with 0.56): the paper's λ in [0, 1].
CFGPP_SCALE_DIVISOR = 12.5


def _keeping_last(fn: Callable, last: list) -> Callable:
    """``fn(x, sigma, cond)`` that also appends each output to ``last``."""
    def call(x, sigma, cond):
        out = fn(x, sigma, cond)
        last.append(out)
        return out

    return call


def edit_cfg(three: Callable, on_picture: Callable, without: Callable, cond: Conditioning, uncond: Conditioning,
             scale: float, image_scale: float, *, joint: bool = True) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """InstructPix2Pix's guidance (Brooks et al. 2023), as A1111 and diffusers combine it: the prompt
    and the negative prompt on the picture, and the negative prompt without it (zeros), then
    uncond + scale·(cond − on picture) + image_scale·(on picture − uncond). ``three`` runs the three
    rows as one batch (when the prompts' lengths match and ``joint``), ``on_picture`` and ``without``
    one at a time (ControlNet units then see each call's own conditioning)."""

    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if joint and cond.tokens == uncond.tokens:
            out = three(torch.cat([x, x, x]), torch.cat([sigma, sigma, sigma]), Conditioning.cat([cond, uncond, uncond]))
            on_cond, on_image, on_uncond = out[:b], out[b:2 * b], out[2 * b:]
        else:
            on_cond, on_image = on_picture(x, sigma, cond), on_picture(x, sigma, uncond)
            on_uncond = without(x, sigma, uncond)
        return on_uncond + scale * (on_cond - on_image) + image_scale * (on_image - on_uncond)

    return guided


def stack_parts(parts: Sequence[tuple[Conditioning, float]]) -> tuple[Conditioning, tuple[float, ...]]:
    """The ``AND`` parts as one conditioning, part-major (all images of part 1, then part 2, ...);
    shorter parts repeat their last token vector up to the longest, as A1111 pads them."""
    return Conditioning.cat_padded([cond for cond, _ in parts]), tuple(weight for _, weight in parts)


def composable_cfg(denoiser: Callable, parts: Conditioning, weights: Sequence[float], uncond: Conditioning,
                   scale: float, *, joint: bool = True) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Composable diffusion (Liu et al. 2022) as A1111 guides it: uncond + Σ wᵢ·scale·(condᵢ − uncond).

    ``parts`` stacks the parts' rows (:func:`stack_parts`). Like A1111, the parts and the
    negative prompt go through the model as one batch when their token lengths match, else
    as two calls (``joint=False`` always makes two), and the terms are added in part order.
    """

    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        n, b = len(weights), x.shape[0]
        xs, sigmas = x.repeat(n, *[1] * (x.ndim - 1)), sigma.repeat(n)
        if joint and parts.tokens == uncond.tokens:
            out = denoiser(torch.cat([xs, x]), torch.cat([sigmas, sigma]), Conditioning.cat([parts, uncond]))
            on_parts, on_uncond = out[: n * b], out[n * b :]
        else:
            on_parts, on_uncond = denoiser(xs, sigmas, parts), denoiser(x, sigma, uncond)
        result = on_uncond
        for i, weight in enumerate(weights):
            result = result + (on_parts[i * b : (i + 1) * b] - on_uncond) * (weight * scale)
        return result

    return guided
