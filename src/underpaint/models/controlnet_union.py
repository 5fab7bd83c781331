"""xinsir's union ControlNets for SDXL (``controlnet-union-sdxl-1.0`` and its ``promax`` version).

One file serves several control types. On top of an ordinary SDXL ControlNet it has a learned
embedding per control type (``task_embedding``), a small transformer over the pooled hint and
latent features (``transformer_layes.*``, the name as released) whose output shifts the hint
features (``spatial_ch_projs``), and an embedding of the 0/1 control-type vector added to the
time embedding (``control_add_embedding.*``). diffusers' ``ControlNetUnionModel`` is that model;
this module recognises the files, derives its config and maps a unit's preprocessor to a type.

As in A1111's ControlNet extension, the type is the unit's ``union_control_type`` when it has one,
else the type of its preprocessor: a canny unit runs the model as a canny ControlNet, a depth unit
as a depth one (models/union_types.py). The types, in xinsir's order (the promax version adds the
last two): OpenPose, Depth, Soft Edge (softedge/scribble), Hard Edge (canny/lineart/mlsd), Normal
Map, Segmentation, Tile, Inpaint.

Real files come as diffusers folders (``config.json`` naming ``ControlNetUnionModel``, or
``ControlNetModel`` with the union keys) or as the weights file alone, in diffusers' names. Shapes
give every size but the transformer's head count, which is 8 in every release.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from ..errors import ModelError
from .header import CheckpointHeader

#: Tensors only a union model has.
UNION_MARKERS = ("task_embedding", "spatial_ch_projs.weight", "control_add_embedding.linear_1.weight")
_TRANSFORMER_PREFIX = "transformer_layes."
#: Heads of the condition transformer: not recorded in the weights; 8 in every released model.
DEFAULT_TRANSFORMER_HEADS = 8

#: The keys of a union config that plain ControlNet configs do not have.
UNION_KEYS = ("num_control_type", "num_trans_channel", "num_trans_head", "num_trans_layer", "num_proj_channel")


def is_union(names) -> bool:
    """Whether tensor names are a union model's (any of its extra tensors present)."""
    return any(k in names for k in UNION_MARKERS) or any(n.startswith(_TRANSFORMER_PREFIX) for n in names)


def union_extras(header: CheckpointHeader, what: str) -> dict:
    """The union part of the config (type count, transformer sizes, size/crop embedding width) from shapes."""
    names = header.tensors
    missing = [k for k in UNION_MARKERS if k not in names]
    if missing:
        raise ModelError(f"{what}: a ControlNet union model without {', '.join(missing)}; the file is incomplete")
    types, channels = header.shape("task_embedding")
    layers = {int(m.group(1)) for n in names if (m := re.match(r"transformer_layes\.(\d+)\.", n))}
    embed_in = header.shape("control_add_embedding.linear_1.weight")[1]
    if embed_in % types:
        raise ModelError(f"{what}: control_add_embedding takes {embed_in} values, not a multiple of the "
                         f"{types} control types in task_embedding")
    return dict(num_control_type=types, num_trans_channel=channels, num_trans_head=DEFAULT_TRANSFORMER_HEADS,
                num_trans_layer=len(layers), num_proj_channel=header.shape("spatial_ch_projs.weight")[0],
                # the control-type vector is embedded as SDXL's size ids are: this wide per entry
                addition_time_embed_dim=embed_in // types)


def union_config(header: CheckpointHeader, what: str, base: dict | None = None) -> dict:
    """``ControlNetUnionModel`` keyword arguments: ``base`` (a folder's config.json) or the encoder's
    config derived from the shapes, with the union sizes always taken from the shapes."""
    from .controlnet import controlnet_config_diffusers_names

    config = dict(base) if base else controlnet_config_diffusers_names(header)
    config.update(union_extras(header, what))
    return accepted_config(config)


def accepted_config(config: dict) -> dict:
    """The keys ``ControlNetUnionModel`` takes (folders written as a ``ControlNetModel`` carry others)."""
    from diffusers import ControlNetUnionModel

    allowed = set(inspect.signature(ControlNetUnionModel.__init__).parameters) - {"self"}
    return {k: v for k, v in config.items() if k in allowed}


def build_union(path: Path, config: dict, weights: dict, device, dtype):
    """A ``ControlNetUnionModel`` holding ``weights`` (names and shapes checked)."""
    import torch
    from diffusers import ControlNetUnionModel

    from .loader import _assign

    try:
        with torch.device("meta"):
            module = ControlNetUnionModel(**config)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{path}: cannot build a ControlNet union model from its config ({exc})") from None
    return _assign(module, weights, f"ControlNet union model {path}", device, dtype)


def union_type_index(unit, num_types: int, model_name: str, index: int = 0) -> int:
    """The control-type slot unit number ``index`` uses in a union model with ``num_types`` types:
    its ``union_control_type``, else its preprocessor's type (errors: :func:`union_types.union_slot`)."""
    from .union_types import sdxl_slots, union_slot

    return union_slot(unit, sdxl_slots(num_types), model_name, index)
