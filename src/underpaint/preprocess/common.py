"""Shared pieces of the annotators: image shapes, the working resolution, control-map resizing,
and reading annotator weights from ``models/annotators/`` safely.

The geometry follows the sd-webui-controlnet extension, so a map made here has the size and
look of the one A1111 users know: each annotator runs with the short side scaled to the
"processor resolution" and both sides padded (edge pixels repeated) to a multiple of 64, the
padding is cut off again, and the map is then fitted to the generation size with one of the
extension's three resize modes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ImageError, InvalidParameter, ModelError
from ..imageio.resize import check_scaled

JUST_RESIZE = "Just Resize"
CROP_AND_RESIZE = "Crop and Resize"
RESIZE_AND_FILL = "Resize and Fill"
#: The extension's resize modes in its integer order (0, 1, 2); 3 (latent upscale) acts as 0.
RESIZE_MODES = (JUST_RESIZE, CROP_AND_RESIZE, RESIZE_AND_FILL)
_RESIZE_ALIASES = {
    "just resize": JUST_RESIZE, "resize": JUST_RESIZE, "just-resize": JUST_RESIZE,
    "crop and resize": CROP_AND_RESIZE, "crop-and-resize": CROP_AND_RESIZE, "inner fit (scale to fit)": CROP_AND_RESIZE,
    "scale to fit (inner fit)": CROP_AND_RESIZE, "crop": CROP_AND_RESIZE,
    "resize and fill": RESIZE_AND_FILL, "resize-and-fill": RESIZE_AND_FILL, "outer fit (shrink to fit)": RESIZE_AND_FILL,
    "envelope (outer fit)": RESIZE_AND_FILL, "fill": RESIZE_AND_FILL,
}


@dataclass(frozen=True)
class AnnotatorContext:
    """Where annotator weights live and where to run them; loaded networks are cached per context."""

    annotators_dir: Path | None = None
    device: str = "cpu"
    #: Loaded annotator networks by file; owned by whoever made the context (an engine, a CLI run).
    cache: dict = field(default_factory=dict, compare=False, hash=False, repr=False)


def opencv():
    """OpenCV, or a clear message when it is missing (it is only needed for ControlNet maps)."""
    try:
        import cv2 as module
    except ImportError:
        from ..errors import UnderpaintError

        raise UnderpaintError("ControlNet preprocessors need OpenCV: pip install opencv-python-headless") from None
    return module


def resize_mode_name(value: str | int) -> str:
    """The extension's resize mode for an int (0-3) or any of its spellings."""
    if isinstance(value, bool):
        raise InvalidParameter("resize_mode", value, "0, 1, 2 or one of " + ", ".join(RESIZE_MODES))
    if isinstance(value, int):
        if value == 3:
            return JUST_RESIZE
        if 0 <= value < len(RESIZE_MODES):
            return RESIZE_MODES[value]
    elif isinstance(value, str):
        if value.strip().isdigit():
            return resize_mode_name(int(value))
        found = _RESIZE_ALIASES.get(value.strip().lower())
        if found:
            return found
    raise InvalidParameter("resize_mode", value, "0, 1, 2 or one of " + ", ".join(RESIZE_MODES))


def hwc3(x: np.ndarray) -> np.ndarray:
    """Any uint8 picture as H x W x 3: grey is repeated, alpha is composited onto white."""
    if x.dtype != np.uint8:
        raise ImageError(f"control image must be 8-bit, got {x.dtype}")
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3 or x.shape[2] not in (1, 3, 4):
        raise ImageError(f"control image has shape {x.shape}; expected H x W with 1, 3 or 4 channels")
    if x.shape[2] == 3:
        return x
    if x.shape[2] == 1:
        return np.concatenate([x, x, x], axis=2)
    color = x[:, :, :3].astype(np.float32)
    alpha = x[:, :, 3:4].astype(np.float32) / 255.0
    return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Padded:
    """A picture scaled for an annotator and padded to multiples of 64; ``crop`` undoes the padding."""

    image: np.ndarray
    height: int
    width: int

    def crop(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x[: self.height, : self.width])


def resize_with_pad(image: np.ndarray, resolution: int) -> Padded:
    """Scale so the short side is ``resolution`` (cubic up, area down), then pad to multiples of 64."""
    cv2 = opencv()
    img = hwc3(image)
    h, w = img.shape[:2]
    k = float(resolution) / float(min(h, w))
    th, tw = int(round(h * k)), int(round(w * k))
    check_scaled((tw, th), (w, h), (resolution, resolution), "processor_res")
    interpolation = cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA
    img = cv2.resize(img, (tw, th), interpolation=interpolation)
    ph, pw = -th % 64, -tw % 64
    padded = np.pad(img, [[0, ph], [0, pw], [0, 0]], mode="edge")
    return Padded(np.ascontiguousarray(padded), th, tw)


def pixel_perfect_resolution(image_hw: tuple[int, int], width: int, height: int, resize_mode: str) -> int:
    """The processor resolution at which the map comes out at the generation size (the extension's
    "Pixel Perfect"): the short side scaled by the factor the resize mode will apply."""
    raw_h, raw_w = image_hw
    k0, k1 = height / raw_h, width / raw_w
    k = min(k0, k1) if resize_mode == RESIZE_AND_FILL else max(k0, k1)
    return int(round(k * min(raw_h, raw_w)))


def fit_map(detected: np.ndarray, width: int, height: int, resize_mode: str) -> np.ndarray:
    """Fit a control map to the generation size with the extension's resize modes.

    Crop and Resize scales to cover and keeps the centre; Resize and Fill scales to fit and
    fills the rest with the median colour of the map's border; Just Resize stretches.
    """
    mode = resize_mode_name(resize_mode)
    if mode == JUST_RESIZE:
        return resize_map(detected, width, height)
    old_h, old_w = detected.shape[:2]
    k0, k1 = height / old_h, width / old_w
    if mode == RESIZE_AND_FILL:
        k = min(k0, k1)
        border = np.concatenate([detected[0], detected[-1], detected[:, 0], detected[:, -1]], axis=0)
        colour = np.median(border, axis=0).astype(detected.dtype)
        canvas = np.tile(colour[None, None], [height, width, 1])
        size = (int(round(old_w * k)), int(round(old_h * k)))
        check_scaled(size, (old_w, old_h), (width, height))
        scaled = resize_map(detected, *size)
        nh, nw = scaled.shape[:2]
        top, left = max(0, (height - nh) // 2), max(0, (width - nw) // 2)
        canvas[top : top + nh, left : left + nw] = scaled[:height, :width]
        return canvas
    k = max(k0, k1)
    size = (int(round(old_w * k)), int(round(old_h * k)))
    check_scaled(size, (old_w, old_h), (width, height))
    scaled = resize_map(detected, *size)
    nh, nw = scaled.shape[:2]
    top, left = max(0, (nh - height) // 2), max(0, (nw - width) // 2)
    return np.ascontiguousarray(scaled[top : top + height, left : left + width])


def resize_map(x: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize a control map keeping its character: few-colour maps (segmentation, poses) with nearest
    neighbour, black-and-white edge maps re-binarised (Otsu), others area down and cubic up."""
    cv2 = opencv()
    if x.shape[0] == height and x.shape[1] == width:
        return x
    mask = None
    if x.ndim == 3 and x.shape[2] == 4:
        x, mask = x[:, :, :3], x[:, :, 3]
    smaller = width * height < x.shape[0] * x.shape[1]
    colours = _colour_count(x)
    binary = colours == 2 and x.min() < 16 and x.max() > 240
    if 2 < colours < 200:
        interpolation = cv2.INTER_NEAREST
    elif smaller:
        interpolation = cv2.INTER_AREA
    else:
        interpolation = cv2.INTER_CUBIC
    y = cv2.resize(x, (width, height), interpolation=interpolation)
    if binary and x.dtype == np.uint8:
        grey = y.astype(np.float32).mean(axis=2).clip(0, 255).astype(np.uint8) if y.ndim == 3 else y
        _, grey = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        y = np.stack([grey] * 3, axis=2) if x.ndim == 3 else grey
    if mask is not None:
        m = cv2.resize(mask, (width, height), interpolation=interpolation)
        y = np.concatenate([y, m[:, :, None]], axis=2)
    return y


def _colour_count(x: np.ndarray) -> int:
    flat = x.reshape(-1, x.shape[2]) if x.ndim == 3 else x.reshape(-1, 1)
    if flat.dtype == np.uint8 and flat.shape[1] <= 4:
        packed = np.zeros(flat.shape[0], dtype=np.uint32)
        for c in range(flat.shape[1]):
            packed |= flat[:, c].astype(np.uint32) << (8 * c)
        return int(np.unique(packed).size)
    return int(np.unique(flat, axis=0).shape[0])


# --- annotator weights --------------------------------------------------------------------------------------


def annotator_file(ctx: AnnotatorContext, filename: str, *, what: str) -> Path:
    """The path of a standard annotator weights file; a clear :class:`ModelError` when it is missing."""
    folder = ctx.annotators_dir
    if folder is not None:
        for candidate in (Path(folder) / filename, *sorted(Path(folder).rglob(filename))):
            if candidate.exists():
                return candidate
    where = str(folder) if folder is not None else "<models folder>/annotators"
    raise ModelError(f"the {what} preprocessor needs {filename}: download it (the ControlNet annotator "
                     f"collection, lllyasviel/Annotators) and put it in {where}/")


def load_annotator_weights(path: str | os.PathLike) -> dict:
    """A flat name → tensor dict from safetensors or a torch file read with ``weights_only``."""
    from ..models.header import load_state_dict

    sd = load_state_dict(path)
    # Some annotator files wrap the weights ("state_dict"/"model") or keep DataParallel's "module." prefix.
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def cached(ctx: AnnotatorContext, key: str, build):
    """``build()`` once per context and key (annotator networks are slow to load)."""
    if key not in ctx.cache:
        ctx.cache[key] = build()
    return ctx.cache[key]


def to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def check_finite_resolution(res: float) -> int:
    if isinstance(res, bool) or not isinstance(res, (int, float)) or not math.isfinite(res) or not 64 <= res <= 4096:
        raise InvalidParameter("processor_res", res, "a resolution from 64 to 4096")
    return int(res)
