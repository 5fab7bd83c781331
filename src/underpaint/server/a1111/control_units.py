"""ControlNet units as A1111's ControlNet extension takes them in ``alwayson_scripts.controlnet.args``.

Each unit dict becomes a :class:`~underpaint.pipeline.control.ControlUnit`: images decoded with
the server's limits, the extension's "-1 means default" values mapped to None, the model name
matched against the files in the models folder only (never a path from the request), and the
extension's ``union_control_type`` ("Hard Edge", "Depth", ...; "Unknown": from the preprocessor)
kept for union models, and its ``hr_option`` ("Both", "Low res only", "High res only": the passes
of a hires. fix run the unit runs in) kept for every unit. Errors the engine finds later about
``control_units[k]`` are renamed to the k-th enabled unit of the request (:func:`request_field`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ...errors import InvalidParameter, UnknownName
from ...models.registry import split_hash
from ..config import Limits
from ..images import PictureBudget

_NO_MODEL = ("", "none", "None")


def controlnet_available() -> bool:
    """Whether a generation can take ControlNet units (``GenerationParams.control_units``)."""
    from ...params import GenerationParams

    return "control_units" in GenerationParams.field_names()


def resolve_model(name: str, files: Sequence[Path], *, field: str) -> Path:
    """A model name from /controlnet/model_list (``name [hash]``, a stem or a file name) → its file.

    Failing an exact name (then one in any case), a part of a name picks the shortest file name
    that holds it ("canny" → ``control_v11p_sd15_canny``), the extension's closest-name rule.
    """
    cleaned = split_hash(name.strip(), (8, 10))[0]
    for exact in (True, False):
        for path in files:
            names = (path.name, path.stem)
            if (cleaned in names) if exact else (cleaned.lower() in (n.lower() for n in names)):
                return path
    holding = [path for path in files if cleaned and cleaned.lower() in path.stem.lower()]
    if holding:
        return min(holding, key=lambda path: len(path.stem))
    raise UnknownName(field, name, [p.stem for p in files])


def enabled_units(args: Sequence[Any]) -> list[int]:
    """Indexes of the units that are on (the extension's default is on)."""
    return [i for i, raw in enumerate(args)
            if not (raw is False or raw is None or (isinstance(raw, Mapping) and raw.get("enabled", True) is False))]


def control_units(args: Sequence[Any], *, prefix: str, limits: Limits, allow_urls: bool,
                  files: Callable[[], Sequence[Path]], needs_image: bool = False,
                  pictures: PictureBudget | None = None) -> tuple:
    """The enabled units of a request, checked; disabled ones (``enabled: false``) are dropped.

    ``pictures``: the request's picture count, which the units' images and masks add to.
    """
    pictures = pictures or PictureBudget(limits)
    units = []
    for i in enabled_units(args):
        raw, field = args[i], f"{prefix}[{i}]"
        if not isinstance(raw, Mapping):
            raise InvalidParameter(field, type(raw).__name__, "a ControlNet unit object")
        unit = _unit(raw, field, pictures=pictures, allow_urls=allow_urls, files=files)
        if needs_image and unit.image is None:
            raise InvalidParameter(f"{field}.image", None, "a base64 image (txt2img has no input picture to use)")
        units.append(unit)
    return tuple(units)


def _unit(raw: Mapping[str, Any], field: str, *, pictures: PictureBudget, allow_urls: bool,
          files: Callable[[], Sequence[Path]]):
    from ...pipeline.control import ControlUnit

    module = str(raw.get("module") or "none")
    image, extra_images = _unit_images(raw, field, module, pictures=pictures, allow_urls=allow_urls)
    model = raw.get("model")
    model_path = None if model in _NO_MODEL or model is None else resolve_model(str(model), files(), field=f"{field}.model")
    values = {
        "image": image,
        "module": module,
        "model": str(model_path) if model_path else None,
        "weight": _number(raw, "weight", 1.0, field),
        "guidance_start": _number(raw, "guidance_start", 0.0, field),
        "guidance_end": _number(raw, "guidance_end", 1.0, field),
        "control_mode": raw.get("control_mode", 0),
        "resize_mode": raw.get("resize_mode", 1),
        "processor_res": int(_number(raw, "processor_res", -1, field)),
        "threshold_a": _number(raw, "threshold_a", -1, field),
        "threshold_b": _number(raw, "threshold_b", -1, field),
        "pixel_perfect": _switch(raw, "pixel_perfect", field),
        "union_control_type": raw.get("union_control_type"),
        "hr_option": "Both" if raw.get("hr_option") is None else raw["hr_option"],
        "extra_images": extra_images,
    }
    if values["processor_res"] < 0:
        values["processor_res"] = 512
    for name in ("threshold_a", "threshold_b"):
        if values[name] < 0:  # the extension's "use the module's default"
            values[name] = None
    try:
        return ControlUnit(**values)
    except InvalidParameter as exc:
        inner = "weight" if exc.field == "control weight" else exc.field or "unit"
        inner = {"control_model": "model", "extra_images": "image"}.get(inner, inner)
        if isinstance(exc, UnknownName):
            raise UnknownName(f"{field}.{inner}", exc.value, exc.choices) from None
        raise InvalidParameter(f"{field}.{inner}", exc.value, exc.expected) from None


_ENGINE_UNIT = re.compile(r"^control_units\[(\d+)\]")


def unit_fields(args: Sequence[Any], prefix: str) -> tuple[str, ...]:
    """The request's name of each unit the engine gets (``control_units[k]`` is the k-th enabled one)."""
    return tuple(f"{prefix}[{i}]" for i in enabled_units(args))


def request_field(exc: InvalidParameter, fields: Sequence[str]) -> InvalidParameter:
    """An engine error on ``control_units[k]...`` named as the request's unit field (else unchanged)."""
    match = _ENGINE_UNIT.match(exc.field or "")
    if not match or int(match.group(1)) >= len(fields):
        return exc
    name = fields[int(match.group(1))] + exc.field[match.end():]
    if isinstance(exc, UnknownName):
        return UnknownName(name, exc.value, exc.choices)
    return InvalidParameter(name, exc.value, exc.expected)


def _number(raw: Mapping[str, Any], key: str, default: float, field: str) -> float:
    value = raw.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameter(f"{field}.{key}", value, "a number")
    if not math.isfinite(value):  # JSON from Python clients may hold NaN or Infinity here
        raise InvalidParameter(f"{field}.{key}", value, "a finite number")
    return value


def _switch(raw: Mapping[str, Any], key: str, field: str) -> bool:
    value = raw.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidParameter(f"{field}.{key}", value, "true or false")
    return value


def _unit_images(raw: Mapping[str, Any], field: str, module: str, *, pictures: PictureBudget, allow_urls: bool):
    """(the unit's picture, None for the img2img input; more pictures) from the forms the extension takes:
    a picture, ``{"image": ..., "mask": ...}``, ``[image, mask]``, or a list of ``{"image": ..., "mask": ...}``
    (Multi-Inputs: several reference pictures for an IP-Adapter unit, which the unit checks)."""
    source = raw.get("image", raw.get("input_image"))
    mask_data = raw.get("mask") or raw.get("mask_image")
    if isinstance(source, (list, tuple)) and source and all(isinstance(s, Mapping) for s in source):
        if mask_data:
            raise InvalidParameter(f"{field}.mask", "<image>", "no mask beside a list of pictures (each entry's "
                                                               "\"mask\" goes with its picture)")
        images = [_unit_image(entry.get("image"), entry.get("mask"), f"{field}.image[{k}]", module,
                              pictures=pictures, allow_urls=allow_urls, mask_field=f"{field}.image[{k}].mask")
                  for k, entry in enumerate(source)]
        if any(image is None for image in images):
            raise InvalidParameter(f"{field}.image[{images.index(None)}]", None, "a base64 image")
        return images[0], tuple(images[1:])
    if isinstance(source, (list, tuple)):  # the extension's [image, mask] pair
        if len(source) != 2 or mask_data:
            raise InvalidParameter(f"{field}.image", f"a list of {len(source)}",
                                   "a picture, {\"image\": ..., \"mask\": ...}, [image, mask], or a list of "
                                   "{\"image\": ..., \"mask\": ...} for several IP-Adapter pictures")
        source, mask_data = source
    if isinstance(source, Mapping):  # the extension's {"image": ..., "mask": ...} form
        mask_data = mask_data or source.get("mask")
        source = source.get("image")
    return _unit_image(source, mask_data, f"{field}.image", module, pictures=pictures, allow_urls=allow_urls,
                       mask_field=f"{field}.mask"), ()


def _unit_image(source: Any, mask_data: Any, field: str, module: str, *, pictures: PictureBudget, allow_urls: bool,
                mask_field: str):
    """One picture of a unit (None: the img2img input); its mask becomes transparency for inpaint modules."""
    if not source:
        if mask_data:
            raise InvalidParameter(mask_field, "<image>", "no mask without a unit image")
        return None
    image = pictures.decode(source, field=field, allow_urls=allow_urls)
    if not mask_data:
        return image
    if not module.lower().startswith("inpaint"):
        raise InvalidParameter(mask_field, "<image>", "no mask (only inpaint units take one)")
    mask = pictures.decode(mask_data, field=mask_field, allow_urls=allow_urls)
    from PIL import ImageOps

    alpha = ImageOps.invert(mask.convert("L").resize(image.size))  # white = repaint = transparent
    rgba = image.convert("RGBA")
    rgba.putalpha(alpha)
    return rgba
