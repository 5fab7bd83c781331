"""Annotators that need no weights: edges, thresholds, tile, shuffle, inpaint and "none".

Each takes an H x W x 3 uint8 picture and the run's :class:`Params` and returns a uint8 map
(H x W x 3, or H x W x 4 for inpaint's colour + mask), as the sd-webui-controlnet extension's
preprocessors of the same names do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .common import AnnotatorContext, hwc3, opencv, resize_with_pad, to_uint8


@dataclass(frozen=True)
class Params:
    """One preprocessor run: working resolution, the two module-specific thresholds, a seed."""

    res: int = 512
    a: float | None = None
    b: float | None = None
    seed: int = 0
    ctx: AnnotatorContext = field(default_factory=AnnotatorContext)


def none(img: np.ndarray, p: Params) -> np.ndarray:
    """A ready-made control map: used as given."""
    return img


def invert(img: np.ndarray, p: Params) -> np.ndarray:
    """Black lines on white (a drawn sketch) turned into white on black, as the line models expect."""
    return 255 - hwc3(img)


def canny(img: np.ndarray, p: Params) -> np.ndarray:
    """OpenCV's Canny edges (Canny 1986) with low/high hysteresis thresholds (default 100/200)."""
    cv2 = opencv()

    padded = resize_with_pad(img, p.res)
    edges = cv2.Canny(padded.image, float(p.a), float(p.b))
    return hwc3(padded.crop(edges))


def threshold(img: np.ndarray, p: Params) -> np.ndarray:
    """White where every channel is above the threshold (default 127), else black."""
    padded = resize_with_pad(img, p.res)
    out = np.zeros(padded.image.shape[:2], dtype=np.uint8)
    out[padded.image.min(axis=2) > p.a] = 255
    return hwc3(padded.crop(out))


def scribble_threshold(img: np.ndarray, p: Params) -> np.ndarray:
    """A drawing's dark strokes as white scribbles on black (strokes are below mid grey)."""
    padded = resize_with_pad(img, p.res)
    out = np.zeros(padded.image.shape[:2], dtype=np.uint8)
    out[padded.image.min(axis=2) < 127] = 255
    return hwc3(padded.crop(out))


def scribble_xdog(img: np.ndarray, p: Params) -> np.ndarray:
    """Scribbles from a difference of Gaussians (σ 0.5 and 5, Winnemöller's XDoG), thresholded (default 32)."""
    cv2 = opencv()

    padded = resize_with_pad(img, p.res)
    x = padded.image.astype(np.float32)
    dog = cv2.GaussianBlur(x, (0, 0), 5.0) - cv2.GaussianBlur(x, (0, 0), 0.5)
    strength = (-dog.min(axis=2)).clip(0, 255)
    out = np.zeros(x.shape[:2], dtype=np.uint8)
    out[2 * strength > p.a] = 255
    return hwc3(padded.crop(out))


def lineart_standard(img: np.ndarray, p: Params) -> np.ndarray:
    """Dark lines on a light background made white-on-black: the picture's dips below its blur (σ 6),
    normalised by their median so line strength does not depend on contrast."""
    cv2 = opencv()

    padded = resize_with_pad(img, p.res)
    x = padded.image.astype(np.float32)
    intensity = (cv2.GaussianBlur(x, (0, 0), 6.0) - x).min(axis=2).clip(0, 255)
    strong = intensity[intensity > 8]
    intensity /= max(16.0, float(np.median(strong)) if strong.size else 16.0)
    return hwc3(padded.crop(to_uint8(intensity * 127)))


def blur_gaussian(img: np.ndarray, p: Params) -> np.ndarray:
    """The picture blurred (σ = threshold A, default 9) for the blur/tile models."""
    cv2 = opencv()

    padded = resize_with_pad(img, p.res)
    return hwc3(padded.crop(cv2.GaussianBlur(padded.image, (0, 0), float(p.a))))


def tile_resample(img: np.ndarray, p: Params) -> np.ndarray:
    """The picture itself, downsampled by threshold A (1 = unchanged), for the tile model."""
    cv2 = opencv()

    x = hwc3(img)
    rate = float(p.a)
    if rate < 1.1:
        return x
    h, w = x.shape[:2]
    return cv2.resize(x, (max(1, int(w / rate)), max(1, int(h / rate))), interpolation=cv2.INTER_AREA)


def shuffle(img: np.ndarray, p: Params) -> np.ndarray:
    """Content shuffle: the picture warped by a smooth random flow field, seeded (the shuffle model
    learns to rebuild content from it)."""
    cv2 = opencv()

    padded = resize_with_pad(img, p.res)
    x = padded.crop(padded.image)
    h, w = x.shape[:2]
    rng = np.random.default_rng(p.seed)
    fx = _noise_disk(h, w, 256, rng) * float(w - 1)
    fy = _noise_disk(h, w, 256, rng) * float(h - 1)
    return cv2.remap(x, fx, fy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def _noise_disk(h: int, w: int, cell: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth noise in [0, 1]: a coarse random grid upsampled with cubic interpolation."""
    cv2 = opencv()

    gh, gw = h // cell + 2, w // cell + 2
    coarse = rng.uniform(0, 1, size=(gh, gw)).astype(np.float32)
    fine = cv2.resize(coarse, (w + 2 * cell, h + 2 * cell), interpolation=cv2.INTER_CUBIC)
    fine = fine[cell : cell + h, cell : cell + w]
    fine -= fine.min()
    top = fine.max()
    return fine / top if top > 0 else fine


def inpaint(img: np.ndarray, p: Params) -> np.ndarray:
    """The picture with its mask as a fourth channel (255 = repaint); a picture without alpha has none."""
    if img.ndim == 3 and img.shape[2] == 4:
        return img
    x = hwc3(img)
    return np.concatenate([x, np.zeros(x.shape[:2] + (1,), dtype=np.uint8)], axis=2)
