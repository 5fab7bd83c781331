"""A1111's Checkpoint Merger over HTTP: ``POST /underpaint/v1/merge-checkpoints`` (the browser UI's
"Checkpoint Merger" tab; A1111 has no API route for it).

The fields are the merger tab's: primary, secondary and tertiary model (names as
``/sdapi/v1/sd-models`` lists them, never paths), interpolation method ("No interpolation",
"Weighted sum", "Add difference"), multiplier, "Save as float16", custom name, checkpoint format
(safetensors; ``ckpt`` is refused: underpaint writes no pickles), "Bake in VAE" (a name from
``/sdapi/v1/sd-vae``) and "Discard weights with matching name" (a regular expression). The
merge itself is :mod:`underpaint.models.merge`, run on the job queue so that it never shares the
memory with a generation.

The new file goes in the models folder's checkpoints folder, named as A1111 names it when no custom
name is given ("0.7(a) + 0.3(b)", "a + 0.3(b - c)", ``.inpainting`` for an inpainting result); a
custom name is a plain file name (no folders, no leading dot). An existing file is never replaced:
the answer is a 409 naming ``custom_name``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from fastapi import APIRouter, Request
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from ..errors import InvalidParameter, OutputExists, UnderpaintError
from .a1111.requests import RequestModel, WireModel
from .security import JSONValueLimitRoute
from .state import server_state

router = APIRouter(prefix="/underpaint/v1", tags=["underpaint"], route_class=JSONValueLimitRoute)

#: The merger tab's interpolation methods → underpaint's names.
METHODS = {"No interpolation": "no-interpolation", "Weighted sum": "weighted-sum", "Add difference": "add-difference"}
MAX_NAME = 200
MAX_DISCARD = 256
_BAD_NAME = re.compile(r"[/\\\x00-\x1f]")


class MergeRequest(RequestModel):
    primary_model_name: str = Field(description="Primary model (A): a checkpoint from /sdapi/v1/sd-models.")
    secondary_model_name: str | None = Field(None, description="Secondary model (B); not for No interpolation.")
    tertiary_model_name: str | None = Field(None, description="Tertiary model (C); Add difference only.")
    interp_method: str = Field("Weighted sum", description="No interpolation, Weighted sum or Add difference.")
    multiplier: float = Field(0.3, description="Multiplier (M): A·(1-M) + B·M, or A + (B-C)·M.")
    save_as_half: bool = Field(False, description="Store the result in float16.")
    custom_name: str = Field("", description="The new file's name (empty: A1111's name from the recipe).")
    checkpoint_format: str = Field("safetensors", description="safetensors (ckpt is not written).")
    bake_in_vae: str = Field("None", description="A VAE from /sdapi/v1/sd-vae to put in the result, or None.")
    discard_weights: str = Field("", description="A regular expression: tensors whose name matches are left out.")


class MergeResponse(WireModel):
    checkpoint: str = Field(description="The new checkpoint's title, as /sdapi/v1/sd-models lists it.")
    path: str = Field(description="Its path relative to the models folder.")
    info: str


def _optional(name: str | None) -> str | None:
    return None if name is None or name.strip() in ("", "None") else name


def _check(body: MergeRequest) -> str:
    """The merge method, after refusing what cannot be merged (before the queue)."""
    if body.interp_method not in METHODS:
        raise InvalidParameter("interp_method", body.interp_method, "one of " + ", ".join(map(repr, METHODS)))
    method = METHODS[body.interp_method]
    secondary, tertiary = _optional(body.secondary_model_name), _optional(body.tertiary_model_name)
    if method != "no-interpolation" and secondary is None:
        raise InvalidParameter("secondary_model_name", body.secondary_model_name,
                               f"a checkpoint for {body.interp_method}")
    if method == "add-difference" and tertiary is None:
        raise InvalidParameter("tertiary_model_name", body.tertiary_model_name, "a checkpoint for Add difference")
    if body.checkpoint_format != "safetensors":
        raise InvalidParameter("checkpoint_format", body.checkpoint_format,
                               "'safetensors' (underpaint writes no pickled .ckpt files)")
    if len(body.discard_weights) > MAX_DISCARD:
        raise InvalidParameter("discard_weights", body.discard_weights[:40] + "...",
                               f"a regular expression of at most {MAX_DISCARD} characters")
    return method


def custom_file_name(name: str) -> str | None:
    """A custom name as a file name in the checkpoints folder (``.safetensors`` added), or None when empty."""
    name = name.strip()
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not name:
        return None
    if _BAD_NAME.search(name) or name.startswith(".") or len(name.encode("utf-8")) > MAX_NAME:
        raise InvalidParameter("custom_name", name, f"a plain file name: no folders, no leading dot, at most "
                                                    f"{MAX_NAME} bytes in UTF-8")
    return name + ".safetensors"


def recipe_file_name(method: str, multiplier: float, names: list[str], *, inpainting: bool) -> str:
    """A1111's name for a merge without a custom name (each model by its name, folders flattened)."""
    a, b, c = [n.replace("/", "_").replace("\\", "_") for n in names] + [""] * (3 - len(names))
    m = round(multiplier, 2)
    if method == "weighted-sum":
        stem = f"{round(1 - multiplier, 2)}({a}) + {m}({b})"
    elif method == "add-difference":
        stem = f"{a} + {m}({b} - {c})"
    else:
        stem = a
    return stem + (".inpainting" if inpainting else "") + ".safetensors"


@router.post("/merge-checkpoints", response_model=MergeResponse,
             summary="A1111's Checkpoint Merger: two or three checkpoints into a new one in the models folder")
async def merge_checkpoints(body: MergeRequest, request: Request) -> MergeResponse:
    from ..models.merge import MergeRecipe, is_inpainting, merge
    from .a1111.generation import await_job

    state = server_state(request)
    method = _check(body)
    catalog = state.catalog
    roles = [("primary_model_name", body.primary_model_name), ("secondary_model_name", body.secondary_model_name),
             ("tertiary_model_name", body.tertiary_model_name)]
    used = {"no-interpolation": 1, "weighted-sum": 2, "add-difference": 3}[method]
    paths = [await run_in_threadpool(catalog.resolve, name, field=field) for field, name in roles[:used]]
    vae_choice = _optional(body.bake_in_vae)
    vae = None
    if vae_choice is not None:
        vae = await run_in_threadpool(catalog.vae_file, paths[0], catalog.vae_choice(vae_choice, field="bake_in_vae"),
                                      field="bake_in_vae")
    recipe = MergeRecipe(a=paths[0], b=paths[1] if used > 1 else None, c=paths[2] if used > 2 else None,
                         method=method, multiplier=body.multiplier, fp16=body.save_as_half, bake_vae=vae,
                         discard=body.discard_weights or None, discard_field="discard_weights")
    folder = catalog.folder
    model_names = {entry.path: entry.model_name for entry in folder.list_checkpoints()}
    name = custom_file_name(body.custom_name) or recipe_file_name(
        method, body.multiplier, [model_names.get(p, p.stem) for p in paths], inpainting=is_inpainting(paths[0]))
    output = folder.checkpoints_dir / name
    if output.exists():
        raise OutputExists(f"custom_name: {name!r} is already a file in the checkpoints folder; choose another name",
                           field="custom_name")
    state.queue.check_room()

    def work(job) -> Path:
        def progress(done: int, total: int) -> None:
            if job.cancel.interrupted:
                raise MergeInterrupted("the merge was interrupted; nothing was written")

        try:
            return merge(recipe, output, progress=progress)
        except OutputExists:
            raise OutputExists(f"custom_name: {name!r} is already a file in the checkpoints folder; "
                               "choose another name", field="custom_name") from None
        except UnderpaintError as exc:
            raise _for_client(exc, folder.root) from None
        except OSError as exc:  # a full disk, a name the file system refuses: said without the server's paths
            raise MergeNotWritten(f"custom_name: the checkpoint could not be written ({exc.strerror or exc})",
                                  field="custom_name") from None

    written = await await_job(state, state.queue.submit("merge", work))
    title = await run_in_threadpool(catalog.title_of, written)
    relative = Path(os.path.relpath(written, folder.root)).as_posix()
    return MergeResponse(checkpoint=title, path=relative, info=f"Checkpoint saved to {relative}")


#: The merge module's field names → this route's.
_FIELDS = {"a": "primary_model_name", "b": "secondary_model_name", "c": "tertiary_model_name",
           "bake_vae": "bake_in_vae", "vae": "bake_in_vae", "output": "custom_name"}


def _for_client(exc: UnderpaintError, root: Path) -> UnderpaintError:
    """The merge's error with this route's field names, and paths shown relative to the models folder."""
    message = exc.message.replace(str(Path(root).absolute()) + os.sep, "").replace(str(root) + os.sep, "")
    exc.args = (message, *exc.args[1:])
    exc.field = _FIELDS.get(exc.field, exc.field)
    return exc


class MergeNotWritten(UnderpaintError):
    http_status = 507
    kind = "not_written"


class MergeInterrupted(UnderpaintError):
    http_status = 409
    kind = "interrupted"
