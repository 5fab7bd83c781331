"""Changing a loaded model's VAE without loading the checkpoint again (A1111's "SD VAE" setting).

The new VAE is built in host memory exactly as the loader builds it for ``load_model(..., vae=file)``
(the checkpoint's own: from the checkpoint's VAE tensors alone, :func:`.loader.load_own_vae`), in
the model's dtype, and checked against the module the model runs: the same class, the same
diffusers config (block channels, layers, latent channels, scaling and shift factors,
``force_upcast``, sample size ...) and the same tensor names, shapes and dtypes. Its weights are
then copied into the running module's tensors in place, so everything done to that module after
loading stays as it is: where its tensors rest in a memory mode and whether they are pinned
(:mod:`.offload`), their channels-last layout and the compiled encoder and decoder, which take
the weights as inputs (:mod:`.optimize`), the tiling settings. The VAE precision belongs to the
model, not the module, and is untouched too. The pictures are those of a model loaded with the
new VAE from the start.

A VAE whose config differs (a diffusers VAE folder whose config says ``force_upcast`` false, a VAE
with other channels) is not swapped: :func:`swap_vae` says so by returning False, and the model
must be loaded again with it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def swap_vae(model: Any, vae: str | Path | None) -> bool:
    """Make ``model`` (a LoadedModel) run with the VAE file or diffusers VAE folder ``vae``, or with
    its checkpoint's own VAE for None; ``model.vae_path`` (the infotext's "VAE" and "VAE hash")
    follows. True when done; False, with nothing changed, where the new VAE does not fit the running
    module (see the module docstring; the model must be loaded again with it). A file that cannot
    be read, or does not suit the model (other latent channels), raises before anything changes.
    """
    from .loader import load_own_vae, load_vae

    path = Path(vae) if vae is not None else None
    if path is not None:
        new = load_vae(path, model.spec, device="cpu", dtype=model.dtype)
    else:
        new = load_own_vae(model.path, model.spec, device="cpu", dtype=model.dtype)
        if new is None:
            log.info("%s: its own VAE is read with the whole checkpoint; loading it again", model.path)
            return False
    problem = mismatch(model.vae, new)
    if problem is not None:
        log.info("the VAE %s does not fit the running one (%s); loading the checkpoint again",
                 path or "of the checkpoint", problem)
        return False
    copy_into(model.vae, new)
    model.vae_path = path
    model.__dict__.pop("vae_hash", None)  # a cached_property of the previous file
    return True


def mismatch(running: torch.nn.Module, new: torch.nn.Module) -> str | None:
    """Why copying ``new``'s weights into ``running`` would not give the module that loading ``new``
    gives (another class, config, tensor name, shape or dtype); None when it would."""
    if type(running) is not type(new):
        return f"a {type(new).__name__}, not a {type(running).__name__}"
    ours, theirs = _public_config(running), _public_config(new)
    if ours != theirs:
        keys = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        return "another config: " + ", ".join(f"{k} {theirs.get(k)!r} instead of {ours.get(k)!r}" for k in keys)
    target, source = _tensors(running), _tensors(new)
    if target.keys() != source.keys():
        names = sorted(target.keys() ^ source.keys())
        return f"other tensors ({', '.join(names[:3])})"
    for name, tensor in target.items():
        other = source[name]
        if tensor.shape != other.shape or tensor.dtype != other.dtype:
            return (f"tensor {name} is {other.dtype} {tuple(other.shape)}, the running one "
                    f"{tensor.dtype} {tuple(tensor.shape)}")
    return None


def copy_into(running: torch.nn.Module, new: torch.nn.Module) -> None:
    """Copy every parameter and buffer of ``new`` into ``running``'s tensors, in place: each keeps its
    device, memory layout (channels-last) and storage (pinned host memory); checked by :func:`mismatch`."""
    source = _tensors(new)
    with torch.inference_mode(False), torch.no_grad():
        for name, tensor in _tensors(running).items():
            tensor.data.copy_(source[name])


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A host copy of every parameter and buffer of ``module``, for :func:`restore`."""
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in _tensors(module).items()}


def restore(module: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put :func:`snapshot`'s tensors back into ``module``'s, in place (as :func:`copy_into` does)."""
    with torch.inference_mode(False), torch.no_grad():
        for name, tensor in _tensors(module).items():
            tensor.data.copy_(saved[name])


def _public_config(module: torch.nn.Module) -> dict:
    """The module's diffusers config without the bookkeeping keys (``_class_name``,
    ``_use_default_values``, ``_name_or_path`` ...), which differ between a file and a folder."""
    return {k: _plain(v) for k, v in dict(getattr(module, "config", {}) or {}).items() if not k.startswith("_")}


def _plain(value: Any) -> Any:
    """Lists for tuples (a config read from JSON has lists where one built in code may have tuples)."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}
