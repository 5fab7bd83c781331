"""The request: frozen, validated dataclasses built at the edge (CLI, HTTP) and passed down.

Field names and defaults follow AUTOMATIC1111 1.10 where it has the same control, so a user
or a client coming from there finds every value where they expect it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, fields, replace
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InvalidParameter, UnknownName

if TYPE_CHECKING:  # PIL is only needed for type hints here
    from PIL.Image import Image

    from .pipeline.control import ControlUnit

#: A1111's random seeds are drawn from [0, 4294967294).
MAX_SEED = 4294967294
#: The largest seed taken (A1111 seeds PyTorch's generators with any 64-bit number; ComfyUI's seeds go
#: this high); a batch's seeds count on from it, wrapping round at 2**64.
SEED_LIMIT = 2**64 - 1
RESIZE_MODES = {0: "Just resize", 1: "Crop and resize", 2: "Resize and fill", 3: "Just resize (latent upscale)"}
RNG_SOURCES = ("gpu", "cpu", "nv")
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")
#: A1111's "Live preview method" values (``show_progress_type``); pipeline/preview.py says what each does.
PREVIEW_METHODS = ("Full", "Approx NN", "Approx cheap", "TAESD")
#: Hires. fix upscalers that work on the latent (A1111's ``latent_upscale_modes``): the name →
#: (``torch.nn.functional.interpolate`` mode, antialias). "Latent" is A1111's default.
HIRES_LATENT_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
#: Hires. fix upscalers that work on the decoded first-pass picture: A1111's built-in ones.
#: Upscaling models (ESRGAN, Real-ESRGAN) in the models folder work there too (pipeline/upscale.py).
HIRES_PIXEL_UPSCALERS = ("None", "Lanczos", "Nearest")
HIRES_UPSCALERS = (*HIRES_LATENT_MODES, *HIRES_PIXEL_UPSCALERS)
DEFAULT_HIRES_UPSCALER = "Latent"
#: The largest token merging ratio A1111's settings allow (models/tome.py).
MAX_TOKEN_MERGING_RATIO = 0.9
#: The largest "Negative Guidance minimum sigma" taken: above every SD/SDXL noise level (A1111's
#: slider ends at 15; its API takes any number).
MAX_S_MIN_UNCOND = 1000.0
#: The largest img2img noise multiplier accepted (A1111's slider ends at 1.5; its API takes any number).
MAX_NOISE_MULTIPLIER = 4.0
#: The largest FreeU factor accepted (ComfyUI's bound; Forge's sliders stop at 2 for b, 4 for s).
MAX_FREEU = 10.0
#: A1111's "VAE type for encode/decode": the checkpoint's VAE or TAESD (pipeline/vae_type.py).
VAE_METHODS = ("Full", "TAESD")
#: The values A1111's infotexts and UI use for "the same as the first pass".
_SAME_AS_FIRST_PASS = ("", "use same sampler", "use same scheduler", "use same checkpoint")


def vae_method_name(value: object, field: str = "vae_decode_method") -> str:
    """A1111's spelling of a VAE type ("Full" or "TAESD", any case); anything else names ``field``."""
    name = _spelled(value, VAE_METHODS)
    if name is None:
        raise InvalidParameter(field, value, " or ".join(VAE_METHODS))
    return name


def _spelled(value: object, names: tuple[str, ...]) -> str | None:
    """The name of ``names`` that ``value`` is, in its own spelling (matched without regard to case or
    surrounding spaces), or None."""
    if isinstance(value, str):
        return next((name for name in names if value.strip().lower() == name.lower()), None)
    return None


def preview_method_name(value: object, field: str = "preview_method") -> str:
    """A live preview method in A1111's spelling (matched without regard to case)."""
    name = _spelled(value, PREVIEW_METHODS)
    if name is None:
        raise InvalidParameter(field, value, "one of " + ", ".join(PREVIEW_METHODS))
    return name


def random_seed() -> int:
    """A fresh seed in A1111's range; what gets recorded is this value, never -1."""
    return random.randrange(MAX_SEED)


def _is_image(value: object) -> bool:
    """A PIL image, told by what the pipeline uses of one (PIL itself is not imported here)."""
    return all(hasattr(value, name) for name in ("size", "mode", "convert"))


def _check_image(name: str, value: object) -> None:
    if not _is_image(value):
        shown = str(value) if isinstance(value, (str, PathLike)) else type(value).__name__
        raise InvalidParameter(name, shown, "a PIL image (for a file, use PIL.Image.open or "
                                            "underpaint.imageio.load.load_image; Engine.img2img takes paths)")


def check_control_strength(weight: float, start: float, end: float, *,
                           names: tuple[str, str, str] = ("control weight", "guidance_start", "guidance_end")) -> None:
    """A ControlNet unit's weight (0 to 2) and guidance range (0 to 1, start at most end), refused by ``names``."""
    _check_range(names[0], weight, 0.0, 2.0)
    _check_range(names[1], start, 0.0, 1.0)
    _check_range(names[2], end, 0.0, 1.0)
    if start > end:
        raise InvalidParameter(names[1], start, f"at most {names[2]} ({end})")


def _check_range(name: str, value: float, lo: float, hi: float, *, integer: bool = False) -> None:
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise InvalidParameter(name, value, f"{kind} from {lo} to {hi}")
    if not math.isfinite(value) or not lo <= value <= hi:
        raise InvalidParameter(name, value, f"{kind} from {lo} to {hi}")


@dataclass(frozen=True)
class SamplerOptions:
    """Per-sampler knobs (A1111's settings of the same names); None means the sampler's default."""

    eta: float | None = None
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0
    sigma_min: float | None = None
    sigma_max: float | None = None
    rho: float | None = None
    discard_penultimate_sigma: bool | None = None
    #: A1111's "UniPC order" setting: the order of the UniPC solver (lower at the start and the end;
    #: at most the steps' count).
    unipc_order: int = 3
    #: A1111's "Beta scheduler - alpha/beta" settings (infotext "Beta schedule alpha/beta"): the shape of
    #: the Beta schedule's distribution.
    beta_alpha: float = 0.6
    beta_beta: float = 0.6

    def __post_init__(self) -> None:
        _check_range("unipc_order", self.unipc_order, 1, 50, integer=True)
        for name in ("beta_alpha", "beta_beta"):
            _check_range(name, getattr(self, name), 0.01, 10.0)
        if self.eta is not None:  # A1111's sliders: eta 0-1, churn and noise 0-100 (larger etas are taken)
            _check_range("eta", self.eta, 0.0, 10.0)
        _check_range("s_churn", self.s_churn, 0.0, 100.0)
        _check_range("s_noise", self.s_noise, 0.0, 100.0)


@dataclass(frozen=True)
class InpaintOptions:
    """A1111's inpaint controls; only used when a mask is given."""

    mask_blur_x: int = 4
    mask_blur_y: int = 4
    masked_content: str = "original"
    full_res: bool = False  # "Inpaint area: Only masked"
    full_res_padding: int = 32
    invert: bool = False
    mask_weight: float = 1.0  # "Conditional mask weight" for 9-channel models
    soft: bool = False  # grey levels mean partial change (differential inpainting)
    mask_round: bool = True  # A1111's mask_round: alpha masks and the latent mask rounded to 0/1
    color_correction: bool = False  # match the result's colours to the original where unmasked

    def __post_init__(self) -> None:
        for name in ("mask_blur_x", "mask_blur_y"):
            _check_range(name, getattr(self, name), 0, 256)
        _check_range("full_res_padding", self.full_res_padding, 0, 4096, integer=True)
        _check_range("mask_weight", self.mask_weight, 0.0, 1.0)
        if self.masked_content not in MASKED_CONTENT:
            raise InvalidParameter("masked_content", self.masked_content, "one of " + ", ".join(MASKED_CONTENT))


@dataclass(frozen=True)
class DeepCacheOptions:
    """DeepCache for SD/SDXL UNets (pipeline/deepcache.py): every ``interval``-th sampler step runs the
    whole UNet, the steps between reuse its deep features and run only the shallow ``branch``.

    Steps before ``start`` and from ``end`` on (None: the last step) always run in full; the
    first step always does. Interval 1 caches nothing. A speed/quality trade-off, off by default.
    """

    interval: int = 3
    branch: int = 0
    start: int = 0
    end: int | None = None

    def __post_init__(self) -> None:
        _check_range("deepcache_interval", self.interval, 1, 1000, integer=True)
        # 0-11 on SD 1.x/2.x, 0-8 on SDXL: checked against the UNet when the request runs.
        _check_range("deepcache_branch", self.branch, 0, 63, integer=True)
        _check_range("deepcache_start", self.start, 0, 1000, integer=True)
        if self.end is not None:
            _check_range("deepcache_end", self.end, 1, 1000, integer=True)
            if self.end <= self.start:
                raise InvalidParameter("deepcache_end", self.end, f"a step after deepcache_start ({self.start})")


def names_no_checkpoint(value: object) -> bool:
    """Whether a refiner checkpoint value means none, as A1111 takes them: absent, empty or "None"."""
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "none"))


#: The face restorers A1111 offers (its "face_restoration_model" setting); CodeFormer is its default.
FACE_RESTORERS = ("CodeFormer", "GFPGAN")


def restorer_name(value: object, field: str = "face_restoration_model") -> str:
    """One of :data:`FACE_RESTORERS`, spelled as A1111 does (any case)."""
    for name in FACE_RESTORERS:
        if isinstance(value, str) and value.strip().lower() == name.lower():
            return name
    raise UnknownName(field, value, FACE_RESTORERS)


#: A1111's "Hires fix: which pass to enable refiner for" choices (its default: the second pass).
HIRES_REFINER_PASSES = ("first pass", "second pass", "both passes")


@dataclass(frozen=True)
class RefinerOptions:
    """A1111's "Refiner" (pipeline/refiner.py): sampling goes on with another checkpoint once the
    noise level is low enough: when the share of the model's 1000 training noise levels already
    passed reaches ``switch_at``. ``checkpoint``: a path, or a name in the models folder.
    ``hires_pass``: with hires. fix, the pass (or passes) it takes part in (A1111's "Hires fix: which
    pass to enable refiner for"); each pass switches by its own noise levels and starts on the model."""

    checkpoint: str
    switch_at: float = 0.8
    hires_pass: str = "second pass"

    def __post_init__(self) -> None:
        if not isinstance(self.checkpoint, (str, PathLike)) or not str(self.checkpoint).strip():
            raise InvalidParameter("refiner_checkpoint", self.checkpoint, "a checkpoint's path or name")
        object.__setattr__(self, "checkpoint", str(self.checkpoint).strip())
        _check_range("refiner_switch_at", self.switch_at, 0.0, 1.0)
        object.__setattr__(self, "hires_pass", hires_refiner_pass(self.hires_pass))

    def in_pass(self, second: bool) -> bool:
        """Whether the refiner takes part in hires. fix's first (False) or second (True) pass."""
        return self.hires_pass == "both passes" or self.hires_pass == ("second pass" if second else "first pass")


def hires_refiner_pass(value: object, field: str = "hires_fix_refiner_pass") -> str:
    """One of :data:`HIRES_REFINER_PASSES`, spelled as A1111 does (case and a missing "pass" forgiven)."""
    if isinstance(value, str):
        word = value.strip().lower()
        for choice in HIRES_REFINER_PASSES:
            if word in (choice, choice.split()[0]):
                return choice
    raise UnknownName(field, value, HIRES_REFINER_PASSES)


@dataclass(frozen=True)
class FreeUOptions:
    """FreeU (models/freeu.py), as ComfyUI's FreeU_V2 and Forge's "FreeU Integrated": the UNet decoder's
    backbone features scaled by ``b1``/``b2`` and its skip features' lowest frequencies by ``s1``/``s2``
    (1 leaves each as it is). The defaults are Forge's. A picture-quality trade-off, off by default."""

    b1: float = 1.01
    b2: float = 1.02
    s1: float = 0.99
    s2: float = 0.95

    def __post_init__(self) -> None:
        for name in ("b1", "b2", "s1", "s2"):
            _check_range(f"freeu_{name}", getattr(self, name), 0.0, MAX_FREEU)


def hires_upscaler_name(value: object, field: str = "hires_upscaler") -> str:
    """A hires. fix upscaler: a built-in one in A1111's spelling (matched without regard to case),
    or the name of an upscaling model, kept as given (without surrounding spaces) and looked up in
    the models folder when the request runs (pipeline/upscale.py)."""
    if isinstance(value, str):
        for name in HIRES_UPSCALERS:
            if value.strip().lower() == name.lower():
                return name
        text = value.strip()
        if text and len(text) <= 255 and "\x00" not in text:
            return text
    raise InvalidParameter(field, value, "one of " + ", ".join(HIRES_UPSCALERS)
                           + ", or the name of an upscaling model in the models folder (ESRGAN, Real-ESRGAN)")


@dataclass(frozen=True)
class SDUpscaleOptions:
    """A1111's img2img script "SD upscale" (pipeline/sd_upscale.py): the init picture enlarged by
    ``scale`` with ``upscaler`` (a picture upscaler: "None", "Lanczos", "Nearest" or an upscaling
    model's name), cut into tiles of the request's width x height overlapping by ``overlap``
    pixels, each tile repainted by img2img, and the tiles blended back together."""

    scale: float = 2.0
    #: "None" keeps the picture's size (the scale is then unused), as in A1111.
    upscaler: str = "Lanczos"
    overlap: int = 64

    def __post_init__(self) -> None:
        _check_range("sd_upscale_scale", self.scale, 1.0, 8.0)
        _check_range("sd_upscale_overlap", self.overlap, 0, 256, integer=True)
        if not isinstance(self.upscaler, str) or not self.upscaler.strip():
            raise InvalidParameter("sd_upscale_upscaler", self.upscaler, "an upscaler's name")
        object.__setattr__(self, "upscaler", self.upscaler.strip())


#: The denoising strength curves of A1111's Loopback script: how the strength moves from the request's
#: to the final one over the loops (pipeline/loopback.py).
LOOPBACK_CURVES = ("Aggressive", "Linear", "Lazy")
#: What Loopback may append to each pass's prompt.
LOOPBACK_INTERROGATIONS = ("None", "CLIP", "DeepBooru")
#: The most loops one Loopback request may ask for.
MAX_LOOPBACK_LOOPS = 100


@dataclass(frozen=True)
class LoopbackOptions:
    """A1111's img2img script "Loopback" (pipeline/loopback.py): the picture goes through img2img
    ``loops`` times, each pass starting from the last one's picture with the next seed, the denoising
    strength moving from the request's to ``final_strength`` along ``curve``."""

    loops: int = 4
    final_strength: float = 0.5
    curve: str = "Linear"
    #: A1111's "Append interrogated prompt at each iteration": "None", "CLIP" or "DeepBooru" (each pass's
    #: prompt is the request's, then ", ", then Interrogate CLIP's reading of the pass's picture,
    #: models/interrogate.py, or DeepBooru's tags, models/deepbooru.py).
    interrogate: str = "None"
    #: What reads a picture (``interrogator(picture) -> text``), given by whoever holds the settings;
    #: None: the interrogation with A1111's defaults on the models folder's files.
    interrogator: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        _check_range("loopback_loops", self.loops, 1, MAX_LOOPBACK_LOOPS, integer=True)
        _check_range("loopback_final_strength", self.final_strength, 0.0, 1.0)
        curve = _spelled(self.curve, LOOPBACK_CURVES)
        if curve is None:
            raise InvalidParameter("loopback_curve", self.curve, "one of " + ", ".join(LOOPBACK_CURVES))
        object.__setattr__(self, "curve", curve)
        interrogate = _spelled(self.interrogate, LOOPBACK_INTERROGATIONS)
        if interrogate is None:
            raise InvalidParameter("loopback_interrogate", self.interrogate, "None, CLIP or DeepBooru")
        object.__setattr__(self, "interrogate", interrogate)


@dataclass(frozen=True)
class XYZPlotOptions:
    """A1111's script "X/Y/Z plot" (pipeline/xyz_plot.py): one picture per combination of the X, Y
    and Z values, in a labelled grid. Each axis is a type in A1111's spelling ("Nothing", "Seed",
    "CFG Scale", "Prompt S/R", ...) and its values: a comma-separated list with ranges ("1-5",
    "1-10 (+2)", "1-10 [4]", "5-9 (+0.5)"), or a list of values. The other fields are A1111's
    checkboxes and margin slider of the same names."""

    x_type: str = "Nothing"
    x_values: "str | tuple" = ""
    y_type: str = "Nothing"
    y_values: "str | tuple" = ""
    z_type: str = "Nothing"
    z_values: "str | tuple" = ""
    draw_legend: bool = True
    include_lone_images: bool = False
    include_sub_grids: bool = False
    #: "Keep -1 for seeds": each cell draws its own random seed instead of sharing a fixed one.
    no_fixed_seeds: bool = False
    vary_seeds_x: bool = False
    vary_seeds_y: bool = False
    vary_seeds_z: bool = False
    #: Pixels between the pictures of an annotated grid (``draw_legend``), 0 to 500.
    margin_size: int = 0
    #: The prompt styles (a :class:`~underpaint.prompts.styles.StyleBook`) a "Styles" axis names; None: none.
    styles: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        from .pipeline.xyz_plot import parse_axis_values  # torch-free

        for letter in "xyz":
            values = getattr(self, f"{letter}_values")
            if isinstance(values, list):
                object.__setattr__(self, f"{letter}_values", tuple(values))
            parse_axis_values(getattr(self, f"{letter}_type"), getattr(self, f"{letter}_values"),
                              field=f"xyz_{letter}_values")
        for name in ("draw_legend", "include_lone_images", "include_sub_grids", "no_fixed_seeds", "vary_seeds_x",
                     "vary_seeds_y", "vary_seeds_z"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidParameter(f"xyz_{name}", getattr(self, name), "true or false")
        _check_range("xyz_margin_size", self.margin_size, 0, 500, integer=True)


#: A1111's Prompt matrix choices: which prompt it splits, and what joins the chosen parts.
PROMPT_MATRIX_TYPES = ("positive", "negative")
PROMPT_MATRIX_JOINERS = {"comma": ", ", "space": " "}
#: The most variable parts a Prompt matrix takes (2**12 = 4096 pictures).
MAX_PROMPT_MATRIX_PARTS = 12


@dataclass(frozen=True)
class PromptMatrixOptions:
    """A1111's script "Prompt matrix" (pipeline/prompt_matrix.py): the prompt (with ``prompt_type``
    "negative", the negative prompt) is cut at each "|" into a first part every picture keeps and the
    variable parts; one picture is made for each combination of variable parts (2**n of them), laid
    out in a grid whose labels list the parts. The fields are A1111's: the chosen parts go after the
    first part, or before it with ``put_at_start``; ``different_seeds`` gives picture i the seed + i;
    ``joiner`` "comma" joins the parts with ", ", "space" with " "; ``margin_size`` pixels between the
    grid's pictures."""

    put_at_start: bool = False
    different_seeds: bool = False
    prompt_type: str = "positive"
    joiner: str = "comma"
    margin_size: int = 0
    #: The request's prompt styles, applied to each combination's prompts (A1111 styles each picture's
    #: prompt after the script made it): ``styles(prompt, negative_prompt) -> (prompt, negative_prompt)``.
    styles: Any = field(default=None, compare=False, repr=False)
    #: What each prompt made gets last (a server's "Add hypernetwork to prompt" setting):
    #: ``add_to_prompt(prompt) -> prompt``; None: nothing.
    add_to_prompt: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("put_at_start", "different_seeds"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidParameter(f"prompt_matrix_{name}", getattr(self, name), "true or false")
        for name, names in (("prompt_type", PROMPT_MATRIX_TYPES), ("joiner", tuple(PROMPT_MATRIX_JOINERS))):
            spelled = _spelled(getattr(self, name), names)
            if spelled is None:
                raise InvalidParameter(f"prompt_matrix_{name}", getattr(self, name), "one of " + ", ".join(names))
            object.__setattr__(self, name, spelled)
        _check_range("prompt_matrix_margin_size", self.margin_size, 0, 500, integer=True)


#: ADetailer's mask merge choices.
DETAILER_MERGES = ("None", "Merge", "Merge and Invert")
#: ADetailer's "Method to filter top k masks by": the largest boxes, or the most confident finds.
DETAILER_TOP_K = ("Area", "Confidence")
#: ADetailer's ControlNet model that keeps the request's own ControlNet units for the finds' passes.
DETAILER_PASSTHROUGH = "Passthrough"
#: ADetailer's value of its separate-checkpoint setting that means the request's own model.
DETAILER_SAME_CHECKPOINT = "Use same checkpoint"
DETAILER_SAME_VAE = "Use same VAE"
#: The preprocessor ADetailer gives a ControlNet model by a word in its name, when a tab names none.
DETAILER_CONTROL_MODULES = (("inpaint", "inpaint_global_harmonious"), ("lineart", "lineart_coarse"),
                            ("openpose", "openpose_full"), ("tile", "tile_resample"), ("depth", "depth_midas"))


def detailer_control_module(model: str, module: str | None) -> str:
    """An ADetailer tab's ControlNet preprocessor: ``module`` when named (checked), else ADetailer's choice
    for ``model``'s name; InvalidParameter naming ``ad_controlnet_module`` when there is neither."""
    from .preprocess.registry import get_preprocessor

    if module is None:
        name = Path(model).name.lower()
        module = next((pre for word, pre in DETAILER_CONTROL_MODULES if word in name), None)
        if module is None:
            raise InvalidParameter("ad_controlnet_module", None, f"a preprocessor for {model!r} (ADetailer picks one "
                                                                 "only for inpaint, lineart, openpose, tile and depth "
                                                                 "models)")
    try:
        return get_preprocessor(module).name
    except UnknownName as exc:
        raise UnknownName("ad_controlnet_module", exc.value, exc.choices) from None


@dataclass(frozen=True)
class DetailerUnit:
    """One of ADetailer's tabs (pipeline/detailer.py), in its own names less the ``ad_`` prefix: what
    ``model`` finds in each finished picture (faces, hands, people) is inpainted again, one by one, at
    the request's size. ``model`` is ADetailer's file of that name in the models folder's adetailer/
    (a face model's name without its file: the face restorer's RetinaFace detector finds faces). ``prompt`` and
    ``negative_prompt`` "" take the request's; ``[PROMPT]`` in them stands for it, ``[SEP]`` gives
    each face its own, ``[SKIP]`` leaves a face alone. ``steps``, ``cfg_scale``, ``sampler`` None: the
    request's. ``mask_k`` keeps the k finds first by
    ``mask_filter_method``: "Area" (the largest boxes) or "Confidence". ``model_classes``: the classes a
    YOLO-World model looks for, comma-separated ("" all it holds). ``restore_face``: each inpainted
    picture's faces restored (the request's face restorer)."""

    model: str = "face_yolov8n.pt"
    prompt: str = ""
    negative_prompt: str = ""
    confidence: float = 0.3
    mask_k: int = 0
    mask_filter_method: str = "Area"
    model_classes: str = ""
    restore_face: bool = False
    mask_min_ratio: float = 0.0
    mask_max_ratio: float = 1.0
    x_offset: int = 0
    y_offset: int = 0
    dilate_erode: int = 4
    mask_merge_invert: str = "None"
    mask_blur: int = 4
    denoising_strength: float = 0.4
    inpaint_only_masked: bool = True
    inpaint_only_masked_padding: int = 32
    inpaint_width: int | None = None
    inpaint_height: int | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    sampler: str | None = None
    #: With ``sampler``: its schedule type (None: the sampler's own, "Automatic").
    scheduler: str | None = None
    #: ADetailer's separate noise multiplier and CLIP skip for the finds' passes (None: the request's).
    noise_multiplier: float | None = None
    clip_skip: int | None = None
    #: ADetailer's ControlNet for the finds' passes: a model's name or file (None: none; "Passthrough": the
    #: request's own units), its preprocessor (None: the one ADetailer picks from the model's name), weight
    #: and guidance range; the unit reads the picture being fixed (and the find's mask), pixel perfect.
    controlnet_model: str | None = None
    controlnet_module: str | None = None
    controlnet_weight: float = 1.0
    controlnet_guidance_start: float = 0.0
    controlnet_guidance_end: float = 1.0
    #: ADetailer's separate checkpoint for the finds' passes (a checkpoint's name, title or path; None, ""
    #: or "Use same checkpoint": the request's model). ``checkpoint_title`` is what the infotext records.
    checkpoint: str | None = None
    checkpoint_title: str | None = field(default=None, compare=False)
    #: ADetailer's separate VAE for the finds' passes: a VAE's name in the models folder, or "None" (the
    #: checkpoint's own); None, "", "Automatic" or "Use same VAE": the one the picture was made with.
    vae: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise InvalidParameter("ad_model", self.model, "a detection model's name, e.g. face_yolov8n.pt")
        if self.checkpoint is not None and (not isinstance(self.checkpoint, str) or len(self.checkpoint) > 1024):
            raise InvalidParameter("ad_checkpoint", self.checkpoint, "a checkpoint's name or title")
        if isinstance(self.checkpoint, str) and self.checkpoint.strip() in ("", "None", DETAILER_SAME_CHECKPOINT):
            object.__setattr__(self, "checkpoint", None)
        if self.vae is not None and (not isinstance(self.vae, str) or len(self.vae) > 1024):
            raise InvalidParameter("ad_vae", self.vae, "a VAE's name, or None (the checkpoint's own)")
        if isinstance(self.vae, str) and self.vae.strip() in ("", "Automatic", DETAILER_SAME_VAE):
            object.__setattr__(self, "vae", None)
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise InvalidParameter(f"ad_{name}", getattr(self, name), "text")
        for name in ("confidence", "mask_min_ratio", "mask_max_ratio", "denoising_strength"):
            _check_range(f"ad_{name}", getattr(self, name), 0.0, 1.0)
        _check_range("ad_mask_k", self.mask_k, 0, 1000, integer=True)
        for name in ("x_offset", "y_offset", "dilate_erode"):
            _check_range(f"ad_{name}", getattr(self, name), -1024, 1024, integer=True)
        _check_range("ad_mask_blur", self.mask_blur, 0, 256, integer=True)
        _check_range("ad_inpaint_only_masked_padding", self.inpaint_only_masked_padding, 0, 1024, integer=True)
        if not isinstance(self.inpaint_only_masked, bool):
            raise InvalidParameter("ad_inpaint_only_masked", self.inpaint_only_masked, "true or false")
        method = _spelled(self.mask_filter_method, DETAILER_TOP_K)
        if method is None:
            raise InvalidParameter("ad_mask_filter_method", self.mask_filter_method, "one of " + ", ".join(DETAILER_TOP_K))
        object.__setattr__(self, "mask_filter_method", method)
        if not isinstance(self.model_classes, str) or len(self.model_classes) > 4096:
            raise InvalidParameter("ad_model_classes", self.model_classes, "class names separated by commas")
        if not isinstance(self.restore_face, bool):
            raise InvalidParameter("ad_restore_face", self.restore_face, "true or false")
        merge = _spelled(self.mask_merge_invert, DETAILER_MERGES)
        if merge is None:
            raise InvalidParameter("ad_mask_merge_invert", self.mask_merge_invert, "one of " + ", ".join(DETAILER_MERGES))
        object.__setattr__(self, "mask_merge_invert", merge)
        for name in ("inpaint_width", "inpaint_height"):
            if getattr(self, name) is not None:
                _check_range(f"ad_{name}", getattr(self, name), 64, 8192, integer=True)
        if self.steps is not None:
            _check_range("ad_steps", self.steps, 1, 1000, integer=True)
        if self.noise_multiplier is not None:
            _check_range("ad_noise_multiplier", self.noise_multiplier, 0.0, MAX_NOISE_MULTIPLIER)
        if self.controlnet_model in ("", "None"):
            object.__setattr__(self, "controlnet_model", None)
        if self.controlnet_module in ("", "None"):
            object.__setattr__(self, "controlnet_module", None)
        if self.controlnet_model is not None:
            if not isinstance(self.controlnet_model, str):
                raise InvalidParameter("ad_controlnet_model", self.controlnet_model, "a ControlNet model's name")
            check_control_strength(self.controlnet_weight, self.controlnet_guidance_start,
                                   self.controlnet_guidance_end, names=("ad_controlnet_weight",
                                                                        "ad_controlnet_guidance_start",
                                                                        "ad_controlnet_guidance_end"))
            if self.controlnet_model != DETAILER_PASSTHROUGH:
                object.__setattr__(self, "controlnet_module", detailer_control_module(self.controlnet_model,
                                                                                      self.controlnet_module))
        if self.clip_skip is not None:
            _check_range("ad_clip_skip", self.clip_skip, 1, 12, integer=True)
        if self.cfg_scale is not None:
            _check_range("ad_cfg_scale", self.cfg_scale, 0.0, 100.0)
        if self.sampler is not None:
            from .sampling.names import resolve_sampler

            try:
                resolve_sampler(self.sampler, self.scheduler or "Automatic")
            except UnknownName as exc:
                raise UnknownName("ad_sampler" if exc.field == "sampler" else "ad_scheduler",
                                  exc.value, exc.choices) from None


#: Where A1111's "Prompts from file or textbox" puts a line's prompt beside the request's.
PROMPT_POSITIONS = ("start", "end")


@dataclass(frozen=True)
class PromptsFromFileOptions:
    """A1111's script "Prompts from file or textbox" (pipeline/prompts_file.py): one request per
    non-empty line of ``text``. A line is a prompt, or A1111's options (``--prompt "a cat" --steps 30
    --cfg_scale 5 ...``) for that line's request; a line's prompt goes at the ``position`` ("start"
    or "end") of the request's prompt, joined by a space. ``iterate_seed`` ("Iterate seed every
    line") moves the seed on by batch size x batch count after each line; ``same_seed`` ("Use same
    random seed for all lines") fixes a -1 seed once for every line (iterate_seed does too).
    ``combined`` (Forge's "Make a combined image containing all outputs") puts a grid of every
    picture first."""

    text: str = ""
    iterate_seed: bool = False
    same_seed: bool = False
    position: str = "start"
    combined: bool = False
    #: The request's prompt styles, applied to each line's prompts (see PromptMatrixOptions.styles).
    styles: Any = field(default=None, compare=False, repr=False)
    #: What each line's prompt gets last (see PromptMatrixOptions.add_to_prompt).
    add_to_prompt: Any = field(default=None, compare=False, repr=False)
    #: The styles file a line's ``--styles`` names styles of (a StyleBook); None: no styles file.
    style_book: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        from .pipeline.prompts_file import parse_lines  # torch-free

        if not isinstance(self.text, str):
            raise InvalidParameter("prompts_text", type(self.text).__name__, "text, a line for each request")
        for name in ("iterate_seed", "same_seed", "combined"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidParameter(f"prompts_{name}", getattr(self, name), "true or false")
        position = _spelled(self.position, PROMPT_POSITIONS)
        if position is None:
            raise InvalidParameter("prompts_position", self.position, "one of " + ", ".join(PROMPT_POSITIONS))
        object.__setattr__(self, "position", position)
        parse_lines(self.text, self.style_book)  # every line checked before the first request runs


@dataclass(frozen=True)
class HiresOptions:
    """A1111's "Hires. fix" for txt2img: a second pass over the first picture, upscaled.

    The first pass runs at the request's size; its latent (Latent modes) or its decoded picture
    (None, Lanczos, Nearest) is upscaled to the hires size, and an img2img pass at ``strength``
    runs exactly ``steps`` steps on it (0: as many as the first pass), with the same seeds.
    The size is ``scale`` times the first pass's, unless ``resize_x``/``resize_y`` are given (one of
    them 0 keeps the aspect ratio; both given crop to that size after covering it).
    ``sampler``, ``scheduler`` and the prompts default (None, "") to the first pass's.
    """

    scale: float = 2.0
    resize_x: int = 0
    resize_y: int = 0
    #: None is A1111's default, "Latent", and is not written to the infotext (as an API request
    #: without ``hr_upscaler``).
    upscaler: str | None = None
    steps: int = 0
    strength: float = 0.7
    sampler: str | None = None
    scheduler: str | None = None
    prompt: str = ""
    negative_prompt: str = ""
    #: Token merging in the second pass (A1111's ``token_merging_ratio_hr``); 0: the first pass's.
    token_merging_ratio: float = 0.0
    #: A1111's "Hires checkpoint": another checkpoint (a path, or a name in the models folder) of the same
    #: family for the second pass; None (or "Use same checkpoint"): the request's.
    checkpoint: str | None = None
    #: The hires checkpoint's A1111 title (``name [hash]``) for the infotext; set by the engine that loads it.
    checkpoint_title: str | None = None

    def __post_init__(self) -> None:
        _check_range("hires_scale", self.scale, 0.25, 8.0)
        _check_range("hires_token_merging_ratio", self.token_merging_ratio, 0.0, MAX_TOKEN_MERGING_RATIO)
        for name in ("resize_x", "resize_y"):
            _check_range(f"hires_{name}", getattr(self, name), 0, 8192, integer=True)
        _check_range("hires_steps", self.steps, 0, 1000, integer=True)
        _check_range("hires_strength", self.strength, 0.0, 1.0)
        if self.strength == 0:
            raise InvalidParameter("hires_strength", self.strength,
                                   "a number above 0 and at most 1 (0 would skip the hires pass)")
        if self.upscaler is not None:
            object.__setattr__(self, "upscaler", hires_upscaler_name(self.upscaler))
        for name in ("sampler", "scheduler"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise InvalidParameter(f"hires_{name}", value, "a name")
            if isinstance(value, str) and value.strip().lower() in _SAME_AS_FIRST_PASS:
                object.__setattr__(self, name, None)
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise InvalidParameter(f"hires_{name}", type(getattr(self, name)).__name__, "a string")
        if self.checkpoint is not None:
            if not isinstance(self.checkpoint, (str, PathLike)):
                raise InvalidParameter("hires_checkpoint", self.checkpoint, "a checkpoint's path or name")
            name = str(self.checkpoint).strip()
            object.__setattr__(self, "checkpoint", None if name.lower() in _SAME_AS_FIRST_PASS else name)

    @property
    def upscaler_name(self) -> str:
        """The upscaler that runs: "Latent" when none was named."""
        return self.upscaler or DEFAULT_HIRES_UPSCALER

    @property
    def in_latent_space(self) -> bool:
        return self.upscaler_name in HIRES_LATENT_MODES

    def target(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(upscale width, upscale height, latent columns to crop, latent rows to crop), as A1111's
        ``calculate_target_resolution`` works them out from the first pass's requested size.

        ``scale``: ``int(size * scale)``. One of ``resize_x``/``resize_y`` 0: the other side keeps
        the aspect ratio (floor division). Both: scale to cover that size, then crop the excess
        in the latent, ``excess // 8`` cells, half (rounded down) from the left or top.
        """
        rx, ry = self.resize_x, self.resize_y
        if rx == 0 and ry == 0:
            return int(width * self.scale), int(height * self.scale), 0, 0
        if ry == 0:
            return rx, rx * height // width, 0, 0
        if rx == 0:
            return ry * width // height, ry, 0, 0
        if width / height < rx / ry:
            up_w, up_h = rx, rx * height // width
        else:
            up_w, up_h = ry * width // height, ry
        return up_w, up_h, (up_w - rx) // 8, (up_h - ry) // 8

    def output_size(self, width: int, height: int, *, multiple: int = 8) -> tuple[int, int]:
        """The size of the final pictures: the cropped latent's, whole ``multiple`` blocks (8; FLUX 16)."""
        up_w, up_h, crop_x, crop_y = self.target(width, height)
        cells = multiple // 8
        return ((up_w // 8 - crop_x) // cells * multiple, (up_h // 8 - crop_y) // cells * multiple)

    def size_field(self) -> str:
        """The field that decides the hires size, to name in errors."""
        return "hires_scale" if self.resize_x == 0 and self.resize_y == 0 else "hires_resize_x"


@dataclass(frozen=True)
class GenerationParams:
    """Everything that decides an image. txt2img is img2img with no init image (strength 1)."""

    prompt: str = ""
    negative_prompt: str = ""
    init_images: tuple["Image", ...] = ()
    mask: "Image | None" = None
    strength: float = 0.75
    steps: int = 20
    cfg_scale: float = 7.0
    #: FLUX.1-dev's built-in guidance (Forge's "Distilled CFG Scale"); None = 3.5. Ignored by
    #: models without a guidance input (SD, FLUX.1-schnell).
    distilled_cfg_scale: float | None = None
    #: A1111's "Image CFG Scale" for InstructPix2Pix edit models: how closely the result keeps to the
    #: picture (1: no image guidance; A1111's default 1.5). Other models ignore it and do not record it.
    image_cfg_scale: float = 1.5
    sampler: str = "DPM++ 2M"
    scheduler: str = "Automatic"
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_w: int = 0
    seed_resize_from_h: int = 0
    width: int | None = None
    height: int | None = None
    resize_mode: int = 0
    #: A1111's "Upscaler for img2img": the upscaler (a built-in's or a model's name, as hires. fix
    #: takes them) that enlarges init pictures and "Only masked" crops when a resize makes them
    #: larger; None or "None": Lanczos, A1111's default.
    img2img_upscaler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    clip_skip: int = 1
    rng: str = "gpu"
    eta_noise_seed_delta: int = 0
    fix_steps: bool = False  # A1111's img2img_fix_steps: run exactly `steps`
    sampler_options: SamplerOptions = field(default_factory=SamplerOptions)
    inpaint: InpaintOptions = field(default_factory=InpaintOptions)
    #: Extra infotext entries supplied by callers (kept in order, written after the standard keys).
    extra_infotext: tuple[tuple[str, str], ...] = ()
    #: ControlNet units (A1111's ControlNet extension), applied in order; see pipeline.control.
    control_units: tuple["ControlUnit", ...] = ()
    #: How ``Progress.preview()`` pictures a step (A1111's "Live preview method"). The default,
    #: "Approx NN", is TAESD when its decoder file is in the models folder, else Approx cheap.
    preview_method: str = "Approx NN"
    #: A1111's "Hires. fix" (txt2img only); None: off.
    hires: HiresOptions | None = None
    #: Token merging (ToMe for SD, models/tome.py): the share of self-attention tokens merged in
    #: the UNet's full-resolution blocks, 0 (off) to 0.9. Faster, less faithful; FLUX ignores it.
    token_merging_ratio: float = 0.0
    #: DeepCache (SD/SDXL UNets; pipeline/deepcache.py); None: off.
    deepcache: DeepCacheOptions | None = None
    #: First Block Cache (FLUX transformers; pipeline/first_block_cache.py): the threshold of the
    #: first block's relative change under which the other blocks are skipped, 0 (off) to 1
    #: (0.12 is ComfyUI-WaveSpeed's suggestion for FLUX.1-dev).
    first_block_cache: float = 0.0
    #: A1111's "Negative Guidance minimum sigma" (infotext NGMS), a speed/quality trade-off: while the
    #: noise level is below it, every other model evaluation runs the prompt alone, without the
    #: negative prompt's half of the guidance batch. 0: off (pipeline/guidance.py).
    s_min_uncond: float = 0.0
    #: With ``s_min_uncond``: every evaluation below it, not every other one ("NGMS all steps").
    s_min_uncond_all: bool = False
    #: A1111's "Ignore negative prompt during early sampling" (infotext "Skip Early CFG"): the share
    #: of the run's first model evaluations, 0 (none) to 1 (all), that run the prompt alone.
    skip_early_cond: float = 0.0
    #: A1111's "VAE type for encode" and "VAE type for decode": "Full" (the checkpoint's VAE) or
    #: "TAESD" (the tiny autoencoder in the models folder's VAE-approx/; faster, softer).
    vae_encode_method: str = "Full"
    vae_decode_method: str = "Full"
    #: A1111's "Tiling": a picture that tiles seamlessly (the UNet's and VAE's convolutions wrap
    #: around its edges; models/seamless.py). SD 1.x/2.x and SDXL.
    tiling: bool = False
    #: A1111's Refiner: another checkpoint finishes the sampling (pipeline/refiner.py); None: off.
    refiner: RefinerOptions | None = None
    #: FreeU on the UNet (SD 1.x/2.x and SDXL; models/freeu.py); None: off.
    freeu: FreeUOptions | None = None
    #: A1111's "Noise multiplier for img2img" (request field ``initial_noise_multiplier``, infotext
    #: "Noise multiplier"): img2img's start noise times this, 0 to MAX_NOISE_MULTIPLIER; 1: as drawn.
    noise_multiplier: float = 1.0
    #: A1111's "Extra noise multiplier for img2img and hires fix" (infotext "Extra noise"): the start
    #: noise once more, times this, on top of img2img's and hires. fix's start, 0 (off) to 1.
    extra_noise: float = 0.0
    #: The aesthetic score an SDXL refiner-architecture model is conditioned on for the prompt and for
    #: the negative prompt (A1111's settings "SDXL high/low aesthetic score", diffusers'
    #: ``aesthetic_score``/``negative_aesthetic_score``); other models have no such input.
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    #: A1111's SDXL "crop top/left coordinate" settings: the crop SDXL models (base and refiner) are
    #: conditioned on, in pixels (0, 0: an uncropped picture, what SDXL draws best).
    sdxl_crop_top: int = 0
    sdxl_crop_left: int = 0
    #: A1111's "SGM noise multiplier": txt2img's start noise scaled by sqrt(1 + σ₀²) instead of σ₀, as
    #: Stability's SGM code (SDXL's reference) starts; only to reproduce its pictures. k-diffusion samplers.
    sgm_noise_multiplier: bool = False
    #: A1111's "Restore faces": each finished picture's faces restored (pipeline/face_restore.py) by
    #: ``face_restoration_model`` (A1111's setting: "CodeFormer", its default, or "GFPGAN") with CodeFormer
    #: at ``code_former_weight`` (0: strongest restoration, 1: weakest).
    restore_faces: bool = False
    face_restoration_model: str = "CodeFormer"
    code_former_weight: float = 0.5
    #: A1111's "Apply color correction to img2img results to match original colors"
    #: (pipeline/color_correction.py): img2img and inpainting results matched to the init picture's colours.
    img2img_color_correction: bool = False
    #: The picture colour correction matches instead of the init picture as the pass prepares it
    #: (Loopback passes the request's own picture, so colours cannot drift from pass to pass).
    color_reference: Any = None
    #: A1111's "SD upscale" img2img script; None: off.
    sd_upscale: SDUpscaleOptions | None = None
    #: A1111's "Loopback" img2img script; None: off.
    loopback: LoopbackOptions | None = None
    #: A1111's "X/Y/Z plot" script; None: off.
    xyz_plot: XYZPlotOptions | None = None
    #: A1111's "Prompt matrix" script; None: off.
    prompt_matrix: PromptMatrixOptions | None = None
    #: A1111's "Prompts from file or textbox" script; None: off.
    prompts_from_file: PromptsFromFileOptions | None = None
    #: ADetailer's tabs (pipeline/detailer.py): each finished picture's faces inpainted again; () off.
    detailer: tuple = ()
    #: False: the prompt's ``<lora:...>``/``<hypernet:...>`` tags are taken out of the text but not applied
    #: (A1111's ``disable_extra_networks``). Embeddings still apply.
    extra_networks: bool = True
    #: A1111's "Enable comments": ``#`` hides the rest of its line of a prompt (prompts/comments.py).
    prompt_comments: bool = True

    def __post_init__(self) -> None:
        from .sampling.names import resolve_sampler  # torch-free table

        images = self.init_images
        if _is_image(images) or not isinstance(images, (tuple, list)):
            raise InvalidParameter("init_images", type(images).__name__,
                                   "a tuple of PIL images, e.g. init_images=(image,)")
        for i, image in enumerate(images):
            _check_image(f"init_images[{i}]", image)
        object.__setattr__(self, "init_images", tuple(images))
        if self.mask is not None:
            _check_image("mask", self.mask)
        _check_range("strength", self.strength, 0.0, 1.0)
        _check_range("steps", self.steps, 1, 1000, integer=True)
        _check_range("cfg_scale", self.cfg_scale, 0.0, 100.0)
        if self.distilled_cfg_scale is not None:
            _check_range("distilled_cfg_scale", self.distilled_cfg_scale, 0.0, 100.0)
        _check_range("image_cfg_scale", self.image_cfg_scale, 0.0, 100.0)
        _check_range("seed", self.seed, -1, SEED_LIMIT, integer=True)
        _check_range("subseed", self.subseed, -1, SEED_LIMIT, integer=True)
        _check_range("subseed_strength", self.subseed_strength, 0.0, 1.0)
        _check_range("batch_size", self.batch_size, 1, 64, integer=True)
        _check_range("n_iter", self.n_iter, 1, 10000, integer=True)
        _check_range("clip_skip", self.clip_skip, 1, 12, integer=True)
        _check_range("eta_noise_seed_delta", self.eta_noise_seed_delta, 0, 2**32 - 1, integer=True)
        _check_range("token_merging_ratio", self.token_merging_ratio, 0.0, MAX_TOKEN_MERGING_RATIO)
        _check_range("first_block_cache", self.first_block_cache, 0.0, 1.0)
        _check_range("s_min_uncond", self.s_min_uncond, 0.0, MAX_S_MIN_UNCOND)
        if self.color_reference is not None:
            _check_image("color_reference", self.color_reference)
        for name in ("s_min_uncond_all", "tiling", "img2img_color_correction", "sgm_noise_multiplier",
                     "restore_faces", "extra_networks"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidParameter(name, getattr(self, name), "true or false")
        _check_range("skip_early_cond", self.skip_early_cond, 0.0, 1.0)
        _check_range("noise_multiplier", self.noise_multiplier, 0.0, MAX_NOISE_MULTIPLIER)
        _check_range("extra_noise", self.extra_noise, 0.0, 1.0)
        for name in ("aesthetic_score", "negative_aesthetic_score"):
            _check_range(name, getattr(self, name), 0.0, 10.0)
        for name in ("sdxl_crop_top", "sdxl_crop_left"):
            _check_range(name, getattr(self, name), 0, 8192, integer=True)
        object.__setattr__(self, "face_restoration_model", restorer_name(self.face_restoration_model))
        _check_range("code_former_weight", self.code_former_weight, 0.0, 1.0)
        for name in ("vae_encode_method", "vae_decode_method"):
            object.__setattr__(self, name, vae_method_name(getattr(self, name), name))
        for name in ("seed_resize_from_w", "seed_resize_from_h"):
            _check_range(name, getattr(self, name), 0, 8192, integer=True)
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None:
                _check_range(name, value, 64, 8192, integer=True)
        if self.resize_mode not in RESIZE_MODES:
            raise InvalidParameter("resize_mode", self.resize_mode, "0 (just resize), 1 (crop and resize), 2 (resize and fill) or 3")
        if self.rng not in RNG_SOURCES:
            raise InvalidParameter("rng", self.rng, "one of " + ", ".join(RNG_SOURCES))
        if self.img2img_upscaler is not None and (not isinstance(self.img2img_upscaler, str)
                                                  or not self.img2img_upscaler.strip()):
            raise InvalidParameter("img2img_upscaler", self.img2img_upscaler, "an upscaler's name, or None")
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            raise InvalidParameter("prompt", type(self.prompt).__name__, "a string")
        if self.inpaint.masked_content not in MASKED_CONTENT:
            raise InvalidParameter("masked_content", self.inpaint.masked_content, "one of " + ", ".join(MASKED_CONTENT))
        object.__setattr__(self, "preview_method", preview_method_name(self.preview_method))
        if self.sd_upscale is not None:
            self._check_sd_upscale()
        if self.xyz_plot is not None and not isinstance(self.xyz_plot, XYZPlotOptions):
            raise InvalidParameter("xyz_plot", type(self.xyz_plot).__name__, "XYZPlotOptions or None")
        if self.xyz_plot is not None and self.sd_upscale is not None:
            raise InvalidParameter("xyz_plot", "with sd_upscale", "one script at a time (X/Y/Z plot or SD upscale)")
        if self.loopback is not None:
            self._check_loopback()
        self._check_prompt_scripts()
        object.__setattr__(self, "detailer", tuple(self.detailer))
        if not all(isinstance(unit, DetailerUnit) for unit in self.detailer):
            raise InvalidParameter("detailer", self.detailer, "DetailerUnit records")
        if self.deepcache is not None and not isinstance(self.deepcache, DeepCacheOptions):
            raise InvalidParameter("deepcache", type(self.deepcache).__name__, "DeepCacheOptions or None")
        if self.control_units:
            from .pipeline.control import ControlUnit

            units = tuple(self.control_units)
            if not all(isinstance(u, ControlUnit) for u in units):
                raise InvalidParameter("control_units", units, "ControlUnit records")
            object.__setattr__(self, "control_units", units)
        # Canonicalise names so infotext and caches see one spelling; legacy combined names
        # ("DPM++ 2M Karras") split into sampler + schedule.
        sampler, schedule = resolve_sampler(self.sampler, self.scheduler)
        if self.hires is not None:
            object.__setattr__(self, "hires", self._checked_hires(sampler, schedule))
        object.__setattr__(self, "sampler", sampler)
        object.__setattr__(self, "scheduler", schedule)

    def _check_loopback(self) -> None:
        if not isinstance(self.loopback, LoopbackOptions):
            raise InvalidParameter("loopback", type(self.loopback).__name__, "LoopbackOptions or None")
        if not self.init_images:
            raise InvalidParameter("loopback", "without init_images", "an img2img request (Loopback feeds its "
                                                                      "picture back in)")
        if self.sd_upscale is not None or self.xyz_plot is not None:
            raise InvalidParameter("loopback", "with another script", "one script at a time (Loopback, SD upscale "
                                                                      "or X/Y/Z plot)")

    def _check_prompt_scripts(self) -> None:
        for name, kind in (("prompt_matrix", PromptMatrixOptions), ("prompts_from_file", PromptsFromFileOptions)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise InvalidParameter(name, type(value).__name__, f"{kind.__name__} or None")
        scripts = [name for name in ("xyz_plot", "sd_upscale", "loopback", "prompt_matrix", "prompts_from_file")
                   if getattr(self, name) is not None]
        if len(scripts) > 1 and {"prompt_matrix", "prompts_from_file"} & set(scripts):
            raise InvalidParameter(scripts[-1], f"with {scripts[0]}", "one script at a time")
        if self.prompt_matrix is not None:
            text = self.prompt if self.prompt_matrix.prompt_type == "positive" else self.negative_prompt
            parts = text.count("|")
            if parts > MAX_PROMPT_MATRIX_PARTS:
                raise InvalidParameter("prompt" if self.prompt_matrix.prompt_type == "positive" else "negative_prompt",
                                       f"{parts} variable parts", f"at most {MAX_PROMPT_MATRIX_PARTS} parts after "
                                       f"the first for a Prompt matrix ({2 ** MAX_PROMPT_MATRIX_PARTS} pictures)")

    def _check_sd_upscale(self) -> None:
        if not isinstance(self.sd_upscale, SDUpscaleOptions):
            raise InvalidParameter("sd_upscale", type(self.sd_upscale).__name__, "SDUpscaleOptions or None")
        if self.mask is not None:
            raise InvalidParameter("sd_upscale", "with a mask", "img2img without a mask (SD upscale repaints the "
                                                                "whole picture, tile by tile)")
        if self.hires is not None:
            raise InvalidParameter("sd_upscale", "with hires", "no hires. fix (a txt2img option)")

    def _checked_hires(self, sampler: str, schedule: str) -> HiresOptions:
        """The hires options checked against the rest of the request, their names canonical."""
        h = self.hires
        if not isinstance(h, HiresOptions):
            raise InvalidParameter("hires", type(h).__name__, "HiresOptions")
        if self.init_images:
            raise InvalidParameter("hires", "with init_images", "txt2img only (hires. fix is a txt2img option)")
        if self.width is not None and self.height is not None:
            check_hires_size(h, self.width, self.height)
        if h.prompt:
            _check_hires_loras(self.prompt, h.prompt)
        if h.sampler is None and h.scheduler is None:
            return h
        from .sampling.names import resolve_sampler

        default = _first_pass_schedule(self.sampler, self.scheduler, sampler, schedule)
        try:
            hires_sampler, hires_schedule = resolve_sampler(h.sampler or sampler, h.scheduler or default)
        except UnknownName as exc:
            raise UnknownName(f"hires_{exc.field}", exc.value, exc.choices) from None
        return replace(h, sampler=hires_sampler if h.sampler is not None else None, scheduler=hires_schedule)

    @property
    def hires_sampler(self) -> str:
        """The second pass's sampler (the first pass's unless the hires options name one)."""
        return (self.hires.sampler if self.hires is not None else None) or self.sampler

    @property
    def hires_scheduler(self) -> str:
        return (self.hires.scheduler if self.hires is not None else None) or self.scheduler

    @property
    def hires_token_merging_ratio(self) -> float:
        """The second pass's token merging ratio (the first pass's unless the hires options give one)."""
        return (self.hires.token_merging_ratio if self.hires is not None else 0.0) or self.token_merging_ratio

    @property
    def is_img2img(self) -> bool:
        return bool(self.init_images)

    def with_seed(self) -> "GenerationParams":
        """The same request with -1 seeds replaced by concrete random ones."""
        seed = random_seed() if self.seed == -1 else self.seed
        subseed = random_seed() if self.subseed == -1 else self.subseed
        return replace(self, seed=seed, subseed=subseed)

    def replace(self, **changes: Any) -> "GenerationParams":
        return replace(self, **changes)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


#: A1111's API names for the fields :class:`GenerationParams` spells otherwise; the engine's
#: ``img2img``/``txt2img`` calls take either (:func:`request_fields`).
A1111_FIELD_NAMES = {"denoising_strength": "strength", "sampler_name": "sampler",
                     "initial_noise_multiplier": "noise_multiplier"}
#: A1111's refiner fields, which :class:`GenerationParams` keeps in ``refiner``.
REFINER_FIELDS = {"refiner_checkpoint": "checkpoint", "refiner_switch_at": "switch_at"}
#: A1111's top-level sampler settings, which :class:`GenerationParams` keeps in ``sampler_options``.
SAMPLER_OPTION_FIELDS = ("eta", "s_churn", "s_tmin", "s_tmax", "s_noise")


def request_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """:class:`GenerationParams` keyword arguments from ones that may use A1111's API names
    (``denoising_strength``, ``sampler_name``, and ``eta``/``s_churn``/... beside the other fields).

    A name that is neither is an :class:`~underpaint.errors.UnknownName` suggesting the nearest
    field (``strenght``: did you mean ``strength``?), rather than Python's TypeError.
    """
    from .errors import UnknownName

    known = GenerationParams.field_names()
    out: dict[str, Any] = {}
    options: dict[str, Any] = {}
    refiner: dict[str, Any] = {}
    for name, value in fields.items():
        if name in SAMPLER_OPTION_FIELDS:
            options[name] = value
            continue
        if name in REFINER_FIELDS:
            refiner[REFINER_FIELDS[name]] = value
            continue
        target = A1111_FIELD_NAMES.get(name, name)
        if target not in known:
            raise UnknownName("field", name, [*known, *A1111_FIELD_NAMES, *SAMPLER_OPTION_FIELDS, *REFINER_FIELDS])
        if target in out:
            other = next(n for n in fields if n != name and A1111_FIELD_NAMES.get(n, n) == target)
            raise InvalidParameter(name, value, f"either {name} or {other}, not both")
        out[target] = value
    if options:
        out["sampler_options"] = replace(out.get("sampler_options") or SamplerOptions(), **options)
    if not names_no_checkpoint(refiner.get("checkpoint")):
        out["refiner"] = RefinerOptions(**refiner)
    elif "switch_at" in refiner and refiner["switch_at"] is not None:
        raise InvalidParameter("refiner_switch_at", refiner["switch_at"], "refiner_checkpoint beside it")
    return out


def check_hires_size(hires: HiresOptions, width: int, height: int, *, multiple: int = 8) -> None:
    """The hires pictures must be 64 to 8192 pixels a side, as any other."""
    out_w, out_h = hires.output_size(width, height, multiple=multiple)
    if not (64 <= out_w <= 8192 and 64 <= out_h <= 8192):
        raise InvalidParameter(hires.size_field(), hires.scale if hires.size_field() == "hires_scale"
                               else f"{hires.resize_x}x{hires.resize_y}",
                               f"a hires size from 64 to 8192 pixels a side (this one gives {out_w}x{out_h} "
                               f"from {width}x{height})")


def _check_hires_loras(prompt: str, hires_prompt: str) -> None:
    """A hires prompt may not ask for other LoRAs or hypernetworks: they are applied once for the request."""
    from .prompts.parser import extract_extra_networks

    def networks(text: str) -> list:
        return [tag for tag in extract_extra_networks(text)[1] if tag.is_lora or tag.kind == "hypernet"]

    if networks(hires_prompt) != networks(prompt):
        raise InvalidParameter("hires_prompt", hires_prompt,
                               "the same <lora:...> and <hypernet:...> tags as the prompt (other networks for the "
                               "second pass are not available)")


def _first_pass_schedule(raw_sampler: str, raw_schedule: str | None, sampler: str, schedule: str) -> str:
    """The first pass's schedule as the request named it, which a second pass with another
    sampler inherits (A1111: ``hr_scheduler`` None is ``p.scheduler``). The canonical ``schedule``
    says "Automatic" where the named one was the first sampler's own default (Karras for
    DPM++ 2M): another sampler must still get Karras.
    """
    from .sampling.names import sampler_info, schedule_info

    if schedule != "Automatic":
        return schedule
    default = sampler_info(sampler).default_schedule
    if default == "Automatic":
        return schedule
    named = schedule_info(raw_schedule).label if raw_schedule else "Automatic"
    if named == default or str(raw_sampler).strip().lower().endswith(" " + default.lower()):
        return default
    return schedule
