"""Response bodies of AUTOMATIC1111 1.10's ``/sdapi/v1`` API (and the ControlNet extension's), by hand.

Shapes and key names are what A1111 clients read; lists underpaint has nothing for are empty.
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field

from .requests import WireModel


class GenerationResponse(WireModel):
    images: list[str] | None = Field(None, description="Base64 PNGs (no 'data:' prefix), each with its infotext.")
    parameters: dict[str, Any] = Field(description="The request as received (images left out unless asked for).")
    info: str = Field(description="A JSON string: prompts, seeds, sizes, model, infotexts and more, as A1111 sends.")


class TextToImageResponse(GenerationResponse):
    pass


class ImageToImageResponse(GenerationResponse):
    pass


class ProgressState(WireModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(WireModel):
    progress: float = Field(description="Share of the running job done, 0-1.")
    eta_relative: float = Field(description="Estimated seconds left.")
    state: ProgressState
    current_image: str | None = Field(None, description="A base64 preview of the running job, when one is ready.")
    textinfo: str | None = None


class PNGInfoResponse(WireModel):
    info: str = Field(description="The infotext found in the image ('' when none).")
    items: dict[str, Any] = Field(description="Other text stored in the image.")
    parameters: dict[str, Any] = Field(description="The infotext parsed into A1111's keys.")


class ExtrasSingleImageResponse(WireModel):
    html_info: str = Field(description="What was done, as A1111's Extras tab shows it (HTML).")
    image: str | None = Field(None, description="The picture, base64 PNG.")


class ExtrasBatchImagesResponse(WireModel):
    html_info: str = Field(description="What was done to the last picture (HTML).")
    images: list[str] = Field(description="The pictures, base64 PNGs, in the order sent.")


class InterrogateResponse(WireModel):
    caption: str | None = None


class SamplerItem(WireModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(WireModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float | None = None
    need_inner_model: bool | None = None


class UpscalerItem(WireModel):
    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float | None = None


class LatentUpscalerModeItem(WireModel):
    name: str


class SDModelItem(WireModel):
    title: str = Field(description="'file.safetensors [shorthash]', what /options' sd_model_checkpoint takes.")
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str = Field(description="The file, relative to the models folder.")
    config: str | None = None
    family: str | None = Field(None, description="Not in A1111's API: 'flux' for FLUX.1 checkpoints, 'sd' for the "
                                                 "Stable Diffusion families (the browser UI picks its defaults by it).")
    edit: bool = Field(False, description="Not in A1111's API: an InstructPix2Pix edit model (it takes "
                                          "image_cfg_scale).")


class SDVaeItem(WireModel):
    model_name: str
    filename: str


class SDModuleItem(WireModel):
    model_name: str
    filename: str


class HypernetworkItem(WireModel):
    name: str
    path: str | None = None


class FaceRestorerItem(WireModel):
    name: str
    cmd_dir: str | None = None


class RealesrganItem(WireModel):
    name: str
    path: str | None = None
    scale: int | None = None


class PromptStyleItem(WireModel):
    name: str
    prompt: str | None = None
    negative_prompt: str | None = None


class LoraItem(WireModel):
    name: str
    alias: str
    path: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class EmbeddingItem(WireModel):
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    shape: int
    vectors: int


class EmbeddingsResponse(WireModel):
    loaded: dict[str, EmbeddingItem] = Field(default_factory=dict)
    skipped: dict[str, EmbeddingItem] = Field(default_factory=dict)


class MemoryResponse(WireModel):
    ram: dict[str, Any] = Field(description="System memory in bytes: free, used, total.")
    cuda: dict[str, Any] = Field(description="GPU memory in bytes, or {'error': 'unavailable'}.")


class ScriptsList(WireModel):
    txt2img: list[str] = Field(default_factory=list)
    img2img: list[str] = Field(default_factory=list)


class ScriptArg(WireModel):
    label: str | None = None
    value: Any = None
    minimum: Any = None
    maximum: Any = None
    step: Any = None
    choices: list[str] | None = None


class ScriptInfo(WireModel):
    name: str | None = None
    is_alwayson: bool | None = None
    is_img2img: bool | None = None
    args: list[ScriptArg] = Field(default_factory=list)


class ExtensionItem(WireModel):
    name: str
    remote: str
    branch: str
    commit_hash: str
    version: str
    commit_date: str
    enabled: bool


class Options(WireModel):
    """GET/POST /sdapi/v1/options: the settings underpaint has. Others are accepted and ignored, as A1111 does."""

    model_config = ConfigDict(allow_inf_nan=False, protected_namespaces=(), extra="allow")

    sd_model_checkpoint: str | None = Field(None, description="The checkpoint title; setting it loads that model.")
    sd_checkpoint_hash: str | None = Field(None, description="sha256 of the loaded checkpoint, when known (read-only).")
    sd_vae: str = Field("Automatic", description=(
        "The VAE every job uses: 'Automatic' (a VAE file named like the checkpoint, as A1111 finds it, else "
        "the checkpoint's own), 'None' (the checkpoint's own) or a model_name from /sdapi/v1/sd-vae. The next "
        "job loads it; a request may override it."))
    upscaler_for_img2img: str = Field("None", description=(
        "Upscaler for img2img: what enlarges an init picture (and an 'Only masked' crop) when the resize "
        "makes it larger; 'None' is Lanczos, else a name from /sdapi/v1/upscalers. A request may override it."))
    CLIP_stop_at_last_layers: int = Field(1, ge=1, le=12, description="Clip skip used when a request does not say.")
    eta_noise_seed_delta: int = Field(0, ge=0, le=2**32 - 1, description="ENSD used when a request does not say.")
    randn_source: str = Field("GPU", description="Noise source: GPU, CPU or NV.")
    img2img_fix_steps: bool = Field(False, description="img2img runs exactly `steps` whatever the strength.")
    samples_format: str = Field("png", description=(
        "Format of returned images: png, jpg, jpeg or webp (the infotext in a PNG chunk, else an EXIF "
        "UserComment, as A1111 writes them)."))
    jpeg_quality: int = Field(80, ge=1, le=100, description="Quality of returned jpg and webp images.")
    enable_prompt_comments: bool = Field(True, description=(
        "Enable comments: # hides the rest of its line of a prompt from the generation (and the token counter)."))
    show_progress_type: str = Field("Approx NN", description=(
        "Live preview method: Full (the VAE), Approx cheap (a linear map, 1/8 size), TAESD (the tiny "
        "decoder in the models folder's VAE-approx/), or Approx NN (TAESD when its file is there, else "
        "Approx cheap)."))
    live_previews_enable: bool = Field(True, description="Whether /progress makes live previews at all.")
    token_merging_ratio: float = Field(0.0, ge=0, le=0.9, description=(
        "Token merging (ToMe): the share of tokens merged before self-attention in the UNet's full-resolution "
        "blocks, 0 (off) to 0.9; faster, less faithful. Nothing merges on SDXL; FLUX ignores it."))
    token_merging_ratio_img2img: float = Field(0.0, ge=0, le=0.9, description=(
        "img2img and inpainting use this ratio instead when it is not 0 (and the request does not override "
        "token_merging_ratio)."))
    token_merging_ratio_hr: float = Field(0.0, ge=0, le=0.9, description=(
        "The hires. fix pass uses this ratio instead when it is not 0."))
    s_min_uncond: float = Field(0.0, ge=0, le=1000, description=(
        "Negative Guidance minimum sigma (NGMS; a speed/quality trade-off): below this noise level every other "
        "model evaluation runs the prompt alone, without the negative prompt. 0: off."))
    s_min_uncond_all: bool = Field(False, description="NGMS skips the negative prompt at every evaluation below it.")
    sd_vae_encode_method: str = Field("Full", description=(
        "VAE type for encode (img2img, inpainting, hires. fix upscaled in pixels): Full (the checkpoint's VAE) or "
        "TAESD (the tiny autoencoder in the models folder's VAE-approx/: much faster, a little softer)."))
    sd_vae_decode_method: str = Field("Full", description="VAE type for decode: Full or TAESD (as for encode).")
    initial_noise_multiplier: float = Field(1.0, ge=0, description=(
        "Noise multiplier for img2img: the start noise times this (1: as drawn; A1111's slider goes to 1.5)."))
    img2img_extra_noise: float = Field(0.0, ge=0, le=1, description=(
        "Extra noise multiplier for img2img and hires fix: the start noise once more, times this, on top of "
        "the start (0: off; keep it below the denoising strength)."))
    face_restoration: bool = Field(False, description="Restore faces for requests that leave restore_faces out.")
    face_restoration_model: str = Field("CodeFormer", description="The face restorer: CodeFormer or GFPGAN.")
    code_former_weight: float = Field(0.5, ge=0, le=1, description=(
        "CodeFormer weight: 0 restores most, 1 keeps most of the face."))
    uni_pc_order: int = Field(3, ge=1, le=50, description=(
        "UniPC order: the order of the UniPC sampler's solver (lower at the start and the end; at most the steps)."))
    beta_dist_alpha: float = Field(0.6, ge=0.01, le=10, description="Beta scheduler - alpha: the Beta schedule's shape.")
    beta_dist_beta: float = Field(0.6, ge=0.01, le=10, description="Beta scheduler - beta: the Beta schedule's shape.")
    sgm_noise_multiplier: bool = Field(False, description=(
        "SGM noise multiplier: txt2img's start noise scaled as Stability's SGM code (SDXL's reference) scales it, "
        "to reproduce its pictures (k-diffusion samplers)."))
    hires_fix_refiner_pass: str = Field("second pass", description=(
        "Hires fix: which pass to enable refiner for: 'first pass', 'second pass' or 'both passes'."))
    interrogate_return_ranks: bool = Field(False, description=(
        "Interrogate: include ranks of model tags matches in results (each CLIP match as (text:score))."))
    interrogate_clip_num_beams: int = Field(1, ge=1, le=16, description="Interrogate: num_beams for BLIP's caption.")
    interrogate_clip_min_length: int = Field(24, ge=1, le=128, description="Interrogate: minimum caption length (tokens).")
    interrogate_clip_max_length: int = Field(48, ge=1, le=256, description="Interrogate: maximum caption length (tokens).")
    interrogate_clip_dict_limit: int = Field(1500, ge=0, le=100000, description=(
        "CLIP: maximum number of lines in a word list file (0: no limit)."))
    interrogate_deepbooru_score_threshold: float = Field(0.5, ge=0, le=1, description=(
        "deepbooru: the least probability a tag needs to be in the prompt."))
    deepbooru_sort_alpha: bool = Field(True, description="deepbooru: tags by name (else by probability, highest first).")
    deepbooru_use_spaces: bool = Field(True, description="deepbooru: spaces instead of underscores in tags.")
    deepbooru_escape: bool = Field(True, description="deepbooru: backslash before brackets (and backslashes) in tags.")
    deepbooru_filter_tags: str = Field("", description="deepbooru: tags left out, comma-separated.")
    eta_ddim: float = Field(0.0, description="Eta for DDIM (0: deterministic) where a request sets no eta.")
    eta_ancestral: float = Field(1.0, description="Eta for the ancestral and SDE samplers where a request sets no eta.")
    s_churn: float = Field(0.0, description="Sigma churn (Euler, Heun, DPM2) where a request sets none.")
    s_tmin: float = Field(0.0, description="Sigma tmin: churn only above this sigma.")
    s_tmax: float = Field(0.0, description="Sigma tmax: churn only below this sigma (0: no upper bound).")
    s_noise: float = Field(1.0, description="Sigma noise: the churn noise's scale.")
    sigma_min: float = Field(0.0, description="The schedule's smallest sigma (0: the model's own).")
    sigma_max: float = Field(0.0, description="The schedule's largest sigma (0: the model's own).")
    rho: float = Field(0.0, description="The Karras/polyexponential schedule's rho (0: the schedule's own).")
    always_discard_next_to_last_sigma: bool = Field(False, description="Always discard next-to-last sigma.")
    sd_hypernetwork: str = Field("None", description=(
        "Add hypernetwork to prompt: 'None' or a name from /sdapi/v1/hypernetworks, whose <hypernet:name:m> tag "
        "(m: extra_networks_default_multiplier) ends every prompt that has no tag of it."))
    extra_networks_default_multiplier: float = Field(1.0, description=(
        "Default multiplier for extra networks: the strength of the sd_hypernetwork tag."))
    return_grid: bool = Field(True, description="Show grid in gallery: a saved batch's grid comes first among the images.")
    grid_save: bool = Field(True, description="Always save all generated image grids (with save_images).")
    sdxl_crop_top: int = Field(0, ge=0, le=8192, description="SDXL crop top coordinate: the crop SDXL is conditioned on.")
    sdxl_crop_left: int = Field(0, ge=0, le=8192, description="SDXL crop left coordinate.")
    sdxl_refiner_high_aesthetic_score: float = Field(6.0, ge=0, le=10, description=(
        "SDXL high aesthetic score: the score an SDXL refiner-architecture model is conditioned on for the prompt."))
    sdxl_refiner_low_aesthetic_score: float = Field(2.5, ge=0, le=10, description=(
        "SDXL low aesthetic score: the score an SDXL refiner-architecture model is conditioned on for the negative "
        "prompt."))
    tiling: bool = Field(False, description="Tiling: make tileable pictures where a request leaves `tiling` out.")
    img2img_color_correction: bool = Field(False, description=(
        "Apply color correction to img2img results to match original colors: each img2img and inpainting result's "
        "LAB histograms are matched to its init picture's, keeping the result's own luminosity."))
    skip_early_cond: float = Field(0.0, ge=0, le=1, description=(
        "Ignore negative prompt during early sampling (Skip Early CFG): the share of the first model evaluations "
        "that run the prompt alone, 0 (none) to 1 (all)."))
    outdir_samples: str = Field("", description="Read-only. Empty: each kind is saved in its own folder below.")
    outdir_txt2img_samples: str = Field("", description=(
        "Read-only: where txt2img requests with save_images write (the server's --outdir decides; a folder per "
        "day inside)."))
    outdir_img2img_samples: str = Field("", description=(
        "Read-only: where img2img requests with save_images write (the server's --outdir decides)."))


class CommandFlags(WireModel):
    """GET /sdapi/v1/cmd-flags: the server's start-up flags (never the credentials)."""

    api: bool = True
    nowebui: bool = False
    listen: bool = False
    port: int = 7860
    api_auth: bool = Field(False, description="Whether HTTP Basic is required (the credentials are never shown).")
    cors_allow_origins: str | None = None
    device: str | None = None
    precision: str | None = None
    queue_size: int = 16
    allow_image_urls: bool = False
    medvram: bool = Field(False, description="Started with --vram medium (A1111's --medvram).")
    lowvram: bool = Field(False, description="Started with --vram low (A1111's --lowvram).")
    no_half_vae: bool = Field(False, description="Started with --vae-precision fp32 (A1111's --no-half-vae).")


class ControlNetVersion(WireModel):
    version: int


class ControlNetModelList(WireModel):
    model_list: list[str]


class ControlNetModuleList(WireModel):
    module_list: list[str]
    module_detail: dict[str, Any] = Field(default_factory=dict)


class ControlNetControlTypes(WireModel):
    control_types: dict[str, Any]


class ControlNetSettings(WireModel):
    control_net_unit_count: int


class ControlNetDetectResponse(WireModel):
    images: list[str]
    info: str
