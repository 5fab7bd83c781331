"""A1111's img2img resize modes, with A1111 1.10's exact geometry (``images.resize_image``).

Every mode centres the picture with the same integer arithmetic A1111 uses (``size // 2 -
scaled // 2``), so the kept region, the offsets and the bars match A1111 pixel for pixel.
The image's mode is kept (A1111 always returns RGB; keeping RGBA or L lets the same function
resize masks and transparent inputs).
"""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image

from ..errors import InvalidParameter

#: Enlarges a picture by a scale as an upscaler does (A1111's "Upscaler for img2img"; made by
#: pipeline/upscale.py ``enlarger``): ``enlarge(image, scale)``, the result about ``scale`` times
#: the size (each side rounded down to a multiple of 8), which the resize then brings to the target.
Enlarge = Callable[[Image.Image, float], Image.Image]

JUST_RESIZE = 0
CROP_AND_RESIZE = 1
RESIZE_AND_FILL = 2
LATENT_UPSCALE = 3  # "Just resize (latent upscale)": the latent is resized; pixels as mode 0
RESIZE_MODE_NAMES = {
    JUST_RESIZE: "Just resize",
    CROP_AND_RESIZE: "Crop and resize",
    RESIZE_AND_FILL: "Resize and fill",
    LATENT_UPSCALE: "Just resize (latent upscale)",
}
#: Sizes are multiples of this: the VAE works on 8x8 pixel blocks.
SIZE_MULTIPLE = 8
#: The largest picture a resize step may make on its way (a 4096 x 1 strip covering 512 x 512 would be
#: 512 x 2097152 before its crop): 2^26 pixels, 192 MiB as RGB.
MAX_SCALED_PIXELS = 2**26


def check_scaled(size: tuple[int, int], source: tuple[int, int], target: tuple[int, int],
                 field: str = "resize_mode") -> None:
    """Refuse a scaling step to ``size`` that has an empty side or more than :data:`MAX_SCALED_PIXELS`:
    a ``source`` picture whose shape is too far from the ``target``'s for the resize mode."""
    if min(size) < 1 or size[0] * size[1] > MAX_SCALED_PIXELS:
        raise InvalidParameter(field, f"a {source[0]}x{source[1]} picture for {target[0]}x{target[1]}",
                               "a picture whose shape is closer to the output's (scaled for this resize mode it "
                               f"would be {size[0]}x{size[1]}); or Just resize")


def resize_image(image: Image.Image, width: int, height: int, mode: int, *,
                 enlarge: Enlarge | None = None) -> Image.Image:
    """Resize to ``width`` x ``height`` with A1111 resize mode 0, 1, 2 or 3 (3 acts as 0 here).

    ``enlarge``: the upscaler that makes each scaling step larger than the picture (A1111's
    "Upscaler for img2img", :func:`scale_to`); None scales with Lanczos alone.
    """
    _check_size(width, height)
    if mode in (JUST_RESIZE, LATENT_UPSCALE):
        return scale_to(image, width, height, enlarge)
    if mode == CROP_AND_RESIZE:
        return _crop_and_resize(image, width, height, enlarge)
    if mode == RESIZE_AND_FILL:
        return _resize_and_fill(image, width, height, enlarge)
    raise InvalidParameter(
        "resize_mode", mode, "0 (Just resize), 1 (Crop and resize), 2 (Resize and fill) or 3"
    )


def scale_to(image: Image.Image, width: int, height: int, enlarge: Enlarge | None = None) -> Image.Image:
    """One scaling step of A1111's resize: Pillow's Lanczos, unless an upscaler is given and the
    step enlarges (by s = the larger of width/w and height/h): then ``enlarge(image, s)`` first and
    Lanczos to the exact size if that differs. Greyscale pictures (masks) and pictures with
    transparency always take Lanczos alone (upscalers work on RGB)."""
    if enlarge is not None and image.mode == "RGB":
        scale = max(width / image.width, height / image.height)
        if scale > 1.0:
            image = enlarge(image, scale)
        if image.size == (width, height):
            return image
    return image.resize((width, height), resample=Image.Resampling.LANCZOS)


def _crop_and_resize(image: Image.Image, width: int, height: int, enlarge: Enlarge | None) -> Image.Image:
    """Scale to cover the target (floor division for the long side), then keep the centre."""
    iw, ih = image.size
    if width * ih > iw * height:  # target is wider than the source: match widths
        scaled = (width, ih * width // iw)
    else:  # match heights
        scaled = (iw * height // ih, height)
    check_scaled(scaled, (iw, ih), (width, height))
    return _paste_centred(scale_to(image, *scaled, enlarge), width, height)


def _resize_and_fill(image: Image.Image, width: int, height: int, enlarge: Enlarge | None) -> Image.Image:
    """Scale to fit inside the target, centre it, and fill the bars from the edges."""
    iw, ih = image.size
    if width * ih < iw * height:  # source is wider: match widths, bars above and below
        scaled = (width, ih * width // iw)
    else:  # match heights, bars left and right (none when the aspect ratios are equal)
        scaled = (iw * height // ih, height)
    check_scaled(scaled, (iw, ih), (width, height))
    resized = scale_to(image, *scaled, enlarge)
    result = _paste_centred(resized, width, height)
    if width * ih < iw * height:
        _fill_bars(result, resized, vertical=True)
    elif width * ih > iw * height:
        _fill_bars(result, resized, vertical=False)
    return result


def _paste_centred(resized: Image.Image, width: int, height: int) -> Image.Image:
    """Paste on a black canvas at A1111's offset ``(W//2 - w//2, H//2 - h//2)``; may crop."""
    canvas = Image.new(resized.mode, (width, height))
    offset = (width // 2 - resized.width // 2, height // 2 - resized.height // 2)
    canvas.paste(resized, offset)
    return canvas


def _fill_bars(canvas: Image.Image, resized: Image.Image, *, vertical: bool) -> None:
    """Fill the two bars by stretching the resized image's outer line across each bar.

    A1111 stretches a zero-height (or zero-width) box at each edge with Pillow's default
    bicubic filter; sampling a line at the edge gives 1.125 x the edge line - 0.125 x the next
    one. Both bars have A1111's size ``H//2 - h//2`` (resp. width) and the second starts right
    after the picture, so with an odd leftover the last line stays black, as in A1111. A bar of
    size 0 is skipped (A1111 fails there).
    """
    if vertical:
        bar = canvas.height // 2 - resized.height // 2
        if bar <= 0:
            return
        first_box = (0, 0, canvas.width, 0)
        second_box = (0, resized.height, canvas.width, resized.height)
        size, second_at = (canvas.width, bar), (0, bar + resized.height)
    else:
        bar = canvas.width // 2 - resized.width // 2
        if bar <= 0:
            return
        first_box = (0, 0, 0, canvas.height)
        second_box = (resized.width, 0, resized.width, canvas.height)
        size, second_at = (bar, canvas.height), (bar + resized.width, 0)
    bicubic = Image.Resampling.BICUBIC
    canvas.paste(resized.resize(size, resample=bicubic, box=first_box), (0, 0))
    canvas.paste(resized.resize(size, resample=bicubic, box=second_box), second_at)


def _check_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidParameter(name, value, "a positive whole number of pixels")


def round_to_multiple(value: int, multiple: int = SIZE_MULTIPLE) -> int:
    """Round down to a multiple (at least one multiple): 517 -> 512, 5 -> 8.

    Down, because A1111's "Resize by" does ``int(w * scale) // 8 * 8``-style flooring and the
    latent is ``size // 8`` anyway: rounding down never asks for pixels the picture lacks.
    """
    if multiple < 1:
        raise InvalidParameter("multiple", multiple, "a positive whole number")
    return max(multiple, int(value) // multiple * multiple)


def output_size(
    image_size: tuple[int, int], width: int | None = None, height: int | None = None
) -> tuple[int, int]:
    """The generation size: explicit values win; a missing side follows the input's aspect.

    With neither given, the input's own size rounded down to a multiple of 8 (a 1023x769 photo
    becomes 1016x768). With one given, the other is the input's aspect ratio applied to it,
    rounded down to a multiple of 8. Explicit values are returned unchanged (validating them is
    the request's job).
    """
    iw, ih = image_size
    if iw < 1 or ih < 1:
        raise InvalidParameter("image size", image_size, "a width and height of at least 1")
    if width and height:
        return width, height
    if width:
        return width, round_to_multiple(width * ih // iw)
    if height:
        return round_to_multiple(height * iw // ih), height
    return round_to_multiple(iw), round_to_multiple(ih)
