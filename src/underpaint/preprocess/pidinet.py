"""Soft edges and scribbles from PiDiNet (Su et al. 2021, "Pixel Difference Networks for Efficient
Edge Detection"), read from the annotator collection's ``table5_pidinet.pth``.

PiDiNet's convolutions look at differences of pixels rather than at pixels: in the "table 5"
network every fourth depthwise layer is a plain convolution ("cv"), the others take central
("cd": each neighbour minus the centre), angular ("ad": each ring neighbour minus the next one
clockwise) or radial ("rd": each pixel two steps out minus the one a step out, on a 5x5 window)
differences. Each is linear in the input, so each is one plain convolution with a rearranged
kernel (:func:`pdc_to_conv`); the file's kernels, trained as 3x3 difference weights, are converted
once on loading and the network below is made of plain convolutions only.

The network: an initial 3x3 convolution to 60 channels, four stages of residual blocks
(depthwise difference convolution, ReLU, 1x1 convolution; 60, 120, 240, 240 channels, each stage
after the first starting with 2x2 max pooling and a 1x1 shortcut), then per stage a dilated
context module (1x1 to 24 channels, four 3x3 convolutions dilated 5, 7, 9, 11, summed), a spatial
attention gate and a 1x1 reduction to one edge map; the four maps are upsampled to the input size
and mixed by a 1x1 classifier; its sigmoid is the edge strength. The file holds the trained
network under ``state_dict`` with DataParallel's ``module.`` prefix; it is read with ``weights_only``.
"""

from __future__ import annotations

import numpy as np

from ..errors import ModelError
from .basic import Params
from .common import annotator_file, cached, hwc3, resize_with_pad, to_uint8

PIDINET_FILE = "table5_pidinet.pth"
#: The "carv4" layer types of the table-5 network: initial convolution, then blocks 1_1 ... 4_4.
LAYER_TYPES = ("cd", "ad", "rd", "cv") * 4
#: (name, in channels, out channels, stride) of the 15 residual blocks after the initial convolution.
BLOCKS = tuple((f"block1_{i}", 60, 60, 1) for i in (1, 2, 3)) + \
    (("block2_1", 60, 120, 2),) + tuple((f"block2_{i}", 120, 120, 1) for i in (2, 3, 4)) + \
    (("block3_1", 120, 240, 2),) + tuple((f"block3_{i}", 240, 240, 1) for i in (2, 3, 4)) + \
    (("block4_1", 240, 240, 2),) + tuple((f"block4_{i}", 240, 240, 1) for i in (2, 3, 4))
#: Channels of the four stage outputs, and of the context modules that read them.
STAGE_CHANNELS = (60, 120, 240, 240)
CONTEXT_CHANNELS = 24
CONTEXT_DILATIONS = (5, 7, 9, 11)

# The angular differences pair each ring position of a 3x3 window (raster index) with the next one clockwise.
_RING = (0, 1, 2, 5, 8, 7, 6, 3)
ANGULAR_PAIRS = tuple((p, _RING[(i + 1) % len(_RING)]) for i, p in enumerate(_RING))
# The radial differences: the 8 directions in raster order; the k-th of the eight weights that follow the
# first (raster order of the 3x3 kernel) weighs pixel(2·d) - pixel(d) on a 5x5 window (raster index).
_DIRECTIONS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))
RADIAL_PAIRS = tuple(((2 + 2 * dy) * 5 + 2 + 2 * dx, (2 + dy) * 5 + 2 + dx) for dy, dx in _DIRECTIONS)


def pdc_to_conv(kind: str, weight):
    """The plain convolution kernel that computes the pixel-difference convolution ``kind`` of a
    (out, in, 3, 3) difference kernel: 3x3 for cv/cd/ad, 5x5 (padding 2) for rd."""
    import torch

    if weight.ndim != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ModelError(f"a pixel-difference kernel must be out x in x 3 x 3, got {tuple(weight.shape)}")
    if kind == "cv":
        return weight.clone()
    flat = weight.reshape(weight.shape[0], weight.shape[1], 9)
    if kind == "cd":  # sum_i w_i (x_i - x_centre): the centre weight loses the kernel's sum
        out = flat.clone()
        out[:, :, 4] -= flat.sum(dim=2)
        return out.reshape(weight.shape)
    if kind == "ad":  # sum_p w_p (x_p - x_next(p)) around the ring; the centre weight is unused
        out = torch.zeros_like(flat)
        for p, q in ANGULAR_PAIRS:
            out[:, :, p] += flat[:, :, p]
            out[:, :, q] -= flat[:, :, p]
        return out.reshape(weight.shape)
    if kind == "rd":  # sum_k w_k (x_outer(k) - x_inner(k)); the first weight is unused
        out = flat.new_zeros(weight.shape[0], weight.shape[1], 25)
        for k, (outer, inner) in enumerate(RADIAL_PAIRS, start=1):
            out[:, :, outer] += flat[:, :, k]
            out[:, :, inner] -= flat[:, :, k]
        return out.reshape(weight.shape[0], weight.shape[1], 5, 5)
    raise ModelError(f"unknown pixel-difference convolution {kind!r}; expected cv, cd, ad or rd")


def build_pidinet():
    """The table-5 PiDiNet with its difference convolutions already plain (rd layers 5x5)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self, kind: str, cin: int, cout: int, stride: int):
            super().__init__()
            self.stride = stride
            if stride > 1:
                self.shortcut = nn.Conv2d(cin, cout, 1)
            k = 5 if kind == "rd" else 3
            self.conv1 = nn.Conv2d(cin, cin, k, padding=k // 2, groups=cin, bias=False)
            self.conv2 = nn.Conv2d(cin, cout, 1, bias=False)

        def forward(self, x):
            if self.stride > 1:
                x = F.max_pool2d(x, 2, 2)
            y = self.conv2(torch.relu(self.conv1(x)))
            return y + (self.shortcut(x) if self.stride > 1 else x)

    class Context(nn.Module):
        """ReLU, 1x1 to 24 channels, then the sum of four dilated 3x3 convolutions."""

        def __init__(self, cin: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, CONTEXT_CHANNELS, 1)
            for i, d in enumerate(CONTEXT_DILATIONS, start=1):
                self.add_module(f"conv2_{i}", nn.Conv2d(CONTEXT_CHANNELS, CONTEXT_CHANNELS, 3, padding=d, dilation=d,
                                                        bias=False))

        def forward(self, x):
            x = self.conv1(torch.relu(x))
            return sum(getattr(self, f"conv2_{i}")(x) for i in range(1, len(CONTEXT_DILATIONS) + 1))

    class Attention(nn.Module):
        """A one-channel sigmoid gate from ReLU, 1x1 to 4 channels and a 3x3 convolution."""

        def __init__(self, ch: int):
            super().__init__()
            self.conv1 = nn.Conv2d(ch, 4, 1)
            self.conv2 = nn.Conv2d(4, 1, 3, padding=1, bias=False)

        def forward(self, x):
            return x * torch.sigmoid(self.conv2(self.conv1(torch.relu(x))))

    class Reduce(nn.Module):
        def __init__(self, ch: int):
            super().__init__()
            self.conv = nn.Conv2d(ch, 1, 1)

        def forward(self, x):
            return self.conv(x)

    class PiDiNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.init_block = nn.Conv2d(3, 60, 3, padding=1, bias=False)  # a "cd" layer
            for kind, (name, cin, cout, stride) in zip(LAYER_TYPES[1:], BLOCKS):
                self.add_module(name, Block(kind, cin, cout, stride))
            self.dilations = nn.ModuleList(Context(c) for c in STAGE_CHANNELS)
            self.attentions = nn.ModuleList(Attention(CONTEXT_CHANNELS) for _ in STAGE_CHANNELS)
            self.conv_reduces = nn.ModuleList(Reduce(CONTEXT_CHANNELS) for _ in STAGE_CHANNELS)
            self.classifier = nn.Conv2d(len(STAGE_CHANNELS), 1, 1)

        def forward(self, x):
            h, w = x.shape[2:]
            y = self.init_block(x)
            stages = []
            for name, *_ in BLOCKS:
                if name.endswith("_1") and name != "block1_1":
                    stages.append(y)
                y = getattr(self, name)(y)
            stages.append(y)
            maps = []
            for i, s in enumerate(stages):
                e = self.conv_reduces[i](self.attentions[i](self.dilations[i](s)))
                maps.append(F.interpolate(e, (h, w), mode="bilinear", align_corners=False))
            return torch.sigmoid(self.classifier(torch.cat(maps, dim=1)))

    return PiDiNet()


def _difference_layers() -> dict[str, str]:
    """The file's difference-convolution kernels and their types."""
    names = {"init_block.weight": LAYER_TYPES[0]}
    for kind, (name, *_rest) in zip(LAYER_TYPES[1:], BLOCKS):
        names[f"{name}.conv1.weight"] = kind
    return names


def file_layout() -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of ``table5_pidinet.pth`` (after its ``module.`` prefix): the network's,
    with every difference kernel 3x3 as trained."""
    import torch

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in build_pidinet().state_dict().items()}
    for name in _difference_layers():
        shapes[name] = shapes[name][:2] + (3, 3)
    return shapes


def convert_file_weights(sd: dict, path) -> dict:
    """Check a file's tensors against the trained layout and turn its difference kernels into plain ones."""
    expected = file_layout()
    missing, extra = sorted(expected.keys() - sd.keys()), sorted(sd.keys() - expected.keys())
    if missing or extra:
        raise ModelError(f"{path}: not a table-5 PiDiNet ({len(missing)} tensors missing, {len(extra)} unexpected, "
                         f"e.g. {(missing or extra)[0]})")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise ModelError(f"{path}: tensor {k} has shape {tuple(sd[k].shape)}, expected {shape}")
    out = {k: v.float() for k, v in sd.items()}
    for name, kind in _difference_layers().items():
        out[name] = pdc_to_conv(kind, out[name])
    return out


def _model(p: Params, what: str):
    from .networks import load_network

    path = annotator_file(p.ctx, PIDINET_FILE, what=what)
    return cached(p.ctx, f"{PIDINET_FILE}:{path}",
                  lambda: load_network(build_pidinet, path, p.ctx.device, convert=convert_file_weights))


def _edges(img: np.ndarray, p: Params, what: str):
    """Edge strength in [0, 1] at the working resolution (the network reads BGR in [0, 1])."""
    import torch

    model = _model(p, what)
    padded = resize_with_pad(img, p.res)
    bgr = padded.image[:, :, ::-1].astype(np.float32) / 255.0
    x = torch.from_numpy(np.ascontiguousarray(bgr.transpose(2, 0, 1))[None]).to(p.ctx.device)
    with torch.inference_mode():
        edges = model(x)[0, 0].float().cpu().numpy()
    return edges, padded


def softedge_pidinet(img: np.ndarray, p: Params) -> np.ndarray:
    """PiDiNet's soft edges, white on black."""
    edges, padded = _edges(img, p, "softedge_pidinet")
    return hwc3(padded.crop(to_uint8(edges * 255.0)))


def softedge_pidisafe(img: np.ndarray, p: Params) -> np.ndarray:
    """PiDiNet's edges quantised to three levels (0, half, full), as the "safe" soft-edge maps are."""
    edges, padded = _edges(img, p, "softedge_pidisafe")
    safe = np.floor(edges * 3.0) / 2.0
    return hwc3(padded.crop(to_uint8(safe.clip(0, 1) * 255.0)))


def scribble_pidinet(img: np.ndarray, p: Params) -> np.ndarray:
    """Scribbles from PiDiNet: thinned edges, blurred (σ 3) and thresholded, as ``scribble_hed`` does."""
    from .common import opencv
    from .networks import thin_lines

    cv2 = opencv()
    edges, padded = _edges(img, p, "scribble_pidinet")
    lines = cv2.GaussianBlur(thin_lines(to_uint8(edges * 255.0), 127, 3.0), (0, 0), 3.0)
    return hwc3(padded.crop(np.where(lines > 4, 255, 0).astype(np.uint8)))
