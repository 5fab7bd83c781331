"""Inpainting and outpainting: the small steps that a mask adds to the one generate() path.

The behaviour is AUTOMATIC1111 1.10's img2img inpainting, step by step:

1. the mask is prepared (alpha or greyscale, inverted, blurred: ``imageio.mask``);
2. "Whole picture" resizes picture and mask to W×H; "Only masked" crops both to the mask's
   bounding box plus padding, widened to the W:H aspect, and resizes the crop to W×H;
3. the masked content is set: "fill" paints the hole with the surrounding colours, "latent
   noise" / "latent nothing" replace the hole in the latent, "original" keeps it;
4. ordinary checkpoints blend every denoised estimate with the original latent outside the
   mask (A1111's ``init_latent·(1−mask) + denoised·mask``); 9-channel inpainting checkpoints
   also see ``[mask, VAE(masked picture)]`` beside the latent;
5. after decoding, the result is pasted back into the crop and the original pixels are laid
   over everything outside the mask, so with no blur they come back bit for bit.

Outpainting is inpainting of a larger canvas whose new margins are the mask.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from ..errors import ImageError, InvalidParameter
from ..imageio.mask import (MaskResizedWarning, blur_kernel_size, blur_mask, fit_mask, invert_mask, is_empty,
                            mask_box, to_mask, warn_if_resized)
from ..imageio.resize import CROP_AND_RESIZE, RESIZE_AND_FILL, Enlarge, resize_image
from ..params import GenerationParams, InpaintOptions

#: A1111's "fill": (Gaussian radius, times composited), widest first, so each hole pixel takes
#: the colour of the nearest kept pixels, smoothed more the further away they are.
FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))
#: How outpainting paints the new margins before they are inpainted.
OUTPAINT_FILLS = ("blur", "edge", "noise", "matched")
#: Outpainting margins are whole latent cells: multiples of 8 pixels.
MARGIN_MULTIPLE = 8


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Box:
    """A pixel rectangle ``[x1, x2) × [y1, y2)``, as Pillow's ``crop`` takes it."""

    x1: int
    y1: int
    x2: int
    y2: int

    @property
    def width(self) -> int:
        return self.x2 - self.x1

    @property
    def height(self) -> int:
        return self.y2 - self.y1

    def as_tuple(self) -> tuple[int, int, int, int]:
        return self.x1, self.y1, self.x2, self.y2


def crop_box(mask: Image.Image, padding: int) -> Box | None:
    """The "Only masked" region: the mask's bounding box grown by ``padding``, kept inside the picture."""
    found = mask_box(mask)
    if found is None:
        return None
    x1, y1, x2, y2 = found
    w, h = mask.size
    return Box(max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, w), min(y2 + padding, h))


def widen_to_aspect(box: Box, width: int, height: int, image_size: tuple[int, int]) -> Box:
    """Grow the box's short side to the W:H aspect, centred, shifted back inside the picture.

    A1111's ``expand_crop_region``: the growth is ``int(wanted - current)``, half before and
    the rest after; a box pushed past one edge moves back, and one larger than the picture is
    clipped to it (the later "resize and fill" then pads it to W×H).
    """
    ratio = width / height
    if box.width / box.height > ratio:
        y1, y2 = _grow_span(box.y1, box.y2, int(box.width / ratio - box.height), image_size[1])
        return Box(box.x1, y1, box.x2, y2)
    x1, x2 = _grow_span(box.x1, box.x2, int(box.height * ratio - box.width), image_size[0])
    return Box(x1, box.y1, x2, box.y2)


def _grow_span(lo: int, hi: int, grow: int, limit: int) -> tuple[int, int]:
    lo, hi = lo - grow // 2, hi + grow - grow // 2
    if hi > limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


# --------------------------------------------------------------------------- pixels


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill" masked content: the hole painted with the surrounding colours.

    The kept pixels form a premultiplied layer whose alpha is the inverted mask; blurred copies
    of it are stacked with alpha compositing from the widest blur to none, so colours spread
    into the hole from its border while kept pixels end up exactly as they were.
    """
    layer = Image.new("RGBa", image.size)
    layer.paste(image.convert("RGBA").convert("RGBa"), mask=invert_mask(mask))
    canvas = Image.new("RGBA", image.size)
    for radius in (r for r, times in FILL_PASSES for _ in range(times)):
        canvas.alpha_composite(_blurred(layer, radius))
    return canvas.convert("RGB")


def _blurred(layer: Image.Image, radius: float) -> Image.Image:
    return layer.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")


def overlay_mask(mask: Image.Image, *, cropped: bool, soft: bool) -> Image.Image:
    """Where the generated pixels show in the final picture (A1111's ``mask_for_overlay``).

    "Whole picture" doubles the blurred mask (anything at least half-masked is fully
    generated); "Only masked" uses it as it is. A soft mask is used as it is either way.
    """
    if cropped or soft:
        return mask
    doubled = np.clip(np.asarray(mask, dtype=np.float32) * 2, 0, 255).astype(np.uint8)
    return Image.fromarray(doubled, "L")


def match_colours(generated: Image.Image, reference: Image.Image, mask: Image.Image) -> Image.Image:
    """Colour correction: undo the colour drift measured where nothing was to change.

    Outside the mask the generated picture should equal the reference; the per-channel mean
    and spread of the difference there give an affine correction applied to the whole picture
    (the masked area included). With under 1% of the picture unmasked it is left alone.
    """
    known = np.asarray(mask) == 0
    if known.mean() < 0.01:
        return generated
    gen = np.asarray(generated.convert("RGB"), dtype=np.float64)
    ref = np.asarray(reference.convert("RGB"), dtype=np.float64)
    g, r = gen[known], ref[known]
    g_std, r_std = g.std(axis=0), r.std(axis=0)
    gain = np.where(g_std > 1e-6, r_std / np.maximum(g_std, 1e-6), 1.0)
    corrected = (gen - g.mean(axis=0)) * gain + r.mean(axis=0)
    return Image.fromarray(np.clip(np.rint(corrected), 0, 255).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------- the request


@dataclass(frozen=True)
class InpaintJob:
    """What a mask resolves to before any tensor work: pictures and masks at their sizes."""

    options: InpaintOptions
    #: The processing mask at W×H (fill, latent mask and 9-channel conditioning read it).
    mask: Image.Image
    #: The W×H pictures to encode, masked content already painted in.
    sources: tuple[Image.Image, ...]
    #: The W×H pictures before the masked content was painted in (colour reference).
    references: tuple[Image.Image, ...]
    #: The output-size pictures laid over the result outside the mask.
    originals: tuple[Image.Image, ...]
    #: Where the generated pixels show, at the output size.
    overlay: Image.Image
    #: "Only masked": where the W×H result goes back into the picture.
    crop: Box | None = None
    #: The prepared mask at the first picture's size (what ControlNet inpaint units mask with).
    picture_mask: Image.Image | None = None
    #: The request's "Upscaler for img2img" (None: Lanczos), for pasting the result back.
    enlarge: Enlarge | None = None

    @property
    def output_size(self) -> tuple[int, int]:
        return self.originals[0].size


def prepare_mask(params: GenerationParams) -> Image.Image:
    """The request's mask at its own size: greyscale, inverted, blurred.

    A1111 blurs the mask at the size it came in (the blur is in the mask's pixels) and only then
    resizes it; a mask whose size is not the picture's is reported here, resized later.
    """
    if params.mask is None:
        raise InvalidParameter("mask", None, "a mask image")
    if not params.init_images:
        raise InvalidParameter("init_images", (), "a picture to inpaint with the mask")
    opts = params.inpaint
    mask = to_mask(params.mask, round_alpha=opts.mask_round and not opts.soft)
    warn_if_resized(mask, params.init_images[0].size, params.resize_mode)
    if opts.invert:
        mask = invert_mask(mask)
    if opts.mask_blur_x > 0 or opts.mask_blur_y > 0:
        mask = blur_mask(mask, opts.mask_blur_x, opts.mask_blur_y)
    return mask


def prepare_inpaint(params: GenerationParams, width: int, height: int, *,
                    enlarge: Enlarge | None = None) -> InpaintJob | None:
    """Resolve the mask into pictures and masks; None when the mask is empty (nothing to repaint).
    ``enlarge``: the upscaler for every picture resize that enlarges (A1111's "Upscaler for img2img")."""
    mask = prepare_mask(params)
    if is_empty(mask):
        return None
    opts = params.inpaint
    pictures = [image.convert("RGB") for image in params.init_images]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MaskResizedWarning)  # prepare_mask reported it
        picture_mask = fit_mask(mask, pictures[0].size, params.resize_mode)
    if opts.full_res and is_empty(picture_mask):  # a speck lost when shrinking the mask
        return None
    if opts.full_res:
        return _only_masked(opts, picture_mask, pictures, width, height, enlarge)
    return _whole_picture(opts, mask, picture_mask, pictures, width, height, params.resize_mode, enlarge)


def _whole_picture(opts: InpaintOptions, mask: Image.Image, picture_mask: Image.Image, pictures: list[Image.Image],
                   width: int, height: int, resize_mode: int, enlarge: Enlarge | None) -> InpaintJob:
    """Picture and mask each resized straight to W×H, as A1111 does; the output is W×H."""
    mask = resize_image(mask, width, height, resize_mode)
    resized = tuple(resize_image(image, width, height, resize_mode, enlarge=enlarge) for image in pictures)
    return InpaintJob(opts, mask, _with_content(resized, mask, opts), resized, resized,
                      overlay_mask(mask, cropped=False, soft=opts.soft), picture_mask=picture_mask, enlarge=enlarge)


def _only_masked(opts: InpaintOptions, mask: Image.Image, pictures: list[Image.Image],
                 width: int, height: int, enlarge: Enlarge | None) -> InpaintJob:
    """The mask's region (plus padding, at the W:H aspect) worked on at W×H; the output keeps the picture's size.

    A mask of another size is first fitted to the picture (A1111 would crop the picture at the
    mask's coordinates, which only line up when the sizes agree).
    """
    for index, image in enumerate(pictures):
        if image.size != mask.size:
            raise ImageError(f"init_images[{index}]: {image.width}x{image.height}, expected "
                             f"{mask.width}x{mask.height} like the first picture for \"Only masked\"",
                             field="init_images")
    box = widen_to_aspect(crop_box(mask, opts.full_res_padding), width, height, mask.size)
    crop_mask = resize_image(mask.crop(box.as_tuple()), width, height, RESIZE_AND_FILL)
    crops = tuple(resize_image(image.crop(box.as_tuple()), width, height, RESIZE_AND_FILL, enlarge=enlarge)
                  for image in pictures)
    return InpaintJob(opts, crop_mask, _with_content(crops, crop_mask, opts), crops, tuple(pictures),
                      overlay_mask(mask, cropped=True, soft=opts.soft), crop=box, picture_mask=mask, enlarge=enlarge)


def _with_content(pictures: Sequence[Image.Image], mask: Image.Image, opts: InpaintOptions) -> tuple[Image.Image, ...]:
    """A1111 paints "fill" into the hole for every masked content except "original"."""
    if opts.masked_content == "original":
        return tuple(pictures)
    return tuple(fill_masked(image, mask) for image in pictures)


def composite(generated: Image.Image, job: InpaintJob, index: int) -> Image.Image:
    """The final picture: colour-corrected, pasted back into the crop, originals laid over outside the mask."""
    original = job.originals[index % len(job.originals)]
    if job.options.color_correction:
        generated = match_colours(generated, job.references[index % len(job.references)], job.mask)
    if job.crop is not None:
        base = original.copy()
        pasted = resize_image(generated, job.crop.width, job.crop.height, CROP_AND_RESIZE, enlarge=job.enlarge)
        base.paste(pasted, (job.crop.x1, job.crop.y1))
        generated = base
    return overlay_original(generated, original, job.overlay)


def overlay_original(generated: Image.Image, original: Image.Image, overlay: Image.Image) -> Image.Image:
    """A1111's final overlay: the original, premultiplied by the inverted overlay mask, alpha-composited over the result.

    The original is first laid into a premultiplied ("RGBa") layer whose alpha is ``255 − overlay``
    and that layer is composited over the generated picture, with Pillow's rounding at each
    step; a plain masked paste rounds differently and is off by one level in the seam.
    """
    layer = Image.new("RGBa", original.size)
    layer.paste(original.convert("RGBA").convert("RGBa"), mask=invert_mask(overlay))
    result = generated.convert("RGBA")
    result.alpha_composite(layer.convert("RGBA"))
    return result.convert("RGB")


def inpaint_infotext(options: InpaintOptions, *, cropped: bool, conditioning: bool,
                     masked: bool = True) -> tuple[tuple[str, str], ...]:
    """The keys A1111 1.10 writes for an inpainting run, in its order, each only when it applies.

    An inpainting checkpoint records its conditional mask weight even without a mask.
    """
    entries: list[tuple[str, str]] = []
    if not masked:
        return (("Conditional mask weight", str(float(options.mask_weight))),) if conditioning else ()
    if options.invert:
        entries.append(("Mask mode", "Inpaint not masked"))
    if (options.mask_blur_x > 0 or options.mask_blur_y > 0) and options.mask_blur_x == options.mask_blur_y:
        entries.append(("Mask blur", str(options.mask_blur_x)))
    if cropped:
        entries += [("Inpaint area", "Only masked"), ("Masked area padding", str(options.full_res_padding))]
    if options.masked_content != "original":
        entries.append(("Masked content", options.masked_content))
    if options.soft:
        entries.append(("Soft inpainting enabled", "True"))
    if conditioning:
        entries.append(("Conditional mask weight", str(float(options.mask_weight))))
    return tuple(entries)


# --------------------------------------------------------------------------- latents


def latent_mask(mask: Image.Image, size: tuple[int, int], *, round_mask: bool = True) -> torch.Tensor:
    """The mask on the latent grid, ``[1, 1, h, w]`` in [0, 1] (1 = repaint).

    A1111 shrinks the processing mask with Pillow's bicubic filter and rounds it to 0/1
    (soft inpainting keeps the fractions).
    """
    small = np.asarray(mask.resize(size, Image.Resampling.BICUBIC), dtype=np.float32) / 255
    if round_mask:
        small = np.around(small)
    return torch.from_numpy(np.ascontiguousarray(small))[None, None]


def conditioning_mask(mask: Image.Image, *, round_mask: bool = True) -> torch.Tensor:
    """The full-resolution mask a 9-channel model is conditioned on, ``[1, 1, H, W]``, rounded to 0/1."""
    values = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255)[None, None]
    return torch.round(values) if round_mask else values


def masked_content_latent(init: torch.Tensor, mask: torch.Tensor, content: str, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Apply "latent noise" (unit Gaussian noise) or "latent nothing" (zeros) inside the latent mask."""
    if content == "latent noise":
        if noise is None:
            raise InvalidParameter("noise", None, "a noise tensor for \"latent noise\"")
        return init * (1 - mask) + noise * mask
    if content == "latent nothing":
        return init * (1 - mask)
    return init


def inpaint_conditioning(encode: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor,
                         mask: torch.Tensor | None, weight: float = 1.0) -> torch.Tensor:
    """``[mask, VAE(masked picture)]``, the 5 extra input channels of a 9-channel inpainting UNet.

    ``pixels`` are in [-1, 1]; the masked picture is ``lerp(pixels, pixels·(1−mask), weight)``
    (A1111's "Conditional mask weight": 1 blanks the hole to grey, 0 shows the whole picture).
    Without a mask everything counts as masked, as for txt2img. The mask is shrunk to the
    latent grid with nearest-neighbour sampling.
    """
    if mask is None:
        mask = pixels.new_ones(1, 1, *pixels.shape[-2:])
    mask = mask.to(device=pixels.device, dtype=pixels.dtype)
    latents = encode(torch.lerp(pixels, pixels * (1.0 - mask), weight))
    small = F.interpolate(mask, size=latents.shape[-2:]).to(latents.dtype)
    return torch.cat([small.expand(latents.shape[0], -1, -1, -1), latents], dim=1)


def concat_channels(model_fn: Callable, extra: torch.Tensor) -> Callable:
    """A model function that appends ``extra`` channels to its (already scaled) input.

    The sampler's latent is scaled by c_in first and the conditioning channels are not; rows
    repeat for the batched [cond; uncond] call of classifier-free guidance.
    """

    def call(x_in: torch.Tensor, t: torch.Tensor, cond):
        rows = extra.repeat(x_in.shape[0] // extra.shape[0], 1, 1, 1).to(x_in)
        return model_fn(torch.cat([x_in, rows], dim=1), t, cond)

    return call


def blend_denoiser(denoiser: Callable, init_latent: torch.Tensor, mask: torch.Tensor) -> Callable:
    """A1111's inpaint blend: each denoised estimate keeps the original latent outside the mask."""
    keep = 1 - mask

    def denoise(x: torch.Tensor, sigma: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return init_latent * keep + denoiser(x, sigma, *args, **kwargs) * mask

    return denoise


def differential_denoiser(denoiser: Callable, init_latent: torch.Tensor, mask: torch.Tensor,
                          sigmas: torch.Tensor) -> Callable:
    """Soft inpainting as Differential Diffusion (Levin & Fried, 2023): grey means "change less".

    A latent pixel with mask value m follows the original for the first (1 − m) of the steps
    and is free after that, so 1 repaints fully, 0 keeps the original and grey levels change
    in between. The step is found from sigma's place in the schedule.
    """
    schedule = [float(s) for s in sigmas]
    steps = max(len(schedule) - 1, 1)

    def denoise(x: torch.Tensor, sigma: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        level = float(sigma.reshape(-1)[0])
        done = sum(1 for s in schedule if s > level)
        free = (mask > 1 - (done + 1) / steps).to(x.dtype)
        return init_latent * (1 - free) + denoiser(x, sigma, *args, **kwargs) * free

    return denoise


def blend_latents(samples: torch.Tensor, init_latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A1111's final blend after sampling: the original latent outside the mask."""
    return samples * mask + init_latent * (1 - mask)


def rounds_masks(options: InpaintOptions) -> bool:
    """A1111's ``mask_round``: on unless turned off or inpainting softly."""
    return options.mask_round and not options.soft


def job_pixels(job: InpaintJob, batch: int) -> torch.Tensor:
    """The batch's W×H source pictures as a ``[B, 3, H, W]`` tensor in [-1, 1] (image i uses source i mod n)."""
    from ..imageio.convert import images_to_tensor

    return images_to_tensor([job.sources[i % len(job.sources)] for i in range(batch)])


@dataclass(frozen=True)
class MaskedLatents:
    """The latent side of an inpainting batch: the original latent and the latent mask."""

    init: torch.Tensor
    mask: torch.Tensor
    soft: bool = False

    def wrap(self, denoiser: Callable, sigmas: torch.Tensor) -> Callable:
        """The per-step blend around the denoiser (differential for soft masks)."""
        if self.soft:
            return differential_denoiser(denoiser, self.init, self.mask, sigmas)
        return blend_denoiser(denoiser, self.init, self.mask)

    def finish(self, samples: torch.Tensor) -> torch.Tensor:
        return blend_latents(samples, self.init, self.mask)


def job_latents(job: InpaintJob, encode: Callable[[torch.Tensor], torch.Tensor], *, batch: int,
                noise: torch.Tensor | None = None) -> MaskedLatents:
    """Encode the sources, shrink the mask to the latent grid and apply latent masked content."""
    init = encode(job_pixels(job, batch))
    size = (init.shape[-1], init.shape[-2])
    mask = latent_mask(job.mask, size, round_mask=rounds_masks(job.options)).to(init.device, init.dtype)
    init = masked_content_latent(init, mask, job.options.masked_content, noise)
    return MaskedLatents(init, mask, soft=job.options.soft)


def image_conditioning(encode: Callable[[torch.Tensor], torch.Tensor], *, job: InpaintJob | None,
                       pixels: torch.Tensor | None, weight: float, batch: int, size: tuple[int, int]) -> torch.Tensor:
    """The extra input of a 9-channel checkpoint for any request.

    With a mask: the mask and the masked sources. Without one, everything counts as masked:
    img2img passes its pictures (shown through when the weight is below 1), txt2img a grey
    picture, as A1111 does.
    """
    if job is not None:
        mask = conditioning_mask(job.mask, round_mask=rounds_masks(job.options))
        return inpaint_conditioning(encode, job_pixels(job, batch), mask, job.options.mask_weight)
    if pixels is None:
        pixels = torch.zeros(batch, 3, size[1], size[0])
    return inpaint_conditioning(encode, pixels, None, weight)


# --------------------------------------------------------------------------- outpainting


@dataclass(frozen=True)
class OutpaintOptions:
    """Extend the canvas by whole latent cells on any side, painted by ``fill``, then inpaint the margins."""

    left: int = 0
    right: int = 0
    up: int = 0
    down: int = 0
    fill: str = "blur"
    #: "matched" only (A1111's Outpainting mk2): how fast the noise's detail falls off with frequency
    #: (the noise spectrum goes as 1/f^falloff: lower is finer detail) and how much its colours vary.
    falloff: float = 1.0
    color_variation: float = 0.05

    def __post_init__(self) -> None:
        for name in ("left", "right", "up", "down"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 4096:
                raise InvalidParameter(name, value, "a whole number of pixels from 0 to 4096")
        if not (self.left or self.right or self.up or self.down):
            raise InvalidParameter("outpaint", 0, "at least one side to extend (left, right, up or down > 0)")
        if self.fill not in OUTPAINT_FILLS:
            raise InvalidParameter("fill", self.fill, "one of " + ", ".join(OUTPAINT_FILLS))
        for name, high in (("falloff", 4.0), ("color_variation", 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= high:
                raise InvalidParameter(name, value, f"a number from 0 to {high:g}")


@dataclass(frozen=True)
class Margins:
    """Pixels added on each side; the canvas is ``(w + left + right) × (h + up + down)``."""

    left: int
    right: int
    up: int
    down: int


def outpaint_margins(options: OutpaintOptions, image_size: tuple[int, int]) -> Margins:
    """Each margin rounded up to a multiple of 8, plus what makes the canvas a multiple of 8.

    A picture whose side is not a multiple of 8 gets the few extra pixels on the side being
    extended (right or down when both or neither are), so the canvas needs no resizing and the
    original pixels survive unchanged.
    """
    left, right, up, down = (_round_up(v) for v in (options.left, options.right, options.up, options.down))
    w, h = image_size
    extra_w, extra_h = -(w + left + right) % MARGIN_MULTIPLE, -(h + up + down) % MARGIN_MULTIPLE
    if left and not right:
        left += extra_w
    else:
        right += extra_w
    if up and not down:
        up += extra_h
    else:
        down += extra_h
    return Margins(left, right, up, down)


def _round_up(value: int) -> int:
    return -(-value // MARGIN_MULTIPLE) * MARGIN_MULTIPLE


def outpaint_canvas(image: Image.Image, margins: Margins, fill: str = "blur", *, seed: int = 0,
                    falloff: float = 1.0, color_variation: float = 0.05) -> tuple[Image.Image, Image.Image]:
    """The larger canvas with the picture in place and its margins painted, and the margins' mask.

    "edge" stretches the outermost pixels outwards, "blur" is A1111's fill (surrounding colours
    blurred), "noise" is uniform colour noise from ``seed``, "matched" is the blur fill with noise
    that matches the picture laid over it (:func:`matched_noise`, for A1111's Outpainting mk2).
    """
    rgb = image.convert("RGB")
    w, h = rgb.size
    pad = ((margins.up, margins.down), (margins.left, margins.right), (0, 0))
    mask = np.full((h + margins.up + margins.down, w + margins.left + margins.right), 255, np.uint8)
    mask[margins.up:margins.up + h, margins.left:margins.left + w] = 0
    mask_image = Image.fromarray(mask, "L")
    if fill == "edge":
        canvas = Image.fromarray(np.pad(np.asarray(rgb), pad, mode="edge"), "RGB")
    elif fill == "noise":
        noise = np.random.default_rng(seed).integers(0, 256, size=mask.shape + (3,), dtype=np.uint8)
        noise[margins.up:margins.up + h, margins.left:margins.left + w] = np.asarray(rgb)
        canvas = Image.fromarray(noise, "RGB")
    elif fill in ("blur", "matched"):
        canvas = fill_masked(Image.fromarray(np.pad(np.asarray(rgb), pad), "RGB"), mask_image)
        if fill == "matched":
            canvas = matched_noise(canvas, mask_image, falloff=falloff, color_variation=color_variation, seed=seed)
    else:
        raise InvalidParameter("fill", fill, "one of " + ", ".join(OUTPAINT_FILLS))
    return canvas, mask_image


def matched_noise(canvas: Image.Image, mask: Image.Image, *, falloff: float = 1.0, color_variation: float = 0.05,
                  seed: int = 0) -> Image.Image:
    """``canvas`` with noise that matches its unmasked pixels laid over the masked ones.

    The noise is Gaussian noise whose spectrum falls off as 1/f^``falloff`` (1: "pink" noise, 0: white),
    scaled, channel by channel, to the spread of the unmasked pixels' colours: one field shared by the
    three channels (light and dark) plus ``color_variation`` times a field of each channel's own (hue).
    The masked pixels keep their colour underneath (the blur fill's) as the mean. Unmasked pixels are
    left exactly as they are.
    """
    values = np.asarray(canvas.convert("RGB"), dtype=np.float64) / 255.0
    inside = np.asarray(mask.convert("L")) > 127
    if not inside.any() or inside.all():
        return canvas
    rng = np.random.default_rng(seed)
    h, w = inside.shape
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    frequency = np.hypot(fx, fy)
    frequency[0, 0] = 1.0 / max(h, w)
    envelope = frequency ** -float(falloff)

    def field() -> np.ndarray:  # mean 0 and spread 1 over the masked pixels
        shaped = np.fft.irfft2(np.fft.rfft2(rng.standard_normal((h, w))) * envelope, s=(h, w))
        return (shaped - shaped[inside].mean()) / (shaped[inside].std() + 1e-12)

    spread = values[~inside].std(axis=0)  # (3,)
    shared = field()[..., None]
    own = np.stack([field() for _ in range(3)], axis=-1)
    noise = (shared + color_variation * own) * spread
    values[inside] = np.clip(values[inside] + noise[inside], 0.0, 1.0)
    return Image.fromarray(np.round(values * 255.0).astype(np.uint8), "RGB")


def feather_mask(mask: Image.Image, margins: Margins, image_size: tuple[int, int], blur_x: float, blur_y: float) -> Image.Image:
    """The margins' mask with its seam feathered on the margins' side only.

    The mask is pulled back from the picture by the blur's reach (at most half of each
    margin), blurred, and then set to exactly 0 over the picture, which therefore stays
    untouched however narrow the margins are.
    """
    reach_x = blur_kernel_size(blur_x) // 2 if blur_x > 0 else 0
    reach_y = blur_kernel_size(blur_y) // 2 if blur_y > 0 else 0
    w, h = image_size
    top, left = margins.up, margins.left
    values = np.array(mask)
    values[top - min(reach_y, margins.up // 2):top + h + min(reach_y, margins.down // 2),
           left - min(reach_x, margins.left // 2):left + w + min(reach_x, margins.right // 2)] = 0
    if reach_x or reach_y:
        values = np.array(blur_mask(Image.fromarray(values, "L"), blur_x, blur_y))
    values[top:top + h, left:left + w] = 0
    return Image.fromarray(values, "L")


def _matched_settings(options: OutpaintOptions) -> str:
    if options.fill != "matched":
        return ""
    return f", falloff {options.falloff:g}, color variation {options.color_variation:g}"


def outpaint_params(params: GenerationParams, options: OutpaintOptions) -> GenerationParams:
    """The inpainting request that outpaints ``params.init_images[0]``: canvas, mask and size.

    The output is the canvas size unless the request names another one. The picture is kept
    bit for bit; the request's mask blur feathers the seam on the margins' side (the mask
    comes blurred already, so the request's own blur is set to 0).
    """
    if not params.init_images:
        raise InvalidParameter("init_images", (), "a picture to outpaint")
    params = params.with_seed()  # the noise fill follows the recorded seed
    image = params.init_images[0]
    margins = outpaint_margins(options, image.size)
    canvas, mask = outpaint_canvas(image, margins, options.fill, seed=params.seed, falloff=options.falloff,
                                   color_variation=options.color_variation)
    opts = params.inpaint
    mask = feather_mask(mask, margins, image.size, opts.mask_blur_x, opts.mask_blur_y)
    return params.replace(
        init_images=(canvas,), mask=mask, inpaint=replace(opts, mask_blur_x=0, mask_blur_y=0),
        width=params.width or canvas.width, height=params.height or canvas.height,
        extra_infotext=params.extra_infotext + (("Outpaint", f"left {margins.left}, right {margins.right}, "
                                                              f"up {margins.up}, down {margins.down}, fill {options.fill}"
                                                              + _matched_settings(options)),),
    )

