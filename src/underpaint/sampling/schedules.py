"""Sigma schedules as pure functions, the model's discrete schedule, and the strength cut.

Each ``sigmas_<name>(n, ...)`` returns n sigmas from high to low followed by a final 0
(the samplers' stopping point). The arithmetic follows k-diffusion and AUTOMATIC1111 1.10
step for step, so the float32 values agree with theirs and an A1111 infotext reproduces here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InvalidParameter
from ..models.device import to_device
from .names import effective_schedule, sampler_info, schedule_info

#: Align Your Steps (Sabour et al., 2024), NVIDIA's 10-step sigma tables for SD 1.5 and SDXL.
AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)

#: A1111's defaults for the Beta schedule (settings beta_dist_alpha / beta_dist_beta).
BETA_ALPHA = 0.6
BETA_BETA = 0.6


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def sd_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = 1000) -> torch.Tensor:
    """ᾱ of Stable Diffusion's "scaled linear" DDPM schedule, as the LDM/SGM code computes it.

    The betas are made in float64 and only ᾱ is rounded to float32, which is what SD
    checkpoints store and what A1111 uses (diffusers' own float32 betas differ in the last bits).
    """
    betas = np.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=np.float64) ** 2
    return torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32)


@dataclass(frozen=True, eq=False)
class ModelSchedule:
    """The model's discrete noise levels σ_t = sqrt((1 - ᾱ_t) / ᾱ_t), t = 0 … T-1 (ascending).

    ``sigma_to_t`` / ``t_to_sigma`` interpolate linearly in log σ between neighbouring
    timesteps, like k-diffusion's ``DiscreteSchedule`` (A1111's "Automatic" schedule).
    """

    alphas_cumprod: torch.Tensor
    sigmas: torch.Tensor
    log_sigmas: torch.Tensor = field(repr=False)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod) -> "ModelSchedule":
        ac = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float32)
        sigmas = ((1 - ac) / ac) ** 0.5
        return cls(ac, sigmas, sigmas.log())

    def to(self, device: torch.device | str) -> "ModelSchedule":
        """The same schedule with its tables on ``device``.

        Denoisers place it once per request: copying the table to the GPU at every step would
        make each step wait for the GPU to finish the previous one.
        """
        return ModelSchedule(to_device(self.alphas_cumprod, device), to_device(self.sigmas, device),
                             to_device(self.log_sigmas, device))

    @property
    def sigma_min(self) -> float:
        return self.sigmas[0].item()

    @property
    def sigma_max(self) -> float:
        return self.sigmas[-1].item()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep of each sigma (log-σ interpolation, clamped to the table)."""
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.log()
        dists = log_sigma - log_sigmas[:, None]
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
        high = low + 1
        lo, hi = log_sigmas[low], log_sigmas[high]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return ((1 - w) * low + w * high).view(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at fractional timesteps (inverse of ``sigma_to_t`` inside the table)."""
        log_sigmas = self.log_sigmas.to(t.device)
        t = t.float()
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


# --- schedules that only need the noise range ---------------------------------------------


def sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022), eq. 5: evenly spaced in σ^(1/rho)."""
    ramp = torch.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def sigmas_exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Evenly spaced in log σ."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def sigmas_polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """log σ follows a power rho of a ramp (rho 1 = exponential)."""
    ramp = torch.linspace(1, 0, n) ** rho
    log_min = math.log(sigma_min)
    return _append_zero(torch.exp(ramp * (math.log(sigma_max) - log_min) + log_min))


def sigmas_kl_optimal(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """KL-optimal schedule (Sabour et al., 2024): evenly spaced in arctan σ.

    A1111 1.10 returns n+1 values ending at sigma_min, not 0, so its last step leaves that
    much noise in the picture; kept as-is so its images reproduce.
    """
    alpha_min = torch.arctan(torch.tensor(sigma_min))
    alpha_max = torch.arctan(torch.tensor(sigma_max))
    frac = torch.arange(n + 1) / n
    return torch.tan(frac * alpha_min + (1.0 - frac) * alpha_max)


def sigmas_align_your_steps(n: int, family: str = "sd1") -> torch.Tensor:
    """Align Your Steps: NVIDIA's 10-step table, log-linearly interpolated to n steps.

    The SDXL table is used for SDXL models, the SD 1.5 one for everything else (as A1111).
    """
    table = AYS_SDXL if family.lower().startswith("sdxl") else AYS_SD15
    if n == len(table):
        values = np.array(table, dtype=np.float64)
    else:
        knots = np.linspace(0, 1, len(table))
        log_ascending = np.log(np.array(table[::-1], dtype=np.float64))
        values = np.exp(np.interp(np.linspace(0, 1, n), knots, log_ascending))[::-1]
    return torch.tensor(np.append(values, 0.0), dtype=torch.float32)


def sigmas_beta(n: int, sigma_min: float, sigma_max: float, alpha: float = BETA_ALPHA, beta: float = BETA_BETA) -> torch.Tensor:
    """"Beta Sampling is All You Need" (Lee et al., 2024) as A1111 1.10 does it.

    The quantiles of a Beta(alpha, beta) distribution at evenly spaced probabilities, mapped
    linearly onto [sigma_min, sigma_max] (ComfyUI's "beta" maps them onto model timesteps instead).
    """
    quantiles = [_beta_ppf(q, alpha, beta) for q in 1 - np.linspace(0, 1, n)]
    return torch.tensor([sigma_min + q * (sigma_max - sigma_min) for q in quantiles] + [0.0], dtype=torch.float32)


# --- schedules that read the model's discrete sigmas ---------------------------------------


def sigmas_uniform(n: int, schedule: ModelSchedule) -> torch.Tensor:
    """n timesteps evenly spaced from T-1 to 0 (A1111 "Automatic" for most samplers)."""
    t = torch.linspace(len(schedule.sigmas) - 1, 0, n)
    return _append_zero(schedule.t_to_sigma(t))


def sigmas_sgm_uniform(n: int, sigma_min: float, sigma_max: float, schedule: ModelSchedule) -> torch.Tensor:
    """Timesteps evenly spaced over n+1 points, the last (sigma_min) left out (SGM's discretisation)."""
    start = schedule.sigma_to_t(torch.tensor(sigma_max))
    end = schedule.sigma_to_t(torch.tensor(sigma_min))
    return _model_sigmas_at(schedule, torch.linspace(start, end, n + 1)[:-1])


def sigmas_normal(n: int, sigma_min: float, sigma_max: float, schedule: ModelSchedule) -> torch.Tensor:
    """Timesteps evenly spaced from sigma_max's to sigma_min's (ComfyUI's "normal")."""
    start = schedule.sigma_to_t(torch.tensor(sigma_max))
    end = schedule.sigma_to_t(torch.tensor(sigma_min))
    return _model_sigmas_at(schedule, torch.linspace(start, end, n))


def sigmas_simple(n: int, schedule: ModelSchedule) -> torch.Tensor:
    """Every (T/n)-th model sigma counted down from the top (ComfyUI's "simple")."""
    stride = len(schedule.sigmas) / n
    picked = [schedule.sigmas[-(1 + int(i * stride))].item() for i in range(n)]
    return torch.tensor(picked + [0.0], dtype=torch.float32)


def sigmas_ddim(n: int, schedule: ModelSchedule) -> torch.Tensor:
    """Model sigmas at timesteps 1, 1 + T//n, 1 + 2·T//n, … (ComfyUI's "ddim_uniform").

    When T is not a multiple of n this yields more than n sigmas, as in A1111 and ComfyUI.
    """
    stride = max(len(schedule.sigmas) // n, 1)
    picked = [schedule.sigmas[t].item() for t in range(1, len(schedule.sigmas), stride)]
    return torch.tensor(picked[::-1] + [0.0], dtype=torch.float32)


def sigmas_timesteps(n: int, schedule: ModelSchedule) -> torch.Tensor:
    """The DDPM timestep grid A1111 runs DDIM, PLMS and UniPC on: 1, 1 + T//n, …, as sigmas.

    A1111 clips the timesteps to T-1 (which only matters for n > T/2) and, like ``sigmas_ddim``,
    makes ceil(T / (T//n)) of them.
    """
    total = len(schedule.sigmas)
    timesteps = torch.clip(torch.arange(0, total, total // n) + 1, 0, total - 1)
    return _append_zero(schedule.sigmas[timesteps].flip(0))


def sigmas_lcm(n: int, schedule: ModelSchedule, original_steps: int = 50) -> torch.Tensor:
    """Latent consistency models: n points spread over LCM's training timesteps.

    A1111's LCM sampler keeps every (T/50)-th sigma (timesteps 19, 39, …, 999), spaces n
    timesteps evenly from 999 to 19 and reads each off that 50-entry table in log σ.
    """
    total = len(schedule.alphas_cumprod)
    skip = total // original_steps
    grid = lcm_grid(schedule, original_steps)
    t = torch.linspace(total - 1, skip - 1, n)
    position = ((t - (skip - 1)) / skip).clamp(0, original_steps - 1)
    return _append_zero(grid.t_to_sigma(position))


def lcm_grid(schedule: ModelSchedule, original_steps: int = 50) -> ModelSchedule:
    """The model schedule restricted to LCM's training timesteps skip-1, 2·skip-1, …, T-1."""
    total = len(schedule.alphas_cumprod)
    skip = total // original_steps
    timesteps = torch.arange(original_steps) * skip + (skip - 1)
    return ModelSchedule.from_alphas_cumprod(schedule.alphas_cumprod[timesteps])


def _model_sigmas_at(schedule: ModelSchedule, timesteps: torch.Tensor) -> torch.Tensor:
    picked = [schedule.t_to_sigma(t).item() for t in timesteps]
    return torch.tensor(picked + [0.0], dtype=torch.float32)


# --- the Beta distribution's quantile function (no scipy at run time) ---------------------


def _beta_ppf(q: float, a: float, b: float) -> float:
    """Inverse of the regularised incomplete beta function, by bisection to full precision."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if _beta_cdf(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _beta_cdf(x: float, a: float, b: float) -> float:
    """Regularised incomplete beta I_x(a, b) by its continued fraction (modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _beta_cdf(1.0 - x, b, a)
    return math.exp(log_front) * _beta_continued_fraction(x, a, b) / a


def _beta_continued_fraction(x: float, a: float, b: float) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-16:
            break
    return result


# --- from a request to a sigma list --------------------------------------------------------


def build_sigmas(
    sampler_label: str,
    schedule_label: str,
    steps: int,
    model_schedule: ModelSchedule,
    options=None,
    *,
    family: str = "sd1",
) -> torch.Tensor:
    """The full sigma list A1111 1.10 samples ``steps`` steps with (before any img2img cut).

    "Automatic" becomes the sampler's default schedule (the model's uniform timesteps when it
    has none). The sigma_min / sigma_max / rho settings apply only to explicit schedules and
    only when they differ from the model's values (rho: from the schedule's own default), as
    in A1111. DPM2-style samplers build one sigma more and drop the next-to-last one; the
    "discard penultimate sigma" option forces that for any k-diffusion sampler. Timestep
    samplers (DDIM, PLMS, UniPC) ignore the schedule and use A1111's DDPM timestep grid.
    """
    if steps < 1:
        raise InvalidParameter("steps", steps, "at least 1")
    info = sampler_info(sampler_label)
    force_discard = bool(options is not None and options.discard_penultimate_sigma)
    if "timestep" in info.flags:
        # A1111 counts one step more when discarding is forced, but drops nothing here.
        return sigmas_timesteps(steps + 1 if force_discard else steps, model_schedule)
    discard = force_discard or "discard_penultimate" in info.flags
    n = steps + 1 if discard else steps
    sigmas = _schedule_sigmas(info, schedule_label, n, model_schedule, options, family)
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas


def _schedule_sigmas(info, schedule_label, n, model_schedule, options, family) -> torch.Tensor:
    label = effective_schedule(info.label, schedule_label)
    if "lcm" in info.flags:
        # A1111 swaps in LCM's 50-timestep model wrapper: its own uniform sigmas and range.
        if label == "Uniform":
            return sigmas_lcm(n, model_schedule)
        model_schedule = lcm_grid(model_schedule)
    schedule = schedule_info(label)
    sigma_min, sigma_max = model_schedule.sigma_min, model_schedule.sigma_max
    if options is not None:
        if options.sigma_min and options.sigma_min != sigma_min:
            sigma_min = options.sigma_min
        if options.sigma_max and options.sigma_max != sigma_max:
            sigma_max = options.sigma_max
    rho = schedule.default_rho
    if rho is not None and options is not None and options.rho and options.rho != rho:
        rho = options.rho
    shape = (options.beta_alpha, options.beta_beta) if options is not None else (BETA_ALPHA, BETA_BETA)
    return _call_schedule(label, n, sigma_min, sigma_max, rho, model_schedule, family, shape)


def _call_schedule(label, n, sigma_min, sigma_max, rho, model_schedule, family,
                   beta_shape: tuple[float, float] = (BETA_ALPHA, BETA_BETA)) -> torch.Tensor:
    table: dict[str, Callable[[], torch.Tensor]] = {
        "Uniform": lambda: sigmas_uniform(n, model_schedule),
        "Karras": lambda: sigmas_karras(n, sigma_min, sigma_max, rho),
        "Exponential": lambda: sigmas_exponential(n, sigma_min, sigma_max),
        "Polyexponential": lambda: sigmas_polyexponential(n, sigma_min, sigma_max, rho),
        "SGM Uniform": lambda: sigmas_sgm_uniform(n, sigma_min, sigma_max, model_schedule),
        "KL Optimal": lambda: sigmas_kl_optimal(n, sigma_min, sigma_max),
        "Align Your Steps": lambda: sigmas_align_your_steps(n, family),
        "Simple": lambda: sigmas_simple(n, model_schedule),
        "Normal": lambda: sigmas_normal(n, sigma_min, sigma_max, model_schedule),
        "DDIM": lambda: sigmas_ddim(n, model_schedule),
        "Beta": lambda: sigmas_beta(n, sigma_min, sigma_max, *beta_shape),
    }
    return table[label]()


def img2img_steps(steps: int, strength: float, fix_steps: bool) -> tuple[int, int]:
    """A1111's (schedule length, t_enc) for img2img: t_enc + 1 steps of the schedule run.

    Default: the schedule is built for ``steps`` and t_enc = int(min(strength, 0.999)·steps).
    With "img2img_fix_steps" it is built for int(steps / min(strength, 0.999)) steps and
    t_enc = steps - 1, so exactly ``steps`` run. Strength 0 runs the single last step (A1111
    does that without fix_steps and fails with it).
    """
    if not 0 <= strength <= 1:
        raise InvalidParameter("strength", strength, "a number from 0 to 1")
    capped = min(strength, 0.999)
    if fix_steps and strength > 0:
        return int(steps / capped), steps - 1
    return steps, int(capped * steps)


def img2img_sigmas(
    sigmas_full_builder: Callable[[int], torch.Tensor],
    steps: int,
    strength: float,
    fix_steps: bool,
    *,
    count_from_end: bool = False,
) -> torch.Tensor:
    """The tail of the schedule that img2img runs at ``strength``: sigmas[N - t_enc - 1:].

    N=20, strength 0.5 → 11 steps (12 sigmas); with ``fix_steps`` → 20 steps. The first sigma
    is the noise level the picture is noised to. ``count_from_end`` keeps the last t_enc + 2
    sigmas instead, which is how A1111's timestep samplers (DDIM, PLMS, UniPC) count; the two
    differ only when the list is not N + 1 long.
    """
    n, t_enc = img2img_steps(steps, strength, fix_steps)
    full = sigmas_full_builder(n)
    start = len(full) - 2 - t_enc if count_from_end else n - t_enc - 1
    return full[max(start, 0):]
