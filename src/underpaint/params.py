"""The request: frozen, validated dataclasses built at the edge (CLI, HTTP) and passed down.

Field names and defaults follow AUTOMATIC1111 1.10 where it has the same control, so a user
or a client coming from there finds every value where they expect it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from .errors import InvalidParameter

if TYPE_CHECKING:  # PIL is only needed for type hints here
    from PIL.Image import Image

    from .pipeline.control import ControlUnit

#: A1111's random seeds are drawn from [0, 4294967294).
MAX_SEED = 4294967294
RESIZE_MODES = {0: "Just resize", 1: "Crop and resize", 2: "Resize and fill", 3: "Just resize (latent upscale)"}
RNG_SOURCES = ("gpu", "cpu", "nv")
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")
#: A1111's "Live preview method" values (``show_progress_type``); pipeline/preview.py says what each does.
PREVIEW_METHODS = ("Full", "Approx NN", "Approx cheap", "TAESD")


def preview_method_name(value: object, field: str = "preview_method") -> str:
    """A live preview method in A1111's spelling (matched without regard to case)."""
    if isinstance(value, str):
        for name in PREVIEW_METHODS:
            if value.strip().lower() == name.lower():
                return name
    raise InvalidParameter(field, value, "one of " + ", ".join(PREVIEW_METHODS))


def random_seed() -> int:
    """A fresh seed in A1111's range; what gets recorded is this value, never -1."""
    return random.randrange(MAX_SEED)


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

    def __post_init__(self) -> None:
        from .sampling.names import resolve_sampler  # torch-free table

        _check_range("strength", self.strength, 0.0, 1.0)
        _check_range("steps", self.steps, 1, 1000, integer=True)
        _check_range("cfg_scale", self.cfg_scale, 0.0, 100.0)
        if self.distilled_cfg_scale is not None:
            _check_range("distilled_cfg_scale", self.distilled_cfg_scale, 0.0, 100.0)
        _check_range("seed", self.seed, -1, 2**32 - 1, integer=True)
        _check_range("subseed", self.subseed, -1, 2**32 - 1, integer=True)
        _check_range("subseed_strength", self.subseed_strength, 0.0, 1.0)
        _check_range("batch_size", self.batch_size, 1, 64, integer=True)
        _check_range("n_iter", self.n_iter, 1, 10000, integer=True)
        _check_range("clip_skip", self.clip_skip, 1, 12, integer=True)
        _check_range("eta_noise_seed_delta", self.eta_noise_seed_delta, 0, 2**32 - 1, integer=True)
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
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            raise InvalidParameter("prompt", type(self.prompt).__name__, "a string")
        if self.inpaint.masked_content not in MASKED_CONTENT:
            raise InvalidParameter("masked_content", self.inpaint.masked_content, "one of " + ", ".join(MASKED_CONTENT))
        object.__setattr__(self, "preview_method", preview_method_name(self.preview_method))
        if self.control_units:
            from .pipeline.control import ControlUnit

            units = tuple(self.control_units)
            if not all(isinstance(u, ControlUnit) for u in units):
                raise InvalidParameter("control_units", units, "ControlUnit records")
            object.__setattr__(self, "control_units", units)
        # Canonicalise names so infotext and caches see one spelling; legacy combined names
        # ("DPM++ 2M Karras") split into sampler + schedule.
        sampler, schedule = resolve_sampler(self.sampler, self.scheduler)
        object.__setattr__(self, "sampler", sampler)
        object.__setattr__(self, "scheduler", schedule)

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
