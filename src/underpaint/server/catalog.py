"""The models folder as the API shows it: checkpoint titles and names, resolved only to listed files.

A request may name a checkpoint by A1111 title, name, stem or short hash, but never by a path:
whatever a name resolves to must be one of the files the folder lists, so a request cannot make
the server open an arbitrary file.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelNotFound


@dataclass(frozen=True)
class CheckpointView:
    """One checkpoint as ``/sd-models`` lists it."""

    title: str
    name: str
    model_name: str
    short_hash: str | None
    path: Path
    relative: str
    #: "flux" or "sd", read from the file's tensor names.
    family: str = "sd"


def _shown(name: object, limit: int = 120) -> str:
    text = str(name)
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _hint(name: str, entries) -> str:
    """A "did you mean" for a near miss among the listed names (short names only: difflib is quadratic)."""
    if len(name) > 256:
        return ""
    close = difflib.get_close_matches(name, [e.filename for e in entries] + [e.name for e in entries], n=3,
                                      cutoff=0.5)
    return f"; did you mean {' or '.join(repr(c) for c in dict.fromkeys(close))}?" if close else ""


class Catalog:
    """Checkpoints and VAEs under the models folder; listed fresh on every call (a refresh is free)."""

    def __init__(self, models_dir: Path | None):
        self._models_dir = models_dir
        self._folder = None

    @property
    def folder(self):
        """The registry's ModelsDir, made on first use (the registry imports torch)."""
        if self._folder is None:
            from ..models.registry import ModelsDir, default_models_dir

            self._folder = ModelsDir(Path(self._models_dir) if self._models_dir else default_models_dir())
        return self._folder

    def _relative(self, path: Path) -> str:
        try:
            return Path(os.path.relpath(path, self.folder.root)).as_posix()
        except ValueError:  # another drive on Windows
            return path.name

    def checkpoints(self) -> list[CheckpointView]:
        from ..models.flux_loader import is_flux

        views = []
        for entry in self.folder.list_checkpoints():
            views.append(CheckpointView(entry.title, entry.name, entry.model_name, entry.short_hash, entry.path,
                                        self._relative(entry.path), "flux" if is_flux(entry.path) else "sd"))
        return views

    def vaes(self) -> list[tuple[str, str]]:
        return [(entry.name, self._relative(entry.path)) for entry in self.folder.list_vaes()]

    def text_encoders(self) -> list[tuple[str, str]]:
        """FLUX's separate text encoder files (name, path relative to the models folder)."""
        return [(entry.name, self._relative(entry.path)) for entry in self.folder.list_text_encoders()]

    def resolve(self, name: str, *, field: str = "sd_model_checkpoint") -> Path:
        """The listed checkpoint a client means by ``name``; anything else is ModelNotFound (404).

        Only names are matched, against the folder's listing: whatever the request sends (an
        absolute path, ``../``, a Windows share, a name too long for the file system) is never
        looked up on the server's disk, not even to say whether it exists, and the answer never
        shows where the models folder is.
        """
        entries = self.folder.list_checkpoints()
        try:
            found = self.folder.find_checkpoint(str(name), entries)
        except ModelNotFound as exc:  # a name that fits several files
            raise ModelNotFound(f"{field}: {exc.message}", field=field) from None
        if found is None:
            raise ModelNotFound(f"{field}: {_shown(name)} is not a checkpoint in the models folder"
                                f"{_hint(str(name), entries)} (see /sdapi/v1/sd-models)", field=field)
        return found

    def controlnets(self) -> list[Path]:
        """ControlNet files and folders in the models folder (what unit model names may refer to)."""
        from ..models.controlnet import list_controlnets

        return list_controlnets(list(self.folder.folders("controlnet")))

    def title_of(self, path: Path | None) -> str | None:
        if path is None:
            return None
        wanted = Path(path).resolve()
        for view in self.checkpoints():
            if view.path.resolve() == wanted:
                return view.title
        return Path(path).name

    def first(self) -> Path | None:
        entries = self.folder.list_checkpoints()
        return entries[0].path if entries else None
