"""The ControlNet extension's routes, which A1111 clients probe to decide what to offer.

/detect runs underpaint's preprocessors (canny, depth, openpose, ...) on the queue; the model
list is empty while generations cannot take ControlNet units.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from ...errors import UnknownName
from ..images import PictureBudget, decode_image, encode_image
from ..security import JSONValueLimitRoute
from ..state import ServerState, server_state
from .control_units import controlnet_available
from .generation import await_job
from .requests import ControlNetDetectRequest
from .responses import (
    ControlNetControlTypes, ControlNetDetectResponse, ControlNetModelList, ControlNetModuleList, ControlNetSettings,
    ControlNetVersion,
)

router = APIRouter(prefix="/controlnet", tags=["controlnet"], route_class=JSONValueLimitRoute)

#: The extension's API version that clients check for (the sd-webui-controlnet API of A1111 1.x).
API_VERSION = 2


@router.get("/version", response_model=ControlNetVersion)
async def version() -> ControlNetVersion:
    return ControlNetVersion(version=API_VERSION)


@router.get("/model_list", response_model=ControlNetModelList)
async def model_list(request: Request, update: bool = Query(True)) -> ControlNetModelList:
    """ControlNet files as the extension names them (``name [hash]``); empty while units cannot be used."""
    if not controlnet_available():
        return ControlNetModelList(model_list=[])
    catalog = server_state(request).catalog
    return ControlNetModelList(model_list=await run_in_threadpool(_model_names, catalog.controlnets()))


def _model_names(paths) -> list[str]:
    from ...models.controlnet import infotext_name

    return [infotext_name(p) for p in paths]


@router.get("/module_list", response_model=ControlNetModuleList)
async def module_list(alias_names: bool = Query(False)) -> ControlNetModuleList:
    """The preprocessors /controlnet/detect runs (ControlNet units themselves are not wired in yet)."""
    from ...preprocess.registry import PREPROCESSORS

    names = [p.name for p in PREPROCESSORS]
    detail = {p.name: {"sliders": _sliders(p), "model_free": not p.weights} for p in PREPROCESSORS}
    return ControlNetModuleList(module_list=names, module_detail=detail)


def _sliders(pre) -> list[dict]:
    sliders = [{"name": "Resolution", "value": 512, "min": 64, "max": 2048}] if pre.uses_resolution else []
    for label, value in (("Threshold A", pre.a), ("Threshold B", pre.b)):
        if value is not None:
            sliders.append({"name": label, "value": value})
    return sliders


@router.get("/control_types", response_model=ControlNetControlTypes)
async def control_types() -> ControlNetControlTypes:
    return ControlNetControlTypes(control_types={})


@router.get("/settings", response_model=ControlNetSettings)
async def settings() -> ControlNetSettings:
    return ControlNetSettings(control_net_unit_count=3 if controlnet_available() else 0)


@dataclass(frozen=True)
class DetectJob:
    """A checked detect request: the preprocessor, its settings and the decoded pictures."""

    module: str
    images: tuple
    res: int
    a: float | None
    b: float | None


def prepare_detect(body: ControlNetDetectRequest, state: ServerState) -> DetectJob:
    from ...errors import InvalidParameter
    from ...preprocess.registry import get_preprocessor

    try:
        module = get_preprocessor(body.controlnet_module).name
    except UnknownName as exc:
        raise UnknownName("controlnet_module", exc.value, exc.choices) from None
    sources = body.controlnet_input_images or body.controlnet_images or []
    if not sources:
        raise InvalidParameter("controlnet_input_images", sources, "a list with at least one base64 image")
    if not 64 <= body.controlnet_processor_res <= 4096:
        raise InvalidParameter("controlnet_processor_res", body.controlnet_processor_res, "a resolution from 64 to 4096")
    limits = state.config.limits
    PictureBudget(limits).take("controlnet_input_images", len(sources))  # counted before any is decoded
    images = tuple(decode_image(data, field=f"controlnet_input_images[{i}]", limits=limits,
                                allow_urls=state.config.allow_image_urls) for i, data in enumerate(sources))
    # The extension sends -1 (older clients 64) for "the module's default".
    a = body.controlnet_threshold_a if body.controlnet_threshold_a >= 0 else None
    b = body.controlnet_threshold_b if body.controlnet_threshold_b >= 0 else None
    return DetectJob(module, images, body.controlnet_processor_res, a, b)


def _run_detect(state: ServerState, job: DetectJob) -> list:
    """On the worker thread (annotators may use the GPU): one map per picture."""
    import numpy as np

    from ...preprocess.common import AnnotatorContext
    from ...preprocess.registry import run_preprocessor

    if state.annotators is None:
        root = state.catalog.folder.root
        state.annotators = AnnotatorContext(annotators_dir=root / "annotators", device=state.config.device or "cpu")
    maps = []
    for image in job.images:
        pixels = np.asarray(image.convert("RGBA" if job.module.startswith("inpaint") else "RGB"))
        maps.append(run_preprocessor(job.module, pixels, res=job.res, a=job.a, b=job.b, ctx=state.annotators))
    return maps


def _encode_maps(maps: list) -> list[str]:
    from PIL import Image

    return [encode_image(Image.fromarray(m, "RGBA" if m.shape[2] == 4 else "RGB")) for m in maps]


@router.post("/detect", response_model=ControlNetDetectResponse, summary="Run a ControlNet preprocessor")
async def detect(body: ControlNetDetectRequest, request: Request) -> ControlNetDetectResponse:
    state = server_state(request)
    prepared = await run_in_threadpool(prepare_detect, body, state)
    job = state.queue.submit("controlnet_detect", lambda job: _run_detect(state, prepared))
    maps = await await_job(state, job)
    return ControlNetDetectResponse(images=await run_in_threadpool(_encode_maps, maps), info="Success")
