"""A1111 request → :class:`GenerationParams`, checked against the server's limits; result → A1111 response.

Everything here runs before the job is queued (in the request's thread), so a bad field is a
422 naming it and never reaches the engine.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ...errors import InvalidParameter, UnknownName
from ...params import (MASKED_CONTENT, MAX_S_MIN_UNCOND, MAX_TOKEN_MERGING_RATIO, DeepCacheOptions, FreeUOptions,
                       GenerationParams, HiresOptions, RefinerOptions,
                       InpaintOptions, SamplerOptions, hires_refiner_pass, names_no_checkpoint, preview_method_name, restorer_name,
                       vae_method_name)
from ...prompts.styles import StyleBook
from ..config import Limits
from ..images import PictureBudget, decode_image
from ..saving import SampleFolders
from ..state import ServerOptions
from .requests import GenerationRequest, Img2ImgRequest, Txt2ImgRequest

RNG_NAMES = {"gpu": "gpu", "cpu": "cpu", "nv": "nv"}
#: Always-on script names understood here (compared lowercased; the extension registers "ControlNet").
CONTROLNET_SCRIPT = "controlnet"
SOFT_INPAINTING_SCRIPT = "soft inpainting"
#: Forge's built-in FreeU script (models/freeu.py): args [enabled, b1, b2, s1, s2].
FREEU_SCRIPT = "freeu integrated"
#: The ADetailer extension's always-on script (pipeline/detailer.py): args [enabled, skip img2img, {ad_*}, ...].
ADETAILER_SCRIPT = "adetailer"
#: The selectable scripts underpaint runs: A1111's "SD upscale" (img2img, pipeline/sd_upscale.py),
#: "X/Y/Z plot" (both tabs, pipeline/xyz_plot.py), "Loopback" (img2img, pipeline/loopback.py),
#: "Prompt matrix" and "Prompts from file or textbox" (both tabs, pipeline/prompt_matrix.py and
#: pipeline/prompts_file.py).
SD_UPSCALE_SCRIPT = "sd upscale"
XYZ_PLOT_SCRIPT = "x/y/z plot"
LOOPBACK_SCRIPT = "loopback"
PROMPT_MATRIX_SCRIPT = "prompt matrix"
PROMPTS_FILE_SCRIPT = "prompts from file or textbox"
OUTPAINT_SCRIPT = "poor man's outpainting"
OUTPAINT_MK2_SCRIPT = "outpainting mk2"
#: The scripts of each tab, in A1111's order of its Script list.
TXT2IMG_SCRIPTS = (PROMPT_MATRIX_SCRIPT, PROMPTS_FILE_SCRIPT, XYZ_PLOT_SCRIPT)
IMG2IMG_SCRIPTS = (LOOPBACK_SCRIPT, OUTPAINT_MK2_SCRIPT, OUTPAINT_SCRIPT, PROMPT_MATRIX_SCRIPT, PROMPTS_FILE_SCRIPT,
                   SD_UPSCALE_SCRIPT, XYZ_PLOT_SCRIPT)
#: Scripts that make the prompts themselves: the request's styles go to each prompt they make.
_PROMPT_SCRIPTS = (PROMPT_MATRIX_SCRIPT, PROMPTS_FILE_SCRIPT)
#: The script options' own field names → the ``script_args`` item each comes from (errors found
#: before a job queues and while it runs name the request's argument).
SCRIPT_ARG_FIELDS = {
    "sd_upscale": "script_name", "sd_upscale_overlap": "script_args[1]", "sd_upscale_upscaler": "script_args[2]",
    "sd_upscale_scale": "script_args[3]", "xyz_plot": "script_name",
    "loopback": "script_name", "loopback_loops": "script_args[0]", "loopback_final_strength": "script_args[1]",
    "loopback_curve": "script_args[2]", "loopback_interrogate": "script_args[3]", "prompt_matrix": "script_name", "prompts_from_file": "script_name",
    **{f"prompt_matrix_{name}": f"script_args[{i}]" for i, name in enumerate((
        "put_at_start", "different_seeds", "prompt_type", "joiner", "margin_size"))},
    **{f"prompts_{name}": f"script_args[{i}]" for i, name in enumerate((
        "iterate_seed", "same_seed", "position", "text", "combined"))},
    **{f"xyz_{letter}_{part}": f"script_args[{3 * k + j}]" for k, letter in enumerate("xyz")
       for j, part in enumerate(("type", "values"))},
    **{f"xyz_{name}": f"script_args[{9 + i}]" for i, name in enumerate((
        "draw_legend", "include_lone_images", "include_sub_grids", "no_fixed_seeds", "vary_seeds_x", "vary_seeds_y",
        "vary_seeds_z", "margin_size"))},
}
#: X/Y/Z plot axes whose values A1111 takes from the ``*_values_dropdown`` list (unless csv_mode).
_XYZ_CHOICE_AXES = frozenset({"Sampler", "Hires sampler", "Schedule type", "Hires upscaler", "Styles", "Face restore",
                              "SGM noise multiplier"})


@dataclass(frozen=True)
class ConvertContext:
    """What a conversion needs from the server: limits, defaults from /options, model lookup."""

    limits: Limits
    options: ServerOptions
    #: A checkpoint name → the listed file (``Catalog.resolve``: ``field=`` names the field in errors).
    resolve_model: Callable[..., Path]
    allow_image_urls: bool = False
    controlnet_files: Callable[[], Sequence[Path]] = tuple
    #: The server's prompt styles (styles.csv), read when a request names styles.
    styles: Callable[[], StyleBook] | None = None
    #: The server's output folder, whose path settings a request may not change.
    outputs: SampleFolders | None = None
    #: ``sd_vae`` as the server keeps it (catalog.py's ``vae_choice``); None: only Automatic and None.
    vae_choice: Callable[..., str] | None = None
    #: The models folder whose upscaling models ``hr_upscaler`` may name (None: built-in ones only).
    models_folder: Callable[[], Any] | None = None
    #: The device the server's helper models (Loopback's Interrogate CLIP) run on.
    device: str = "cpu"


@dataclass(frozen=True)
class PreparedJob:
    """A checked request, images decoded, ready for the queue."""

    kind: str  # "txt2img" or "img2img"
    params: GenerationParams
    model: Path | None  # checkpoint for this job only (override_settings), None: the selected one
    keep_model: bool  # override_settings_restore_afterwards false: the override stays selected
    send_images: bool
    parameters: dict[str, Any]  # the request as echoed back
    styles: tuple[str, ...]
    denoising_strength: float | None
    task_id: str | None
    #: The request's field of each ControlNet unit sent to the engine, to name the engine's errors.
    control_fields: tuple[str, ...] = ()
    #: Keep the pictures in the server's output folder (A1111's ``save_images``).
    save_images: bool = False
    #: ``override_settings``' live preview method and switch for this job (None: the server's options).
    preview_method: str | None = None
    live_previews: bool | None = None
    #: ``override_settings_restore_afterwards`` false: the overridden /options settings, named as
    #: :class:`ServerOptions` names them, which stay set once the job starts (A1111 keeps them).
    kept_options: tuple[tuple[str, Any], ...] = ()
    #: ``override_settings.sd_vae`` for this job only, as the server keeps sd_vae; None: the option's.
    vae: str | None = None
    #: ``override_settings``' A1111 grid settings for this job ("Show grid in gallery", "Always save all
    #: generated image grids"); None: the server's options.
    return_grid: bool | None = None
    grid_save: bool | None = None
    #: ``override_settings``' "File format for images" and its quality for the pictures this job saves
    #: (None: the server's options; the answer's pictures follow /options, as A1111 encodes them).
    samples_format: str | None = None
    jpeg_quality: int | None = None


# --------------------------------------------------------------------------- request → params


def prepare_txt2img(req: Txt2ImgRequest, ctx: ConvertContext) -> PreparedJob:
    req = apply_infotext(req)
    _refuse_unsupported(req)
    if req.firstpass_image:
        raise InvalidParameter("firstpass_image", "<image>", "absent (a hires. fix over a given first picture "
                                                             "is not available)")
    fields = _common_fields(req, ctx, PictureBudget(ctx.limits), img2img=False)
    fields.update(_first_phase_size(req, ctx.limits))
    mask_weight = _Overrides(req.override_settings or {}, ctx).float("inpainting_mask_weight", None)
    if mask_weight is not None:  # an inpainting checkpoint records it, and its hires. pass uses it
        try:
            fields["inpaint"] = InpaintOptions(mask_weight=mask_weight)
        except InvalidParameter as exc:
            raise _renamed(exc) from None
    if req.enable_hr:
        fields["hires"] = _hires_options(req, ctx, fields["width"], fields["height"])
    if _script(req) in _PROMPT_SCRIPTS:
        fields.update(_prompt_script(req, ctx))
    elif req.script_name:
        fields["xyz_plot"] = _xyz_plot(req.script_args, ctx, img2img=False)
    params = _checked_plot(_build_params(fields, strength=1.0), ctx)
    return _prepared("txt2img", req, params, fields, req.model_dump(mode="json"), _kept_options(req, ctx))


def _first_phase_size(req: Txt2ImgRequest, limits: Limits) -> dict[str, int]:
    """A1111's legacy ``firstphase_width``/``firstphase_height``: when set they replace the size of
    the (first) pass, hires. fix or not, as A1111 1.x does."""
    if not req.firstphase_width and not req.firstphase_height:
        return {}
    for name, value, most in (("firstphase_width", req.firstphase_width, limits.max_width),
                              ("firstphase_height", req.firstphase_height, limits.max_height)):
        if not 64 <= value <= most:
            raise InvalidParameter(name, value, f"0 (not used; with its partner 0 too) or 64 to {most} pixels")
    return {"width": req.firstphase_width, "height": req.firstphase_height}


def _hires_options(req: Txt2ImgRequest, ctx: ConvertContext, width: int, height: int) -> HiresOptions:
    """``enable_hr`` and the ``hr_*`` fields as :class:`HiresOptions`, the hires size within the limits.

    Styles apply to a hires. prompt of its own as to the main one (A1111); an empty one follows the
    main prompt, styles and all.
    """
    limits = ctx.limits
    checkpoint = None
    if req.hr_checkpoint_name not in (None, "", "Use same checkpoint"):  # listed checkpoints only, never a path
        checkpoint = str(ctx.resolve_model(req.hr_checkpoint_name, field="hr_checkpoint_name"))
    if req.hr_second_pass_steps > limits.max_steps:
        raise InvalidParameter("hr_second_pass_steps", req.hr_second_pass_steps,
                               f"at most {limits.max_steps} (this server's limit)")
    try:
        hires = HiresOptions(
            scale=req.hr_scale, resize_x=req.hr_resize_x, resize_y=req.hr_resize_y, upscaler=req.hr_upscaler or None,
            steps=req.hr_second_pass_steps, strength=0.75 if req.denoising_strength is None else req.denoising_strength,
            sampler=req.hr_sampler_name, scheduler=req.hr_scheduler, checkpoint=checkpoint,
            token_merging_ratio=_Overrides(req.override_settings or {}, ctx).ratio(
                "token_merging_ratio_hr", ctx.options.token_merging_ratio_hr),
            **_styled_hires_prompts(req, ctx))
    except InvalidParameter as exc:
        raise _renamed(exc) from None
    if not hires.in_latent_space:  # an upscaling model that is not there: refused before queueing
        from ...pipeline import upscale

        upscale.resolve(ctx.models_folder() if ctx.models_folder else None, hires.upscaler_name, "hr_upscaler",
                        hires=True)
    if width < 64 or height < 64:  # refused by name when the request is built
        return hires
    out_w, out_h = hires.output_size(width, height)
    field = _API_FIELD[hires.size_field()]
    value = req.hr_scale if field == "hr_scale" else f"{req.hr_resize_x}x{req.hr_resize_y}"
    if out_w > limits.max_width or out_h > limits.max_height or out_w * out_h > limits.max_image_pixels:
        raise InvalidParameter(field, value, f"a hires size of at most {limits.max_width}x{limits.max_height} and "
                                             f"{limits.max_image_pixels} pixels (this server's limits; this one "
                                             f"gives {out_w}x{out_h})")
    return hires


def prepare_img2img(req: Img2ImgRequest, ctx: ConvertContext) -> PreparedJob:
    req = apply_infotext(req)
    _refuse_unsupported(req, img2img=True)
    if req.latent_mask:
        raise InvalidParameter("latent_mask", "<image>", "absent (a separate latent mask is not available)")
    if not req.init_images:
        raise InvalidParameter("init_images", req.init_images, "a list with at least one base64 image")
    pictures = PictureBudget(ctx.limits)
    pictures.take("init_images", len(req.init_images))  # all of them counted before any is decoded
    fields = _common_fields(req, ctx, pictures, img2img=True)
    strength = 0.75 if req.denoising_strength is None else req.denoising_strength
    fields["init_images"] = tuple(
        decode_image(data, field=f"init_images[{i}]", limits=ctx.limits, allow_urls=ctx.allow_image_urls)
        for i, data in enumerate(req.init_images)
    )
    if req.mask:
        fields["mask"] = pictures.decode(req.mask, field="mask", allow_urls=ctx.allow_image_urls)
    fields["resize_mode"] = req.resize_mode
    if req.image_cfg_scale is not None:
        fields["image_cfg_scale"] = req.image_cfg_scale
    fields["noise_multiplier"] = (req.initial_noise_multiplier if req.initial_noise_multiplier is not None else
                                  _Overrides(req.override_settings or {}, ctx).float(
                                      "initial_noise_multiplier", ctx.options.initial_noise_multiplier))
    fields["inpaint"] = _inpaint_options(req, _Overrides(req.override_settings or {}, ctx))
    if _script(req) == SD_UPSCALE_SCRIPT:
        fields["sd_upscale"] = _sd_upscale(req.script_args, fields["init_images"][0], ctx,
                                           (fields.get("width") or 512, fields.get("height") or 512),
                                           fields.get("n_iter") or 1)
    elif _script(req) == LOOPBACK_SCRIPT:
        fields["loopback"] = _loopback(req.script_args, fields.get("n_iter") or 1, ctx)
    elif _script(req) in _PROMPT_SCRIPTS:
        fields.update(_prompt_script(req, ctx))
    elif _script(req) == OUTPAINT_SCRIPT:
        outpaint = _outpaint(req, fields)
    elif _script(req) == OUTPAINT_MK2_SCRIPT:
        outpaint = _outpaint_mk2(req, fields)
    elif req.script_name:
        fields["xyz_plot"] = _xyz_plot(req.script_args, ctx, img2img=True)
    params = _checked_plot(_build_params(fields, strength=strength), ctx)
    if _script(req) in (OUTPAINT_SCRIPT, OUTPAINT_MK2_SCRIPT):
        params = _outpainted(params, outpaint, ctx)
    echo = req.model_dump(mode="json", exclude={"include_init_images"})
    if not req.include_init_images:
        echo["init_images"] = None
        echo["mask"] = None
    return _prepared("img2img", req, params, fields, echo, _kept_options(req, ctx))


def _prepared(kind: str, req: GenerationRequest, params: GenerationParams, fields: dict, echo: dict,
              kept_options: Mapping[str, Any]) -> PreparedJob:
    return PreparedJob(
        kind=kind, params=params, model=fields.pop("_model"), vae=fields.pop("_vae"),
        keep_model=not req.override_settings_restore_afterwards,
        send_images=req.send_images, parameters=echo, styles=tuple(req.styles or ()),
        denoising_strength=req.denoising_strength, task_id=req.force_task_id,
        control_fields=_control_unit_fields(req), save_images=req.save_images,
        kept_options=tuple(kept_options.items()),
        **_preview_overrides(req), **_grid_overrides(req), **_format_overrides(req),
    )


def _format_overrides(req: GenerationRequest) -> dict[str, Any]:
    """``override_settings``' samples_format and jpeg_quality (checked when the request was read)."""
    values = req.override_settings or {}
    out: dict[str, Any] = {}
    if values.get("samples_format") is not None:
        out["samples_format"] = samples_format_setting(values["samples_format"], "override_settings.samples_format")
    if values.get("jpeg_quality") is not None:
        quality = values["jpeg_quality"]
        if isinstance(quality, float) and quality.is_integer():
            quality = int(quality)
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise InvalidParameter("override_settings.jpeg_quality", quality, "an integer from 1 to 100")
        out["jpeg_quality"] = quality
    return out


def _kept_options(req: GenerationRequest, ctx: ConvertContext) -> dict[str, Any]:
    """With ``override_settings_restore_afterwards`` false, A1111 leaves every overridden setting
    set after the job; these are the ones underpaint's /options has (the checkpoint stays
    selected through ``keep_model``; sd_vae as the server keeps it)."""
    if req.override_settings_restore_afterwards or not req.override_settings:
        return {}
    overrides = _Overrides(req.override_settings, ctx)
    options = ctx.options
    kept: dict[str, Any] = {}
    readers = {
        "CLIP_stop_at_last_layers": ("clip_skip", lambda key: overrides.int(key, options.clip_skip) or 1),
        "eta_noise_seed_delta": ("eta_noise_seed_delta", lambda key: overrides.int(key, options.eta_noise_seed_delta)),
        "randn_source": ("rng", lambda key: overrides.rng(options.rng)),
        "img2img_fix_steps": ("img2img_fix_steps", lambda key: overrides.bool(key, options.img2img_fix_steps)),
        "upscaler_for_img2img": ("upscaler_for_img2img", lambda key: overrides.upscaler(options.upscaler_for_img2img)),
        **{key: (key, lambda key: overrides.ratio(key, 0.0)) for key in
           ("token_merging_ratio", "token_merging_ratio_img2img", "token_merging_ratio_hr")},
        "s_min_uncond": ("s_min_uncond", lambda key: overrides.float(key, options.s_min_uncond)),
        "s_min_uncond_all": ("s_min_uncond_all", lambda key: overrides.bool(key, options.s_min_uncond_all)),
        "img2img_color_correction": ("img2img_color_correction",
                                     lambda key: overrides.bool(key, options.img2img_color_correction)),
        "tiling": ("tiling", lambda key: overrides.bool(key, options.tiling)),
        "initial_noise_multiplier": ("initial_noise_multiplier",
                                     lambda key: overrides.float(key, options.initial_noise_multiplier)),
        "img2img_extra_noise": ("img2img_extra_noise", lambda key: overrides.float(key, options.img2img_extra_noise)),
        "face_restoration_model": ("face_restoration_model", lambda key: restorer_name(
            overrides.values[key], "override_settings.face_restoration_model")),
        **{key: (key, lambda key: overrides.int(key, getattr(options, key))) for key in (
            "uni_pc_order", "sdxl_crop_top", "sdxl_crop_left")},
        **{key: (key, lambda key: overrides.float(key, getattr(options, key))) for key in (
            "code_former_weight", "beta_dist_alpha", "beta_dist_beta", "sdxl_refiner_high_aesthetic_score",
            "sdxl_refiner_low_aesthetic_score")},
        **{key: (key, lambda key: overrides.bool(key, getattr(options, key))) for key in (
            "face_restoration", "sgm_noise_multiplier")},
        "hires_fix_refiner_pass": ("hires_fix_refiner_pass",
                                   lambda key: overrides.hires_refiner_pass(options.hires_fix_refiner_pass)),
        "skip_early_cond": ("skip_early_cond", lambda key: overrides.float(key, options.skip_early_cond)),
        "enable_prompt_comments": ("enable_prompt_comments",
                                   lambda key: overrides.bool(key, options.enable_prompt_comments)),
        "samples_format": ("samples_format", lambda key: samples_format_setting(
            overrides.values[key], "override_settings.samples_format")),
        "jpeg_quality": ("jpeg_quality", lambda key: _quality(overrides.int(key, options.jpeg_quality))),
        "sd_hypernetwork": ("sd_hypernetwork", lambda key: overrides.hypernetwork(options.sd_hypernetwork)),
        "extra_networks_default_multiplier": ("extra_networks_default_multiplier", lambda key: overrides.float(
            key, options.extra_networks_default_multiplier)),
        **{key: (key, lambda key: overrides.vae_method(key, "Full")) for key in
           ("sd_vae_encode_method", "sd_vae_decode_method")},
    }
    for key, (name, read) in readers.items():
        if overrides.has(key):
            kept[name] = read(key)
    vae = overrides.vae()
    if vae is not None:
        kept["sd_vae"] = vae
    previews = _preview_overrides(req)
    if "preview_method" in previews:
        kept["show_progress_type"] = previews["preview_method"]
    if "live_previews" in previews:
        kept["live_previews_enable"] = previews["live_previews"]
    return kept


def _preview_overrides(req: GenerationRequest) -> dict[str, Any]:
    """``show_progress_type`` / ``live_previews_enable`` in ``override_settings``, for this job only."""
    values = req.override_settings or {}
    out: dict[str, Any] = {}
    if values.get("show_progress_type") is not None:
        out["preview_method"] = preview_method_name(values["show_progress_type"], "override_settings.show_progress_type")
    if values.get("live_previews_enable") is not None:
        if not isinstance(values["live_previews_enable"], bool):
            raise InvalidParameter("override_settings.live_previews_enable", values["live_previews_enable"],
                                   "true or false")
        out["live_previews"] = values["live_previews_enable"]
    return out


def _grid_overrides(req: GenerationRequest) -> dict[str, bool]:
    """``return_grid`` / ``grid_save`` in ``override_settings``, for this job only."""
    values = req.override_settings or {}
    out: dict[str, bool] = {}
    for key in ("return_grid", "grid_save"):
        if values.get(key) is not None:
            if not isinstance(values[key], bool):
                raise InvalidParameter(f"override_settings.{key}", values[key], "true or false")
            out[key] = values[key]
    return out


def _control_unit_fields(req: GenerationRequest) -> tuple[str, ...]:
    from .control_units import unit_fields

    for name, value in req.alwayson_scripts.items():
        if name.lower() == CONTROLNET_SCRIPT:
            return unit_fields(_script_args(name, value), f"alwayson_scripts.{name}.args")
    return ()


def _build_params(fields: dict[str, Any], *, strength: float) -> GenerationParams:
    fields = {k: v for k, v in fields.items() if not k.startswith("_")}
    try:
        return GenerationParams(strength=strength, **fields)
    except InvalidParameter as exc:
        raise _renamed(exc) from None


# GenerationParams' own names for fields the API spells differently.
_API_FIELD = {**SCRIPT_ARG_FIELDS, "strength": "denoising_strength", "sampler": "sampler_name", "clip_skip": "override_settings.CLIP_stop_at_last_layers",
              "rng": "override_settings.randn_source", "masked_content": "inpainting_fill",
              "mask_weight": "override_settings.inpainting_mask_weight",
              "full_res_padding": "inpaint_full_res_padding",
              "hires": "enable_hr", "hires_scale": "hr_scale", "hires_resize_x": "hr_resize_x",
              "hires_resize_y": "hr_resize_y", "hires_upscaler": "hr_upscaler", "hires_steps": "hr_second_pass_steps",
              "hires_strength": "denoising_strength", "hires_sampler": "hr_sampler_name",
              "hires_scheduler": "hr_scheduler", "hires_prompt": "hr_prompt",
              "hires_negative_prompt": "hr_negative_prompt",
              "token_merging_ratio": "override_settings.token_merging_ratio",
              "hires_token_merging_ratio": "override_settings.token_merging_ratio_hr",
              "vae_encode_method": "override_settings.sd_vae_encode_method",
              "vae_decode_method": "override_settings.sd_vae_decode_method",
              "noise_multiplier": "initial_noise_multiplier", "extra_noise": "override_settings.img2img_extra_noise",
              "aesthetic_score": "override_settings.sdxl_refiner_high_aesthetic_score",
              "sdxl_crop_top": "override_settings.sdxl_crop_top", "sdxl_crop_left": "override_settings.sdxl_crop_left",
              "unipc_order": "override_settings.uni_pc_order",
              "code_former_weight": "override_settings.code_former_weight",
              "sgm_noise_multiplier": "override_settings.sgm_noise_multiplier",
              "negative_aesthetic_score": "override_settings.sdxl_refiner_low_aesthetic_score",
              "hires_checkpoint": "hr_checkpoint_name"}


#: Fields the engine checks again as the job runs (it knows the model then), by their API names.
ENGINE_CHECKED_FIELDS = {**SCRIPT_ARG_FIELDS, "freeu": "alwayson_scripts.FreeU Integrated",
                         "hires_checkpoint": "hr_checkpoint_name", "vae_encode_method": "override_settings.sd_vae_encode_method",
                         "vae_decode_method": "override_settings.sd_vae_decode_method"}


def _renamed(exc: InvalidParameter, names: Mapping[str, str] | None = None) -> InvalidParameter:
    """Name the field as the API client knows it (denoising_strength, not strength; a script's
    option by its ``script_args`` item); ``names``: only these renamings."""
    api = (_API_FIELD if names is None else names).get(exc.field or "")
    if api is None:
        return exc
    if isinstance(exc, UnknownName):
        return UnknownName(api, exc.value, exc.choices)
    return InvalidParameter(api, exc.value, exc.expected)


def _refuse_unsupported(req: GenerationRequest, *, img2img: bool = False) -> None:
    """Features A1111 has and underpaint does not: refuse a request that turns one on."""
    scripts = IMG2IMG_SCRIPTS if img2img else TXT2IMG_SCRIPTS
    if req.script_name and _script(req) not in scripts:
        raise UnknownName("script_name", req.script_name, scripts)
    _check_alwayson(req.alwayson_scripts)


def _script(req: GenerationRequest) -> str:
    """The request's script name as A1111 matches it (any case), "" for none."""
    return (req.script_name or "").strip().lower()


def _xyz_plot(args: list, ctx: ConvertContext, *, img2img: bool):
    """A1111's "X/Y/Z plot" ``script_args``: [x_type, x_values, x_values_dropdown, y_type, ...,
    z_values_dropdown, draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds,
    vary_seeds_x, vary_seeds_y, vary_seeds_z, margin_size, csv_mode]. A type is an index into
    A1111 1.10's axis list for the tab (or the axis's name); an axis with a fixed list of choices
    (samplers, schedule types, hires upscalers) takes its ``*_dropdown`` values unless csv_mode or
    the list is empty, then the comma-separated text."""
    from ...params import XYZPlotOptions
    from ...pipeline import xyz_plot

    defaults = [0, "", [], 0, "", [], 0, "", [], True, False, False, False, False, False, False, 0, False]
    args = [default if i >= len(args) or args[i] is None else args[i] for i, default in enumerate(defaults)]
    names = xyz_plot.axis_names(img2img)
    fields: dict[str, Any] = {}
    for k, letter in enumerate("xyz"):
        kind, values, dropdown = args[3 * k: 3 * k + 3]
        if isinstance(kind, int) and not isinstance(kind, bool):
            if not 0 <= kind < len(names):
                raise InvalidParameter(f"script_args[{3 * k}]", kind, f"an axis index from 0 to {len(names) - 1} "
                                                                      "(A1111's list for this tab) or an axis name")
            kind = names[kind]
        elif not isinstance(kind, str):
            raise InvalidParameter(f"script_args[{3 * k}]", kind, "an axis index or an axis name")
        if kind in _XYZ_CHOICE_AXES and not args[17] and isinstance(dropdown, list) and dropdown:
            values = dropdown
        fields[f"{letter}_type"], fields[f"{letter}_values"] = kind, values
    flags = ("draw_legend", "include_lone_images", "include_sub_grids", "no_fixed_seeds", "vary_seeds_x",
             "vary_seeds_y", "vary_seeds_z")
    fields.update({name: args[9 + i] for i, name in enumerate(flags)})
    fields["margin_size"] = args[16]
    if any(str(fields[f"{letter}_type"]).strip().lower() == "styles" for letter in "xyz") and ctx.styles is not None:
        fields["styles"] = ctx.styles()
    try:
        return XYZPlotOptions(**fields)
    except InvalidParameter as exc:
        raise _renamed(exc, SCRIPT_ARG_FIELDS) from None


def _prompt_script(req: GenerationRequest, ctx: ConvertContext) -> dict[str, Any]:
    """A1111's "Prompt matrix" ``script_args`` [put variable parts at start (false), use different
    seed for each picture (false), prompt ("positive"; "negative"), joining char ("comma"; "space"),
    grid margins (0)], or "Prompts from file or textbox"'s [iterate seed every line (false), use same
    random seed for all lines (false), insert prompts at the ("start"; "end"), list of prompt inputs,
    and Forge's make a combined image (false)] (before A1111 1.7, three: the two checkboxes and the
    text). The request's styles are handed to the script, which styles each prompt it makes."""
    from ...params import PromptMatrixOptions, PromptsFromFileOptions

    args = list(req.script_args)
    styles = _styler(req, ctx)
    if _script(req) == PROMPT_MATRIX_SCRIPT:
        names, kind, extra = ("put_at_start", "different_seeds", "prompt_type", "joiner", "margin_size"), \
            PromptMatrixOptions, {}
        key = "prompt_matrix"
    else:
        if len(args) == 3 and isinstance(args[2], str) and args[2].strip().lower() not in ("start", "end"):
            args = [args[0], args[1], None, args[2]]  # A1111 before 1.7: no prompt position
        names, kind = ("iterate_seed", "same_seed", "position", "text", "combined"), PromptsFromFileOptions
        extra = {"style_book": ctx.styles() if ctx.styles is not None else None}
        key = "prompts_from_file"
    if len(args) > len(names):
        raise InvalidParameter("script_args", f"{len(args)} arguments", f"at most {len(names)} for {req.script_name}")
    given = {name: value for name, value in zip(names, args) if value is not None}
    if isinstance(given.get("margin_size"), float) and given["margin_size"].is_integer():
        given["margin_size"] = int(given["margin_size"])  # a slider's 4.0
    try:
        return {key: kind(**given, styles=styles, add_to_prompt=_hypernetwork_adder(
            req, _Overrides(req.override_settings or {}, ctx), ctx.options), **extra)}
    except InvalidParameter as exc:
        raise _renamed(exc, SCRIPT_ARG_FIELDS) from None


def _styler(req: GenerationRequest, ctx: ConvertContext):
    """The request's styles as a function of the prompts (None: no styles), every name checked now."""
    if not req.styles:
        return None
    if ctx.styles is None:
        raise InvalidParameter("styles", req.styles[0], "no styles (this server has no styles file)")
    return ctx.styles().styler(req.styles, field="styles", max_chars=ctx.limits.max_prompt_chars)


def _checked_prompt_script(params: GenerationParams, ctx: ConvertContext) -> GenerationParams:
    """A Prompt matrix or Prompts from file request made into its requests before it queues: each
    checked (a line's values, its checkpoint, its prompt's length and LoRA tags), all of them within
    the server's picture limit."""
    from ...pipeline import prompt_matrix, prompts_file

    try:
        if params.prompt_matrix is not None:
            jobs = prompt_matrix.requests(params)
            pictures, what = len(jobs), f"{len(jobs)} combinations"
        else:
            jobs = [job.params for job in prompts_file.plan(params, plot_models(ctx))]
            pictures = sum(job.batch_size * job.n_iter for job in jobs)
            what = f"{len(jobs)} lines"
    except InvalidParameter as exc:
        raise _renamed(exc, SCRIPT_ARG_FIELDS) from None
    if pictures > ctx.limits.max_images:
        raise InvalidParameter("script_args", what, f"at most {ctx.limits.max_images} pictures in all (this server's "
                                                    f"limit; these make {pictures})")
    field = "script_args[3]" if params.prompts_from_file is not None else "prompt"
    for job in jobs:
        for text in (job.prompt, job.negative_prompt):
            if len(text) > ctx.limits.max_prompt_chars:
                raise InvalidParameter(field, f"a prompt of {len(text)} characters",
                                       f"at most {ctx.limits.max_prompt_chars} characters (this server's limit)")
        _check_lora_tags(job.prompt, ctx.limits)
        if job.batch_size > ctx.limits.max_batch_size or job.steps > ctx.limits.max_steps \
                or (job.width or 0) > ctx.limits.max_width or (job.height or 0) > ctx.limits.max_height:
            raise InvalidParameter(field, f"batch size {job.batch_size}, {job.steps} steps, {job.width}x{job.height}",
                                   "values within this server's limits (batch size, steps, width and height as for "
                                   "a request)")
    return params


def _checked_plot(params: GenerationParams, ctx: ConvertContext) -> GenerationParams:
    """An X/Y/Z plot planned before it queues (every cell's settings checked, every Checkpoint name
    and VAE value looked up), within the server's picture limit: cells x batch size x batch count."""
    if params.prompt_matrix is not None or params.prompts_from_file is not None:
        return _checked_prompt_script(params, ctx)
    if params.xyz_plot is None:
        return params
    from ...pipeline import xyz_plot

    most = max(1, ctx.limits.max_images // (params.batch_size * params.n_iter))  # cells, before any is made
    try:
        plot = xyz_plot.plan(params, plot_models(ctx), max_cells=most)
        cells = len(plot.cells)
    except xyz_plot.TooManyCells as exc:
        cells, plot = exc.cells, None
    except InvalidParameter as exc:
        raise _renamed(exc, SCRIPT_ARG_FIELDS) from None
    pictures = cells * params.batch_size * params.n_iter
    if plot is None or pictures > ctx.limits.max_images:
        raise InvalidParameter("script_args", f"{cells} cells", f"at most {ctx.limits.max_images} pictures in all "
                                                                f"(this server's limit; {cells} cells x batch size "
                                                                f"{params.batch_size} x batch count {params.n_iter} "
                                                                f"makes {pictures})")
    longest = max((max(len(c.params.prompt), len(c.params.negative_prompt)) for c in plot.cells), default=0)
    if longest > ctx.limits.max_prompt_chars:  # Prompt S/R may lengthen the prompts
        raise InvalidParameter("script_args", f"a cell's prompt of {longest} characters",
                               f"at most {ctx.limits.max_prompt_chars} characters (this server's limit)")
    return params


def plot_models(ctx: ConvertContext):
    """How this server looks up an X/Y/Z plot's "Checkpoint name" values (a title or name from
    /sdapi/v1/sd-models, as ``override_settings.sd_model_checkpoint``) and "VAE" values
    ("Automatic", "None" or a name from /sdapi/v1/sd-vae, as ``override_settings.sd_vae``). An
    unknown name is a 422 naming the axis's values (never a 404: the request is what is wrong)."""
    from ...errors import ModelNotFound
    from ...pipeline.xyz_plot import ModelNames

    def checkpoint(value: str, field: str) -> Path:
        try:
            return ctx.resolve_model(value, field=field)
        except ModelNotFound as exc:
            detail = exc.message.split(": ", 1)[-1].replace(" (see /sdapi/v1/sd-models)", "")
            raise InvalidParameter(field, value, f"a checkpoint title or name from /sdapi/v1/sd-models ({detail})"
                                   ) from None

    def vae(value: str, field: str) -> str:
        if ctx.vae_choice is None:
            if value in ("Automatic", "None"):
                return value
            raise InvalidParameter(field, value, "'Automatic' or 'None'")
        return ctx.vae_choice(value, field=field)

    return ModelNames(checkpoint=checkpoint, vae=vae)


def _loopback(args: list, n_iter: int, ctx: ConvertContext):
    """A1111's "Loopback" ``script_args``: [loops (4), final denoising strength (0.5), denoising strength
    curve ("Linear"; "Aggressive", "Lazy"), append interrogated prompt ("None"; "CLIP" or "DeepBooru": the
    server's Interrogate CLIP or DeepBooru with its /options settings)], within the server's picture limit: loops x batch count
    passes."""
    from ...params import LoopbackOptions

    args = list(args) + [None] * (4 - len(args))
    loops, final, curve, interrogate = args[:4]
    for i, value in ((0, loops), (1, final)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InvalidParameter(f"script_args[{i}]", value, "a number")
    if isinstance(loops, float) and loops.is_integer():
        loops = int(loops)  # a slider's 4.0
    try:
        options = LoopbackOptions(loops=4 if loops is None else loops, final_strength=0.5 if final is None else float(final),
                                  curve="Linear" if curve is None else curve,
                                  interrogate="None" if interrogate is None else interrogate)
    except InvalidParameter as exc:
        raise _renamed(exc, SCRIPT_ARG_FIELDS) from None
    if options.interrogate != "None":
        options = replace(options, interrogator=_interrogator(ctx, options.interrogate))
    passes = options.loops * n_iter
    if passes > ctx.limits.max_images:
        raise InvalidParameter("script_args[0]", options.loops, f"at most {ctx.limits.max_images} passes in all (this "
                                                                f"server's limit; {options.loops} loops x batch count "
                                                                f"{n_iter} makes {passes})")
    return options


_OUTPAINT_DIRECTIONS = ("left", "right", "up", "down")


def _outpaint(req: GenerationRequest, fields: dict[str, Any]):
    """A1111's "Poor man's outpainting" ``script_args``: [pixels to expand (128), mask blur (4), masked content
    (an index: 0 fill, 1 original, 2 latent noise, 3 latent nothing; or its name), outpainting directions
    (["left", "right", "up", "down"])], run as underpaint's outpainting (pipeline/inpaint.py): the canvas
    grows by the pixels (rounded up to whole 8-pixel cells) on each side named, A1111's fill paints the new
    margins, and they are inpainted with the masked content chosen, the seam feathered by twice the mask
    blur (A1111 doubles it too). A1111 works the canvas in tiles of Width x Height; underpaint paints it
    whole, at its own size."""
    from ...params import MASKED_CONTENT
    from ...pipeline.inpaint import OutpaintOptions

    if req.mask:
        raise InvalidParameter("mask", "<image>", "no mask with Poor man's outpainting (it makes its own)")
    args = list(req.script_args) + [None] * (4 - len(req.script_args))
    pixels, blur, content, directions = args[:4]
    pixels, blur = _whole(pixels, 0, 128, 8, 1024), _whole(blur, 1, 4, 0, 64)
    if content is None:
        content = 0
    if isinstance(content, int) and not isinstance(content, bool) and 0 <= content < len(MASKED_CONTENT):
        content = MASKED_CONTENT[content]
    if content not in MASKED_CONTENT:
        raise InvalidParameter("script_args[2]", content, "0 fill, 1 original, 2 latent noise or 3 latent nothing")
    directions = _directions(directions, 3)
    options = OutpaintOptions(**{side: pixels if side in directions else 0 for side in _OUTPAINT_DIRECTIONS},
                              fill="blur")
    inpaint = fields["inpaint"]
    fields["inpaint"] = replace(inpaint, masked_content=content, mask_blur_x=2 * blur, mask_blur_y=2 * blur,
                                full_res=False)
    fields["width"] = fields["height"] = None  # the canvas's own size
    return options


def _outpaint_mk2(req: GenerationRequest, fields: dict[str, Any]):
    """A1111's "Outpainting mk2" ``script_args``: [its description (ignored), pixels to expand (128), mask blur
    (8), outpainting directions, fall-off exponent (1.0), color variation (0.05)], run as underpaint's
    outpainting with the "matched" fill (pipeline/inpaint.py's matched_noise: the blur fill with noise of
    the picture's colour spread, its detail falling off as 1/f^exponent), the margins inpainted over their
    painted start (masked content "original"), the seam feathered by the mask blur. A1111 shapes its noise
    from the picture's own spectrum; the pictures are alike in kind, not in pixels."""
    from ...pipeline.inpaint import OutpaintOptions

    if req.mask:
        raise InvalidParameter("mask", "<image>", "no mask with Outpainting mk2 (it makes its own)")
    args = list(req.script_args) + [None] * (6 - len(req.script_args))
    _, pixels, blur, directions, falloff, variation = args[:6]
    pixels, blur = _whole(pixels, 1, 128, 8, 1024), _whole(blur, 2, 8, 0, 64)
    numbers = []
    for index, value, default, high in ((4, falloff, 1.0, 4.0), (5, variation, 0.05, 1.0)):
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= high:
            raise InvalidParameter(f"script_args[{index}]", value, f"a number from 0 to {high:g}")
        numbers.append(float(value))
    directions = _directions(directions, 3)
    options = OutpaintOptions(**{side: pixels if side in directions else 0 for side in _OUTPAINT_DIRECTIONS},
                              fill="matched", falloff=numbers[0], color_variation=numbers[1])
    fields["inpaint"] = replace(fields["inpaint"], masked_content="original", mask_blur_x=blur, mask_blur_y=blur,
                                full_res=False)
    fields["width"] = fields["height"] = None  # the canvas's own size
    return options


def _whole(value, index: int, default: int, low: int, high: int) -> int:
    """A script argument that is a whole number from ``low`` to ``high`` (``default`` when left out)."""
    value = default if value is None else value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidParameter(f"script_args[{index}]", value, f"a whole number from {low} to {high}")
    return value


def _directions(directions, index: int) -> list[str]:
    """Outpainting directions (all four when left out)."""
    directions = list(_OUTPAINT_DIRECTIONS) if directions is None else directions
    if not isinstance(directions, list) or not directions or any(d not in _OUTPAINT_DIRECTIONS for d in directions):
        raise InvalidParameter(f"script_args[{index}]", directions, "a list of directions among left, right, up and down")
    return directions


def _outpainted(params: GenerationParams, options, ctx: ConvertContext) -> GenerationParams:
    """The inpainting request that outpaints the picture, its canvas within the server's size limits."""
    from ...pipeline.inpaint import outpaint_params

    params = outpaint_params(params, options)
    canvas = params.init_images[0]
    limits = ctx.limits
    if canvas.width > limits.max_width or canvas.height > limits.max_height \
            or canvas.width * canvas.height > limits.max_image_pixels:
        raise InvalidParameter("script_args[0]", max(options.left, options.right, options.up, options.down),
                               f"fewer pixels: the canvas would be {canvas.width}x{canvas.height}, past this "
                               f"server's {limits.max_width}x{limits.max_height} and {limits.max_image_pixels} pixels")
    return params


def interrogator(model: str, folder, opts, device: str):
    """The reader of a picture "clip" (Interrogate CLIP) or "deepdanbooru" (Interrogate DeepBooru) names,
    its files found now in ``folder`` (none: :class:`ModelNotFound` naming ``model``), with the settings
    of ``opts`` (the server's options)."""
    from functools import partial

    if model == "deepdanbooru":
        from ...models import deepbooru as db

        return partial(db.deepbooru, path=db.tagger_file(folder), device=device,
                       threshold=opts.interrogate_deepbooru_score_threshold, sort_alpha=opts.deepbooru_sort_alpha,
                       use_spaces=opts.deepbooru_use_spaces, escape=opts.deepbooru_escape,
                       filter_tags=opts.deepbooru_filter_tags, ranks=opts.interrogate_return_ranks)
    from ...models import interrogate as it

    return partial(it.interrogate, files=it.interrogate_files(folder), device=device,
                   ranks=opts.interrogate_return_ranks, num_beams=opts.interrogate_clip_num_beams,
                   min_length=opts.interrogate_clip_min_length, max_length=opts.interrogate_clip_max_length,
                   dict_limit=opts.interrogate_clip_dict_limit)


def _interrogator(ctx: ConvertContext, kind: str):
    """Loopback's interrogation ``kind`` ("CLIP" or "DeepBooru") with the server's settings, its files found
    now (a 422 naming the argument when they are not there)."""
    from ...errors import ModelNotFound

    try:
        return interrogator("clip" if kind == "CLIP" else "deepdanbooru", ctx.models_folder(), ctx.options, ctx.device)
    except (ModelNotFound, TypeError) as exc:
        detail = exc.message if isinstance(exc, ModelNotFound) else "this server has no models folder"
        what = "Interrogate CLIP's files" if kind == "CLIP" else "DeepBooru's tagger"
        raise InvalidParameter("script_args[3]", kind, f"None, or a server with {what} ({detail})") from None


def _sd_upscale(args: list, picture, ctx: ConvertContext, tile_size: tuple[int, int], n_iter: int):
    """A1111's "SD upscale" ``script_args``: [info (ignored), tile overlap (64), upscaler (an index
    into /sdapi/v1/upscalers' list, or its name; "None"), scale factor (2)], the enlarged picture
    within the server's limits."""
    from ...params import SDUpscaleOptions
    from ...pipeline import upscale

    args = list(args) + [None] * (4 - len(args))
    overlap, chosen, scale = (64 if args[1] is None else args[1]), args[2], (2.0 if args[3] is None else args[3])
    folder = ctx.models_folder() if ctx.models_folder else None
    if chosen is None:
        chosen = "None"
    elif isinstance(chosen, int) and not isinstance(chosen, bool):
        names = upscale.names(folder)
        if not 0 <= chosen < len(names):
            raise InvalidParameter("script_args[2]", chosen, f"an upscaler's index, 0 to {len(names) - 1} "
                                                             "(/sdapi/v1/upscalers' order), or its name")
        chosen = names[chosen]
    elif not isinstance(chosen, str):
        raise InvalidParameter("script_args[2]", chosen, "an upscaler's name or its index in /sdapi/v1/upscalers")
    upscale.resolve(folder, chosen, "script_args[2]")
    for i, value in ((1, overlap), (3, scale)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidParameter(f"script_args[{i}]", value, "a number")
    try:
        options = SDUpscaleOptions(scale=float(scale), upscaler=chosen, overlap=int(overlap))
    except InvalidParameter as exc:
        raise InvalidParameter({"sd_upscale_scale": "script_args[3]", "sd_upscale_overlap": "script_args[1]"}.get(
            exc.field, "script_args[2]"), exc.value, exc.expected) from None
    tile = min(tile_size)
    if options.overlap >= tile:
        raise InvalidParameter("script_args[1]", overlap, f"a tile overlap below the tile size ({tile}: the "
                                                          "request's width and height)")
    limits = ctx.limits
    w, h = upscale.target_size(picture.width, picture.height, options.scale)
    if options.upscaler.lower() == "none":  # no enlargement: the picture as it is
        w, h = picture.width, picture.height
    if w > limits.max_width or h > limits.max_height or w * h > limits.max_image_pixels:
        raise InvalidParameter("script_args[3]", scale, f"an enlarged picture of at most {limits.max_width}x"
                                                        f"{limits.max_height} and {limits.max_image_pixels} pixels "
                                                        f"(this server's limits; this one gives {w}x{h})")
    if w >= 64 and h >= 64:  # smaller ones are refused by name when the job runs
        from ...pipeline.sd_upscale import tile_grid

        try:
            grid = tile_grid(w, h, *tile_size, options.overlap)
        except InvalidParameter as exc:  # an overlap too large for tiles cut to a small picture
            raise InvalidParameter("script_args[1]", overlap, exc.expected) from None
        tiles = len(grid.xs) * len(grid.ys) * n_iter
        if tiles > limits.max_sd_upscale_tiles:
            raise InvalidParameter("script_args[1]", overlap,
                                   f"settings that make at most {limits.max_sd_upscale_tiles} tiles in all (this "
                                   f"server's limit; {w}x{h} in {grid.tile_width}x{grid.tile_height} tiles "
                                   f"overlapping by {options.overlap} px, {n_iter} time(s), makes {tiles}): "
                                   "larger tiles (width, height) or a smaller overlap")
    return options


def _script_args(name: str, value: Any) -> list:
    args = value.get("args", []) if isinstance(value, Mapping) else value
    if not isinstance(args, list):
        raise InvalidParameter(f"alwayson_scripts.{name}.args", type(args).__name__, "a list")
    return args


#: A1111's own always-on scripts whose settings its API takes from the request's fields, not from their
#: args (it skips their setup for API requests: Seed, Sampler, Refiner), or that have none (Comments,
#: Hypertile): listed in clients' payloads, read and ignored as A1111 does.
_BUILTIN_SCRIPTS = ("seed", "sampler", "refiner", "comments", "hypertile")


def _check_alwayson(scripts: Mapping[str, Any]) -> None:
    """Always-on scripts understood here are ControlNet, Soft Inpainting, FreeU and ADetailer, and A1111's
    built-in ones its API ignores; others only if disabled."""
    from .control_units import controlnet_available, enabled_units

    for name, value in scripts.items():
        args = _script_args(name, value)
        if name.lower() == CONTROLNET_SCRIPT:
            on = enabled_units(args)
            if on and not controlnet_available():
                raise InvalidParameter(f"alwayson_scripts.{name}.args[{on[0]}]", "an enabled unit",
                                       "no enabled units (ControlNet is not available in this version)")
            continue
        if name.lower() in (SOFT_INPAINTING_SCRIPT, FREEU_SCRIPT, ADETAILER_SCRIPT, *_BUILTIN_SCRIPTS):
            continue
        # A disabled extension does nothing, so clients that always send e.g. {"args": [false]} still work.
        if args and not (args[0] is False or args[0] is None):
            raise UnknownName("alwayson_scripts", name, [CONTROLNET_SCRIPT, SOFT_INPAINTING_SCRIPT, FREEU_SCRIPT,
                                                         ADETAILER_SCRIPT])


def _refiner(req: GenerationRequest, ctx: ConvertContext, overrides: "_Overrides") -> RefinerOptions | None:
    """A1111's ``refiner_checkpoint`` (a listed checkpoint's title or name; "None" or empty: no refiner),
    ``refiner_switch_at`` (0.8 when not given) and its "Hires fix: which pass to enable refiner for"
    setting (``hires_fix_refiner_pass``)."""
    name = req.refiner_checkpoint
    if names_no_checkpoint(name):
        return None
    if not isinstance(name, str):
        raise InvalidParameter("refiner_checkpoint", name, "a checkpoint's title or name from /sdapi/v1/sd-models")
    path = ctx.resolve_model(name, field="refiner_checkpoint")
    switch_at = 0.8 if req.refiner_switch_at is None else req.refiner_switch_at
    return RefinerOptions(str(path), switch_at, overrides.hires_refiner_pass(ctx.options.hires_fix_refiner_pass))


#: ADetailer's settings → DetailerUnit's fields (the ``ad_use_*`` switches are read with their values).
_AD_FIELDS = {f"ad_{name}": name for name in (
    "model", "model_classes", "prompt", "negative_prompt", "confidence", "mask_filter_method", "mask_k",
    "mask_min_ratio", "mask_max_ratio", "x_offset", "y_offset", "dilate_erode", "mask_merge_invert", "mask_blur",
    "denoising_strength", "inpaint_only_masked", "inpaint_only_masked_padding", "restore_face", "controlnet_model",
    "controlnet_module", "controlnet_weight", "controlnet_guidance_start", "controlnet_guidance_end")}
#: Names ADetailer's older releases gave settings above (read when the current name is not given).
_AD_OLD_NAMES = {"ad_mask_k_largest": "ad_mask_k"}
#: The settings that hold whole numbers (a client's 4.0 is taken as 4, as ADetailer's own checks take it).
_AD_WHOLE = ("ad_mask_k", "ad_mask_k_largest", "ad_x_offset", "ad_y_offset", "ad_dilate_erode", "ad_mask_blur",
             "ad_inpaint_only_masked_padding", "ad_inpaint_width", "ad_inpaint_height", "ad_steps", "ad_clip_skip")
_AD_SWITCHED = {"ad_use_inpaint_width_height": ("ad_inpaint_width", "ad_inpaint_height"),
                "ad_use_steps": ("ad_steps",), "ad_use_cfg_scale": ("ad_cfg_scale",),
                "ad_use_sampler": ("ad_sampler", "ad_scheduler"), "ad_use_noise_multiplier": ("ad_noise_multiplier",),
                "ad_use_clip_skip": ("ad_clip_skip",), "ad_use_checkpoint": ("ad_checkpoint",),
                "ad_use_vae": ("ad_vae",)}
#: ADetailer settings read and ignored: they say nothing here.
_AD_IGNORED = ("is_api", "ad_tab_enable")


def _detailer(scripts: Mapping[str, Any], folder=None, resolve_checkpoint=None, vae_choice=None) -> tuple:
    """The ADetailer extension's ``args``: ``[enabled, skip img2img, {ad_* settings}, ...]`` (the two
    switches may be left out: its older clients send the tabs alone), a tab per object; a tab whose
    ``ad_model`` is "None" or with ``ad_tap_enable`` false is off. () when off. ``resolve_checkpoint(name,
    field=...)`` and ``vae_choice(name, field=...)`` find a tab's separate checkpoint and VAE among the
    listed ones (never a path)."""
    from ...params import DetailerUnit

    for name, value in scripts.items():
        if name.lower() != ADETAILER_SCRIPT:
            continue
        args, field = _script_args(name, value), f"alwayson_scripts.{name}.args"
        start = 0
        if args and isinstance(args[0], bool):
            if not args[0]:
                return ()
            start = 1
        if len(args) > start and isinstance(args[start], bool):
            if args[start]:
                raise InvalidParameter(f"{field}[{start}]", True, "false (ADetailer's \"skip img2img\" is not "
                                                                  "available)")
            start += 1
        units = []
        for index in range(start, len(args)):
            tab = args[index]
            if not isinstance(tab, Mapping):
                raise InvalidParameter(f"{field}[{index}]", tab, "an object of ADetailer settings (ad_model, ...)")
            unit = _detailer_unit(tab, f"{field}[{index}]", DetailerUnit, folder, resolve_checkpoint, vae_choice)
            if unit is not None:
                units.append(unit)
        return tuple(units)
    return ()


def _ad_settings(unit) -> dict[str, Any]:
    """A tab's ADetailer settings (the inverse of :func:`_detailer_unit`)."""
    tab = {key: getattr(unit, attr) for key, attr in _AD_FIELDS.items()}
    if unit.controlnet_model is not None:  # its name, not the server's path
        from ...pipeline.detailer import _model_name

        tab["ad_controlnet_model"] = _model_name(unit.controlnet_model)
    if unit.inpaint_width is not None and unit.inpaint_height is not None:
        tab.update(ad_use_inpaint_width_height=True, ad_inpaint_width=unit.inpaint_width,
                   ad_inpaint_height=unit.inpaint_height)
    for switch, attr in (("ad_use_steps", "steps"), ("ad_use_cfg_scale", "cfg_scale"), ("ad_use_sampler", "sampler"),
                         ("ad_use_noise_multiplier", "noise_multiplier"), ("ad_use_clip_skip", "clip_skip")):
        if getattr(unit, attr) is not None:
            tab.update({switch: True, f"ad_{attr}": getattr(unit, attr)})
    if unit.sampler is not None and unit.scheduler is not None:
        tab["ad_scheduler"] = unit.scheduler
    if unit.checkpoint is not None:  # its title, not the server's path
        tab.update(ad_use_checkpoint=True, ad_checkpoint=unit.checkpoint_title or Path(unit.checkpoint).stem)
    if unit.vae is not None:
        tab.update(ad_use_vae=True, ad_vae=unit.vae if unit.vae == "None" else Path(unit.vae).name)
    return tab


def _detailer_unit(tab: Mapping[str, Any], field: str, kind, folder=None, resolve_checkpoint=None, vae_choice=None):
    known = set(_AD_FIELDS) | set(_AD_SWITCHED) | {k for v in _AD_SWITCHED.values() for k in v} \
        | set(_AD_IGNORED) | set(_AD_OLD_NAMES) | {"ad_tap_enable"}
    tab = {key: int(value) if key in _AD_WHOLE and isinstance(value, float) and value.is_integer() else value
           for key, value in tab.items()}
    for old, new in _AD_OLD_NAMES.items():
        if tab.get(new) is None and tab.get(old) is not None:
            tab[new] = tab[old]
    for key in tab:
        if key not in known:
            raise UnknownName(f"{field}.{key}", key, sorted(known))
    if tab.get("ad_model", "None") in (None, "None") or tab.get("ad_tap_enable", tab.get("ad_tab_enable", True)) is False:
        return None
    fields = {target: tab[key] for key, target in _AD_FIELDS.items() if tab.get(key) is not None}
    if tab.get("ad_use_inpaint_width_height"):
        fields["inpaint_width"], fields["inpaint_height"] = tab.get("ad_inpaint_width", 512), tab.get("ad_inpaint_height", 512)
    if tab.get("ad_use_steps"):
        fields["steps"] = tab.get("ad_steps", 28)
    if tab.get("ad_use_cfg_scale"):
        fields["cfg_scale"] = tab.get("ad_cfg_scale", 7.0)
    if tab.get("ad_use_noise_multiplier"):
        fields["noise_multiplier"] = tab.get("ad_noise_multiplier", 1.0)
    if tab.get("ad_use_clip_skip"):
        fields["clip_skip"] = tab.get("ad_clip_skip", 1)
    checkpoint = tab.get("ad_checkpoint")
    if tab.get("ad_use_checkpoint") and checkpoint not in (None, "", "None", "Use same checkpoint"):
        if not isinstance(checkpoint, str):
            raise InvalidParameter(f"{field}.ad_checkpoint", checkpoint, "a checkpoint's title or name from "
                                                                         "/sdapi/v1/sd-models")
        fields["checkpoint"] = str(resolve_checkpoint(checkpoint, field=f"{field}.ad_checkpoint")) \
            if resolve_checkpoint is not None else checkpoint
    vae = tab.get("ad_vae")
    if tab.get("ad_use_vae") and vae not in (None, "", "Use same VAE", "Automatic"):
        if vae_choice is not None:
            vae = vae_choice(vae, field=f"{field}.ad_vae")
        elif not isinstance(vae, str):
            raise InvalidParameter(f"{field}.ad_vae", vae, "a VAE's name from /sdapi/v1/sd-vae, or None")
        fields["vae"] = vae
    if tab.get("ad_use_sampler") and tab.get("ad_sampler") != "Use same sampler":  # ADetailer's own choice
        fields["sampler"] = tab.get("ad_sampler", "DPM++ 2M Karras")
        scheduler = tab.get("ad_scheduler", "Use same scheduler")
        if scheduler not in (None, "Use same scheduler"):
            fields["scheduler"] = scheduler
    cn = fields.get("controlnet_model")
    if isinstance(cn, str) and cn not in ("", "None", "Passthrough"):  # a listed model, never a path
        from ...models.controlnet import list_controlnets
        from .control_units import resolve_model

        files = list_controlnets(folder.folders("controlnet")) if folder is not None else []
        fields["controlnet_model"] = str(resolve_model(cn, files, field=f"{field}.ad_controlnet_model"))
    try:
        unit = kind(**fields)
    except InvalidParameter as exc:
        raise InvalidParameter(f"{field}.{exc.field}", exc.value, exc.expected) from None
    from ...pipeline.detailer import check_unit

    check_unit(unit, field=f"{field}.ad_model", folder=folder)
    return unit


def _freeu(scripts: Mapping[str, Any]) -> FreeUOptions | None:
    """Forge's "FreeU Integrated" script: ``[enabled, b1, b2, s1, s2]``, the factors missing or null at
    Forge's defaults; None while it is off."""
    for name, value in scripts.items():
        if name.lower() != FREEU_SCRIPT:
            continue
        args = _script_args(name, value)
        if not args or not args[0]:
            return None
        factors = {}
        for index, key in enumerate(("b1", "b2", "s1", "s2"), start=1):
            given = args[index] if index < len(args) else None
            if given is None:
                continue
            if isinstance(given, bool) or not isinstance(given, (int, float)):
                raise InvalidParameter(f"alwayson_scripts.{name}.args[{index}]", given, f"a number ({key.upper()})")
            factors[key] = float(given)
        try:
            return FreeUOptions(**factors)
        except InvalidParameter as exc:
            index = ("freeu_b1", "freeu_b2", "freeu_s1", "freeu_s2").index(exc.field) + 1
            raise InvalidParameter(f"alwayson_scripts.{name}.args[{index}]", exc.value, exc.expected) from None
    return None


def _control_fields(req: GenerationRequest, ctx: ConvertContext, pictures: PictureBudget, *,
                    img2img: bool) -> dict[str, Any]:
    """``control_units`` for GenerationParams from the ControlNet script's args (images decoded here)."""
    from .control_units import control_units

    for name, value in req.alwayson_scripts.items():
        if name.lower() == CONTROLNET_SCRIPT:
            units = control_units(_script_args(name, value), prefix=f"alwayson_scripts.{name}.args",
                                  limits=ctx.limits, allow_urls=ctx.allow_image_urls, files=ctx.controlnet_files,
                                  needs_image=not img2img, pictures=pictures)
            return {"control_units": units} if units else {}
    return {}


def _common_fields(req: GenerationRequest, ctx: ConvertContext, pictures: PictureBudget, *,
                   img2img: bool) -> dict[str, Any]:
    limits = ctx.limits
    _check_limits(req, limits)
    if ctx.outputs is not None:  # a request may not point the server's writes elsewhere either
        ctx.outputs.refuse_changes(req.override_settings or {}, prefix="override_settings.")
    overrides = _Overrides(req.override_settings or {}, ctx)
    upscaler = overrides.upscaler(ctx.options.upscaler_for_img2img)  # checked for txt2img too (as /options)
    if overrides.values.get("samples_format") is not None:  # checked; A1111 encodes the answer with /options'
        samples_format_setting(overrides.values["samples_format"], "override_settings.samples_format")
    sampler = _sampler_name(req)
    if _script(req) in _PROMPT_SCRIPTS:  # the script styles each prompt it makes
        prompt, negative_prompt = req.prompt or "", req.negative_prompt or ""
    else:
        prompt, negative_prompt = _styled(req, ctx, req.prompt or "", req.negative_prompt or "")
        if (add := _hypernetwork_adder(req, overrides, ctx.options)) is not None:
            prompt = add(prompt)
        _check_lora_tags(prompt, limits)
    return {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "steps": req.steps,
        "cfg_scale": req.cfg_scale,
        "distilled_cfg_scale": req.distilled_cfg_scale,
        "sampler": sampler,
        "scheduler": req.scheduler or "Automatic",
        "seed": req.seed,
        "subseed": req.subseed,
        "subseed_strength": req.subseed_strength,
        "seed_resize_from_w": max(0, req.seed_resize_from_w),
        "seed_resize_from_h": max(0, req.seed_resize_from_h),
        "width": req.width,
        "height": req.height,
        "batch_size": req.batch_size,
        "n_iter": req.n_iter,
        "clip_skip": overrides.int("CLIP_stop_at_last_layers", ctx.options.clip_skip) or 1,  # 0 is 1 (A1111)
        "eta_noise_seed_delta": overrides.int("eta_noise_seed_delta", ctx.options.eta_noise_seed_delta),
        "rng": overrides.rng(ctx.options.rng),
        "fix_steps": overrides.bool("img2img_fix_steps", ctx.options.img2img_fix_steps) if img2img else False,
        "img2img_upscaler": upscaler if img2img else None,
        "token_merging_ratio": _token_merging_ratio(overrides, ctx.options, img2img=img2img),
        **_uncond_skip(req, overrides, ctx.options),
        "vae_encode_method": overrides.vae_method("sd_vae_encode_method", ctx.options.sd_vae_encode_method),
        "vae_decode_method": overrides.vae_method("sd_vae_decode_method", ctx.options.sd_vae_decode_method),
        "tiling": req.tiling if req.tiling is not None else overrides.bool("tiling", ctx.options.tiling),
        "img2img_color_correction": img2img and overrides.bool("img2img_color_correction",
                                                               ctx.options.img2img_color_correction),
        "extra_noise": overrides.float("img2img_extra_noise", ctx.options.img2img_extra_noise),
        **_face_restoration(req, overrides, ctx.options),
        "sdxl_crop_top": overrides.int("sdxl_crop_top", ctx.options.sdxl_crop_top),
        "sdxl_crop_left": overrides.int("sdxl_crop_left", ctx.options.sdxl_crop_left),
        "aesthetic_score": overrides.float("sdxl_refiner_high_aesthetic_score",
                                           ctx.options.sdxl_refiner_high_aesthetic_score),
        "negative_aesthetic_score": overrides.float("sdxl_refiner_low_aesthetic_score",
                                                    ctx.options.sdxl_refiner_low_aesthetic_score),
        "extra_networks": not req.disable_extra_networks,
        "prompt_comments": overrides.bool("enable_prompt_comments", ctx.options.enable_prompt_comments),
        "freeu": _freeu(req.alwayson_scripts),
        "detailer": _detailer(req.alwayson_scripts, ctx.models_folder() if ctx.models_folder else None,
                              ctx.resolve_model, ctx.vae_choice),
        "refiner": _refiner(req, ctx, overrides),
        "sampler_options": _sampler_options(req, overrides, sampler, ctx.options),
        "sgm_noise_multiplier": overrides.bool("sgm_noise_multiplier", ctx.options.sgm_noise_multiplier),
        "deepcache": _deepcache(overrides),
        "first_block_cache": _first_block_cache(overrides),
        "_model": overrides.model(),
        "_vae": overrides.vae(),
        **_control_fields(req, ctx, pictures, img2img=img2img),
    }


def _face_restoration(req: GenerationRequest, overrides: "_Overrides", options: ServerOptions) -> dict[str, Any]:
    """``restore_faces`` (else the ``face_restoration`` setting), the restorer and CodeFormer's weight
    (their settings, overridden per request)."""
    model = overrides.values.get("face_restoration_model")
    restorer = options.face_restoration_model if model is None else \
        restorer_name(model, "override_settings.face_restoration_model")
    restore = req.restore_faces if req.restore_faces is not None else \
        overrides.bool("face_restoration", options.face_restoration)
    return {"restore_faces": restore, "face_restoration_model": restorer,
            "code_former_weight": overrides.float("code_former_weight", options.code_former_weight)}


def _uncond_skip(req: GenerationRequest, overrides: "_Overrides", options: ServerOptions) -> dict[str, Any]:
    """A1111's NGMS and Skip Early CFG (pipeline/guidance.py): ``s_min_uncond`` from the request, else its
    override, else the setting; ``s_min_uncond_all`` and ``skip_early_cond`` from their overrides, else
    the settings. Checked by name here so the 422 says where the value came from."""
    if req.s_min_uncond is not None:
        s_min_uncond = req.s_min_uncond
        if not 0 <= s_min_uncond <= MAX_S_MIN_UNCOND:
            raise InvalidParameter("s_min_uncond", s_min_uncond, f"a number from 0 (off) to {MAX_S_MIN_UNCOND:g}")
    else:
        s_min_uncond = overrides.float("s_min_uncond", options.s_min_uncond)
        if not 0 <= s_min_uncond <= MAX_S_MIN_UNCOND:
            raise overrides._bad("s_min_uncond", f"a number from 0 (off) to {MAX_S_MIN_UNCOND:g}")
    skip_early_cond = overrides.float("skip_early_cond", options.skip_early_cond)
    if not 0 <= skip_early_cond <= 1:
        raise overrides._bad("skip_early_cond", "a number from 0 (off) to 1")
    return {"s_min_uncond": s_min_uncond, "skip_early_cond": skip_early_cond,
            "s_min_uncond_all": overrides.bool("s_min_uncond_all", options.s_min_uncond_all)}


def _token_merging_ratio(overrides: "_Overrides", options: ServerOptions, *, img2img: bool) -> float:
    """The first pass's token merging ratio, as A1111 1.10 picks it: ``token_merging_ratio`` (the
    request's override, else the setting); for img2img and inpainting a non-zero override of it
    first, then ``token_merging_ratio_img2img`` when not 0, then ``token_merging_ratio``. (A1111
    tests the override by its value: an override of 0 lets a non-zero img2img setting apply.)
    Every ratio the overrides give is checked, used or not."""
    base = overrides.ratio("token_merging_ratio", options.token_merging_ratio)
    own = overrides.ratio("token_merging_ratio_img2img", options.token_merging_ratio_img2img)
    overrides.ratio("token_merging_ratio_hr", options.token_merging_ratio_hr)
    if not img2img or (overrides.has("token_merging_ratio") and base):
        return base
    return own or base


def _styled(req: GenerationRequest, ctx: ConvertContext, prompt: str, negative_prompt: str) -> tuple[str, str]:
    """The prompts with the request's ``styles`` applied in order (A1111's rules, prompts/styles.py)."""
    if not req.styles:
        return prompt, negative_prompt
    if ctx.styles is None:
        raise InvalidParameter("styles", req.styles[0], "no styles (this server has no styles file)")
    return ctx.styles().apply(req.styles, prompt, negative_prompt, field="styles",
                              max_chars=ctx.limits.max_prompt_chars)


def _styled_hires_prompts(req: Txt2ImgRequest, ctx: ConvertContext) -> dict[str, str]:
    """``hr_prompt``/``hr_negative_prompt`` styled (and given the setting's hypernetwork tag, as the prompt is)
    when given; empty ones stay empty (they follow the main prompts)."""
    prompt, negative_prompt = req.hr_prompt or "", req.hr_negative_prompt or ""
    styled_prompt, styled_negative = _styled(req, ctx, prompt, negative_prompt)
    if prompt and (add := _hypernetwork_adder(req, _Overrides(req.override_settings or {}, ctx), ctx.options)):
        styled_prompt = add(styled_prompt)
    return {"prompt": styled_prompt if prompt else "", "negative_prompt": styled_negative if negative_prompt else ""}


def _check_limits(req: GenerationRequest, limits: Limits) -> None:
    """The server's limits, each named in the error so a client knows what to change."""
    checks = (
        ("steps", req.steps, limits.max_steps),
        ("width", req.width, limits.max_width),
        ("height", req.height, limits.max_height),
        ("batch_size", req.batch_size, limits.max_batch_size),
    )
    for name, value, most in checks:
        if value > most:
            raise InvalidParameter(name, value, f"at most {most} (this server's limit)")
    for name in ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt"):
        text = getattr(req, name, None) or ""
        if len(text) > limits.max_prompt_chars:
            raise InvalidParameter(name, f"{len(text)} characters",
                                   f"at most {limits.max_prompt_chars} characters (this server's limit)")
    if req.styles and len(req.styles) > limits.max_styles:
        raise InvalidParameter("styles", f"{len(req.styles)} names", f"at most {limits.max_styles} (this server's limit)")
    if req.width * req.height > limits.max_image_pixels:
        raise InvalidParameter("width", f"{req.width}x{req.height}", f"at most {limits.max_image_pixels} pixels in all")
    if req.batch_size > 0 and req.n_iter > 0 and req.batch_size * req.n_iter > limits.max_images:
        raise InvalidParameter("n_iter", req.n_iter, f"batch_size x n_iter at most {limits.max_images} (this server's limit)")


def _check_lora_tags(prompt: str, limits: Limits) -> None:
    """At most ``max_lora_tags`` LoRA and hypernetwork tags in the (styled) prompt (each LoRA is merged
    into the weights, each hypernetwork runs in every attention layer of its widths) and at most
    ``max_prompt_parts`` AND parts."""
    from ...prompts.parser import extract_extra_networks, split_and

    count = sum(tag.is_lora or tag.kind == "hypernet" for tag in extract_extra_networks(prompt)[1])
    if count > limits.max_lora_tags:
        raise InvalidParameter("prompt", f"{count} <lora:...>/<hypernet:...> tags",
                               f"at most {limits.max_lora_tags} (this server's limit)")
    parts = len(split_and(prompt))
    if parts > limits.max_prompt_parts:
        raise InvalidParameter("prompt", f"{parts} AND parts", f"at most {limits.max_prompt_parts} (this server's "
                                                               f"limit: each part is one more UNet input per step)")


def _sampler_name(req: GenerationRequest) -> str:
    """``sampler_name or sampler_index`` (A1111); an integer index picks from /samplers' list."""
    from ...sampling.names import SAMPLERS

    if req.sampler_name:
        return req.sampler_name
    index = req.sampler_index
    if isinstance(index, int):
        if not 0 <= index < len(SAMPLERS):
            raise InvalidParameter("sampler_index", index, f"an index from 0 to {len(SAMPLERS) - 1}, or a sampler name")
        return SAMPLERS[index].label
    return index or "Euler"


#: ``override_settings`` keys of underpaint's own for DeepCache (SD/SDXL UNets), for one job.
DEEPCACHE_SETTINGS = (("deepcache_interval", "interval"), ("deepcache_branch", "branch"),
                      ("deepcache_start", "start"), ("deepcache_end", "end"))


def _deepcache(overrides: "_Overrides") -> DeepCacheOptions | None:
    """DeepCache from ``override_settings``: on with a ``deepcache_interval`` of 2 or more."""
    interval = overrides.int("deepcache_interval", 1)
    given = {name: overrides.int(key, 0) for key, name in DEEPCACHE_SETTINGS[1:] if overrides.has(key)}
    if interval <= 1:
        if interval < 0:
            raise overrides._bad("deepcache_interval", "an interval of 2 or more (0 or 1: off)")
        if given:
            key = next(key for key, name in DEEPCACHE_SETTINGS if name in given)
            raise overrides._bad(key, "used with a deepcache_interval of 2 or more")
        return None
    try:
        return DeepCacheOptions(interval=interval, **given)
    except InvalidParameter as exc:
        raise InvalidParameter(f"override_settings.{exc.field}", exc.value, exc.expected) from None


def _first_block_cache(overrides: "_Overrides") -> float:
    """First Block Cache (FLUX) from ``override_settings``: ``first_block_cache_threshold``, 0 (off) to 1."""
    value = overrides.float("first_block_cache_threshold", 0.0)
    if not 0 <= value <= 1:
        raise overrides._bad("first_block_cache_threshold", "a number from 0 (off) to 1")
    return value


def _timestep_sampler(name: str) -> bool:
    """DDIM, DDIM CFG++, PLMS, UniPC: the samplers whose eta is A1111's "Eta for DDIM" setting."""
    from ...sampling.names import sampler_info

    try:
        return "timestep" in sampler_info(name).flags
    except UnknownName:  # refused where the sampler is read
        return False


def _sampler_options(req: GenerationRequest, overrides: "_Overrides", sampler: str,
                     options: ServerOptions) -> SamplerOptions:
    eta = req.eta
    if eta is None:  # the setting only where it is not A1111's default (the sampler's own eta then)
        key = "eta_ddim" if _timestep_sampler(sampler) else "eta_ancestral"
        setting = getattr(options, key)
        eta = overrides.float(key, None if setting == getattr(ServerOptions, key) else setting)
    values = {
        "eta": eta,
        "s_churn": _first(req.s_churn, overrides.float("s_churn", options.s_churn)),
        "s_tmin": _first(req.s_tmin, overrides.float("s_tmin", options.s_tmin)),
        "s_tmax": _first(req.s_tmax, overrides.float("s_tmax", options.s_tmax)) or math.inf,  # A1111: 0 means no bound
        "s_noise": _first(req.s_noise, overrides.float("s_noise", options.s_noise)),
    }
    for name, value in values.items():
        if value is not None and value < 0:
            raise InvalidParameter(name, value, "a number of 0 or more")
    extra: dict[str, Any] = {}
    for key, name in (("sigma_min", "sigma_min"), ("sigma_max", "sigma_max"), ("rho", "rho")):
        value = overrides.float(key, getattr(options, key))
        if value:
            if value < 0:
                raise InvalidParameter(f"override_settings.{key}", value, "a number of 0 or more")
            extra[name] = value
    if overrides.has("always_discard_next_to_last_sigma") or options.always_discard_next_to_last_sigma:
        extra["discard_penultimate_sigma"] = overrides.bool("always_discard_next_to_last_sigma",
                                                            options.always_discard_next_to_last_sigma)
    extra["unipc_order"] = overrides.int("uni_pc_order", options.uni_pc_order)
    extra["beta_alpha"] = overrides.float("beta_dist_alpha", options.beta_dist_alpha)
    extra["beta_beta"] = overrides.float("beta_dist_beta", options.beta_dist_beta)
    try:
        return SamplerOptions(**values, **extra)
    except InvalidParameter as exc:  # the settings checked there, by their A1111 names
        setting = {"unipc_order": "uni_pc_order", "beta_alpha": "beta_dist_alpha", "beta_beta": "beta_dist_beta"}
        raise InvalidParameter(f"override_settings.{setting.get(exc.field, exc.field)}", exc.value,
                               exc.expected) from None


def _first(*values):
    for value in values:
        if value is not None:
            return value
    return None


def _inpaint_options(req: Img2ImgRequest, overrides: "_Overrides") -> InpaintOptions:
    """A1111's inpaint fields; "Conditional mask weight" is its setting ``inpainting_mask_weight``
    (default 1), which a request changes through ``override_settings``."""
    blur_x = req.mask_blur if req.mask_blur is not None else req.mask_blur_x
    blur_y = req.mask_blur if req.mask_blur is not None else req.mask_blur_y
    if not 0 <= req.inpainting_fill < len(MASKED_CONTENT):
        raise InvalidParameter("inpainting_fill", req.inpainting_fill,
                               "0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing)")
    if req.inpainting_mask_invert not in (0, 1):
        raise InvalidParameter("inpainting_mask_invert", req.inpainting_mask_invert, "0 (inpaint masked) or 1 (inpaint not masked)")
    try:
        return InpaintOptions(
            mask_blur_x=blur_x, mask_blur_y=blur_y, masked_content=MASKED_CONTENT[req.inpainting_fill],
            full_res=req.inpaint_full_res, full_res_padding=req.inpaint_full_res_padding,
            invert=bool(req.inpainting_mask_invert), mask_round=req.mask_round, soft=_soft_inpainting(req.alwayson_scripts),
            mask_weight=overrides.float("inpainting_mask_weight", 1.0),
        )
    except InvalidParameter as exc:
        if req.mask_blur is not None and exc.field in ("mask_blur_x", "mask_blur_y"):
            raise InvalidParameter("mask_blur", exc.value, exc.expected) from None
        raise _renamed(exc) from None


#: A1111 1.10's Soft Inpainting arguments after the on/off switch, with its defaults. underpaint's
#: soft inpainting has none of these settings: it works as A1111's does at its defaults.
SOFT_INPAINTING_SETTINGS = (("schedule bias", 1.0), ("preservation strength", 0.5), ("transition contrast boost", 4.0),
                            ("mask influence", 0.0), ("difference threshold", 0.5), ("difference contrast", 2.0))


def _soft_inpainting(scripts: Mapping[str, Any]) -> bool:
    """A1111 1.10's built-in "Soft Inpainting" script: a true first argument turns it on (A1111
    tests it for truth); a setting after it other than its default is refused by name, since
    underpaint would silently paint with the default."""
    for name, value in scripts.items():
        if name.lower() != SOFT_INPAINTING_SCRIPT:
            continue
        args = _script_args(name, value)
        if not args or not args[0]:
            return False
        for index, ((label, default), given) in enumerate(zip(SOFT_INPAINTING_SETTINGS, args[1:]), start=1):
            if given is None:
                continue
            if isinstance(given, bool) or not isinstance(given, (int, float)) or not math.isclose(given, default):
                raise InvalidParameter(f"alwayson_scripts.{name}.args[{index}]", given,
                                       f"{default:g} (the {label} default; other soft inpainting settings "
                                       "are not available)")
        return True
    return False


class _Overrides:
    """``override_settings``: the A1111 settings that change generation are read, others ignored (as A1111)."""

    def __init__(self, values: Mapping[str, Any], ctx: ConvertContext):
        self.values = values
        self.ctx = ctx

    def has(self, key: str) -> bool:
        return self.values.get(key) is not None

    def _bad(self, key: str, expected: str) -> InvalidParameter:
        return InvalidParameter(f"override_settings.{key}", self.values[key], expected)

    def int(self, key: str, default: int) -> int:
        value = self.values.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise self._bad(key, "an integer")
        try:
            number = float(value)
        except ValueError:
            raise self._bad(key, "an integer") from None
        if not number.is_integer():
            raise self._bad(key, "an integer")
        return int(number)

    def float(self, key: str, default: float | None) -> float | None:
        value = self.values.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise self._bad(key, "a number")
        try:
            number = float(value)
        except ValueError:
            raise self._bad(key, "a number") from None
        if not math.isfinite(number):
            raise self._bad(key, "a finite number")
        return number

    def ratio(self, key: str, default: float) -> float:
        """A token merging ratio: a number from 0 to 0.9."""
        value = self.float(key, None)
        if value is None:
            return default
        if not 0 <= value <= MAX_TOKEN_MERGING_RATIO:
            raise self._bad(key, f"a number from 0 to {MAX_TOKEN_MERGING_RATIO}")
        return value

    def bool(self, key: str, default: bool) -> bool:
        value = self.values.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._bad(key, "true or false")
        return value

    def vae_method(self, key: str, default: str) -> str:
        """A1111's "VAE type for encode/decode": Full or TAESD."""
        value = self.values.get(key)
        if value is None:
            return default
        try:
            return vae_method_name(value, f"override_settings.{key}")
        except InvalidParameter:
            raise self._bad(key, "Full or TAESD") from None

    def rng(self, default: str) -> str:
        value = self.values.get("randn_source")
        if value is None:
            return default
        found = RNG_NAMES.get(str(value).lower())
        if found is None:
            raise self._bad("randn_source", "GPU, CPU or NV")
        return found

    def vae(self) -> str | None:
        """``sd_vae`` for this job, as the server keeps it ("Automatic", "None" or a listed VAE's
        model_name); None when not overridden (absent, null or empty)."""
        value = self.values.get("sd_vae")
        if value is None or value == "":
            return None
        field = "override_settings.sd_vae"
        if self.ctx.vae_choice is None:
            if value in ("Automatic", "None"):
                return value
            raise self._bad("sd_vae", "'Automatic' or 'None'")
        return self.ctx.vae_choice(value, field=field)

    def hires_refiner_pass(self, default: str) -> str:
        """A1111's "Hires fix: which pass to enable refiner for" for this job, else ``default``."""
        value = self.values.get("hires_fix_refiner_pass")
        return default if value is None else hires_refiner_pass(value, "override_settings.hires_fix_refiner_pass")

    def upscaler(self, default: str) -> str:
        """``upscaler_for_img2img`` for this job (:func:`img2img_upscaler_setting`), else ``default``."""
        value = self.values.get("upscaler_for_img2img")
        if value is None:
            return default
        return img2img_upscaler_setting(value, self.ctx.models_folder() if self.ctx.models_folder else None,
                                        "override_settings.upscaler_for_img2img")

    def hypernetwork(self, default: str) -> str:
        """``sd_hypernetwork`` for this job (:func:`hypernetwork_setting`), else ``default``."""
        if self.values.get("sd_hypernetwork") is None:
            return default
        return hypernetwork_setting(self.values["sd_hypernetwork"],
                                    self.ctx.models_folder() if self.ctx.models_folder else None,
                                    "override_settings.sd_hypernetwork")

    def model(self) -> Path | None:
        value = self.values.get("sd_model_checkpoint")
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise self._bad("sd_model_checkpoint", "a checkpoint title from /sdapi/v1/sd-models")
        return self.ctx.resolve_model(value)


def img2img_upscaler_setting(value: Any, folder, field: str = "upscaler_for_img2img") -> str:
    """A1111's "Upscaler for img2img" setting: "None" (or empty: A1111 keeps None), a built-in
    upscaler's name or an upscaling model's name as /sdapi/v1/upscalers lists it, in its listed
    spelling; else a 422 naming ``field`` with the names there are."""
    from ...pipeline import upscale

    if value in (None, ""):
        return "None"
    if not isinstance(value, str):
        raise InvalidParameter(field, value, "an upscaler's name from /sdapi/v1/upscalers, or None")
    found = upscale.resolve(folder, value, field)
    return found if isinstance(found, str) else found.name


def _quality(value: int) -> int:
    if not 1 <= value <= 100:
        raise InvalidParameter("override_settings.jpeg_quality", value, "an integer from 1 to 100")
    return value


#: A1111's "File format for images" values an API answer can be encoded in.
SAMPLES_FORMATS = ("png", "jpg", "jpeg", "webp")


def samples_format_setting(value: Any, field: str = "samples_format") -> str:
    """A1111's "File format for images" (png, jpg, jpeg, webp; any case), in lower case."""
    if not isinstance(value, str) or value.strip().lower() not in SAMPLES_FORMATS:
        raise InvalidParameter(field, value, "one of " + ", ".join(SAMPLES_FORMATS))
    return value.strip().lower()


def hypernetwork_setting(value: Any, folder, field: str = "sd_hypernetwork") -> str:
    """A1111's "Add hypernetwork to prompt" setting: "None" (or empty) or a hypernetwork's name as
    /sdapi/v1/hypernetworks lists it; else a 422 naming ``field`` with the names there are."""
    from ...models.hypernetwork import list_hypernetworks

    if value in (None, "", "None"):
        return "None"
    entries = list_hypernetworks(folder.folders("hypernetworks")) if folder is not None else []
    if isinstance(value, str) and any(entry.name == value for entry in entries):
        return value
    names = ", ".join(repr(entry.name) for entry in entries[:20]) or "none in the models folder's hypernetworks/"
    raise InvalidParameter(field, value, f"'None' or a name from /sdapi/v1/hypernetworks ({names})")


def _hypernetwork_adder(req: GenerationRequest, overrides: "_Overrides", options: ServerOptions):
    """``prompt -> prompt`` adding the "Add hypernetwork to prompt" setting's tag (its override, else the
    server's), None when it is "None" or the request disables extra networks (A1111 then adds nothing)."""
    from functools import partial

    from ...models.hypernetwork import with_hypernetwork_tag

    name = overrides.hypernetwork(options.sd_hypernetwork)
    if name == "None" or req.disable_extra_networks:
        return None
    strength = overrides.float("extra_networks_default_multiplier", options.extra_networks_default_multiplier)
    return partial(with_hypernetwork_tag, name=name, strength=strength)


# --------------------------------------------------------------------------- infotext

# Infotext keys (as A1111's reader splits them) → request fields, with their types.
_INFOTEXT_FIELDS: tuple[tuple[str, str, type], ...] = (
    ("Steps", "steps", int), ("Sampler", "sampler_name", str), ("Schedule type", "scheduler", str),
    ("CFG scale", "cfg_scale", float), ("Distilled CFG Scale", "distilled_cfg_scale", float),
    ("Image CFG scale", "image_cfg_scale", float), ("Seed", "seed", int),
    ("Size-1", "width", int), ("Size-2", "height", int),
    ("Batch size", "batch_size", int), ("Variation seed", "subseed", int),
    ("Variation seed strength", "subseed_strength", float), ("Seed resize from-1", "seed_resize_from_w", int),
    ("Seed resize from-2", "seed_resize_from_h", int), ("Denoising strength", "denoising_strength", float),
    ("Eta", "eta", float), ("Mask blur", "mask_blur", int),
    ("Hires upscale", "hr_scale", float), ("Hires upscaler", "hr_upscaler", str),
    ("Hires resize-1", "hr_resize_x", int), ("Hires resize-2", "hr_resize_y", int),
    ("Hires steps", "hr_second_pass_steps", int), ("Hires sampler", "hr_sampler_name", str),
    ("Hires schedule type", "hr_scheduler", str), ("Hires prompt", "hr_prompt", str),
    ("Hires negative prompt", "hr_negative_prompt", str), ("Hires checkpoint", "hr_checkpoint_name", str),
    ("Tiling", "tiling", bool), ("Refiner", "refiner_checkpoint", str), ("Refiner switch at", "refiner_switch_at", float),
)
# Infotext keys that A1111 turns into override_settings.
_INFOTEXT_SETTINGS: tuple[tuple[str, str, type], ...] = (
    ("Clip skip", "CLIP_stop_at_last_layers", int), ("ENSD", "eta_noise_seed_delta", int), ("RNG", "randn_source", str),
    ("Token merging ratio", "token_merging_ratio", float), ("Token merging ratio hr", "token_merging_ratio_hr", float),
    ("DeepCache interval", "deepcache_interval", int), ("DeepCache branch", "deepcache_branch", int),
    ("DeepCache start", "deepcache_start", int), ("DeepCache end", "deepcache_end", int),
    ("First block cache", "first_block_cache_threshold", float),
    ("NGMS", "s_min_uncond", float), ("NGMS all steps", "s_min_uncond_all", bool),
    ("Skip Early CFG", "skip_early_cond", float),
    ("VAE Encoder", "sd_vae_encode_method", str), ("VAE Decoder", "sd_vae_decode_method", str),
    ("Noise multiplier", "initial_noise_multiplier", float), ("Extra noise", "img2img_extra_noise", float),
    ("Hires refiner", "hires_fix_refiner_pass", str), ("UniPC order", "uni_pc_order", int),
    ("Beta schedule alpha", "beta_dist_alpha", float), ("Beta schedule beta", "beta_dist_beta", float),
    ("SGM noise multiplier", "sgm_noise_multiplier", bool))


def apply_infotext(req: GenerationRequest) -> GenerationRequest:
    """A1111 1.10's ``infotext`` field: its values fill in every field the request did not set."""
    if not req.infotext:
        return req
    from ...imageio.infotext import parse_infotext

    parsed = parse_infotext(req.infotext)
    given = req.model_fields_set
    updates: dict[str, Any] = {}
    if "prompt" not in given:
        updates["prompt"] = parsed.prompt
    if "negative_prompt" not in given:
        updates["negative_prompt"] = parsed.negative_prompt
    for key, name, kind in _INFOTEXT_FIELDS:
        if key in parsed.params and name not in given and name in type(req).model_fields:
            updates[name] = _typed(parsed.params[key], kind, key)
    if "enable_hr" in type(req).model_fields and "enable_hr" not in given:
        # A1111's paste rule: a "Denoising strength" and a hires size or upscaler in the text.
        updates["enable_hr"] = "Denoising strength" in parsed.params and any(
            key in parsed.params for key in ("Hires upscale", "Hires upscaler", "Hires resize-1"))
    overrides = dict(req.override_settings or {})
    if "Face restoration" in parsed.params and "restore_faces" not in given:
        updates["restore_faces"] = True
        if parsed.params["Face restoration"].lower() in ("codeformer", "gfpgan"):
            overrides.setdefault("face_restoration_model", parsed.params["Face restoration"])
    for key, setting, kind in _INFOTEXT_SETTINGS:
        if key in parsed.params and setting not in overrides:
            overrides[setting] = _typed(parsed.params[key], kind, key)
    updates["override_settings"] = overrides
    scripts = dict(req.alwayson_scripts)
    if not any(name.lower() == FREEU_SCRIPT for name in scripts):
        from ...models.freeu import INFOTEXT_KEYS, options_from_infotext

        freeu = options_from_infotext(parsed.params)
        if freeu is not None:  # Forge's keys, as its paste fills in the script's controls
            scripts["FreeU Integrated"] = {"args": [True, *(getattr(freeu, name) for _, name in INFOTEXT_KEYS)]}
            updates["alwayson_scripts"] = scripts
    if not any(name.lower() == ADETAILER_SCRIPT for name in scripts):
        from ...pipeline.detailer import units_from_infotext

        units = units_from_infotext(parsed.params)  # ADetailer's keys, as its paste fills in its tabs
        if units:
            scripts["ADetailer"] = {"args": [True, False, *(_ad_settings(unit) for unit in units)]}
            updates["alwayson_scripts"] = scripts
    try:
        return type(req).model_validate({**req.model_dump(), **updates})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidParameter("infotext", first.get("input"), f"values a request accepts ({first.get('msg')})") from None


def _typed(text: str, kind: type, key: str):
    try:
        if kind is int:
            number = float(text)
            if not number.is_integer():
                raise ValueError(text)
            return int(number)
        if kind is bool:
            if text not in ("True", "False"):
                raise ValueError(text)
            return text == "True"
        return kind(text)
    except ValueError:
        expected = {str: "text", bool: "True or False"}.get(kind, "a number")
        raise InvalidParameter(f"infotext.{key}", text, expected) from None


# --------------------------------------------------------------------------- result → response

_TOP_LEVEL_KEYS = frozenset({
    "Steps", "Sampler", "CFG scale", "Seed", "Size-1", "Size-2", "Model hash", "Model", "VAE hash", "VAE",
    "Variation seed", "Variation seed strength", "Seed resize from-1", "Seed resize from-2", "Denoising strength",
    "Clip skip", "Version", "Face restoration", "Tiling",
})


def extra_generation_params(infotext: str | None, *, keep: frozenset[str] = frozenset()) -> dict[str, str]:
    """What the infotext holds beyond A1111's own top-level keys (Schedule type, Mask blur, ...);
    ``keep``: top-level keys that are extra parameters here (a hires. fix's Denoising strength)."""
    if not infotext:
        return {}
    from ...imageio.infotext import parse_infotext

    top = _TOP_LEVEL_KEYS - keep
    return {k: v for k, v in parse_infotext(infotext).params.items() if k not in top}


def info_json(job: PreparedJob, result, *, job_timestamp: str, save_error: str | None = None,
              grid_infotext: str | None = None) -> str:
    """The ``info`` string of A1111's response: ``Processed.js()``'s keys, as JSON text; with
    ``save_error`` when ``save_images`` could not write every picture (not an A1111 key). With a batch's
    grid first among the images (``grid_infotext``), its infotext comes first and the pictures' index is 1."""
    from ...pipeline.infotext import VERSION

    p = result.params
    width, height = result.images[0].size if result.images else (p.width or 512, p.height or 512)
    if p.hires is not None:  # A1111 reports the first pass's size (p.width, p.height)
        width, height = p.width or width, p.height or height
    prompts = list(result.prompts) or [p.prompt]
    negatives = list(result.negative_prompts) or [p.negative_prompt]
    seeds = list(result.seeds) or [p.seed]
    subseeds = list(result.subseeds) or [p.subseed]
    model = result.model
    info = {
        "prompt": prompts[0],
        "all_prompts": prompts,
        "negative_prompt": negatives[0],
        "all_negative_prompts": negatives,
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": subseeds[0],
        "all_subseeds": subseeds,
        "subseed_strength": p.subseed_strength,
        "width": width,
        "height": height,
        "sampler_name": p.sampler,
        "cfg_scale": p.cfg_scale,
        "steps": p.steps,
        "batch_size": p.batch_size,
        "restore_faces": p.restore_faces,
        "face_restoration_model": p.face_restoration_model if p.restore_faces else None,
        "sd_model_name": model.name if model else None,
        "sd_model_hash": model.short_hash if model else None,
        "sd_vae_name": model.vae_name if model else None,
        "sd_vae_hash": model.vae_hash if model else None,
        "seed_resize_from_w": p.seed_resize_from_w or -1,
        "seed_resize_from_h": p.seed_resize_from_h or -1,
        "denoising_strength": p.strength if job.kind == "img2img" else job.denoising_strength,
        "extra_generation_params": extra_generation_params(
            result.infotexts[0] if result.infotexts else None,
            keep=frozenset({"Denoising strength"}) if p.hires is not None else frozenset()),
        "index_of_first_image": 0 if grid_infotext is None else 1,
        "infotexts": ([] if grid_infotext is None else [grid_infotext]) + list(result.infotexts),
        "styles": list(job.styles),
        "job_timestamp": job_timestamp,
        "clip_skip": p.clip_skip,
        "is_using_inpainting_conditioning": bool(model and "inpaint" in (model.family or "")),
        "version": VERSION,
    }
    if save_error is not None:
        info["save_error"] = save_error
    return json.dumps(info, default=lambda _: None, ensure_ascii=False)
