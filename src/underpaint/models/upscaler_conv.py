"""The convolutional upscalers of the community's recent models: SPAN, PLKSR / RealPLKSR, RCAN and MoSR.

These are what OpenModelDB's quick models are (2xHFA2kSPAN, 4xNomos8k_span_otf, 4xNomos2_realplksr_dysample,
...): all-convolution networks, a fraction of ESRGAN's cost. A1111 runs any file spandrel reads from its
``models/ESRGAN`` folder, and ComfyUI from ``models/upscale_models``; the module's tensor names are the
files' own, so they load unchanged.

- **SPAN** (Wan et al. 2024, "Swift Parameter-free Attention Network"): a first layer, six blocks, a
  layer after them, a 1x1 conv over four of the features concatenated (the first layer's, the last
  block's through that layer, the first block's, and the last block's first layer's after its SiLU, as
  the original's in-place activation leaves it) and a conv with pixel shuffle. Every 3x3 layer is trained as a 1x1 → 3x3 → 1x1 chain (twice as wide in the
  middle) beside a 1x1 shortcut (``Conv3XC``: ``sk``, ``conv.0/1/2``) and runs as the one 3x3 conv they
  add up to; the files also hold that conv (``eval_conv``), but the original recomputes it from the
  branches on every call, so it is recomputed here too and the saved one is not read. A block runs three
  such layers with SiLU between them; its output is (third + input) x (sigmoid(third) - 0.5). The input
  is centred on SwinIR's RGB mean and scaled by 255 (unless the file carries ``no_norm``); the output is
  not scaled back, as in the original.
- **PLKSR** (Lee et al. 2024, "Partial Large Kernel CNNs"): a 3x3 conv, blocks, a 3x3 conv to
  3·scale² channels added to the input repeated scale² times, and a pixel shuffle. A block: a channel
  mixer (two convs with GELU; 3x3+1x1, 1x1+3x3 or 3x3+3x3), a large-kernel conv over the first part of
  the channels (one square kernel, or SLaK-style m x n + n x m + n x n), an optional element-wise
  attention (x · sigmoid(conv3x3 x)), a 1x1 conv, plus the block input. The files spell the mixer
  ``channe_mixer``.
- **RealPLKSR**: PLKSR's blocks with a Mish 3x3+3x3 mixer, a group norm (4 groups) after the 1x1 conv or a
  channel LayerNorm before the mixer, and either a pixel shuffle or a learned **DySample** upsampler
  (per output sub-pixel, offsets predicted by two 1x1 convs move bilinear samples of the features,
  then a 1x1 conv to RGB).
- **RCAN** (Zhang et al. 2018): residual groups of conv-ReLU-conv blocks, each block's output weighted per
  channel by a squeeze-and-excitation branch (``conv_du``); Kim2091's AnimeSharpV4 models among others.
- **MoSR** ("Mamba Out Super-Resolution"): MambaOut-style gated conv blocks beside a conv shortcut, and a pixel
  shuffle, an 8-fold "geo ensemble" shuffle or DySample.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .upscaler_swin import pad_to_multiple

#: SwinIR's RGB mean, which SPAN's input is centred on (with values scaled to 0-255).
SPAN_MEAN = (0.4488, 0.4371, 0.4040)


# --------------------------------------------------------------------------------------------- SPAN


class Conv3XC(nn.Module):
    """A 3x3 conv trained as a 1x1 → 3x3 → 1x1 chain (``conv``, ``gain`` times wider inside) plus a 1x1
    shortcut (``sk``), run as the single 3x3 conv those add up to. ``eval_conv`` is the files' copy of
    that conv: kept so that they load, but recomputed from the branches as the original does."""

    def __init__(self, c_in: int, c_out: int, gain: int = 2):
        super().__init__()
        self.sk = nn.Conv2d(c_in, c_out, 1)
        self.conv = nn.Sequential(nn.Conv2d(c_in, c_in * gain, 1), nn.Conv2d(c_in * gain, c_out * gain, 3),
                                  nn.Conv2d(c_out * gain, c_out, 1))
        self.eval_conv = nn.Conv2d(c_in, c_out, 3, 1, 1)

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The 3x3 weight and bias of the chain and the shortcut together."""
        first, middle, last = self.conv
        w1, w3 = first.weight[:, :, 0, 0], last.weight[:, :, 0, 0]  # (mid, in), (out, mid2)
        weight = torch.einsum("on,nmhw,mi->oihw", w3, middle.weight, w1)
        bias_mid = middle.bias + torch.einsum("nmhw,m->n", middle.weight, first.bias)
        bias = last.bias + w3 @ bias_mid + self.sk.bias
        weight = weight + F.pad(self.sk.weight, (1, 1, 1, 1))
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.fused()
        return F.conv2d(x, weight.to(x.dtype), bias.to(x.dtype), padding=1)


class SPAB(nn.Module):
    """SPAN's block: three fused layers with SiLU between; returns (output, the first layer's output
    after its SiLU: the original's in-place activation leaves it so, and the network uses it so)."""

    def __init__(self, dim: int):
        super().__init__()
        self.c1_r = Conv3XC(dim, dim)
        self.c2_r = Conv3XC(dim, dim)
        self.c3_r = Conv3XC(dim, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = F.silu(self.c1_r(x))
        third = self.c3_r(F.silu(self.c2_r(first)))
        return (third + x) * (torch.sigmoid(third) - 0.5), first


class SPAN(nn.Module):
    def __init__(self, *, dim: int, upscale: int, norm: bool = True):
        super().__init__()
        self.scale = upscale
        self.norm = norm
        self.register_buffer("mean", torch.tensor(SPAN_MEAN).view(1, 3, 1, 1), persistent=False)
        self.conv_1 = Conv3XC(3, dim)
        for i in range(1, 7):
            self.add_module(f"block_{i}", SPAB(dim))
        self.conv_cat = nn.Conv2d(dim * 4, dim, 1)
        self.conv_2 = Conv3XC(dim, dim)
        self.upsampler = nn.Sequential(nn.Conv2d(dim, 3 * upscale * upscale, 3, 1, 1), nn.PixelShuffle(upscale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm:
            x = (x - self.mean.to(x.dtype)) * 255.0
        start = self.conv_1(x)
        y, _ = self.block_1(start)
        after_first = y
        for i in range(2, 6):
            y, _ = getattr(self, f"block_{i}")(y)
        y, last_first = self.block_6(y)
        y = self.conv_2(y)
        return self.upsampler(self.conv_cat(torch.cat((start, y, after_first, last_first), dim=1)))


# --------------------------------------------------------------------------------------------- PLKSR


class LargeKernel(nn.Module):
    """``lk``: a large-kernel conv over the first ``part`` channels (the rest pass unchanged): one
    ``kernel`` x ``kernel`` conv, or (``rect``) the sum of a k x k/3, a k/3 x k and a k/3 x k/3 conv."""

    def __init__(self, part: int, kernel: int, *, rect: bool = False):
        super().__init__()
        self.part, self.rect = part, rect
        if rect:
            m, n = kernel, kernel // 3
            self.mn_conv = nn.Conv2d(part, part, (m, n), 1, (m // 2, n // 2))
            self.nm_conv = nn.Conv2d(part, part, (n, m), 1, (n // 2, m // 2))
            self.nn_conv = nn.Conv2d(part, part, (n, n), 1, (n // 2, n // 2))
        else:
            self.conv = nn.Conv2d(part, part, kernel, 1, kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head, rest = x[:, :self.part], x[:, self.part:]
        if self.rect:
            head = self.mn_conv(head) + self.nm_conv(head) + self.nn_conv(head)
        else:
            head = self.conv(head)
        return torch.cat((head, rest), dim=1)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of (N, C, H, W), eps 1e-6."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * ((x - mean) / torch.sqrt(var + 1e-6)) + self.bias[:, None, None]


class _Attention(nn.Module):
    """``attn``: x · sigmoid(conv3x3 x), the conv at ``f.0``."""

    def __init__(self, dim: int):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.f(x))


#: The channel mixers: kernel of the first conv, of the second, and the activation between.
MIXERS = {"CCM": (3, 1, "gelu"), "ICCM": (1, 3, "gelu"), "DCCM": (3, 3, "gelu"), "Real": (3, 3, "mish")}


def _mixer(dim: int, kind: str) -> nn.Sequential:
    k1, k2, act = MIXERS[kind]
    return nn.Sequential(nn.Conv2d(dim, 2 * dim, k1, 1, k1 // 2), nn.GELU() if act == "gelu" else nn.Mish(),
                         nn.Conv2d(2 * dim, dim, k2, 1, k2 // 2))


class PLKBlock(nn.Module):
    """PLKSR's block (``mixer`` "CCM", "ICCM" or "DCCM") or RealPLKSR's (``mixer`` "Real", with
    ``norm`` "group" after the 1x1 conv or "layer" before the mixer)."""

    def __init__(self, dim: int, *, mixer: str, part: int, kernel: int, rect: bool, attention: bool,
                 norm: str = ""):
        super().__init__()
        self.real = mixer == "Real"
        if self.real:
            self.channel_mixer = _mixer(dim, mixer)
        else:
            self.channe_mixer = _mixer(dim, mixer)  # the files' spelling
        self.layer_norm = ChannelLayerNorm(dim) if norm == "layer" else None
        self.lk = LargeKernel(part, kernel, rect=rect)
        self.attn = _Attention(dim) if attention else None
        self.refine = nn.Conv2d(dim, dim, 1)
        self.norm = nn.GroupNorm(4, dim) if norm == "group" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer_norm(x) if self.layer_norm is not None else x
        y = self.lk((self.channel_mixer if self.real else self.channe_mixer)(y))
        if self.attn is not None:
            y = self.attn(y)
        y = self.refine(y)
        if self.norm is not None:
            y = self.norm(y)
        return y + x


class DySample(nn.Module):
    """RealPLKSR's learned upsampler (``to_img``): for each of ``groups`` channel groups and each output
    sub-pixel, an (x, y) offset (``offset`` times sigmoid(``scope``) / 2, plus the sub-pixel's own place)
    moves a bilinear sample of the features (edges clamped), then a 1x1 conv (``end_conv``) makes RGB."""

    def __init__(self, channels: int, scale: int, groups: int, *, end_conv: bool):
        super().__init__()
        self.scale, self.groups = scale, groups
        self.offset = nn.Conv2d(channels, 2 * groups * scale * scale, 1)
        self.scope = nn.Conv2d(channels, 2 * groups * scale * scale, 1, bias=False)
        self.end_conv = nn.Conv2d(channels, 3, 1) if end_conv else None
        # where each sub-pixel sits in its source pixel, in source pixels: x varies along a row, y down
        steps = (torch.arange(scale, dtype=torch.float32) - (scale - 1) / 2) / scale
        place = torch.stack((steps[None, :].expand(scale, scale), steps[:, None].expand(scale, scale)))
        self.register_buffer("place", place.reshape(2, 1, scale * scale).expand(2, groups, scale * scale)
                             .reshape(1, -1, 1, 1).clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        s, g = self.scale, self.groups
        offset = self.offset(x) * torch.sigmoid(self.scope(x)) * 0.5 + self.place.to(x.dtype)
        offset = offset.view(b, 2, g * s * s, h, w)
        ys, xs = torch.meshgrid(torch.arange(h, device=x.device, dtype=x.dtype) + 0.5,
                                torch.arange(w, device=x.device, dtype=x.dtype) + 0.5, indexing="ij")
        centres = torch.stack((xs, ys)).view(1, 2, 1, h, w)
        size = torch.tensor([w, h], device=x.device, dtype=x.dtype).view(1, 2, 1, 1, 1)
        grid = 2 * (centres + offset) / size - 1  # (B, 2, G·s², H, W) in grid_sample's [-1, 1]
        grid = F.pixel_shuffle(grid.reshape(b, -1, h, w), s).view(b, 2, g, s * h, s * w)
        grid = grid.permute(0, 2, 3, 4, 1).reshape(b * g, s * h, s * w, 2)
        out = F.grid_sample(x.reshape(b * g, c // g, h, w), grid, mode="bilinear", align_corners=False,
                            padding_mode="border").view(b, c, s * h, s * w)
        return self.end_conv(out) if self.end_conv is not None else out


class PLKSR(nn.Module):
    """PLKSR or RealPLKSR: ``feats`` (a 3x3 conv, ``blocks``, for RealPLKSR a weightless dropout slot,
    a 3x3 conv to 3·scale²) plus the input repeated scale² times, then ``to_img`` (pixel shuffle, or
    DySample with ``dysample``)."""

    def __init__(self, *, dim: int, blocks: int, scale: int, mixer: str, part: int, kernel: int,
                 rect: bool = False, attention: bool = True, norm: str = "", dysample: bool = False):
        super().__init__()
        self.scale = scale
        layers: list[nn.Module] = [nn.Conv2d(3, dim, 3, 1, 1)]
        layers += [PLKBlock(dim, mixer=mixer, part=part, kernel=kernel, rect=rect, attention=attention, norm=norm)
                   for _ in range(blocks)]
        if mixer == "Real":
            layers.append(nn.Identity())  # the original's dropout, off in inference
        layers.append(nn.Conv2d(dim, 3 * scale * scale, 3, 1, 1))
        self.feats = nn.Sequential(*layers)
        if dysample:
            self.to_img: nn.Module = DySample(3 * scale * scale, scale, 3 if scale % 2 else 4, end_conv=scale != 1)
        else:
            self.to_img = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_img(self.feats(x) + torch.repeat_interleave(x, self.scale * self.scale, dim=1))


# --------------------------------------------------------------------------------------------- RCAN


class _ChannelAttention(nn.Module):
    """``conv_du``: global average, 1x1 to dim/reduction, ReLU, 1x1 back, sigmoid; the features times it."""

    def __init__(self, dim: int, reduced: int):
        super().__init__()
        self.conv_du = nn.Sequential(nn.Conv2d(dim, reduced, 1), nn.ReLU(), nn.Conv2d(reduced, dim, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.conv_du(x.mean(dim=(2, 3), keepdim=True))


class _RCAB(nn.Module):
    """Residual channel-attention block: conv, ReLU, conv, channel attention, plus the input."""

    def __init__(self, dim: int, kernel: int, reduced: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim, kernel, 1, kernel // 2), nn.ReLU(),
                                  nn.Conv2d(dim, dim, kernel, 1, kernel // 2), _ChannelAttention(dim, reduced))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + x


class _ResidualGroup(nn.Module):
    """Blocks then a conv, plus the group's input."""

    def __init__(self, dim: int, kernel: int, reduced: int, blocks: int):
        super().__init__()
        self.body = nn.Sequential(*(_RCAB(dim, kernel, reduced) for _ in range(blocks)),
                                  nn.Conv2d(dim, dim, kernel, 1, kernel // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + x


class RCAN(nn.Module):
    """RCAN (Zhang et al. 2018, "Residual Channel Attention Networks"): a conv (after a pixel unshuffle in the
    "unshuffle" 1x/2x variant), residual groups and a conv plus that conv's output, a pixel-shuffle upsampler
    (``factors``) and a last conv. With ``norm`` the picture is scaled to 0-255 and the files' own 1x1 mean
    shifts (``sub_mean``, ``add_mean``) run around the network, as the original's; without it, 0-1 values go
    through. The unshuffled input is padded to the factor by reflection and the output cropped back."""

    def __init__(self, *, dim: int, groups: int, blocks: int, kernel: int, reduced: int, factors: list[int],
                 norm: bool, unshuffle: int = 1):
        super().__init__()
        self.unshuffle = unshuffle
        self.scale = math.prod(factors) // unshuffle
        self.range = 255.0 if norm else 1.0
        if norm:
            self.sub_mean = nn.Conv2d(3, 3, 1)
            self.add_mean = nn.Conv2d(3, 3, 1)
        head: list[nn.Module] = [nn.PixelUnshuffle(unshuffle)] if unshuffle > 1 else []
        head.append(nn.Conv2d(3 * unshuffle * unshuffle, dim, kernel, 1, kernel // 2))
        self.head = nn.Sequential(*head)
        self.body = nn.Sequential(*(_ResidualGroup(dim, kernel, reduced, blocks) for _ in range(groups)),
                                  nn.Conv2d(dim, dim, kernel, 1, kernel // 2))
        stages: list[nn.Module] = []
        for f in factors:
            stages += [nn.Conv2d(dim, f * f * dim, 3, 1, 1), nn.PixelShuffle(f)]
        self.tail = nn.Sequential(nn.Sequential(*stages), nn.Conv2d(dim, 3, kernel, 1, kernel // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.unshuffle > 1:
            x = pad_to_multiple(x, self.unshuffle)
        x = x * self.range
        if self.range != 1.0:
            x = self.sub_mean(x)
        feat = self.head(x)
        out = self.tail(self.body(feat) + feat)
        if self.range != 1.0:
            out = self.add_mean(out)
        return (out / self.range)[..., : h * self.scale, : w * self.scale]


# --------------------------------------------------------------------------------------------- MoSR


class _GatedBlock(nn.Module):
    """MoSR's block (MambaOut's gated CNN): a channel LayerNorm, a 3x3 conv to two halves of ``hidden``;
    the second half's last ``conv_channels`` through a depthwise conv; Mish(first) x that second half,
    a 3x3 conv back, Mish; plus the block input minus 0.5 (as the original adds it)."""

    def __init__(self, dim: int, hidden: int, conv_channels: int, kernel: int):
        super().__init__()
        self.split = (hidden, hidden - conv_channels, conv_channels)
        self.norm = ChannelLayerNorm(dim)
        self.fc1 = nn.Conv2d(dim, 2 * hidden, 3, 1, 1)
        self.conv = nn.Conv2d(conv_channels, conv_channels, kernel, 1, kernel // 2, groups=conv_channels)
        self.fc2 = nn.Conv2d(hidden, dim, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, i, c = torch.split(self.fc1(self.norm(x)), self.split, dim=1)
        y = F.mish(self.fc2(F.mish(g) * torch.cat((i, self.conv(c)), dim=1)))
        return y + (x - 0.5)


class _ShortcutBlock(nn.Module):
    """MoSR's ``shortcut``: conv, Mish, conv, Mish, plus a 1x1 conv of the input."""

    def __init__(self, dim: int):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, dim, 3, 1, 1), nn.Mish(), nn.Conv2d(dim, dim, 3, 1, 1), nn.Mish())
        self.conv11 = nn.Conv2d(3, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) + self.conv11(x)


class _GeoShuffle(nn.Module):
    """MoSR's "gps" upsampler: a conv to 8 versions of every sub-pixel, their mean, a pixel shuffle."""

    def __init__(self, dim: int, scale: int, kernel: int):
        super().__init__()
        self.scale = scale
        self.in_to_k = nn.Conv2d(dim, scale * scale * 3 * 8, kernel, 1, kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.in_to_k(x)
        y = y.reshape(y.shape[0], 8, -1, *y.shape[-2:]).mean(dim=1)
        return F.pixel_shuffle(y, self.scale)


class MoSR(nn.Module):
    """MoSR ("Mamba Out Super-Resolution"): ``gblocks`` (a 3x3 conv, gated blocks, then conv-Mish-conv-Mish and a
    1x1 conv) plus the shortcut branch minus 0.5, then the upsampler: "ps" (conv and pixel shuffle), "gps"
    (:class:`_GeoShuffle`) or "dys" (:class:`DySample` with 4 groups)."""

    def __init__(self, *, dim: int, blocks: int, hidden: int, conv_channels: int, kernel: int, scale: int,
                 upsampler: str, gps_kernel: int = 3):
        super().__init__()
        self.scale = scale
        self.gblocks = nn.Sequential(
            nn.Conv2d(3, dim, 3, 1, 1), *(_GatedBlock(dim, hidden, conv_channels, kernel) for _ in range(blocks)),
            nn.Conv2d(dim, 2 * dim, 3, 1, 1), nn.Mish(), nn.Conv2d(2 * dim, dim, 3, 1, 1), nn.Mish(),
            nn.Conv2d(dim, dim, 1))
        self.shortcut = _ShortcutBlock(dim)
        if upsampler == "ps":
            self.upsampler: nn.Module = nn.Sequential(nn.Conv2d(dim, 3 * scale * scale, 3, 1, 1),
                                                      nn.PixelShuffle(scale))
        elif upsampler == "gps":
            self.upsampler = _GeoShuffle(dim, scale, gps_kernel)
        else:
            self.upsampler = DySample(dim, scale, 4, end_conv=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsampler(self.gblocks(x) + (self.shortcut(x) - 0.5))
