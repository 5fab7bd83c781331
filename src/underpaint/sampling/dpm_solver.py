"""DPM-Solver (Lu et al., 2022): "DPM fast" (fixed steps) and "DPM adaptive" (error-controlled steps).

Both integrate in t = −log σ with first- to third-order ε steps, following k-diffusion's
``DPMSolver``. They take a sigma range rather than a sigma list; A1111 passes eta (default 1)
so they add ancestral noise after each step.
"""

from __future__ import annotations

import math

import torch

from ._common import Callback, NoiseSampler, ancestral_step, batch_sigma, require_noise, sigma_of, stopped, time_of


class _Eps:
    """ε = (x − denoised)/σ at time t, with a count of model calls."""

    def __init__(self, denoiser):
        self.denoiser = denoiser
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return (x - self.denoiser(x, batch_sigma(sigma_of(t), x))) / sigma_of(t)


def _time(sigma, x: torch.Tensor) -> torch.Tensor:
    return time_of(torch.as_tensor(sigma, dtype=torch.float32).to(x.device))


def _step_1(x, t, t_next, eps):
    return x - sigma_of(t_next) * (t_next - t).expm1() * eps


def _step_2(eps_at, x, t, t_next, eps, r1=0.5):
    """Second-order step; also returns ε at the intermediate point for reuse."""
    h = t_next - t
    s1 = t + r1 * h
    eps_r1 = eps_at(x - sigma_of(s1) * (r1 * h).expm1() * eps, s1)
    x_2 = x - sigma_of(t_next) * h.expm1() * eps - sigma_of(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)
    return x_2, eps_r1


def _step_3(eps_at, x, t, t_next, eps, eps_r1=None, r1=1 / 3, r2=2 / 3):
    h = t_next - t
    s1, s2 = t + r1 * h, t + r2 * h
    if eps_r1 is None:
        eps_r1 = eps_at(x - sigma_of(s1) * (r1 * h).expm1() * eps, s1)
    u2 = (x - sigma_of(s2) * (r2 * h).expm1() * eps
          - sigma_of(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps))
    eps_r2 = eps_at(u2, s2)
    return x - sigma_of(t_next) * h.expm1() * eps - sigma_of(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)


def _noisy_target(t, t_next, t_end, eta, clamp):
    """The deterministic target time and the noise to add after it (ancestral split)."""
    if not eta:
        return t_next, 0.0
    sd, _ = ancestral_step(sigma_of(t), sigma_of(t_next), eta)
    target = clamp(t_end, time_of(sd))
    return target, (sigma_of(t_next) ** 2 - sigma_of(target) ** 2) ** 0.5


def sample_dpm_fast(denoiser, x, sigma_min, sigma_max, n, *, noise: NoiseSampler | None = None,
                    callback: Callback | None = None, eta=0.0, s_noise=1.0):
    """DPM-Solver-Fast: n model calls spread over third-order steps (then a 2nd/1st-order tail)."""
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("sigma_min and sigma_max must not be 0")
    eps_at = _Eps(denoiser)
    t_start, t_end = _time(sigma_max, x), _time(sigma_min, x)
    m = math.floor(n / 3) + 1
    ts = torch.linspace(t_start, t_end, m + 1, device=x.device)
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        target, sigma_up = _noisy_target(t, t_next, t_end, eta, torch.minimum)
        eps = eps_at(x, t)
        denoised = x - sigma_of(t) * eps
        if stopped(callback, i, len(orders), x, denoised):
            return denoised
        if order == 1:
            x = _step_1(x, t, target, eps)
        elif order == 2:
            x, _ = _step_2(eps_at, x, t, target, eps)
        else:
            x = _step_3(eps_at, x, t, target, eps)
        if eta:
            x = x + sigma_up * s_noise * require_noise(noise, "DPM fast")(sigma_of(t), sigma_of(t_next))
    return x


class _PIDController:
    """PID step-size control for the adaptive solver (Söderlind-style, as in k-diffusion)."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order, accept_safety, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs: list[float] = []

    def propose(self, error) -> bool:
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


def sample_dpm_adaptive(denoiser, x, sigma_min, sigma_max, *, noise: NoiseSampler | None = None,
                        callback: Callback | None = None, order=3, rtol=0.05, atol=0.0078, h_init=0.05,
                        pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81, eta=0.0, s_noise=1.0,
                        expected_steps: int = 0):
    """DPM-Solver-12 / 23 with embedded error estimates choosing the step size."""
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("sigma_min and sigma_max must not be 0")
    if order not in {2, 3}:
        raise ValueError("order should be 2 or 3")
    eps_at = _Eps(denoiser)
    s, t_end = _time(sigma_max, x), _time(sigma_min, x)
    atol_t, rtol_t = torch.tensor(atol), torch.tensor(rtol)
    pid = _PIDController(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    x_prev, step = x, 0
    while s < t_end - 1e-5:
        t = torch.minimum(t_end, s + pid.h)
        target, sigma_up = _noisy_target(s, t, t_end, eta, torch.minimum)
        eps = eps_at(x, s)
        denoised = x - sigma_of(s) * eps
        if stopped(callback, step, max(expected_steps, step + 1), x, denoised):
            return denoised
        if order == 2:
            x_low = _step_1(x, s, target, eps)
            x_high, _ = _step_2(eps_at, x, s, target, eps)
        else:
            x_low, eps_r1 = _step_2(eps_at, x, s, target, eps, r1=1 / 3)
            x_high = _step_3(eps_at, x, s, target, eps, eps_r1)
        delta = torch.maximum(atol_t, rtol_t * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        if pid.propose(error):
            x_prev, x = x_low, x_high
            if eta:
                x = x + sigma_up * s_noise * require_noise(noise, "DPM adaptive")(sigma_of(s), sigma_of(t))
            s = t
        step += 1
    return x
