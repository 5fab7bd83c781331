"""Opening untrusted picture files with Pillow: a short list of formats, bombs as our error.

Only the formats people feed to img2img are tried, which keeps Pillow's rarer decoders (and
EPS, which runs Ghostscript) away from uploaded data. ``Image.open`` reads the header only;
Pillow's own decompression-bomb check runs there, and its warning is turned into an
:class:`ImageError` like its error. (On Python < 3.14 ``warnings.catch_warnings`` is not
thread-safe; a race can at worst leave the "error" filter for that one warning in place, and
the caller's own pixel limit, lower than Pillow's by default, rejects such files anyway.)
"""

from __future__ import annotations

import warnings
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from ..errors import ImageError

#: Pillow formats accepted as input (JPEG also covers MPO, the multi-picture JPEG of phones).
INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "AVIF")
#: File extensions of those formats, for folder listings.
INPUT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif")


def available_formats() -> tuple[str, ...]:
    """The accepted formats this Pillow build can read (AVIF needs libavif)."""
    readable = set(Image.registered_extensions().values())
    return tuple(fmt for fmt in INPUT_FORMATS if fmt in readable)


def open_header(stream: BinaryIO, label: str, field: str) -> Image.Image:
    """``Image.open`` restricted to :data:`INPUT_FORMATS`, with every failure as ImageError."""
    expected = "a PNG, JPEG, WebP, BMP, GIF, TIFF or AVIF image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(stream, formats=available_formats())
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(
            f"{label}: refused as a possible decompression bomb ({exc}), expected a smaller image",
            field=field,
        ) from exc
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not a recognised image, expected {expected}", field=field) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{label}: unreadable image header ({exc}), expected {expected}", field=field) from exc
