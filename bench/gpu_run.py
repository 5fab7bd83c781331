"""The next GPU run in one command: every measurement docs/performance.md asks for, in order of
importance, each with its own time limit, so that whatever the time allows is kept.

    PYTHONPATH=src python bench/gpu_run.py --out results/          # on the GPU machine
    PYTHONPATH=src python bench/gpu_run.py --dry-run                # the commands, without running them
    PYTHONPATH=src python bench/gpu_run.py --only table,restart     # some steps

Each step's output goes to ``OUT/<step>.log`` (and its JSON, when it writes one, to
``OUT/<step>.json``; a step's own files, such as ``--profile``'s, to a folder under ``OUT``, named in
its arguments with ``{out}``); ``OUT/summary.json`` lists the steps with their exit status and time. A step
that runs past its limit is stopped and the next one starts. ``--budget`` (seconds, default 560,
so that one call fits a 10-minute command limit) skips a step whose limit would not fit in what is
left; the next call picks up with ``--skip`` or ``--only``, or by itself with ``--state FILE``:
the steps that file records as run (whatever their result) are left out, and each step run is
added to it, so a second call on the same machine carries on where the first stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass(frozen=True)
class Step:
    name: str
    script: str
    #: The script's options; ``{out}`` in one stands for the run's --out folder.
    args: tuple[str, ...]
    #: Seconds before the step is stopped.
    limit: int
    why: str
    #: Whether the script takes ``--json PATH``.
    json: bool = True


#: What the H100 runs so far (2026-11-27: table, fused, attention, restart, stub, vram-low; 2026-11-28: graphs,
#: profile at SD 1.5, fp8-compile, vae, and restart-aot, which crashed) left open, most important first.
STEPS = (
    Step("graphs-profile", "gpu_img2img.py", ("--cases", "sd15", "--optimize", "channels_last,compile,cuda_graphs",
                                              "--profile", "{out}/profile-graphs"), 210,
         "where the 43 ms outside the UNet go with CUDA graphs at SD 1.5 batch 1 (0.172 s, 6.8 ms per UNet step "
         "in the 2026-11-28 run; the target is 0.15 s): one profiled call per row after the timed runs"),
    Step("restart-aot", "first_image.py", ("--case", "sd15", "--optimize", "channels_last,aot", "--runs", "2"), 270,
         "the first picture after a restart with AOTInductor UNet packages (compile's warm restart took 17.6 s "
         "against the 15 s target); the 2026-11-28 run's first process died with a segfault after 183 s, now "
         "with the stack (faulthandler) and each stage logged"),
    Step("graphs-b16-sdxl", "gpu_img2img.py", ("--cases", "sd15-b16,sdxl",
                                               "--optimize", "channels_last,compile,cuda_graphs"), 420,
         "CUDA graphs at batch 16 and on SDXL (compute-bound there: compiled 69.2 and 55.5 ms per UNet step)"),
    Step("restart-graphs", "first_image.py", ("--case", "sd15", "--optimize", "channels_last,compile,cuda_graphs",
                                              "--runs", "2"), 270,
         "the first picture after a restart with a warm compile cache, with CUDA graphs (the fastest setting)"),
    Step("autotune", "gpu_img2img.py", ("--cases", "sd15", "--optimize", "channels_last,compile,cuda_graphs",
                                        "--compile-mode", "max-autotune"), 540,
         "inductor's autotuned kernels (max-autotune: CUDA graphs included, the VAE's too) at SD 1.5 batch 1: "
         "6.8 ms per UNet step is 237 TFLOP/s; a run of its own (autotuning takes minutes)"),
    Step("fp8", "gpu_img2img.py", ("--cases", "sd15,sdxl", "--optimize", "fp8"), 180,
         "fp8 matmuls (lossy): speed against the plain row, and its pictures' mean |Δ| and PSNR against it"),
    Step("switches", "gpu_img2img.py", ("--cases", "sd15,sdxl", "--optimize", "channels_last",
                                        "--optimize", "fused_qkv"), 150,
         "channels-last and fused projections apart, eager (the first run measured them only together: "
         "+13 % at SD 1.5 batch 1), on SDXL too"),
    Step("diffusers-compile", "gpu_img2img.py", ("--cases", "sd15,sdxl", "--compile-diffusers"), 360,
         "diffusers with torch.compile in the same run, for the x diffusers+compile column"),
    Step("vram-low", "gpu_img2img.py", ("--cases", "sd15,sdxl", "--vram", "low"), 240,
         "the low memory mode's peak VRAM (targets: SD 1.5 < 3 GB, SDXL 1024² < 6 GB) and its cost; SDXL's "
         "did not fit in the first run"),
    Step("stub", "gpu_img2img.py", ("--cases", "sd15,sdxl", "--stub-unet", "--vae-precision", "bf16",
                                    "--profile", "{out}/profile-stub"), 150,
         "everything but the UNet, per library, each row profiled (files in profile-stub/): the part no UNet "
         "optimization closes, with the VAE in float32 and in bfloat16 (underpaint's default on Ampere on)"),
    Step("tradeoffs", "gpu_img2img.py", ("--cases", "sd15", "--token-merging", "0.5", "--deepcache", "3",
                                         "--ngms", "2", "--taesd"), 200,
         "token merging 0.5, DeepCache interval 3, NGMS 2 and TAESD for the VAE (lossy): speed against the "
         "plain row, pictures' difference"),
    Step("vram-medium", "gpu_img2img.py", ("--cases", "sd15,sdxl", "--vram", "medium"), 150,
         "the medium memory mode"),
    Step("attention", "gpu_img2img.py", ("--cases", "sd15,sdxl", "--attention", "flash"), 150,
         "the flash attention kernel against PyTorch's own choice (cuDNN's, the first run showed: --attention "
         "cudnn gave identical pictures and no gain)"),
    Step("restart", "first_image.py", ("--case", "sd15", "--optimize", "channels_last,compile", "--runs", "2"), 240,
         "the first picture after a restart, compile cache empty then warm (target <= 15 s warm; 17.6 s before)"),
    Step("table", "gpu_img2img.py", ("--optimize", "channels_last,compile,cuda_graphs"), 480,
         "the issue's table again: SD 1.5 b1, b16, SDXL against diffusers eager, plus underpaint's fastest "
         "setting (compiled: 410 s on an H100)"),
    Step("flux", "gpu_img2img.py", ("--cases", "flux-dev,flux-schnell", "--runs", "3"), 540,
         "FLUX.1 dev and schnell in bf16 against FluxImg2ImgPipeline (a run of its own)"),
)


def command(step: Step, out: Path) -> list[str]:
    """The step's command line, ``{out}`` in its arguments replaced by the run's --out folder."""
    cmd = [sys.executable, str(HERE / step.script), *(a.replace("{out}", str(out)) for a in step.args)]
    if step.json:
        cmd += ["--json", str(out / f"{step.name}.json")]
    return cmd


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-results")),
                   help="folder for the logs and JSON (default $OUT, else gpu-results/)")
    p.add_argument("--only", default="", help="comma-separated step names: " + ", ".join(s.name for s in STEPS))
    p.add_argument("--skip", default="", help="comma-separated step names to leave out")
    p.add_argument("--budget", type=float, default=560, help="seconds for all steps together (default 560)")
    p.add_argument("--state", type=Path, help="a JSON file of the steps already run: they are left out, and each "
                   "step run is added")
    p.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    return p.parse_args(argv)


def selected(args: argparse.Namespace) -> list[Step]:
    names = {s.name for s in STEPS}
    only = [n for n in args.only.split(",") if n]
    skip = [n for n in args.skip.split(",") if n]
    unknown = [n for n in only + skip if n not in names]
    if unknown:
        raise SystemExit(f"unknown step {', '.join(unknown)}; expected {', '.join(s.name for s in STEPS)}")
    done = set(_read_state(args.state)) if args.state else set()
    return [s for s in STEPS if (not only or s.name in only) and s.name not in skip and s.name not in done]


def _read_state(path: Path) -> list[str]:
    try:
        return list(json.loads(path.read_text()))
    except FileNotFoundError:
        return []


def _record(path: Path | None, name: str) -> None:
    if path is not None:
        path.write_text(json.dumps([*_read_state(path), name]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    steps = selected(args)
    if args.dry_run:
        for step in steps:
            print(f"# {step.name} (limit {step.limit} s): {step.why}")
            print(" ".join(command(step, args.out)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    start = time.monotonic()
    summary = []
    for step in steps:
        left = args.budget - (time.monotonic() - start)
        if step.limit > left:
            summary.append(dict(step=step.name, status="not run: out of budget"))
            print(f"== {step.name}: not run ({left:.0f} s left, needs up to {step.limit} s)", flush=True)
            continue
        print(f"== {step.name}: {step.why}", flush=True)
        t0 = time.monotonic()
        with open(args.out / f"{step.name}.log", "w") as log:
            # A session of its own, so that a step stopped at its limit takes the processes it started
            # with it (first_image.py runs each restart as a child that would otherwise keep the GPU).
            proc = subprocess.Popen(command(step, args.out), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                    start_new_session=True)
            try:
                status: int | str = proc.wait(timeout=step.limit)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                status = "stopped at its limit"
        seconds = round(time.monotonic() - t0, 1)
        summary.append(dict(step=step.name, status=status, seconds=seconds))
        _record(args.state, step.name)
        print(f"   {status} in {seconds} s; last lines:", flush=True)
        tail = (args.out / f"{step.name}.log").read_text(errors="replace").splitlines()[-12:]
        print("\n".join("   " + line for line in tail), flush=True)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0 if all(s.get("status") == 0 for s in summary if "seconds" in s) else 1


if __name__ == "__main__":
    raise SystemExit(main())
