"""Writing pictures with their infotext, safely, and reading generation metadata back.

Where the text goes follows A1111 1.10 (``images.save_image_with_geninfo``), so its PNG Info
tab, Civitai and other readers find it: PNG gets a ``parameters`` text chunk (``tEXt``, or an
uncompressed ``iTXt`` when the text is not Latin-1 — Pillow's ``PngInfo.add_text`` choice,
which A1111 uses); JPEG and WebP get an EXIF ``UserComment`` written as piexif's "unicode"
comment (``UNICODE\\0`` + UTF-16). ComfyUI stores its graph as JSON in PNG chunks ``prompt``
and ``workflow``; those are read too.

Files are published atomically: the bytes are encoded in memory, written to a temporary file
in the target's directory and synced, then linked into place, so a reader never sees half a
picture and an existing file is never replaced unless asked.
"""

from __future__ import annotations

import errno
import io
import os
import re
import secrets
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import piexif
import piexif.helper
from PIL import Image, PngImagePlugin

from ..errors import ImageError, InvalidParameter, OutputExists
from .pil_open import open_header

#: Output formats by file extension.
OUTPUT_FORMATS: dict[str, str] = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
#: A1111's default JPEG/WebP quality (``jpeg_quality`` setting).
DEFAULT_QUALITY = 80
PARAMETERS_KEY = "parameters"
# A JPEG APP1 segment holds at most 65533 bytes; the EXIF around the comment takes ~40 of them.
_JPEG_EXIF_LIMIT = 65533
# Text chunks larger than this (after decompression) are refused: metadata, not payloads.
_MAX_TEXT_CHUNK = 64 * 1024 * 1024
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# ComfyUI's WebP/animated saves put "prompt:{json}" and "workflow:{json}" into these IFD0 tags
# (Model, Make, ImageDescription, counting down).
_COMFY_EXIF_TAGS = (0x0110, 0x010F, 0x010E, 0x010D)


@dataclass(frozen=True)
class ImageMetadata:
    """Generation metadata found in a picture file."""

    infotext: str | None = None
    comfy_prompt: str | None = None
    comfy_workflow: str | None = None
    other: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- encoding


def output_format(path: str | Path) -> str:
    """Pillow's format name for an output path's extension (``.png``, ``.jpg``/``.jpeg``, ``.webp``)."""
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise InvalidParameter("output", str(path), "a file name ending in .png, .jpg, .jpeg or .webp")
    return OUTPUT_FORMATS[suffix]


def png_info(infotext: str | None, extra: dict[str, str] | None = None) -> PngImagePlugin.PngInfo | None:
    """The ``parameters`` chunk, then any ``extra`` text chunks (A1111's ``postprocessing``): tEXt
    for Latin-1 text, uncompressed iTXt otherwise."""
    if infotext is None and not extra:
        return None
    info = PngImagePlugin.PngInfo()
    if infotext is not None:
        info.add_text(PARAMETERS_KEY, infotext)
    for key, text in (extra or {}).items():
        info.add_text(key, text)
    return info


def exif_user_comment(infotext: str) -> bytes:
    """EXIF bytes holding the infotext as a "unicode" UserComment, as A1111 writes them."""
    comment = piexif.helper.UserComment.dump(infotext, encoding="unicode")
    return piexif.dump({"Exif": {piexif.ExifIFD.UserComment: comment}})


def encode_image(
    image: Image.Image, fmt: str, *, infotext: str | None = None, quality: int = DEFAULT_QUALITY,
    extra: dict[str, str] | None = None,
) -> bytes:
    """The file's bytes in ``fmt`` (PNG, JPEG, WEBP) with the infotext where A1111 puts it;
    ``extra``: more PNG text chunks (A1111's ``postprocessing``), which other formats leave out."""
    buffer = io.BytesIO()
    if fmt == "PNG":
        image.save(buffer, format="PNG", pnginfo=png_info(infotext, extra))
        return buffer.getvalue()
    if image.mode not in ("RGB", "L"):  # JPEG has no alpha; A1111 flattens WebP the same way
        image = image.convert("RGB")
    image.save(buffer, format=fmt, quality=quality)
    if infotext is None:
        return buffer.getvalue()
    exif = exif_user_comment(infotext)
    if fmt == "JPEG" and len(exif) > _JPEG_EXIF_LIMIT:
        raise InvalidParameter(
            "infotext",
            f"{len(infotext)} characters",
            "a text short enough for JPEG's 64 KB EXIF segment (about 32,000 characters); "
            "save as .png or .webp instead",
        )
    with_exif = io.BytesIO()
    piexif.insert(exif, buffer.getvalue(), with_exif)
    return with_exif.getvalue()


# --------------------------------------------------------------------------- saving


def save_image(
    image: Image.Image,
    path: str | Path,
    *,
    infotext: str | None = None,
    overwrite: bool = False,
    quality: int = DEFAULT_QUALITY,
    extra: dict[str, str] | None = None,
) -> Path:
    """Write ``image`` to ``path`` atomically, with its infotext (and ``extra`` PNG text chunks);
    returns the path.

    Without ``overwrite`` an existing file is never replaced, even if another process creates
    it while this one is writing: :class:`OutputExists` is raised instead. Missing parent
    directories are created. On any failure no file (full or partial) is left behind.
    """
    path = Path(path)
    fmt = output_format(path)
    if not overwrite and os.path.lexists(path):
        raise output_exists(path)
    try:
        data = encode_image(image, fmt, infotext=infotext, quality=quality, extra=extra)
    except (OSError, ValueError, KeyError) as exc:
        raise ImageError(f"{path}: could not encode the picture as {fmt}: {exc}", field="output") from exc
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data, overwrite=overwrite)
    except OutputExists:
        raise
    except OSError as exc:
        raise InvalidParameter("output", str(path), f"a writable location ({exc.strerror or exc})") from exc
    return path


def write_atomic(path: Path, data: bytes, *, overwrite: bool = False) -> None:
    """Write ``data`` to a synced temporary file beside ``path``, then publish it.

    Publishing is ``os.replace`` with ``overwrite``; otherwise ``os.link``, which fails if the
    name exists — no window in which another writer's file could be replaced. Where hard links
    are not available, an exclusive create (``O_EXCL``) of the target is used instead: still
    never a replacement, but readers can see the file while it is being written.
    """
    temp = temp_beside(path)
    try:
        _write_new_file(temp, data)
        publish(temp, path, overwrite=overwrite)
    finally:
        temp.unlink(missing_ok=True)


def temp_beside(path: Path) -> Path:
    """A hidden, unused name in ``path``'s folder to write a file under before :func:`publish` names it."""
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")


def publish(temp: Path, path: Path, *, overwrite: bool = False) -> None:
    """Give the finished file ``temp`` (in ``path``'s folder) the name ``path``.

    With ``overwrite`` that is ``os.replace``; otherwise ``os.link``, which fails with
    :class:`OutputExists` if the name exists, so another writer's file is never replaced. Where hard
    links are not available (FAT, some network shares) the name is claimed by an exclusive create
    first and then replaced by ``temp``: still never another's file, though readers may see an
    empty file for a moment. The directory entry is synced.
    """
    if overwrite:
        os.replace(temp, path)
    else:
        try:
            os.link(temp, path)
        except FileExistsError:
            raise output_exists(path) from None
        except OSError:
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            except FileExistsError:
                raise output_exists(path) from None
            os.replace(temp, path)
    _sync_directory(path.parent)


def _write_new_file(path: Path, data: bytes) -> None:
    """Create ``path`` (which must not exist), write and fsync; remove it again on failure."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _sync_directory(directory: Path) -> None:
    """Make the new directory entry durable (POSIX); the file itself is already synced."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems cannot sync a directory; the data is safe anyway
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def output_exists(path: Path) -> OutputExists:
    """The error for an output name that is taken (the CLI exits non-zero, the API answers 409)."""
    return OutputExists(f"{path}: already exists; choose another name or allow overwriting", field="output")


# --------------------------------------------------------------------------- naming

_SEQUENCE_PREFIX = re.compile(r"(\d+)")


def numbered_paths(
    target: str | Path, count: int, *, seeds: Sequence[int] | None = None, extension: str = ".png"
) -> list[Path]:
    """Output paths for ``count`` pictures given one ``-o`` target.

    A file target names the only picture itself, or ``stem-1.ext``, ``stem-2.ext``, ... for
    several. A directory target (existing, or written with a trailing slash) gets A1111's
    ``00000-<seed>.png`` names (``extension`` picks another format), numbered on from the
    highest number already there (A1111's ``get_next_sequence_number``: the digits before the
    first ``-`` of every entry).
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InvalidParameter("count", count, "a positive whole number")
    if seeds is not None and len(seeds) != count:
        raise InvalidParameter("seeds", list(seeds), f"{count} seeds, one per picture")
    text = os.fspath(target)
    directory = text.endswith(("/", os.sep)) or Path(text).is_dir()
    if directory:
        output_format("x" + extension)
        return _sequence_paths(Path(text), count, seeds, extension)
    path = Path(text)
    output_format(path)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(1, count + 1)]


def _sequence_paths(
    directory: Path, count: int, seeds: Sequence[int] | None, extension: str
) -> list[Path]:
    start = next_sequence_number(directory)
    names = []
    for i in range(count):
        seed = f"-{seeds[i]}" if seeds is not None else ""
        names.append(directory / f"{start + i:05}{seed}{extension}")
    return names


def next_sequence_number(directory: Path) -> int:
    """One more than the largest leading number of the entries in ``directory`` (0 if none)."""
    highest = -1
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return 0
    except NotADirectoryError as exc:
        raise InvalidParameter("output", str(directory), "a directory") from exc
    for name in entries:
        head = os.path.splitext(name)[0].split("-")[0]
        if head.isdigit() and head.isascii():
            highest = max(highest, int(head))
    return highest + 1


# --------------------------------------------------------------------------- reading


def read_metadata(source: str | Path | bytes) -> ImageMetadata:
    """Generation metadata from a PNG, JPEG or WebP file (or its bytes), without decoding pixels.

    The infotext is the PNG ``parameters`` chunk or the EXIF UserComment; as in A1111, a
    non-empty EXIF comment wins over the chunk. ComfyUI's ``prompt``/``workflow`` JSON comes
    from PNG chunks or from ComfyUI's WebP EXIF tags. Every other text entry lands in ``other``.
    """
    label = "image data" if isinstance(source, bytes) else str(source)
    try:
        with _open_binary(source) as stream:
            head = stream.read(12)
            if head.startswith(_PNG_SIGNATURE):
                stream.seek(len(_PNG_SIGNATURE))
                texts, exif = _read_png_chunks(stream, label)
            elif head.startswith(b"\xff\xd8"):
                texts, exif = {}, head + stream.read()  # piexif finds the APP1 segment itself
            elif head[:4] == b"RIFF" and head[8:12] == b"WEBP":
                texts, exif = {}, _webp_exif(stream)
            else:
                stream.seek(0)
                texts, exif = _read_other_format(stream, label)
    except FileNotFoundError:
        raise ImageError(f"{label}: file not found", field="image") from None
    except IsADirectoryError:
        raise ImageError(f"{label}: is a directory, expected an image file", field="image") from None
    except PermissionError:
        raise ImageError(f"{label}: permission denied", field="image") from None
    return _collect(texts, exif, label)


def _open_binary(source: str | Path | bytes) -> BinaryIO:
    if isinstance(source, bytes):
        return io.BytesIO(source)
    path = Path(source)
    if path.is_dir():
        raise IsADirectoryError(str(path))
    return open(path, "rb")


def _collect(texts: dict[str, str], exif: bytes | None, label: str) -> ImageMetadata:
    texts = dict(texts)
    infotext = texts.pop(PARAMETERS_KEY, None)
    comfy_prompt = texts.pop("prompt", None)
    comfy_workflow = texts.pop("workflow", None)
    if exif:
        comment, comfy = _read_exif(exif, label)
        if comment:
            infotext = comment
        comfy_prompt = comfy_prompt or comfy.get("prompt")
        comfy_workflow = comfy_workflow or comfy.get("workflow")
    return ImageMetadata(infotext, comfy_prompt, comfy_workflow, texts)


def _read_png_chunks(stream: BinaryIO, label: str) -> tuple[dict[str, str], bytes | None]:
    """Walk the chunk list (skipping pixel data) and decode tEXt, zTXt and iTXt; keep eXIf."""
    texts: dict[str, str] = {}
    exif = None
    while True:
        header = stream.read(8)
        if len(header) < 8:
            break
        length, kind = struct.unpack(">I4s", header)
        if kind in (b"tEXt", b"zTXt", b"iTXt", b"eXIf"):
            if length > _MAX_TEXT_CHUNK:
                raise ImageError(f"{label}: {kind.decode()} chunk of {length} bytes is too large", field="image")
            data = stream.read(length)
            if len(data) < length:
                raise ImageError(f"{label}: truncated {kind.decode()} chunk", field="image")
            if kind == b"eXIf":
                exif = data
            else:
                key, value = _decode_text_chunk(kind, data, label)
                texts[key] = value
        else:
            stream.seek(length, io.SEEK_CUR)
        stream.seek(4, io.SEEK_CUR)  # CRC
        if kind == b"IEND":
            break
    return texts, exif


def _decode_text_chunk(kind: bytes, data: bytes, label: str) -> tuple[str, str]:
    """PNG spec 11.3.4: Latin-1 tEXt, zlib zTXt, UTF-8 iTXt (optionally compressed)."""
    key, _, rest = data.partition(b"\0")
    try:
        if kind == b"tEXt":
            return key.decode("latin-1"), rest.decode("latin-1")
        if kind == b"zTXt":
            return key.decode("latin-1"), _inflate(rest[1:], label).decode("latin-1")
        compressed = rest[:1] == b"\x01"
        _language, _, rest = rest[2:].partition(b"\0")
        _translated, _, text = rest.partition(b"\0")
        if compressed:
            text = _inflate(text, label)
        return key.decode("latin-1"), text.decode("utf-8")
    except (UnicodeDecodeError, zlib.error) as exc:
        raise ImageError(f"{label}: unreadable {kind.decode()} chunk: {exc}", field="image") from exc


def _inflate(data: bytes, label: str) -> bytes:
    inflater = zlib.decompressobj()
    text = inflater.decompress(data, _MAX_TEXT_CHUNK)
    if inflater.unconsumed_tail:
        raise ImageError(f"{label}: compressed text chunk expands past {_MAX_TEXT_CHUNK} bytes", field="image")
    return text


def _webp_exif(stream: BinaryIO) -> bytes | None:
    """The payload of a WebP file's ``EXIF`` chunk (RIFF: fourcc, little-endian size, even padding)."""
    while True:
        header = stream.read(8)
        if len(header) < 8:
            return None
        kind, size = struct.unpack("<4sI", header)
        if kind == b"EXIF":
            return stream.read(size)
        stream.seek(size + (size & 1), io.SEEK_CUR)


def _read_other_format(stream: BinaryIO, label: str) -> tuple[dict[str, str], bytes | None]:
    """GIF, TIFF, AVIF, ...: EXIF and text entries from Pillow's header reading only."""
    with open_header(stream, label, "image") as image:
        info = dict(image.info)
    exif = info.pop("exif", None)
    texts = {key: value for key, value in info.items() if isinstance(key, str) and isinstance(value, str)}
    comment = info.get("comment")
    if isinstance(comment, bytes):  # JPEG COM / GIF comment
        texts["comment"] = comment.decode("utf-8", errors="replace")
    return texts, exif if isinstance(exif, bytes) else None


def _read_exif(exif: bytes, label: str) -> tuple[str | None, dict[str, str]]:
    """The UserComment (A1111's decoding: piexif's, else UTF-8) and ComfyUI's IFD0 entries.

    ``exif`` is raw EXIF data or a whole JPEG/WebP file (piexif finds the segment itself).
    """
    try:
        data = piexif.load(exif)
    except (ValueError, struct.error, KeyError, IndexError) as exc:
        raise ImageError(f"{label}: unreadable EXIF data: {exc}", field="image") from exc
    raw = data.get("Exif", {}).get(piexif.ExifIFD.UserComment, b"")
    if not isinstance(raw, bytes):  # a UserComment stored as a number (or another type): no text
        raw = b""
    try:
        comment = piexif.helper.UserComment.load(raw) if raw else None
    except ValueError:
        comment = raw.decode("utf-8", errors="ignore")
    comfy: dict[str, str] = {}
    for tag in _COMFY_EXIF_TAGS:
        value = data.get("0th", {}).get(tag)
        if isinstance(value, bytes):
            name, sep, payload = value.decode("utf-8", errors="replace").partition(":")
            if sep and name in ("prompt", "workflow"):
                comfy.setdefault(name, payload)
    return comment, comfy
