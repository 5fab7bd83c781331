"""DAT: the Dual Aggregation Transformer upscaler (Chen et al. 2023), written as plain modules.

A1111 lists the authors' three models as "DAT x2", "DAT x3" and "DAT x4" (``models/DAT``,
``DAT_x4.pth`` ...); the community trains others in the same frame (4xNomos8kDAT, 4xFaceUpDAT,
DAT-S, DAT-light ...). The module's tensor names are the files' own, so they load unchanged.

The network: a 3x3 conv to ``dim`` channels; with the pixels as tokens, a LayerNorm
(``before_RG.1``), residual groups (``layers.N``: ``depth`` blocks, a conv — one 3x3 or "3conv"
— and the group input added), a final LayerNorm; a conv (``conv_after_body``) whose output is
added to the first conv's; then pixel-shuffle upsampling (a conv with LeakyReLU, a conv and
shuffle per factor, a last conv) or, in the light models, one conv and one shuffle.

Blocks alternate between two pre-norm attentions, each followed by a spatial-gate feed-forward
(``ffn``: a linear layer and GELU, then half the channels gate the other half after a LayerNorm
and a depthwise 3x3 conv, then a linear layer):

- **spatial** (even blocks): half the channels attend within ``split`` = (height, width) windows,
  the other half within the transposed windows; each half has half the heads and a position bias
  that a small MLP (``attns.K.pos``) makes from each relative offset. The queries, keys and values
  are padded with zeros on the right and bottom to a multiple of the larger window side, and the
  padded keys take part in the softmax as in the original. Some blocks shift their windows by half
  a window (cyclically, with a -100 mask between the regions the roll joined): in even groups
  blocks 2, 6, 10 ..., in odd groups blocks 0, 4, 8 ...
- **channel** (odd blocks): attention between channels within each head over the whole picture
  (queries and keys L2-normalised over the pixels, scaled by a learned ``temperature``).

Both run a depthwise conv branch (``dwconv``: conv, batch norm, GELU) on the values beside the
attention, and the two branches gate each other: a channel map (global pooling and two 1x1 convs)
and a spatial map (two 1x1 convs) through sigmoids. Batch norms use their saved statistics.

The picture is centred on SwinIR's RGB mean and not padded (the attention pads itself). The saved
buffers ``rpe_biases``, ``relative_position_index`` and ``attn_mask_0``/``_1`` are derived from the
windows, not read; the window comes from the last row of a file's ``rpe_biases``
(its largest offsets), as nothing else in a file records it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .upscaler_swin import (SWINIR_MEAN, add_shuffle_tail, cached_mask, from_windows, relative_position_index,
                             residual_conv, to_windows)


def shifted(group: int, block: int) -> bool:
    """Whether spatial block ``block`` of residual group ``group`` shifts its windows."""
    if group % 2 == 0:
        return block > 0 and (block - 2) % 4 == 0
    return block % 4 == 0


class FrozenBatchNorm(nn.Module):
    """A batch norm in inference: ``weight`` x (x - ``running_mean``) / sqrt(``running_var`` + 1e-5)
    + ``bias``. The counter PyTorch's BatchNorm also saves (``num_batches_tracked``) is not kept, so
    files with and without it load alike."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, 1e-5)


def _conv_branch(dim: int) -> nn.Sequential:
    """``dwconv``: depthwise 3x3, batch norm, GELU."""
    return nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, groups=dim), FrozenBatchNorm(dim), nn.GELU())


def _channel_map(dim: int) -> nn.Sequential:
    """``channel_interaction``: global average, 1x1 to dim/8, batch norm, GELU, 1x1 back."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, dim // 8, 1), FrozenBatchNorm(dim // 8), nn.GELU(),
                         nn.Conv2d(dim // 8, dim, 1))


def _spatial_map(dim: int) -> nn.Sequential:
    """``spatial_interaction``: 1x1 to dim/16, batch norm, GELU, 1x1 to one channel."""
    return nn.Sequential(nn.Conv2d(dim, dim // 16, 1), FrozenBatchNorm(dim // 16), nn.GELU(), nn.Conv2d(dim // 16, 1, 1))


class PositionBias(nn.Module):
    """The bias MLP of a spatial branch (``pos``): each (dy, dx) offset through a linear layer,
    then three times LayerNorm, ReLU and a linear layer, the last giving one value per head."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.pos_proj = nn.Linear(2, width)
        self.pos1 = nn.Sequential(nn.LayerNorm(width), nn.ReLU(), nn.Linear(width, width))
        self.pos2 = nn.Sequential(nn.LayerNorm(width), nn.ReLU(), nn.Linear(width, width))
        self.pos3 = nn.Sequential(nn.LayerNorm(width), nn.ReLU(), nn.Linear(width, heads))

    def forward(self, offsets: torch.Tensor) -> torch.Tensor:
        return self.pos3(self.pos2(self.pos1(self.pos_proj(offsets))))


class WindowBranch(nn.Module):
    """Attention of one channel half within (height, width) windows, with the MLP's position bias."""

    def __init__(self, dim: int, heads: int, window: tuple[int, int], pos_width: int):
        super().__init__()
        self.heads, self.window = heads, window
        self.scale = (dim // heads) ** -0.5
        self.pos = PositionBias(pos_width, heads)
        wh, ww = window
        dy, dx = torch.meshgrid(torch.arange(1 - wh, wh), torch.arange(1 - ww, ww), indexing="ij")
        self.register_buffer("offsets", torch.stack((dy.flatten(), dx.flatten()), 1).float(), persistent=False)
        self.register_buffer("position_index", relative_position_index(window), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``q``, ``k``, ``v`` (B, H, W, C), H and W multiples of the window; the attended (B, H, W, C)."""
        b, h, w, c = q.shape
        n = self.window[0] * self.window[1]

        def heads(t: torch.Tensor) -> torch.Tensor:
            return to_windows(t, self.window).view(-1, n, self.heads, c // self.heads).transpose(1, 2)

        bias = self.pos(self.offsets.to(q.dtype))[self.position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        bias = bias.unsqueeze(0)  # (1, heads, N, N)
        if mask is not None:  # (windows, N, N), the same for each picture of the batch
            bias = (bias + mask.unsqueeze(1).to(bias.dtype)).repeat(b, 1, 1, 1)
        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=bias, scale=self.scale)
        return from_windows(out.transpose(1, 2).reshape(-1, n, c), self.window, h, w)


class WindowPairAttention(nn.Module):
    """The two window branches of DAT's (and RGT's) even blocks: one per channel half, the second with the
    transposed window, each shifted by half its window in shifted blocks. Subclasses add the branch beside
    them and call :meth:`windows`."""

    def __init__(self, dim: int, heads: int, split: tuple[int, int], *, shift: bool, qkv_bias: bool,
                 pos_width: int):
        super().__init__()
        self.split, self.shift = split, shift
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        half = dim // 2
        self.attns = nn.ModuleList([WindowBranch(half, heads, split, pos_width),
                                    WindowBranch(half, heads, (split[1], split[0]), pos_width)])
        self._masks: dict[tuple, torch.Tensor] = {}

    def _masks_for(self, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        sh, sw = self.split
        return (cached_mask(self._masks, h, w, (sh, sw), (sh // 2, sw // 2), device, key=0),
                cached_mask(self._masks, h, w, (sw, sh), (sw // 2, sh // 2), device, key=1))

    def windows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the two branches' attention (B, H, W, C), the projections q|k|v (B, H, W, 3C)) for ``x`` (B, H, W, C)."""
        _, h, w, c = x.shape
        qkv = self.qkv(x)
        side = max(self.split)
        pad_h, pad_w = -h % side, -w % side
        padded = F.pad(qkv, (0, 0, 0, pad_w, 0, pad_h)) if pad_h or pad_w else qkv
        hp, wp = h + pad_h, w + pad_w
        q, k, v = padded.split(c, dim=-1)
        half = c // 2
        halves = []
        masks = self._masks_for(hp, wp, x.device) if self.shift else (None, None)
        for branch, (lo, hi), mask in zip(self.attns, ((0, half), (half, c)), masks):
            wh, ww = branch.window
            roll = (wh // 2, ww // 2) if self.shift else (0, 0)
            parts = [t[..., lo:hi] for t in (q, k, v)]
            if self.shift:
                parts = [torch.roll(t, (-roll[0], -roll[1]), dims=(1, 2)) for t in parts]
            out = branch(*parts, mask)
            if self.shift:
                out = torch.roll(out, roll, dims=(1, 2))
            halves.append(out[:, :h, :w])
        return torch.cat(halves, dim=-1), qkv


class SpatialAttention(WindowPairAttention):
    """The even blocks' attention (``Adaptive_Spatial_Attention`` in the files' code): the two window
    branches beside the depthwise conv branch."""

    def __init__(self, dim: int, heads: int, split: tuple[int, int], *, shift: bool, qkv_bias: bool,
                 pos_width: int):
        super().__init__(dim, heads, split, shift=shift, qkv_bias=qkv_bias, pos_width=pos_width)
        self.dwconv = _conv_branch(dim)
        self.channel_interaction = _channel_map(dim)
        self.spatial_interaction = _spatial_map(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, H, W, C) normalised tokens."""
        c = x.shape[-1]
        attended, qkv = self.windows(x)
        conv = self.dwconv(qkv[..., 2 * c:].permute(0, 3, 1, 2))  # the values, unpadded
        channel = self.channel_interaction(conv).permute(0, 2, 3, 1)  # (B, 1, 1, C)
        spatial = self.spatial_interaction(attended.permute(0, 3, 1, 2))  # (B, 1, H, W)
        attended = attended * torch.sigmoid(channel)
        conv = (torch.sigmoid(spatial) * conv).permute(0, 2, 3, 1)
        return self.proj(attended + conv)


class ChannelAttention(nn.Module):
    """The odd blocks' attention (``Adaptive_Channel_Attention``): per head, each channel attends to
    the others over all pixels, beside the depthwise conv branch."""

    def __init__(self, dim: int, heads: int, *, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.dwconv = _conv_branch(dim)
        self.channel_interaction = _channel_map(dim)
        self.spatial_interaction = _spatial_map(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        n = h * w
        # (3, B, heads, head width, pixels)
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 4, 1)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        weights = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1)
        attended = (weights @ v).permute(0, 3, 1, 2).reshape(b, h, w, c)

        conv = self.dwconv(v.reshape(b, c, h, w))
        channel = self.channel_interaction(attended.permute(0, 3, 1, 2))  # (B, C, 1, 1)
        spatial = self.spatial_interaction(conv).permute(0, 2, 3, 1)  # (B, H, W, 1)
        attended = attended * torch.sigmoid(spatial)
        conv = (conv * torch.sigmoid(channel)).permute(0, 2, 3, 1)
        return self.proj(attended + conv)


class SpatialGate(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, H, W, 2C): the first half gated by the second (normalised, depthwise conv)."""
        kept, gate = x.chunk(2, dim=-1)
        gate = self.conv(self.norm(gate).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return kept * gate


class GatedFeedForward(nn.Module):
    """``ffn``: linear to ``hidden``, GELU, the spatial gate (to hidden/2), linear back."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.sg = SpatialGate(hidden // 2)
        self.fc2 = nn.Linear(hidden // 2, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.sg(F.gelu(self.fc1(x))))


class DATBlock(nn.Module):
    def __init__(self, attn: nn.Module, dim: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = GatedFeedForward(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class ResidualGroup(nn.Module):
    def __init__(self, blocks: list[DATBlock], dim: int, three_conv: bool):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.conv = residual_conv(dim, three_conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, H, W, C) tokens."""
        y = x
        for block in self.blocks:
            y = block(y)
        return self.conv(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) + x


class _TokenNorm(nn.Module):
    """Holds the LayerNorm the files call ``before_RG.1`` (``before_RG.0`` reshapes, with no weights)."""

    def __init__(self, dim: int):
        super().__init__()
        self.add_module("1", nn.LayerNorm(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._modules["1"](x)


class DAT(nn.Module):
    """DAT for RGB pictures. ``spatial_heads`` and ``channel_heads``: per group, the heads of each
    window branch and of the channel attention (the original's ``num_heads`` // 2 and ``num_heads``);
    ``split``: the (height, width) window; ``hidden``: the feed-forward width; ``pos_width``: the
    position-bias MLP's width; ``upsampler`` "pixelshuffle" (``factors`` of 2 or 3, ``num_feat``
    channels) or "pixelshuffledirect"."""

    def __init__(self, *, dim: int, depths: list[int], spatial_heads: list[int], channel_heads: list[int],
                 split: tuple[int, int], hidden: int, pos_width: int, upsampler: str, factors: list[int],
                 num_feat: int = 64, three_conv: bool = False, qkv_bias: bool = True):
        super().__init__()
        self.upsampler = upsampler
        self.scale = math.prod(factors)
        self.register_buffer("mean", torch.tensor(SWINIR_MEAN).view(1, 3, 1, 1), persistent=False)
        self.conv_first = nn.Conv2d(3, dim, 3, 1, 1)
        self.before_RG = _TokenNorm(dim)
        groups = []
        for g, depth in enumerate(depths):
            blocks = []
            for i in range(depth):
                if i % 2 == 0:
                    attn: nn.Module = SpatialAttention(dim, spatial_heads[g], split, shift=shifted(g, i),
                                                       qkv_bias=qkv_bias, pos_width=pos_width)
                else:
                    attn = ChannelAttention(dim, channel_heads[g], qkv_bias=qkv_bias)
                blocks.append(DATBlock(attn, dim, hidden))
            groups.append(ResidualGroup(blocks, dim, three_conv))
        self.layers = nn.ModuleList(groups)
        self.norm = nn.LayerNorm(dim)
        self.conv_after_body = residual_conv(dim, three_conv)
        if not add_shuffle_tail(self, upsampler, dim, num_feat, factors, self.scale):
            raise ValueError(f"unknown DAT upsampler {upsampler!r}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.before_RG(x.permute(0, 2, 3, 1))
        for group in self.layers:
            tokens = group(tokens)
        return self.norm(tokens).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.mean.to(x.dtype)
        feat = self.conv_first(x - mean)
        feat = self.conv_after_body(self.features(feat)) + feat
        if self.upsampler == "pixelshuffle":
            out = self.conv_last(self.upsample(self.conv_before_upsample(feat)))
        else:
            out = self.upsample(feat)
        return out + mean
