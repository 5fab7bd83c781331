"""A tiny DeepDanbooru tagger file for tests: every conv of the real layout (n_Conv_0 ... n_Conv_178), at small
widths, random weights, with tag names."""

from __future__ import annotations

import torch

from underpaint.models.deepbooru import CONVS, LAYOUT

#: Bottleneck widths of the six stage parts (the real model: 64, 128, 256, 256, 512, 1024) and the stem's.
WIDTHS = (2, 3, 3, 4, 4, 5)
STEM = 4
EXPANSION = 2


def tiny_tagger_state(tags: list[str], *, seed: int = 0, scale: float = 0.5) -> dict:
    """The dict a ``model-resnet_custom_v3.pt`` holds, at small widths: conv weights and biases, ``tags``."""
    gen = torch.Generator().manual_seed(seed)
    state: dict = {}

    def conv(n: int, out_ch: int, in_ch: int, k: int, bias: bool = True) -> None:
        state[f"n_Conv_{n}.weight"] = torch.randn(out_ch, in_ch, k, k, generator=gen) * scale / (in_ch * k * k) ** 0.5
        if bias:
            state[f"n_Conv_{n}.bias"] = torch.randn(out_ch, generator=gen) * 0.1

    conv(0, STEM, 3, 7)
    channels, stage_firsts = STEM, [b for b in LAYOUT if b.shortcut is not None]
    for block in LAYOUT:
        if block.shortcut is not None:
            width = WIDTHS[stage_firsts.index(block)]
        conv(block.reduce, width, channels, 1)
        conv(block.middle, width, width, 3)
        conv(block.expand, EXPANSION * width, width, 1)
        if block.shortcut is not None:
            conv(block.shortcut, EXPANSION * width, channels, 1)
        channels = EXPANSION * width
    conv(CONVS - 1, len(tags), channels, 1, bias=False)
    state["tags"] = list(tags)
    return state
