"""DDIM, DDIM CFG++, PLMS and UniPC as A1111 1.10 runs them, written in σ space.

A1111 runs these on the DDPM timestep grid t_k = 1 + k·(T//n) with the model's ε output, and
stops at the first grid timestep (t = 1), returning that slightly noisy latent. Here the
latent is k-diffusion's x = x0 + σ·ε (σ_t = sqrt((1-ᾱ_t)/ᾱ_t)); a DDIM step between grid
timesteps is then the same update, and the list's final 0 stands for "stop and return the
latent in A1111's scale x / sqrt(1 + σ²)". ``samplers.prepare_start`` sets up A1111's start.
"""

from __future__ import annotations

import math

import torch

from ._common import (
    LAST_UNCOND_NOISE, Callback, NoiseSampler, batch_sigma, host_copy, require_noise, stopped, uncond_noise,
)


def _eps(denoiser, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return (x - denoiser(x, batch_sigma(sigma, x))) / sigma


def _finish(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Back to the DDPM scale sqrt(ᾱ)·x0 + sqrt(1-ᾱ)·ε that A1111 decodes."""
    return x / (1 + sigma**2) ** 0.5


def _ddim_update(x0, eps, sigma, sigma_next, eta, noise):
    """DDIM (Song et al., 2021, eq. 12) from σ to σ_next (host values); η > 0 adds fresh noise of std ν.

    In σ space: x_next = x0 + sqrt(σ_next² − ν²)·ε + ν·z with ν = σ_DDIM(η)·sqrt(1 + σ_next²).
    """
    s, s_next = float(sigma), float(sigma_next)
    if not eta:
        return x0 + s_next * eps
    a_t, a_prev = 1 / (1 + s * s), 1 / (1 + s_next * s_next)
    variance = eta**2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    nu = math.sqrt(variance * (1 + s_next * s_next))
    direction = math.sqrt(max(s_next * s_next - nu * nu, 0.0))
    return x0 + direction * eps + nu * require_noise(noise, "DDIM with eta")(sigma, sigma_next)


def sample_ddim(denoiser, x, sigmas, *, noise: NoiseSampler | None = None, callback: Callback | None = None, eta=0.0):
    """DDIM on A1111's timestep grid (sigmas from ``schedules.sigmas_timesteps``)."""
    return _ddim(denoiser, x, sigmas, noise, callback, eta, along_uncond=False)


def sample_ddim_cfgpp(denoiser, x, sigmas, *, noise: NoiseSampler | None = None, callback: Callback | None = None,
                      eta=0.0):
    """DDIM CFG++ (Chung et al., 2024, "CFG++: manifold-constrained classifier free guidance"), as A1111 1.10
    runs it: the guided prediction (its CFG scale ÷ 12.5, applied by the denoiser) gives x0, and the step
    renoises along the unconditional noise ε_∅ rather than the guided one. ``denoiser`` must record ε_∅
    (``LAST_UNCOND_NOISE``; pipeline/denoise.py does for this sampler)."""
    return _ddim(denoiser, x, sigmas, noise, callback, eta, along_uncond=True)


def _ddim(denoiser, x, sigmas, noise, callback, eta, *, along_uncond: bool):
    total, host = len(sigmas) - 1, host_copy(sigmas)
    denoised = x
    for i in range(total):
        if host[i + 1] == 0:
            if stopped(callback, i, total, x, denoised):
                return denoised
            return _finish(x, sigmas[i])
        LAST_UNCOND_NOISE.value = None
        denoised = denoiser(x, batch_sigma(sigmas[i], x))
        eps = uncond_noise("DDIM CFG++") if along_uncond else (x - denoised) / sigmas[i]
        if stopped(callback, i, total, x, denoised):
            return denoised
        x = _ddim_update(denoised, eps, host[i], host[i + 1], eta, noise)
    return x


def _plms_eps(eps, old):
    """Pseudo linear multistep (Liu et al., 2022): Adams–Bashforth over the last ε's."""
    if len(old) == 1:
        return (3 * eps - old[-1]) / 2
    if len(old) == 2:
        return (23 * eps - 16 * old[-1] + 5 * old[-2]) / 12
    return (55 * eps - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24


def sample_plms(denoiser, x, sigmas, *, noise: NoiseSampler | None = None, callback: Callback | None = None):
    """PLMS on A1111's timestep grid; the first step is a pseudo improved Euler (Heun) step."""
    total, host = len(sigmas) - 1, host_copy(sigmas)
    old: list[torch.Tensor] = []
    denoised = x
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if host[i + 1] == 0:
            if stopped(callback, i, total, x, denoised):
                return denoised
            return _finish(x, sigma)
        eps = _eps(denoiser, x, sigma)
        if old:
            eps_prime = _plms_eps(eps, old)
        else:
            x_next = (x - sigma * eps) + sigma_next * eps
            eps_prime = (eps + _eps(denoiser, x_next, sigma_next)) / 2
        denoised = x - sigma * eps_prime
        if stopped(callback, i, total, x, denoised):
            return denoised
        x = denoised + sigma_next * eps_prime
        old = [*old, eps][-3:]
    return x
