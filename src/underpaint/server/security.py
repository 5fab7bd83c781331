"""ASGI guards in front of every route: Host check, HTTP Basic, origin check, body size limit;
and the route class that bounds how many values a JSON body may hold.

The guards are plain ASGI wrappers, so they cover every route the app has (the API, /docs,
/openapi.json, static files, 404s) rather than only those that remember a dependency.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Callable, Coroutine, Iterable
from typing import Any
from urllib.parse import urlsplit

from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import Credential, is_loopback_host
from .errors import error_response

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


def _host_port(netloc: str, scheme: str) -> tuple[str, str]:
    """Split ``host[:port]`` (IPv6 in brackets) and fill in the scheme's default port."""
    try:  # a malformed IPv6 literal ("[::1") is a ValueError: no host, never ours
        parts = urlsplit(f"//{netloc}")
        port = parts.port
    except ValueError:
        return "", ""
    host = (parts.hostname or "").lower()
    return host, str(port) if port is not None else _DEFAULT_PORTS.get(scheme, "")


class HostGuard:
    """Refuse requests whose Host header is not ours (DNS rebinding: a web page that resolves its
    own name to 127.0.0.1 would otherwise reach a loopback-only server as "same origin")."""

    def __init__(self, app: ASGIApp, *, allowed: Iterable[str], loopback_only: bool):
        self.app = app
        self.allowed = {h.lower() for h in allowed}
        self.loopback_only = loopback_only

    def accepts(self, host_header: str | None) -> bool:
        if host_header is None or "*" in self.allowed:
            return True
        host, _ = _host_port(host_header, "http")
        if host in self.allowed or host_header.lower() in self.allowed:
            return True
        if self.allowed:
            return False
        return not self.loopback_only or is_loopback_host(host)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not self.accepts(Headers(scope=scope).get("host")):
            response = error_response(403, "forbidden_host", "this server does not answer to that Host name; "
                                      "start it with --allowed-hosts to add one")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BasicAuth:
    """HTTP Basic on every request when credentials are configured; passwords compared in constant time."""

    def __init__(self, app: ASGIApp, *, credentials: Iterable[Credential], realm: str = "underpaint"):
        self.app = app
        self.credentials = tuple(credentials)
        self.realm = realm

    def check(self, authorization: str | None) -> bool:
        if not authorization:
            return False
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        user, sep, password = decoded.partition(b":")
        if not sep:
            return False
        ok = False
        for cred in self.credentials:  # no early exit: the time taken does not tell which user exists
            same_user = secrets.compare_digest(user, cred.user.encode("utf-8"))
            same_password = secrets.compare_digest(password, cred.password.encode("utf-8"))
            ok |= same_user & same_password
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not self.check(Headers(scope=scope).get("authorization")):
            response = error_response(401, "unauthorized", "this server needs a user name and password (HTTP Basic)",
                                      headers={"WWW-Authenticate": f'Basic realm="{self.realm}", charset="UTF-8"'})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class OriginGuard:
    """Refuse state-changing requests sent by a web page of another origin (CSRF against a local server).

    Clients that are not browsers send neither ``Origin`` nor ``Sec-Fetch-Site`` and pass.
    """

    def __init__(self, app: ASGIApp, *, allowed_origins: Iterable[str]):
        self.app = app
        self.allowed = {o.rstrip("/").lower() for o in allowed_origins}

    def accepts(self, scope: Scope) -> bool:
        if scope["method"] in SAFE_METHODS:
            return True
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        fetch_site = headers.get("sec-fetch-site", "").lower()
        if origin is not None:
            return self._same_origin(origin, headers.get("host"), scope.get("scheme", "http")) or self._allowed(origin)
        return fetch_site in ("", "same-origin", "none")

    def _allowed(self, origin: str) -> bool:
        return "*" in self.allowed or origin.rstrip("/").lower() in self.allowed

    @staticmethod
    def _same_origin(origin: str, host_header: str | None, scheme: str) -> bool:
        if not host_header or origin == "null":
            return False
        try:
            parts = urlsplit(origin)
        except ValueError:  # a malformed IPv6 literal
            return False
        if not parts.netloc:
            return False
        # Compare host and port only: behind a TLS proxy the server sees http while the page is https.
        return _host_port(parts.netloc, parts.scheme) == _host_port(host_header, parts.scheme or scheme)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.accepts(scope):
            response = error_response(403, "cross_origin", "requests that change state are not accepted from "
                                      "another web origin; start the server with --cors-allow-origins to allow one")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class _BodyTooLarge(Exception):
    """Raised inside ``receive`` once the answer (413) has been sent."""


class BodyLimit:
    """Cap request bodies by counting the bytes as they arrive (Content-Length may lie or be absent)."""

    def __init__(self, app: ASGIApp, *, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _refusal(self):
        return error_response(413, "body_too_large", f"request body is larger than this server's limit of "
                              f"{self.max_bytes} bytes", field="body")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refusal()(scope, receive, send)
            return

        received = 0
        refused = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if not started:
                        refused = True
                        await self._refusal()(scope, receive, send)
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:  # the 413 is out; whatever the app tries to say afterwards is dropped
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception as exc:
            # Once the 413 is out, how the app reacted to the cut-off body does not matter.
            if refused or isinstance(exc, _BodyTooLarge):
                return
            raise


# --------------------------------------------------------------------------- JSON values

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def json_value_count(body: bytes, *, enough: int | None = None) -> int:
    """The commas, ``{`` and ``[`` outside the strings of a JSON text: one less than the values it
    holds, give or take one per container. ``enough``: a count up to which the exact one is not
    needed (the whole body is counted first, strings and all, which is fast; only a body above
    ``enough`` has its strings taken out, which takes a few seconds for 50 MB of tiny strings)."""
    def structural(data: bytes) -> int:
        return data.count(b",") + data.count(b"{") + data.count(b"[")

    rough = structural(body)
    if enough is not None and rough <= enough:
        return rough
    return structural(_JSON_STRING.sub(b"", body))


class JSONValueLimitRoute(APIRoute):
    """A route that refuses (413) a request body of more than ``Limits.max_json_values`` JSON
    values before it is parsed.

    The body limit bounds bytes, but not what they become: 50 MB of ``{},{},...`` parses into 17
    million objects, over a gigabyte, and took half a minute of the event loop to parse, validate
    and echo back in ``parameters``. A1111 requests hold a few hundred values; pictures and
    prompts are single strings, whatever their length, and never count against the limit.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            if request.method in SAFE_METHODS:
                return await handler(request)
            try:
                body = await request.body()
            except Exception:  # noqa: BLE001 - cut off past the body limit (its 413 is out) or the client left
                return error_response(400, "bad_request", "the request body could not be read", field="body")
            most = request.app.state.underpaint.config.limits.max_json_values
            count = json_value_count(body, enough=most) if len(body) < 1 << 20 else \
                await run_in_threadpool(json_value_count, body, enough=most)
            if count > most:
                return error_response(413, "body_too_large", f"the request body holds about {count} JSON values "
                                      f"(commas, objects and arrays); this server takes at most {most}", field="body")
            return await handler(request)

        return checked
