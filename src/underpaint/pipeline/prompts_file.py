"""A1111's script "Prompts from file or textbox": one request per line of a text.

Blank lines and the spaces around a line are dropped. A line is a prompt, or, when it starts with
"--", A1111's options for that line's request, read as a shell reads words (quotes group them)::

    a lighthouse at dusk
    --prompt "a lighthouse at dawn" --negative_prompt fog --steps 30 --cfg_scale 5 --seed 42
    --prompt a harbour with many boats --sampler_name "DPM++ 2M" --width 768

A ``--prompt`` or ``--negative_prompt`` takes every word up to the next option; the others one
word each: ``seed``, ``subseed``, ``seed_resize_from_w``, ``seed_resize_from_h``, ``steps``,
``batch_size``, ``n_iter``, ``width``, ``height`` and ``sampler_index`` (an index into
/sdapi/v1/samplers) whole numbers; ``subseed_strength`` and ``cfg_scale`` numbers;
``sampler_name`` a sampler; ``restore_faces`` and ``tiling`` true or false; ``sd_model`` a
checkpoint as the API's sd_model_checkpoint names it (the server and the CLI switch to it for that
line); ``styles`` style names, comma-separated, in place of the request's. ``prompt_for_display``,
``do_not_save_samples`` and ``do_not_save_grid`` are taken and change nothing here.

A line's prompt goes at the start (or the end) of the request's prompt, joined by a space; the
request's prompt alone when the line has none; the line's alone when the request's is empty.
Likewise the negative prompt. Styles apply to the prompts so made, as A1111 styles each request.

Seeds, as A1111: "Iterate seed every line" adds batch size x batch count to the seed after each
line; with it, or with "Use same random seed for all lines", a -1 seed is drawn once for every
line; with neither each line draws its own. A line's ``--seed`` is its own and moves nothing.

The result is every line's pictures in order, each with its infotext; with "combined" (Forge's
"Make a combined image containing all outputs") a grid of them all comes first (round(√n) rows, no
labels), its infotext every picture's infotext, a line each.

Where underpaint differs: a line that starts with "--" and cannot be read (an unknown option, a
value that is not a number, an unclosed quote) or whose values a request cannot take is refused,
naming the line, before any line runs (A1111 runs such a line with the whole line as its prompt);
``outpath_samples``/``outpath_grids`` are refused (a request does not choose where files go), and
``styles`` names styles (A1111 reads its text letter by letter and applies none).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import InvalidParameter, UnknownName, UnderpaintError

if TYPE_CHECKING:
    from ..params import GenerationParams
    from .records import Progress, Result

#: The field errors name (the API renames it to its script argument).
FIELD = "prompts_text"

_INT = {"seed": "seed", "subseed": "subseed", "seed_resize_from_w": "seed_resize_from_w",
        "seed_resize_from_h": "seed_resize_from_h", "steps": "steps", "batch_size": "batch_size",
        "n_iter": "n_iter", "width": "width", "height": "height"}
_FLOAT = {"subseed_strength": "subseed_strength", "cfg_scale": "cfg_scale"}
_BOOL = {"restore_faces": "restore_faces", "tiling": "tiling"}
#: Options A1111 takes that concern its own UI and saving: read, and nothing changes.
_IGNORED = ("prompt_for_display", "do_not_save_samples", "do_not_save_grid")
_REFUSED = ("outpath_samples", "outpath_grids")
_OTHER = ("prompt", "negative_prompt", "styles", "sd_model", "sampler_name", "sampler_index")
OPTIONS = tuple(_INT) + tuple(_FLOAT) + tuple(_BOOL) + _IGNORED + _OTHER


@dataclass(frozen=True)
class Line:
    """One line's request: ``changes`` (GenerationParams fields), its prompts (None: none given),
    style names (None: the request's styles) and checkpoint name (None: the request's)."""

    number: int
    text: str
    changes: dict[str, Any] = field(default_factory=dict)
    prompt: str | None = None
    negative_prompt: str | None = None
    styles: tuple[str, ...] | None = None
    checkpoint: str | None = None

    def bad(self, value: str, expected: str) -> InvalidParameter:
        return InvalidParameter(FIELD, f"line {self.number}: {value}", expected)


@dataclass(frozen=True)
class Job:
    """One line's request, and the checkpoint its ``--sd_model`` names (None: the request's)."""

    params: "GenerationParams"
    checkpoint: Any = None
    vae: Any = None  # the request's VAE choice, always (a line names no VAE)


def lines(text: str) -> list[tuple[int, str]]:
    """The non-empty lines of ``text``, stripped, with their numbers (from 1)."""
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def parse_lines(text: str, style_book=None) -> list[Line]:
    """Every line read (see the module's text); the first line that cannot be is refused."""
    found = [parse_line(number, line, style_book) for number, line in lines(text)]
    if not found:
        raise InvalidParameter(FIELD, text, "at least one line: a prompt, or options such as --prompt \"a cat\" "
                                            "--steps 30")
    return found


def parse_line(number: int, text: str, style_book=None) -> Line:
    """One line: a prompt, or options when it starts with "--"."""
    line = Line(number, text)
    if not text.startswith("--"):
        return Line(number, text, prompt=text)
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise line.bad(text, f"options read as a shell reads words ({exc})") from None
    values: dict[str, Any] = {}
    pos = 0
    while pos < len(words):
        word = words[pos]
        if not word.startswith("--"):
            raise line.bad(word, "an option starting with \"--\" (a value with spaces needs quotes)")
        tag = word[2:]
        if tag in _REFUSED:
            raise line.bad(word, "no output folder: a request does not choose where the pictures are written")
        if tag not in OPTIONS:
            raise line.bad(word, UnknownName(FIELD, word, [f"--{name}" for name in OPTIONS]).expected)
        if pos + 1 >= len(words):
            raise line.bad(word, f"a value after {word}")
        if tag in ("prompt", "negative_prompt"):  # every word up to the next option
            end = pos + 2
            while end < len(words) and not words[end].startswith("--"):
                end += 1
            values[tag] = " ".join(words[pos + 1:end])
            pos = end
            continue
        values[tag] = _value(line, tag, words[pos + 1])
        pos += 2
    return _line(line, values, style_book)


def _value(line: Line, tag: str, text: str) -> Any:
    if tag in _INT or tag == "sampler_index":
        try:
            return int(text)
        except ValueError:
            raise line.bad(f"--{tag} {text}", "a whole number") from None
    if tag in _FLOAT:
        try:
            return float(text)
        except ValueError:
            raise line.bad(f"--{tag} {text}", "a number") from None
    if tag in _BOOL or tag in ("do_not_save_samples", "do_not_save_grid"):
        if text.lower() not in ("true", "false"):
            raise line.bad(f"--{tag} {text}", "true or false")
        return text.lower() == "true"
    return text


def _line(line: Line, values: dict[str, Any], style_book) -> Line:
    from ..sampling.names import resolve_sampler, sampler_labels

    changes = {_INT.get(k) or _FLOAT.get(k) or _BOOL[k]: v for k, v in values.items()
               if k in _INT or k in _FLOAT or k in _BOOL}
    if "sampler_index" in values:
        labels = sampler_labels()
        if not 0 <= values["sampler_index"] < len(labels):
            raise line.bad(f"--sampler_index {values['sampler_index']}",
                           f"an index into /sdapi/v1/samplers, 0 to {len(labels) - 1}")
        changes["sampler"] = labels[values["sampler_index"]]
    if "sampler_name" in values:
        try:
            resolve_sampler(values["sampler_name"])
        except UnknownName as exc:
            raise line.bad(f"--sampler_name {values['sampler_name']}", exc.expected) from None
        changes["sampler"] = values["sampler_name"]
    styles = None
    if "styles" in values:
        styles = tuple(name.strip() for name in values["styles"].split(",") if name.strip())
        if style_book is None:
            raise line.bad(f"--styles {values['styles']}", "no styles (there is no styles file)")
        try:
            style_book.find(styles, field=FIELD)
        except InvalidParameter as exc:
            raise line.bad(f"--styles {values['styles']}", exc.expected) from None
    return Line(line.number, line.text, changes, values.get("prompt"), values.get("negative_prompt"), styles,
                values.get("sd_model"))


def _joined(line: str | None, request: str, position: str) -> str:
    """A line's prompt beside the request's, as A1111 puts it."""
    if line is None:
        return request
    if not line or not request:
        return line
    return f"{line} {request}" if position == "start" else f"{request} {line}"


def plan(params: "GenerationParams", models=None) -> list[Job]:
    """Every line's request, checked before any runs; ``models`` (an X/Y/Z plot's
    :class:`~underpaint.pipeline.xyz_plot.ModelNames`) looks up a line's ``--sd_model``."""
    from ..params import random_seed

    options = params.prompts_from_file
    assert options is not None
    base = params.replace(prompts_from_file=None)
    seed = base.seed
    if (options.iterate_seed or options.same_seed) and seed == -1:
        seed = random_seed()
    jobs = []
    for line in parse_lines(options.text, options.style_book):
        prompt = _joined(line.prompt, base.prompt, options.position)
        negative = _joined(line.negative_prompt, base.negative_prompt, options.position)
        if line.styles is not None:
            prompt, negative = options.style_book.apply(line.styles, prompt, negative, field=FIELD)
        elif options.styles is not None:
            prompt, negative = options.styles(prompt, negative)
        if options.add_to_prompt is not None:
            prompt = options.add_to_prompt(prompt)
        try:
            job = base.replace(**{"seed": seed, "prompt": prompt, "negative_prompt": negative, **line.changes})
        except UnderpaintError as exc:
            expected = getattr(exc, "expected", None) or exc.message
            raise line.bad(line.text, f"values a request takes ({getattr(exc, 'field', '')}: {expected})") from None
        checkpoint = None
        if line.checkpoint is not None:
            if models is None:
                raise line.bad(f"--sd_model {line.checkpoint}",
                               "no --sd_model here: lines that switch checkpoints run on the server (underpaint "
                               "serve, the API) and the CLI; Engine.generate holds one model")
            checkpoint = models.checkpoint(line.checkpoint, FIELD)
        jobs.append(Job(job, checkpoint))
        if options.iterate_seed:
            seed = (seed + base.batch_size * base.n_iter) % 2**64
    return jobs


def switches_models(options) -> bool:
    """Whether a line names a checkpoint (``--sd_model``)."""
    return any(line.checkpoint is not None for line in parse_lines(options.text, options.style_book))


def run(generate: Callable[[Job, Callable], "Result"], params: "GenerationParams", *, info,
        progress: Callable[["Progress"], None] | None = None, cancel=None, models=None) -> "Result":
    """The request ``params``: ``generate(job, report)`` runs one line's request on its checkpoint."""
    from .records import Progress, Result
    from .xyz_plot import batch_grid

    options = params.prompts_from_file
    assert options is not None
    jobs = plan(params, models)
    total = sum(job.params.n_iter for job in jobs)
    results: list[Result] = []
    first_job = 0
    for job in jobs:
        if cancel is not None and cancel.interrupted:
            break
        results.append(generate(job, Progress.relay(progress, first_job, total)))
        first_job += job.params.n_iter
    interrupted = bool(cancel is not None and cancel.interrupted)
    images, infotexts, seeds, subseeds, prompts, negatives, unfinished = [], [], [], [], [], [], []
    for result in results:
        count = len(result.images)
        unfinished += [len(images) + i for i in result.unfinished]
        images += result.images
        infotexts += result.infotexts[:count]
        seeds += result.seeds[:count]
        subseeds += result.subseeds[:count]
        prompts += result.prompts[:count] if result.prompts else [result.params.prompt] * count
        negatives += (result.negative_prompts[:count] if result.negative_prompts
                      else [result.params.negative_prompt] * count)
    model = results[0].model if results else info
    if options.combined and images:
        grid = batch_grid(images)
        unfinished = ([0] if unfinished else []) + [i + 1 for i in unfinished]
        images, infotexts = [grid] + images, ["\n".join(infotexts)] + infotexts
        seeds, subseeds = seeds[:1] + seeds, subseeds[:1] + subseeds
        prompts, negatives = [options.text] + prompts, negatives[:1] + negatives
    return Result(tuple(images), tuple(infotexts), tuple(seeds), tuple(subseeds), params, model,
                  interrupted=interrupted, prompts=tuple(prompts), negative_prompts=tuple(negatives),
                  unfinished=tuple(unfinished))
