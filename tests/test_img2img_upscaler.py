"""A1111's "Upscaler for img2img": the upscaler that enlarges init pictures (and "Only masked" crops)
when the img2img resize makes them larger, instead of Lanczos alone.

As in test_upscalers.py, a Real-ESRGAN compact network with zero weights *is* an exact 4x
nearest-neighbour enlargement, which Pillow computes independently; so a 4x enlargement through
the model must give exactly Pillow's nearest 4x, and any run through the model must equal the same
run through the built-in "Nearest".
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from test_server_support import decode_b64, png_b64, real_api, tiny_models_dir
from test_upscalers import compact_state_dict, nearest
from underpaint.errors import UnknownName
from underpaint.imageio.resize import CROP_AND_RESIZE, JUST_RESIZE, RESIZE_AND_FILL, resize_image
from underpaint.params import GenerationParams, InpaintOptions


@pytest.fixture(scope="module")
def models(tmp_path_factory, sd1_file):
    root = tiny_models_dir(tmp_path_factory.mktemp("img2img-upscaler"), sd1_file)
    (root / "upscale_models").mkdir()
    torch.save(compact_state_dict(), root / "upscale_models" / "4x-Zero.pth")
    return root


@pytest.fixture(scope="module")
def engine(models):
    from underpaint.pipeline.engine import Engine

    return Engine.load(models / "checkpoints" / "tiny-sd1.safetensors", models_dir=models, device="cpu",
                       dtype="fp32")


@pytest.fixture(scope="module")
def small():
    """A 32x24 picture with detail at the pixel level (Lanczos and nearest differ everywhere)."""
    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))


def _model_enlarge(models):
    from underpaint.models.registry import ModelsDir
    from underpaint.pipeline import upscale

    return upscale.enlarger(upscale.picture_pass(upscale.resolve(ModelsDir(models), "4x-Zero", "img2img_upscaler")))


def _eq(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def test_resize_enlarges_through_the_upscaler(models, small):
    enlarge = _model_enlarge(models)
    # 4x exactly: one model pass and nothing else, so the result is Pillow's nearest 4x.
    assert _eq(resize_image(small, 128, 96, JUST_RESIZE, enlarge=enlarge), nearest(small, 4))
    lanczos = small.resize((128, 96), Image.Resampling.LANCZOS)
    assert _eq(resize_image(small, 128, 96, JUST_RESIZE), lanczos) and not _eq(lanczos, nearest(small, 4))
    # The crop and fill modes enlarge through it too: 32x24 covering 128x128 is 170x128 (model 4x to
    # 128x96 is short, A1111's upscaler step then resizes), and fitting into 256x192 is 4x again.
    cropped = resize_image(small, 128, 128, CROP_AND_RESIZE, enlarge=enlarge)
    assert cropped.size == (128, 128) and not _eq(cropped, resize_image(small, 128, 128, CROP_AND_RESIZE))
    filled = resize_image(small, 128, 96, RESIZE_AND_FILL, enlarge=enlarge)
    assert _eq(filled, nearest(small, 4))
    # Shrinking never calls it; masks (greyscale) and pictures with alpha take Lanczos alone.
    calls = []

    def spy(image, scale):
        calls.append(scale)
        return enlarge(image, scale)

    big = small.resize((256, 192))
    assert _eq(resize_image(big, 128, 96, JUST_RESIZE, enlarge=spy), big.resize((128, 96), Image.Resampling.LANCZOS))
    mask = small.convert("L")
    assert _eq(resize_image(mask, 128, 96, JUST_RESIZE, enlarge=spy), mask.resize((128, 96), Image.Resampling.LANCZOS))
    assert resize_image(small.convert("RGBA"), 128, 96, JUST_RESIZE, enlarge=spy).mode == "RGBA"
    assert calls == []


def _img2img(small, **fields) -> GenerationParams:
    base = dict(prompt="a harbour", init_images=(small,), width=128, height=96, steps=2, sampler="Euler", seed=3,
                rng="cpu")
    return GenerationParams(**{**base, **fields})


def test_engine_img2img_starts_from_the_enlarged_picture(engine, small):
    # Strength 0 gives the resized input back: the enlargement itself, exactly.
    kept = engine.generate(_img2img(small, strength=0, img2img_upscaler="4x-Zero")).images[0]
    assert _eq(kept, nearest(small, 4))
    plain = engine.generate(_img2img(small, strength=0)).images[0]
    assert _eq(plain, small.resize((128, 96), Image.Resampling.LANCZOS))
    assert _eq(engine.generate(_img2img(small, strength=0, img2img_upscaler="None")).images[0], plain)
    # Denoising: the model and the built-in Nearest give the same init pixels, so the same picture.
    with_model = engine.generate(_img2img(small, strength=0.5, img2img_upscaler="4x-Zero")).images[0]
    with_nearest = engine.generate(_img2img(small, strength=0.5, img2img_upscaler="nearest")).images[0]
    with_lanczos = engine.generate(_img2img(small, strength=0.5)).images[0]
    assert _eq(with_model, with_nearest) and not _eq(with_model, with_lanczos)


def test_only_masked_crops_are_enlarged_through_it(engine, small):
    picture = small.resize((64, 48), Image.Resampling.NEAREST)
    mask = Image.new("L", picture.size, 0)
    mask.paste(255, (28, 20, 36, 28))  # 8x8: with padding 4 a 16x16 crop, enlarged 4x to 64x64
    base = dict(init_images=(picture,), mask=mask, width=64, height=64, strength=0.6,
                inpaint=InpaintOptions(full_res=True, full_res_padding=4, mask_blur_x=0, mask_blur_y=0))
    with_model = engine.generate(_img2img(small, **base, img2img_upscaler="4x-Zero")).images[0]
    with_nearest = engine.generate(_img2img(small, **base, img2img_upscaler="Nearest")).images[0]
    with_lanczos = engine.generate(_img2img(small, **base)).images[0]
    assert with_model.size == picture.size
    assert _eq(with_model, with_nearest) and not _eq(with_model, with_lanczos)
    # Outside the mask the picture is kept as it was, whatever the upscaler.
    keep = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(with_model)[keep], np.asarray(picture)[keep])


def test_unknown_upscaler_is_refused_before_any_work(engine, small):
    with pytest.raises(UnknownName) as err:
        engine.generate(_img2img(small, strength=0, img2img_upscaler="4x-Missing"))
    assert err.value.field == "img2img_upscaler" and "4x-Zero" in str(err.value)
    # txt2img has nothing to enlarge: the setting does not apply.
    out = engine.generate(GenerationParams(prompt="x", width=64, height=64, steps=1, seed=1, rng="cpu",
                                           img2img_upscaler="4x-Missing"))
    assert out.images[0].size == (64, 64)


# --------------------------------------------------------------------------- the API


@pytest.fixture(scope="module")
def api(models):
    with real_api(models) as client:
        yield client


def test_api_option_and_override(api, small):
    assert api.get("/sdapi/v1/options").json()["upscaler_for_img2img"] == "None"
    body = {"init_images": [png_b64(small)], "denoising_strength": 0, "width": 128, "height": 96}
    r = api.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    assert _eq(decode_b64(r.json()["images"][0]).convert("RGB"), small.resize((128, 96), Image.Resampling.LANCZOS))
    r = api.post("/sdapi/v1/options", json={"upscaler_for_img2img": "4x-zero"})
    assert r.status_code == 200, r.text
    assert api.get("/sdapi/v1/options").json()["upscaler_for_img2img"] == "4x-Zero"  # the listed spelling
    try:
        r = api.post("/sdapi/v1/img2img", json=body)
        assert _eq(decode_b64(r.json()["images"][0]).convert("RGB"), nearest(small, 4))
        # A request's override wins for that job only.
        r = api.post("/sdapi/v1/img2img", json={**body, "override_settings": {"upscaler_for_img2img": "None"}})
        assert _eq(decode_b64(r.json()["images"][0]).convert("RGB"),
                   small.resize((128, 96), Image.Resampling.LANCZOS))
        assert api.get("/sdapi/v1/options").json()["upscaler_for_img2img"] == "4x-Zero"
    finally:
        api.post("/sdapi/v1/options", json={"upscaler_for_img2img": "None"})


def test_api_refuses_unknown_names_by_field(api, small):
    r = api.post("/sdapi/v1/options", json={"upscaler_for_img2img": "4x-Missing"})
    assert r.status_code == 422 and r.json()["field"] == "upscaler_for_img2img" and "4x-Zero" in r.json()["detail"]
    r = api.post("/sdapi/v1/options", json={"upscaler_for_img2img": 4})
    assert r.status_code == 422 and r.json()["field"] == "upscaler_for_img2img"
    r = api.post("/sdapi/v1/img2img", json={"init_images": [png_b64(small)], "denoising_strength": 0,
                                            "override_settings": {"upscaler_for_img2img": "../checkpoints/x"}})
    assert r.status_code == 422 and r.json()["field"] == "override_settings.upscaler_for_img2img"
    assert api.get("/sdapi/v1/options").json()["upscaler_for_img2img"] == "None"


# --------------------------------------------------------------------------- the CLI


def test_cli_img2img_upscaler(models, tmp_path, small):
    from cli_runner import run_cli

    source = tmp_path / "in.png"
    small.save(source)
    out = tmp_path / "out.png"
    r = run_cli("img2img", str(source), "-p", "x", "--strength", "0", "-W", "128", "-H", "96",
                "--img2img-upscaler", "4x-Zero", "-o", str(out), "--models-dir", str(models))
    assert r.returncode == 0, r.stderr
    assert _eq(Image.open(out).convert("RGB"), nearest(small, 4))
    r = run_cli("img2img", str(source), "-p", "x", "--img2img-upscaler", "4x-Missing", "-o", str(tmp_path / "x.png"),
                "--models-dir", str(tmp_path))  # no checkpoint there: refused before loading one
    assert r.returncode == 2 and "--img2img-upscaler" in r.stderr and "checkpoint" not in r.stderr
    assert not (tmp_path / "x.png").exists()
