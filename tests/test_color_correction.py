"""A1111's img2img colour correction: the histogram matching against scikit-image's ``match_histograms``,
the Luminosity blend against blendmodes (the library A1111 blends with), the whole correction as A1111
composes those libraries, the engine's pictures, Loopback's reference, and the wiring."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from underpaint.params import GenerationParams, LoopbackOptions
from underpaint.pipeline import color_correction as cc

BASE = dict(prompt="a harbour at dusk", negative_prompt="blurry", seed=12, rng="cpu", steps=4, sampler="Euler",
            strength=0.6)


def pictures(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (37, 41, 3), dtype=np.uint8)
    b = (rng.random((29, 23, 3)) ** 2.2 * 255).astype(np.uint8)  # another size, a darker distribution
    return a, b


def a1111_reference(generated: Image.Image, init: Image.Image) -> np.ndarray:
    """A1111 1.10's correction written with the libraries it uses: OpenCV's LAB, scikit-image's histogram
    matching, blendmodes' Luminosity blend (its float result; A1111's pinned release truncates it)."""
    import cv2
    from blendmodes.blend import BlendType, blendLayersArray
    from skimage import exposure

    target = cv2.cvtColor(np.asarray(init), cv2.COLOR_RGB2LAB)
    matched = exposure.match_histograms(cv2.cvtColor(np.asarray(generated), cv2.COLOR_RGB2LAB), target, channel_axis=2)
    recoloured = Image.fromarray(cv2.cvtColor(matched, cv2.COLOR_LAB2RGB).astype("uint8"))
    blended = blendLayersArray(recoloured, generated, BlendType.LUMINOSITY)
    return (np.clip(blended[..., :3], 0, 255)).astype(np.uint8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_histogram_matching_is_scikit_images(seed):
    from skimage import exposure

    a, b = pictures(seed)
    assert np.array_equal(cc.match_histograms(a, b), exposure.match_histograms(a, b, channel_axis=2))


@pytest.mark.parametrize("seed", [0, 1])
def test_the_luminosity_blend_is_blendmodes(seed):
    from blendmodes.blend import BlendType, blendLayersArray

    colour, light = pictures(seed)[0], np.random.default_rng(seed + 9).integers(0, 256, (37, 41, 3), dtype=np.uint8)
    ours = cc.luminosity_blend(colour, light) * 255.0
    ref = blendLayersArray(Image.fromarray(colour), Image.fromarray(light), BlendType.LUMINOSITY)[..., :3]
    np.testing.assert_allclose(ours, ref, atol=1e-9)
    assert ((ours < -1e-9) | (ours > 255 + 1e-9)).sum() == 0
    assert np.array_equal(cc.to_levels(ours / 255.0), np.clip(ours, 0, 255).astype(np.uint8))


def test_the_correction_is_a1111s_composition(photo):
    generated = Image.fromarray(pictures(3)[0]).resize((64, 48))
    init = photo.resize((64, 48))
    ours = np.asarray(cc.correct(generated, cc.lab_of(init)))
    assert np.array_equal(ours, a1111_reference(generated, init))


def test_img2img_results_are_corrected_to_the_resized_init(sd1_engine, photo):
    """The corrected picture is the uncorrected one (same seed) put through the correction against the init
    picture resized to the output size; a txt2img request is left alone."""
    init = photo.resize((80, 72))
    plain = sd1_engine.generate(GenerationParams(**BASE, init_images=(init,), width=64, height=64)).images[0]
    fixed = sd1_engine.generate(GenerationParams(**BASE, init_images=(init,), width=64, height=64,
                                                 img2img_color_correction=True)).images[0]
    assert np.array_equal(np.asarray(fixed), a1111_reference(plain, init.resize((64, 64), Image.LANCZOS)))
    assert not np.array_equal(np.asarray(fixed), np.asarray(plain))
    txt = dict(BASE, strength=1.0)
    made = [sd1_engine.generate(GenerationParams(**txt, width=64, height=64, img2img_color_correction=flag)).images[0]
            for flag in (False, True)]
    assert np.array_equal(np.asarray(made[0]), np.asarray(made[1]))


def test_inpainting_is_corrected_before_the_original_is_laid_back(sd1_engine, photo):
    init = photo.resize((64, 64))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    plain, fixed = (sd1_engine.generate(GenerationParams(**BASE, init_images=(init,), mask=mask,
                                                         img2img_color_correction=flag)).images[0]
                    for flag in (False, True))
    outside = np.asarray(mask) == 0
    outside[4:60, 4:60] = False  # away from the blurred, widened seam
    assert np.array_equal(np.asarray(fixed)[outside], np.asarray(init)[outside])
    assert not np.array_equal(np.asarray(fixed)[24:40, 24:40], np.asarray(plain)[24:40, 24:40])


def test_loopback_matches_every_pass_to_the_request_picture(photo):
    from test_loopback import FakePasses

    from underpaint.pipeline.loopback import run

    photo = photo.resize((64, 64))
    passes = FakePasses(photo)
    run(GenerationParams(**BASE, init_images=(photo,), img2img_color_correction=True,
                         loopback=LoopbackOptions(loops=3)), passes, info=None)
    assert [p.color_reference is photo for p in passes.asked] == [True, True, True]
    assert passes.asked[1].init_images[0] is not photo


def test_cli_flag():
    from underpaint.cli.generate import params_from_args
    from underpaint.cli.main import build_parser

    args = build_parser().parse_args(["img2img", "in.png", "-p", "x", "--img2img-color-correction"])
    assert params_from_args(args, (Image.new("RGB", (64, 64)),)).img2img_color_correction is True
    args = build_parser().parse_args(["img2img", "in.png", "-p", "x"])
    assert params_from_args(args, (Image.new("RGB", (64, 64)),)).img2img_color_correction is False



def test_api_setting_and_override(api, photo):
    from test_server_support import png_b64

    client, backend = api
    base = {"steps": 1, "init_images": [png_b64(photo.resize((64, 64)))]}
    assert client.get("/sdapi/v1/options").json()["img2img_color_correction"] is False
    assert client.post("/sdapi/v1/img2img", json={**base, "override_settings": {"img2img_color_correction": True}}
                       ).status_code == 200
    assert client.post("/sdapi/v1/img2img", json=base).status_code == 200
    assert client.post("/sdapi/v1/options", json={"img2img_color_correction": True}).status_code == 200
    assert client.post("/sdapi/v1/img2img", json=base).status_code == 200
    assert client.post("/sdapi/v1/txt2img", json={"steps": 1, "width": 64, "height": 64}).status_code == 200
    assert [p.img2img_color_correction for p in backend.params] == [True, False, True, False]
    r = client.post("/sdapi/v1/options", json={"img2img_color_correction": "yes"})
    assert r.status_code == 422 and r.json()["field"] == "img2img_color_correction", r.text
