"""Picture <-> tensor conversion: A1111's truncation, checked against diffusers' rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from underpaint.errors import ImageError
from underpaint.imageio.convert import images_to_tensor, tensor_to_images


def rgb(seed: int, size=(24, 16)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_images_to_tensor_layout_and_range():
    pixels = np.zeros((2, 3, 3), dtype=np.uint8)
    pixels[0, 0] = (255, 0, 128)  # row 0, column 0
    pixels[1, 2] = (10, 20, 30)
    x = images_to_tensor([Image.fromarray(pixels)])
    assert x.shape == (1, 3, 2, 3) and x.dtype == torch.float32
    assert x[0, :, 0, 0].tolist() == pytest.approx([1.0, -1.0, 2 * 128 / 255 - 1], abs=1e-7)
    assert x[0, :, 1, 2].tolist() == pytest.approx([2 * v / 255 - 1 for v in (10, 20, 30)], abs=1e-7)


def test_images_to_tensor_matches_diffusers_preprocess():
    from diffusers.image_processor import VaeImageProcessor

    images = [rgb(0), rgb(1)]
    ours = images_to_tensor(images)
    reference = VaeImageProcessor(do_resize=False).preprocess(images)
    assert torch.equal(ours, reference.to(torch.float32))


def test_images_to_tensor_device_and_dtype():
    x = images_to_tensor([rgb(2)], device="cpu", dtype=torch.float16)
    assert x.dtype == torch.float16 and x.device.type == "cpu"


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ([], "empty"),
        ([rgb(0).convert("RGBA")], "expected an RGB picture"),
        ([rgb(0), rgb(1, size=(16, 16))], "expected 24x16"),
    ],
)
def test_images_to_tensor_refuses_bad_batches(images, message):
    with pytest.raises(ImageError, match=message):
        images_to_tensor(images)


def test_tensor_to_images_truncates_like_a1111():
    # (x + 1) / 2 * 255 = 254.9 -> 254 by truncation (rounding would give 255)
    levels = torch.tensor([254.9, 0.99, 127.5, 255.0, 300.0, -20.0], dtype=torch.float64)
    x = (2 * levels / 255 - 1).to(torch.float32).reshape(1, 1, 1, 6).expand(1, 3, 1, 6)
    (image,) = tensor_to_images(x)
    assert [image.getpixel((i, 0))[0] for i in range(6)] == [254, 0, 127, 255, 255, 0]


def test_tensor_to_images_is_floor_of_diffusers_float_output():
    from diffusers.image_processor import VaeImageProcessor

    x = torch.randn(2, 3, 32, 40, generator=torch.Generator().manual_seed(0)) * 0.6
    ours = np.stack([np.asarray(image) for image in tensor_to_images(x)]).astype(int)
    unit = VaeImageProcessor().postprocess(x, output_type="np")  # clamp(x/2 + 0.5, 0, 1), NHWC
    rounded = np.stack([np.asarray(image) for image in VaeImageProcessor.numpy_to_pil(unit)]).astype(int)
    floor = np.floor(unit.astype(np.float64) * 255).astype(int)
    # Truncation = floor for non-negative values; the two [0, 1] formulas may differ by one ulp
    # at an exact level boundary, hence the tiny allowance.
    assert (ours == floor).mean() > 0.9999
    difference = rounded - ours
    assert set(np.unique(difference)) <= {0, 1}
    assert 0.3 < difference.mean() < 0.7  # diffusers rounds up about half the pixels


def test_round_trip_loses_at_most_one_level():
    images = [rgb(5), rgb(6)]
    back = tensor_to_images(images_to_tensor(images))
    for before, after in zip(images, back):
        assert after.mode == "RGB"
        # 2v/255 - 1 and back in float32 lands a hair under v for some levels (1..63), and
        # truncation then drops a level: A1111 does the same arithmetic.
        diff = np.asarray(before).astype(int) - np.asarray(after).astype(int)
        assert set(np.unique(diff)) <= {0, 1}


def test_tensor_to_images_accepts_one_picture_and_half_precision():
    (image,) = tensor_to_images(torch.zeros(3, 4, 5, dtype=torch.float16))
    assert image.size == (5, 4) and image.getpixel((0, 0)) == (127, 127, 127)


def test_tensor_to_images_refuses_nan_and_bad_shapes():
    with pytest.raises(ImageError, match="NaN"):
        tensor_to_images(torch.full((1, 3, 2, 2), float("nan")))
    with pytest.raises(ImageError, match="expected"):
        tensor_to_images(torch.zeros(1, 4, 2, 2))


def test_conversion_equals_a1111s_float_then_truncate_formula():
    """The conversion runs on the tensor's device; it must equal A1111's numpy formula bit for bit,
    level boundaries and out-of-range values included."""
    torch.manual_seed(0)
    edges = torch.tensor([-1.0, 1.0, 0.0, -0.99999994, 0.99999994, 2 / 255 - 1, 6 / 255 - 1, 0.5, -3.0, 3.0])
    x = torch.cat([torch.randn(2 * 3 * 16 * 16) * 0.8, edges.repeat(6 * 16 * 16 // 10 + 1)[: 2 * 3 * 16 * 16]])
    x = x.reshape(4, 3, 16, 16)
    expected = (255.0 * torch.clamp((x + 1.0) / 2.0, min=0.0, max=1.0).permute(0, 2, 3, 1).numpy()).astype(np.uint8)
    got = np.stack([np.asarray(image) for image in tensor_to_images(x)])
    assert got.dtype == np.uint8 and np.array_equal(got, expected)
