"""A1111's read-only lists (samplers, schedulers, LoRAs, hypernetworks, ...), /memory and /png-info.

Lists for things underpaint does not have (extensions) answer with empty lists, so
clients that read them at start-up keep working. /interrogate captions with the "clip" model
(models/interrogate.py); "deepdanbooru" is refused naming ``model``. Prompt styles come from the
server's styles.csv. The upscalers are the hires. fix ones: A1111's built-in picture
upscalers, the upscaling models in the models folder, and its latent upscale modes.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import sys
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from ...errors import ImageError, InvalidParameter
from ...models.registry import list_named_files
from ..security import JSONValueLimitRoute
from ..state import server_state
from .requests import InterrogateRequest, PNGInfoRequest
from .responses import (
    EmbeddingItem, EmbeddingsResponse, ExtensionItem, FaceRestorerItem, HypernetworkItem, InterrogateResponse,
    LatentUpscalerModeItem, LoraItem, MemoryResponse, PNGInfoResponse, PromptStyleItem, RealesrganItem, SamplerItem,
    SchedulerItem, ScriptArg, ScriptInfo, ScriptsList, UpscalerItem,
)

router = APIRouter(prefix="/sdapi/v1", tags=["lists"], route_class=JSONValueLimitRoute)


def sampler_items() -> list[SamplerItem]:
    """The sampler table in A1111's shape: options say the default schedule and the noise it draws."""
    from ...sampling.names import SAMPLERS

    items = []
    for info in SAMPLERS:
        options: dict[str, Any] = dict(info.options)
        if info.default_schedule != "Automatic":
            options["scheduler"] = info.default_schedule.lower()
        if {"ancestral", "sde"} & info.flags:
            options["uses_ensd"] = True
        if "second_order" in info.flags:
            options["second_order"] = True
        if "brownian" in info.flags:
            options["brownian_noise"] = True
        if "discard_penultimate" in info.flags:
            options["discard_next_to_last_sigma"] = True
        items.append(SamplerItem(name=info.label, aliases=list(info.aliases), options=options))
    return items


def scheduler_items() -> list[SchedulerItem]:
    from ...sampling.names import SCHEDULES

    items = []
    for info in SCHEDULES:
        name = info.aliases[0] if info.aliases else info.label.lower()
        items.append(SchedulerItem(name=name, label=info.label, aliases=list(info.aliases[1:]) or None,
                                   default_rho=info.default_rho, need_inner_model=info.needs_model))
    return items


@router.get("/samplers", response_model=list[SamplerItem], summary="Samplers, with their aliases")
async def samplers() -> list[SamplerItem]:
    return sampler_items()


@router.get("/schedulers", response_model=list[SchedulerItem], summary="Schedule types")
async def schedulers() -> list[SchedulerItem]:
    return scheduler_items()


@router.get("/loras", response_model=list[LoraItem], summary="LoRA files in the models folder")
def loras(request: Request) -> list[LoraItem]:
    """A1111's list: each file's name, its alias (the trainer's ``ss_output_name`` when no other LoRA has
    that name or alias, as A1111's default "Alias from file"), its path relative to the models folder and
    the trainer's safetensors metadata (values holding a JSON object decoded, as A1111 sends them)."""
    from ...models.lora import list_loras

    folder = server_state(request).catalog.folder
    items: dict[str, LoraItem] = {}
    for entry in list_loras(folder.folders("loras")):
        if entry.name not in items:
            metadata = _lora_metadata(entry.path)
            items[entry.name] = LoraItem(name=entry.name, alias=str(metadata.get("ss_output_name") or entry.name),
                                         path=Path(os.path.relpath(entry.path, folder.root)).as_posix(),
                                         metadata=metadata)
    taken: dict[str, int] = {}
    for item in items.values():
        for name in {item.name, item.alias}:
            taken[name] = taken.get(name, 0) + 1
    for item in items.values():
        if item.alias != item.name and taken[item.alias] > 1:
            item.alias = item.name
    return list(items.values())


def _lora_metadata(path: Path) -> dict[str, Any]:
    """A safetensors LoRA's metadata (only its header is read); {} for other files and unreadable ones."""
    import json

    from ...errors import ModelError
    from ...models.header import read_header, sniff_format

    try:
        if sniff_format(path) != "safetensors":
            return {}
        metadata = read_header(path).metadata
    except (ModelError, OSError):
        return {}
    decoded: dict[str, Any] = {}
    for key, value in metadata.items():
        if isinstance(value, str) and value.startswith("{"):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        decoded[key] = value
    return decoded


@router.get("/hypernetworks", response_model=list[HypernetworkItem], summary="Hypernetworks in the models folder")
def hypernetworks(request: Request) -> list[HypernetworkItem]:
    """Each ``.pt`` file in ``hypernetworks/`` (A1111's ``models/hypernetworks``); ``path`` is relative
    to the models folder."""
    from ...models.hypernetwork import list_hypernetworks

    folder = server_state(request).catalog.folder
    items: dict[str, HypernetworkItem] = {}
    for entry in list_hypernetworks(folder.folders("hypernetworks")):
        items.setdefault(entry.name, HypernetworkItem(
            name=entry.name, path=Path(os.path.relpath(entry.path, folder.root)).as_posix()))
    return list(items.values())


#: Text encoder widths per family, where the model does not say: an embedding fits a model when it
#: has one tensor of each width.
_TEXT_WIDTHS = {"sd1": (768,), "sd2": (1024,), "sdxl": (768, 1280), "sdxl_refiner": (1280,)}


#: Embedding files kept read (ServerState.embedding_files): the UI's token counter lists them on every
#: pause in typing, and each file is read again only when it changes.
_MAX_CACHED_EMBEDDINGS = 4096


def _read_embedding(cache: dict, path: Path):
    """The embedding in ``path`` (None: unreadable, or gone since the folder was listed)."""
    from ...prompts.embeddings import read_changed

    if len(cache) >= _MAX_CACHED_EMBEDDINGS and path not in cache:
        cache.clear()
    try:
        return read_changed(cache, path)
    except OSError:
        return None


@router.get("/embeddings", response_model=EmbeddingsResponse, summary="Textual-inversion embeddings")
def embeddings(request: Request) -> EmbeddingsResponse:
    """Embedding files, split as A1111 does: those that fit the loaded model, and the others."""
    from ...prompts.embeddings import EMBEDDING_SUFFIXES

    state = server_state(request)
    info = state.slot.info
    widths = (info.text_widths or _TEXT_WIDTHS.get(info.family)) if info else None
    answer = EmbeddingsResponse()
    for entry in list_named_files(state.catalog.folder.folders("embeddings"), EMBEDDING_SUFFIXES):
        embedding = _read_embedding(state.embedding_files, entry.path)
        if embedding is None:  # unreadable or unsafe files are left out, as A1111 leaves them out
            continue
        item = EmbeddingItem(shape=int(embedding.vectors[0].shape[-1]), vectors=embedding.count)
        fits = widths is None or embedding.fits(widths)
        (answer.loaded if fits else answer.skipped).setdefault(embedding.name, item)
    return answer


def _empty(path: str, model: type, summary: str) -> None:
    async def endpoint() -> list:
        return []

    endpoint.__name__ = "list_" + re.sub(r"\W", "_", path.strip("/"))
    router.add_api_route(path, endpoint, methods=["GET"], response_model=list[model], summary=summary)


@router.get("/upscalers", response_model=list[UpscalerItem], summary="Picture upscalers: built-in, then models")
def upscalers(request: Request) -> list[UpscalerItem]:
    """A1111's built-in upscalers as it lists them (scale 4, no model), then the upscaling models in
    the models folder (ESRGAN, Real-ESRGAN) by name, each with its file's path relative to its folder
    (never the server's own paths) and the scale its file name states (else 4, as A1111 lists them)."""
    from ...params import HIRES_PIXEL_UPSCALERS
    from ...pipeline.upscale import model_entries, nominal_scale

    builtin = [UpscalerItem(name=name, model_name=None, model_path=None, model_url=None, scale=4)
               for name in HIRES_PIXEL_UPSCALERS]
    models = [UpscalerItem(name=e.name, model_name=e.name, model_path=e.filename, model_url=None,
                           scale=nominal_scale(e))
              for e in model_entries(server_state(request).catalog.folder)]
    return builtin + models


@router.get("/realesrgan-models", response_model=list[RealesrganItem], summary="Real-ESRGAN models")
def realesrgan_models(request: Request) -> list[RealesrganItem]:
    """The Real-ESRGAN files A1111 knows by name that are in the models folder."""
    from ...pipeline.upscale import model_entries, nominal_scale

    return [RealesrganItem(name=e.name, path=e.filename, scale=nominal_scale(e))
            for e in model_entries(server_state(request).catalog.folder) if e.is_realesrgan]


@router.get("/latent-upscale-modes", response_model=list[LatentUpscalerModeItem],
            summary="Latent upscale modes for hires. fix")
async def latent_upscale_modes() -> list[LatentUpscalerModeItem]:
    from ...params import HIRES_LATENT_MODES

    return [LatentUpscalerModeItem(name=name) for name in HIRES_LATENT_MODES]


@router.get("/prompt-styles", response_model=list[PromptStyleItem], summary="Prompt styles from styles.csv")
def prompt_styles(request: Request) -> list[PromptStyleItem]:
    """The styles a request's ``styles`` may name, in file order (read again when the file changes)."""
    book = server_state(request).styles.book()
    return [PromptStyleItem(name=s.name, prompt=s.prompt, negative_prompt=s.negative_prompt)
            for s in book.styles.values()]


@router.get("/face-restorers", response_model=list[FaceRestorerItem], summary="Face restorers whose files are there")
def face_restorers(request: Request) -> list[FaceRestorerItem]:
    """CodeFormer and GFPGAN, each when its files (and the face detector's and parser's) are in the
    models folder; ``cmd_dir`` is the folder its file is in, relative to the models folder."""
    from ...errors import ModelNotFound
    from ...params import FACE_RESTORERS
    from ...pipeline.face_restore import face_model_files

    folder = server_state(request).catalog.folder
    found = []
    for name in FACE_RESTORERS:
        try:
            net = face_model_files(folder, restorer=name)[0]
        except ModelNotFound:
            continue
        found.append(FaceRestorerItem(name=name, cmd_dir=Path(os.path.relpath(net.parent, folder.root)).as_posix()))
    return found


for _path, _model, _summary in (
    ("/extensions", ExtensionItem, "Installed extensions (none)"),
):
    _empty(_path, _model, _summary)


def _always_on(img2img: bool) -> list[str]:
    """The always-on scripts a request's ``alwayson_scripts`` may turn on, named as A1111 lists them:
    ControlNet (when generations take units) and FreeU on both tabs, Soft Inpainting on img2img only."""
    from .control_units import controlnet_available
    from .convert import ADETAILER_SCRIPT, CONTROLNET_SCRIPT, FREEU_SCRIPT, SOFT_INPAINTING_SCRIPT

    names = ([CONTROLNET_SCRIPT] if controlnet_available() else []) + [FREEU_SCRIPT, ADETAILER_SCRIPT]
    return names + [SOFT_INPAINTING_SCRIPT] if img2img else names


@router.get("/scripts", response_model=ScriptsList, summary="Scripts by tab: the selectable ones underpaint runs, "
                                                            "then the always-on ones it understands")
async def scripts() -> ScriptsList:
    """Clients look here to learn whether an extension is installed (ControlNet, ADetailer, ...)."""
    from .convert import IMG2IMG_SCRIPTS, TXT2IMG_SCRIPTS

    return ScriptsList(txt2img=[*TXT2IMG_SCRIPTS, *_always_on(False)], img2img=[*IMG2IMG_SCRIPTS, *_always_on(True)])


def _soft_inpainting_args() -> list[ScriptArg]:
    """The switch, then each setting at its only accepted value (minimum = maximum = the default)."""
    from .convert import SOFT_INPAINTING_SETTINGS

    settings = [ScriptArg(label=label.capitalize(), value=value, minimum=value, maximum=value)
                for label, value in SOFT_INPAINTING_SETTINGS]
    return [ScriptArg(label="Soft inpainting", value=False), *settings]


def _freeu_args() -> list[ScriptArg]:
    """Forge's FreeU Integrated controls: the switch, then B1, B2 (0-2) and S1, S2 (0-4) at its defaults."""
    from ...params import FreeUOptions

    d = FreeUOptions()
    return [ScriptArg(label="Enabled", value=False),
            *(ScriptArg(label=label, value=value, minimum=0.0, maximum=top, step=0.01)
              for label, value, top in (("B1", d.b1, 2.0), ("B2", d.b2, 2.0), ("S1", d.s1, 4.0), ("S2", d.s2, 4.0)))]


@router.get("/script-info", response_model=list[ScriptInfo], summary="The scripts of /scripts and their arguments")
async def script_info() -> list[ScriptInfo]:
    """Each always-on script per tab, as A1111 lists them. ControlNet's arguments are unit objects
    (see the ControlNet API), so none are described."""
    from ...pipeline.xyz_plot import axis_names
    from .convert import (FREEU_SCRIPT, LOOPBACK_SCRIPT, OUTPAINT_MK2_SCRIPT, OUTPAINT_SCRIPT, PROMPT_MATRIX_SCRIPT,
                          PROMPTS_FILE_SCRIPT, SD_UPSCALE_SCRIPT, SOFT_INPAINTING_SCRIPT, XYZ_PLOT_SCRIPT)
    from ...params import MASKED_CONTENT
    from ...params import LOOPBACK_CURVES, PROMPT_MATRIX_JOINERS, PROMPT_MATRIX_TYPES, PROMPT_POSITIONS

    sd_upscale = ScriptInfo(name=SD_UPSCALE_SCRIPT, is_alwayson=False, is_img2img=True, args=[
        ScriptArg(label="Info", value=None),
        ScriptArg(label="Tile overlap", value=64, minimum=0, maximum=256, step=16),
        ScriptArg(label="Upscaler", value="None"),
        ScriptArg(label="Scale Factor", value=2.0, minimum=1.0, maximum=4.0, step=0.05)])
    loopback = ScriptInfo(name=LOOPBACK_SCRIPT, is_alwayson=False, is_img2img=True, args=[
        ScriptArg(label="Loops", value=4, minimum=1, maximum=32, step=1),
        ScriptArg(label="Final denoising strength", value=0.5, minimum=0, maximum=1, step=0.01),
        ScriptArg(label="Denoising strength curve", value="Linear", choices=list(LOOPBACK_CURVES)),
        ScriptArg(label="Append interrogated prompt at each iteration", value="None", choices=["None", "CLIP"])])
    matrix = [
        ScriptArg(label="Put variable parts at start of prompt", value=False),
        ScriptArg(label="Use different seed for each picture", value=False),
        ScriptArg(label="Select prompt", value="positive", choices=list(PROMPT_MATRIX_TYPES)),
        ScriptArg(label="Select joining char", value="comma", choices=list(PROMPT_MATRIX_JOINERS)),
        ScriptArg(label="Grid margins (px)", value=0, minimum=0, maximum=500, step=2)]
    from_file = [
        ScriptArg(label="Iterate seed every line", value=False),
        ScriptArg(label="Use same random seed for all lines", value=False),
        ScriptArg(label="Insert prompts at the", value="start", choices=list(PROMPT_POSITIONS)),
        ScriptArg(label="List of prompt inputs", value=""),
        ScriptArg(label="Make a combined image containing all outputs", value=False)]
    outpaint = ScriptInfo(name=OUTPAINT_SCRIPT, is_alwayson=False, is_img2img=True, args=[
        ScriptArg(label="Pixels to expand", value=128, minimum=8, maximum=256, step=8),
        ScriptArg(label="Mask blur", value=4, minimum=0, maximum=64, step=1),
        ScriptArg(label="Masked content", value=0, choices=list(MASKED_CONTENT)),
        ScriptArg(label="Outpainting direction", value=["left", "right", "up", "down"],
                  choices=["left", "right", "up", "down"])])
    outpaint_mk2 = ScriptInfo(name=OUTPAINT_MK2_SCRIPT, is_alwayson=False, is_img2img=True, args=[
        ScriptArg(label="Recommended settings: Sampling Steps: 80-100, Sampler: Euler a, Denoising strength: 0.8",
                  value=None),
        ScriptArg(label="Pixels to expand", value=128, minimum=8, maximum=256, step=8),
        ScriptArg(label="Mask blur", value=8, minimum=0, maximum=64, step=1),
        ScriptArg(label="Outpainting direction", value=["left", "right", "up", "down"],
                  choices=["left", "right", "up", "down"]),
        ScriptArg(label="Fall-off exponent (lower=higher detail)", value=1.0, minimum=0.0, maximum=4.0, step=0.01),
        ScriptArg(label="Color variation", value=0.05, minimum=0.0, maximum=1.0, step=0.01)])
    own_args = {SOFT_INPAINTING_SCRIPT: _soft_inpainting_args, FREEU_SCRIPT: _freeu_args}
    return [ScriptInfo(name=name, is_alwayson=True, is_img2img=img2img,
                       args=own_args[name]() if name in own_args else [])
            for img2img in (False, True) for name in _always_on(img2img)] + [sd_upscale, loopback, outpaint,
                                                                            outpaint_mk2] + [
        ScriptInfo(name=name, is_alwayson=False, is_img2img=img2img, args=args)
        for img2img in (False, True) for name, args in ((PROMPT_MATRIX_SCRIPT, matrix), (PROMPTS_FILE_SCRIPT, from_file))
    ] + [ScriptInfo(name=XYZ_PLOT_SCRIPT, is_alwayson=False, is_img2img=img2img, args=_xyz_args(axis_names(img2img)))
         for img2img in (False, True)]


def _xyz_args(axes: list[str]) -> list[ScriptArg]:
    """X/Y/Z plot's positional arguments, as A1111 describes them (types are indexes into ``axes``)."""
    args = []
    for letter in "XYZ":
        args += [ScriptArg(label=f"{letter} type", value=0, choices=axes), ScriptArg(label=f"{letter} values", value=""),
                 ScriptArg(label=f"{letter} values", value=[])]
    args += [ScriptArg(label=label, value=value) for label, value in (
        ("Draw legend", True), ("Include Sub Images", False), ("Include Sub Grids", False),
        ("Keep -1 for seeds", False), ("Vary seeds for X", False), ("Vary seeds for Y", False),
        ("Vary seeds for Z", False))]
    return args + [ScriptArg(label="Grid margins (px)", value=0, minimum=0, maximum=500, step=2),
                   ScriptArg(label="Use text inputs instead of dropdowns", value=False)]


@router.post("/interrogate", response_model=InterrogateResponse,
             summary="A prompt read from a picture: model 'clip' (BLIP and CLIP) or 'deepdanbooru' (tags)")
async def interrogate(body: InterrogateRequest, request: Request) -> InterrogateResponse:
    """A1111's "Interrogate CLIP" (models/interrogate.py) and "Interrogate DeepBooru"
    (models/deepbooru.py), run on the generation queue so that they never share the device with a
    generation, with the settings of /options. A server without the model's files answers 404
    naming ``model``."""
    from ..images import decode_image
    from .generation import await_job

    state = server_state(request)
    model = body.model.strip().lower() if isinstance(body.model, str) else body.model
    if model not in ("clip", "deepdanbooru"):
        raise InvalidParameter("model", body.model, "'clip' or 'deepdanbooru'")
    if not body.image:
        raise InvalidParameter("image", body.image, "a picture (base64, or a data URL)")
    limits, allow_urls = state.config.limits, state.config.allow_image_urls
    image = await run_in_threadpool(lambda: decode_image(body.image, field="image", limits=limits,
                                                         allow_urls=allow_urls))  # the request's fault first
    from .convert import interrogator

    read = await run_in_threadpool(interrogator, model, state.catalog.folder, state.options,
                                   state.config.device or "cpu")
    state.queue.check_room()
    queued = state.queue.submit("interrogate", lambda _: read(image))
    return InterrogateResponse(caption=await await_job(state, queued))



@router.get("/memory", response_model=MemoryResponse, summary="System and GPU memory")
async def memory() -> MemoryResponse:
    return MemoryResponse(ram=_ram(), cuda=_cuda())


def _ram() -> dict[str, Any]:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
        free = os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):
        return {"error": "unavailable"}
    return {"free": free, "used": total - free, "total": total}


def _cuda() -> dict[str, Any]:
    torch = sys.modules.get("torch")  # never import torch just to answer this
    if torch is None or not torch.cuda.is_available():
        return {"error": "unavailable"}
    free, total = torch.cuda.mem_get_info()
    stats = torch.cuda.memory_stats()

    def pair(name: str) -> dict[str, int]:
        return {"current": stats.get(f"{name}.all.current", 0), "peak": stats.get(f"{name}.all.peak", 0)}

    return {
        "system": {"free": free, "used": total - free, "total": total},
        "active": pair("active_bytes"), "allocated": pair("allocated_bytes"),
        "reserved": pair("reserved_bytes"), "inactive": pair("inactive_split_bytes"),
        "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)},
    }


# --------------------------------------------------------------------------- png-info

_DATA_URL = re.compile(r"data:[\w/.+-]+;base64,", re.IGNORECASE)


def base64_bytes(data: str, *, field: str, max_bytes: int) -> bytes:
    """Raw bytes of a base64 field (``data:`` prefix accepted), bounded; errors name the field."""
    text = data.strip()
    prefix = _DATA_URL.match(text)
    if prefix:
        text = text[prefix.end():]
    text = "".join(text.split())
    if not text:
        raise ImageError(f"{field}: empty, expected a base64-encoded image", field=field)
    if len(text) // 4 * 3 > max_bytes:
        raise ImageError(f"{field}: more than {max_bytes} bytes of image data", field=field)
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"{field}: not valid base64 ({exc})", field=field) from exc


def png_info(data: str, *, max_bytes: int) -> PNGInfoResponse:
    """The infotext stored in an image, raw and parsed into A1111's keys (with its defaults)."""
    from ...imageio.infotext import apply_defaults, parse_infotext
    from ...imageio.metadata import read_metadata
    from ...imageio.pil_open import open_header

    raw = base64_bytes(data, field="image", max_bytes=max_bytes)
    with open_header(io.BytesIO(raw), "image", "image"):  # a picture at all? (header only, no pixels)
        pass
    try:
        meta = read_metadata(raw)
    except ImageError:
        raise
    except Exception as exc:  # damaged containers surface as many exception types
        raise ImageError(f"image: unreadable image data ({type(exc).__name__}: {exc})", field="image") from exc
    items: dict[str, Any] = dict(meta.other)
    if meta.comfy_prompt is not None:
        items["prompt"] = meta.comfy_prompt
    if meta.comfy_workflow is not None:
        items["workflow"] = meta.comfy_workflow
    if not meta.infotext:
        return PNGInfoResponse(info="", items=items, parameters={})
    parsed = parse_infotext(meta.infotext)
    parameters = {"Prompt": parsed.prompt, "Negative prompt": parsed.negative_prompt,
                  **apply_defaults(parsed.params, prompt=parsed.prompt)}
    return PNGInfoResponse(info=meta.infotext, items=items, parameters=parameters)


@router.post("/png-info", response_model=PNGInfoResponse, summary="Read the generation parameters stored in an image")
async def png_info_route(body: PNGInfoRequest, request: Request) -> PNGInfoResponse:
    limits = server_state(request).config.limits
    return await run_in_threadpool(png_info, body.image, max_bytes=limits.max_body_bytes)
