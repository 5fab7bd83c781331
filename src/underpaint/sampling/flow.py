"""Rectified-flow models (FLUX.1) in the same sampler framework as the diffusion models.

A flow model is trained on the straight path ``x_σ = (1 − σ)·x0 + σ·noise`` for σ ∈ [0, 1]
and predicts the velocity ``v = noise − x0``. The samplers see σ and x on that path, as
Forge and ComfyUI run FLUX, and ask the denoiser for x0 = x − σ·v: Euler's derivative
(x − x0)/σ is then v itself, so Euler and Heun integrate the flow ODE exactly as the
reference code does. Multistep samplers (DPM++ 2M, LMS) run on the same σ list as those
programs run them.

The schedule is the reference one: t uniform from 1 to 0, moved toward 1 by the
resolution-dependent shift μ (FLUX.1-dev; schnell is trained unshifted):
σ = e^μ / (e^μ + 1/t − 1), μ linear in the number of 2×2 latent patches from 0.5 at 256
patches to 1.15 at 4096 (a 1024² picture).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..errors import InvalidParameter
from .names import sampler_info

#: Samplers that run on the flow path as Forge and ComfyUI run them (deterministic ones: the
#: ancestral and SDE samplers add noise in the variance-exploding form, which this path is not).
FLOW_SAMPLERS = ("Euler", "Heun", "LMS", "DPM2", "DPM++ 2M")
#: Schedules for flow models: the reference shifted schedule (and the names that mean it
#: here), and the shapes that only need a σ range, applied between σ_min and 1.
FLOW_SCHEDULES = ("Automatic", "Simple", "Normal", "Uniform", "SGM Uniform", "Karras", "Exponential", "Beta",
                  "KL Optimal", "Polyexponential")

BASE_SEQ_LEN, MAX_SEQ_LEN = 256, 4096
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15


def shift_mu(image_seq_len: int, base_seq_len: int = BASE_SEQ_LEN, max_seq_len: int = MAX_SEQ_LEN,
             base_shift: float = BASE_SHIFT, max_shift: float = MAX_SHIFT) -> float:
    """FLUX.1-dev's μ for a picture of ``image_seq_len`` 2×2 latent patches (linear, not clamped)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def image_seq_len(width: int, height: int) -> int:
    """Number of 2×2 patches of the 8× downsampled latent of a ``width``×``height`` picture."""
    return (height // 16) * (width // 16)


def time_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    """σ = e^μ / (e^μ + (1/t − 1)); t = 0 stays 0 and t = 1 stays 1."""
    t = t.to(torch.float64)
    out = torch.zeros_like(t)
    pos = t > 0
    out[pos] = math.exp(mu) / (math.exp(mu) + (1.0 / t[pos] - 1.0))
    return out


def flow_sigmas(steps: int, *, mu: float | None, schedule: str = "Automatic", sampler: str = "Euler",
                rho: float | None = None, beta_shape: tuple[float, float] = (0.6, 0.6)) -> torch.Tensor:
    """``steps + 1`` σ from (near) 1 down to 0 for a flow model; ``mu=None`` is unshifted (schnell).

    "Automatic", "Simple", "Normal", "Uniform" and "SGM Uniform" all mean the reference
    schedule here (t uniform, then shifted), which is what Forge's "Simple" gives FLUX. The
    range-based shapes (Karras, Exponential, Beta, ...) run between the shifted σ of t = 1/1000
    and 1. DPM2 builds one σ more and drops the next-to-last, as for the other models.
    """
    if steps < 1:
        raise InvalidParameter("steps", steps, "at least 1")
    info = sampler_info(sampler)
    if info.label not in FLOW_SAMPLERS:
        raise InvalidParameter("sampler", sampler, "for a flow model (FLUX) one of " + ", ".join(FLOW_SAMPLERS))
    from .names import schedule_info

    label = schedule_info(schedule).label
    if label not in FLOW_SCHEDULES:
        raise InvalidParameter("scheduler", schedule, "for a flow model (FLUX) one of " + ", ".join(FLOW_SCHEDULES))
    discard = "discard_penultimate" in info.flags
    n = steps + 1 if discard else steps
    shift = (lambda t: time_shift(mu, t)) if mu is not None else (lambda t: t.to(torch.float64))
    if label in ("Automatic", "Simple", "Normal", "Uniform", "SGM Uniform"):
        sigmas = shift(torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64))
    else:
        from . import schedules

        sigma_min = float(shift(torch.tensor([1e-3], dtype=torch.float64))[0])
        table: dict[str, Callable[[], torch.Tensor]] = {
            "Karras": lambda: schedules.sigmas_karras(n, sigma_min, 1.0, rho or 7.0),
            "Exponential": lambda: schedules.sigmas_exponential(n, sigma_min, 1.0),
            "Polyexponential": lambda: schedules.sigmas_polyexponential(n, sigma_min, 1.0, rho or 1.0),
            "KL Optimal": lambda: schedules.sigmas_kl_optimal(n, sigma_min, 1.0),
            "Beta": lambda: schedules.sigmas_beta(n, sigma_min, 1.0, *beta_shape),
        }
        sigmas = table[label]().to(torch.float64)
    sigmas = sigmas.to(torch.float32)
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas


def flow_start(noise: torch.Tensor, sigmas: torch.Tensor, init: torch.Tensor | None = None) -> torch.Tensor:
    """The latent sampling starts from: ``σ₀·noise + (1 − σ₀)·init``, or ``σ₀·noise`` without a picture."""
    sigma0 = sigmas[0].to(noise.dtype)
    if init is None:
        return noise * sigma0
    return noise * sigma0 + init * (1 - sigma0)


def flow_noised(init: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``init`` moved to σ on the flow path with ``noise`` (inpainting blends the kept area with this)."""
    s = sigma.reshape(-1, *([1] * (init.ndim - 1))).to(init.dtype) if sigma.ndim else sigma.to(init.dtype)
    return noise * s + init * (1 - s)


def velocity_denoiser(model_fn: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]):
    """``denoiser(x, σ, cond) = x − σ·v``: the x0 estimate of a velocity-predicting flow model.

    ``model_fn(x, σ, cond)`` returns v = noise − x0 at the flow time σ (FLUX takes σ itself
    as its timestep input).
    """

    def denoise(x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        v = model_fn(x, sigma, cond)
        return x - v * sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)

    return denoise


def check_flow_sampler(sampler: str) -> None:
    """A clear error for samplers that do not run on the flow path."""
    if sampler_info(sampler).label not in FLOW_SAMPLERS:
        raise InvalidParameter("sampler", sampler, "for a flow model (FLUX) one of " + ", ".join(FLOW_SAMPLERS))
