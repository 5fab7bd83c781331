"""UniPC (Zhao et al., 2023) as A1111 1.10 runs it: multistep, data prediction, B(h) = h ("bh1"),
order 3 with lower orders at the start and the end, time-uniform steps.

A1111 drives it in DDPM's continuous time t ∈ [1/T, 1]: α_t comes from log ᾱ interpolated
linearly in t, the steps are evenly spaced in t from the start (t = 1 for txt2img) down to
1/T, and the result is the latent at that last time in DDPM scale, like DDIM's. The solver
arithmetic here runs in that DDPM scale too; only the model call goes through the σ-space
denoiser, at σ_t = sqrt(1 − α_t²) / α_t.
"""

from __future__ import annotations

import torch

from ._common import Callback, NoiseSampler, batch_sigma, host_copy, stopped
from ..models.device import to_device
from .schedules import ModelSchedule


class _VPTime:
    """α_t, σ_t and λ_t = log α_t − log σ_t of DDPM's discrete schedule in continuous time."""

    def __init__(self, alphas_cumprod: torch.Tensor, device):
        self.total = len(alphas_cumprod)
        self.knots = to_device(torch.linspace(0.0, 1.0, self.total + 1)[1:], device)
        self.log_alphas = to_device(0.5 * torch.log(alphas_cumprod), device)

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        # A one-element index tensor gathers on the device; a 0-dim one would be read back as a Python int.
        index = (torch.searchsorted(self.knots, t.reshape(1), right=True) - 1).clamp(0, self.total - 2)
        x0, x1 = self.knots[index][0], self.knots[index + 1][0]
        y0, y1 = self.log_alphas[index][0], self.log_alphas[index + 1][0]
        return y0 + (t - x0) * (y1 - y0) / (x1 - x0)

    def alpha(self, t):
        return torch.exp(self.log_alpha(t))

    def std(self, t):
        return torch.sqrt(1.0 - torch.exp(2.0 * self.log_alpha(t)))

    def lam(self, t):
        log_alpha = self.log_alpha(t)
        return log_alpha - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))


def _start_time(sigma0: torch.Tensor, schedule: ModelSchedule) -> torch.Tensor | float:
    """A1111 starts txt2img at t = 1 and img2img at (timestep + 1) / T of the first sigma."""
    total = len(schedule.alphas_cumprod)
    timestep = int(round(schedule.sigma_to_t(sigma0.reshape(1).cpu().float()).item()))
    if timestep >= total - 1:
        return 1.0
    return torch.tensor(timestep) / total + 1 / total


def _bh_coefficients(rks: torch.Tensor, hh: torch.Tensor, order: int):
    """The B(h) = h system of UniPC: R[i] = r^i, b[i] = i!·φ_(i+1)(h)·h / B(h)."""
    h_phi_k = torch.expm1(hh) / hh - 1
    factorial = 1
    rows, rhs = [], []
    for i in range(1, order + 1):
        rows.append(torch.pow(rks, i - 1))
        rhs.append(h_phi_k * factorial / hh)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return torch.stack(rows), torch.stack(rhs)


def _solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.solve`` without its check for a singular system, which reads the solver's status
    back to the host (the Vandermonde-like systems here are never singular: distinct nodes)."""
    return torch.linalg.solve_ex(a, b)[0]


def _weighted(weights: torch.Tensor, diffs: torch.Tensor) -> torch.Tensor:
    return torch.tensordot(weights, diffs, dims=([0], [1]))


def _update(model, vp, x, history, t, order, use_corrector):
    """One UniPC step to time t (predictor, then corrector unless it is the last step)."""
    times, outputs = history
    t_prev, m_prev = times[-1], outputs[-1]
    lam_prev, lam_t = vp.lam(t_prev), vp.lam(t)
    alpha_t = vp.alpha(t)
    h = lam_t - lam_prev
    rks, diffs = [], []
    for i in range(1, order):
        rk = (vp.lam(times[-(i + 1)]) - lam_prev) / h
        rks.append(rk)
        diffs.append((outputs[-(i + 1)] - m_prev) / rk)
    # Stacked where they are: torch.tensor() of GPU numbers would read each back to the host.
    rks = torch.stack([*rks, torch.ones((), device=x.device)]).float()
    hh = -h
    R, b = _bh_coefficients(rks, hh, order)
    stacked = torch.stack(diffs, dim=1) if diffs else None
    base = (vp.std(t) / vp.std(t_prev)) * x - (alpha_t * torch.expm1(hh)) * m_prev
    predicted = base
    if stacked is not None:
        rhos_p = torch.tensor([0.5], device=x.device) if order == 2 else _solve(R[:-1, :-1], b[:-1])
        predicted = base - (alpha_t * hh) * _weighted(rhos_p, stacked)
    if not use_corrector:
        return predicted, None
    model_t = model(predicted, t)
    rhos_c = torch.tensor([0.5], device=x.device) if order == 1 else _solve(R, b)
    correction = _weighted(rhos_c[:-1], stacked) if stacked is not None else 0
    corrected = base - (alpha_t * hh) * (correction + rhos_c[-1] * (model_t - m_prev))
    return corrected, model_t


def sample_unipc(denoiser, x, sigmas, *, model_schedule: ModelSchedule, noise: NoiseSampler | None = None,
                 callback: Callback | None = None, order: int = 3, lower_order_final: bool = True):
    """UniPC-bh1 multistep over len(sigmas) - 1 steps, from the time of sigmas[0] to t = 1/T.

    ``x`` is in σ space at sigmas[0] (see ``samplers.prepare_start``); the result is in
    DDPM scale, as A1111 returns it.
    """
    steps = len(sigmas) - 1
    if steps < 1:
        return x / (1 + sigmas[0] ** 2) ** 0.5
    vp = _VPTime(model_schedule.alphas_cumprod, x.device)
    total = len(model_schedule.alphas_cumprod)
    ts = to_device(torch.linspace(_start_time(host_copy(sigmas)[0], model_schedule), 1.0 / total, steps + 1), x.device)
    order = min(order, steps)
    x = x / (1 + sigmas[0] ** 2) ** 0.5

    def model(x_ddpm, t):
        alpha = vp.alpha(t)
        return denoiser(x_ddpm / alpha, batch_sigma(vp.std(t) / alpha, x_ddpm))

    times, outputs = [ts[0]], [model(x, ts[0])]
    for step in range(1, steps + 1):
        if step < order:
            step_order = step
        else:
            step_order = min(order, steps + 1 - step) if lower_order_final else order
        x, model_x = _update(model, vp, x, (times, outputs), ts[step], step_order, step < steps)
        if stopped(callback, step - 1, steps, x, outputs[-1] if model_x is None else model_x):
            return outputs[-1] if model_x is None else model_x
        times, outputs = [*times, ts[step]][-order:], [*outputs, model_x][-order:]
    return x
