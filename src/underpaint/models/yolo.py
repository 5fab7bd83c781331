"""ADetailer's YOLO detection models (``face_yolov8n.pt``, ``hand_yolov8s.pt``, ``person_yolov8n-seg.pt``,
``face_yolov9c.pt``, ...), read without running code from them and run by underpaint's own layers.

The files are ultralytics checkpoints: a zip archive whose pickle holds a ``DetectionModel`` (or
``SegmentationModel``) object, and ultralytics loads it by running whatever code that pickle names.
Here the pickle is read by an unpickler of underpaint's own (:class:`_Unpickler`): every class and
function it names becomes an inert stand-in (:class:`_Stub`) that records its arguments and state and
does nothing else, except PyTorch's tensor rebuilding, done here over the archive's stored (never
compressed) tensor data within a size budget, refusing views larger than their data; modules such as
``os``, ``sys`` and ``subprocess`` are refused outright. Nothing else in the process changes (PyTorch's
own allowlists are left alone). From the stand-ins' recorded state (each module's ``_parameters``,
``_buffers``, ``_modules`` and attributes) the network is rebuilt from underpaint's own layers, each
layer's kind taken from the class name the file records, its inputs from ultralytics' ``f`` ("from")
indices, its work bounded (pools, upsampling factors, kernels, module count). Batch norms are folded
into the convolutions in float64, as ultralytics fuses them to predict.

YOLOv8 (Conv, C2f, SPPF), YOLOv9 (RepNCSPELAN4, RepCSP, RepConv, ADown, SPPELAN), YOLO11 and YOLO26 (C3k2,
C3k, C2PSA and its attention blocks) layers run, with the Detect and Segment heads (YOLO26's Segment26 and
its multi-level prototypes too) and their DFL box decoding, as ultralytics' predictor runs them for ADetailer:
the EMA weights where a file has them, the picture letterboxed to the size the model was trained at
(640 for ADetailer's files; resized with OpenCV's bilinear filter, padded with grey 114 to a multiple
of the stride, at least 32, centred), class-aware non-maximum suppression at IoU 0.7 over the boxes
scored above the confidence, at most 300, the boxes mapped back to the picture; a segmentation model's
masks from its prototypes (``coefficients · protos``, upsampled bilinearly, positive inside the box).
A head saved in end-to-end mode (YOLO26's NMS-free one-to-one branches) is read as ultralytics reads it:
the 300 best (anchor, class) pairs, those scored above the confidence, no suppression.
Where underpaint differs: the masks are mapped back to the picture without the letterbox's padding and
scaled with Pillow's filter (ADetailer stretches the padded mask over the picture).
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError, UnsafeModelFile

#: The files ADetailer lists in its models folder (A1111's models/adetailer).
YOLO_EXTENSIONS = (".pt",)
#: The predictor's settings ADetailer leaves as they are.
IMAGE_SIZE, IOU, MAX_DETECTIONS, MAX_CANDIDATES = 640, 0.7, 300, 30000
#: Stand-ins a file may name; more is not a model file.
_MAX_GLOBALS = 512


# --------------------------------------------------------------------------- reading the file


class _Stub:
    """An inert stand-in for a class or function a pickle names: calling or instantiating it records
    the arguments; pickle state is kept as attributes. The name the file used is the class's ``_name``."""

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
        return f"<{type(self)._name}>"


@dataclass(frozen=True)
class _StorageKind:
    """What ``torch.HalfStorage`` and its kin stand for in a pickle: the element type of a storage."""

    dtype: torch.dtype


_STORAGE_KINDS = {name: _StorageKind(dtype) for name, dtype in (
    ("HalfStorage", torch.float16), ("FloatStorage", torch.float32), ("DoubleStorage", torch.float64),
    ("BFloat16Storage", torch.bfloat16), ("LongStorage", torch.int64), ("IntStorage", torch.int32),
    ("ShortStorage", torch.int16), ("CharStorage", torch.int8), ("ByteStorage", torch.uint8),
    ("BoolStorage", torch.bool))}
#: Modules whose names a model file has no business with: refused rather than stood in for.
_REFUSED_MODULES = ("os", "sys", "posix", "nt", "subprocess", "shutil", "socket", "importlib", "runpy")
#: The most bytes of tensor data a file may hold (YOLOv8x is about 140 MB in half precision), and of its
#: pickle (a few hundred kB in ADetailer's files).
MAX_DATA_BYTES, MAX_PICKLE_BYTES = 1 << 30, 64 << 20


@dataclass(frozen=True)
class _Data:
    """One tensor storage read from the archive: its bytes and element type."""

    bytes: torch.UntypedStorage
    dtype: torch.dtype
    size: int  # elements


def _tensor_view(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None) -> torch.Tensor:
    """PyTorch's ``_rebuild_tensor_v2`` for plain tensors, refusing views larger than their data (a stride-0
    "expanded" tensor would turn a few bytes into gigabytes when copied)."""
    if not isinstance(storage, _Data) or not isinstance(offset, int) or not isinstance(size, tuple) \
            or not isinstance(stride, tuple) or len(size) != len(stride) \
            or not all(isinstance(n, int) and n >= 0 for n in (offset, *size, *stride)):
        raise ModelError("a tensor of unexpected form")
    numel = math.prod(size)
    if numel and (offset + sum((n - 1) * st for n, st in zip(size, stride)) >= storage.size or
                  numel > storage.size - offset or (numel > 1 and 0 in [st for n, st in zip(size, stride) if n > 1])):
        raise ModelError("a tensor whose view reaches past, or repeats, its data")
    return torch.empty((0,), dtype=storage.dtype).set_(storage.bytes, offset, size, stride)


def _parameter(data, requires_grad=False, hooks=None) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise ModelError("a parameter that is not a tensor")
    return data


class _Unpickler(pickle.Unpickler):
    """The pickle inside a model file, read with every class and function it names an inert :class:`_Stub`
    (except the few that rebuild tensors, done here) and tensor data read from the archive within a budget."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix
        self.stubs: dict[str, type] = {}
        self.storages: dict[str, _Data] = {}
        self.budget = MAX_DATA_BYTES

    def find_class(self, module: str, name: str):
        full = f"{module}.{name}"
        if module.split(".")[0] in _REFUSED_MODULES or full in ("builtins.eval", "builtins.exec", "builtins.open",
                                                                  "builtins.__import__", "builtins.compile"):
            raise UnsafeModelFile(f"the file asks to run {full}")
        if full == "torch._utils._rebuild_tensor_v2":
            return _tensor_view
        if full == "torch._utils._rebuild_parameter":
            return _parameter
        if full == "collections.OrderedDict":
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_KINDS:
            return _STORAGE_KINDS[name]
        if full not in self.stubs:
            if len(self.stubs) >= _MAX_GLOBALS:
                raise ModelError(f"names more than {_MAX_GLOBALS} classes and functions; a YOLO model names far fewer")
            self.stubs[full] = type(name[:64], (_Stub,), {"_name": full})
        return self.stubs[full]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageKind)
                and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise ModelError("a tensor storage of unexpected form")
        _, kind, key, _, numel = pid
        if key not in self.storages:
            try:
                info = self.archive.getinfo(f"{self.prefix}data/{key}")
            except KeyError:
                raise ModelError(f"tensor data {key!r} is missing") from None
            itemsize = torch.empty((), dtype=kind.dtype).element_size()
            if info.compress_type != zipfile.ZIP_STORED or info.file_size != numel * itemsize:
                raise ModelError(f"tensor data {key!r} is compressed or not its stated size")
            self.budget -= info.file_size
            if self.budget < 0:
                raise ModelError(f"holds more than {MAX_DATA_BYTES >> 20} MiB of tensors")
            raw = bytearray(self.archive.read(info))
            untyped = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
            self.storages[key] = _Data(untyped, kind.dtype, numel)
        return self.storages[key]


def read_checkpoint(path: Path) -> Any:
    """The file's pickled objects, every global it names an inert :class:`_Stub` (see the module docstring).

    Only PyTorch's zip format is read (what ultralytics has saved since 2020), little-endian, its tensor
    data stored uncompressed within :data:`MAX_DATA_BYTES`; nothing else in the process changes.
    """
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ModelError(f"{path}: not a PyTorch model file in the zip format ({exc})") from None
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ModelError(f"{path}: not a PyTorch model file (no single data.pkl inside)")
        prefix = pickles[0][: -len("data.pkl")]
        if archive.getinfo(pickles[0]).file_size > MAX_PICKLE_BYTES:
            raise ModelError(f"{path}: a pickle of more than {MAX_PICKLE_BYTES >> 20} MiB")
        names = set(archive.namelist())
        if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").strip() != b"little":
            raise ModelError(f"{path}: a big-endian file")
        try:
            return _Unpickler(archive.read(pickles[0]), archive, prefix).load()
        except UnsafeModelFile as exc:
            raise UnsafeModelFile(f"{path}: refused: {exc.message}") from None
        except ModelError as exc:
            raise ModelError(f"{path}: {exc.message}") from None
        except Exception as exc:  # a damaged or crafted pickle: whatever it breaks is the file's fault
            raise ModelError(f"{path}: not a readable model file ({type(exc).__name__}: {exc})") from None


def _kind(obj: Any) -> str:
    """The class name a stand-in was recorded under (its last part), else the object's own type name."""
    name = type(obj)._name if isinstance(obj, _Stub) else type(obj).__name__
    return name.rsplit(".", 1)[-1]


def _children(obj: Any) -> dict[str, Any]:
    return dict(getattr(obj, "_modules", None) or {})


def _tensor(obj: Any, name: str) -> torch.Tensor | None:
    """A module's parameter or buffer ``name`` in float64 (the builder's precision), None without one."""
    for store in ("_parameters", "_buffers"):
        values = getattr(obj, store, None)
        value = values.get(name) if isinstance(values, dict) else None
        if value is not None:
            return value.detach().double() if isinstance(value, torch.Tensor) and value.is_floating_point() else None
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


class _C3(nn.Module):
    """CSP block (C3, and YOLOv9's RepCSP): the bottlenecks on one projection, concatenated with another."""

    def __init__(self, cv1, cv2, cv3, m):
        super().__init__()
        self.cv1, self.cv2, self.cv3, self.m = cv1, cv2, cv3, m

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class _RepConv(nn.Module):
    """YOLOv9's re-parameterisable convolution before fusing: a 3x3 and a 1x1 branch (and an identity batch
    norm where it has one) added, then the activation."""

    def __init__(self, conv1, conv2, bn, act):
        super().__init__()
        self.conv1, self.conv2, self.bn, self.act = conv1, conv2, bn, act

    def forward(self, x):
        y = self.conv1(x) + self.conv2(x)
        return self.act(y + self.bn(x) if self.bn is not None else y)


class _ELAN(nn.Module):
    """YOLOv9's RepNCSPELAN4: the first projection split in two, two more stages on the last part in a chain,
    everything concatenated and projected."""

    def __init__(self, cv1, cv2, cv3, cv4):
        super().__init__()
        self.cv1, self.cv2, self.cv3, self.cv4 = cv1, cv2, cv3, cv4

    def forward(self, x):
        parts = list(self.cv1(x).chunk(2, 1))
        for stage in (self.cv2, self.cv3):
            parts.append(stage(parts[-1]))
        return self.cv4(torch.cat(parts, 1))


class _ADown(nn.Module):
    """YOLOv9's downsampling: a 2x2 average pool (stride 1), half the channels through a strided 3x3
    convolution, the other half through a 3x3 max pool (stride 2) and a 1x1 convolution."""

    def __init__(self, cv1, cv2):
        super().__init__()
        self.cv1, self.cv2 = cv1, cv2

    def forward(self, x):
        a, b = F.avg_pool2d(x, 2, 1, 0, False, True).chunk(2, 1)
        return torch.cat((self.cv1(a), self.cv2(F.max_pool2d(b, 3, 2, 1))), 1)


class _SPPELAN(nn.Module):
    """YOLOv9's pyramid pooling: a projection, three max pools in a row, every stage concatenated."""

    def __init__(self, cv1, pools, cv5):
        super().__init__()
        self.cv1, self.pools, self.cv5 = cv1, nn.ModuleList(pools), cv5

    def forward(self, x):
        stages = [self.cv1(x)]
        for pool in self.pools:
            stages.append(pool(stages[-1]))
        return self.cv5(torch.cat(stages, 1))


#: The most attention scores one attention layer may hold at once (heads × positions²): 2 GiB of float64.
_MAX_ATTENTION = 2 ** 28


class _Attention(nn.Module):
    """YOLO11's position-sensitive attention: one 1x1 projection gives each head's queries, keys (``key_dim``
    channels each) and values (``head_dim``); attention over every position, plus a depthwise 3x3
    convolution of the values (positional encoding), projected."""

    def __init__(self, qkv, proj, pe, heads: int, key_dim: int, head_dim: int, scale: float):
        super().__init__()
        self.qkv, self.proj, self.pe = qkv, proj, pe
        self.heads, self.key_dim, self.head_dim, self.scale = heads, key_dim, head_dim, scale

    def forward(self, x):
        b, c, h, w = x.shape
        n = h * w
        if self.heads * n * n > _MAX_ATTENTION:
            raise ModelError(f"an attention layer over {h}x{w} positions ({self.heads} heads): more than this "
                             f"runner holds at once")
        q, k, v = self.qkv(x).reshape(b, self.heads, 2 * self.key_dim + self.head_dim, n).split(
            (self.key_dim, self.key_dim, self.head_dim), 2)
        weights = ((q * self.scale).transpose(-2, -1) @ k).softmax(-1)  # (B, heads, queries, keys)
        y = (v @ weights.transpose(-2, -1)).reshape(b, c, h, w) + self.pe(v.reshape(b, c, h, w))
        return self.proj(y)


class _PSABlock(nn.Module):
    """Attention then a two-layer feed-forward, each added to its input where ``add``."""

    def __init__(self, attn, ffn, add: bool):
        super().__init__()
        self.attn, self.ffn, self.add = attn, ffn, add

    def forward(self, x):
        x = x + self.attn(x) if self.add else self.attn(x)
        return x + self.ffn(x) if self.add else self.ffn(x)


class _C2PSA(nn.Module):
    """YOLO11's C2PSA: the projection split in two halves, the attention blocks on the second, both
    concatenated and projected."""

    def __init__(self, cv1, cv2, m):
        super().__init__()
        self.cv1, self.cv2, self.m = cv1, cv2, m

    def forward(self, x):
        a, b = self.cv1(x).chunk(2, 1)
        return self.cv2(torch.cat((a, self.m(b)), 1))


class _MaxSigmoidAttn(nn.Module):
    """YOLO-World's text-guided attention: per head, each position's embedding against every class's text
    embedding, the best match (scaled, biased, through a sigmoid) weighting that head's channels of a 3x3
    projection."""

    def __init__(self, ec, gl: nn.Linear, bias: torch.Tensor, proj, heads: int, scale: torch.Tensor):
        super().__init__()
        self.ec, self.gl, self.proj, self.heads = ec, gl, proj, heads
        self.register_buffer("bias", bias.reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("scale", scale.reshape(1, -1, 1, 1), persistent=False)

    def forward(self, x, text):
        b, _, h, w = x.shape
        guide = self.gl(text)
        per_head = guide.shape[-1] // self.heads
        guide = guide.reshape(b, guide.shape[1], self.heads, per_head).permute(0, 2, 3, 1)  # (B, heads, hc, classes)
        embed = (self.ec(x) if self.ec is not None else x).reshape(b, self.heads, per_head, h * w)
        weights = (embed.transpose(2, 3) @ guide).amax(-1).reshape(b, self.heads, h, w)
        weights = (weights / per_head ** 0.5 + self.bias).sigmoid() * self.scale
        y = self.proj(x)
        return (y.reshape(b, self.heads, -1, h, w) * weights.unsqueeze(2)).reshape(y.shape)


class _C2fAttn(_C2f):
    """YOLO-World's C2f with the text-guided attention on the last part as one more part."""

    def __init__(self, cv1, cv2, m: nn.ModuleList, attn: _MaxSigmoidAttn):
        super().__init__(cv1, cv2, m)
        self.attn = attn

    def forward(self, x, text):
        parts = list(self.cv1(x).chunk(2, 1))
        for block in self.m:
            parts.append(block(parts[-1]))
        parts.append(self.attn(parts[-1], text))
        return self.cv2(torch.cat(parts, 1))


class _Contrastive(nn.Module):
    """YOLO-World's class scores: each position's embedding (batch-normalised, or L2-normalised) against
    each class's L2-normalised text embedding, times e^logit_scale, plus a bias."""

    def __init__(self, norm: nn.Module | None, logit_scale: float, bias: float):
        super().__init__()
        self.norm, self.logit_scale, self.bias = norm, logit_scale, bias

    def forward(self, x, text):
        x = self.norm(x) if self.norm is not None else F.normalize(x, dim=1, p=2)
        text = F.normalize(text, dim=-1, p=2)
        y = (text @ x.flatten(2)).reshape(x.shape[0], text.shape[1], *x.shape[2:])
        return y * math.exp(self.logit_scale) + self.bias


class _Concat(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, xs):
        return torch.cat(xs, self.dim)


class _Proto(nn.Module):
    """A segmentation head's mask prototypes from the finest level: conv, ×2 transposed conv, conv, conv."""

    def __init__(self, cv1, upsample, cv2, cv3):
        super().__init__()
        self.cv1, self.upsample, self.cv2, self.cv3 = cv1, upsample, cv2, cv3

    def prototypes(self, x):
        return self.cv3(self.cv2(self.upsample(self.cv1(x))))

    def forward(self, xs):
        return self.prototypes(xs[0])


class _Proto26(_Proto):
    """YOLO26's prototypes from every level: each coarser level projected to the finest's channels, enlarged
    (nearest) by 2, 4, ... and added to it, a 3x3 convolution, then :class:`_Proto`'s layers. (Its semantic
    segmentation branch only trains.)"""

    def __init__(self, cv1, upsample, cv2, cv3, refine: nn.ModuleList, fuse):
        super().__init__(cv1, upsample, cv2, cv3)
        self.refine, self.fuse = refine, fuse

    def forward(self, xs):
        feature = xs[0]
        for i, project in enumerate(self.refine):
            feature = feature + F.interpolate(project(xs[i + 1]), scale_factor=2 ** (i + 1), mode="nearest")
        return self.prototypes(self.fuse(feature))


@dataclass
class HeadOutput:
    """Per anchor: boxes (B, N, 4; x1 y1 x2 y2 in input pixels), class scores (B, N, classes, after the
    sigmoid), mask coefficients (B, N, masks) and prototypes (B, masks, h/4, w/4) of a segmentation head;
    ``end2end``: from a head's one-to-one branches, whose best pairs are kept without suppression."""

    boxes: torch.Tensor
    scores: torch.Tensor
    coefficients: torch.Tensor | None = None
    protos: torch.Tensor | None = None
    end2end: bool = False


class _Detect(nn.Module):
    """The Detect head: per level a box branch (4 × ``reg_max`` bins per side) and a class branch; the
    bins' softmax expectation (DFL) gives each side's distance from the anchor (cell centres), times the
    level's stride. A Segment head adds mask coefficients and the prototypes. ``end2end``: the branches are
    an end-to-end head's one-to-one ones."""

    def __init__(self, box: nn.ModuleList, cls: nn.ModuleList, bins: torch.Tensor, strides: list[float],
                 masks: nn.ModuleList | None = None, proto: nn.Module | None = None, end2end: bool = False,
                 contrast: nn.ModuleList | None = None):
        super().__init__()
        self.box, self.cls, self.masks, self.proto, self.contrast = box, cls, masks, proto, contrast
        self.register_buffer("bins", bins.reshape(-1), persistent=False)
        self.strides, self.end2end = strides, end2end

    def forward(self, xs, text: torch.Tensor | None = None) -> HeadOutput:
        b = xs[0].shape[0]
        reg = self.bins.numel()
        dist = torch.cat([branch(x).reshape(b, 4 * reg, -1) for branch, x in zip(self.box, xs)], -1)
        if self.contrast is not None:  # YOLO-World: the class branch gives embeddings, scored against the texts
            logits = torch.cat([score(branch(x), text).reshape(b, text.shape[1], -1)
                                for branch, score, x in zip(self.cls, self.contrast, xs)], -1)
        else:
            logits = torch.cat([branch(x).reshape(b, -1, x.shape[2] * x.shape[3]) for branch, x in zip(self.cls, xs)],
                               -1)
        anchors, strides = [], []
        for x, stride in zip(xs, self.strides):
            h, w = x.shape[2:]
            ys = torch.arange(h, device=x.device, dtype=x.dtype) + 0.5
            xs_ = torch.arange(w, device=x.device, dtype=x.dtype) + 0.5
            grid_y, grid_x = torch.meshgrid(ys, xs_, indexing="ij")
            anchors.append(torch.stack((grid_x, grid_y), -1).reshape(-1, 2))
            strides.append(torch.full((h * w, 1), float(stride), device=x.device, dtype=x.dtype))
        anchor, stride = torch.cat(anchors), torch.cat(strides)
        if reg == 1:  # no DFL: the branch gives the distances themselves
            sides = dist.reshape(b, 4, -1)
        else:
            sides = (dist.reshape(b, 4, reg, -1).softmax(2) * self.bins.reshape(1, 1, reg, 1)).sum(2)  # (B, 4, N)
        sides = sides.transpose(1, 2)
        boxes = torch.cat((anchor - sides[..., :2], anchor + sides[..., 2:]), -1) * stride
        out = HeadOutput(boxes, logits.sigmoid().transpose(1, 2), end2end=self.end2end)
        if self.masks is not None:
            out.coefficients = torch.cat([branch(x).reshape(b, -1, x.shape[2] * x.shape[3])
                                          for branch, x in zip(self.masks, xs)], -1).transpose(1, 2)
            out.protos = self.proto(xs)
        return out


class YoloModel(nn.Module):
    """The rebuilt network: ``layers`` in order, each taking the previous output or those its ``froms`` name."""

    def __init__(self, layers: list[nn.Module], froms: list[Any], names: dict[int, str], stride: int,
                 image_size: int = 640, source: str = "the YOLO model", text: torch.Tensor | None = None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.froms, self.names, self.stride = froms, names, stride
        #: The size pictures are letterboxed to: the one the model was trained at, as ultralytics predicts.
        self.image_size = image_size
        #: The file it was read from, for errors.
        self.source = source
        #: A YOLO-World model's class text embeddings (1, classes, width), as the file stores them.
        self.register_buffer("text", text, persistent=False)

    def classes(self, wanted: list[str], encode: Callable[[list[str]], torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, dict[int, str]]:
        """A YOLO-World model's text embeddings and names for the classes ``wanted`` (ADetailer's
        ``ad_model_classes``), in that order: those the file holds embeddings for as it holds them, others
        from ``encode(names) -> (n, width)`` (CLIP ViT-B/32's text features, as ultralytics' ``set_classes``
        makes them); without ``encode`` those are refused naming them."""
        index = {name: i for i, name in self.names.items()}
        missing = list(dict.fromkeys(name for name in wanted if name not in index))
        if missing and encode is None:
            known = ", ".join(list(self.names.values())[:30])
            raise ModelError(f"{self.source}: no text embeddings for {', '.join(map(repr, missing))} (its file "
                             f"holds {known}; other words need CLIP ViT-B/32's text encoder: `underpaint "
                             f"download clip-vit-b32`)")
        new = {}
        if missing:
            features = encode(missing).to(self.text.device, self.text.dtype)
            if features.shape != (len(missing), self.text.shape[-1]):
                raise ModelError(f"{self.source}: text features of shape {tuple(features.shape)} for "
                                 f"{len(missing)} classes of width {self.text.shape[-1]}")
            new = dict(zip(missing, features))
        rows = [self.text[0, index[name]] if name in index else new[name] for name in wanted]
        return torch.stack(rows)[None], dict(enumerate(wanted))

    @property
    def segments(self) -> bool:
        return getattr(self.layers[-1], "masks", None) is not None

    def forward(self, x: torch.Tensor, text: torch.Tensor | None = None) -> HeadOutput:
        """The head's outputs for pictures ``x``; a YOLO-World model scores ``text`` embeddings (1 or B,
        classes, width; default: its own)."""
        if self.text is not None:
            text = (self.text if text is None else text).to(x.dtype).expand(x.shape[0], -1, -1)
        outputs: list[Any] = []
        for layer, source in zip(self.layers, self.froms):
            if source != -1:
                x = outputs[source] if isinstance(source, int) else [x if j == -1 else outputs[j] for j in source]
            if isinstance(layer, _C2fAttn) or (isinstance(layer, _Detect) and layer.contrast is not None):
                x = layer(x, text)
            else:
                x = layer(x)
            outputs.append(x)
        return x


# --------------------------------------------------------------------------- rebuilding the network

_ACTIVATIONS = {"SiLU": nn.SiLU, "ReLU": nn.ReLU, "Identity": nn.Identity, "Sigmoid": nn.Sigmoid,
                "Hardswish": nn.Hardswish, "GELU": nn.GELU, "Tanh": nn.Tanh}


#: The layer kinds the builder knows (its ``_Kind`` methods), the file's class names looked up only here.
_LAYER_KINDS = frozenset({
    "LeakyReLU", "Conv2d", "ConvTranspose2d", "BatchNorm2d", "Conv", "DWConv", "Sequential", "ModuleList",
    "Bottleneck", "C2f", "SPPF", "C3", "RepCSP", "RepBottleneck", "RepConv", "RepConvN", "RepNCSPELAN4", "ADown",
    "SPPELAN", "MaxPool2d", "Upsample", "Concat", "Proto", "Detect", "Segment", "C3k2", "C3k", "C2PSA", "PSABlock",
    "Attention", "Proto26", "Segment26", "C2fAttn", "MaxSigmoidAttnBlock", "Linear", "BNContrastiveHead",
    "ContrastiveHead", "WorldDetect"})
#: Bounds on what a file may ask of the runner: modules in all, their nesting, and the settings that set
#: the work of a layer (SPPF's pools, an upsampling factor, a pooling kernel).
_MAX_MODULES, _MAX_DEPTH, _MAX_POOLS, _MAX_UPSAMPLE, _MAX_KERNEL = 5000, 32, 8, 4, 15


@torch.no_grad()
def _filled(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """``layer`` with the file's ``weight`` (and ``bias``) copied into it."""
    layer.weight.copy_(weight)
    if bias is not None:
        layer.bias.copy_(bias)
    return layer


class _Builder:
    """Rebuilds the network from the stand-ins' recorded state, in float64 (batch norms folded exactly)."""

    def __init__(self, path: Path):
        self.path = path
        self.modules = 0
        self.depth = 0

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
        self.modules += 1
        if self.modules > _MAX_MODULES or self.depth >= _MAX_DEPTH:
            raise self.bad(f"more than {_MAX_MODULES} modules or nested more than {_MAX_DEPTH} deep")
        if kind in _ACTIVATIONS:
            return _ACTIVATIONS[kind]()
        if kind in _LAYER_KINDS:
            self.depth += 1
            try:
                return getattr(self, f"_{kind}")(obj)
            finally:
                self.depth -= 1
        raise self.bad(f"holds a {kind} layer, which underpaint's YOLO runner does not have (YOLOv8, YOLOv9, "
                       f"YOLO11 and YOLO26 detection and segmentation models run: Conv, C2f, C3, C3k2, SPPF, "
                       f"C2PSA, RepNCSPELAN4, ADown, SPPELAN, Upsample, Concat, Detect, Segment)")

    def _LeakyReLU(self, obj):
        return nn.LeakyReLU(float(getattr(obj, "negative_slope", 0.01)))

    def _Conv2d(self, obj, transposed: bool = False):
        weight, bias = self.weight(obj), _tensor(obj, "bias")
        groups = int(getattr(obj, "groups", 1))
        options = dict(stride=_pair(getattr(obj, "stride", 1)), padding=_pair(getattr(obj, "padding", 0)),
                       dilation=_pair(getattr(obj, "dilation", 1)), groups=groups, bias=bias is not None)
        if getattr(obj, "padding_mode", "zeros") != "zeros":
            raise self.bad(f"a convolution padded in {obj.padding_mode!r} mode")
        if weight.ndim != 4 or max(weight.shape[2:]) > _MAX_KERNEL:
            raise self.bad(f"a convolution weight of shape {tuple(weight.shape)}")
        if transposed:
            conv = nn.ConvTranspose2d(weight.shape[0], weight.shape[1] * groups, tuple(weight.shape[2:]),
                                      output_padding=_pair(getattr(obj, "output_padding", 0)), dtype=weight.dtype,
                                      **options)
        else:
            conv = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), dtype=weight.dtype,
                             **options)
        return _filled(conv, weight, bias)

    def _ConvTranspose2d(self, obj):
        return self._Conv2d(obj, transposed=True)

    def _BatchNorm2d(self, obj):
        mean, var = self.weight(obj, "running_mean"), self.weight(obj, "running_var")
        bn = nn.BatchNorm2d(mean.shape[0], eps=float(getattr(obj, "eps", 1e-5)), dtype=mean.dtype)
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
                               conv.dilation, conv.groups, bias=True, dtype=conv.weight.dtype)
            with torch.no_grad():
                bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
                conv = _filled(folded, conv.weight * scale.reshape(-1, 1, 1, 1),
                               bn.bias + (bias - bn.running_mean) * scale)
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
        pools = getattr(obj, "n", 3)
        if not isinstance(pools, int) or not 1 <= pools <= _MAX_POOLS:
            raise self.bad(f"an SPPF layer of {pools!r} pools")
        return _SPPF(self.build(self.child(obj, "cv1")), self.build(self.child(obj, "cv2")),
                     self.build(self.child(obj, "m")), pools, bool(getattr(obj, "add", False)))

    def _C3(self, obj):
        return _C3(*(self.build(self.child(obj, name)) for name in ("cv1", "cv2", "cv3", "m")))

    _RepCSP = _C3
    _RepBottleneck = _Bottleneck
    _C3k2 = _C2f  # YOLO11's: its blocks Bottlenecks, C3ks or Bottleneck + PSABlock pairs
    _C3k = _C3

    def _C2PSA(self, obj):
        return _C2PSA(*(self.build(self.child(obj, name)) for name in ("cv1", "cv2", "m")))

    def _PSABlock(self, obj):
        return _PSABlock(self.build(self.child(obj, "attn")), self.build(self.child(obj, "ffn")),
                         bool(getattr(obj, "add", True)))

    def _Attention(self, obj):
        heads, key_dim, head_dim = (getattr(obj, name, None) for name in ("num_heads", "key_dim", "head_dim"))
        if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096
                   for v in (heads, key_dim, head_dim)):
            raise self.bad(f"an attention layer of {heads!r} heads, key size {key_dim!r}, head size {head_dim!r}")
        qkv, proj, pe = (self.build(self.child(obj, name)) for name in ("qkv", "proj", "pe"))
        width = heads * head_dim
        widths = [(qkv.conv.in_channels, width), (qkv.conv.out_channels, heads * (2 * key_dim + head_dim)),
                  (proj.conv.in_channels, width), (pe.conv.in_channels, width), (pe.conv.out_channels, width)]
        if not all(isinstance(m, _ConvAct) for m in (qkv, proj, pe)) or any(a != b for a, b in widths):
            raise self.bad(f"an attention layer whose projections do not fit {heads} heads of {head_dim} channels")
        scale = getattr(obj, "scale", None)
        scale = float(scale) if isinstance(scale, float) and math.isfinite(scale) else key_dim ** -0.5
        return _Attention(qkv, proj, pe, heads, key_dim, head_dim, scale)

    def _RepConv(self, obj):
        parts = _children(obj)
        act = self.build(parts["act"]) if parts.get("act") is not None else nn.Identity()
        if parts.get("conv") is not None and parts.get("conv1") is None:  # fused already
            return _ConvAct(self._Conv2d(parts["conv"]), act)
        bn = parts.get("bn")
        return _RepConv(self._Conv(self.child(obj, "conv1")), self._Conv(self.child(obj, "conv2")),
                        None if bn is None else self._BatchNorm2d(bn), act)

    _RepConvN = _RepConv  # its name in the ultralytics releases that brought YOLOv9

    def _RepNCSPELAN4(self, obj):
        return _ELAN(*(self.build(self.child(obj, name)) for name in ("cv1", "cv2", "cv3", "cv4")))

    def _ADown(self, obj):
        return _ADown(self.build(self.child(obj, "cv1")), self.build(self.child(obj, "cv2")))

    def _SPPELAN(self, obj):
        return _SPPELAN(self.build(self.child(obj, "cv1")),
                        [self.build(self.child(obj, name)) for name in ("cv2", "cv3", "cv4")],
                        self.build(self.child(obj, "cv5")))

    def _MaxPool2d(self, obj):
        kernel = getattr(obj, "kernel_size", None)
        if not isinstance(kernel, int) or not 1 <= kernel <= _MAX_KERNEL:
            raise self.bad(f"a max pool of kernel {kernel!r}")
        return nn.MaxPool2d(kernel, _pair(getattr(obj, "stride", None) or kernel),
                            _pair(getattr(obj, "padding", 0)), _pair(getattr(obj, "dilation", 1)),
                            ceil_mode=bool(getattr(obj, "ceil_mode", False)))

    def _Upsample(self, obj):
        factor = getattr(obj, "scale_factor", None)
        if getattr(obj, "size", None) is not None or not isinstance(factor, (int, float)) \
                or not 1 <= factor <= _MAX_UPSAMPLE:
            raise self.bad(f"an upsampling by {factor!r} (size {getattr(obj, 'size', None)!r})")
        return nn.Upsample(scale_factor=factor, mode=getattr(obj, "mode", "nearest"),
                           align_corners=getattr(obj, "align_corners", None))

    def _Concat(self, obj):
        return _Concat(int(getattr(obj, "d", 1)))

    def _Proto(self, obj):
        return _Proto(*(self.build(self.child(obj, name)) for name in ("cv1", "upsample", "cv2", "cv3")))

    def _Linear(self, obj):
        weight, bias = self.weight(obj), _tensor(obj, "bias")
        if weight.ndim != 2:
            raise self.bad(f"a linear layer weight of shape {tuple(weight.shape)}")
        return _filled(nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype),
                       weight, bias)

    def _C2fAttn(self, obj):
        attn = self.build(self.child(obj, "attn"))
        if not isinstance(attn, _MaxSigmoidAttn):
            raise self.bad("a C2fAttn layer without its attention block")
        return _C2fAttn(self.build(self.child(obj, "cv1")), self.build(self.child(obj, "cv2")),
                        self._ModuleList(self.child(obj, "m")), attn)

    def _MaxSigmoidAttnBlock(self, obj):
        heads = getattr(obj, "nh", None)
        parts = _children(obj)
        ec = self.build(parts["ec"]) if parts.get("ec") is not None else None
        gl, proj = self.build(self.child(obj, "gl")), self.build(self.child(obj, "proj_conv"))
        bias = self.weight(obj, "bias")
        scale = _tensor(obj, "scale")
        if scale is None:
            scale = torch.ones(1, dtype=torch.float64) * float(getattr(obj, "scale", 1.0))
        if not isinstance(heads, int) or isinstance(heads, bool) or not 1 <= heads <= 64 or \
                not isinstance(gl, nn.Linear) or not isinstance(proj, _ConvAct) or gl.out_features % heads or \
                proj.conv.out_channels % heads or bias.numel() != heads or scale.numel() not in (1, heads) or \
                (ec is not None and (not isinstance(ec, _ConvAct) or ec.conv.out_channels != gl.out_features)):
            raise self.bad(f"a text-guided attention block whose parts do not fit {heads!r} heads")
        return _MaxSigmoidAttn(ec, gl, bias, proj, heads, scale)

    def _BNContrastiveHead(self, obj):
        if _children(obj).get("norm") is None:
            raise self.bad("a fused contrastive head (its batch norm taken out), which scores no classes")
        return self._contrastive(obj, self._BatchNorm2d(self.child(obj, "norm")))

    def _ContrastiveHead(self, obj):
        return self._contrastive(obj, None)

    def _contrastive(self, obj, norm):
        scale, bias = self.weight(obj, "logit_scale"), self.weight(obj, "bias")
        if scale.numel() != 1 or bias.numel() != 1 or not -20 <= float(scale) <= 20:
            raise self.bad(f"a contrastive head of logit scale {scale.flatten()[:2].tolist()}")
        return _Contrastive(norm, float(scale), float(bias))

    def _Proto26(self, obj):
        refine = self._ModuleList(self.child(obj, "feat_refine"))
        if len(refine) > 4:
            raise self.bad(f"prototypes from {len(refine) + 1} levels")
        return _Proto26(*(self.build(self.child(obj, name)) for name in ("cv1", "upsample", "cv2", "cv3")), refine,
                        self.build(self.child(obj, "feat_fuse")))

    def _Detect(self, obj):
        parts = _children(obj)
        # ultralytics reads the one-to-one branches where the head was saved in end-to-end mode or fusing has
        # left only them; else the one-to-many ones, with suppression
        end2end = parts.get("one2one_cv2") is not None and (
            getattr(obj, "end2end", False) is True or getattr(obj, "_end2end", False) is True
            or parts.get("cv2") is None)
        branch = "one2one_" if end2end else ""
        stride = getattr(obj, "stride", None)
        if not isinstance(stride, torch.Tensor) or stride.numel() == 0 or not bool((stride > 0).all()):
            raise self.bad("a detection head without its strides")
        reg_max = getattr(obj, "reg_max", 16)
        if not isinstance(reg_max, int) or not 1 <= reg_max <= 64:
            raise self.bad(f"a detection head of {reg_max!r} distance bins")
        dfl = _children(obj).get("dfl")
        bins = _tensor(self.child(dfl, "conv"), "weight") if dfl is not None and _kind(dfl) == "DFL" else None
        if bins is None:  # DFL's fixed weights are 0, 1, ..., reg_max - 1; one bin (no DFL) is the distance itself
            bins = torch.arange(reg_max, dtype=torch.float64) if reg_max > 1 else torch.ones(1, dtype=torch.float64)
        elif bins.numel() != reg_max:
            raise self.bad(f"a DFL of {bins.numel()} bins for {reg_max}")
        masks = proto = contrast = None
        if _kind(obj) in ("Segment", "Segment26"):
            masks, proto = self._ModuleList(self.child(obj, branch + "cv4")), self.build(self.child(obj, "proto"))
        elif _kind(obj) == "WorldDetect":  # its cv4: each level's scoring against the class texts
            contrast = self._ModuleList(self.child(obj, branch + "cv4"))
            if not all(isinstance(m, _Contrastive) for m in contrast):
                raise self.bad("a WorldDetect head without its contrastive heads")
        return _Detect(self._ModuleList(self.child(obj, branch + "cv2")), self._ModuleList(self.child(obj, branch + "cv3")),
                       bins, [float(s) for s in stride.tolist()], masks, proto, end2end, contrast)

    _Segment = _Segment26 = _WorldDetect = _Detect


def load_yolo(path: Path, dtype: torch.dtype = torch.float32) -> YoloModel:
    """A YOLO detection or segmentation model file, rebuilt (in ``dtype``, on the CPU, in eval mode).

    As ultralytics loads it: the EMA weights where the file has them, else the model's; the stride at
    least 32; the picture size it was trained at (``train_args.imgsz``) as the size it predicts at.
    Whatever a damaged or crafted file breaks is a :class:`ModelError` naming the file: the rebuilt network
    runs once on a small blank picture, so that layers whose sizes do not fit together fail here.
    """
    path = Path(path)
    data = read_checkpoint(path)
    try:
        model = _rebuild(path, data).to(dtype)
        with torch.inference_mode():
            model(torch.zeros(1, 3, 2 * model.stride, 2 * model.stride, dtype=dtype))
        return model
    except ModelError as exc:
        if str(path) in str(exc):
            raise
        raise ModelError(f"{path}: {exc}") from None
    except Exception as exc:  # a crafted file's shapes, types or values that no layer takes
        raise ModelError(f"{path}: not a YOLO model this runner can rebuild ({type(exc).__name__}: {exc})") from None


def _rebuild(path: Path, data: Any) -> YoloModel:
    model = None
    if isinstance(data, dict):
        model = data.get("ema") if data.get("ema") is not None else data.get("model")
    if model is None or _kind(model) not in ("DetectionModel", "SegmentationModel", "WorldModel"):
        found = _kind(model) if model is not None else (sorted(map(str, data))[:8] if isinstance(data, dict)
                                                        else _kind(data))
        raise ModelError(f"{path}: not an ultralytics YOLO detection or segmentation model (found {found})")
    layers = list(_children(_children(model).get("model") or {}).values()) if _children(model) else []
    if not layers or _kind(layers[-1]) not in ("Detect", "Segment", "Segment26", "WorldDetect"):
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
    if not 1 <= stride <= 128:
        raise ModelError(f"{path}: a model of stride {stride}")
    text = None
    if _kind(model) == "WorldModel":  # the class texts' embeddings, as the file was saved with them
        text = getattr(model, "txt_feats", None)
        if not isinstance(text, torch.Tensor) or text.ndim != 3 or text.shape[0] != 1 or \
                text.shape[1] != len(names) or not text.is_floating_point():
            raise ModelError(f"{path}: a YOLO-World model without text embeddings for its {len(names)} classes")
        text = text.detach().double()
    return YoloModel(built, froms, names, max(stride, 32), _trained_size(data), str(path),
                     text).eval().requires_grad_(False)


def _trained_size(data: dict) -> int:
    """``train_args.imgsz`` (a dict, or ultralytics' namespace object), when it is a sensible square size."""
    args = data.get("train_args")
    args = args if isinstance(args, dict) else getattr(args, "__dict__", {})
    size = args.get("imgsz") if isinstance(args, dict) else None
    if isinstance(size, (list, tuple)) and size and all(s == size[0] for s in size):
        size = size[0]
    return size if isinstance(size, int) and not isinstance(size, bool) and 32 <= size <= 2048 else IMAGE_SIZE


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
def detect(model: YoloModel, picture, confidence: float, *, size: int | None = None, iou: float = IOU,
           max_detections: int = MAX_DETECTIONS,
           classes: tuple[torch.Tensor, dict[int, str]] | None = None) -> list[Detection]:
    """What ``model`` finds in ``picture`` (a PIL image) scored above ``confidence``, best first; ``size``:
    the letterbox's (None: the size the model was trained at, as ultralytics predicts). ``classes``: the
    classes a YOLO-World model looks for, as :meth:`YoloModel.classes` gives them (None: all it holds)."""
    text, names = classes if classes is not None else (None, model.names)
    pixels, box = letterbox(np.asarray(picture.convert("RGB")), size or model.image_size, model.stride)
    weight = next(model.parameters())
    x = (torch.from_numpy(np.ascontiguousarray(pixels)).to(weight.device).permute(2, 0, 1)[None].float() / 255
         ).to(weight.dtype)
    try:
        out = model(x, text)
    except ModelError as exc:
        raise ModelError(f"{model.source}: {exc}") from None
    boxes, scores = out.boxes[0].float().cpu(), out.scores[0].float().cpu()
    if out.end2end:
        kept, best, label = best_pairs(scores, max_detections)
        chosen = best > confidence
        kept, best, label = kept[chosen], best[chosen], label[chosen]
    else:
        best, label = scores.max(1)
        chosen = (best > confidence).nonzero().flatten()
        chosen = chosen[best[chosen].argsort(descending=True)][:MAX_CANDIDATES]
        offset = label[chosen, None].float() * 7680  # class-aware: boxes of other classes never overlap
        kept = chosen[nms(boxes[chosen] + offset, best[chosen], iou)][:max_detections]
        best, label = best[kept], label[kept]
    masks = _masks(out, kept, boxes, box) if out.protos is not None and len(kept) else [(None, True)] * len(kept)
    (w, h), (new_w, new_h), (left, top) = box.size, box.scaled, box.pad
    found = []
    for index, score, cls, (mask, shown) in zip(kept.tolist(), best.tolist(), label.tolist(), masks):
        if not shown:
            continue  # ultralytics keeps only the found things whose mask has a pixel (at the input's size)
        x1, y1, x2, y2 = boxes[index].tolist()
        mapped = (min(max((x1 - left) * w / new_w, 0.0), w), min(max((y1 - top) * h / new_h, 0.0), h),
                  min(max((x2 - left) * w / new_w, 0.0), w), min(max((y2 - top) * h / new_h, 0.0), h))
        found.append(Detection(mapped, score, names.get(cls, str(cls)), mask))
    return found


def best_pairs(scores: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An end-to-end head's finds among ``scores`` (anchors, classes), as ultralytics selects them: the
    ``count`` anchors of highest best score, then the ``count`` highest (anchor, class) scores among those;
    their anchors, scores and classes, best first (an anchor may come once per class)."""
    count = min(count, scores.shape[0])
    anchors = scores.amax(1).topk(count).indices
    best, pairs = scores[anchors].flatten().topk(count)
    return anchors[pairs // scores.shape[1]], best, pairs % scores.shape[1]


def _masks(out: HeadOutput, kept: torch.Tensor, boxes: torch.Tensor, box: Letterbox) -> list[tuple[np.ndarray, bool]]:
    """Each kept thing's mask in the picture (its coefficients times the prototypes, upsampled to the input,
    positive inside its box, the padding cut off and scaled to the picture with Pillow's filter) and whether
    it had a pixel at the input's size."""
    from PIL import Image

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
        cut = Image.fromarray(mask[top:top + new_h, left:left + new_w].astype(np.uint8) * 255, "L")
        out_masks.append((np.asarray(cut.resize((w, h), Image.Resampling.BILINEAR)) > 127, bool(mask.any())))
    return out_masks
