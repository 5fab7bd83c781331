"""ControlNet units: the request record, the control map for the generation size, and the
residuals each unit adds to the UNet's skip connections at every step.

Behaviour follows A1111's ControlNet extension (sd-webui-controlnet):

- a unit runs between ``guidance_start`` and ``guidance_end``, fractions of the steps run: at
  each model call the extension compares ``step / steps`` with them, where ``step`` is the
  index of the last finished sampler step (0 until step 0 is done, so steps 0 and 1 both see 0);
- "Balanced" scales every residual by the weight; "My prompt is more important" decays them
  towards the shallow layers, residual i of n getting ``weight * 0.825 ** (12 - i)`` (the
  middle block last; SDXL's 10 residuals take the first 10 of SD1's 13 factors);
  "ControlNet is more important" does the same and gives the negative prompt no control at all,
  so classifier-free guidance pushes towards the control;
- residuals of several units add up; the ControlNet sees the same latent, timestep, text and
  SDXL size embedding as the UNet (for a 9-channel inpainting UNet, the first 4 channels);
- a unit whose model is a T2I-Adapter computes the adapter's features once per map (they do
  not depend on the latent) and, in its guidance window, adds them inside the UNet's encoder
  (diffusers' ``down_intrablock_additional_residuals``) times the weight, as diffusers'
  ``StableDiffusionAdapterPipeline`` does; the two non-balanced modes use the extension's
  soft-injection ramp for adapters (0.25, 0.62, 0.825, 1.0 of the weight, shallow first);
- a unit whose model is one of xinsir's SDXL union ControlNets runs it as the unit's
  ``union_control_type`` (the extension's field: "Hard Edge", "Depth", ...), else as the type of
  its preprocessor (canny → Hard Edge, depth → Depth, ...; models/union_types.py); a ready-made
  map (module "none") needs the explicit type. The hint fills that type's slot and the 0/1 type
  vector marks it; its residuals are then weighted, windowed and moded as any ControlNet's;
- with hires. fix a unit runs in the passes its ``hr_option`` names (the extension's "Hires-fix
  option"): "Both" (the default), "Low res only" (the first pass) or "High res only" (the second);
  a pass left with no unit runs without ControlNet. The second pass fits the same preprocessed map
  to its own size, counts guidance start/end over its own steps, and always uses the
  soft-injection scales, even for "Balanced" (the extension does so to keep the upscaled picture
  free of ControlNet artefacts); "ControlNet is more important" still keeps the control off the
  negative prompt there. Without hires. fix there is one pass and every unit runs in it, whatever
  its option (our choice: the option only says which pass of two a unit belongs to).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import ImageError, InvalidParameter
from ..models.device import to_device
from ..preprocess.common import CROP_AND_RESIZE, AnnotatorContext, fit_map, pixel_perfect_resolution, resize_mode_name

if TYPE_CHECKING:
    from PIL.Image import Image

    from ..models.controlnet import LoadedControlNet

BALANCED = "Balanced"
PROMPT_MORE_IMPORTANT = "My prompt is more important"
CONTROL_MORE_IMPORTANT = "ControlNet is more important"
CONTROL_MODES = (BALANCED, PROMPT_MORE_IMPORTANT, CONTROL_MORE_IMPORTANT)
_MODE_ALIASES = {"balanced": BALANCED, "prompt": PROMPT_MORE_IMPORTANT, "my prompt is more important": PROMPT_MORE_IMPORTANT,
                 "control": CONTROL_MORE_IMPORTANT, "controlnet": CONTROL_MORE_IMPORTANT,
                 "controlnet is more important": CONTROL_MORE_IMPORTANT}
#: The soft-injection decay of the original ControlNet's guess mode, over SD1's 13 residuals.
SOFT_DECAY = 0.825
_SD1_RESIDUALS = 13


#: The extension's hires-fix options (``hr_option``): which passes of a hires. fix run a unit runs in.
HR_BOTH = "Both"
HR_LOW_RES_ONLY = "Low res only"
HR_HIGH_RES_ONLY = "High res only"
HR_OPTIONS = (HR_BOTH, HR_LOW_RES_ONLY, HR_HIGH_RES_ONLY)
# The extension's enum member names, which its Python clients send as "HiResFixOption.LOW_RES_ONLY".
_HR_ENUM_NAMES = {"both": HR_BOTH, "low_res_only": HR_LOW_RES_ONLY, "high_res_only": HR_HIGH_RES_ONLY}


def hr_option_name(value: str | int) -> str:
    """The extension's hires-fix option for an index (0-2, in the order of :data:`HR_OPTIONS`), one of
    its three names in any case, or its enum's text form ("HiResFixOption.HIGH_RES_ONLY"), which the
    extension also reads."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(HR_OPTIONS):
        return HR_OPTIONS[value]
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return hr_option_name(int(text))
        for option in HR_OPTIONS:
            if text.lower() == option.lower():
                return option
        prefix, dot, member = text.partition(".")
        if dot and prefix.lower() == "hiresfixoption" and member.lower() in _HR_ENUM_NAMES:
            return _HR_ENUM_NAMES[member.lower()]
    raise InvalidParameter("hr_option", value, "0, 1, 2 or one of " + ", ".join(repr(o) for o in HR_OPTIONS))


def control_mode_name(value: str | int) -> str:
    """The extension's control mode for an index (0-2) or any spelling ("prompt", "controlnet", ...)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(CONTROL_MODES):
        return CONTROL_MODES[value]
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return control_mode_name(int(text))
        found = _MODE_ALIASES.get(text.lower())
        if found:
            return found
    raise InvalidParameter("control_mode", value, "0, 1, 2 or one of " + ", ".join(repr(m) for m in CONTROL_MODES))


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet unit, with A1111's ControlNet extension's fields and defaults.

    ``image`` None means the img2img input picture; ``module`` is a preprocessor name (or
    "none" for a ready-made map); ``model`` a ControlNet name or path (None: the one in
    ``models/controlnet/`` whose name matches the module and the checkpoint's family);
    ``threshold_a``/``threshold_b`` None take the module's defaults; ``union_control_type`` is
    the control type a union model runs as (the extension's names, "Hard Edge", "Depth", ...;
    None or "Unknown": the preprocessor's type), ignored by other models; ``hr_option`` the passes
    of a hires. fix run the unit runs in ("Both", "Low res only", "High res only"; without hires.
    fix it always runs). ``extra_images``: more reference pictures for an IP-Adapter unit besides
    ``image`` (the extension's Multi-Inputs): the adapter reads each, and the image tokens it makes
    of them are averaged, as the extension does.
    """

    image: "Image | None" = None
    module: str = "none"
    model: str | None = None
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: str = BALANCED
    resize_mode: str = CROP_AND_RESIZE
    processor_res: int = 512
    threshold_a: float | None = None
    threshold_b: float | None = None
    pixel_perfect: bool = False
    union_control_type: str | None = None
    hr_option: str = HR_BOTH
    extra_images: tuple = ()

    def __post_init__(self) -> None:
        from ..models.union_types import union_type_name
        from ..params import _check_range, check_control_strength
        from ..preprocess.registry import get_preprocessor

        object.__setattr__(self, "module", get_preprocessor(self.module).name)
        object.__setattr__(self, "union_control_type", union_type_name(self.union_control_type))
        object.__setattr__(self, "control_mode", control_mode_name(self.control_mode))
        object.__setattr__(self, "resize_mode", resize_mode_name(self.resize_mode))
        object.__setattr__(self, "hr_option", hr_option_name(self.hr_option))
        check_control_strength(self.weight, self.guidance_start, self.guidance_end)
        _check_range("processor_res", self.processor_res, 64, 4096, integer=True)
        self.preprocessor.check_thresholds(self.threshold_a, self.threshold_b)
        if self.image is not None and not hasattr(self.image, "size"):
            raise ImageError(f"control image: expected a picture, got {type(self.image).__name__}")
        object.__setattr__(self, "extra_images", tuple(self.extra_images or ()))
        if self.extra_images:
            self._check_extra_images()

    def _check_extra_images(self) -> None:
        count = f"{len(self.extra_images)} more picture(s)"
        if self.preprocessor.kind != "ip-adapter":
            raise InvalidParameter("extra_images", count, f"one picture for module {self.module} (only IP-Adapter "
                                                          "units take several)")
        if self.image is None:
            raise InvalidParameter("extra_images", count, "a first picture in image (the others go with it)")
        for i, picture in enumerate(self.extra_images):
            if not hasattr(picture, "size"):
                raise ImageError(f"control image {i + 2}: expected a picture, got {type(picture).__name__}")

    @property
    def preprocessor(self):
        from ..preprocess.registry import get_preprocessor

        return get_preprocessor(self.module)

    @property
    def in_first_pass(self) -> bool:
        """Whether the unit runs in the first pass of a hires. fix run ("Both" or "Low res only")."""
        return self.hr_option != HR_HIGH_RES_ONLY

    @property
    def in_second_pass(self) -> bool:
        """Whether the unit runs in the second pass of a hires. fix run ("Both" or "High res only")."""
        return self.hr_option != HR_LOW_RES_ONLY

    @property
    def thresholds(self) -> tuple[float | None, float | None]:
        pre = self.preprocessor
        return (pre.a if self.threshold_a is None else self.threshold_a,
                pre.b if self.threshold_b is None else self.threshold_b)


# --- the control map ----------------------------------------------------------------------------------------


def control_map(unit: ControlUnit, width: int, height: int, *, init_image: "Image | None" = None,
                mask: "Image | None" = None, ctx: AnnotatorContext | None = None, seed: int = 0) -> np.ndarray:
    """The unit's preprocessed map fitted to the generation size: uint8 H x W x 3 (x 4 for inpaint)."""
    detected = detect_map(unit, width, height, init_image=init_image, mask=mask, ctx=ctx, seed=seed)
    return fit_map(detected, width, height, unit.resize_mode)


def detect_map(unit: ControlUnit, width: int, height: int, *, init_image: "Image | None" = None,
               mask: "Image | None" = None, ctx: AnnotatorContext | None = None, seed: int = 0) -> np.ndarray:
    """The unit's preprocessed map before it is fitted to the generation size (``width`` x
    ``height`` only sets the Pixel Perfect resolution)."""
    from ..preprocess.registry import run_preprocessor

    source = unit.image if unit.image is not None else init_image
    if source is None:
        raise ImageError(f"ControlNet unit ({unit.module}): no control image and no img2img input to use instead")
    pixels = _unit_pixels(unit, source, mask)
    res = unit.processor_res
    if unit.pixel_perfect:
        res = max(64, pixel_perfect_resolution(pixels.shape[:2], width, height, unit.resize_mode))
    a, b = unit.thresholds
    return run_preprocessor(unit.module, pixels, res=res, a=a, b=b, seed=seed, ctx=ctx)


def _unit_pixels(unit: ControlUnit, image: "Image", mask: "Image | None") -> np.ndarray:
    return module_pixels(unit.module, image, mask)


def module_pixels(module: str, image: "Image", mask: "Image | None" = None) -> np.ndarray:
    """RGB pixels; for inpaint modules RGB plus the mask (255 = repaint) from ``mask`` (white =
    repaint) or transparency (transparent = repaint), else nothing to repaint. /controlnet/detect
    reads its pictures the same way."""
    if not module.startswith("inpaint"):
        return np.asarray(image.convert("RGB"))
    rgb = np.asarray(image.convert("RGB"))
    if mask is not None:
        m = np.asarray(mask.convert("L").resize(image.size))
    elif image.mode in ("RGBA", "LA") or "transparency" in image.info:
        m = 255 - np.asarray(image.convert("RGBA"))[:, :, 3]
    else:
        m = np.zeros(rgb.shape[:2], dtype=np.uint8)
    return np.concatenate([rgb, m[:, :, None]], axis=2)


def hint_tensor(detected: np.ndarray, *, device, dtype, masked: float = -1.0) -> torch.Tensor:
    """The map as the ControlNet's input: 1 x 3 x H x W in [0, 1]. A 4-channel inpaint map becomes
    the picture with masked pixels set to ``masked``: -1 is the inpaint ControlNet's convention,
    0 (black) the one xinsir's union models were trained with for their repaint type."""
    x = torch.from_numpy(np.array(detected, dtype=np.float32)) / 255.0
    x = x.permute(2, 0, 1)[None]
    if x.shape[1] == 4:
        colour, m = x[:, :3], (x[:, 3:4] > 0.5).float()
        x = colour * (1 - m) + masked * m
    return to_device(x, device, dtype)


# --- residuals ------------------------------------------------------------------------------------------------


def layer_scales(weight: float, n: int, mode: str, *, soft: bool = False) -> list[float]:
    """Per-residual factors: the weight everywhere (Balanced), or decayed towards shallow layers
    (the other modes, and every mode when ``soft``: a hires. fix second pass)."""
    if mode == BALANCED and not soft:
        return [weight] * n
    return [weight * SOFT_DECAY ** float(_SD1_RESIDUALS - 1 - i) for i in range(max(n, _SD1_RESIDUALS))][:n]


def unit_active(unit: ControlUnit, step: int, steps: int) -> bool:
    """Whether the unit runs when the last finished step is ``step`` of ``steps`` run (A1111's rule)."""
    fraction = step / steps if steps else 0.0
    return unit.guidance_start <= fraction <= unit.guidance_end and unit.weight != 0


@dataclass
class ActiveUnit:
    """A unit ready to run: its ControlNet, its hint at the generation size, its settings."""

    unit: ControlUnit
    net: "LoadedControlNet"
    hint: torch.Tensor
    #: A T2I-Adapter's features for the hint (batch 1, unscaled); None for a ControlNet.
    features: list[torch.Tensor] | None = None
    #: For a union ControlNet, the unit's control-type slot; None otherwise.
    control_type: int | None = None
    #: The preprocessed map before fitting, which a hires. fix second pass fits to its own size.
    detected: np.ndarray | None = field(default=None, repr=False)
    #: For an IP-Adapter unit: the picture's tokens and no picture's (for the negative prompt's rows),
    #: each (1, tokens, text width); ``net.module`` is the adapter and ``hint`` is empty.
    ip: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)


@dataclass
class ControlStack:
    """The ControlNet part of the denoiser: residuals for one UNet call, from every active unit.

    ``step`` is the only mutable field: the sampler's step callback sets it to the index of the
    step just finished (:meth:`on_step`), which is what A1111 compares with guidance start/end.
    ``high_res`` marks a hires. fix second pass, which always scales with the soft-injection ramp.
    """

    units: list[ActiveUnit]
    steps: int
    step: int = field(default=0)
    high_res: bool = False
    #: The conditioning objects of the current evaluation (set by the denoiser), to tell prompt rows.
    prompt: object = field(default=None, repr=False)
    negative: object = field(default=None, repr=False)

    def on_step(self, step: int) -> None:
        self.step = step

    def first_pass(self) -> "ControlStack | None":
        """The stack for the first pass of a hires. fix run: the units without "High res only" (the
        same objects, not copies), or None when no unit is left, so that the pass runs without
        ControlNet."""
        units = [active for active in self.units if active.unit.in_first_pass]
        return ControlStack(units, self.steps) if units else None

    def second_pass(self, width: int, height: int, steps: int) -> "ControlStack | None":
        """The stack for a hires. fix second pass of ``steps`` steps at ``width`` x ``height``: the
        units without "Low res only" (None when no unit is left), each unit's preprocessed map fitted
        again to that size (the preprocessor does not run again, as in the extension), adapters'
        features made from it, the soft-injection scales on."""
        from dataclasses import replace

        units = []
        for active in self.units:
            if not active.unit.in_second_pass:
                continue
            if active.ip is not None:  # the picture's tokens do not depend on the size
                units.append(active)
                continue
            if active.detected is None:
                raise ValueError("a ControlNet unit without its preprocessed map cannot run a second pass")
            fitted = fit_map(active.detected, width, height, active.unit.resize_mode)
            hint = hint_tensor(fitted, device=active.hint.device, dtype=active.hint.dtype,
                               masked=-1.0 if active.control_type is None else 0.0)
            features = None
            if active.features is not None:
                from ..models.t2i_adapter import adapter_features

                features = adapter_features(active.net.module, hint.to(active.net.dtype), active.net.name)
            units.append(replace(active, hint=hint, features=features))
        return ControlStack(units, steps, high_res=True) if units else None

    def set_conds(self, prompt: object, negative: object) -> None:
        self.prompt, self.negative = prompt, negative

    def prompt_rows(self, cond: object, n: int, device=None) -> torch.Tensor:
        """1 for rows conditioned on the prompt, 0 for the negative prompt. A call with the prompt's
        or the negative's own conditioning is all one or the other; a joint call is [prompt; negative],
        the order classifier-free guidance batches them in."""
        if cond is self.prompt:
            return torch.ones(n, device=device)
        if cond is self.negative:
            return torch.zeros(n, device=device)
        return torch.cat([torch.ones(n - n // 2, device=device), torch.zeros(n // 2, device=device)])

    def residuals(self, x_in: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                  added_cond_kwargs: dict | None = None, cond_rows: torch.Tensor | None = None):
        """``(down_residuals, mid_residual)`` to pass to the UNet, or ``(None, None)`` when no unit runs.

        ``cond_rows`` (B,) is 1 for rows conditioned on the prompt and 0 for the negative prompt
        (None: all prompt rows); "ControlNet is more important" zeroes the residuals of the others.
        """
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        for active in self.units:
            if active.features is not None or active.ip is not None or \
                    not unit_active(active.unit, self.step, self.steps):
                continue
            d, m = run_unit(active, x_in, t, context, added_cond_kwargs, cond_rows, soft=self.high_res)
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        return down, mid

    def image_prompts(self, n: int, cond_rows: torch.Tensor | None = None) -> list[tuple]:
        """(adapter, tokens for the ``n`` rows, weight) of each IP-Adapter unit in its guidance window: the
        picture's tokens on the prompt's rows, no picture's on the negative prompt's (``cond_rows`` 1 and
        0; None: all prompt rows)."""
        out = []
        for active in self.units:
            if active.ip is None or not unit_active(active.unit, self.step, self.steps):
                continue
            cond, uncond = active.ip
            if cond_rows is None:
                tokens = cond.expand(n, -1, -1)
            else:
                keep = cond_rows.to(device=cond.device, dtype=cond.dtype).view(-1, 1, 1)
                tokens = cond * keep + uncond * (1 - keep)
            out.append((active.net.module, tokens, float(active.unit.weight)))
        return out

    def intrablock(self, n: int, cond_rows: torch.Tensor | None = None) -> list[torch.Tensor] | None:
        """The T2I-Adapter features for a batch of ``n`` rows (a new list at every call: the UNet
        consumes it), summed over the active adapter units; None when none runs."""
        total: list[torch.Tensor] | None = None
        for active in self.units:
            if active.features is None or not unit_active(active.unit, self.step, self.steps):
                continue
            feats = adapter_unit_features(active, n, cond_rows, soft=self.high_res)
            total = feats if total is None else [a + b for a, b in zip(total, feats)]
        return total


def adapter_unit_features(active: ActiveUnit, n: int, cond_rows: torch.Tensor | None, *,
                          soft: bool = False) -> list[torch.Tensor]:
    """One adapter unit's features for ``n`` rows, scaled by the weight (and the mode's ramp, or
    the ramp whatever the mode when ``soft``)."""
    from ..models.t2i_adapter import feature_scales

    unit = active.unit
    feats = active.features or []
    scales = feature_scales(unit.weight, len(feats), soft or unit.control_mode != BALANCED)
    out = [(f * s).expand(n, *f.shape[1:]) for f, s in zip(feats, scales)]
    if unit.control_mode == CONTROL_MORE_IMPORTANT and cond_rows is not None:
        keep = cond_rows.to(out[0].dtype).view(-1, 1, 1, 1)
        out = [r * keep for r in out]
    return out


def run_unit(active: ActiveUnit, x_in: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
             added_cond_kwargs: dict | None, cond_rows: torch.Tensor | None, *, soft: bool = False):
    """One ControlNet's residuals for a batch, scaled per layer by the unit's weight and mode
    (``soft``: with the soft-injection decay whatever the mode, as in a hires. fix second pass)."""
    net, unit = active.net, active.unit
    dtype = net.dtype
    sample = x_in[:, : net.module.config.in_channels]
    hint = active.hint.expand(sample.shape[0], -1, -1, -1)
    extra = None
    if added_cond_kwargs is not None and net.module.config.addition_embed_type == "text_time":
        extra = {k: v.to(dtype) for k, v in added_cond_kwargs.items()}
    if active.control_type is None:
        down, mid = net.module(sample.to(dtype), t, encoder_hidden_states=context.to(dtype), controlnet_cond=hint,
                               conditioning_scale=1.0, added_cond_kwargs=extra, return_dict=False)
    else:
        # one conditioning image, in the slot of the unit's type; the 0/1 vector marks that type
        down, mid = net.module(sample.to(dtype), t, encoder_hidden_states=context.to(dtype),
                               controlnet_cond=[hint.to(dtype)], control_type=union_type_vector(active, len(sample)),
                               control_type_idx=[active.control_type], conditioning_scale=1.0,
                               added_cond_kwargs=extra, return_dict=False)
    scales = layer_scales(unit.weight, len(down) + 1, unit.control_mode, soft=soft)
    out = [r * s for r, s in zip([*down, mid], scales)]
    if unit.control_mode == CONTROL_MORE_IMPORTANT and cond_rows is not None:
        keep = cond_rows.to(out[0].dtype).view(-1, 1, 1, 1)
        out = [r * keep for r in out]
    return out[:-1], out[-1]


def union_type_vector(active: ActiveUnit, rows: int) -> torch.Tensor:
    """The union model's control-type input: one 0/1 row per batch row, 1 at the unit's type."""
    n = active.net.module.config.num_control_type
    vector = torch.zeros(rows, n, device=active.hint.device, dtype=active.net.dtype)
    vector[:, active.control_type] = 1
    return vector


# --- assembling the stack ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ControlSetup:
    """What a request's units resolve to before sampling: loaded nets, maps, names for infotext."""

    stack: ControlStack
    maps: tuple[np.ndarray, ...]
    model_names: tuple[str, ...]

    def with_infotext(self, params):
        """``params`` with the units' ``ControlNet i`` entries added to its extra infotext."""
        units = params.control_units
        return params.replace(extra_infotext=params.extra_infotext + control_infotext(units, self.model_names))


def request_control(model, params, *, width: int, height: int, steps: int, crop=None) -> ControlSetup | None:
    """The ControlNet setup of a request (None without units): nets from the model's cache and
    folders, maps from the control images or the img2img input, the request's seed for shuffle.

    ``crop`` is ``(box, size)`` for "only masked" inpainting: the region of the ``size`` picture
    that is generated; each control image is then cropped to the same region (after being
    stretched to the picture's size), as A1111's ControlNet extension does, so the map lines up
    with the crop instead of squeezing the whole picture into it.
    """
    if not params.control_units:
        return None
    cache, folders, ctx = control_resources(model)
    init = params.init_images[0] if params.init_images else None
    units, mask = params.control_units, params.mask
    if crop is not None:
        units, init, mask = crop_to_region(units, init, mask, *crop)
    return prepare_control(model, units, width=width, height=height, steps=steps, cache=cache,
                           folders=folders, init_image=init, mask=mask, ctx=ctx, seed=max(params.seed, 0))


def crop_to_region(units, init: "Image | None", mask: "Image | None", box, size: tuple[int, int]):
    """The units' images, the init picture and the mask, each stretched to ``size`` and cropped to ``box``.
    An IP-Adapter unit's picture is a reference, not a map of the canvas: it stays whole (the whole
    input picture for a unit without one)."""
    from dataclasses import replace

    from PIL import Image as PILImage

    region = (box.x1, box.y1, box.x2, box.y2)

    def cut(image):
        if image is None:
            return None
        if image.size != size:
            image = image.resize(size, PILImage.Resampling.LANCZOS)
        return image.crop(region)

    def unit_cut(u):
        if u.preprocessor.kind == "ip-adapter":
            return u if u.image is not None or init is None else replace(u, image=init)
        return replace(u, image=cut(u.image)) if u.image is not None else u

    return tuple(unit_cut(u) for u in units), cut(init), cut(mask)


def control_resources(model) -> tuple:
    """(ControlNet cache, ControlNet folders, annotator context) for a loaded checkpoint.

    The cache and the annotator context live on the model object, like its other caches, so
    they last as long as the engine that holds it; folders come from ``model.models_dir`` (a
    ``ModelsDir``) when the engine set it, else from the default models folder.
    """
    from ..models.controlnet import ControlNetCache
    from .networks import models_dir_of

    models_dir = models_dir_of(model)
    cache = getattr(model, "_controlnets", None)
    ctx = getattr(model, "_annotators", None)
    if cache is None or ctx is None:
        cache = ControlNetCache()
        ctx = AnnotatorContext(annotators_dir=models_dir.root / "annotators", device=str(model.device))
        try:
            model._controlnets, model._annotators = cache, ctx
        except AttributeError:
            pass
    return cache, models_dir.folders("controlnet"), ctx


def prepare_control(model, units, *, width: int, height: int, steps: int, cache, folders=(),
                    init_image: "Image | None" = None, mask: "Image | None" = None,
                    ctx: AnnotatorContext | None = None, seed: int = 0) -> ControlSetup:
    """Resolve, load (through ``cache``) and check each unit's ControlNet, and make its hint.

    ``model`` is the loaded checkpoint (its UNet config and family decide which ControlNets fit);
    ``folders`` are the ControlNet folders searched by name; ``steps`` the sampler steps run.
    """
    from ..models.controlnet import check_compatible, infotext_name, resolve_controlnet

    unet_config = model.unet.config
    time_dim = getattr(unet_config, "addition_time_embed_dim", None)
    active, maps, names = [], [], []
    for index, unit in enumerate(units):
        path = resolve_controlnet(unit.model, folders, kind=unit.preprocessor.kind, family=model.spec.family)
        where = dict(device=model.device, dtype=model.dtype, time_embed_dim=time_dim, base_unet=model.unet)
        net = cache.cached(path, **where)
        if net is None:
            from .networks import network_state

            # A Control-LoRA is built on the checkpoint's own UNet weights, not on this request's LoRAs.
            with network_state(model).patcher.suspended():
                net = cache.get(path, **where)
        if net.info.kind == "ip-adapter" or unit.preprocessor.kind == "ip-adapter":
            active.append(image_prompt_unit(model, unit, net, index, init_image, width, height))
            maps.append(np.asarray(active[-1].unit.image.convert("RGB").resize((width, height))))
            names.append(infotext_name(path))
            continue
        check_compatible(net, unet_config)
        control_type = None
        if net.info.kind == "union":  # before the preprocessor runs: a type without a slot is refused
            from ..models.controlnet_union import union_type_index

            control_type = union_type_index(unit, net.module.config.num_control_type, net.name, index)
        raw = detect_map(unit, width, height, init_image=init_image, mask=mask, ctx=ctx, seed=seed)
        detected = fit_map(raw, width, height, unit.resize_mode)
        hint = hint_tensor(detected, device=model.device, dtype=model.dtype,
                           masked=-1.0 if control_type is None else 0.0)
        features = None
        if net.info.is_adapter:
            from ..models.t2i_adapter import adapter_features

            features = adapter_features(net.module, hint.to(net.dtype), net.name)
        active.append(ActiveUnit(unit, net, hint, features, control_type, raw))
        maps.append(detected)
        names.append(infotext_name(path))
    return ControlSetup(ControlStack(active, steps), tuple(maps), tuple(names))


def image_prompt_unit(model, unit: ControlUnit, net, index: int, init_image, width: int, height: int) -> ActiveUnit:
    """An IP-Adapter unit ready to run: the adapter checked against the UNet's cross-attention layers,
    the unit's picture (else the img2img input) read by the CLIP vision model the adapter needs, and
    the tokens of that reading and of no picture."""
    from dataclasses import replace

    from ..models.ip_adapter import check_fits, picture_states

    field = f"control_units[{index}]"
    if net.info.kind != "ip-adapter":
        raise InvalidParameter(f"{field}.model", net.name, f"an IP-Adapter model for module {unit.module}")
    if unit.preprocessor.kind != "ip-adapter":
        raise InvalidParameter(f"{field}.module", unit.module, f"an ip-adapter module for the IP-Adapter {net.name} "
                                                               "(ip-adapter-auto, ip-adapter_clip_h, ...)")
    check_fits(net.module, model.unet, net.name)
    image = unit.image if unit.image is not None else init_image
    if image is None:
        raise InvalidParameter(f"{field}.image", None, "a picture for the IP-Adapter (or an img2img input)")
    encoder = clip_vision_for(model, net.module, unit.module)
    states, empty = picture_states(encoder, net.module, image)
    with torch.inference_mode():
        cond, uncond = net.module.tokens(states), net.module.tokens(empty)
        for more in unit.extra_images:  # Multi-Inputs: the mean of the pictures' image tokens
            cond = cond + net.module.tokens(picture_states(encoder, net.module, more)[0])
        cond = cond / (1 + len(unit.extra_images)) if unit.extra_images else cond
    return ActiveUnit(replace(unit, image=image), net, torch.empty(0), ip=(cond.to(model.dtype), uncond.to(model.dtype)))


def clip_vision_for(model, adapter, module: str):
    """The CLIP vision model in the models folder's clip_vision/ whose widths the adapter reads (the
    image embedding's for a base adapter, the hidden states' for Plus and full-face), loaded once per
    checkpoint object and kept. The module's encoder name (``ip-adapter_clip_h``, ``_g``) is not
    needed: the adapter's widths say which encoder it was trained with."""
    from ..errors import ModelNotFound
    from ..models.ip_adapter import encoder_config, load_clip_vision
    from .networks import models_dir_of

    shape = adapter.shape
    # a whole CLIP model for Interrogate CLIP (models/CLIP) serves too: FLUX's adapter reads ViT-L/14's pictures
    folders = (*models_dir_of(model).folders("clip_vision"), *models_dir_of(model).folders("clip"))
    kept = getattr(model, "_clip_vision", None)
    if kept is None:
        kept = {}
        try:
            model._clip_vision = kept
        except AttributeError:
            pass
    for folder in folders:
        for path in sorted(folder.iterdir()):
            config = encoder_config(path)
            if config is None:
                continue
            width = config.projection_dim if not shape.uses_hidden_states else config.hidden_size
            if width != shape.clip_dim:
                continue
            key = (str(path), path.stat().st_mtime_ns, str(model.device), str(model.dtype))
            if key not in kept:
                kept.clear()
                kept[key] = load_clip_vision(path, device=model.device, dtype=model.dtype)
            return kept[key]
    what = "image embedding" if not shape.uses_hidden_states else "hidden states"
    where = models_dir_of(model).folder("clip_vision")
    raise ModelNotFound(f"the IP-Adapter needs a CLIP vision model whose {what} are {shape.clip_dim} wide (ViT-H/14 "
                        f"for most: `underpaint download clip-vision-h`; ViT-bigG/14 for ip-adapter_sdxl: "
                        f"`underpaint download clip-vision-g`; ViT-L/14 for FLUX's: `underpaint download "
                        f"clip-vit-l`) in {where}", field="model")


# --- infotext ---------------------------------------------------------------------------------------------------


def _number(value: float | None) -> str:
    return "-1" if value is None else str(float(value))


def unit_infotext(unit: ControlUnit, model_name: str) -> str:
    """One unit as the extension writes it: ``Module: ..., Model: ..., Weight: ..., ...``.

    A setting the module has no slider for (the resolution of "none", the thresholds of
    depth_midas, ...) is -1 in the extension's unit, and the extension leaves such fields out of
    the entry; pasting it back then gives -1 again, the module's default.
    """
    a, b = unit.thresholds
    pre = unit.preprocessor
    fields = (
        ("Module", unit.module), ("Model", model_name), ("Weight", _number(unit.weight)),
        ("Resize Mode", unit.resize_mode), ("Processor Res", str(unit.processor_res if pre.uses_resolution else -1)),
        ("Threshold A", _number(a)), ("Threshold B", _number(b)),
        ("Guidance Start", _number(unit.guidance_start)), ("Guidance End", _number(unit.guidance_end)),
        ("Pixel Perfect", str(bool(unit.pixel_perfect))), ("Control Mode", unit.control_mode),
        ("Hr Option", unit.hr_option),
    )
    return ", ".join(f"{k}: {v}" for k, v in fields if v != "-1")


def control_infotext(units, model_names) -> tuple[tuple[str, str], ...]:
    """``ControlNet 0``, ``ControlNet 1``, ... entries for the infotext's extra parameters."""
    return tuple((f"ControlNet {i}", unit_infotext(u, name)) for i, (u, name) in enumerate(zip(units, model_names)))
