"""ADetailer's YOLO detection models (``face_yolov8n.pt``, ``hand_yolov8s.pt``, ``person_yolov8n-seg.pt``, ...),
read without running code from them and run by underpaint's own layers.

The files are ultralytics checkpoints: a pickled ``DetectionModel`` (or ``SegmentationModel``) object,
whose loading through ultralytics runs whatever code the pickle names. Here the pickle is read by
PyTorch's ``weights_only`` unpickler with every class and function it names replaced by an inert
stand-in (:class:`_Stub`): it records its arguments and state and does nothing else, so nothing the
file names is imported or called; modules ``os``, ``sys``, ``posix`` and ``nt`` are refused outright.
From the stand-ins' recorded state (each module's ``_parameters``, ``_buffers``, ``_modules`` and
attributes) the network is rebuilt from underpaint's own layers, each layer's kind taken from the
class name the file records, its inputs from ultralytics' ``f`` ("from") indices.

The YOLOv8 family runs (Conv, C2f, SPPF, Upsample, Concat, and the Detect and Segment heads with
their DFL box decoding), as ultralytics' predictor runs it for ADetailer: the picture letterboxed to
640 (resized with OpenCV's bilinear filter, padded with grey 114 to a multiple of the stride,
centred), class-aware non-maximum suppression at IoU 0.7 over the boxes above the confidence, at
most 300, the boxes mapped back to the picture; a segmentation model's masks from its prototypes
(``coefficients · protos``, upsampled bilinearly, positive inside the box). Where underpaint differs:
the masks are mapped back to the picture without the letterbox's padding (ADetailer stretches the
padded mask over the picture, shifting it by up to half the padding).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError, UnsafeModelFile

#: ADetailer's folder for its models (A1111's models/adetailer).
YOLO_EXTENSIONS = (".pt", ".pth")
#: The predictor's settings ADetailer leaves as they are.
IMAGE_SIZE, IOU, MAX_DETECTIONS, MAX_CANDIDATES = 640, 0.7, 300, 30000
#: Stand-ins a file may name; more is not a model file.
_MAX_GLOBALS = 512


# --------------------------------------------------------------------------- reading the file


class _Stub:
    """An inert stand-in for a class or function a pickle names: calling or instantiating it records
    the arguments; pickle state is kept as attributes. ``_name`` is the name the file used."""

    _name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_args"] = args
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            for part in state:  # (__dict__, __slots__ values)
                self.__dict__.update(part or {})
        elif isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<{self._name}>"


_load_lock = threading.Lock()


def read_checkpoint(path: Path) -> Any:
    """The file's pickled objects, every global it names an inert :class:`_Stub` (see the module docstring)."""
    path = Path(path)
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as exc:  # not a torch file, truncated, ...
        raise ModelError(f"{path}: not a readable PyTorch file ({type(exc).__name__}: {exc})") from None
    if len(names) > _MAX_GLOBALS:
        raise ModelError(f"{path}: names {len(names)} classes and functions; a YOLO model names far fewer")
    stubs = [(type(name.rsplit(".", 1)[-1], (_Stub,), {"_name": name}), name) for name in names]
    try:
        with _load_lock, torch.serialization.safe_globals(stubs):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        import re

        text = str(exc) or type(exc).__name__
        blocked = re.search(r"GLOBAL (\S+) whose module \S+ is blocked", text)
        if blocked:
            raise UnsafeModelFile(f"{path}: refused: the file asks to run {blocked.group(1)}") from None
        raise ModelError(f"{path}: not a YOLO model file ({text.splitlines()[0]})") from None


def _kind(obj: Any) -> str:
    """The class name a stand-in was recorded under (its last part), else the object's own type name."""
    name = obj._name if isinstance(obj, _Stub) else type(obj).__name__
    return name.rsplit(".", 1)[-1]


def _children(obj: Any) -> dict[str, Any]:
    return dict(getattr(obj, "_modules", None) or {})


def _tensor(obj: Any, name: str) -> torch.Tensor | None:
    for store in ("_parameters", "_buffers"):
        value = (getattr(obj, store, None) or {}).get(name)
        if value is not None:
            return value.detach().float() if isinstance(value, torch.Tensor) else None
    return None


def _pair(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


# --------------------------------------------------------------------------- the layers


class _ConvAct(nn.Module):
    """ultralytics' Conv / DWConv: a convolution (its batch norm folded in) and its activation."""

    def __init__(self, conv: nn.Module, act: nn.Module):
        super().__init__()
        self.conv, self.act = conv, act

    def forward(self, x):
        return self.act(self.conv(x))


class _Bottleneck(nn.Module):
    def __init__(self, cv1, cv2, add: bool):
        super().__init__()
        self.cv1, self.cv2, self.add = cv1, cv2, add

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class _C2f(nn.Module):
    """Split the first convolution's output in two, run the bottlenecks on the last part in a chain,
    concatenate every part, project."""

    def __init__(self, cv1, cv2, m: nn.ModuleList):
        super().__init__()
        self.cv1, self.cv2, self.m = cv1, cv2, m

    def forward(self, x):
        parts = list(self.cv1(x).chunk(2, 1))
        for block in self.m:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, 1))


class _SPPF(nn.Module):
    """Spatial pyramid pooling: the same max pool ``n`` times in a row, every stage concatenated."""

    def __init__(self, cv1, cv2, pool, n: int, add: bool):
        super().__init__()
        self.cv1, self.cv2, self.pool, self.n, self.add = cv1, cv2, pool, n, add

    def forward(self, x):
        stages = [self.cv1(x)]
        for _ in range(self.n):
            stages.append(self.pool(stages[-1]))
        y = self.cv2(torch.cat(stages, 1))
        return x + y if self.add else y


class _Concat(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, xs):
        return torch.cat(xs, self.dim)


class _Proto(nn.Module):
    """A segmentation head's mask prototypes: conv, ×2 transposed conv, conv, conv."""

    def __init__(self, cv1, upsample, cv2, cv3):
        super().__init__()
        self.cv1, self.upsample, self.cv2, self.cv3 = cv1, upsample, cv2, cv3

    def forward(self, x):
        return self.cv3(self.cv2(self.upsample(self.cv1(x))))


@dataclass
class HeadOutput:
    """Per anchor: boxes (B, N, 4; x1 y1 x2 y2 in input pixels), class scores (B, N, classes, after the
    sigmoid), mask coefficients (B, N, masks) and prototypes (B, masks, h/4, w/4) of a segmentation head."""

    boxes: torch.Tensor
    scores: torch.Tensor
    coefficients: torch.Tensor | None = None
    protos: torch.Tensor | None = None


class _Detect(nn.Module):
    """The Detect head: per level a box branch (4 × ``reg_max`` bins per side) and a class branch; the
    bins' softmax expectation (DFL) gives each side's distance from the anchor (cell centres), times the
    level's stride. A Segment head adds mask coefficients and the prototypes."""

    def __init__(self, box: nn.ModuleList, cls: nn.ModuleList, bins: torch.Tensor, strides: list[float],
                 masks: nn.ModuleList | None = None, proto: nn.Module | None = None):
        super().__init__()
        self.box, self.cls, self.masks, self.proto = box, cls, masks, proto
        self.register_buffer("bins", bins.reshape(-1), persistent=False)
        self.strides = strides

    def forward(self, xs) -> HeadOutput:
        b = xs[0].shape[0]
        reg = self.bins.numel()
        dist = torch.cat([branch(x).reshape(b, 4 * reg, -1) for branch, x in zip(self.box, xs)], -1)
        logits = torch.cat([branch(x).reshape(b, -1, x.shape[2] * x.shape[3]) for branch, x in zip(self.cls, xs)], -1)
        anchors, strides = [], []
        for x, stride in zip(xs, self.strides):
            h, w = x.shape[2:]
            ys = torch.arange(h, device=x.device, dtype=x.dtype) + 0.5
            xs_ = torch.arange(w, device=x.device, dtype=x.dtype) + 0.5
            grid_y, grid_x = torch.meshgrid(ys, xs_, indexing="ij")
            anchors.append(torch.stack((grid_x, grid_y), -1).reshape(-1, 2))
            strides.append(torch.full((h * w, 1), float(stride), device=x.device, dtype=x.dtype))
        anchor, stride = torch.cat(anchors), torch.cat(strides)
        sides = (dist.reshape(b, 4, reg, -1).softmax(2) * self.bins.reshape(1, 1, reg, 1)).sum(2)  # (B, 4, N)
        sides = sides.transpose(1, 2)
        boxes = torch.cat((anchor - sides[..., :2], anchor + sides[..., 2:]), -1) * stride
        out = HeadOutput(boxes, logits.sigmoid().transpose(1, 2))
        if self.masks is not None:
            out.coefficients = torch.cat([branch(x).reshape(b, -1, x.shape[2] * x.shape[3])
                                          for branch, x in zip(self.masks, xs)], -1).transpose(1, 2)
            out.protos = self.proto(xs[0])
        return out


class YoloModel(nn.Module):
    """The rebuilt network: ``layers`` in order, each taking the previous output or those its ``froms`` name."""

    def __init__(self, layers: list[nn.Module], froms: list[Any], names: dict[int, str], stride: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.froms, self.names, self.stride = froms, names, stride

    @property
    def segments(self) -> bool:
        return getattr(self.layers[-1], "masks", None) is not None

    def forward(self, x: torch.Tensor) -> HeadOutput:
        outputs: list[Any] = []
        for layer, source in zip(self.layers, self.froms):
            if source != -1:
                x = outputs[source] if isinstance(source, int) else [x if j == -1 else outputs[j] for j in source]
            x = layer(x)
            outputs.append(x)
        return x


# --------------------------------------------------------------------------- rebuilding the network

_ACTIVATIONS = {"SiLU": nn.SiLU, "ReLU": nn.ReLU, "Identity": nn.Identity, "Sigmoid": nn.Sigmoid,
                "Hardswish": nn.Hardswish, "GELU": nn.GELU, "Tanh": nn.Tanh}


class _Builder:
    def __init__(self, path: Path):
        self.path = path

    def bad(self, what: str) -> ModelError:
        return ModelError(f"{self.path}: {what}")

    def child(self, obj: Any, name: str) -> Any:
        found = _children(obj).get(name)
        if found is None:
            raise self.bad(f"a {_kind(obj)} layer without its {name!r} part")
        return found

    def weight(self, obj: Any, name: str = "weight") -> torch.Tensor:
        value = _tensor(obj, name)
        if value is None:
            raise self.bad(f"a {_kind(obj)} layer without its {name} tensor")
        return value

    def build(self, obj: Any) -> nn.Module:
        kind = _kind(obj)
        method = getattr(self, f"_{kind}", None)
        if method is None:
            if kind in _ACTIVATIONS:
                return self._activation(obj, kind)
            raise self.bad(f"holds a {kind} layer, which underpaint's YOLO runner does not have (YOLOv8 detection "
                           f"and segmentation models run: Conv, C2f, SPPF, Upsample, Concat, Detect, Segment)")
        return method(obj)

    def _activation(self, obj: Any, kind: str) -> nn.Module:
        return _ACTIVATIONS[kind]()

    def _LeakyReLU(self, obj):
        return nn.LeakyReLU(float(getattr(obj, "negative_slope", 0.01)))

    def _Conv2d(self, obj, transposed: bool = False):
        weight, bias = self.weight(obj), _tensor(obj, "bias")
        groups = int(getattr(obj, "groups", 1))
        options = dict(stride=_pair(getattr(obj, "stride", 1)), padding=_pair(getattr(obj, "padding", 0)),
                       dilation=_pair(getattr(obj, "dilation", 1)), groups=groups, bias=bias is not None)
        if getattr(obj, "padding_mode", "zeros") != "zeros":
            raise self.bad(f"a convolution padded in {obj.padding_mode!r} mode")
        if transposed:
            conv = nn.ConvTranspose2d(weight.shape[0], weight.shape[1] * groups, tuple(weight.shape[2:]),
                                      output_padding=_pair(getattr(obj, "output_padding", 0)), **options)
        else:
            conv = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), **options)
        with torch.no_grad():
            conv.weight.copy_(weight)
            if bias is not None:
                conv.bias.copy_(bias)
        return conv

    def _ConvTranspose2d(self, obj):
        return self._Conv2d(obj, transposed=True)

    def _BatchNorm2d(self, obj):
        mean, var = self.weight(obj, "running_mean"), self.weight(obj, "running_var")
        bn = nn.BatchNorm2d(mean.shape[0], eps=float(getattr(obj, "eps", 1e-5)))
        with torch.no_grad():
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            for name in ("weight", "bias"):
                value = _tensor(obj, name)
                if value is not None:
                    getattr(bn, name).copy_(value)
        return bn

    def _Conv(self, obj):
        """The convolution with its batch norm folded into its weights (as ultralytics fuses them to predict)."""
        parts = _children(obj)
        conv = self._Conv2d(self.child(obj, "conv"))
        if parts.get("bn") is not None:
            bn = self._BatchNorm2d(parts["bn"])
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                               conv.dilation, conv.groups, bias=True)
            with torch.no_grad():
                folded.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
                bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
                folded.bias.copy_(bn.bias + (bias - bn.running_mean) * scale)
            conv = folded
        return _ConvAct(conv, self.build(parts["act"]) if "act" in parts else nn.Identity())

    _DWConv = _Conv

    def _Sequential(self, obj):
        return nn.Sequential(*(self.build(m) for m in _children(obj).values()))

    def _ModuleList(self, obj):
        return nn.ModuleList(self.build(m) for m in _children(obj).values())

    def _Bottleneck(self, obj):
        return _Bottleneck(self.build(self.child(obj, "cv1")), self.build(self.child(obj, "cv2")),
                           bool(getattr(obj, "add", False)))

    def _C2f(self, obj):
        return _C2f(self.build(self.child(obj, "cv1")), self.build(self.child(obj, "cv2")),
                    self._ModuleList(self.child(obj, "m")))

    def _SPPF(self, obj):
        return _SPPF(self.build(self.child(obj, "cv1")), self.build(self.child(obj, "cv2")),
                     self.build(self.child(obj, "m")), int(getattr(obj, "n", 3)), bool(getattr(obj, "add", False)))

    def _MaxPool2d(self, obj):
        return nn.MaxPool2d(_pair(obj.kernel_size), _pair(getattr(obj, "stride", None) or obj.kernel_size),
                            _pair(getattr(obj, "padding", 0)), _pair(getattr(obj, "dilation", 1)),
                            ceil_mode=bool(getattr(obj, "ceil_mode", False)))

    def _Upsample(self, obj):
        return nn.Upsample(size=getattr(obj, "size", None), scale_factor=getattr(obj, "scale_factor", None),
                           mode=getattr(obj, "mode", "nearest"), align_corners=getattr(obj, "align_corners", None))

    def _Concat(self, obj):
        return _Concat(int(getattr(obj, "d", 1)))

    def _Proto(self, obj):
        return _Proto(*(self.build(self.child(obj, name)) for name in ("cv1", "upsample", "cv2", "cv3")))

    def _Detect(self, obj):
        if getattr(obj, "end2end", False) or ("cv2" not in _children(obj) and "one2one_cv2" in _children(obj)):
            raise self.bad("an end-to-end (NMS-free) detection head, which underpaint's YOLO runner does not have")
        stride = getattr(obj, "stride", None)
        if not isinstance(stride, torch.Tensor) or stride.numel() == 0 or not bool((stride > 0).all()):
            raise self.bad("a detection head without its strides")
        reg_max = int(getattr(obj, "reg_max", 16))
        dfl = _children(obj).get("dfl")
        bins = _tensor(self.child(dfl, "conv"), "weight") if dfl is not None and _kind(dfl) == "DFL" else None
        if bins is None:
            bins = torch.arange(reg_max, dtype=torch.float32)
        masks = proto = None
        if _kind(obj) == "Segment":
            masks, proto = self._ModuleList(self.child(obj, "cv4")), self.build(self.child(obj, "proto"))
        return _Detect(self._ModuleList(self.child(obj, "cv2")), self._ModuleList(self.child(obj, "cv3")),
                       bins, [float(s) for s in stride.tolist()], masks, proto)

    _Segment = _Detect


def load_yolo(path: Path) -> YoloModel:
    """A YOLO detection or segmentation model file, rebuilt (float32, on the CPU, in eval mode)."""
    path = Path(path)
    data = read_checkpoint(path)
    model = None
    if isinstance(data, dict):
        model = data.get("model") if data.get("model") is not None else data.get("ema")
    if model is None or _kind(model) not in ("DetectionModel", "SegmentationModel", "WorldModel"):
        found = _kind(model) if model is not None else (sorted(data)[:8] if isinstance(data, dict) else _kind(data))
        raise ModelError(f"{path}: not an ultralytics YOLO detection model (found {found})")
    layers = list(_children(_children(model).get("model") or {}).values()) if _children(model) else []
    if not layers or _kind(layers[-1]) not in ("Detect", "Segment"):
        head = _kind(layers[-1]) if layers else "no layers"
        raise ModelError(f"{path}: a YOLO model ending in {head}; detection (Detect) and segmentation (Segment) "
                         f"models run")
    builder = _Builder(path)
    built, froms = [], []
    for n, layer in enumerate(layers):
        source = getattr(layer, "f", -1)
        if not (isinstance(source, int) or (isinstance(source, (list, tuple)) and all(isinstance(j, int) for j in source))):
            raise ModelError(f"{path}: layer {n} takes its input from {source!r}")
        if any(j != -1 and not 0 <= j < n for j in ([source] if isinstance(source, int) else source)):
            raise ModelError(f"{path}: layer {n} takes its input from a later layer ({source!r})")
        froms.append(source if isinstance(source, int) else list(source))
        built.append(builder.build(layer))
    names = getattr(model, "names", None)
    if isinstance(names, (list, tuple)):
        names = dict(enumerate(names))
    names = {int(k): str(v) for k, v in names.items()} if isinstance(names, dict) else {}
    stride = getattr(model, "stride", None)
    stride = int(stride.max()) if isinstance(stride, torch.Tensor) and stride.numel() else 32
    return YoloModel(built, froms, names, stride).eval().requires_grad_(False)


# --------------------------------------------------------------------------- finding things in a picture


@dataclass(frozen=True)
class Detection:
    """One thing found: its box in picture pixels (x1, y1, x2, y2), score, class name and, from a
    segmentation model, its mask (a boolean array the picture's size)."""

    box: tuple[float, float, float, float]
    score: float
    label: str
    mask: np.ndarray | None = None


@dataclass(frozen=True)
class Letterbox:
    """How a picture was fitted into the network's input: the scaled size and the padding before it."""

    size: tuple[int, int]  # the picture's (width, height)
    scaled: tuple[int, int]  # (width, height) after scaling
    pad: tuple[int, int]  # (left, top)
    shape: tuple[int, int]  # the input's (height, width)


def letterbox(pixels: np.ndarray, size: int = IMAGE_SIZE, stride: int = 32) -> tuple[np.ndarray, Letterbox]:
    """ultralytics' predictor's letterbox: scaled to fit ``size`` (bilinear, OpenCV), padded with grey 114 to a
    multiple of ``stride``, centred (the odd pixel after)."""
    import cv2

    h, w = pixels.shape[:2]
    ratio = min(size / h, size / w)
    new_w, new_h = max(round(w * ratio), 1), max(round(h * ratio), 1)
    dw, dh = (size - new_w) % stride / 2, (size - new_h) % stride / 2
    if (new_w, new_h) != (w, h):
        pixels = cv2.resize(pixels, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    top, bottom, left, right = round(dh - 0.1), round(dh + 0.1), round(dw - 0.1), round(dw + 0.1)
    pixels = cv2.copyMakeBorder(pixels, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(114, 114, 114))
    return pixels, Letterbox((w, h), (new_w, new_h), (left, top), pixels.shape[:2])


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> torch.Tensor:
    """Greedy non-maximum suppression: indices of the kept boxes, best first; a box overlapping a kept one
    by more than ``iou`` (intersection over union) is dropped."""
    order = scores.argsort(descending=True)
    boxes = boxes[order]
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    keep, alive = [], torch.ones(len(order), dtype=torch.bool)
    for i in range(len(order)):
        if not alive[i]:
            continue
        keep.append(i)
        rest = boxes[i + 1:]
        w = (torch.minimum(rest[:, 2], boxes[i, 2]) - torch.maximum(rest[:, 0], boxes[i, 0])).clamp(min=0)
        h = (torch.minimum(rest[:, 3], boxes[i, 3]) - torch.maximum(rest[:, 1], boxes[i, 1])).clamp(min=0)
        inter = w * h
        alive[i + 1:] &= inter / (area[i] + area[i + 1:] - inter) <= iou
    return order[torch.tensor(keep, dtype=torch.long)]


@torch.inference_mode()
def detect(model: YoloModel, picture, confidence: float, *, size: int = IMAGE_SIZE, iou: float = IOU,
           max_detections: int = MAX_DETECTIONS) -> list[Detection]:
    """What ``model`` finds in ``picture`` (a PIL image) scored above ``confidence``, best first."""
    pixels, box = letterbox(np.asarray(picture.convert("RGB")), size, model.stride)
    device = next(model.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device).permute(2, 0, 1)[None].float() / 255
    out = model(x)
    boxes, scores = out.boxes[0].float().cpu(), out.scores[0].float().cpu()
    best, label = scores.max(1)
    chosen = (best > confidence).nonzero().flatten()
    chosen = chosen[best[chosen].argsort(descending=True)][:MAX_CANDIDATES]
    offset = label[chosen, None].float() * 7680  # class-aware: boxes of other classes never overlap
    kept = chosen[nms(boxes[chosen] + offset, best[chosen], iou)][:max_detections]
    masks = _masks(out, kept, boxes, box) if out.protos is not None and len(kept) else [None] * len(kept)
    (w, h), (new_w, new_h), (left, top) = box.size, box.scaled, box.pad
    found = []
    for index, mask in zip(kept.tolist(), masks):
        x1, y1, x2, y2 = boxes[index].tolist()
        mapped = (min(max((x1 - left) * w / new_w, 0.0), w), min(max((y1 - top) * h / new_h, 0.0), h),
                  min(max((x2 - left) * w / new_w, 0.0), w), min(max((y2 - top) * h / new_h, 0.0), h))
        if mask is not None and not mask.any():
            continue  # ultralytics keeps only the found things that have a mask
        found.append(Detection(mapped, float(best[index]), model.names.get(int(label[index]), str(int(label[index]))),
                               mask))
    return found


def _masks(out: HeadOutput, kept: torch.Tensor, boxes: torch.Tensor, box: Letterbox) -> list[np.ndarray]:
    """Each kept thing's mask in the picture: its coefficients times the prototypes, upsampled to the input,
    positive inside its box, the padding cut off and scaled to the picture."""
    import cv2

    protos = out.protos[0].float()
    coefficients = out.coefficients[0].float()[kept.to(protos.device)]
    logits = (coefficients @ protos.reshape(protos.shape[0], -1)).reshape(-1, *protos.shape[1:])
    logits = F.interpolate(logits[None], box.shape, mode="bilinear", align_corners=False)[0].cpu()
    rows = torch.arange(box.shape[0], dtype=torch.float32)[None, :, None]
    cols = torch.arange(box.shape[1], dtype=torch.float32)[None, None, :]
    x1, y1, x2, y2 = boxes[kept].T[:, :, None, None]
    inside = (logits > 0) & (cols >= x1) & (cols < x2) & (rows >= y1) & (rows < y2)
    (w, h), (new_w, new_h), (left, top) = box.size, box.scaled, box.pad
    out_masks = []
    for mask in inside.numpy():
        cut = mask[top:top + new_h, left:left + new_w].astype(np.uint8) * 255
        out_masks.append(cv2.resize(cut, (w, h), interpolation=cv2.INTER_LINEAR) > 127)
    return out_masks
