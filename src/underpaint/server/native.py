"""underpaint's own thin JSON API beside A1111's: the queue, one job's progress, per-job cancel, and the
prompt token counter the browser UI shows.

A1111's /progress and /interrupt only know "the running job"; with a queue, a client also
wants its position and a way to cancel its own job. Every generation response carries its
job id in the ``X-Underpaint-Job`` header (or use ``force_task_id``).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import Field

from .. import __version__
from ..errors import UnderpaintError
from .a1111.requests import RequestModel, WireModel
from .jobs import Job
from .security import JSONValueLimitRoute
from .state import server_state

router = APIRouter(prefix="/underpaint/v1", tags=["underpaint"], route_class=JSONValueLimitRoute)


class JobView(WireModel):
    id: str
    kind: str
    state: str = Field(description="queued, running, done, failed or cancelled")
    position: int | None = Field(description="0 running, 1 next, ...; null once finished")
    job_no: int
    job_count: int
    step: int
    steps: int
    progress: float
    eta_seconds: float | None
    submitted_at: float
    started_at: float | None
    finished_at: float | None


class QueueView(WireModel):
    running: JobView | None
    waiting: list[JobView]
    max_waiting: int


class CancelResult(WireModel):
    cancelled: bool


class ServerInfo(WireModel):
    name: str = "underpaint"
    version: str
    model: str | None


class JobNotFound(UnderpaintError):
    http_status = 404
    kind = "job_not_found"


def _view(job: Job, position: int | None) -> JobView:
    s = job.status(position)
    return JobView(id=s.id, kind=s.kind, state=s.state, position=s.position, job_no=s.job_no, job_count=s.job_count,
                   step=s.step, steps=s.steps, progress=s.fraction, eta_seconds=s.eta_seconds,
                   submitted_at=s.submitted_at, started_at=s.started_at, finished_at=s.finished_at)


class TokenCountRequest(RequestModel):
    prompt: str = Field("", description="The prompt (or negative prompt) as typed.")
    steps: int = Field(20, description="Sampling steps: a [from:to:when] schedule's texts are counted per step.")
    negative: bool = Field(False, description="A negative prompt (AND is plain text there).")


class TokenCount(WireModel):
    tokens: int = Field(description="A1111's count: 75 per full chunk, then the last chunk's tokens.")
    limit: int = Field(description="75 per chunk begun: A1111's \"n/75\", \"n/150\", ...")


@router.post("/token-count", response_model=TokenCount, summary="A1111's prompt token counter (n/75)")
def token_count(body: TokenCountRequest, request: Request) -> TokenCount:
    """The count A1111 shows at the corner of its prompt boxes (prompts/counter.py), embeddings that fit the
    loaded model counted one token per vector."""
    from ..errors import InvalidParameter
    from .a1111.lists import embeddings

    state = server_state(request)
    limits = state.config.limits
    _check_length("prompt", body.prompt, limits.max_prompt_chars)
    if not 1 <= body.steps <= limits.max_steps:
        raise InvalidParameter("steps", body.steps, f"1 to {limits.max_steps}")
    vectors = tuple(sorted((name, item.vectors or 1) for name, item in embeddings(request).loaded.items()))
    made_with, counter = state.token_counter
    if counter is None or made_with != vectors:
        from ..prompts.counter import TokenCounter

        counter = TokenCounter(dict(vectors))
        state.token_counter = (vectors, counter)
    prompt = body.prompt
    if state.options.enable_prompt_comments:  # A1111 counts the prompt its comments leave
        from ..prompts.comments import strip_comments

        prompt = strip_comments(prompt)
    tokens, limit = counter.count(prompt, body.steps, negative=body.negative)
    return TokenCount(tokens=tokens, limit=limit)


def _check_length(field: str, text: str, limit: int) -> None:
    """A prompt text within the server's ``max_prompt_chars``."""
    if len(text) > limit:
        from ..errors import InvalidParameter

        raise InvalidParameter(field, f"{len(text)} characters", f"at most {limit} (this server's limit)")


class StyleRequest(RequestModel):
    name: str = Field(description="The style's name (a style of that name is replaced).")
    prompt: str = Field("", description="Its prompt text ({prompt} stands for the prompt it is applied to).")
    negative_prompt: str = Field("", description="Its negative prompt text.")


class StyleChange(WireModel):
    styles: list[str] = Field(description="The style names in the file now, in order.")


@router.post("/prompt-styles", response_model=StyleChange,
             summary="Save a prompt style in styles.csv (A1111's style editor)")
def save_style(body: StyleRequest, request: Request) -> StyleChange:
    """The browser UI's "Save prompts as style": added at the end of the server's styles.csv, or in place of
    the style of that name; the file before is kept as styles.csv.bak."""
    from ..prompts.styles import PromptStyle

    state = server_state(request)
    for field, text in (("prompt", body.prompt), ("negative_prompt", body.negative_prompt)):
        _check_length(field, text, state.config.limits.max_prompt_chars)
    state.styles.save(PromptStyle(body.name, body.prompt, body.negative_prompt))
    return StyleChange(styles=state.styles.book().names)


@router.delete("/prompt-styles", response_model=StyleChange, summary="Delete a prompt style from styles.csv")
def delete_style(request: Request, name: str) -> StyleChange:
    state = server_state(request)
    if not state.styles.delete(name):
        raise StyleNotFound(f"name: no style {name[:120]!r} in styles.csv", field="name")
    return StyleChange(styles=state.styles.book().names)


class StyleNotFound(UnderpaintError):
    http_status = 404
    kind = "style_not_found"


@router.get("/info", response_model=ServerInfo, summary="Server version and loaded model")
async def info(request: Request) -> ServerInfo:
    slot = server_state(request).slot
    return ServerInfo(version=__version__, model=slot.info.name if slot.info else None)


@router.get("/queue", response_model=QueueView, summary="The running job and the jobs waiting, in order")
async def queue(request: Request) -> QueueView:
    jobs = server_state(request).queue
    current = jobs.current
    return QueueView(running=_view(current, 0) if current else None,
                     waiting=[_view(job, i) for i, job in enumerate(jobs.waiting(), start=1)],
                     max_waiting=jobs.max_waiting)


@router.get("/jobs/{job_id}", response_model=JobView, summary="One job's state and progress")
async def job(job_id: str, request: Request) -> JobView:
    jobs = server_state(request).queue
    found = jobs.get(job_id)
    if found is None:
        raise JobNotFound(f"job_id: no job {job_id[:80]!r} (finished jobs are kept for a while only)", field="job_id")
    return _view(found, jobs.position(found))


@router.post("/jobs/{job_id}/cancel", response_model=CancelResult,
             summary="Cancel a waiting job, or interrupt it if it is running")
async def cancel(job_id: str, request: Request) -> CancelResult:
    return CancelResult(cancelled=server_state(request).queue.cancel(job_id))
