"""FLUX.1 ControlNets in diffusers' layout (InstantX, Shakker-Labs: canny, depth, union/pro).

These are published as diffusers folders (``config.json`` + ``diffusion_pytorch_model.safetensors``)
or as the weights file alone. Without a config the architecture is read from tensor shapes, as
for checkpoints: a few double and single transformer blocks of FLUX's width, a zero-initialised
``controlnet_x_embedder`` taking the control picture's packed latent, and for union models a
``controlnet_mode_embedder`` with one row per control type. XLabs' files (their own key layout
with a pixel-space ``input_hint_block``) are told apart and refused with a clear message.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ..errors import ModelError
from .header import read_header, sniff_format

#: Keys that mark a diffusers-layout FLUX ControlNet.
MARKERS = ("controlnet_x_embedder.weight", "x_embedder.weight")
#: The union models' control types and mode ids (InstantX / Shakker-Labs): union_types.FLUX_TYPES.


def is_flux_controlnet(names) -> bool:
    """Whether a file's tensor names are a FLUX ControlNet (diffusers layout or XLabs')."""
    names = set(names)
    return all(m in names for m in MARKERS) or _is_xlabs(names)


def _is_xlabs(names) -> bool:
    return any(k.startswith("input_hint_block.") for k in names) and any(k.startswith("double_blocks.") for k in names)


def config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict:
    """``FluxControlNetModel`` keyword arguments read from a weights file's tensor shapes."""
    from .flux import rope_axes

    def blocks(pattern: str) -> int:
        found = {int(m.group(1)) for k in shapes if (m := re.match(pattern, k))}
        return max(found) + 1 if found else 0

    hidden, in_channels = shapes["x_embedder.weight"]
    head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0] if "transformer_blocks.0.attn.norm_q.weight" in shapes \
        else shapes["single_transformer_blocks.0.attn.norm_q.weight"][0]
    mode = shapes.get("controlnet_mode_embedder.weight")
    return dict(
        patch_size=1,
        in_channels=in_channels,
        num_layers=blocks(r"transformer_blocks\.(\d+)\."),
        num_single_layers=blocks(r"single_transformer_blocks\.(\d+)\."),
        attention_head_dim=head_dim,
        num_attention_heads=hidden // head_dim,
        joint_attention_dim=shapes["context_embedder.weight"][1],
        pooled_projection_dim=shapes["time_text_embed.text_embedder.linear_1.weight"][1],
        guidance_embeds="time_text_embed.guidance_embedder.linear_1.weight" in shapes,
        axes_dims_rope=list(rope_axes(head_dim)),
        num_mode=mode[0] if mode is not None else None,
    )


def load_flux_controlnet(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """A FLUX ControlNet from a diffusers folder, or a weights file (config beside it, else from shapes)."""
    from diffusers import FluxControlNetModel

    from .header import load_state_dict
    from .loader import _assign

    path = Path(path)
    folder = path if path.is_dir() else None
    file = path
    if folder is not None:
        candidates = sorted(folder.glob("*.safetensors"))
        if not candidates:
            raise ModelError(f"{folder}: no .safetensors weights in this FLUX ControlNet folder")
        file = candidates[0]
    if sniff_format(file) != "safetensors":
        raise ModelError(f"{file}: FLUX ControlNets are read from .safetensors files only")
    header = read_header(file)
    if _is_xlabs(header.tensors):
        raise ModelError(f"{file}: an XLabs-layout FLUX ControlNet, which is not supported yet; use a "
                         "diffusers-layout one (InstantX or Shakker-Labs canny, depth or union)")
    if not all(m in header.tensors for m in MARKERS):
        raise ModelError(f"{file}: not a FLUX ControlNet (expected controlnet_x_embedder.* and x_embedder.* tensors)")
    config_file = file.parent / "config.json"
    if config_file.is_file():
        config = {k: v for k, v in json.loads(config_file.read_text(encoding="utf-8")).items() if not k.startswith("_")}
    else:
        config = config_from_shapes({k: header.shape(k) for k in header.tensors})
    with torch.device("meta"):
        module = FluxControlNetModel(**config)
    state = load_state_dict(file)
    return _assign(module, state, f"FLUX ControlNet {file.name}", torch.device(device), dtype)
