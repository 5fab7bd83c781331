"""Seeds → noise, with AUTOMATIC1111 1.10's semantics.

Every image of a batch has its own generator seeded with its own seed, so image i of a
batch equals a single run with that seed. The first draw from it is the starting noise;
ancestral samplers then keep drawing from the same generator (or from a fresh one seeded
seed + ENSD when "eta noise seed delta" is set). SDE samplers use a Brownian tree per image
seeded with the image seed. Sources: "gpu" (torch on the target device), "cpu" (torch on
the CPU, moved) and "nv" (CUDA's Philox stream computed on the CPU).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from ..errors import InvalidParameter
from ..models.device import to_device
from ._common import NoiseSampler
from .philox import PhiloxGenerator

RNG_SOURCES = ("gpu", "cpu", "nv")


def _generator(seed: int, rng: str, device):
    if rng not in RNG_SOURCES:
        raise InvalidParameter("rng", rng, "one of " + ", ".join(RNG_SOURCES))
    if rng == "nv":
        return PhiloxGenerator(seed)
    device = torch.device(device)
    local = "cpu" if rng == "cpu" or device.type in ("cpu", "mps") else device
    return torch.Generator(local).manual_seed(int(seed))


def _draw(generator, shape: Sequence[int], device) -> torch.Tensor:
    """One float32 normal draw of ``shape`` from ``generator``, on ``device``."""
    if isinstance(generator, PhiloxGenerator):
        return to_device(torch.from_numpy(generator.randn(shape)), device)
    return to_device(torch.randn(tuple(shape), generator=generator, device=generator.device), device)


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's spherical interpolation of two noise tensors [C, H, W] (variation seeds).

    The angle is taken per (channel, column): vectors run along dim 1 (height). When the
    two are nearly parallel (mean cosine > 0.9995) A1111 falls back to
    ``low·val + high·(1 − val)`` — weights the other way round from the slerp, kept so that
    its images reproduce.
    """
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def _paste_centred(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Put ``source`` [C, h, w] in the middle of ``target`` [C, H, W], cropping what overhangs.

    Offsets are A1111's: (H − h) // 2 and (W − w) // 2, floored, on either side.
    """
    dx = (target.shape[2] - source.shape[2]) // 2
    dy = (target.shape[1] - source.shape[1]) // 2
    w = source.shape[2] if dx >= 0 else source.shape[2] + 2 * dx
    h = source.shape[1] if dy >= 0 else source.shape[1] + 2 * dy
    tx, ty = max(dx, 0), max(dy, 0)
    sx, sy = max(-dx, 0), max(-dy, 0)
    out = target.clone()
    out[:, ty : ty + h, tx : tx + w] = source[:, sy : sy + h, sx : sx + w]
    return out


def image_noise(
    seeds: Sequence[int],
    shape: Sequence[int],
    *,
    rng: str = "gpu",
    device="cpu",
    subseeds: Sequence[int] | None = None,
    subseed_strength: float = 0.0,
    seed_resize_from: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """The starting noise [B, C, H, W] for a batch, one generator per image (A1111's ``ImageRNG.first``).

    ``subseeds``/``subseed_strength``: variation seed, slerped in. ``seed_resize_from``
    (width, height in pixels, both > 0): the noise is made at that size (/8) and pasted
    centred into the target, so a picture keeps its composition at a new size.
    """
    shape = tuple(int(s) for s in shape)
    resize_w, resize_h = seed_resize_from
    small = shape if resize_w <= 0 or resize_h <= 0 else (shape[0], int(resize_h) // 8, int(resize_w) // 8)
    images = []
    for i, seed in enumerate(seeds):
        generator = _generator(seed, rng, device)
        if small != shape:
            noise = _draw(_generator(seed, rng, device), small, device)
        else:
            noise = _draw(generator, shape, device)
        if subseeds is not None and subseed_strength != 0:
            subseed = subseeds[i] if i < len(subseeds) else 0
            noise = slerp(subseed_strength, noise, _draw(_generator(subseed, rng, device), small, device))
        if small != shape:
            noise = _paste_centred(_draw(generator, shape, device), noise)
        images.append(noise)
    return torch.stack(images)


class _GeneratorNoise:
    """Draws one noise tensor per image from each image's own generator, on every call."""

    def __init__(self, generators: list, shape: tuple[int, ...], device):
        self.generators = generators
        self.shape = shape
        self.device = device

    def __call__(self, sigma=None, sigma_next=None) -> torch.Tensor:
        return torch.stack([_draw(g, self.shape, self.device) for g in self.generators])


def ancestral_noise(
    seeds: Sequence[int],
    shape: Sequence[int],
    *,
    rng: str = "gpu",
    device="cpu",
    eta_noise_seed_delta: int = 0,
) -> NoiseSampler:
    """Per-step noise for ancestral/stochastic samplers, continuing A1111's per-image generators.

    Without ENSD it is the generator of the starting noise, after that first draw; with ENSD
    A1111 replaces the generators by fresh ones seeded seed + ENSD.
    """
    shape = tuple(int(s) for s in shape)
    if eta_noise_seed_delta:
        generators = [_generator((seed + eta_noise_seed_delta) % 2**64, rng, device) for seed in seeds]
    else:
        generators = [_generator(seed, rng, device) for seed in seeds]
        for generator in generators:
            _skip_one(generator, shape)
    return _GeneratorNoise(generators, shape, device)


def _skip_one(generator, shape) -> None:
    """Advance past the starting-noise draw."""
    if isinstance(generator, PhiloxGenerator):
        generator.offset += 1
    else:
        torch.randn(shape, generator=generator, device=generator.device)


class _BrownianNoise:
    """One torchsde Brownian tree per image over [σ_min, σ_max] (k-diffusion's BatchedBrownianTree).

    A call returns the tree's increment between two sigmas scaled to unit variance, so the
    noise at a given σ interval is the same whatever the steps around it.
    """

    def __init__(self, x: torch.Tensor, sigma_min: torch.Tensor, sigma_max: torch.Tensor, seeds: Sequence[int]):
        import torchsde  # needed only by the SDE samplers

        t0, t1 = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        self.sign = 1 if t0 < t1 else -1
        t0, t1 = (t0, t1) if t0 < t1 else (t1, t0)
        w0 = torch.zeros_like(x)[0]
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=int(seed)) for seed in seeds]

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        a, b = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        sign = 1 if a < b else -1
        lo, hi = (a, b) if a < b else (b, a)
        with warnings.catch_warnings():
            # Float rounding puts the ends a hair outside the tree's span; torchsde warns and clamps.
            warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
            w = torch.stack([tree(lo, hi) for tree in self.trees]) * (self.sign * sign)
        return w / (b - a).abs().sqrt()


def brownian_noise(x: torch.Tensor, sigmas: torch.Tensor, seeds: Sequence[int]) -> NoiseSampler:
    """Brownian-tree noise for the SDE samplers, one tree per image seeded with its seed.

    A1111 spans the trees over the smallest positive and the largest sigma of the *full*
    schedule (before the img2img cut) and seeds them with the image seeds (no ENSD); pass
    that schedule to reproduce its pictures. ``x`` only gives shape, dtype and device.
    """
    positive = sigmas[sigmas > 0]
    return _BrownianNoise(x, positive.min(), sigmas.max(), list(seeds))
