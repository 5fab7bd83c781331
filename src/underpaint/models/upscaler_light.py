"""The lightweight attention upscalers OmniSR and SAFMN, written as plain modules.

Both are small networks (a fraction of ESRGAN's weights) that OpenModelDB lists next to SPAN; ComfyUI
(``models/upscale_models``) and Forge read them through spandrel. The module's tensor names are the files'
own, so they load unchanged.

- **OmniSR** (Wang et al. 2023, "Omni Aggregation Networks for Lightweight Image Super-Resolution"): a 3x3
  conv, groups (``residual_layer.N``), a 3x3 conv plus the first conv's output, and a conv with pixel
  shuffle. A group runs its blocks and a 1x1 conv, adds its input, and weights the result by an enhanced
  spatial attention (``esa``: a 1x1 conv down to max(dim / 4, 16) channels, a strided 3x3 conv, a 7x7 max
  pool of stride 3, a 3x3 conv, bilinear back to full size, plus a 1x1 conv of the first, a 1x1 conv up and
  a sigmoid). A block (``layer``, thirteen slots) is an inverted-bottleneck conv with squeeze-excitation,
  then two rounds of: attention between the pixels of a window (first a window of neighbours, then a
  "grid" of pixels spread over the whole picture, one per window), a gated conv feed-forward, attention
  between the channels (within each window, then across the windows at each place in them), a second
  feed-forward; each with a norm before it and its input added after it. Slots 1, 3, 7 and 9 are the
  original's reshapes into and out of windows and hold no weights. The windows' attention carries a learned
  bias per relative position (``rel_pos_bias``) unless the model was trained without one; the window side
  is read from that table ((2w - 1)² rows), and is 8 (the original's default, and spandrel's assumption)
  when there is none. ``bias`` (``input.bias``) says whether the first and last convs, the upsampler and
  the groups' 1x1 convs have biases. Some files also carry the operation counts of a profiler
  (``total_ops``, ``total_params``): they are not weights and are left out.
- **SAFMN** (Sun et al. 2023, "Spatially-Adaptive Feature Modulation for Efficient Image
  Super-Resolution"): a 3x3 conv, blocks, plus that conv's output, and a conv with pixel shuffle. A block:
  a channel norm and a spatially-adaptive feature modulation (``safm``: the channels in four parts, the
  first through a depthwise 3x3 conv at full size, the others max-pooled to 1/2, 1/4 and 1/8 of the size,
  through their depthwise conv and nearest-upsampled back; a 1x1 conv over the four, GELU, times the
  block's input to it), plus its input; then a norm and a conv feed-forward (``ccm``: a 3x3 conv to the
  hidden width, GELU, a 1x1 conv back), plus its input.

Sizes. OmniSR's attention needs the picture in whole windows: it is padded with zeros on the right and
bottom to a multiple of the window, as the original does. Its spatial attention needs at least 15 pixels on
each side, and SAFMN's pooling divides the size by 8, so ComfyUI and Forge (through spandrel) first pad
pictures to at least 16 pixels on each side (OmniSR) or to a multiple of 8 (SAFMN), by reflection as far as
the picture allows and by repeating the edge beyond that; the modules do the same, so they take any size and
give what those programs give. The output is cropped back to the picture's size times the scale.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from .upscaler_conv import ChannelLayerNorm
from .upscaler_swin import pad_edges, relative_position_index

if TYPE_CHECKING:
    from .upscaler import _Plan

ARCH_OMNISR = "OmniSR"
ARCH_SAFMN = "SAFMN"

#: The smallest side OmniSR is run at (its spatial attention's strided conv and 7x7 pool need 15 pixels).
OMNISR_MINIMUM = 16
#: OmniSR's window side where the file has no position bias table to read it from.
OMNISR_DEFAULT_WINDOW = 8
#: OmniSR's heads, in both the pixel and the channel attention (dim / 4 channels each).
OMNISR_HEADS = 4
#: The multiple SAFMN's input is padded to (its coarsest pooling divides the size by 8).
SAFMN_MULTIPLE = 8
#: SAFMN's parts of the channels, each pooled to a different size.
SAFMN_LEVELS = 4

#: Names of the operation counts a profiler (thop) leaves in some OmniSR files.
_PROFILER_NAMES = ("total_ops", "total_params")


# --------------------------------------------------------------------------------------------- OmniSR


class _SqueezeExcitation(nn.Module):
    """The features times a per-channel gate: their mean over the picture, a linear map to a quarter of
    the channels, SiLU, a linear map back, sigmoid (``gate.1`` and ``gate.3``, no biases; slot 0 is the
    original's mean and slot 5 its reshape)."""

    def __init__(self, dim: int):
        super().__init__()
        hidden = int(dim * 0.25)
        self.gate = nn.Sequential(nn.Identity(), nn.Linear(dim, hidden, bias=False), nn.SiLU(),
                                  nn.Linear(hidden, dim, bias=False), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x.mean(dim=(2, 3)))[:, :, None, None]


class _MBConv(nn.Module):
    """Slot 0 of a block: a 1x1 conv, GELU, a depthwise 3x3 conv, GELU, squeeze-excitation, a 1x1 conv
    (all with biases, whatever the model's ``bias``), plus the input."""

    def __init__(self, dim: int):
        super().__init__()
        self.fn = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.GELU(), nn.Conv2d(dim, dim, 3, 1, 1, groups=dim),
                                nn.GELU(), _SqueezeExcitation(dim), nn.Conv2d(dim, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


def _to_windows(x: torch.Tensor, window: int, grid: bool) -> torch.Tensor:
    """(B, C, H, W) → (B · H/w · W/w, w², C): the pixels of each window of neighbours, or (``grid``) of each
    "grid window", the w x w pixels H/w and W/w apart that share a place in their windows of neighbours."""
    b, c, h, w = x.shape
    rows, cols = h // window, w // window
    if grid:
        x = x.view(b, c, window, rows, window, cols).permute(0, 3, 5, 2, 4, 1)
    else:
        x = x.view(b, c, rows, window, cols, window).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b * rows * cols, window * window, c)


def _from_windows(t: torch.Tensor, window: int, grid: bool, shape: torch.Size) -> torch.Tensor:
    """The inverse of :func:`_to_windows` for a picture of ``shape`` (B, C, H, W)."""
    b, c, h, w = shape
    rows, cols = h // window, w // window
    t = t.view(b, rows, cols, window, window, c)
    if grid:
        return t.permute(0, 5, 3, 1, 4, 2).reshape(b, c, h, w)
    return t.permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


class _PixelAttention(nn.Module):
    """``fn`` of slots 2 and 8: multi-head self-attention among the w² pixels of a window (no biases on the
    projections ``to_qkv`` and ``to_out.0``), plus, with ``pe``, a learned bias per relative position and
    head (``rel_pos_bias``, an embedding of (2w - 1)² rows)."""

    def __init__(self, dim: int, window: int, pe: bool):
        super().__init__()
        self.heads = OMNISR_HEADS
        self.scale = (dim // self.heads) ** -0.5
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim, bias=False))
        self.rel_pos_bias = nn.Embedding((2 * window - 1) ** 2, self.heads) if pe else None
        self.register_buffer("index", relative_position_index(window), persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (windows, w², C) → the same shape."""
        n, tokens, c = t.shape
        q, k, v = (part.view(n, tokens, self.heads, -1).transpose(1, 2) for part in self.to_qkv(t).chunk(3, dim=-1))
        sim = (q * self.scale) @ k.transpose(-2, -1)
        if self.rel_pos_bias is not None:
            sim = sim + self.rel_pos_bias.weight[self.index].permute(2, 0, 1)
        out = sim.softmax(dim=-1) @ v
        return self.to_out(out.transpose(1, 2).reshape(n, tokens, c))


class _WindowResidual(nn.Module):
    """Slots 2 (windows of neighbours) and 8 (``grid`` windows): a LayerNorm over the channels (``norm``)
    and :class:`_PixelAttention` (``fn``) within each window, plus the input."""

    def __init__(self, dim: int, window: int, pe: bool, grid: bool):
        super().__init__()
        self.window, self.grid = window, grid
        self.norm = nn.LayerNorm(dim)
        self.fn = _PixelAttention(dim, window, pe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = _to_windows(x, self.window, self.grid)
        return _from_windows(t + self.fn(self.norm(t)), self.window, self.grid, x.shape)


class GatedFeedForward(nn.Module):
    """Slots 4, 6, 10 and 12 (``hidden`` the width; CRAFT's fusion feed-forward too): a 1x1 conv to twice
    ``hidden``, a depthwise 3x3 conv, GELU of the first half times the second, a 1x1 conv back (no biases)."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = dim if hidden is None else hidden
        self.project_in = nn.Conv2d(dim, 2 * hidden, 1, bias=False)
        self.dwconv = nn.Conv2d(2 * hidden, 2 * hidden, 3, 1, 1, groups=2 * hidden, bias=False)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(gate) * value)


class _ChannelAttention(nn.Module):
    """Slots 5 and 11: attention between the channels of each head (``dim`` / 4 channels), computed
    separately for each window of neighbours (its w² pixels as the features), or (``grid``) for each place
    in the windows (the pixels at that place in every window). Queries and keys are L2-normalised over
    those pixels, their products scaled by a learned ``temperature`` per head. The queries, keys and values
    come from a 1x1 conv and a depthwise 3x3 conv (``qkv``, ``qkv_dwconv``); ``project_out`` is a 1x1 conv;
    no biases."""

    def __init__(self, dim: int, window: int, grid: bool):
        super().__init__()
        self.heads, self.window, self.grid = OMNISR_HEADS, window, grid
        self.temperature = nn.Parameter(torch.ones(self.heads, 1, 1))
        self.qkv = nn.Conv2d(dim, 3 * dim, 1, bias=False)
        self.qkv_dwconv = nn.Conv2d(3 * dim, 3 * dim, 3, 1, 1, groups=3 * dim, bias=False)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=False)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, groups, heads, C / heads, pixels of a group)."""
        b, c, h, w = x.shape
        s, rows, cols = self.window, h // self.window, w // self.window
        x = x.view(b, self.heads, c // self.heads, rows, s, cols, s)
        if self.grid:  # a group per place in the window, its pixels in every window
            return x.permute(0, 4, 6, 1, 2, 3, 5).reshape(b, s * s, self.heads, c // self.heads, rows * cols)
        return x.permute(0, 3, 5, 1, 2, 4, 6).reshape(b, rows * cols, self.heads, c // self.heads, s * s)

    def _merge(self, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        b, c, h, w = shape
        s, rows, cols = self.window, h // self.window, w // self.window
        if self.grid:
            t = t.view(b, s, s, self.heads, c // self.heads, rows, cols).permute(0, 3, 4, 5, 1, 6, 2)
        else:
            t = t.view(b, rows, cols, self.heads, c // self.heads, s, s).permute(0, 3, 4, 1, 5, 2, 6)
        return t.reshape(b, c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (self._split(part) for part in self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1)
        return self.project_out(self._merge(attn @ v, x.shape))


class _ConvResidual(nn.Module):
    """A channel LayerNorm (``norm``, eps 1e-6), ``fn``, plus the input."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = ChannelLayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x)) + x


class _OSABlock(nn.Module):
    """OmniSR's block: the thirteen slots of ``layer`` run in turn (see the module's description)."""

    def __init__(self, dim: int, window: int, pe: bool):
        super().__init__()
        self.layer = nn.Sequential(
            _MBConv(dim),
            nn.Identity(),  # into windows of neighbours
            _WindowResidual(dim, window, pe, grid=False),
            nn.Identity(),  # back
            _ConvResidual(dim, GatedFeedForward(dim)),
            _ConvResidual(dim, _ChannelAttention(dim, window, grid=False)),
            _ConvResidual(dim, GatedFeedForward(dim)),
            nn.Identity(),  # into grid windows
            _WindowResidual(dim, window, pe, grid=True),
            nn.Identity(),  # back
            _ConvResidual(dim, GatedFeedForward(dim)),
            _ConvResidual(dim, _ChannelAttention(dim, window, grid=True)),
            _ConvResidual(dim, GatedFeedForward(dim)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class _SpatialAttention(nn.Module):
    """``esa``: the features times sigmoid of a coarse attention map (see the module's description); every
    conv has a bias."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, channels, 1)
        self.conv_f = nn.Conv2d(channels, channels, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, 2, 0)
        self.conv3 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.conv4 = nn.Conv2d(channels, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduced = self.conv1(x)
        coarse = self.conv3(F.max_pool2d(self.conv2(reduced), kernel_size=7, stride=3))
        coarse = F.interpolate(coarse, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return x * torch.sigmoid(self.conv4(coarse + self.conv_f(reduced)))


class _OSAG(nn.Module):
    """An OmniSR group: ``blocks`` blocks and a 1x1 conv (``residual_layer``), plus the input, through the
    spatial attention (``esa``)."""

    def __init__(self, dim: int, blocks: int, window: int, pe: bool, bias: bool):
        super().__init__()
        self.residual_layer = nn.Sequential(*(_OSABlock(dim, window, pe) for _ in range(blocks)),
                                            nn.Conv2d(dim, dim, 1, bias=bias))
        self.esa = _SpatialAttention(max(dim // 4, 16), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.esa(self.residual_layer(x) + x)


class OmniSR(nn.Module):
    """OmniSR: ``input`` (3x3 conv), ``groups`` groups of ``blocks`` blocks, ``output`` (3x3 conv) plus the
    first conv's output, ``up`` (a 3x3 conv to 3·scale² channels and a pixel shuffle). Pictures are padded
    to at least 16 pixels a side (reflection, then the edge repeated), then with zeros to whole windows; the
    output is cropped back."""

    def __init__(self, *, dim: int, groups: int, blocks: int, window: int, pe: bool, bias: bool, scale: int):
        super().__init__()
        self.scale, self.window = scale, window
        self.input = nn.Conv2d(3, dim, 3, 1, 1, bias=bias)
        self.residual_layer = nn.Sequential(*(_OSAG(dim, blocks, window, pe, bias) for _ in range(groups)))
        self.output = nn.Conv2d(dim, dim, 3, 1, 1, bias=bias)
        self.up = nn.Sequential(nn.Conv2d(dim, 3 * scale * scale, 3, 1, 1, bias=bias), nn.PixelShuffle(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = pad_edges(x, max(h, OMNISR_MINIMUM), max(w, OMNISR_MINIMUM))
        x = F.pad(x, (0, -x.shape[-1] % self.window, 0, -x.shape[-2] % self.window))
        feat = self.input(x)
        out = self.up(self.output(self.residual_layer(feat)) + feat)
        return out[..., : h * self.scale, : w * self.scale]


# --------------------------------------------------------------------------------------------- SAFMN


class _SAFM(nn.Module):
    """``safm``: the channels in four parts; the first through its depthwise 3x3 conv (``mfr.0``), part i
    max-pooled to 1/2^i of the size (rounded down), through ``mfr.i`` and nearest-upsampled back; a 1x1 conv
    (``aggr``) over the four, GELU, times the input."""

    def __init__(self, dim: int):
        super().__init__()
        part = dim // SAFMN_LEVELS
        self.mfr = nn.ModuleList(nn.Conv2d(part, part, 3, 1, 1, groups=part) for _ in range(SAFMN_LEVELS))
        self.aggr = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        levels = []
        for i, (part, conv) in enumerate(zip(x.chunk(SAFMN_LEVELS, dim=1), self.mfr)):
            if i == 0:
                levels.append(conv(part))
            else:
                pooled = F.adaptive_max_pool2d(part, (h // 2 ** i, w // 2 ** i))
                levels.append(F.interpolate(conv(pooled), size=(h, w), mode="nearest"))
        return F.gelu(self.aggr(torch.cat(levels, dim=1))) * x


class _CCM(nn.Module):
    """``ccm``: a 3x3 conv to ``hidden`` channels, GELU, a 1x1 conv back."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.ccm = nn.Sequential(nn.Conv2d(dim, hidden, 3, 1, 1), nn.GELU(), nn.Conv2d(hidden, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ccm(x)


class _SAFMBlock(nn.Module):
    """SAFMN's block: norm, modulation, plus the input; norm, feed-forward, plus the input (channel
    LayerNorms ``norm1``/``norm2``, eps 1e-6)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm1 = ChannelLayerNorm(dim)
        self.norm2 = ChannelLayerNorm(dim)
        self.safm = _SAFM(dim)
        self.ccm = _CCM(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.safm(self.norm1(x)) + x
        return self.ccm(self.norm2(x)) + x


class SAFMN(nn.Module):
    """SAFMN: ``to_feat`` (3x3 conv), ``blocks`` blocks (``feats``) plus the first conv's output, ``to_img``
    (a 3x3 conv to 3·scale² channels and a pixel shuffle). Pictures are padded to a multiple of 8
    (reflection, then the edge repeated) and the output cropped back."""

    def __init__(self, *, dim: int, blocks: int, hidden: int, scale: int):
        super().__init__()
        self.scale = scale
        self.to_feat = nn.Conv2d(3, dim, 3, 1, 1)
        self.feats = nn.Sequential(*(_SAFMBlock(dim, hidden) for _ in range(blocks)))
        self.to_img = nn.Sequential(nn.Conv2d(dim, 3 * scale * scale, 3, 1, 1), nn.PixelShuffle(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = pad_edges(x, -(-h // SAFMN_MULTIPLE) * SAFMN_MULTIPLE, -(-w // SAFMN_MULTIPLE) * SAFMN_MULTIPLE)
        feat = self.to_feat(x)
        return self.to_img(self.feats(feat) + feat)[..., : h * self.scale, : w * self.scale]


# --------------------------------------------------------------------------------------------- plans


def _entries(sd: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    """The indices N of the names ``prefix.N.…``, sorted."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for n in sd if (m := pattern.match(n))})


def _in_a_row(source: str, arch: str, what: str, found: list[int]) -> int:
    """How many of ``what`` there are, numbered 0, 1, ... in a row; :class:`ModelError` otherwise."""
    if not found or found != list(range(len(found))):
        raise ModelError(f"{source}: {arch} {what} numbered {found}; expected 0, 1, ... in a row: "
                         "incomplete or damaged file")
    return len(found)


def _shuffle_scale(source: str, arch: str, name: str, shuffled: int) -> int:
    """The scale of a conv + pixel shuffle to RGB whose conv (``name``) gives ``shuffled`` channels."""
    from .upscaler import _rgb_only

    for out_ch in (3, 4, 1):  # the output channels a pixel shuffle of these sizes is read as
        scale = math.isqrt(shuffled // out_ch)
        if shuffled % out_ch == 0 and scale >= 1 and scale * scale * out_ch == shuffled:
            _rgb_only(source, arch, 3, out_ch)
            return scale
    raise ModelError(f"{source}: {arch} upsampling conv {name} gives {shuffled} channels; expected 3 x scale²")


def omnisr_plan(sd: dict[str, torch.Tensor], source: str) -> _Plan | None:
    """OmniSR's hyper-parameters from its tensors (None when ``sd`` is not OmniSR): width and biases from
    ``input``, groups and blocks from the entries of ``residual_layer`` (each group's last entry is its 1x1
    conv), the window from the first position bias table (8 without one), the scale from ``up.0``."""
    from .upscaler import _Plan, _rgb_only, _tensor_getter

    if "input.weight" not in sd or "residual_layer.0.residual_layer.0.layer.0.fn.0.weight" not in sd:
        return None
    tensor = _tensor_getter(sd, source, ARCH_OMNISR)
    dim, in_ch = tensor("input.weight", 4).shape[:2]
    _rgb_only(source, ARCH_OMNISR, in_ch, 3)
    scale = _shuffle_scale(source, ARCH_OMNISR, "up.0", tensor("up.0.weight", 4).shape[0])
    if dim % OMNISR_HEADS:
        raise ModelError(f"{source}: OmniSR of width {dim}; expected a multiple of its {OMNISR_HEADS} attention heads")
    groups = _in_a_row(source, ARCH_OMNISR, "groups (residual_layer.N)", _entries(sd, "residual_layer"))
    entries = _in_a_row(source, ARCH_OMNISR, "blocks (residual_layer.0.residual_layer.N)",
                        _entries(sd, "residual_layer.0.residual_layer"))
    blocks = entries - 1  # the last entry is the group's 1x1 conv
    if blocks < 1:
        raise ModelError(f"{source}: OmniSR group without blocks: incomplete or damaged file")
    table = sd.get("residual_layer.0.residual_layer.0.layer.2.fn.rel_pos_bias.weight")
    pe = table is not None
    window = OMNISR_DEFAULT_WINDOW
    if pe:
        table = tensor("residual_layer.0.residual_layer.0.layer.2.fn.rel_pos_bias.weight", 2)
        side = math.isqrt(table.shape[0])
        if side * side != table.shape[0] or side % 2 == 0:
            raise ModelError(f"{source}: OmniSR position bias table with {table.shape[0]} rows; "
                             "expected (2 x window - 1)²")
        window = (side + 1) // 2
    bias = "input.bias" in sd
    extras = ("" if pe else ", no position bias") + ("" if bias else ", no biases")
    return _Plan(
        arch=ARCH_OMNISR, scale=scale, derived=lambda name: name.rsplit(".", 1)[-1] in _PROFILER_NAMES,
        describe=(f"OmniSR {scale}x (dim {dim}, {groups} group{'s' * (groups > 1)} of {blocks} "
                  f"block{'s' * (blocks > 1)}, window {window}{extras})"),
        build=lambda: OmniSR(dim=dim, groups=groups, blocks=blocks, window=window, pe=pe, bias=bias, scale=scale),
    )


def safmn_plan(sd: dict[str, torch.Tensor], source: str) -> _Plan | None:
    """SAFMN's hyper-parameters from its tensors (None when ``sd`` is not SAFMN): width from ``to_feat``,
    blocks from the entries of ``feats``, the feed-forward's width from the first block's ``ccm``, the scale
    from ``to_img.0``. Modulations with other than four parts are refused."""
    from .upscaler import _Plan, _rgb_only, _tensor_getter

    if "to_feat.weight" not in sd or "feats.0.safm.aggr.weight" not in sd:
        return None
    tensor = _tensor_getter(sd, source, ARCH_SAFMN)
    dim, in_ch = tensor("to_feat.weight", 4).shape[:2]
    _rgb_only(source, ARCH_SAFMN, in_ch, 3)
    scale = _shuffle_scale(source, ARCH_SAFMN, "to_img.0", tensor("to_img.0.weight", 4).shape[0])
    blocks = _in_a_row(source, ARCH_SAFMN, "blocks (feats.N)", _entries(sd, "feats"))
    levels = len(_entries(sd, "feats.0.safm.mfr"))
    if levels != SAFMN_LEVELS:
        raise ModelError(f"{source}: SAFMN modulation in {levels} parts (feats.0.safm.mfr) is not supported; "
                         f"expected {SAFMN_LEVELS}")
    if dim % SAFMN_LEVELS:
        raise ModelError(f"{source}: SAFMN of width {dim}; expected a multiple of its {SAFMN_LEVELS} parts")
    hidden = tensor("feats.0.ccm.ccm.0.weight", 4).shape[0]
    return _Plan(
        arch=ARCH_SAFMN, scale=scale,
        describe=f"SAFMN {scale}x (dim {dim}, {blocks} block{'s' * (blocks > 1)}, feed-forward {hidden})",
        build=lambda: SAFMN(dim=dim, blocks=blocks, hidden=hidden, scale=scale),
    )
