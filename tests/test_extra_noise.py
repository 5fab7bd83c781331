"""A1111's "Noise multiplier for img2img" and "Extra noise multiplier for img2img and hires fix": the start
latent as A1111 builds it (k-diffusion and timestep samplers), the engine's pictures against the same
start reached by scaling the noise itself, the infotext both ways, and the wiring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from underpaint.errors import InvalidParameter
from underpaint.params import GenerationParams, HiresOptions
from underpaint.sampling.samplers import prepare_start

BASE = dict(prompt="a harbour at dusk", negative_prompt="blurry", seed=14, rng="cpu", steps=6, sampler="Euler",
            strength=0.5, width=64, height=64)


def test_the_start_latent_is_a1111s():
    """k-diffusion samplers start from init + noise·σ₀ + noise·E; DDIM from the DDPM-scaled picture
    √ᾱ·init + √(1-ᾱ)·noise plus noise·E·√ᾱ (A1111's timestep samplers), carried one grid step down."""
    gen = torch.Generator().manual_seed(0)
    init, noise = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    sigmas = torch.tensor([3.0, 1.5, 0.5, 0.0])
    x, _ = prepare_start("Euler", noise, sigmas, init=init, extra_noise=0.25)
    torch.testing.assert_close(x, init + noise * 3.0 + noise * 0.25)
    x, rest = prepare_start("DDIM", noise, sigmas, init=init, extra_noise=0.25)
    root_alpha = 1 / (1 + 3.0**2) ** 0.5
    ddpm = init * root_alpha + noise * (1 - root_alpha**2) ** 0.5 + noise * 0.25 * root_alpha
    torch.testing.assert_close(x, ddpm * (1 + rest[0] ** 2) ** 0.5)
    plain, _ = prepare_start("Euler", noise, sigmas, extra_noise=0.25)  # txt2img: no picture, no extra noise
    torch.testing.assert_close(plain, noise * 3.0)


@pytest.fixture
def scaled_noise(monkeypatch):
    """The next generations' start noise multiplied by a factor (of the first sigma, when a callable)."""
    from underpaint.sampling import noise as noise_mod

    original = noise_mod.image_noise

    def scale(factor: float) -> None:
        monkeypatch.setattr(noise_mod, "image_noise", lambda *a, **k: original(*a, **k) * factor)

    return scale


def first_sigma(engine, params) -> float:
    from underpaint.sampling import samplers

    seen = []
    original = samplers.prepare_start

    def spy(label, noise, sigmas, **kwargs):
        seen.append(float(sigmas[0]))
        return original(label, noise, sigmas, **kwargs)

    import underpaint.pipeline.generate as generate_mod

    generate_mod.prepare_start, saved = spy, generate_mod.prepare_start
    try:
        engine.generate(params)
    finally:
        generate_mod.prepare_start = saved
    return seen[0]


def test_engine_pictures_equal_the_noise_scaled_by_hand(sd1_engine, photo, scaled_noise):
    """With Euler (no noise after the start): noise multiplier M is the noise drawn times M; extra noise E is
    the noise times (σ₀ + E)/σ₀ — the same start, so the same picture."""
    init = (photo.resize((64, 64)),)
    sigma0 = first_sigma(sd1_engine, GenerationParams(**BASE, init_images=init))
    made = {name: np.asarray(sd1_engine.generate(GenerationParams(**BASE, init_images=init, **fields)).images[0],
                             dtype=np.int16)
            for name, fields in (("plain", {}), ("multiplier", dict(noise_multiplier=0.7)),
                                 ("extra", dict(extra_noise=0.4)))}
    scaled_noise(0.7)
    by_hand = np.asarray(sd1_engine.generate(GenerationParams(**BASE, init_images=init)).images[0], dtype=np.int16)
    assert np.abs(made["multiplier"] - by_hand).max() <= 1
    scaled_noise((sigma0 + 0.4) / sigma0)
    by_hand = np.asarray(sd1_engine.generate(GenerationParams(**BASE, init_images=init)).images[0], dtype=np.int16)
    assert np.abs(made["extra"] - by_hand).max() <= 1
    for name in ("multiplier", "extra"):
        assert np.abs(made[name] - made["plain"]).max() > 5


def test_hires_second_pass_takes_extra_noise_and_txt2img_does_not(sd1_engine):
    txt = dict(BASE, strength=1.0)
    plain, extra = (sd1_engine.generate(GenerationParams(**txt, extra_noise=e)) for e in (0.0, 0.5))
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(extra.images[0]))
    assert "Extra noise" not in extra.infotexts[0]
    hires = HiresOptions(scale=1.5, upscaler="Latent", steps=2, strength=0.5)
    plain, extra = (sd1_engine.generate(GenerationParams(**txt, hires=hires, extra_noise=e)) for e in (0.0, 0.5))
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(extra.images[0]))
    assert "Hires upscaler: Latent, Extra noise: 0.5" in extra.infotexts[0]


def test_infotext_round_trip(sd1_engine, photo):
    from underpaint.imageio.infotext import parse_infotext
    from underpaint.pipeline.reproduce import params_from_infotext

    made = sd1_engine.generate(GenerationParams(**BASE, init_images=(photo.resize((64, 64)),), noise_multiplier=0.9,
                                                extra_noise=0.2))
    text = made.infotexts[0]
    assert "Denoising strength: 0.5, RNG: CPU, Noise multiplier: 0.9, Extra noise: 0.2, Version" in text
    fields = params_from_infotext(parse_infotext(text))
    assert (fields["noise_multiplier"], fields["extra_noise"]) == (0.9, 0.2)


def test_bad_values_name_the_field():
    for field, value in (("noise_multiplier", -0.1), ("noise_multiplier", 5), ("extra_noise", 1.5)):
        with pytest.raises(InvalidParameter) as err:
            GenerationParams(**{field: value})
        assert err.value.field == field


def test_cli_flags():
    from underpaint.cli.generate import params_from_args
    from underpaint.cli.main import build_parser
    from PIL import Image

    args = build_parser().parse_args(["img2img", "in.png", "-p", "x", "--noise-multiplier", "0.8", "--extra-noise",
                                      "0.1"])
    p = params_from_args(args, (Image.new("RGB", (64, 64)),))
    assert (p.noise_multiplier, p.extra_noise) == (0.8, 0.1)
    p = params_from_args(build_parser().parse_args(["txt2img", "-p", "x", "--extra-noise", "0.3"]))
    assert (p.noise_multiplier, p.extra_noise) == (1.0, 0.3)



def test_api_fields_settings_and_infotext(api, photo):
    from test_server_support import png_b64

    client, backend = api
    base = {"steps": 1, "init_images": [png_b64(photo.resize((64, 64)))]}
    options = client.get("/sdapi/v1/options").json()
    assert (options["initial_noise_multiplier"], options["img2img_extra_noise"]) == (1.0, 0.0)
    for body in ({**base, "initial_noise_multiplier": 0.8},
                 {**base, "override_settings": {"initial_noise_multiplier": 1.2, "img2img_extra_noise": 0.1}},
                 {**base, "infotext": "x\nSteps: 1, Sampler: Euler, Seed: 1, Noise multiplier: 0.95, Extra noise: 0.05"}):
        r = client.post("/sdapi/v1/img2img", json=body)
        assert r.status_code == 200, r.text
    assert client.post("/sdapi/v1/options", json={"img2img_extra_noise": 0.3, "initial_noise_multiplier": 1.1}
                       ).status_code == 200
    assert client.post("/sdapi/v1/img2img", json=base).status_code == 200
    assert [(p.noise_multiplier, p.extra_noise) for p in backend.params] == [(0.8, 0.0), (1.2, 0.1), (0.95, 0.05),
                                                                              (1.1, 0.3)]
    r = client.post("/sdapi/v1/img2img", json={**base, "override_settings": {"img2img_extra_noise": 2}})
    assert r.status_code == 422 and r.json()["field"] == "override_settings.img2img_extra_noise", r.text
    r = client.post("/sdapi/v1/img2img", json={**base, "initial_noise_multiplier": 9})
    assert r.status_code == 422 and r.json()["field"] == "initial_noise_multiplier", r.text
    r = client.post("/sdapi/v1/options", json={"img2img_extra_noise": 1.5})
    assert r.status_code == 422 and r.json()["field"] == "img2img_extra_noise", r.text
