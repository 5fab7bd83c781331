"""Real-CUGAN: bilibili's anime upscaler (UpCunet 2x, 3x and 4x, the "pro" models and the 2x "fast"
network), written as plain modules.

The files are those of bilibili's Real-CUGAN release (``up2x-latest-conservative.pth``,
``up3x-latest-denoise3x.pth``, ``up4x-latest-no-denoise.pth``, ``pro-denoise3x-up2x.pth``, ...) and of
models trained with its code; A1111, Forge and ComfyUI read them through spandrel. The module's tensor
names are the files' own, so they load unchanged. Nothing in them is a hyper-parameter but the scale:
the widths are constants of the architecture.

The network is two U-Nets in a row. Every conv is unpadded ("valid"), so each skip connection is
cropped to what the deeper path gives back, and the picture is padded by reflection beforehand and the
result cropped. A level's pair of 3x3 convs (``convN.conv.0``, ``.conv.2``) is followed each time by
LeakyReLU 0.1 and, below the first level, by a squeeze-and-excitation gate (``seblock``: the channel
means through a 1x1 conv to an eighth of the channels, ReLU, a 1x1 conv back and a sigmoid weight the
channels). Levels go down by a 2x2 stride-2 conv and back up by a 2x2 stride-2 transposed conv, each
followed by LeakyReLU 0.1.

- ``unet1``: two levels (32 → 64 channels, then 128 → 64 with the gate), a 3x3 conv, then the transposed
  conv that enlarges: kernel 4, stride 2, padding 3 (x2) or kernel 5, stride 3, padding 2 (x3).
- ``unet2``: three levels (32 → 64, 64 → 128, 256 → 128 at the bottom, 64 → 64 on the way up), a 3x3
  conv and a 3x3 conv out; its output is added to its input cropped by 20 px a side.

The variants, told apart by their tensors as spandrel tells them:

- **2x** (UpCunet2x): both U-Nets give RGB; the picture is padded by 18 px a side (plus one on the right
  or bottom where a side is odd).
- **3x** (UpCunet3x): ``unet1`` ends in the x3 transposed conv (``unet1.conv_bottom`` 5x5); 14 px a side,
  plus up to 3 to make the sides multiples of 4.
- **4x** (UpCunet4x): both U-Nets keep 64 channels at twice the size; a 3x3 conv (``conv_final``) to
  4 x 3 channels, cropped by 1 px a side and pixel-shuffled by 2, is added to the nearest-upsampled
  picture; 19 px a side (plus one where a side is odd).
- **2x fast** (UpCunet2x_fast): the 4x frame on a pixel-unshuffled picture (``unet1`` takes 12
  channels at half the size), so the result is 2x, plus the nearest-upsampled picture; 38 px a side.
- **pro** models (2x, 3x, 4x; the file holds a ``pro`` entry, a marker rather than a weight) were trained
  on values in 0.15-0.85: the picture goes in as x · 0.7 + 0.15 and the result comes back as
  (y - 0.15) / 0.7.

Pictures under 32 px a side (the fast network: 40, and the sides multiples of 4, which its unshuffled
half-size levels need) are first padded on the right and bottom, by reflection as far as the picture
allows and by replication beyond, as spandrel pads the input it hands these networks (their own
reflection padding needs a picture at least that large); that padding is cropped off the result too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from .upscaler_swin import pad_edges

if TYPE_CHECKING:
    from .upscaler import _Plan

#: The architecture's name in :func:`underpaint.models.upscaler.detect_upscaler` (spandrel's id).
ARCH_CUGAN = "RealCUGAN"
#: How errors and descriptions name it.
CUGAN_NAME = "Real-CUGAN"

#: The slope of every LeakyReLU.
_SLOPE = 0.1
#: The "pro" models' input range: x · _PRO_GAIN + _PRO_OFFSET in, undone on the way out.
_PRO_GAIN, _PRO_OFFSET = 0.7, 0.15
#: The smallest side these networks are handed (spandrel's size requirements): the fast network's is
#: larger and its sides must be multiples of 4.
_MINIMUM, _FAST_MINIMUM, _FAST_MULTIPLE = 32, 40, 4


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, _SLOPE)


def _crop(x: torch.Tensor, border: int) -> torch.Tensor:
    """``x`` without ``border`` px on each side."""
    return x[..., border:-border, border:-border]


def _fit(x: torch.Tensor, minimum: int, multiple: int) -> torch.Tensor:
    """Pad right and bottom to at least ``minimum`` px a side and a multiple of ``multiple``: by
    reflection up to one pixel less than the side (as far as reflection reaches), then by replication."""
    h, w = x.shape[-2:]
    return pad_edges(x, -(-max(h, minimum) // multiple) * multiple, -(-max(w, minimum) // multiple) * multiple)


# --------------------------------------------------------------------------------------------- modules


class _SqueezeExcite(nn.Module):
    """``seblock``: each channel weighted by sigmoid(conv2(ReLU(conv1(its mean)))), ``conv1`` to an eighth
    of the channels. The means are taken in float32 (the original does so for half precision)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels // 8, 1)
        self.conv2 = nn.Conv2d(channels // 8, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.float().mean(dim=(2, 3), keepdim=True).to(x.dtype)
        return x * torch.sigmoid(self.conv2(F.relu(self.conv1(mean))))


class _ConvPair(nn.Module):
    """A level's convs (``conv.0``, ``conv.2``): two unpadded 3x3 convs, each followed by LeakyReLU 0.1,
    so 2 px less a side; then the channel gate where ``gate``."""

    def __init__(self, c_in: int, mid: int, c_out: int, *, gate: bool):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c_in, mid, 3), nn.LeakyReLU(_SLOPE),
                                  nn.Conv2d(mid, c_out, 3), nn.LeakyReLU(_SLOPE))
        self.seblock = _SqueezeExcite(c_out) if gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.seblock(x) if self.seblock is not None else x


class _UNet1(nn.Module):
    """``unet1``: two levels and a 3x3 conv, then a transposed conv enlarging by ``factor`` (2 or 3) to
    ``c_out`` channels. Takes a side of n (n - 4 even) to ``factor`` x (n - 14) - 4 (x2) or - 2 (x3)."""

    def __init__(self, c_in: int, c_out: int, factor: int):
        super().__init__()
        self.conv1 = _ConvPair(c_in, 32, 64, gate=False)
        self.conv1_down = nn.Conv2d(64, 64, 2, 2)
        self.conv2 = _ConvPair(64, 128, 64, gate=True)
        self.conv2_up = nn.ConvTranspose2d(64, 64, 2, 2)
        self.conv3 = nn.Conv2d(64, 64, 3)
        kernel, padding = (4, 3) if factor == 2 else (5, 2)
        self.conv_bottom = nn.ConvTranspose2d(64, c_out, kernel, factor, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = self.conv1(x)
        low = _lrelu(self.conv2_up(self.conv2(_lrelu(self.conv1_down(top)))))
        return self.conv_bottom(_lrelu(self.conv3(_crop(top, 4) + low)))


class _UNet2(nn.Module):
    """``unet2``: three levels, a 3x3 conv and a 3x3 conv to ``c_out`` channels. Takes a side of n
    (n - 4 and n / 2 - 6 even) to n - 40, the crop the caller adds its input with."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = _ConvPair(c_in, 32, 64, gate=False)
        self.conv1_down = nn.Conv2d(64, 64, 2, 2)
        self.conv2 = _ConvPair(64, 64, 128, gate=True)
        self.conv2_down = nn.Conv2d(128, 128, 2, 2)
        self.conv3 = _ConvPair(128, 256, 128, gate=True)
        self.conv3_up = nn.ConvTranspose2d(128, 128, 2, 2)
        self.conv4 = _ConvPair(128, 64, 64, gate=True)
        self.conv4_up = nn.ConvTranspose2d(64, 64, 2, 2)
        self.conv5 = nn.Conv2d(64, 64, 3)
        self.conv_bottom = nn.Conv2d(64, c_out, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = self.conv1(x)
        middle = self.conv2(_lrelu(self.conv1_down(top)))
        bottom = self.conv3(_lrelu(self.conv2_down(middle)))
        middle = self.conv4(_crop(middle, 4) + _lrelu(self.conv3_up(bottom)))
        top = _crop(top, 16) + _lrelu(self.conv4_up(middle))
        return self.conv_bottom(_lrelu(self.conv5(top)))


class RealCUGAN(nn.Module):
    """Real-CUGAN's UpCunet at ``scale`` 2, 3 or 4, or (``fast``) the 2x fast network; ``pro`` for the
    models trained on values in 0.15-0.85. Maps (N, 3, H, W) RGB to (N, 3, H·scale, W·scale), any size."""

    def __init__(self, *, scale: int, fast: bool = False, pro: bool = False):
        super().__init__()
        if scale not in (2, 3, 4) or (fast and (scale != 2 or pro)):
            raise ValueError(f"no Real-CUGAN network of scale {scale}{' (fast)' if fast else ''}"
                             f"{' (pro)' if pro else ''}")
        self.scale, self.fast, self.pro = scale, fast, pro
        #: The reflection padded on every side, and the multiple the sides are made up to (on the right and
        #: bottom, in the same padding).
        self.border = 38 if fast else {2: 18, 3: 14, 4: 19}[scale]
        self.multiple = 4 if scale == 3 else 2
        self.final = fast or scale == 4
        if self.final:
            self.unet1 = _UNet1(12 if fast else 3, 64, 2)
            self.unet2 = _UNet2(64, 64)
            self.conv_final = nn.Conv2d(64, 12, 3)
        else:
            self.unet1 = _UNet1(3, 3, scale)
            self.unet2 = _UNet2(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = _fit(x, _FAST_MINIMUM, _FAST_MULTIPLE) if self.fast else _fit(x, _MINIMUM, 1)
        if self.pro:
            x = x * _PRO_GAIN + _PRO_OFFSET
        fit_h, fit_w = x.shape[-2:]
        b, m = self.border, self.multiple
        # the sides padded up to the multiple on the right and bottom, in the same reflection
        y = F.pad(x, (b, b + (-fit_w) % m, b, b + (-fit_h) % m), mode="reflect")
        if self.fast:
            y = F.pixel_unshuffle(y, 2)
        coarse = self.unet1(y)
        y = self.unet2(coarse) + _crop(coarse, 20)
        if self.final:
            up = 2 if self.fast else 4
            y = F.pixel_shuffle(_crop(self.conv_final(y), 1), 2)[..., : fit_h * up, : fit_w * up]
            y = y + F.interpolate(x, scale_factor=up, mode="nearest")
        if self.pro:
            y = (y - _PRO_OFFSET) / _PRO_GAIN
        return y[..., : h * self.scale, : w * self.scale]


# --------------------------------------------------------------------------------------------- detection


def cugan_plan(sd: Mapping[str, torch.Tensor], source: str) -> _Plan | None:
    """Real-CUGAN's variant from its tensors (None when they are not Real-CUGAN's: both U-Nets' first
    convs mark it), as spandrel reads it: a ``conv_final`` marks the 4x frame, the fast network when
    ``unet1`` takes four times the channels ``conv_final`` gives per sub-pixel (a pixel-unshuffled
    picture); otherwise ``unet1``'s transposed conv (4x4 or 5x5) says 2x or 3x. A ``pro`` entry marks
    the models trained on 0.15-0.85 values; it is not a weight. Refused: other than RGB, and a fast
    network with the pro marker (no such network exists; spandrel cannot load one either)."""
    if "unet1.conv1.conv.0.weight" not in sd or "unet2.conv1.conv.0.weight" not in sd:
        return None
    from .upscaler import _Plan, _rgb_only, _tensor_getter

    tensor = _tensor_getter(sd, source, CUGAN_NAME)
    in_ch = tensor("unet1.conv1.conv.0.weight", 4).shape[1]
    pro = "pro" in sd
    fast = False
    if "conv_final.weight" in sd:
        out_ch = tensor("conv_final.weight", 4).shape[0] // 4
        fast = out_ch * 4 == in_ch
        scale = 2 if fast else 4
        if fast:
            in_ch //= 4
    else:
        kernel = tensor("unet1.conv_bottom.weight", 4).shape[2]
        scale = {4: 2, 5: 3}.get(kernel, 0)
        if not scale:
            raise ModelError(f"{source}: {CUGAN_NAME} unet1.conv_bottom is a {kernel}x{kernel} transposed conv; "
                             "expected 4x4 (2x) or 5x5 (3x)")
        out_ch = tensor("unet2.conv_bottom.weight", 4).shape[0]
    _rgb_only(source, CUGAN_NAME, in_ch, out_ch)
    if fast and pro:
        raise ModelError(f"{source}: {CUGAN_NAME} 2x fast network with a \"pro\" marker is not supported "
                         "(the pro input range is defined for the 2x, 3x and 4x networks only)")
    notes = [note for note, on in (("fast", fast), ("pro", pro)) if on]
    return _Plan(
        arch=ARCH_CUGAN, scale=scale, derived=lambda name: name == "pro",
        describe=f"{CUGAN_NAME} {scale}x" + (f" ({', '.join(notes)})" if notes else ""),
        build=lambda: RealCUGAN(scale=scale, fast=fast, pro=pro),
    )
