"""First Block Cache's speed and drift on the CPU: a FLUX-shaped transformer, with and without caching.

The transformer is diffusers' ``FluxTransformer2DModel`` with FLUX.1's block layout in small:
128-wide heads, double- and single-stream blocks in FLUX.1's 1:2 proportion, random weights
(timing does not depend on weight values), ``--width`` wide. Each run is a txt2img flow loop of
``--steps`` Euler steps at ``--size``² with distilled guidance (one transformer call a step), through
underpaint's velocity denoiser and sampler on packed tokens; only the loop is timed (no text
encoders, no VAE). The configurations alternate run by run on one thread and the table reports
medians, so a busy machine slows all of them alike. The drift is how far each cached run's final
latent lies from the uncached one: with random weights it says how much the numbers move, not how
the picture looks (that needs a real checkpoint). The first block's relative change per call is
printed too: which thresholds skip anything depends on it::

    PYTHONPATH=src python bench/first_block_cache_cpu.py                       # 256², 10 steps
    PYTHONPATH=src python bench/first_block_cache_cpu.py --thresholds 0.12,0.3 --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256, help="picture side in pixels (tokens: (size/16)²)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3, help="timed runs of each configuration (alternating)")
    ap.add_argument("--thresholds", default="0.12,0.25,0.4", help="THRESHOLD,... cached configurations to time")
    ap.add_argument("--width", type=int, default=768, help="hidden width (a multiple of 128; FLUX.1: 3072)")
    ap.add_argument("--double", type=int, default=4, help="double-stream blocks (FLUX.1: 19)")
    ap.add_argument("--single", type=int, default=8, help="single-stream blocks (FLUX.1: 38)")
    ap.add_argument("--text-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from diffusers import FluxTransformer2DModel

    from underpaint.pipeline.first_block_cache import FirstBlockCache
    from underpaint.pipeline.flux import image_ids, pack
    from underpaint.sampling.flow import flow_sigmas, image_seq_len, shift_mu, velocity_denoiser
    from underpaint.sampling.k_samplers import sample_euler

    torch.manual_seed(1234)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, out_channels=64, num_layers=args.double, num_single_layers=args.single,
        attention_head_dim=128, num_attention_heads=args.width // 128, joint_attention_dim=256,
        pooled_projection_dim=256, guidance_embeds=True, axes_dims_rope=(16, 56, 56)).eval()
    g = torch.Generator().manual_seed(1)
    side = args.size // 8
    noise = pack(torch.randn(1, 16, side, side, generator=g))
    t5 = torch.randn(1, args.text_tokens, 256, generator=g)
    pooled = torch.randn(1, 256, generator=g)
    img_ids, txt_ids = image_ids(side, side, "cpu"), torch.zeros(args.text_tokens, 3)
    sigmas = flow_sigmas(args.steps, mu=shift_mu(image_seq_len(args.size, args.size)))

    def model_fn(x, sigma, _cond):
        return transformer(hidden_states=x, encoder_hidden_states=t5, pooled_projections=pooled, timestep=sigma,
                           img_ids=img_ids, txt_ids=txt_ids, guidance=torch.full((1,), 3.5), return_dict=False)[0]

    denoise = velocity_denoiser(model_fn)

    def run(threshold: float):
        denoiser = lambda x, s: denoise(x, s, None)  # noqa: E731
        if not threshold:
            return sample_euler(denoiser, noise * sigmas[0], sigmas), None
        cache = FirstBlockCache(transformer, threshold)
        with cache.installed():
            out = sample_euler(cache.wrap_denoiser(denoiser), noise * sigmas[0], sigmas)
        return out, cache.stats

    thresholds = [0.0] + [float(v) for v in args.thresholds.split(",")]
    times: dict[float, list[float]] = {t: [] for t in thresholds}
    finals: dict[float, torch.Tensor] = {}
    stats = {}
    with torch.inference_mode():
        run(thresholds[-1])  # warm-up (allocator, first-call overheads)
        for _ in range(args.runs):
            for t in thresholds:
                start = time.perf_counter()
                finals[t], stats[t] = run(t)
                times[t].append(time.perf_counter() - start)

    base = statistics.median(times[0.0])
    ref = finals[0.0]
    params = sum(p.numel() for p in transformer.parameters()) / 1e6
    print(f"FLUX-shaped transformer (random weights, width {args.width}, {args.double} double + {args.single} single "
          f"blocks, {params:.0f}M parameters), {args.size}x{args.size} ({noise.shape[1]} image + {args.text_tokens} "
          f"text tokens), {args.steps} Euler steps, distilled guidance, {args.threads} thread(s), median of "
          f"{args.runs} alternating runs; torch {torch.__version__}")
    print("| First block cache | calls full/skipped | loop s (median) | speed-up | final latent: rel. L2 drift | max abs |")
    print("| --- | --- | --- | --- | --- | --- |")
    for t in thresholds:
        s = stats[t]
        calls = f"{args.steps}/0" if s is None else f"{s.full_calls}/{s.cached_calls}"
        drift = float((finals[t] - ref).norm() / ref.norm())
        peak = float((finals[t] - ref).abs().max())
        m = statistics.median(times[t])
        print(f"| {'off' if not t else t} | {calls} | {m:.2f} | {base / m:.2f}x | {drift:.4f} | {peak:.4f} |")
    for t in thresholds[1:]:
        changes = ", ".join("-" if c is None else f"{c:.3f}" for c in stats[t].changes)
        print(f"threshold {t}: first-block change per call [{changes}]; full: "
              f"{''.join('F' if f else '.' for f in stats[t].full)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
