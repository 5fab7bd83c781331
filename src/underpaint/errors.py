"""Typed errors. Each one carries a single-line message that names the offending value.

The edges translate them: the CLI prints ``error: <message>`` and exits with status 2,
the HTTP server answers 4xx with ``{"error": <kind>, "field": ..., "detail": <message>}``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UnderpaintError(Exception):
    """Base class: an error the user can fix, with a one-line message."""

    #: HTTP status used by the server for this kind of error.
    http_status = 400
    #: Short machine-readable kind, used in JSON error bodies.
    kind = "error"

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field

    @property
    def message(self) -> str:
        return str(self.args[0])


class InvalidParameter(UnderpaintError):
    """A request field has a value outside what is accepted."""

    http_status = 422
    kind = "invalid_parameter"

    def __init__(self, field: str, value: object, expected: str):
        super().__init__(f"{field}: got {value!r}, expected {expected}", field=field)
        self.value = value
        self.expected = expected


class UnknownName(InvalidParameter):
    """A name (sampler, schedule, model, ...) that is not in a known list; suggests the nearest."""

    def __init__(self, field: str, value: str, choices: Iterable[str], hint: str = ""):
        choices = list(choices)
        close = nearest_names(str(value), choices)
        if close:
            expected = "one of the known names; did you mean " + " or ".join(repr(c) for c in close) + "?"
        elif len(choices) <= 30:
            expected = "one of " + ", ".join(repr(c) for c in choices) if choices else "a known name (none are available)"
        else:
            expected = f"one of {len(choices)} known names"
        super().__init__(field, value, f"{expected} ({hint})" if hint else expected)
        self.choices = choices


def nearest_names(value: str, choices: list[str], n: int = 3) -> list[str]:
    """Up to ``n`` of ``choices`` that ``value`` most likely meant, compared without regard to case
    ("expo" → "Exponential", "karas" → "Karras"); choices that start with it come first."""
    lowered = {}
    for choice in choices:
        lowered.setdefault(str(choice).lower(), choice)
    wanted = value.strip().lower()
    starts = [c for low, c in lowered.items() if len(wanted) >= 3 and low.startswith(wanted)]
    similar = [lowered[low] for low in difflib.get_close_matches(wanted, list(lowered), n=n, cutoff=0.5)]
    return list(dict.fromkeys(starts + similar))[:n]


class ImageError(UnderpaintError):
    """An input image (or mask) that is missing, unreadable, too large or the wrong shape."""

    http_status = 422
    kind = "invalid_image"


class ModelError(UnderpaintError):
    """A checkpoint or other model file that is missing, corrupt, unsafe or of an unknown kind."""

    http_status = 422
    kind = "model_error"


class ModelNotFound(ModelError):
    http_status = 404
    kind = "model_not_found"


class UnsafeModelFile(ModelError):
    """A pickle-based file that needs arbitrary code execution to load: always refused."""

    kind = "unsafe_model_file"


class OutputExists(UnderpaintError):
    """An output path already exists and overwriting was not asked for."""

    http_status = 409
    kind = "output_exists"


class DownloadError(UnderpaintError):
    http_status = 502
    kind = "download_error"


class Interrupted(UnderpaintError):
    """A job was interrupted by the user; carries whatever was finished."""

    http_status = 200
    kind = "interrupted"


class OutOfMemory(UnderpaintError):
    """The GPU ran out of memory while generating; the message says at what size and what to try.

    The server answers 507 (Insufficient Storage) rather than 4xx: the same request can succeed
    with a lower ``--vram`` mode or on a larger GPU, and clients can tell it from other failures.
    """

    http_status = 507
    kind = "out_of_memory"
