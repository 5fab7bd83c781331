"""The first GPU run in one command: every measurement docs/performance.md asks for, in order of
importance, each with its own time limit, so that whatever the time allows is kept.

    PYTHONPATH=src python bench/gpu_run.py --out results/          # on the GPU machine
    PYTHONPATH=src python bench/gpu_run.py --dry-run                # the commands, without running them
    PYTHONPATH=src python bench/gpu_run.py --only table,restart     # some steps

Each step's output goes to ``OUT/<step>.log`` (and its JSON, when it writes one, to
``OUT/<step>.json``); ``OUT/summary.json`` lists the steps with their exit status and time. A step
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
    args: tuple[str, ...]
    #: Seconds before the step is stopped.
    limit: int
    why: str
    #: Whether the script takes ``--json PATH``.
    json: bool = True


STEPS = (
    Step("table", "gpu_img2img.py", ("--optimize", "channels_last,compile"), 420,
         "the issue's table: SD 1.5 b1, b16, SDXL against diffusers eager, plus underpaint compiled"),
    Step("restart", "first_image.py", ("--case", "sd15", "--optimize", "channels_last,compile", "--runs", "2"), 240,
         "the first picture after a restart, compile cache empty then warm (target <= 15 s warm)"),
    Step("vram-low", "gpu_img2img.py", ("--cases", "sd15,sdxl", "--vram", "low"), 240,
         "the low memory mode's peak VRAM (targets: SD 1.5 < 3 GB, SDXL 1024² < 6 GB) and its cost"),
    Step("stub", "gpu_img2img.py", ("--cases", "sd15,sdxl", "--stub-unet"), 120,
         "everything but the UNet, per library: the part no UNet optimization closes"),
    Step("graphs", "gpu_img2img.py", ("--cases", "sd15", "--optimize", "channels_last,compile,cuda_graphs"), 240,
         "CUDA graphs on top of compile at batch 1, where launches cost the most"),
    Step("diffusers-compile", "gpu_img2img.py", ("--cases", "sd15,sdxl", "--compile-diffusers"), 360,
         "diffusers with torch.compile in the same run, for the x diffusers+compile column"),
    Step("fp8", "gpu_img2img.py", ("--cases", "sd15,sdxl", "--optimize", "fp8"), 180,
         "fp8 matmuls (lossy): speed against the plain row, and its pictures' mean |Δ| and PSNR against it"),
    Step("attention", "gpu_img2img.py", ("--cases", "sd15,sdxl", "--attention", "cudnn"), 150,
         "the cuDNN attention kernel against PyTorch's own choice"),
    Step("tradeoffs", "gpu_img2img.py", ("--cases", "sd15", "--token-merging", "0.5", "--deepcache", "3"), 150,
         "token merging 0.5 and DeepCache interval 3 (lossy): speed against the plain row, pictures' difference"),
    Step("fused", "gpu_img2img.py", ("--cases", "sd15", "--optimize", "channels_last,fused_qkv"), 90,
         "channels-last and fused projections, eager"),
    Step("restart-aot", "first_image.py", ("--case", "sd15", "--optimize", "channels_last,aot", "--runs", "2"), 300,
         "the first picture after a restart with AOTInductor UNet packages: built, then loaded without tracing"),
    Step("vram-medium", "gpu_img2img.py", ("--cases", "sd15,sdxl", "--vram", "medium"), 150,
         "the medium memory mode"),
    Step("flux", "gpu_img2img.py", ("--cases", "flux-dev,flux-schnell", "--runs", "3"), 540,
         "FLUX.1 dev and schnell in bf16 against FluxImg2ImgPipeline (a run of its own)"),
)


def command(step: Step, out: Path | None) -> list[str]:
    cmd = [sys.executable, str(HERE / step.script), *step.args]
    if step.json and out is not None:
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
            try:
                done = subprocess.run(command(step, args.out), stdout=log, stderr=subprocess.STDOUT, env=env,
                                      cwd=ROOT, timeout=step.limit)
                status: int | str = done.returncode
            except subprocess.TimeoutExpired:
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
