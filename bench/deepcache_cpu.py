"""DeepCache's speed and drift on the CPU: the SD 1.5-size UNet, with and without caching, side by side.

The UNet is SD 1.5's architecture with random weights (bench/gpu_img2img.py builds it; timing
does not depend on weight values). Each run is a txt2img denoising loop of ``--steps`` Euler
steps at ``--size``², CFG as one batch of two, through underpaint's own denoiser and sampler;
only the loop is timed (no text encoder, no VAE). The configurations alternate run by run on
one thread (``torch.set_num_threads(1)``) and the table reports medians, so a busy machine
slows all of them alike. The drift is how far each cached run's final latent lies from the
uncached one: with random weights it says how much the numbers move, not how the picture
looks (that needs a real checkpoint)::

    PYTHONPATH=src python bench/deepcache_cpu.py                      # 256², 10 steps, interval 3
    PYTHONPATH=src python bench/deepcache_cpu.py --configs 3:0,3:3,2:0 --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_img2img import ARCHS, _meta_modules, materialise  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256, help="picture side in pixels (latent: size/8)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3, help="timed runs of each configuration (alternating)")
    ap.add_argument("--configs", default="3:0", help="INTERVAL:BRANCH,... cached configurations to time")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from underpaint.params import DeepCacheOptions
    from underpaint.pipeline.deepcache import DeepCache
    from underpaint.sampling.denoisers import cfg_denoiser, eps_denoiser
    from underpaint.sampling.k_samplers import sample_euler
    from underpaint.sampling.schedules import ModelSchedule, build_sigmas

    unet, _, _ = _meta_modules(ARCHS["sd15"], False)
    unet = materialise(unet, torch.device("cpu"), torch.float32, 1234)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    schedule = ModelSchedule.from_alphas_cumprod(torch.cumprod(1 - betas, 0))
    sigmas = build_sigmas("Euler", "Automatic", args.steps, schedule)
    g = torch.Generator().manual_seed(1)
    side = args.size // 8
    noise = torch.randn(1, 4, side, side, generator=g)
    cond, uncond = torch.randn(1, 77, 768, generator=g), torch.randn(1, 77, 768, generator=g)

    def model_fn(x, t, context):
        return unet(x, t, encoder_hidden_states=context, return_dict=False)[0]

    class Ctx(torch.Tensor):  # cfg_denoiser concatenates conditionings with .cat
        @classmethod
        def cat(cls, items):
            return torch.cat([torch.Tensor(i) for i in items])

    denoise = cfg_denoiser(eps_denoiser(model_fn, schedule), cond.as_subclass(Ctx), uncond.as_subclass(Ctx), 7.0)

    def run(options: DeepCacheOptions | None):
        x = noise * sigmas[0]
        if options is None:
            return sample_euler(denoise, x, sigmas), None
        cache = DeepCache(unet, options)
        with cache.installed():
            out = sample_euler(cache.wrap_denoiser(denoise), x, sigmas, callback=cache.wrap_callback(None))
        return out, cache.stats

    configs: list[tuple[str, DeepCacheOptions | None]] = [("off", None)]
    for item in args.configs.split(","):
        interval, branch = (int(v) for v in item.split(":"))
        configs.append((f"interval {interval}, branch {branch}", DeepCacheOptions(interval=interval, branch=branch)))
    times: dict[str, list[float]] = {name: [] for name, _ in configs}
    finals: dict[str, torch.Tensor] = {}
    stats = {}
    with torch.inference_mode():
        run(configs[-1][1])  # warm-up (allocator, first-call overheads)
        for _ in range(args.runs):
            for name, options in configs:
                start = time.perf_counter()
                finals[name], stats[name] = run(options)
                times[name].append(time.perf_counter() - start)

    base = statistics.median(times["off"])
    ref = finals["off"]
    print(f"SD 1.5-size UNet (random weights), {args.size}x{args.size}, {args.steps} Euler steps, CFG batch 2, "
          f"{args.threads} thread(s), median of {args.runs} alternating runs; torch {torch.__version__}")
    print(f"| DeepCache | UNet calls full/cached | loop s (median) | speed-up | final latent: rel. L2 drift | max abs |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, _ in configs:
        t = statistics.median(times[name])
        s = stats[name]
        calls = f"{args.steps}/0" if s is None else f"{s.full_calls}/{s.cached_calls}"
        drift = float((finals[name] - ref).norm() / ref.norm())
        peak = float((finals[name] - ref).abs().max())
        print(f"| {name} | {calls} | {t:.2f} | {base / t:.2f}x | {drift:.4f} | {peak:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
