"""RGT: the Recursive Generalization Transformer upscaler (Chen et al. 2024), written as plain modules.

The authors released RGT (8 residual groups) and RGT-S (6 groups) for 2x, 3x and 4x (``RGT_x4.pth``,
``RGT_S_x2.pth`` ...: width 180, 6 blocks and 6 heads a group, feed-forward twice the width, 8 x 32
windows, ``c_ratio`` 0.5); ComfyUI and Forge read them (and models others trained in the same frame)
with spandrel. The module's tensor names are the files' own, so they load unchanged.

RGT shares DAT's frame (``upscaler_dat``; the same authors): a 3x3 conv to ``dim`` channels; with the
pixels as tokens, a LayerNorm (``before_RG.1``), residual groups (``layers.N``: blocks, a conv — one
3x3 or "3conv" — and the group input added), a final LayerNorm; a conv (``conv_after_body``) whose
output is added to the first conv's; then pixel-shuffle upsampling (a conv with LeakyReLU, a conv and
shuffle per factor of 2 or 3, a last conv; no shuffle at 1x). The picture is centred on SwinIR's RGB
mean. Blocks are pre-norm, with DAT's spatial-gate feed-forward (``mlp``), and add their input once
more scaled per channel by a learned ``gamma``. Their attention alternates:

- **local** (even blocks, ``L_SA`` in the files' code): DAT's window attention without its
  interaction maps. Half the channels attend within ``split`` = (height, width) windows, the other
  half within the transposed windows, each half with half the heads and a position bias from a small
  MLP (``attns.K.pos``); the queries, keys and values are padded with zeros on the right and bottom
  to a multiple of the larger window side (the padded keys take part in the softmax), and the same
  blocks as DAT's shift their windows by half a window (in even groups blocks 2, 6, 10 ..., in odd
  groups blocks 0, 4, 8 ...). A depthwise 3x3 conv of the values (``get_v``) is added to the result.
- **recursive generalization** (odd blocks, ``RG_SA``): the picture is summarised by one strided
  depthwise 4x4 conv (``reduction1``) applied ``t`` times, a depthwise 3x3 and a 1x1 conv to
  ``c_ratio`` x ``dim`` channels, a LayerNorm and GELU; every pixel's query (``q``, also ``c_ratio``
  x ``dim`` wide) then attends to the summary's keys (``k``) and values (``v``, back to ``dim``, plus a
  depthwise 3x3 conv of them, ``cpe``), scaled by (head width x ``c_ratio``) ** -0.5. ``t`` is
  the original's inference rule: floor(log4(side / 16)) for the longer side, at least 2 — so a
  picture up to 1023 pixels a side is summarised 16 times smaller.

The original cannot run a picture with a side shorter than 4^t (16 for any picture under 1024 pixels
a side; its summary would be empty): such sides are padded up to 4^t — by reflection as far as the
side allows, the edge repeated for the rest, as spandrel's model descriptor (what ComfyUI and Forge
call) pads sides under 16 — and the output cropped back; any larger picture runs as it is.

The files record the width and scale, each group's blocks and heads (the window halves' bias MLPs
give half the heads; an odd count in the original is read as the even one below it, as spandrel
reads it, since nothing else in a file shows it), the feed-forward and summary widths (``c_ratio``
is the summary width over ``dim``, as spandrel reads it), the residual convs and whether the linear
layers have biases. The window comes from the last row of a file's ``rpe_biases`` (its largest
offsets), as for DAT: spandrel guesses it from the buffers' sizes (taking the first side as the
shorter), which agrees wherever the guess finds a window of the right size and orientation. The
saved ``rpe_biases``, ``relative_position_index`` and ``attn_mask_0``/``_1`` buffers are derived, not
read.
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
from .upscaler_dat import DAT, GatedFeedForward, ResidualGroup, WindowPairAttention, shifted
from .upscaler_swin import pad_edges

if TYPE_CHECKING:
    from .upscaler import _Plan

ARCH_RGT = "RGT"

#: The smallest summary the recursive attention's rule allows: 4^2 times smaller than the picture.
_MIN_RECURSIONS = 2


def recursions(h: int, w: int) -> int:
    """How many times the recursive attention applies its strided conv to an (h, w) picture: the
    original's inference rule, max(floor(log4(h // 16)), floor(log4(w // 16)), 2) (a side under 16
    counts as 0). floor(log4(n)) is worked out on integers; the original's float logarithm gives
    the same for every side up to a million pixels."""

    def log4(n: int) -> int:
        return (n.bit_length() - 1) // 2 if n > 0 else 0

    return max(log4(h // 16), log4(w // 16), _MIN_RECURSIONS)


class LocalAttention(WindowPairAttention):
    """The even blocks' attention (``L_SA``): DAT's two window branches (one per channel half, the
    second with the transposed window), beside a depthwise 3x3 conv of the unpadded values."""

    def __init__(self, dim: int, heads: int, split: tuple[int, int], *, shift: bool, qkv_bias: bool,
                 pos_width: int):
        super().__init__(dim, heads, split, shift=shift, qkv_bias=qkv_bias, pos_width=pos_width)
        self.get_v = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, H, W, C) normalised tokens."""
        c = x.shape[-1]
        attended, qkv = self.windows(x)
        local = self.get_v(qkv[..., 2 * c:].permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj(attended + local)


class RecursiveAttention(nn.Module):
    """The odd blocks' attention (``RG_SA``): every pixel attends to a summary of the picture
    :func:`recursions` times 4x smaller per side, ``reduced`` channels wide for the queries and keys."""

    def __init__(self, dim: int, heads: int, reduced: int, *, qkv_bias: bool):
        super().__init__()
        self.heads, self.reduced = heads, reduced
        # the original's (head width x c_ratio) ** -0.5, c_ratio being the files' reduced / dim
        self.scale = ((dim // heads) * (reduced / dim)) ** -0.5
        self.reduction1 = nn.Conv2d(dim, dim, 4, 4, groups=dim)
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.conv = nn.Conv2d(dim, reduced, 1)
        self.norm_act = nn.Sequential(nn.LayerNorm(reduced), nn.GELU())
        self.q = nn.Linear(dim, reduced, bias=qkv_bias)
        self.k = nn.Linear(reduced, reduced, bias=qkv_bias)
        self.v = nn.Linear(reduced, dim, bias=qkv_bias)
        self.cpe = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, H, W, C) normalised tokens, H and W at least 4 ** :func:`recursions`."""
        b, h, w, c = x.shape
        heads, r = self.heads, self.reduced
        summary = x.permute(0, 3, 1, 2)
        for _ in range(recursions(h, w)):
            summary = self.reduction1(summary)
        sh, sw = summary.shape[-2:]
        summary = self.norm_act(self.conv(self.dwconv(summary)).flatten(2).transpose(1, 2))  # (B, N', r)
        q = self.q(x).view(b, h * w, heads, r // heads).transpose(1, 2)
        k = self.k(summary).view(b, sh * sw, heads, r // heads).transpose(1, 2)
        v = self.v(summary)  # (B, N', C)
        v = v + self.cpe(v.transpose(1, 2).reshape(b, c, sh, sw)).flatten(2).transpose(1, 2)
        v = v.view(b, sh * sw, heads, c // heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, heads, H*W, C / heads)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, c))


class RGTBlock(nn.Module):
    """Pre-norm attention and spatial-gate feed-forward, each added to its input, then the block's
    input once more, scaled per channel by ``gamma``."""

    def __init__(self, attn: nn.Module, dim: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = GatedFeedForward(dim, hidden)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + self.attn(self.norm1(x))
        y = y + self.mlp(self.norm2(y))
        return y + x * self.gamma


class RGT(DAT):
    """RGT for RGB pictures: DAT's frame with pixel-shuffle upsampling around groups of
    :class:`RGTBlock`. ``heads``: per group, the heads of each window branch (half the original's
    ``num_heads``; the recursive attention has twice as many); ``split``: the (height, width) window;
    ``hidden``: the feed-forward width; ``pos_width``: the position-bias MLP's width; ``reduced``: the
    recursive attention's query and summary width (``c_ratio`` x ``dim``); ``factors``: the
    shuffles (2 or 3 each; none at 1x)."""

    def __init__(self, *, dim: int, depths: list[int], heads: list[int], split: tuple[int, int], hidden: int,
                 pos_width: int, reduced: int, factors: list[int], num_feat: int = 64, three_conv: bool = False,
                 qkv_bias: bool = True):
        super().__init__(dim=dim, depths=[], spatial_heads=[], channel_heads=[], split=split, hidden=hidden,
                         pos_width=pos_width, upsampler="pixelshuffle", factors=factors, num_feat=num_feat,
                         three_conv=three_conv, qkv_bias=qkv_bias)
        groups = []
        for g, depth in enumerate(depths):
            blocks = []
            for i in range(depth):
                if i % 2 == 0:
                    attn: nn.Module = LocalAttention(dim, heads[g], split, shift=shifted(g, i), qkv_bias=qkv_bias,
                                                     pos_width=pos_width)
                else:
                    attn = RecursiveAttention(dim, 2 * heads[g], reduced, qkv_bias=qkv_bias)
                blocks.append(RGTBlock(attn, dim, hidden))
            groups.append(ResidualGroup(blocks, dim, three_conv))
        self.layers = nn.ModuleList(groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        least = 4 ** recursions(h, w)  # padding a shorter side up to it leaves the recursions as they are
        return super().forward(pad_edges(x, least, least))[..., : h * self.scale, : w * self.scale]


# --------------------------------------------------------------------------------------------- detection

#: Names only RGT's blocks have (DAT's, which share the frame, have neither).
_RGT_MARK = re.compile(r"layers\.\d+\.blocks\.\d+\.(?:gamma|attn\.reduction1\.weight)")
_RGT_BLOCK = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.")
#: Saved buffers RGT derives from its window.
_RGT_DERIVED = re.compile(r".*\.attns\.[01]\.(?:rpe_biases|relative_position_index)|.*\.attn_mask_[01]")
#: The largest window side RGT's files are read with (the released ones use 8 x 32; 64 bounds the work).
_RGT_MAX_SPLIT = 64


def is_rgt(sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether the names are RGT's: DAT's frame (``conv_first``, ``before_RG.1``) with blocks that
    carry a ``gamma`` or a recursive attention's ``reduction1``."""
    return "conv_first.weight" in sd and "before_RG.1.weight" in sd and any(_RGT_MARK.fullmatch(n) for n in sd)


def _rgt_split(sd: Mapping[str, torch.Tensor], source: str, tensor: Callable[[str, int], torch.Tensor]
               ) -> tuple[int, int]:
    """RGT's (height, width) window: one more than the largest offset, the last row of the first
    branch's ``rpe_biases`` ((2h - 1)(2w - 1) rows of (dy, dx)), checked against the size of its
    ``relative_position_index`` (h·w x h·w) where the file keeps it."""
    name = "layers.0.blocks.0.attn.attns.0.rpe_biases"
    offsets = tensor(name, 2)
    if (offsets.shape[0] < 1 or offsets.shape[1] != 2 or not offsets.is_floating_point()
            or not torch.isfinite(offsets[-1]).all()):
        raise ModelError(f"{source}: RGT {name} is {tuple(offsets.shape)} {offsets.dtype}; expected (rows, 2) "
                         "offsets")
    last = offsets[-1].float()
    split = (int(last[0]) + 1, int(last[1]) + 1)
    if (not torch.equal(last, last.round()) or not all(1 <= s <= _RGT_MAX_SPLIT for s in split)
            or offsets.shape[0] != (2 * split[0] - 1) * (2 * split[1] - 1) or max(split) % min(split)):
        raise ModelError(f"{source}: RGT {name} does not describe a window of 1 to {_RGT_MAX_SPLIT} pixels a side, "
                         "one side a multiple of the other")
    index_name = "layers.0.blocks.0.attn.attns.0.relative_position_index"
    index = sd.get(index_name)
    n = split[0] * split[1]
    if index is not None and tuple(index.shape) != (n, n):
        raise ModelError(f"{source}: RGT {index_name} is {tuple(index.shape)}; expected ({n}, {n}) for the "
                         f"{split[0]}x{split[1]} window its rpe_biases describe")
    return split


def rgt_plan(sd: dict[str, torch.Tensor], source: str) -> _Plan | None:
    """None when the tensors are not RGT's (:func:`is_rgt`); else its hyper-parameters, read as
    spandrel reads them: the width from the first conv; per group the depth (blocks under
    ``layers.N.blocks.M``) and heads (the first block's bias MLP gives each window half's); the
    window (:func:`_rgt_split`); the feed-forward and bias-MLP widths; the recursive attention's
    reduced width (the first such block's 1x1 conv, ``c_ratio`` x ``dim``); the residual convs, the
    upsampling (so the scale) and whether the linear layers have biases."""
    if not is_rgt(sd):
        return None
    from .upscaler import _Plan, _pixelshuffle_factors, _rgb_only, _tensor_getter, _three_conv

    tensor = _tensor_getter(sd, source, ARCH_RGT)
    dim, in_ch = tensor("conv_first.weight", 4).shape[:2]
    blocks: dict[int, set[int]] = {}
    for name in sd:
        if m := _RGT_BLOCK.match(name):
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise ModelError(f"{source}: RGT groups numbered {sorted(blocks)}; expected 0, 1, ... in a row")
    depths = [1 + max(blocks[g]) for g in range(len(blocks))]
    heads = [tensor(f"layers.{g}.blocks.0.attn.attns.0.pos.pos3.2.weight", 2).shape[0] for g in range(len(depths))]
    if dim % 2 or any(h < 1 or (dim // 2) % h for h in heads):
        raise ModelError(f"{source}: RGT of width {dim} with {heads} heads per window half; expected an even "
                         "width whose halves the heads divide")
    reduced = dim // 2  # c_ratio 0.5, the released models' (unused where no group has a second block)
    first = next((g for g, depth in enumerate(depths) if depth > 1), None)
    if first is not None:
        reduced = tensor(f"layers.{first}.blocks.1.attn.conv.weight", 4).shape[0]
        uneven = [2 * h for g, h in enumerate(heads) if depths[g] > 1 and reduced % (2 * h)]
        if reduced < 1 or uneven:
            raise ModelError(f"{source}: RGT recursive attention {reduced} channels wide for "
                             f"{uneven or [2 * h for h in heads]} heads; expected a width the heads divide")
    split = _rgt_split(sd, source, tensor)
    hidden = tensor("layers.0.blocks.0.mlp.fc1.weight", 2).shape[0]
    if hidden % 2:
        raise ModelError(f"{source}: RGT feed-forward {hidden} channels wide; expected an even width (its gate "
                         "takes half)")
    pos_width = tensor("layers.0.blocks.0.attn.attns.0.pos.pos_proj.weight", 2).shape[0]
    three_conv = _three_conv(sd, source, ARCH_RGT)
    num_feat = tensor("conv_before_upsample.0.weight", 4).shape[0]
    factors = _pixelshuffle_factors(sd, source, ARCH_RGT, num_feat, tensor)
    out_ch = tensor("conv_last.weight", 4).shape[0]
    _rgb_only(source, ARCH_RGT, in_ch, out_ch)
    scale = math.prod(factors)
    return _Plan(
        arch=ARCH_RGT, scale=scale, derived=_RGT_DERIVED.fullmatch,
        describe=(f"RGT {scale}x (dim {dim}, {len(depths)} groups, depths {depths}, heads {[2 * h for h in heads]}, "
                  f"window {split[0]}x{split[1]}, c_ratio {reduced / dim:g})"),
        build=lambda: RGT(dim=dim, depths=depths, heads=heads, split=split, hidden=hidden, pos_width=pos_width,
                          reduced=reduced, factors=factors, num_feat=num_feat, three_conv=three_conv,
                          qkv_bias="layers.0.blocks.0.attn.qkv.bias" in sd),
    )

