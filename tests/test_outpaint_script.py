"""A1111's img2img script "Poor man's outpainting" in the API: underpaint's outpainting (pipeline/inpaint.py) with
the script's pixels, directions, mask blur (doubled, as A1111) and masked content; checked against the same
outpainting request made through the Python API."""

from __future__ import annotations

from dataclasses import replace

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


def test_script_outpaints_as_the_python_api(api, sd1_engine):
    from test_server_support import decode_b64, png_b64

    picture = _picture()
    body = {"init_images": [png_b64(picture)], "prompt": "a wide landscape", "steps": 2, "sampler_name": "Euler",
            "seed": 4, "denoising_strength": 0.8, "override_settings": {"randn_source": "CPU"},
            "script_name": "Poor man's outpainting", "script_args": [16, 2, 1, ["left", "up"]]}
    r = api.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    got = decode_b64(r.json()["images"][0]).convert("RGB")
    assert got.size == (64 + 16, 48 + 16)
    base = GenerationParams(init_images=(picture,), prompt="a wide landscape", steps=2, sampler="Euler", seed=4,
                            rng="cpu", strength=0.8,
                            inpaint=InpaintOptions(mask_blur_x=4, mask_blur_y=4, masked_content="original"))
    want = sd1_engine.generate(outpaint_params(base, OutpaintOptions(left=16, up=16, fill="blur"))).images[0]
    assert np.array_equal(np.asarray(got), np.asarray(want))
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
