"""facexlib 0.3.0 (the face library A1111's face restoration runs on) as a reference for tests.

facexlib's package ``__init__`` imports all its parts, and its detector needs torchvision (the ResNet-50
backbone, ``IntermediateLayerGetter``, ``ops.nms``, ``transforms.functional.normalize``), which is not
installed here. So the modules the tests compare against (the RetinaFace detector, its anchors and
decoding, ParseNet, the face-restoration helper) are loaded on their own from facexlib's files, under
a private package name, with stand-ins for the torchvision names they import: a ResNet-50 laid out as
torchvision's (written here from torchvision's documented layout: the stride on each bottleneck's 3x3
convolution), the layer getter, a greedy NMS and the per-channel normalisation. The stand-ins live in
``sys.modules`` only while the files are imported. ``reference()`` raises ImportError when facexlib is
not installed.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

_PACKAGE = "_facexlib_ref"


def _bottleneck(c_in: int, width: int, stride: int) -> nn.Module:
    class Bottleneck(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(width * 4)
            self.relu = nn.ReLU()
            self.downsample = None
            if stride != 1 or c_in != width * 4:
                self.downsample = nn.Sequential(nn.Conv2d(c_in, width * 4, 1, stride, bias=False),
                                                nn.BatchNorm2d(width * 4))

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return self.relu(out + (x if self.downsample is None else self.downsample(x)))

    return Bottleneck()


class _ResNet50(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = 64
        for i, (blocks, stride) in enumerate(zip((3, 4, 6, 3), (1, 2, 2, 2)), start=1):
            width = 64 * 2 ** (i - 1)
            setattr(self, f"layer{i}", nn.Sequential(*[_bottleneck(c_in if j == 0 else width * 4, width,
                                                                   stride if j == 0 else 1) for j in range(blocks)]))
            c_in = width * 4
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, 1000)


class _LayerGetter(nn.ModuleDict):
    """The model's children up to the last returned one, run in order; the returned ones' outputs by name."""

    def __init__(self, model: nn.Module, return_layers: dict[str, object]):
        wanted = dict(return_layers)
        layers = OrderedDict()
        for name, child in model.named_children():
            layers[name] = child
            wanted.pop(name, None)
            if not wanted:
                break
        super().__init__(layers)
        self.return_layers = dict(return_layers)

    def forward(self, x):
        out = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


def _nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    # Equal scores keep the order they come in (facexlib passes them sorted already).
    order = torch.sort(scores, descending=True, stable=True).indices.tolist()
    keep = []
    while order:
        i = order.pop(0)
        keep.append(i)
        rest = []
        for j in order:
            x1, y1 = torch.max(boxes[i, 0], boxes[j, 0]), torch.max(boxes[i, 1], boxes[j, 1])
            x2, y2 = torch.min(boxes[i, 2], boxes[j, 2]), torch.min(boxes[i, 3], boxes[j, 3])
            inter = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
            union = (boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1]) + \
                (boxes[j, 2] - boxes[j, 0]) * (boxes[j, 3] - boxes[j, 1]) - inter
            if not inter / union > iou_threshold:
                rest.append(j)
        order = rest
    return torch.tensor(keep, dtype=torch.int64)


def _normalize(tensor, mean, std, inplace=False):
    out = tensor if inplace else tensor.clone()
    for c, (m, s) in enumerate(zip(mean, std)):
        out[c].sub_(m).div_(s)
    return out


def _torchvision() -> dict[str, types.ModuleType]:
    package = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    models.resnet50 = lambda pretrained=False, **_: _ResNet50()
    utils = types.ModuleType("torchvision.models._utils")
    utils.IntermediateLayerGetter = _LayerGetter
    ops = types.ModuleType("torchvision.ops")
    ops.nms = _nms
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.normalize = _normalize
    package.models, package.ops, package.transforms = models, ops, transforms
    models._utils, transforms.functional = utils, functional
    for module in (package, models, transforms):
        module.__path__ = []
    return {"torchvision": package, "torchvision.models": models, "torchvision.models._utils": utils,
            "torchvision.ops": ops, "torchvision.transforms": transforms,
            "torchvision.transforms.functional": functional}


class Reference(types.SimpleNamespace):
    """The loaded facexlib modules: ``retinaface``, ``retinaface_utils``, ``parsenet``, ``helper``; set
    ``detector``/``parser`` before building a FaceRestoreHelper (its init asks for them by name).
    ``retina_face()`` builds facexlib's ResNet-50 RetinaFace (whose init imports torchvision's models)."""

    def retina_face(self) -> nn.Module:
        stand_ins = self.stand_ins
        previous = {name: sys.modules.get(name) for name in stand_ins}
        sys.modules.update(stand_ins)
        try:
            return self.retinaface.RetinaFace(network_name="resnet50", half=False, device=torch.device("cpu"))
        finally:
            for name, module in previous.items():
                if module is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = module


def reference() -> Reference:
    spec = importlib.util.find_spec("facexlib")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("facexlib is not installed")
    root = Path(list(spec.submodule_search_locations)[0])
    ref = Reference(detector=None, parser=None)
    saved = {name: sys.modules.get(name) for name in ("torchvision", "facexlib")}
    stand_ins = _torchvision()
    if importlib.util.find_spec("torchvision") is not None:
        stand_ins = {}
    ref.stand_ins = stand_ins
    packages = {name: types.ModuleType(name) for name in
                ("facexlib", "facexlib.detection", "facexlib.parsing", "facexlib.utils")}
    for module in packages.values():
        module.__path__ = []
    packages["facexlib.detection"].init_detection_model = lambda *a, **k: ref.detector
    packages["facexlib.parsing"].init_parsing_model = lambda *a, **k: ref.parser
    added = {**stand_ins, **packages}
    previous = {name: sys.modules.get(name) for name in added}
    sys.modules.update(added)
    try:
        def load(rel: str, name: str) -> types.ModuleType:
            spec = importlib.util.spec_from_file_location(name, root / rel)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            return module

        load("utils/misc.py", "facexlib.utils.misc")
        load("detection/matlab_cp2tform.py", "facexlib.detection.matlab_cp2tform")
        load("detection/align_trans.py", "facexlib.detection.align_trans")
        load("detection/retinaface_net.py", "facexlib.detection.retinaface_net")
        ref.retinaface_utils = load("detection/retinaface_utils.py", "facexlib.detection.retinaface_utils")
        ref.retinaface = load("detection/retinaface.py", "facexlib.detection.retinaface")
        ref.parsenet = load("parsing/parsenet.py", "facexlib.parsing.parsenet")
        ref.helper = load("utils/face_restoration_helper.py", "facexlib.utils.face_restoration_helper")
    finally:
        for name in list(sys.modules):
            if name.startswith("facexlib.") or name in added:
                if name in previous and previous[name] is not None:
                    sys.modules[name] = previous[name]
                else:
                    sys.modules.pop(name, None)
        for name, module in saved.items():
            if module is not None:
                sys.modules[name] = module
    return ref
