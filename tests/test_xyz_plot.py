"""A1111's "X/Y/Z plot" script: one request per combination of axis values, laid out in a grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from underpaint.errors import InvalidParameter
from underpaint.params import GenerationParams, HiresOptions, XYZPlotOptions
from underpaint.pipeline import xyz_plot
from underpaint.pipeline.xyz_plot import axis_names, parse_axis_values


@pytest.mark.parametrize("axis, text, want", [
    ("Steps", "1,2,3", [1, 2, 3]),
    ("Steps", "1-5", [1, 2, 3, 4, 5]),
    ("Steps", " 1 - 10 (+2) ", [1, 3, 5, 7, 9]),
    ("Steps", "10-1 (-3)", [10, 7, 4]),  # A1111 stops short of the end going down, as range(10, 2, -3)
    ("Steps", "1-10 [4]", [1, 4, 7, 10]),
    ("Steps", "1-2 [4]", [1, 1, 1, 2]),  # evenly spaced, each cut to a whole number
    ("Seed", "-1, 5-6", [-1, 5, 6]),
    ("CFG Scale", "5-9 (+0.5)", [5.0, 5.5, 6.0, 6.5, 7.0, 7.5, 8.0, 8.5, 9.0]),
    ("CFG Scale", "3-7 [5]", [3.0, 4.0, 5.0, 6.0, 7.0]),
    ("CFG Scale", "7, 1.5", [7.0, 1.5]),
    ("Prompt S/R", 'cat,"dog, black",bird', ["cat", "dog, black", "bird"]),
    ("Sampler", ["Euler", " DDIM "], ["Euler", "DDIM"]),  # a list, as A1111's value dropdowns send
    ("Nothing", "whatever", [None]),
])
def test_values_read_as_a1111_reads_them(axis, text, want):
    assert parse_axis_values(axis, text) == want


@pytest.mark.parametrize("axis, text, bad", [
    ("Steps", "1, two", "two"), ("Steps", "1.5", "1.5"), ("Steps", "1-10 (2)", "1-10 (2)"),
    ("CFG Scale", "7, high", "high"), ("Steps", "", ""), ("Steps", "5-1", "5-1"),
])
def test_bad_values_are_refused_naming_the_axis(axis, text, bad):
    with pytest.raises(InvalidParameter) as err:
        parse_axis_values(axis, text, field="xyz_y_values")
    assert err.value.field == "xyz_y_values" and axis in err.value.expected and err.value.value == bad


def test_axis_lists_follow_a1111s_order():
    txt2img, img2img = axis_names(False), axis_names(True)
    assert txt2img[:12] == ["Nothing", "Seed", "Var. seed", "Var. strength", "Steps", "Hires steps", "CFG Scale",
                            "Prompt S/R", "Prompt order", "Sampler", "Hires sampler", "Checkpoint name"]
    assert img2img[:10] == ["Nothing", "Seed", "Var. seed", "Var. strength", "Steps", "CFG Scale", "Image CFG Scale",
                            "Prompt S/R", "Prompt order", "Sampler"]
    assert "Hires upscaler" in txt2img and "Hires upscaler" not in img2img
    assert txt2img.index("Denoising") == 25 and img2img.index("Denoising") == 24
    with pytest.raises(InvalidParameter) as err:
        XYZPlotOptions(x_type="FP8 mode", x_values="Enable")
    assert err.value.field == "xyz_x_type" and "underpaint runs" in err.value.expected
    assert txt2img.index("VAE") == 29 and img2img.index("Checkpoint name") == 10


def test_labels_are_a1111s():
    assert xyz_plot.label("CFG Scale", 7.0) == "CFG Scale: 7.0"
    assert xyz_plot.label("CFG Scale", 0.1 + 0.2) == "CFG Scale: 0.3"
    assert xyz_plot.label("Prompt S/R", "dog") == "dog" and xyz_plot.label("Sampler", "Euler") == "Euler"
    assert xyz_plot.label("Nothing", None) == ""
    # A1111 shows a checkpoint by its file name without the folder, a VAE with the axis's name
    assert xyz_plot.label("Checkpoint name", "sd/v1-5.safetensors [6ce0161689]") == "v1-5.safetensors [6ce0161689]"
    assert xyz_plot.label("Checkpoint name", "tiny-b") == "tiny-b"
    assert xyz_plot.label("VAE", "None") == "VAE: None"


def test_grid_bands_and_margins():
    w, h = 40, 24
    cells = [Image.new("RGB", (w, h), (i * 40, 0, 0)) for i in range(6)]
    plain = xyz_plot.draw_grid(cells, 3, ["", "", ""], ["", ""], legend=False, margin=9)
    assert plain.size == (3 * w, 2 * h)  # no legend: no margin either, as A1111
    assert xyz_plot.draw_grid(cells, 3, ["", "", ""], ["", ""], margin=0).size == (3 * w, 2 * h)
    labelled = xyz_plot.draw_grid(cells, 3, ["a", "b", "c"], ["row one", "row two"], margin=6)
    pad_left = w * 3 // 4
    pad_top = labelled.height - 2 * h - 6
    assert labelled.width == pad_left + 3 * w + 2 * 6 and pad_top > (w + h) // 25
    columns_only = xyz_plot.draw_grid(cells, 3, ["a", "b", "c"], ["", ""], margin=2)
    assert columns_only.width == 3 * w + 4 and columns_only.height == pad_top + 2 * h + 2
    for i, cell in enumerate(cells):
        x, y = xyz_plot.cell_origin(i % 3, i // 3, (w, h), pad_left, pad_top, 6)
        assert np.array_equal(np.asarray(labelled.crop((x, y, x + w, y + h))), np.asarray(cell))
    gap = np.asarray(labelled)[pad_top + h: pad_top + h + 6, pad_left:]
    assert (gap == 255).all()  # the margin is white


BASE = dict(prompt="a red cat", negative_prompt="blurry dog", steps=1, sampler="Euler", rng="cpu", width=64,
            height=64)


def _cut(grid: Image.Image, col: int, row: int, cols: int, rows: int, *, margin: int = 0, left: int = 0) -> np.ndarray:
    w = h = 64
    top = grid.height - rows * h - margin * (rows - 1)
    x, y = xyz_plot.cell_origin(col, row, (w, h), left, top, margin)
    return np.asarray(grid.crop((x, y, x + w, y + h)))


def test_every_cell_is_a_plain_request(sd1_engine):
    options = XYZPlotOptions(x_type="CFG Scale", x_values="3,7", y_type="Prompt S/R", y_values="cat,dog",
                             include_lone_images=True, margin_size=4)
    progress = []
    result = sd1_engine.generate(GenerationParams(**BASE, seed=11, xyz_plot=options), progress=progress.append)
    assert len(result.images) == 1 + 4
    grid = result.images[0]
    assert grid.width == 64 * 3 // 4 + 2 * 64 + 4  # row labels ("cat", "dog") make a band to the left
    want = {}
    for iy, prompt_sub in enumerate(["cat", "dog"]):
        for ix, cfg in enumerate([3.0, 7.0]):
            plain = sd1_engine.generate(GenerationParams(**{**BASE, "prompt": f"a red {prompt_sub}"}, seed=11,
                                                         cfg_scale=cfg))
            want[ix, iy] = plain
            assert np.array_equal(_cut(grid, ix, iy, 2, 2, margin=4, left=48), np.asarray(plain.images[0]))
    # the lone pictures follow the grid, row by row, each with its own infotext
    for i, (ix, iy) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):
        assert np.array_equal(np.asarray(result.images[1 + i]), np.asarray(want[ix, iy].images[0]))
        assert result.infotexts[1 + i] == want[ix, iy].infotexts[0]
    assert result.infotexts[0] == want[0, 0].infotexts[0] and result.seeds == (11,) * 5
    assert {(p.job, p.job_count) for p in progress} == {(j, 4) for j in range(4)}


def test_prompt_sr_replaces_in_both_prompts(sd1_engine):
    """'dog' is in the negative prompt only: the replacement reaches it there."""
    options = XYZPlotOptions(x_type="Prompt S/R", x_values="dog,bird", include_lone_images=True, draw_legend=False)
    result = sd1_engine.generate(GenerationParams(**BASE, seed=3, xyz_plot=options))
    assert result.images[0].size == (128, 64)
    assert result.negative_prompts[1:] == ("blurry dog", "blurry bird") and result.prompts[2] == "a red cat"
    plain = sd1_engine.generate(GenerationParams(**{**BASE, "negative_prompt": "blurry bird"}, seed=3))
    assert np.array_equal(np.asarray(result.images[0])[:, 64:], np.asarray(plain.images[0]))
    with pytest.raises(InvalidParameter) as err:
        sd1_engine.generate(GenerationParams(**BASE, xyz_plot=XYZPlotOptions(y_type="Prompt S/R", y_values="fish,cod")))
    assert err.value.field == "xyz_y_values" and err.value.value == "fish"


def test_seeds_fixed_once_or_varied(sd1_engine, monkeypatch):
    import underpaint.params as params_mod

    drawn = iter([500, 600, 700, 800])
    monkeypatch.setattr(params_mod.random, "randrange", lambda n: next(drawn))
    options = XYZPlotOptions(x_type="Steps", x_values="1,2", include_lone_images=True, draw_legend=False)
    result = sd1_engine.generate(GenerationParams(**BASE, seed=-1, subseed=-1, xyz_plot=options))
    assert result.seeds[1:] == (500, 500)  # one seed for every cell
    varied = XYZPlotOptions(x_type="Nothing", y_type="Steps", y_values="1,2", z_type="CFG Scale", z_values="5,6",
                            vary_seeds_x=True, vary_seeds_y=True, vary_seeds_z=True, include_lone_images=True,
                            draw_legend=False)
    result = sd1_engine.generate(GenerationParams(**BASE, seed=40, xyz_plot=varied))
    # X has one value: Y adds its index, Z its index times the 2 Y values
    assert result.seeds[-4:] == (40, 41, 42, 43)
    kept = XYZPlotOptions(x_type="Steps", x_values="1,1", no_fixed_seeds=True, include_lone_images=True,
                          draw_legend=False)
    monkeypatch.setattr(params_mod.random, "randrange", lambda n, drawn=iter(range(900, 999)): next(drawn))
    result = sd1_engine.generate(GenerationParams(**BASE, seed=-1, xyz_plot=kept))
    assert result.seeds[1] != result.seeds[2]  # Keep -1 for seeds: each cell draws its own


def test_seed_axis_fixes_its_own_minus_one(sd1_engine, monkeypatch):
    import underpaint.params as params_mod

    monkeypatch.setattr(params_mod.random, "randrange", lambda n: 77)
    options = XYZPlotOptions(x_type="Seed", x_values="-1,5", include_lone_images=True, draw_legend=False)
    result = sd1_engine.generate(GenerationParams(**BASE, seed=9, xyz_plot=options))
    assert result.seeds[1:] == (77, 5)
    plain = sd1_engine.generate(GenerationParams(**BASE, seed=5))
    assert np.array_equal(np.asarray(result.images[2]), np.asarray(plain.images[0]))


def test_several_z_values_make_a_grid_of_grids(sd1_engine):
    options = XYZPlotOptions(x_type="Steps", x_values="1,2", z_type="CFG Scale", z_values="4,8",
                             include_sub_grids=True, include_lone_images=True)
    result = sd1_engine.generate(GenerationParams(**BASE, seed=2, xyz_plot=options))
    combined, sub_a, sub_b = result.images[:3]
    assert len(result.images) == 3 + 4
    assert sub_a.size == sub_b.size and sub_a.width == 128
    assert combined.width == 2 * sub_a.width and combined.height > sub_a.height  # the Z labels above
    top = combined.height - sub_a.height
    assert np.array_equal(np.asarray(combined.crop((sub_a.width, top, combined.width, combined.height))),
                          np.asarray(sub_b))
    plain = sd1_engine.generate(GenerationParams(**{**BASE, "steps": 2}, seed=2, cfg_scale=8.0))
    assert np.array_equal(_cut(sub_b, 1, 0, 2, 1), np.asarray(plain.images[0]))
    assert result.infotexts[2] == result.infotexts[5]  # a sub grid's infotext is its first cell's
    only_combined = sd1_engine.generate(GenerationParams(**BASE, seed=2, xyz_plot=XYZPlotOptions(
        x_type="Steps", x_values="1,2", z_type="CFG Scale", z_values="4,8")))
    assert len(only_combined.images) == 1


def test_hires_axes_and_denoising(sd1_engine):
    hires = HiresOptions(scale=1.0, steps=1, strength=0.5, upscaler="Latent")
    options = XYZPlotOptions(x_type="Hires steps", x_values="1,2", y_type="Denoising", y_values="0.3",
                             draw_legend=False)
    result = sd1_engine.generate(GenerationParams(**BASE, seed=4, hires=hires, xyz_plot=options))
    plain = sd1_engine.generate(GenerationParams(**BASE, seed=4, hires=HiresOptions(scale=1.0, steps=2, strength=0.3,
                                                                                     upscaler="Latent")))
    assert np.array_equal(np.asarray(result.images[0])[:, 64:], np.asarray(plain.images[0]))


@pytest.mark.parametrize("options, extra, field", [
    (dict(x_type="Hires steps", x_values="1"), {}, "xyz_x_type"),  # needs hires. fix
    (dict(y_type="Denoising", y_values="0.5"), {}, "xyz_y_type"),  # txt2img without hires. fix
    (dict(x_type="Steps", x_values="0,1"), {}, "xyz_x_values"),  # a value the request cannot take
    (dict(z_type="Sampler", z_values="Euler,Nope"), {}, "xyz_z_values"),
    (dict(x_type="Hires upscaler", x_values="Latent"), {"init_images": True}, "xyz_x_type"),  # txt2img only
])
def test_refusals_come_before_any_cell(sd1_engine, photo, options, extra, field):
    calls = []
    fields = {**BASE, **({"init_images": (photo,)} if extra else {})}
    with pytest.raises(InvalidParameter) as err:
        sd1_engine.generate(GenerationParams(**fields, xyz_plot=XYZPlotOptions(**options)), progress=calls.append)
    assert err.value.field == field and not calls


def test_options_refused_at_the_edge():
    with pytest.raises(InvalidParameter) as err:
        XYZPlotOptions(x_type="Steps", x_values="a")
    assert err.value.field == "xyz_x_values"
    with pytest.raises(InvalidParameter) as err:
        XYZPlotOptions(margin_size=-2)
    assert err.value.field == "xyz_margin_size"
    from underpaint.params import SDUpscaleOptions

    with pytest.raises(InvalidParameter) as err:
        GenerationParams(init_images=(Image.new("RGB", (64, 64)),), sd_upscale=SDUpscaleOptions(),
                         xyz_plot=XYZPlotOptions())
    assert err.value.field == "xyz_plot"


def test_cli_writes_the_grid_then_the_cells(tmp_path, sd1_file, sd1_engine):
    from cli_runner import run_cli

    out = tmp_path / "plot.png"
    proc = run_cli("txt2img", "-p", "a red cat", "-n", "blurry dog", "--steps", "1", "--sampler", "Euler", "--rng",
                   "cpu", "-W", "64", "-H", "64", "--seed", "6", "--model", str(sd1_file), "-o", str(out),
                   "--xyz-x", "CFG Scale", "--xyz-x-values", "2-4 [2]", "--xyz-cells", "--xyz-no-legend")
    assert proc.returncode == 0, proc.stderr
    grid, first, second = (Image.open(tmp_path / f"plot-{i}.png") for i in (1, 2, 3))
    assert grid.size == (128, 64) and first.size == (64, 64)
    plain = sd1_engine.generate(GenerationParams(**BASE, seed=6, cfg_scale=4.0))
    assert np.array_equal(np.asarray(second.convert("RGB")), np.asarray(plain.images[0]))
    assert np.array_equal(np.asarray(grid.convert("RGB"))[:, 64:], np.asarray(plain.images[0]))
    assert "CFG scale: 2," in grid.text["parameters"] and "CFG scale: 4," in second.text["parameters"]


@pytest.mark.parametrize("extra, needles", [
    (["--xyz-x", "Steps", "--xyz-x-values", "1, lots"], ["--xyz-x-values: got 'lots'", "Steps"]),
    (["--xyz-x", "Stepz", "--xyz-x-values", "1"], ["--xyz-x: got 'Stepz'", "'Steps'"]),
    (["--xyz-x", "Steps"], ["--xyz-x-values VALUES"]),
    (["--xyz-cells"], ["--xyz-cells", "--xyz-x TYPE"]),
    (["--xyz-y", "Prompt S/R", "--xyz-y-values", "fish,cod"], ["--xyz-y-values: got 'fish'"]),
])
def test_cli_refusals_name_the_flag(tmp_path, sd1_file, extra, needles):
    from cli_runner import run_cli

    from test_cli import assert_clean_error

    proc = run_cli("txt2img", "-p", "a red cat", "--steps", "1", "-W", "64", "-H", "64", "--model", str(sd1_file),
                   "-o", str(tmp_path / "o.png"), *extra)
    assert_clean_error(proc, *needles)


# --------------------------------------------------------------------------- the A1111 API


@pytest.fixture(scope="module")
def api(sd1_file, tmp_path_factory):
    from test_server_support import real_api, tiny_models_dir

    with real_api(tiny_models_dir(tmp_path_factory.mktemp("xyz-models"), sd1_file)) as client:
        yield client


def _api_args(x_type, x_values, x_dropdown=(), y_type=0, y_values="", **flags):
    args = [x_type, x_values, list(x_dropdown), y_type, y_values, [], 0, "", [],
            True, False, False, False, False, False, False, 0, False]
    for index, value in flags.items():
        args[int(index.removeprefix("a"))] = value
    return args


def test_api_script_runs_the_plot(api, sd1_engine):
    from test_server_support import decode_b64

    names = axis_names(False)
    body = {"prompt": "a red cat", "steps": 2, "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler",
            "script_name": "X/Y/Z plot",
            "script_args": _api_args(names.index("CFG Scale"), "3, 7", a10=True)}  # include lone images
    r = api.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    images = [decode_b64(data) for data in r.json()["images"]]
    assert len(images) == 3 and images[0].width == 2 * 64 and images[0].height > 64  # a label band on top
    for picture, cfg in zip(images[1:], (3.0, 7.0)):
        plain = sd1_engine.generate(GenerationParams(prompt="a red cat", steps=2, width=64, height=64, seed=5,
                                                     sampler="Euler", cfg_scale=cfg))
        assert np.array_equal(np.asarray(picture.convert("RGB")), np.asarray(plain.images[0]))
    # a choice axis takes the dropdown list (A1111's UI sends it there), by name or by the tab's index
    sampler = axis_names(True).index("Sampler")
    body = {"init_images": [_png(Image.new("RGB", (64, 64), (90, 40, 10)))], "steps": 2, "width": 64,
            "height": 64, "seed": 5, "denoising_strength": 0.5, "script_name": "x/y/z plot",
            "script_args": _api_args(sampler, "", ["Euler", "DDIM"])}
    r = api.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200 and len(r.json()["images"]) == 1, r.text
    assert "Sampler: Euler" in r.json()["info"]


def _png(image):
    from test_server_support import png_b64

    return png_b64(image)


@pytest.mark.parametrize(("args", "field"), [
    (_api_args(999, "1"), "script_args[0]"),
    (_api_args(axis_names(False).index("FP8 mode"), "Enable"), "script_args[0]"),
    (_api_args(axis_names(False).index("Steps"), "1-x"), "script_args[1]"),
    (_api_args(axis_names(False).index("Prompt S/R"), "zebra,horse"), "script_args[1]"),
    (_api_args(1, "1", y_type=axis_names(False).index("Steps"), y_values="0"), "script_args[4]"),
    (_api_args(axis_names(False).index("Steps"), "1-70"), "script_args"),  # 70 cells: past the 64 pictures
    (_api_args(1, "1", a16=-3), "script_args[16]"),
])
def test_api_refusals_name_the_argument(api, args, field):
    r = api.post("/sdapi/v1/txt2img", json={"prompt": "a red cat", "steps": 2, "width": 64, "height": 64,
                                            "script_name": "x/y/z plot", "script_args": args})
    assert r.status_code == 422 and r.json()["field"] == field, r.text


# --------------------------------------------------------------------------- switching models


def _names(checkpoints=("a", "b"), vaes=("Automatic", "None", "v")):
    """A ModelNames that knows these names (a checkpoint becomes "ckpt:<name>") and refuses others."""
    def find(known, prefix):
        def look_up(value, field):
            if value not in known:
                raise InvalidParameter(field, value, "a known name")
            return prefix + value
        return look_up

    return xyz_plot.ModelNames(checkpoint=find(checkpoints, "ckpt:"), vae=find(vaes, ""))


def test_loading_axes_run_outermost_while_the_grid_keeps_its_order():
    options = XYZPlotOptions(x_type="Checkpoint name", x_values="a,b", y_type="Steps", y_values="1,2,3")
    work = xyz_plot.plan(GenerationParams(**BASE, seed=1, xyz_plot=options), _names())
    assert [(c.ix, c.iy) for c in work.cells] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    ran = [work.cells[i] for i in work.order]
    assert [c.checkpoint for c in ran] == ["ckpt:a"] * 3 + ["ckpt:b"] * 3  # each checkpoint once
    assert [c.params.steps for c in ran] == [1, 2, 3, 1, 2, 3]
    # a VAE axis costs less than a checkpoint: inside it, and Z (cost 0) innermost
    options = XYZPlotOptions(x_type="VAE", x_values="None,v", y_type="CFG Scale", y_values="5,6",
                             z_type="Checkpoint name", z_values="b,a")
    work = xyz_plot.plan(GenerationParams(**BASE, seed=1, xyz_plot=options), _names())
    ran = [work.cells[i] for i in work.order]
    assert [(c.checkpoint, c.vae, c.params.cfg_scale) for c in ran] == [
        (ckpt, vae, cfg) for ckpt in ("ckpt:b", "ckpt:a") for vae in ("None", "v") for cfg in (5.0, 6.0)]
    assert sorted(work.order) == list(range(8))
    # without loading axes: Z by Z, row by row, as before
    options = XYZPlotOptions(x_type="Steps", x_values="1,2", y_type="CFG Scale", y_values="5,6")
    assert xyz_plot.plan(GenerationParams(**BASE, seed=1, xyz_plot=options)).order == [0, 1, 2, 3]


def test_unknown_model_names_are_refused_naming_the_values():
    for letter, kind, values, bad in (("x", "Checkpoint name", "a,nope", "nope"),
                                      ("z", "VAE", "None,madeup", "madeup")):
        options = XYZPlotOptions(**{f"{letter}_type": kind, f"{letter}_values": values})
        with pytest.raises(InvalidParameter) as err:
            xyz_plot.plan(GenerationParams(**BASE, xyz_plot=options), _names())
        assert (err.value.field, err.value.value) == (f"xyz_{letter}_values", bad)


@pytest.mark.parametrize("kind", ["Checkpoint name", "VAE"])
def test_python_api_refuses_axes_that_switch_models(sd1_engine, kind):
    calls = []
    options = XYZPlotOptions(x_type="Steps", x_values="1", y_type=kind, y_values="None")
    with pytest.raises(InvalidParameter) as err:
        sd1_engine.generate(GenerationParams(**BASE, xyz_plot=options), progress=calls.append)
    assert err.value.field == "xyz_y_type" and err.value.value == kind and not calls
    assert "server" in err.value.expected and "CLI" in err.value.expected


@pytest.fixture(scope="module")
def two_models(sd1_file, tmp_path_factory):
    """A models folder with two different tiny SD 1.5 checkpoints (tiny-a, tiny-b) and two VAE files,
    one named like tiny-a (what "Automatic" picks for it)."""
    import shutil

    import tiny_models as tm

    root = tmp_path_factory.mktemp("xyz-two-models")
    (root / "checkpoints").mkdir()
    shutil.copy(sd1_file, root / "checkpoints" / "tiny-a.safetensors")
    tm.write_sd1(root / "checkpoints" / "tiny-b.safetensors", seed=7)
    (root / "vae").mkdir()
    tm.write_vae(root / "vae" / "tiny-a.vae.safetensors", seed=21)
    tm.write_vae(root / "vae" / "other-vae.safetensors", seed=22)
    return root


@pytest.fixture(scope="module")
def switching_api(two_models):
    """A real server over ``two_models`` whose loader records each checkpoint load (file name, VAE name)."""
    from fastapi.testclient import TestClient

    from underpaint.server.app import create_app, engine_loader
    from underpaint.server.config import ServerConfig

    config = ServerConfig(models_dir=two_models, device="cpu", dtype="fp32", preload=False)
    real = engine_loader(config)
    loads = []

    def loader(path, vae=None):
        loads.append((path.name, vae.name if vae else None))
        return real(path, vae=vae)

    with TestClient(create_app(config, loader=loader), base_url="http://127.0.0.1") as client:
        yield client, loads


PLOT_REQUEST = {"prompt": "a red cat", "steps": 1, "width": 64, "height": 64, "seed": 8, "sampler_name": "Euler",
                "override_settings": {"randn_source": "CPU"}}


def _plot(client, args):
    import json

    from test_server_support import decode_b64

    r = client.post("/sdapi/v1/txt2img", json={**PLOT_REQUEST, "script_name": "x/y/z plot", "script_args": args})
    assert r.status_code == 200, r.text
    return [decode_b64(data) for data in r.json()["images"]], json.loads(r.json()["info"])


def _plain(client, **fields):
    import json

    from test_server_support import decode_b64

    overrides = {**PLOT_REQUEST["override_settings"], **fields.pop("override_settings", {})}
    r = client.post("/sdapi/v1/txt2img", json={**PLOT_REQUEST, **fields, "override_settings": overrides})
    assert r.status_code == 200, r.text
    return np.asarray(decode_b64(r.json()["images"][0]).convert("RGB")), json.loads(r.json()["info"])


def test_api_checkpoint_axis_runs_each_cell_on_its_checkpoint(switching_api):
    client, loads = switching_api
    titles = {m["model_name"]: m["title"] for m in client.get("/sdapi/v1/sd-models").json()}
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-b", "sd_vae": "None"}).status_code == 200
    before = len(loads)
    names = axis_names(False)
    # X: a title and a name, as /sd-models lists them; Y: steps. X is the costly axis: it runs outermost.
    images, info = _plot(client, _api_args(names.index("Checkpoint name"), f"{titles['tiny-a']}, tiny-b",
                                           y_type=names.index("Steps"), y_values="1,2", a10=True))
    assert loads[before:] == [("tiny-a.safetensors", None), ("tiny-b.safetensors", None)]  # once each
    assert len(images) == 1 + 4
    cells = [(ckpt, steps) for steps in (1, 2) for ckpt in ("tiny-a", "tiny-b")]  # the grid's order
    infotexts = info["infotexts"][1:]
    assert not np.array_equal(np.asarray(images[1]), np.asarray(images[2]))  # the checkpoints paint differently
    for picture, text, (ckpt, steps) in sorted(zip(images[1:], infotexts, cells), key=lambda cell: cell[2]):
        want, plain_info = _plain(client, steps=steps, override_settings={"sd_model_checkpoint": ckpt})
        assert np.array_equal(np.asarray(picture.convert("RGB")), want), (ckpt, steps)
        assert f"Model: {ckpt}," in text and plain_info["infotexts"][0] == text
    hashes = {text.split("Model hash: ")[1].split(",")[0] for text in infotexts}
    assert len(hashes) == 2 and info["sd_model_name"] == "tiny-a"  # the first cell's model
    assert info["all_seeds"] == [8] * 5
    assert images[0].width == 64 * 3 // 4 + 2 * 64  # the Steps labels make a band to the left
    # afterwards the selected checkpoint is still tiny-b, and a plain job runs on it
    titles = {m["model_name"]: m["title"] for m in client.get("/sdapi/v1/sd-models").json()}
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == titles["tiny-b"]
    assert _plain(client)[1]["sd_model_name"] == "tiny-b"


def test_api_vae_axis_swaps_the_vae_in_place(switching_api):
    client, loads = switching_api
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-a", "sd_vae": "Automatic"}
                       ).status_code == 200
    before = len(loads)
    vae = axis_names(False).index("VAE")
    images, info = _plot(client, _api_args(vae, "None, other-vae, Automatic", a10=True, a9=False))
    assert len(loads) == before  # no checkpoint load: only the VAE's weights change
    assert images[0].size == (3 * 64, 64)
    for picture, text, value in zip(images[1:], info["infotexts"][1:], ("None", "other-vae.safetensors", "Automatic")):
        want, plain_info = _plain(client, override_settings={"sd_vae": value})
        assert np.array_equal(np.asarray(picture.convert("RGB")), want), value
        assert plain_info["infotexts"][0] == text
    assert "VAE: other-vae.safetensors" in info["infotexts"][2]
    assert "VAE: tiny-a.vae.safetensors" in info["infotexts"][3]  # Automatic: the VAE named like tiny-a
    assert "VAE" not in info["infotexts"][1]
    assert len({np.asarray(p).tobytes() for p in images[1:]}) == 3
    assert len(loads) == before
    assert client.get("/sdapi/v1/options").json()["sd_vae"] == "Automatic"


def test_api_checkpoint_and_vae_axes_together_load_each_checkpoint_once(switching_api):
    client, loads = switching_api
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-a", "sd_vae": "None"}).status_code == 200
    before = len(loads)
    names = axis_names(False)
    # Checkpoint name on Y, VAE on X: each checkpoint loads once, its VAEs swap in place within it
    _plot(client, _api_args(names.index("VAE"), "other-vae, None", y_type=names.index("Checkpoint name"),
                            y_values="tiny-b, tiny-a"))
    assert [name for name, _ in loads[before:]] == ["tiny-b.safetensors", "tiny-a.safetensors"]


@pytest.mark.parametrize("axis, values, field", [
    ("Checkpoint name", "tiny-a, tiny-c", "script_args[1]"),
    ("VAE", "None, no-such-vae", "script_args[1]"),
])
def test_api_unknown_model_names_are_refused_before_anything_runs(switching_api, axis, values, field):
    client, loads = switching_api
    before = len(loads)
    r = client.post("/sdapi/v1/txt2img", json={**PLOT_REQUEST, "script_name": "x/y/z plot",
                                               "script_args": _api_args(axis_names(False).index(axis), values)})
    assert r.status_code == 422 and r.json()["field"] == field, r.text
    assert values.split(", ")[1] in r.text and len(loads) == before


def test_cli_checkpoint_and_vae_axes(tmp_path, two_models, monkeypatch):
    """Each cell's picture is the one a plain run on that checkpoint (and VAE) makes; each checkpoint
    loads once, with a Y axis too; a VAE change loads nothing."""
    from cli_runner import run_cli

    from underpaint.pipeline.engine import Engine

    loads = []
    real_load = Engine.load.__func__

    def counting(cls, model, **settings):
        loads.append((Path(model).name, Path(settings["vae"]).name if settings.get("vae") else None))
        return real_load(cls, model, **settings)

    monkeypatch.setattr(Engine, "load", classmethod(counting))
    common = ["-p", "a red cat", "--steps", "1", "--sampler", "Euler", "--rng", "cpu", "-W", "64", "-H", "64",
              "--seed", "6", "--models-dir", str(two_models), "--device", "cpu", "--dtype", "fp32"]
    out = tmp_path / "plot.png"
    proc = run_cli("txt2img", *common, "-o", str(out), "--xyz-x", "Checkpoint name", "--xyz-x-values",
                   f"tiny-a, {two_models / 'checkpoints' / 'tiny-b.safetensors'}", "--xyz-y", "VAE",
                   "--xyz-y-values", "None, other-vae", "--xyz-cells")
    assert proc.returncode == 0, proc.stderr
    assert loads == [("tiny-a.safetensors", None), ("tiny-b.safetensors", None)]
    cells = [Image.open(tmp_path / f"plot-{i}.png") for i in range(2, 6)]  # after the grid, row by row
    grid = Image.open(tmp_path / "plot-1.png")
    assert grid.size[0] > 128 and grid.size[1] > 128  # labelled
    for picture, (ckpt, vae) in zip(cells, [("tiny-a", None), ("tiny-b", None), ("tiny-a", "other-vae"),
                                            ("tiny-b", "other-vae")]):
        plain = tmp_path / f"plain-{ckpt}-{vae}.png"
        proc = run_cli("txt2img", *common, "-o", str(plain), "--model", ckpt, *(["--vae", vae] if vae else []))
        assert proc.returncode == 0, proc.stderr
        want = Image.open(plain)
        assert np.array_equal(np.asarray(picture.convert("RGB")), np.asarray(want.convert("RGB"))), (ckpt, vae)
        assert picture.text["parameters"] == want.text["parameters"]
        assert f"Model: {ckpt}," in picture.text["parameters"]
    assert len({np.asarray(p).tobytes() for p in cells}) == 4


@pytest.mark.parametrize("extra, needles", [
    (["--xyz-x", "Checkpoint name", "--xyz-x-values", "tiny-a, tiny-z"], ["--xyz-x-values: got 'tiny-z'"]),
    (["--xyz-y", "VAE", "--xyz-y-values", "Automatic, nope-vae"], ["--xyz-y-values: got 'nope-vae'"]),
])
def test_cli_unknown_model_names_stop_before_any_load(tmp_path, two_models, monkeypatch, extra, needles):
    from cli_runner import run_cli

    from test_cli import assert_clean_error
    from underpaint.pipeline.engine import Engine

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(Engine, "load", no_load)
    proc = run_cli("txt2img", "-p", "a red cat", "--steps", "1", "-W", "64", "-H", "64", "--models-dir",
                   str(two_models), "-o", str(tmp_path / "o.png"), *extra)
    assert_clean_error(proc, *needles)
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("axis_type, values, read", [
    ("Negative Guidance minimum sigma", "0,2.5", lambda p: p.s_min_uncond),
    ("Sigma Churn", "0,0.4", lambda p: p.sampler_options.s_churn),
    ("Sigma min", "0,0.1", lambda p: p.sampler_options.s_tmin),
    ("Sigma max", "1,10", lambda p: p.sampler_options.s_tmax),
    ("Sigma noise", "1,1.02", lambda p: p.sampler_options.s_noise),
    ("Schedule min sigma", "0.03,0.1", lambda p: p.sampler_options.sigma_min),
    ("Schedule max sigma", "10,14.6", lambda p: p.sampler_options.sigma_max),
    ("Schedule rho", "7,5", lambda p: p.sampler_options.rho),
    ("Extra noise", "0,0.2", lambda p: p.extra_noise),
    ("Always discard next-to-last sigma", "False,True", lambda p: p.sampler_options.discard_penultimate_sigma),
    ("RNG source", "GPU,CPU", lambda p: p.rng),
])
def test_more_of_a1111s_axes_set_their_field(axis_type, values, read):
    from underpaint.pipeline import xyz_plot

    options = XYZPlotOptions(x_type=axis_type, x_values=values)
    cells = xyz_plot.plan(GenerationParams(**BASE, xyz_plot=options)).cells
    expected = [xyz_plot.parse_axis_values(axis_type, values)[i] for i in range(2)]
    if axis_type == "Always discard next-to-last sigma":
        expected = [False, True]
    if axis_type == "RNG source":
        expected = ["gpu", "cpu"]
    assert [read(cell.params) for cell in cells] == expected


def test_img2img_noise_mask_weight_and_refiner_axes(photo):
    from underpaint.params import RefinerOptions
    from underpaint.pipeline import xyz_plot

    base = GenerationParams(**BASE, init_images=(photo,), refiner=RefinerOptions("r"))
    for axis_type, read in (("Initial noise multiplier", lambda p: p.noise_multiplier),
                            ("Cond. Image Mask Weight", lambda p: p.inpaint.mask_weight),
                            ("Refiner switch at", lambda p: p.refiner.switch_at)):
        cells = xyz_plot.plan(base.replace(xyz_plot=XYZPlotOptions(x_type=axis_type, x_values="0.5,1"))).cells
        assert [read(c.params) for c in cells] == [0.5, 1.0]
    with pytest.raises(InvalidParameter) as err:
        xyz_plot.plan(GenerationParams(**BASE, xyz_plot=XYZPlotOptions(x_type="Refiner switch at", x_values="0.5")))
    assert err.value.field == "xyz_x_values" and "refiner" in err.value.expected
    with pytest.raises(InvalidParameter) as err:
        xyz_plot.plan(GenerationParams(**BASE, xyz_plot=XYZPlotOptions(x_type="RNG source", x_values="TPU")))
    assert err.value.field == "xyz_x_values"


def test_prompt_order_runs_every_order_of_the_parts():
    """A1111's "Prompt order": the values are parts of the prompt; each of their orders is a cell, the
    parts rewritten in that order where they stood, labelled by the order."""
    from underpaint.pipeline import xyz_plot

    base = GenerationParams(**{**BASE, "prompt": "a red car, blue sky, green hills"},
                            xyz_plot=XYZPlotOptions(x_type="Prompt order", x_values="red car, green hills, blue sky"))
    cells = xyz_plot.plan(base).cells
    prompts = [cell.params.prompt for cell in cells]
    assert len(prompts) == 6 and len(set(prompts)) == 6
    assert prompts[0] == "a red car, green hills, blue sky"  # the values' own order first
    assert "a blue sky, green hills, red car" in prompts
    assert xyz_plot.label("Prompt order", ("red car", "green hills", "blue sky")) == "red car, green hills, blue sky"
    with pytest.raises(InvalidParameter) as err:
        xyz_plot.plan(base.replace(xyz_plot=XYZPlotOptions(x_type="Prompt order", x_values="red car, purple")))
    assert err.value.field == "xyz_x_values"
    with pytest.raises(InvalidParameter) as err:
        XYZPlotOptions(x_type="Prompt order", x_values="a,b,c,d,e,f,g")
    assert err.value.field == "xyz_x_values" and "5040" in err.value.expected


def test_refiner_checkpoint_axis_gives_each_cell_its_refiner(tmp_path):
    """A1111's "Refiner checkpoint" axis (None for no refiner): each cell's picture is the one the same request
    makes with that refiner alone; the refiner axis is a loading one (the server and the CLI run it cell by
    cell), and with the server's names only listed checkpoints pass."""
    from tiny_models import write_sd1

    from underpaint.pipeline import xyz_plot
    from underpaint.pipeline.engine import Engine
    from underpaint.params import RefinerOptions

    base_file = write_sd1(tmp_path / "base.safetensors", seed=1)
    other = write_sd1(tmp_path / "other.safetensors", seed=2)
    engine = Engine.load(base_file, device="cpu", dtype="fp32")
    request = dict(BASE, steps=4, sampler="Euler", seed=77)
    options = XYZPlotOptions(x_type="Refiner checkpoint", x_values=f"None,{other}", include_lone_images=True,
                             draw_legend=False)
    assert [k.name for _, k in xyz_plot.loading_axes(options)] == ["Refiner checkpoint"]
    plot = engine.generate(GenerationParams(**request, xyz_plot=options))
    alone = [engine.generate(GenerationParams(**request, refiner=r)).images[0]
             for r in (None, RefinerOptions(str(other), 0.8))]
    for cell, picture in zip(plot.images[1:], alone):
        assert np.array_equal(np.asarray(cell), np.asarray(picture))
    assert not np.array_equal(np.asarray(alone[0]), np.asarray(alone[1]))
    names = xyz_plot.ModelNames(checkpoint=lambda value, field: (_ for _ in ()).throw(
        InvalidParameter(field, value, "a listed checkpoint")), vae=lambda value, field: value)
    with pytest.raises(InvalidParameter) as err:
        xyz_plot.plan(GenerationParams(**request, xyz_plot=XYZPlotOptions(x_type="Refiner checkpoint",
                                                                          x_values="/etc/passwd")), names)
    assert err.value.field == "xyz_x_values"


def test_api_refiner_checkpoint_axis(switching_api):
    """Through the server: the cells of a "Refiner checkpoint" axis (None, tiny-b) are the pictures of the same
    request without a refiner and with tiny-b as its refiner; an unknown name is refused before anything runs."""
    import json

    from test_server_support import decode_b64

    client, loads = switching_api
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-a", "sd_vae": "None"}).status_code == 200
    index = axis_names(False).index("Refiner checkpoint")
    args = _api_args(index, "None, tiny-b")
    args[10] = True  # include_lone_images
    request = {**PLOT_REQUEST, "steps": 6}  # enough steps to pass the switch
    r = client.post("/sdapi/v1/txt2img", json={**request, "script_name": "x/y/z plot", "script_args": args})
    assert r.status_code == 200, r.text
    cells = [decode_b64(data) for data in r.json()["images"]][-2:]
    for cell, extra in zip(cells, ({}, {"refiner_checkpoint": "tiny-b", "refiner_switch_at": 0.8})):
        r = client.post("/sdapi/v1/txt2img", json={**request, **extra})
        assert r.status_code == 200, r.text
        assert np.array_equal(np.asarray(cell), np.asarray(decode_b64(r.json()["images"][0])))
        assert ("Refiner: tiny-b" in json.loads(r.json()["info"])["infotexts"][0]) == bool(extra)
    r = client.post("/sdapi/v1/txt2img", json={**PLOT_REQUEST, "script_name": "x/y/z plot",
                                               "script_args": _api_args(index, "None, /etc/passwd")})
    assert r.status_code == 422 and r.json()["field"] == "script_args[1]", r.text


def test_size_unipc_order_and_sgm_axes():
    """A1111's "Size" (WIDTHxHEIGHT), "UniPC Order" (kept below the steps' count, as A1111 sets it),
    "SGM noise multiplier" (True/False) and "Beta schedule alpha/beta" axes set their fields; a size that is not WIDTHxHEIGHT is refused
    by name before anything runs."""
    from underpaint.pipeline import xyz_plot

    def cells(axis_type, values, **base):
        return xyz_plot.plan(GenerationParams(**{**BASE, **base}, xyz_plot=XYZPlotOptions(
            x_type=axis_type, x_values=values))).cells

    assert [(c.params.width, c.params.height) for c in cells("Size", "512x768, 768 x 512")] == [(512, 768), (768, 512)]
    assert [c.params.sampler_options.unipc_order for c in cells("UniPC Order", "1,2,5", steps=4)] == [1, 2, 3]
    assert [c.params.sgm_noise_multiplier for c in cells("SGM noise multiplier", "False,True")] == [False, True]
    assert [(c.params.restore_faces, c.params.face_restoration_model)
            for c in cells("Face restore", "False,GFPGAN,True,CodeFormer")] == [
        (False, "CodeFormer"), (True, "GFPGAN"), (True, "CodeFormer"), (True, "CodeFormer")]
    assert [c.params.sampler_options.beta_alpha for c in cells("Beta schedule alpha", "0.4,0.8")] == [0.4, 0.8]
    assert [c.params.sampler_options.beta_beta for c in cells("Beta schedule beta", "0.5,0.9")] == [0.5, 0.9]
    for axis_type, values in (("Size", "512"), ("Size", "axb"), ("SGM noise multiplier", "maybe"),
                              ("Face restore", "RestoreFormer")):
        with pytest.raises(InvalidParameter) as err:
            cells(axis_type, values)
        assert err.value.field == "xyz_x_values", (axis_type, err.value)


def test_styles_axis_applies_each_values_styles(tmp_path):
    """A1111's "Styles": each value's styles (comma-separated names) applied to the prompts after the
    request's own; an unknown style, or no styles file, is refused by name before anything runs."""
    from underpaint.pipeline import xyz_plot
    from underpaint.prompts.styles import parse_styles

    book = parse_styles('name,prompt,negative_prompt\nink,"{prompt}, ink drawing",smudge\nwarm,golden light,\n')
    options = XYZPlotOptions(x_type="Styles", x_values='ink,warm,"ink,warm"', styles=book)
    cells = xyz_plot.plan(GenerationParams(**BASE, xyz_plot=options)).cells
    assert [(c.params.prompt, c.params.negative_prompt) for c in cells] == [
        ("a red cat, ink drawing", "blurry dog, smudge"), ("a red cat, golden light", "blurry dog"),
        ("a red cat, ink drawing, golden light", "blurry dog, smudge")]
    for opts in (XYZPlotOptions(x_type="Styles", x_values="oil", styles=book),
                 XYZPlotOptions(x_type="Styles", x_values="ink")):
        with pytest.raises(InvalidParameter) as err:
            xyz_plot.plan(GenerationParams(**BASE, xyz_plot=opts))
        assert err.value.field == "xyz_x_values"


def test_styles_axis_reads_the_styles_file_of_the_cli_and_the_server(tmp_path, api):
    from underpaint.cli.generate import params_from_args
    from underpaint.cli.main import build_parser
    from underpaint.pipeline import xyz_plot

    styles = tmp_path / "styles.csv"
    styles.write_text('name,prompt,negative_prompt\nink,"{prompt}, ink drawing",smudge\n')
    p = params_from_args(build_parser().parse_args(["txt2img", "-p", "a cat", "--xyz-x", "Styles", "--xyz-x-values",
                                                    "ink", "--styles-file", str(styles)]))
    assert [c.params.prompt for c in xyz_plot.plan(p).cells] == ["a cat, ink drawing"]
    r = api.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "script_name": "x/y/z plot",
                                               "script_args": _api_args(axis_names(False).index("Styles"), "oil")})
    assert r.status_code == 422 and r.json()["field"] == "script_args[1]", r.text


def test_huge_plots_are_refused_before_they_are_made():
    """A range is cut without being listed whole, a plot of too many cells is refused before any cell is made,
    and Prompt S/R replacements that would multiply a prompt's length are refused by their length alone."""
    values = xyz_plot._expand("1-1000000000", int)
    assert values[:3] == [1, 2, 3] and len(values) == xyz_plot.MAX_AXIS_VALUES + 1
    big = ",".join(str(n) for n in range(1, 101))
    params = GenerationParams(prompt="a cat", steps=2, xyz_plot=XYZPlotOptions(
        x_type="Seed", x_values=big, y_type="Steps", y_values=big.replace("101", "1"), z_type="Seed", z_values=big))
    with pytest.raises(xyz_plot.TooManyCells) as err:
        xyz_plot.plan(params)
    assert err.value.cells == 1_000_000
    grow = "a," + "a" * 400  # "a" becomes 400 a's on each axis: 400³ times the prompt
    params = GenerationParams(prompt="a cat", steps=2, xyz_plot=XYZPlotOptions(
        x_type="Prompt S/R", x_values=grow, y_type="Prompt S/R", y_values=grow, z_type="Prompt S/R", z_values=grow))
    with pytest.raises(InvalidParameter, match="within 100000 characters"):
        xyz_plot.plan(params)


def test_the_server_counts_cells_and_prompt_lengths_before_queueing(tmp_path):
    from test_server_support import fake_api

    with fake_api(tmp_path) as (client, backend):
        _refusals(client, backend)


def _refusals(client, backend):
    base = {"prompt": "a cat", "steps": 1, "width": 64, "height": 64, "script_name": "x/y/z plot"}
    for seeds in ("1-1000000000", "1-900"):  # too many values; too many pictures (refused before cells are made)
        r = client.post("/sdapi/v1/txt2img", json={**base, "script_args": ["Seed", seeds, "", "Seed", "1-900", "",
                                                                             "Nothing", "", ""]})
        assert r.status_code == 422 and ("1000 values" in r.json()["detail"] or "810000 cells" in r.json()["detail"])
    r = client.post("/sdapi/v1/txt2img", json={**base, "prompt": "a " * 2000, "script_args": [
        "Prompt S/R", "a," + "a" * 40, "", "Nothing", "", "", "Nothing", "", ""]})
    assert r.status_code == 422 and "32768" in r.json()["detail"], r.text
    assert backend.params == []
