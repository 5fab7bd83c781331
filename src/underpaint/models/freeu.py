"""FreeU (Si, Huang, Jiang and Liu 2023), as ComfyUI's ``FreeU_V2`` node and Forge's "FreeU Integrated"
apply it to an SD 1.x/2.x or SDXL UNet: a picture-quality trade-off with four numbers.

Each resnet of the UNet's decoder (up blocks) takes the decoder's features ``h`` joined with the
encoder's skip features ``hsp``. Where ``h`` has 4× the UNet's first channel count (1280 for SD
and SDXL) FreeU uses ``(b1, s1)``, where it has 2× (640) ``(b2, s2)``; elsewhere nothing changes:

* backbone: the first half of ``h``'s channels is multiplied by ``1 + (b - 1)·m``, ``m`` being the
  channel mean at each position scaled to 0..1 over the picture (per image);
* skip: the lowest frequencies of ``hsp`` (the 2×2 block around frequency 0 of its centred 2-D
  Fourier transform, computed in float32) are multiplied by ``s``.

Matching is by channel count, as in the FreeU authors' code and ComfyUI (diffusers' own
``enable_freeu`` picks up blocks by position instead, which on SD 1.5 differs for the first resnet
of the third up block). It is applied with a pre-hook on each of those resnets, which splits its
input back into ``h`` and ``hsp`` (the skip's channel count is read from the up block's input),
for the length of one sampling run. Compiled code (``compile``, ``cuda_graphs``, ``aot``) is set
aside meanwhile and put back after, as with token merging: compiled graphs do not see hooks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from ..params import FreeUOptions


def backbone_scale(h: torch.Tensor, b: float) -> torch.Tensor:
    """``h`` with its first half of channels multiplied by ``1 + (b - 1)·m`` (``m``: the channel mean per
    position, min-max scaled over each image's positions)."""
    mean = h.float().mean(dim=1, keepdim=True)
    flat = mean.flatten(1)
    low = flat.min(dim=1).values.view(-1, 1, 1, 1)
    high = flat.max(dim=1).values.view(-1, 1, 1, 1)
    spread = high - low
    # A flat mean (nothing to scale by) leaves the backbone as it is, where the division would give NaN.
    m = torch.where(spread > 0, (mean - low) / spread.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    half = h.shape[1] // 2
    scaled = h[:, :half] * ((b - 1) * m + 1).to(h.dtype)
    return torch.cat([scaled, h[:, half:]], dim=1)


def low_frequency_scale(x: torch.Tensor, s: float, *, radius: int = 1) -> torch.Tensor:
    """``x`` with the ``2·radius``-square block of lowest spatial frequencies (around frequency 0 of the
    centred spectrum, as ``fftshift`` lays it out) multiplied by ``s``; in float32, back in ``x``'s dtype."""
    height, width = x.shape[-2:]
    # The mask is laid out centred, then moved to the FFT's own order, so the spectrum is never shifted.
    mask = torch.ones(height, width, device=x.device)
    cy, cx = height // 2, width // 2
    mask[max(cy - radius, 0):cy + radius, max(cx - radius, 0):cx + radius] = s
    spectrum = torch.fft.fft2(x.float()) * torch.fft.ifftshift(mask)
    return torch.fft.ifft2(spectrum).real.to(x.dtype)


class _Hooks:
    """FreeU on one UNet: the up blocks record their skip features' channel counts, their resnets
    rescale ``h`` and filter ``hsp`` before the join."""

    def __init__(self, unet: torch.nn.Module, options: FreeUOptions) -> None:
        base = unet.config.block_out_channels[0]
        self.by_channels = {4 * base: (options.b1, options.s1), 2 * base: (options.b2, options.s2)}
        self.skips: list[int] = []
        self.handles = []
        for block in getattr(unet, "up_blocks", ()):
            self.handles.append(block.register_forward_pre_hook(self.on_block, with_kwargs=True))
            for index, resnet in enumerate(block.resnets):
                self.handles.append(resnet.register_forward_pre_hook(self._on_resnet(index)))

    def on_block(self, block, args, kwargs):
        skips = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else ())
        # The block's i-th resnet takes the last skip but i (diffusers pops them from the end).
        self.skips = [t.shape[1] for t in reversed(skips)]

    def _on_resnet(self, index: int):
        def hook(resnet, args):
            x = args[0]
            skip = self.skips[index] if index < len(self.skips) else 0
            scale = self.by_channels.get(x.shape[1] - skip) if skip else None
            if scale is None:
                return None
            h, hsp = x[:, :x.shape[1] - skip], x[:, x.shape[1] - skip:]
            b, s = scale
            return (torch.cat([backbone_scale(h, b), low_frequency_scale(hsp, s)], dim=1), *args[1:])

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@contextmanager
def freeu(unet: torch.nn.Module, options: FreeUOptions) -> Iterator[int]:
    """FreeU on ``unet`` inside the ``with`` block; yields the number of resnets hooked. Compiled code is
    set aside meanwhile (see the module docstring)."""
    from .optimize import eager

    hooks = _Hooks(unet, options)
    try:
        with eager(unet):
            yield sum(len(block.resnets) for block in getattr(unet, "up_blocks", ()))
    finally:
        hooks.remove()


#: Forge's infotext keys for FreeU Integrated, after ``freeu_enabled``, with the option each holds.
INFOTEXT_KEYS = (("freeu_b1", "b1"), ("freeu_b2", "b2"), ("freeu_s1", "s1"), ("freeu_s2", "s2"))


def infotext_entries(options: FreeUOptions | None) -> dict[str, object]:
    """``freeu_enabled: True, freeu_b1: …`` as Forge writes them; nothing when FreeU is off."""
    if options is None:
        return {}
    return {"freeu_enabled": True, **{key: getattr(options, name) for key, name in INFOTEXT_KEYS}}


def options_from_infotext(values: dict[str, str]) -> FreeUOptions | None:
    """The FreeU an infotext records (Forge's keys), None when it records none or ``freeu_enabled: False``;
    a value that is not a number is an :class:`~underpaint.errors.InvalidParameter` naming its key."""
    from ..errors import InvalidParameter

    if values.get("freeu_enabled") not in ("True", "true"):
        return None
    found = {}
    for key, name in INFOTEXT_KEYS:
        if key in values:
            try:
                found[name] = float(values[key])
            except ValueError:
                raise InvalidParameter(key, values[key], "a number") from None
    return FreeUOptions(**found)


def request_freeu(model: Any, options: FreeUOptions | None):
    """The context for one sampling run: :func:`freeu` on the model's UNet, or nothing when off."""
    if options is None:
        return nullcontext(0)
    return freeu(model.unet, options)
