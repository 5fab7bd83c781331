"""Token merging on the CPU: one SD 1.5-size UNet forward with and without merging, timed in turn.

Builds the real SD 1.5 UNet architecture with random weights (bench/gpu_img2img.py's builder),
then times ``unet(latent, t, text)`` at a 512×512 picture's latent (64×64, batch 2: a prompt and
its negative, as one CFG step runs them) with no merging and with each ratio, the calls taking
turns so that a machine getting busier affects all alike; medians are reported, and the paired
speed-up: the median over rounds of the unmerged call's time over the merged one's in the same
round (robust to a load that changes between rounds, as on a shared machine). The output of
each ratio is compared with the unmerged one (relative RMS difference, cosine similarity): with
random weights this says how much merging perturbs one step, not what it does to a picture.

    PYTHONPATH=src python bench/tome_cpu.py --threads 1 --ratios 0.3,0.5 --runs 5
    PYTHONPATH=src python bench/tome_cpu.py --tiny      # the tiny architecture, seconds
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _bench():
    spec = importlib.util.spec_from_file_location("underpaint_bench_gpu_img2img", HERE / "gpu_img2img.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def build_unet(tiny: bool) -> torch.nn.Module:
    bench = _bench()
    arch = (bench.TINY_ARCHS if tiny else bench.ARCHS)["sd15"]
    unet, _, _ = bench._meta_modules(arch, True)
    return bench.materialise(unet, torch.device("cpu"), torch.float32, bench.SEED)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratios", default="0.5", help="comma-separated merging ratios (default 0.5)")
    p.add_argument("--size", type=int, default=512, help="picture size in pixels (the latent is 1/8)")
    p.add_argument("--batch", type=int, default=2, help="UNet batch (default 2: prompt and negative prompt)")
    p.add_argument("--runs", type=int, default=5, help="timed rounds (the median is reported)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--tiny", action="store_true", help="the tiny SD 1.5 architecture (tests the script)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from underpaint.models.tome import token_merging

    ratios = [float(r) for r in args.ratios.split(",") if r]
    unet = build_unet(args.tiny)
    gen = torch.Generator().manual_seed(0)
    side = args.size // 8
    x = torch.randn(args.batch, 4, side, side, generator=gen)
    t = torch.full((args.batch,), 700.0)
    text = torch.randn(args.batch, 77, unet.config.cross_attention_dim, generator=gen)

    def call(ratio: float) -> tuple[float, torch.Tensor]:
        with torch.inference_mode(), token_merging(unet, ratio):
            start = time.perf_counter()
            out = unet(x, t, encoder_hidden_states=text).sample
            return time.perf_counter() - start, out

    rows = [0.0, *ratios]
    outputs = {r: call(r)[1] for r in rows}  # first calls: allocations, untimed
    times: dict[float, list[float]] = {r: [] for r in rows}
    for _ in range(args.runs):
        for r in rows:
            times[r].append(call(r)[0])
    base, base_s = outputs[0.0], statistics.median(times[0.0])
    results = []
    for r in rows:
        out = outputs[r]
        rel_rms = float((out - base).pow(2).mean().sqrt() / base.pow(2).mean().sqrt())
        cosine = float(torch.nn.functional.cosine_similarity(out.flatten(), base.flatten(), dim=0))
        median = statistics.median(times[r])
        paired = statistics.median(b / m for b, m in zip(times[0.0], times[r]))
        results.append(dict(ratio=r, median_s=median, runs_s=times[r], speedup=base_s / median, paired_speedup=paired,
                            rel_rms_vs_unmerged=rel_rms, cosine_vs_unmerged=cosine))
    machine = dict(cpu=platform.processor() or platform.machine(), torch=torch.__version__, threads=args.threads,
                   size=args.size, latent=f"{side}x{side}", batch=args.batch, runs=args.runs,
                   architecture="SD 1.5 (tiny)" if args.tiny else "SD 1.5")
    print(f"{machine['architecture']} UNet, fp32, CPU {machine['cpu']}, {args.threads} thread(s), torch "
          f"{machine['torch']}; latent {side}x{side}, batch {args.batch}; median of {args.runs}")
    print("| ratio | UNet forward s (median) | speed-up (medians) | speed-up (paired) | rel. RMS Δ vs unmerged "
          "| cosine vs unmerged |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in results:
        print(f"| {row['ratio']:g} | {row['median_s']:.3f} | {row['speedup']:.2f}x | {row['paired_speedup']:.2f}x | "
              f"{row['rel_rms_vs_unmerged']:.4f} | {row['cosine_vs_unmerged']:.5f} |")
    if args.json:
        args.json.write_text(json.dumps(dict(machine=machine, results=results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
