"""A1111's img2img script "Poor man's outpainting" in the API: underpaint's outpainting (pipeline/inpaint.py) with
the script's pixels, directions, mask blur (doubled, as A1111) and masked content; checked against the same
outpainting request made through the Python API."""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from underpaint.params import GenerationParams, InpaintOptions
from underpaint.pipeline.inpaint import OutpaintOptions, outpaint_params


@pytest.fixture(scope="module")
def api(sd1_file, tmp_path_factory):
    from test_server_support import real_api, tiny_models_dir

    with real_api(tiny_models_dir(tmp_path_factory.mktemp("outpaint-models"), sd1_file)) as client:
        yield client


def _picture():
    y, x = np.mgrid[0:48, 0:64]
    return Image.fromarray(np.stack([x * 4, y * 5, 255 - x * 3], -1).astype(np.uint8))


def _script_and_python(api, engine, script: str, args: list, options: OutpaintOptions, *, seed: int):
    """The API's answer to the script (its request body too), the picture, and the Python API's outpainting of the
    same picture with ``options`` (mask blur 4, masked content "original")."""
    from test_server_support import decode_b64, png_b64

    picture = _picture()
    body = {"init_images": [png_b64(picture)], "prompt": "a wide landscape", "steps": 2, "sampler_name": "Euler",
            "seed": seed, "denoising_strength": 0.8, "override_settings": {"randn_source": "CPU"},
            "script_name": script, "script_args": args}
    r = api.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    got = decode_b64(r.json()["images"][0]).convert("RGB")
    base = GenerationParams(init_images=(picture,), prompt="a wide landscape", steps=2, sampler="Euler", seed=seed,
                            rng="cpu", strength=0.8,
                            inpaint=InpaintOptions(mask_blur_x=4, mask_blur_y=4, masked_content="original"))
    want = engine.generate(outpaint_params(base, options)).images[0]
    assert np.array_equal(np.asarray(got), np.asarray(want))
    return r, body, picture, got


def test_script_outpaints_as_the_python_api(api, sd1_engine):
    r, _, picture, got = _script_and_python(api, sd1_engine, "Poor man's outpainting", [16, 2, 1, ["left", "up"]],
                                            OutpaintOptions(left=16, up=16, fill="blur"), seed=4)
    assert got.size == (64 + 16, 48 + 16)
    assert np.array_equal(np.asarray(got)[16:, 16:], np.asarray(picture))  # the picture is kept as it was
    import json

    assert 'Outpaint: "left 16, right 0, up 16, down 0, fill blur"' in json.loads(r.json()["info"])["infotexts"][0]


@pytest.mark.parametrize("args, field", [
    ([4], "script_args[0]"), ([128, 99], "script_args[1]"), ([128, 4, 7], "script_args[2]"),
    ([128, 4, 0, ["sideways"]], "script_args[3]"), ([128, 4, 0, []], "script_args[3]"),
])
def test_refusals_name_the_argument(api, args, field):
    from test_server_support import png_b64

    r = api.post("/sdapi/v1/img2img", json={"init_images": [png_b64(_picture())], "steps": 1,
                                            "script_name": "poor man's outpainting", "script_args": args})
    assert r.status_code == 422 and r.json()["field"] == field, r.text
    r = api.post("/sdapi/v1/img2img", json={"init_images": [png_b64(_picture())], "mask": png_b64(_picture()),
                                            "steps": 1, "script_name": "poor man's outpainting"})
    assert r.status_code == 422 and r.json()["field"] == "mask", r.text


def test_mk2_outpaints_with_noise_matched_to_the_picture(api, sd1_engine):
    """"Outpainting mk2": the margins start from the blur fill with noise of the picture's colour spread, are
    inpainted over that start, and the picture stays as it was; the same as the Python API's "matched" fill."""
    import json

    r, body, picture, got = _script_and_python(
        api, sd1_engine, "Outpainting mk2", ["", 24, 4, ["right", "down"], 0.5, 0.2],
        OutpaintOptions(right=24, down=24, fill="matched", falloff=0.5, color_variation=0.2), seed=6)
    assert got.size == (64 + 24, 48 + 24)
    assert np.array_equal(np.asarray(got)[:48, :64], np.asarray(picture))
    assert ('Outpaint: "left 0, right 24, up 0, down 24, fill matched, falloff 0.5, color variation 0.2"'
            in json.loads(r.json()["info"])["infotexts"][0])
    for args, field in (([None, 4], "script_args[1]"), ([None, 128, 8, ["left"], 5], "script_args[4]"),
                        ([None, 128, 8, ["left"], 1, -0.1], "script_args[5]")):
        r = api.post("/sdapi/v1/img2img", json={**body, "script_args": args})
        assert r.status_code == 422 and r.json()["field"] == field, r.text


def test_matched_noise_follows_the_pictures_colours_and_falloff():
    """The matched start: the picture untouched, the margins' mean colour the blur fill's and their spread the
    picture's; a lower fall-off exponent gives finer (less correlated) noise; the seed decides it."""
    from underpaint.pipeline.inpaint import Margins, outpaint_canvas

    rng = np.random.default_rng(0)
    picture = Image.fromarray((rng.normal(128, 30, (64, 64, 3))).clip(0, 255).astype(np.uint8))
    margins = Margins(left=0, right=64, up=0, down=0)
    blur, mask = outpaint_canvas(picture, margins, "blur")
    rough, _ = outpaint_canvas(picture, margins, "matched", seed=1, falloff=0.0, color_variation=0.0)
    smooth, _ = outpaint_canvas(picture, margins, "matched", seed=1, falloff=2.0, color_variation=0.0)
    again, _ = outpaint_canvas(picture, margins, "matched", seed=1, falloff=2.0, color_variation=0.0)
    assert np.array_equal(np.asarray(smooth), np.asarray(again))
    for canvas in (rough, smooth):
        values = np.asarray(canvas, dtype=float)
        assert np.array_equal(values[:, :64], np.asarray(picture))
        margin = values[:, 64:] - np.asarray(blur, dtype=float)[:, 64:]
        assert abs(margin.mean()) < 6 and 15 < margin.std() < 45  # the picture's spread (30), a little clipped

    def neighbour_correlation(canvas):
        m = np.asarray(canvas, dtype=float)[:, 64:, 0] - np.asarray(blur, dtype=float)[:, 64:, 0]
        return np.corrcoef(m[:, :-1].ravel(), m[:, 1:].ravel())[0, 1]

    assert neighbour_correlation(rough) < 0.2 < 0.8 < neighbour_correlation(smooth)
    grey, _ = outpaint_canvas(picture, margins, "matched", seed=1, falloff=1.0, color_variation=0.0)
    tinted, _ = outpaint_canvas(picture, margins, "matched", seed=1, falloff=1.0, color_variation=1.0)
    channel_spread = lambda c: np.asarray(c, dtype=float)[:, 64:].std(axis=-1).mean()  # noqa: E731
    assert channel_spread(tinted) > channel_spread(grey) + 5
