"""DPM-Solver++ samplers (Lu et al., 2022): 2S ancestral, SDE, 2M, 2M SDE and 3M SDE.

They work in t = −log σ and take data-prediction steps. The SDE variants draw their noise
from a Brownian tree (``noise.brownian_noise``), so the same seed gives the same picture
whatever the step count. Operation order follows k-diffusion's functions of the same names.
"""

from __future__ import annotations

from ._common import (
    Callback,
    NoiseSampler,
    ancestral_step,
    batch_sigma,
    host_copy,
    require_noise,
    sigma_of,
    stopped,
    time_of,
)


def sample_dpmpp_2s_ancestral(denoiser, x, sigmas, *, noise: NoiseSampler | None = None,
                              callback: Callback | None = None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2S): a single-step second-order update to sigma_down, then ancestral noise."""
    total, host = len(sigmas) - 1, host_copy(sigmas)
    for i in range(total):
        denoised = denoiser(x, batch_sigma(sigmas[i], x))
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if stopped(callback, i, total, x, denoised):
            return denoised
        if ancestral_step(host[i], host[i + 1], eta)[0] == 0:  # the same split, decided on the host
            x = x + (x - denoised) / sigmas[i] * (sigma_down - sigmas[i])
        else:
            t, t_next = time_of(sigmas[i]), time_of(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (sigma_of(s) / sigma_of(t)) * x - (-h * 0.5).expm1() * denoised
            denoised_2 = denoiser(x_2, batch_sigma(sigma_of(s), x))
            x = (sigma_of(t_next) / sigma_of(t)) * x - (-h).expm1() * denoised_2
        if host[i + 1] > 0:
            x = x + require_noise(noise, "DPM++ 2S a")(host[i], host[i + 1]) * s_noise * sigma_up
    return x


def sample_dpmpp_sde(denoiser, x, sigmas, *, noise: NoiseSampler | None = None, callback: Callback | None = None,
                     eta=1.0, s_noise=1.0, r=0.5):
    """DPM-Solver++ (stochastic): two half steps in t, each with its share of fresh noise.

    The noise is drawn at sigmas worked out on the host copy with the same operations, so that a
    Brownian tree reads no GPU tensor."""
    total, host = len(sigmas) - 1, host_copy(sigmas)
    for i in range(total):
        denoised = denoiser(x, batch_sigma(sigmas[i], x))
        if stopped(callback, i, total, x, denoised):
            return denoised
        if host[i + 1] == 0:
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
            continue
        draw = require_noise(noise, "DPM++ SDE")
        t, t_next = time_of(sigmas[i]), time_of(sigmas[i + 1])
        h = t_next - t
        s = t + h * r
        t_host, t_next_host = time_of(host[i]), time_of(host[i + 1])
        s_host = t_host + (t_next_host - t_host) * r
        fac = 1 / (2 * r)
        sd, su = ancestral_step(sigma_of(t), sigma_of(s), eta)
        s_ = time_of(sd)
        x_2 = (sigma_of(s_) / sigma_of(t)) * x - (t - s_).expm1() * denoised
        x_2 = x_2 + draw(sigma_of(t_host), sigma_of(s_host)) * s_noise * su
        denoised_2 = denoiser(x_2, batch_sigma(sigma_of(s), x))
        sd, su = ancestral_step(sigma_of(t), sigma_of(t_next), eta)
        t_next_ = time_of(sd)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (sigma_of(t_next_) / sigma_of(t)) * x - (t - t_next_).expm1() * denoised_d
        x = x + draw(sigma_of(t_host), sigma_of(t_next_host)) * s_noise * su
    return x


def sample_dpmpp_2m(denoiser, x, sigmas, *, noise: NoiseSampler | None = None, callback: Callback | None = None):
    """DPM-Solver++(2M): second order from the previous step's estimate (first and last step first order)."""
    total = len(sigmas) - 1
    last_step = (host_copy(sigmas)[1:] == 0).tolist()
    old_denoised = None
    for i in range(total):
        denoised = denoiser(x, batch_sigma(sigmas[i], x))
        if stopped(callback, i, total, x, denoised):
            return denoised
        t, t_next = time_of(sigmas[i]), time_of(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or last_step[i]:
            estimate = denoised
        else:
            r = (t - time_of(sigmas[i - 1])) / h
            estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigma_of(t_next) / sigma_of(t)) * x - (-h).expm1() * estimate
        old_denoised = denoised
    return x


def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, noise: NoiseSampler | None = None, callback: Callback | None = None,
                        eta=1.0, s_noise=1.0, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE; ``solver_type`` "heun" is A1111's "DPM++ 2M SDE Heun"."""
    if solver_type not in {"heun", "midpoint"}:
        raise ValueError("solver_type must be 'heun' or 'midpoint'")
    total, host = len(sigmas) - 1, host_copy(sigmas)
    old_denoised, h_last = None, None
    for i in range(total):
        denoised = denoiser(x, batch_sigma(sigmas[i], x))
        if stopped(callback, i, total, x, denoised):
            return denoised
        h = None
        if host[i + 1] == 0:
            x = denoised
        else:
            h = (-sigmas[i + 1].log()) - (-sigmas[i].log())
            eta_h = eta * h
            decay = (-h - eta_h).expm1().neg()
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + decay * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + (decay / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * decay * (1 / r) * (denoised - old_denoised)
            if eta:
                step_noise = require_noise(noise, "DPM++ 2M SDE")(host[i], host[i + 1])
                x = x + step_noise * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt() * s_noise
        old_denoised, h_last = denoised, h
    return x


def sample_dpmpp_3m_sde(denoiser, x, sigmas, *, noise: NoiseSampler | None = None, callback: Callback | None = None,
                        eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE: third order from the two previous estimates."""
    total, host = len(sigmas) - 1, host_copy(sigmas)
    denoised_1 = denoised_2 = None
    h_1 = h_2 = None
    for i in range(total):
        denoised = denoiser(x, batch_sigma(sigmas[i], x))
        if stopped(callback, i, total, x, denoised):
            return denoised
        h = None
        if host[i + 1] == 0:
            x = denoised
        else:
            h = (-sigmas[i + 1].log()) - (-sigmas[i].log())
            h_eta = h * (eta + 1)
            x = (-h_eta).exp() * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * ((denoised - denoised_1) / (h_1 / h))
            if eta:
                step_noise = require_noise(noise, "DPM++ 3M SDE")(host[i], host[i + 1])
                x = x + step_noise * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x
