"""Line and soft-edge annotators with small networks: HED (Xie & Tu 2015, in lllyasviel's
``ControlNetHED.pth`` form) and the "informative drawings" line-art generator (Chan et al. 2022,
``sk_model.pth`` realistic, ``sk_model2.pth`` coarse). Both files are read with ``weights_only``;
the networks are written here from their layer shapes.
"""

from __future__ import annotations

import numpy as np

from ..errors import ModelError
from .basic import Params
from .common import annotator_file, cached, hwc3, load_annotator_weights, opencv, resize_with_pad, to_uint8

HED_FILE = "ControlNetHED.pth"
LINEART_FILE = "sk_model.pth"
LINEART_COARSE_FILE = "sk_model2.pth"
#: HED's five VGG-like blocks: (in, out, convs); each block after the first starts with 2x2 max pooling.
HED_BLOCKS = ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3))


def build_hed():
    """Five conv blocks, each with a 1x1 side output; a learned colour offset ``norm`` is subtracted first."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, n: int):
            super().__init__()
            self.convs = nn.ModuleList([nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1) for i in range(n)])
            self.projection = nn.Conv2d(cout, 1, 1)

        def forward(self, x, pool: bool):
            if pool:
                x = nn.functional.max_pool2d(x, 2, 2)
            for conv in self.convs:
                x = torch.relu(conv(x))
            return x, self.projection(x)

    class HED(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
            for i, (cin, cout, n) in enumerate(HED_BLOCKS, start=1):
                self.add_module(f"block{i}", Block(cin, cout, n))

        def forward(self, x):
            h = x - self.norm
            sides = []
            for i in range(1, len(HED_BLOCKS) + 1):
                h, side = getattr(self, f"block{i}")(h, pool=i > 1)
                sides.append(side)
            return sides

    return HED()


def build_lineart():
    """ResNet generator: 7x7 conv, two stride-2 convs, three residual blocks, two transposed convs, 7x7 conv,
    instance norms without affine weights, sigmoid output."""
    from torch import nn

    class Residual(nn.Module):
        def __init__(self, ch: int):
            super().__init__()
            self.conv_block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3), nn.InstanceNorm2d(ch), nn.ReLU(),
                                            nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3), nn.InstanceNorm2d(ch))

        def forward(self, x):
            return x + self.conv_block(x)

    class Generator(nn.Module):
        def __init__(self):
            super().__init__()
            self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, 64, 7), nn.InstanceNorm2d(64), nn.ReLU())
            self.model1 = nn.Sequential(nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.InstanceNorm2d(128), nn.ReLU(),
                                        nn.Conv2d(128, 256, 3, stride=2, padding=1), nn.InstanceNorm2d(256), nn.ReLU())
            self.model2 = nn.Sequential(*[Residual(256) for _ in range(3)])
            self.model3 = nn.Sequential(
                nn.ConvTranspose2d(256, 128, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(128), nn.ReLU(),
                nn.ConvTranspose2d(128, 64, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(64), nn.ReLU())
            self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(64, 1, 7), nn.Sigmoid())

        def forward(self, x):
            return self.model4(self.model3(self.model2(self.model1(self.model0(x)))))

    return Generator()


def load_network(build, path, device: str = "cpu", convert=None):
    """``build()`` filled with a file's weights; names and shapes must match exactly.

    ``convert(sd, path)``, when given, turns the file's tensors into the network's (checking the file's
    own layout first) before they are matched.
    """
    import torch

    with torch.device("meta"):
        model = build()
    sd = load_annotator_weights(path)
    if convert is not None:
        sd = convert(sd, path)
    expected = model.state_dict()
    missing, extra = sorted(expected.keys() - sd.keys()), sorted(sd.keys() - expected.keys())
    if missing or extra:
        raise ModelError(f"{path}: the weights do not fit this annotator ({len(missing)} missing, {len(extra)} "
                         f"unexpected, e.g. {(missing or extra)[0]})")
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ModelError(f"{path}: tensor {k} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, assign=True)
    return model.eval().to(device)


def _model(p: Params, filename: str, build, what: str):
    path = annotator_file(p.ctx, filename, what=what)
    return cached(p.ctx, f"{filename}:{path}", lambda: load_network(build, path, p.ctx.device))


def _hed_edges(img: np.ndarray, p: Params) -> tuple[np.ndarray, object]:
    """HED soft edges in [0, 1]: the side outputs resized to the picture, averaged, through a sigmoid."""
    cv2 = opencv()
    import torch

    model = _model(p, HED_FILE, build_hed, "softedge_hed")
    padded = resize_with_pad(img, p.res)
    h, w = padded.image.shape[:2]
    x = torch.from_numpy(padded.image.astype(np.float32).transpose(2, 0, 1)[None]).to(p.ctx.device)
    with torch.inference_mode():
        sides = [s[0, 0].float().cpu().numpy() for s in model(x)]
    sides = np.stack([cv2.resize(s, (w, h), interpolation=cv2.INTER_LINEAR) for s in sides], axis=2)
    return 1 / (1 + np.exp(-sides.mean(axis=2))), padded


def softedge_hed(img: np.ndarray, p: Params) -> np.ndarray:
    edges, padded = _hed_edges(img, p)
    return hwc3(padded.crop(to_uint8(edges * 255.0)))


def softedge_hedsafe(img: np.ndarray, p: Params) -> np.ndarray:
    """HED with its edge strengths quantised to three levels, which hides hidden-watermark-like detail."""
    edges, padded = _hed_edges(img, p)
    safe = np.floor(edges * 3.0) / 2.0
    return hwc3(padded.crop(to_uint8(safe.clip(0, 1) * 255.0)))


def thin_lines(x: np.ndarray, threshold: float, sigma: float) -> np.ndarray:
    """Non-maximum suppression across 4 directions after a blur: thin, binary strokes."""
    cv2 = opencv()

    blurred = cv2.GaussianBlur(x.astype(np.float32), (0, 0), sigma)
    kernels = [np.array(k, dtype=np.uint8) for k in (
        [[0, 0, 0], [1, 1, 1], [0, 0, 0]], [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 0, 1], [0, 1, 0], [1, 0, 0]])]
    kept = np.zeros_like(blurred)
    for k in kernels:
        np.putmask(kept, cv2.dilate(blurred, kernel=k) == blurred, blurred)
    out = np.zeros(kept.shape, dtype=np.uint8)
    out[kept > threshold] = 255
    return out


def scribble_hed(img: np.ndarray, p: Params) -> np.ndarray:
    """Scribbles from HED: thinned edges, blurred (σ 3) and thresholded, as a hand scribble looks."""
    cv2 = opencv()

    edges, padded = _hed_edges(img, p)
    lines = thin_lines(to_uint8(edges * 255.0), 127, 3.0)
    lines = cv2.GaussianBlur(lines, (0, 0), 3.0)
    out = np.where(lines > 4, 255, 0).astype(np.uint8)
    return hwc3(padded.crop(out))


def _lineart(img: np.ndarray, p: Params, filename: str, what: str) -> np.ndarray:
    import torch

    model = _model(p, filename, build_lineart, what)
    padded = resize_with_pad(img, p.res)
    x = torch.from_numpy(padded.image.astype(np.float32).transpose(2, 0, 1)[None] / 255.0).to(p.ctx.device)
    with torch.inference_mode():
        line = model(x)[0, 0].float().cpu().numpy()
    return hwc3(padded.crop(255 - to_uint8(line * 255.0)))


def lineart_realistic(img: np.ndarray, p: Params) -> np.ndarray:
    """Line art of a photo, white lines on black (the generator draws black on white; inverted)."""
    return _lineart(img, p, LINEART_FILE, "lineart_realistic")


def lineart_coarse(img: np.ndarray, p: Params) -> np.ndarray:
    return _lineart(img, p, LINEART_COARSE_FILE, "lineart_coarse")
