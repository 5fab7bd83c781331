"""A1111's "SD upscale" img2img script: enlarge, cut into tiles, img2img each, blend them back."""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from test_server_support import decode_b64, png_b64
from underpaint.errors import InvalidParameter, UnknownName
from underpaint.params import GenerationParams, SDUpscaleOptions
from underpaint.pipeline import sd_upscale
from underpaint.pipeline.upscale import builtin_pass, upscale_by


def noise_picture(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8))


def test_tiles_follow_a1111s_grid():
    grid = sd_upscale.tile_grid(192, 128, 64, 64, 16)
    # ceil((192 - 16) / 48) = 4 columns spread over (192 - 64) / 3 px; ceil((128 - 16) / 48) = 3 rows
    assert grid.xs == (0, 42, 85, 128) and grid.ys == (0, 32, 64)
    assert sd_upscale.tile_grid(512, 512, 512, 512, 64).xs == (0,)  # exactly one tile
    small = sd_upscale.tile_grid(100, 300, 128, 128, 32)  # narrower than a tile: 96 px tiles, two of them
    assert (small.tile_width, small.xs) == (96, (0, 4)) and small.ys == (0, 86, 172)
    with pytest.raises(InvalidParameter) as err:
        sd_upscale.tile_grid(256, 256, 64, 64, 64)
    assert err.value.field == "sd_upscale_overlap"
    with pytest.raises(InvalidParameter) as err:  # GenerationParams takes nothing under 64 px
        sd_upscale.tile_grid(256, 48, 64, 64, 8)
    assert err.value.field == "sd_upscale_scale"


@pytest.mark.parametrize("overlap", [0, 8, 16, 40])
def test_unchanged_tiles_give_the_picture_back(overlap):
    image = noise_picture(150, 110)
    grid = sd_upscale.tile_grid(150, 110, 64, 48, overlap)
    tiles = sd_upscale.split(image, grid)
    assert all(t.size == (64, 48) for t in tiles) and len(tiles) == len(grid.xs) * len(grid.ys)
    assert np.array_equal(np.asarray(sd_upscale.combine(tiles, grid)), np.asarray(image))


def test_overlaps_fade_linearly_from_the_left_and_top_neighbour():
    grid = sd_upscale.tile_grid(100, 64, 64, 64, 16)  # two columns at 0 and 36: 28 px shared, 16 faded
    assert grid.xs == (0, 36) and grid.ys == (0,)
    black, white = Image.new("RGB", (64, 64)), Image.new("RGB", (64, 64), (255, 255, 255))
    row = np.asarray(sd_upscale.combine([black, white], grid))[10, :, 0].astype(int)
    assert (row[:36] == 0).all() and (row[52:] == 255).all()  # the rest of the shared part is the right tile's
    assert list(row[36:52]) == [c * 255 // 16 for c in range(16)]
    grid = sd_upscale.tile_grid(64, 100, 64, 64, 16)
    column = np.asarray(sd_upscale.combine([black, white], grid))[:, 5, 1].astype(int)
    assert (column[:36] == 0).all() and list(column[36:52]) == [c * 255 // 16 for c in range(16)]


BASE = dict(prompt="a stone bridge", negative_prompt="blur", steps=2, strength=0.5, sampler="Euler", rng="cpu")


def _by_hand(engine, source: Image.Image, *, scale, overlap, width, height, seed, batch_size=1, n_iter=1):
    """The script's work done step by step with plain img2img calls."""
    enlarged = upscale_by(source, scale, builtin_pass("Lanczos"))
    grid = sd_upscale.tile_grid(enlarged.width, enlarged.height, width, height, overlap)
    tiles = sd_upscale.split(enlarged, grid)
    pictures = []
    for n in range(n_iter):
        done = []
        for k in range(0, len(tiles), batch_size):
            batch = tuple(tiles[k:k + batch_size])
            done += engine.generate(GenerationParams(**BASE, init_images=batch, batch_size=len(batch), width=width,
                                                     height=height, seed=seed + n + k // batch_size)).images
        pictures.append(sd_upscale.combine(done, grid))
    return pictures


def test_sd_upscale_is_img2img_tile_by_tile(sd1_engine):
    source = noise_picture(48, 32)
    progress = []
    result = sd1_engine.generate(GenerationParams(**BASE, init_images=(source,), width=64, height=64, seed=21,
                                                  sd_upscale=SDUpscaleOptions(scale=2, upscaler="Lanczos",
                                                                              overlap=16)),
                                 progress=progress.append)
    want = _by_hand(sd1_engine, source, scale=2, overlap=16, width=64, height=64, seed=21)
    assert result.images[0].size == (96, 64)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(want[0]))
    assert not np.array_equal(np.asarray(result.images[0]),
                              np.asarray(upscale_by(source, 2, builtin_pass("Lanczos"))))  # it did repaint
    text = result.infotexts[0]
    assert "Size: 64x64" in text and "Seed: 21" in text and "SD upscale overlap: 16, SD upscale upscaler: Lanczos" in text
    assert {(p.job, p.job_count) for p in progress} == {(0, 2), (1, 2)}


def test_batches_and_counts_take_a1111s_seeds(sd1_engine):
    source = noise_picture(80, 40, seed=3)
    result = sd1_engine.generate(GenerationParams(**BASE, init_images=(source,), width=64, height=64, seed=8,
                                                  batch_size=2, n_iter=2,
                                                  sd_upscale=SDUpscaleOptions(scale=1.6, upscaler="Lanczos",
                                                                              overlap=8)))
    want = _by_hand(sd1_engine, source, scale=1.6, overlap=8, width=64, height=64, seed=8, batch_size=2, n_iter=2)
    assert len(result.images) == 2 and result.seeds == (8, 9)
    for got, expected in zip(result.images, want):
        assert np.array_equal(np.asarray(got), np.asarray(expected))


def test_upscaler_none_keeps_the_size(sd1_engine):
    source = noise_picture(96, 64)
    result = sd1_engine.generate(GenerationParams(**BASE, init_images=(source,), width=64, height=64, seed=1,
                                                  sd_upscale=SDUpscaleOptions(scale=4, upscaler="None", overlap=32)))
    assert result.images[0].size == (96, 64) and "SD upscale upscaler: None" in result.infotexts[0]


def test_interrupt_keeps_the_tiles_not_repainted(sd1_engine):
    from underpaint.pipeline.records import Cancellation

    source = noise_picture(48, 32)
    cancel = Cancellation()

    def stop_after_first_tile(p):
        if p.job == 0 and p.step == p.steps:
            cancel.interrupt()

    result = sd1_engine.generate(GenerationParams(**BASE, init_images=(source,), width=64, height=64, seed=2,
                                                  sd_upscale=SDUpscaleOptions(scale=2, overlap=16)),
                                 progress=stop_after_first_tile, cancel=cancel)
    enlarged = np.asarray(upscale_by(source, 2, builtin_pass("Lanczos")))
    got = np.asarray(result.images[0])
    assert result.interrupted and result.unfinished == (0,) and result.finished() == []
    assert np.array_equal(got[:, 64:], enlarged[:, 64:])  # the second tile's own columns, as enlarged
    assert not np.array_equal(got[:, :32], enlarged[:, :32])


def test_what_sd_upscale_refuses(sd1_engine, photo):
    with pytest.raises(InvalidParameter) as err:
        GenerationParams(init_images=(photo,), mask=photo.convert("L"), sd_upscale=SDUpscaleOptions())
    assert err.value.field == "sd_upscale"
    for options, field in ((dict(scale=9), "sd_upscale_scale"), (dict(overlap=300), "sd_upscale_overlap"),
                           (dict(upscaler=" "), "sd_upscale_upscaler")):
        with pytest.raises(InvalidParameter) as err:
            SDUpscaleOptions(**options)
        assert err.value.field == field
    with pytest.raises(InvalidParameter) as err:
        sd1_engine.generate(GenerationParams(prompt="x", width=64, height=64, sd_upscale=SDUpscaleOptions()))
    assert err.value.field == "sd_upscale"
    with pytest.raises(UnknownName) as err:
        sd1_engine.generate(GenerationParams(init_images=(photo,), width=64, height=64,
                                             sd_upscale=SDUpscaleOptions(upscaler="4x-Missing")))
    assert err.value.field == "sd_upscale_upscaler"


# --------------------------------------------------------------------------- the API and the CLI


@pytest.fixture(scope="module")
def api(sd1_file, tmp_path_factory):
    from test_server_support import real_api, tiny_models_dir

    with real_api(tiny_models_dir(tmp_path_factory.mktemp("sd-upscale-models"), sd1_file)) as client:
        yield client


def test_api_script(api):
    assert "sd upscale" in api.get("/sdapi/v1/scripts").json()["img2img"]
    info = [s for s in api.get("/sdapi/v1/script-info").json() if s["name"] == "sd upscale"]
    assert info and [a["label"] for a in info[0]["args"]] == ["Info", "Tile overlap", "Upscaler", "Scale Factor"]
    body = {"init_images": [png_b64(noise_picture(48, 32))], "prompt": "a stone bridge", "steps": 2,
            "denoising_strength": 0.5, "width": 64, "height": 64, "seed": 4, "sampler_name": "Euler",
            "script_name": "SD upscale", "script_args": ["", 16, "Lanczos", 2]}
    r = api.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    first = r.json()["images"][0]
    assert decode_b64(first).size == (96, 64)
    assert "SD upscale upscaler: Lanczos" in r.json()["info"]
    r = api.post("/sdapi/v1/img2img", json={**body, "script_args": [None, 16, 1, 2]})  # 1: /upscalers' Lanczos
    assert r.status_code == 200 and r.json()["images"][0] == first


@pytest.mark.parametrize(("changes", "field"), [
    ({"script_name": "img2img alternative test"}, "script_name"),
    ({"script_args": ["", 64, "Lanczos", 2]}, "script_args[1]"),  # not below the 64 px tile
    ({"script_args": ["", 16, "4x-Missing", 2]}, "script_args[2]"),
    ({"script_args": ["", 16, 99, 2]}, "script_args[2]"),
    ({"script_args": ["", 16, "Lanczos", 9]}, "script_args[3]"),
    ({"script_args": ["", 16, "Lanczos", "big"]}, "script_args[3]"),
    ({"mask": "same"}, "script_name"),
    # 2048x2048 in 64 px tiles overlapping by 32: 63 x 63 tiles, past the server's 256
    ({"script_args": ["", 32, "Lanczos", 8], "init_images": "256x256"}, "script_args[1]"),
])
def test_api_refusals_name_the_argument(api, changes, field):
    picture = png_b64(noise_picture(48, 32))
    body = {"init_images": [picture], "steps": 1, "width": 64, "height": 64, "script_name": "sd upscale",
            "script_args": ["", 16, "Lanczos", 2], **changes}
    if body.get("mask") == "same":
        body["mask"] = picture
    if body["init_images"] == "256x256":
        body["init_images"] = [png_b64(noise_picture(256, 256))]
    r = api.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 422 and r.json()["field"] == field, r.text


def test_api_errors_found_while_running_name_the_argument(api):
    # a 64 px tall picture at scale 1 makes 64 px tiles of a 512x512 request, which a 64 px overlap fills
    body = {"init_images": [png_b64(noise_picture(200, 64))], "steps": 1, "script_name": "sd upscale",
            "script_args": ["", 64, "Lanczos", 1]}
    r = api.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 422 and r.json()["field"] == "script_args[1]", r.text


def test_txt2img_has_no_sd_upscale(api):
    r = api.post("/sdapi/v1/txt2img", json={"steps": 1, "width": 64, "height": 64, "script_name": "sd upscale"})
    assert r.status_code == 422 and r.json()["field"] == "script_name"


def test_cli(sd1_file, tmp_path):
    from cli_runner import run_cli

    source = tmp_path / "in.png"
    noise_picture(48, 32).save(source)
    out = tmp_path / "out.png"
    r = run_cli("img2img", str(source), "-p", "a stone bridge", "--sd-upscale", "2", "--sd-upscale-overlap", "16",
                "-W", "64", "-H", "64", "--steps", "2", "-s", "0.5", "--seed", "4", "-m", str(sd1_file),
                "-o", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    saved = Image.open(out)
    assert saved.size == (96, 64) and "SD upscale overlap: 16" in saved.info["parameters"]
    r = run_cli("img2img", str(source), "-p", "x", "--sd-upscale-overlap", "16", "-m", str(sd1_file),
                "-o", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "--sd-upscale-overlap" in r.stderr and "--sd-upscale FACTOR" in r.stderr
    r = run_cli("img2img", str(source), "-p", "x", "--sd-upscale", "2", "--sd-upscale-upscaler", "4x-Missing",
                "-m", str(sd1_file), "-o", str(tmp_path / "x.png"), "--models-dir", str(tmp_path))
    assert r.returncode == 2 and "--sd-upscale-upscaler" in r.stderr


def test_a_controlnet_unit_without_a_picture_steers_each_tile_with_it(sd1_engine, tmp_path):
    """The "tile" ControlNet workflow: a unit with no picture of its own takes the img2img input,
    which for SD upscale is each tile; its hint must be that tile's pixels."""
    import torch

    from test_controlnet_hr_option import _Recorder
    from tiny_controlnet import write_controlnet
    from underpaint.pipeline.control import ControlUnit

    net = write_controlnet(tmp_path / "control_tiny_tile.safetensors", "sd1", seed=13)
    source = noise_picture(48, 32, seed=5)
    hints = []
    with _Recorder(sd1_engine, [net]) as recorder:
        module = recorder.cache.get(net, device=sd1_engine.model.device, dtype=sd1_engine.model.dtype).module
        handle = module.register_forward_hook(
            lambda mod, args, kwargs, out: hints.append(kwargs["controlnet_cond"][0].clone()), with_kwargs=True)
        try:
            sd1_engine.generate(GenerationParams(**BASE, init_images=(source,), width=64, height=64, seed=6,
                                                 control_units=(ControlUnit(module="none", model=str(net)),),
                                                 sd_upscale=SDUpscaleOptions(scale=2, overlap=16)))
        finally:
            handle.remove()
    enlarged = upscale_by(source, 2, builtin_pass("Lanczos"))
    tiles = sd_upscale.split(enlarged, sd_upscale.tile_grid(96, 64, 64, 64, 16))
    want = [torch.from_numpy(np.asarray(t, dtype=np.float32) / 255).permute(2, 0, 1) for t in tiles]
    per_tile = len(hints) // 2  # the tiles' calls come one tile after the other
    assert per_tile >= 1 and len(hints) == 2 * per_tile and not torch.allclose(want[0], want[1], atol=0.1)
    for i, got in enumerate(hints):
        assert torch.allclose(got, want[i // per_tile], atol=1e-6), i
