"""FDAT and MoESR: two upscalers trained with traiNNer-redux, written as plain modules.

ComfyUI (``models/upscale_models``) and Forge read both through spandrel; the module's tensor names are the
files' own, so they load unchanged. Both end in traiNNer's "universal" upsampler, which records what it is in
a small buffer of its own (``MetaUpsample``, seven bytes: the upsampler's version, its kind — an index into
the list below —, the scale, the width it takes, the output channels, its middle width, DySample's groups):
the files say no other way which upsampler they use. The buffer is read, never loaded.

- **FDAT** ("Fast Dual Aggregation Transformer"): DAT's idea (``upscaler_dat``) made light. A 3x3 conv to
  ``dim`` channels (after a pixel unshuffle by 4 or 2 in the 1x and 2x "unshuffle" models, which then
  upsample by 4); residual groups (``groups.N``: pairs of blocks and a 3x3 conv without bias, plus the
  group's input); a 3x3 conv without bias (``conv_after``) plus the first conv's output; the upsampler.
  Blocks work on the pixels as tokens and alternate:

  - **spatial** (even blocks): multi-head attention within ``window`` x ``window`` windows with a learned
    bias for each pair of places in a window and head (``attn.bias``, the whole (heads, w², w²) table);
    the normalised tokens are padded with zeros on the right and bottom to whole windows (so the padded
    keys, which are all zeros, take part in the softmax) as the original does;
  - **channel** (odd blocks): attention between the channels of each head over the whole picture, queries
    and keys L2-normalised over the pixels, scaled by a learned ``temp``.

  A block normalises its input (``n1``) and runs beside the attention a depthwise 3x3 conv with GELU
  (``conv``); the two meet in ``inter``: in spatial blocks the conv branch's channel gate (``cg``: global
  mean, 1x1 down, GELU, 1x1 up, sigmoid) weights the attention, in channel blocks the attention's spatial
  gate (``sg``: 1x1 to one channel, sigmoid) weights the conv branch; the sum is added to the input. Then a
  LayerNorm (``n2``) and a feed-forward (``ffn``: linear, GELU, a depthwise 3x3 conv, linear; no biases),
  added to the input. Little of DAT's code is the same: DAT gates both branches in every block, through
  batch norms and biased convs, and biases its windows through a position MLP; FDAT gates one branch a
  block, without either.
- **MoESR** ("MambaOut Excitation Super-Resolution"): MoSR's gated blocks (``upscaler_conv``) in groups. A
  3x3 conv to ``dim`` channels (``in_to_dim``); groups (``blocks.N``) of gated blocks
  (``blocks.N.blocks.M``), each closed by a multi-scale gate (``msg``: a 3x3 conv to a quarter of the
  width and a pixel unshuffle by 2, three gated blocks at half the size, a 3x3 conv and a pixel shuffle
  back, LeakyReLU 0.1 after both, plus its input); the groups' output plus the first conv's; the
  upsampler (``upscale``). A gated block is MoSR's (a channel LayerNorm, a 3x3 conv to two halves, Mish of
  the first times the second, a 3x3 conv back, Mish) with an inception depthwise conv (``conv``: an
  eighth of the width each through a 3x3, a 1x11 and an 11x1 depthwise conv, the rest unchanged) for
  MoSR's single one, its output scaled per channel by ``gamma`` and added to its input.

The upsamplers (``upsampler``/``upscale``; MoESR has the first five, FDAT all eight): "conv" (a 3x3 conv
at 1x; the 1x models of every kind are this), "pixelshuffledirect" (a conv to 3·scale² and a pixel
shuffle), "pixelshuffle" (a conv to the middle width with LeakyReLU, a conv and pixel shuffle per factor
2 or the one factor 3, a last conv), "nearest+conv" (per factor a conv, nearest upsampling and LeakyReLU
0.2, a conv with LeakyReLU 0.2, a last conv), "dysample" (DySample with four groups; in FDAT's version a
conv with LeakyReLU to the middle width first, where that differs from the width), "transpose+conv"
(transposed convs for 2x, 3x or 4x, then a 3x3 conv), "lda" (a conv to the middle width as for DySample,
local deformable attention upsampling — each output pixel's query, interpolated from a 1x1 conv of the
normalised features, attends to nine samples of the keys and features placed by offsets that a small
conv predicts from the queries, with a learned bias per sample — and a last conv) and "pa_up" (per factor
nearest upsampling, a conv to the middle width, pixel attention — times the sigmoid of a 1x1 conv of
itself —, LeakyReLU 0.2, a conv, LeakyReLU 0.2; a last conv).

The files record the widths, read from the tensors: spandrel works the feed-forward widths out from
ratios in floating point (which loses one channel for some widths, e.g. 61 of 28) and FDAT's width from
``MetaUpsample`` (where "pa_up" at 2x and 4x writes its middle width instead); the two readings agree
wherever spandrel's builds the file's network. The groups and blocks, FDAT's heads and window (from
``attn.bias``) and unshuffle factor (from ``conv_first.1``) come from the tensors too; the upsampler, the
scale and the middle width from ``MetaUpsample``.

Sizes. FDAT runs any size: its attention pads itself, and the unshuffle models pad the picture to a
multiple of the factor by reflection, as the original does (repeating the edge where a side is too short
to reflect, where the original fails). MoESR needs even sides (its gate halves the size): spandrel's
model descriptor, what ComfyUI and Forge call, pads pictures to at least 2 pixels a side (reflection as
far as the picture allows, the edge repeated beyond) and the network pads odd sides by reflection; the
module does the same. The output is cropped back to the picture's size times the scale.
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
from .upscaler_conv import ChannelLayerNorm, DySample, _GatedBlock
from .upscaler_light import _entries, _in_a_row
from .upscaler_swin import from_windows, pad_edges, to_windows

if TYPE_CHECKING:
    from .upscaler import _Plan

ARCH_FDAT = "FDAT"
ARCH_MOESR = "MoESR"

#: The upsamplers ``MetaUpsample`` numbers (its second entry): MoESR's version knows the first five.
UPSAMPLERS = ("conv", "pixelshuffledirect", "pixelshuffle", "nearest+conv", "dysample", "transpose+conv", "lda",
              "pa_up")
#: DySample's channel groups in both networks.
DYSAMPLE_GROUPS = 4
#: The largest scale and FDAT window side the files are read with (the released models: 1x-4x, windows of 8).
_MAX_SCALE = 16
_MAX_WINDOW = 64


# --------------------------------------------------------------------------------------------- upsamplers


class _PixelAttention(nn.Module):
    """"pa_up"'s pixel attention: the features times the sigmoid of a 1x1 conv of them (``conv.0``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.conv(x)


class LocalDeformableUpsample(nn.Module):
    """"lda": each output pixel attends to nine samples of the features around its place.

    The features are normalised (``layer_norm``, over the channels) and projected by 1x1 convs to queries
    and keys a quarter as wide (``proj_q``, ``proj_k``); the queries are interpolated to the output size
    (bilinear, corners aligned). In two channel groups, a small conv on the queries (``conv_offset``:
    depthwise 3x3, channel LayerNorm, SiLU, 3x3 to nine (dy, dx) pairs) gives offsets, 11·tanh of it plus
    the 3x3 neighbourhood, in output pixels; the nine samples of each group's keys and (unnormalised)
    features are taken there (bilinear, zeros outside, corners aligned, the output grid stretched over the
    input). One head: the query's products with the nine keys plus a learned bias per sample
    (``relative_position_bias_table``), scaled by the key width ** -0.5, weight the nine feature samples."""

    #: The original's constants: width reduction, channel groups, sampling kernel side, offset range.
    REDUCTION, GROUPS, KERNEL, RANGE = 4, 2, 3, 11.0

    def __init__(self, dim: int, scale: int):
        super().__init__()
        self.scale = scale
        hidden = dim // self.REDUCTION
        part = hidden // self.GROUPS
        k = self.KERNEL
        self.proj_q = nn.Conv2d(dim, hidden, 1, bias=False)
        self.proj_k = nn.Conv2d(dim, hidden, 1, bias=False)
        self.conv_offset = nn.Sequential(nn.Conv2d(part, part, 3, 1, 1, groups=part, bias=False),
                                         ChannelLayerNorm(part), nn.SiLU(), nn.Conv2d(part, 2 * k * k, 3, 1, 1))
        self.layer_norm = ChannelLayerNorm(dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(1, 1, 1, k * k, hidden))
        steps = torch.arange(k, dtype=torch.float32) - k // 2
        neighbours = torch.stack((steps.repeat_interleave(k), steps.repeat(k)), dim=1)  # (dy, dx) row by row
        self.register_buffer("base_offset", neighbours.reshape(1, -1, 1, 1), persistent=False)

    def _grid(self, offset: torch.Tensor, oh: int, ow: int) -> torch.Tensor:
        """(N, 2·k², oh, ow) offsets → grid_sample's (N, k·oh, k·ow, 2) grid: sample (i, j) of output pixel
        (y, x) at row i·oh + y, column j·ow + x."""
        k, n = self.KERNEL, offset.shape[0]
        places = offset.view(n, k, k, 2, oh, ow).permute(0, 1, 4, 2, 5, 3)  # (N, k, oh, k, ow, (dy, dx))
        rows = torch.arange(oh, device=offset.device, dtype=offset.dtype)
        cols = torch.arange(ow, device=offset.device, dtype=offset.dtype)
        centres = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1)  # (oh, ow, (y, x))
        places = (places + centres.view(1, 1, oh, 1, ow, 2)).reshape(n, k * oh, k * ow, 2)
        y = 2 * places[..., 0] / (oh - 1) - 1
        x = 2 * places[..., 1] / (ow - 1) - 1
        return torch.stack((x, y), dim=-1)

    def _samples(self, x: torch.Tensor, grid: torch.Tensor, oh: int, ow: int) -> torch.Tensor:
        """(N, C, H, W) sampled on the grid → (N, k², C, oh, ow)."""
        k = self.KERNEL
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        n, c = out.shape[:2]
        return out.view(n, c, k, oh, k, ow).permute(0, 2, 4, 1, 3, 5).reshape(n, k * k, c, oh, ow)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        g, kk = self.GROUPS, self.KERNEL ** 2
        oh, ow = h * self.scale, w * self.scale
        normed = self.layer_norm(x)
        q = F.interpolate(self.proj_q(normed), (oh, ow), mode="bilinear", align_corners=True)
        k = self.proj_k(normed)
        hidden = q.shape[1]
        offset = self.conv_offset(q.reshape(b * g, -1, oh, ow)).tanh() * self.RANGE + self.base_offset.to(x.dtype)
        grid = self._grid(offset, oh, ow)

        def tokens(t: torch.Tensor) -> torch.Tensor:
            """(B·G, k², C/G, oh, ow) → (B, oh·ow, k², C), the groups' channels side by side."""
            part = t.shape[2]
            return t.view(b, g, kk, part, oh, ow).permute(0, 4, 5, 2, 1, 3).reshape(b, oh * ow, kk, g * part)

        keys = tokens(self._samples(k.reshape(b * g, -1, h, w), grid, oh, ow))
        keys = keys + self.relative_position_bias_table.view(1, 1, kk, hidden)
        values = tokens(self._samples(x.reshape(b * g, -1, h, w), grid, oh, ow))
        queries = q.flatten(2).transpose(1, 2).unsqueeze(2) * hidden ** -0.5  # (B, oh·ow, 1, hidden)
        weights = (queries @ keys.transpose(-1, -2)).softmax(dim=-1)
        return (weights @ values).squeeze(2).transpose(1, 2).reshape(b, c, oh, ow)


def _factors(scale: int) -> list[int] | None:
    """The upsampling steps of the stepwise upsamplers: 2 per factor of two, or one 3; None otherwise."""
    if scale & (scale - 1) == 0:
        return [2] * (scale.bit_length() - 1)
    return [3] if scale == 3 else None


def upsampler_problem(kind: str, scale: int, dim: int, mid: int, *, fdat: bool) -> str | None:
    """Why the upsampler ``kind`` cannot be built for ``scale`` (the network's: 4 for FDAT's unshuffle models)
    and widths ``dim`` (what it takes) and ``mid``; None when it can."""
    if kind == "conv" and scale != 1:
        return f"a {scale}x model with the \"conv\" upsampler (which keeps the size)"
    if scale == 1:
        return None
    if kind in ("pixelshuffle", "nearest+conv", "pa_up") and _factors(scale) is None:
        return f"the \"{kind}\" upsampler at {scale}x; expected a power of 2 or 3"
    if kind == "transpose+conv" and scale not in (2, 3, 4):
        return f"the \"transpose+conv\" upsampler at {scale}x; expected 2x, 3x or 4x"
    groups = DYSAMPLE_GROUPS
    width = mid if fdat else dim
    if kind == "dysample" and (width % groups or width < groups or (fdat and width == groups)):
        return f"DySample over {width} channels; expected a multiple of its {groups} groups (more than {groups})"
    if kind == "lda" and (mid % 2 or (mid // 4) % 2 or mid < 8):
        return f"the \"lda\" upsampler over {mid} channels; expected an even width whose quarter is even"
    if kind in ("pixelshuffle", "pa_up") and mid < 1:
        return f"the \"{kind}\" upsampler with a middle width of {mid}"
    return None


def universal_upsampler(kind: str, scale: int, dim: int, mid: int, *, fdat: bool) -> nn.Sequential:
    """traiNNer's upsampler ``kind`` (see the module's description) to RGB, its layers numbered as in the
    files; ``fdat``: FDAT's version (DySample over ``mid`` channels after a conv where ``mid`` differs from
    ``dim``), else MoESR's (DySample over ``dim``)."""
    problem = upsampler_problem(kind, scale, dim, mid, fdat=fdat)
    if problem is not None:
        raise ValueError(problem)
    layers: list[nn.Module] = []
    if scale == 1 or kind == "conv":
        layers.append(nn.Conv2d(dim, 3, 3, 1, 1))
    elif kind == "pixelshuffledirect":
        layers += [nn.Conv2d(dim, 3 * scale * scale, 3, 1, 1), nn.PixelShuffle(scale)]
    elif kind == "pixelshuffle":
        layers += [nn.Conv2d(dim, mid, 3, 1, 1), nn.LeakyReLU(0.01)]
        for f in _factors(scale):
            layers += [nn.Conv2d(mid, f * f * mid, 3, 1, 1), nn.PixelShuffle(f)]
        layers.append(nn.Conv2d(mid, 3, 3, 1, 1))
    elif kind == "nearest+conv":
        for f in _factors(scale):
            layers += [nn.Conv2d(dim, dim, 3, 1, 1), nn.Upsample(scale_factor=f), nn.LeakyReLU(0.2)]
        layers += [nn.Conv2d(dim, dim, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(dim, 3, 3, 1, 1)]
    elif kind in ("dysample", "lda"):
        width = mid if fdat or kind == "lda" else dim
        if width != dim:
            layers += [nn.Conv2d(dim, width, 3, 1, 1), nn.LeakyReLU(0.01)]
        if kind == "dysample":
            layers.append(DySample(width, scale, DYSAMPLE_GROUPS, end_conv=True))
        else:
            layers += [LocalDeformableUpsample(width, scale), nn.Conv2d(width, 3, 3, 1, 1)]
    elif kind == "transpose+conv":
        if scale == 4:
            layers += [nn.ConvTranspose2d(dim, dim, 4, 2, 1), nn.GELU(), nn.ConvTranspose2d(dim, 3, 4, 2, 1)]
        elif scale == 3:
            layers.append(nn.ConvTranspose2d(dim, 3, 3, 3, 0))
        else:
            layers.append(nn.ConvTranspose2d(dim, 3, 4, 2, 1))
        layers.append(nn.Conv2d(3, 3, 3, 1, 1))
    elif kind == "pa_up":
        width = dim
        for f in _factors(scale):
            layers += [nn.Upsample(scale_factor=f), nn.Conv2d(width, mid, 3, 1, 1), _PixelAttention(mid),
                       nn.LeakyReLU(0.2), nn.Conv2d(mid, mid, 3, 1, 1), nn.LeakyReLU(0.2)]
            width = mid
        layers.append(nn.Conv2d(mid, 3, 3, 1, 1))
    else:
        raise ValueError(f"unknown upsampler {kind!r}")
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------------- FDAT


class _WindowAttention(nn.Module):
    """The spatial blocks' ``attn``: multi-head attention within ``window`` x ``window`` windows plus the
    learned (heads, w², w²) ``bias``; ``qkv`` without bias, ``proj`` with one."""

    def __init__(self, dim: int, window: int, heads: int):
        super().__init__()
        self.window, self.heads = window, heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.zeros(heads, window * window, window * window))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, H, W, C) normalised tokens, padded with zeros to whole windows and cropped back."""
        _, h, w, c = x.shape
        s = self.window
        pad_h, pad_w = -h % s, -w % s
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h)) if pad_h or pad_w else x.contiguous()
        t = to_windows(x, s)
        n = s * s
        q, k, v = self.qkv(t).view(-1, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias.to(q.dtype), scale=self.scale)
        out = self.proj(out.transpose(1, 2).reshape(-1, n, c))
        return from_windows(out, s, h + pad_h, w + pad_w)[:, :h, :w]


class _ChannelAttention(nn.Module):
    """The channel blocks' ``attn``: per head, each channel attends to the others over all pixels (queries
    and keys L2-normalised over the pixels, times ``temp``); ``qkv`` without bias, ``proj`` with one."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.temp = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        # (3, B, heads, head width, pixels)
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 4, 1)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        weights = ((q @ k.transpose(-2, -1)) * self.temp).softmax(dim=-1)
        return self.proj((weights @ v).permute(0, 3, 1, 2).reshape(b, h, w, c))


class _Interaction(nn.Module):
    """``inter``: the attention's spatial gate (``sg``) and the conv branch's channel gate (``cg``,
    ``reduced`` channels inside); 1x1 convs without bias."""

    def __init__(self, dim: int, reduced: int):
        super().__init__()
        self.sg = nn.Sequential(nn.Conv2d(dim, 1, 1, bias=False), nn.Sigmoid())
        self.cg = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, reduced, 1, bias=False), nn.GELU(),
                                nn.Conv2d(reduced, dim, 1, bias=False), nn.Sigmoid())

    def forward(self, attended: torch.Tensor, conv: torch.Tensor, spatial: bool) -> torch.Tensor:
        """``attended`` (B, H, W, C), ``conv`` (B, C, H, W) → (B, H, W, C): in a spatial block the conv
        branch's channel gate weights the attention, in a channel block the attention's spatial gate
        weights the conv branch."""
        if spatial:
            return attended * self.cg(conv).permute(0, 2, 3, 1) + conv.permute(0, 2, 3, 1)
        gate = self.sg(attended.permute(0, 3, 1, 2))
        return attended + (conv * gate).permute(0, 2, 3, 1)


class _FeedForward(nn.Module):
    """``ffn``: linear to ``hidden``, GELU, a depthwise 3x3 conv (``smix``), linear back; no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        self.smix = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.fc1(x)).permute(0, 3, 1, 2)
        return self.fc2(self.smix(y).permute(0, 2, 3, 1))


class FDATBlock(nn.Module):
    """A spatial (window attention) or channel block: see the module's description."""

    def __init__(self, dim: int, heads: int, window: int, hidden: int, reduced: int, *, spatial: bool):
        super().__init__()
        self.spatial = spatial
        self.n1 = nn.LayerNorm(dim)
        self.n2 = nn.LayerNorm(dim)
        self.attn = _WindowAttention(dim, window, heads) if spatial else _ChannelAttention(dim, heads)
        self.conv = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, groups=dim, bias=False), nn.GELU())
        self.inter = _Interaction(dim, reduced)
        self.ffn = _FeedForward(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, H, W, C) tokens."""
        y = self.n1(x)
        x = x + self.inter(self.attn(y), self.conv(y.permute(0, 3, 1, 2)), self.spatial)
        return x + self.ffn(self.n2(x))


class _FDATGroup(nn.Module):
    """``groups.N``: the blocks, then a 3x3 conv without bias, plus the group's input."""

    def __init__(self, blocks: list[FDATBlock], dim: int):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.permute(0, 2, 3, 1).contiguous()
        for block in self.blocks:
            t = block(t)
        return self.conv(t.permute(0, 3, 1, 2)) + x


class FDAT(nn.Module):
    """FDAT for RGB pictures: ``groups`` groups of ``pairs`` (spatial, channel) block pairs of ``heads`` heads,
    ``window`` the spatial blocks' window, ``hidden`` the feed-forward width, ``reduced`` the channel gate's;
    ``upsampler`` (with middle width ``mid``) at ``scale``; ``unshuffle`` 4 or 2 for the 1x and 2x models fed a
    pixel-unshuffled picture (their upsampler is 4x)."""

    def __init__(self, *, dim: int, groups: int, pairs: int, heads: int, window: int, hidden: int, reduced: int,
                 upsampler: str, scale: int, mid: int, unshuffle: int = 1):
        super().__init__()
        self.scale, self.unshuffle = scale, unshuffle
        if unshuffle > 1:
            self.conv_first: nn.Module = nn.Sequential(nn.PixelUnshuffle(unshuffle),
                                                       nn.Conv2d(3 * unshuffle * unshuffle, dim, 3, 1, 1))
        else:
            self.conv_first = nn.Conv2d(3, dim, 3, 1, 1)
        self.groups = nn.Sequential(*(
            _FDATGroup([FDATBlock(dim, heads, window, hidden, reduced, spatial=i % 2 == 0) for i in range(2 * pairs)],
                       dim)
            for _ in range(groups)))
        self.conv_after = nn.Conv2d(dim, dim, 3, 1, 1, bias=False)
        self.upsampler = universal_upsampler(upsampler, scale * unshuffle, dim, mid, fdat=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        u = self.unshuffle
        if u > 1:
            x = pad_edges(x, -(-h // u) * u, -(-w // u) * u)
        feat = self.conv_first(x)
        out = self.upsampler(self.conv_after(self.groups(feat)) + feat)
        return out[..., : h * self.scale, : w * self.scale]


# --------------------------------------------------------------------------------------------- MoESR


class _InceptionConv(nn.Module):
    """A gated block's ``conv``: an eighth of the channels each through a depthwise 3x3 (``dwconv_hw``),
    1x11 (``dwconv_w``) and 11x1 (``dwconv_h``) conv, the first channels unchanged."""

    #: The band kernels' length.
    BAND = 11

    def __init__(self, dim: int):
        super().__init__()
        part, band = int(dim * 0.125), self.BAND
        self.split = (dim - 3 * part, part, part, part)
        self.dwconv_hw = nn.Conv2d(part, part, 3, 1, 1, groups=part)
        self.dwconv_w = nn.Conv2d(part, part, (1, band), 1, (0, band // 2), groups=part)
        self.dwconv_h = nn.Conv2d(part, part, (band, 1), 1, (band // 2, 0), groups=part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, square, wide, tall = torch.split(x, self.split, dim=1)
        return torch.cat((kept, self.dwconv_hw(square), self.dwconv_w(wide), self.dwconv_h(tall)), dim=1)


class MoESRBlock(_GatedBlock):
    """MoSR's gated block (``norm``, ``fc1``, ``fc2``; the whole width through the depthwise part) with the
    inception conv, its output times ``gamma`` plus the input."""

    def __init__(self, dim: int, hidden: int):
        super().__init__(dim, hidden, dim, 3)
        self.conv = _InceptionConv(dim)
        self.gamma = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, i, c = torch.split(self.fc1(self.norm(x)), self.split, dim=1)
        y = F.mish(self.fc2(F.mish(g) * torch.cat((i, self.conv(c)), dim=1)))
        return y * self.gamma + x


class _MultiScaleGate(nn.Module):
    """``msg``: conv to a quarter of the width, pixel unshuffle by 2, LeakyReLU 0.1; three gated blocks
    (``gated``, feed-forward ``hidden``); conv to four times the width, pixel shuffle, LeakyReLU 0.1; plus
    the input."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(dim, dim // 4, 3, 1, 1), nn.PixelUnshuffle(2), nn.LeakyReLU(0.1))
        self.gated = nn.Sequential(*(MoESRBlock(dim, hidden) for _ in range(3)))
        self.up = nn.Sequential(nn.Conv2d(dim, 4 * dim, 3, 1, 1), nn.PixelShuffle(2), nn.LeakyReLU(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.gated(self.down(x))) + x


class _MoESRGroup(nn.Module):
    """``blocks.N``: gated blocks (``blocks``), then the multi-scale gate (``msg``)."""

    def __init__(self, dim: int, blocks: int, hidden: int, msg_hidden: int):
        super().__init__()
        self.blocks = nn.Sequential(*(MoESRBlock(dim, hidden) for _ in range(blocks)))
        self.msg = _MultiScaleGate(dim, msg_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.msg(self.blocks(x))


#: The smallest side MoESR is run at (spandrel's size requirement) and the multiple its gate needs.
MOESR_MINIMUM = 2


class MoESR(nn.Module):
    """MoESR for RGB pictures: ``groups`` groups of ``blocks`` gated blocks (feed-forward ``hidden``; the gates'
    blocks ``msg_hidden``), ``upsampler`` (middle width ``mid``) at ``scale``. Sides are padded to an even
    length of at least 2 (reflection, the edge repeated where a side is a single pixel) and the output cropped
    back."""

    def __init__(self, *, dim: int, groups: int, blocks: int, hidden: int, msg_hidden: int, upsampler: str,
                 scale: int, mid: int):
        super().__init__()
        self.scale = scale
        self.in_to_dim = nn.Conv2d(3, dim, 3, 1, 1)
        self.blocks = nn.Sequential(*(_MoESRGroup(dim, blocks, hidden, msg_hidden) for _ in range(groups)))
        self.upscale = universal_upsampler(upsampler, scale, dim, mid, fdat=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = MOESR_MINIMUM
        x = pad_edges(x, -(-max(h, m) // m) * m, -(-max(w, m) // m) * m)
        feat = self.in_to_dim(x)
        return self.upscale(self.blocks(feat) + feat)[..., : h * self.scale, : w * self.scale]


# --------------------------------------------------------------------------------------------- plans


def _meta(sd: Mapping[str, torch.Tensor], source: str, arch: str, name: str, kinds: int
          ) -> tuple[str, int, int, int]:
    """(upsampler, scale, output channels, middle width) from the ``MetaUpsample`` buffer ``name``."""
    t = sd.get(name)
    if t is None:
        raise ModelError(f"{source}: {arch} model without {name!r} (the record of its upsampler): incomplete or "
                         "damaged file")
    values = t.detach().flatten().double() if t.ndim == 1 and t.numel() == 7 and not t.is_complex() else None
    if values is None or not torch.isfinite(values).all() or not torch.equal(values, values.round()):
        raise ModelError(f"{source}: {arch} {name} is {tuple(t.shape)} {t.dtype}; expected the seven whole numbers "
                         "traiNNer records its upsampler with")
    _, index, scale, _, out_ch, mid, _ = (int(v) for v in values.tolist())
    if not 0 <= index < kinds:
        raise ModelError(f"{source}: {arch} upsampler number {index} in {name}; expected 0 to {kinds - 1} "
                         f"({', '.join(UPSAMPLERS[:kinds])})")
    if not 1 <= scale <= _MAX_SCALE:
        raise ModelError(f"{source}: {arch} scale {scale} in {name}; expected 1 to {_MAX_SCALE}")
    return UPSAMPLERS[index], scale, out_ch, mid


def _upsampler_derived(prefix: str) -> Callable[[str], bool]:
    """The upsampler's saved buffers: its record and DySample's sub-pixel places (derived here)."""
    pattern = re.compile(re.escape(prefix) + r"\.(?:MetaUpsample|\d+\.init_pos)")
    return lambda name: pattern.fullmatch(name) is not None


def _check_upsampler(source: str, arch: str, kind: str, scale: int, dim: int, mid: int, *, fdat: bool) -> None:
    problem = upsampler_problem(kind, scale, dim, mid, fdat=fdat)
    if problem is not None:
        raise ModelError(f"{source}: {arch} with {problem}: not a usable model")


def is_fdat(sd: Mapping[str, torch.Tensor]) -> bool:
    """FDAT's names: its first conv, its blocks' interaction gates (``inter``) and the upsampler's record."""
    return (("conv_first.weight" in sd or "conv_first.1.weight" in sd) and "groups.0.blocks.0.inter.cg.1.weight" in sd
            and "upsampler.MetaUpsample" in sd)


def fdat_plan(sd: dict[str, torch.Tensor], source: str) -> _Plan | None:
    """FDAT's hyper-parameters from its tensors (None when ``sd`` is not FDAT, :func:`is_fdat`): the width from
    the first conv (its input from a pixel unshuffle by 4 or 2 in the 1x and 2x "unshuffle" models), groups
    and blocks from the entries of ``groups``, heads and window from the first block's ``attn.bias``
    (heads, w², w²), the feed-forward and channel-gate widths from the first block; the upsampler, its scale
    and middle width from ``upsampler.MetaUpsample``."""
    if not is_fdat(sd):
        return None
    from .upscaler import _Plan, _rgb_only, _tensor_getter

    tensor = _tensor_getter(sd, source, ARCH_FDAT)
    kind, scale, out_ch, mid = _meta(sd, source, ARCH_FDAT, "upsampler.MetaUpsample", len(UPSAMPLERS))
    unshuffle = 1
    if "conv_first.1.weight" in sd:
        dim, shuffled = tensor("conv_first.1.weight", 4).shape[:2]
        _rgb_only(source, ARCH_FDAT, 3, out_ch)
        unshuffle = math.isqrt(shuffled // 3)
        if unshuffle not in (2, 4) or 3 * unshuffle * unshuffle != shuffled:
            raise ModelError(f"{source}: FDAT conv_first.1 takes {shuffled} channels; expected 48 or 12 (a picture "
                             "pixel-unshuffled by 4 or 2)")
        scale = 4 // unshuffle
    else:
        dim, in_ch = tensor("conv_first.weight", 4).shape[:2]
        _rgb_only(source, ARCH_FDAT, in_ch, out_ch)
    groups = _in_a_row(source, ARCH_FDAT, "groups (groups.N)", _entries(sd, "groups"))
    blocks = _in_a_row(source, ARCH_FDAT, "blocks (groups.0.blocks.N)", _entries(sd, "groups.0.blocks"))
    if blocks % 2:
        raise ModelError(f"{source}: FDAT group of {blocks} blocks; expected an even number (spatial and channel "
                         "blocks in pairs)")
    bias = tensor("groups.0.blocks.0.attn.bias", 3)
    heads, n = bias.shape[0], bias.shape[2]
    window = math.isqrt(n)
    if window * window != n or bias.shape[1] != n or not 1 <= window <= _MAX_WINDOW:
        raise ModelError(f"{source}: FDAT groups.0.blocks.0.attn.bias is {tuple(bias.shape)}; expected (heads, w², "
                         f"w²) for a window of 1 to {_MAX_WINDOW} pixels a side")
    if heads < 1 or dim % heads:
        raise ModelError(f"{source}: FDAT of width {dim} with {heads} heads; expected heads that divide the width")
    hidden = tensor("groups.0.blocks.0.ffn.fc1.weight", 2).shape[0]
    reduced = tensor("groups.0.blocks.0.inter.cg.1.weight", 4).shape[0]
    if hidden < 1 or not 1 <= reduced <= dim:
        raise ModelError(f"{source}: FDAT feed-forward of {hidden} and channel gate of {reduced} channels for width "
                         f"{dim}: not a usable model")
    _check_upsampler(source, ARCH_FDAT, kind, scale * unshuffle, dim, mid, fdat=True)
    pairs = blocks // 2
    note = f", unshuffle {unshuffle}" if unshuffle > 1 else ""
    return _Plan(
        arch=ARCH_FDAT, scale=scale, derived=_upsampler_derived("upsampler"),
        describe=(f"FDAT {scale}x (dim {dim}, {groups} group{'s' * (groups > 1)} of {blocks} blocks, {heads} heads, "
                  f"window {window}, {kind if scale * unshuffle > 1 else 'conv'}{note})"),
        build=lambda: FDAT(dim=dim, groups=groups, pairs=pairs, heads=heads, window=window, hidden=hidden,
                           reduced=reduced, upsampler=kind, scale=scale, mid=mid, unshuffle=unshuffle),
    )


def is_moesr(sd: Mapping[str, torch.Tensor]) -> bool:
    """MoESR's names: ``in_to_dim``, an inception conv in the first group's first block and the upsampler's
    record (``upscale.MetaUpsample``)."""
    return ("in_to_dim.weight" in sd and "blocks.0.blocks.0.conv.dwconv_hw.weight" in sd
            and "upscale.MetaUpsample" in sd)


def moesr_plan(sd: dict[str, torch.Tensor], source: str) -> _Plan | None:
    """MoESR's hyper-parameters from its tensors (None when ``sd`` is not MoESR, :func:`is_moesr`): the width
    from ``in_to_dim``, groups and blocks from the entries of ``blocks`` and ``blocks.0.blocks``, the
    feed-forward widths from the first block's and the first gate's ``fc1``; the upsampler, its scale and
    middle width from ``upscale.MetaUpsample``."""
    if not is_moesr(sd):
        return None
    from .upscaler import _Plan, _rgb_only, _tensor_getter

    tensor = _tensor_getter(sd, source, ARCH_MOESR)
    kind, scale, out_ch, mid = _meta(sd, source, ARCH_MOESR, "upscale.MetaUpsample", 5)
    dim, in_ch = tensor("in_to_dim.weight", 4).shape[:2]
    _rgb_only(source, ARCH_MOESR, in_ch, out_ch)
    groups = _in_a_row(source, ARCH_MOESR, "groups (blocks.N)", _entries(sd, "blocks"))
    blocks = _in_a_row(source, ARCH_MOESR, "blocks (blocks.0.blocks.N)", _entries(sd, "blocks.0.blocks"))
    hidden = tensor("blocks.0.blocks.0.fc1.weight", 4).shape[0] // 2
    msg_hidden = tensor("blocks.0.msg.gated.0.fc1.weight", 4).shape[0] // 2
    if dim % 4 or dim < 8:
        raise ModelError(f"{source}: MoESR of width {dim}; expected a multiple of 4 of at least 8 (its gate works "
                         "on a quarter of the width, its inception conv on eighths)")
    if hidden < dim or msg_hidden < dim:
        raise ModelError(f"{source}: MoESR gated blocks {hidden} and {msg_hidden} channels wide for width {dim}; "
                         "expected at least the width")
    _check_upsampler(source, ARCH_MOESR, kind, scale, dim, mid, fdat=False)
    return _Plan(
        arch=ARCH_MOESR, scale=scale, derived=_upsampler_derived("upscale"),
        describe=(f"MoESR {scale}x (dim {dim}, {groups} group{'s' * (groups > 1)} of {blocks} "
                  f"block{'s' * (blocks > 1)}, {kind if scale > 1 else 'conv'})"),
        build=lambda: MoESR(dim=dim, groups=groups, blocks=blocks, hidden=hidden, msg_hidden=msg_hidden,
                            upsampler=kind, scale=scale, mid=mid),
    )
