"""A1111's settings and model routes: /options, /cmd-flags, /sd-models, /sd-vae, refresh, unload and reload.

Switching, unloading and reloading a checkpoint are jobs on the queue like generations, so
they wait their turn instead of pulling the model out from under a running job. A VAE chosen
with ``sd_vae`` is loaded by the next job that needs the engine, on the same queue.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Body, Request
from starlette.concurrency import run_in_threadpool

from ...errors import InvalidParameter
from ...params import (MAX_NOISE_MULTIPLIER, MAX_S_MIN_UNCOND, MAX_TOKEN_MERGING_RATIO, preview_method_name,
                       hires_refiner_pass, restorer_name, vae_method_name)
from ..jobs import Job
from ..security import JSONValueLimitRoute
from ..state import ServerState, server_state
from .convert import hypernetwork_setting, img2img_upscaler_setting, samples_format_setting
from .generation import await_job
from .responses import CommandFlags, Options, SDModelItem, SDModuleItem, SDVaeItem

router = APIRouter(prefix="/sdapi/v1", tags=["settings"], route_class=JSONValueLimitRoute)

_RNG_LABELS = {"gpu": "GPU", "cpu": "CPU", "nv": "NV"}
#: A1111's token merging settings, named as ServerOptions names them.
TOKEN_MERGING_SETTINGS = ("token_merging_ratio", "token_merging_ratio_img2img", "token_merging_ratio_hr")


async def run_model_job(state: ServerState, kind: str, action: Callable[[Job], Any]) -> None:
    """Queue a model operation and wait for it; its failure is reported like a failed generation."""
    await await_job(state, state.queue.submit(kind, action))


# Routes that read the models folder are plain functions: FastAPI runs them on its thread pool,
# so a slow disk never stalls the event loop.


@router.get("/options", response_model=Options, summary="Current settings")
def get_options(request: Request) -> Options:
    state = server_state(request)
    slot = state.slot
    current = slot.selected or slot.loaded
    if current is None:
        try:
            current = state.default_model()
        except Exception:  # an unresolvable --model is reported when a job needs it, not here
            current = None
    opts = state.options
    return Options(
        sd_model_checkpoint=state.catalog.title_of(current) if current else None,
        sd_checkpoint_hash=_known_sha256(current) if current else None,
        CLIP_stop_at_last_layers=opts.clip_skip,
        eta_noise_seed_delta=opts.eta_noise_seed_delta,
        randn_source=_RNG_LABELS[opts.rng],
        img2img_fix_steps=opts.img2img_fix_steps,
        samples_format=opts.samples_format,
        jpeg_quality=opts.jpeg_quality,
        enable_prompt_comments=opts.enable_prompt_comments,
        show_progress_type=opts.show_progress_type,
        live_previews_enable=opts.live_previews_enable,
        token_merging_ratio=opts.token_merging_ratio,
        token_merging_ratio_img2img=opts.token_merging_ratio_img2img,
        token_merging_ratio_hr=opts.token_merging_ratio_hr,
        s_min_uncond=opts.s_min_uncond,
        s_min_uncond_all=opts.s_min_uncond_all,
        skip_early_cond=opts.skip_early_cond,
        sd_vae_encode_method=opts.sd_vae_encode_method,
        sd_vae_decode_method=opts.sd_vae_decode_method,
        img2img_color_correction=opts.img2img_color_correction,
        tiling=opts.tiling,
        initial_noise_multiplier=opts.initial_noise_multiplier,
        img2img_extra_noise=opts.img2img_extra_noise,
        sdxl_crop_top=opts.sdxl_crop_top,
        sdxl_crop_left=opts.sdxl_crop_left,
        sdxl_refiner_high_aesthetic_score=opts.sdxl_refiner_high_aesthetic_score,
        hires_fix_refiner_pass=opts.hires_fix_refiner_pass,
        uni_pc_order=opts.uni_pc_order,
        face_restoration=opts.face_restoration,
        face_restoration_model=opts.face_restoration_model,
        code_former_weight=opts.code_former_weight,
        beta_dist_alpha=opts.beta_dist_alpha,
        beta_dist_beta=opts.beta_dist_beta,
        sgm_noise_multiplier=opts.sgm_noise_multiplier,
        sdxl_refiner_low_aesthetic_score=opts.sdxl_refiner_low_aesthetic_score,
        interrogate_return_ranks=opts.interrogate_return_ranks,
        interrogate_clip_num_beams=opts.interrogate_clip_num_beams,
        interrogate_clip_min_length=opts.interrogate_clip_min_length,
        interrogate_clip_max_length=opts.interrogate_clip_max_length,
        interrogate_clip_dict_limit=opts.interrogate_clip_dict_limit,
        interrogate_deepbooru_score_threshold=opts.interrogate_deepbooru_score_threshold,
        deepbooru_sort_alpha=opts.deepbooru_sort_alpha, deepbooru_use_spaces=opts.deepbooru_use_spaces,
        deepbooru_escape=opts.deepbooru_escape, deepbooru_filter_tags=opts.deepbooru_filter_tags,
        eta_ddim=opts.eta_ddim, eta_ancestral=opts.eta_ancestral, s_churn=opts.s_churn, s_tmin=opts.s_tmin,
        s_tmax=opts.s_tmax, s_noise=opts.s_noise, sigma_min=opts.sigma_min, sigma_max=opts.sigma_max, rho=opts.rho,
        always_discard_next_to_last_sigma=opts.always_discard_next_to_last_sigma,
        return_grid=opts.return_grid, grid_save=opts.grid_save,
        sd_vae=opts.sd_vae,
        upscaler_for_img2img=opts.upscaler_for_img2img,
        sd_hypernetwork=opts.sd_hypernetwork,
        extra_networks_default_multiplier=opts.extra_networks_default_multiplier,
        **state.outputs.options(),
    )


def _option_changes(body: dict[str, Any], state: ServerState) -> dict[str, Any]:
    """Check every known setting before changing any; unknown settings are ignored, as A1111 does.
    (It lists the VAE folder for ``sd_vae``: call it off the event loop.)"""
    changes: dict[str, Any] = {}
    if "CLIP_stop_at_last_layers" in body:
        # 0 stops at the last layer, as 1 does (A1111 changes nothing below 2)
        changes["clip_skip"] = max(_int_option(body, "CLIP_stop_at_last_layers", 0, 12), 1)
    if "eta_noise_seed_delta" in body:
        changes["eta_noise_seed_delta"] = _int_option(body, "eta_noise_seed_delta", 0, 2**32 - 1)
    if "randn_source" in body:
        value = str(body["randn_source"]).lower()
        if value not in _RNG_LABELS:
            raise InvalidParameter("randn_source", body["randn_source"], "GPU, CPU or NV")
        changes["rng"] = value
    if "img2img_fix_steps" in body:
        if not isinstance(body["img2img_fix_steps"], bool):
            raise InvalidParameter("img2img_fix_steps", body["img2img_fix_steps"], "true or false")
        changes["img2img_fix_steps"] = body["img2img_fix_steps"]
    if "show_progress_type" in body:
        changes["show_progress_type"] = preview_method_name(body["show_progress_type"], "show_progress_type")
    if "live_previews_enable" in body:
        if not isinstance(body["live_previews_enable"], bool):
            raise InvalidParameter("live_previews_enable", body["live_previews_enable"], "true or false")
        changes["live_previews_enable"] = body["live_previews_enable"]
    for key in TOKEN_MERGING_SETTINGS:
        if key in body:
            changes[key] = token_merging_setting(key, body[key])
    for key, (lo, hi) in _INT_SETTINGS.items():
        if key in body:
            changes[key] = _int_option(body, key, lo, hi)
    for key, (lo, hi) in _FLOAT_SETTINGS.items():
        if key in body:
            changes[key] = _float_option(body, key, lo, hi)
    if "face_restoration_model" in body:
        changes["face_restoration_model"] = restorer_name(body["face_restoration_model"])
    for key in ("s_min_uncond_all", "img2img_color_correction", "tiling", "sgm_noise_multiplier", "face_restoration",
                "interrogate_return_ranks", "always_discard_next_to_last_sigma", "return_grid", "grid_save",
                "enable_prompt_comments", "deepbooru_sort_alpha", "deepbooru_use_spaces", "deepbooru_escape"):
        if key in body:
            if not isinstance(body[key], bool):
                raise InvalidParameter(key, body[key], "true or false")
            changes[key] = body[key]
    if "hires_fix_refiner_pass" in body:
        changes["hires_fix_refiner_pass"] = hires_refiner_pass(body["hires_fix_refiner_pass"])
    for key in ("sd_vae_encode_method", "sd_vae_decode_method"):
        if key in body:
            changes[key] = vae_method_name(body[key], key)
    if body.get("sd_vae") is not None:
        changes["sd_vae"] = state.catalog.vae_choice(body["sd_vae"])
    if "upscaler_for_img2img" in body:
        changes["upscaler_for_img2img"] = img2img_upscaler_setting(body["upscaler_for_img2img"], state.catalog.folder)
    if "sd_hypernetwork" in body:
        changes["sd_hypernetwork"] = hypernetwork_setting(body["sd_hypernetwork"], state.catalog.folder)
    if "deepbooru_filter_tags" in body:
        value = body["deepbooru_filter_tags"]
        if not isinstance(value, str) or len(value) > MAX_FILTER_TAGS:
            raise InvalidParameter("deepbooru_filter_tags", value, f"comma-separated tags (text of at most "
                                                                   f"{MAX_FILTER_TAGS} characters)")
        changes["deepbooru_filter_tags"] = value
    if body.get("samples_format") is not None:
        changes["samples_format"] = samples_format_setting(body["samples_format"], "samples_format")
    if body.get("jpeg_quality") is not None:
        changes["jpeg_quality"] = _int_option(body, "jpeg_quality", 1, 100)
    return changes


def token_merging_setting(key: str, value: Any) -> float:
    """A token merging ratio setting: a number from 0 to 0.9 (A1111's slider), else a 422 naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= MAX_TOKEN_MERGING_RATIO:
        raise InvalidParameter(key, value, f"a number from 0 to {MAX_TOKEN_MERGING_RATIO}")
    return float(value)


#: Numeric settings and their ranges: whole numbers, and numbers.
_INT_SETTINGS = {"sdxl_crop_top": (0, 8192), "sdxl_crop_left": (0, 8192), "uni_pc_order": (1, 50),
                 "interrogate_clip_num_beams": (1, 16), "interrogate_clip_min_length": (1, 128),
                 "interrogate_clip_max_length": (1, 256), "interrogate_clip_dict_limit": (0, 100000)}
_FLOAT_SETTINGS = {
    "s_min_uncond": (0.0, MAX_S_MIN_UNCOND), "skip_early_cond": (0.0, 1.0),
    "initial_noise_multiplier": (0.0, MAX_NOISE_MULTIPLIER), "img2img_extra_noise": (0.0, 1.0),
    "beta_dist_alpha": (0.01, 10.0), "beta_dist_beta": (0.01, 10.0), "code_former_weight": (0.0, 1.0),
    "sdxl_refiner_high_aesthetic_score": (0.0, 10.0), "sdxl_refiner_low_aesthetic_score": (0.0, 10.0),
    # Sampler parameters (A1111's sliders reach 1 for eta, 100 for churn and noise; larger values are taken)
    "eta_ddim": (0.0, 10.0), "eta_ancestral": (0.0, 10.0), "s_churn": (0.0, 100.0), "s_tmin": (0.0, 1000.0),
    "s_tmax": (0.0, 1000.0), "s_noise": (0.0, 100.0), "sigma_min": (0.0, 1000.0), "sigma_max": (0.0, 1000.0),
    "rho": (0.0, 100.0),
    "extra_networks_default_multiplier": (-10.0, 10.0),
    "interrogate_deepbooru_score_threshold": (0.0, 1.0),
}
#: The longest list of tags ``deepbooru_filter_tags`` takes.
MAX_FILTER_TAGS = 10_000


def _float_option(body: dict[str, Any], key: str, lo: float, hi: float) -> float:
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not lo <= value <= hi:
        raise InvalidParameter(key, value, f"a number from {lo:g} to {hi:g}")
    return float(value)


def _int_option(body: dict[str, Any], key: str, lo: int, hi: int) -> int:
    """A whole-number setting (sent as 2 or 2.0) from ``lo`` to ``hi``."""
    value = body[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidParameter(key, value, f"an integer from {lo} to {hi}")
    return value


@router.post("/options", summary="Change settings; sd_model_checkpoint loads that checkpoint, sd_vae picks the VAE")
async def set_options(request: Request, body: dict[str, Any] = Body(...)) -> None:
    state = server_state(request)
    state.outputs.refuse_changes(body)  # the output folders are the server's to choose, not a client's
    changes = await run_in_threadpool(_option_changes, body, state)
    checkpoint = body.get("sd_model_checkpoint")
    if checkpoint is not None:
        if not isinstance(checkpoint, str):
            raise InvalidParameter("sd_model_checkpoint", checkpoint, "a checkpoint title from /sdapi/v1/sd-models")
        path = await run_in_threadpool(state.catalog.resolve, checkpoint)
        vae = changes.get("sd_vae")

        def load(job: Job) -> None:
            state.slot.select(path, vae)  # with the VAE this same call chooses: one load, not two
            if vae is not None:  # set before the next job starts, which would load the old one again
                state.options = state.options.replace(sd_vae=vae)

        await run_model_job(state, "load_checkpoint", load)
    if changes:
        state.options = state.options.replace(**changes)


@router.get("/cmd-flags", response_model=CommandFlags, summary="How the server was started")
async def cmd_flags(request: Request) -> CommandFlags:
    config = server_state(request).config
    return CommandFlags(
        nowebui=not config.webui, listen=not config.is_loopback, port=config.port, api_auth=bool(config.api_auth),
        cors_allow_origins=",".join(config.cors_allow_origins) or None, device=config.device,
        precision=config.dtype, queue_size=config.queue_size, allow_image_urls=config.allow_image_urls,
        medvram=config.vram == "medium", lowvram=config.vram == "low", no_half_vae=config.vae_precision == "fp32",
    )


@router.get("/sd-models", response_model=list[SDModelItem], summary="Checkpoints in the models folder")
def sd_models(request: Request) -> list[SDModelItem]:
    views = server_state(request).catalog.checkpoints()
    return [SDModelItem(title=v.title, model_name=v.model_name, hash=v.short_hash, sha256=_known_sha256(v.path),
                        filename=v.relative, config=None, family=v.family, edit=v.edit) for v in views]


def _known_sha256(path: Path | None) -> str | None:
    """The file's sha256 once something hashed it (a generation writes the model hash); listing
    never reads a multi-gigabyte file. None for a diffusers folder."""
    if path is None or not path.is_file():
        return None
    from ...models.hashes import cached_sha256

    return cached_sha256(path)


@router.get("/sd-vae", response_model=list[SDVaeItem], summary="VAEs in the models folder")
def sd_vae(request: Request) -> list[SDVaeItem]:
    return [SDVaeItem(model_name=name, filename=rel) for name, rel in server_state(request).catalog.vaes()]


@router.get("/sd-modules", response_model=list[SDModuleItem], summary="Separate text encoders and other modules")
def sd_modules(request: Request) -> list[SDModuleItem]:
    """Forge's list of modules a checkpoint can be combined with: FLUX's text encoders, and VAEs."""
    catalog = server_state(request).catalog
    return [SDModuleItem(model_name=name, filename=rel) for name, rel in (*catalog.text_encoders(), *catalog.vaes())]


@router.post("/refresh-checkpoints", summary="Rescan checkpoints (listings are always fresh here)")
async def refresh_checkpoints() -> None:
    return None


@router.post("/refresh-vae", summary="Rescan VAEs (listings are always fresh here)")
async def refresh_vae() -> None:
    return None


@router.post("/refresh-loras", summary="Rescan LoRAs (listings are always fresh here)")
async def refresh_loras() -> None:
    return None


@router.post("/refresh-embeddings", summary="Rescan embeddings (listings are always fresh here)")
async def refresh_embeddings() -> None:
    return None


@router.post("/unload-checkpoint", summary="Free the checkpoint's memory (it loads again when needed)")
async def unload_checkpoint(request: Request) -> dict:
    state = server_state(request)
    await run_model_job(state, "unload_checkpoint", lambda job: state.slot.unload())
    return {}


@router.post("/reload-checkpoint", summary="Load the selected checkpoint again")
async def reload_checkpoint(request: Request) -> dict:
    state = server_state(request)
    await run_model_job(state, "reload_checkpoint", lambda job: state.slot.reload())
    return {}
