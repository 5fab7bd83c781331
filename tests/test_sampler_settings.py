"""A1111's sampler settings beyond the request fields: "SGM noise multiplier" (txt2img's start noise
scaled by sqrt(1 + σ₀²), as Stability's SGM code starts SDXL, instead of σ₀; k-diffusion samplers only;
checked against diffusers, whose Euler scheduler starts that way with "leading" timestep spacing), the
Beta schedule's alpha and beta (against scipy's Beta quantiles), and "UniPC order" (its sampler is
checked in test_sampling_samplers); each through the CLI, the API and the infotext."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from underpaint.params import GenerationParams

BASE = dict(prompt="a stone bridge", negative_prompt="blurry", seed=77, rng="cpu", steps=6, sampler="Euler",
            scheduler="Automatic", width=64, height=64, cfg_scale=6.0)


def test_the_start_is_scaled_only_for_k_diffusion_txt2img():
    from underpaint.sampling.samplers import prepare_start

    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas = torch.tensor([14.6, 3.0, 0.5, 0.0])
    x, _ = prepare_start("Euler", noise, sigmas, sgm=True)
    torch.testing.assert_close(x, noise * (1 + 14.6**2) ** 0.5)
    plain, _ = prepare_start("Euler", noise, sigmas)
    torch.testing.assert_close(plain, noise * 14.6)
    init = torch.ones_like(noise)
    with_picture, _ = prepare_start("Euler", noise, sigmas, init=init, sgm=True)  # img2img: as without it
    torch.testing.assert_close(with_picture, init + noise * 14.6)
    ddim, _ = prepare_start("DDIM", noise, sigmas, sgm=True)  # timestep samplers start from unit noise anyway
    torch.testing.assert_close(ddim, prepare_start("DDIM", noise, sigmas)[0])


@pytest.mark.parametrize("sgm", [True, False])
def test_euler_from_the_start_is_diffusers_euler_with_its_start(sgm):
    """Euler from the SGM start equals diffusers' EulerDiscreteScheduler given the same sigmas with
    "leading" spacing, whose start is noise · sqrt(1 + σ₀²); from the plain start, the same scheduler
    with "linspace" spacing (noise · σ₀). A toy ε-network; each is told from the other's reference."""
    from diffusers import EulerDiscreteScheduler
    from test_sampling_samplers import MS, SHAPE, toy_eps

    from underpaint.sampling.denoisers import eps_denoiser
    from underpaint.sampling.samplers import prepare_start, run_sampler
    from underpaint.sampling.schedules import build_sigmas

    sigmas = build_sigmas("Euler", "Automatic", 8, MS)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    x, run = prepare_start("Euler", noise, sigmas, sgm=sgm)
    denoiser = eps_denoiser(toy_eps, MS)
    ours = run_sampler("Euler", lambda a, b: denoiser(a, b, None), x, run)

    def reference(spacing):
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           num_train_timesteps=1000, timestep_spacing=spacing)
        scheduler.set_timesteps(sigmas=sigmas.tolist())  # the last one is the end (0)
        sample = noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            eps = toy_eps(scheduler.scale_model_input(sample, t), t.expand(SHAPE[0]))
            sample = scheduler.step(eps, t, sample).prev_sample
        return sample

    mine, other = ("leading", "linspace") if sgm else ("linspace", "leading")
    torch.testing.assert_close(ours, reference(mine), rtol=1e-4, atol=2e-5)
    assert (ours - reference(other)).abs().max() > 1e-3


def test_the_engine_passes_it_on_for_txt2img(sd1_engine):
    """The engine's txt2img starts from the scaled noise (another picture) and records it."""
    on = sd1_engine.generate(GenerationParams(**BASE, sgm_noise_multiplier=True))
    off = sd1_engine.generate(GenerationParams(**BASE))
    assert "SGM noise multiplier: True" in on.infotexts[0] and "SGM noise multiplier" not in off.infotexts[0]
    assert on.images[0].tobytes() != off.images[0].tobytes()


def test_infotext_only_where_it_applied(sd1_engine, photo):
    img2img = sd1_engine.generate(GenerationParams(**{**BASE, "steps": 2}, init_images=(photo,), strength=0.5,
                                                   sgm_noise_multiplier=True))
    assert "SGM noise multiplier" not in img2img.infotexts[0]
    ddim = sd1_engine.generate(GenerationParams(**{**BASE, "steps": 2, "sampler": "DDIM"}, sgm_noise_multiplier=True))
    assert "SGM noise multiplier" not in ddim.infotexts[0]


def test_cli_api_and_infotext_both_ways(api):
    from underpaint.cli.generate import params_from_args
    from underpaint.cli.main import build_parser
    from underpaint.imageio.infotext import parse_infotext
    from underpaint.pipeline.reproduce import params_from_infotext

    assert params_from_args(build_parser().parse_args(["txt2img", "-p", "x", "--sgm-noise-multiplier"])
                            ).sgm_noise_multiplier
    assert not params_from_args(build_parser().parse_args(["txt2img", "-p", "x"])).sgm_noise_multiplier
    fields = params_from_infotext(parse_infotext("x\nSteps: 4, Seed: 1, SGM noise multiplier: True, UniPC order: 2"))
    assert fields["sgm_noise_multiplier"] and fields["sampler_options"].unipc_order == 2

    client, backend = api
    assert client.get("/sdapi/v1/options").json()["sgm_noise_multiplier"] is False
    for body in ({"steps": 1}, {"steps": 1, "override_settings": {"sgm_noise_multiplier": True, "uni_pc_order": 2}},
                 {"infotext": "x\nSteps: 1, Seed: 1, SGM noise multiplier: True, UniPC order: 4"}):
        assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200
    assert client.post("/sdapi/v1/options", json={"sgm_noise_multiplier": True, "uni_pc_order": 5}).status_code == 200
    assert client.post("/sdapi/v1/txt2img", json={"steps": 1}).status_code == 200
    assert [(p.sgm_noise_multiplier, p.sampler_options.unipc_order) for p in backend.params] == [
        (False, 3), (True, 2), (True, 4), (True, 5)]
    for body, field in (({"steps": 1, "override_settings": {"uni_pc_order": 0}}, "override_settings.uni_pc_order"),
                        ({"steps": 1, "override_settings": {"sgm_noise_multiplier": "yes"}},
                         "override_settings.sgm_noise_multiplier")):
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 422 and r.json()["field"] == field, r.text
    r = client.post("/sdapi/v1/options", json={"uni_pc_order": 51})
    assert r.status_code == 422 and r.json()["field"] == "uni_pc_order", r.text


def test_unipc_order_reaches_the_sampler_and_the_infotext(sd1_engine):
    common = {**BASE, "steps": 5, "sampler": "UniPC"}
    third = sd1_engine.generate(GenerationParams(**common))
    second = sd1_engine.generate(GenerationParams(**common, sampler_options=__import__("underpaint.params").params
                                                  .SamplerOptions(unipc_order=2)))
    assert "UniPC order" not in third.infotexts[0] and "UniPC order: 2" in second.infotexts[0]
    assert third.images[0].tobytes() != second.images[0].tobytes()


@pytest.mark.parametrize("shape", [(0.6, 0.6), (0.5, 0.7), (2.0, 3.0)])
def test_beta_schedule_takes_its_shape_from_the_settings(shape):
    """The Beta schedule: scipy's Beta(alpha, beta) quantiles at evenly spaced probabilities, mapped onto
    the model's σ range, for the request's alpha and beta."""
    import scipy.stats

    from test_sampling_samplers import MS

    from underpaint.params import SamplerOptions
    from underpaint.sampling.schedules import build_sigmas

    n = 9
    sigmas = build_sigmas("Euler", "Beta", n, MS, SamplerOptions(beta_alpha=shape[0], beta_beta=shape[1]))
    lo, hi = MS.sigma_min, MS.sigma_max
    quantiles = scipy.stats.beta.ppf(1 - np.linspace(0, 1, n), *shape)
    expected = torch.tensor([*(lo + quantiles * (hi - lo)), 0.0], dtype=torch.float32)
    torch.testing.assert_close(sigmas, expected, rtol=1e-6, atol=1e-6)


def test_beta_shape_is_recorded_when_the_beta_schedule_runs(sd1_engine):
    from underpaint.imageio.infotext import parse_infotext
    from underpaint.params import SamplerOptions
    from underpaint.pipeline.reproduce import params_from_infotext

    common = {**BASE, "steps": 3, "scheduler": "Beta"}
    plain = sd1_engine.generate(GenerationParams(**common))
    assert "Schedule type: Beta" in plain.infotexts[0]
    assert "Beta schedule alpha: 0.6, Beta schedule beta: 0.6" in plain.infotexts[0]
    shaped = sd1_engine.generate(GenerationParams(**common, sampler_options=SamplerOptions(beta_alpha=0.4,
                                                                                           beta_beta=0.8)))
    assert "Beta schedule alpha: 0.4, Beta schedule beta: 0.8" in shaped.infotexts[0]
    assert shaped.images[0].tobytes() != plain.images[0].tobytes()
    options = params_from_infotext(parse_infotext(shaped.infotexts[0]))["sampler_options"]
    assert (options.beta_alpha, options.beta_beta) == (0.4, 0.8)
    karras = sd1_engine.generate(GenerationParams(**{**common, "scheduler": "Karras"}))
    assert "Beta schedule" not in karras.infotexts[0]


def test_beta_shape_through_the_cli_and_the_api(api):
    from underpaint.cli.generate import params_from_args
    from underpaint.cli.main import build_parser

    p = params_from_args(build_parser().parse_args(["txt2img", "-p", "x", "--beta-alpha", "0.3", "--beta-beta", "0.9"]))
    assert (p.sampler_options.beta_alpha, p.sampler_options.beta_beta) == (0.3, 0.9)
    client, backend = api
    assert client.get("/sdapi/v1/options").json()["beta_dist_alpha"] == 0.6
    for body in ({"steps": 1}, {"steps": 1, "override_settings": {"beta_dist_alpha": 0.5, "beta_dist_beta": 0.7}},
                 {"infotext": "x\nSteps: 1, Seed: 1, Beta schedule alpha: 0.2, Beta schedule beta: 0.3"}):
        assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200
    assert client.post("/sdapi/v1/options", json={"beta_dist_beta": 0.4}).status_code == 200
    assert client.post("/sdapi/v1/txt2img", json={"steps": 1}).status_code == 200
    assert [(p.sampler_options.beta_alpha, p.sampler_options.beta_beta) for p in backend.params] == [
        (0.6, 0.6), (0.5, 0.7), (0.2, 0.3), (0.6, 0.4)]
    r = client.post("/sdapi/v1/txt2img", json={"steps": 1, "override_settings": {"beta_dist_alpha": 0}})
    assert r.status_code == 422 and r.json()["field"] == "override_settings.beta_dist_alpha", r.text
    r = client.post("/sdapi/v1/options", json={"beta_dist_beta": -1})
    assert r.status_code == 422 and r.json()["field"] == "beta_dist_beta", r.text
    # Kept after the job when the request says so, as A1111 keeps overridden settings.
    kept = {"beta_dist_alpha": 0.9, "uni_pc_order": 2, "sgm_noise_multiplier": True}
    assert client.post("/sdapi/v1/txt2img", json={"steps": 1, "override_settings": kept,
                                                  "override_settings_restore_afterwards": False}).status_code == 200
    options = client.get("/sdapi/v1/options").json()
    assert {key: options[key] for key in kept} == kept
