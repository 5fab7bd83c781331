"""A1111's "Apply color correction to img2img results to match original colors" (its setting
``img2img_color_correction``; off by default).

Each img2img or inpainting result is brought back to the colours of the picture it started from:

1. the result and the reference (the init picture as the pass prepared it: resized, cropped for
   "only masked", masked content painted in) go to 8-bit CIELAB as OpenCV converts them;
2. each LAB channel of the result gets the reference's histogram (cumulative distributions matched
   with linear interpolation, the values truncated to whole levels, as scikit-image's
   ``match_histograms`` gives them for 8-bit pictures) and goes back to RGB;
3. that picture's colour is given the result's own luminosity (the "Luminosity" blend: luma
   0.299 R + 0.587 G + 0.114 B, out-of-gamut colours pulled back towards their luma; levels
   truncated), so the correction moves hue and saturation and leaves the lighting the model painted.

Inpainting corrects the generated picture before it is pasted back over the original. Loopback
matches every pass to the request's own picture, so the colours cannot drift from pass to pass.
A1111 records nothing of it in the infotext, and neither does underpaint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL.Image import Image


def lab_of(picture: "Image") -> np.ndarray:
    """The picture (flattened to RGB) in 8-bit CIELAB, as OpenCV converts it."""
    import cv2

    return cv2.cvtColor(np.asarray(picture.convert("RGB")), cv2.COLOR_RGB2LAB)


def match_histograms(source: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``source`` (H×W×C, uint8) with each channel's histogram made the reference's: a level's
    cumulative share in the source is looked up in the reference's cumulative shares of the levels
    it has, interpolating linearly, and truncated to a whole level."""
    out = np.empty(source.shape, dtype=np.uint8)
    for c in range(source.shape[-1]):
        levels = source[..., c].reshape(-1)
        src_share = np.cumsum(np.bincount(levels, minlength=256)) / levels.size
        ref_counts = np.bincount(reference[..., c].reshape(-1), minlength=256)
        present = np.flatnonzero(ref_counts)
        ref_share = np.cumsum(ref_counts[present]) / reference[..., c].size
        mapped = np.interp(src_share, ref_share, present.astype(np.float64))
        out[..., c] = mapped.astype(np.uint8)[levels].reshape(source.shape[:-1])
    return out


def luminosity_blend(colour: np.ndarray, light: np.ndarray) -> np.ndarray:
    """``colour``'s hue and saturation with ``light``'s luma (both H×W×3 uint8), in [0, 1] as floats.

    The colour is shifted by the luma difference; a result outside [0, 1] is pulled towards its luma
    until it fits (first where a channel went below 0, then where one went above 1, both judged
    on the shifted colour)."""
    def luma(rgb: np.ndarray) -> np.ndarray:
        return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114

    rgb = colour.astype(np.float64) / 255.0
    shifted = rgb + (luma(light.astype(np.float64) / 255.0) - luma(rgb))[..., None]
    lum = luma(shifted)[..., None]
    low = shifted.min(axis=-1, keepdims=True)
    high = shifted.max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        under = low < 0
        shifted = np.where(under, lum + (shifted - lum) * lum / (lum - low), shifted)
        over = high > 1
        shifted = np.where(over, lum + (shifted - lum) * (1 - lum) / (high - lum), shifted)
    return np.nan_to_num(shifted)


def to_levels(rgb: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] to 8-bit levels, clipped and truncated (the blend library A1111 1.10 pins,
    blendmodes 2022, truncates; later versions round)."""
    return (np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


def correct(picture: "Image", reference_lab: np.ndarray) -> "Image":
    """``picture`` brought to the colours of the reference (:func:`lab_of` of it); RGB."""
    import cv2
    from PIL import Image as PILImage

    rgb = np.asarray(picture.convert("RGB"))
    matched = match_histograms(cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB), reference_lab)
    recoloured = cv2.cvtColor(matched, cv2.COLOR_LAB2RGB)
    return PILImage.fromarray(to_levels(luminosity_blend(recoloured, rgb)), "RGB")
