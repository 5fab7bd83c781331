"""The models folder as the API shows it: checkpoint titles and names, resolved only to listed files.

A request may name a checkpoint by A1111 title, name, stem or short hash, but never by a path:
whatever a name resolves to must be one of the files the folder lists, so a request cannot make
the server open an arbitrary file.
"""

from __future__ import annotations

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
        """The listed checkpoint a client means by ``name``; anything else is ModelNotFound (404)."""
        listed = {entry.path.resolve(): entry.path for entry in self.folder.list_checkpoints()}
        try:
            found = self.folder.resolve_checkpoint(str(name))
        except ModelNotFound as exc:
            raise ModelNotFound(exc.message, field=field) from None
        path = listed.get(Path(found).resolve())
        if path is None:
            raise ModelNotFound(f"{field}: {name!r} is not a checkpoint in the models folder "
                                f"(see /sdapi/v1/sd-models)", field=field)
        return path

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
