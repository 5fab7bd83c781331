"""`underpaint inpaint` and `underpaint outpaint`: real files, one-line errors with exit status 2 (run
in this process by :mod:`cli_runner`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_runner import run_cli


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("underpaint: error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, proc.stderr)


@pytest.fixture
def files(tmp_path, photo) -> dict[str, Path]:
    picture = photo.crop((24, 16, 72, 48))  # 48x32: quick on a CPU
    paths = {"photo": tmp_path / "photo.png", "mask": tmp_path / "mask.png", "out": tmp_path / "out.png"}
    picture.save(paths["photo"])
    mask = Image.new("L", (48, 32), 0)
    mask.paste(255, (12, 6, 30, 22))
    mask.save(paths["mask"])
    return paths


def test_inpaint_keeps_unmasked_pixels_and_records_settings(files, sd1_file):
    proc = run_cli("inpaint", str(files["photo"]), "--mask", str(files["mask"]), "-p", "a golden necklace",
                   "--mask-blur", "0", "--masked-content", "fill", "--inpaint-area", "only-masked", "--padding", "8",
                   "--steps", "1", "--seed", "9", "--model", str(sd1_file), "-o", str(files["out"]))
    assert proc.returncode == 0, proc.stderr
    out, src = Image.open(files["out"]), Image.open(files["photo"])
    keep = np.asarray(Image.open(files["mask"])) == 0
    assert np.array_equal(np.asarray(out.convert("RGB"))[keep], np.asarray(src.convert("RGB"))[keep])
    text = out.text["parameters"]
    assert "Inpaint area: Only masked, Masked area padding: 8, Masked content: fill" in text
    assert "Mask blur" not in text


def test_inpaint_from_infotext_takes_its_inpaint_settings(files, sd1_file, tmp_path, photo):
    """--from-infotext brings the inpaint keys back (Inpaint area, Masked content, padding, mask blur, mask
    mode): the same picture again; a flag given beside it wins over the infotext."""
    photo.crop((16, 16, 80, 80)).save(files["photo"])  # 64x64: a size an infotext can give back
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (12, 6, 40, 30))
    mask.save(files["mask"])
    common = ("inpaint", str(files["photo"]), "--mask", str(files["mask"]), "--steps", "2", "--model", str(sd1_file))
    first = run_cli(*common, "-p", "a golden necklace", "--mask-blur", "2", "--masked-content", "latent noise",
                    "--inpaint-area", "Only masked", "--padding", "8", "--invert-mask", "--seed", "9",
                    "-o", str(files["out"]))
    assert first.returncode == 0, first.stderr
    again = run_cli(*common, "--from-infotext", str(files["out"]), "-o", str(tmp_path / "again.png"))
    assert again.returncode == 0, again.stderr
    assert np.array_equal(np.asarray(Image.open(files["out"])), np.asarray(Image.open(tmp_path / "again.png")))
    text = Image.open(tmp_path / "again.png").info["parameters"]
    assert "Mask mode: Inpaint not masked, Mask blur: 2, Inpaint area: Only masked, Masked area padding: 8" in text
    assert "Masked content: latent noise" in text
    other = run_cli(*common, "--from-infotext", str(files["out"]), "--inpaint-area", "whole", "-o",
                    str(tmp_path / "other.png"))
    assert other.returncode == 0, other.stderr
    text = Image.open(tmp_path / "other.png").info["parameters"]
    assert "Inpaint area" not in text and "Masked content: latent noise" in text


def test_inpaint_from_alpha(tmp_path, photo, sd1_file):
    rgba = photo.crop((24, 16, 72, 48)).convert("RGBA")
    alpha = np.full((32, 48), 255, np.uint8)
    alpha[8:24, 10:30] = 0
    rgba.putalpha(Image.fromarray(alpha))
    source, out = tmp_path / "erased.png", tmp_path / "filled.png"
    rgba.save(source)
    proc = run_cli("inpaint", str(source), "--mask-from-alpha", "--mask-blur", "0", "--steps", "1", "--seed", "1",
                   "--model", str(sd1_file), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    keep = alpha == 255
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB"))[keep], np.asarray(rgba.convert("RGB"))[keep])


def test_outpaint_extends_the_picture(files, sd1_file):
    proc = run_cli("outpaint", str(files["photo"]), "--left", "16", "--up", "30", "--fill", "edge", "--steps", "1",
                   "--seed", "2", "--model", str(sd1_file), "-o", str(files["out"]))
    assert proc.returncode == 0, proc.stderr
    out = Image.open(files["out"])
    assert out.size == (64, 64)  # 30 rows round up to 32
    assert np.array_equal(np.asarray(out.convert("RGB"))[32:, 16:], np.asarray(Image.open(files["photo"]).convert("RGB")))


def test_mask_of_another_size_warns_in_one_line(tmp_path, files, sd1_file):
    small = tmp_path / "small.png"
    Image.open(files["mask"]).resize((24, 16)).save(small)
    proc = run_cli("inpaint", str(files["photo"]), "--mask", str(small), "--steps", "1", "--seed", "1",
                   "--model", str(sd1_file), "-o", str(files["out"]))
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("underpaint: warning:")]
    assert len(warnings) == 1 and "24x16" in warnings[0] and "48x32" in warnings[0], proc.stderr


def test_bad_mask_inputs_fail_in_one_line(tmp_path, files, sd1_file):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"definitely not a png")
    assert_clean_error(run_cli("inpaint", str(files["photo"]), "--mask", str(broken), "--model", str(sd1_file)),
                       "broken.png")
    assert_clean_error(run_cli("inpaint", str(files["photo"]), "--mask", str(tmp_path / "nope.png"),
                               "--model", str(sd1_file)), "nope.png", "not found")
    assert_clean_error(run_cli("inpaint", str(files["photo"]), "--mask-from-alpha", "--model", str(sd1_file)),
                       "no alpha channel")
    assert_clean_error(run_cli("inpaint", str(files["photo"]), "--mask", str(files["mask"]), "--mask-weight", "2",
                               "--model", str(sd1_file)), "--mask-weight: got 2.0")
    assert_clean_error(run_cli("outpaint", str(files["photo"]), "--model", str(sd1_file)), "at least one side")
    assert not files["out"].exists()


def test_inpaint_needs_a_mask_source(files):
    proc = run_cli("inpaint", str(files["photo"]))
    assert proc.returncode == 2 and "--mask" in proc.stderr


@pytest.mark.parametrize(("argv", "expected"), [
    (["--masked-content", "latent noise", "--inpaint-area", "Only masked"], ("latent noise", True)),
    (["--masked-content", "Latent Nothing", "--inpaint-area", "Whole picture"], ("latent nothing", False)),
    (["--masked-content", "fill", "--inpaint-area", "only-masked"], ("fill", True)),
])
def test_inpaint_choices_take_a1111_spellings(argv, expected):
    from underpaint.cli.inpaint import inpaint_options
    from underpaint.cli.main import build_parser

    options = inpaint_options(build_parser().parse_args(["inpaint", "photo.png", "--mask", "m.png", *argv]))
    assert (options.masked_content, options.full_res) == expected
