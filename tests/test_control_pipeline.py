"""ControlNet units through the engine, against diffusers' ControlNet img2img pipeline as the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_controlnet import write_controlnet
from underpaint.params import GenerationParams
from underpaint.pipeline.control import ControlUnit


@pytest.fixture(scope="module")
def sd1_controlnet(tmp_path_factory):
    return write_controlnet(tmp_path_factory.mktemp("cn") / "control_tiny_sd15_canny.safetensors", "sd1")


@pytest.fixture(scope="module")
def control_map() -> Image.Image:
    """A ready-made map: white shapes on black, as an edge or scribble map looks."""
    from tiny_controlnet import ready_map

    return ready_map()


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_residuals_enter_the_unet_as_in_diffusers_controlnet_img2img(sd1_engine, photo, sd1_controlnet, control_map):
    from diffusers import EulerDiscreteScheduler, StableDiffusionControlNetImg2ImgPipeline

    from underpaint.imageio.convert import images_to_tensor
    from underpaint.models.controlnet import load_controlnet

    image = photo.resize((64, 64))
    steps, strength, weight, seed, cfg = 4, 0.75, 0.8, 321, 6.0
    prompt, negative = "a lighthouse at dusk", "blurry"
    unit = ControlUnit(image=control_map, module="none", model=str(sd1_controlnet), weight=weight)
    ours = sd1_engine.generate(GenerationParams(
        prompt=prompt, negative_prompt=negative, init_images=(image,), strength=strength, steps=steps, cfg_scale=cfg,
        sampler="Euler", scheduler="Automatic", seed=seed, rng="cpu", control_units=(unit,),
    )).images[0]

    m = sd1_engine.model
    controlnet = load_controlnet(sd1_controlnet).module
    pipe = StableDiffusionControlNetImg2ImgPipeline(
        vae=m.vae, text_encoder=m.text_encoders[0], tokenizer=m.tokenizers[0], unet=m.unet, controlnet=controlnet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         num_train_timesteps=1000, timestep_spacing="linspace"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        latents = m.vae.encode(images_to_tensor([image])).latent_dist.mean * m.spec.scaling_factor
    t_enc = int(min(strength, 0.999) * steps)
    ref = pipe(prompt=prompt, negative_prompt=negative, image=latents, control_image=control_map,
               strength=(t_enc + 1) / steps, num_inference_steps=steps, guidance_scale=cfg,
               controlnet_conditioning_scale=weight, generator=torch.Generator().manual_seed(seed),
               output_type="np").images[0]
    ref_u8 = (np.clip(ref, 0, 1) * 255).astype(np.uint8).astype(np.int16)
    diff = np.abs(_pixels(ours) - ref_u8)
    assert diff.max() <= 1, diff.max()
    # ...and the ControlNet changed the picture (its residuals are not negligible).
    plain = sd1_engine.generate(GenerationParams(
        prompt=prompt, negative_prompt=negative, init_images=(image,), strength=strength, steps=steps, cfg_scale=cfg,
        sampler="Euler", seed=seed, rng="cpu")).images[0]
    assert np.abs(_pixels(plain) - _pixels(ours)).max() > 2


def _txt2img(engine, units, **extra):
    return engine.generate(GenerationParams(prompt="a castle", steps=extra.pop("steps", 3), sampler="Euler",
                                            seed=9, width=64, height=64, control_units=tuple(units), **extra))


def test_weight_zero_equals_no_controlnet(sd1_engine, sd1_controlnet, control_map):
    unit = ControlUnit(image=control_map, module="none", model=str(sd1_controlnet), weight=0.0)
    with_unit = _txt2img(sd1_engine, [unit]).images[0]
    without = _txt2img(sd1_engine, []).images[0]
    assert with_unit.tobytes() == without.tobytes()


def test_guidance_start_end_switch_the_unit_at_a1111_steps(sd1_engine, sd1_controlnet, control_map):
    from underpaint.models.controlnet import ControlNetCache

    unit = ControlUnit(image=control_map, module="none", model=str(sd1_controlnet), guidance_start=0.2,
                       guidance_end=0.5)
    calls = []
    cache = ControlNetCache()
    net = cache.get(sd1_controlnet, device=sd1_engine.model.device, dtype=sd1_engine.model.dtype)
    handle = net.module.register_forward_hook(lambda mod, args, kwargs_out: calls.append(1))
    previous = getattr(sd1_engine.model, "_controlnets", None)
    sd1_engine.model._controlnets = cache
    try:
        _txt2img(sd1_engine, [unit], steps=10)
    finally:
        handle.remove()
        sd1_engine.model._controlnets = previous
    # Steps 0..9 see the counter 0,0,1,...,8: active where 0.2 <= counter/10 <= 0.5, i.e. steps 3..6;
    # prompt and negative prompt share one batched call per step.
    assert len(calls) == 4


def test_hires_fix_runs_the_unit_in_both_passes_with_their_own_steps(sd1_engine, sd1_controlnet, control_map):
    """As the extension with hires. fix: the unit's guidance window counts each pass's own steps,
    and the second pass sees the map at its own size."""
    from underpaint.models.controlnet import ControlNetCache
    from underpaint.params import HiresOptions
    from underpaint.pipeline.control import control_resources

    unit = ControlUnit(image=control_map, module="none", model=str(sd1_controlnet), guidance_start=0.3)
    sizes = []
    control_resources(sd1_engine.model)  # the annotator context, so that the engine keeps the cache set below
    cache = ControlNetCache()
    net = cache.get(sd1_controlnet, device=sd1_engine.model.device, dtype=sd1_engine.model.dtype)
    handle = net.module.register_forward_hook(
        lambda mod, args, kwargs, out: sizes.append(tuple(kwargs["controlnet_cond"].shape[-2:])), with_kwargs=True)
    previous = getattr(sd1_engine.model, "_controlnets", None)
    sd1_engine.model._controlnets = cache
    try:
        result = _txt2img(sd1_engine, [unit], steps=3, hires=HiresOptions(scale=1.5, steps=5, strength=0.6))
    finally:
        handle.remove()
        sd1_engine.model._controlnets = previous
    assert result.images[0].size == (96, 96)
    # First pass, 3 steps: counters 0,0,1 -> active at 1/3 only; second pass, 5 steps: counters
    # 0,0,1,2,3 -> active at 2/5 and 3/5.
    assert sizes == [(64, 64), (96, 96), (96, 96)]
    assert 'ControlNet 0: "Module: none' in result.infotexts[0]


def test_infotext_records_each_unit(sd1_engine, sd1_controlnet, control_map):
    from underpaint.models.controlnet import infotext_name

    units = [ControlUnit(image=control_map, module="none", model=str(sd1_controlnet), weight=0.5,
                         control_mode="ControlNet is more important"),
             ControlUnit(image=control_map, module="canny", model=str(sd1_controlnet), guidance_end=0.8)]
    text = _txt2img(sd1_engine, units, steps=2).infotexts[0]
    name = infotext_name(sd1_controlnet)
    assert (f'ControlNet 0: "Module: none, Model: {name}, Weight: 0.5, Resize Mode: Crop and Resize, '
            'Guidance Start: 0.0, Guidance End: 1.0, '
            'Pixel Perfect: False, Control Mode: ControlNet is more important, Hr Option: Both"') in text
    assert f'ControlNet 1: "Module: canny, Model: {name}, Weight: 1.0' in text


def test_sdxl_unit_changes_the_picture_and_weight_zero_does_not(sdxl_file, tmp_path, control_map):
    from underpaint.pipeline.engine import Engine

    engine = Engine.load(sdxl_file, device="cpu", dtype="fp32")
    net = write_controlnet(tmp_path / "control_tiny_sdxl.safetensors", "sdxl")
    common = dict(prompt="a castle", steps=2, sampler="Euler", seed=3, width=64, height=64)
    plain = engine.generate(GenerationParams(**common)).images[0]
    units = (ControlUnit(image=control_map, module="none", model=str(net)),)
    steered = engine.generate(GenerationParams(control_units=units, **common)).images[0]
    assert np.abs(_pixels(plain) - _pixels(steered)).max() > 2
    zero = (ControlUnit(image=control_map, module="none", model=str(net), weight=0.0),)
    assert engine.generate(GenerationParams(control_units=zero, **common)).images[0].tobytes() == plain.tobytes()


def test_a_controlnet_of_another_family_is_refused(sd1_engine, tmp_path, control_map):
    from underpaint.errors import ModelError

    net = write_controlnet(tmp_path / "control_tiny_sdxl.safetensors", "sdxl")
    with pytest.raises(ModelError, match="sdxl"):
        _txt2img(sd1_engine, [ControlUnit(image=control_map, module="none", model=str(net))])


def test_default_model_is_found_by_module_in_the_models_folder(sd1_engine, sd1_controlnet, control_map, tmp_path):
    import shutil

    from underpaint.models.registry import ModelsDir

    (tmp_path / "controlnet").mkdir()
    shutil.copy(sd1_controlnet, tmp_path / "controlnet" / "control_v11p_sd15_canny.safetensors")
    previous = getattr(sd1_engine.model, "models_dir", None)
    sd1_engine.model.models_dir = ModelsDir(tmp_path)
    try:
        text = _txt2img(sd1_engine, [ControlUnit(image=control_map, module="canny")], steps=1).infotexts[0]
    finally:
        sd1_engine.model.models_dir = previous
    assert "Model: control_v11p_sd15_canny [" in text


def test_controlnet_with_a_9_channel_inpainting_model(tmp_path, photo, sd1_controlnet, control_map):
    """The ControlNet sees the 4 latent channels of an inpainting UNet's 9-channel input."""
    from tiny_models import write_sd1
    from underpaint.pipeline.engine import Engine

    engine = Engine.load(write_sd1(tmp_path / "tiny-inpaint.safetensors", inpaint=True), device="cpu", dtype="fp32")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    common = dict(prompt="a door", init_images=(photo.resize((64, 64)),), mask=mask, strength=0.8, steps=2,
                  sampler="Euler", seed=4)
    plain = engine.generate(GenerationParams(**common)).images[0]
    unit = ControlUnit(image=control_map, module="none", model=str(sd1_controlnet))
    steered = engine.generate(GenerationParams(control_units=(unit,), **common)).images[0]
    assert steered.size == plain.size and np.abs(_pixels(plain) - _pixels(steered)).max() > 2


def test_only_masked_inpainting_crops_the_control_map_with_the_picture(sd1_engine, photo, sd1_controlnet, control_map,
                                                                      monkeypatch):
    from underpaint.params import InpaintOptions
    from underpaint.pipeline import control as control_mod
    from underpaint.pipeline.inpaint import prepare_inpaint
    from underpaint.preprocess.common import fit_map

    seen = []
    real = control_mod.prepare_control

    def spy(*args, **kwargs):
        setup = real(*args, **kwargs)
        seen.append(setup.maps[0])
        return setup

    monkeypatch.setattr(control_mod, "prepare_control", spy)
    image = photo.resize((64, 64))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 40, 24, 56))
    params = GenerationParams(prompt="a window", init_images=(image,), mask=mask, strength=0.75, steps=2, seed=1,
                              width=64, height=64, inpaint=InpaintOptions(full_res=True, full_res_padding=4),
                              control_units=(ControlUnit(image=control_map, module="none", model=str(sd1_controlnet)),))
    sd1_engine.generate(params)
    box = prepare_inpaint(params, 64, 64).crop
    assert (box.x2 - box.x1) < 64  # a real crop
    expected = fit_map(np.asarray(control_map.crop((box.x1, box.y1, box.x2, box.y2))), 64, 64, "Crop and Resize")
    assert np.array_equal(seen[0], expected)
    whole = fit_map(np.asarray(control_map), 64, 64, "Crop and Resize")
    assert not np.array_equal(seen[0], whole)
