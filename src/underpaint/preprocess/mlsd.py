"""Straight line segments from M-LSD (Gu et al. 2021, "Towards Light-weight and Real-time Line
Segment Detection"), the large model of the annotator collection's ``mlsd_large_512_fp32.pth``,
drawn as 1-pixel white lines on black for the MLSD ControlNet.

The network: the first five stages of MobileNetV2 (Sandler et al. 2018; inverted residual blocks,
batch norm, ReLU6, stride-2 convolutions padded on the right and bottom only, as TensorFlow pads)
read the picture plus a constant fourth channel, all scaled to [-1, 1]; four decoder steps each
join a backbone feature (1x1 convolution) with the upsampled coarser result and refine it with two
3x3 convolutions; a last block (a 3x3 convolution dilated 5, a 3x3 and a 1x1) gives 16 maps at
half the input size, of which the last 9 are the "tp-map": a line-centre score (logit), then the
displacement from the centre to the segment's start (x, y) and end (x, y).

Decoding: centre scores through a sigmoid, kept only where they are the maximum of their 3x3
neighbourhood, the 200 highest taken; a centre is a segment when its score exceeds threshold A
(default 0.1) and its start-to-end length, in tp-map pixels, exceeds threshold B (default 0.1).
Coordinates are doubled to the input size.
"""

from __future__ import annotations

import numpy as np

from .basic import Params
from .common import annotator_file, cached, hwc3, opencv, resize_with_pad

MLSD_FILE = "mlsd_large_512_fp32.pth"
#: The MobileNetV2 stages M-LSD keeps: (expansion, channels, blocks, stride of the first block).
BACKBONE_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))
#: Backbone layers whose outputs feed the decoder (16, 24, 32, 64 and 96 channels).
TAPS = (1, 3, 6, 10, 13)
#: (backbone feature channels, coarser channels, upsample) of the four decoder joins, coarse to fine.
DECODER_JOINS = ((64, 96, False), (32, 64, True), (24, 64, True), (16, 64, True))
TOP_K = 200


def build_mlsd():
    """M-LSD large with the file's module names (``backbone.features.N``, ``block15`` ... ``block23``)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class ConvBN(nn.Sequential):
        """Convolution (no bias), batch norm, ReLU6; stride 2 pads one pixel right and below."""

        def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1):
            padding = 0 if stride == 2 else (k - 1) // 2
            super().__init__(nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout),
                             nn.ReLU6())
            self.stride = stride

        def forward(self, x):
            return super().forward(F.pad(x, (0, 1, 0, 1)) if self.stride == 2 else x)

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expansion: int):
            super().__init__()
            hidden = cin * expansion
            layers = [ConvBN(cin, hidden, 1)] if expansion != 1 else []
            layers += [ConvBN(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, cout, 1, bias=False),
                       nn.BatchNorm2d(cout)]
            self.conv = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.conv(x) if self.residual else self.conv(x)

    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            layers: list[nn.Module] = [ConvBN(4, 32, 3, 2)]
            cin = 32
            for expansion, cout, n, stride in BACKBONE_STAGES:
                for i in range(n):
                    layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expansion))
                    cin = cout
            self.features = nn.Sequential(*layers)

        def forward(self, x):
            taps = []
            for i, layer in enumerate(self.features):
                x = layer(x)
                if i in TAPS:
                    taps.append(x)
            return taps

    def conv_bn_relu(cin: int, cout: int, k: int, dilation: int = 1):
        pad = dilation * (k - 1) // 2
        return nn.Sequential(nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation), nn.BatchNorm2d(cout), nn.ReLU())

    class Join(nn.Module):
        """1x1 projections of a backbone feature and of the (upsampled) coarser result, concatenated."""

        def __init__(self, c_fine: int, c_coarse: int, upsample: bool):
            super().__init__()
            self.conv1 = conv_bn_relu(c_coarse, 64, 1)
            self.conv2 = conv_bn_relu(c_fine, 64, 1)
            self.upsample = upsample

        def forward(self, fine, coarse):
            coarse = self.conv1(coarse)
            if self.upsample:
                coarse = F.interpolate(coarse, scale_factor=2.0, mode="bilinear", align_corners=True)
            return torch.cat([self.conv2(fine), coarse], dim=1)

    class Refine(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = conv_bn_relu(128, 128, 3)
            self.conv2 = conv_bn_relu(128, 64, 3)

        def forward(self, x):
            return self.conv2(self.conv1(x) + x)

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = conv_bn_relu(64, 64, 3, dilation=5)
            self.conv2 = conv_bn_relu(64, 64, 3)
            self.conv3 = nn.Conv2d(64, 16, 1)

        def forward(self, x):
            return self.conv3(self.conv2(self.conv1(x)))

    class MLSD(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = Backbone()
            for i, (c_fine, c_coarse, upsample) in enumerate(DECODER_JOINS):
                self.add_module(f"block{15 + 2 * i}", Join(c_fine, c_coarse, upsample))
                self.add_module(f"block{16 + 2 * i}", Refine())
            self.block23 = Head()

        def forward(self, x):
            c1, c2, c3, c4, c5 = self.backbone(x)
            y = c5
            for i, fine in enumerate((c4, c3, c2, c1)):
                y = getattr(self, f"block{16 + 2 * i}")(getattr(self, f"block{15 + 2 * i}")(fine, y))
            return self.block23(y)[:, 7:]

    return MLSD()


def _fill_batch_counts(sd: dict, path) -> dict:
    """Batch-norm step counters are bookkeeping; files saved without them load as if they were 0."""
    import torch

    out = dict(sd)
    for k in list(sd):
        if k.endswith(".running_mean"):
            counter = k[: -len("running_mean")] + "num_batches_tracked"
            out.setdefault(counter, torch.tensor(0, dtype=torch.long))
    return out


def decode_segments(tp_map, score_threshold: float, length_threshold: float, top_k: int = TOP_K) -> np.ndarray:
    """Segments (N x 4: x0, y0, x1, y1, in tp-map pixels) from a 9 x h x w tp-map (array or tensor)."""
    import torch
    from torch.nn import functional as F

    tp = torch.as_tensor(np.asarray(tp_map) if not isinstance(tp_map, torch.Tensor) else tp_map).float().cpu()
    _, h, w = tp.shape
    heat = torch.sigmoid(tp[0])[None, None]
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    scores, indices = torch.topk(peaks.flatten(), min(top_k, h * w))
    ys, xs = indices // w, indices % w
    disp = tp[1:5, ys, xs].T  # start dx, dy, end dx, dy
    length = torch.hypot(disp[:, 0] - disp[:, 2], disp[:, 1] - disp[:, 3])
    keep = (scores > score_threshold) & (length > length_threshold)
    centre = torch.stack([xs, ys, xs, ys], dim=1).float()
    return (centre + disp)[keep].numpy().astype(np.float64)


def draw_segments(segments: np.ndarray, height: int, width: int) -> np.ndarray:
    """1-pixel white lines on black (H x W, uint8); end points truncated to whole pixels."""
    cv2 = opencv()

    canvas = np.zeros((height, width), dtype=np.uint8)
    for x0, y0, x1, y1 in segments:
        cv2.line(canvas, (int(x0), int(y0)), (int(x1), int(y1)), 255, 1)
    return canvas


def _model(p: Params):
    from .networks import load_network

    path = annotator_file(p.ctx, MLSD_FILE, what="mlsd")
    return cached(p.ctx, f"{MLSD_FILE}:{path}",
                  lambda: load_network(build_mlsd, path, p.ctx.device, convert=_fill_batch_counts))


def mlsd(img: np.ndarray, p: Params) -> np.ndarray:
    """M-LSD line segments at the working resolution; A: centre score threshold, B: length threshold."""
    import torch

    model = _model(p)
    padded = resize_with_pad(img, p.res)
    h, w = padded.image.shape[:2]
    x = np.concatenate([padded.image.astype(np.float32), np.ones((h, w, 1), np.float32)], axis=2) / 127.5 - 1.0
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))[None]).to(p.ctx.device)
    with torch.inference_mode():
        tp = model(t)[0].float().cpu()
    segments = decode_segments(tp, float(p.a), float(p.b)) * 2.0
    return hwc3(padded.crop(draw_segments(segments, h, w)))
