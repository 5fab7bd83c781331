"""Pieces every sampler shares: the stop signal, the callback call, the ancestral split."""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from typing import Any

import torch

#: ``noise(sigma, sigma_next) -> Tensor like x``: fresh noise for one step.
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``callback(step_index, total, x, denoised)``; returning ``STOP`` ends sampling early.
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], Any]


class Signal(enum.Enum):
    STOP = "stop"


class _UncondNoise(threading.local):
    """The unconditional noise prediction ε_∅ of this thread's latest guided model evaluation, in σ space
    ((x − denoised_∅)/σ; the prompt's own where the evaluation ran the prompt alone). Recorded by denoisers
    built for samplers that guide with it (DDIM CFG++); None otherwise."""

    value: torch.Tensor | None = None


#: Where a CFG++ denoiser leaves ε_∅ for its sampler, read right after each call (wrappers between the
#: two never need to pass it on).
LAST_UNCOND_NOISE = _UncondNoise()


def uncond_noise(sampler: str) -> torch.Tensor:
    """ε_∅ the denoiser left for a CFG++ sampler (pipeline/denoise.py records it for these samplers)."""
    eps = LAST_UNCOND_NOISE.value
    if eps is None:
        raise RuntimeError(f"{sampler} needs a denoiser that records the unconditional noise prediction")
    return eps


#: Return this from a sampler callback to stop: the sampler then returns its latest ``denoised``.
STOP = Signal.STOP


def stopped(callback: Callback | None, step: int, total: int, x: torch.Tensor, denoised: torch.Tensor) -> bool:
    """Report one step; True when the callback asked to stop."""
    return callback is not None and callback(step, total, x, denoised) is STOP


def require_noise(noise: NoiseSampler | None, sampler: str) -> NoiseSampler:
    if noise is None:
        raise ValueError(f"{sampler} adds noise while sampling and needs a noise source (noise=...)")
    return noise


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0):
    """Split a step to sigma_to into a deterministic step down to sigma_down and fresh noise sigma_up.

    sigma_down² + sigma_up² = sigma_to²; eta 0 is a plain ODE step (k-diffusion's get_ancestral_step).
    """
    if not eta:
        return sigma_to, 0.0
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def host_copy(sigmas: torch.Tensor) -> torch.Tensor:
    """The sigmas in host memory, to branch on and to hand the noise sources: testing a GPU tensor in
    ``if`` (or reading it, as the Brownian trees do) makes the host wait for the GPU at every step,
    where one copy before the loop waits once."""
    return sigmas.detach().to("cpu")


def batch_sigma(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One sigma per image of the batch."""
    return sigma * x.new_ones([x.shape[0]])


def sigma_of(t: torch.Tensor) -> torch.Tensor:
    """σ from DPM-Solver's time t = −log σ."""
    return t.neg().exp()


def time_of(sigma: torch.Tensor) -> torch.Tensor:
    """DPM-Solver's time t = −log σ."""
    return sigma.log().neg()
