"""A1111's generation routes: txt2img, img2img, progress, interrupt and skip, over the job queue.

A job with ``save_images`` also keeps its pictures in the server's output folder (saving.py),
in the worker thread right after generating, so saves happen one job at a time, in order.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from ...errors import InvalidParameter, UnderpaintError
from ...pipeline import xyz_plot
from ...pipeline.records import ModelInfo, Result
from ..errors import ServerError
from ..images import encode_image, picture_pixels
from ..jobs import Job, JobCancelled
from ..saving import SaveReport
from ..security import JSONValueLimitRoute
from ..state import ServerOptions, ServerState, server_state
from .convert import ConvertContext, PreparedJob, info_json, plot_models, prepare_img2img, prepare_txt2img
from .requests import Img2ImgRequest, Txt2ImgRequest
from .responses import ImageToImageResponse, ProgressResponse, ProgressState, TextToImageResponse

log = logging.getLogger("underpaint.server")

router = APIRouter(prefix="/sdapi/v1", tags=["generation"], route_class=JSONValueLimitRoute)

JOB_HEADER = "X-Underpaint-Job"


def convert_context(state: ServerState) -> ConvertContext:
    return ConvertContext(limits=state.config.limits, options=state.options, resolve_model=state.catalog.resolve,
                          allow_image_urls=state.config.allow_image_urls, controlnet_files=state.catalog.controlnets,
                          styles=state.styles.book, outputs=state.outputs, vae_choice=state.catalog.vae_choice,
                          models_folder=lambda: state.catalog.folder, device=state.config.device or "cpu")


@dataclass(frozen=True)
class Finished:
    """A generation job's result and, when it was asked to save, what the save wrote."""

    result: Result
    saved: SaveReport | None = None
    #: A1111's grid of a saved batch, returned before the pictures (``index_of_first_image`` 1), with its
    #: infotext (both None when no grid is returned).
    grid: Any = None
    grid_infotext: str | None = None


@router.post("/txt2img", response_model=TextToImageResponse, summary="Make images from a prompt")
async def txt2img(body: Txt2ImgRequest, request: Request, response: Response) -> TextToImageResponse:
    state = server_state(request)
    prepared = await run_in_threadpool(_prepare, state, prepare_txt2img, body)
    return TextToImageResponse(**await run_prepared(state, prepared, response))


@router.post("/img2img", response_model=ImageToImageResponse, summary="Transform images (and inpaint with a mask)")
async def img2img(body: Img2ImgRequest, request: Request, response: Response) -> ImageToImageResponse:
    state = server_state(request)
    prepared = await run_in_threadpool(_prepare, state, prepare_img2img, body)
    return ImageToImageResponse(**await run_prepared(state, prepared, response))


#: Requests decode their pictures before they queue: at most this many at once, so a burst of
#: requests cannot hold many times the pictures one may carry (``Limits``) while they are read.
_DECODING = threading.BoundedSemaphore(2)


def _prepare(state: ServerState, prepare: Callable, body) -> PreparedJob:
    """``prepare(body, context)`` in a worker thread, after checking that the queue has room."""
    state.queue.check_room()
    with _DECODING:
        return prepare(body, convert_context(state))


def _work(state: ServerState, prepared: PreparedJob):
    """The job body, run by the queue's worker thread: pick the model, generate, save if asked."""

    def work(job: Job) -> Finished:
        if prepared.kept_options:  # A1111 keeps them even when the job then fails
            state.options = state.options.replace(**dict(prepared.kept_options))
        # The live preview method is the request's override, else the one set when the job starts.
        params = prepared.params.replace(preview_method=prepared.preview_method or state.options.show_progress_type)
        job.live_previews = prepared.live_previews
        if xyz_plot.switches_models(params):
            result = _plot_switching_models(state, prepared, params, job)
        else:
            # The checkpoint and VAE are loaded here, on the worker, so a switch never happens under a job.
            engine = state.slot.engine_for(prepared.model, prepared.vae)
            if prepared.keep_model and prepared.model is not None:
                state.slot.selected = prepared.model
            result = engine.generate(params, progress=job.report, cancel=job.cancel)
        if not prepared.save_images:
            return Finished(result)
        keep = result.finished()
        options = state.options
        # A1111 saves while the request's overrides are set: its format, else the setting's
        fmt = {"extension": prepared.samples_format or options.samples_format,
               "quality": prepared.jpeg_quality or options.jpeg_quality}
        saved = state.outputs.save(prepared.kind, [result.images[i] for i in keep],
                                   [result.infotexts[i] for i in keep], [result.seeds[i] for i in keep], **fmt)
        returned = options.return_grid if prepared.return_grid is None else prepared.return_grid
        kept = options.grid_save if prepared.grid_save is None else prepared.grid_save
        if len(keep) < 2 or not _plain(params) or not (returned or kept):
            return Finished(result, saved)
        # As A1111 with save_images (its API's "do not save grid" is off then): a grid of the batch's
        # finished pictures, saved ("Always save all generated image grids") and returned first ("Show
        # grid in gallery"), with the first picture's infotext.
        grid, text = xyz_plot.batch_grid([result.images[i] for i in keep]), result.infotexts[keep[0]]
        if kept:
            grid_saved = state.outputs.save_grid(prepared.kind, grid, text, **fmt)
            saved = SaveReport(saved.paths + grid_saved.paths, saved.error or grid_saved.error)
        return Finished(result, saved, grid, text) if returned else Finished(result, saved)

    return work


def _plain(params) -> bool:
    """A request without a script of its own (those lay out their pictures, or grids, themselves)."""
    return all(getattr(params, name) is None for name in ("xyz_plot", "prompt_matrix", "prompts_from_file",
                                                            "loopback", "sd_upscale"))


def _plot_switching_models(state: ServerState, prepared: PreparedJob, params, job: Job) -> Result:
    """An X/Y/Z plot with a "Checkpoint name" or "VAE" axis (or Prompts from file lines naming
    checkpoints): each cell runs on the engine the slot
    holds for its checkpoint (else the request's) and its VAE choice (else the request's, else the
    sd_vae option's), so a VAE-only change swaps the VAE in place and, the loading axis running
    outermost, each checkpoint loads once per value. Afterwards the checkpoint selected before the
    plot stays selected (the request's own, with ``override_settings_restore_afterwards`` false):
    the next job runs on it, as A1111 loads it back after a plot."""
    slot = state.slot
    shown = slot.selected or slot.loaded  # what /options names as sd_model_checkpoint now

    def cell_job(cell, report) -> Result:
        engine = slot.engine_for(cell.checkpoint or prepared.model, cell.vae or prepared.vae)
        return engine.generate(cell.params, progress=report, cancel=job.cancel)

    if params.prompts_from_file is not None:
        from ...pipeline import prompts_file as script
    else:
        script = xyz_plot
    try:
        return script.run(cell_job, params, info=slot.info or ModelInfo(name="", path="", family="", prediction=""),
                          progress=job.report, cancel=job.cancel, models=plot_models(convert_context(state)))
    finally:
        if prepared.keep_model and prepared.model is not None:
            slot.selected = prepared.model
        elif slot.selected is None:
            slot.selected = shown or _default_checkpoint(state)


def _default_checkpoint(state: ServerState):
    """The checkpoint a job without one loads, or None when there is none to name."""
    try:
        return state.default_model()
    except UnderpaintError:
        return None


async def run_prepared(state: ServerState, prepared: PreparedJob, response: Response) -> dict:
    """Queue the job, wait for it without holding the event loop, and build A1111's response. Its
    decoded pictures count against the server's picture budget until then (503 when it is full)."""
    field = "init_images" if prepared.kind == "img2img" else "alwayson_scripts"
    with state.pictures.hold(picture_pixels(prepared.params), field):
        return await _run_queued(state, prepared, response)


async def _run_queued(state: ServerState, prepared: PreparedJob, response: Response) -> dict:
    job = state.queue.submit(prepared.kind, _work(state, prepared), job_id=prepared.task_id,
                             job_count=prepared.params.n_iter)
    response.headers[JOB_HEADER] = job.id
    try:
        finished = await await_job(state, job)
    except JobCancelled:
        finished = Finished(_nothing_done(state, prepared))
    except InvalidParameter as exc:  # the engine names units control_units[k]; the request, args[i]
        from .control_units import request_field

        renamed = request_field(exc, prepared.control_fields)
        if renamed is exc:  # a script's option (SD upscale's, checked again as it runs), a VAE type
            from .convert import ENGINE_CHECKED_FIELDS, _renamed

            renamed = _renamed(exc, ENGINE_CHECKED_FIELDS)
        if renamed is exc:
            raise
        raise renamed from None
    return await run_in_threadpool(_response_fields, prepared, finished, job, state.options)


async def await_job(state: ServerState, job: Job):
    """Wait for a queued job without holding the event loop; its failure becomes a structured error."""
    try:
        return await asyncio.wrap_future(job.future)
    except asyncio.CancelledError:  # the client went away: don't keep its job waiting
        state.queue.cancel(job.id)
        raise
    except UnderpaintError:
        raise
    except Exception as exc:
        raise job_failure(exc, job) from exc


def _nothing_done(state: ServerState, prepared: PreparedJob) -> Result:
    """A job cancelled before it started answers like an interrupted one with nothing finished."""
    info = state.slot.info or ModelInfo(name="", path="", family="", prediction="")
    return Result(images=(), infotexts=(), seeds=(), subseeds=(), params=prepared.params, model=info, interrupted=True)


def job_failure(exc: BaseException, job: Job) -> ServerError:
    """A failed job becomes a structured 5xx for its own caller; the queue goes on with the next."""
    name = type(exc).__name__
    text = str(exc)
    if "OutOfMemory" in name or "out of memory" in text.lower():
        log.warning("job %s ran out of memory: %s", job.id, text)
        return ServerError(f"the job ran out of memory ({text[:300]}); try a smaller size or batch",
                           status=507, kind="out_of_memory", headers={JOB_HEADER: job.id})
    log.error("job %s failed", job.id, exc_info=exc)
    return ServerError(f"the job failed: {name}: {text[:500]}", status=500, kind="generation_failed",
                       headers={JOB_HEADER: job.id})


def _response_fields(prepared: PreparedJob, finished: Finished, job: Job, options: ServerOptions) -> dict:
    """A1111's answer: the pictures encoded as its "File format for images" setting says (/options', as
    A1111 restores a request's overrides before it encodes), the echoed request and the info."""
    result = finished.result
    images = []
    fmt = {"samples_format": options.samples_format, "quality": options.jpeg_quality}
    if prepared.send_images:
        texts = list(result.infotexts) + [None] * (len(result.images) - len(result.infotexts))
        images = [encode_image(image, text, **fmt) for image, text in zip(result.images, texts)]
        if finished.grid is not None:
            images.insert(0, encode_image(finished.grid, finished.grid_infotext, **fmt))
    save_error = finished.saved.error if finished.saved is not None else None
    return {"images": images, "parameters": prepared.parameters,
            "info": info_json(prepared, result, job_timestamp=job.timestamp, save_error=save_error,
                              grid_infotext=finished.grid_infotext)}


# --------------------------------------------------------------------------- progress


@router.get("/progress", response_model=ProgressResponse, summary="Progress of the running job")
async def progress(request: Request, skip_current_image: bool = Query(False)) -> ProgressResponse:
    state = server_state(request)
    job = state.queue.current
    if job is None:
        return ProgressResponse(progress=0.0, eta_relative=0.0, state=ProgressState())
    enabled = job.live_previews if job.live_previews is not None else state.options.live_previews_enable
    previews = enabled and not skip_current_image
    if previews:
        job.want_preview = True
    p = job.progress
    job_count = p.job_count if p else job.job_count
    fraction = 0.0
    if job_count > 0:
        fraction = 0.01 + (p.job / job_count + (p.step / p.steps / job_count if p.steps else 0) if p else 0.0)
    fraction = min(fraction, 1.0)
    elapsed = time.time() - (job.started_at or time.time())
    eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
    progress_state = ProgressState(
        skipped=job.cancel.skipped, interrupted=job.cancel.interrupted, job=_job_label(job),
        job_count=job_count, job_timestamp=job.timestamp, job_no=p.job if p else 0,
        sampling_step=p.step if p else 0, sampling_steps=p.steps if p else 0,
    )
    preview = job.preview
    current = None if not previews or preview is None else await run_in_threadpool(encode_image, preview)
    return ProgressResponse(progress=fraction, eta_relative=max(0.0, eta), state=progress_state, current_image=current,
                            textinfo=None if p else "Waiting for the model")


def _job_label(job: Job) -> str:
    return f"scripts_{job.kind}" if job.kind in ("txt2img", "img2img") else job.kind


@router.post("/interrupt", summary="Stop the running job; it returns the images made so far")
async def interrupt(request: Request) -> dict:
    job = server_state(request).queue.current
    if job is not None:
        job.cancel.interrupt()
    return {}


@router.post("/skip", summary="End the running job's current batch at its current estimate and go on with the next")
async def skip(request: Request) -> None:
    job = server_state(request).queue.current
    if job is not None:
        job.cancel.skip()
