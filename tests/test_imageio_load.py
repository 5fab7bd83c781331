"""Loading pictures: limits checked before decoding, clear errors, orientation and modes."""

from __future__ import annotations

import base64
import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from underpaint.errors import ImageError
from underpaint.imageio.load import (
    decode_base64_image,
    encode_png_base64,
    list_images,
    load_image,
)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` but whose pixel data is a few bytes."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + png_chunk(b"IEND", b"")
    )


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def noise(width=32, height=24, channels=3, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


# --------------------------------------------------------------------------- errors


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ImageError, match=r"init_image: .*nope\.png: file not found") as info:
        load_image(tmp_path / "nope.png", field="init_image")
    assert info.value.field == "init_image"


def test_directory_is_refused(tmp_path):
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)


@pytest.mark.parametrize("content", [b"", b"hello, not an image", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"])
def test_non_images_are_refused(tmp_path, content):
    path = tmp_path / "x.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=r"x\.png: .*expected"):
        load_image(path)
    with pytest.raises(ImageError, match="mask"):
        load_image(content, field="mask")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_files_are_refused(fmt):
    data = encoded(Image.fromarray(noise(128, 128)), fmt)
    with pytest.raises(ImageError, match="image"):
        load_image(data[: len(data) // 2])


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    # The claimed 5000x5000 picture has no real pixel data: decoding it would report a
    # truncated file, so "too many pixels" proves nothing was decoded.
    with pytest.raises(ImageError, match=r"5000x5000 \(25000000 pixels\), expected at most 1000000"):
        load_image(png_claiming(5000, 5000), max_pixels=1_000_000)
    with pytest.raises(ImageError, match="truncated"):
        load_image(png_claiming(5000, 5000))


@pytest.mark.parametrize("side", [10_000, 20_000])  # over Pillow's warning and error limits
def test_pillow_bomb_warning_and_error_become_image_errors(side, recwarn):
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(png_claiming(side, side), max_pixels=10**12)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_default_limit_refuses_large_headers_without_pillow_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError, match="expected at most"):
            load_image(png_claiming(9000, 9000))


def test_zero_width_header_is_refused():
    with pytest.raises(ImageError):
        load_image(png_claiming(0, 16))


# --------------------------------------------------------------------------- decoding


def test_rgb_png_round_trip(tmp_path):
    pixels = noise()
    path = tmp_path / "in.png"
    Image.fromarray(pixels).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), pixels)
    assert np.array_equal(np.asarray(load_image(str(path))), pixels)
    assert np.array_equal(np.asarray(load_image(path.read_bytes())), pixels)


def test_exif_orientation_is_applied():
    pixels = np.zeros((2, 4, 3), dtype=np.uint8)
    pixels[0, 0] = (255, 0, 0)  # stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image = load_image(encoded(Image.fromarray(pixels), exif=exif.tobytes()))
    assert image.size == (2, 4)
    assert image.getpixel((1, 0)) == (255, 0, 0)  # now top-right


def test_transparency_keeps_rgba():
    pixels = noise(channels=4)
    pixels[..., 3] = 255
    pixels[0, 0, 3] = 10
    image = load_image(encoded(Image.fromarray(pixels)))
    assert image.mode == "RGBA" and np.array_equal(np.asarray(image), pixels)


def test_opaque_alpha_becomes_rgb():
    pixels = noise(channels=4)
    pixels[..., 3] = 255
    image = load_image(encoded(Image.fromarray(pixels)))
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), pixels[..., :3])


def test_palette_with_transparent_index_becomes_rgba():
    palette_image = Image.new("P", (4, 4), 1)
    palette_image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette_image.putpixel((0, 0), 0)
    image = load_image(encoded(palette_image, transparency=0))
    assert image.mode == "RGBA"
    assert image.getpixel((0, 0))[3] == 0 and image.getpixel((1, 1)) == (200, 100, 50, 255)


def test_palette_without_transparency_becomes_rgb():
    palette_image = Image.new("P", (4, 4), 1)
    palette_image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    image = load_image(encoded(palette_image))
    assert image.mode == "RGB" and image.getpixel((2, 2)) == (200, 100, 50)


@pytest.mark.parametrize(("mode", "value"), [("L", 77), ("1", 255), ("LA", (77, 255))])
def test_grey_modes_become_rgb(mode, value):
    image = load_image(encoded(Image.new(mode, (4, 4), value)))
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == ((value,) * 3 if mode != "LA" else (77, 77, 77))


def test_sixteen_bit_grey_is_scaled_not_clipped():
    grey16 = Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16))
    assert grey16.mode == "I;16"
    image = load_image(encoded(grey16))
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (156, 156, 156)  # 40000 * 255 / 65535


def test_cmyk_jpeg_becomes_rgb():
    image = load_image(encoded(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=100))
    assert image.mode == "RGB"
    r, g, b = image.getpixel((8, 8))
    assert r > 240 and g < 15 and b < 15


def test_animated_gif_gives_the_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    image = load_image(buffer.getvalue())
    assert image.mode == "RGB" and image.getpixel((4, 4)) == (255, 0, 0)


# --------------------------------------------------------------------------- base64


def test_base64_with_and_without_data_url_prefix():
    pixels = noise(8, 8)
    payload = base64.b64encode(encoded(Image.fromarray(pixels))).decode()
    for text in (payload, "data:image/png;base64," + payload, "  " + payload[:20] + "\n" + payload[20:] + "\n"):
        assert np.array_equal(np.asarray(decode_base64_image(text)), pixels)
    assert np.array_equal(np.asarray(decode_base64_image(payload.rstrip("="))), pixels)


@pytest.mark.parametrize("text", ["not base64 at all!", "", "data:image/png;base64,", "QUJD"])
def test_bad_base64_names_the_field(text):
    with pytest.raises(ImageError, match=r"^mask: ") as info:
        decode_base64_image(text, field="mask")
    assert info.value.field == "mask"


def test_base64_size_limit_is_checked_before_decoding():
    payload = base64.b64encode(encoded(Image.fromarray(noise(64, 64)))).decode()
    with pytest.raises(ImageError, match="expected at most 100"):
        decode_base64_image(payload, max_bytes=100)


def test_base64_pixel_limit():
    payload = base64.b64encode(encoded(Image.fromarray(noise(64, 64)))).decode()
    with pytest.raises(ImageError, match="expected at most 100 pixels"):
        decode_base64_image(payload, field="init_images[0]", max_pixels=100)


def test_encode_png_base64_round_trip_with_infotext():
    pixels = noise(8, 8)
    text = encode_png_base64(Image.fromarray(pixels), "a cat\nSteps: 20, Seed: 1, CFG scale: 7")
    raw = base64.b64decode(text, validate=True)
    with Image.open(io.BytesIO(raw)) as image:
        assert isinstance(image, PngImagePlugin.PngImageFile)
        assert image.text["parameters"] == "a cat\nSteps: 20, Seed: 1, CFG scale: 7"
        assert np.array_equal(np.asarray(image), pixels)
    assert not text.startswith("data:")
    assert "parameters" not in Image.open(io.BytesIO(base64.b64decode(encode_png_base64(Image.fromarray(pixels))))).info


# --------------------------------------------------------------------------- folders


def test_list_images_sorted_and_filtered(tmp_path):
    for name in ("b.png", "a.JPG", "c.webp", "notes.txt", "d.jpeg", "z.gif"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.JPG", "b.png", "c.webp", "d.jpeg", "z.gif"]


def test_list_images_missing_directory(tmp_path):
    with pytest.raises(ImageError, match="not a directory"):
        list_images(tmp_path / "missing")
