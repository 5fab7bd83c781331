"""Control types of union ControlNets, named as A1111's ControlNet extension names them.

A union ControlNet serves several control types from one file and has to be told which type a
map is. The extension's units carry that as ``union_control_type``: "OpenPose", "Depth",
"Soft Edge", "Hard Edge", "Normal Map", "Segmentation", "Tile", "Inpaint", or "Unknown" for
"from the preprocessor". underpaint takes the same field and values (any case, and the
preprocessor kinds such as "canny" as aliases), plus "Blur", "Gray" and "Low Quality", which only
the FLUX union models have.

An explicit type wins over the one of the unit's preprocessor; a ready-made map (module "none")
has no preprocessor to tell, so with a union model it needs an explicit type.

Each family numbers the types its own way (:data:`SDXL_TYPES`, :data:`FLUX_TYPES`); a type the
model has no slot for is refused with the model's list.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import InvalidParameter

OPENPOSE = "OpenPose"
DEPTH = "Depth"
SOFT_EDGE = "Soft Edge"
HARD_EDGE = "Hard Edge"
NORMAL_MAP = "Normal Map"
SEGMENTATION = "Segmentation"
TILE = "Tile"
INPAINT = "Inpaint"
BLUR = "Blur"
GRAY = "Gray"
LOW_QUALITY = "Low Quality"
#: "take the type from the preprocessor" (the extension's default value).
UNKNOWN = "Unknown"

#: Every named type, in the extension's order, then the FLUX-only ones.
CONTROL_TYPES = (OPENPOSE, DEPTH, SOFT_EDGE, HARD_EDGE, NORMAL_MAP, SEGMENTATION, TILE, INPAINT, BLUR, GRAY,
                 LOW_QUALITY)

#: xinsir's SDXL union models: the slot of a type is its position (the first release has the first six).
SDXL_TYPES = (OPENPOSE, DEPTH, SOFT_EDGE, HARD_EDGE, NORMAL_MAP, SEGMENTATION, TILE, INPAINT)

#: The FLUX union models of InstantX and Shakker-Labs: canny 0, tile 1, depth 2, blur 3, pose 4, gray 5,
#: low quality 6. They have no soft-edge or normal slot; those maps go to the nearest, canny and depth.
FLUX_TYPES: Mapping[str, int] = {HARD_EDGE: 0, SOFT_EDGE: 0, TILE: 1, DEPTH: 2, NORMAL_MAP: 2, BLUR: 3, OPENPOSE: 4,
                                 GRAY: 5, LOW_QUALITY: 6}

#: A preprocessor kind (``Preprocessor.kind``) → the control type of its maps.
KIND_TYPES: Mapping[str, str] = {
    "openpose": OPENPOSE, "depth": DEPTH, "softedge": SOFT_EDGE, "scribble": SOFT_EDGE, "canny": HARD_EDGE,
    "lineart": HARD_EDGE, "mlsd": HARD_EDGE, "normal": NORMAL_MAP, "seg": SEGMENTATION, "segmentation": SEGMENTATION,
    "tile": TILE, "inpaint": INPAINT,
}

_AUTOMATIC = ("", "unknown", "auto", "automatic")
_ALIASES: Mapping[str, str] = {
    **KIND_TYPES,
    "pose": OPENPOSE, "normalmap": NORMAL_MAP, "segment": SEGMENTATION, "repaint": INPAINT, "grey": GRAY,
    "lq": LOW_QUALITY, "lowquality": LOW_QUALITY,
}


def _key(text: str) -> str:
    return "".join(c for c in text.lower() if c.isalnum())


_BY_KEY: Mapping[str, str] = {**_ALIASES, **{_key(name): name for name in CONTROL_TYPES}}


def allowed_values() -> str:
    """The accepted values, for messages: the named types and "Unknown"."""
    return ", ".join(repr(name) for name in (*CONTROL_TYPES, UNKNOWN))


def union_type_name(value: object, field: str = "union_control_type") -> str | None:
    """The type's name as the extension spells it, or None for "Unknown" / "Automatic" / empty.

    Any case, spaces, "_" or "-" are accepted ("hard_edge", "normal map"), and the preprocessor
    kinds ("canny" → Hard Edge, "scribble" → Soft Edge, ...) as aliases.
    """
    if value is None:
        return None
    if isinstance(value, str):
        key = _key(value)
        if key in _AUTOMATIC:
            return None
        found = _BY_KEY.get(key)
        if found:
            return found
    raise InvalidParameter(field, value, f"a union control type: one of {allowed_values()} (any case; "
                                         "'Unknown' takes it from the preprocessor)")


def kind_type(kind: str) -> str | None:
    """The control type of a preprocessor kind's maps (None: a kind no union model has, or none)."""
    return KIND_TYPES.get(kind or "")


def sdxl_slots(num_types: int) -> dict[str, int]:
    """Type → slot of an SDXL union model with ``num_types`` types."""
    return {name: i for i, name in enumerate(SDXL_TYPES[:num_types])}


def flux_slots(num_modes: int) -> dict[str, int]:
    """Type → mode id of a FLUX union model whose mode embedding has ``num_modes`` rows."""
    return {name: i for name, i in FLUX_TYPES.items() if i < num_modes}


def describe_slots(slots: Mapping[str, int]) -> str:
    """``"0 OpenPose, 1 Depth, ..."``; types sharing a slot are joined by "/"."""
    by_slot: dict[int, list[str]] = {}
    for name, i in slots.items():
        by_slot.setdefault(i, []).append(name)
    return ", ".join(f"{i} {'/'.join(names)}" for i, names in sorted(by_slot.items()))


def union_slot(unit, slots: Mapping[str, int], model_name: str, index: int) -> int:
    """The slot a unit uses in a union model: its explicit ``union_control_type``, else the type of
    its preprocessor's kind. Errors name ``control_units[index]``'s field at fault:
    ``union_control_type`` for a type the model lacks or a ready-made map without a type, ``module``
    for a preprocessor whose type the model lacks."""
    unit_field = f"control_units[{index}]"
    listing = describe_slots(slots)
    explicit = unit.union_control_type
    if explicit is not None:
        if explicit in slots:
            return slots[explicit]
        raise InvalidParameter(f"{unit_field}.union_control_type", explicit,
                               f"a control type the union ControlNet {model_name} has: {listing}")
    kind = unit.preprocessor.kind
    derived = kind_type(kind)
    if derived is not None and derived in slots:
        return slots[derived]
    if not kind:
        raise InvalidParameter(f"{unit_field}.union_control_type", None,
                               f"the control type of the ready-made map (module {unit.module!r}) for the union "
                               f"ControlNet {model_name}, one of its types: {listing} (command line: --control-type)")
    what = f"the {derived} type" if derived else f"kind {kind!r}"
    raise InvalidParameter(f"{unit_field}.module", unit.module,
                           f"a preprocessor of a control type the union ControlNet {model_name} has ({unit.module!r} "
                           f"makes {what}), or a union_control_type (--control-type) for the map; its types: "
                           f"{listing}")
