"""The job queue: one generation at a time per engine, first in first out, bounded.

A1111 ran API requests under one lock: a second request simply blocked, with no position,
no per-job cancel and no limit. Here every request becomes a :class:`Job` with an id; one
worker thread owns the engine and runs jobs in order; a full queue answers 503 with
``Retry-After`` at once; progress, preview and interrupt are per job.
"""

from __future__ import annotations

import collections
import concurrent.futures
import gc
import logging
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..pipeline.records import Cancellation, Progress
from .errors import ServerError

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger("underpaint.server")

#: A job id a client may choose: letters, digits and ``_.:-()`` (A1111's own UI sends ``task(…)`` ids).
JOB_ID = re.compile(r"^[A-Za-z0-9_.:()\-]{1,64}$")


class QueueFull(ServerError):
    """More jobs are waiting than the server is configured to hold."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"the job queue is full ({waiting} waiting); try again in about {retry_after} s",
                         status=503, kind="queue_full", headers={"Retry-After": str(retry_after)})


class JobCancelled(ServerError):
    """A waiting job was cancelled before it reached the engine."""

    def __init__(self, job_id: str):
        super().__init__(f"job {job_id} was cancelled before it started", status=409, kind="cancelled")


@dataclass(frozen=True)
class JobStatus:
    """A snapshot of one job for the progress endpoints."""

    id: str
    kind: str
    state: str  # queued, running, done, failed, cancelled
    position: int | None  # 0 = running, 1 = next, ...; None once finished
    job_no: int
    job_count: int
    step: int
    steps: int
    fraction: float
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    eta_seconds: float | None
    interrupted: bool
    skipped: bool


class Job:
    """One request: its work, its cancellation flags and what it has reported so far."""

    def __init__(self, job_id: str, kind: str, work: Callable[["Job"], Any], *, job_count: int = 1,
                 preview_interval: float = 1.0):
        self.id = job_id
        self.kind = kind
        self.job_count = job_count  # batches, known before the first progress report
        self.work = work
        self.cancel = Cancellation()
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.submitted_at = time.time()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.progress: Progress | None = None
        self.preview: "Image | None" = None
        self.want_preview = False
        #: The request's own live-preview switch (``override_settings``); None: the server's option.
        self.live_previews: bool | None = None
        self.preview_interval = preview_interval
        self._preview_at = 0.0
        self.state = "queued"

    @property
    def timestamp(self) -> str:
        """A1111's ``job_timestamp``: when the job started, as YYYYmmddHHMMSS."""
        return time.strftime("%Y%m%d%H%M%S", time.localtime(self.started_at or self.submitted_at))

    def report(self, progress: Progress) -> None:
        """Engine callback (worker thread): keep the step; decode a preview only when someone asked."""
        self.progress = progress
        if not (self.want_preview and progress.preview is not None):
            return
        now = time.monotonic()
        if now - self._preview_at < self.preview_interval:
            return
        self._preview_at = now
        self.want_preview = False
        try:
            images = progress.preview()
        except Exception:  # a failed preview must never fail the job
            log.warning("preview decoding failed for job %s", self.id, exc_info=True)
            return
        if images:
            self.preview = images[0]

    def eta_seconds(self, fraction: float) -> float | None:
        """A1111's estimate: time so far divided by the share done (plus 0.01 so it is never zero)."""
        if self.started_at is None:
            return None
        elapsed = time.time() - self.started_at
        return max(0.0, elapsed / (fraction + 0.01) - elapsed)

    def status(self, position: int | None) -> JobStatus:
        p = self.progress
        fraction = 1.0 if self.state == "done" else (p.fraction if p else 0.0)
        return JobStatus(
            id=self.id, kind=self.kind, state=self.state, position=position,
            job_no=p.job if p else 0, job_count=p.job_count if p else self.job_count,
            step=p.step if p else 0, steps=p.steps if p else 0, fraction=fraction,
            submitted_at=self.submitted_at, started_at=self.started_at, finished_at=self.finished_at,
            eta_seconds=self.eta_seconds(fraction) if self.state == "running" else None,
            interrupted=self.cancel.interrupted, skipped=self.cancel.skipped,
        )


class JobQueue:
    """FIFO of jobs run one at a time by a single worker thread, which alone touches the engine."""

    def __init__(self, *, max_waiting: int, keep_finished: int = 64, preview_interval: float = 1.0):
        self.max_waiting = max_waiting
        self.preview_interval = preview_interval
        self._waiting: collections.deque[Job] = collections.deque()
        self._finished: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._keep_finished = keep_finished
        self._current: Job | None = None
        self._durations: collections.deque[float] = collections.deque(maxlen=8)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- submitting -------------------------------------------------------------------------
    def submit(self, kind: str, work: Callable[[Job], Any], *, job_id: str | None = None, job_count: int = 1) -> Job:
        """Queue ``work(job)``; raises :class:`QueueFull` (503) at once instead of making callers wait blind."""
        with self._cond:
            if self._stopping:
                raise ServerError("the server is shutting down", status=503, kind="shutting_down",
                                  headers={"Retry-After": "30"})
            if len(self._waiting) >= self.max_waiting and (self._current is not None or self._waiting):
                raise QueueFull(len(self._waiting), self._retry_after())
            job_id = self._new_id(job_id)
            job = Job(job_id, kind, work, job_count=job_count, preview_interval=self.preview_interval)
            self._waiting.append(job)
            self._ensure_worker()
            self._cond.notify_all()
            return job

    def check_room(self) -> None:
        """Raise :class:`QueueFull` now if :meth:`submit` would: a request checks before it decodes
        its pictures, so a full queue refuses it without holding them."""
        with self._cond:
            if len(self._waiting) >= self.max_waiting and (self._current is not None or self._waiting):
                raise QueueFull(len(self._waiting), self._retry_after())

    def _new_id(self, requested: str | None) -> str:
        if requested is None or requested == "":
            return uuid.uuid4().hex
        if not JOB_ID.match(requested):
            raise ServerError(f"force_task_id: got {requested!r}, expected 1-64 letters, digits or _.:-()",
                              status=422, kind="invalid_parameter", field="force_task_id")
        if self.get(requested) is not None:
            raise ServerError(f"force_task_id: job {requested!r} already exists", status=409,
                              kind="conflict", field="force_task_id")
        return requested

    def _retry_after(self) -> int:
        typical = sum(self._durations) / len(self._durations) if self._durations else 5.0
        return int(min(600, max(1, typical * (len(self._waiting) + 1))))

    # -- looking ----------------------------------------------------------------------------
    @property
    def current(self) -> Job | None:
        return self._current

    def waiting(self) -> list[Job]:
        with self._cond:
            return list(self._waiting)

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            if self._current is not None and self._current.id == job_id:
                return self._current
            for job in self._waiting:
                if job.id == job_id:
                    return job
            return self._finished.get(job_id)

    def position(self, job: Job) -> int | None:
        with self._cond:
            if job is self._current:
                return 0
            for i, waiting in enumerate(self._waiting, start=1):
                if waiting is job:
                    return i
            return None

    # -- cancelling -------------------------------------------------------------------------
    def cancel(self, job_id: str) -> bool:
        """Interrupt a running job (it returns what it finished) or drop a waiting one."""
        with self._cond:
            if self._current is not None and self._current.id == job_id:
                self._current.cancel.interrupt()
                return True
            for job in self._waiting:
                if job.id == job_id:
                    self._waiting.remove(job)
                    job.state = "cancelled"
                    job.cancel.interrupt()
                    self._remember(job)
                    job.future.set_exception(JobCancelled(job_id))
                    return True
            return False

    # -- the worker -------------------------------------------------------------------------
    def _ensure_worker(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="underpaint-jobs", daemon=True)
            self._thread.start()

    def start(self) -> None:
        with self._cond:
            self._stopping = False
            self._ensure_worker()

    def stop(self, timeout: float = 10.0) -> None:
        """Interrupt the running job, drop the waiting ones and let the worker end."""
        with self._cond:
            self._stopping = True
            if self._current is not None:
                self._current.cancel.interrupt()
            while self._waiting:
                job = self._waiting.popleft()
                job.state = "cancelled"
                job.future.set_exception(JobCancelled(job.id))
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _next(self) -> Job | None:
        with self._cond:
            while not self._waiting and not self._stopping:
                self._cond.wait()
            if self._stopping and not self._waiting:
                return None
            job = self._waiting.popleft()
            job.state = "running"
            job.started_at = time.time()
            self._current = job
            return job

    def _run(self) -> None:
        while (job := self._next()) is not None:
            try:
                result = job.work(job)
            except BaseException as exc:  # noqa: BLE001 - the job's error goes to its caller, the worker goes on
                self._finish(job, "failed")
                _release_memory()
                if not job.future.done():
                    job.future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
            else:
                self._finish(job, "done")
                job.future.set_result(result)

    def _finish(self, job: Job, state: str) -> None:
        with self._cond:
            job.state = state
            job.finished_at = time.time()
            if job.started_at is not None:
                self._durations.append(job.finished_at - job.started_at)
            self._current = None
            self._remember(job)

    def _remember(self, job: Job) -> None:
        self._finished[job.id] = job
        while len(self._finished) > self._keep_finished:
            self._finished.popitem(last=False)


def _release_memory() -> None:
    """After a failure (often CUDA out of memory) give cached blocks back so the next job can run."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
