"""The Karras-style samplers: Euler, Heun, DPM2, LMS (+ ancestral variants), Restart and LCM.

Each is ``sample_x(denoiser, x, sigmas, *, noise, callback, **options) -> x`` over a sigma list
ending in 0, with ``denoiser(x, sigma_batch) -> denoised``. The arithmetic follows
k-diffusion's functions of the same name operation for operation, so results agree with
k-diffusion (and A1111, which runs them) to float32 rounding.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._common import (
    LAST_UNCOND_NOISE, Callback, NoiseSampler, ancestral_step, batch_sigma, host_copy, require_noise, stopped,
    uncond_noise,
)
from ..models.device import to_device
from .schedules import sigmas_karras


def _churn(x, sigmas, host, i, noise, s_churn, s_tmin, s_tmax, s_noise):
    """Karras et al. (2022) Algorithm 2, lines 4-6: raise the noise level to σ̂ = σ(1 + γ) first.

    A1111 draws the churn noise at every step once churn is on, so the draws stay aligned.
    ``host`` is the sigmas' host copy, which the test against [s_tmin, s_tmax] reads.
    """
    sigma = sigmas[i]
    if s_churn <= 0:
        return x, sigma
    eps = require_noise(noise, "s_churn")(host[i], host[i + 1]) * s_noise
    gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= host[i] <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + eps * (sigma_hat**2 - sigma**2) ** 0.5
    return x, sigma_hat


def sample_euler(denoiser, x, sigmas, *, noise: NoiseSampler | None = None, callback: Callback | None = None,
                 s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """Karras et al. (2022) Algorithm 2 with Euler steps."""
    total, host = len(sigmas) - 1, host_copy(sigmas)
    for i in range(total):
        x, sigma_hat = _churn(x, sigmas, host, i, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoiser(x, batch_sigma(sigma_hat, x))
        if stopped(callback, i, total, x, denoised):
            return denoised
        x = x + (x - denoised) / sigma_hat * (sigmas[i + 1] - sigma_hat)
    return x


def sample_euler_ancestral(denoiser, x, sigmas, *, noise: NoiseSampler | None = None,
                           callback: Callback | None = None, eta=1.0, s_noise=1.0):
    """Euler steps down to sigma_down, then fresh noise sigma_up back up to the next level."""
    total, host = len(sigmas) - 1, host_copy(sigmas)
    for i in range(total):
        denoised = denoiser(x, batch_sigma(sigmas[i], x))
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if stopped(callback, i, total, x, denoised):
            return denoised
        x = x + (x - denoised) / sigmas[i] * (sigma_down - sigmas[i])
        if host[i + 1] > 0:
            x = x + require_noise(noise, "Euler a")(host[i], host[i + 1]) * s_noise * sigma_up
    return x


def sample_euler_cfgpp(denoiser, x, sigmas, *, noise: NoiseSampler | None = None, callback: Callback | None = None):
    """ComfyUI's Euler CFG++ (``euler_cfg_pp``; Chung et al. 2024): x0 from the guided prediction, the step
    along the negative prompt's noise: x_next = denoised + σ_next·ε_∅ (the CFG scale as given)."""
    total = len(sigmas) - 1
    for i in range(total):
        LAST_UNCOND_NOISE.value = None
        denoised = denoiser(x, batch_sigma(sigmas[i], x))
        eps = uncond_noise("Euler CFG++")
        if stopped(callback, i, total, x, denoised):
            return denoised
        x = denoised + eps * sigmas[i + 1]
    return x


def sample_euler_ancestral_cfgpp(denoiser, x, sigmas, *, noise: NoiseSampler | None = None,
                                 callback: Callback | None = None, eta=1.0, s_noise=1.0):
    """ComfyUI's Euler a CFG++ (``euler_ancestral_cfg_pp``): as Euler CFG++ down to σ_down, then fresh noise
    σ_up back up to the next level."""
    total, host = len(sigmas) - 1, host_copy(sigmas)
    for i in range(total):
        LAST_UNCOND_NOISE.value = None
        denoised = denoiser(x, batch_sigma(sigmas[i], x))
        eps = uncond_noise("Euler a CFG++")
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if stopped(callback, i, total, x, denoised):
            return denoised
        x = denoised + eps * sigma_down
        if host[i + 1] > 0:
            x = x + require_noise(noise, "Euler a CFG++")(host[i], host[i + 1]) * s_noise * sigma_up
    return x


def sample_heun(denoiser, x, sigmas, *, noise: NoiseSampler | None = None, callback: Callback | None = None,
                s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """Karras et al. (2022) Algorithm 2: Heun's second-order steps (Euler for the last one)."""
    total, host = len(sigmas) - 1, host_copy(sigmas)
    for i in range(total):
        x, sigma_hat = _churn(x, sigmas, host, i, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoiser(x, batch_sigma(sigma_hat, x))
        d = (x - denoised) / sigma_hat
        if stopped(callback, i, total, x, denoised):
            return denoised
        dt = sigmas[i + 1] - sigma_hat
        if host[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - denoiser(x_2, batch_sigma(sigmas[i + 1], x))) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
    return x


def _dpm2_step(denoiser, x, d, sigma, sigma_to):
    """DPM-Solver-2's midpoint step from sigma to sigma_to, the midpoint taken in log σ."""
    sigma_mid = sigma.log().lerp(sigma_to.log(), 0.5).exp()
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = (x_2 - denoiser(x_2, batch_sigma(sigma_mid, x))) / sigma_mid
    return x + d_2 * (sigma_to - sigma)


def sample_dpm_2(denoiser, x, sigmas, *, noise: NoiseSampler | None = None, callback: Callback | None = None,
                 s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """k-diffusion's DPM2: DPM-Solver-2 midpoint steps inside Karras et al.'s Algorithm 2."""
    total, host = len(sigmas) - 1, host_copy(sigmas)
    for i in range(total):
        x, sigma_hat = _churn(x, sigmas, host, i, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoiser(x, batch_sigma(sigma_hat, x))
        d = (x - denoised) / sigma_hat
        if stopped(callback, i, total, x, denoised):
            return denoised
        if host[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            x = _dpm2_step(denoiser, x, d, sigma_hat, sigmas[i + 1])
    return x


def sample_dpm_2_ancestral(denoiser, x, sigmas, *, noise: NoiseSampler | None = None,
                           callback: Callback | None = None, eta=1.0, s_noise=1.0):
    """DPM2 steps down to sigma_down, then fresh noise sigma_up (ancestral)."""
    total, host = len(sigmas) - 1, host_copy(sigmas)
    for i in range(total):
        denoised = denoiser(x, batch_sigma(sigmas[i], x))
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if stopped(callback, i, total, x, denoised):
            return denoised
        d = (x - denoised) / sigmas[i]
        if ancestral_step(host[i], host[i + 1], eta)[0] == 0:  # the same split, decided on the host
            x = x + d * (sigma_down - sigmas[i])
        else:
            x = _dpm2_step(denoiser, x, d, sigmas[i], sigma_down)
            x = x + require_noise(noise, "DPM2 a")(host[i], host[i + 1]) * s_noise * sigma_up
    return x


def lms_coefficients(sigmas: np.ndarray, i: int, order: int) -> list[float]:
    """Weights of the last ``order`` derivatives: each Lagrange basis polynomial over the
    previous sigmas, integrated exactly from sigmas[i] to sigmas[i+1] (linear multistep)."""
    weights = []
    for j in range(order):
        others = [sigmas[i - k] for k in range(order) if k != j]
        basis = np.polynomial.Polynomial([1.0])
        if others:
            basis = np.polynomial.Polynomial.fromroots(others) / float(np.prod([sigmas[i - j] - s for s in others]))
        integral = basis.integ()
        weights.append(float(integral(sigmas[i + 1]) - integral(sigmas[i])))
    return weights


def sample_lms(denoiser, x, sigmas, *, noise: NoiseSampler | None = None, callback: Callback | None = None, order=4):
    """Linear multistep (Adams–Bashforth in σ) over the last ``order`` derivatives."""
    total = len(sigmas) - 1
    sigmas_np = sigmas.detach().cpu().numpy().astype(np.float64)
    ds = []
    for i in range(total):
        denoised = denoiser(x, batch_sigma(sigmas[i], x))
        ds = [*ds, (x - denoised) / sigmas[i]][-order:]
        if stopped(callback, i, total, x, denoised):
            return denoised
        weights = lms_coefficients(sigmas_np, i, min(i + 1, order))
        x = x + sum(w * d for w, d in zip(weights, reversed(ds)))
    return x


def sample_lcm(denoiser, x, sigmas, *, noise: NoiseSampler | None = None, callback: Callback | None = None):
    """Latent consistency sampling: jump to the estimate, then renoise to the next level."""
    total, host = len(sigmas) - 1, host_copy(sigmas)
    for i in range(total):
        denoised = denoiser(x, batch_sigma(sigmas[i], x))
        if stopped(callback, i, total, x, denoised):
            return denoised
        x = denoised
        if host[i + 1] > 0:
            x = x + sigmas[i + 1] * require_noise(noise, "LCM")(host[i], host[i + 1])
    return x


def _restart_plan(sigmas: torch.Tensor, restart_list):
    """A1111's Restart schedule: Karras steps plus restart segments that jump back up.

    With ≥ 20 steps and no explicit list it rebuilds a Karras schedule with fewer steps and
    restarts once (≥ 36 steps: twice, with steps//4 sub-steps) from σ≈0.1 back up to σ≈2.
    """
    steps = len(sigmas) - 1
    if restart_list is None:
        restart_list = {}
        if steps >= 20:
            restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
            sigmas = sigmas_karras(steps - restart_steps * restart_times, sigmas[-2].item(), sigmas[0].item())
            restart_list = {0.1: [restart_steps + 1, restart_times, 2]}
    by_index = {int(torch.argmin(abs(sigmas - key), dim=0)): value for key, value in restart_list.items()}
    plan = []
    for i in range(len(sigmas) - 1):
        plan.append((sigmas[i], sigmas[i + 1]))
        if i + 1 not in by_index:
            continue
        restart_steps, restart_times, restart_max = by_index[i + 1]
        max_idx = int(torch.argmin(abs(sigmas - restart_max), dim=0))
        if max_idx < i + 1:
            segment = sigmas_karras(restart_steps, sigmas[i + 1].item(), sigmas[max_idx].item())[:-1]
            plan.extend(list(zip(segment[:-1], segment[1:])) * restart_times)
    return plan


def sample_restart(denoiser, x, sigmas, *, noise: NoiseSampler | None = None, callback: Callback | None = None,
                   s_noise=1.0, restart_list=None):
    """Restart sampling (Xu et al., 2023) as A1111 1.10 runs it: Heun steps with restarts."""
    plan = _restart_plan(host_copy(sigmas), restart_list)
    total = len(plan)
    # The plan is made and tested on the host; its sigmas go to the device in one copy.
    placed = to_device(torch.stack([torch.stack([a, b]) for a, b in plan]), x.device) if plan else None
    last_sigma = last_host = None
    for step, (old_host, new_host) in enumerate(plan):
        old_sigma, new_sigma = placed[step, 0], placed[step, 1]
        if last_host is not None and last_host < old_host:
            bump = (old_sigma**2 - last_sigma**2) ** 0.5
            x = x + require_noise(noise, "Restart")(old_host, new_host) * s_noise * bump
        denoised = denoiser(x, batch_sigma(old_sigma, x))
        if stopped(callback, step, total, x, denoised):
            return denoised
        d = (x - denoised) / old_sigma
        dt = new_sigma - old_sigma
        if new_host == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - denoiser(x_2, batch_sigma(new_sigma, x))) / new_sigma
            x = x + (d + d_2) / 2 * dt
        last_sigma, last_host = new_sigma, new_host
    return x
