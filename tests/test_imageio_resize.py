"""A1111 resize modes: hand-computed geometry for a 300x200 picture resized to 256x256.

Float ("F") pictures whose value is the column (or row) index make the geometry readable: a
Lanczos resize reproduces a linear ramp to within a few hundredths away from the borders, so
every output pixel tells which source coordinate it came from (one pixel of shift would be
off by ~0.8).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from underpaint.errors import InvalidParameter
from underpaint.imageio.resize import output_size, resize_image, round_to_multiple

RAMP_TOL = 0.05


def ramp(width: int, height: int, *, along: str) -> Image.Image:
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    return Image.fromarray(xs if along == "x" else ys, mode="F")


def noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 0}[mode]
    shape = (height, width, channels) if channels else (height, width)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))


def source_coordinate(out_index: float, offset: int, src_len: int, scaled_len: int) -> float:
    """Which source coordinate a pixel centre maps to after scaling and shifting by ``offset``."""
    return (out_index + offset + 0.5) * src_len / scaled_len - 0.5


def test_just_resize_stretches_the_whole_picture():
    src = ramp(300, 200, along="x")
    out = np.asarray(resize_image(src, 256, 256, 0))
    assert out.shape == (256, 256)
    expected = source_coordinate(np.arange(256), 0, 300, 256)
    # Interior columns follow the ramp: the whole width 0..299 is squeezed into 256 columns.
    np.testing.assert_allclose(out[128, 8:-8], expected[8:-8], atol=RAMP_TOL)
    assert out[128, 0] < 1.0 and out[128, -1] > 298.0


def test_latent_upscale_mode_resizes_pixels_like_mode_0():
    src = noise(300, 200)
    assert np.array_equal(np.asarray(resize_image(src, 256, 256, 3)), np.asarray(resize_image(src, 256, 256, 0)))
    assert np.array_equal(
        np.asarray(resize_image(src, 256, 256, 0)), np.asarray(src.resize((256, 256), Image.Resampling.LANCZOS))
    )


def test_crop_and_resize_keeps_the_centre_columns():
    # 300x200 -> cover 256x256: scale to 384x256 (300*256//200), paste at x = 128 - 192 = -64,
    # so output column j is scaled column j + 64: source columns ~50..250 are kept.
    src = ramp(300, 200, along="x")
    out = np.asarray(resize_image(src, 256, 256, 1))
    assert out.shape == (256, 256)
    expected = source_coordinate(np.arange(256), 64, 300, 384)
    np.testing.assert_allclose(out[100], expected, atol=RAMP_TOL)
    assert expected[0] == pytest.approx(50.0, abs=0.5) and expected[-1] == pytest.approx(249.5, abs=0.5)
    # every row is the same: the full height 0..199 is used
    rows = np.asarray(resize_image(ramp(300, 200, along="y"), 256, 256, 1))
    np.testing.assert_allclose(rows[8:-8, 128], source_coordinate(np.arange(256), 0, 200, 256)[8:-8], atol=RAMP_TOL)


def test_crop_and_resize_tall_source_keeps_the_centre_rows():
    # 200x300 -> 256x256: scale to 256x384, paste at y = -64.
    out = np.asarray(resize_image(ramp(200, 300, along="y"), 256, 256, 1))
    np.testing.assert_allclose(out[:, 100], source_coordinate(np.arange(256), 64, 300, 384), atol=RAMP_TOL)


def test_resize_and_fill_wide_source_has_bars_above_and_below():
    # 300x200 -> fit in 256x256: 256x170 (200*256//300) pasted at y = 128 - 85 = 43.
    # Bars: rows 0..42 and rows 213..255 (43 each), each one repeated stretched edge line.
    src = noise(300, 200, seed=1)
    out = np.asarray(resize_image(src, 256, 256, 2)).astype(int)
    fitted = np.asarray(src.resize((256, 170), Image.Resampling.LANCZOS)).astype(int)
    assert np.array_equal(out[43:213], fitted)
    top, bottom = out[:43], out[213:]
    assert (top == top[0]).all() and (bottom == bottom[0]).all()
    # A1111 stretches a zero-height box at the edge with bicubic: 1.125 edge - 0.125 next line.
    edge_top = np.clip(1.125 * fitted[0] - 0.125 * fitted[1], 0, 255)
    edge_bottom = np.clip(1.125 * fitted[-1] - 0.125 * fitted[-2], 0, 255)
    assert np.abs(top[0] - edge_top).max() <= 1
    assert np.abs(bottom[0] - edge_bottom).max() <= 1


def test_resize_and_fill_tall_source_has_bars_left_and_right():
    # 200x300 -> 170x256 pasted at x = 43; bars are columns 0..42 and 213..255.
    src = ramp(200, 300, along="x")
    out = np.asarray(resize_image(src, 256, 256, 2))
    fitted = np.asarray(src.resize((170, 256), Image.Resampling.LANCZOS))
    assert np.array_equal(out[:, 43:213], fitted)
    left = 1.125 * fitted[:, :1] - 0.125 * fitted[:, 1:2]
    right = 1.125 * fitted[:, -1:] - 0.125 * fitted[:, -2:-1]
    np.testing.assert_allclose(out[:, :43], np.broadcast_to(left, (256, 43)), atol=1e-3)
    np.testing.assert_allclose(out[:, 213:], np.broadcast_to(right, (256, 43)), atol=1e-3)


def test_resize_and_fill_odd_leftover_leaves_a1111s_black_line():
    # 300x200 -> 256x255: 256x170 at y = 127 - 85 = 42, bars 42 rows each: 42 + 170 + 42 = 254,
    # so row 254 keeps the canvas colour, exactly as in A1111.
    out = np.asarray(resize_image(noise(300, 200, seed=2), 256, 255, 2))
    assert (out[254] == 0).all()
    assert (out[253] == out[212]).all()


def test_resize_and_fill_zero_size_bar_is_skipped():
    # 300x256 -> 300x257: fits as 300x256 at y = 128 - 128 = 0; A1111 would fail on a 0-row bar.
    out = np.asarray(resize_image(noise(300, 256, seed=3), 300, 257, 2))
    assert out.shape == (257, 300, 3)
    assert (out[256] == 0).all()


def test_same_aspect_fill_has_no_bars():
    src = noise(512, 512, seed=4)
    assert np.array_equal(np.asarray(resize_image(src, 256, 256, 2)), np.asarray(resize_image(src, 256, 256, 0)))
    assert np.array_equal(np.asarray(resize_image(src, 256, 256, 1)), np.asarray(resize_image(src, 256, 256, 0)))


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_mode_is_kept(mode):
    for resize_mode in range(4):
        out = resize_image(noise(300, 200, mode), 128, 96, resize_mode)
        assert out.mode == mode and out.size == (128, 96)


@pytest.mark.parametrize(("width", "height", "mode"), [(0, 64, 0), (64, -1, 1), (64, 64, 4), (64.0, 64, 0)])
def test_invalid_arguments(width, height, mode):
    with pytest.raises(InvalidParameter):
        resize_image(noise(8, 8), width, height, mode)


def test_round_to_multiple_rounds_down_with_a_floor_of_one_multiple():
    assert round_to_multiple(517) == 512
    assert round_to_multiple(519) == 512
    assert round_to_multiple(512) == 512
    assert round_to_multiple(5) == 8
    assert round_to_multiple(100, 64) == 64


def test_output_size():
    assert output_size((1023, 769)) == (1016, 768)
    assert output_size((1000, 500), width=768) == (768, 384)
    assert output_size((1000, 500), height=300) == (600, 300)
    assert output_size((1000, 750), width=512) == (512, 384)
    assert output_size((1000, 500), 640, 480) == (640, 480)


def test_pictures_of_extreme_shape_are_refused_naming_the_field():
    """A 4096 x 1 strip has no "Resize and fill" into 512 x 512 (a side of 0 pixels), a 1 x 4096 one a "Crop
    and resize" of 512 x 2097152 pixels: refused naming the resize mode (A1111 fails or fills the memory);
    ControlNet maps likewise; Just resize still stretches them."""
    import numpy as np

    from underpaint.errors import InvalidParameter
    from underpaint.preprocess.common import fit_map, resize_with_pad

    strip, column = Image.new("RGB", (4096, 1), "red"), Image.new("RGB", (1, 4096), "red")
    for picture, mode in ((strip, 2), (column, 1), (column, 2)):
        with pytest.raises(InvalidParameter) as err:
            resize_image(picture, 512, 512, mode)
        assert err.value.field == "resize_mode" and "4096" in str(err.value)
    assert resize_image(strip, 512, 512, 0).size == (512, 512)
    for mode in ("Resize and Fill", "Crop and Resize"):
        with pytest.raises(InvalidParameter):
            fit_map(np.zeros((1, 4096, 3), np.uint8), 512, 512, mode)
    with pytest.raises(InvalidParameter) as err:
        resize_with_pad(np.zeros((1, 4096, 3), np.uint8), 512)
    assert err.value.field == "processor_res"
