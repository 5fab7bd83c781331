"""Sigma schedules against k-diffusion, diffusers, scipy and A1111 1.10's formulas."""

import math

import numpy as np
import pytest
import scipy.stats
import torch
from diffusers import EulerDiscreteScheduler

from kdiff_ref import load_external, load_sampling
from underpaint.errors import InvalidParameter
from underpaint.params import SamplerOptions
from underpaint.sampling import schedules as S
from underpaint.sampling.names import SAMPLERS, SCHEDULES

K = load_sampling()
EXT = load_external()
AC = S.sd_alphas_cumprod()
MS = S.ModelSchedule.from_alphas_cumprod(AC)
LO, HI = MS.sigma_min, MS.sigma_max
STEPS = [1, 2, 4, 10, 20, 33]


def _discrete():
    return EXT.DiscreteSchedule(((1 - AC) / AC) ** 0.5, False)


def test_sd_alphas_cumprod_is_the_scaled_linear_schedule():
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    assert torch.equal(AC, torch.tensor(np.cumprod(1 - betas), dtype=torch.float32))
    diffusers_ac = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    assert torch.allclose(AC, diffusers_ac, rtol=1e-5)


def test_model_schedule_matches_k_diffusion_discrete_schedule():
    ref = _discrete()
    assert torch.equal(MS.sigmas, ref.sigmas)
    assert LO == ref.sigma_min.item() and HI == ref.sigma_max.item()
    sigmas = torch.tensor([0.0292, 0.03, 0.5, 1.0, 2.0, 5.0, 14.0, 14.6146])
    assert torch.equal(MS.sigma_to_t(sigmas), ref.sigma_to_t(sigmas))
    t = torch.tensor([0.0, 0.5, 1.0, 17.25, 500.0, 998.9, 999.0])
    assert torch.equal(MS.t_to_sigma(t), ref.t_to_sigma(t))


@pytest.mark.parametrize("n", STEPS)
def test_k_diffusion_schedules_are_identical(n):
    ref = _discrete()
    assert torch.equal(S.sigmas_uniform(n, MS), ref.get_sigmas(n))
    assert torch.equal(S.sigmas_karras(n, LO, HI), K.get_sigmas_karras(n, LO, HI))
    assert torch.equal(S.sigmas_karras(n, 0.1, 10.0, rho=3.0), K.get_sigmas_karras(n, 0.1, 10.0, rho=3.0))
    assert torch.equal(S.sigmas_exponential(n, LO, HI), K.get_sigmas_exponential(n, LO, HI))
    assert torch.equal(S.sigmas_polyexponential(n, LO, HI), K.get_sigmas_polyexponential(n, LO, HI))
    assert torch.equal(S.sigmas_polyexponential(n, LO, HI, 2.5), K.get_sigmas_polyexponential(n, LO, HI, 2.5))


def test_uniform_equals_diffusers_euler_at_integer_timesteps():
    for n in (4, 10):
        sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       timestep_spacing="linspace")
        sched.set_timesteps(n)
        assert torch.allclose(S.sigmas_uniform(n, MS), sched.sigmas.float(), rtol=2e-5)
    expected = torch.tensor([14.6146, 2.9183, 0.9324, 0.0292, 0.0])
    assert torch.allclose(S.sigmas_uniform(4, MS), expected, atol=1e-4)


@pytest.mark.parametrize("n", STEPS)
def test_model_based_schedules_follow_a1111_formulas(n):
    ref = _discrete()
    t_max = ref.sigma_to_t(torch.tensor(HI))
    t_min = ref.sigma_to_t(torch.tensor(LO))
    sgm = [ref.t_to_sigma(t).item() for t in torch.linspace(t_max, t_min, n + 1)[:-1]]
    assert torch.equal(S.sigmas_sgm_uniform(n, LO, HI, MS), torch.tensor(sgm + [0.0]))
    normal = [ref.t_to_sigma(t).item() for t in torch.linspace(t_max, t_min, n)]
    assert torch.equal(S.sigmas_normal(n, LO, HI, MS), torch.tensor(normal + [0.0]))
    simple = [MS.sigmas[999 - int(i * 1000 / n)].item() for i in range(n)]
    assert torch.equal(S.sigmas_simple(n, MS), torch.tensor(simple + [0.0]))
    ddim = [MS.sigmas[t].item() for t in range(1, 1000, max(1000 // n, 1))][::-1]
    assert torch.equal(S.sigmas_ddim(n, MS), torch.tensor(ddim + [0.0]))


def test_ddim_and_timestep_grids():
    grid = S.sigmas_timesteps(20, MS)
    assert torch.equal(grid[:-1], MS.sigmas[torch.arange(951, 0, -50)])
    assert grid[-1] == 0 and len(grid) == 21
    assert torch.equal(grid, S.sigmas_ddim(20, MS))
    # 1000 is not a multiple of 30: A1111 makes 31 timesteps (1, 34, ..., 991).
    assert len(S.sigmas_timesteps(30, MS)) == 32
    assert torch.equal(S.sigmas_timesteps(30, MS)[0], MS.sigmas[991])


@pytest.mark.parametrize("n", STEPS)
def test_beta_schedule_matches_scipy(n):
    quantiles = scipy.stats.beta.ppf(1 - np.linspace(0, 1, n), 0.6, 0.6)
    expected = torch.tensor(list(LO + quantiles * (HI - LO)) + [0.0], dtype=torch.float32)
    assert torch.equal(S.sigmas_beta(n, LO, HI), expected)
    q = np.linspace(0, 1, 41)
    for a, b in [(0.6, 0.6), (0.5, 0.7), (2.0, 3.0)]:
        mine = np.array([S._beta_ppf(v, a, b) for v in q])
        assert np.allclose(mine, scipy.stats.beta.ppf(q, a, b), rtol=0, atol=1e-13)


def test_align_your_steps_tables_and_interpolation():
    assert torch.equal(S.sigmas_align_your_steps(11), torch.tensor(list(S.AYS_SD15) + [0.0]))
    assert torch.equal(S.sigmas_align_your_steps(11, "sdxl"), torch.tensor(list(S.AYS_SDXL) + [0.0]))
    for n in (5, 20, 30):
        for family, table in (("sd1", S.AYS_SD15), ("sdxl", S.AYS_SDXL), ("sd2", S.AYS_SD15)):
            log_table = np.log(np.array(table))
            positions = np.linspace(0, len(table) - 1, n)
            expected = np.exp(np.interp(positions, np.arange(len(table)), log_table))
            got = S.sigmas_align_your_steps(n, family)
            assert len(got) == n + 1 and got[-1] == 0
            assert np.allclose(got[:-1].numpy(), expected, rtol=1e-6)


def test_kl_optimal_ends_at_sigma_min_like_a1111():
    for n in (1, 5, 20):
        got = S.sigmas_kl_optimal(n, LO, HI)
        frac = np.arange(n + 1) / n
        expected = np.tan(frac * math.atan(LO) + (1 - frac) * math.atan(HI))
        assert len(got) == n + 1
        assert np.allclose(got.numpy(), expected, rtol=1e-5)
        assert got[-1] == pytest.approx(LO, rel=1e-5)


def test_lcm_schedule_spreads_over_the_50_lcm_timesteps():
    grid = S.lcm_grid(MS)
    assert torch.equal(grid.alphas_cumprod, AC[19::20])
    sigmas = S.sigmas_lcm(4, MS)
    assert torch.allclose(sigmas[[0, 3]], MS.sigmas[[999, 19]])
    assert sigmas[-1] == 0 and len(sigmas) == 5
    positions = torch.linspace(49, 0, 4)
    assert torch.allclose(sigmas[:-1], EXT.DiscreteSchedule(grid.sigmas, False).t_to_sigma(positions), rtol=1e-6)


def test_every_schedule_ends_in_zero_and_decreases():
    for info in SCHEDULES:
        for sampler in ("Euler", "DPM2"):
            sigmas = S.build_sigmas(sampler, info.label, 12, MS, SamplerOptions())
            # DDIM's grid has ceil(1000 / (1000 // n)) entries: 13 for n = 12 (A1111 and ComfyUI alike).
            assert len(sigmas) == (14 if info.label == "DDIM" else 13), info.label
            if info.label != "KL Optimal":
                assert sigmas[-1] == 0, info.label
            assert torch.all(sigmas[:-1] > sigmas[1:]) or info.label == "Beta", info.label


def test_build_sigmas_resolves_automatic_and_discards_penultimate():
    assert torch.equal(S.build_sigmas("Euler", "Automatic", 20, MS), S.sigmas_uniform(20, MS))
    assert torch.equal(S.build_sigmas("DPM++ 2M", "Automatic", 20, MS), S.sigmas_karras(20, LO, HI))
    assert torch.equal(S.build_sigmas("DPM++ 2M SDE", "Automatic", 20, MS), S.sigmas_exponential(20, LO, HI))
    full = S.sigmas_karras(21, LO, HI)
    dpm2 = S.build_sigmas("DPM2", "Automatic", 20, MS)
    assert len(dpm2) == 21 and torch.equal(dpm2, torch.cat([full[:-2], full[-1:]]))
    forced = S.build_sigmas("Euler", "Automatic", 20, MS, SamplerOptions(discard_penultimate_sigma=True))
    uniform = S.sigmas_uniform(21, MS)
    assert torch.equal(forced, torch.cat([uniform[:-2], uniform[-1:]]))
    for info in SAMPLERS:
        assert len(S.build_sigmas(info.label, "Automatic", 20, MS)) == 21, info.label


def test_build_sigmas_overrides_like_a1111():
    options = SamplerOptions(sigma_min=0.1, sigma_max=10.0, rho=5.0)
    assert torch.equal(S.build_sigmas("Euler", "Karras", 8, MS, options), S.sigmas_karras(8, 0.1, 10.0, 5.0))
    assert torch.equal(S.build_sigmas("Euler", "Exponential", 8, MS, options), S.sigmas_exponential(8, 0.1, 10.0))
    assert torch.equal(S.build_sigmas("Euler", "Polyexponential", 8, MS, options),
                       S.sigmas_polyexponential(8, 0.1, 10.0, 5.0))
    # Automatic (the model's own timesteps) ignores the range settings, as in A1111.
    assert torch.equal(S.build_sigmas("Euler", "Automatic", 8, MS, options), S.sigmas_uniform(8, MS))
    # 0 means "not set".
    unset = SamplerOptions(sigma_min=0.0, sigma_max=0.0, rho=0.0)
    assert torch.equal(S.build_sigmas("Euler", "Karras", 8, MS, unset), S.sigmas_karras(8, LO, HI))
    assert torch.equal(S.build_sigmas("Euler", "Align Your Steps", 10, MS, family="sdxl"),
                       S.sigmas_align_your_steps(10, "sdxl"))


def test_timestep_samplers_use_the_ddpm_grid_and_lcm_its_own():
    for label in ("DDIM", "PLMS", "UniPC"):
        assert torch.equal(S.build_sigmas(label, "Karras", 20, MS), S.sigmas_timesteps(20, MS))
    assert torch.equal(S.build_sigmas("LCM", "Automatic", 6, MS), S.sigmas_lcm(6, MS))
    grid = S.lcm_grid(MS)
    assert torch.equal(S.build_sigmas("LCM", "Karras", 6, MS), S.sigmas_karras(6, grid.sigma_min, grid.sigma_max))
    with pytest.raises(InvalidParameter):
        S.build_sigmas("Euler", "Automatic", 0, MS)


def _builder(sampler="Euler"):
    return lambda n: S.build_sigmas(sampler, "Automatic", n, MS)


def test_img2img_cut_follows_a1111():
    full = _builder()(20)
    cut = S.img2img_sigmas(_builder(), 20, 0.5, False)
    assert len(cut) - 1 == 11 and torch.equal(cut, full[9:])
    fixed = S.img2img_sigmas(_builder(), 20, 0.5, True)
    assert len(fixed) - 1 == 20 and torch.equal(fixed, _builder()(40)[20:])
    assert torch.equal(S.img2img_sigmas(_builder(), 20, 1.0, False), full)
    assert len(S.img2img_sigmas(_builder(), 20, 0.75, False)) - 1 == 16
    assert len(S.img2img_sigmas(_builder(), 20, 0.01, False)) - 1 == 1
    assert S.img2img_steps(20, 0.5, False) == (20, 10)
    assert S.img2img_steps(20, 0.5, True) == (40, 19)
    assert S.img2img_steps(15, 0.3, True) == (50, 14)
    assert S.img2img_steps(20, 0.0, False) == S.img2img_steps(20, 0.0, True) == (20, 0)
    with pytest.raises(InvalidParameter):
        S.img2img_steps(20, 1.5, False)


def test_img2img_cut_runs_the_same_steps_as_diffusers_at_the_adjusted_strength():
    n = 10
    for strength in (0.3, 0.5, 0.75, 0.9):
        cut = S.img2img_sigmas(_builder(), n, strength, False)
        t_enc = int(min(strength, 0.999) * n)
        sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       timestep_spacing="linspace")
        sched.set_timesteps(n)
        init_timestep = min(int(n * (t_enc + 1) / n), n)
        kept = sched.sigmas[n - init_timestep:]
        assert len(kept) == len(cut)
        assert torch.allclose(cut, kept.float(), rtol=2e-5)


def test_img2img_cut_for_timestep_samplers_counts_from_the_end():
    builder = _builder("DDIM")
    cut = S.img2img_sigmas(builder, 30, 0.5, False, count_from_end=True)
    full = builder(30)
    # t_enc = 15: A1111 noises to timestep index 15 of 31 and runs down from there.
    assert torch.equal(cut, full[len(full) - 2 - 15:])
    assert torch.equal(cut[0], MS.sigmas[1 + 15 * 33])
    # When the grid has exactly N entries both counts agree.
    assert torch.equal(S.img2img_sigmas(builder, 20, 0.5, False, count_from_end=True),
                       S.img2img_sigmas(builder, 20, 0.5, False))
