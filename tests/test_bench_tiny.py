"""bench/gpu_img2img.py on tiny models on the CPU, so the GPU benchmark works before any GPU run.

Also: the same number of denoising steps in both libraries (the comparison is only fair then),
and no host–device traffic per step in the sampling loop the benchmark times, counted with the
``meta`` device standing in for the GPU (any ``.item()``/``if tensor`` or host→device copy is seen).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_img2img.py"
HEADER = ["case", "runner", "latency s (median)", "images/s", "UNet ms/step", "peak VRAM GiB", "first call s",
          "× diffusers"]


def _bench_module():
    """The script as a module (registered, as dataclasses need, under a name of its own)."""
    name = "underpaint_bench_gpu_img2img"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One subprocess run, as a user runs it: source checkout, PYTHONPATH=src, no install."""
    out = tmp_path_factory.mktemp("bench") / "results.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--cases", "sd15", "--runs", "2", "--warmup", "0",
           "--optimize", "channels_last,fused_qkv", "--attention", "math", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.fixture(scope="module")
def tiny_flux_run(tmp_path_factory):
    """Both FLUX cases, tiny, one timed run each (a few seconds)."""
    out = tmp_path_factory.mktemp("bench") / "flux.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--cases", "flux-dev,flux-schnell", "--runs", "1", "--warmup", "0",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    return proc, json.loads(out.read_text()) if out.exists() else None


def test_table_is_printed_last(tiny_run):
    stdout, _ = tiny_run
    lines = stdout.strip().splitlines()
    rows = [line for line in lines if line.startswith("| sd15 |")]
    assert lines[-len(rows):] == rows and len(rows) == 3
    header = [cell.strip() for cell in lines[-len(rows) - 2].strip("|").split("|")]
    assert header == HEADER
    runners = [row.split("|")[2].strip() for row in rows]
    assert runners == ["underpaint", "underpaint+channels_last+fused_qkv+attention=math", "diffusers"]
    assert all(len(row.strip("|").split("|")) == len(HEADER) for row in rows)


def test_json_results(tiny_run):
    _, data = tiny_run
    assert data["settings"]["steps_run"] == 19 and data["settings"]["dtype"] == "float32"
    assert {"device", "torch", "diffusers", "date"} <= data["machine"].keys()
    results = {r["runner"]: r for r in data["results"]}
    assert set(results) == {"underpaint", "underpaint+channels_last+fused_qkv+attention=math", "diffusers"}
    for r in results.values():
        assert len(r["latencies_s"]) == 2 and r["latency_s"] > 0 and r["first_call_s"] > 0
        assert r["images_per_s"] == pytest.approx(1 / r["latency_s"])
        assert r["peak_vram_gib"] is None  # CPU
        # Both libraries run one batched (cond + uncond) UNet call per step, 19 steps.
        assert r["unet_calls_per_run"] == 19 and r["unet_ms_per_step"] > 0
    assert results["diffusers"]["vs_diffusers"] == 1.0
    under = results["underpaint"]
    assert under["vs_diffusers"] == pytest.approx(results["diffusers"]["latency_s"] / under["latency_s"])


def test_optimized_output_equals_plain(tiny_run):
    _, data = tiny_run
    (check,) = data["checks"]
    assert check["passed"] and check["optimizations"] == "channels_last+fused_qkv+attention=math"
    assert check["mean_abs"] <= 0.05  # fp32 on the CPU: only summation order changes


def test_tradeoff_rows_are_measured_not_judged(tmp_path):
    """--token-merging and --deepcache add underpaint rows whose pictures differ by design: the
    difference to the plain row is reported (lossy), and the run still passes."""
    out = tmp_path / "tradeoffs.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--cases", "sd15", "--runs", "1", "--warmup", "0",
           "--token-merging", "0.5", "--deepcache", "3", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["settings"]["token_merging"] == 0.5 and data["settings"]["deepcache"] == 3
    runners = [r["runner"] for r in data["results"]]
    assert runners[:2] == ["underpaint", "underpaint tome=0.5"] and "underpaint deepcache=3" in runners
    checks = {c["optimizations"]: c for c in data["checks"]}
    assert set(checks) == {"tome=0.5", "deepcache=3"}
    for check in checks.values():
        assert check["lossy"] and check["passed"] and check["mean_abs"] > 0  # a different picture, reported
    assert "lossy, measured only" in proc.stdout


def test_flux_rows_and_settings(tiny_flux_run):
    proc, data = tiny_flux_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    rows = [line for line in lines if line.startswith("| flux-")]
    assert lines[-len(rows):] == rows
    assert [(r.split("|")[1].strip(), r.split("|")[2].strip()) for r in rows] == [
        ("flux-dev", "underpaint"), ("flux-dev", "diffusers"), ("flux-schnell", "underpaint"),
        ("flux-schnell", "diffusers")]
    cases = data["cases"]
    assert (cases["flux-dev"]["steps"], cases["flux-dev"]["strength"], cases["flux-dev"]["guidance"]) == (28, 0.65, 3.5)
    assert (cases["flux-schnell"]["steps"], cases["flux-schnell"]["strength"]) == (4, 0.75)
    assert cases["flux-schnell"]["guidance"] is None
    for r in data["results"]:
        # One transformer call per step in both libraries (distilled guidance, no CFG batch).
        assert r["unet_calls_per_run"] == cases[r["case"]]["steps_run"] and r["unet_ms_per_step"] > 0


def test_flux_pictures_match_diffusers(tiny_flux_run):
    """Same weights, seed and noise; diffusers made to take the VAE posterior's mean: within 2 levels."""
    _, data = tiny_flux_run
    checks = {c["case"]: c for c in data["checks"]}
    assert set(checks) == {"flux-dev", "flux-schnell"}
    for check in checks.values():
        assert check["optimizations"] == "vs diffusers" and check["passed"]
        assert check["max_abs"] <= 2 and check["mean_abs"] < 1


@pytest.mark.parametrize(("steps", "strength"), [(28, 0.65), (4, 0.75), (10, 0.6), (20, 0.33), (7, 1.0)])
def test_flux_cases_run_the_same_steps(steps, strength):
    """diffusers' FLUX img2img starts at int(steps - steps·strength), not int(steps·strength) from the end;
    underpaint is given the strength that runs as many steps."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline

    from underpaint.sampling.schedules import img2img_steps

    bench = _bench_module()
    settings = bench.Settings(torch.device("cpu"), torch.float32, steps, strength, 1.0, 1, 0, (), False, "default",
                              guidance=3.5, flux="dev")
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(steps)
    _, diffusers_steps = FluxImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=scheduler), steps, strength, "cpu")
    _, t_enc = img2img_steps(steps, settings.underpaint_strength, False)
    assert t_enc + 1 == diffusers_steps == settings.steps_run


@pytest.mark.parametrize(("steps", "strength"), [(30, 0.65), (2, 0.65), (20, 0.5), (50, 0.3), (30, 1.0), (7, 0.99)])
def test_both_libraries_run_the_same_steps(steps, strength):
    """underpaint's strength (A1111's count) runs as many steps as diffusers' get_timesteps at ``strength``."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline

    from underpaint.sampling.schedules import img2img_steps

    bench = _bench_module()
    settings = bench.Settings(torch.device("cpu"), torch.float32, steps, strength, 7.0, 1, 0, (), False, "default")
    scheduler = DPMSolverMultistepScheduler(use_karras_sigmas=True)
    scheduler.set_timesteps(steps)
    _, diffusers_steps = StableDiffusionImg2ImgPipeline.get_timesteps(
        SimpleNamespace(scheduler=scheduler), steps, strength, "cpu")
    _, t_enc = img2img_steps(steps, settings.underpaint_strength, False)
    assert t_enc + 1 == diffusers_steps == settings.steps_run


def test_unknown_case_and_optimization_are_refused():
    bench = _bench_module()
    with pytest.raises(SystemExit, match="unknown sd3"):
        bench.select_cases(bench.parse_args(["--cases", "sd3"]))
    # FLUX is opt-in: the default cases stay SD's three.
    assert [c.name for c in bench.select_cases(bench.parse_args([]))] == ["sd15", "sd15-b16", "sdxl"]
    with pytest.raises(SystemExit, match="unknown cudagraphs"):
        bench.settings_from(bench.parse_args(["--tiny", "--optimize", "cudagraphs"]))


def test_full_size_configs_are_the_published_architectures():
    """Parameter counts of the random-weight modules equal the released SD 1.5 / SDXL / FLUX.1 ones (meta device)."""
    bench = _bench_module()
    for arch in bench.ARCHS.values():
        bench.check_param_counts(arch)


# --- host–device traffic in the sampling loop ------------------------------------------------------


class _Transfers(TorchFunctionMode):
    """Records every device→host read (``if t``, ``.item()``, ``.tolist()``) and cross-device copy.

    Reads of ``meta`` tensors answer a placeholder, so the loop runs on to the end.
    """

    READS = {"__bool__", "item", "tolist", "__float__", "__int__", "__index__", "numpy"}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS and isinstance(args[0], torch.Tensor):
            self.seen.append(name)
            if args[0].device.type == "meta":
                return [False] * args[0].numel() if name == "tolist" else (True if name == "__bool__" else 0)
        out = func(*args, **(kwargs or {}))
        if name in {"to", "copy_"} and isinstance(out, torch.Tensor):
            source = args[1] if name == "copy_" else args[0]
            if isinstance(source, torch.Tensor) and source.device.type != out.device.type:
                self.seen.append(f"copy {source.device.type}->{out.device.type}")
        return out


def _sdxl_like_run(steps: int) -> list[str]:
    """DPM++ 2M Karras with CFG through the pipeline's denoiser, an SDXL-style stub UNet, on ``meta``."""
    from underpaint.pipeline.conditioning import CondSchedule
    from underpaint.pipeline.denoise import make_denoiser
    from underpaint.prompts.encoder import Conditioning
    from underpaint.sampling.samplers import run_sampler
    from underpaint.sampling.schedules import ModelSchedule, build_sigmas, sd_alphas_cumprod

    schedule = ModelSchedule.from_alphas_cumprod(sd_alphas_cumprod())
    sigmas = build_sigmas("DPM++ 2M", "Karras", steps, schedule).to("meta")

    def unet(x, t, *, encoder_hidden_states, added_cond_kwargs, return_dict, **_):
        assert added_cond_kwargs["time_ids"].device.type == "meta"
        return (x * 0.5,)

    model = SimpleNamespace(unet=unet, dtype=torch.float16, spec=SimpleNamespace(prediction="eps"))
    cond = Conditioning(torch.zeros(1, 77, 16, device="meta"), torch.zeros(1, 8, device="meta"))
    conds = CondSchedule([(10**6, cond)], [(10**6, cond)], time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]]))
    denoiser = make_denoiser(model, conds, 7.0, schedule, "DPM++ 2M")
    with _Transfers() as transfers:
        run_sampler("DPM++ 2M", denoiser, torch.zeros(1, 4, 8, 8, device="meta"), sigmas)
    return transfers.seen


def test_sampling_loop_has_no_per_step_host_device_traffic():
    """The count is the same for 2 and 12 steps: setup only (sigma flags, schedule and size ids placed once)."""
    short, long = Counter(_sdxl_like_run(2)), Counter(_sdxl_like_run(12))
    assert short == long, (short, long)
    assert sum(long.values()) <= 6, long


def test_first_image_after_restart(tmp_path):
    """bench/first_image.py: two fresh processes, the second with the first one's cache folder,
    the same pictures from both (eager backend: the script's plumbing, not inductor's speed)."""
    out = tmp_path / "first.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(ROOT / "bench" / "first_image.py"), "--tiny", "--optimize", "compile",
           "--compile-backend", "eager", "--runs", "2", "--cache-dir", str(tmp_path / "cache"), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["identical"] and len(data["runs"]) == 2
    for run in data["runs"]:
        assert run["to_first_image_s"] == pytest.approx(run["import_s"] + run["first_s"])
        assert run["first_s"] > run["steady_s"] > 0  # the first call compiles
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert len(rows) == 2 and "pictures identical across runs: yes" in proc.stdout


def _gpu_run_module():
    name = "underpaint_bench_gpu_run"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "gpu_run.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_gpu_run_steps_are_valid_commands(capsys):
    """Every step of the one-command GPU run parses with its own script's options (a typo there
    would waste a GPU run), and unknown step names are refused."""
    runner = _gpu_run_module()
    bench = _bench_module()
    first = importlib.util.module_from_spec(importlib.util.spec_from_file_location("first_image_check",
                                                                                 ROOT / "bench" / "first_image.py"))
    first.__spec__.loader.exec_module(first)
    for step in runner.STEPS:
        if step.script == "gpu_img2img.py":
            args = bench.parse_args(list(step.args))
            bench.select_cases(args)
            bench.settings_from(bench.parse_args([*step.args, "--device", "cpu"]))
        else:
            first.parse_args(list(step.args))
    assert runner.main(["--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert all(f"# {step.name} " in printed for step in runner.STEPS)
    with pytest.raises(SystemExit, match="unknown step"):
        runner.main(["--dry-run", "--only", "tabel"])


def test_gpu_run_keeps_going_past_a_stopped_step(tmp_path, monkeypatch):
    runner = _gpu_run_module()
    monkeypatch.setattr(runner, "STEPS", (
        runner.Step("slow", "gpu_img2img.py", ("--tiny", "--cases", "sd15", "--runs", "5"), 1, "stopped"),
        runner.Step("tiny", "gpu_img2img.py", ("--tiny", "--cases", "sd15", "--runs", "1", "--warmup", "0"), 300,
                    "runs"),
        runner.Step("late", "gpu_img2img.py", ("--tiny",), 10_000, "does not fit the budget"),
    ))
    assert runner.main(["--out", str(tmp_path)]) == 1
    summary = {s["step"]: s for s in json.loads((tmp_path / "summary.json").read_text())}
    assert summary["slow"]["status"] == "stopped at its limit"
    assert summary["tiny"]["status"] == 0 and json.loads((tmp_path / "tiny.json").read_text())["results"]
    assert summary["late"]["status"].startswith("not run")
    assert "| sd15 " in (tmp_path / "tiny.log").read_text()


def test_gpu_run_state_file_carries_on_where_a_call_stopped(tmp_path, monkeypatch, capsys):
    """A second call with the same --state leaves out the steps the first one ran, whatever
    their result, and runs the rest."""
    runner = _gpu_run_module()
    monkeypatch.setattr(runner, "STEPS", (
        runner.Step("first", "gpu_img2img.py", ("--tiny", "--cases", "sd15", "--runs", "1", "--warmup", "0"), 300,
                    "runs in the first call"),
        runner.Step("second", "gpu_img2img.py", ("--tiny", "--cases", "sd15", "--runs", "1", "--warmup", "0"), 300,
                    "runs in the second call"),
    ))
    state = tmp_path / "state.json"
    assert runner.main(["--out", str(tmp_path / "a"), "--state", str(state), "--only", "first"]) == 0
    assert json.loads(state.read_text()) == ["first"]
    assert runner.main(["--out", str(tmp_path / "b"), "--state", str(state)]) == 0
    assert json.loads(state.read_text()) == ["first", "second"]
    assert [s["step"] for s in json.loads((tmp_path / "b" / "summary.json").read_text())] == ["second"]
    runner.main(["--dry-run", "--state", str(state)])
    assert "# first" not in capsys.readouterr().out
