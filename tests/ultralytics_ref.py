"""ultralytics (the YOLO library ADetailer runs its detection models with) as a reference for tests.

ultralytics imports torchvision, polars, matplotlib and its own profiling package at import time; none
is installed here and none is on the paths the tests compare (building a model from its YAML, the model's
forward pass, the predictor's letterbox, non-maximum suppression, box scaling and mask processing). So
those names are stand-ins while ultralytics is imported: modules whose every attribute is an inert
placeholder; they leave ``sys.modules`` once it is imported, so its non-maximum suppression runs its own
torch code (``TorchNMS``), not torchvision's. ultralytics keeps its settings file under
``YOLO_CONFIG_DIR`` (a temporary folder here).
``reference()`` raises ImportError when ultralytics is not installed.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import tempfile
import types


_STAND_INS = ("torchvision", "torchvision.ops", "torchvision.transforms", "torchvision.transforms.functional",
              "polars", "matplotlib", "matplotlib.pyplot", "ultralytics_thop", "thop")


class _Placeholder(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{self.__name__}.{name}")

    def __call__(self, *args, **kwargs):
        return None


_loaded: types.SimpleNamespace | None = None


def reference() -> types.SimpleNamespace:
    """ultralytics' tasks (models), LetterBox, non_max_suppression and ops, imported once."""
    global _loaded
    if _loaded is not None:
        return _loaded
    importlib.metadata.distribution("ultralytics")  # PackageNotFoundError (an ImportError) when missing
    os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="ultralytics-settings-"))
    os.environ.setdefault("YOLO_OFFLINE", "1")
    saved = {name: sys.modules.get(name) for name in _STAND_INS}
    real_version = importlib.metadata.version
    for name in _STAND_INS:
        sys.modules[name] = _Placeholder(name)
    sys.modules["torchvision"].__version__ = "0.0.0"
    importlib.metadata.version = lambda name: "0.0.0" if name == "torchvision" else real_version(name)
    try:
        from ultralytics.data.augment import LetterBox
        from ultralytics.nn import tasks
        from ultralytics.utils import nms, ops
    finally:
        importlib.metadata.version = real_version
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    _loaded = types.SimpleNamespace(tasks=tasks, LetterBox=LetterBox, non_max_suppression=nms.non_max_suppression,
                                    ops=ops)
    return _loaded
