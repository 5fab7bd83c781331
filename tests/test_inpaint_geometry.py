"""The inpaint steps as pure helpers: crop geometry, fill, latent mask, blending, compositing, outpaint canvas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from underpaint.errors import InvalidParameter
from underpaint.imageio.resize import CROP_AND_RESIZE, resize_image
from underpaint.params import GenerationParams, InpaintOptions
from underpaint.pipeline.inpaint import (
    Box,
    Margins,
    OutpaintOptions,
    blend_denoiser,
    blend_latents,
    composite,
    concat_channels,
    crop_box,
    differential_denoiser,
    feather_mask,
    fill_masked,
    inpaint_infotext,
    latent_mask,
    masked_content_latent,
    match_colours,
    outpaint_canvas,
    outpaint_margins,
    outpaint_params,
    prepare_inpaint,
    widen_to_aspect,
)


def _mask(size, box) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def _picture(size=(96, 64), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


# --------------------------------------------------------------------------- only-masked geometry


@pytest.mark.parametrize(
    ("image", "box", "padding", "target", "expected"),
    [
        # 64x32 box, square output: grow the height by int(64 - 32) = 32, 16 above and 16 below.
        ((512, 512), (100, 200, 164, 232), 0, (512, 512), (100, 184, 164, 248)),
        # padding 32 first: 128x96, then 32 more rows.
        ((512, 512), (100, 200, 164, 232), 32, (512, 512), (68, 152, 196, 280)),
        # at the top edge: 100x20 wants 80 more rows; 40 would go above the picture, so all go below.
        ((512, 512), (10, 0, 110, 20), 0, (512, 512), (10, 0, 110, 100)),
        # tall box at the right edge, 3:2 output: 20x100 wants int(150 - 20) = 130 more columns,
        # 65 on each side; the 65 past the right edge move left.
        ((600, 400), (580, 300, 600, 400), 0, (768, 512), (450, 300, 600, 400)),
        # wider than the picture allows: clipped to the picture.
        ((100, 100), (0, 40, 100, 60), 0, (64, 128), (0, 0, 100, 100)),
        # fractional growth truncates: 50x50 at 4:3 wants int(66.67 - 50) = 16 more columns.
        ((512, 512), (200, 200, 250, 250), 0, (512, 384), (192, 200, 258, 250)),
        # padding is clamped at the picture's edges before widening.
        ((128, 128), (0, 0, 16, 16), 8, (64, 64), (0, 0, 24, 24)),
    ],
)
def test_only_masked_crop_region(image, box, padding, target, expected):
    region = crop_box(_mask(image, box), padding)
    widened = widen_to_aspect(region, *target, image)
    assert widened.as_tuple() == expected


def test_empty_mask_has_no_crop_region():
    assert crop_box(Image.new("L", (32, 32)), 8) is None


def test_only_masked_job_crops_resizes_and_pastes_back_in_place():
    picture = _picture((96, 64))
    mask = _mask((96, 64), (40, 20, 56, 36))  # 16x16
    params = GenerationParams(init_images=(picture,), mask=mask,
                              inpaint=InpaintOptions(mask_blur_x=0, mask_blur_y=0, full_res=True, full_res_padding=4))
    job = prepare_inpaint(params, 64, 32)
    # 24x24 box widened to 2:1 -> 48x24, centred: x from 40-4-12 = 24 to 72.
    assert job.crop == Box(24, 16, 72, 40)
    assert job.mask.size == (64, 32) and job.sources[0].size == (64, 32)
    assert job.output_size == (96, 64)
    red = Image.new("RGB", (64, 32), (255, 0, 0))
    out = np.asarray(composite(red, job, 0))
    inside = np.asarray(mask) == 255
    assert (out[inside] == (255, 0, 0)).all()
    assert np.array_equal(out[~inside], np.asarray(picture)[~inside])


# --------------------------------------------------------------------------- pixels


def test_fill_keeps_unmasked_pixels_and_paints_hole_with_surrounding_colours():
    picture = Image.new("RGB", (64, 64), (200, 40, 10))
    picture.paste((0, 0, 255), (20, 20, 44, 44))  # something else under the hole
    mask = _mask((64, 64), (16, 16, 48, 48))
    filled = np.asarray(fill_masked(picture, mask)).astype(int)
    keep = np.asarray(mask) == 0
    assert np.array_equal(filled[keep], np.asarray(picture)[keep])
    centre = filled[32, 32]
    assert abs(centre - (200, 40, 10)).max() <= 3  # the blue under the hole is gone


def test_whole_picture_overlay_doubles_the_blurred_mask():
    picture = _picture((64, 64))
    params = GenerationParams(init_images=(picture,), mask=_mask((64, 64), (16, 16, 48, 48)),
                              inpaint=InpaintOptions(mask_blur_x=4, mask_blur_y=4))
    job = prepare_inpaint(params, 64, 64)
    m, o = np.asarray(job.mask).astype(int), np.asarray(job.overlay).astype(int)
    assert np.array_equal(o, np.clip(2 * m, 0, 255))
    assert job.crop is None and job.output_size == (64, 64)


def _a1111_overlay(generated: np.ndarray, original: np.ndarray, overlay: np.ndarray) -> np.ndarray:
    """A1111's overlay in Pillow's integer arithmetic, written out step by step: the original pasted
    into an empty premultiplied layer through ``255 - overlay``, unpremultiplied (truncating), then
    alpha-composited over the opaque result with 7 bits of precision."""
    def div255(v):
        t = v + 128
        return ((t >> 8) + t) >> 8

    alpha = (255 - overlay.astype(np.int64))[..., None]
    premultiplied = div255(original.astype(np.int64) * alpha)
    colour = np.where((alpha == 0) | (alpha == 255), premultiplied,
                      np.minimum(255, 255 * premultiplied // np.maximum(alpha, 1)))
    t = colour * (alpha * 128) + generated.astype(np.int64) * (255 * 128 - alpha * 128) + (0x80 << 7)
    return ((((t >> 8) + t) >> 8) >> 7).astype(np.uint8)


@pytest.mark.parametrize("full_res", [False, True], ids=["whole", "only-masked"])
def test_overlay_is_a1111s_premultiplied_alpha_composite(full_res):
    picture = _picture((64, 64), seed=3)
    params = GenerationParams(init_images=(picture,), mask=_mask((64, 64), (20, 20, 44, 44)),
                              inpaint=InpaintOptions(mask_blur_x=5, mask_blur_y=3, full_res=full_res, full_res_padding=2))
    job = prepare_inpaint(params, 32, 32)
    generated = _picture((32, 32), seed=4)
    out = np.asarray(composite(generated, job, 0))
    if full_res:  # the result, crop-and-resized to the region, goes back in place first
        assert job.crop == Box(5, 5, 59, 59)  # the blurred box, padded, made square
        placed = picture.copy()
        placed.paste(resize_image(generated, 54, 54, CROP_AND_RESIZE), (5, 5))
    else:
        placed, picture = generated, resize_image(picture, 32, 32, 0)
    expected = _a1111_overlay(np.asarray(placed), np.asarray(picture), np.asarray(job.overlay))
    grey = (np.asarray(job.overlay) > 0) & (np.asarray(job.overlay) < 255)
    assert grey.sum() > 100  # the seam is soft, where rounding matters
    assert np.array_equal(out, expected)


def test_mask_of_another_size_is_blurred_at_its_own_size_then_resized():
    """A1111 blurs the mask as it came (sigma in the mask's pixels) and resizes it straight to W×H."""
    from underpaint.imageio.mask import MaskResizedWarning, blur_mask

    picture = _picture((64, 64))
    small = _mask((32, 32), (8, 8, 24, 24))
    params = GenerationParams(init_images=(picture,), mask=small, inpaint=InpaintOptions(mask_blur_x=2, mask_blur_y=2))
    with pytest.warns(MaskResizedWarning):
        job = prepare_inpaint(params, 48, 48)
    expected = resize_image(blur_mask(small, 2, 2), 48, 48, 0)
    assert np.array_equal(np.asarray(job.mask), np.asarray(expected))
    assert job.picture_mask.size == (64, 64)


def test_empty_mask_prepares_nothing():
    params = GenerationParams(init_images=(_picture(),), mask=Image.new("L", (96, 64)))
    assert prepare_inpaint(params, 96, 64) is None
    inverted = params.replace(mask=Image.new("L", (96, 64), 255), inpaint=InpaintOptions(invert=True))
    assert prepare_inpaint(inverted, 96, 64) is None


def test_mask_without_picture_is_an_error():
    with pytest.raises(InvalidParameter, match="init_images"):
        prepare_inpaint(GenerationParams(mask=Image.new("L", (8, 8), 255)), 64, 64)


def test_colour_correction_undoes_a_global_shift():
    picture = _picture((64, 64))
    mask = _mask((64, 64), (16, 16, 32, 32))
    shifted = Image.fromarray(np.clip(np.asarray(picture).astype(int) * 0.8 + 20, 0, 255).astype(np.uint8))
    fixed = np.asarray(match_colours(shifted, picture, mask)).astype(int)
    assert np.abs(fixed - np.asarray(picture)).mean() < 1.0


# --------------------------------------------------------------------------- latents


def test_latent_mask_is_bicubic_shrink_rounded():
    mask = _mask((64, 64), (0, 0, 28, 64))  # 3.5 latent cells wide
    lm = latent_mask(mask, (8, 8))
    assert lm.shape == (1, 1, 8, 8)
    assert set(lm.unique().tolist()) <= {0.0, 1.0}
    assert lm[0, 0, 0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0] or lm[0, 0, 0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    soft = latent_mask(mask, (8, 8), round_mask=False)
    assert 0 < soft[0, 0, 0, 3] < 1


def test_blend_wrapper_keeps_original_latent_outside_the_mask():
    init = torch.randn(2, 4, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:5, 3:6] = 1
    wrapped = blend_denoiser(lambda x, sigma: x * 3, init, mask)
    x = torch.randn(2, 4, 8, 8)
    out = wrapped(x, torch.ones(2))
    assert torch.equal(out[..., 2:5, 3:6], (x * 3)[..., 2:5, 3:6])
    outside = mask.expand_as(out) == 0
    assert torch.equal(out[outside], init[outside])
    assert torch.equal(blend_latents(x, init, mask)[outside], init[outside])
    ones = torch.ones(1, 1, 8, 8)
    assert torch.equal(blend_denoiser(lambda x, s: x * 3, init, ones)(x, torch.ones(2)), x * 3)


def test_differential_blend_releases_grey_levels_late():
    init = torch.zeros(1, 1, 1, 3)
    mask = torch.tensor([1.0, 0.5, 0.0]).view(1, 1, 1, 3)
    sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    wrapped = differential_denoiser(lambda x, s: torch.ones_like(x), init, mask, sigmas)
    per_step = [wrapped(init, torch.tensor([s]))[0, 0, 0].tolist() for s in sigmas[:-1].tolist()]
    assert per_step == [[1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 0]]  # 0.5: free for the last half


def test_latent_content_modes():
    init, noise = torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), 7.0)
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    assert masked_content_latent(init, mask, "latent nothing")[0, 0].tolist() == [[0, 1], [1, 1]]
    assert masked_content_latent(init, mask, "latent noise", noise)[0, 0].tolist() == [[7, 1], [1, 1]]
    assert torch.equal(masked_content_latent(init, mask, "original"), init)


def test_concat_channels_appends_after_scaling_and_repeats_for_cfg():
    seen = {}

    def model_fn(x_in, t, cond):
        seen["x"] = x_in
        return x_in[:, :4]

    extra = torch.arange(2 * 5 * 2 * 2, dtype=torch.float32).view(2, 5, 2, 2)
    x = torch.randn(4, 4, 2, 2)  # [cond; uncond] for a batch of 2
    concat_channels(model_fn, extra)(x, torch.zeros(4), None)
    assert seen["x"].shape == (4, 9, 2, 2)
    assert torch.equal(seen["x"][:, 4:], torch.cat([extra, extra]))


def test_infotext_keys_and_values():
    default = inpaint_infotext(InpaintOptions(), cropped=False, conditioning=False)
    assert default == (("Mask blur", "4"),)
    full = inpaint_infotext(InpaintOptions(mask_blur_x=2, mask_blur_y=2, masked_content="fill", invert=True,
                                           full_res=True, full_res_padding=32), cropped=True, conditioning=True)
    assert full == (("Mask mode", "Inpaint not masked"), ("Mask blur", "2"), ("Inpaint area", "Only masked"),
                    ("Masked area padding", "32"), ("Masked content", "fill"), ("Conditional mask weight", "1.0"))
    uneven = inpaint_infotext(InpaintOptions(mask_blur_x=2, mask_blur_y=5), cropped=False, conditioning=False)
    assert uneven == ()  # A1111 writes Mask blur only when x and y agree


def test_inpaint_options_validate():
    with pytest.raises(InvalidParameter, match="masked_content"):
        InpaintOptions(masked_content="blur")
    with pytest.raises(InvalidParameter, match="mask_weight"):
        InpaintOptions(mask_weight=1.5)
    with pytest.raises(InvalidParameter, match="mask_blur_x"):
        InpaintOptions(mask_blur_x=-1)


# --------------------------------------------------------------------------- outpainting


@pytest.mark.parametrize(
    ("size", "sides", "margins", "canvas"),
    [
        ((96, 64), dict(left=64, right=64), Margins(64, 64, 0, 0), (224, 64)),
        ((96, 64), dict(up=5), Margins(0, 0, 8, 0), (96, 72)),
        ((77, 70), dict(left=30), Margins(35, 0, 0, 2), (112, 72)),  # 32 + 3 more to reach 112; 2 rows below
        ((77, 70), dict(right=8, down=8, up=8), Margins(0, 11, 8, 10), (88, 88)),
    ],
)
def test_outpaint_margins_round_to_whole_latent_cells(size, sides, margins, canvas):
    got = outpaint_margins(OutpaintOptions(**sides), size)
    assert got == margins
    assert (size[0] + got.left + got.right, size[1] + got.up + got.down) == canvas


@pytest.mark.parametrize("fill", ["blur", "edge", "noise"])
def test_outpaint_canvas_keeps_the_picture_and_masks_the_margins(fill):
    picture = _picture((40, 24))
    margins = Margins(8, 16, 0, 8)
    canvas, mask = outpaint_canvas(picture, margins, fill, seed=3)
    assert canvas.size == (64, 32) and mask.size == (64, 32)
    assert np.array_equal(np.asarray(canvas)[0:24, 8:48], np.asarray(picture))
    m = np.asarray(mask)
    assert (m[0:24, 8:48] == 0).all() and m.sum() == 255 * (64 * 32 - 40 * 24)
    if fill == "edge":
        assert np.array_equal(np.asarray(canvas)[5, 0], np.asarray(picture)[5, 0])


def test_feathered_outpaint_mask_stays_off_the_picture():
    margins = Margins(32, 0, 16, 0)
    _, mask = outpaint_canvas(_picture((40, 24)), margins, "edge")
    values = np.asarray(feather_mask(mask, margins, (40, 24), 4, 2))
    assert (values[16:, 32:] == 0).all()  # the picture's area
    assert values[:, :10].min() > 200  # far margins fully repainted
    assert 0 < values[20, 31] < 128  # a ramp towards the seam
    narrow = Margins(8, 0, 0, 0)
    _, mask = outpaint_canvas(_picture((40, 24)), narrow, "edge")
    values = np.asarray(feather_mask(mask, narrow, (40, 24), 4, 4))
    assert (values[:, 8:] == 0).all() and values[:, :8].max() > 128  # never emptied by a wide blur


def test_outpaint_params_build_an_inpaint_request():
    picture = _picture((96, 64))
    params = GenerationParams(init_images=(picture,), prompt="x", inpaint=InpaintOptions(mask_blur_x=0, mask_blur_y=0))
    out = outpaint_params(params, OutpaintOptions(left=64, fill="edge"))
    canvas = out.init_images[0]
    assert canvas.size == (160, 64) and (out.width, out.height) == (160, 64)
    assert out.mask.size == (160, 64) and out.inpaint.mask_blur_x == 0
    assert np.array_equal(np.asarray(canvas)[:, 64:], np.asarray(picture))
    with pytest.raises(InvalidParameter, match="at least one side"):
        OutpaintOptions()
    with pytest.raises(InvalidParameter, match="fill"):
        OutpaintOptions(left=8, fill="stretch")


def _fake_encode(pixels: torch.Tensor) -> torch.Tensor:
    """A stand-in VAE: 8x8 average pooling, 3 -> 4 channels."""
    pooled = torch.nn.functional.avg_pool2d(pixels, 8)
    return torch.cat([pooled, pooled[:, :1] * 2], dim=1)


def test_job_latents_and_nine_channel_conditioning():
    from underpaint.pipeline.inpaint import image_conditioning, job_latents

    picture = _picture((64, 32))
    mask = _mask((64, 32), (16, 8, 40, 24))
    params = GenerationParams(init_images=(picture,), mask=mask,
                              inpaint=InpaintOptions(masked_content="latent nothing", mask_weight=1.0, **dict(mask_blur_x=0, mask_blur_y=0)))
    job = prepare_inpaint(params, 64, 32)
    lat = job_latents(job, _fake_encode, batch=2)
    assert lat.init.shape == (2, 4, 4, 8) and lat.mask.shape == (1, 1, 4, 8)
    assert torch.equal(lat.mask[0, 0, 1:3, 2:5], torch.ones(2, 3))
    assert (lat.init * lat.mask == 0).all()  # latent nothing: zeros in the hole

    cond = image_conditioning(_fake_encode, job=job, pixels=None, weight=1.0, batch=2, size=(64, 32))
    assert cond.shape == (2, 5, 4, 8)
    assert torch.equal(cond[:, :1], torch.nn.functional.interpolate(
        torch.from_numpy(np.asarray(mask, np.float32) / 255)[None, None], size=(4, 8)).expand(2, -1, -1, -1))
    # The hole is grey (0 in [-1, 1]) in the masked picture; the rest is the picture.
    from underpaint.imageio.convert import images_to_tensor

    pixels = images_to_tensor([picture])
    hole = torch.from_numpy(np.asarray(mask, np.float32) / 255)[None, None]
    assert torch.allclose(cond[:1, 1:], _fake_encode(pixels * (1 - hole)))

    grey = image_conditioning(_fake_encode, job=None, pixels=None, weight=1.0, batch=1, size=(64, 32))
    assert torch.equal(grey[:, :1], torch.ones(1, 1, 4, 8)) and torch.equal(grey[:, 1:], torch.zeros(1, 4, 4, 8))
    half = image_conditioning(_fake_encode, job=None, pixels=pixels, weight=0.5, batch=1, size=(64, 32))
    assert torch.allclose(half[:, 1:], _fake_encode(pixels * 0.5))
