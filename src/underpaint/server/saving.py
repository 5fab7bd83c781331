"""Pictures kept on the server when a request says ``save_images: true``, as A1111 keeps them.

The layout is A1111 1.10's default one: ``<outdir>/txt2img-images/`` and
``<outdir>/img2img-images/``, a subfolder per day named by the ISO date (its "Directory name
pattern" ``[date]``), and files named ``<number>-<seed>.png``: a five-digit running number, one
more than the highest number that starts a name in that day's folder, and the picture's seed.
Each PNG carries its infotext in the ``parameters`` chunk (a ``.jpg`` or ``.webp``, in A1111's "File
format for images", in an EXIF UserComment). A batch of two or more pictures also gets A1111's grid
of them, ``<outdir>/txt2img-grids/<date>/grid-NNNN.png`` (or ``img2img-grids``).

Every path is made from the server's ``--outdir``, the job's kind, the date, the running number
and the seed (an integer), so nothing a request sends can choose where a file goes; the A1111
settings that would (``outdir_*``, the file and folder name patterns) cannot be changed through
the API. Files are written through :func:`underpaint.imageio.metadata.save_image`: to a temporary
file first, then linked into place without ever replacing a file, so a name that is already taken
moves the running number on.

A1111 fails the whole request when a picture cannot be written. Here the job still returns its
pictures; the failure is logged and reported in the response's ``info`` as ``save_error``.
"""

from __future__ import annotations

import datetime
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidParameter, OutputExists, UnderpaintError

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger("underpaint.server")

#: The folder under ``--outdir`` for each kind of job (A1111's outdir_txt2img/img2img_samples defaults).
SAMPLE_FOLDERS = {"txt2img": "txt2img-images", "img2img": "img2img-images"}
#: Where a saved batch's grid goes (A1111's ``outdir_txt2img_grids`` / ``outdir_img2img_grids``).
GRID_FOLDERS = {"txt2img": "txt2img-grids", "img2img": "img2img-grids"}
#: A1111's settings that decide where, or under what names, pictures are written (its
#: ``restricted_opts``). A client may read the folders but never change any of these.
PATH_OPTIONS = frozenset({
    "outdir_samples", "outdir_txt2img_samples", "outdir_img2img_samples", "outdir_extras_samples",
    "outdir_grids", "outdir_txt2img_grids", "outdir_img2img_grids", "outdir_save", "outdir_init_images",
    "samples_filename_pattern", "directories_filename_pattern",
})
#: Taken names skipped before giving up (A1111 tries as many).
MAX_NAME_TRIES = 500


@dataclass(frozen=True)
class SaveReport:
    """What a save wrote, and why it stopped early (None when every picture was written)."""

    paths: tuple[Path, ...]
    error: str | None = None


class SampleFolders:
    """The server's output folder: where saved pictures go and what ``/options`` says about it."""

    def __init__(self, root: Path):
        self.root = Path(root).expanduser().absolute()

    def folder(self, kind: str) -> Path:
        return self.root / SAMPLE_FOLDERS[kind]

    def options(self) -> dict[str, str]:
        """A1111's path settings as ``GET /options`` shows them: ``outdir_samples`` empty means
        "each kind in its own folder", which is how pictures are saved here."""
        return {"outdir_samples": "", "outdir_txt2img_samples": str(self.folder("txt2img")),
                "outdir_img2img_samples": str(self.folder("img2img"))}

    def refuse_changes(self, values: Mapping[str, Any], *, prefix: str = "") -> None:
        """Refuse any path setting in ``values`` other than the current value sent back unchanged
        (a client that posts back what it read keeps working)."""
        current = self.options()
        why = "read-only: the server's --outdir decides where pictures are saved"
        for key in values:
            if key not in PATH_OPTIONS or (key in current and values[key] == current[key]):
                continue
            expected = f"{current[key]!r} ({why})" if key in current else f"absent ({why})"
            raise InvalidParameter(f"{prefix}{key}", values[key], expected)

    def save(self, kind: str, images: Sequence["Image"], infotexts: Sequence[str | None], seeds: Sequence[int],
             *, today: datetime.date | None = None, extension: str = "png", quality: int = 80) -> SaveReport:
        """Write the pictures into today's folder for ``kind`` as ``extension`` files (png, jpg, jpeg,
        webp; ``quality`` for the last three); a failure stops the save and is reported."""
        from ..imageio.metadata import next_sequence_number

        folder = self.folder(kind) / (today or datetime.date.today()).isoformat()
        saved: list[Path] = []
        try:
            folder.mkdir(parents=True, exist_ok=True)
            number = next_sequence_number(folder)
            for image, infotext, seed in zip(images, infotexts, seeds):
                path, number = _save_numbered(folder, number, image, infotext, int(seed), extension, quality)
                saved.append(path)
                number += 1
        except Exception as exc:  # noqa: BLE001 - whatever stops the save, the job keeps its pictures
            where = folder.relative_to(self.root).as_posix()
            message = (f"saved {len(saved)} of {len(images)} pictures in {where}; "
                       f"picture {len(saved) + 1} could not be written ({_reason(exc, self.root)})")
            expected = isinstance(exc, (UnderpaintError, OSError))
            log.warning("%s job: %s (under %s)", kind, message, self.root, exc_info=None if expected else exc)
            return SaveReport(tuple(saved), message)
        return SaveReport(tuple(saved))


    def save_grid(self, kind: str, grid: "Image", infotext: str | None, *,
                  today: datetime.date | None = None, extension: str = "png", quality: int = 80) -> SaveReport:
        """Write a batch's grid as A1111 names it, ``grid-NNNN.png`` (or ``extension``) in today's grids
        folder for ``kind``."""
        from ..imageio.metadata import save_image

        folder = self.root / GRID_FOLDERS[kind] / (today or datetime.date.today()).isoformat()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            numbers = [int(m.group(1)) for m in (_GRID_NAME.match(p.name) for p in folder.iterdir()) if m]
            number = max(numbers, default=-1) + 1
            for _ in range(MAX_NAME_TRIES):
                try:
                    return SaveReport((save_image(grid, folder / f"grid-{number:04}.{extension}",
                                                  infotext=infotext, overwrite=False, quality=quality),))
                except OutputExists:
                    number += 1
            raise OutputExists(f"{MAX_NAME_TRIES} names in a row were taken", field="output")
        except Exception as exc:  # noqa: BLE001 - the job keeps its pictures whatever stops the save
            where = folder.relative_to(self.root).as_posix()
            message = f"the grid could not be written in {where} ({_reason(exc, self.root)})"
            log.warning("%s job: %s (under %s)", kind, message, self.root)
            return SaveReport((), message)


_GRID_NAME = re.compile(r"^grid-(\d+)\.(?:png|jpg|jpeg|webp)$")


def _save_numbered(folder: Path, number: int, image: "Image", infotext: str | None, seed: int,
                   extension: str = "png", quality: int = 80) -> tuple[Path, int]:
    """Save under the first free ``<number>-<seed>.<extension>`` from ``number`` on; returns the path and
    number used."""
    from ..imageio.metadata import save_image

    for _ in range(MAX_NAME_TRIES):
        path = folder / f"{number:05}-{seed}.{extension}"
        try:
            return save_image(image, path, infotext=infotext, overwrite=False, quality=quality), number
        except OutputExists:
            number += 1
    raise OutputExists(f"{MAX_NAME_TRIES} names in a row were taken", field="output")


def _reason(exc: BaseException, root: Path) -> str:
    """The operating system's words, else the error's message, without the server's own paths."""
    cause = exc if isinstance(exc, OSError) else exc.__cause__
    if isinstance(cause, OSError):
        return cause.strerror or type(cause).__name__
    if isinstance(exc, UnderpaintError):
        return exc.message.replace(str(root), "<outdir>")
    return type(exc).__name__
