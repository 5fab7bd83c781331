"""An A1111 infotext turned back into a request: what ``--from-infotext`` and the server apply.

A1111's "PNG Info → Send to img2img" fills its controls from the infotext's keys; keys it does
not find keep their A1111 defaults (:func:`~underpaint.imageio.infotext.apply_defaults`), and
keys with no default (Steps, CFG scale, Seed, Size, ...) leave the control as it was. Here the
result is a plain mapping of :class:`~underpaint.params.GenerationParams` field names, so each
caller decides what its own request overrides; prompts keep their ``<lora:...>`` tags, so the
LoRAs of the original run are applied again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import ImageError, InvalidParameter
from ..imageio.infotext import ParsedInfotext, apply_defaults, parse_infotext
from ..params import HiresOptions, InpaintOptions, SamplerOptions, vae_method_name

# infotext key → (GenerationParams field, parser); the ``-1``/``-2`` keys are split ``WxH`` values.
_FIELDS: tuple[tuple[str, str, Callable[[str], Any]], ...] = (
    ("Steps", "steps", int),
    ("Sampler", "sampler", str),
    ("Schedule type", "scheduler", str),
    ("CFG scale", "cfg_scale", float),
    ("Distilled CFG Scale", "distilled_cfg_scale", float),
    ("Image CFG scale", "image_cfg_scale", float),
    ("Seed", "seed", int),
    ("Size-1", "width", int),
    ("Size-2", "height", int),
    ("Variation seed", "subseed", int),
    ("Variation seed strength", "subseed_strength", float),
    ("Seed resize from-1", "seed_resize_from_w", int),
    ("Seed resize from-2", "seed_resize_from_h", int),
    ("Denoising strength", "strength", float),
    ("Noise multiplier", "noise_multiplier", float),
    ("Extra noise", "extra_noise", float),
    ("Clip skip", "clip_skip", int),
    ("ENSD", "eta_noise_seed_delta", int),
    ("Token merging ratio", "token_merging_ratio", float),
    ("NGMS", "s_min_uncond", float),
    ("Skip Early CFG", "skip_early_cond", float),
)
_RNG = {"GPU": "gpu", "CPU": "cpu", "NV": "nv"}
# Sampler options: underpaint's spelling first, then A1111's ("Sigma churn", "Eta DDIM", ...).
_OPTION_KEYS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("eta", ("Eta", "Eta DDIM")),
    ("s_churn", ("s_churn", "Sigma churn")),
    ("s_tmin", ("s_tmin", "Sigma tmin")),
    ("s_tmax", ("s_tmax", "Sigma tmax")),
    ("s_noise", ("s_noise", "Sigma noise")),
)
# A1111 writes 0 for "no override" of the schedule's sigma range and rho.
_SCHEDULE_OVERRIDES = (("sigma_min", "Schedule min sigma"), ("sigma_max", "Schedule max sigma"),
                       ("rho", "Schedule rho"))
# Hires. fix keys → HiresOptions fields; A1111 turns hires. fix on from an infotext with a
# "Denoising strength" and any of the first three.
_HIRES_FIELDS: tuple[tuple[str, str, Callable[[str], Any]], ...] = (
    ("Hires upscale", "scale", float),
    ("Hires upscaler", "upscaler", str),
    ("Hires resize-1", "resize_x", int),
    ("Hires resize-2", "resize_y", int),
    ("Hires steps", "steps", int),
    ("Denoising strength", "strength", float),
    ("Hires sampler", "sampler", str),
    ("Hires schedule type", "scheduler", str),
    ("Hires prompt", "prompt", str),
    ("Hires negative prompt", "negative_prompt", str),
    ("Token merging ratio hr", "token_merging_ratio", float),
)
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8", b"RIFF", b"GIF8", b"II*\x00", b"MM\x00*")


def params_from_infotext(parsed: ParsedInfotext) -> dict[str, Any]:
    """``GenerationParams`` keyword arguments for what an A1111 infotext records.

    Always holds the prompts, ``clip_skip``, ``rng``, ``scheduler``, ``sampler_options`` and
    ``inpaint`` (A1111 has defaults for those); the other fields only when their key is there.
    A value that does not parse is an :class:`InvalidParameter` naming the key; names (sampler,
    schedule) are checked when the ``GenerationParams`` is made.
    """
    values = apply_defaults(parsed.params, prompt=parsed.prompt)
    fields: dict[str, Any] = {"prompt": parsed.prompt, "negative_prompt": parsed.negative_prompt}
    for key, name, kind in _FIELDS:
        if key in values:
            fields[name] = _parse(values, key, kind)
    rng = values.get("RNG", "GPU")
    if rng not in _RNG:
        raise InvalidParameter("RNG", rng, "GPU, CPU or NV")
    fields["rng"] = _RNG[rng]
    for key, name in (("VAE Encoder", "vae_encode_method"), ("VAE Decoder", "vae_decode_method")):
        if key in values:  # A1111 fills in Full for both
            fields[name] = vae_method_name(values[key], key)
    if "NGMS all steps" in values:
        fields["s_min_uncond_all"] = _parse(values, "NGMS all steps", _boolean)
    if "Tiling" in values:
        fields["tiling"] = _parse(values, "Tiling", _boolean)
    if values.get("Face restoration"):  # CodeFormer or GFPGAN (another restorer: CodeFormer, warned of)
        from ..params import FACE_RESTORERS, restorer_name

        fields["restore_faces"] = True
        named = values["Face restoration"]
        fields["face_restoration_model"] = restorer_name(named) if named.lower() in (
            r.lower() for r in FACE_RESTORERS) else "CodeFormer"
    if "SGM noise multiplier" in values:
        fields["sgm_noise_multiplier"] = _parse(values, "SGM noise multiplier", _boolean)
    if values.get("Refiner"):  # the checkpoint's A1111 title, "name [hash]", as the models folder matches it
        from ..params import RefinerOptions, hires_refiner_pass

        switch_at = _parse(values, "Refiner switch at", float) if "Refiner switch at" in values else 0.8
        which = hires_refiner_pass(values.get("Hires refiner", "second pass"), "Hires refiner")
        fields["refiner"] = RefinerOptions(values["Refiner"], switch_at, which)
    fields["sampler_options"] = sampler_options(values)
    fields["inpaint"] = inpaint_options(values)
    hires = hires_options(parsed.params)
    if hires is not None:
        fields["hires"] = hires
    from .deepcache import options_from_infotext

    deepcache = options_from_infotext(parsed.params)
    if deepcache is not None:
        fields["deepcache"] = deepcache
    from .first_block_cache import threshold_from_infotext

    threshold = threshold_from_infotext(parsed.params)
    if threshold is not None:
        fields["first_block_cache"] = threshold
    from ..models.freeu import options_from_infotext as freeu_from_infotext

    freeu = freeu_from_infotext(parsed.params)
    if freeu is not None:
        fields["freeu"] = freeu
    from .detailer import units_from_infotext

    detailer = units_from_infotext(parsed.params)
    if detailer:
        fields["detailer"] = detailer
    return fields


def hires_options(params: Mapping[str, str]) -> HiresOptions | None:
    """The hires. fix an infotext records, or None. As A1111's "Send to txt2img": on when there is a
    "Denoising strength" and a "Hires upscale", "Hires upscaler" or "Hires resize" (given in the
    text, not filled in as a default, so that an img2img infotext does not turn it on).
    """
    if "Denoising strength" not in params or not any(
            key in params for key in ("Hires upscale", "Hires upscaler", "Hires resize-1")):
        return None
    found = {name: _parse(params, key, kind) for key, name, kind in _HIRES_FIELDS if key in params}
    checkpoint = params.get("Hires checkpoint", "Use same checkpoint")
    if checkpoint != "Use same checkpoint":  # the checkpoint's A1111 title, "name [hash]", as the models folder matches it
        found["checkpoint"] = checkpoint
    try:
        return HiresOptions(**found)
    except InvalidParameter as exc:
        key = next((k for k, name, _ in _HIRES_FIELDS if exc.field == f"hires_{name}"), exc.field or "Hires")
        raise InvalidParameter(key, exc.value, exc.expected) from None


def sampler_options(values: Mapping[str, str]) -> SamplerOptions:
    """Eta, sigma churn/tmin/tmax/noise, schedule sigma/rho overrides, discard-penultimate-sigma."""
    found: dict[str, Any] = {}
    for name, keys in _OPTION_KEYS:
        key = next((k for k in keys if k in values), None)
        if key is not None:
            found[name] = _parse(values, key, float)
    for name, key in _SCHEDULE_OVERRIDES:
        if key in values:
            number = _parse(values, key, float)
            found[name] = number if number != 0 else None
    if "Discard penultimate sigma" in values:
        found["discard_penultimate_sigma"] = _parse(values, "Discard penultimate sigma", _boolean)
    if "UniPC order" in values:
        found["unipc_order"] = _parse(values, "UniPC order", int)
    for key, name in (("Beta schedule alpha", "beta_alpha"), ("Beta schedule beta", "beta_beta")):
        if key in values:
            found[name] = _parse(values, key, float)
    return SamplerOptions(**found)


def inpaint_options(values: Mapping[str, str]) -> InpaintOptions:
    """A1111's inpaint keys (Mask blur, Mask mode, Inpaint area, Masked area padding, Masked content,
    Soft inpainting enabled, Conditional mask weight) as :class:`InpaintOptions`."""
    found: dict[str, Any] = {}
    if "Mask blur" in values:
        found["mask_blur_x"] = found["mask_blur_y"] = _parse(values, "Mask blur", int)
    if "Mask mode" in values:
        found["invert"] = values["Mask mode"] == "Inpaint not masked"
    if "Inpaint area" in values:
        found["full_res"] = values["Inpaint area"] == "Only masked"
    if "Masked area padding" in values:
        found["full_res_padding"] = _parse(values, "Masked area padding", int)
    if "Masked content" in values:
        found["masked_content"] = values["Masked content"]
    if "Soft inpainting enabled" in values:
        found["soft"] = _parse(values, "Soft inpainting enabled", _boolean)
    if "Conditional mask weight" in values:
        found["mask_weight"] = _parse(values, "Conditional mask weight", float)
    return InpaintOptions(**found)


#: Infotext keys of A1111 features underpaint has only in part → (what to call them, the values it
#: runs); a picture made with another value is not reproduced exactly.
_UNAVAILABLE = (("Face restoration", "face restoration", ("CodeFormer", "GFPGAN")),)


def unavailable_features(parsed: ParsedInfotext) -> list[str]:
    """The A1111 features an infotext records that underpaint cannot run again, each as
    ``face restoration (CodeFormer)``; empty when the picture can be reproduced as it was made."""
    found = []
    for key, name, runs in _UNAVAILABLE:
        value = parsed.params.get(key)
        if value is not None and value not in runs:
            found.append(f"{name} ({value})")
    return found


def checkpoint_from_infotext(parsed: ParsedInfotext) -> str | None:
    """The checkpoint the infotext names, as the models folder resolves it: ``name [hash]``, or
    either part alone (a name is tried first, then a known file with that short hash)."""
    name, short = parsed.params.get("Model"), parsed.params.get("Model hash")
    if name and short:
        return f"{name} [{short}]"
    return name or short or None


def read_infotext(source: str | Path) -> ParsedInfotext:
    """The infotext in a PNG (``parameters``), JPEG or WebP (EXIF UserComment), or a text file."""
    from ..imageio.metadata import read_metadata

    path = Path(source).expanduser()
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found", field="from_infotext") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror or exc})", field="from_infotext") from None
    if head.startswith(_IMAGE_MAGIC):
        text = read_metadata(path).infotext
        if not text:
            raise ImageError(f"{path}: the image holds no A1111 generation parameters", field="from_infotext")
    else:
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise ImageError(f"{path}: neither an image nor a UTF-8 text file", field="from_infotext") from None
    return parse_infotext(text)


def _parse(values: Mapping[str, str], key: str, kind: Callable[[str], Any]) -> Any:
    text = values[key]
    try:
        return kind(text)
    except ValueError:
        expected = {int: "a whole number", float: "a number", _boolean: "True or False"}.get(kind, "a value")
        raise InvalidParameter(key, text, expected) from None


def _boolean(text: str) -> bool:
    if text in ("True", "true"):
        return True
    if text in ("False", "false"):
        return False
    raise ValueError(text)
