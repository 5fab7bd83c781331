"""The engine end to end on tiny real-layout checkpoints, against diffusers as the reference."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from underpaint.params import GenerationParams, SamplerOptions


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _diffusers_img2img(engine, init_latents, *, prompt, negative, steps, strength, cfg, seed, scheduler):
    from diffusers import StableDiffusionImg2ImgPipeline

    m = engine.model
    pipe = StableDiffusionImg2ImgPipeline(
        vae=m.vae, text_encoder=m.text_encoders[0], tokenizer=m.tokenizers[0], unet=m.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt=prompt, negative_prompt=negative, image=init_latents, strength=strength,
        num_inference_steps=steps, guidance_scale=cfg, generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images[0]
    return out  # float in [0, 1]


def _init_latents(engine, image: Image.Image) -> torch.Tensor:
    from underpaint.imageio.convert import images_to_tensor

    m = engine.model
    with torch.no_grad():
        mean = m.vae.encode(images_to_tensor([image])).latent_dist.mean
    return mean * m.spec.scaling_factor


@pytest.mark.parametrize(("steps", "strength"), [(10, 0.5), (4, 0.75)])
def test_euler_img2img_matches_diffusers(sd1_engine, photo, steps, strength):
    """A1111's strength rule with k-diffusion Euler equals diffusers' img2img at strength (t_enc+1)/N.

    With timestep_spacing "linspace", EulerDiscrete's sigmas equal the model's own discrete
    schedule (A1111's Automatic for Euler) wherever the timesteps are integers (N-1 divides 999).
    Both encode with the VAE posterior mean; A1111 truncates to uint8 where diffusers rounds,
    so the reference is compared after the same truncation.
    """
    from diffusers import EulerDiscreteScheduler

    image = photo.resize((64, 64))
    seed, prompt, negative, cfg = 1234, "a red house by the sea", "blurry", 7.0
    ours = sd1_engine.generate(GenerationParams(
        prompt=prompt, negative_prompt=negative, init_images=(image,), strength=strength, steps=steps,
        cfg_scale=cfg, sampler="Euler", scheduler="Automatic", seed=seed, rng="cpu",
    )).images[0]

    t_enc = int(min(strength, 0.999) * steps)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, timestep_spacing="linspace")
    ref = _diffusers_img2img(sd1_engine, _init_latents(sd1_engine, image), prompt=prompt, negative=negative,
                             steps=steps, strength=(t_enc + 1) / steps, cfg=cfg, seed=seed, scheduler=scheduler)
    ref_u8 = (np.clip(ref, 0, 1) * 255).astype(np.uint8).astype(np.int16)
    diff = np.abs(_pixels(ours) - ref_u8)
    assert diff.max() <= 1, diff.max()
    assert (diff > 0).mean() < 0.01


def test_strength_zero_returns_input_unchanged(sd1_engine, photo):
    result = sd1_engine.generate(GenerationParams(init_images=(photo,), strength=0.0, seed=5, prompt="x"))
    assert result.images[0].size == photo.size
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(photo))
    assert "Denoising strength: 0" in result.infotexts[0]


def test_strength_zero_with_size_only_resizes(sd1_engine, photo):
    from underpaint.imageio.resize import resize_image

    result = sd1_engine.generate(GenerationParams(init_images=(photo,), strength=0.0, width=64, height=64))
    expected = resize_image(photo, 64, 64, 0)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(expected))


def test_strength_one_equals_txt2img(sd1_engine, photo):
    common = dict(prompt="a cat", steps=4, seed=77, sampler="Euler a", width=64, height=64)
    img = sd1_engine.generate(GenerationParams(init_images=(photo,), strength=1.0, **common)).images[0]
    txt = sd1_engine.generate(GenerationParams(**common)).images[0]
    assert np.array_equal(np.asarray(img), np.asarray(txt))


def test_same_seed_same_image_and_random_seed_is_recorded(sd1_engine, photo):
    params = GenerationParams(init_images=(photo,), prompt="a dog", steps=3, strength=0.6, seed=42, sampler="Euler a")
    a, b = sd1_engine.generate(params), sd1_engine.generate(params)
    assert a.images[0].tobytes() == b.images[0].tobytes()
    rnd = sd1_engine.generate(params.replace(seed=-1))
    assert rnd.seeds[0] != -1 and 0 <= rnd.seeds[0] < 4294967294
    assert f"Seed: {rnd.seeds[0]}," in rnd.infotexts[0]
    again = sd1_engine.generate(params.replace(seed=rnd.seeds[0]))
    assert again.images[0].tobytes() == rnd.images[0].tobytes()


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M", "DDIM"])
def test_batch_image_i_equals_single_run_seed_plus_i(sd1_engine, photo, sampler):
    params = GenerationParams(init_images=(photo,), prompt="a tree", steps=4, strength=0.7, seed=100,
                              sampler=sampler, batch_size=2, n_iter=2)
    result = sd1_engine.generate(params)
    assert result.seeds == (100, 101, 102, 103)
    for i in (1, 3):
        single = sd1_engine.generate(params.replace(seed=100 + i, batch_size=1, n_iter=1)).images[0]
        diff = np.abs(_pixels(result.images[i]) - _pixels(single))
        assert diff.max() <= 1


def test_ddim_cfgpp_steps_along_the_negative_prompts_noise(sd1_engine, photo):
    """DDIM CFG++ on the model: at CFG 0 the guided prediction is the negative prompt's, so its steps are
    plain DDIM's to the bit (which shows the denoiser leaves the negative prompt's noise, not the prompt's);
    at CFG 7 (λ = 0.56) it is a picture of its own; the infotext names it."""
    params = GenerationParams(init_images=(photo,), prompt="a tree", negative_prompt="fog", steps=4, strength=0.7,
                              seed=5, cfg_scale=0.0, sampler="DDIM")
    plain = sd1_engine.generate(params).images[0]
    cfgpp = sd1_engine.generate(params.replace(sampler="ddim_cfgpp"))
    assert cfgpp.images[0].tobytes() == plain.tobytes() and "Sampler: DDIM CFG++," in cfgpp.infotexts[0]
    guided = sd1_engine.generate(params.replace(sampler="DDIM CFG++", cfg_scale=7.0)).images[0]
    ddim = sd1_engine.generate(params.replace(cfg_scale=7.0)).images[0]
    assert guided.tobytes() != ddim.tobytes() and guided.tobytes() != plain.tobytes()


def test_comfyuis_euler_cfgpp_takes_the_scale_as_given(sd1_engine, photo):
    """ComfyUI's Euler CFG++ at CFG 0 steps along the negative prompt's noise from its own prediction, which is
    Euler's step at CFG 0 written another way (the same picture up to rounding); the infotext names it, and
    its ancestral twin runs."""
    params = GenerationParams(init_images=(photo,), prompt="a tree", negative_prompt="fog", steps=4, strength=0.7,
                              seed=5, cfg_scale=0.0, sampler="Euler")
    euler = _pixels(sd1_engine.generate(params).images[0])
    cfgpp = sd1_engine.generate(params.replace(sampler="euler_cfg_pp"))
    assert np.abs(_pixels(cfgpp.images[0]) - euler).max() <= 1 and "Sampler: Euler CFG++," in cfgpp.infotexts[0]
    a = sd1_engine.generate(params.replace(sampler="Euler a CFG++", cfg_scale=1.0)).images[0]
    assert a.size == cfgpp.images[0].size


def test_a_batch_from_the_top_64_bit_seed_counts_on_round_to_zero(sd1_engine, photo):
    """64-bit seeds (A1111 takes any; the NV source uses all 64 bits): a batch's seeds wrap round at 2**64,
    and the image after 2**64 - 1 is seed 0's."""
    params = GenerationParams(init_images=(photo,), prompt="a tree", steps=2, strength=0.7, seed=2**64 - 1,
                              sampler="Euler", rng="nv", batch_size=2)
    result = sd1_engine.generate(params)
    assert result.seeds == (2**64 - 1, 0) and f"Seed: {2**64 - 1}," in result.infotexts[0]
    single = sd1_engine.generate(params.replace(seed=0, batch_size=1)).images[0]
    assert np.abs(_pixels(result.images[1]) - _pixels(single)).max() <= 1


def test_output_size_defaults_to_input_rounded_to_8(sd1_engine):
    image = Image.new("RGB", (77, 70), (120, 30, 200))
    result = sd1_engine.generate(GenerationParams(init_images=(image,), steps=2, strength=0.5, seed=1))
    assert result.images[0].size == (72, 64)
    assert "Size: 72x64" in result.infotexts[0]


def test_infotext_layout(sd1_engine, photo):
    result = sd1_engine.generate(GenerationParams(
        init_images=(photo.resize((64, 64)),), prompt="impressionist oil painting, thick brushstrokes",
        negative_prompt="blurry, watermark", strength=0.65, steps=3, cfg_scale=7, sampler="DPM++ 2M",
        scheduler="Karras", seed=1234,
    ))
    info = sd1_engine.info
    assert result.infotexts[0] == (
        "impressionist oil painting, thick brushstrokes\n"
        "Negative prompt: blurry, watermark\n"
        f"Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 64x64, "
        f"Model hash: {info.short_hash}, Model: {info.name}, Denoising strength: 0.65, Version: underpaint "
        + __import__("underpaint").__version__
    )


def test_progress_and_interrupt(sd1_engine, photo):
    from underpaint.pipeline.records import Cancellation

    seen = []
    cancel = Cancellation()

    def on_progress(p):
        seen.append((p.job, p.step, p.steps))
        if p.step == 2:
            cancel.interrupt()

    result = sd1_engine.generate(
        GenerationParams(prompt="x", steps=6, seed=3, width=64, height=64, n_iter=3, sampler="Euler"),
        progress=on_progress, cancel=cancel,
    )
    assert result.interrupted
    assert seen == [(0, 1, 6), (0, 2, 6)]
    assert len(result.images) == 1  # the interrupted batch still returns its current estimate
    assert result.unfinished == (0,)


def test_skip_returns_the_current_estimate_and_goes_on(sd1_engine):
    """A1111's Skip: the batch it finds ends at that step's denoised estimate, which is returned
    (and marked unfinished); the next batch runs whole, as a request for its seed alone makes it."""
    from underpaint.pipeline.records import Cancellation

    params = GenerationParams(prompt="x", steps=6, seed=3, width=64, height=64, n_iter=2, sampler="Euler")
    cancel = Cancellation()

    def on_progress(p):
        if p.job == 0 and p.step == 2:
            cancel.skip()

    result = sd1_engine.generate(params, progress=on_progress, cancel=cancel)
    assert not result.interrupted and result.seeds == (3, 4) and result.unfinished == (0,)
    whole = sd1_engine.generate(replace(params, n_iter=1))
    alone = sd1_engine.generate(replace(params, seed=4, n_iter=1))
    assert np.array_equal(np.asarray(result.images[1]), np.asarray(alone.images[0]))
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(whole.images[0]))
    assert whole.unfinished == ()


@pytest.mark.parametrize("fixture", ["sd2v_file", "sdxl_file"])
def test_other_families_generate(request, fixture, photo):
    from underpaint.pipeline.engine import Engine

    engine = Engine.load(request.getfixturevalue(fixture), device="cpu", dtype="fp32")
    result = engine.generate(GenerationParams(init_images=(photo.resize((64, 64)),), prompt="a boat",
                                              steps=3, strength=0.6, seed=9, sampler="Euler a"))
    pixels = np.asarray(result.images[0])
    assert pixels.shape == (64, 64, 3) and pixels.std() > 0


def test_convenience_calls_take_a1111_names(sd1_engine, photo):
    """``engine.img2img`` as an A1111 API user writes it: ``denoising_strength``, ``sampler_name``, ``eta``."""
    image = photo.resize((64, 64))
    ours = sd1_engine.img2img(image, prompt="a barn", strength=0.5, sampler="Euler a", seed=3, steps=2,
                              sampler_options=SamplerOptions(eta=0.5))
    a1111 = sd1_engine.img2img(image, prompt="a barn", denoising_strength=0.5, sampler_name="Euler a", seed=3,
                               steps=2, eta=0.5)
    assert a1111.infotexts == ours.infotexts and "Denoising strength: 0.5" in a1111.infotexts[0]
    assert "Eta: 0.5" in a1111.infotexts[0]
    assert a1111.images[0].tobytes() == ours.images[0].tobytes()


def test_convenience_calls_refuse_unknown_fields_by_name(sd1_engine, photo):
    from underpaint.errors import InvalidParameter, UnknownName

    with pytest.raises(UnknownName, match="'strenght'.*did you mean 'strength'"):
        sd1_engine.img2img(photo, strenght=0.5)
    with pytest.raises(InvalidParameter, match="not both"):
        sd1_engine.img2img(photo, strength=0.5, denoising_strength=0.4)
    with pytest.raises(InvalidParameter, match="^image: got 'int', expected a PIL image or the path"):
        sd1_engine.img2img(42)


@pytest.mark.parametrize(("fields", "pattern"), [
    ({"init_images": ("photo.png",)}, r"^init_images\[0\]: got 'photo.png', expected a PIL image"),
    ({"init_images": Image.new("RGB", (64, 64))}, r"^init_images: got '\w*Image', expected a tuple of PIL images"),
    ({"init_images": (Image.new("RGB", (64, 64)),), "mask": "mask.png"}, r"^mask: got 'mask.png'"),
])
def test_request_images_must_be_pictures(fields, pattern):
    from underpaint.errors import InvalidParameter

    with pytest.raises(InvalidParameter, match=pattern):
        GenerationParams(**fields)


def test_a_list_of_init_images_is_taken():
    image = Image.new("RGB", (64, 64))
    assert GenerationParams(init_images=[image]).init_images == (image,)


def test_a_picture_too_small_to_paint_is_refused(sd1_engine):
    from underpaint.errors import InvalidParameter

    tiny = Image.new("RGB", (10, 10), (120, 30, 200))
    with pytest.raises(InvalidParameter, match=r"^init_images: got '10x10 picture', expected a picture larger than 8"):
        sd1_engine.generate(GenerationParams(init_images=(tiny,), steps=1, seed=1))
    # Strength 0 still hands the picture back, and a size asked for is painted at that size.
    assert sd1_engine.generate(GenerationParams(init_images=(tiny,), strength=0)).images[0].size == (10, 10)
    made = sd1_engine.generate(GenerationParams(init_images=(tiny,), steps=1, seed=1, width=64, height=64))
    assert made.images[0].size == (64, 64)
