"""The denoiser for one request: UNet call ∘ eps/v scaling ∘ classifier-free guidance."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..prompts.encoder import Conditioning
from ..sampling.denoisers import cfg_denoiser, eps_denoiser, lcm_denoiser, v_denoiser
from ..sampling.names import sampler_info
from ..sampling.schedules import ModelSchedule
from .conditioning import CondSchedule


def unet_fn(model, conds: CondSchedule) -> Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]:
    """``model_fn(x_in, t, cond)``: the diffusers UNet in its dtype, answering in float32."""
    unet = model.unet
    dtype = model.dtype

    def call(x_in: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        extra = None
        if conds.time_ids is not None:
            rows = x_in.shape[0] // conds.time_ids.shape[0]
            time_ids = conds.time_ids.repeat(rows, 1).to(x_in.device, dtype)
            extra = {"text_embeds": cond.pooled.to(dtype), "time_ids": time_ids}
        out = unet(
            x_in.to(dtype),
            t.to(x_in.device),
            encoder_hidden_states=cond.cross_attn.to(dtype),
            added_cond_kwargs=extra,
            return_dict=False,
        )[0]
        return out.float()

    return call


def make_denoiser(model, conds: CondSchedule, cfg_scale: float, schedule: ModelSchedule, sampler: str) -> Callable:
    """``denoiser(x, sigma) -> denoised`` with guidance against the step's negative prompt."""
    if "lcm" in sampler_info(sampler).flags:
        wrap = lcm_denoiser
    else:
        wrap = v_denoiser if model.spec.prediction == "v" else eps_denoiser
    base = wrap(unet_fn(model, conds), schedule)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        cond, uncond = conds.current()
        # A1111 advances prompt editing once per model evaluation, not per sampler step.
        conds.step += 1
        return cfg_denoiser(base, cond, uncond, cfg_scale)(x, sigma)

    return denoise
