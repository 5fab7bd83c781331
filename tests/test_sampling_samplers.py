"""Samplers against k-diffusion's functions of the same name and diffusers' DDIM / PNDM / UniPC.

A fixed small nonlinear toy denoiser (and a toy ε "UNet" for the timestep samplers) stands in
for the model; the same sigmas and the same noise go to both sides.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler, UniPCMultistepScheduler

from kdiff_ref import load_sampling
from underpaint.params import SamplerOptions
from underpaint.sampling import samplers as S
from underpaint.sampling import schedules as SC
from underpaint.sampling.denoisers import eps_denoiser
from underpaint.sampling.k_samplers import lms_coefficients
from underpaint.sampling.names import SAMPLERS, sampler_info

K = load_sampling()
MS = SC.ModelSchedule.from_alphas_cumprod(SC.sd_alphas_cumprod())
SHAPE = (2, 4, 6, 5)
_W = torch.linspace(-0.6, 0.6, 16).reshape(4, 4)


def toy_denoiser(x, sigma):
    """A fixed nonlinear function of x and σ; each image depends only on itself."""
    s = sigma.reshape(-1, 1, 1, 1)
    mixed = (_W @ x.flatten(2)).view_as(x)
    return torch.tanh(mixed / (1 + s)) * 0.8 + 0.05 * x / (s**2 + 1)


def toy_eps(x_in, t, cond=None):
    """A toy ε-predicting network of the input and the (fractional) timestep."""
    scale = (t.float().reshape(-1, 1, 1, 1) + 50) / 1000
    return torch.tanh((_W @ x_in.flatten(2)).view_as(x_in) * scale) + 0.3 * x_in * scale


def start(sigmas, seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)) * sigmas[0]


def noise_source(seed=1):
    g = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(SHAPE, generator=g)


class _TorchWithNoise:
    """Stands in for k-diffusion's ``torch`` so its churn draws come from a given source."""

    def __init__(self, draw):
        self._draw = draw

    def randn_like(self, x):
        return self._draw(None, None)

    def __getattr__(self, name):
        return getattr(torch, name)


KARRAS = SC.sigmas_karras(12, MS.sigma_min, MS.sigma_max)
EXPONENTIAL = SC.sigmas_exponential(9, MS.sigma_min, MS.sigma_max)
UNIFORM = SC.sigmas_uniform(7, MS)
CUT = SC.sigmas_karras(20, MS.sigma_min, MS.sigma_max)[8:]  # an img2img tail

DETERMINISTIC = ["sample_euler", "sample_heun", "sample_dpm_2", "sample_dpmpp_2m"]
WITH_NOISE = ["sample_euler_ancestral", "sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde",
              "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"]


@pytest.mark.parametrize("sigmas", [KARRAS, EXPONENTIAL, UNIFORM, CUT], ids=["karras", "exp", "uniform", "cut"])
@pytest.mark.parametrize("name", DETERMINISTIC + WITH_NOISE)
def test_matches_k_diffusion(name, sigmas):
    x = start(sigmas)
    extra = {"noise_sampler": noise_source()} if name in WITH_NOISE else {}
    expected = getattr(K, name)(toy_denoiser, x.clone(), sigmas, disable=True, **extra)
    got = getattr(S, name)(toy_denoiser, x.clone(), sigmas, noise=noise_source() if extra else None)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", WITH_NOISE)
def test_eta_and_s_noise_pass_through(name):
    x = start(KARRAS)
    options = {"eta": 0.6, "s_noise": 0.9}
    expected = getattr(K, name)(toy_denoiser, x.clone(), KARRAS, disable=True, noise_sampler=noise_source(), **options)
    got = getattr(S, name)(toy_denoiser, x.clone(), KARRAS, noise=noise_source(), **options)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_dpmpp_2m_sde_heun_and_eta_zero():
    x = start(EXPONENTIAL)
    for kwargs in ({"solver_type": "heun"}, {"eta": 0.0}, {"solver_type": "heun", "eta": 0.0}):
        expected = K.sample_dpmpp_2m_sde(toy_denoiser, x.clone(), EXPONENTIAL, disable=True,
                                         noise_sampler=noise_source(), **kwargs)
        got = S.sample_dpmpp_2m_sde(toy_denoiser, x.clone(), EXPONENTIAL, noise=noise_source(), **kwargs)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["sample_euler", "sample_heun", "sample_dpm_2"])
def test_churn_matches_k_diffusion(name, monkeypatch):
    churn = {"s_churn": 0.7, "s_tmin": 0.05, "s_tmax": 8.0, "s_noise": 1.003}
    x = start(KARRAS)
    monkeypatch.setattr(K, "torch", _TorchWithNoise(noise_source()))
    expected = getattr(K, name)(toy_denoiser, x.clone(), KARRAS, disable=True, **churn)
    monkeypatch.undo()
    got = getattr(S, name)(toy_denoiser, x.clone(), KARRAS, noise=noise_source(), **churn)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sigmas", [KARRAS, UNIFORM, CUT], ids=["karras", "uniform", "cut"])
def test_lms_matches_k_diffusion(sigmas):
    # k-diffusion integrates its coefficients numerically; ours are exact, hence the tolerance.
    x = start(sigmas)
    expected = K.sample_lms(toy_denoiser, x.clone(), sigmas, disable=True)
    got = S.sample_lms(toy_denoiser, x.clone(), sigmas)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    sigmas_np = sigmas.double().numpy()
    for i in range(len(sigmas) - 1):
        order = min(i + 1, 4)
        ours = lms_coefficients(sigmas_np, i, order)
        ref = [K.linear_multistep_coeff(order, sigmas_np, i, j) for j in range(order)]
        assert np.allclose(ours, ref, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpm_fast_and_adaptive_match_k_diffusion(eta):
    x = start(KARRAS)
    lo, hi = MS.sigma_min, MS.sigma_max
    for n in (7, 9, 10):
        expected = K.sample_dpm_fast(toy_denoiser, x.clone(), lo, hi, n, disable=True, eta=eta,
                                     noise_sampler=noise_source())
        got = S.sample_dpm_fast(toy_denoiser, x.clone(), lo, hi, n, eta=eta, noise=noise_source())
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    for order in (2, 3):
        expected = K.sample_dpm_adaptive(toy_denoiser, x.clone(), lo, hi, disable=True, order=order, eta=eta,
                                         noise_sampler=noise_source())
        got = S.sample_dpm_adaptive(toy_denoiser, x.clone(), lo, hi, order=order, eta=eta, noise=noise_source())
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_restart_is_heun_below_20_steps():
    x = start(KARRAS)
    expected = K.sample_heun(toy_denoiser, x.clone(), KARRAS, disable=True)
    torch.testing.assert_close(S.sample_restart(toy_denoiser, x.clone(), KARRAS), expected, rtol=1e-6, atol=1e-6)


def test_restart_with_20_steps_restarts_once_from_0_1_to_2():
    sigmas = SC.sigmas_karras(20, MS.sigma_min, MS.sigma_max)
    x = start(sigmas)
    got = S.sample_restart(toy_denoiser, x.clone(), sigmas, noise=noise_source())
    # A1111: Karras over 20 - 9 steps; after the sigma nearest 0.1, jump back up to the one nearest 2
    # and come down again in 9 Karras sub-steps.
    main = SC.sigmas_karras(11, sigmas[-2].item(), sigmas[0].item())
    low = int(torch.argmin((main - 0.1).abs()))
    high = int(torch.argmin((main - 2).abs()))
    segment = SC.sigmas_karras(10, main[low].item(), main[high].item())[:-1]
    draw = noise_source()
    y = K.sample_heun(toy_denoiser, x.clone(), main[: low + 1], disable=True)
    y = y + draw(None, None) * (main[high] ** 2 - main[low] ** 2) ** 0.5
    y = K.sample_heun(toy_denoiser, y, segment, disable=True)
    y = K.sample_heun(toy_denoiser, y, main[low:], disable=True)
    torch.testing.assert_close(got, y, rtol=1e-5, atol=1e-5)


def test_lcm_jumps_to_the_estimate_and_renoises():
    x = start(UNIFORM)
    got = S.sample_lcm(toy_denoiser, x.clone(), UNIFORM, noise=noise_source())
    draw, y = noise_source(), x.clone()
    for i in range(len(UNIFORM) - 1):
        y = toy_denoiser(y, UNIFORM[i] * torch.ones(SHAPE[0]))
        if UNIFORM[i + 1] > 0:
            y = y + UNIFORM[i + 1] * draw(None, None)
    torch.testing.assert_close(got, y)


def _recording_toy(x, sigma):
    """:func:`toy_denoiser` leaving a negative prompt's noise for the CFG++ samplers, as the pipeline's does."""
    from underpaint.sampling._common import LAST_UNCOND_NOISE

    LAST_UNCOND_NOISE.value = (x - 0.5 * torch.tanh(x)) / sigma.reshape(-1, 1, 1, 1)
    return toy_denoiser(x, sigma)


def test_callback_sees_every_step_and_can_stop():
    seen = []

    def record(i, total, x, denoised):
        seen.append((i, total))

    S.sample_euler(toy_denoiser, start(KARRAS), KARRAS, callback=record)
    assert seen == [(i, 12) for i in range(12)]
    for info in SAMPLERS:
        if "timestep" in info.flags:
            continue
        stopped_at = {}

        def stop_at_two(i, total, x, denoised):
            if i == 2:
                stopped_at["denoised"] = denoised
                return S.STOP
            return None

        denoiser = _recording_toy if "cfgpp" in info.flags else toy_denoiser
        out = S.run_sampler(info.label, denoiser, start(KARRAS), KARRAS, noise_sampler=noise_source(),
                            callback=stop_at_two, options=SamplerOptions(), model_schedule=MS)
        assert out is stopped_at["denoised"], info.label


def test_noise_is_required_where_it_is_used():
    with pytest.raises(ValueError, match="noise"):
        S.sample_euler_ancestral(toy_denoiser, start(KARRAS), KARRAS)
    with pytest.raises(ValueError, match="noise"):
        S.sample_euler(toy_denoiser, start(KARRAS), KARRAS, s_churn=1.0)
    S.sample_dpmpp_2m_sde(toy_denoiser, start(KARRAS), KARRAS, eta=0.0)


def test_run_sampler_passes_a1111_options():
    x = start(KARRAS)
    options = SamplerOptions(eta=0.5, s_noise=0.8, s_churn=0.3)
    # Euler a takes eta but, as in A1111, not s_noise.
    got = S.run_sampler("Euler a", toy_denoiser, x.clone(), KARRAS, noise_sampler=noise_source(), options=options)
    expected = K.sample_euler_ancestral(toy_denoiser, x.clone(), KARRAS, disable=True, eta=0.5,
                                        noise_sampler=noise_source())
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    got = S.run_sampler("DPM++ 2M SDE Heun", toy_denoiser, x.clone(), KARRAS, noise_sampler=noise_source(),
                        options=SamplerOptions())
    expected = K.sample_dpmpp_2m_sde(toy_denoiser, x.clone(), KARRAS, disable=True, solver_type="heun",
                                     noise_sampler=noise_source())
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert S.sampler_kwargs(sampler_info("DPM fast"), None) == {"eta": 1.0, "s_noise": 1.0}
    assert S.sampler_kwargs(sampler_info("DDIM"), None) == {"eta": 0.0}
    assert S.sampler_kwargs(sampler_info("Euler"), options) == {"s_churn": 0.3, "s_tmin": 0.0,
                                                              "s_tmax": math.inf, "s_noise": 0.8}
    # DPM fast runs over the list's range with its length as the number of model calls.
    got = S.run_sampler("DPM fast", toy_denoiser, x.clone(), CUT, noise_sampler=noise_source())
    expected = K.sample_dpm_fast(toy_denoiser, x.clone(), CUT[-2], CUT[0], len(CUT) - 1, disable=True, eta=1.0,
                                 noise_sampler=noise_source())
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


# --- timestep samplers --------------------------------------------------------------------


def _ddpm():
    kwargs = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                  set_alpha_to_one=False)
    return kwargs


def _reference_loop(scheduler, sample, first_t, eta=0.0, noise=None):
    """Step a diffusers scheduler from ``first_t`` until it reaches timestep 1, as A1111 stops."""
    for t in scheduler.timesteps:
        if t > first_t:
            continue
        if t == 1:
            break
        eps = toy_eps(sample, torch.full((sample.shape[0],), float(t)))
        if isinstance(scheduler, DDIMScheduler):
            z = None if noise is None else noise(None, None)
            sample = scheduler.step(eps, t, sample, eta=eta, variance_noise=z).prev_sample
        else:
            sample = scheduler.step(eps, t, sample).prev_sample
    return sample


def _ours(label, steps, strength=None, eta=None, seed=3, schedule=None, order=3):
    schedule = schedule or MS
    denoiser = eps_denoiser(toy_eps, schedule)
    full = SC.build_sigmas(label, "Automatic", steps, schedule)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed + 1)) * 0.8
    if strength is None:
        x, sigmas = S.prepare_start(label, noise, full, model_schedule=schedule)
    else:
        cut = SC.img2img_sigmas(lambda n: SC.build_sigmas(label, "Automatic", n, schedule), steps, strength, False,
                                count_from_end=True)
        x, sigmas = S.prepare_start(label, noise, cut, init=init, model_schedule=schedule)
    out = S.run_sampler(label, lambda a, b: denoiser(a, b, None), x, sigmas,
                        noise_sampler=noise_source(), options=SamplerOptions(eta=eta, unipc_order=order),
                        model_schedule=schedule)
    return out, noise, init


@pytest.mark.parametrize("steps", [10, 20, 25])
def test_ddim_txt2img_matches_diffusers_on_a1111_grid(steps):
    scheduler = DDIMScheduler(**_ddpm(), clip_sample=False, timestep_spacing="leading")
    scheduler.set_timesteps(steps)
    schedule = SC.ModelSchedule.from_alphas_cumprod(scheduler.alphas_cumprod)
    got, noise, _ = _ours("DDIM", steps, schedule=schedule)
    expected = _reference_loop(scheduler, noise.clone(), scheduler.timesteps[0])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strength", [0.3, 0.5, 0.75])
def test_ddim_img2img_matches_a1111_start_and_stop(strength):
    steps = 20
    scheduler = DDIMScheduler(**_ddpm(), clip_sample=False, timestep_spacing="leading")
    scheduler.set_timesteps(steps)
    schedule = SC.ModelSchedule.from_alphas_cumprod(scheduler.alphas_cumprod)
    got, noise, init = _ours("DDIM", steps, strength, schedule=schedule)
    # A1111: noise to grid timestep t_enc, then denoise from grid timestep t_enc - 1 down to 1.
    t_enc = int(strength * steps)
    grid = [1 + k * (1000 // steps) for k in range(steps)]
    a = scheduler.alphas_cumprod[grid[t_enc]]
    xi = a.sqrt() * init + (1 - a).sqrt() * noise
    expected = _reference_loop(scheduler, xi, grid[t_enc - 1])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_ddim_with_eta_matches_diffusers():
    steps = 10
    scheduler = DDIMScheduler(**_ddpm(), clip_sample=False, timestep_spacing="leading")
    scheduler.set_timesteps(steps)
    schedule = SC.ModelSchedule.from_alphas_cumprod(scheduler.alphas_cumprod)
    got, noise, _ = _ours("DDIM", steps, eta=0.7, schedule=schedule)
    expected = _reference_loop(scheduler, noise.clone(), scheduler.timesteps[0], eta=0.7, noise=noise_source())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-5)


def _toy_uncond_eps(x_in, t, cond=None):
    """A second toy ε network: the negative prompt's prediction beside :func:`toy_eps`."""
    return 0.7 * toy_eps(x_in, t) - 0.2 * torch.tanh(x_in)


@pytest.mark.parametrize("cfg, eta", [(7.0, 0.0), (12.5, 0.0), (5.0, 0.6)])
def test_ddim_cfgpp_is_the_papers_update_on_a1111s_grid(cfg, eta):
    """DDIM CFG++ (Chung et al. 2024) in DDPM terms on diffusers' DDIM grid (A1111's): x0 from the guided ε
    with λ = CFG / 12.5, then x_prev = sqrt(ᾱ_prev)·x0 + sqrt(1 − ᾱ_prev − σ²)·ε_∅ + σ·z. Ours runs in σ
    space with the guided denoiser and ε_∅ left by it for the sampler."""
    from underpaint.sampling._common import LAST_UNCOND_NOISE

    steps = 10
    scheduler = DDIMScheduler(**_ddpm(), clip_sample=False, timestep_spacing="leading")
    scheduler.set_timesteps(steps)
    schedule = SC.ModelSchedule.from_alphas_cumprod(scheduler.alphas_cumprod)
    lam = cfg / 12.5
    on_cond, on_uncond = eps_denoiser(toy_eps, schedule), eps_denoiser(_toy_uncond_eps, schedule)

    def guided(x, sigma):
        c, u = on_cond(x, sigma, None), on_uncond(x, sigma, None)
        LAST_UNCOND_NOISE.value = (x - u) / sigma.reshape(-1, 1, 1, 1)
        return u + (c - u) * lam

    full = SC.build_sigmas("DDIM CFG++", "Automatic", steps, schedule)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    x, sigmas = S.prepare_start("DDIM CFG++", noise, full, model_schedule=schedule)
    got = S.run_sampler("DDIM CFG++", guided, x, sigmas, noise_sampler=noise_source(),
                        options=SamplerOptions(eta=eta), model_schedule=schedule)
    # the reference: A1111's loop in DDPM scale, down to timestep 1
    alphas, sample, draw = scheduler.alphas_cumprod.double(), noise.clone().double(), noise_source()
    ts = [int(t) for t in scheduler.timesteps]
    for k, t in enumerate(ts):
        if t == 1:
            break
        prev = ts[k + 1]
        tt = torch.full((SHAPE[0],), float(t))
        e_c, e_u = toy_eps(sample.float(), tt).double(), _toy_uncond_eps(sample.float(), tt).double()
        e = e_u + lam * (e_c - e_u)
        a, a_prev = alphas[t], alphas[prev]
        x0 = (sample - (1 - a).sqrt() * e) / a.sqrt()
        sig = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        z = draw(None, None).double() if eta else 0
        sample = a_prev.sqrt() * x0 + (1 - a_prev - sig**2).sqrt() * e_u + sig * z
    torch.testing.assert_close(got.double(), sample, rtol=1e-4, atol=2e-5)
    assert not torch.allclose(got, S.run_sampler("DDIM", guided, x, sigmas, noise_sampler=noise_source(),
                                                 options=SamplerOptions(eta=eta), model_schedule=schedule))


@pytest.mark.parametrize("label, eta", [("Euler CFG++", None), ("Euler a CFG++", 1.0), ("Euler a CFG++", 0.5)])
def test_comfyuis_euler_cfgpp_samplers(label, eta):
    """ComfyUI's euler_cfg_pp / euler_ancestral_cfg_pp: x0 from the guided prediction (the scale as given),
    then x_next = x0 + σ_down·ε_∅ (σ_down = σ_next without ancestral noise), plus σ_up of fresh noise; the
    ancestral split is k-diffusion's."""
    from underpaint.sampling._common import LAST_UNCOND_NOISE

    scale = 1.5
    cond = toy_denoiser

    def uncond(x, sigma):
        return 0.6 * toy_denoiser(x, sigma) + 0.1 * torch.tanh(x)

    def guided(x, sigma):
        c, u = cond(x, sigma), uncond(x, sigma)
        LAST_UNCOND_NOISE.value = (x - u) / sigma.reshape(-1, 1, 1, 1)
        return u + (c - u) * scale

    sigmas = KARRAS
    x = start(sigmas)
    got = S.run_sampler(label, guided, x, sigmas, noise_sampler=noise_source(),
                        options=SamplerOptions(eta=eta))
    draw, want = noise_source(), x.clone()
    for i in range(len(sigmas) - 1):
        s = torch.full((SHAPE[0],), float(sigmas[i]))
        c, u = cond(want, s), uncond(want, s)
        denoised, d = u + (c - u) * scale, (want - u) / sigmas[i]
        if label == "Euler CFG++":
            want = denoised + d * sigmas[i + 1]
        else:
            down, up = K.get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
            want = denoised + d * down
            if sigmas[i + 1] > 0:
                want = want + draw(None, None) * up
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_ddim_cfgpp_refuses_a_denoiser_that_leaves_no_uncond_noise():
    from underpaint.sampling._common import LAST_UNCOND_NOISE

    LAST_UNCOND_NOISE.value = None
    sigmas = SC.build_sigmas("DDIM CFG++", "Automatic", 4, MS)
    with pytest.raises(RuntimeError, match="unconditional noise"):
        S.run_sampler("DDIM CFG++", toy_denoiser, start(sigmas), sigmas, model_schedule=MS)


@pytest.mark.parametrize("steps", [10, 20])
def test_plms_matches_diffusers_pndm(steps):
    scheduler = PNDMScheduler(**{k: v for k, v in _ddpm().items() if k != "set_alpha_to_one"},
                              skip_prk_steps=True, set_alpha_to_one=False, timestep_spacing="leading")
    scheduler.set_timesteps(steps)
    schedule = SC.ModelSchedule.from_alphas_cumprod(scheduler.alphas_cumprod)
    got, noise, _ = _ours("PLMS", steps, schedule=schedule)
    expected = _reference_loop(scheduler, noise.clone(), scheduler.timesteps[0])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-5)


def _unipc_times(start_t, steps, alphas_cumprod):
    """A1111's UniPC times and their σ (float64, from log ᾱ interpolated linearly in t)."""
    ts = np.linspace(start_t, 0.001, steps + 1)
    knots = np.linspace(0, 1, 1001)[1:]
    log_alpha = np.interp(ts, knots, 0.5 * np.log(alphas_cumprod.double().numpy()))
    alpha = np.exp(log_alpha)
    return ts, np.sqrt(1 - alpha**2) / alpha


@pytest.mark.parametrize("steps, strength, order", [(10, None, 3), (20, None, 3), (4, None, 3), (20, 0.6, 3),
                                                   (10, None, 1), (10, None, 2), (12, 0.5, 2), (10, None, 4)])
def test_unipc_matches_diffusers_unipc_on_a1111_times(steps, strength, order):
    """A1111's UniPC (bh1, lower orders at the start and the end) at its "UniPC order" setting equals
    diffusers' UniPCMultistepScheduler of that solver order on the same times."""
    schedule = MS
    got, noise, init = _ours("UniPC", steps, strength, schedule=schedule, order=order)
    if strength is None:
        start_t, n, sample = 1.0, steps, noise.clone()
    else:
        t_enc = int(strength * steps)
        grid = [1 + k * (1000 // steps) for k in range(steps)]
        a = schedule.alphas_cumprod[grid[t_enc]]
        start_t, n, sample = (grid[t_enc - 1] + 1) / 1000, t_enc, a.sqrt() * init + (1 - a).sqrt() * noise
    _, sigmas = _unipc_times(start_t, n, schedule.alphas_cumprod)
    scheduler = UniPCMultistepScheduler(solver_order=min(order, n), solver_type="bh1", predict_x0=True,
                                        lower_order_final=True, final_sigmas_type="sigma_min")
    scheduler.set_timesteps(n)
    scheduler.sigmas = torch.tensor(sigmas, dtype=torch.float32)
    model_t = schedule.sigma_to_t(torch.tensor(sigmas, dtype=torch.float32))
    for i, t in enumerate(scheduler.timesteps):
        eps = toy_eps(sample, model_t[i].expand(sample.shape[0]))
        sample = scheduler.step(eps, t, sample).prev_sample
    torch.testing.assert_close(got, sample, rtol=1e-4, atol=2e-5)


def test_unipc_model_times_are_a1111s():
    # The σ-space call lands on A1111's model timesteps (t − 1/T)·T to within 0.01 of a step.
    ts, sigmas = _unipc_times(1.0, 20, MS.alphas_cumprod)
    model_t = MS.sigma_to_t(torch.tensor(sigmas, dtype=torch.float32)).double().numpy()
    assert np.allclose(model_t, (ts - 0.001) * 1000, atol=0.01)
