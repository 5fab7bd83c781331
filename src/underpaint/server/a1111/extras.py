"""A1111's Extras tab over the API: /extra-single-image and /extra-batch-images.

Pictures are upscaled with the upscalers /upscalers lists, A1111's built-in ones ("None",
"Lanczos", "Nearest") and the upscaling models in the models folder (ESRGAN, Real-ESRGAN), the
way its "Upscale" postprocessing step runs them (pipeline/upscale.py):

- the scale is ``upscaling_resize`` (resize_mode 0), or the larger of target width / picture
  width and target height / picture height (resize_mode 1);
- a built-in upscaler resizes the picture by that scale (each side cut to an integer), a model
  runs its own scale, up to three times until the picture covers the scaled size rounded down to
  a multiple of 8; then Lanczos brings it to that size (a picture already at least that size,
  when the scale is not 1, gets only the Lanczos step);
- resize_mode 1 with ``upscaling_crop`` centres that on a black canvas of the target size;
- ``upscaler_2`` at ``extras_upscaler_2_visibility`` above 0 upscales the same picture again and
  is blended in; with ``upscaler_1`` "None" nothing is done at all.

Each returned PNG keeps the input's ``parameters`` infotext and gains a ``postprocessing`` text
("Postprocess upscale by: 2.0, Postprocess upscaler: Lanczos"), as A1111 writes them.
``gfpgan_visibility`` and then ``codeformer_visibility`` (at ``codeformer_weight``) above 0 restore the
faces (pipeline/face_restore.py) and blend them in by that much ("GFPGAN visibility", "CodeFormer
visibility" and "CodeFormer weight" in the postprocessing text).
Built-in upscaling is Pillow resizing in a worker thread, off the generation queue; a request
that names an upscaling model runs on the queue like a generation (the model uses the
generation device). Either way one request at a time (each may hold up to
``Limits.max_input_images`` pictures at the pixel limit, so concurrent ones would add up).
"""

from __future__ import annotations

import html
import threading
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from ...errors import InvalidParameter
from ...pipeline import upscale as upscalers
from ..config import Limits
from ..images import PictureBudget, decode_image
from ..security import JSONValueLimitRoute
from ..state import server_state
from .requests import ExtrasBatchImagesRequest, ExtrasRequest, ExtrasSingleImageRequest
from .responses import ExtrasBatchImagesResponse, ExtrasSingleImageResponse

if TYPE_CHECKING:
    from PIL.Image import Image

router = APIRouter(prefix="/sdapi/v1", tags=["extras"], route_class=JSONValueLimitRoute)


def _upscaler(value: str, field: str, folder) -> "str | upscalers.UpscalerModelEntry | None":
    found = upscalers.resolve(folder, value, field)
    return None if found == "None" else found


def prepare(req: ExtrasRequest, folder=None) -> upscalers.ExtrasJob:
    """The request's settings, refusing what underpaint cannot do by the field's name. ``folder``:
    the models folder whose upscaling models the request may name."""
    from ...pipeline.face_restore import face_model_files

    for field, restorer in (("gfpgan_visibility", "GFPGAN"), ("codeformer_visibility", "CodeFormer")):
        if getattr(req, field) > 0:
            face_model_files(folder, field, restorer)  # missing files: refused before any work
    return upscalers.ExtrasJob(upscaler=_upscaler(req.upscaler_1, "upscaler_1", folder),
                     second=_upscaler(req.upscaler_2, "upscaler_2", folder),
                     visibility=req.extras_upscaler_2_visibility, mode=req.resize_mode, scale=req.upscaling_resize,
                     width=req.upscaling_resize_w, height=req.upscaling_resize_h, crop=req.upscaling_crop,
                     gfpgan_visibility=req.gfpgan_visibility, codeformer_visibility=req.codeformer_visibility,
                     codeformer_weight=req.codeformer_weight, folder=folder)


def _check_size(job: upscalers.ExtrasJob, image: "Image", field: str, limits: Limits) -> None:
    """Refuse, before any work, a result (or the upscaler's step before the rounding) beyond the
    limits, or one under 8 pixels a side (compared as numbers first: a huge scale never overflows)."""
    scale = upscalers.extras_scale(job, image)
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


def encode(image: "Image", parameters: str | None, postprocessing: str) -> str:
    """A base64 PNG with the input's infotext (when it had one) and the postprocessing text."""
    from ...imageio.load import encode_png_base64

    return encode_png_base64(image, parameters or None, {"postprocessing": postprocessing})


def html_info(text: str) -> str:
    """The text as A1111's Extras tab shows it: one paragraph, lines joined by <br>."""
    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"


#: Extras requests run one at a time (see the module docstring).
_ONE_AT_A_TIME = threading.Lock()


def _process(job: upscalers.ExtrasJob, sources: list[tuple[str, str]], limits: Limits, allow_urls: bool,
             device: str = "cpu") -> tuple[list[str], str]:
    """Decode every picture and check its result size first, then upscale and encode each."""
    with _ONE_AT_A_TIME:
        return _process_now(job, sources, limits, allow_urls, device)


def _process_now(job: upscalers.ExtrasJob, sources: list[tuple[str, str]], limits: Limits,
                 allow_urls: bool, device: str) -> tuple[list[str], str]:
    pictures = []
    PictureBudget(limits).take(sources[0][1] if len(sources) == 1 else "imageList", len(sources))  # before decoding
    for data, field in sources:
        image = decode_image(data, field=field, limits=limits, allow_urls=allow_urls)
        if job.upscaler is not None:
            _check_size(job, image, field, limits)
        pictures.append(image)
    encoded, text = [], ""
    for image in pictures:
        result, text = upscalers.postprocess(job, image, device)
        parameters = image.info.get("parameters")
        encoded.append(encode(result, parameters if isinstance(parameters, str) else None, text))
    return encoded, text


async def _extras(state, job: upscalers.ExtrasJob, sources: list[tuple[str, str]]) -> tuple[list[str], str]:
    """Run the job: in a worker thread (built-in upscalers), or on the generation queue (a model)."""
    limits, allow_urls = state.config.limits, state.config.allow_image_urls
    if not job.uses_model:
        return await run_in_threadpool(_process, job, sources, limits, allow_urls)
    from .generation import await_job

    state.queue.check_room()
    device = state.config.device or "cpu"
    queued = state.queue.submit("extras", lambda _: _process(job, sources, limits, allow_urls, device))
    return await await_job(state, queued)


@router.post("/extra-single-image", response_model=ExtrasSingleImageResponse,
             summary="Upscale one picture (built-in upscalers and upscaling models)")
async def extra_single_image(body: ExtrasSingleImageRequest, request: Request) -> ExtrasSingleImageResponse:
    state = server_state(request)
    job = await run_in_threadpool(prepare, body, state.catalog.folder)
    images, text = await _extras(state, job, [(body.image, "image")])
    return ExtrasSingleImageResponse(html_info=html_info(text), image=images[0])


@router.post("/extra-batch-images", response_model=ExtrasBatchImagesResponse,
             summary="Upscale several pictures (built-in upscalers and upscaling models)")
async def extra_batch_images(body: ExtrasBatchImagesRequest, request: Request) -> ExtrasBatchImagesResponse:
    state = server_state(request)
    job = await run_in_threadpool(prepare, body, state.catalog.folder)
    if not body.imageList:
        raise InvalidParameter("imageList", [], "a list with at least one picture")
    sources = [(item.data, f"imageList[{i}].data") for i, item in enumerate(body.imageList)]
    images, text = await _extras(state, job, sources)
    return ExtrasBatchImagesResponse(html_info=html_info(text), images=images)
