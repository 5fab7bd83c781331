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


def test_detect_fits_to_a_size(tmp_path, photo):
    pytest.importorskip("cv2")
    src = tmp_path / "in.png"
    photo.save(src)
    out = tmp_path / "map.png"
    args = _detect_parser().parse_args(["detect", "threshold", str(src), "-o", str(out), "-W", "32", "-H", "32"])
    args.func(args)
    assert Image.open(out).size == (32, 32)
