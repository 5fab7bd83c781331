"""Depth and normal maps through transformers: MiDaS/DPT (Ranftl et al. 2021) and Depth Anything
(Yang et al. 2024), read from transformers folders (``config.json`` + ``model.safetensors``, as
``Intel/dpt-hybrid-midas`` or ``depth-anything/Depth-Anything-V2-Small-hf`` download) in
``models/annotators/``. Both predict relative inverse depth (near = large); the map is that
prediction scaled to 0-255, white near, as A1111's depth preprocessors write it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ModelError
from .basic import Params
from .common import AnnotatorContext, cached, hwc3, opencv, resize_with_pad, to_uint8

#: (model_type in config.json, folder name people download it as, the hub repository, transformers class)
_DPT = ("dpt", "dpt-hybrid-midas", "Intel/dpt-hybrid-midas", "DPTForDepthEstimation")
_DEPTH_ANYTHING = ("depth_anything", "depth-anything-small-hf", "depth-anything/Depth-Anything-V2-Small-hf",
                   "DepthAnythingForDepthEstimation")
#: Original-layout files of the annotator collection that this loader does not convert.
_ORIGINAL_FILES = {"dpt": "dpt_hybrid-midas-501f0c75.pt", "depth_anything": "depth_anything_vitl14.pth"}
# ImageNet statistics (Depth Anything); DPT/MiDaS normalises to [-1, 1].
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def find_transformers_folder(ctx: AnnotatorContext, model_type: str, folder_name: str, repo: str) -> Path:
    """The first folder under the annotators folder whose config.json has ``model_type``."""
    root = ctx.annotators_dir
    if root is not None and Path(root).is_dir():
        preferred = Path(root) / folder_name
        candidates = [preferred] if (preferred / "config.json").is_file() else []
        candidates += sorted(p.parent for p in Path(root).rglob("config.json"))
        for folder in candidates:
            try:
                cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            if cfg.get("model_type") == model_type:
                return folder
    where = f"{root}/" if root is not None else "<models folder>/annotators/"
    original = _ORIGINAL_FILES.get(model_type)
    note = ""
    if original and root is not None and any(Path(root).rglob(original)):
        note = f" ({original} was found, but only the transformers layout is read)"
    raise ModelError(f"this depth preprocessor needs the transformers model {repo} (config.json + "
                     f"model.safetensors): put the folder at {where}{folder_name}{note}")


def _load(ctx: AnnotatorContext, spec) -> "object":
    model_type, folder_name, repo, cls_name = spec
    folder = find_transformers_folder(ctx, model_type, folder_name, repo)

    def build():
        import transformers

        cls = getattr(transformers, cls_name)
        try:
            model = cls.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelError(f"{folder}: cannot load this {cls_name} ({exc})") from None
        return model.eval().to(ctx.device)

    return cached(ctx, f"{cls_name}:{folder}", build)


def _predict(model, pixels: np.ndarray, size: tuple[int, int], ctx: AnnotatorContext) -> np.ndarray:
    """Run a depth model on normalised H x W x 3 float pixels; the prediction resized to ``size``."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None].to(ctx.device)
    with torch.inference_mode():
        depth = model(pixel_values=x.to(next(model.parameters()).dtype)).predicted_depth
        depth = torch.nn.functional.interpolate(depth[:, None].float(), size=size, mode="bicubic", align_corners=False)
    return depth[0, 0].cpu().numpy()


def midas_depth(img: np.ndarray, p: Params) -> tuple[np.ndarray, tuple[int, int], "callable"]:
    """Raw DPT prediction over the padded working picture (a square input, as DPT's processor makes)."""
    cv2 = opencv()

    model = _load(p.ctx, _DPT)
    padded = resize_with_pad(img, p.res)
    h, w = padded.image.shape[:2]
    side = max(32, int(round(p.res / 32)) * 32)
    square = cv2.resize(padded.image, (side, side), interpolation=cv2.INTER_CUBIC)
    pixels = square.astype(np.float32) / 127.5 - 1.0
    return _predict(model, pixels, (h, w), p.ctx), (h, w), padded.crop


def _normalise(depth: np.ndarray) -> np.ndarray:
    d = depth - depth.min()
    top = d.max()
    return d / top if top > 0 else d


def depth_midas(img: np.ndarray, p: Params) -> np.ndarray:
    """MiDaS/DPT relative depth, white = near."""
    depth, _, crop = midas_depth(img, p)
    return hwc3(crop(to_uint8(_normalise(depth) * 255.0)))


def normal_midas(img: np.ndarray, p: Params) -> np.ndarray:
    """A normal map from MiDaS depth: the depth's Sobel gradients as x and y, a constant 2π as z,
    flattened to face the camera where the normalised depth is below threshold A (background)."""
    cv2 = opencv()

    depth, _, crop = midas_depth(img, p)
    near = _normalise(depth)
    gx = cv2.Sobel(depth.astype(np.float32), cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(depth.astype(np.float32), cv2.CV_32F, 0, 1, ksize=3)
    gx[near < p.a] = 0
    gy[near < p.a] = 0
    normal = np.stack([gx, gy, np.full_like(gx, 2 * np.pi)], axis=2)
    normal /= np.sqrt((normal ** 2).sum(axis=2, keepdims=True))
    return crop(to_uint8(normal * 127.5 + 127.5))


def depth_anything(img: np.ndarray, p: Params) -> np.ndarray:
    """Depth Anything relative depth, white = near: the picture resized to multiples of 14 (the ViT
    patch), ImageNet-normalised, the prediction resized back."""
    cv2 = opencv()

    model = _load(p.ctx, _DEPTH_ANYTHING)
    padded = resize_with_pad(img, p.res)
    h, w = padded.image.shape[:2]
    th, tw = max(14, int(round(h / 14)) * 14), max(14, int(round(w / 14)) * 14)
    x = cv2.resize(padded.image, (tw, th), interpolation=cv2.INTER_CUBIC).astype(np.float32) / 255.0
    pixels = (x - _IMAGENET_MEAN) / _IMAGENET_STD
    depth = _predict(model, pixels, (h, w), p.ctx)
    return hwc3(padded.crop(to_uint8(_normalise(depth) * 255.0)))
