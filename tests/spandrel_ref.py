"""spandrel (what ComfyUI and Forge load upscaling models with) as a reference for tests.

spandrel's package ``__init__`` imports every architecture it knows, and two of them (LaMa,
RestoreFormer) import names from ``torchvision.transforms.functional`` at import time. torchvision
is not a dependency here, so when it cannot be imported a stand-in module holding those names is
registered while spandrel is imported; its functions raise if anything calls them (the ESRGAN and
Compact architectures used as references never do). The stand-in is taken out of ``sys.modules``
again afterwards, so other code in the same process (transformers and diffusers probe for
torchvision) still finds torchvision absent. :func:`model_loader` raises ImportError when spandrel
is absent.
"""

from __future__ import annotations

import enum
import importlib.util
import sys
import types

#: The names spandrel's modules import from torchvision.transforms.functional when they are imported.
_IMPORTED_NAMES = ("rotate", "normalize")


def _stand_in_torchvision() -> list[str]:
    """Register the stand-in modules; returns their names (none when torchvision is importable)."""
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return []

    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"

    def unavailable(name: str):
        def call(*args, **kwargs):
            raise RuntimeError(f"torchvision.transforms.functional.{name} is a test stand-in; torchvision is not installed")
        call.__name__ = name
        return call

    functional = types.ModuleType("torchvision.transforms.functional")
    functional.InterpolationMode = InterpolationMode
    for name in _IMPORTED_NAMES:
        setattr(functional, name, unavailable(name))
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = functional
    package = types.ModuleType("torchvision")
    package.transforms = transforms
    package.__path__ = []
    transforms.__path__ = []
    modules = {"torchvision": package, "torchvision.transforms": transforms,
               "torchvision.transforms.functional": functional}
    sys.modules.update(modules)
    return list(modules)


def model_loader():
    """A ``spandrel.ModelLoader`` on the CPU."""
    if importlib.util.find_spec("spandrel") is None:
        raise ImportError("spandrel is not installed")
    registered = _stand_in_torchvision()
    try:
        from spandrel import ModelLoader
    finally:
        for name in registered:
            sys.modules.pop(name, None)

    return ModelLoader()
