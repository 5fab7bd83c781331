"""A progress bar with ETA on a terminal; silent when stderr is not one."""

from __future__ import annotations

import sys

from ..pipeline.records import Progress


class ProgressBar:
    def __init__(self, label: str = ""):
        self.label = label
        self._bar = None
        self._enabled = sys.stderr.isatty()

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()

    def update(self, progress: Progress) -> None:
        if not self._enabled:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=progress.steps * progress.job_count, desc=self.label, unit="step",
                             file=sys.stderr, dynamic_ncols=True)
        done = progress.job * progress.steps + progress.step
        self._bar.update(max(0, done - self._bar.n))
