"""One entry point for every sampler in the name table, plus A1111's start latent.

The sampler functions themselves live in ``k_samplers``, ``dpmpp``, ``dpm_solver``,
``timestep_samplers`` and ``unipc`` and are re-exported here.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import torch

from ..params import SamplerOptions
from ..models.device import to_device
from ._common import STOP, Callback, NoiseSampler, Signal, host_copy
from .dpm_solver import sample_dpm_adaptive, sample_dpm_fast
from .dpmpp import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_2s_ancestral, sample_dpmpp_3m_sde, sample_dpmpp_sde
from .k_samplers import (
    sample_dpm_2,
    sample_dpm_2_ancestral,
    sample_euler,
    sample_euler_ancestral,
    sample_euler_ancestral_cfgpp,
    sample_euler_cfgpp,
    sample_heun,
    sample_lcm,
    sample_lms,
    sample_restart,
)
from .names import SamplerInfo, sampler_info
from .schedules import ModelSchedule
from .timestep_samplers import sample_ddim, sample_ddim_cfgpp, sample_plms
from .unipc import sample_unipc

__all__ = [
    "STOP", "Signal", "Callback", "NoiseSampler", "run_sampler", "prepare_start", "sampler_kwargs",
    "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral",
    "sample_lms", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde", "sample_dpmpp_2m", "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m_sde", "sample_dpm_fast", "sample_dpm_adaptive", "sample_restart", "sample_lcm",
    "sample_ddim", "sample_ddim_cfgpp", "sample_plms", "sample_unipc", "sample_euler_cfgpp",
    "sample_euler_ancestral_cfgpp",
]

#: ``SamplerInfo.function`` → implementation (read-only).
_FUNCTIONS = MappingProxyType({
    f.__name__: f
    for f in (
        sample_euler, sample_euler_ancestral, sample_heun, sample_dpm_2, sample_dpm_2_ancestral, sample_lms,
        sample_dpmpp_2s_ancestral, sample_dpmpp_sde, sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_3m_sde,
        sample_dpm_fast, sample_dpm_adaptive, sample_restart, sample_lcm, sample_ddim, sample_ddim_cfgpp, sample_plms, sample_unipc,
        sample_euler_cfgpp, sample_euler_ancestral_cfgpp,
    )
})


def sampler_kwargs(info: SamplerInfo, options: SamplerOptions | None) -> dict[str, Any]:
    """The keyword options A1111 1.10 passes this sampler.

    eta defaults to A1111's "eta (ancestral)" setting, 1, or for DDIM its "eta (DDIM)", 0;
    s_churn / s_tmin / s_tmax / s_noise reach only the samplers A1111 passes them to.
    """
    options = options or SamplerOptions()
    kwargs: dict[str, Any] = dict(info.options)
    for name in info.params:
        if name == "eta":
            default = 0.0 if "timestep" in info.flags else 1.0
            kwargs["eta"] = default if options.eta is None else options.eta
        else:
            kwargs[name] = getattr(options, name)
    return kwargs


def run_sampler(
    label: str,
    denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback | None = None,
    options: SamplerOptions | None = None,
    model_schedule: ModelSchedule | None = None,
) -> torch.Tensor:
    """Run the named sampler from ``x`` (noised to ``sigmas[0]``) down the sigma list.

    ``noise_sampler`` is required by samplers that add noise (ancestral, SDE, churn, eta > 0).
    DPM fast / adaptive take their range from the list: sigmas[0] down to sigmas[-2].
    """
    info = sampler_info(label)
    function = _FUNCTIONS[info.function]
    kwargs = sampler_kwargs(info, options)
    if function in (sample_dpm_fast, sample_dpm_adaptive):
        # Their range is tested and turned into times on the host.
        host = host_copy(sigmas)
        if function is sample_dpm_fast:
            return function(denoiser, x, host[-2], host[0], len(sigmas) - 1, noise=noise_sampler,
                            callback=callback, **kwargs)
        return function(denoiser, x, host[-2], host[0], noise=noise_sampler, callback=callback,
                        expected_steps=len(sigmas) - 1, **kwargs)
    sigmas = to_device(sigmas, x.device)
    if function is sample_unipc:
        if model_schedule is None:
            raise ValueError("UniPC needs the model schedule")
        kwargs["model_schedule"] = model_schedule
        kwargs["order"] = (options or SamplerOptions()).unipc_order
    return function(denoiser, x, sigmas, noise=noise_sampler, callback=callback, **kwargs)


def prepare_start(
    label: str,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    init: torch.Tensor | None = None,
    model_schedule: ModelSchedule | None = None,
    extra_noise: float = 0.0,
    sgm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent A1111 1.10 starts sampling from, and the sigmas to run from it.

    k-diffusion samplers: ``init + noise·σ₀`` (``noise·σ₀`` without a picture), sigmas unchanged.
    Timestep samplers (DDIM, PLMS, UniPC) start from DDPM's ``sqrt(ᾱ)·init + sqrt(1-ᾱ)·noise``
    at σ₀, or from pure unit noise for txt2img. In img2img A1111 then treats that latent as
    if it sat one grid step lower, so the first sigma is dropped and the latent carried over
    in DDPM scale. UniPC's txt2img starts at the model's top timestep (needs
    ``model_schedule``). Expressed here in σ space with the same result.

    ``extra_noise`` (A1111's "Extra noise" setting, img2img only): the same noise once more, times
    it, on top of a picture's start (in σ space; DDPM-scaled for the timestep samplers, as A1111).

    ``sgm`` (A1111's "SGM noise multiplier", k-diffusion txt2img only): the noise times
    ``sqrt(1 + σ₀²)`` rather than ``σ₀``, as Stability's SGM code starts SDXL.
    """
    sigma0 = sigmas[0]
    info = sampler_info(label)
    if init is not None and extra_noise:
        init = init + noise * extra_noise
    if "timestep" not in info.flags:
        if init is None:
            return noise * ((1 + sigma0**2) ** 0.5 if sgm else sigma0), sigmas
        return init + noise * sigma0, sigmas
    if init is None:
        if info.function == "sample_unipc":
            if model_schedule is None:
                raise ValueError("UniPC's start needs the model schedule")
            sigmas = torch.cat([model_schedule.sigmas[-1:].to(sigmas), sigmas[1:]])
            sigma0 = sigmas[0]
        return noise * (1 + sigma0**2) ** 0.5, sigmas
    ddpm = (init + noise * sigma0) / (1 + sigma0**2) ** 0.5
    rest = sigmas[1:]
    return ddpm * (1 + rest[0] ** 2) ** 0.5, rest
