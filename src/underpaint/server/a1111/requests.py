"""Request bodies of AUTOMATIC1111 1.10's ``/sdapi/v1`` API, written out by hand.

Field names, types and defaults are what A1111's API accepts, so existing clients send the
same JSON. Fields for features underpaint does not have are still accepted; a request that
actually asks for one (a script it does not run) is refused with
a 422 naming the field rather than silently ignored. Unknown fields are ignored, as A1111 does.

A1111 1.10 validates with pydantic 1, whose models read some JSON more loosely than pydantic 2
does by default; generation requests read it the same way (:meth:`GenerationRequest._as_a1111_reads_it`).
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError


class WireModel(BaseModel):
    """Base for every wire model: no NaN or infinity, no 'model_' namespace warnings."""

    model_config = ConfigDict(allow_inf_nan=False, protected_namespaces=(), extra="ignore")


#: Fields A1111's request models declare without ``Optional`` (its API-only additions): there, as
#: here, JSON null is refused for them. Every other field of A1111's models takes null as "not given".
NOT_NULLABLE = frozenset({"sampler_index", "script_args", "send_images", "save_images", "alwayson_scripts",
                          "include_init_images"})


def _accepts_none(annotation: Any) -> bool:
    return annotation is None or type(None) in typing.get_args(annotation)


def _is_str(annotation: Any) -> bool:
    """``str`` or ``str | None``."""
    return annotation is str or (typing.get_origin(annotation) in (typing.Union, types.UnionType)
                                 and set(typing.get_args(annotation)) == {str, type(None)})


def _is_int(annotation: Any) -> bool:
    """``int`` or ``int | None`` (not ``str | int``, whose integers mean something else)."""
    if annotation is int:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set(typing.get_args(annotation)) == {int, type(None)}
    return False


class RequestModel(WireModel):
    """Base for request bodies: every text in them, nested ones included, must be valid Unicode.

    JSON may carry a lone UTF-16 surrogate (``"\\ud800"``), which Python's parser accepts but no
    UTF-8 encoder does: a prompt holding one ran the whole job and then failed with a 500 when
    the infotext or the response was written. Such text is a 422 naming the field instead.
    """

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        pending = [value]
        while pending:
            item = pending.pop()
            if isinstance(item, str):
                _check_unicode(item)
            elif isinstance(item, dict):
                pending.extend(item.keys())
                pending.extend(item.values())
            elif isinstance(item, (list, tuple)):
                pending.extend(item)
        return value


def _check_unicode(text: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError(
            "invalid_unicode", "expected valid Unicode text; {char} at position {position} is a lone surrogate",
            {"char": ascii(text[exc.start]), "position": exc.start}) from None


class GenerationRequest(RequestModel):
    """Fields shared by txt2img and img2img."""

    @model_validator(mode="before")
    @classmethod
    def _as_a1111_reads_it(cls, data: Any) -> Any:
        """Read the JSON as A1111 1.10's pydantic 1 models do, where pydantic 2 would refuse it.

        - null for a field that A1111 declares ``Optional`` (all but :data:`NOT_NULLABLE`) means
          "not given": the field keeps its default. Generated clients and JavaScript ones send
          null for values left unset.
        - a finite number with a fraction for an integer field is cut to its integer part
          (``"width": 682.67`` is 682), as pydantic 1 does.
        - a number for a text field is its decimal text (``"prompt": 42`` is ``"42"``), as pydantic 1
          does (true and false stay refused: they are numbers only to Python).
        """
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        read: dict[str, Any] = {}
        for key, value in data.items():
            field = fields.get(key)
            if field is not None:
                if value is None and key not in NOT_NULLABLE and not _accepts_none(field.annotation):
                    continue
                if (isinstance(value, float) and math.isfinite(value) and not value.is_integer()
                        and _is_int(field.annotation)):
                    value = math.trunc(value)
                elif isinstance(value, (int, float)) and not isinstance(value, bool) and _is_str(field.annotation):
                    value = str(value)
            read[key] = value
        return read

    prompt: str = Field("", description="What the picture should show, in A1111's prompt syntax.")
    negative_prompt: str = Field("", description="What it should not show.")
    styles: list[str] | None = Field(None, description=(
        "Prompt styles to apply, in order, by name from /prompt-styles (the server's styles.csv); an unknown "
        "name is refused."))
    seed: int = Field(-1, description="-1 picks a random seed; the seed used is reported in `info`.")
    subseed: int = Field(-1, description="Variation seed; -1 picks a random one.")
    subseed_strength: float = Field(0.0, description="How far to move from `seed` towards `subseed` (0-1).")
    seed_resize_from_h: int = Field(-1, description="Make the noise at this height (0 or -1: off).")
    seed_resize_from_w: int = Field(-1, description="Make the noise at this width (0 or -1: off).")
    sampler_name: str | None = Field(None, description="Sampler, e.g. 'Euler a' or 'DPM++ 2M'; see /samplers.")
    scheduler: str | None = Field(None, description="Schedule type, e.g. 'Automatic' or 'Karras'; see /schedulers.")
    batch_size: int = Field(1, description="Images per batch (made together).")
    n_iter: int = Field(1, description="Number of batches (made one after another).")
    steps: int = Field(50, description="Sampling steps.")
    cfg_scale: float = Field(7.0, description="Classifier-free guidance scale.")
    distilled_cfg_scale: float | None = Field(
        None, description="FLUX.1-dev's built-in guidance (Forge's Distilled CFG Scale); absent means 3.5. "
                          "Ignored by other models.")
    width: int = Field(512, description="Output width in pixels.")
    height: int = Field(512, description="Output height in pixels.")
    restore_faces: bool | None = Field(None, description=(
        "Restore faces: each finished picture's faces restored with the face_restoration_model setting's restorer "
        "(CodeFormer or GFPGAN). Absent: the face_restoration setting (off)."))
    tiling: bool | None = Field(None, description=(
        "A1111's Tiling: a picture that tiles seamlessly, its right edge running on into the left and its bottom "
        "into the top (SD 1.x/2.x and SDXL; refused for FLUX)."))
    do_not_save_samples: bool = Field(False, description="Ignored, as in A1111's API: save_images decides.")
    do_not_save_grid: bool = Field(False, description="Accepted for compatibility; no grid is made.")
    eta: float | None = Field(None, description="Noise multiplier for ancestral and SDE samplers (and DDIM).")
    denoising_strength: float | None = Field(None, description="img2img: how much to change the input (0-1).")
    s_min_uncond: float | None = Field(None, description=(
        "Negative Guidance minimum sigma (NGMS), a speed/quality trade-off: below this noise level every other "
        "model evaluation runs without the negative prompt. 0: off; absent: the s_min_uncond setting."))
    s_churn: float | None = Field(None, description="Karras et al. stochasticity (Euler, Heun, DPM2).")
    s_tmax: float | None = Field(None, description="Upper sigma for s_churn; 0 or absent means infinity.")
    s_tmin: float | None = Field(None, description="Lower sigma for s_churn.")
    s_noise: float | None = Field(None, description="Noise scale for s_churn and ancestral steps.")
    override_settings: dict[str, Any] | None = Field(
        None, description="Per-request settings, e.g. {'sd_model_checkpoint': ..., 'sd_vae': ..., "
                          "'CLIP_stop_at_last_layers': 2}. "
                          "underpaint's own: deepcache_interval (2 or more turns DeepCache on for SD/SDXL), "
                          "deepcache_branch, deepcache_start, deepcache_end; first_block_cache_threshold "
                          "(FLUX: 0 off to 1, e.g. 0.12)."
    )
    override_settings_restore_afterwards: bool = Field(True, description=(
        "false: the overridden settings (the checkpoint, VAE, clip skip, ENSD, ...) stay set afterwards, as in "
        "A1111."))
    refiner_checkpoint: str | None = Field(None, description=(
        "A1111's Refiner: a checkpoint (title or name from /sdapi/v1/sd-models) of the same family that finishes the "
        "sampling; \"None\" or absent: no refiner."))
    refiner_switch_at: float | None = Field(None, description=(
        "When the refiner takes over: once this share of the noise schedule is passed, 0-1 (default 0.8)."))
    disable_extra_networks: bool = Field(False, description=(
        "true: <lora:...> and <hypernet:...> tags are taken out of the prompt but not applied."))
    firstpass_image: str | None = Field(None, description="Not available here: must be absent.")
    comments: dict[str, Any] | None = Field(None, description="Ignored.")
    sampler_index: str | int = Field("Euler", description="Legacy sampler field, used when sampler_name is empty.")
    script_name: str | None = Field(None, description=(
        "A selectable script, by its /sdapi/v1/scripts name: \"prompt matrix\", \"prompts from file or textbox\", "
        "\"x/y/z plot\"; img2img also \"loopback\" and \"sd upscale\"."))
    script_args: list[Any] = Field(default_factory=list, description="Arguments of script_name.")
    send_images: bool = Field(True, description="Return the images in the response.")
    save_images: bool = Field(False, description=(
        "Also keep the pictures on the server, in its output folder (txt2img-images/ or img2img-images/, a folder "
        "per day, files like 00012-1234567.png with their infotext). Only the server chooses the folder."))
    alwayson_scripts: dict[str, Any] = Field(
        default_factory=dict, description="Extension arguments; `controlnet` units are understood."
    )
    force_task_id: str | None = Field(None, description="Job id to use (1-64 of A-Z a-z 0-9 _ . : -).")
    infotext: str | None = Field(None, description="An A1111 infotext whose values fill the fields not given.")


class Txt2ImgRequest(GenerationRequest):
    """POST /sdapi/v1/txt2img."""

    enable_hr: bool = Field(False, description="Hires. fix: upscale the first picture and paint over it again at "
                                                "the larger size with an img2img pass.")
    denoising_strength: float | None = Field(0.75, description="Hires. fix: the second pass's strength (0-1; unused "
                                                               "without enable_hr).")
    firstphase_width: int = Field(0, description="Legacy: when set (with firstphase_height) it replaces `width`.")
    firstphase_height: int = Field(0, description="Legacy: when set (with firstphase_width) it replaces `height`.")
    hr_scale: float = Field(2.0, description="Hires. fix: upscale by this factor (when hr_resize_x/y are 0).")
    hr_upscaler: str | None = Field(None, description="Hires. fix upscaler: a name from /latent-upscale-modes or "
                                                      "/upscalers; absent means 'Latent'.")
    hr_second_pass_steps: int = Field(0, description="Hires. fix: steps of the second pass, run whatever the "
                                                     "strength; 0 means `steps`.")
    hr_resize_x: int = Field(0, description="Hires. fix: upscale to this width instead (0 with hr_resize_y set: "
                                            "keep the aspect ratio).")
    hr_resize_y: int = Field(0, description="Hires. fix: upscale to this height instead; both set crop to fit.")
    hr_checkpoint_name: str | None = Field(None, description="Not available here: absent or 'Use same checkpoint'.")
    hr_sampler_name: str | None = Field(None, description="Hires. fix: the second pass's sampler; absent means "
                                                          "`sampler_name`.")
    hr_scheduler: str | None = Field(None, description="Hires. fix: the second pass's schedule type; absent means "
                                                       "`scheduler`.")
    hr_prompt: str = Field("", description="Hires. fix: the second pass's prompt; empty means `prompt`.")
    hr_negative_prompt: str = Field("", description="Hires. fix: the second pass's negative prompt; empty means "
                                                    "`negative_prompt`.")


class Img2ImgRequest(GenerationRequest):
    """POST /sdapi/v1/img2img."""

    init_images: list[str] | None = Field(
        None, description="Base64 images (a 'data:image/...;base64,' prefix is accepted); the first is used."
    )
    resize_mode: int = Field(0, description="0 just resize, 1 crop and resize, 2 resize and fill, 3 latent upscale.")
    denoising_strength: float | None = Field(0.75, description="How much to change the input: 0 keeps it, 1 ignores it.")
    image_cfg_scale: float | None = Field(None, description=(
        "Image CFG Scale of InstructPix2Pix edit models: how closely the result keeps to the picture (1: no image "
        "guidance; left out: 1.5, A1111's default). Other models ignore it."))
    mask: str | None = Field(None, description="Base64 mask: white is repainted; an image with transparency uses its alpha.")
    mask_blur_x: int = Field(4, description="Mask blur, horizontal (pixels).")
    mask_blur_y: int = Field(4, description="Mask blur, vertical (pixels).")
    mask_blur: int | None = Field(None, description="Sets both mask_blur_x and mask_blur_y.")
    mask_round: bool = Field(True, description="Round the mask to 0/1 for inpainting models.")
    inpainting_fill: int = Field(0, description="Masked content: 0 fill, 1 original, 2 latent noise, 3 latent nothing.")
    inpaint_full_res: bool = Field(True, description="Inpaint area: true 'only masked', false 'whole picture'.")
    inpaint_full_res_padding: int = Field(0, description="Padding around the mask for 'only masked' (pixels).")
    inpainting_mask_invert: int = Field(0, description="1 repaints the black part of the mask instead.")
    initial_noise_multiplier: float | None = Field(None, description=(
        "Noise multiplier for img2img: the start noise times this (default: the setting of that name, 1)."))
    latent_mask: str | None = Field(None, description="Not available here: must be absent.")
    include_init_images: bool = Field(False, description="Echo init_images and mask back in `parameters`.")


class PNGInfoRequest(RequestModel):
    """POST /sdapi/v1/png-info."""

    image: str = Field(description="A base64 image (PNG, JPEG or WebP) whose generation parameters to read.")


class ExtrasRequest(RequestModel):
    """The settings shared by /extra-single-image and /extra-batch-images (A1111's Extras tab)."""

    resize_mode: int = Field(0, ge=0, le=1, description="0: upscale by `upscaling_resize`; 1: to "
                                                        "`upscaling_resize_w` x `upscaling_resize_h`.")
    show_extras_results: bool = Field(True, description="Ignored, as in A1111's API: the pictures are always returned.")
    gfpgan_visibility: float = Field(0, ge=0, le=1, description=(
        "GFPGAN visibility: after the upscale, the faces restored with GFPGAN and blended in by this much (0: off)."))
    codeformer_visibility: float = Field(0, ge=0, le=1, description=(
        "CodeFormer visibility: after GFPGAN's, the faces restored with CodeFormer and blended in by this much."))
    codeformer_weight: float = Field(0, ge=0, le=1, description=(
        "CodeFormer weight: 0 restores most, 1 keeps most of the picture."))
    upscaling_resize: float = Field(2, gt=0, description="Scale factor for resize_mode 0.")
    upscaling_resize_w: int = Field(512, ge=1, description="Target width for resize_mode 1.")
    upscaling_resize_h: int = Field(512, ge=1, description="Target height for resize_mode 1.")
    upscaling_crop: bool = Field(True, description="resize_mode 1: crop the upscaled picture to the target size.")
    upscaler_1: str = Field("None", description="'None' (leave the picture as it is), 'Lanczos' or 'Nearest'; "
                                                "see /upscalers.")
    upscaler_2: str = Field("None", description="A second upscaler blended in at `extras_upscaler_2_visibility`.")
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1, description="How much of upscaler_2's picture to "
                                                                          "blend in (0-1).")
    upscale_first: bool = Field(False, description="Unused (face restoration is not available).")


class ExtrasSingleImageRequest(ExtrasRequest):
    """POST /sdapi/v1/extra-single-image."""

    image: str = Field("", description="A base64 image.")


class ExtrasFile(RequestModel):
    data: str = Field(description="A base64 image.")
    name: str = Field(description="Its file name (unused).")


class ExtrasBatchImagesRequest(ExtrasRequest):
    """POST /sdapi/v1/extra-batch-images."""

    imageList: list[ExtrasFile] = Field(description="The pictures to work on.")


class InterrogateRequest(RequestModel):
    """POST /sdapi/v1/interrogate: A1111's "Interrogate CLIP" and "Interrogate DeepBooru"."""

    image: str = Field("", description="A base64 image.")
    model: str = Field("clip", description=(
        "'clip': BLIP's caption, then CLIP's best matches from the word lists; 'deepdanbooru': the Danbooru "
        "tags DeepDanbooru's tagger finds, with the deepbooru settings of /options."))


class ProgressQuery(WireModel):
    skip_current_image: bool = False


class ControlNetDetectRequest(RequestModel):
    """POST /controlnet/detect (the ControlNet extension's preprocessor endpoint)."""

    controlnet_module: str = Field("none", description="Preprocessor name; see /controlnet/module_list.")
    controlnet_input_images: list[str] = Field(default_factory=list, description="Base64 images.")
    controlnet_images: list[str] | None = Field(None, description="Older name of controlnet_input_images.")
    controlnet_masks: list[str] | None = Field(None, description=(
        "Base64 masks, one per image: for inpaint modules, white marks what to repaint (else the image's "
        "transparency does); other modules ignore them."))
    controlnet_processor_res: int = Field(512, description="Working resolution; -1 (the extension's default): 512.")
    controlnet_threshold_a: float = Field(-1, description="-1: the module's default.")
    controlnet_threshold_b: float = Field(-1, description="-1: the module's default.")
    low_vram: bool = False
