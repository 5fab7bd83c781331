"""Inpainting and outpainting end to end on tiny checkpoints: exact pixels outside the mask, diffusers' 9-channel input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from underpaint.imageio.mask import MaskResizedWarning
from underpaint.params import GenerationParams, InpaintOptions
from underpaint.pipeline.inpaint import OutpaintOptions, outpaint_params

NO_BLUR = dict(mask_blur_x=0, mask_blur_y=0)
COMMON = dict(prompt="a red ball on the table", negative_prompt="blurry", steps=2, strength=0.5, seed=11,
              sampler="Euler a", cfg_scale=7.0)


def _mask(size, box) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture
def small(photo) -> Image.Image:
    """48x32: small enough that every run stays well under a second of UNet time."""
    return photo.crop((24, 16, 72, 48))


@pytest.fixture(scope="module")
def inpaint_engine(tmp_path_factory):
    """A tiny 9-channel (inpainting) SD1 checkpoint."""
    from tiny_models import write_sd1

    from underpaint.pipeline.engine import Engine

    path = write_sd1(tmp_path_factory.mktemp("tiny-inpaint") / "tiny-sd1-inpainting.safetensors", inpaint=True)
    return Engine.load(path, device="cpu", dtype="fp32")


@pytest.mark.parametrize("full_res", [False, True], ids=["whole", "only-masked"])
@pytest.mark.parametrize("content", ["fill", "original", "latent noise", "latent nothing"])
def test_pixels_outside_the_mask_are_bit_identical(sd1_engine, small, content, full_res):
    mask = _mask(small.size, (12, 6, 30, 22))
    params = GenerationParams(init_images=(small,), mask=mask, **COMMON,
                              inpaint=InpaintOptions(masked_content=content, full_res=full_res, full_res_padding=8, **NO_BLUR))
    result = sd1_engine.generate(params)
    out, src = _pixels(result.images[0]), _pixels(small)
    assert out.shape == src.shape
    keep = np.asarray(mask) == 0
    assert np.array_equal(out[keep], src[keep])
    assert (out[~keep] != src[~keep]).any()  # the masked area was repainted


def test_nine_channel_model_keeps_pixels_outside_the_mask(inpaint_engine, small):
    mask = _mask(small.size, (4, 4, 20, 28))
    params = GenerationParams(init_images=(small,), mask=mask, **COMMON, inpaint=InpaintOptions(**NO_BLUR))
    result = inpaint_engine.generate(params)
    keep = np.asarray(mask) == 0
    assert np.array_equal(_pixels(result.images[0])[keep], _pixels(small)[keep])
    assert "Conditional mask weight: 1.0" in result.infotexts[0]


def test_nine_channel_model_runs_without_a_mask(inpaint_engine, small):
    """An inpainting checkpoint is fed "everything masked" for txt2img and plain img2img, as in A1111."""
    txt = inpaint_engine.generate(GenerationParams(prompt="a cat", steps=1, seed=1, width=64, height=64))
    img = inpaint_engine.generate(GenerationParams(init_images=(small,), **{**COMMON, "steps": 1}))
    assert txt.images[0].size == (64, 64) and img.images[0].size == small.size
    assert "Conditional mask weight: 1.0" in txt.infotexts[0] and "Mask blur" not in img.infotexts[0]


def test_blurred_mask_keeps_pixels_beyond_the_blur(sd1_engine, small):
    mask = _mask(small.size, (20, 10, 30, 20))
    params = GenerationParams(init_images=(small,), mask=mask, **COMMON, inpaint=InpaintOptions(mask_blur_x=2, mask_blur_y=2))
    out = _pixels(sd1_engine.generate(params).images[0])
    far = np.ones(mask.size[::-1], bool)
    far[10 - 6:20 + 6, 20 - 6:30 + 6] = False  # kernel radius int(2.5*2+0.5) = 5
    assert np.array_equal(out[far], _pixels(small)[far])


def test_batch_composites_every_image(sd1_engine, small):
    mask = _mask(small.size, (12, 6, 30, 22))
    params = GenerationParams(init_images=(small,), mask=mask, **{**COMMON, "seed": 3}, batch_size=2,
                              inpaint=InpaintOptions(**NO_BLUR))
    result = sd1_engine.generate(params)
    keep = np.asarray(mask) == 0
    assert result.seeds == (3, 4)
    for image in result.images:
        assert np.array_equal(_pixels(image)[keep], _pixels(small)[keep])
    assert (_pixels(result.images[0]) != _pixels(result.images[1])).any()


def test_all_white_mask_behaves_as_img2img(sd1_engine, small):
    img2img = sd1_engine.generate(GenerationParams(init_images=(small,), **COMMON)).images[0]
    white = Image.new("L", small.size, 255)
    inpainted = sd1_engine.generate(GenerationParams(init_images=(small,), mask=white, **COMMON,
                                                     inpaint=InpaintOptions(**NO_BLUR))).images[0]
    assert np.array_equal(_pixels(inpainted), _pixels(img2img))


def test_all_black_mask_returns_the_input_unchanged(sd1_engine, small):
    for full_res in (False, True):
        params = GenerationParams(init_images=(small,), mask=Image.new("L", small.size, 0), **COMMON,
                                  inpaint=InpaintOptions(full_res=full_res))
        result = sd1_engine.generate(params)
        assert np.array_equal(_pixels(result.images[0]), _pixels(small))


def test_mask_of_another_size_is_resized_with_a_warning(sd1_engine, small):
    half = _mask((24, 16), (6, 3, 15, 11))  # half the picture's size
    params = GenerationParams(init_images=(small,), mask=half, **COMMON, inpaint=InpaintOptions(**NO_BLUR))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = sd1_engine.generate(params)
    assert any(w.category is MaskResizedWarning for w in caught)
    assert result.images[0].size == small.size
    assert np.array_equal(_pixels(result.images[0])[:, 36:], _pixels(small)[:, 36:])  # far from the mask


@pytest.mark.parametrize("full_res", [False, True], ids=["whole", "only-masked"])
def test_controlnet_units_mask_with_the_prepared_mask(sd1_engine, small, monkeypatch, full_res):
    """A1111's ControlNet inpaint takes the request's mask inverted and blurred like the inpainting's own."""
    from underpaint.imageio.mask import blur_mask, invert_mask
    from underpaint.pipeline import generate

    class Seen(Exception):
        pass

    def fake_request_control(model, params, **kwargs):
        raise Seen(params.mask, kwargs.get("crop"))

    monkeypatch.setattr(generate, "request_control", fake_request_control)
    mask = _mask(small.size, (12, 6, 30, 22))
    params = GenerationParams(init_images=(small,), mask=mask, **COMMON,
                              inpaint=InpaintOptions(invert=True, mask_blur_x=2, mask_blur_y=1, full_res=full_res))
    with pytest.raises(Seen) as seen:
        sd1_engine.generate(params)
    given, crop = seen.value.args
    assert np.array_equal(np.asarray(given), np.asarray(blur_mask(invert_mask(mask), 2, 1)))
    assert (crop is not None) == full_res


def test_infotext_records_inpaint_settings(sd1_engine, small):
    mask = _mask(small.size, (12, 6, 30, 22))
    params = GenerationParams(init_images=(small,), mask=mask, **COMMON,
                              inpaint=InpaintOptions(mask_blur_x=3, mask_blur_y=3, masked_content="fill", full_res=True,
                                                     full_res_padding=16, invert=True))
    text = sd1_engine.generate(params).infotexts[0]
    assert "Denoising strength: 0.5, Mask mode: Inpaint not masked, Mask blur: 3, Inpaint area: Only masked, " \
           "Masked area padding: 16, Masked content: fill, Version" in text
    assert "Conditional mask weight" not in text  # only for inpainting checkpoints


def test_soft_and_colour_corrected_inpainting_keep_unmasked_pixels(sd1_engine, small):
    ramp = np.zeros(small.size[::-1], np.uint8)
    ramp[:, 24:] = np.linspace(0, 255, 24).astype(np.uint8)[None, :]
    mask = Image.fromarray(ramp, "L")
    for options in (InpaintOptions(soft=True, **NO_BLUR), InpaintOptions(color_correction=True, **NO_BLUR)):
        result = sd1_engine.generate(GenerationParams(init_images=(small,), mask=mask, **COMMON, inpaint=options))
        keep = ramp == 0
        assert np.array_equal(_pixels(result.images[0])[keep], _pixels(small)[keep])


def test_outpaint_extends_the_canvas_and_keeps_the_picture(sd1_engine, small):
    base = GenerationParams(init_images=(small,), **COMMON)  # default mask blur 4 feathers on the margin side
    params = outpaint_params(base, OutpaintOptions(left=16, down=30, fill="edge"))
    result = sd1_engine.generate(params)
    out = _pixels(result.images[0])
    assert result.images[0].size == (small.width + 16, small.height + 32)  # 30 rounds up to 32
    assert np.array_equal(out[:32, 16:], _pixels(small))
    assert (out[32:] != out[31:32]).any()  # the new rows were painted, not just stretched
    assert "Size: 64x64" in result.infotexts[0]


class _Captured(Exception):
    """Stops a pipeline at its first UNet call, once the input is recorded."""


def _first_unet_input(unet, run) -> torch.Tensor:
    seen: list[torch.Tensor] = []

    def grab(module, args):
        seen.append(args[0].detach().clone())
        raise _Captured

    hook = unet.register_forward_pre_hook(grab)
    try:
        with pytest.raises(_Captured):
            run()
    finally:
        hook.remove()
    return seen[0]


def test_nine_channel_unet_input_matches_diffusers(inpaint_engine, small, monkeypatch):
    """The UNet's first input equals diffusers' StableDiffusionInpaintPipeline's: [latent, mask, VAE(masked)].

    Both start from pure noise (strength 1) drawn from the same CPU generator; diffusers samples
    the masked picture's VAE posterior, A1111 (and underpaint) take its mean, so diffusers is
    made to take the mean too.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionInpaintPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as sd_inpaint

    mask = _mask(small.size, (12, 6, 30, 22))
    m = inpaint_engine.model
    ours = _first_unet_input(m.unet, lambda: inpaint_engine.generate(GenerationParams(
        init_images=(small,), mask=mask, prompt="a cat", steps=2, strength=1.0, sampler="Euler", seed=5, rng="cpu",
        inpaint=InpaintOptions(**NO_BLUR))))

    monkeypatch.setattr(sd_inpaint, "retrieve_latents",
                        lambda output, generator=None, sample_mode="sample": output.latent_dist.mode())
    pipe = StableDiffusionInpaintPipeline(
        vae=m.vae, text_encoder=m.text_encoders[0], tokenizer=m.tokenizers[0], unet=m.unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         num_train_timesteps=1000, timestep_spacing="linspace"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = _first_unet_input(m.unet, lambda: pipe(
        prompt="a cat", image=small, mask_image=mask, height=small.height, width=small.width, strength=1.0,
        num_inference_steps=2, guidance_scale=7.0, generator=torch.Generator().manual_seed(5)))

    assert ours.shape == theirs.shape and ours.shape[:2] == (2, 9)
    torch.testing.assert_close(ours[:, 4:5], theirs[:, 4:5], rtol=0, atol=0)  # the mask
    torch.testing.assert_close(ours[:, 5:], theirs[:, 5:])  # VAE(masked picture)
    torch.testing.assert_close(ours[:, :4], theirs[:, :4], rtol=1e-4, atol=1e-4)  # scaled start latent
