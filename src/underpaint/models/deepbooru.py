"""A1111's "Interrogate DeepBooru": the Danbooru tags a picture shows, as a prompt.

The model is DeepDanbooru's ``resnet_custom_v3`` as A1111 runs it: its PyTorch conversion
``model-resnet_custom_v3.pt`` (``models/torch_deepdanbooru``; ``underpaint download deepbooru``), a
dict of tensors ``n_Conv_0`` ... ``n_Conv_178`` (batch norms folded into the convs) beside the list of
tag names under ``tags``, read with ``torch.load(weights_only=True)`` only.

The network is a bottleneck ResNet with TensorFlow's "same" padding (zeros; the pool's with -inf),
as the Keras original was trained: a 7x7 stride-2 conv with ReLU and a 3x3 stride-2 max pool, then
five stages of bottleneck blocks (1x1 reduce with ReLU, 3x3 with ReLU, 1x1 expand, plus the block's
input or a 1x1 projection of it, then ReLU) of 3, 8, 40, 3 and 3 blocks; every stage's first block
projects its input and all but the first halve the size with their 3x3 and projection, and the
third stage does so again at its 21st block (whose projection the file numbers after its other convs).
A last 1x1 conv (no bias) gives one value per tag, averaged over the picture, through a sigmoid.
Widths come from the file's tensors, the layout is the model's own.

The picture is resized to 512x512 as A1111's "Resize and fill" does (scaled to fit, centred, the bars
filled by stretching its edges), fed as RGB values / 255. :func:`tag_text` makes the prompt from the
probabilities with A1111's settings: tags at or above the threshold (0.5), "rating:" tags left out,
sorted by name or by probability, those in the filter list dropped, underscores as spaces, ``\\``,
``(`` and ``)`` escaped with a backslash, each optionally as ``(tag:0.123)``, joined with ", ".
"""

from __future__ import annotations

import logging
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError, ModelNotFound

log = logging.getLogger(__name__)

#: The side A1111 resizes the picture to.
SIZE = 512
#: A1111's defaults for its deepbooru settings.
THRESHOLD = 0.5
SORT_ALPHA = True
USE_SPACES = True
ESCAPE = True
#: The file A1111 downloads, and what it looks for in its folder.
FILE_NAME = "model-resnet_custom_v3.pt"
_SUFFIXES = (".pt",)

#: The stages: (blocks, stride of the first, whether the first block's projection is numbered after
#: its other convs). The third stage is two here: it halves the size again at its 21st block.
_STAGES = ((3, 1, False), (8, 2, False), (20, 2, False), (20, 2, True), (3, 2, False), (3, 2, False))
#: The number of convs the layout has (n_Conv_0 ... n_Conv_178).
CONVS = 1 + sum(3 * blocks + 1 for blocks, _, _ in _STAGES) + 1


@dataclass(frozen=True)
class _Block:
    """The conv numbers of one bottleneck block (``shortcut`` None: the input is added unchanged)."""

    reduce: int
    middle: int
    expand: int
    shortcut: int | None
    stride: int


def _layout() -> list[_Block]:
    blocks, n = [], 1
    for count, stride, shortcut_last in _STAGES:
        for i in range(count):
            if i == 0 and shortcut_last:
                blocks.append(_Block(n, n + 1, n + 2, n + 3, stride))
                n += 4
            elif i == 0:
                blocks.append(_Block(n + 1, n + 2, n + 3, n, stride))
                n += 4
            else:
                blocks.append(_Block(n, n + 1, n + 2, None, 1))
                n += 3
    assert n == CONVS - 1
    return blocks


LAYOUT = _layout()


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "same" padding along one side: (before, after), the odd pixel after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    top, bottom = same_padding(x.shape[-2], kernel, stride)
    left, right = same_padding(x.shape[-1], kernel, stride)
    return F.pad(x, (left, right, top, bottom), value=value)


class DeepDanbooru(nn.Module):
    """The tagger's network, its convs built to the shapes of ``shapes`` (conv number → weight shape);
    maps (N, 3, 512, 512) RGB in [0, 1] to (N, tags) probabilities."""

    def __init__(self, shapes: dict[int, tuple[int, ...]]):
        super().__init__()
        for n in range(CONVS):
            out_ch, in_ch, kh, kw = shapes[n]
            stride = 2 if n == 0 else next((b.stride for b in LAYOUT if n in (b.middle, b.shortcut)), 1)
            self.add_module(f"n_Conv_{n}", nn.Conv2d(in_ch, out_ch, (kh, kw), stride, bias=n != CONVS - 1))

    def conv(self, n: int) -> nn.Conv2d:
        return self._modules[f"n_Conv_{n}"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(0)(_pad(x, 7, 2)))
        x = F.max_pool2d(_pad(x, 3, 2, value=float("-inf")), 3, 2)
        for block in LAYOUT:
            y = F.relu(self.conv(block.reduce)(x))
            y = F.relu(self.conv(block.middle)(_pad(y, 3, block.stride)))
            y = self.conv(block.expand)(y)
            x = F.relu(y + (x if block.shortcut is None else self.conv(block.shortcut)(x)))
        return torch.sigmoid(self.conv(CONVS - 1)(x).mean(dim=(2, 3)))


def _check_shapes(shapes: dict[int, tuple[int, ...]], source: str) -> None:
    """Each conv's kernel is the layout's and takes the channels the one before it gives."""
    def need(n: int, kernel: int, in_ch: int | None) -> int:
        out_ch, got_in, kh, kw = shapes[n]
        if (kh, kw) != (kernel, kernel) or (in_ch is not None and got_in != in_ch):
            raise ModelError(f"{source}: n_Conv_{n} is a {kh}x{kw} conv from {got_in} channels; expected "
                             f"{kernel}x{kernel}" + (f" from {in_ch}" if in_ch is not None else ""))
        return out_ch

    channels = need(0, 7, 3)
    for block in LAYOUT:
        width = need(block.reduce, 1, channels)
        need(block.middle, 3, width)
        out = need(block.expand, 1, width)
        if block.shortcut is not None:
            if need(block.shortcut, 1, channels) != out:
                raise ModelError(f"{source}: n_Conv_{block.shortcut} gives {shapes[block.shortcut][0]} channels, "
                                 f"its block {out}")
        elif out != channels:
            raise ModelError(f"{source}: n_Conv_{block.expand} gives {out} channels, its block's input {channels}")
        channels = out
    need(CONVS - 1, 1, channels)


@dataclass
class Tagger:
    """The loaded network and its tag names (one per output)."""

    model: DeepDanbooru
    tags: tuple[str, ...]

    def probabilities(self, image) -> torch.Tensor:
        """(tags,) float32: each tag's probability for a PIL picture (resized as A1111 does)."""
        import numpy as np

        from ..imageio.resize import resize_image

        picture = resize_image(image.convert("RGB"), SIZE, SIZE, 2)
        param = next(self.model.parameters())
        x = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255).permute(2, 0, 1).unsqueeze(0)
        with torch.inference_mode():
            return self.model(x.to(device=param.device, dtype=param.dtype))[0].float().cpu()


def tagger_from_state_dict(state: dict, *, source: str = "state dict") -> Tagger:
    """The tagger a file's dict describes (tensors ``n_Conv_*`` and the ``tags`` list), on the CPU in float32."""
    tags = state.get("tags")
    if not isinstance(tags, (list, tuple)) or not all(isinstance(t, str) for t in tags):
        raise ModelError(f"{source}: no list of tag names under 'tags': not DeepDanbooru's model file")
    tensors = {k: v for k, v in state.items() if k != "tags"}
    shapes: dict[int, tuple[int, ...]] = {}
    for n in range(CONVS):
        weight = tensors.get(f"n_Conv_{n}.weight")
        if not isinstance(weight, torch.Tensor) or weight.ndim != 4:
            raise ModelError(f"{source}: DeepDanbooru model without a 4-D 'n_Conv_{n}.weight': incomplete or "
                             f"not this model ({CONVS} convs expected)")
        shapes[n] = tuple(weight.shape)
    _check_shapes(shapes, source)
    if shapes[CONVS - 1][0] != len(tags):
        raise ModelError(f"{source}: {len(tags)} tag names for {shapes[CONVS - 1][0]} outputs")
    model = DeepDanbooru(shapes)
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        problems = [f"missing {', '.join(missing[:4])}" if missing else "",
                    f"unexpected {', '.join(extra[:4])}" if extra else ""]
        raise ModelError(f"{source}: tensors do not fit DeepDanbooru: {'; '.join(p for p in problems if p)}")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{source}: cannot load DeepDanbooru: {str(exc).strip().splitlines()[-1].strip()}") from None
    model.eval().requires_grad_(False)
    return Tagger(model, tuple(tags))


def load_tagger(path: Path, device: str = "cpu") -> Tagger:
    from .header import load_torch_object

    state = load_torch_object(path)
    if not isinstance(state, dict):
        raise ModelError(f"{path}: torch file holds a {type(state).__name__}, expected DeepDanbooru's dict")
    tagger = tagger_from_state_dict(state, source=str(path))
    tagger.model.to(device)
    return tagger


# --------------------------------------------------------------------------- the prompt


_ESCAPED = re.compile(r"([\\()])")


def tag_text(probabilities, tags: tuple[str, ...], *, threshold: float = THRESHOLD, sort_alpha: bool = SORT_ALPHA,
             use_spaces: bool = USE_SPACES, escape: bool = ESCAPE, filter_tags: str = "", ranks: bool = False) -> str:
    """A1111's deepbooru prompt from each tag's probability (see the module's text)."""
    found = [(tag, float(p)) for tag, p in zip(tags, probabilities)
             if float(p) >= threshold and not tag.startswith("rating:")]
    if sort_alpha:
        found.sort(key=lambda item: item[0])
    else:
        found.sort(key=lambda item: -item[1])
    dropped = {t.strip().replace(" ", "_") for t in filter_tags.split(",")}
    out = []
    for tag, p in found:
        if tag in dropped:
            continue
        text = tag.replace("_", " ") if use_spaces else tag
        if escape:
            text = _ESCAPED.sub(r"\\\1", text)
        out.append(f"({text}:{p:.3f})" if ranks else text)
    return ", ".join(out)


# --------------------------------------------------------------------------- finding and keeping the model


def tagger_file(models) -> Path:
    """The tagger's file in ``models`` (a :class:`~underpaint.models.registry.ModelsDir`): the first
    ``.pt`` of its deepbooru folders; none is :class:`ModelNotFound` naming ``model`` and the download."""
    for folder in models.folders("deepbooru"):
        found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _SUFFIXES)
        if found:
            return found[0]
    raise ModelNotFound(f"Interrogate DeepBooru needs DeepDanbooru's {FILE_NAME} in {models.folder('deepbooru')} "
                        "(`underpaint download deepbooru`)", field="model")


_lock = threading.Lock()
_kept: dict[tuple, Tagger] = {}


def deepbooru(image, path: Path, *, device: str = "cpu", threshold: float = THRESHOLD, sort_alpha: bool = SORT_ALPHA,
              use_spaces: bool = USE_SPACES, escape: bool = ESCAPE, filter_tags: str = "", ranks: bool = False) -> str:
    """The prompt DeepBooru reads in ``image`` with the tagger of ``path`` (loaded once and kept in main
    memory; it runs on ``device`` and goes back afterwards, as A1111 sends it back)."""
    with _lock:
        key = (str(path), path.stat().st_mtime_ns)
        if key not in _kept:
            _kept.clear()
            _kept[key] = load_tagger(path)
        tagger = _kept[key]
        try:
            tagger.model.to(device)
            probabilities = tagger.probabilities(image)
        finally:
            tagger.model.to("cpu")
    return tag_text(probabilities, tagger.tags, threshold=threshold, sort_alpha=sort_alpha, use_spaces=use_spaces,
                    escape=escape, filter_tags=filter_tags, ranks=ranks)
