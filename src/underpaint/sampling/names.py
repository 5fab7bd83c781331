"""The sampler and schedule name table: one list drives the CLI choices, the API lists and the UI.

Labels, aliases and default schedules are AUTOMATIC1111 1.10's, so that a name in an A1111
infotext or API request means the same thing here; ComfyUI's names are accepted as aliases.
Public names live forever: add, never rename. This module must not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UnknownName, nearest_names

#: Flags a sampler may carry.
#:  ancestral            adds fresh noise from the per-image generators after each step
#:  stochastic           may draw from the per-image generators (ancestral, churn, eta > 0)
#:  churn                takes Karras et al.'s s_churn / s_tmin / s_tmax / s_noise
#:  sde / brownian       draws its noise from a per-image Brownian tree (seeded with the image seed)
#:  second_order         two model calls per step
#:  discard_penultimate  A1111 builds n+1 sigmas and drops the next-to-last one
#:  timestep             A1111 runs it on the DDPM timestep grid (DDIM, DDIM CFG++, PLMS, UniPC)
#:  adaptive             chooses its own steps (the step count is an estimate)
#:  lcm                  needs the latent-consistency denoiser (``denoisers.lcm_denoiser``)
#:  ensd                 A1111 marks it as using "eta noise seed delta" (infotext "ENSD")
#:  cfgpp                CFG++: steps along the negative prompt's noise (the denoiser records it)
#:  cfgpp_scaled         A1111's CFG++: the CFG scale ÷ 12.5 (ComfyUI's take the scale as given)
FLAGS = frozenset(
    {"ancestral", "stochastic", "churn", "sde", "brownian", "second_order", "discard_penultimate",
     "timestep", "adaptive", "lcm", "ensd", "cfgpp", "cfgpp_scaled"}
)


@dataclass(frozen=True)
class SamplerInfo:
    """One sampler: its A1111 label, the other names it answers to, and how A1111 runs it."""

    label: str
    aliases: tuple[str, ...]
    #: Name of the function in ``underpaint.sampling`` that implements it.
    function: str
    #: Schedule label "Automatic" stands for ("Automatic" = the model's own uniform timesteps).
    default_schedule: str = "Automatic"
    flags: frozenset[str] = frozenset()
    #: Fixed keyword options the sampler is run with, e.g. (("solver_type", "heun"),).
    options: tuple[tuple[str, Any], ...] = ()
    #: ``SamplerOptions`` fields A1111 passes to this sampler (others are ignored, as there).
    params: tuple[str, ...] = ()

    def names(self) -> tuple[str, ...]:
        return (self.label, *self.aliases)


@dataclass(frozen=True)
class ScheduleInfo:
    """One sigma schedule (A1111's "Schedule type")."""

    label: str
    aliases: tuple[str, ...]
    #: Name of the function in ``underpaint.sampling.schedules`` (None for Automatic).
    function: str | None
    #: A1111's default rho; a user rho only applies to schedules that have one.
    default_rho: float | None = None
    #: Whether it reads the model's discrete sigmas (otherwise only sigma_min/sigma_max).
    needs_model: bool = False

    def names(self) -> tuple[str, ...]:
        return (self.label, *self.aliases)


_CHURN = ("s_churn", "s_tmin", "s_tmax", "s_noise")
_ETA_NOISE = ("eta", "s_noise")


def _sampler(label, aliases, function, default_schedule="Automatic", flags=(), options=(), params=()):
    return SamplerInfo(label, tuple(aliases), function, default_schedule, frozenset(flags), tuple(options), tuple(params))


#: A1111 1.10's samplers in its order (k-diffusion, then timestep samplers, then LCM); the
#: trailing aliases are ComfyUI's sampler names.
SAMPLERS: tuple[SamplerInfo, ...] = (
    _sampler("DPM++ 2M", ["k_dpmpp_2m", "dpmpp_2m"], "sample_dpmpp_2m", "Karras"),
    _sampler("DPM++ SDE", ["k_dpmpp_sde", "dpmpp_sde", "dpmpp_sde_gpu"], "sample_dpmpp_sde", "Karras",
             {"sde", "brownian", "second_order", "stochastic"}, params=_ETA_NOISE),
    _sampler("DPM++ 2M SDE", ["k_dpmpp_2m_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu"], "sample_dpmpp_2m_sde",
             "Exponential", {"sde", "brownian", "stochastic"}, (("solver_type", "midpoint"),), _ETA_NOISE),
    _sampler("DPM++ 2M SDE Heun", ["k_dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu"],
             "sample_dpmpp_2m_sde", "Exponential", {"sde", "brownian", "stochastic"}, (("solver_type", "heun"),),
             _ETA_NOISE),
    _sampler("DPM++ 2S a", ["k_dpmpp_2s_a", "dpmpp_2s_ancestral"], "sample_dpmpp_2s_ancestral", "Karras",
             {"ancestral", "stochastic", "second_order", "ensd"}, params=_ETA_NOISE),
    _sampler("DPM++ 3M SDE", ["k_dpmpp_3m_sde", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu"], "sample_dpmpp_3m_sde",
             "Exponential", {"sde", "brownian", "stochastic", "discard_penultimate"}, params=_ETA_NOISE),
    _sampler("Euler a", ["k_euler_a", "k_euler_ancestral", "euler_ancestral"], "sample_euler_ancestral",
             flags={"ancestral", "stochastic", "ensd"}, params=("eta",)),
    _sampler("Euler", ["k_euler"], "sample_euler", flags={"churn", "stochastic"}, params=_CHURN),
    _sampler("LMS", ["k_lms"], "sample_lms"),
    _sampler("Heun", ["k_heun"], "sample_heun", flags={"churn", "stochastic", "second_order"}, params=_CHURN),
    _sampler("DPM2", ["k_dpm_2", "dpm_2"], "sample_dpm_2", "Karras",
             {"churn", "stochastic", "second_order", "discard_penultimate"}, params=_CHURN),
    _sampler("DPM2 a", ["k_dpm_2_a", "dpm_2_ancestral"], "sample_dpm_2_ancestral", "Karras",
             {"ancestral", "stochastic", "second_order", "discard_penultimate", "ensd"}, params=_ETA_NOISE),
    _sampler("DPM fast", ["k_dpm_fast", "dpm_fast"], "sample_dpm_fast", flags={"ancestral", "stochastic", "ensd"},
             params=_ETA_NOISE),
    _sampler("DPM adaptive", ["k_dpm_ad", "dpm_adaptive"], "sample_dpm_adaptive",
             flags={"ancestral", "stochastic", "adaptive", "ensd"}, params=("eta",)),
    _sampler("Restart", ["restart"], "sample_restart", "Karras", {"stochastic", "second_order"}),
    _sampler("DDIM", ["ddim"], "sample_ddim", flags={"timestep", "stochastic"}, params=("eta",)),
    _sampler("DDIM CFG++", ["ddim_cfgpp"], "sample_ddim_cfgpp",
             flags={"timestep", "stochastic", "cfgpp", "cfgpp_scaled"}, params=("eta",)),
    _sampler("PLMS", ["plms"], "sample_plms", flags={"timestep"}),
    _sampler("UniPC", ["unipc", "uni_pc"], "sample_unipc", flags={"timestep"}),
    _sampler("LCM", ["k_lcm", "lcm"], "sample_lcm", flags={"ancestral", "stochastic", "lcm"}),
    # ComfyUI's CFG++ samplers (not A1111's; Forge lists them under these names)
    _sampler("Euler CFG++", ["euler_cfg_pp"], "sample_euler_cfgpp", flags={"cfgpp"}),
    _sampler("Euler a CFG++", ["euler_ancestral_cfg_pp"], "sample_euler_ancestral_cfgpp",
             flags={"ancestral", "stochastic", "ensd", "cfgpp"}, params=("eta",)),
)

#: A1111 1.10's schedule types in its order; trailing aliases are ComfyUI's scheduler names.
SCHEDULES: tuple[ScheduleInfo, ...] = (
    ScheduleInfo("Automatic", ("automatic",), None),
    ScheduleInfo("Uniform", ("uniform",), "sigmas_uniform", needs_model=True),
    ScheduleInfo("Karras", ("karras",), "sigmas_karras", default_rho=7.0),
    ScheduleInfo("Exponential", ("exponential",), "sigmas_exponential"),
    ScheduleInfo("Polyexponential", ("polyexponential",), "sigmas_polyexponential", default_rho=1.0),
    ScheduleInfo("SGM Uniform", ("sgm_uniform", "SGMUniform"), "sigmas_sgm_uniform", needs_model=True),
    ScheduleInfo("KL Optimal", ("kl_optimal",), "sigmas_kl_optimal"),
    ScheduleInfo("Align Your Steps", ("align_your_steps",), "sigmas_align_your_steps"),
    ScheduleInfo("Simple", ("simple",), "sigmas_simple", needs_model=True),
    ScheduleInfo("Normal", ("normal",), "sigmas_normal", needs_model=True),
    ScheduleInfo("DDIM", ("ddim", "ddim_uniform"), "sigmas_ddim", needs_model=True),
    ScheduleInfo("Beta", ("beta",), "sigmas_beta", needs_model=True),
)


def _index(items) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for item in items:
        for name in item.names():
            table.setdefault(name.lower(), item)
    return table


def sampler_labels() -> tuple[str, ...]:
    return tuple(s.label for s in SAMPLERS)


def schedule_labels() -> tuple[str, ...]:
    return tuple(s.label for s in SCHEDULES)


def _find_sampler(name: str) -> SamplerInfo | None:
    return _index(SAMPLERS).get(name.strip().lower())


def _find_schedule(name: str) -> ScheduleInfo | None:
    return _index(SCHEDULES).get(name.strip().lower())


def sampler_info(label: str) -> SamplerInfo:
    """The table row for a sampler label or alias (case-insensitive)."""
    found = _find_sampler(str(label))
    if found is None:
        raise UnknownName("sampler", label, sampler_labels())
    return found


def schedule_info(label: str) -> ScheduleInfo:
    """The table row for a schedule label or alias (case-insensitive)."""
    found = _find_schedule(str(label))
    if found is None:
        raise UnknownName("scheduler", label, schedule_labels())
    return found


def _split_legacy(name: str) -> tuple[SamplerInfo, ScheduleInfo] | None:
    """"DPM++ 2M Karras" → (DPM++ 2M, Karras): A1111 strips a trailing schedule name."""
    lowered = name.strip().lower()
    for schedule in SCHEDULES:
        for option in schedule.names():
            suffix = " " + option.lower()
            if lowered.endswith(suffix):
                sampler = _find_sampler(lowered[: -len(suffix)])
                if sampler is not None:
                    return sampler, schedule
    return None


def _legacy_guess(name: str) -> tuple[str, ...]:
    """For a misspelt legacy name whose sampler part is right ("DPM++ 2M Karas"), the combined name
    it most likely meant ("DPM++ 2M Karras"), so that the error can suggest it; else nothing."""
    lowered = " ".join(name.lower().split())
    for sampler in sorted(SAMPLERS, key=lambda s: -len(s.label)):  # "DPM++ 2M SDE" before "DPM++ 2M"
        for option in sampler.names():
            if lowered.startswith(option.lower() + " "):
                close = nearest_names(lowered[len(option) + 1:], [s.label for s in SCHEDULES[1:]], n=1)
                return tuple(f"{sampler.label} {label}" for label in close)
    return ()


def schedule_in_name(name: str) -> str | None:
    """The schedule label an A1111 legacy sampler name carries ("DPM++ 2M Karras" → "Karras"), or
    None for a plain sampler name or an unknown one."""
    if _find_sampler(str(name)) is not None:
        return None
    split = _split_legacy(str(name))
    return split[1].label if split is not None else None


def resolve_sampler(name: str, scheduler: str | None = "Automatic") -> tuple[str, str]:
    """Canonical (sampler label, schedule label) for any accepted spelling, as A1111 1.10 resolves it.

    Like A1111's ``get_sampler_and_scheduler``: a schedule named inside a legacy sampler name
    ("DPM++ 2M SDE Exponential") wins over the ``scheduler`` argument, and a schedule equal to
    the sampler's own default becomes "Automatic" (the two spellings give the same image).
    Unlike A1111, an unknown name raises instead of silently falling back to the first sampler.
    """
    schedule = schedule_info(scheduler) if scheduler else SCHEDULES[0]
    sampler = _find_sampler(str(name))
    if sampler is None:
        split = _split_legacy(str(name))
        if split is None:
            raise UnknownName("sampler", name, sampler_labels() + _legacy_guess(str(name)))
        sampler, schedule = split
    if schedule.label == sampler.default_schedule:
        schedule = SCHEDULES[0]
    return sampler.label, schedule.label


def effective_schedule(sampler: str, schedule: str) -> str:
    """The schedule actually used: "Automatic" replaced by the sampler's default.

    Samplers without a default run the model's uniform timesteps, which is the "Uniform" schedule.
    """
    info = sampler_info(sampler)
    label = schedule_info(schedule).label
    if label == "Automatic":
        label = info.default_schedule
    return "Uniform" if label == "Automatic" else label


def infotext_schedule(sampler: str, schedule: str) -> str | None:
    """The "Schedule type" A1111 1.10 writes in the infotext, or None where it writes none.

    A1111 writes it for k-diffusion samplers whose schedule is not the model's own timesteps
    (an explicit choice, or a default such as Karras); timestep samplers (DDIM, PLMS, UniPC)
    ignore the schedule and write nothing.
    """
    info = sampler_info(sampler)
    if "timestep" in info.flags:
        return None
    label = schedule_info(schedule).label
    if label == "Automatic":
        label = info.default_schedule
    return None if label == "Automatic" else label


def infotext_writes_ensd(sampler: str, eta: float | None) -> bool:
    """Whether A1111 1.10 records a non-zero "eta noise seed delta" as "ENSD" for this sampler.

    Only for the samplers it marks as using ENSD, and not when eta is 0 (None = the default, 1).
    The delta itself reseeds every sampler's later noise draws, marked or not.
    """
    return "ensd" in sampler_info(sampler).flags and (eta is None or eta != 0)
