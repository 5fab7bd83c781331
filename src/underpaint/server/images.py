"""Images in requests: base64 decoded with limits, URLs refused unless the server allows them.

Decoding happens in the request's own thread, before the job is queued, so a slow or huge
upload never holds the engine; a pixel bomb is refused from its header, before decoding.
"""

from __future__ import annotations

import base64
import dataclasses
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ..errors import ImageError, InvalidParameter
from .config import Limits
from .errors import ServerError
from .fetch import fetch_image_bytes

if TYPE_CHECKING:
    from PIL.Image import Image


def is_url(data: str) -> bool:
    head = data.lstrip()[:8].lower()
    return head.startswith("http://") or head.startswith("https://")


def decode_image(data: object, *, field: str, limits: Limits, allow_urls: bool = False) -> "Image":
    """A request's image field (base64, optionally with a ``data:`` prefix) as a PIL image."""
    from ..imageio.load import decode_base64_image

    if not isinstance(data, str) or not data.strip():
        raise ImageError(f"{field}: expected a base64-encoded image, got {type(data).__name__ if data else 'nothing'}",
                         field=field)
    if is_url(data):
        if not allow_urls:
            raise ImageError(f"{field}: image URLs are not accepted by this server (send the image as base64, "
                             "or start the server with --allow-image-urls)", field=field)
        return _decode_bytes(fetch_image_bytes(data.strip(), field=field, max_bytes=limits.max_body_bytes),
                             field=field, limits=limits)
    return decode_base64_image(data, field=field, max_bytes=limits.max_body_bytes, max_pixels=limits.max_image_pixels)


def _decode_bytes(raw: bytes, *, field: str, limits: Limits) -> "Image":
    import base64

    from ..imageio.load import decode_base64_image

    return decode_base64_image(base64.b64encode(raw).decode("ascii"), field=field,
                               max_bytes=limits.max_body_bytes * 2, max_pixels=limits.max_image_pixels)


class PictureBudget:
    """The pictures one request may carry (``Limits.max_input_images``), counted before each is
    decoded: every picture may decode to ``max_image_pixels``, so their number bounds the memory a
    request takes however well its PNGs compress."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.used = 0

    def take(self, field: str, count: int = 1) -> None:
        """Count ``count`` more pictures, named ``field`` in the refusal when they are too many."""
        most = self.limits.max_input_images
        if self.used + count > most:
            raise InvalidParameter(field, f"{self.used + count} pictures",
                                   f"at most {most} pictures in one request (this server's limit)")
        self.used += count

    def decode(self, data: object, *, field: str, allow_urls: bool = False) -> "Image":
        """:func:`decode_image` for one more picture of the request."""
        self.take(field)
        return decode_image(data, field=field, limits=self.limits, allow_urls=allow_urls)


def encode_image(image: "Image", infotext: str | None = None, samples_format: str = "png",
                 quality: int = 80) -> str:
    """A picture as A1111's API returns it, base64 without a ``data:`` prefix: a PNG with its infotext in
    the ``parameters`` chunk, or (``samples_format`` jpg, jpeg, webp) a JPEG or WebP of ``quality`` with
    it in an EXIF UserComment (an empty one when there is none, as A1111 writes it)."""
    from ..imageio.metadata import OUTPUT_FORMATS
    from ..imageio.metadata import encode_image as encode_file

    fmt = OUTPUT_FORMATS["." + samples_format]
    text = infotext if fmt == "PNG" else infotext or ""
    return base64.b64encode(encode_file(image, fmt, infotext=text, quality=quality)).decode("ascii")


def picture_pixels(value: object) -> int:
    """The pixels of every decoded picture in ``value``: a picture, or a request's parameters
    (dataclasses, tuples, lists and dicts are searched), counted once each."""
    from PIL.Image import Image

    seen: set[int] = set()

    def walk(item: object) -> int:
        if isinstance(item, Image):
            if id(item) in seen:
                return 0
            seen.add(id(item))
            return item.width * item.height
        if dataclasses.is_dataclass(item) and not isinstance(item, type):
            return sum(walk(getattr(item, f.name)) for f in dataclasses.fields(item))
        if isinstance(item, (tuple, list)):
            return sum(walk(x) for x in item)
        if isinstance(item, dict):
            return sum(walk(x) for x in item.values())
        return 0

    return walk(value)


class ServerBusy(ServerError):
    """The pictures of the requests already waiting or running fill the server's picture budget."""

    def __init__(self, held: int, limit: int):
        super().__init__(f"the server holds {held} of its {limit} pixels of pictures for requests waiting or "
                         "running; try again when one has finished", status=503, kind="server_busy",
                         headers={"Retry-After": "5"})


class PictureLedger:
    """The decoded pictures all waiting and running requests of a server hold, in pixels, bounded
    by ``Limits.max_held_pixels``: a request's pictures are decoded before it queues and kept until
    its answer is sent, so the queue's length alone would let a burst of requests, each within its
    own limits, hold many gigabytes (16 waiting requests of 16 pictures of 4096 x 4096 are 13 GB as
    RGB). A request that would go past the budget is answered 503 at once, like a full queue."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, pixels: int, field: str = "init_images") -> Iterator[None]:
        """Count ``pixels`` for the duration of the block. More than the whole budget is a 422
        naming ``field`` (it could never run); more than what is left, :class:`ServerBusy`."""
        if pixels > self.limit:
            raise InvalidParameter(field, f"{pixels} pixels of pictures",
                                   f"at most {self.limit} pixels of pictures in one request (this server's limit)")
        with self._lock:
            if self.held + pixels > self.limit:
                raise ServerBusy(self.held, self.limit)
            self.held += pixels
        try:
            yield
        finally:
            with self._lock:
                self.held -= pixels
