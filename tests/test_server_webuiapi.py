"""The real ``webuiapi`` client (from PyPI) against a real uvicorn serving a real engine on a tiny checkpoint."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

from test_server_support import live_server
from underpaint.server.app import create_app
from underpaint.server.config import ServerConfig

webuiapi = pytest.importorskip("webuiapi")

SIZE = {"width": 64, "height": 64}


@pytest.fixture(scope="module")
def server(sd1_file, tmp_path_factory):
    models = tmp_path_factory.mktemp("served-models")
    (models / "checkpoints").mkdir()
    (models / "checkpoints" / "tiny-sd1.safetensors").symlink_to(sd1_file)
    app = create_app(ServerConfig(models_dir=models, device="cpu", dtype="fp32"))
    with live_server(app) as base:
        port = int(base.rsplit(":", 1)[1])
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=3)
        yield api


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_txt2img_is_reproducible_and_carries_its_infotext(server):
    first = server.txt2img(prompt="a lighthouse at dusk", negative_prompt="blurry", seed=1234, cfg_scale=6, **SIZE)
    again = server.txt2img(prompt="a lighthouse at dusk", negative_prompt="blurry", seed=1234, cfg_scale=6, **SIZE)
    assert first.image.size == (64, 64)
    assert np.array_equal(_pixels(first.image), _pixels(again.image))
    assert first.info["seed"] == 1234 and first.info["sampler_name"] == "Euler a"
    assert first.info["sd_model_name"] == "tiny-sd1" and len(first.info["sd_model_hash"]) == 10
    text = first.image.info["parameters"]
    assert text == first.info["infotexts"][0]
    assert text.startswith("a lighthouse at dusk\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a")
    assert first.parameters["prompt"] == "a lighthouse at dusk"


def test_txt2img_with_hires_fix(server):
    result = server.txt2img(prompt="a lighthouse at dusk", seed=5, enable_hr=True, hr_scale=1.5,
                            hr_upscaler=webuiapi.HiResUpscaler.LatentNearestExact, hr_second_pass_steps=2,
                            denoising_strength=0.5, **SIZE)
    assert result.image.size == (96, 96)
    assert (result.info["width"], result.info["height"]) == (64, 64)  # A1111 reports the first pass's size
    assert "Denoising strength: 0.5, Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Latent (nearest-exact)" \
        in result.image.info["parameters"]
    assert "Lanczos" in [u["name"] for u in server.get_upscalers()]
    assert "Latent (bicubic antialiased)" in [m["name"] for m in server.get_latent_upscale_modes()]


def test_img2img_and_inpaint_with_a_mask(server, photo):
    result = server.img2img(images=[photo], prompt="an oil painting", denoising_strength=0.5, seed=7,
                            width=96, height=64)
    assert result.image.size == (96, 64) and result.info["denoising_strength"] == 0.5
    assert result.parameters["init_images"] is None  # not echoed back

    mask = Image.new("L", photo.size, 0)
    mask.paste(255, (30, 16, 62, 44))
    inpainted = server.img2img(images=[photo], mask_image=mask, prompt="a red ball", denoising_strength=0.75,
                               mask_blur=0, inpainting_fill=1, inpaint_full_res=False, seed=7, width=96, height=64)
    out, src = _pixels(inpainted.image), _pixels(photo)
    keep = np.asarray(mask) == 0
    assert np.array_equal(out[keep], src[keep])  # untouched outside the mask
    assert (out[~keep] != src[~keep]).any()


def test_lists_options_and_png_info(server):
    assert "Euler a" in server.util_get_sampler_names()
    assert "karras" in server.util_get_scheduler_names()
    titles = server.util_get_model_names()
    assert len(titles) == 1 and titles[0].startswith("tiny-sd1.safetensors")
    assert server.util_get_current_model() == titles[0]
    assert server.set_options({"sd_model_checkpoint": titles[0], "CLIP_stop_at_last_layers": 1}) is None
    assert server.get_options()["CLIP_stop_at_last_layers"] == 1
    for listing in (server.get_sd_vae(), server.get_upscalers(), server.get_loras(), server.get_prompt_styles(),
                    server.get_hypernetworks(), server.get_face_restorers(), server.get_realesrgan_models()):
        assert isinstance(listing, list)
    assert server.get_scripts() == {
        "txt2img": ["prompt matrix", "prompts from file or textbox", "x/y/z plot", "controlnet", "freeu integrated",
                    "adetailer"],
        "img2img": ["loopback", "outpainting mk2", "poor man's outpainting", "prompt matrix",
                    "prompts from file or textbox", "sd upscale", "x/y/z plot",
                    "controlnet", "freeu integrated", "adetailer", "soft inpainting"]}
    assert "ram" in server.get_memory()
    assert server.controlnet_version() == 2

    made = server.txt2img(prompt="a red kite", seed=3, **SIZE)
    info = server.png_info(made.image)
    assert info.info == made.image.info["parameters"]
    assert info.parameters["Prompt"] == "a red kite" and info.parameters["Seed"] == "3"


def test_extras_and_interrogate(server, photo):
    """webuiapi's Extras call upscales with a built-in upscaler; interrogation without a BLIP captioner in the
    models folder is a 404 naming it."""
    result = server.extra_single_image(image=photo, upscaler_1=webuiapi.Upscaler.Lanczos, upscaling_resize=2)
    assert result.image.size == (192, 128)
    assert result.info == "<p>Postprocess upscale by: 2.0, Postprocess upscaler: Lanczos</p>"
    batch = server.extra_batch_images(images=[photo, photo.transpose(0)], upscaler_1=webuiapi.Upscaler.Nearest,
                                      resize_mode=1, upscaling_resize_w=48, upscaling_resize_h=32)
    assert [image.size for image in batch.images] == [(48, 32), (48, 32)]
    with pytest.raises(RuntimeError, match="404.*BLIP"):
        server.interrogate(photo)


def test_progress_and_interrupt_mid_job(server):
    outcome = {}

    def long_job():
        outcome["result"] = server.txt2img(prompt="a slow sunset", seed=5, steps=150, **SIZE)

    worker = threading.Thread(target=long_job)
    worker.start()
    deadline = time.monotonic() + 60
    progress = server.get_progress()
    while progress["state"]["sampling_step"] < 2:
        assert time.monotonic() < deadline, progress
        time.sleep(0.02)
        progress = server.get_progress()
    assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 150
    server.interrupt()
    worker.join(60)
    result = outcome["result"]
    assert len(result.images) <= 1  # what was finished: the interrupted batch, as A1111 returns it
    assert server.get_progress()["state"]["job_count"] == 0
    after = server.txt2img(prompt="after the interrupt", seed=5, **SIZE)  # the next job is unaffected
    assert after.image.size == (64, 64)
