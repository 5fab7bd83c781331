"""The `underpaint` command: real processes, real files, one-line errors with exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "underpaint", *args], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=300)


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("underpaint")]
    assert lines, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


@pytest.fixture
def photo_file(tmp_path, photo) -> Path:
    path = tmp_path / "photo.png"
    photo.resize((64, 64)).save(path)
    return path


def test_img2img_writes_png_with_infotext(tmp_path, photo_file, sd1_file):
    out = tmp_path / "painting.png"
    proc = run_cli("img2img", str(photo_file), "-p", "impressionist oil painting, thick brushstrokes",
                   "-n", "blurry", "--strength", "0.65", "--cfg", "7", "--steps", "4", "--sampler", "DPM++ 2M",
                   "--scheduler", "karras", "--seed", "1234", "--model", str(sd1_file), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.exists()
    text = Image.open(out).text["parameters"]
    assert text.startswith("impressionist oil painting, thick brushstrokes\nNegative prompt: blurry\nSteps: 4, ")
    assert "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 64x64" in text

    info = run_cli("info", str(out))
    assert info.returncode == 0 and info.stdout.strip() == text

    # Never overwrite without being asked; the file is untouched.
    before = out.read_bytes()
    again = run_cli("img2img", str(photo_file), "-p", "x", "--steps", "2", "--model", str(sd1_file), "-o", str(out))
    assert_clean_error(again, str(out), "--overwrite")
    assert out.read_bytes() == before


def test_batch_outputs_get_suffixes_and_same_seed_reproduces(tmp_path, photo_file, sd1_file):
    out = tmp_path / "many.png"
    proc = run_cli("img2img", str(photo_file), "-p", "a boat", "--steps", "3", "--seed", "7", "--batch-size", "2",
                   "--model", str(sd1_file), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    first, second = tmp_path / "many-1.png", tmp_path / "many-2.png"
    assert first.exists() and second.exists()
    assert "Seed: 8," in Image.open(second).text["parameters"]
    single = tmp_path / "single.png"
    proc = run_cli("img2img", str(photo_file), "-p", "a boat", "--steps", "3", "--seed", "8",
                   "--model", str(sd1_file), "-o", str(single))
    assert proc.returncode == 0, proc.stderr
    diff = np.abs(np.asarray(Image.open(single), np.int16) - np.asarray(Image.open(second), np.int16))
    assert diff.max() <= 1


def test_folder_input_skips_unreadable_files(tmp_path, photo, sd1_file):
    src = tmp_path / "in"
    src.mkdir()
    photo.resize((64, 64)).save(src / "a.png")
    (src / "broken.png").write_bytes(b"not really a png")
    photo.resize((64, 64)).save(src / "c.jpg")
    out = tmp_path / "out"
    proc = run_cli("img2img", str(src), "-p", "x", "--steps", "2", "--model", str(sd1_file), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "c.png"]
    assert "broken.png" in proc.stderr


def test_txt2img(tmp_path, sd1_file):
    out = tmp_path / "t.png"
    proc = run_cli("txt2img", "-p", "a lighthouse at dusk", "--steps", "2", "-W", "64", "-H", "64",
                   "--model", str(sd1_file), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size == (64, 64)
    assert "Denoising strength" not in Image.open(out).text["parameters"]


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--strength", "1.5"], ["strength", "1.5"]),
        (["--steps", "0"], ["steps", "0"]),
        (["--sampler", "Eulr a"], ["Eulr a", "Euler a"]),
        (["--scheduler", "karas"], ["karas", "Karras"]),
        (["--seed-resize-from", "big"], ["seed-resize-from", "big"]),
        (["-W", "10"], ["width", "10"]),
    ],
)
def test_bad_parameters(extra, needles, photo_file, sd1_file, tmp_path):
    proc = run_cli("img2img", str(photo_file), "-p", "x", "--model", str(sd1_file), "-o", str(tmp_path / "o.png"), *extra)
    assert_clean_error(proc, *needles)


def test_bad_inputs(tmp_path, photo_file, sd1_file):
    assert_clean_error(run_cli("img2img", str(tmp_path / "missing.png"), "--model", str(sd1_file)), "missing.png")
    text = tmp_path / "notes.png"
    text.write_text("hello")
    assert_clean_error(run_cli("img2img", str(text), "--model", str(sd1_file)), "notes.png")
    truncated = tmp_path / "half.safetensors"
    truncated.write_bytes(sd1_file.read_bytes()[: 5000])
    assert_clean_error(run_cli("img2img", str(photo_file), "--model", str(truncated)), "half.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(4096))
    assert_clean_error(run_cli("img2img", str(photo_file), "--model", str(junk)), "junk.safetensors")
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    (models / "checkpoints" / "mine.safetensors").write_bytes(sd1_file.read_bytes())
    proc = run_cli("img2img", str(photo_file), "--model", "nosuchmodel", "--models-dir", str(models))
    assert_clean_error(proc, "nosuchmodel", "mine")


def test_models_lists_checkpoints_with_short_hash(tmp_path, sd1_file):
    import hashlib

    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    (models / "checkpoints" / "tiny.safetensors").write_bytes(sd1_file.read_bytes())
    proc = run_cli("models", "--models-dir", str(models))
    assert proc.returncode == 0, proc.stderr
    digest = hashlib.sha256(sd1_file.read_bytes()).hexdigest()[:10]
    assert f"tiny\t[{digest}]" in proc.stdout


def test_no_model_at_all_says_how_to_get_one(tmp_path, photo_file):
    proc = run_cli("img2img", str(photo_file), "-p", "x", "--models-dir", str(tmp_path / "empty"))
    assert_clean_error(proc, "download")
