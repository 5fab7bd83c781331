"""The models folder as the API shows it: checkpoint titles and names, resolved only to listed files.

A request may name a checkpoint (or a VAE) by A1111 title, name, stem or short hash, but never by
a path: whatever a name resolves to must be one of the files the folder lists, so a request cannot
make the server open an arbitrary file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidParameter, ModelNotFound, UnknownName

#: A1111's ``sd_vae`` values besides a VAE file's name: the VAE named like the checkpoint if the
#: folder has one, else the checkpoint's own; and the checkpoint's own, always.
AUTOMATIC_VAE = "Automatic"
NO_VAE = "None"


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
    #: An InstructPix2Pix edit model (its UNet takes the picture too).
    edit: bool = False


def _shown(name: object, limit: int = 120) -> str:
    text = str(name)
    return repr(text if len(text) <= limit else text[:limit] + "...")


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
        from ..models.detect import is_edit_checkpoint
        from ..models.flux_loader import is_flux

        views = []
        for entry in self.folder.list_checkpoints():
            flux = is_flux(entry.path)
            views.append(CheckpointView(entry.title, entry.name, entry.model_name, entry.short_hash, entry.path,
                                        self._relative(entry.path), "flux" if flux else "sd",
                                        edit=not flux and is_edit_checkpoint(entry.path)))
        return views

    def vaes(self) -> list[tuple[str, str]]:
        """VAE files as ``/sd-vae`` lists them: (model_name, path relative to the models folder).

        The model_name is the file name with its extension, relative to the VAE folder, which is
        A1111's name for a file at the top of ``models/VAE``: the value its ``sd_vae`` option takes
        and its infotexts' "VAE" record.
        """
        return [(entry.filename, self._relative(entry.path)) for entry in self.folder.list_vaes()]

    def vae_choice(self, name: object, *, field: str = "sd_vae") -> str:
        """``sd_vae`` as the server keeps it: "Automatic", "None" or the model_name ``/sd-vae`` lists.

        Names are matched against the listing only (file name, name without extension, file stem or
        short hash; exact case, as A1111 looks its names up), never tried as a path. Anything else is
        an :class:`~underpaint.errors.UnknownName` (422) naming ``field``, with the near misses or the
        names there are.
        """
        if name in (AUTOMATIC_VAE, NO_VAE):
            return name
        if name == "auto":  # A1111 reads its older configs' "auto" as Automatic
            return AUTOMATIC_VAE
        entries = self.folder.list_vaes()
        choices = [AUTOMATIC_VAE, NO_VAE, *(e.filename for e in entries)]
        if not isinstance(name, str):
            raise UnknownName(field, name, choices)
        if len(name) > 256:  # never a listed name; shown cut short, and not compared letter by letter
            raise UnknownName(field, name[:120] + "...", choices)
        from ..models.registry import match_entry

        try:
            found = match_entry(entries, name)
        except ModelNotFound as exc:  # a name that fits several files
            raise InvalidParameter(field, name, f"the name of one VAE from /sdapi/v1/sd-vae ({exc.message})") from None
        if found is None:
            raise UnknownName(field, name, choices)
        return found.filename

    def vae_file(self, checkpoint: Path, choice: str, *, field: str = "sd_vae") -> Path | None:
        """The VAE file a job on ``checkpoint`` loads for the ``sd_vae`` value ``choice`` (as
        :meth:`vae_choice` keeps it); None: the checkpoint's own VAE.

        "Automatic" follows A1111: the first VAE file (in listing order) whose file name starts with
        the checkpoint's file name without its extension, else the checkpoint's own. A chosen file
        that is no longer in the folder is a :class:`ModelNotFound` naming ``field``.
        """
        if choice == NO_VAE:
            return None
        entries = self.folder.list_vaes()
        if choice == AUTOMATIC_VAE:
            return named_like(checkpoint, entries)
        for entry in entries:
            if entry.filename == choice:
                return entry.path
        raise ModelNotFound(f"{field}: {_shown(choice)} is no longer in the models folder's VAE folder "
                            f"(see /sdapi/v1/sd-vae)", field=field)

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
        from ..models.registry import did_you_mean

        entries = self.folder.list_checkpoints()
        try:
            found = self.folder.find_checkpoint(str(name), entries)
        except ModelNotFound as exc:  # a name that fits several files
            raise ModelNotFound(f"{field}: {exc.message}", field=field) from None
        if found is None:
            raise ModelNotFound(f"{field}: {_shown(name)} is not a checkpoint in the models folder"
                                f"{did_you_mean(str(name), entries)} (see /sdapi/v1/sd-models)", field=field)
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


def named_like(checkpoint: Path, entries) -> Path | None:
    """A1111's "VAE named like the checkpoint": the first entry whose file name starts with the
    checkpoint's file name up to its last dot (``anything-v3.ckpt`` → ``anything-v3.vae.pt``,
    ``anything-v3-vae.safetensors``), or None."""
    stem = Path(checkpoint).name.rsplit(".", 1)[0]
    for entry in entries:
        if Path(entry.filename).name.startswith(stem):
            return entry.path
    return None
