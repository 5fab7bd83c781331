"""Saving with infotext (where A1111 puts it), atomic no-clobber publishing, reading back."""

from __future__ import annotations

import io
import os
import struct
import threading
import zlib

import numpy as np
import piexif
import piexif.helper
import pytest
from PIL import Image, PngImagePlugin

from underpaint.errors import ImageError, InvalidParameter, OutputExists
from underpaint.imageio import metadata
from underpaint.imageio.infotext import format_infotext, parse_infotext
from underpaint.imageio.metadata import ImageMetadata, numbered_paths, read_metadata, save_image

INFOTEXT = format_infotext(
    "a lighthouse, storm, dramatic",
    "blurry",
    {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7, "Seed": 1, "Size": "64x48", "Denoising strength": 0.6},
)
UNICODE_INFOTEXT = "猫の絵, ✨ cinematic\nNegative prompt: ぼやけた\nSteps: 20, Seed: 1, CFG scale: 7"


def picture(mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 64, channels), dtype=np.uint8))


def png_chunk_types(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, first bytes) of every chunk, read independently of the code under test."""
    chunks, pos = [], 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunks.append((kind, data[pos + 8 : pos + 8 + min(length, 11)]))
        pos += 12 + length
    return chunks


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --------------------------------------------------------------------------- writing formats


def test_png_gets_a_latin1_text_chunk(tmp_path):
    path = save_image(picture(), tmp_path / "out.png", infotext=INFOTEXT)
    data = path.read_bytes()
    assert (b"tEXt", b"parameters\0") in png_chunk_types(data)
    with Image.open(path) as image:  # Pillow as an independent reader
        assert image.text["parameters"] == INFOTEXT
        assert np.array_equal(np.asarray(image), np.asarray(picture()))
    assert read_metadata(path).infotext == INFOTEXT


def test_png_with_non_latin1_text_gets_itxt(tmp_path):
    path = save_image(picture(), tmp_path / "out.png", infotext=UNICODE_INFOTEXT)
    assert (b"iTXt", b"parameters\0") in png_chunk_types(path.read_bytes())
    with Image.open(path) as image:
        assert image.text["parameters"] == UNICODE_INFOTEXT
    assert read_metadata(path).infotext == UNICODE_INFOTEXT
    assert parse_infotext(read_metadata(path).infotext).negative_prompt == "ぼやけた"


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".webp", ".JPG"])
@pytest.mark.parametrize("text", [INFOTEXT, UNICODE_INFOTEXT])
def test_jpeg_and_webp_get_a_unicode_user_comment(tmp_path, suffix, text):
    path = save_image(picture("RGBA"), tmp_path / f"out{suffix}", infotext=text)
    with Image.open(path) as image:
        assert image.format == ("WEBP" if suffix == ".webp" else "JPEG")
        assert image.mode == "RGB"
        exif = piexif.load(image.info["exif"])
    raw = exif["Exif"][piexif.ExifIFD.UserComment]
    assert raw.startswith(b"UNICODE\0")
    assert raw == piexif.helper.UserComment.dump(text, encoding="unicode")
    assert piexif.helper.UserComment.load(raw) == text
    assert read_metadata(path).infotext == text


def test_no_infotext_means_no_metadata(tmp_path):
    for name in ("a.png", "a.jpg", "a.webp"):
        path = save_image(picture(), tmp_path / name)
        assert read_metadata(path) == ImageMetadata()


def test_unsupported_extension(tmp_path):
    with pytest.raises(InvalidParameter, match=r"out\.gif.*\.png, \.jpg, \.jpeg or \.webp"):
        save_image(picture(), tmp_path / "out.gif")
    assert leftovers(tmp_path) == []


def test_jpeg_infotext_too_long_for_exif_is_refused(tmp_path):
    with pytest.raises(InvalidParameter, match="JPEG"):
        save_image(picture(), tmp_path / "long.jpg", infotext="x" * 40_000)
    assert leftovers(tmp_path) == []
    save_image(picture(), tmp_path / "long.webp", infotext="x" * 40_000)  # WebP has no such limit
    assert read_metadata(tmp_path / "long.webp").infotext == "x" * 40_000


def test_parent_directories_are_created(tmp_path):
    path = save_image(picture(), tmp_path / "a" / "b" / "out.png", infotext="x")
    assert path.is_file()


# --------------------------------------------------------------------------- overwrite and atomicity


def test_existing_file_is_kept_without_overwrite(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"precious")
    with pytest.raises(OutputExists, match=r"out\.png: already exists") as info:
        save_image(picture(), target, infotext="new")
    assert info.value.field == "output"
    assert target.read_bytes() == b"precious"
    assert leftovers(tmp_path) == ["out.png"]


def test_overwrite_replaces(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    save_image(picture(), target, infotext="new", overwrite=True)
    assert read_metadata(target).infotext == "new"
    assert leftovers(tmp_path) == ["out.png"]


def test_failure_while_encoding_leaves_nothing(tmp_path, monkeypatch):
    def broken_save(image, fp, filename, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n partial")
        raise OSError("encoder exploded")

    monkeypatch.setitem(Image.SAVE, "PNG", broken_save)
    with pytest.raises(ImageError, match="encoder exploded"):
        save_image(picture(), tmp_path / "out.png", infotext="x")
    assert leftovers(tmp_path) == []


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(metadata.os, "fsync", failing_fsync)
    with pytest.raises(InvalidParameter, match="No space left"):
        save_image(picture(), tmp_path / "out.png", infotext="x")
    assert leftovers(tmp_path) == []
    (tmp_path / "keep.png").write_bytes(b"old")
    with pytest.raises(InvalidParameter):
        save_image(picture(), tmp_path / "keep.png", infotext="x", overwrite=True)
    assert leftovers(tmp_path) == ["keep.png"] and (tmp_path / "keep.png").read_bytes() == b"old"


def test_file_appearing_during_the_write_is_not_replaced(tmp_path, monkeypatch):
    """Another process creates the target after our existence check: linking must fail."""
    target = tmp_path / "out.png"
    real_link = os.link

    def racing_link(src, dst):
        with open(dst, "xb") as other:
            other.write(b"the other writer")
        return real_link(src, dst)

    monkeypatch.setattr(metadata.os, "link", racing_link)
    with pytest.raises(OutputExists):
        save_image(picture(), target, infotext="mine")
    assert target.read_bytes() == b"the other writer"
    assert leftovers(tmp_path) == ["out.png"]


def test_without_hard_links_an_exclusive_create_is_used(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(metadata.os, "link", no_links)
    target = save_image(picture(), tmp_path / "out.png", infotext="fallback")
    assert read_metadata(target).infotext == "fallback"
    assert leftovers(tmp_path) == ["out.png"]

    def racing_no_links(src, dst):
        with open(dst, "xb") as other:
            other.write(b"other")
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(metadata.os, "link", racing_no_links)
    with pytest.raises(OutputExists):
        save_image(picture(), tmp_path / "second.png", infotext="x")
    assert (tmp_path / "second.png").read_bytes() == b"other"
    assert leftovers(tmp_path) == ["out.png", "second.png"]


def test_concurrent_writers_exactly_one_wins(tmp_path):
    target = tmp_path / "out.png"
    barrier = threading.Barrier(8)
    outcomes: list[str] = []
    lock = threading.Lock()

    def writer(index: int) -> None:
        image = picture(seed=index)
        barrier.wait()
        try:
            save_image(image, target, infotext=f"writer {index}")
            result = f"won {index}"
        except OutputExists:
            result = "lost"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [o for o in outcomes if o.startswith("won")]
    assert len(winners) == 1 and outcomes.count("lost") == 7
    winner = int(winners[0].split()[1])
    assert read_metadata(target).infotext == f"writer {winner}"
    with Image.open(target) as image:
        assert np.array_equal(np.asarray(image), np.asarray(picture(seed=winner)))
    assert leftovers(tmp_path) == ["out.png"]


# --------------------------------------------------------------------------- reading


def test_read_comfyui_png_chunks_and_others(tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", '{"3": {"class_type": "KSampler"}}')
    info.add_text("workflow", '{"nodes": []}', zip=True)  # zTXt
    info.add_itxt("Comment", "ünïcode comment", zip=True)  # compressed iTXt
    path = tmp_path / "comfy.png"
    picture().save(path, pnginfo=info)
    found = read_metadata(path)
    assert found.infotext is None
    assert found.comfy_prompt == '{"3": {"class_type": "KSampler"}}'
    assert found.comfy_workflow == '{"nodes": []}'
    assert found.other == {"Comment": "ünïcode comment"}


def test_text_chunk_after_the_pixel_data_is_read():
    data = io.BytesIO()
    picture().save(data, format="PNG")
    raw = data.getvalue()
    body = b"parameters\0late text"
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    iend = raw.rindex(b"IEND") - 4
    assert read_metadata(raw[:iend] + chunk + raw[iend:]).infotext == "late text"


def test_reading_never_decodes_pixels():
    # A header claiming 50000x50000 pixels (Pillow refuses to open it) still gives its text.
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    data = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 50000, 50000, 8, 2, 0, 0, 0))
        + chunk(b"tEXt", b"parameters\0huge")
        + chunk(b"IDAT", zlib.compress(b"\0" * 8))
        + chunk(b"IEND", b"")
    )
    assert read_metadata(data).infotext == "huge"
    with pytest.raises(ImageError, match="truncated"):
        read_metadata(data[: data.index(b"huge") + 2])


def test_comfyui_webp_exif_tags(tmp_path):
    exif = Image.Exif()
    exif[0x0110] = 'prompt:{"1": {}}'
    exif[0x010F] = 'workflow:{"links": []}'
    path = tmp_path / "comfy.webp"
    picture().save(path, exif=exif.tobytes())
    found = read_metadata(path)
    assert found.comfy_prompt == '{"1": {}}'
    assert found.comfy_workflow == '{"links": []}'


def test_read_errors(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        read_metadata(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="directory"):
        read_metadata(tmp_path)
    with pytest.raises(ImageError, match="not a recognised image"):
        read_metadata(b"plain text")


def test_read_from_bytes():
    buffer = io.BytesIO()
    picture().save(buffer, format="PNG", pnginfo=metadata.png_info("from bytes"))
    assert read_metadata(buffer.getvalue()).infotext == "from bytes"


# --------------------------------------------------------------------------- naming


def test_numbered_paths_for_a_file_target(tmp_path):
    assert numbered_paths(tmp_path / "out.png", 1) == [tmp_path / "out.png"]
    assert numbered_paths(tmp_path / "out.webp", 3) == [tmp_path / f"out-{i}.webp" for i in (1, 2, 3)]
    with pytest.raises(InvalidParameter):
        numbered_paths(tmp_path / "out.tga", 1)
    with pytest.raises(InvalidParameter):
        numbered_paths(tmp_path / "out.png", 0)


def test_numbered_paths_in_a_directory_continue_the_sequence(tmp_path):
    for name in ("00003-111.png", "00010-222.png", "notes.txt", "grid-0042.png", "7.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert numbered_paths(tmp_path, 2, seeds=[5, 6]) == [tmp_path / "00011-5.png", tmp_path / "00012-6.png"]
    with pytest.raises(InvalidParameter, match="seeds"):
        numbered_paths(tmp_path, 2, seeds=[5])


def test_numbered_paths_for_a_new_directory_with_trailing_slash(tmp_path):
    target = f"{tmp_path}/fresh/"
    assert numbered_paths(target, 1, seeds=[42]) == [tmp_path / "fresh" / "00000-42.png"]
    fresh = tmp_path / "fresh"
    assert numbered_paths(target, 2, extension=".jpg") == [fresh / "00000.jpg", fresh / "00001.jpg"]


def test_a_user_comment_that_is_not_text_is_no_infotext(tmp_path):
    """An EXIF UserComment stored as a number (odd writers) reads as no infotext, not as an error."""
    picture = Image.new("RGB", (16, 16))
    exif = picture.getexif()
    exif[0x8769] = {0x9286: 12345}
    path = tmp_path / "odd.jpg"
    picture.save(path, format="JPEG", exif=exif)
    assert read_metadata(path).infotext in (None, "")
