"""xinsir's union ControlNets for SDXL (``controlnet-union-sdxl-1.0`` and its ``promax`` version).

One file serves several control types. On top of an ordinary SDXL ControlNet it has a learned
embedding per control type (``task_embedding``), a small transformer over the pooled hint and
latent features (``transformer_layes.*``, the name as released) whose output shifts the hint
features (``spatial_ch_projs``), and an embedding of the 0/1 control-type vector added to the
time embedding (``control_add_embedding.*``). diffusers' ``ControlNetUnionModel`` is that model;
this module recognises the files, derives its config and maps a unit's preprocessor to a type.

As in A1111's ControlNet extension and Forge, the type comes from the unit's preprocessor: a
canny unit runs the model as a canny ControlNet, a depth unit as a depth one. The types, in
xinsir's order (the promax version adds the last two): openpose, depth, soft edge/scribble,
canny/lineart/mlsd, normal, segmentation, tile, inpaint.

Real files come as diffusers folders (``config.json`` naming ``ControlNetUnionModel``, or
``ControlNetModel`` with the union keys) or as the weights file alone, in diffusers' names. Shapes
give every size but the transformer's head count, which is 8 in every release.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from ..errors import InvalidParameter, ModelError
from .header import CheckpointHeader

#: Tensors only a union model has.
UNION_MARKERS = ("task_embedding", "spatial_ch_projs.weight", "control_add_embedding.linear_1.weight")
_TRANSFORMER_PREFIX = "transformer_layes."
#: Heads of the condition transformer: not recorded in the weights; 8 in every released model.
DEFAULT_TRANSFORMER_HEADS = 8

#: xinsir's control types in index order: (name shown in messages, preprocessor kinds it serves).
UNION_TYPES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("openpose", ("openpose",)),
    ("depth", ("depth",)),
    ("softedge/scribble", ("softedge", "scribble")),
    ("canny/lineart/mlsd", ("canny", "lineart", "mlsd")),
    ("normal", ("normal",)),
    ("segmentation", ("seg", "segmentation")),
    ("tile", ("tile",)),
    ("inpaint", ("inpaint",)),
)
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


def supported_types(num_types: int) -> str:
    """``"openpose (openpose), depth (depth), ..."``: the types a model with ``num_types`` slots has."""
    return ", ".join(f"{i} {name} ({'/'.join(kinds)})" for i, (name, kinds) in enumerate(UNION_TYPES[:num_types]))


def union_type_index(module: str, kind: str, num_types: int, model_name: str) -> int:
    """The control-type slot a unit's preprocessor (``module``, of ``kind``) uses in a union model.

    A preprocessor whose kind has no slot in the model (a ready-made map with module "none",
    shuffle, or tile/inpaint on the 6-type model) is an :class:`InvalidParameter` on ``module``.
    """
    for index, (_, kinds) in enumerate(UNION_TYPES[:num_types]):
        if kind and kind in kinds:
            return index
    what = f"kind {kind!r}" if kind else "no control type"
    raise InvalidParameter("module", module,
                           f"a preprocessor of a control type the union model {model_name} has ({module!r} is of "
                           f"{what}); its {num_types} types are: {supported_types(num_types)}")
