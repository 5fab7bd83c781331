"""Time to the first picture after a restart, with a cold and then a warm compile cache.

    PYTHONPATH=src python bench/first_image.py --case sd15 --optimize compile
    PYTHONPATH=src python bench/first_image.py --case sd15 --optimize compile,cuda_graphs --runs 3
    PYTHONPATH=src python bench/first_image.py --tiny --optimize compile        # CPU, tiny model
    PYTHONPATH=src python bench/first_image.py --case sd15 --optimize channels_last,aot

Each run is a fresh Python process, as a restart is: it imports torch, diffusers and underpaint,
builds the case's model with random weights (as ``bench/gpu_img2img.py`` does; reported apart,
since on a real restart this is reading the checkpoint, which depends on the disk), turns on the
speed switches, and makes the case's img2img picture twice: the first call pays for compiling
(or finds the kernels in the cache), the second is the steady speed. The first run starts with
an empty cache folder, the later runs reuse it: run 1 is the first start on a new machine,
run 2 onwards a restart. The compile cache hits and misses come from torch's own counters.
With ``aot`` the UNet packages go to ``CACHE/aot`` (``UNDERPAINT_AOT_CACHE_DIR``), and the rows
also count the packages built and loaded, and the Dynamo frames traced (0 when a restart skips
tracing).

The pictures of every run must be identical to the first run's (same seed and weights): the
script exits non-zero otherwise.
"""

from __future__ import annotations

import argparse
import faulthandler
import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _bench():
    """bench/gpu_img2img.py as a module (its architectures, weights and runner)."""
    name = "underpaint_bench_gpu_img2img"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "gpu_img2img.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def child(args: argparse.Namespace) -> dict:
    """One process: import, build, switch on, two pictures; the times from the process's start."""
    started = args.started
    # A crash in compiled code (a segfault) prints the Python stack, and the compile stages are logged:
    # the parent shows the end of this process's output when it fails.
    faulthandler.enable()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("underpaint.models.aot").setLevel(logging.DEBUG)
    import diffusers  # noqa: F401 - what a restart imports, timed with it
    import torch
    from torch._dynamo.utils import counters

    from underpaint.models import aot

    import underpaint.pipeline.generate  # noqa: F401
    from underpaint.models.optimize import SpeedOptions, apply

    bench = _bench()
    imported = time.time()

    argv = ["--cases", args.case, "--device", args.device] + (["--tiny"] if args.tiny else [])
    b_args = bench.parse_args(argv)
    if args.tiny:
        torch.set_num_threads(1)
    settings = bench.settings_from(b_args)
    (case,) = bench.select_cases(b_args)
    archs = bench.TINY_ARCHS if args.tiny else bench.ARCHS
    settings = bench.case_settings(case, archs[case.arch], settings, b_args)
    comps = bench.build_components(archs[case.arch], settings, vae_upcast=True)
    model = bench.underpaint_model(comps, settings)
    bench.sync(settings.device)
    built = time.time()
    apply(model, SpeedOptions.parse(args.optimize, attention=args.attention, compile_backend=args.compile_backend))
    run = bench.underpaint_runner(model, case, settings)
    first = run()
    bench.sync(settings.device)
    first_done = time.time()
    run()
    bench.sync(settings.device)
    second_done = time.time()
    digest = hashlib.sha256(b"".join(image.tobytes() for image in first)).hexdigest()[:16]
    return dict(import_s=imported - started, build_s=built - imported, first_s=first_done - built,
                steady_s=second_done - first_done, to_first_image_s=(imported - started) + (first_done - built),
                cache_hits=counters["inductor"]["fxgraph_cache_hit"],
                cache_misses=counters["inductor"]["fxgraph_cache_miss"], aot_built=aot.stats["built"],
                aot_loaded=aot.stats["loaded"], dynamo_frames=counters["stats"]["unique_graphs"], pictures=digest)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default="sd15", help="a case of bench/gpu_img2img.py (sd15, sdxl, flux-dev, ...)")
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--optimize", default="compile", help="the engine's speed switches (default compile)")
    p.add_argument("--attention", default="auto")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (tests use eager)")
    p.add_argument("--runs", type=int, default=2, help="processes in a row; the first finds an empty cache")
    p.add_argument("--cache-dir", type=Path, help="the compile cache folder (default: a new temporary one)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--started", type=float, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="underpaint-compile-cache-"))
    cache.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "UNDERPAINT_AOT_CACHE_DIR": str(cache / "aot")}
    own = ["--case", args.case, "--device", args.device, "--optimize", args.optimize, "--attention", args.attention,
           "--compile-backend", args.compile_backend] + (["--tiny"] if args.tiny else [])
    rows = []
    for i in range(args.runs):
        cmd = [sys.executable, str(Path(__file__).resolve()), *own, "--child", "--started", repr(time.time())]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-4000:])
            raise SystemExit(f"run {i + 1} failed (exit {done.returncode})")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"run {i + 1}: {rows[-1]}", file=sys.stderr)
    same = all(r["pictures"] == rows[0]["pictures"] for r in rows)
    print(f"case {args.case}{' (tiny)' if args.tiny else ''}, --optimize {args.optimize}, attention "
          f"{args.attention}, backend {args.compile_backend}; cache {cache}")
    print("| run | cache | import s | build weights s | first picture s | steady s | import + first s | "
          "cache hits | misses | aot built | aot loaded | graphs traced |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for i, r in enumerate(rows):
        print(f"| {i + 1} | {'empty' if i == 0 and not args.cache_dir else 'warm'} | {r['import_s']:.1f} | "
              f"{r['build_s']:.1f} | {r['first_s']:.2f} | {r['steady_s']:.3f} | {r['to_first_image_s']:.1f} | "
              f"{r['cache_hits']} | {r['cache_misses']} | {r['aot_built']} | {r['aot_loaded']} | "
              f"{r['dynamo_frames']} |")
    print(f"pictures identical across runs: {'yes' if same else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps(dict(case=args.case, tiny=args.tiny, optimize=args.optimize,
                                             attention=args.attention, backend=args.compile_backend, runs=rows,
                                             identical=same), indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
