"""The CRAFT and SeemoRe upscalers, written as plain modules.

ComfyUI (``models/upscale_models``) and Forge read both through spandrel; the module's tensor names are the
files' own, so they load unchanged. Both centre the picture on SwinIR's RGB mean (DIV2K's) on the way in and
add it back on the way out, and end in a 3x3 conv to 3·scale² channels and a pixel shuffle.

- **CRAFT** (Li et al. 2023, "Feature Modulation Transformer: Cross-Refinement and Lightweight Sampling for
  Image Super-Resolution"; the authors' ``CRAFT_SRx2/3/4`` files). A 3x3 conv to ``dim`` channels, residual
  groups (``layers.N``: a block sequence, a 3x3 ``conv``, plus the group's input), a LayerNorm over the
  channels (``norm``), a 3x3 conv (``conv_after_body``, or none) plus the first conv's output, the upsampler.
  A group's sequence (``residual_group``) repeats ``depth`` times:

  - two rectangular-window attention blocks (``srwa_blocks``, the second of each pair shifted): DAT's window
    branches (:class:`~.upscaler_dat.WindowPairAttention`) — half the channels attend within ``split`` =
    (height, width) windows, the other half within the transposed ones, each half with half the heads and
    a position bias a small MLP (``attns.K.pos``) makes from each offset; the shifted blocks roll each half
    by half its window with no mask between the regions the roll joined (the original passes none). A
    depthwise 3x3 conv of the values (``get_v``) is added to the attention before ``proj``. Pre-norm,
    with a GELU MLP, each part added to its input, as in Swin's blocks;
  - a high-frequency block (``hfer_blocks``) on the group's running features: half the channels through a
    3x3 conv and GELU, the other half through a 3x3 max pool (stride 1), a 1x1 conv (``fc``) and GELU; a
    1x1 conv (``last_fc``) over both, plus its input;
  - a fusion block (``hf_blocks``): attention between the channels of each head over the whole picture,
    queries from the high-frequency features (1x1 and depthwise 3x3 convs, ``q``/``q_dwconv``), keys and
    values from the normalised window-attention output (``kv``/``kv_dwconv``), queries and keys
    L2-normalised over the pixels and their products times a learned ``temperature``, then ``project_out``;
    added to the window-attention output; then a norm and a gated feed-forward (``ffn``: a 1x1 conv to twice
    int(2.66 · dim), a depthwise 3x3 conv, GELU of one half times the other, a 1x1 conv back), plus its
    input. No biases in this block; its norms are LayerNorms over the channels (``norm1.body``, eps 1e-5).

  The window (``split``) is not stored as such: its area is the size of the saved
  ``relative_position_index_h`` and its offsets' count the size of ``biases_v``, as spandrel reads them
  (the shorter side first); the four saved buffers are derived from it and checked against the file's.
  Sizes. spandrel pads pictures to a multiple of 16 and at least 16 pixels a side (reflection, the edge
  repeated beyond it), then the network itself appends one more 16-pixel band of mirror image (the edge row
  kept) to the bottom and the right, always, as the original's inference script does; the module does both,
  so the windows' sides must divide 16, and crops the output back.
- **SeemoRe** (Zamfir et al. 2024, "See More Details: Efficient Image Super-Resolution by Experts Mining";
  the Tiny, Big and Large models and community ones). A 3x3 conv (``conv_1``), groups (``body.N``), a channel
  LayerNorm (``norm``, eps 1e-6), a 3x3 conv (``conv_2``) plus the first conv's output, the upsampler
  (``upsampler.0``). A group is a local stage then a global stage (``local_block``, ``global_block``), each
  norm, block, plus its input, then norm, gated feed-forward (``ffn``: a 1x1 conv to twice the width and
  GELU, one half times a depthwise 3x3 conv of the other (``gate``), a 1x1 conv and GELU), plus its input:

  - the local block (``block``): a 3x3 conv, GELU and a 1x1 conv to twice the width (``conv_1``), the
    channels interleaved by a two-group channel shuffle (not in the Large models), split in two halves. The
    first goes through a depthwise 1 x 3 and 3 x 1 conv and GELU (``conv_2``); the second is calibrated:
    ``recursive`` times a depthwise 4x4 conv of stride 4 and GELU (``agg_conv``), a depthwise 3x3 and a 1x1
    conv (``conv``), bilinear back to full size, plus itself. A router (``moe_layer.gate``: the first
    half's mean per channel, a linear map to one logit per expert, softmax) picks the most likely expert for
    each picture, whose output times that probability is added to the first half; an expert
    (``moe_layer.experts.N``) multiplies 1x1 projections of both halves down to its width and maps back up
    with a 1x1 conv. A 1x1 conv (``proj``) closes the block;
  - the global block: a 1x1 conv to twice the width and GELU (``to_qv``), one half through a depthwise
    1 x k and k x 1 conv (``attn``), times the other half, a 1x1 conv (``proj``).

  The experts' widths grow linearly (2, 3, 4, ...), by twos (2, 4, 6, ...) or exponentially (2, 4, 8,
  ...); they are read from the files. The channel shuffle and the number of calibration steps are not in
  the files: spandrel (and this module) take the Large models' (16 groups of width 48) to have neither
  shuffle nor more than one step, all others both and two steps; a picture is routed to one expert.
  Sizes. spandrel pads pictures to at least 16 pixels a side (the calibration shrinks them 16 times), by
  reflection as far as the picture allows and by repeating the edge beyond that; the module does the same
  and crops the output back.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from .upscaler_conv import ChannelLayerNorm
from .upscaler_dat import WindowPairAttention
from .upscaler_light import GatedFeedForward, _entries, _in_a_row, _shuffle_scale
from .upscaler_swin import SWINIR_MEAN, Mlp, pad_edges, relative_position_index

if TYPE_CHECKING:
    from .upscaler import _Plan

ARCH_CRAFT = "CRAFT"
ARCH_SEEMORE = "SeemoRe"

#: The band CRAFT pads pictures by (a multiple of it, then one more), fixed in the network.
CRAFT_WINDOW = 16
#: The width of CRAFT's fusion feed-forward, as a multiple of ``dim`` (rounded down), fixed in the network.
CRAFT_FFN_EXPANSION = 2.66
#: The smallest side SeemoRe is run at (two calibration steps shrink the picture 16 times).
SEEMORE_MINIMUM = 16
#: SeemoRe's (groups, width) of the Large models, which have no channel shuffle and one calibration step.
SEEMORE_LARGE = (16, 48)
#: SeemoRe's growth of the experts' widths: the name spandrel gives it → the width of expert i.
SEEMORE_GROWTH = {"linear": lambda i: i + 2, "double": lambda i: 2 * i + 2, "exp": lambda i: 2 ** (i + 1)}

#: The buffers CRAFT's files save: the windows' offsets and position indexes, derived from the window.
_CRAFT_BUFFERS = ("relative_position_index_h", "relative_position_index_v", "biases_h", "biases_v")
_CRAFT_MARK = re.compile(r"layers\.\d+\.residual_group\.(?:srwa|hfer|hf)_blocks\.")
_SEEMORE_MARK = re.compile(r"body\.\d+\.(?:local|global)_block\.")


# --------------------------------------------------------------------------------------------- CRAFT


class _ChannelNorm(nn.Module):
    """A LayerNorm over the channels of (N, C, H, W) (eps 1e-5), its weights under ``body``."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _WindowBlock(WindowPairAttention):
    """``srwa_blocks.N``: pre-norm attention of the two channel halves within the rectangular windows and their
    transposes (shifted blocks roll, unmasked), plus the values' depthwise conv (``get_v``), ``proj``; then
    pre-norm MLP. Both added to their input."""

    def __init__(self, dim: int, heads: int, split: tuple[int, int], *, shift: bool, hidden: int, qkv_bias: bool,
                 pos_width: int):
        super().__init__(dim, heads // 2, split, shift=shift, qkv_bias=qkv_bias, pos_width=pos_width)
        self.norm1 = nn.LayerNorm(dim)
        self.get_v = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)

    def _masks_for(self, h: int, w: int, device: torch.device) -> tuple[None, None]:
        return None, None  # the rolled windows are attended whole

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, H, W, C), H and W multiples of both window sides."""
        c = x.shape[-1]
        attended, qkv = self.windows(self.norm1(x))
        local = self.get_v(qkv[..., 2 * c:].permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.proj(attended + local)
        return x + self.mlp(self.norm2(x))


class _HighFrequencyBlock(nn.Module):
    """``hfer_blocks.N``: a 3x3 conv and GELU of the first channel half, a 3x3 max pool, 1x1 conv (``fc``) and GELU
    of the second, a 1x1 conv (``last_fc``) over both, plus the input."""

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        self.conv = nn.Conv2d(half, half, 3, 1, 1)
        self.fc = nn.Conv2d(half, half, 1)
        self.last_fc = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local, high = x.chunk(2, dim=1)
        local = F.gelu(self.conv(local))
        high = F.gelu(self.fc(F.max_pool2d(high, 3, 1, 1)))
        return x + self.last_fc(torch.cat((local, high), dim=1))


class _FusionAttention(nn.Module):
    """The fusion block's ``attn``: per head, attention between channels over all pixels, the queries from the
    high-frequency features, the keys and values from the window-attention output (no biases)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.q = nn.Conv2d(dim, dim, 1, bias=False)
        self.q_dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim, bias=False)
        self.kv = nn.Conv2d(dim, 2 * dim, 1, bias=False)
        self.kv_dwconv = nn.Conv2d(2 * dim, 2 * dim, 3, 1, 1, groups=2 * dim, bias=False)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        b, c, h, w = low.shape
        q = self.q_dwconv(self.q(high))
        k, v = self.kv_dwconv(self.kv(low)).chunk(2, dim=1)
        q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w) for t in (q, k, v))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        weights = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1)
        return self.project_out((weights @ v).reshape(b, c, h, w))


class _FusionBlock(nn.Module):
    """``hf_blocks.N``: the window-attention output plus the fusion attention of its norm and the high-frequency
    features; then norm and feed-forward, plus its input."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = _ChannelNorm(dim)
        self.attn = _FusionAttention(dim, heads)
        self.norm2 = _ChannelNorm(dim)
        self.ffn = GatedFeedForward(dim, int(dim * CRAFT_FFN_EXPANSION))

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        x = low + self.attn(self.norm1(low), high)
        return x + self.ffn(self.norm2(x))


class _CrossRefinement(nn.Module):
    """A group's ``residual_group``: per step two window blocks (the second shifted), a high-frequency block and
    a fusion block of the two."""

    def __init__(self, dim: int, depth: int, heads: int, split: tuple[int, int], hidden: int, qkv_bias: bool,
                 pos_width: int):
        super().__init__()
        self.srwa_blocks = nn.ModuleList(
            _WindowBlock(dim, heads, split, shift=i % 2 == 1, hidden=hidden, qkv_bias=qkv_bias, pos_width=pos_width)
            for i in range(2 * depth))
        self.hfer_blocks = nn.ModuleList(_HighFrequencyBlock(dim) for _ in range(depth))
        self.hf_blocks = nn.ModuleList(_FusionBlock(dim, heads) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (high_block, fusion) in enumerate(zip(self.hfer_blocks, self.hf_blocks)):
            low = self.srwa_blocks[2 * i + 1](self.srwa_blocks[2 * i](x.permute(0, 2, 3, 1)))
            x = fusion(low.permute(0, 3, 1, 2), high_block(x))
        return x


class _CraftGroup(nn.Module):
    """``layers.N``: the cross-refinement sequence, a 3x3 conv, plus the input."""

    def __init__(self, dim: int, depth: int, heads: int, split: tuple[int, int], hidden: int, qkv_bias: bool,
                 pos_width: int):
        super().__init__()
        self.residual_group = _CrossRefinement(dim, depth, heads, split, hidden, qkv_bias, pos_width)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.residual_group(x)) + x


def _mirror_band(x: torch.Tensor, band: int) -> torch.Tensor:
    """(N, C, H, W) with the mirror image of its last ``band`` rows appended to the bottom, then of its last
    ``band`` columns to the right (H and W at least ``band``)."""
    x = torch.cat((x, x[..., -band:, :].flip(-2)), dim=-2)
    return torch.cat((x, x[..., -band:].flip(-1)), dim=-1)


def craft_window_buffers(split: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The buffers CRAFT's files save for a (height, width) window: the position indexes and the (dy, dx)
    offsets (float) of the window and of its transpose."""
    def offsets(wh: int, ww: int) -> torch.Tensor:
        dy, dx = torch.meshgrid(torch.arange(1 - wh, wh), torch.arange(1 - ww, ww), indexing="ij")
        return torch.stack((dy.flatten(), dx.flatten()), 1).float()

    s0, s1 = split
    return {"relative_position_index_h": relative_position_index((s0, s1)),
            "relative_position_index_v": relative_position_index((s1, s0)),
            "biases_h": offsets(s0, s1), "biases_v": offsets(s1, s0)}


class CRAFT(nn.Module):
    """CRAFT for RGB pictures: ``depths`` and ``heads`` per group, the (height, width) window ``split`` (sides
    dividing 16), the window blocks' MLP width ``hidden``; ``conv_after_body`` False for the files without
    that conv."""

    def __init__(self, *, dim: int, depths: list[int], heads: list[int], split: tuple[int, int], hidden: int,
                 qkv_bias: bool, conv_after_body: bool, scale: int):
        super().__init__()
        self.scale = scale
        self.register_buffer("mean", torch.tensor(SWINIR_MEAN).view(1, 3, 1, 1), persistent=False)
        pos_width = dim // 2 // 4 // 4  # the original's width of its bias MLPs (a quarter of a quarter of a half)
        self.conv_first = nn.Conv2d(3, dim, 3, 1, 1)
        self.layers = nn.ModuleList(_CraftGroup(dim, depth, h, split, hidden, qkv_bias, pos_width)
                                    for depth, h in zip(depths, heads))
        self.norm = _ChannelNorm(dim)
        self.conv_after_body = nn.Conv2d(dim, dim, 3, 1, 1) if conv_after_body else nn.Identity()
        self.upsample = nn.Sequential(nn.Conv2d(dim, 3 * scale * scale, 3, 1, 1), nn.PixelShuffle(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        band = CRAFT_WINDOW
        x = pad_edges(x, -(-h // band) * band, -(-w // band) * band)
        mean = self.mean.to(x.dtype)
        feat = self.conv_first(_mirror_band(x, band) - mean)
        y = feat
        for layer in self.layers:
            y = layer(y)
        out = self.upsample(self.conv_after_body(self.norm(y)) + feat) + mean
        return out[..., : h * self.scale, : w * self.scale]


# --------------------------------------------------------------------------------------------- SeemoRe


class _StripedConv(nn.Module):
    """``conv``: a depthwise 1 x ``kernel`` conv, then a depthwise ``kernel`` x 1 conv."""

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        pad = kernel // 2
        self.conv = nn.Sequential(nn.Conv2d(dim, dim, (1, kernel), padding=(0, pad), groups=dim),
                                  nn.Conv2d(dim, dim, (kernel, 1), padding=(pad, 0), groups=dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _GatedFFN(nn.Module):
    """``ffn``: a 1x1 conv to twice the width and GELU (``fn_1``), the first half times a depthwise 3x3 conv of
    the second (``gate``), a 1x1 conv and GELU (``fn_2``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fn_1 = nn.Sequential(nn.Conv2d(dim, 2 * dim, 1), nn.GELU())
        self.fn_2 = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.GELU())
        self.gate = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.fn_1(x).chunk(2, dim=1)
        return self.fn_2(x * self.gate(gate))


class _Expert(nn.Module):
    """``experts.N``: 1x1 projections of both halves down to ``width`` channels, multiplied, a 1x1 conv back."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.conv_1 = nn.Conv2d(dim, width, 1)
        self.conv_2 = nn.Conv2d(dim, width, 1)
        self.conv_3 = nn.Conv2d(width, dim, 1)

    def forward(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self.conv_3(self.conv_1(x) * self.conv_2(k))


class _Router(nn.Module):
    """``gate``: the mean of each channel over the picture, a linear map to one logit per expert (``body.2``, no
    bias)."""

    def __init__(self, dim: int, experts: int):
        super().__init__()
        self.body = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(dim, experts, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _Experts(nn.Module):
    """``moe_layer``: each picture plus the output of its most likely expert times that expert's probability."""

    def __init__(self, dim: int, widths: list[int]):
        super().__init__()
        self.experts = nn.ModuleList(_Expert(dim, width) for width in widths)
        self.gate = _Router(dim, len(widths))

    def forward(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        probabilities = F.softmax(self.gate(x), dim=1, dtype=torch.float).to(x.dtype)
        weight, chosen = torch.topk(probabilities, 1)
        out = x.clone()
        for e in chosen[:, 0].unique().tolist():
            rows = (chosen[:, 0] == e).nonzero()[:, 0]
            out[rows] = x[rows] + self.experts[e](x[rows], k[rows]) * weight[rows, :, None, None]
        return out


class _MixtureBlock(nn.Module):
    """The local stage's ``block``: see the module's description."""

    def __init__(self, dim: int, widths: list[int], shuffle: bool, recursive: int):
        super().__init__()
        self.shuffle, self.recursive = shuffle, recursive
        self.conv_1 = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1), nn.GELU(), nn.Conv2d(dim, 2 * dim, 1))
        self.agg_conv = nn.Sequential(nn.Conv2d(dim, dim, 4, 4, groups=dim), nn.GELU())
        self.conv = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, groups=dim), nn.Conv2d(dim, dim, 1))
        self.conv_2 = nn.Sequential(_StripedConv(dim, 3), nn.GELU())
        self.moe_layer = _Experts(dim, widths)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_1(x)
        b, c, h, w = x.shape
        if self.shuffle:  # channel i of each half to places 2i and 2i + 1
            x = x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        x, k = x.chunk(2, dim=1)
        coarse = k
        for _ in range(self.recursive):
            coarse = self.agg_conv(coarse)
        k = k + F.interpolate(self.conv(coarse), size=(h, w), mode="bilinear", align_corners=False)
        return self.proj(self.moe_layer(self.conv_2(x), k))


class _StripedGate(nn.Module):
    """The global stage's ``block``: ``to_qv`` (1x1 to twice the width, GELU), the first half through the striped
    depthwise convs (``attn``) times the second, ``proj``."""

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 1)
        self.to_qv = nn.Sequential(nn.Conv2d(dim, 2 * dim, 1), nn.GELU())
        self.attn = _StripedConv(dim, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, v = self.to_qv(x).chunk(2, dim=1)
        return self.proj(self.attn(q) * v)


class _Stage(nn.Module):
    """``local_block`` / ``global_block``: norm, ``block``, plus the input; norm, gated feed-forward, plus the
    input (channel LayerNorms, eps 1e-6)."""

    def __init__(self, dim: int, block: nn.Module):
        super().__init__()
        self.norm_1 = ChannelLayerNorm(dim)
        self.block = block
        self.norm_2 = ChannelLayerNorm(dim)
        self.ffn = _GatedFFN(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.norm_1(x)) + x
        return self.ffn(self.norm_2(x)) + x


class _SeemoReGroup(nn.Module):
    """``body.N``: the local stage, then the global one."""

    def __init__(self, dim: int, widths: list[int], kernel: int, shuffle: bool, recursive: int):
        super().__init__()
        self.local_block = _Stage(dim, _MixtureBlock(dim, widths, shuffle, recursive))
        self.global_block = _Stage(dim, _StripedGate(dim, kernel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.global_block(self.local_block(x))


class SeemoRe(nn.Module):
    """SeemoRe for RGB pictures: ``groups`` groups of width ``dim``, experts of ``widths`` channels, the global
    stage's striped ``kernel``, the channel ``shuffle`` and ``recursive`` calibration steps (see the module's
    description). Pictures are padded to at least 16 pixels a side and the output cropped back."""

    def __init__(self, *, dim: int, groups: int, widths: list[int], kernel: int, shuffle: bool, recursive: int,
                 scale: int):
        super().__init__()
        self.scale = scale
        self.register_buffer("mean", torch.tensor(SWINIR_MEAN).view(1, 3, 1, 1), persistent=False)
        self.conv_1 = nn.Conv2d(3, dim, 3, 1, 1)
        self.body = nn.ModuleList(_SeemoReGroup(dim, widths, kernel, shuffle, recursive) for _ in range(groups))
        self.norm = ChannelLayerNorm(dim)
        self.conv_2 = nn.Conv2d(dim, dim, 3, 1, 1)
        self.upsampler = nn.Sequential(nn.Conv2d(dim, 3 * scale * scale, 3, 1, 1), nn.PixelShuffle(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = pad_edges(x, max(h, SEEMORE_MINIMUM), max(w, SEEMORE_MINIMUM))
        mean = self.mean.to(x.dtype)
        feat = self.conv_1(x - mean)
        y = feat
        for group in self.body:
            y = group(y)
        out = self.upsampler(self.conv_2(self.norm(y)) + feat) + mean
        return out[..., : h * self.scale, : w * self.scale]


# --------------------------------------------------------------------------------------------- plans


def _craft_split(sd: Mapping[str, torch.Tensor], source: str, tensor: Callable[[str, int], torch.Tensor]
                 ) -> tuple[int, int]:
    """CRAFT's (height, width) window as spandrel reads it: the sides whose product is the number of rows of
    ``relative_position_index_h`` and whose (2h - 1)(2w - 1) is that of ``biases_v``, the shorter first; the
    four saved buffers must be those of that window, and its sides divide 16."""
    area = tensor("relative_position_index_h", 2).shape[0]
    offsets = tensor("biases_v", 2).shape[0]
    sides = [(s, area // s) for s in range(1, math.isqrt(area) + 1)
             if area % s == 0 and (2 * s - 1) * (2 * (area // s) - 1) == offsets]
    if not sides:
        raise ModelError(f"{source}: CRAFT window buffers of {area} positions and {offsets} offsets do not describe "
                         "a rectangular window: incomplete or damaged file")
    split = sides[0]
    for name, expected in craft_window_buffers(split).items():
        saved = tensor(name, 2)
        if tuple(saved.shape) != tuple(expected.shape) or not torch.equal(saved.to(expected.dtype), expected):
            raise ModelError(f"{source}: CRAFT {name} is not that of a {split[0]}x{split[1]} window (the one its "
                             "size gives, the shorter side first): not a window this loader builds, or a damaged "
                             "file")
    if any(CRAFT_WINDOW % s for s in split):
        raise ModelError(f"{source}: CRAFT windows of {split[0]}x{split[1]}; expected sides dividing the "
                         f"{CRAFT_WINDOW}-pixel band pictures are padded to")
    return split


def craft_plan(sd: dict[str, torch.Tensor], source: str) -> _Plan | None:
    """CRAFT's hyper-parameters from its tensors (None when ``sd`` is not CRAFT: no window, high-frequency or
    fusion blocks under ``layers.N.residual_group``): the width from the first conv; per group the depth (its
    fusion blocks) and heads (their ``temperature``); the window (:func:`_craft_split`); the MLP width, the
    biases of ``qkv``, the conv after the body and the scale from their tensors."""
    from .upscaler import _Plan, _rgb_only, _tensor_getter

    if not any(_CRAFT_MARK.match(n) for n in sd):
        return None
    tensor = _tensor_getter(sd, source, ARCH_CRAFT)
    dim, in_ch = tensor("conv_first.weight", 4).shape[:2]
    _rgb_only(source, ARCH_CRAFT, in_ch, 3)
    scale = _shuffle_scale(source, ARCH_CRAFT, "upsample.0", tensor("upsample.0.weight", 4).shape[0])
    groups = _in_a_row(source, ARCH_CRAFT, "groups (layers.N)", _entries(sd, "layers"))
    depths = [_in_a_row(source, ARCH_CRAFT, f"fusion blocks (layers.{g}.residual_group.hf_blocks.N)",
                        _entries(sd, f"layers.{g}.residual_group.hf_blocks")) for g in range(groups)]
    heads = [tensor(f"layers.{g}.residual_group.hf_blocks.0.attn.temperature", 3).shape[0] for g in range(groups)]
    if dim % 2 or any(h < 2 or dim % h or (dim // 2) % (h // 2) for h in heads):
        raise ModelError(f"{source}: CRAFT of width {dim} with heads {heads}; expected an even width that the heads "
                         "divide, and at least 2 heads whose half divides half the width")
    split = _craft_split(sd, source, tensor)
    first = "layers.0.residual_group.srwa_blocks.0."
    hidden = tensor(first + "mlp.fc1.weight", 2).shape[0]
    qkv_bias = first + "qkv.bias" in sd
    conv_after_body = "conv_after_body.weight" in sd
    notes = ("" if conv_after_body else ", no conv after body") + ("" if qkv_bias else ", no qkv bias")
    return _Plan(
        arch=ARCH_CRAFT, scale=scale, derived=lambda name: name in _CRAFT_BUFFERS,
        describe=(f"CRAFT {scale}x (embed {dim}, depths {depths}, heads {heads}, window {split[0]}x{split[1]}, "
                  f"MLP {hidden}{notes})"),
        build=lambda: CRAFT(dim=dim, depths=depths, heads=heads, split=split, hidden=hidden, qkv_bias=qkv_bias,
                            conv_after_body=conv_after_body, scale=scale),
    )


def seemore_plan(sd: dict[str, torch.Tensor], source: str) -> _Plan | None:
    """SeemoRe's hyper-parameters from its tensors (None when ``sd`` is not SeemoRe: no local or global stages
    under ``body.N``): the width from ``conv_1``, the groups from the entries of ``body``, the experts and their
    widths from the first group's, the global stage's kernel and the scale from their convs; the channel shuffle
    and calibration steps by spandrel's rule (see the module's description)."""
    from .upscaler import _Plan, _rgb_only, _tensor_getter

    if not any(_SEEMORE_MARK.match(n) for n in sd):
        return None
    tensor = _tensor_getter(sd, source, ARCH_SEEMORE)
    dim, in_ch = tensor("conv_1.weight", 4).shape[:2]
    _rgb_only(source, ARCH_SEEMORE, in_ch, 3)
    scale = _shuffle_scale(source, ARCH_SEEMORE, "upsampler.0", tensor("upsampler.0.weight", 4).shape[0])
    groups = _in_a_row(source, ARCH_SEEMORE, "groups (body.N)", _entries(sd, "body"))
    experts = "body.0.local_block.block.moe_layer.experts"
    count = _in_a_row(source, ARCH_SEEMORE, f"experts ({experts}.N)", _entries(sd, experts))
    widths = [tensor(f"{experts}.{i}.conv_1.weight", 4).shape[0] for i in range(count)]
    growth = next((name for name, width in SEEMORE_GROWTH.items() if widths == [width(i) for i in range(count)]), None)
    if growth is None:
        raise ModelError(f"{source}: SeemoRe experts of widths {widths}; expected 2, 3, 4, ... (linear), 2, 4, 6, ... "
                         "(double) or 2, 4, 8, ... (exp)")
    kernel = tensor("body.0.global_block.block.attn.conv.0.weight", 4).shape[3]
    if kernel % 2 == 0:
        raise ModelError(f"{source}: SeemoRe global stage with a {kernel}-wide striped conv; expected an odd kernel")
    large = (groups, dim) == SEEMORE_LARGE
    shuffle, recursive = not large, 1 if large else 2
    return _Plan(
        arch=ARCH_SEEMORE, scale=scale,
        describe=(f"SeemoRe {scale}x (dim {dim}, {groups} group{'s' * (groups > 1)}, {count} expert"
                  f"{'s' * (count > 1)} ({growth} widths), kernel {kernel}{', Large' if large else ''})"),
        build=lambda: SeemoRe(dim=dim, groups=groups, widths=widths, kernel=kernel, shuffle=shuffle,
                              recursive=recursive, scale=scale),
    )
