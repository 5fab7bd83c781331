"""A1111's img2img script "Loopback": the pictures equal the same passes made by hand with plain img2img
calls, the strength curves, seeds over batch counts, inpainting's later passes, interrupts, and the wiring
through the CLI and the API."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from underpaint.errors import InvalidParameter
from underpaint.params import GenerationParams, InpaintOptions, LoopbackOptions
from underpaint.pipeline.loopback import run, strength_at
from underpaint.pipeline.records import Cancellation, Result

BASE = dict(prompt="a lighthouse on a cliff", negative_prompt="blurry", seed=40, rng="cpu", steps=4,
            sampler="Euler", strength=0.7)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_the_passes_are_plain_img2img_calls_by_hand(sd1_engine, photo):
    """Three passes from the photo at 0.7 down to 0.3 (Linear: 0.7, 0.5, 0.3), seeds 40, 41, 42, each from the
    last picture: the same pictures as three img2img requests made by hand, then a row of all three first."""
    photo = photo.resize((64, 64))
    result = sd1_engine.generate(GenerationParams(**BASE, init_images=(photo,),
                                                  loopback=LoopbackOptions(loops=3, final_strength=0.3)))
    by_hand, picture = [], photo
    for seed, strength in ((40, 0.7), (41, 0.7 + (0.3 - 0.7) * 0.5), (42, 0.3)):
        made = sd1_engine.generate(GenerationParams(**{**BASE, "seed": seed, "strength": strength},
                                                    init_images=(picture,)))
        picture = made.images[0]
        by_hand.append(made)
    assert len(result.images) == 4 and result.seeds == (40, 40, 41, 42)
    for got, made in zip(result.images[1:], by_hand):
        assert np.array_equal(pixels(got), pixels(made.images[0]))
    grid = pixels(result.images[0])
    assert grid.shape == (64, 192, 3)
    for i, made in enumerate(by_hand):
        assert np.array_equal(grid[:, 64 * i:64 * (i + 1)], pixels(made.images[0]))
    for text, made in zip(result.infotexts[1:], by_hand):
        assert text == made.infotexts[0].replace(", Version:", ", Final denoising strength: 0.3, Denoising curve: "
                                                                 "Linear, Version:")
    assert result.infotexts[0] == result.infotexts[1]


@pytest.mark.parametrize(("curve", "shape"), [("Linear", lambda x: x), ("Aggressive", lambda x: math.sin(x * math.pi / 2)),
                                              ("Lazy", lambda x: 1 - math.cos(x * math.pi / 2))])
def test_strength_curves(curve, shape):
    """Pass i of n runs at initial + (final - initial)·curve(i / (n - 1)): the first at the request's strength,
    the last at the final one; one loop stays at the request's."""
    strengths = [strength_at(i, 5, 0.8, 0.2, curve) for i in range(5)]
    assert strengths[0] == 0.8 and math.isclose(strengths[-1], 0.2)
    for i, value in enumerate(strengths):
        assert math.isclose(value, 0.8 - 0.6 * shape(i / 4))
    assert strength_at(0, 1, 0.8, 0.2, curve) == 0.8
    if curve == "Aggressive":
        assert strengths[1] < 0.8 - 0.6 * 0.25  # most of the change early
    if curve == "Lazy":
        assert strengths[1] > 0.8 - 0.6 * 0.25


class FakePasses:
    """img2img passes that record what they were asked and make a picture of their own (or stop)."""

    def __init__(self, photo, stop_at: int | None = None, cancel: Cancellation | None = None, skip: bool = False):
        self.asked: list[GenerationParams] = []
        self.photo, self.stop_at, self.cancel, self.skip = photo, stop_at, cancel, skip

    def __call__(self, params, report):
        self.asked.append(params)
        made = self.photo.rotate(90 * len(self.asked))
        stopped = self.stop_at == len(self.asked)
        if stopped and self.cancel is not None and not self.skip:
            self.cancel.interrupt()
        return Result((made,), (f"pass {len(self.asked)}",), (params.seed,), (params.subseed,), params, None,
                      interrupted=stopped and not self.skip, unfinished=(0,) if stopped else ())


def test_batch_counts_seeds_and_inpainting(photo):
    """Batch count 2 of 3 loops: seeds go on across the batches (40-45), each batch starts again from the
    request's picture and strength, passes after the first fill the masked area from the picture, the result
    is the row of each batch's last picture, then those pictures; each pass is one picture."""
    photo = photo.resize((64, 64))
    params = GenerationParams(**BASE, init_images=(photo,), mask=photo.convert("L"), batch_size=3, n_iter=2,
                              inpaint=InpaintOptions(masked_content="latent noise"),
                              loopback=LoopbackOptions(loops=3, final_strength=0.1, curve="lazy"))
    passes = FakePasses(photo)
    result = run(params, passes, info=None)
    assert [p.seed for p in passes.asked] == [40, 41, 42, 43, 44, 45]
    assert [p.init_images[0] is photo for p in passes.asked] == [True, False, False, True, False, False]
    assert [p.inpaint.masked_content for p in passes.asked] == ["latent noise", "original", "original"] * 2
    assert all(p.batch_size == 1 and p.n_iter == 1 and p.loopback is None for p in passes.asked)
    assert [round(p.strength, 6) for p in passes.asked[:3]] == [0.7, round(0.7 - 0.6 * (1 - math.cos(math.pi / 4)), 6),
                                                                 0.1]
    assert result.infotexts == ("pass 3", "pass 3", "pass 6") and result.seeds == (42, 42, 45)
    assert result.images[0].size == (128, 64)


def test_an_interrupt_ends_the_loops_and_a_skip_the_batch(photo):
    photo = photo.resize((64, 64))
    params = GenerationParams(**BASE, init_images=(photo,), n_iter=2, loopback=LoopbackOptions(loops=3))
    cancel = Cancellation()
    passes = FakePasses(photo, stop_at=2, cancel=cancel)
    result = run(params, passes, info=None, cancel=cancel)
    assert len(passes.asked) == 2 and result.interrupted and result.images == ()  # batch 1's last pass never came
    passes = FakePasses(photo, stop_at=2, skip=True)
    result = run(params, passes, info=None, cancel=Cancellation())
    # The skipped batch gives nothing; the next batch runs all three passes and gives its last.
    assert len(passes.asked) == 5 and result.infotexts == ("pass 5",)


def test_bad_options_name_the_field(photo):
    for field, options in (("loopback_loops", dict(loops=0)), ("loopback_final_strength", dict(final_strength=1.5)),
                           ("loopback_curve", dict(curve="Wobbly"))):
        with pytest.raises(InvalidParameter) as err:
            LoopbackOptions(**options)
        assert err.value.field == field
    with pytest.raises(InvalidParameter) as err:
        GenerationParams(prompt="x", loopback=LoopbackOptions())
    assert err.value.field == "loopback" and "img2img" in str(err.value)


def test_cli_flags(tmp_path, photo):
    from cli_runner import run_cli

    from underpaint.cli.generate import params_from_args
    from underpaint.cli.main import build_parser

    args = build_parser().parse_args(["img2img", "in.png", "-p", "x", "--loopback", "6", "--loopback-curve", "lazy",
                                      "--loopback-final-strength", "0.2"])
    assert params_from_args(args, (photo,)).loopback == LoopbackOptions(loops=6, final_strength=0.2, curve="Lazy")
    picture = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (64, 64)).save(picture)
    done = run_cli("img2img", str(picture), "-p", "x", "--loopback-curve", "lazy",
                   "--model", str(tmp_path / "none.safetensors"))
    assert done.returncode == 2 and "--loopback-curve" in done.stderr and "--loopback LOOPS" in done.stderr



def test_api_script(api, photo):
    from test_server_support import png_b64

    client, backend = api
    base = {"steps": 1, "init_images": [png_b64(photo.resize((64, 64)))], "script_name": "Loopback"}
    assert "loopback" in client.get("/sdapi/v1/scripts").json()["img2img"]
    info = next(s for s in client.get("/sdapi/v1/script-info").json() if s["name"] == "loopback")
    assert [a["value"] for a in info["args"]] == [4, 0.5, "Linear", "None"] and info["is_img2img"]
    for args in ([3, 0.25, "Aggressive", "None"], [], [2.0, None, "lazy"]):
        r = client.post("/sdapi/v1/img2img", json={**base, "script_args": args})
        assert r.status_code == 200, r.text
    assert [p.loopback for p in backend.params] == [LoopbackOptions(3, 0.25, "Aggressive"), LoopbackOptions(),
                                                    LoopbackOptions(loops=2, curve="Lazy")]
    for args, index in (([0], 0), ([4, 2], 1), ([4, 0.5, "Wobbly"], 2), ([4, 0.5, "Linear", "CLIP"], 3),
                        (["four"], 0), ([65], 0)):
        r = client.post("/sdapi/v1/img2img", json={**base, "script_args": args})
        assert r.status_code == 422 and r.json()["field"] == f"script_args[{index}]", (args, r.text)
    r = client.post("/sdapi/v1/txt2img", json={"steps": 1, "script_name": "loopback"})
    assert r.status_code == 422 and r.json()["field"] == "script_name", r.text
    passes = replace(LoopbackOptions(), loops=40)
    r = client.post("/sdapi/v1/img2img", json={**base, "n_iter": 2, "script_args": [passes.loops]})
    assert r.status_code == 422 and "passes" in r.json()["detail"], r.text
