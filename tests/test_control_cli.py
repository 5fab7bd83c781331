"""The ControlNet command-line pieces: ``--control`` units and ``underpaint detect``."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from PIL import Image

from underpaint.cli.control import add_commands, add_control_arguments, control_units_from_args, parse_control_spec
from underpaint.errors import OutputExists, UnknownName


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t")
    add_control_arguments(p)
    return p


def _fake_load(path, field):
    return Image.new("RGB", (8, 8), {"room.jpg": "red", "pose.png": "blue"}.get(str(path), "white"))


def test_modifiers_apply_to_the_unit_before_them():
    args = _parser().parse_args([
        "--control", "depth:room.jpg", "--control-end", "0.6", "--control-model", "my_depth",
        "--control", "canny:room.jpg:0.6", "--control-mode", "prompt", "--pixel-perfect",
        "--control", "openpose",
    ])
    units = control_units_from_args(args, load=_fake_load)
    assert [u.module for u in units] == ["depth_midas", "canny", "openpose"]
    assert units[0].guidance_end == 0.6 and units[0].model == "my_depth" and units[0].weight == 1.0
    assert units[1].weight == 0.6 and units[1].control_mode == "My prompt is more important" and units[1].pixel_perfect
    assert units[1].image.getpixel((0, 0)) == (255, 0, 0)
    assert units[2].image is None  # uses the img2img input


def test_a_modifier_without_a_unit_is_an_error(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--control-weight", "0.5"])
    assert "must come after the --control" in capsys.readouterr().err


@pytest.mark.parametrize(("spec", "expected"), [
    ("canny", {"module": "canny"}),
    ("canny:a.png", {"module": "canny", "image": "a.png"}),
    ("canny:a.png:0.5", {"module": "canny", "image": "a.png", "weight": 0.5}),
    ("canny:C:/pics/a.png", {"module": "canny", "image": "C:/pics/a.png"}),
])
def test_control_spec(spec, expected):
    assert parse_control_spec(spec) == expected


def test_unknown_type_suggests():
    args = _parser().parse_args(["--control", "cany:room.jpg"])
    with pytest.raises(UnknownName, match="canny"):
        control_units_from_args(args, load=_fake_load)


# --- --control-type (union ControlNets) ------------------------------------------------------------------------


def test_control_type_sets_the_unit_union_type():
    args = _parser().parse_args([
        "--control", "none:room.jpg", "--control-model", "promax", "--control-type", "hard edge",
        "--control", "tile:room.jpg", "--control-type", "Unknown",
        "--control", "depth:room.jpg",
    ])
    units = control_units_from_args(args, load=_fake_load)
    assert [u.union_control_type for u in units] == ["Hard Edge", None, None]
    assert units[0].module == "none" and units[0].model == "promax"


def test_control_type_is_in_the_help(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--control-type TYPE" in text and "Hard Edge" in text and "Low Quality" in text


@pytest.mark.parametrize(("argv", "needles"), [
    (["--control", "none:room.jpg", "--control-type", "sketch"], ["--control-type: got 'sketch'", "'Hard Edge'"]),
    (["--control-type", "depth"], ["--control-type must come after the --control"]),
])
def test_bad_control_type_exits_2_naming_the_option(argv, needles, capsys):
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err


@pytest.fixture(scope="module")
def promax_file(tmp_path_factory):
    import shutil

    from tiny_controlnet import write_union_folder

    root = tmp_path_factory.mktemp("cli-union")
    folder = write_union_folder(root / "promax")
    path = root / "union-promax.safetensors"
    shutil.copyfile(folder / "diffusion_pytorch_model.safetensors", path)
    return path


def test_union_unit_on_the_command_line(tmp_path, photo, sdxl_file, promax_file, capsys):
    """A ready-made map with a union model: refused (exit 2, naming --control-type) without a type, run with one."""
    from tiny_controlnet import ready_map
    from underpaint.cli.main import main

    src, edges = tmp_path / "in.png", tmp_path / "edges.png"
    photo.resize((64, 64)).save(src)
    ready_map().save(edges)
    common = [str(src), "-p", "a lighthouse", "--model", str(sdxl_file), "--steps", "2", "-W", "64", "-H", "64",
              "--device", "cpu", "--dtype", "fp32", "--seed", "3", "--control", f"none:{edges}",
              "--control-model", str(promax_file)]
    out = tmp_path / "out.png"
    assert main(["img2img", *common, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "union_control_type: got None" in err and "--control-type" in err and "3 Hard Edge" in err, err
    assert not out.exists()
    assert main(["img2img", *common, "--control-type", "Hard Edge", "-o", str(out)]) == 0
    assert Image.open(out).size == (64, 64)
    assert main(["img2img", *common, "--control-type", "Blur", "-o", str(tmp_path / "blur.png")]) == 2
    assert "union_control_type: got 'Blur'" in capsys.readouterr().err


def _detect_parser():
    p = argparse.ArgumentParser(prog="underpaint")
    add_commands(p.add_subparsers(dest="command"))
    return p


def test_detect_writes_the_map(tmp_path, photo):
    cv2 = pytest.importorskip("cv2")

    src = tmp_path / "in.png"
    photo.save(src)
    out = tmp_path / "map.png"
    args = _detect_parser().parse_args(["detect", "canny", str(src), "-o", str(out), "--res", "64",
                                        "--annotators-dir", str(tmp_path)])
    assert args.func(args) == 0
    made = np.asarray(Image.open(out))
    assert made.shape == (64, 96, 3)
    assert np.array_equal(made[:, :, 0], cv2.Canny(np.asarray(photo), 100, 200))
    with pytest.raises(OutputExists):
        args.func(args)


def test_detect_checks_the_output_before_the_work(tmp_path, photo, monkeypatch):
    """An output that cannot be written is refused before the preprocessor runs, and a map is
    never written in another format than its extension says."""
    from underpaint.errors import InvalidParameter
    from underpaint.preprocess import registry

    ran = []
    monkeypatch.setattr(registry, "run_preprocessor", lambda *args, **kwargs: ran.append(args))
    src = tmp_path / "in.png"
    photo.save(src)
    (tmp_path / "file.txt").write_text("a file, not a folder")
    for target, needle in ((tmp_path / "map.gif", ".png"), (tmp_path / "file.txt" / "map.png", "is a file")):
        args = _detect_parser().parse_args(["detect", "canny", str(src), "-o", str(target)])
        with pytest.raises(InvalidParameter, match="output") as err:
            args.func(args)
        assert needle in str(err.value)
    assert ran == [] and not (tmp_path / "map.gif").exists()


def test_detect_fits_to_a_size(tmp_path, photo):
    pytest.importorskip("cv2")
    src = tmp_path / "in.png"
    photo.save(src)
    out = tmp_path / "map.png"
    args = _detect_parser().parse_args(["detect", "threshold", str(src), "-o", str(out), "-W", "32", "-H", "32"])
    args.func(args)
    assert Image.open(out).size == (32, 32)
