"""Fetching an image URL for a request, only when the server allows it, and never a private address.

A1111 fetched any URL a request named, which let a caller make the server read from its own
network (SSRF). Here URLs are off by default; when allowed, the host's addresses must all be
public, the connection goes to the address that was checked (no second DNS answer), redirects
are not followed, the size is capped and the whole fetch has a deadline (a server that sends a
byte every few seconds would otherwise hold a request thread for as long as it liked, as the
socket timeout only bounds each read).
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import threading
from urllib.parse import urlsplit

from ..errors import ImageError


def _public_addresses(host: str, port: int, field: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ImageError(f"{field}: cannot resolve {host!r} ({exc})", field=field) from exc
    addresses = [info[4][0] for info in infos]
    for address in addresses:
        if not ipaddress.ip_address(address.split("%")[0]).is_global:
            raise ImageError(f"{field}: {host!r} is a private or local address; only public image URLs are fetched",
                             field=field)
    return addresses


def _pinned(conn: http.client.HTTPConnection, address: str) -> http.client.HTTPConnection:
    """Make ``conn`` connect to ``address`` while still sending the URL's host name (Host, SNI)."""

    def create_connection(addr, timeout=None, source_address=None):
        return socket.create_connection((address, addr[1]), timeout, source_address)

    conn._create_connection = create_connection  # type: ignore[attr-defined]
    return conn


#: Seconds a whole fetch may take, from connecting to the last byte.
FETCH_DEADLINE = 30.0


def fetch_image_bytes(url: str, *, field: str, max_bytes: int, timeout: float = 15.0,
                      deadline: float = FETCH_DEADLINE) -> bytes:
    """GET ``url`` and return at most ``max_bytes`` of body; anything unexpected is an ImageError.

    ``timeout`` bounds each network operation, ``deadline`` the whole fetch: when it passes the
    connection is shut down, which ends any read in progress.
    """
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # a malformed IPv6 literal or port
        parts, port = None, 0
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ImageError(f"{field}: expected an http(s) URL, got {url[:80]!r}", field=field)
    address = _public_addresses(parts.hostname, port, field)[0]
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = _pinned(cls(parts.hostname, port, timeout=timeout), address)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    expired = threading.Event()

    def cut_off() -> None:
        expired.set()
        sock = conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(deadline, cut_off)
    timer.daemon = True
    timer.start()
    try:
        conn.connect()
        if expired.is_set():  # connecting took it all (cut_off had no socket to shut down yet)
            raise TimeoutError()
        conn.request("GET", path, headers={"User-Agent": "underpaint", "Accept": "image/*"})
        response = conn.getresponse()
        if response.status != 200:
            raise ImageError(f"{field}: {url[:80]} answered HTTP {response.status} (redirects are not followed)",
                             field=field)
        body = response.read(max_bytes + 1)
    except (OSError, http.client.HTTPException) as exc:
        if expired.is_set():
            raise ImageError(f"{field}: {url[:80]} did not arrive within {deadline:g} s", field=field) from None
        raise ImageError(f"{field}: cannot fetch {url[:80]} ({exc})", field=field) from exc
    finally:
        timer.cancel()
        conn.close()
    if expired.is_set():  # the shutdown ended the read early: what came is not the whole picture
        raise ImageError(f"{field}: {url[:80]} did not arrive within {deadline:g} s", field=field)
    if len(body) > max_bytes:
        raise ImageError(f"{field}: the image at {url[:80]} is larger than {max_bytes} bytes", field=field)
    return body
