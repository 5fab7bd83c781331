"""The browser UI's Extra networks cards: ``GET /underpaint/v1/extra-networks`` and their preview pictures.

Each card is a LoRA, hypernetwork, embedding or checkpoint in the models folder, with what A1111 keeps
beside the file: a preview picture (``name.png`` or ``name.preview.png``, then ``.jpg``, ``.jpeg``,
``.webp``, ``.gif``) and the card's user metadata (``name.json``: ``description``, ``activation text``,
``preferred weight``, ``negative text``), which A1111's card editor writes. A card's preview is served by
``GET /underpaint/v1/extra-networks/preview?kind=loras&file=loras/styles/ink.safetensors``: the file is
looked up in the listing, never used as a path, and only the picture files beside a listed file are read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from pydantic import Field

from ..errors import ModelNotFound
from .a1111.requests import WireModel
from .security import JSONValueLimitRoute
from .state import server_state

router = APIRouter(prefix="/underpaint/v1", tags=["underpaint"], route_class=JSONValueLimitRoute)

#: A1111's preview picture suffixes, in the order it looks for them.
PREVIEW_TYPES = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp", "gif": "image/gif"}
MAX_PREVIEW_BYTES = 16 * 1024 * 1024
MAX_METADATA_BYTES = 1024 * 1024
KINDS = ("embeddings", "hypernetworks", "checkpoints", "loras")


class NetworkCard(WireModel):
    name: str = Field(description="What the prompt tag names (a checkpoint: its title).")
    path: str = Field(description="The file, relative to the models folder.")
    preview: str | None = Field(None, description="The preview picture's address, when there is one.")
    description: str = ""
    activation_text: str = Field("", description="Words the card adds after its tag (A1111's \"activation text\").")
    preferred_weight: float | None = Field(None, description="The weight the card's tag gets (else 1).")
    negative_text: str = Field("", description="Words the card adds to the negative prompt.")
    fits: bool = Field(True, description="False for an embedding made for another model family.")


class ExtraNetworks(WireModel):
    embeddings: list[NetworkCard]
    hypernetworks: list[NetworkCard]
    checkpoints: list[NetworkCard]
    loras: list[NetworkCard]


def _files(request: Request, kind: str) -> list[tuple[str, Path]]:
    """(name, file) of every listed network of ``kind``, in listing order: the name a tag or a prompt uses
    (the file name without suffix, as A1111's cards use it), a checkpoint's title."""
    from ..models.hypernetwork import list_hypernetworks
    from ..models.lora import list_loras
    from ..models.registry import list_named_files
    from ..prompts.embeddings import EMBEDDING_SUFFIXES

    folder = server_state(request).catalog.folder
    if kind == "checkpoints":
        return [(entry.title, entry.path) for entry in folder.list_checkpoints() if entry.path.is_file()]
    if kind == "loras":
        entries = list_loras(folder.folders("loras"))
    elif kind == "hypernetworks":
        entries = list_hypernetworks(folder.folders("hypernetworks"))
    else:
        entries = list_named_files(folder.folders("embeddings"), EMBEDDING_SUFFIXES)
    return [(entry.name, entry.path) for entry in entries]


def find_preview(path: Path) -> Path | None:
    """The preview picture beside a network file, as A1111 finds it."""
    stem = path.with_suffix("")
    for suffix in PREVIEW_TYPES:
        for candidate in (stem.with_name(f"{stem.name}.{suffix}"), stem.with_name(f"{stem.name}.preview.{suffix}")):
            if candidate.is_file():
                return candidate
    return None


def user_metadata(path: Path) -> dict[str, Any]:
    """A1111's card metadata (``name.json`` beside the file); {} when there is none or it is not a JSON object."""
    meta = path.with_suffix(".json")
    try:
        if not meta.is_file() or meta.stat().st_size > MAX_METADATA_BYTES:
            return {}
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _card(kind: str, name: str, path: Path, root: Path, *, fits: bool = True) -> NetworkCard:
    meta = user_metadata(path)
    weight = meta.get("preferred weight")
    weight = float(weight) if isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight else None
    text = lambda key: meta.get(key) if isinstance(meta.get(key), str) else ""  # noqa: E731
    relative = Path(os.path.relpath(path, root)).as_posix()
    preview = None
    if find_preview(path) is not None:
        preview = f"/underpaint/v1/extra-networks/preview?kind={kind}&file={quote(relative, safe='')}"
    return NetworkCard(name=name, path=relative, preview=preview,
                       description=text("description"), activation_text=text("activation text"),
                       preferred_weight=weight, negative_text=text("negative text"), fits=fits)


@router.get("/extra-networks", response_model=ExtraNetworks,
            summary="The Extra networks cards: LoRAs, hypernetworks, embeddings and checkpoints, with previews")
def extra_networks(request: Request) -> ExtraNetworks:
    from .a1111.lists import embeddings as embedding_lists

    root = server_state(request).catalog.folder.root
    fitting = embedding_lists(request)
    cards: dict[str, list[NetworkCard]] = {}
    for kind in KINDS:
        found = _files(request, kind)
        if kind == "embeddings":  # the readable ones, each name once (as /sdapi/v1/embeddings lists them)
            readable: dict[str, Path] = {}
            for name, path in found:
                if name in fitting.loaded or name in fitting.skipped:
                    readable.setdefault(name, path)
            found = list(readable.items())
        cards[kind] = [_card(kind, name, path, root, fits=kind != "embeddings" or name in fitting.loaded)
                       for name, path in found]
    return ExtraNetworks(**cards)


@router.get("/extra-networks/preview", summary="A card's preview picture (beside the network's file)",
            response_class=FileResponse)
def preview(request: Request, kind: str = Query(..., description=", ".join(KINDS)),
            file: str = Query(..., description="The card's path, as /underpaint/v1/extra-networks lists it")):
    if kind not in KINDS:
        raise ModelNotFound(f"kind: {kind[:40]!r} is not one of {', '.join(KINDS)}", field="kind")
    root = server_state(request).catalog.folder.root
    for _, path in _files(request, kind):
        if Path(os.path.relpath(path, root)).as_posix() == file:
            picture = find_preview(path)
            if picture is not None and picture.stat().st_size <= MAX_PREVIEW_BYTES:
                return FileResponse(picture, media_type=PREVIEW_TYPES[picture.suffix.lower().lstrip(".")],
                                    headers={"Cache-Control": "no-cache"})
            break
    raise ModelNotFound(f"file: {file[:120]!r} has no preview picture among the {kind}", field="file")
