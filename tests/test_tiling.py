"""A1111's "Tiling" (seamless pictures): the picture wraps around (shifting the start noise shifts the
picture alike, which zero padding does not), the same picture as diffusers' pipeline with its
convolutions made circular, the model as it was afterwards, and the wiring through infotext, CLI
and the API."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from underpaint.errors import InvalidParameter
from underpaint.params import GenerationParams

BASE = dict(prompt="a lighthouse on a cliff", negative_prompt="blurry", seed=77, rng="cpu", steps=4,
            sampler="Euler", width=64, height=64)


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def convs(*roots):
    return [m for root in roots for m in root.modules() if isinstance(m, torch.nn.Conv2d)]


@pytest.fixture
def rolled_noise(monkeypatch):
    """Make the start noise of the next generations shifted by (dy, dx) latent cells, wrapping around."""
    from underpaint.sampling import noise as noise_mod

    original = noise_mod.image_noise

    def roll(dy: int, dx: int) -> None:
        monkeypatch.setattr(noise_mod, "image_noise",
                            lambda *a, **k: torch.roll(original(*a, **k), shifts=(dy, dx), dims=(-2, -1)))

    return roll


def test_a_tiled_picture_wraps_around(sd1_engine, rolled_noise):
    """With Tiling the UNet and the VAE decoder see the latent as a torus: start noise shifted by two latent
    cells (the tiny UNet downsamples once) gives the same picture shifted by 16 pixels, to rounding. Without
    Tiling the edges are edges and the shifted picture is another one."""
    shift = (2, 2)
    plain, tiled = (sd1_engine.generate(GenerationParams(**BASE, tiling=t)).images[0] for t in (False, True))
    rolled_noise(*shift)
    plain_moved, tiled_moved = (sd1_engine.generate(GenerationParams(**BASE, tiling=t)).images[0]
                                for t in (False, True))

    def moved(image) -> np.ndarray:
        return np.roll(pixels(image), shift=(8 * shift[0], 8 * shift[1]), axis=(0, 1))

    diff = np.abs(pixels(tiled_moved) - moved(tiled))
    assert diff.max() <= 1, diff.max()
    assert np.abs(pixels(plain_moved) - moved(plain)).max() > 20


def test_tiling_is_diffusers_with_circular_convolutions(sd1_engine):
    """The same picture as diffusers' StableDiffusionPipeline (Euler, linspace timesteps: A1111's Automatic
    for Euler) when every Conv2d of its UNet and VAE pads circularly, as A1111 makes them; and not the
    picture without Tiling."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    m = sd1_engine.model
    cfg = 6.0
    ours = sd1_engine.generate(GenerationParams(**BASE, cfg_scale=cfg, tiling=True)).images[0]
    pipe = StableDiffusionPipeline(
        vae=m.vae, text_encoder=m.text_encoders[0], tokenizer=m.tokenizers[0], unet=m.unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         num_train_timesteps=1000, timestep_spacing="linspace"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def reference():
        return pipe(prompt=BASE["prompt"], negative_prompt=BASE["negative_prompt"], guidance_scale=cfg, height=64,
                    width=64, num_inference_steps=4, output_type="np",
                    generator=torch.Generator().manual_seed(BASE["seed"])).images[0]

    layers = convs(m.unet, m.vae)
    try:
        for conv in layers:
            conv.padding_mode = "circular"
        ref = reference()
    finally:
        for conv in layers:
            conv.padding_mode = "zeros"
    ref_u8 = (np.clip(ref, 0, 1) * 255).astype(np.uint8).astype(np.int16)  # A1111 truncates, as the engine
    diff = np.abs(pixels(ours) - ref_u8)
    assert diff.max() <= 1, diff.max()
    plain = (np.clip(reference(), 0, 1) * 255).astype(np.uint8).astype(np.int16)
    assert np.abs(pixels(ours) - plain).max() > 20


def test_the_model_is_as_it_was_afterwards(sd1_engine, monkeypatch):
    """Every convolution pads with zeros again, compiled code set aside for the request is back (and was not
    run: it was traced with zero padding), VAE tiling is back on, and the next picture without Tiling is the
    same as before, bit for bit."""
    m = sd1_engine.model
    before = sd1_engine.generate(GenerationParams(**BASE)).images[0]
    calls = []

    def compiled_stand_in(*args, **kwargs):
        calls.append(1)
        return type(m.unet).forward(m.unet, *args, **kwargs)

    m.unet.forward = compiled_stand_in
    m.vae.use_tiling = True
    try:
        sd1_engine.generate(GenerationParams(**BASE, tiling=True))
        assert calls == []
        assert m.unet.__dict__["forward"] is compiled_stand_in and m.vae.use_tiling is True
    finally:
        del m.unet.forward
        m.vae.use_tiling = False
    assert {conv.padding_mode for conv in convs(m.unet, m.vae)} == {"zeros"}
    assert not getattr(m, "_seamless")
    after = sd1_engine.generate(GenerationParams(**BASE)).images[0]
    assert np.array_equal(pixels(before), pixels(after))


def test_the_vae_is_not_retried_in_tiles_while_tiling(sd1_engine):
    """A tile would wrap onto itself: an out-of-memory VAE call is not retried in tiles during a Tiling
    request (the engine's move down a memory mode handles it), as it is otherwise."""
    from underpaint.models.offload import run_vae
    from underpaint.models.seamless import seamless

    m = sd1_engine.model
    tiled_calls = []

    def call(vae, device, dtype):
        if not vae.use_tiling:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        tiled_calls.append(1)
        return torch.zeros(1)

    run_vae(m, call)
    assert tiled_calls == [1] and not m.vae.use_tiling
    with seamless(m, True), pytest.raises(RuntimeError, match="out of memory"):
        run_vae(m, call)
    assert tiled_calls == [1]


def test_flux_is_refused_naming_the_field():
    from underpaint.pipeline.generate import _check_flux_request

    with pytest.raises(InvalidParameter) as err:
        _check_flux_request(GenerationParams(prompt="x", sampler="Euler", tiling=True))
    assert err.value.field == "tiling" and "FLUX" in str(err.value)
    with pytest.raises(InvalidParameter) as err:
        GenerationParams(tiling="yes")
    assert err.value.field == "tiling"


def test_infotext_round_trip(sd1_engine):
    from underpaint.imageio.infotext import parse_infotext
    from underpaint.pipeline.reproduce import params_from_infotext, unavailable_features

    text = sd1_engine.generate(GenerationParams(**BASE, tiling=True)).infotexts[0]
    assert "RNG: CPU, Tiling: True, Version:" in text
    parsed = parse_infotext(text)
    assert params_from_infotext(parsed)["tiling"] is True and unavailable_features(parsed) == []
    plain = sd1_engine.generate(GenerationParams(**BASE)).infotexts[0]
    assert "Tiling" not in plain and "tiling" not in params_from_infotext(parse_infotext(plain))


def test_cli_flag_and_infotext(tmp_path):
    from underpaint.cli.generate import params_from_args
    from underpaint.cli.main import build_parser

    def params(*argv):
        return params_from_args(build_parser().parse_args(list(argv)))

    assert params("txt2img", "-p", "x", "--tiling").tiling is True
    assert params("img2img", "in.png", "-p", "x").tiling is False
    shared = tmp_path / "shared.txt"
    shared.write_text("a wall\nSteps: 5, Sampler: Euler, Seed: 1, Size: 64x64, Tiling: True")
    assert params("txt2img", "--from-infotext", str(shared)).tiling is True



def test_api_request_field_and_infotext(api):
    client, backend = api
    base = {"steps": 1, "width": 64, "height": 64}
    for body in ({**base, "tiling": True}, {**base, "tiling": False}, base,
                 {"infotext": "x\nSteps: 1, Sampler: Euler, Seed: 1, Size: 64x64, Tiling: True"}):
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
    assert [p.tiling for p in backend.params] == [True, False, False, True]
    r = client.post("/sdapi/v1/img2img", json={**base, "tiling": "sometimes", "init_images": []})
    assert r.status_code == 422 and "tiling" in r.text, r.text
    # A1111's Tiling setting: the default where a request leaves the field out (an override for one request).
    assert client.get("/sdapi/v1/options").json()["tiling"] is False
    assert client.post("/sdapi/v1/txt2img", json={**base, "override_settings": {"tiling": True}}).status_code == 200
    assert client.post("/sdapi/v1/options", json={"tiling": True}).status_code == 200
    for body in (base, {**base, "tiling": False}):
        assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200
    assert [p.tiling for p in backend.params[-3:]] == [True, True, False]
    r = client.post("/sdapi/v1/options", json={"tiling": "on"})
    assert r.status_code == 422 and r.json()["field"] == "tiling", r.text
