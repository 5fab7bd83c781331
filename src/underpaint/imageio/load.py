"""Reading input pictures safely: files, bytes and base64 from HTTP clients.

Every failure is an :class:`ImageError` that names the file (or request field) and what was
expected. The pixel count is checked from the header before anything is decoded, so a small
file that claims to be 100,000 x 100,000 pixels costs nothing. Pictures come back upright
(EXIF orientation applied, as A1111 does for phone photos) and as RGB, or RGBA when they
really have transparency, since an alpha channel can serve as the inpainting mask.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import ImageError
from .metadata import png_info
from .pil_open import INPUT_EXTENSIONS, open_header

#: Largest picture accepted by default: 8192 x 8192 (below Pillow's own bomb limit).
DEFAULT_MAX_PIXELS = 8192 * 8192
#: Largest decoded base64 payload accepted by default.
DEFAULT_MAX_BYTES = 64 * 1024 * 1024

_DATA_URL = re.compile(r"data:image/[\w.+-]+;base64,", re.IGNORECASE)
# What Pillow raises for damaged pixel data or a malformed EXIF block.
_DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, struct.error,
    Image.DecompressionBombError,
)


def load_image(
    source: str | Path | bytes, *, field: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode a picture from a path or bytes: upright, RGB or (with transparency) RGBA."""
    label = field if isinstance(source, (bytes, bytearray)) else f"{field}: {source}"
    with _open_stream(source, label, field) as stream:
        with open_header(stream, label, field) as image:
            _check_pixels(image.size, label, field, max_pixels)
            try:
                image.load()
                upright = ImageOps.exif_transpose(image)
            except _DECODE_ERRORS as exc:
                raise ImageError(f"{label}: damaged or truncated image data ({exc})", field=field) from exc
            return _normalise_mode(upright)


def _open_stream(source: str | Path | bytes, label: str, field: str) -> io.BufferedIOBase:
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageError(f"{label}: no data (0 bytes), expected an image", field=field)
        return io.BytesIO(bytes(source))
    path = Path(source)
    try:
        if path.is_dir():
            raise ImageError(f"{label}: is a directory, expected an image file", field=field)
        if path.stat().st_size == 0:
            raise ImageError(f"{label}: file is empty (0 bytes), expected an image", field=field)
        return open(path, "rb")
    except FileNotFoundError:
        raise ImageError(f"{label}: file not found", field=field) from None
    except PermissionError:
        raise ImageError(f"{label}: permission denied", field=field) from None
    except OSError as exc:
        raise ImageError(f"{label}: cannot open ({exc.strerror or exc})", field=field) from exc


def _check_pixels(size: tuple[int, int], label: str, field: str, max_pixels: int) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageError(f"{label}: image is {width}x{height}, expected at least 1x1 pixels", field=field)
    if width * height > max_pixels:
        raise ImageError(
            f"{label}: image is {width}x{height} ({width * height} pixels), "
            f"expected at most {max_pixels} pixels",
            field=field,
        )


def _normalise_mode(image: Image.Image) -> Image.Image:
    """RGB, or RGBA if some pixel is not fully opaque; 16-bit and float greys scaled to 8 bits."""
    if image.mode.startswith("I;16") or image.mode == "I":
        image = _grey_to_8bit(np.asarray(image), 65535)
    elif image.mode == "F":
        image = _grey_to_8bit(np.asarray(image), 255)
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        alpha_low, _ = rgba.getchannel("A").getextrema()
        if alpha_low < 255:
            return rgba
        return rgba.convert("RGB")
    return image.convert("RGB")


def _grey_to_8bit(values: np.ndarray, full_scale: int) -> Image.Image:
    """Map a wide greyscale range onto 0..255 (Pillow's own conversion clips instead)."""
    scaled = np.clip(values.astype(np.float64), 0, full_scale) * (255.0 / full_scale)
    return Image.fromarray(np.rint(scaled).astype(np.uint8))


def decode_base64_image(
    data: str,
    *,
    field: str = "image",
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """A picture from base64 text as A1111 clients send it, ``data:image/...;base64,`` optional."""
    if not isinstance(data, str):
        raise ImageError(f"{field}: got {type(data).__name__}, expected base64 text", field=field)
    text = data.strip()
    prefix = _DATA_URL.match(text)
    if prefix:
        text = text[prefix.end():]
    text = "".join(text.split())
    if len(text) // 4 * 3 > max_bytes:
        raise ImageError(
            f"{field}: about {len(text) // 4 * 3} bytes of image data, expected at most {max_bytes}", field=field
        )
    if not text:
        raise ImageError(f"{field}: empty, expected a base64-encoded image", field=field)
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"{field}: not valid base64 ({exc}), expected a base64-encoded image", field=field) from exc
    return load_image(raw, field=field, max_pixels=max_pixels)


def encode_png_base64(image: Image.Image, infotext: str | None = None, extra: dict[str, str] | None = None) -> str:
    """PNG bytes as base64 text without a prefix, as A1111's API returns images; ``extra``: more
    text chunks after the infotext (:func:`~.metadata.png_info`)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(infotext, extra))
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def list_images(directory: str | Path) -> list[Path]:
    """The picture files directly inside ``directory``, sorted by name."""
    folder = Path(directory)
    if not folder.is_dir():
        raise ImageError(f"{folder}: not a directory, expected a folder of images", field="input_dir")
    return sorted(
        entry for entry in folder.iterdir()
        if entry.suffix.lower() in INPUT_EXTENSIONS and entry.is_file()
    )
