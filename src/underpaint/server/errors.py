"""Every failure leaves the server as JSON: ``{"error": kind, "field": ..., "detail": message}``.

A1111 answered bad input with 500s and HTML tracebacks; here a caller's mistake is a 4xx that
names the field, and only a fault of the server itself is a 5xx.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UnderpaintError

log = logging.getLogger("underpaint.server")

_HTTP_KINDS = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    409: "conflict", 413: "body_too_large", 415: "unsupported_media_type", 422: "invalid_parameter",
    429: "too_many_requests", 503: "queue_full",
}


class ServerError(UnderpaintError):
    """A request the server cannot take now (queue full, no model) or that failed while running."""

    http_status = 500
    kind = "internal_error"

    def __init__(self, message: str, *, status: int | None = None, kind: str | None = None,
                 field: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message, field=field)
        if status is not None:
            self.http_status = status
        if kind is not None:
            self.kind = kind
        self.headers = dict(headers or {})


def error_body(kind: str, detail: str, field: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"error": kind, "field": field, "detail": detail}
    body.update(extra)
    return body


def error_response(status: int, kind: str, detail: str, field: str | None = None,
                   headers: Mapping[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse(error_body(kind, detail, field, **extra), status_code=status, headers=dict(headers or {}))


def field_from_loc(loc: Sequence[Any]) -> str | None:
    """``("body", "init_images", 0)`` → ``"init_images[0]"``: the name a client knows the field by."""
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    name = ""
    for part in parts:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += ("." if name else "") + str(part)
    return name or None


def from_validation_error(exc: RequestValidationError) -> JSONResponse:
    """Schema errors stay 422 (what A1111 clients expect), with the first bad field named."""
    errors = [{"field": field_from_loc(e.get("loc", ())), "message": str(e.get("msg", "")), "type": e.get("type")}
              for e in exc.errors()]
    first = errors[0] if errors else {"field": None, "message": "invalid request"}
    detail = f"{first['field']}: {first['message']}" if first["field"] else first["message"]
    return error_response(422, "invalid_parameter", detail, first["field"], errors=errors)


def without_paths(request: Request, text: str) -> str:
    """``text`` with the server's models folder left out of the paths in it: answers say where a file goes
    relative to the models folder, never where that folder is on the server's disk."""
    import os
    from pathlib import Path

    state = getattr(request.app.state, "underpaint", None)
    catalog = getattr(state, "catalog", None)
    root = getattr(getattr(catalog, "folder", None), "root", None)
    if root is None:
        return text
    for form in dict.fromkeys((str(Path(root).resolve()), str(Path(root).absolute()), str(root))):
        text = text.replace(form + os.sep, "").replace(form, "the models folder")
    return text


def install_handlers(app: FastAPI) -> None:
    """Route every exception type to a JSON body; unexpected ones are logged with their traceback."""

    @app.exception_handler(UnderpaintError)
    async def _underpaint(request: Request, exc: UnderpaintError) -> JSONResponse:
        status = exc.http_status if 400 <= exc.http_status <= 599 else 400
        return error_response(status, exc.kind, without_paths(request, exc.message), exc.field,
                              getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = _HTTP_KINDS.get(exc.status_code, "http_error")
        return error_response(exc.status_code, kind, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal_error", without_paths(request, f"{type(exc).__name__}: {exc}"))
