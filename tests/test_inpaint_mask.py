"""Masks: loading (greyscale, RGBA alpha, the input's alpha), invert, A1111's blur, fitting to the picture."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from underpaint.errors import ImageError, InvalidParameter
from underpaint.imageio.mask import (
    MaskResizedWarning,
    blur_kernel_size,
    blur_mask,
    fit_mask,
    gaussian_weights,
    invert_mask,
    is_empty,
    is_full,
    load_mask,
    mask_box,
    mask_from_alpha,
    to_mask,
)


def _box_mask(size=(64, 48), box=(10, 8, 30, 20)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


@pytest.mark.parametrize(("sigma", "size"), [(0.5, 3), (1, 7), (4, 21), (4.2, 23), (16, 81), (64, 321)])
def test_kernel_size_follows_a1111(sigma, size):
    assert blur_kernel_size(sigma) == size
    weights = gaussian_weights(sigma)
    assert len(weights) == size and abs(weights.sum() - 1) < 1e-12
    assert np.allclose(weights, weights[::-1])


def test_blur_equals_scipy_separable_gaussian_with_reflect_101():
    """Independent reference: scipy's 1-D Gaussian with the same radius (truncate 2.5) and mirror border."""
    from scipy.ndimage import gaussian_filter1d

    rng = np.random.default_rng(3)
    values = rng.integers(0, 256, (37, 53)).astype(np.uint8)
    for sx, sy in [(4, 4), (1, 7), (0, 3), (9, 0), (30, 2)]:
        ref = values.astype(np.float64)
        if sx:
            ref = np.clip(np.rint(gaussian_filter1d(ref, sx, axis=1, mode="mirror", truncate=2.5)), 0, 255)
        if sy:
            ref = np.clip(np.rint(gaussian_filter1d(ref, sy, axis=0, mode="mirror", truncate=2.5)), 0, 255)
        ours = np.asarray(blur_mask(Image.fromarray(values), sx, sy))
        assert np.array_equal(ours, ref.astype(np.uint8)), (sx, sy)


def test_blur_close_to_opencv_as_a1111_calls_it():
    cv2 = pytest.importorskip("cv2")
    mask = np.asarray(_box_mask((96, 64), (20, 10, 70, 40)))
    for sx, sy in [(4, 4), (2, 8), (16, 16)]:
        ref = cv2.GaussianBlur(mask, (blur_kernel_size(sx), 1), sx)
        ref = cv2.GaussianBlur(ref, (1, blur_kernel_size(sy)), sy)
        ours = np.asarray(blur_mask(Image.fromarray(mask), sx, sy)).astype(int)
        # OpenCV's 8-bit path uses fixed-point weights: at most a couple of grey levels apart.
        assert np.abs(ours - ref).max() <= 2


def test_blur_zero_is_identity_and_solid_edges_stay_solid():
    mask = _box_mask()
    assert np.array_equal(np.asarray(blur_mask(mask, 0, 0)), np.asarray(mask))
    full = Image.new("L", (20, 10), 255)
    assert np.asarray(blur_mask(full, 8, 8)).min() == 255  # reflect-101 border: no dark rim


def test_blur_kernel_wider_than_the_picture():
    mask = _box_mask((9, 5), (2, 1, 5, 3))
    out = np.asarray(blur_mask(mask, 20, 20))
    assert out.shape == (5, 9) and out.max() > 0


def test_blur_rejects_bad_sigma():
    with pytest.raises(InvalidParameter):
        blur_mask(_box_mask(), -1, 2)


def test_greyscale_and_rgb_masks_convert_with_luma():
    rgb = Image.new("RGB", (4, 4), (255, 255, 255))
    rgb.putpixel((0, 0), (255, 0, 0))
    mask = to_mask(rgb)
    assert mask.mode == "L" and mask.getpixel((1, 1)) == 255
    assert mask.getpixel((0, 0)) == 76  # ITU-R 601: 0.299 * 255


def test_rgba_mask_with_transparency_uses_rounded_alpha():
    layer = Image.new("RGBA", (4, 1), (0, 0, 0, 0))
    for x, a in enumerate((0, 128, 129, 255)):
        layer.putpixel((x, 0), (10, 20, 30, a))
    assert list(to_mask(layer).getdata()) == [0, 0, 255, 255]
    assert list(to_mask(layer, round_alpha=False).getdata()) == [0, 128, 129, 255]
    opaque = Image.new("RGBA", (2, 1), (255, 255, 255, 255))
    assert list(to_mask(opaque).getdata()) == [255, 255]  # fully opaque: the colours count


def test_mask_from_alpha_marks_transparent_pixels():
    image = Image.new("RGBA", (3, 1), (50, 60, 70, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))
    image.putpixel((1, 0), (0, 0, 0, 100))
    assert list(mask_from_alpha(image).getdata()) == [255, 155, 0]
    with pytest.raises(ImageError, match="no alpha channel"):
        mask_from_alpha(Image.new("RGB", (3, 1)))


def test_invert_and_emptiness():
    mask = _box_mask()
    inverted = invert_mask(mask)
    assert np.array_equal(255 - np.asarray(mask), np.asarray(inverted))
    assert mask_box(mask) == (10, 8, 30, 20)
    assert is_empty(Image.new("L", (5, 5))) and not is_empty(mask)
    assert is_full(Image.new("L", (5, 5), 255)) and not is_full(mask)


def test_fit_mask_resizes_with_a_warning():
    mask = _box_mask((32, 24), (8, 6, 16, 12))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        same = fit_mask(mask, (32, 24))
        assert not caught
        fitted = fit_mask(mask, (64, 48))
    assert same.size == (32, 24) and fitted.size == (64, 48)
    assert [w.category for w in caught] == [MaskResizedWarning]
    assert "32x24" in str(caught[0].message) and "64x48" in str(caught[0].message)
    assert np.asarray(fitted)[14:22, 18:30].min() > 230 and np.asarray(fitted)[:6].max() == 0


def test_load_mask_from_file_and_bad_files(tmp_path):
    path = tmp_path / "mask.png"
    _box_mask().save(path)
    assert np.array_equal(np.asarray(load_mask(path)), np.asarray(_box_mask()))
    with pytest.raises(ImageError, match="not found"):
        load_mask(tmp_path / "missing.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="broken.png"):
        load_mask(broken)
