"""A1111's "Tiling" (request field ``tiling``, infotext ``Tiling: True``): pictures that tile
seamlessly, the right edge running on into the left one and the bottom into the top.

While such a request runs, every 2-D convolution of the checkpoint's UNet and VAE pads by wrapping
around the picture (``padding_mode="circular"``) instead of with zeros, as A1111 does (ComfyUI's
and SwarmUI's seamless nodes do the same). Attention already sees the whole picture, so the
denoiser then treats the latent as a torus: shifting its input by a multiple of the UNet's
downsampling shifts its output alike, and the decoder's picture has no edges. The VAE's encoder
pads the right and bottom edges of each downsampling with zeros, as the original LDM code does,
so an encode is close to, not exactly, periodic. TAESD, when it encodes or decodes for the request
(pipeline/vae_type.py), wraps around too; ControlNets and T2I adapters keep their zero padding,
as in A1111.

For the length of the request:

* compiled code (``--optimize compile``, ``cuda_graphs``, ``aot``) is set aside and the modules
  run eager, as with token merging: it was traced with zero padding and would not see the change;
* the VAE works on the whole picture, never in tiles (a tile would wrap onto itself and show
  seams): the low memory mode's tiled VAE and the tiled retry after an out-of-memory error are
  off, so an encode or decode that does not fit ends the request as out of memory.

FLUX is refused: its transformer has no convolutions to wrap around.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

#: The attribute that marks a model while a Tiling request runs on it.
_ACTIVE = "_seamless"


def is_seamless(model: Any) -> bool:
    """Whether a Tiling request is running on ``model``."""
    return bool(getattr(model, _ACTIVE, False))


@contextmanager
def seamless(model: Any, enabled: bool) -> Iterator[None]:
    """The checkpoint's UNet and VAE wrapping around the picture inside the ``with`` block (nothing
    when ``enabled`` is false); their padding, compiled code and VAE tiling as they were after."""
    if not enabled:
        yield
        return
    from .optimize import eager

    vae = model.vae
    parts = [m for m in (model.unet, *(getattr(vae, n, None) for n in ("encoder", "decoder"))) if m is not None]
    tiles = getattr(vae, "use_tiling", None)
    try:
        with eager(*parts), circular(model.unet, vae):
            if tiles:
                vae.use_tiling = False
            setattr(model, _ACTIVE, True)
            yield
    finally:
        setattr(model, _ACTIVE, False)
        if tiles is not None:
            vae.use_tiling = tiles


@contextmanager
def circular(*roots: torch.nn.Module) -> Iterator[int]:
    """Every ``Conv2d`` under ``roots`` padding circularly inside the ``with`` block; yields how many.
    Each gets its own padding mode back after."""
    convs = [m for root in roots for m in root.modules() if isinstance(m, torch.nn.Conv2d)]
    modes = [conv.padding_mode for conv in convs]
    try:
        for conv in convs:
            conv.padding_mode = "circular"
        yield len(convs)
    finally:
        for conv, mode in zip(convs, modes):
            conv.padding_mode = mode


def wrapping(model: Any, *modules: torch.nn.Module):
    """The context for a helper network working for ``model`` (TAESD): circular while a Tiling
    request runs, else nothing."""
    from contextlib import nullcontext

    return circular(*modules) if is_seamless(model) else nullcontext(0)
