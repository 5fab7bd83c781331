"""Images in requests: base64 decoded with limits, URLs refused unless the server allows them.

Decoding happens in the request's own thread, before the job is queued, so a slow or huge
upload never holds the engine; a pixel bomb is refused from its header, before decoding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ImageError, InvalidParameter
from .config import Limits
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


def encode_image(image: "Image", infotext: str | None = None) -> str:
    """A PNG with its infotext in the ``parameters`` chunk, base64 without a ``data:`` prefix (A1111)."""
    from ..imageio.load import encode_png_base64

    return encode_png_base64(image, infotext)
