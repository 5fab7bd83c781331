"""SwinIR: the window-attention transformer upscaler (Liang et al. 2021), written as plain modules.

The files are those of the SwinIR repository and what others trained with it: classical SR
(``001_classicalSR_*``, pixel shuffle), lightweight SR (``002_lightweightSR_*``, one conv and a
pixel shuffle), real-world SR (``003_realSR_*``, nearest upsampling with convs; A1111's "SwinIR 4x"
is ``003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN.pth``) and the 1x restoration models (a conv
on top of the input). The module's tensor names are the files' own, so they load unchanged.

The network: a 3x3 conv to ``embed_dim`` channels; then, with the pixels as tokens, a LayerNorm
(``patch_embed.norm``), residual Swin transformer blocks (RSTB: ``depth`` Swin blocks, a conv — one
3x3, or "3conv": 3x3 to dim/4, LeakyReLU 0.2, 1x1, LeakyReLU 0.2, 3x3 back — and the block input
added) and a final LayerNorm; a conv (``conv_after_body``, 1conv or 3conv) whose output is added to
the first conv's; then the upsampler. A Swin block is pre-norm: window attention (multi-head,
``window`` x ``window`` tokens, a learned bias per relative position and head; every second
block's windows shifted by half a window, with a mask keeping regions that the cyclic shift brought
together apart), then a GELU MLP, each added to its input.

The input is padded on the right and bottom to a multiple of the window (reflection, replication
where a side is too short to reflect) and the output cropped back; the picture is centred on the
DIV2K mean (0.4488, 0.4371, 0.4040) and scaled by ``img_range`` on the way in and back on the way
out. Every ``attn_mask`` and ``relative_position_index`` a file holds is derived here from the
picture's size and the window (they are buffers the original saved), so files with or without them
load alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: The RGB mean SwinIR's models are centred on (DIV2K's).
SWINIR_MEAN = (0.4488, 0.4371, 0.4040)
#: The values SwinIR's attention mask adds between tokens of regions the shift joined.
_MASKED = -100.0


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad right and bottom to a multiple of ``multiple``: by reflection, or by replication where a
    side is too short to reflect (reflection needs the pad to be smaller than the side)."""
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if not (pad_h or pad_w):
        return x
    mode = "reflect" if pad_h < h and pad_w < w else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def pad_edges(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pad (N, C, H, W) on the right and bottom to ``height`` x ``width`` (not smaller than it is): by
    reflection as far as a side allows (up to its length - 1), by repeating the edge for the rest."""
    h, w = x.shape[-2:]
    pad_h, pad_w = max(height - h, 0), max(width - w, 0)
    if not (pad_h or pad_w):
        return x
    reflect_h, reflect_w = min(pad_h, h - 1), min(pad_w, w - 1)
    if reflect_h or reflect_w:
        x = F.pad(x, (0, reflect_w, 0, reflect_h), mode="reflect")
    if pad_h > reflect_h or pad_w > reflect_w:
        x = F.pad(x, (0, pad_w - reflect_w, 0, pad_h - reflect_h), mode="replicate")
    return x


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def relative_position_index(window: int | tuple[int, int]) -> torch.Tensor:
    """(N, N) for a window of N = height x width tokens (an int: a square one): for each pair of
    tokens, the row of the bias table that holds their offset,
    (dy + height - 1) * (2 * width - 1) + dx + width - 1."""
    wh, ww = _pair(window)
    ys, xs = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + wh - 1
    dx = xs[:, None] - xs[None, :] + ww - 1
    return dy * (2 * ww - 1) + dx


def to_windows(x: torch.Tensor, window: int | tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) → (B * windows, N, C), windows (of N = height x width tokens; an int: square)
    in row-major order."""
    wh, ww = _pair(window)
    b, h, w, c = x.shape
    x = x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, c)


def from_windows(windows: torch.Tensor, window: int | tuple[int, int], h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`to_windows`: (B * windows, N, C) → (B, H, W, C)."""
    wh, ww = _pair(window)
    c = windows.shape[-1]
    x = windows.view(-1, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def shift_mask(h: int, w: int, window: int | tuple[int, int], shift: int | tuple[int, int],
               device: torch.device, *, fill: float = _MASKED) -> torch.Tensor:
    """(windows, N, N) additive mask for shifted windows (window and shift: an int, or (height,
    width)): 0 between tokens of the same region of the rolled picture, ``fill`` (-100, as Swin's
    models were trained with) between tokens the cyclic roll brought together. Along each side the
    regions are [0, side - window), [side - window, side - shift) and [side - shift, side)."""
    (wh, ww), (sh, sw) = _pair(window), _pair(shift)

    def bands(side: int, window: int, shift: int) -> torch.Tensor:
        band = torch.zeros(side, dtype=torch.float32)
        band[side - window:side - shift] = 1
        band[side - shift:] = 2
        return band

    region = (bands(h, wh, sh)[:, None] * 3 + bands(w, ww, sw)[None, :]).view(1, h, w, 1)
    ids = to_windows(region, (wh, ww)).squeeze(-1)  # (windows, N)
    mask = torch.where(ids[:, :, None] == ids[:, None, :], 0.0, fill)
    return mask.to(device)


def cached_mask(cache: dict, h: int, w: int, window, shift, device: torch.device, *, fill: float = _MASKED,
                key: object = None) -> torch.Tensor:
    """:func:`shift_mask` for an (h, w) feature map, kept in ``cache`` for the last few sizes seen."""
    name = (h, w, str(device), key)
    if name not in cache:
        if len(cache) >= 4:
            cache.clear()
        cache[name] = shift_mask(h, w, window, shift, device, fill=fill)
    return cache[name]


class WindowAttention(nn.Module):
    """Multi-head self-attention within each window, with a learned bias per relative position."""

    def __init__(self, dim: int, window: int, heads: int, *, qkv_bias: bool = True):
        super().__init__()
        self.heads = heads
        self.window = window
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("position_index", relative_position_index(window), persistent=False)

    def position_bias(self) -> torch.Tensor:
        """(heads, window², window²)."""
        n = self.window * self.window
        return self.relative_position_bias_table[self.position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``x`` (B * windows, N, C); ``mask`` (windows, N, N) or None."""
        bw, n, c = x.shape
        q, k, v = self.qkv(x).view(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.position_bias().unsqueeze(0)  # (1, heads, N, N)
        if mask is not None:
            windows = mask.shape[0]
            bias = (bias + mask.unsqueeze(1)).repeat(bw // windows, 1, 1, 1)  # (B * windows, heads, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-norm window attention (windows shifted by ``shift``) and MLP, each added to its input."""

    #: The attention's class (Swin V2's blocks use another).
    attention: type = WindowAttention

    def __init__(self, dim: int, heads: int, window: int, shift: int, hidden: int, *, qkv_bias: bool = True):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = self.attention(dim, window, heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)

    def attend(self, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Window attention over normalised tokens ``y`` (B, H, W, C), shifted and back if this block shifts."""
        _, h, w, _ = y.shape
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), dims=(1, 2))
        y = from_windows(self.attn(to_windows(y, self.window), mask if self.shift else None), self.window, h, w)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), dims=(1, 2))
        return y

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``x`` (B, H, W, C), H and W multiples of the window; ``mask`` for the shifted windows."""
        x = x + self.attend(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


def add_shuffle_tail(module: nn.Module, upsampler: str, dim: int, num_feat: int, factors: list[int],
                     scale: int) -> bool:
    """Give ``module`` SwinIR's "pixelshuffle" tail (``conv_before_upsample``: conv + LeakyReLU to
    ``num_feat``; ``upsample``: a conv and pixel shuffle per factor; ``conv_last``) or its
    "pixelshuffledirect" one (``upsample``: one conv to 3·scale² and a pixel shuffle), which DAT shares;
    False for another upsampler."""
    if upsampler == "pixelshuffle":
        module.conv_before_upsample = nn.Sequential(nn.Conv2d(dim, num_feat, 3, 1, 1), nn.LeakyReLU(0.01))
        stages: list[nn.Module] = []
        for f in factors:
            stages += [nn.Conv2d(num_feat, f * f * num_feat, 3, 1, 1), nn.PixelShuffle(f)]
        module.upsample = nn.Sequential(*stages)
        module.conv_last = nn.Conv2d(num_feat, 3, 3, 1, 1)
        return True
    if upsampler == "pixelshuffledirect":
        module.upsample = nn.Sequential(nn.Conv2d(dim, scale ** 2 * 3, 3, 1, 1), nn.PixelShuffle(scale))
        return True
    return False


def residual_conv(dim: int, three: bool) -> nn.Module:
    """The conv closing an RSTB and the body: one 3x3, or "3conv" (3x3 to dim/4, 1x1, 3x3 back)."""
    if not three:
        return nn.Conv2d(dim, dim, 3, 1, 1)
    quarter = dim // 4
    return nn.Sequential(nn.Conv2d(dim, quarter, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(quarter, quarter, 1),
                         nn.LeakyReLU(0.2), nn.Conv2d(quarter, dim, 3, 1, 1))


class _Blocks(nn.Module):
    """Holds an RSTB's Swin blocks under the name the files use (``residual_group.blocks``)."""

    def __init__(self, blocks: list[SwinBlock]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)


class RSTB(nn.Module):
    """Residual Swin transformer block: Swin blocks (every second one shifted), a conv, plus the input."""

    def __init__(self, dim: int, depth: int, heads: int, window: int, hidden: int, *, three_conv: bool,
                 qkv_bias: bool = True):
        super().__init__()
        self.residual_group = _Blocks([SwinBlock(dim, heads, window, window // 2 if i % 2 else 0, hidden,
                                                 qkv_bias=qkv_bias) for i in range(depth)])
        self.conv = residual_conv(dim, three_conv)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``x`` (B, H, W, C) tokens."""
        y = x
        for block in self.residual_group.blocks:
            y = block(y, mask)
        return self.conv(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) + x


class SwinIR(nn.Module):
    """SwinIR for RGB pictures. ``upsampler``: "pixelshuffle" (conv + LeakyReLU to ``num_feat``,
    a conv and pixel shuffle per factor in ``factors`` (2 or 3), a last conv), "pixelshuffledirect"
    (one conv to 3·scale² channels and a pixel shuffle), "nearest+conv" (conv + LeakyReLU to
    ``num_feat``, per factor of two a nearest x2 and a conv with LeakyReLU 0.2, an HR conv with
    LeakyReLU 0.2 and a last conv) or "" (1x: the input plus a last conv of the features)."""

    #: The residual group's class (Swin2SR's adds a 1x1 conv).
    group: type = RSTB

    def __init__(self, *, embed_dim: int, depths: list[int], heads: list[int], window: int, mlp_hidden: int,
                 upsampler: str, factors: list[int], num_feat: int = 64, three_conv: bool = False,
                 patch_norm: bool = True, qkv_bias: bool = True, img_range: float = 1.0):
        super().__init__()
        self.window = window
        self.shift = window // 2
        self.upsampler = upsampler
        self.img_range = img_range
        self.scale = 1
        for f in factors:
            self.scale *= f
        self.register_buffer("mean", torch.tensor(SWINIR_MEAN).view(1, 3, 1, 1), persistent=False)
        self.conv_first = nn.Conv2d(3, embed_dim, 3, 1, 1)
        self.patch_embed = _PatchNorm(embed_dim) if patch_norm else None
        self.layers = nn.ModuleList(self.group(embed_dim, depth, h, window, mlp_hidden, three_conv=three_conv,
                                         qkv_bias=qkv_bias) for depth, h in zip(depths, heads))
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = residual_conv(embed_dim, three_conv)
        if add_shuffle_tail(self, upsampler, embed_dim, num_feat, factors, self.scale):
            pass  # "pixelshuffle" or "pixelshuffledirect"
        elif upsampler == "nearest+conv":
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, 1, 1), nn.LeakyReLU(0.01))
            for k in range(1, len(factors) + 1):
                self.add_module(f"conv_up{k}", nn.Conv2d(num_feat, num_feat, 3, 1, 1))
            self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_last = nn.Conv2d(num_feat, 3, 3, 1, 1)
        elif upsampler == "":
            self.conv_last = nn.Conv2d(embed_dim, 3, 3, 1, 1)
        else:
            raise ValueError(f"unknown SwinIR upsampler {upsampler!r}")
        self._masks: dict[tuple, torch.Tensor] = {}

    def _mask(self, h: int, w: int, device: torch.device) -> torch.Tensor | None:
        """The shifted windows' mask for an (h, w) feature map, kept for the last few sizes seen."""
        return cached_mask(self._masks, h, w, self.window, self.shift, device) if self.shift else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The transformer body on (B, C, H, W) features; the same shape back."""
        tokens = x.permute(0, 2, 3, 1)
        norm = getattr(self.patch_embed, "norm", None)
        if norm is not None:
            tokens = norm(tokens)
        mask = self._mask(x.shape[-2], x.shape[-1], x.device)
        for layer in self.layers:
            tokens = layer(tokens, mask)
        return self.norm(tokens).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        mean = self.mean.to(x.dtype)
        x = (pad_to_multiple(x, self.window) - mean) * self.img_range
        feat = self.conv_first(x)
        feat = self.conv_after_body(self.features(feat)) + feat
        if self.upsampler == "pixelshuffle":
            out = self.conv_last(self.upsample(self.conv_before_upsample(feat)))
        elif self.upsampler == "pixelshuffledirect":
            out = self.upsample(feat)
        elif self.upsampler == "nearest+conv":
            y = self.conv_before_upsample(feat)
            k = 1
            while hasattr(self, f"conv_up{k}"):
                y = F.leaky_relu(getattr(self, f"conv_up{k}")(F.interpolate(y, scale_factor=2, mode="nearest")), 0.2)
                k += 1
            out = self.conv_last(F.leaky_relu(self.conv_hr(y), 0.2))
        else:
            out = x + self.conv_last(feat)
        out = out / self.img_range + mean
        return out[..., : h * self.scale, : w * self.scale]


class _PatchNorm(nn.Module):
    """The LayerNorm over tokens SwinIR calls ``patch_embed.norm`` (its patches are single pixels)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)


# --------------------------------------------------------------------------------------------- HAT
#
# HAT (Chen et al. 2023, "Activating More Pixels in Image Super-Resolution Transformer"; the
# 4xNomos8kSCHAT-L / Real_HAT_GAN files, A1111's models/HAT) builds on SwinIR: each Swin block
# also runs a channel-attention conv branch on its normalised input (added at 0.01), and each group
# of blocks ends with an overlapping cross-attention block (OCAB) whose keys and values come from
# windows larger than the query windows. Pixel-shuffle upsampling only.

#: HAT's weight on its blocks' conv branch (a constant of the architecture, not in the files).
HAT_CONV_SCALE = 0.01


def overlap_position_index(window: int, overlap: int) -> torch.Tensor:
    """(window², overlap²): the bias-table row for each query in a window and key in its overlapping
    window. HAT counts the key's offset from the query shifted by window - overlap + 1 per axis
    (negative for the far side of a wide overlap) in a table of (window + overlap - 1)² rows; its
    negative rows index from the table's end, as Python's indexing does, hence the modulo."""
    qy, qx = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ky, kx = torch.meshgrid(torch.arange(overlap), torch.arange(overlap), indexing="ij")
    qy, qx, ky, kx = qy.flatten(), qx.flatten(), ky.flatten(), kx.flatten()
    side = window + overlap - 1
    dy = ky[None, :] - qy[:, None] + window - overlap + 1
    dx = kx[None, :] - qx[:, None] + window - overlap + 1
    return (dy * side + dx) % (side * side)


class ChannelAttention(nn.Module):
    """Squeeze and excitation: the picture's mean per channel → 1x1 conv, ReLU, 1x1 conv, sigmoid → weights."""

    def __init__(self, dim: int, squeezed: int):
        super().__init__()
        self.attention = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, squeezed, 1), nn.ReLU(),
                                       nn.Conv2d(squeezed, dim, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)


class _CAB(nn.Module):
    """HAT's channel-attention block: 3x3 conv to ``compressed`` channels, GELU, 3x3 conv back, channel attention."""

    def __init__(self, dim: int, compressed: int, squeezed: int):
        super().__init__()
        self.cab = nn.Sequential(nn.Conv2d(dim, compressed, 3, 1, 1), nn.GELU(), nn.Conv2d(compressed, dim, 3, 1, 1),
                                 ChannelAttention(dim, squeezed))


class HAB(SwinBlock):
    """A Swin block whose normalised input also feeds the conv branch, added at :data:`HAT_CONV_SCALE`."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, hidden: int, *, compressed: int,
                 squeezed: int, qkv_bias: bool = True):
        super().__init__(dim, heads, window, shift, hidden, qkv_bias=qkv_bias)
        self.conv_block = _CAB(dim, compressed, squeezed)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        y = self.norm1(x)
        conv = self.conv_block.cab(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.attend(y, mask) + conv * HAT_CONV_SCALE
        return x + self.mlp(self.norm2(x))


class OCAB(nn.Module):
    """Overlapping cross-attention: queries from each window, keys and values from the ``overlap`` x
    ``overlap`` window centred on it (zero outside the picture), a learned bias per relative
    position; then an MLP. Both added to their input, pre-norm."""

    def __init__(self, dim: int, heads: int, window: int, overlap: int, hidden: int, *, qkv_bias: bool = True):
        super().__init__()
        self.heads, self.window, self.overlap = heads, window, overlap
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((window + overlap - 1) ** 2, heads))
        self.register_buffer("position_index", overlap_position_index(window, overlap), persistent=False)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, H, W, C), H and W multiples of the window."""
        b, h, w, c = x.shape
        heads, d = self.heads, c // self.heads
        q, kv = self.qkv(self.norm1(x)).split((c, 2 * c), dim=-1)
        q = to_windows(q, self.window)  # (B * windows, window², C)
        bw, n, _ = q.shape
        # (B, 2C * overlap², windows): per window, channel-major then row-major positions
        kv = F.unfold(kv.permute(0, 3, 1, 2), self.overlap, padding=(self.overlap - self.window) // 2,
                      stride=self.window)
        m = self.overlap * self.overlap
        kv = kv.view(b, 2, c, m, -1).permute(1, 0, 4, 3, 2).reshape(2, bw, m, c)
        q = q.view(bw, n, heads, d).transpose(1, 2)
        k = kv[0].view(bw, m, heads, d).transpose(1, 2)
        v = kv[1].view(bw, m, heads, d).transpose(1, 2)
        bias = self.relative_position_bias_table[self.position_index.view(-1)].view(n, m, heads).permute(2, 0, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0).to(q.dtype))
        out = from_windows(out.transpose(1, 2).reshape(bw, n, c), self.window, h, w)
        x = x + self.proj(out)
        return x + self.mlp(self.norm2(x))


class _HATBlocks(nn.Module):
    def __init__(self, blocks: list[HAB], overlap_attn: OCAB):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.overlap_attn = overlap_attn


class RHAG(nn.Module):
    """Residual hybrid attention group: HABs (every second one shifted), an OCAB, a 3x3 conv (or
    none), plus the group's input."""

    def __init__(self, dim: int, depth: int, heads: int, window: int, overlap: int, hidden: int,
                 overlap_hidden: int, *, compressed: int, squeezed: int, conv: bool, qkv_bias: bool = True):
        super().__init__()
        blocks = [HAB(dim, heads, window, window // 2 if i % 2 else 0, hidden, compressed=compressed,
                      squeezed=squeezed, qkv_bias=qkv_bias) for i in range(depth)]
        self.residual_group = _HATBlocks(blocks, OCAB(dim, heads, window, overlap, overlap_hidden, qkv_bias=qkv_bias))
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1) if conv else nn.Identity()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        y = x
        for block in self.residual_group.blocks:
            y = block(y, mask)
        y = self.residual_group.overlap_attn(y)
        return self.conv(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) + x


class HAT(SwinIR):
    """HAT for RGB pictures: SwinIR's frame (first conv, patch norm, groups, norm, conv after the
    body — 1conv or none — pixel-shuffle upsampling) around RHAGs."""

    def __init__(self, *, embed_dim: int, depths: list[int], heads: list[int], window: int, overlap: int,
                 mlp_hidden: int, overlap_hidden: int, compressed: int, squeezed: int, factors: list[int],
                 num_feat: int = 64, conv_after_body: bool = True, patch_norm: bool = True, qkv_bias: bool = True):
        super().__init__(embed_dim=embed_dim, depths=[], heads=[], window=window, mlp_hidden=mlp_hidden,
                         upsampler="pixelshuffle", factors=factors, num_feat=num_feat, patch_norm=patch_norm,
                         qkv_bias=qkv_bias)
        self.layers = nn.ModuleList(
            RHAG(embed_dim, depth, h, window, overlap, mlp_hidden, overlap_hidden, compressed=compressed,
                 squeezed=squeezed, conv=conv_after_body, qkv_bias=qkv_bias) for depth, h in zip(depths, heads))
        if not conv_after_body:
            self.conv_after_body = nn.Identity()
