"""ATD and DRCT: two transformer upscalers in SwinIR's frame, written as plain modules.

ComfyUI (``models/upscale_models``) and Forge read both through spandrel; the module's tensor names are
the files' own, so they load unchanged. Both keep SwinIR's frame (:class:`~.upscaler_swin.SwinIR`): a 3x3
conv to ``embed_dim`` channels, with the pixels as tokens a LayerNorm (``patch_embed.norm``), residual
groups (``layers.N``), a final LayerNorm, a conv after the body plus the first conv's output, then
SwinIR's upsamplers; the picture is centred on SwinIR's RGB mean on the way in and back on the way out.

- **ATD** (Zhang et al. 2024, "Transcending the Limit of Local Window: Advanced Super-Resolution
  Transformer with Adaptive Token Dictionary"; the authors' ``ATD_SRx2/3/4`` and ``ATD_light`` files,
  community models such as 4xNomos2_hq_atd). A group (``layers.N``) runs its layers
  (``residual_group.layers.M``) and a conv (one 3x3, or "3conv"), plus its input; it holds a token
  dictionary (``residual_group.td``: ``tokens`` learned vectors of the width) that its layers refine in
  turn. A layer normalises its input (``norm1``) and projects it once to queries, keys and values
  (``wqkv``) for two of its three attentions, whose outputs are all added to the input:

  - window attention (``attn_win``): Swin's, over windows of ``window`` x ``window`` tokens with a
    learned bias per relative position and head, every second layer's windows shifted by half a window
    (with the -100 mask between regions the cyclic shift joined);
  - token-dictionary attention (``attn_atd``): each token attends to the dictionary, queries and keys
    reduced to a few channels (``wq``, ``wk``) and L2-normalised, their products times
    1 + clamp(``scale``, 0, 1) · log(tokens) per dictionary entry; the values are the entries (``wv``);
  - category attention (``attn_aca``): each token takes the category of the dictionary entry it attends
    to most; the tokens, sorted by category, are cut into groups of ``category`` tokens (the last group
    filled up with the sort's last tokens in reverse order) and attend within their group, per head,
    their products (neither normalised nor scaled by the head width) times exp(min(``logit_scale``,
    log 100)); the projection ``proj`` follows. The order within a category is torch.sort's (the
    original asks for an unstable sort), so that the groups are those of the original on each device.

  Then a LayerNorm (``norm2``) and a feed-forward (``convffn``: linear, GELU, plus a depthwise conv with
  GELU of that, linear). Every layer but a group's last refines the dictionary: each entry becomes
  sigmoid(``sigma``) of itself plus the rest of the tokens weighted by softmax over the picture of the
  instance-normalised (``norm3``) attention map. The category size is not in the files: 256, or 128 for
  the light models (one-step pixel shuffle, width 48), what the released models were trained with and
  spandrel's rule. Files carrying ``no_norm`` are run without the mean shift. Pictures are padded on
  the right and bottom as ComfyUI and Forge run them: to at least 8 pixels a side (reflection, the edge
  repeated beyond it), then to a multiple of the window with their mirror image (the edge row kept), as
  the original does; the output is cropped back. The saved ``relative_position_index_SA`` is derived.
- **DRCT** (Hsu et al. 2024, "DRCT: Saving Image Super-resolution away from Information Bottleneck"; the
  authors' ``DRCT_SRx4``/``DRCT-L_X4`` and community models such as 4xNomos2_hq_drct-l). A group
  (``layers.N``, "RDG") is a dense block of five Swin blocks (``swin1`` ... ``swin5``, SwinIR's pre-norm
  window attention and MLP): block k sees the group's input and the outputs of the blocks before it,
  concatenated (``dim`` + (k - 1) · ``gc`` channels), and a 1x1 conv (``adjustK``) with LeakyReLU 0.2
  makes its ``gc`` new channels; the fifth conv maps back to ``dim`` and its output, times 0.2, is added
  to the group's input. Each block's heads and MLP width are read from its own tensors (the original
  lowers the heads of the wider blocks until they divide the width, and halves the last two MLPs).
  Blocks 2 and 4 shift their windows by half a window, unless the model was trained on patches no
  larger than the window (its file then keeps position indexes but no ``attn_mask``: the original
  turns the shift off there). The conv after the body is one 3x3 or none; pixel-shuffle upsampling
  only. Pictures are padded on the right and bottom to a multiple of 16 (ComfyUI's and Forge's
  requirement for DRCT) and of the window, by reflection (the edge repeated where a side is too short),
  and the output cropped back. The saved ``relative_position_index`` and ``attn_mask`` buffers are
  derived.
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
from .upscaler_swin import SwinBlock, SwinIR, WindowAttention, from_windows, pad_edges, residual_conv, to_windows

if TYPE_CHECKING:
    from .upscaler import _Plan

ARCH_ATD = "ATD"
ARCH_DRCT = "DRCT"

#: The smallest side ATD is run at (spandrel's requirement, so ComfyUI's and Forge's).
ATD_MINIMUM = 8
#: The tokens per category group of ATD's models, and of its light models (not in the files).
ATD_CATEGORY = 256
ATD_LIGHT_CATEGORY = 128
#: The width that, with one-step pixel shuffle, marks ATD's light models.
ATD_LIGHT_DIM = 48
#: The multiple DRCT's input is padded to (besides the window's), as ComfyUI and Forge pad it.
DRCT_MULTIPLE = 16
#: The Swin blocks in each of DRCT's dense groups.
DRCT_BLOCKS = 5
#: DRCT's weight on a group's output before it is added to the group's input.
DRCT_RESIDUAL_SCALE = 0.2
#: The largest logit scale of ATD's category attention (exp of it is at most 100).
_MAX_LOGIT = math.log(100.0)


def mirror_pad(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad (N, C, H, W) on the bottom, then the right, to a multiple of ``multiple`` by appending the
    picture's mirror image (its edge row or column repeated first); again, mirrored back, where one
    image is not enough (spandrel's ATD stops after one)."""
    for dim in (-2, -1):
        side = x.shape[dim]
        target = -(-side // multiple) * multiple
        while x.shape[dim] < target:
            x = torch.cat((x, x.flip(dim)), dim=dim)
        x = x.narrow(dim, 0, target)
    return x


# --------------------------------------------------------------------------------------------- ATD


class ProjectedWindowAttention(WindowAttention):
    """Swin's window attention over queries, keys and values projected outside it (an ATD layer's
    ``wqkv``, which its category attention shares): the bias table and output projection only."""

    def __init__(self, dim: int, window: int, heads: int):
        super().__init__(dim, window, heads)
        del self.qkv

    def forward(self, qkv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``qkv`` (B * windows, N, 3C); ``mask`` (windows, N, N) or None."""
        bw, n, c3 = qkv.shape
        c = c3 // 3
        q, k, v = qkv.reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.position_bias().unsqueeze(0)  # (1, heads, N, N)
        if mask is not None:
            windows = mask.shape[0]
            bias = (bias + mask.unsqueeze(1)).repeat(bw // windows, 1, 1, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class TokenDictionaryAttention(nn.Module):
    """``attn_atd``: each token attends to the dictionary's entries (cosine similarity of reduced
    queries and keys, sharpened per entry by ``scale``)."""

    def __init__(self, dim: int, tokens: int, reduced: int, *, qkv_bias: bool):
        super().__init__()
        self.wq = nn.Linear(dim, reduced, bias=qkv_bias)
        self.wk = nn.Linear(dim, reduced, bias=qkv_bias)
        self.wv = nn.Linear(dim, dim, bias=qkv_bias)
        self.scale = nn.Parameter(torch.full((tokens,), 0.5))

    def forward(self, x: torch.Tensor, td: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (B, N, C) normalised tokens, ``td`` (B, M, C) the dictionary: the attended (B, N, C)
        and the attention map (B, N, M)."""
        sim = F.normalize(self.wq(x), dim=-1) @ F.normalize(self.wk(td), dim=-1).transpose(-2, -1)
        sim = (sim * (1 + self.scale.clamp(0, 1) * math.log(self.scale.shape[0]))).softmax(dim=-1)
        return sim @ self.wv(td), sim


class CategoryAttention(nn.Module):
    """``attn_aca``: attention within groups of ``category`` tokens of the same or neighbouring
    dictionary categories (see the module's description)."""

    def __init__(self, dim: int, heads: int, category: int, *, qkv_bias: bool):
        super().__init__()
        self.heads, self.category = heads, category
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(1, 1)))
        self.proj = nn.Linear(dim, dim, bias=qkv_bias)

    def forward(self, qkv: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
        """``qkv`` (B, N, 3C); ``sim`` (B, N, M) the dictionary attention map."""
        b, n, c3 = qkv.shape
        c, heads = c3 // 3, self.heads
        size = min(n, self.category)
        groups = -(-n // size)
        pad = groups * size - n
        order = torch.sort(sim.argmax(dim=-1), dim=-1, stable=False).indices  # (B, N)
        qkv = qkv.gather(1, order.unsqueeze(-1).expand(b, n, c3))
        qkv = torch.cat((qkv, qkv[:, n - pad:].flip(1)), dim=1)
        # (3, B * groups, heads, size, C / heads)
        q, k, v = qkv.view(b * groups, size, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q = q * self.logit_scale.clamp(max=_MAX_LOGIT).exp()
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        out = out.transpose(1, 2).reshape(b, groups * size, c)[:, :n]
        out = torch.empty_like(out).scatter_(1, order.unsqueeze(-1).expand(b, n, c), out)
        return self.proj(out)


class _DepthwiseConv(nn.Module):
    """``dwconv``: a depthwise conv (``depthwise_conv.0``) and GELU."""

    def __init__(self, hidden: int, kernel: int):
        super().__init__()
        self.depthwise_conv = nn.Sequential(nn.Conv2d(hidden, hidden, kernel, 1, (kernel - 1) // 2, groups=hidden),
                                            nn.GELU())


class ConvFFN(nn.Module):
    """``convffn``: linear to ``hidden``, GELU, plus the depthwise conv of that, linear back."""

    def __init__(self, dim: int, hidden: int, kernel: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = _DepthwiseConv(hidden, kernel)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, H, W, C)."""
        y = F.gelu(self.fc1(x))
        y = y + self.dwconv.depthwise_conv(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.fc2(y)


class ATDLayer(nn.Module):
    """One layer of an ATD group: the three attentions on one normalised input, the feed-forward, and
    (``last`` excepted) the refined dictionary."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, *, category: int, tokens: int,
                 reduced: int, kernel: int, hidden: int, last: bool, qkv_bias: bool):
        super().__init__()
        self.window, self.shift, self.last = window, shift, last
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        if not last:
            self.norm3 = nn.InstanceNorm1d(tokens, affine=True)
            self.sigma = nn.Parameter(torch.zeros(tokens, 1))
        self.wqkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_win = ProjectedWindowAttention(dim, window, heads)
        self.attn_atd = TokenDictionaryAttention(dim, tokens, reduced, qkv_bias=qkv_bias)
        self.attn_aca = CategoryAttention(dim, heads, category, qkv_bias=qkv_bias)
        self.convffn = ConvFFN(dim, hidden, kernel)

    def windowed(self, qkv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Window attention over ``qkv`` (B, H, W, 3C), shifted and back if this layer shifts: (B, H, W, C)."""
        _, h, w, _ = qkv.shape
        if self.shift:
            qkv = torch.roll(qkv, (-self.shift, -self.shift), dims=(1, 2))
        y = from_windows(self.attn_win(to_windows(qkv, self.window), mask if self.shift else None), self.window, h, w)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), dims=(1, 2))
        return y

    def forward(self, x: torch.Tensor, td: torch.Tensor, mask: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (B, H, W, C), H and W multiples of the window; ``td`` (B, M, C): both updated."""
        b, h, w, c = x.shape
        y = self.norm1(x).view(b, h * w, c)
        qkv = self.wqkv(y)
        by_dictionary, sim = self.attn_atd(y, td)
        by_category = self.attn_aca(qkv, sim)
        x = (x + self.windowed(qkv.view(b, h, w, 3 * c), mask) + by_dictionary.view(b, h, w, c)
             + by_category.view(b, h, w, c))
        x = x + self.convffn(self.norm2(x))
        if not self.last:
            weights = self.norm3(sim.transpose(1, 2)).softmax(dim=-1)  # (B, M, N)
            keep = torch.sigmoid(self.sigma)
            td = keep * td + (1 - keep) * (weights @ x.view(b, h * w, c))
        return x, td


class _DictionaryLayers(nn.Module):
    """An ATD group's layers and token dictionary, under the names the files use (``residual_group``)."""

    def __init__(self, layers: list[ATDLayer], dim: int, tokens: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.td = nn.Parameter(torch.zeros(tokens, dim))


class ATDB(nn.Module):
    """An ATD group: its layers (every second one shifted, the dictionary carried through), a conv (one
    3x3 or "3conv"), plus the group's input."""

    def __init__(self, dim: int, depth: int, heads: int, window: int, *, category: int, tokens: int, reduced: int,
                 kernel: int, hidden: int, three_conv: bool, qkv_bias: bool):
        super().__init__()
        layers = [ATDLayer(dim, heads, window, window // 2 if i % 2 else 0, category=category, tokens=tokens,
                           reduced=reduced, kernel=kernel, hidden=hidden, last=i == depth - 1, qkv_bias=qkv_bias)
                  for i in range(depth)]
        self.residual_group = _DictionaryLayers(layers, dim, tokens)
        self.conv = residual_conv(dim, three_conv)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``x`` (B, H, W, C) tokens."""
        y = x
        td = self.residual_group.td.expand(x.shape[0], -1, -1)
        for layer in self.residual_group.layers:
            y, td = layer(y, td, mask)
        return self.conv(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) + x


class ATD(SwinIR):
    """ATD for RGB pictures: SwinIR's frame and upsamplers ("pixelshuffle", "pixelshuffledirect",
    "nearest+conv" or "" for 1x) around ATD groups. ``category``: tokens per category group; ``tokens``:
    dictionary entries; ``reduced``: the dictionary attention's query and key width; ``kernel``: the
    feed-forward's depthwise conv; ``norm``: False for the models run without the mean shift."""

    def __init__(self, *, embed_dim: int, depths: list[int], heads: list[int], window: int, mlp_hidden: int,
                 category: int, tokens: int, reduced: int, kernel: int, upsampler: str, factors: list[int],
                 num_feat: int = 64, three_conv: bool = False, patch_norm: bool = True, qkv_bias: bool = True,
                 norm: bool = True):
        super().__init__(embed_dim=embed_dim, depths=[], heads=[], window=window, mlp_hidden=mlp_hidden,
                         upsampler=upsampler, factors=factors, num_feat=num_feat, three_conv=three_conv,
                         patch_norm=patch_norm, qkv_bias=qkv_bias)
        self.layers = nn.ModuleList(
            ATDB(embed_dim, depth, h, window, category=category, tokens=tokens, reduced=reduced, kernel=kernel,
                 hidden=mlp_hidden, three_conv=three_conv, qkv_bias=qkv_bias) for depth, h in zip(depths, heads))
        if not norm:
            self.mean.zero_()  # no shift: x - 0 and back, exactly the input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = mirror_pad(pad_edges(x, max(h, ATD_MINIMUM), max(w, ATD_MINIMUM)), self.window)
        return super().forward(x)[..., : h * self.scale, : w * self.scale]


# --------------------------------------------------------------------------------------------- DRCT


class RDG(nn.Module):
    """DRCT's residual dense group: five Swin blocks on the growing concatenation of the group's input
    and the blocks' 1x1-conv outputs (``gc`` channels each), the last conv back to ``dim``, times 0.2,
    plus the input. ``heads`` and ``hidden``: each block's heads and MLP width."""

    def __init__(self, dim: int, gc: int, heads: list[int], hidden: list[int], window: int, shift: int, *,
                 qkv_bias: bool):
        super().__init__()
        for k in range(DRCT_BLOCKS):
            width = dim + k * gc
            self.add_module(f"swin{k + 1}", SwinBlock(width, heads[k], window, shift if k % 2 else 0, hidden[k],
                                                      qkv_bias=qkv_bias))
            self.add_module(f"adjust{k + 1}", nn.Conv2d(width, gc if k < DRCT_BLOCKS - 1 else dim, 1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``x`` (B, H, W, C) tokens."""
        features = [x]
        for k in range(1, DRCT_BLOCKS + 1):
            y = getattr(self, f"swin{k}")(torch.cat(features, dim=-1), mask)
            conv = getattr(self, f"adjust{k}")
            y = F.linear(y, conv.weight.flatten(1), conv.bias)  # the 1x1 conv, over channels-last tokens
            if k < DRCT_BLOCKS:
                features.append(F.leaky_relu(y, 0.2))
        return y * DRCT_RESIDUAL_SCALE + x


class DRCT(SwinIR):
    """DRCT for RGB pictures: SwinIR's frame (pixel-shuffle upsampling, the conv after the body one 3x3 or
    none) around RDGs. ``heads`` and ``hidden``: per group, each of its five blocks' heads and MLP widths;
    ``gc``: the channels each block adds; ``shift``: whether blocks 2 and 4 shift their windows."""

    def __init__(self, *, embed_dim: int, heads: list[list[int]], hidden: list[list[int]], window: int, gc: int,
                 factors: list[int], shift: bool = True, num_feat: int = 64, conv_after_body: bool = True,
                 patch_norm: bool = True, qkv_bias: bool = True):
        super().__init__(embed_dim=embed_dim, depths=[], heads=[], window=window, mlp_hidden=hidden[0][0],
                         upsampler="pixelshuffle", factors=factors, num_feat=num_feat, patch_norm=patch_norm,
                         qkv_bias=qkv_bias)
        self.shift = window // 2 if shift else 0
        self.layers = nn.ModuleList(RDG(embed_dim, gc, block_heads, block_hidden, window, self.shift,
                                        qkv_bias=qkv_bias) for block_heads, block_hidden in zip(heads, hidden))
        if not conv_after_body:
            self.conv_after_body = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        multiple = math.lcm(DRCT_MULTIPLE, self.window)
        x = pad_edges(x, -(-h // multiple) * multiple, -(-w // multiple) * multiple)
        return super().forward(x)[..., : h * self.scale, : w * self.scale]


# --------------------------------------------------------------------------------------------- plans


_ATD_LAYER = re.compile(r"layers\.(\d+)\.residual_group\.layers\.(\d+)\.")
#: Saved buffers ATD derives (the window's position index) or reads as a flag (``no_norm``).
_ATD_DERIVED = re.compile(r"relative_position_index_SA|no_norm")
_DRCT_BLOCK = re.compile(r"layers\.(\d+)\.(?:swin|adjust)[1-5]\.")
#: Saved buffers DRCT derives from the window and the picture's size.
_DRCT_DERIVED = re.compile(r".*\.attn\.relative_position_index|.*\.attn_mask")


def _groups(sd: Mapping[str, torch.Tensor], pattern: re.Pattern[str], source: str, arch: str) -> dict[int, set[int]]:
    """Group index → the indices of its layers (``pattern``'s groups 1 and 2; a pattern with one group
    gives empty sets), the groups numbered 0, 1, ... in a row; :class:`ModelError` otherwise."""
    groups: dict[int, set[int]] = {}
    for name in sd:
        if m := pattern.match(name):
            layers = groups.setdefault(int(m.group(1)), set())
            if pattern.groups > 1:
                layers.add(int(m.group(2)))
    if not groups or sorted(groups) != list(range(len(groups))):
        raise ModelError(f"{source}: {arch} groups numbered {sorted(groups)}; expected 0, 1, ... in a row: "
                         "incomplete or damaged file")
    return groups


def _window(source: str, arch: str, name: str, table: torch.Tensor) -> int:
    """The window side a relative position bias table of (2w - 1)² rows is for."""
    rows = table.shape[0]
    side = math.isqrt(rows)
    if side * side != rows or side % 2 == 0:
        raise ModelError(f"{source}: {arch} bias table {name} with {rows} rows; expected (2 x window - 1)²")
    return (side + 1) // 2


def _refuse_position_embedding(sd: Mapping[str, torch.Tensor], source: str, arch: str) -> None:
    if "absolute_pos_embed" in sd:
        raise ModelError(f"{source}: {arch} with absolute position embeddings (absolute_pos_embed) is not "
                         "supported: they fix the size of the pictures it runs on")


def atd_plan(sd: dict[str, torch.Tensor], source: str) -> _Plan | None:
    """ATD's hyper-parameters from its tensors (None when ``sd`` is not ATD: no token dictionary): the
    width from the first conv; per group the depth (layers under ``layers.N.residual_group.layers.M``)
    and heads (the first layer's bias table); the window from that table ((2w - 1)² rows); the
    dictionary's size (``attn_atd.scale``), the reduced width (``attn_atd.wq``), the feed-forward's width
    and kernel, the upsampler and scale from their tensors; the category size by spandrel's rule."""
    from .upscaler import _Plan, _rgb_only, _tensor_getter, _three_conv, swin_tail

    if "layers.0.residual_group.td" not in sd and not any(".attn_atd." in n for n in sd):
        return None
    tensor = _tensor_getter(sd, source, ARCH_ATD)
    _refuse_position_embedding(sd, source, ARCH_ATD)
    dim, in_ch = tensor("conv_first.weight", 4).shape[:2]
    groups = _groups(sd, _ATD_LAYER, source, ARCH_ATD)
    for g, layers in groups.items():
        if sorted(layers) != list(range(len(layers))):
            raise ModelError(f"{source}: ATD group {g} has layers numbered {sorted(layers)}; expected 0, 1, ... "
                             "in a row: incomplete or damaged file")
    depths = [len(groups[g]) for g in range(len(groups))]
    heads = [tensor(f"layers.{g}.residual_group.layers.0.attn_win.relative_position_bias_table", 2).shape[1]
             for g in range(len(depths))]
    first = "layers.0.residual_group.layers.0."
    table = first + "attn_win.relative_position_bias_table"
    window = _window(source, ARCH_ATD, table, tensor(table, 2))
    index = sd.get("relative_position_index_SA")
    if index is not None and tuple(index.shape) != (window * window,) * 2:
        raise ModelError(f"{source}: ATD relative_position_index_SA is {tuple(index.shape)}; expected "
                         f"{(window * window,) * 2} for the window of {window} its bias tables are for")
    tokens = tensor(first + "attn_atd.scale", 1).shape[0]
    reduced = tensor(first + "attn_atd.wq.weight", 2).shape[0]
    kernel = tensor(first + "convffn.dwconv.depthwise_conv.0.weight", 4).shape[2]
    mlp_hidden = tensor(first + "convffn.fc1.weight", 2).shape[0]
    if any(h < 1 or dim % h for h in heads) or kernel % 2 == 0 or min(tokens, reduced, mlp_hidden) < 1:
        raise ModelError(f"{source}: ATD of width {dim} with heads {heads}, {tokens} dictionary tokens of "
                         f"{reduced} reduced channels and a {kernel}-wide feed-forward conv; expected heads that "
                         "divide the width and an odd kernel")
    three_conv = _three_conv(sd, source, ARCH_ATD)
    upsampler, num_feat, factors, out_ch = swin_tail(sd, source, ARCH_ATD, in_ch, tensor)
    _rgb_only(source, ARCH_ATD, in_ch, out_ch)
    scale = math.prod(factors)
    light = upsampler == "pixelshuffledirect" and dim == ATD_LIGHT_DIM
    category = ATD_LIGHT_CATEGORY if light else ATD_CATEGORY
    norm = "no_norm" not in sd
    notes = (", 3conv" if three_conv else "") + ("" if norm else ", no mean shift")
    return _Plan(
        arch=ARCH_ATD, scale=scale, derived=_ATD_DERIVED.fullmatch,
        describe=(f"ATD {scale}x (embed {dim}, depths {depths}, heads {heads}, window {window}, {tokens} tokens, "
                  f"category {category}, {upsampler or 'no upsampler'}{notes})"),
        build=lambda: ATD(embed_dim=dim, depths=depths, heads=heads, window=window, mlp_hidden=mlp_hidden,
                          category=category, tokens=tokens, reduced=reduced, kernel=kernel, upsampler=upsampler,
                          factors=factors, num_feat=num_feat, three_conv=three_conv,
                          patch_norm="patch_embed.norm.weight" in sd, qkv_bias=first + "wqkv.bias" in sd, norm=norm),
    )


def drct_plan(sd: dict[str, torch.Tensor], source: str) -> _Plan | None:
    """DRCT's hyper-parameters from its tensors (None when ``sd`` is not DRCT: no dense groups of
    ``swinK``/``adjustK`` layers): the width from the first conv, the growth channels from ``adjust1``,
    each block's heads and MLP width from its bias table and ``mlp.fc1``, the window from the first
    table ((2w - 1)² rows), the shift from the saved buffers, the scale from the pixel shuffle. Files
    without the pixel-shuffle upsampler are refused: the network has no other way to its output."""
    from .upscaler import _pixelshuffle_factors, _Plan, _rgb_only, _tensor_getter

    if not any(n.startswith(("layers.0.swin1.", "layers.0.adjust1.")) for n in sd):
        return None
    tensor = _tensor_getter(sd, source, ARCH_DRCT)
    _refuse_position_embedding(sd, source, ARCH_DRCT)
    dim, in_ch = tensor("conv_first.weight", 4).shape[:2]
    if "conv_last.weight" not in sd:
        raise ModelError(f"{source}: DRCT without its pixel-shuffle upsampler (conv_last) is not supported: the "
                         "network has no other way to its output")
    count = len(_groups(sd, _DRCT_BLOCK, source, ARCH_DRCT))
    gc = tensor("layers.0.adjust1.weight", 4).shape[0]
    heads, hidden = [], []
    for g in range(count):
        block = f"layers.{g}.swin{{}}."
        heads.append([tensor(block.format(k) + "attn.relative_position_bias_table", 2).shape[1]
                      for k in range(1, DRCT_BLOCKS + 1)])
        hidden.append([tensor(block.format(k) + "mlp.fc1.weight", 2).shape[0] for k in range(1, DRCT_BLOCKS + 1)])
    for g, block_heads in enumerate(heads):
        widths = [dim + k * gc for k in range(DRCT_BLOCKS)]
        if any(h < 1 or width % h for h, width in zip(block_heads, widths)):
            raise ModelError(f"{source}: DRCT group {g} has heads {block_heads} for blocks of {widths} channels; "
                             "expected heads that divide each block's width")
    table = "layers.0.swin1.attn.relative_position_bias_table"
    window = _window(source, ARCH_DRCT, table, tensor(table, 2))
    # trained on patches no larger than the window, the original shifts nothing and saves no masks
    shift = "layers.0.swin2.attn_mask" in sd or "layers.0.swin1.attn.relative_position_index" not in sd
    num_feat = tensor("conv_before_upsample.0.weight", 4).shape[0]
    factors = _pixelshuffle_factors(sd, source, ARCH_DRCT, num_feat, tensor)
    out_ch = tensor("conv_last.weight", 4).shape[0]
    _rgb_only(source, ARCH_DRCT, in_ch, out_ch)
    scale = math.prod(factors)
    conv_after_body = "conv_after_body.weight" in sd
    notes = ("" if shift else ", no shifted windows") + ("" if conv_after_body else ", no conv after the body")
    return _Plan(
        arch=ARCH_DRCT, scale=scale, derived=_DRCT_DERIVED.fullmatch,
        describe=(f"DRCT {scale}x (embed {dim}, {count} group{'s' * (count > 1)}, heads {[h[0] for h in heads]}, window {window}, "
                  f"growth {gc}{notes})"),
        build=lambda: DRCT(embed_dim=dim, heads=heads, hidden=hidden, window=window, gc=gc, factors=factors,
                           shift=shift, num_feat=num_feat, conv_after_body=conv_after_body,
                           patch_norm="patch_embed.norm.weight" in sd,
                           qkv_bias="layers.0.swin1.attn.qkv.bias" in sd),
    )
