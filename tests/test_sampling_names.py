"""The sampler / schedule name table: public names, A1111 1.10's resolution rules, no torch."""

import subprocess
import sys

import pytest

from underpaint.errors import UnknownName
from underpaint.sampling.names import (
    FLAGS,
    SAMPLERS,
    SCHEDULES,
    effective_schedule,
    infotext_schedule,
    infotext_writes_ensd,
    resolve_sampler,
    sampler_info,
    schedule_info,
)

# A1111 1.10's sampler labels and aliases, and schedule labels/names (from its sampler tables).
A1111_SAMPLERS = {
    "DPM++ 2M": ["k_dpmpp_2m"], "DPM++ SDE": ["k_dpmpp_sde"], "DPM++ 2M SDE": ["k_dpmpp_2m_sde"],
    "DPM++ 2M SDE Heun": ["k_dpmpp_2m_sde_heun"], "DPM++ 2S a": ["k_dpmpp_2s_a"], "DPM++ 3M SDE": ["k_dpmpp_3m_sde"],
    "Euler a": ["k_euler_a", "k_euler_ancestral"], "Euler": ["k_euler"], "LMS": ["k_lms"], "Heun": ["k_heun"],
    "DPM2": ["k_dpm_2"], "DPM2 a": ["k_dpm_2_a"], "DPM fast": ["k_dpm_fast"], "DPM adaptive": ["k_dpm_ad"],
    "Restart": ["restart"], "DDIM": ["ddim"], "DDIM CFG++": ["ddim_cfgpp"], "PLMS": ["plms"], "UniPC": ["unipc"],
    "LCM": ["k_lcm"],
}
A1111_SCHEDULES = {
    "Automatic": "automatic", "Uniform": "uniform", "Karras": "karras", "Exponential": "exponential",
    "Polyexponential": "polyexponential", "SGM Uniform": "sgm_uniform", "KL Optimal": "kl_optimal",
    "Align Your Steps": "align_your_steps", "Simple": "simple", "Normal": "normal", "DDIM": "ddim", "Beta": "beta",
}
COMFY_SAMPLERS = {
    "euler_cfg_pp": "Euler CFG++", "euler_ancestral_cfg_pp": "Euler a CFG++",
    "euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpm_2": "DPM2", "dpm_2_ancestral": "DPM2 a",
    "lms": "LMS", "dpm_fast": "DPM fast", "dpm_adaptive": "DPM adaptive", "dpmpp_2s_ancestral": "DPM++ 2S a",
    "dpmpp_sde": "DPM++ SDE", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun", "dpmpp_3m_sde": "DPM++ 3M SDE", "ddim": "DDIM", "uni_pc": "UniPC",
    "lcm": "LCM",
}
COMFY_SCHEDULES = {
    "simple": "Simple", "sgm_uniform": "SGM Uniform", "karras": "Karras", "exponential": "Exponential",
    "ddim_uniform": "DDIM", "beta": "Beta", "normal": "Normal", "kl_optimal": "KL Optimal",
}


def test_labels_are_unique_and_flags_known():
    labels = [s.label for s in SAMPLERS]
    assert len(labels) == len(set(labels))
    assert len({s.label for s in SCHEDULES}) == len(SCHEDULES)
    for info in SAMPLERS:
        assert info.flags <= FLAGS, info.label
        assert schedule_info(info.default_schedule).label == info.default_schedule


@pytest.mark.parametrize("table", [SAMPLERS, SCHEDULES], ids=["samplers", "schedules"])
def test_no_name_collides_across_entries(table):
    owner = {}
    for item in table:
        for name in item.names():
            key = name.lower()
            assert owner.setdefault(key, item.label) == item.label, f"{name!r} names {owner[key]} and {item.label}"


def test_every_sampler_name_resolves_to_its_label():
    for info in SAMPLERS:
        for name in info.names():
            for spelling in (name, name.upper(), name.lower()):
                assert sampler_info(spelling) is info
                assert resolve_sampler(spelling)[0] == info.label


def test_every_schedule_name_resolves_to_its_label():
    for info in SCHEDULES:
        for name in info.names():
            assert schedule_info(name.swapcase()) is info
            assert resolve_sampler("Euler", name)[1] == info.label


def test_a1111_labels_aliases_and_comfy_names_are_present():
    for label, aliases in A1111_SAMPLERS.items():
        for name in (label, *aliases):
            assert sampler_info(name).label == label
    for label, name in A1111_SCHEDULES.items():
        assert schedule_info(label).label == label
        assert schedule_info(name).label == label
    assert schedule_info("SGMUniform").label == "SGM Uniform"
    for name, label in COMFY_SAMPLERS.items():
        assert sampler_info(name).label == label
    for name, label in COMFY_SCHEDULES.items():
        assert schedule_info(name).label == label


def test_a1111_default_schedules():
    defaults = {
        "DPM++ 2M": "Karras", "DPM++ SDE": "Karras", "DPM++ 2M SDE": "Exponential", "DPM++ 2M SDE Heun": "Exponential",
        "DPM++ 2S a": "Karras", "DPM++ 3M SDE": "Exponential", "DPM2": "Karras", "DPM2 a": "Karras", "Restart": "Karras",
        "Euler": "Automatic", "Euler a": "Automatic", "LMS": "Automatic", "Heun": "Automatic", "DDIM": "Automatic",
    }
    for label, schedule in defaults.items():
        assert sampler_info(label).default_schedule == schedule
    assert {s.label for s in SAMPLERS if "discard_penultimate" in s.flags} == {"DPM2", "DPM2 a", "DPM++ 3M SDE"}
    assert {s.label for s in SAMPLERS if "brownian" in s.flags} == {"DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE"}
    assert dict(sampler_info("DPM++ 2M SDE Heun").options)["solver_type"] == "heun"
    assert {s.label for s in SAMPLERS if "ensd" in s.flags} == {"Euler a", "DPM++ 2S a", "DPM2 a", "DPM fast",
                                                                "DPM adaptive", "Euler a CFG++"}
    assert infotext_writes_ensd("Euler a", None) and not infotext_writes_ensd("Euler a", 0.0)
    assert not infotext_writes_ensd("Euler", None)


@pytest.mark.parametrize(
    "name, scheduler, expected",
    [
        ("DPM++ 2M Karras", "Automatic", ("DPM++ 2M", "Automatic")),  # the default schedule → Automatic
        ("DPM++ 2M", "Karras", ("DPM++ 2M", "Automatic")),
        ("DPM++ SDE Karras", "Automatic", ("DPM++ SDE", "Automatic")),
        ("DPM2 a Karras", "Automatic", ("DPM2 a", "Automatic")),
        ("Euler a", "Automatic", ("Euler a", "Automatic")),
        ("LMS Karras", "Automatic", ("LMS", "Karras")),
        ("DPM++ 2M SDE Exponential", "Automatic", ("DPM++ 2M SDE", "Automatic")),
        ("DPM++ 2M SDE Karras", "Automatic", ("DPM++ 2M SDE", "Karras")),
        ("DPM++ 2M SDE Heun Karras", "Automatic", ("DPM++ 2M SDE Heun", "Karras")),
        # A1111: a schedule inside the sampler name wins over the scheduler argument.
        ("DPM++ 2M SDE Exponential", "Karras", ("DPM++ 2M SDE", "Automatic")),
        ("Euler Karras", "Exponential", ("Euler", "Karras")),
        ("Euler", "Karras", ("Euler", "Karras")),
        ("DPM++ 2M sgm_uniform", None, ("DPM++ 2M", "SGM Uniform")),
        ("euler_ancestral", "karras", ("Euler a", "Karras")),
        ("dpmpp_2m_sde", "sgm_uniform", ("DPM++ 2M SDE", "SGM Uniform")),
        ("dpmpp_2m", "ddim_uniform", ("DPM++ 2M", "DDIM")),
        ("k_euler_a", "", ("Euler a", "Automatic")),
    ],
)
def test_resolve_sampler_follows_a1111(name, scheduler, expected):
    assert resolve_sampler(name, scheduler) == expected


def test_every_legacy_combination_splits():
    for sampler in SAMPLERS:
        for schedule in SCHEDULES:
            expected = "Automatic" if schedule.label == sampler.default_schedule else schedule.label
            assert resolve_sampler(f"{sampler.label} {schedule.label}") == (sampler.label, expected)


def test_unknown_names_raise_with_suggestion():
    with pytest.raises(UnknownName) as info:
        resolve_sampler("Eular a")
    assert info.value.field == "sampler" and "Euler a" in info.value.message
    with pytest.raises(UnknownName) as info:
        resolve_sampler("Euler", "Karas")
    assert info.value.field == "scheduler" and "Karras" in info.value.message
    with pytest.raises(UnknownName):
        resolve_sampler("DPM++ 2M Karas")


def test_effective_and_infotext_schedule():
    assert effective_schedule("DPM++ 2M", "Automatic") == "Karras"
    assert effective_schedule("Euler", "Automatic") == "Uniform"
    assert effective_schedule("Euler", "Exponential") == "Exponential"
    assert infotext_schedule("DPM++ 2M", "Automatic") == "Karras"
    assert infotext_schedule("Euler a", "Automatic") is None
    assert infotext_schedule("Euler a", "Karras") == "Karras"
    assert infotext_schedule("DDIM", "Karras") is None


def test_names_module_does_not_import_torch():
    code = "import sys, underpaint.sampling.names, underpaint.params; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
