"""The ControlNet extension's routes, which A1111 clients probe to decide what to offer.

/detect runs underpaint's preprocessors (canny, depth, openpose, ...) on the queue; the model
list and control types are empty while generations cannot take ControlNet units.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from ...errors import UnknownName
from ..images import PictureBudget, decode_image, encode_image, picture_pixels
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


#: The extension's control types that underpaint has preprocessors for: the type → the
#: preprocessor kinds it groups (registry.py), the words that mark its models' file names, and
#: its default preprocessor when underpaint has the extension's own default.
CONTROL_TYPES: tuple[tuple[str, tuple[str, ...], tuple[str, ...], str | None], ...] = (
    ("Canny", ("canny",), ("canny",), "canny"),
    ("Depth", ("depth",), ("depth",), "depth_midas"),
    ("NormalMap", ("normal",), ("normal",), None),
    ("OpenPose", ("openpose",), ("openpose", "pose"), "openpose_full"),
    ("MLSD", ("mlsd",), ("mlsd",), "mlsd"),
    ("Lineart", ("lineart",), ("lineart",), "lineart_standard (from white bg & black line)"),
    ("SoftEdge", ("softedge",), ("softedge", "hed", "pidi"), "softedge_pidinet"),
    ("Scribble/Sketch", ("scribble",), ("scribble", "sketch"), "scribble_pidinet"),
    ("Shuffle", ("shuffle",), ("shuffle",), "shuffle"),
    ("Tile/Blur", ("tile",), ("tile", "blur"), "tile_resample"),
    ("Inpaint", ("inpaint",), ("inpaint",), "inpaint_only"),
    ("IP-Adapter", ("ip-adapter",), ("ip-adapter", "ip_adapter"), "ip-adapter-auto"),
)
#: Types whose units read the picture itself, not a map: no "none" preprocessor, and no union models.
_PICTURE_TYPES = ("IP-Adapter",)
#: Types whose list also offers the "invert" preprocessor (line drawings on white), as the extension's does.
_WITH_INVERT = ("Canny", "Lineart", "Scribble/Sketch", "MLSD")


def control_type_table(models: list[str]) -> dict[str, dict]:
    """The extension's /control_types answer for these model names: per type its preprocessors
    ("none" first), its models ("None" first; every model when none matches the type's words, a
    union model in every type), the default preprocessor and the default model."""
    from ...preprocess.registry import PREPROCESSORS

    names = [p.name for p in PREPROCESSORS]
    table = {"All": {"module_list": names, "model_list": ["None", *models], "default_option": "none",
                     "default_model": "None"}}
    for label, kinds, words, default in CONTROL_TYPES:
        picture = label in _PICTURE_TYPES
        modules = [*(() if picture else ("none",)), *(p.name for p in PREPROCESSORS if p.kind in kinds)]
        if label in _WITH_INVERT:
            modules += [p.name for p in PREPROCESSORS if p.name.startswith("invert") and p.name not in modules]
        matched = [m for m in models if any(w in m.lower() for w in (*words, *(() if picture else ("union",))))]
        table[label] = {"module_list": modules, "model_list": ["None", *(matched or models)],
                        "default_option": default if default in modules else modules[1],
                        "default_model": matched[0] if matched else "None"}
    return table


@router.get("/control_types", response_model=ControlNetControlTypes)
async def control_types(request: Request) -> ControlNetControlTypes:
    """Preprocessors and models grouped by what they control ("Canny", "Depth", ...), for clients'
    menus; empty while generations cannot take ControlNet units."""
    if not controlnet_available():
        return ControlNetControlTypes(control_types={})
    catalog = server_state(request).catalog
    models = await run_in_threadpool(_model_names, catalog.controlnets())
    return ControlNetControlTypes(control_types=control_type_table(models))


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
    #: ``controlnet_masks`` decoded (None where empty), one per picture from the first; inpaint
    #: modules take them as the area to repaint, others ignore them (as the extension does).
    masks: tuple = ()


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
    res = body.controlnet_processor_res
    if res < 0:  # the extension's default, -1: the module's own resolution
        res = 512
    if not 64 <= res <= 4096:
        raise InvalidParameter("controlnet_processor_res", res, "a resolution from 64 to 4096 (or -1: 512)")
    limits = state.config.limits
    allow_urls = state.config.allow_image_urls
    masks_given = (body.controlnet_masks or [])[:len(sources)]
    budget = PictureBudget(limits)  # every picture counted before any is decoded
    budget.take("controlnet_input_images", len(sources))
    budget.take("controlnet_masks", sum(1 for data in masks_given if data))
    images = tuple(decode_image(data, field=f"controlnet_input_images[{i}]", limits=limits, allow_urls=allow_urls)
                   for i, data in enumerate(sources))
    masks = tuple(decode_image(data, field=f"controlnet_masks[{i}]", limits=limits, allow_urls=allow_urls) if data
                  else None for i, data in enumerate(masks_given))
    # The extension sends -1 (older clients 64) for "the module's default".
    a = body.controlnet_threshold_a if body.controlnet_threshold_a >= 0 else None
    b = body.controlnet_threshold_b if body.controlnet_threshold_b >= 0 else None
    get_preprocessor(module).check_thresholds(a, b, ("controlnet_threshold_a", "controlnet_threshold_b"))
    return DetectJob(module, images, res, a, b, masks)


def _run_detect(state: ServerState, job: DetectJob) -> list:
    """On the worker thread (annotators may use the GPU): one map per picture."""
    from ...pipeline.control import module_pixels
    from ...preprocess.common import AnnotatorContext
    from ...preprocess.registry import run_preprocessor

    if state.annotators is None:
        root = state.catalog.folder.root
        state.annotators = AnnotatorContext(annotators_dir=root / "annotators", device=state.config.device or "cpu")
    maps = []
    for i, image in enumerate(job.images):
        pixels = module_pixels(job.module, image, job.masks[i] if i < len(job.masks) else None)
        maps.append(run_preprocessor(job.module, pixels, res=job.res, a=job.a, b=job.b, ctx=state.annotators))
    return maps


def _encode_maps(maps: list) -> list[str]:
    from PIL import Image

    return [encode_image(Image.fromarray(m, "RGBA" if m.shape[2] == 4 else "RGB")) for m in maps]


@router.post("/detect", response_model=ControlNetDetectResponse, summary="Run a ControlNet preprocessor")
async def detect(body: ControlNetDetectRequest, request: Request) -> ControlNetDetectResponse:
    state = server_state(request)
    prepared = await run_in_threadpool(prepare_detect, body, state)
    with state.pictures.hold(picture_pixels((prepared.images, prepared.masks)), "controlnet_input_images"):
        job = state.queue.submit("controlnet_detect", lambda job: _run_detect(state, prepared))
        maps = await await_job(state, job)
        return ControlNetDetectResponse(images=await run_in_threadpool(_encode_maps, maps), info="Success")
