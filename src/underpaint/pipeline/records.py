"""Typed records that cross the pipeline boundary: progress reports, cancellation, results."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL.Image import Image

    from ..params import GenerationParams


@dataclass(frozen=True)
class Progress:
    """One sampling step finished. ``preview()`` decodes the current estimate on demand."""

    job: int
    job_count: int
    step: int
    steps: int
    preview: Callable[[], "list[Image]"] | None = None

    @staticmethod
    def relay(progress: "Callable[[Progress], None] | None", first_job: int,
              job_count: int) -> "Callable[[Progress], None]":
        """A callback for one part of a larger request (a script's tile batch or plot cell): its
        steps reported to ``progress`` as jobs ``first_job`` on, of ``job_count`` in all."""
        def report(p: Progress) -> None:
            if progress is not None:
                progress(Progress(first_job + p.job, job_count, p.step, p.steps, p.preview))

        return report

    @property
    def fraction(self) -> float:
        """Overall progress in [0, 1] across all jobs (A1111's ``progress``)."""
        if self.job_count <= 0 or self.steps <= 0:
            return 0.0
        return min(1.0, (self.job + self.step / self.steps) / self.job_count)


class Cancellation:
    """Thread-safe interrupt/skip flags checked once per sampling step (A1111's interrupt and skip).

    Both end the current batch at the step they find, which returns its current estimate (the
    denoised prediction of that step), as A1111 does; interrupt then ends the request, while
    skip goes on with the next batch.
    """

    def __init__(self) -> None:
        self._interrupt = threading.Event()
        self._skip = threading.Event()
        self._stopped_batch = False  # only the generating thread reads and writes it

    def interrupt(self) -> None:
        self._interrupt.set()

    def skip(self) -> None:
        self._skip.set()

    @property
    def interrupted(self) -> bool:
        return self._interrupt.is_set()

    @property
    def skipped(self) -> bool:
        return self._skip.is_set()

    def clear_skip(self) -> None:
        self._skip.clear()

    def stop_batch(self) -> None:
        """Called by the sampling loop when it ends a batch early for an interrupt or a skip."""
        self._stopped_batch = True

    def batch_was_stopped(self) -> bool:
        """Whether the batch just run ended early (see :meth:`stop_batch`); clears the mark."""
        stopped, self._stopped_batch = self._stopped_batch, False
        return stopped


@dataclass(frozen=True)
class ModelInfo:
    """What the infotext and the API say about the loaded checkpoint."""

    name: str
    path: str
    family: str
    prediction: str
    short_hash: str | None = None
    vae_name: str | None = None
    vae_hash: str | None = None
    #: An InstructPix2Pix edit model (its infotext records the Image CFG scale).
    edit_model: bool = False
    #: The widths of its text encoders' token embeddings, in order: what a textual-inversion
    #: embedding must have to apply (() when not known, and for FLUX).
    text_widths: tuple[int, ...] = ()


@dataclass(frozen=True)
class Result:
    """The images of one request, each with its infotext and the seeds that made it."""

    images: tuple["Image", ...]
    infotexts: tuple[str, ...]
    seeds: tuple[int, ...]
    subseeds: tuple[int, ...]
    params: "GenerationParams"
    model: ModelInfo
    interrupted: bool = False
    prompts: tuple[str, ...] = field(default=())
    negative_prompts: tuple[str, ...] = field(default=())
    #: Indexes of the images that are a stopped batch's current estimate (an interrupt or a skip
    #: came before its last step), not a finished picture. A1111 returns and saves them alike.
    unfinished: tuple[int, ...] = field(default=())

    def finished(self) -> list[int]:
        """Indexes of the finished pictures (with their infotext and seed), those to save: a
        stopped batch's estimates are left out, as A1111 does unless "save incomplete images"."""
        count = min(len(self.images), len(self.infotexts), len(self.seeds))
        return [i for i in range(count) if i not in self.unfinished]
