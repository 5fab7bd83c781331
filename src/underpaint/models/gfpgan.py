"""GFPGAN v1.3/v1.4 (Wang et al., 2021, "Towards Real-World Blind Face Restoration with Generative
Facial Prior"): the face restorer A1111's "Restore faces" runs with its GFPGAN setting.

The network is a U-Net whose encoder turns a 512² aligned face into StyleGAN2 style codes (one per
layer) and whose decoder features steer a StyleGAN2 generator through spatial feature transforms:
each generator level's output is, on half its channels, ``out * scale + shift`` with ``scale`` and
``shift`` computed from the U-Net decoder at that resolution ("SFT half"). The layers here carry the
tensor names of the released ``GFPGANv1.4.pth`` (its ``params_ema``), and every width is read from the
file, so other sizes of the same design load too.

Inference only. The generator's noise inputs are the file's stored noise maps (``noises.noise{i}``), so
a face restores the same way every time (the authors' code draws new noise per call by default).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ModelError

__all__ = ["GFPGAN", "GFPGANConfig", "gfpgan_config", "is_gfpgan"]

#: Keys only a GFPGAN (clean v1.3/v1.4) state dict has.
_MARKERS = ("toRGB.0.weight", "stylegan_decoder.style_mlp.1.weight", "final_linear.weight")


def is_gfpgan(names) -> bool:
    return all(m in names for m in _MARKERS)


def _leaky(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


def _resize(x: torch.Tensor, factor: float) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


class _ResampleBlock(nn.Module):
    """conv → resize (×2 or ×½, bilinear) → conv, beside a 1x1 projection of the resized input."""

    def __init__(self, c_in: int, c_out: int, factor: float):
        super().__init__()
        self.factor = factor
        self.conv1 = nn.Conv2d(c_in, c_in, 3, 1, 1)
        self.conv2 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _leaky(self.conv2(_resize(_leaky(self.conv1(x)), self.factor)))
        return out + self.skip(_resize(x, self.factor))


class _ModulatedConv(nn.Module):
    """StyleGAN2's weight (de)modulation: the kernel scaled per input channel by the style, then
    (when ``demodulate``) normalised per output channel; one grouped convolution for the batch."""

    def __init__(self, c_in: int, c_out: int, kernel: int, style_dim: int, *, demodulate: bool, up: bool = False):
        super().__init__()
        self.c_out, self.kernel, self.demodulate, self.up = c_out, kernel, demodulate, up
        self.modulation = nn.Linear(style_dim, c_in)
        self.weight = nn.Parameter(torch.empty(1, c_out, c_in, kernel, kernel))

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        b, c_in = x.shape[:2]
        weight = self.weight * self.modulation(style).view(b, 1, c_in, 1, 1)
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum(dim=(2, 3, 4)) + 1e-8).view(b, self.c_out, 1, 1, 1)
        if self.up:
            x = _resize(x, 2)
        h, w = x.shape[2:]
        out = F.conv2d(x.reshape(1, b * c_in, h, w), weight.reshape(b * self.c_out, c_in, self.kernel, self.kernel),
                       padding=self.kernel // 2, groups=b)
        return out.view(b, self.c_out, *out.shape[2:])


class _StyleLayer(nn.Module):
    """Modulated 3x3 conv (×√2), plus the scaled noise map and a bias, then leaky ReLU."""

    def __init__(self, c_in: int, c_out: int, style_dim: int, *, up: bool):
        super().__init__()
        self.modulated_conv = _ModulatedConv(c_in, c_out, 3, style_dim, demodulate=True, up=up)
        self.weight = nn.Parameter(torch.zeros(1))  # the noise's strength
        self.bias = nn.Parameter(torch.zeros(1, c_out, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        out = self.modulated_conv(x, style) * math.sqrt(2) + self.weight * noise
        return _leaky(out + self.bias)


class _ToRGB(nn.Module):
    def __init__(self, c_in: int, style_dim: int, *, up: bool):
        super().__init__()
        self.up = up
        self.modulated_conv = _ModulatedConv(c_in, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.modulated_conv(x, style) + self.bias
        if skip is not None:
            out = out + (_resize(skip, 2) if self.up else skip)
        return out


class _ConstantInput(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, channels, 4, 4))


class _StyleGenerator(nn.Module):
    """StyleGAN2's synthesis network, its features modulated by the U-Net's SFT conditions."""

    def __init__(self, cfg: "GFPGANConfig"):
        super().__init__()
        d = cfg.style_dim
        layers: list[nn.Module] = []
        for _ in range(cfg.style_mlp_layers):  # kept for the file's names; styles arrive as latents
            layers += [nn.Linear(d, d), nn.LeakyReLU(0.2)]
        self.style_mlp = nn.Sequential(nn.Identity(), *layers)
        widths = cfg.decoder_widths  # resolution 4, 8, ..., size
        self.constant_input = _ConstantInput(widths[0])
        self.style_conv1 = _StyleLayer(widths[0], widths[0], d, up=False)
        self.to_rgb1 = _ToRGB(widths[0], d, up=False)
        self.style_convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            self.style_convs.append(_StyleLayer(c_in, c_out, d, up=True))
            self.style_convs.append(_StyleLayer(c_out, c_out, d, up=False))
            self.to_rgbs.append(_ToRGB(c_out, d, up=True))
        self.noises = nn.Module()
        for i in range(2 * len(widths) - 1):
            side = 2 ** ((i + 5) // 2)
            self.noises.register_buffer(f"noise{i}", torch.empty(1, 1, side, side))

    def forward(self, latent: torch.Tensor, conditions: list[torch.Tensor]) -> torch.Tensor:
        noise = [getattr(self.noises, f"noise{i}") for i in range(2 * len(self.to_rgbs) + 1)]
        out = self.constant_input.weight.repeat(latent.shape[0], 1, 1, 1)
        out = self.style_conv1(out, latent[:, 0], noise[0])
        skip = self.to_rgb1(out, latent[:, 1])
        for level, to_rgb in enumerate(self.to_rgbs):
            i = 2 * level + 1
            out = self.style_convs[2 * level](out, latent[:, i], noise[i])
            if i < len(conditions):  # SFT on the second half of the channels
                kept, steered = out.chunk(2, dim=1)
                out = torch.cat([kept, steered * conditions[i - 1] + conditions[i]], dim=1)
            out = self.style_convs[2 * level + 1](out, latent[:, i + 1], noise[i + 1])
            skip = to_rgb(out, latent[:, i + 2], skip)
        return skip


@dataclass(frozen=True)
class GFPGANConfig:
    """GFPGAN's sizes, as read from a state dict."""

    #: The face's side (512 for the released models).
    size: int
    style_dim: int
    style_mlp_layers: int
    #: U-Net widths at resolutions size, size/2, ..., 4 (encoder), and the generator's at 4, 8, ..., size.
    unet_widths: tuple[int, ...]
    decoder_widths: tuple[int, ...]

    @property
    def levels(self) -> int:
        return len(self.unet_widths) - 1  # the resampling steps between size and 4


def gfpgan_config(sd: Mapping[str, torch.Tensor], source: str = "GFPGAN") -> GFPGANConfig:
    """The sizes of the GFPGAN in ``sd`` (raises :class:`ModelError` when it is not one)."""
    if not is_gfpgan(sd):
        raise ModelError(f"{source}: not a GFPGAN model (expected {', '.join(_MARKERS)})")
    downs = sorted({int(m.group(1)) for k in sd if (m := re.match(r"conv_body_down\.(\d+)\.", k))})
    if not downs or downs != list(range(len(downs))):
        raise ModelError(f"{source}: GFPGAN's encoder blocks (conv_body_down.*) are missing or out of order")
    n = len(downs)
    unet = [sd["conv_body_first.weight"].shape[0]] + [sd[f"conv_body_down.{i}.conv2.weight"].shape[0] for i in range(n)]
    decoder = [sd["stylegan_decoder.style_conv1.modulated_conv.weight"].shape[1]] + [
        sd[f"stylegan_decoder.style_convs.{2 * i}.modulated_conv.weight"].shape[1] for i in range(n)]
    style_dim = sd["stylegan_decoder.style_mlp.1.weight"].shape[0]
    mlp = len([k for k in sd if re.fullmatch(r"stylegan_decoder\.style_mlp\.\d+\.weight", k)])
    size = 4 * 2 ** n
    latents = 2 * int(math.log2(size)) - 2
    if sd["final_linear.weight"].shape[0] != latents * style_dim:
        raise ModelError(f"{source}: GFPGAN with one style code for all layers is not supported "
                         "(the released v1.3/v1.4 models have one per layer)")
    if sd["condition_scale.0.2.weight"].shape[0] != sd["condition_scale.0.0.weight"].shape[0]:
        raise ModelError(f"{source}: GFPGAN with SFT on all channels is not supported (v1.3/v1.4 steer half)")
    return GFPGANConfig(size=size, style_dim=style_dim, style_mlp_layers=mlp, unet_widths=tuple(unet),
                        decoder_widths=tuple(decoder))


class GFPGAN(nn.Module):
    """GFPGAN v1 "clean": ``forward(face)`` takes RGB faces in [-1, 1], ``[B, 3, size, size]``, aligned to
    FFHQ's 5-point template, and returns the restored faces in the same range (unclamped)."""

    def __init__(self, cfg: GFPGANConfig):
        super().__init__()
        self.cfg = cfg
        u = cfg.unet_widths  # size, size/2, ..., 4
        self.conv_body_first = nn.Conv2d(3, u[0], 1)
        self.conv_body_down = nn.ModuleList(_ResampleBlock(a, b, 0.5) for a, b in zip(u[:-1], u[1:]))
        self.final_conv = nn.Conv2d(u[-1], u[-1], 3, 1, 1)
        up = u[::-1]  # 4, 8, ..., size
        self.conv_body_up = nn.ModuleList(_ResampleBlock(a, b, 2) for a, b in zip(up[:-1], up[1:]))
        self.toRGB = nn.ModuleList(nn.Conv2d(c, 3, 1) for c in up[1:])  # the file's own name
        latents = 2 * int(math.log2(cfg.size)) - 2
        self.final_linear = nn.Linear(u[-1] * 16, latents * cfg.style_dim)
        self.stylegan_decoder = _StyleGenerator(cfg)

        def condition(c: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(c, c, 3, 1, 1))

        self.condition_scale = nn.ModuleList(condition(c) for c in up[1:])
        self.condition_shift = nn.ModuleList(condition(c) for c in up[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = _leaky(self.conv_body_first(x))
        skips = []
        for block in self.conv_body_down:
            feat = block(feat)
            skips.insert(0, feat)
        feat = _leaky(self.final_conv(feat))
        latent = self.final_linear(feat.flatten(1)).view(x.shape[0], -1, self.cfg.style_dim)
        conditions = []
        for skip, block, scale, shift in zip(skips, self.conv_body_up, self.condition_scale, self.condition_shift):
            feat = block(feat + skip)
            conditions += [scale(feat), shift(feat)]
        return self.stylegan_decoder(latent, conditions)


def load_gfpgan(sd: Mapping[str, torch.Tensor], source: str = "GFPGAN") -> GFPGAN:
    """A GFPGAN built from and holding ``sd``'s tensors (``params_ema`` already unwrapped), in eval mode."""
    from .loader import _assign

    cfg = gfpgan_config(sd, source)
    with torch.device("meta"):
        module = GFPGAN(cfg)
    return _assign(module, dict(sd), source, torch.device("cpu"), torch.float32)
