"""Faces and their five landmarks (eyes, nose tip, mouth corners): RetinaFace (Deng et al., 2020) with a
ResNet-50 backbone, the detector A1111's face restoration uses (``detection_Resnet50_Final.pth``, in
the ``models/GFPGAN`` folder), and ParseNet, the face-parsing network whose map softens the edge a
restored face is pasted back with (``parsing_parsenet.pth``).

The layers carry the tensor names of those files (torchvision's ResNet-50 under ``body.``, the
feature pyramid ``fpn.``, the context modules ``ssh1-3.``, the heads ``ClassHead``/``BboxHead``/
``LandmarkHead``), so the released weights load as they are.

:func:`detect_faces` follows the released detector's inference: BGR pixels less the mean (104, 117,
123), anchors of 16/32, 64/128 and 256/512 pixels on strides 8, 16 and 32, box and landmark offsets
decoded with variances 0.1 and 0.2, a score threshold, then non-maximum suppression at IoU 0.4.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from itertools import product

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ModelError

__all__ = ["RetinaFace", "ParseNet", "detect_faces", "load_retinaface", "load_parsenet", "nms"]

# --- RetinaFace -----------------------------------------------------------------------------------

_MEAN_BGR = (104.0, 117.0, 123.0)
_ANCHORS = ((16, 32), (64, 128), (256, 512))
_STRIDES = (8, 16, 32)
_VARIANCES = (0.1, 0.2)


class _Bottleneck(nn.Module):
    """torchvision's ResNet-50 bottleneck (the stride on the 3x3 convolution)."""

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        c_out = width * 4
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class _ResNetBody(nn.Module):
    """ResNet-50 up to its last stage, returning the outputs of stages 2, 3 and 4."""

    def __init__(self, base: int = 64, blocks: tuple[int, ...] = (3, 4, 6, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, base, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        c_in = base
        for i, (count, stride) in enumerate(zip(blocks, (1, 2, 2, 2)), start=1):
            width = base * 2 ** (i - 1)
            layer = nn.Sequential(*[_Bottleneck(c_in if j == 0 else width * 4, width, stride if j == 0 else 1)
                                    for j in range(count)])
            setattr(self, f"layer{i}", layer)
            c_in = width * 4

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer1(x)
        c2 = self.layer2(x)
        c3 = self.layer3(c2)
        return [c2, c3, self.layer4(c3)]


def _conv_bn(c_in: int, c_out: int, kernel: int, slope: float | None) -> nn.Sequential:
    """Conv (no bias) + batch norm (+ leaky ReLU of ``slope``; None: no activation)."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, 1, kernel // 2, bias=False), nn.BatchNorm2d(c_out)]
    if slope is not None:
        layers.append(nn.LeakyReLU(slope))
    return nn.Sequential(*layers)


class _FPN(nn.Module):
    def __init__(self, widths: tuple[int, ...], out: int):
        super().__init__()
        slope = 0.1 if out <= 64 else 0.0
        self.output1, self.output2, self.output3 = (_conv_bn(w, out, 1, slope) for w in widths)
        self.merge1 = _conv_bn(out, out, 3, slope)
        self.merge2 = _conv_bn(out, out, 3, slope)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        o1, o2, o3 = self.output1(feats[0]), self.output2(feats[1]), self.output3(feats[2])
        o2 = self.merge2(o2 + F.interpolate(o3, size=o2.shape[2:], mode="nearest"))
        o1 = self.merge1(o1 + F.interpolate(o2, size=o1.shape[2:], mode="nearest"))
        return [o1, o2, o3]


class _SSH(nn.Module):
    """Single-stage headless context module: 3x3, "5x5" and "7x7" (stacked 3x3) branches joined."""

    def __init__(self, c: int):
        super().__init__()
        slope = 0.1 if c <= 64 else 0.0
        self.conv3X3 = _conv_bn(c, c // 2, 3, None)
        self.conv5X5_1 = _conv_bn(c, c // 4, 3, slope)
        self.conv5X5_2 = _conv_bn(c // 4, c // 4, 3, None)
        self.conv7X7_2 = _conv_bn(c // 4, c // 4, 3, slope)
        self.conv7x7_3 = _conv_bn(c // 4, c // 4, 3, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        five = self.conv5X5_1(x)
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(five), self.conv7x7_3(self.conv7X7_2(five))], 1))


class _Head(nn.Module):
    def __init__(self, c: int, per_anchor: int, anchors: int = 2):
        super().__init__()
        self.per_anchor = per_anchor
        self.conv1x1 = nn.Conv2d(c, anchors * per_anchor, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1x1(x).permute(0, 2, 3, 1)
        return out.reshape(out.shape[0], -1, self.per_anchor)


class RetinaFace(nn.Module):
    """``forward(bgr_minus_mean)`` → (box offsets ``[B, N, 4]``, class probabilities ``[B, N, 2]``,
    landmark offsets ``[B, N, 10]``) for the N anchors of :func:`anchors`."""

    def __init__(self, base: int = 64, channels: int = 256):
        super().__init__()
        self.body = _ResNetBody(base)
        self.fpn = _FPN((base * 8, base * 16, base * 32), channels)
        self.ssh1, self.ssh2, self.ssh3 = _SSH(channels), _SSH(channels), _SSH(channels)
        self.ClassHead = nn.ModuleList(_Head(channels, 2) for _ in range(3))
        self.BboxHead = nn.ModuleList(_Head(channels, 4) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(_Head(channels, 10) for _ in range(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats = self.fpn(self.body(x))
        feats = [self.ssh1(feats[0]), self.ssh2(feats[1]), self.ssh3(feats[2])]
        boxes = torch.cat([h(f) for h, f in zip(self.BboxHead, feats)], 1)
        scores = torch.cat([h(f) for h, f in zip(self.ClassHead, feats)], 1).softmax(-1)
        landmarks = torch.cat([h(f) for h, f in zip(self.LandmarkHead, feats)], 1)
        return boxes, scores, landmarks


def anchors(height: int, width: int) -> torch.Tensor:
    """RetinaFace's anchors ``[N, 4]`` (centre x, centre y, width, height, relative to the picture), level by
    level, row by row, two sizes per cell."""
    rows = []
    for sizes, stride in zip(_ANCHORS, _STRIDES):
        for i, j in product(range(math.ceil(height / stride)), range(math.ceil(width / stride))):
            for size in sizes:
                rows.append(((j + 0.5) * stride / width, (i + 0.5) * stride / height, size / width, size / height))
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Greedy non-maximum suppression, highest score first: a box overlapping a kept one by IoU above
    ``threshold`` is dropped (areas as ``(x2 - x1)·(y2 - y1)``)."""
    order = list(np.argsort(-scores, kind="stable"))
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep: list[int] = []
    while order:
        i = order.pop(0)
        keep.append(int(i))
        if not order:
            break
        rest = np.array(order)
        w = np.clip(np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]), 0, None)
        h = np.clip(np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]), 0, None)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        order = [int(k) for k, o in zip(rest, iou) if not o > threshold]
    return keep


@torch.no_grad()
def detect_faces(net: RetinaFace, bgr: np.ndarray, threshold: float = 0.97,
                 nms_threshold: float = 0.4) -> np.ndarray:
    """Faces in a BGR picture (``uint8 [H, W, 3]``), best first: rows of box (x1, y1, x2, y2), score and
    the five landmarks (x, y pairs: left eye, right eye, nose, left and right mouth corner), in pixels."""
    p = next(net.parameters())
    h, w = bgr.shape[:2]
    x = torch.from_numpy(np.ascontiguousarray(bgr, dtype=np.float32).transpose(2, 0, 1))[None]
    x = (x - torch.tensor(_MEAN_BGR).view(1, 3, 1, 1)).to(p.device, p.dtype)
    loc, conf, landm = (t[0].float().cpu() for t in net(x))
    priors = anchors(h, w)
    centre, size = priors[:, :2], priors[:, 2:]
    wh = size * torch.exp(loc[:, 2:] * _VARIANCES[1])
    xy = centre + loc[:, :2] * _VARIANCES[0] * size - wh / 2
    boxes = torch.cat([xy, xy + wh], 1) * torch.tensor([w, h, w, h], dtype=torch.float32)
    points = (centre.repeat(1, 5) + landm * _VARIANCES[0] * size.repeat(1, 5)) * torch.tensor([w, h] * 5,
                                                                                              dtype=torch.float32)
    scores = conf[:, 1]
    chosen = scores > threshold
    boxes, points, scores = boxes[chosen].numpy(), points[chosen].numpy(), scores[chosen].numpy()
    order = scores.argsort()[::-1]  # best first, equal scores in the order the released detector leaves them
    boxes, points, scores = boxes[order], points[order], scores[order]
    keep = nms(boxes, scores, nms_threshold)
    return np.concatenate([boxes[keep], scores[keep, None], points[keep]], axis=1).astype(np.float32)


def load_retinaface(sd: Mapping[str, torch.Tensor], source: str = "face detector") -> RetinaFace:
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if "body.conv1.weight" not in sd or "LandmarkHead.0.conv1x1.weight" not in sd:
        raise ModelError(f"{source}: not a RetinaFace ResNet-50 face detector (expected body.conv1.weight and "
                         "LandmarkHead.0.conv1x1.weight, as in detection_Resnet50_Final.pth)")
    base = sd["body.conv1.weight"].shape[0]
    channels = sd["fpn.output1.0.weight"].shape[0]
    from .loader import _assign

    with torch.device("meta"):
        net = RetinaFace(base, channels)
    return _assign(net, sd, source, torch.device("cpu"), torch.float32)


# --- ParseNet ---------------------------------------------------------------------------------------


class _PConv(nn.Module):
    """Reflection padding, conv, optional batch norm and leaky ReLU; resampled before (up) or by the
    stride (down)."""

    def __init__(self, c_in: int, c_out: int, *, scale: str = "none", norm: bool = False, act: bool = False):
        super().__init__()
        self.up, self.act = scale == "up", act
        self.conv2d = nn.Conv2d(c_in, c_out, 3, 2 if scale == "down" else 1, bias=not norm)
        if norm:
            self.norm = nn.Module()
            self.norm.norm = nn.BatchNorm2d(c_out)  # the file's nesting: norm.norm.*
        else:
            self.norm = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        out = self.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"))
        if self.norm is not None:
            out = self.norm.norm(out)
        return F.leaky_relu(out, 0.2) if self.act else out


class _PBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, scale: str = "none"):
        super().__init__()
        self.shortcut_func = None if scale == "none" and c_in == c_out else _PConv(c_in, c_out, scale=scale)
        self.conv1 = _PConv(c_in, c_out, scale="up" if scale == "up" else "none", norm=True, act=True)
        self.conv2 = _PConv(c_out, c_out, scale="down" if scale == "down" else "none", norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut_func is None else self.shortcut_func(x)
        return identity + self.conv2(self.conv1(x))


class ParseNet(nn.Module):
    """Face parsing (19 classes) of a 512² RGB face in [-1, 1]; ``forward`` returns the class logits."""

    def __init__(self, base: int = 64, steps: int = 4, depth: int = 10, widths: tuple[int, int] = (32, 256),
                 classes: int = 19):
        super().__init__()

        def clip(c: int) -> int:
            return max(widths[0], min(c, widths[1]))

        encoder: list[nn.Module] = [_PConv(3, base)]
        c = base
        for _ in range(steps):
            encoder.append(_PBlock(clip(c), clip(c * 2), "down"))
            c *= 2
        self.encoder = nn.Sequential(*encoder)
        self.body = nn.Sequential(*[_PBlock(clip(c), clip(c)) for _ in range(depth)])
        decoder = []
        for _ in range(steps):
            decoder.append(_PBlock(clip(c), clip(c // 2), "up"))
            c //= 2
        self.decoder = nn.Sequential(*decoder)
        self.out_img_conv = _PConv(clip(c), 3)
        self.out_mask_conv = _PConv(clip(c), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.encoder(x)
        return self.out_mask_conv(self.decoder(feat + self.body(feat)))


def load_parsenet(sd: Mapping[str, torch.Tensor], source: str = "face parser") -> ParseNet:
    if "encoder.0.conv2d.weight" not in sd or "out_mask_conv.conv2d.weight" not in sd:
        raise ModelError(f"{source}: not a ParseNet face parser (expected encoder.0.conv2d.weight and "
                         "out_mask_conv.conv2d.weight, as in parsing_parsenet.pth)")
    base = sd["encoder.0.conv2d.weight"].shape[0]
    steps = len({k.split(".")[1] for k in sd if k.startswith("encoder.")}) - 1
    depth = len({k.split(".")[1] for k in sd if k.startswith("body.")})
    classes = sd["out_mask_conv.conv2d.weight"].shape[0]
    # The blocks' widths are base·2^k clipped to a range: its ends are the narrowest and widest block.
    blocks = [v.shape[0] for k, v in sd.items() if k.endswith("conv1.conv2d.weight")]
    if not blocks:
        raise ModelError(f"{source}: ParseNet without residual blocks")
    from .loader import _assign

    with torch.device("meta"):
        net = ParseNet(base=base, steps=steps, depth=depth, widths=(min(blocks), max(blocks)), classes=classes)
    return _assign(net, dict(sd), source, torch.device("cpu"), torch.float32)
