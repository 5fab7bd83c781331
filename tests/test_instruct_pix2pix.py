"""InstructPix2Pix edit models (8-channel UNets): the picture's latent beside the sampler's, and A1111's
"Image CFG Scale", checked against diffusers' StableDiffusionInstructPix2PixPipeline on the same tiny weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from underpaint.params import GenerationParams


@pytest.fixture(scope="module")
def edit_engine(tmp_path_factory):
    from tiny_models import write_sd1

    from underpaint.pipeline.engine import Engine

    path = write_sd1(tmp_path_factory.mktemp("ip2p") / "tiny-ip2p.safetensors", edit=True, seed=11)
    return Engine.load(path, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def picture():
    y, x = np.mgrid[0:64, 0:64]
    return Image.fromarray(np.stack([x * 4, y * 4, 255 - x * 2], -1).astype(np.uint8))


def _diffusers(engine, picture, *, steps: int, cfg: float, image_cfg: float, seed: int):
    from diffusers import EulerDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    m = engine.model
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=m.vae, text_encoder=m.text_encoders[0], tokenizer=m.tokenizers[0], unet=m.unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         num_train_timesteps=1000, timestep_spacing="linspace"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt="make it snowy", negative_prompt="", image=picture, num_inference_steps=steps,
                guidance_scale=cfg, image_guidance_scale=image_cfg, generator=torch.Generator().manual_seed(seed),
                output_type="pil").images[0]


def test_edit_model_is_detected_and_recorded(edit_engine, picture):
    assert edit_engine.model.spec.is_edit and edit_engine.model.spec.in_channels == 8
    result = edit_engine.generate(GenerationParams(init_images=(picture,), prompt="make it snowy", steps=2,
                                                   sampler="Euler", seed=3, rng="cpu", image_cfg_scale=1.25))
    assert "Image CFG scale: 1.25," in result.infotexts[0]


@pytest.mark.parametrize("image_cfg", [1.5, 1.0])
def test_matches_diffusers_instruct_pix2pix(edit_engine, picture, image_cfg):
    """From pure noise (strength 1, every step: the pipeline's own procedure) with Euler: the same picture."""
    ours = edit_engine.generate(GenerationParams(
        init_images=(picture,), prompt="make it snowy", steps=4, sampler="Euler", seed=7, rng="cpu", strength=1.0,
        fix_steps=True, cfg_scale=6.0, image_cfg_scale=image_cfg)).images[0]
    theirs = _diffusers(edit_engine, picture, steps=4, cfg=6.0, image_cfg=image_cfg, seed=7)
    diff = np.abs(np.asarray(ours, dtype=int) - np.asarray(theirs, dtype=int))
    assert diff.max() <= 1, diff.max()


def test_image_guidance_moves_the_picture(edit_engine, picture):
    def made(scale):
        return np.asarray(edit_engine.generate(GenerationParams(
            init_images=(picture,), prompt="make it snowy", steps=2, sampler="Euler", seed=3, rng="cpu",
            image_cfg_scale=scale)).images[0], dtype=int)

    assert np.abs(made(1.0) - made(2.5)).mean() > 0.5


def test_api_lists_the_edit_model_and_takes_image_cfg_scale(edit_engine, picture, sd1_file, tmp_path):
    import json
    import shutil

    from test_server_support import png_b64, real_api

    (tmp_path / "checkpoints").mkdir()
    shutil.copy(edit_engine.model.path, tmp_path / "checkpoints" / "tiny-ip2p.safetensors")
    shutil.copy(sd1_file, tmp_path / "checkpoints" / "tiny-sd1.safetensors")
    with real_api(tmp_path) as client:
        listed = {m["model_name"]: m["edit"] for m in client.get("/sdapi/v1/sd-models").json()}
        assert listed == {"tiny-ip2p": True, "tiny-sd1": False}
        body = {"init_images": [png_b64(picture)], "prompt": "make it snowy", "steps": 2, "sampler_name": "Euler",
                "seed": 3, "width": 64, "height": 64, "image_cfg_scale": 1.25, "override_settings": {"sd_model_checkpoint": "tiny-ip2p",
                                                                        "randn_source": "CPU"}}
        r = client.post("/sdapi/v1/img2img", json=body)
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert "Image CFG scale: 1.25," in info["infotexts"][0]
        ours = edit_engine.generate(GenerationParams(init_images=(picture,), prompt="make it snowy", steps=2,
                                                     sampler="Euler", seed=3, rng="cpu", image_cfg_scale=1.25))
        from test_server_support import decode_b64

        assert np.array_equal(np.asarray(decode_b64(r.json()["images"][0]).convert("RGB")),
                              np.asarray(ours.images[0]))
        plain = client.post("/sdapi/v1/img2img", json={**body, "override_settings": {"sd_model_checkpoint": "tiny-sd1"}})
        assert plain.status_code == 200 and "Image CFG scale" not in plain.json()["info"]  # other models: not recorded
        r = client.post("/sdapi/v1/img2img", json={**body, "image_cfg_scale": -1})
        assert r.status_code == 422 and r.json()["field"] == "image_cfg_scale", r.text


def test_cli_image_cfg_and_infotext(edit_engine, picture, tmp_path):
    from cli_runner import run_cli

    picture.save(tmp_path / "in.png")
    common = ["img2img", str(tmp_path / "in.png"), "-p", "make it snowy", "--steps", "2", "--sampler", "Euler",
              "--seed", "3", "--rng", "cpu", "--model", str(edit_engine.model.path), "--device", "cpu",
              "--dtype", "fp32"]
    proc = run_cli(*common, "--image-cfg", "2", "-o", str(tmp_path / "a.png"))
    assert proc.returncode == 0, proc.stderr
    made = Image.open(tmp_path / "a.png")
    assert "Image CFG scale: 2," in made.text["parameters"]
    # the infotext brings the Image CFG scale back
    proc = run_cli(*common, "--from-infotext", str(tmp_path / "a.png"), "-o", str(tmp_path / "b.png"))
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), np.asarray(made))


def test_xyz_image_cfg_scale_axis(picture):
    from underpaint.params import XYZPlotOptions
    from underpaint.pipeline import xyz_plot

    params = GenerationParams(init_images=(picture,), prompt="x", xyz_plot=XYZPlotOptions(
        x_type="Image CFG Scale", x_values="1, 2.5"))
    assert [cell.params.image_cfg_scale for cell in xyz_plot.plan(params).cells] == [1.0, 2.5]
    assert xyz_plot.label("Image CFG Scale", 2.5) == "Image CFG Scale: 2.5"


def test_diffusers_folder_loads_as_an_edit_model(edit_engine, picture, tmp_path):
    """An InstructPix2Pix diffusers folder (as timbrooks/instruct-pix2pix ships) loads as the same edit model."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    from underpaint.models.detect import is_edit_checkpoint
    from underpaint.pipeline.engine import Engine

    m = edit_engine.model
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=m.vae, text_encoder=m.text_encoders[0], tokenizer=m.tokenizers[0], unet=m.unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "ip2p")
    assert is_edit_checkpoint(tmp_path / "ip2p") and is_edit_checkpoint(m.path)
    folder = Engine.load(tmp_path / "ip2p", device="cpu", dtype="fp32")
    assert folder.model.spec.is_edit
    params = GenerationParams(init_images=(picture,), prompt="make it snowy", steps=2, sampler="Euler", seed=3,
                              rng="cpu")
    assert np.array_equal(np.asarray(folder.generate(params).images[0]), np.asarray(edit_engine.generate(params).images[0]))


@pytest.mark.parametrize("mode", ["Balanced", "ControlNet is more important"])
def test_edit_model_with_a_controlnet_unit(edit_engine, picture, tmp_path, mode):
    """A ControlNet unit on an edit model sees the sampler's 4 latent channels and changes the picture."""
    from tiny_controlnet import write_controlnet

    from underpaint.pipeline.control import ControlUnit

    net = write_controlnet(tmp_path / "control_sd15_tiny.safetensors")
    base = dict(init_images=(picture,), prompt="make it snowy", steps=2, sampler="Euler", seed=3, rng="cpu")
    plain = edit_engine.generate(GenerationParams(**base)).images[0]
    unit = ControlUnit(module="none", image=picture, model=str(net), weight=2.0, control_mode=mode)
    controlled = edit_engine.generate(GenerationParams(**base, control_units=(unit,))).images[0]
    assert np.abs(np.asarray(controlled, dtype=int) - np.asarray(plain, dtype=int)).mean() > 0.5
