"""The `underpaint` command: real files, one-line errors with exit status 2 (in this process, as
:mod:`cli_runner` runs it, and as a real process where the entry point itself is checked)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_runner import run_cli


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
                   "--scheduler", "karras", "--seed", "1234", "--model", str(sd1_file), "-o", str(out),
                   process=True)  # the real entry point, `python -m underpaint`
    assert proc.returncode == 0, proc.stderr
    assert out.exists()
    text = Image.open(out).text["parameters"]
    assert text.startswith("impressionist oil painting, thick brushstrokes\nNegative prompt: blurry\nSteps: 4, ")
    assert "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 64x64" in text

    info = run_cli("info", str(out))
    assert info.returncode == 0 and info.stdout.strip() == text

    # Never overwrite without being asked; the file is untouched.
    before = out.read_bytes()
    again = run_cli("img2img", str(photo_file), "-p", "x", "--steps", "2", "--model", str(sd1_file), "-o", str(out),
                    process=True)  # a real process's exit status and standard error
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
    assert proc.returncode == 1, proc.stderr  # the others are made, and the exit status says one was not
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "c.png"]
    assert "broken.png" in proc.stderr and "1 of 3 inputs were skipped" in proc.stderr
    proc = run_cli("img2img", str(src), "-p", "x", "--steps", "2", "--model", str(sd1_file), "-o",
                   str(tmp_path / "results.png"))
    assert proc.returncode == 2 and "a folder for a folder of inputs" in proc.stderr, proc.stderr
    assert not (tmp_path / "results.png").exists()


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
        # Errors name the flag that was given, not the request field behind it (n_iter, ...).
        (["--count", "0"], ["--count: got 0"]),
        (["--ensd", "-3"], ["--ensd: got -3"]),
        (["--token-merging", "1"], ["--token-merging: got 1.0"]),
        # Suggestions ignore case, and a misspelt schedule in an A1111 sampler name is suggested whole.
        (["--scheduler", "expo"], ["did you mean 'Exponential'"]),
        (["--sampler", "DPM++ 2M Karas"], ["did you mean 'DPM++ 2M Karras'"]),
        # ControlNet unit settings by their flags too (not img2img's --resize-mode).
        (["--control", "canny", "--control-weight", "5"], ["--control-weight: got 5.0"]),
        (["--control", "canny", "--control-resize", "sideways"], ["--control-resize: got 'sideways'"]),
        (["--control", "cany"], ["--control: got 'cany'", "'canny'"]),
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


def _main(capsys, *argv: str) -> tuple[int, str]:
    """The CLI in this process (no model is loaded by these: each fails before that)."""
    from underpaint.cli.main import main

    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    return code, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("underpaint: error: "), err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["img2img", "x.png", "--cfg", "abc"], ["--cfg", "'abc'", "underpaint img2img --help"]),
        (["img2img"], ["INPUT"]),
        (["img2img", "x.png", "--cfg_scale", "3"], ["did you mean --cfg-scale?"]),
        (["img2img", "x.png", "--denoise", "0.3"], ["did you mean --denoising-strength?"]),
        (["img2img", "x.png", "--mask-blur", "3"], ["--mask-blur is a flag of `underpaint inpaint / outpaint`"]),
        (["txt2img", "--hr-scale", "2"], ["did you mean --hires-scale?"]),
        (["img2img", "x.png", "--resize-mode", "crop"], ["--resize-mode", "'crop'", "crop-and-resize"]),
        (["txt2img", "--refiner-switch-at", "0.5"], ["--refiner-switch-at", "--refiner CHECKPOINT"]),
    ],
)
def test_usage_errors_are_one_line(capsys, argv, needles):
    code, err = _main(capsys, *argv)
    assert code == 2
    line = _one_error_line(err)
    for needle in needles:
        assert needle in line, (needle, line)


def test_a1111_spellings_are_in_the_help(capsys):
    from underpaint.cli.main import main

    with pytest.raises(SystemExit):
        main(["img2img", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--restore-faces", "--sampler-name", "--sampling-method",
                 "--sampling-steps", "--denoising-strength", "--cfg-scale", "--batch-count", "--variation-seed"):
        assert flag in text, flag
    assert "DPM++ 2M Karras" in text  # the combined A1111 spelling is documented, not just accepted


@pytest.mark.parametrize(("spelling", "mode"), [("Crop and resize", 1), ("resize and fill", 2),
                                                ("Just resize (latent upscale)", 3), ("just-resize", 0), ("2", 2)])
def test_resize_mode_takes_a1111_labels(spelling, mode):
    from underpaint.cli.generate import params_from_args
    from underpaint.cli.main import build_parser

    args = build_parser().parse_args(["img2img", "x.png", "--resize-mode", spelling])
    assert params_from_args(args).resize_mode == mode


def test_output_is_checked_before_the_model_loads(tmp_path, photo_file, capsys):
    """A bad -o is refused at once, not after the pictures are made (and then lost)."""
    missing_model = str(tmp_path / "not-a-model.safetensors")
    code, err = _main(capsys, "img2img", str(photo_file), "--model", missing_model, "-o", str(tmp_path / "x.gif"))
    line = _one_error_line(err)
    assert code == 2 and "--output" in line and "x.gif" in line and ".png" in line
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    for target in (blocker / "out.png", str(blocker) + "/"):
        code, err = _main(capsys, "img2img", str(photo_file), "--model", missing_model, "-o", str(target))
        line = _one_error_line(err)
        assert code == 2 and "--output" in line and "file.txt is a file" in line


def test_model_folder_that_is_not_a_checkpoint(tmp_path, photo_file, capsys):
    folder = tmp_path / "some-folder"
    folder.mkdir()
    code, err = _main(capsys, "img2img", str(photo_file), "--model", str(folder), "-o", str(tmp_path / "o.png"))
    line = _one_error_line(err)
    assert code == 2 and "some-folder" in line and "model_index.json" in line and "not found" not in line


def test_from_infotext_errors_name_the_flag(tmp_path, photo_file, sd1_file, capsys):
    code, err = _main(capsys, "img2img", str(photo_file), "--from-infotext", str(tmp_path / "gone.png"),
                      "--model", str(sd1_file), "-o", str(tmp_path / "o.png"))
    line = _one_error_line(err)
    assert code == 2 and "--from-infotext" in line and "gone.png" in line


def test_warnings_for_what_will_not_happen_as_asked(tmp_path, capsys):
    from underpaint.cli.generate import warn_about_request
    from underpaint.cli.main import build_parser

    text = tmp_path / "shared.txt"
    text.write_text("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Face restoration: RestoreFormer, "
                    "Tiling: True, Size: 512x512, Refiner: sdxl_refiner [7440042bbd], Model: sd15")  # both made here
    warn_about_request(build_parser().parse_args(["img2img", "x.png", "--from-infotext", str(text)]))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("underpaint: warning: --from-infotext")
    assert "face restoration (RestoreFormer)" in err[0]
    assert "tiling" not in err[0].lower() and "refiner" not in err[0].lower()

    warn_about_request(build_parser().parse_args(["img2img", "x.png", "--sampler", "DPM++ 2M Karras",
                                                  "--scheduler", "exponential"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Karras" in err[0] and "--scheduler 'exponential'" in err[0]

    # Nothing to say: the schedule agrees, or only one of the two was given, or only features underpaint has.
    text.write_text("a cat\nSteps: 20, Sampler: Euler a, Seed: 1, Tiling: True")
    for argv in (["--sampler", "DPM++ 2M Karras", "--scheduler", "karras"], ["--sampler", "DPM++ 2M Karras"],
                 ["--sampler", "Euler", "--scheduler", "exponential"], ["--from-infotext", str(text)]):
        warn_about_request(build_parser().parse_args(["img2img", "x.png", *argv]))
        assert capsys.readouterr().err == "", argv


def test_ctrl_c_saves_the_finished_batches(tmp_path, photo_file, sd1_file, monkeypatch, capsys):
    """Ctrl-C during the second of three batches: the first batch's pictures are saved, whole (as a
    run of that batch alone makes them); the stopped batch's are not, and the command ends as
    interrupted (130)."""
    import signal

    from underpaint.cli import progress
    from underpaint.cli.main import main

    def press_ctrl_c_in_batch_two(self, report):
        if report.job == 1 and report.step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(progress.ProgressBar, "update", press_ctrl_c_in_batch_two)
    out = tmp_path / "out"
    common = [str(photo_file), "-p", "a boat", "--steps", "4", "--sampler", "Euler", "--model", str(sd1_file)]
    code = main(["img2img", *common, "--seed", "7", "--batch-size", "2", "--count", "3", "-o", f"{out}/"])
    captured = capsys.readouterr()
    assert code == 130, captured.err
    assert "finished pictures will be saved" in captured.err and "underpaint: interrupted" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["00000-7.png", "00001-8.png"]  # no temporary files either
    # -o as a file: the pictures keep the names a whole run gives them
    code = main(["img2img", *common, "--seed", "7", "--count", "3", "-o", str(tmp_path / "named.png")])
    assert code == 130 and sorted(p.name for p in tmp_path.glob("named*")) == ["named-1.png"]

    monkeypatch.undo()
    single = tmp_path / "single.png"
    assert main(["img2img", *common, "--seed", "8", "-o", str(single)]) == 0
    diff = np.abs(np.asarray(Image.open(single), np.int16) - np.asarray(Image.open(out / "00001-8.png"), np.int16))
    assert diff.max() <= 1


def test_rng_takes_the_infotexts_spelling_and_sampler_knobs_their_ranges():
    from underpaint.cli.generate import params_from_args
    from underpaint.cli.main import build_parser
    from underpaint.errors import InvalidParameter

    args = build_parser().parse_args(["txt2img", "-p", "x", "--rng", "NV"])  # infotexts write "RNG: NV"
    assert params_from_args(args).rng == "nv"
    for flag, value in (("--eta", "-1"), ("--eta", "50"), ("--s-noise", "-0.5")):
        with pytest.raises(InvalidParameter) as err:
            params_from_args(build_parser().parse_args(["txt2img", "-p", "x", flag, value]))
        assert err.value.field == flag.lstrip("-").replace("-", "_")
