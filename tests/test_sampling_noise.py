"""Seeds → noise with A1111 semantics: per-image generators, variation seeds, seed resize, ENSD,
Brownian trees, and the NV (CUDA Philox) source.

``data/cuda_randn_h100_sample.npz`` holds a sample of elements (every index listed with its
value) of ``torch.randn(shape, generator=torch.Generator('cuda').manual_seed(seed))`` recorded
on an H100 (torch 2.11, CUDA 13) — two successive draws for 4×64×64 and 4×8×12, the first
for 4×128×128 — for seeds 0, 1, 42, 1234, 3141592653 and 4294967294.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kdiff_ref import load_sampling
from underpaint.errors import InvalidParameter
from underpaint.params import SamplerOptions
from underpaint.sampling import noise as N
from underpaint.sampling import schedules as SC
from underpaint.sampling.names import SAMPLERS
from underpaint.sampling.philox import PhiloxGenerator
from underpaint.sampling.samplers import prepare_start, run_sampler

DATA = Path(__file__).parent / "data" / "cuda_randn_h100_sample.npz"
SHAPE = (4, 8, 12)


def _reference():
    data = np.load(DATA)
    for key in sorted(k[: -len("_index")] for k in data.files if k.endswith("_index")):
        seed_part, shape_part, draw_part = key.split("_")
        shape = tuple(int(v) for v in shape_part.split("x"))
        yield int(seed_part[4:]), shape, int(draw_part[4:]), data[key + "_index"], data[key + "_value"]


REFERENCE = list(_reference())


def test_reference_covers_all_recorded_seeds_shapes_and_draws():
    combos = {(seed, shape, draw) for seed, shape, draw, _, _ in REFERENCE}
    assert len(combos) == 30
    assert {seed for seed, *_ in combos} == {0, 1, 42, 1234, 3141592653, 4294967294}


@pytest.mark.parametrize("seed, shape, draw, index, value", REFERENCE,
                         ids=[f"{s}-{'x'.join(map(str, sh))}-{d}" for s, sh, d, _, _ in REFERENCE])
def test_nv_source_reproduces_cuda_randn(seed, shape, draw, index, value):
    generator = PhiloxGenerator(seed)
    for _ in range(draw):
        sample = generator.randn(shape)
    got = sample.ravel()[index]
    # CUDA evaluates sin with a fast approximation; the NV stream matches it to a few millionths.
    assert np.abs(got - value).max() < 1e-5
    assert np.mean(np.abs(got - value) <= 2e-6) > 0.99


def test_nv_source_matches_a1111s_documented_output():
    expected = np.array([[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
                         [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
                         [-1.07454231, -0.36314407, -1.67105067, 2.26550497]])
    assert np.allclose(PhiloxGenerator(0).randn((3, 4)), expected, atol=5e-8)


def test_image_noise_sources():
    seeds = [5, 6]
    cpu = N.image_noise(seeds, SHAPE, rng="cpu")
    for i, seed in enumerate(seeds):
        assert torch.equal(cpu[i], torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)))
    assert torch.equal(N.image_noise(seeds, SHAPE, rng="gpu", device="cpu"), cpu)
    nv = N.image_noise(seeds, SHAPE, rng="nv")
    assert nv.dtype == torch.float32
    assert torch.equal(nv[1], torch.from_numpy(PhiloxGenerator(6).randn(SHAPE)))
    with pytest.raises(InvalidParameter):
        N.image_noise(seeds, SHAPE, rng="tpu")


@pytest.mark.parametrize("rng", ["cpu", "nv"])
def test_batch_image_equals_single_run(rng):
    kwargs = dict(rng=rng, subseeds=[100, 101, 102], subseed_strength=0.3, seed_resize_from=(80, 48))
    batch = N.image_noise([7, 8, 9], SHAPE, **kwargs)
    for i, seed in enumerate([7, 8, 9]):
        single = N.image_noise([seed], SHAPE, **{**kwargs, "subseeds": [100 + i]})
        assert torch.equal(batch[i], single[0])


@pytest.mark.parametrize("rng", ["cpu", "gpu", "nv"])
def test_64_bit_seeds_seed_every_source_whole(rng):
    """A1111 seeds PyTorch's generators (and the NV source's Philox) with any 64-bit number: on the CPU
    the noise is PyTorch's for that seed (its Mersenne twister keeps the low 32 bits), the NV source's is
    the seed's own, not that of its low 32 bits."""
    big = 2**64 - 1 - 2**40
    noise = N.image_noise([big], SHAPE, rng=rng)[0]
    assert torch.equal(noise, N.image_noise([big], SHAPE, rng=rng)[0])
    if rng == "nv":
        assert not torch.equal(noise, N.image_noise([big & 0xFFFFFFFF], SHAPE, rng=rng)[0])
    else:
        assert torch.equal(noise, torch.randn(SHAPE, generator=torch.Generator().manual_seed(big)))


def _float64_slerp(val, low, high):
    low, high = low.double(), high.double()
    dot = (low / low.norm(dim=1, keepdim=True) * high / high.norm(dim=1, keepdim=True)).sum(1)
    omega = torch.acos(dot)
    return ((torch.sin((1 - val) * omega) / torch.sin(omega)).unsqueeze(1) * low
            + (torch.sin(val * omega) / torch.sin(omega)).unsqueeze(1) * high)


def test_variation_seed_slerp():
    plain = N.image_noise([11], SHAPE, rng="cpu")[0]
    sub = N.image_noise([99], SHAPE, rng="cpu")[0]
    assert torch.equal(N.image_noise([11], SHAPE, rng="cpu", subseeds=[99], subseed_strength=0.0)[0], plain)
    tiny = N.image_noise([11], SHAPE, rng="cpu", subseeds=[99], subseed_strength=1e-6)[0]
    torch.testing.assert_close(tiny, plain, rtol=0, atol=1e-5)
    assert torch.equal(N.slerp(0.0, plain, sub), plain)
    assert torch.equal(N.slerp(1.0, plain, sub), sub)
    mixed = N.image_noise([11], SHAPE, rng="cpu", subseeds=[99], subseed_strength=0.4)[0]
    torch.testing.assert_close(mixed.double(), _float64_slerp(0.4, plain, sub), rtol=1e-5, atol=1e-5)
    # A missing subseed counts as subseed 0, as in A1111.
    zero = N.image_noise([11, 12], SHAPE, rng="cpu", subseeds=[99], subseed_strength=0.4)[1]
    expected = N.slerp(0.4, N.image_noise([12], SHAPE, rng="cpu")[0], N.image_noise([0], SHAPE, rng="cpu")[0])
    assert torch.equal(zero, expected)


def test_slerp_near_parallel_fallback_is_a1111s_lerp():
    a = N.image_noise([3], SHAPE, rng="cpu")[0]
    b = a * 1.0001
    assert torch.equal(N.slerp(0.25, a, b), a * 0.25 + b * 0.75)


@pytest.mark.parametrize("resize_from", [(48, 32), (160, 96), (48, 96)], ids=["smaller", "larger", "mixed"])
def test_seed_resize_pastes_the_old_noise_centred(resize_from):
    w_px, h_px = resize_from
    small = (SHAPE[0], h_px // 8, w_px // 8)
    got = N.image_noise([21], SHAPE, rng="cpu", seed_resize_from=resize_from)[0]
    generator = torch.Generator().manual_seed(21)
    old = torch.randn(small, generator=torch.Generator().manual_seed(21))
    canvas = torch.randn(SHAPE, generator=generator)
    H, W, h, w = SHAPE[1], SHAPE[2], small[1], small[2]
    for y in range(H):
        for x in range(W):
            sy, sx = y - (H - h) // 2, x - (W - w) // 2
            inside = 0 <= sy < h and 0 <= sx < w
            assert got[:, y, x].tolist() == (old[:, sy, sx] if inside else canvas[:, y, x]).tolist()


def test_seed_resize_to_the_same_size_is_plain_noise():
    plain = N.image_noise([4], SHAPE, rng="cpu")
    assert torch.equal(N.image_noise([4], SHAPE, rng="cpu", seed_resize_from=(96, 64)), plain)
    assert torch.equal(N.image_noise([4], SHAPE, rng="cpu", seed_resize_from=(96, 0)), plain)


@pytest.mark.parametrize("rng", ["cpu", "nv"])
def test_ancestral_noise_continues_the_image_generator_or_uses_ensd(rng):
    seeds = [31, 32]
    after_start = N.ancestral_noise(seeds, SHAPE, rng=rng)
    first, second = after_start(None, None), after_start(None, None)
    for i, seed in enumerate(seeds):
        generator = N._generator(seed, rng, "cpu")
        draws = [N._draw(generator, SHAPE, "cpu") for _ in range(3)]
        assert torch.equal(first[i], draws[1]) and torch.equal(second[i], draws[2])
    with_delta = N.ancestral_noise(seeds, SHAPE, rng=rng, eta_noise_seed_delta=31337)(None, None)
    for i, seed in enumerate(seeds):
        assert torch.equal(with_delta[i], N.image_noise([seed + 31337], SHAPE, rng=rng)[0])


def test_nv_ancestral_noise_is_cudas_second_draw():
    for seed, shape, draw, index, value in REFERENCE:
        if draw == 2 and shape == (4, 8, 12):
            got = N.ancestral_noise([seed], shape, rng="nv")(None, None)[0].numpy().ravel()[index]
            assert np.abs(got - value).max() < 1e-5


def test_brownian_noise_matches_k_diffusion_batched_tree():
    K = load_sampling()
    x = torch.zeros(2, *SHAPE)
    sigmas = SC.sigmas_karras(8, 0.03, 14.6)
    ours = N.brownian_noise(x, sigmas, [5, 6])
    ref = K.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=[5, 6])
    single = N.brownian_noise(x[:1], sigmas, [6])
    for a, b in zip(sigmas[:-2], sigmas[1:-1]):
        got = ours(a, b)
        assert torch.equal(got, ref(a, b))
        assert torch.equal(got[1], single(a, b)[0])
    assert got.shape == x.shape


# --- whole samplers: image i of a batch equals a single run with seed + i ----------------

_W = torch.linspace(-0.5, 0.5, 16).reshape(4, 4)


def _toy(x, sigma):
    from underpaint.sampling._common import LAST_UNCOND_NOISE

    s = sigma.reshape(-1, 1, 1, 1)
    LAST_UNCOND_NOISE.value = (x - torch.tanh(x) * 0.5) / s  # a negative prompt's noise, for DDIM CFG++
    return torch.tanh((_W @ x.flatten(2)).view_as(x) / (1 + s)) + 0.05 * x / (1 + s**2)


MS = SC.ModelSchedule.from_alphas_cumprod(SC.sd_alphas_cumprod())


def _generate(label, seeds, *, strength=None, ensd=0, rng="cpu", steps=6):
    """What the pipeline does for a batch: schedule, noise, start latent, noise source, sampler."""
    info = next(s for s in SAMPLERS if s.label == label)
    full = SC.build_sigmas(label, "Automatic", steps, MS)
    sigmas = full
    if strength is not None:
        sigmas = SC.img2img_sigmas(lambda n: SC.build_sigmas(label, "Automatic", n, MS), steps, strength, False,
                                   count_from_end="timestep" in info.flags)
    noise = N.image_noise(seeds, SHAPE, rng=rng)
    init = None if strength is None else torch.linspace(-1, 1, math.prod(SHAPE)).reshape(SHAPE).expand(len(seeds), *SHAPE)
    x, sigmas = prepare_start(label, noise, sigmas, init=init, model_schedule=MS)
    if "brownian" in info.flags:
        source = N.brownian_noise(x, full, seeds)
    else:
        source = N.ancestral_noise(seeds, SHAPE, rng=rng, eta_noise_seed_delta=ensd)
    return run_sampler(label, _toy, x, sigmas, noise_sampler=source, options=SamplerOptions(s_churn=0.5),
                       model_schedule=MS)


@pytest.mark.parametrize("label", [s.label for s in SAMPLERS if s.label != "DPM adaptive"])
def test_batch_image_i_equals_single_run_for_every_sampler(label):
    # (DPM adaptive sizes its steps from an error norm over the whole batch, in A1111 too.)
    for kwargs in ({}, {"strength": 0.6, "ensd": 1000}):
        batch = _generate(label, [40, 41, 42], **kwargs)
        for i, seed in enumerate([40, 41, 42]):
            single = _generate(label, [seed], **kwargs)
            torch.testing.assert_close(batch[i : i + 1], single, rtol=1e-5, atol=1e-5)
