"""Inpainting masks: loading, the input's alpha, invert, A1111's mask blur, resizing to the picture.

A mask is a greyscale ("L") picture: white (255) means "repaint", black (0) means "keep", and
grey levels are partial (a blurred edge, or a soft mask). The conventions follow
AUTOMATIC1111 1.10's img2img: an RGBA mask with transparency uses its alpha channel (the
painted strokes are opaque), anything else is converted to greyscale; the blur is a separable
Gaussian with its own sigma per axis, run horizontally then vertically, each pass rounded to
8 bits, with the kernel size ``2 * int(2.5 * sigma + 0.5) + 1`` and OpenCV's default
reflect-101 border.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import ImageError, InvalidParameter

#: A1111's threshold when an RGBA mask's alpha is rounded to black and white: ``alpha > 128``.
ALPHA_THRESHOLD = 128


class MaskResizedWarning(UserWarning):
    """The mask's size differs from the picture's; it was resized to fit."""


def load_mask(source: str | Path | bytes | Image.Image, *, field: str = "mask", round_alpha: bool = True) -> Image.Image:
    """A mask from a file, bytes or a picture, as a greyscale image (white = repaint)."""
    if isinstance(source, Image.Image):
        image = source
    else:
        from .load import load_image

        image = load_image(source, field=field)
    return to_mask(image, round_alpha=round_alpha)


def to_mask(image: Image.Image, *, round_alpha: bool = True) -> Image.Image:
    """A1111's ``create_binary_mask``: transparency → the alpha channel, otherwise greyscale.

    An RGBA mask that is not fully opaque is a painted layer: its alpha is the mask, rounded to
    0/255 at ``> 128`` unless ``round_alpha`` is off (soft inpainting keeps the grey levels).
    Any other picture is converted to greyscale with Pillow's ITU-R 601 luma, as A1111 does.
    """
    if image.mode in ("LA", "La", "PA", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        alpha = image.getchannel("A")
        if alpha.getextrema() != (255, 255):
            if round_alpha:
                return alpha.point(lambda v: 255 if v > ALPHA_THRESHOLD else 0)
            return alpha.copy()
    if image.mode == "L":
        return image.copy()
    return image.convert("L")


def mask_from_alpha(image: Image.Image, *, field: str = "image") -> Image.Image:
    """The repaint mask of a picture with transparency: transparent pixels (alpha 0) are repainted.

    This is the eraser workflow of image editors: rub out what should change, save as PNG. The
    grey levels of a partly transparent pixel are kept (255 - alpha).
    """
    if image.mode not in ("RGBA", "LA", "La", "RGBa", "PA") and "transparency" not in image.info:
        raise ImageError(
            f"{field}: has no alpha channel ({image.mode}), expected a picture with transparent "
            "pixels to use as the mask (or pass a mask file)",
            field=field,
        )
    return ImageOps.invert(image.convert("RGBA").getchannel("A"))


def invert_mask(mask: Image.Image) -> Image.Image:
    """A1111's "Inpaint not masked": repaint everything except the painted area."""
    return ImageOps.invert(_grey(mask))


def blur_kernel_size(sigma: float) -> int:
    """A1111's Gaussian kernel width for a mask blur of ``sigma``: ``2 * int(2.5 σ + 0.5) + 1``."""
    return 2 * int(2.5 * sigma + 0.5) + 1


def gaussian_weights(sigma: float) -> np.ndarray:
    """The normalised 1-D Gaussian of width :func:`blur_kernel_size` (OpenCV's ``getGaussianKernel``)."""
    radius = blur_kernel_size(sigma) // 2
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return weights / weights.sum()


def blur_mask(mask: Image.Image, sigma_x: float, sigma_y: float | None = None) -> Image.Image:
    """A1111's mask blur: a horizontal then a vertical Gaussian pass, each rounded to 8 bits.

    A sigma of 0 skips that pass. Borders mirror without repeating the edge pixel (OpenCV's
    default ``BORDER_REFLECT_101``), so a mask touching the picture's edge stays solid there.
    """
    sigma_y = sigma_x if sigma_y is None else sigma_y
    for name, value in (("mask_blur_x", sigma_x), ("mask_blur_y", sigma_y)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 256:
            raise InvalidParameter(name, value, "a blur radius from 0 to 256 pixels")
    values = np.asarray(_grey(mask), dtype=np.uint8)
    if sigma_x > 0:
        values = _blur_axis(values, sigma_x, axis=1)
    if sigma_y > 0:
        values = _blur_axis(values, sigma_y, axis=0)
    return Image.fromarray(values, "L")


def _blur_axis(values: np.ndarray, sigma: float, *, axis: int) -> np.ndarray:
    """One Gaussian pass along ``axis`` of a uint8 array, rounded back to uint8."""
    import torch
    import torch.nn.functional as F

    weights = gaussian_weights(sigma)
    radius = len(weights) // 2
    rows = values if axis == 1 else values.T
    # numpy's "reflect" is reflect-101 and, unlike torch's, allows pads wider than the picture.
    padded = np.pad(rows.astype(np.float64), ((0, 0), (radius, radius)), mode="reflect")
    signal = torch.from_numpy(padded).unsqueeze(1)  # [rows, 1, width + 2r]
    kernel = torch.from_numpy(weights[::-1].copy()).view(1, 1, -1)
    out = F.conv1d(signal, kernel).squeeze(1).numpy()
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out if axis == 1 else np.ascontiguousarray(out.T)


def fit_mask(mask: Image.Image, size: tuple[int, int], resize_mode: int = 0) -> Image.Image:
    """The mask at the picture's size: unchanged if it fits, else resized with a warning.

    The resize uses the request's resize mode, as A1111 resizes the mask beside the picture,
    so a mask drawn on a scaled copy of the picture still lines up.
    """
    mask = _grey(mask)
    if mask.size == tuple(size):
        return mask
    from .resize import resize_image

    warn_if_resized(mask, size, resize_mode, stacklevel=3)
    return resize_image(mask, size[0], size[1], resize_mode)


def warn_if_resized(mask: Image.Image, size: tuple[int, int], resize_mode: int = 0, *, stacklevel: int = 2) -> None:
    """Warn (:class:`MaskResizedWarning`) when the mask's size is not the picture's, so it will be resized."""
    if mask.size == tuple(size):
        return
    from .resize import RESIZE_MODE_NAMES

    warnings.warn(
        f"mask is {mask.width}x{mask.height} but the picture is {size[0]}x{size[1]}: "
        f"resized the mask ({RESIZE_MODE_NAMES.get(resize_mode, resize_mode)})",
        MaskResizedWarning,
        stacklevel=stacklevel + 1,
    )


def mask_box(mask: Image.Image) -> tuple[int, int, int, int] | None:
    """The bounding box ``(x1, y1, x2, y2)`` (end exclusive) of the non-black pixels, or None."""
    return _grey(mask).getbbox()


def is_empty(mask: Image.Image) -> bool:
    """True when nothing is to be repainted (every pixel black)."""
    return mask_box(mask) is None


def is_full(mask: Image.Image) -> bool:
    """True when everything is to be repainted (every pixel white)."""
    return _grey(mask).getextrema()[0] == 255


def _grey(mask: Image.Image) -> Image.Image:
    return mask if mask.mode == "L" else mask.convert("L")
