"""Denoisers: ``denoised = denoiser(x, sigma, cond)`` and the small wrappers around it.

The samplers see a noisy latent in k-diffusion's variance-exploding form (x = x0 + σ·noise)
and want the model's estimate of x0. ``eps_denoiser`` / ``v_denoiser`` turn a UNet that
predicts ε or v at a DDPM timestep into that (k-diffusion's ``CompVisDenoiser`` /
``CompVisVDenoiser``, which A1111 uses); ``cfg_denoiser`` adds classifier-free guidance.
Inpaint blending and ControlNet wrap the same shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch

from .schedules import ModelSchedule, lcm_grid

#: ``model_fn(x_in, t, cond) -> output``: the network at (fractional) DDPM timesteps t [B].
ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
#: ``denoiser(x, sigma, cond) -> denoised``.
CondDenoiser = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
#: ``denoiser(x, sigma) -> denoised``: what the samplers call.
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

C = TypeVar("C")


@runtime_checkable
class Batchable(Protocol):
    """Conditioning that knows how to concatenate several of itself along the batch."""

    @classmethod
    def cat(cls: type[C], items: Sequence[C]) -> C: ...


def _expand(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v[(...,) + (None,) * (ndim - v.ndim)]


def _placed(schedule: ModelSchedule) -> Callable[[torch.device], ModelSchedule]:
    """``schedule`` on a device, copied there on first use only (a per-step copy would sync the GPU)."""
    copies: dict[torch.device, ModelSchedule] = {}

    def on(device: torch.device) -> ModelSchedule:
        if device not in copies:
            copies[device] = schedule.to(device)
        return copies[device]

    return on


def eps_denoiser(model_fn: ModelFn, schedule: ModelSchedule) -> CondDenoiser:
    """ε-prediction: input scaled by 1/sqrt(σ²+1), denoised = x − σ·ε (k-diffusion's CompVisDenoiser)."""
    on = _placed(schedule)

    def denoise(x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        c_out = _expand(-sigma, x.ndim)
        c_in = _expand(1 / (sigma**2 + 1.0) ** 0.5, x.ndim)
        eps = model_fn(x * c_in, on(sigma.device).sigma_to_t(sigma), cond)
        return x + eps * c_out

    return denoise


def v_denoiser(model_fn: ModelFn, schedule: ModelSchedule) -> CondDenoiser:
    """v-prediction (SD 2.x 768): c_skip = 1/(σ²+1), c_out = −σ/sqrt(σ²+1) (k-diffusion's CompVisVDenoiser)."""
    on = _placed(schedule)

    def denoise(x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        c_skip = _expand(1.0 / (sigma**2 + 1.0), x.ndim)
        c_out = _expand(-sigma * 1.0 / (sigma**2 + 1.0) ** 0.5, x.ndim)
        c_in = _expand(1 / (sigma**2 + 1.0) ** 0.5, x.ndim)
        return model_fn(x * c_in, on(sigma.device).sigma_to_t(sigma), cond) * c_out + x * c_skip

    return denoise


def lcm_denoiser(model_fn: ModelFn, schedule: ModelSchedule, original_steps: int = 50) -> CondDenoiser:
    """Latent consistency models (Luo et al., 2023) as A1111's LCM sampler runs them.

    The timestep snaps to the nearest of LCM's 50 training timesteps (19, 39, …, 999), the
    ε estimate is turned into x0 as usual, and the consistency boundary condition blends it
    with the input: c_skip = σ_d²/((10t)² + σ_d²), c_out = 10t/sqrt((10t)² + σ_d²), σ_d = 0.5.
    """
    on = _placed(lcm_grid(schedule, original_steps))
    skip = len(schedule.alphas_cumprod) // original_steps

    def denoise(x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        log_grid = on(sigma.device).log_sigmas
        t = (sigma.log() - log_grid[:, None]).abs().argmin(dim=0).view(sigma.shape) * skip + (skip - 1)
        c_in = _expand(1 / (sigma**2 + 1.0) ** 0.5, x.ndim)
        eps = model_fn(x * c_in, t, cond)
        denoised = x + eps * _expand(-sigma, x.ndim)
        scaled = _expand(t, x.ndim) * 10.0
        c_skip = 0.25 / (scaled**2 + 0.25)
        c_out = scaled / (scaled**2 + 0.25) ** 0.5
        return c_out * denoised + c_skip * x

    return denoise


def cat_conditioning(items: Sequence[Any]) -> Any:
    """Concatenate conditionings along the batch (dim 0).

    Tensors are concatenated; objects with a ``cat`` classmethod use it; dataclasses are
    joined field by field (tensor fields concatenated, ``None`` fields kept, other fields
    taken from the first item). Raises ``ValueError`` when tensors differ beyond dim 0.
    """
    first = items[0]
    if isinstance(first, torch.Tensor):
        if any(item.shape[1:] != first.shape[1:] for item in items):
            raise ValueError("conditioning tensors differ in shape beyond the batch dimension")
        return torch.cat(list(items))
    if isinstance(first, Batchable):
        return type(first).cat(list(items))
    if dataclasses.is_dataclass(first):
        joined = {}
        for f in dataclasses.fields(first):
            values = [getattr(item, f.name) for item in items]
            if isinstance(values[0], torch.Tensor):
                joined[f.name] = cat_conditioning(values)
            else:
                joined[f.name] = values[0]
        return dataclasses.replace(first, **joined)
    raise TypeError(f"cannot batch conditioning of type {type(first).__name__}")


def _batch_shapes_match(cond: Any, uncond: Any) -> bool:
    if isinstance(cond, torch.Tensor):
        return cond.shape[1:] == uncond.shape[1:]
    if dataclasses.is_dataclass(cond):
        for f in dataclasses.fields(cond):
            a, b = getattr(cond, f.name), getattr(uncond, f.name)
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape[1:] != b.shape[1:]:
                return False
    return True


def cfg_denoiser(denoiser: CondDenoiser, cond: Any, uncond: Any, scale: float, *, skip_uncond_at_one: bool = False) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans, 2022): uncond + (cond − uncond)·scale.

    Like A1111 1.10, cond and uncond go through the model as one batch [cond; uncond], or as
    two calls when their prompt lengths differ (A1111's default without "pad conds"), and the
    uncond pass runs even at scale 1 (A1111 does not skip it; the result then equals the
    cond-only one up to rounding). ``skip_uncond_at_one`` skips it, as ComfyUI does.
    """

    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if skip_uncond_at_one and scale == 1:
            return denoiser(x, sigma, cond)
        if _batch_shapes_match(cond, uncond):
            both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cat_conditioning([cond, uncond]))
            on_cond, on_uncond = both[: x.shape[0]], both[x.shape[0] :]
        else:
            on_cond, on_uncond = denoiser(x, sigma, cond), denoiser(x, sigma, uncond)
        return on_uncond + (on_cond - on_uncond) * scale

    return guided
