"""Composable diffusion (``a AND b :w``) guided as A1111 does: uncond + Σ wᵢ·scale·(condᵢ − uncond)."""

from __future__ import annotations

import pytest
import torch

from underpaint.models.loader import load_model
from underpaint.params import GenerationParams
from underpaint.pipeline.conditioning import encode_prompts
from underpaint.pipeline.denoise import composable_cfg, make_denoiser, stack_parts
from underpaint.pipeline.generate import model_schedule
from underpaint.prompts.encoder import Conditioning


def _cond(value: float, tokens: int = 77, batch: int = 2) -> Conditioning:
    base = torch.full((batch, tokens, 3), value)
    base[:, -1] += 1.0  # a distinct last token vector, which padding repeats
    return Conditioning(base, torch.full((batch, 4), value))


class Toy:
    """denoised = x·(1 + mean of the row's conditioning) + σ: a different answer for every conditioning."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, cond):
        self.calls.append(x.shape[0])
        factor = 1 + cond.cross_attn.mean(dim=(1, 2)) + cond.pooled.mean(dim=1)
        return x * factor[:, None, None, None] + sigma[:, None, None, None]


def _by_hand(x, sigma, parts, uncond, scale):
    toy = Toy()
    on_uncond = toy(x, sigma, uncond)
    result = on_uncond.clone()
    for cond, weight in parts:
        result += (toy(x, sigma, cond) - on_uncond) * (weight * scale)
    return result


@pytest.mark.parametrize("joint", [True, False])
def test_matches_the_hand_computation(joint):
    gen = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, 4, 3, 3, generator=gen), torch.tensor([1.5, 0.7])
    parts = [(_cond(0.1), 1.0), (_cond(-0.3), 0.5), (_cond(0.7), -0.25)]
    uncond = _cond(0.0)
    stacked, weights = stack_parts(parts)
    toy = Toy()
    out = composable_cfg(toy, stacked, weights, uncond, 7.0, joint=joint)(x, sigma)
    torch.testing.assert_close(out, _by_hand(x, sigma, parts, uncond, 7.0), rtol=1e-6, atol=1e-6)
    assert toy.calls == ([8] if joint else [6, 2])  # one batch [parts; uncond], or parts then uncond


def test_parts_of_different_lengths_are_padded_and_uncond_runs_apart():
    short, long = _cond(0.2), _cond(0.4, tokens=154)
    stacked, weights = stack_parts([(short, 1.0), (long, 2.0)])
    assert stacked.tokens == 154 and weights == (1.0, 2.0)
    # A1111 pads a shorter part with copies of its last token vector.
    assert torch.equal(stacked.cross_attn[:2, 77:], short.cross_attn[:, -1:].expand(-1, 77, -1))
    toy = Toy()
    x, sigma = torch.ones(2, 1, 2, 2), torch.ones(2)
    composable_cfg(toy, stacked, weights, _cond(0.0), 5.0)(x, sigma)
    assert toy.calls == [4, 2]


@pytest.fixture(scope="module")
def sd1(sd1_file):
    return load_model(sd1_file)


def _denoiser(model, prompt):
    params = GenerationParams(prompt=prompt, negative_prompt="blurry", steps=4, sampler="Euler")
    conds = encode_prompts(model, params, 4, batch=1, width=64, height=64)
    return conds, make_denoiser(model, conds, 7.0, model_schedule(model), "Euler")


def test_prompt_parts_reach_the_denoiser(sd1):
    conds, _ = _denoiser(sd1, "a red barn AND snow :0.5 AND fog:-0.2")
    assert [w for w, _ in conds.parts] == [1.0, 0.5, -0.2]
    plain, _ = _denoiser(sd1, "a red barn")
    assert conds.parts and not plain.parts
    assert torch.equal(conds.cond[0][1].cross_attn, plain.cond[0][1].cross_attn)


def test_a_prompt_split_in_two_halves_guides_like_the_whole(sd1):
    """uncond + ½s(c − u) + ½s(c − u) = uncond + s(c − u): the AND path equals plain guidance."""
    gen = torch.Generator().manual_seed(3)
    x, sigma = torch.randn(1, 4, 8, 8, generator=gen) * 3, torch.tensor([3.0])
    _, whole = _denoiser(sd1, "a red barn")
    _, halves = _denoiser(sd1, "a red barn :0.5 AND a red barn :0.5")
    _, other = _denoiser(sd1, "a red barn AND a green field")
    with torch.inference_mode():
        expected, got, different = whole(x, sigma), halves(x, sigma), other(x, sigma)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(different, expected, atol=1e-3)
