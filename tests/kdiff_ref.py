"""k-diffusion's own ``sampling.py`` (and ``external.py``), loaded as references for tests.

The installed ``k_diffusion`` package cannot be imported normally (its ``__init__`` pulls in
torchvision), so this registers a stub package holding only ``utils.append_dims`` and then
executes the real files from site-packages under their usual module names.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch


def _append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    missing = target_dims - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}")
    return x[(...,) + (None,) * missing]


def _package_dir() -> Path:
    stub = sys.modules.get("k_diffusion")
    if stub is not None and getattr(stub, "_underpaint_stub", False):
        return Path(stub.__path__[0])
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _load(name: str) -> types.ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    if not getattr(sys.modules.get("k_diffusion"), "_underpaint_stub", False):
        location = str(_package_dir())
        package = types.ModuleType("k_diffusion")
        package.__path__ = [location]
        package._underpaint_stub = True
        utils = types.ModuleType("k_diffusion.utils")
        utils.append_dims = _append_dims
        package.utils = utils
        sys.modules["k_diffusion"] = package
        sys.modules["k_diffusion.utils"] = utils
    path = _package_dir() / (name.rsplit(".", 1)[1] + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    setattr(sys.modules["k_diffusion"], name.rsplit(".", 1)[1], module)
    return module


def load_sampling() -> types.ModuleType:
    """The real ``k_diffusion.sampling`` module."""
    return _load("k_diffusion.sampling")


def load_external() -> types.ModuleType:
    """The real ``k_diffusion.external`` module (model wrappers, ``DiscreteSchedule``)."""
    load_sampling()
    return _load("k_diffusion.external")
