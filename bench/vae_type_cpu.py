"""VAE type on the CPU: the checkpoint's VAE ("Full") against TAESD, decode and encode, timed in turn.

Builds the real SD 1.5 VAE architecture with random weights (bench/gpu_img2img.py's builder) and
diffusers' ``AutoencoderTiny`` (TAESD's architecture, random weights), then times a decode of a
512×512 picture's latent (64×64) and an encode of the picture with each, the calls taking turns so
that a machine getting busier affects all alike. Medians are reported, and the paired ratio: the
median over rounds of TAESD's time over Full's in the same round. Random weights say nothing of the
pictures; TAESD is softer than the full VAE by design.

    PYTHONPATH=src python bench/vae_type_cpu.py --threads 2 --runs 3
    PYTHONPATH=src python bench/vae_type_cpu.py --tiny      # the tiny architecture, seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from tome_cpu import _bench


def build(tiny: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    from diffusers import AutoencoderTiny

    bench = _bench()
    arch = (bench.TINY_ARCHS if tiny else bench.ARCHS)["sd15"]
    _, vae, _ = bench._meta_modules(arch, True)
    vae = bench.materialise(vae, torch.device("cpu"), torch.float32, bench.SEED).eval()
    torch.manual_seed(bench.SEED)
    taesd = AutoencoderTiny(latent_channels=4).eval()
    return vae, taesd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=512, help="picture size in pixels (the latent is 1/8)")
    p.add_argument("--runs", type=int, default=3, help="timed rounds (the median is reported)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--tiny", action="store_true", help="the tiny SD 1.5 VAE (tests the script)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    vae, taesd = build(args.tiny)
    gen = torch.Generator().manual_seed(0)
    side = args.size // 8
    latent = torch.randn(1, 4, side, side, generator=gen)
    pixels = torch.rand(1, 3, args.size, args.size, generator=gen) * 2 - 1
    calls = {
        ("decode", "Full"): lambda: vae.decode(latent).sample,
        ("decode", "TAESD"): lambda: taesd.decode(latent).sample,
        ("encode", "Full"): lambda: vae.encode(pixels).latent_dist.mean,
        ("encode", "TAESD"): lambda: taesd.encode(pixels).latents,
    }

    def timed(call) -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            call()
            return time.perf_counter() - start

    for call in calls.values():  # first calls: allocations, untimed
        timed(call)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    for _ in range(args.runs):
        for key, call in calls.items():
            times[key].append(timed(call))
    results = []
    for work in ("decode", "encode"):
        full, tiny = times[(work, "Full")], times[(work, "TAESD")]
        results.append(dict(work=work, full_median_s=statistics.median(full), taesd_median_s=statistics.median(tiny),
                            paired_ratio=statistics.median(t / f for t, f in zip(tiny, full)), full_runs_s=full,
                            taesd_runs_s=tiny))
    machine = dict(cpu=platform.processor() or platform.machine(), torch=torch.__version__, threads=args.threads,
                   size=args.size, runs=args.runs, architecture="SD 1.5 (tiny)" if args.tiny else "SD 1.5")
    print(f"{machine['architecture']} VAE against TAESD, fp32, CPU {machine['cpu']}, {args.threads} thread(s), torch "
          f"{machine['torch']}; {args.size}x{args.size}, batch 1; median of {args.runs}")
    print("| work | Full s (median) | TAESD s (median) | TAESD / Full (paired) |")
    print("| --- | --- | --- | --- |")
    for row in results:
        ratio = row["paired_ratio"]
        share = f" (1/{1 / ratio:.0f})" if ratio < 0.5 else ""
        print(f"| {row['work']} | {row['full_median_s']:.3f} | {row['taesd_median_s']:.3f} | {ratio:.3f}{share} |")
    if args.json:
        args.json.write_text(json.dumps(dict(machine=machine, results=results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
