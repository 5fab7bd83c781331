"""A1111's Extras tab over the API: /extra-single-image and /extra-batch-images.

Pictures are upscaled with A1111's built-in upscalers, the ones /upscalers lists ("None",
"Lanczos", "Nearest"), the way its "Upscale" postprocessing step runs them:

- the scale is ``upscaling_resize`` (resize_mode 0), or the larger of target width / picture
  width and target height / picture height (resize_mode 1);
- the upscaler resizes the picture by that scale (each side cut to an integer), then Lanczos
  brings it to the scaled size rounded down to a multiple of 8 (a picture already at least that
  size, when the scale is not 1, gets only the Lanczos step);
- resize_mode 1 with ``upscaling_crop`` centres that on a black canvas of the target size;
- ``upscaler_2`` at ``extras_upscaler_2_visibility`` above 0 upscales the same picture again and
  is blended in; with ``upscaler_1`` "None" nothing is done at all.

Each returned PNG keeps the input's ``parameters`` infotext and gains a ``postprocessing`` text
("Postprocess upscale by: 2.0, Postprocess upscaler: Lanczos"), as A1111 writes them.
Face restoration (GFPGAN, CodeFormer) is not available: a visibility above 0 is refused by name.
The work is Pillow resizing in a worker thread, never on the generation queue, one request at a
time (each may hold up to ``Limits.max_input_images`` pictures at the pixel limit, so concurrent
ones would add up).
"""

from __future__ import annotations

import html
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from ...errors import InvalidParameter, UnknownName
from ...params import HIRES_PIXEL_UPSCALERS
from ..config import Limits
from ..images import PictureBudget, decode_image
from ..security import JSONValueLimitRoute
from ..state import server_state
from .requests import ExtrasBatchImagesRequest, ExtrasRequest, ExtrasSingleImageRequest
from .responses import ExtrasBatchImagesResponse, ExtrasSingleImageResponse

if TYPE_CHECKING:
    from PIL.Image import Image

router = APIRouter(prefix="/sdapi/v1", tags=["extras"], route_class=JSONValueLimitRoute)


@dataclass(frozen=True)
class ExtrasJob:
    """Checked Extras settings: upscalers by their A1111 names (None: "None")."""

    upscaler: str | None
    second: str | None
    visibility: float
    mode: int
    scale: float
    width: int
    height: int
    crop: bool


def _upscaler(value: str, field: str) -> str | None:
    for name in HIRES_PIXEL_UPSCALERS:
        if value.strip().lower() == name.lower():
            return None if name == "None" else name
    raise UnknownName(field, value, HIRES_PIXEL_UPSCALERS)


def prepare(req: ExtrasRequest) -> ExtrasJob:
    """The request's settings, refusing what underpaint cannot do by the field's name."""
    for name in ("gfpgan_visibility", "codeformer_visibility"):
        if getattr(req, name) > 0:
            raise InvalidParameter(name, getattr(req, name), "0 (face restoration is not available in underpaint)")
    return ExtrasJob(upscaler=_upscaler(req.upscaler_1, "upscaler_1"), second=_upscaler(req.upscaler_2, "upscaler_2"),
                     visibility=req.extras_upscaler_2_visibility, mode=req.resize_mode, scale=req.upscaling_resize,
                     width=req.upscaling_resize_w, height=req.upscaling_resize_h, crop=req.upscaling_crop)


def _scale(job: ExtrasJob, image: "Image") -> float:
    if job.mode == 1:
        return max(job.width / image.width, job.height / image.height)
    return job.scale


def _check_size(job: ExtrasJob, image: "Image", field: str, limits: Limits) -> None:
    """Refuse, before any work, a result (or the upscaler's step before the rounding) beyond the
    limits, or one under 8 pixels a side (compared as numbers first: a huge scale never overflows)."""
    scale = _scale(job, image)
    sizes = [(image.width * scale, image.height * scale)]
    if job.mode == 1 and job.crop:
        sizes.append((job.width, job.height))
    if job.mode == 1:
        name, value = "upscaling_resize_w", f"{job.width}x{job.height}"
    else:
        name, value = "upscaling_resize", job.scale
    for w, h in sizes:
        if not (w <= limits.max_width and h <= limits.max_height and int(w) * int(h) <= limits.max_image_pixels):
            shown = f"{int(w)}x{int(h)}" if w <= 1e9 and h <= 1e9 else "larger still"
            raise InvalidParameter(name, value, f"a result of at most {limits.max_width}x{limits.max_height} and "
                                                f"{limits.max_image_pixels} pixels (this server's limits; {field} "
                                                f"would become {shown})")
    w, h = sizes[0]
    if int(w) // 8 < 1 or int(h) // 8 < 1:
        raise InvalidParameter(name, value, f"a result at least 8 pixels on each side ({field} would become "
                                            f"{int(w)}x{int(h)})")


def upscale(image: "Image", upscaler: str, scale: float) -> "Image":
    """A1111's built-in upscaler step: by ``scale`` with the upscaler's filter, then Lanczos to the
    scaled size rounded down to a multiple of 8."""
    from PIL import Image as PILImage

    lanczos = PILImage.Resampling.LANCZOS
    dest = (int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8))
    reached = image.width >= dest[0] and image.height >= dest[1]
    if not (reached and scale != 1):
        resample = PILImage.Resampling.NEAREST if upscaler == "Nearest" else lanczos
        image = image.resize((int(image.width * scale), int(image.height * scale)), resample=resample)
    if image.size != dest:
        image = image.resize(dest, resample=lanczos)
    return image


def run(job: ExtrasJob, image: "Image") -> tuple["Image", str]:
    """One picture through the Upscale step: the result (RGB) and its postprocessing text."""
    from PIL import Image as PILImage

    image = image.convert("RGB")
    if job.upscaler is None:
        return image, ""
    scale = _scale(job, image)
    info: dict[str, str] = {}
    if job.mode == 1:
        info["Postprocess upscale to"] = f"{job.width}x{job.height}"
    else:
        info["Postprocess upscale by"] = str(job.scale)

    def step(upscaler: str) -> "Image":
        result = upscale(image, upscaler, scale)
        if job.mode == 1 and job.crop:
            canvas = PILImage.new("RGB", (job.width, job.height))
            canvas.paste(result, (job.width // 2 - result.width // 2, job.height // 2 - result.height // 2))
            info["Postprocess crop to"] = f"{job.width}x{job.height}"
            result = canvas
        return result

    result = step(job.upscaler)
    info["Postprocess upscaler"] = job.upscaler
    if job.second is not None and job.visibility > 0:
        result = PILImage.blend(result, step(job.second), job.visibility)
        info["Postprocess upscaler 2"] = job.second
    return result, ", ".join(f"{key}: {value}" for key, value in info.items())


def encode(image: "Image", parameters: str | None, postprocessing: str) -> str:
    """A base64 PNG with the input's infotext (when it had one) and the postprocessing text."""
    from ...imageio.load import encode_png_base64

    return encode_png_base64(image, parameters or None, {"postprocessing": postprocessing})


def html_info(text: str) -> str:
    """The text as A1111's Extras tab shows it: one paragraph, lines joined by <br>."""
    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"


#: Extras requests run one at a time (see the module docstring).
_ONE_AT_A_TIME = threading.Lock()


def _process(job: ExtrasJob, sources: list[tuple[str, str]], limits: Limits, allow_urls: bool) -> tuple[list[str], str]:
    """Decode every picture and check its result size first, then upscale and encode each."""
    with _ONE_AT_A_TIME:
        return _process_now(job, sources, limits, allow_urls)


def _process_now(job: ExtrasJob, sources: list[tuple[str, str]], limits: Limits,
                 allow_urls: bool) -> tuple[list[str], str]:
    pictures = []
    PictureBudget(limits).take(sources[0][1] if len(sources) == 1 else "imageList", len(sources))  # before decoding
    for data, field in sources:
        image = decode_image(data, field=field, limits=limits, allow_urls=allow_urls)
        if job.upscaler is not None:
            _check_size(job, image, field, limits)
        pictures.append(image)
    encoded, text = [], ""
    for image in pictures:
        result, text = run(job, image)
        parameters = image.info.get("parameters")
        encoded.append(encode(result, parameters if isinstance(parameters, str) else None, text))
    return encoded, text


@router.post("/extra-single-image", response_model=ExtrasSingleImageResponse,
             summary="Upscale one picture (built-in upscalers: Lanczos, Nearest)")
async def extra_single_image(body: ExtrasSingleImageRequest, request: Request) -> ExtrasSingleImageResponse:
    state = server_state(request)
    job = prepare(body)
    images, text = await run_in_threadpool(_process, job, [(body.image, "image")], state.config.limits,
                                           state.config.allow_image_urls)
    return ExtrasSingleImageResponse(html_info=html_info(text), image=images[0])


@router.post("/extra-batch-images", response_model=ExtrasBatchImagesResponse,
             summary="Upscale several pictures (built-in upscalers: Lanczos, Nearest)")
async def extra_batch_images(body: ExtrasBatchImagesRequest, request: Request) -> ExtrasBatchImagesResponse:
    state = server_state(request)
    job = prepare(body)
    if not body.imageList:
        raise InvalidParameter("imageList", [], "a list with at least one picture")
    sources = [(item.data, f"imageList[{i}].data") for i, item in enumerate(body.imageList)]
    images, text = await run_in_threadpool(_process, job, sources, state.config.limits, state.config.allow_image_urls)
    return ExtrasBatchImagesResponse(html_info=html_info(text), images=images)
