"""The A1111 wire: request fields, response shapes, lists, options, png-info (fake engine, in process)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from test_server_support import FakeBackend, decode_b64, make_models_dir, png_b64
from underpaint.server.app import create_app
from underpaint.server.config import ServerConfig

# Processed.js() in A1111 1.10: the keys clients read from `info`.
INFO_KEYS = {
    "prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed",
    "all_subseeds", "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps", "batch_size",
    "restore_faces", "face_restoration_model", "sd_model_name", "sd_model_hash", "sd_vae_name", "sd_vae_hash",
    "seed_resize_from_w", "seed_resize_from_h", "denoising_strength", "extra_generation_params",
    "index_of_first_image", "infotexts", "styles", "job_timestamp", "clip_skip", "is_using_inpainting_conditioning",
    "version",
}


@pytest.fixture()
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture()
def client(tmp_path, backend):
    app = create_app(ServerConfig(models_dir=make_models_dir(tmp_path), preload=False), loader=backend)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        yield c


def test_txt2img_response_has_a1111_shape(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red barn", "negative_prompt": "fog", "steps": 3,
                                               "width": 64, "height": 96, "seed": 42, "batch_size": 2,
                                               "sampler_name": "Euler a"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"images", "parameters", "info"}
    assert len(body["images"]) == 2
    assert not body["images"][0].startswith("data:")
    image = decode_b64(body["images"][0])
    assert image.format == "PNG" and image.size == (64, 96)
    info = json.loads(body["info"])
    assert INFO_KEYS <= set(info)
    assert info["seed"] == 42 and info["all_seeds"] == [42, 43]
    assert info["prompt"] == "a red barn" and info["all_negative_prompts"] == ["fog", "fog"]
    assert info["sampler_name"] == "Euler a" and info["sd_model_name"] == "alpha"
    assert info["sd_model_hash"] == "0123456789"
    # Each PNG carries its own infotext, which is also listed in `info`.
    assert image.info["parameters"] == info["infotexts"][0]
    assert "Seed: 42" in info["infotexts"][0] and "Seed: 43" in info["infotexts"][1]
    # The request is echoed with A1111's defaults filled in.
    assert body["parameters"]["prompt"] == "a red barn" and body["parameters"]["cfg_scale"] == 7.0
    assert body["parameters"]["sampler_index"] == "Euler"
    assert r.headers["X-Underpaint-Job"]


def test_img2img_echo_leaves_images_out_unless_asked(client, photo):
    payload = {"init_images": ["data:image/png;base64," + png_b64(photo)], "mask": png_b64(photo.convert("L")),
               "denoising_strength": 0.4, "steps": 2, "width": 64, "height": 64}
    body = client.post("/sdapi/v1/img2img", json=payload).json()
    assert body["parameters"]["init_images"] is None and body["parameters"]["mask"] is None
    assert "include_init_images" not in body["parameters"]
    assert json.loads(body["info"])["denoising_strength"] == 0.4
    body = client.post("/sdapi/v1/img2img", json={**payload, "include_init_images": True}).json()
    assert body["parameters"]["init_images"] == payload["init_images"]


def test_img2img_fields_reach_generation_params(tmp_path, photo):
    backend = FakeBackend()
    seen = backend.params
    app = create_app(ServerConfig(models_dir=make_models_dir(tmp_path), preload=False), loader=backend)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        r = c.post("/sdapi/v1/img2img", json={
            "init_images": [png_b64(photo)], "mask": png_b64(photo.convert("L")), "denoising_strength": 0.3,
            "steps": 5, "cfg_scale": 4.5, "sampler_index": "DPM++ 2M Karras", "seed": 7, "subseed": 9,
            "subseed_strength": 0.25, "width": 128, "height": 64, "resize_mode": 1, "mask_blur": 6,
            "inpainting_fill": 2, "inpaint_full_res": False, "inpaint_full_res_padding": 12,
            "inpainting_mask_invert": 1, "eta": 0.5, "s_tmax": 0,
            "override_settings": {"CLIP_stop_at_last_layers": 2, "eta_noise_seed_delta": 31337,
                                  "randn_source": "CPU", "img2img_fix_steps": True, "inpainting_mask_weight": 0.25},
        })
    assert r.status_code == 200, r.text
    p = seen[0]
    assert (p.strength, p.steps, p.cfg_scale, p.sampler, p.scheduler) == (0.3, 5, 4.5, "DPM++ 2M", "Automatic")
    assert (p.seed, p.subseed, p.subseed_strength, p.width, p.height, p.resize_mode) == (7, 9, 0.25, 128, 64, 1)
    assert (p.clip_skip, p.eta_noise_seed_delta, p.rng, p.fix_steps) == (2, 31337, "cpu", True)
    assert p.init_images[0].size == photo.size and p.mask is not None
    assert p.inpaint.mask_blur_x == p.inpaint.mask_blur_y == 6
    assert p.inpaint.masked_content == "latent noise" and p.inpaint.full_res is False
    assert p.inpaint.full_res_padding == 12 and p.inpaint.invert is True
    assert p.inpaint.mask_weight == 0.25  # A1111's "Conditional mask weight" setting
    assert p.sampler_options.eta == 0.5 and p.sampler_options.s_tmax == float("inf")
    assert p.extra_networks is True


def test_disable_extra_networks_reaches_generation_params(client, backend):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a barn <lora:ink:1> <hypernet:anime:0.5>", "steps": 2,
                                               "width": 64, "height": 64, "disable_extra_networks": True})
    assert r.status_code == 200, r.text
    p = backend.params[-1]
    assert p.extra_networks is False and p.prompt == "a barn <lora:ink:1> <hypernet:anime:0.5>"


def test_add_hypernetwork_to_prompt_setting(client, backend, tmp_path):
    """A1111's "Add hypernetwork to prompt" (sd_hypernetwork) ends each prompt with the network's tag at the
    "Default multiplier for extra networks", unless the prompt has a tag of it; also in scripts' prompts and
    a hires prompt of its own; not with disable_extra_networks; unknown names are refused naming the field."""
    (tmp_path / "hypernetworks" / "styles").mkdir(parents=True)
    (tmp_path / "hypernetworks" / "styles" / "anime.pt").write_bytes(b"x")
    base = {"steps": 1, "width": 64, "height": 64}
    options = client.get("/sdapi/v1/options").json()
    assert (options["sd_hypernetwork"], options["extra_networks_default_multiplier"]) == ("None", 1.0)
    r = client.post("/sdapi/v1/options", json={"sd_hypernetwork": "animu", "eta_noise_seed_delta": 5})
    assert r.status_code == 422 and r.json()["field"] == "sd_hypernetwork" and "'anime'" in r.json()["detail"]
    assert client.get("/sdapi/v1/options").json()["eta_noise_seed_delta"] == 0  # nothing changed
    assert client.post("/sdapi/v1/options", json={"sd_hypernetwork": "anime"}).status_code == 200

    def prompts(**body):
        r = client.post("/sdapi/v1/txt2img", json={**base, **body})
        assert r.status_code == 200, r.text
        return backend.params[-1]

    assert prompts(prompt="a barn").prompt == "a barn<hypernet:anime:1.0>"
    assert prompts(prompt="a barn <hypernet:anime:0.3>").prompt == "a barn <hypernet:anime:0.3>"
    assert prompts(prompt="a barn", disable_extra_networks=True).prompt == "a barn"
    p = prompts(prompt="a barn", enable_hr=True, hr_prompt="a red barn", hr_scale=1.5, denoising_strength=0.5)
    assert (p.prompt, p.hires.prompt) == ("a barn<hypernet:anime:1.0>", "a red barn<hypernet:anime:1.0>")
    matrix = prompts(prompt="a barn|red|blue", script_name="prompt matrix", script_args=[])
    assert matrix.prompt_matrix.add_to_prompt("a barn, red") == "a barn, red<hypernet:anime:1.0>"
    p = prompts(prompt="a barn", override_settings={"sd_hypernetwork": "None"})
    assert p.prompt == "a barn"
    p = prompts(prompt="a barn", override_settings={"extra_networks_default_multiplier": 0.6})
    assert p.prompt == "a barn<hypernet:anime:0.6>"
    r = client.post("/sdapi/v1/txt2img", json={**base, "override_settings": {"sd_hypernetwork": "../x"}})
    assert r.status_code == 422 and r.json()["field"] == "override_settings.sd_hypernetwork"
    client.post("/sdapi/v1/options", json={"sd_hypernetwork": "None"})
    assert prompts(prompt="a barn").prompt == "a barn"


def test_infotext_field_fills_unset_fields(client):
    infotext = ("a lighthouse\nNegative prompt: people\nSteps: 4, Sampler: Euler, CFG scale: 5, Seed: 123, "
                "Size: 64x128, Clip skip: 2")
    r = client.post("/sdapi/v1/txt2img", json={"infotext": infotext, "cfg_scale": 9})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert (info["prompt"], info["negative_prompt"], info["steps"], info["seed"]) == ("a lighthouse", "people", 4, 123)
    assert (info["width"], info["height"], info["clip_skip"]) == (64, 128, 2)
    assert info["cfg_scale"] == 9  # given in the request: the request wins


@pytest.mark.parametrize(("payload", "field"), [
    ({"sampler_name": "Euler z"}, "sampler_name"),
    ({"scheduler": "Karass"}, "scheduler"),
    ({"steps": 0}, "steps"),
    ({"steps": "many"}, "steps"),
    ({"cfg_scale": "NaN"}, "cfg_scale"),
    ({"seed": 2**64}, "seed"),
    ({"width": 10}, "width"),
    ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"),
    ({"enable_hr": True, "hr_scale": 300}, "hr_scale"),
    ({"enable_hr": True, "hr_resize_x": 100000}, "hr_resize_x"),
    ({"enable_hr": True, "denoising_strength": 0}, "denoising_strength"),
    ({"enable_hr": True, "hr_sampler_name": "Euler z"}, "hr_sampler_name"),
    ({"enable_hr": True, "hr_scheduler": "Karass"}, "hr_scheduler"),
    ({"enable_hr": True, "hr_second_pass_steps": -1}, "hr_second_pass_steps"),
    ({"enable_hr": True, "hr_checkpoint_name": "gamma.safetensors"}, "hr_checkpoint_name"),
    ({"firstphase_width": 32, "firstphase_height": 64}, "firstphase_width"),
    ({"enable_hr": True, "hr_resize_x": 512, "width": 0}, "width"),
    ({"styles": ["cinematic"]}, "styles"),
    ({"script_name": "loopback"}, "script_name"),
    ({"alwayson_scripts": {"Regional Prompter": {"args": [True, {}]}}}, "alwayson_scripts"),
    # ControlNet is available: an unknown ControlNet model is named down to the unit's field.
    ({"alwayson_scripts": {"controlnet": {"args": [{"module": "canny", "model": "x"}]}}},
     "alwayson_scripts.controlnet.args[0].model"),
    ({"override_settings": {"CLIP_stop_at_last_layers": "two"}}, "override_settings.CLIP_stop_at_last_layers"),
    ({"override_settings": {"token_merging_ratio": 0.95}}, "override_settings.token_merging_ratio"),
    ({"override_settings": {"inpainting_mask_weight": 1.5}}, "override_settings.inpainting_mask_weight"),
    ({"enable_hr": True, "override_settings": {"token_merging_ratio_hr": "x"}}, "override_settings.token_merging_ratio_hr"),
    ({"override_settings": {"sd_model_checkpoint": "nope.safetensors"}}, "sd_model_checkpoint"),
    ({"override_settings": {"sd_model_checkpoint": "/etc/passwd"}}, "sd_model_checkpoint"),
    ({"override_settings": {"sd_vae": "vae-ft-mse-840000-ema-pruned.safetensors"}}, "override_settings.sd_vae"),
    ({"sampler_index": 99}, "sampler_index"),
])
def test_bad_fields_are_4xx_naming_the_field(client, payload, field):
    r = client.post("/sdapi/v1/txt2img", json={"steps": 2, "width": 64, "height": 64, **payload})
    assert 400 <= r.status_code < 500, r.text
    body = r.json()
    assert body["field"] == field, body
    assert body["error"] and body["detail"]


def test_disabled_extensions_are_accepted(client):
    r = client.post("/sdapi/v1/txt2img", json={
        "steps": 2, "width": 64, "height": 64,
        "alwayson_scripts": {"ADetailer": {"args": [False]}, "ControlNet": {"args": [{"enabled": False}]}},
    })
    assert r.status_code == 200, r.text


def test_img2img_without_images_names_init_images(client):
    r = client.post("/sdapi/v1/img2img", json={"prompt": "x"})
    assert r.status_code == 422 and r.json()["field"] == "init_images"


def test_sampler_parameter_settings_fill_what_requests_leave_out(client, backend):
    """A1111's Settings → Sampler parameters: where a request and its override_settings say nothing, the settings
    decide; their defaults leave each sampler its own eta and the schedule its own sigmas."""
    small = {"steps": 2, "width": 64, "height": 64}

    def sampler_options(**body):
        r = client.post("/sdapi/v1/txt2img", json={**small, **body})
        assert r.status_code == 200, r.text
        return backend.params[-1].sampler_options

    plain = sampler_options(sampler_name="Euler a")
    assert (plain.eta, plain.s_churn, plain.s_tmax, plain.s_noise, plain.rho, plain.discard_penultimate_sigma) == \
           (None, 0.0, float("inf"), 1.0, None, None)
    settings = {"eta_ancestral": 0.7, "eta_ddim": 0.0, "s_churn": 0.3, "s_tmax": 10, "rho": 5,
                "always_discard_next_to_last_sigma": True}
    assert client.post("/sdapi/v1/options", json=settings).status_code == 200
    assert {k: client.get("/sdapi/v1/options").json()[k] for k in settings} == settings
    chosen = sampler_options(sampler_name="Euler a")
    assert (chosen.eta, chosen.s_churn, chosen.s_tmax, chosen.rho, chosen.discard_penultimate_sigma) == \
           (0.7, 0.3, 10.0, 5.0, True)
    assert sampler_options(sampler_name="DDIM").eta is None  # eta for DDIM is at its default, 0
    assert sampler_options(sampler_name="Euler a", override_settings={"eta_ancestral": 0.2}).eta == 0.2
    assert sampler_options(sampler_name="Euler a", eta=0.5).eta == 0.5
    r = client.post("/sdapi/v1/options", json={"s_noise": -1})
    assert r.status_code == 422 and r.json()["field"] == "s_noise"


def test_sampler_index_as_legacy_integer(client):
    r = client.post("/sdapi/v1/txt2img", json={"sampler_index": 0, "steps": 2, "width": 64, "height": 64})
    assert json.loads(r.json()["info"])["sampler_name"] == "DPM++ 2M"


def test_lists_are_never_404(client):
    for path in ("sd-models", "samplers", "schedulers", "sd-vae", "loras", "embeddings", "upscalers",
                 "latent-upscale-modes", "prompt-styles", "cmd-flags", "memory", "scripts", "script-info",
                 "extensions", "face-restorers", "hypernetworks", "realesrgan-models", "sd-modules", "options",
                 "progress"):
        r = client.get(f"/sdapi/v1/{path}")
        assert r.status_code == 200, (path, r.text)
    for path in ("version", "model_list", "module_list"):
        assert client.get(f"/controlnet/{path}").status_code == 200
    for path in ("refresh-checkpoints", "refresh-loras", "refresh-vae"):
        assert client.post(f"/sdapi/v1/{path}").status_code == 200


def test_samplers_and_schedulers_come_from_the_name_table(client):
    from underpaint.sampling.names import SAMPLERS, SCHEDULES

    samplers = client.get("/sdapi/v1/samplers").json()
    assert [s["name"] for s in samplers] == [s.label for s in SAMPLERS]
    euler_a = next(s for s in samplers if s["name"] == "Euler a")
    assert "k_euler_a" in euler_a["aliases"] and euler_a["options"].get("uses_ensd") is True
    assert next(s for s in samplers if s["name"] == "DPM++ 2M")["options"]["scheduler"] == "karras"
    schedulers = client.get("/sdapi/v1/schedulers").json()
    assert [s["label"] for s in schedulers] == [s.label for s in SCHEDULES]
    assert {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
            "need_inner_model": False} in schedulers


def test_sd_models_lists_titles_and_relative_files(client):
    models = client.get("/sdapi/v1/sd-models").json()
    assert [m["title"] for m in models] == ["alpha.safetensors", "beta.safetensors"]
    assert models[0]["model_name"] == "alpha" and models[0]["filename"] == "checkpoints/alpha.safetensors"


def test_sd_models_show_the_sha256_once_known(client, tmp_path):
    """Listing never hashes a file; once the file was hashed (as a generation does for its infotext),
    its sha256 is listed, and the loaded checkpoint's in /options."""
    import hashlib

    from underpaint.models.hashes import file_sha256

    assert all(m["sha256"] is None for m in client.get("/sdapi/v1/sd-models").json())
    path = tmp_path / "checkpoints" / "alpha.safetensors"
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    alpha, beta = client.get("/sdapi/v1/sd-models").json()
    assert alpha["sha256"] == hashlib.sha256(b"placeholder").hexdigest() and alpha["hash"] == alpha["sha256"][:10]
    assert beta["sha256"] is None
    assert client.get("/sdapi/v1/options").json()["sd_checkpoint_hash"] == alpha["sha256"]


def test_options_switch_model_through_the_queue(client, backend):
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "alpha.safetensors"
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "beta.safetensors",
                                                 "CLIP_stop_at_last_layers": 2, "some_unknown_setting": 1})
    assert r.status_code == 200, r.text
    assert [p.name for p in backend.loads] == ["beta.safetensors"]
    opts = client.get("/sdapi/v1/options").json()
    assert opts["sd_model_checkpoint"] == "beta.safetensors" and opts["CLIP_stop_at_last_layers"] == 2
    info = json.loads(client.post("/sdapi/v1/txt2img", json={"steps": 1, "width": 64, "height": 64}).json()["info"])
    assert info["sd_model_name"] == "beta" and info["clip_skip"] == 2
    # A per-request override loads that model for the one job; the selection stays.
    info = json.loads(client.post("/sdapi/v1/txt2img", json={
        "steps": 1, "width": 64, "height": 64, "override_settings": {"sd_model_checkpoint": "alpha"}}).json()["info"])
    assert info["sd_model_name"] == "alpha"
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "beta.safetensors"


def test_seeds_take_64_bits_as_a1111s_and_a_batch_counts_on_round_the_top(client):
    """ComfyUI's seeds and clients' large random ones: any 64-bit number (the engine's batches wrap round
    at 2**64: tests/test_engine_img2img.py); beyond that the request is refused naming the field."""
    r = client.post("/sdapi/v1/txt2img", json={"steps": 1, "width": 64, "height": 64, "batch_size": 2,
                                               "seed": 2**64 - 1, "subseed": 2**40})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["seed"] == 2**64 - 1 and info["subseed"] == 2**40
    r = client.post("/sdapi/v1/txt2img", json={"steps": 1, "width": 64, "height": 64, "seed": 2**64})
    assert r.status_code == 422 and r.json()["field"] == "seed"


def test_internal_ping_answers_as_a1111s(client):
    r = client.get("/internal/ping")
    assert r.status_code == 200 and r.json() == {}
    assert client.get("/internal/nothing").status_code == 404


def test_images_come_back_in_the_file_format_setting(client):
    """A1111's "File format for images" (/options samples_format, jpeg_quality) decides how the API returns
    pictures: JPEG or WebP with the infotext in an EXIF UserComment. A request's override is checked but,
    as A1111 restores overrides before it encodes the answer, counts only when it is kept."""
    import base64
    import io

    from PIL import Image

    from underpaint.imageio.metadata import read_metadata

    body = {"prompt": "a barn", "steps": 1, "width": 64, "height": 64}
    assert client.post("/sdapi/v1/options", json={"samples_format": "JPG", "jpeg_quality": 90.0}).status_code == 200
    assert {k: client.get("/sdapi/v1/options").json()[k] for k in ("samples_format", "jpeg_quality")} == \
        {"samples_format": "jpg", "jpeg_quality": 90}
    r = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"samples_format": "webp"}})
    raw = base64.b64decode(r.json()["images"][0])
    assert Image.open(io.BytesIO(raw)).format == "JPEG"
    assert read_metadata(raw).infotext == json.loads(r.json()["info"])["infotexts"][0]
    r = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"samples_format": "webp"},
                                               "override_settings_restore_afterwards": False})
    raw = base64.b64decode(r.json()["images"][0])
    assert Image.open(io.BytesIO(raw)).format == "WEBP" and read_metadata(raw).infotext.startswith("a barn")
    assert client.get("/sdapi/v1/options").json()["samples_format"] == "webp"
    for bad, field in (({"samples_format": "gif"}, "samples_format"), ({"jpeg_quality": 0}, "jpeg_quality")):
        r = client.post("/sdapi/v1/options", json=bad)
        assert r.status_code == 422 and r.json()["field"] == field
    r = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"samples_format": "tiff"}})
    assert r.status_code == 422 and r.json()["field"] == "override_settings.samples_format"
    assert client.post("/sdapi/v1/options", json={"samples_format": "png"}).status_code == 200
    raw = base64.b64decode(client.post("/sdapi/v1/txt2img", json=body).json()["images"][0])
    assert Image.open(io.BytesIO(raw)).format == "PNG"


def test_clip_skip_zero_is_one_and_whole_numbers_may_come_as_floats(client, backend):
    """Clients send 0 for "the default" clip skip (A1111 stops at the last layer for anything below 2) and
    numbers as 2.0; negative values are still refused."""
    assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2.0,
                                                   "eta_noise_seed_delta": 31337.0}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2
    assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 0}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1
    r = client.post("/sdapi/v1/txt2img", json={"steps": 1, "width": 64, "height": 64,
                                               "override_settings": {"CLIP_stop_at_last_layers": 0}})
    assert r.status_code == 200 and backend.params[-1].clip_skip == 1
    r = client.post("/sdapi/v1/txt2img", json={"steps": 1, "width": 64, "height": 64,
                                               "override_settings": {"CLIP_stop_at_last_layers": -1}})
    assert r.status_code == 422 and r.json()["field"] == "override_settings.CLIP_stop_at_last_layers"
    assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1.5}).status_code == 422


def test_options_refuse_bad_values_without_changing_anything(client):
    r = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 3, "randn_source": "quantum"})
    assert r.status_code == 422 and r.json()["field"] == "randn_source"
    assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "gamma"})
    assert r.status_code == 404 and r.json()["field"] == "sd_model_checkpoint"


# --------------------------------------------------------------------------- SD VAE

VAES = ("alpha.vae.safetensors", "kl-f8-anime2.safetensors", "sdxl/vae-ft-mse.safetensors")


@pytest.fixture()
def vae_client(tmp_path, backend):
    """A server over checkpoints alpha and beta and three VAE files, one of them named like alpha."""
    models = make_models_dir(tmp_path / "models", vaes=VAES)
    app = create_app(ServerConfig(models_dir=models, preload=False), loader=backend)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        yield c


def _vae_of_job(client, **request) -> dict:
    """Run a tiny txt2img; its info's VAE record, and the parameter line of its infotext."""
    r = client.post("/sdapi/v1/txt2img", json={"steps": 1, "width": 64, "height": 64, **request})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    return {"name": info["sd_vae_name"], "hash": info["sd_vae_hash"], "infotext": info["infotexts"][0]}


def test_sd_vae_option_picks_the_vae_file_for_the_next_job(vae_client, backend, tmp_path):
    """A1111's SD VAE: "Automatic" takes a VAE file named like the checkpoint, "None" the checkpoint's
    own, a listed name that file; choosing only records it, and the next job loads it on the worker."""
    c = vae_client
    assert c.get("/sdapi/v1/sd-vae").json() == [
        {"model_name": name, "filename": f"vae/{name}"} for name in VAES]
    assert c.get("/sdapi/v1/options").json()["sd_vae"] == "Automatic"
    vae = tmp_path / "models" / "vae"
    job = _vae_of_job(c)  # Automatic: alpha.vae.safetensors starts with alpha's name
    assert backend.vaes == [vae / "alpha.vae.safetensors"]
    alpha_hash = hashlib.sha256(b"alpha.vae.safetensors").hexdigest()[:10]
    assert (job["name"], job["hash"]) == ("alpha.vae.safetensors", alpha_hash)
    assert f"Model: alpha, VAE hash: {job['hash']}, VAE: alpha.vae.safetensors, " in job["infotext"]

    assert c.post("/sdapi/v1/options", json={"sd_vae": "None"}).status_code == 200
    assert len(backend.loads) == 1  # nothing loads until a job needs the engine
    job = _vae_of_job(c)
    assert backend.vaes[-1] is None and job["name"] is None and "VAE" not in job["infotext"]

    assert c.post("/sdapi/v1/options", json={"sd_vae": "kl-f8-anime2.safetensors"}).status_code == 200
    assert c.get("/sdapi/v1/options").json()["sd_vae"] == "kl-f8-anime2.safetensors"
    job = _vae_of_job(c)
    assert backend.vaes[-1] == vae / "kl-f8-anime2.safetensors" and job["name"] == "kl-f8-anime2.safetensors"
    kl_hash = hashlib.sha256(b"kl-f8-anime2.safetensors").hexdigest()[:10]
    assert f"VAE hash: {kl_hash}, VAE: kl-f8-anime2.safetensors, " in job["infotext"]
    _vae_of_job(c)
    assert len(backend.loads) == 3  # the same checkpoint and VAE: no reload

    # Posted with a checkpoint, the VAE comes with that one load.
    assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "beta", "sd_vae": "Automatic"}).status_code == 200
    assert (backend.loads[3:], backend.vaes[3:]) == ([tmp_path / "models" / "checkpoints" / "beta.safetensors"], [None])
    assert _vae_of_job(c)["name"] is None and len(backend.loads) == 4  # nothing is named like beta
    # /reload-checkpoint loads the checkpoint with the VAE the option picks; /unload forgets both.
    c.post("/sdapi/v1/options", json={"sd_vae": "sdxl/vae-ft-mse.safetensors"})
    c.post("/sdapi/v1/reload-checkpoint")
    assert backend.vaes[-1] == vae / "sdxl" / "vae-ft-mse.safetensors" and len(backend.loads) == 5
    c.post("/sdapi/v1/unload-checkpoint")
    assert _vae_of_job(c)["name"] == "vae-ft-mse.safetensors" and len(backend.loads) == 6


def test_sd_vae_override_is_for_one_job_unless_kept(vae_client, backend):
    c = vae_client
    c.post("/sdapi/v1/options", json={"sd_vae": "None"})
    job = _vae_of_job(c, override_settings={"sd_vae": "kl-f8-anime2.safetensors"})
    assert job["name"] == "kl-f8-anime2.safetensors"
    assert c.get("/sdapi/v1/options").json()["sd_vae"] == "None"
    assert _vae_of_job(c)["name"] is None  # restored afterwards (A1111's default)
    # The override's other names for a listed file: without the extension, the file name in a subfolder.
    for name in ("kl-f8-anime2", "vae-ft-mse.safetensors"):
        assert _vae_of_job(c, override_settings={"sd_vae": name})["name"] == Path(name).stem + ".safetensors"
    # Kept: the option takes the listed name.
    job = _vae_of_job(c, override_settings={"sd_vae": "vae-ft-mse"}, override_settings_restore_afterwards=False)
    assert job["name"] == "vae-ft-mse.safetensors"
    assert c.get("/sdapi/v1/options").json()["sd_vae"] == "sdxl/vae-ft-mse.safetensors"
    assert _vae_of_job(c)["name"] == "vae-ft-mse.safetensors"
    # An empty or null override leaves the option's VAE.
    assert _vae_of_job(c, override_settings={"sd_vae": ""})["name"] == "vae-ft-mse.safetensors"
    assert [v.name if v else None for v in backend.vaes] == [
        "kl-f8-anime2.safetensors", None, "kl-f8-anime2.safetensors", "vae-ft-mse.safetensors"]


@pytest.mark.parametrize(("value", "hint"), [
    ("kl-f8-anime", "'kl-f8-anime2.safetensors'"),  # a near miss: the close names
    ("KL-F8-ANIME2.safetensors", "'kl-f8-anime2.safetensors'"),  # names are matched in their exact case
    ("automatic", "'Automatic'"),
    ("madeup", "'Automatic', 'None', 'alpha.vae.safetensors', 'kl-f8-anime2.safetensors', "
               "'sdxl/vae-ft-mse.safetensors'"),  # no near miss: the names there are
    ("../vae/kl-f8-anime2.safetensors", "'kl-f8-anime2.safetensors'"),  # never a path
    ("VAE_DIR/kl-f8-anime2.safetensors", None),
    (3, None),
    (["kl-f8-anime2.safetensors"], None),
])
def test_unknown_sd_vae_is_a_422_naming_it_and_changes_nothing(vae_client, backend, tmp_path, value, hint):
    c = vae_client
    if isinstance(value, str):
        value = value.replace("VAE_DIR", str(tmp_path / "models" / "vae"))  # the file's real path
    r = c.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2, "sd_vae": value})
    assert r.status_code == 422 and r.json()["field"] == "sd_vae", r.text
    assert r.json()["detail"].startswith("sd_vae: got ")
    if hint:
        assert hint in r.json()["detail"]
    options = c.get("/sdapi/v1/options").json()
    assert (options["sd_vae"], options["CLIP_stop_at_last_layers"]) == ("Automatic", 1)
    r = c.post("/sdapi/v1/txt2img", json={"steps": 1, "width": 64, "height": 64,
                                           "override_settings": {"sd_vae": value}})
    assert r.status_code == 422 and r.json()["field"] == "override_settings.sd_vae", r.text
    assert backend.loads == []


def test_a_vae_chosen_through_the_api_paints_as_the_engine_loaded_with_it(tmp_path, sd1_file, sd1_engine, photo):
    """The real engine over an A1111 install's folders: img2img with sd_vae set to a VAE file gives
    the picture and infotext of ``Engine.load(..., vae=that file)`` (the CLI's ``--vae``), and with
    "None" those of the checkpoint's own VAE, which differ. The checkpoint is loaded once: a VAE
    change only swaps the VAE's weights (``Engine.use_vae``)."""
    import tiny_models as tm
    from underpaint.pipeline.engine import Engine
    from underpaint.server.app import engine_loader

    models = tmp_path / "stable-diffusion-webui" / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    (models / "Stable-diffusion" / sd1_file.name).symlink_to(sd1_file)
    vae = tm.write_vae(models / "VAE" / "vae-ft-mse-840000-ema-pruned.safetensors")
    anime = tm.write_vae(models / "VAE" / "kl-f8-anime2.safetensors", seed=17)
    config = ServerConfig(models_dir=models.parent, device="cpu", dtype="fp32", preload=False)
    loads: list = []
    load = engine_loader(config)

    def counting(path, vae=None):
        loads.append((path, vae))
        return load(path, vae)

    app = create_app(config, loader=counting)
    fields = {"prompt": "an oil painting", "steps": 3, "seed": 11, "sampler_name": "Euler", "width": 64, "height": 64}
    job = {**fields, "init_images": [png_b64(photo)], "denoising_strength": 0.6}
    with TestClient(app, base_url="http://127.0.0.1") as c:
        assert c.post("/sdapi/v1/options", json={"sd_vae": vae.name}).status_code == 200
        chosen = decode_b64(c.post("/sdapi/v1/img2img", json=job).json()["images"][0])
        own = decode_b64(c.post("/sdapi/v1/img2img", json={**job, "override_settings": {"sd_vae": "None"}})
                         .json()["images"][0])
        assert c.post("/sdapi/v1/options", json={"sd_vae": anime.name}).status_code == 200
        body = c.post("/sdapi/v1/img2img", json=job).json()
        other = decode_b64(body["images"][0])
    assert loads == [(models / "Stable-diffusion" / sd1_file.name, vae)]
    expected = Engine.load(sd1_file, device="cpu", dtype="fp32", vae=vae).img2img(photo, strength=0.6, **fields)
    assert np.array_equal(np.asarray(chosen), np.asarray(expected.images[0]))
    assert chosen.info["parameters"] == expected.infotexts[0]
    vae_hash = hashlib.sha256(vae.read_bytes()).hexdigest()[:10]
    assert f", VAE hash: {vae_hash}, VAE: vae-ft-mse-840000-ema-pruned.safetensors, " in expected.infotexts[0]
    baked = sd1_engine.img2img(photo, strength=0.6, **fields)
    assert np.array_equal(np.asarray(own), np.asarray(baked.images[0]))
    assert own.info["parameters"] == baked.infotexts[0] and "VAE" not in baked.infotexts[0]
    assert not np.array_equal(np.asarray(own), np.asarray(chosen))
    expected = Engine.load(sd1_file, device="cpu", dtype="fp32", vae=anime).img2img(photo, strength=0.6, **fields)
    assert np.array_equal(np.asarray(other), np.asarray(expected.images[0]))
    assert other.info["parameters"] == expected.infotexts[0]
    anime_hash = hashlib.sha256(anime.read_bytes()).hexdigest()[:10]
    assert f", VAE hash: {anime_hash}, VAE: kl-f8-anime2.safetensors, " in expected.infotexts[0]
    info = json.loads(body["info"])
    assert (info["sd_vae_name"], info["sd_vae_hash"]) == ("kl-f8-anime2.safetensors", anime_hash)


class SwappingBackend(FakeBackend):
    """Fake engines with ``use_vae``, as the real engine has: ``fits`` False makes it refuse (a VAE
    of another config), ``fails`` makes it raise; every call is recorded in ``swaps``."""

    def __init__(self, fits: bool = True, fails: bool = False):
        super().__init__()
        self.fits, self.fails, self.swaps = fits, fails, []

    def __call__(self, path, vae=None):
        engine = super().__call__(path, vae)

        def use_vae(new):
            self.swaps.append(new)
            if self.fails:
                raise RuntimeError("the fake VAE file is damaged")
            if self.fits:
                engine.vae = new
            return self.fits

        engine.use_vae = use_vae
        return engine


def _swapping_client(tmp_path, backend):
    models = make_models_dir(tmp_path / "models", vaes=VAES)
    return TestClient(create_app(ServerConfig(models_dir=models, preload=False), loader=backend),
                      base_url="http://127.0.0.1")


def test_sd_vae_changes_swap_the_vae_of_the_loaded_checkpoint(tmp_path):
    """With the checkpoint loaded, a VAE change goes to the engine's use_vae (no load), for the
    option and a one-job override alike, and the infotexts record the VAE each job used; another
    checkpoint is a load, with its VAE."""
    backend = SwappingBackend()
    vae = tmp_path / "models" / "vae"
    with _swapping_client(tmp_path, backend) as c:
        assert _vae_of_job(c)["name"] == "alpha.vae.safetensors"
        c.post("/sdapi/v1/options", json={"sd_vae": "kl-f8-anime2.safetensors"})
        job = _vae_of_job(c)
        kl_hash = hashlib.sha256(b"kl-f8-anime2.safetensors").hexdigest()[:10]
        assert f"VAE hash: {kl_hash}, VAE: kl-f8-anime2.safetensors, " in job["infotext"]
        job = _vae_of_job(c, override_settings={"sd_vae": "None"})
        assert job["name"] is None and "VAE" not in job["infotext"]
        assert _vae_of_job(c)["name"] == "kl-f8-anime2.safetensors"
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("alpha")
        assert backend.loads == [tmp_path / "models" / "checkpoints" / "alpha.safetensors"]
        assert backend.swaps == [vae / "kl-f8-anime2.safetensors", None, vae / "kl-f8-anime2.safetensors"]
        c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "beta", "sd_vae": "sdxl/vae-ft-mse.safetensors"})
        assert backend.loads[1:] == [tmp_path / "models" / "checkpoints" / "beta.safetensors"]
        assert backend.vaes[1:] == [vae / "sdxl" / "vae-ft-mse.safetensors"] and len(backend.swaps) == 3


def test_a_vae_the_engine_cannot_swap_in_is_loaded_with_the_checkpoint(tmp_path):
    backend = SwappingBackend(fits=False)
    vae = tmp_path / "models" / "vae"
    with _swapping_client(tmp_path, backend) as c:
        _vae_of_job(c)
        c.post("/sdapi/v1/options", json={"sd_vae": "kl-f8-anime2.safetensors"})
        assert _vae_of_job(c)["name"] == "kl-f8-anime2.safetensors"
    assert backend.swaps == [vae / "kl-f8-anime2.safetensors"]
    assert backend.vaes == [vae / "alpha.vae.safetensors", vae / "kl-f8-anime2.safetensors"]


def test_a_vae_swap_that_fails_leaves_no_engine(tmp_path):
    """As a failed load: the job fails, and the next one loads the checkpoint again."""
    backend = SwappingBackend(fails=True)
    with _swapping_client(tmp_path, backend) as c:
        _vae_of_job(c)
        c.post("/sdapi/v1/options", json={"sd_vae": "kl-f8-anime2.safetensors"})
        r = c.post("/sdapi/v1/txt2img", json={"steps": 1, "width": 64, "height": 64})
        assert r.status_code == 500 and "damaged" in r.text
        assert c.app.state.underpaint.slot.engine is None
        backend.fails = False
        assert _vae_of_job(c)["name"] == "kl-f8-anime2.safetensors"
    assert len(backend.loads) == 2 and len(backend.swaps) == 1


def test_unload_and_reload_checkpoint(client, backend):
    assert client.post("/sdapi/v1/reload-checkpoint").json() == {}
    assert client.post("/sdapi/v1/unload-checkpoint").json() == {}
    assert client.post("/sdapi/v1/txt2img", json={"steps": 1, "width": 64, "height": 64}).status_code == 200
    assert len(backend.loads) == 2  # reload, then again after the unload


def test_png_info_round_trip(client):
    body = client.post("/sdapi/v1/txt2img", json={"prompt": "a boat", "negative_prompt": "rain", "steps": 3,
                                                  "seed": 5, "width": 64, "height": 64}).json()
    r = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + body["images"][0]})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["info"] == json.loads(body["info"])["infotexts"][0]
    params = got["parameters"]
    assert params["Prompt"] == "a boat" and params["Negative prompt"] == "rain"
    assert params["Steps"] == "3" and params["Seed"] == "5" and params["Size-1"] == "64"
    assert params["Clip skip"] == "1"  # A1111's reader fills in defaults


def test_png_info_without_parameters(client):
    r = client.post("/sdapi/v1/png-info", json={"image": png_b64(Image.new("RGB", (8, 8)))})
    assert r.status_code == 200 and r.json() == {"info": "", "items": {}, "parameters": {}}


def test_send_images_false(client):
    body = client.post("/sdapi/v1/txt2img", json={"steps": 1, "width": 64, "height": 64, "send_images": False}).json()
    assert body["images"] == [] and json.loads(body["info"])["infotexts"]


def test_cmd_flags_never_show_credentials(tmp_path, backend):
    from underpaint.server.config import parse_api_auth

    config = ServerConfig(models_dir=make_models_dir(tmp_path), preload=False, api_auth=parse_api_auth("me:s3cret"))
    with TestClient(create_app(config, loader=backend), base_url="http://127.0.0.1") as c:
        r = c.get("/sdapi/v1/cmd-flags", auth=("me", "s3cret"))
    assert r.status_code == 200 and "s3cret" not in r.text and r.json()["api_auth"] is True


@pytest.mark.parametrize(("vram", "vae_precision", "flags"), [
    ("high", "auto", (False, False, False)), ("medium", "fp32", (True, False, True)),
    ("low", "bf16", (False, True, False))])
def test_cmd_flags_name_the_memory_mode_and_vae_precision_as_a1111(tmp_path, backend, vram, vae_precision, flags):
    config = ServerConfig(models_dir=make_models_dir(tmp_path), preload=False, vram=vram, vae_precision=vae_precision)
    with TestClient(create_app(config, loader=backend), base_url="http://127.0.0.1") as c:
        body = c.get("/sdapi/v1/cmd-flags").json()
    assert (body["medvram"], body["lowvram"], body["no_half_vae"]) == flags


def test_controlnet_routes(client, photo):
    assert client.get("/controlnet/version").json() == {"version": 2}
    assert client.get("/controlnet/model_list").json() == {"model_list": []}
    modules = client.get("/controlnet/module_list").json()
    assert "canny" in modules["module_list"] and modules["module_detail"]["canny"]["model_free"] is True
    r = client.post("/controlnet/detect", json={"controlnet_module": "cany", "controlnet_input_images": []})
    assert r.status_code == 422 and r.json()["field"] == "controlnet_module" and "canny" in r.json()["detail"]
    r = client.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_input_images": []})
    assert r.status_code == 422 and r.json()["field"] == "controlnet_input_images"
    r = client.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_processor_res": 64,
                                                "controlnet_input_images": [png_b64(photo)]})
    assert r.status_code == 200, r.text
    edges = decode_b64(r.json()["images"][0])
    assert edges.mode == "RGB" and min(edges.size) == 64
    assert set(np.unique(np.asarray(edges))) <= {0, 255}  # an edge map
    # thresholds beyond the extension's sliders (a blur's sigma sets its work and memory) are refused
    for module, key, value in (("blur_gaussian", "controlnet_threshold_a", 3e8), ("canny", "controlnet_threshold_b", 900),
                               ("tile_resample", "controlnet_threshold_a", 0.5)):
        r = client.post("/controlnet/detect", json={"controlnet_module": module, key: value,
                                                    "controlnet_input_images": [png_b64(photo)]})
        assert r.status_code == 422 and r.json()["field"] == key, r.text
    unit = {"enabled": True, "module": "blur_gaussian", "threshold_a": 1e9, "image": png_b64(photo)}
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64,
                                               "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert r.status_code == 422 and r.json()["field"].endswith("threshold_a") and "64" in r.json()["detail"], r.text


def test_openapi_documents_the_hand_written_models(client):
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for name in ("Txt2ImgRequest", "Img2ImgRequest", "TextToImageResponse", "ProgressResponse", "SDModelItem"):
        assert name in schemas
    assert "/sdapi/v1/img2img" in spec["paths"] and "/underpaint/v1/queue" in spec["paths"]
    assert client.get("/docs").status_code == 200


def test_create_app_does_no_work(tmp_path, backend):
    """Building the app neither loads a model nor starts a thread."""
    import threading

    before = set(threading.enumerate())  # threads of earlier tests may end meanwhile: only new ones count
    create_app(ServerConfig(models_dir=make_models_dir(tmp_path)), loader=backend)
    assert backend.loads == [] and set(threading.enumerate()) - before == set()


def test_preload_loads_the_default_model_at_startup(tmp_path, backend):
    app = create_app(ServerConfig(models_dir=make_models_dir(tmp_path)), loader=backend)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        for _ in range(100):
            if backend.loads:
                break
            import time

            time.sleep(0.02)
        assert [p.name for p in backend.loads] == ["alpha.safetensors"]
        assert c.get("/underpaint/v1/info").json()["model"] == "alpha"


def test_embeddings_and_loras_are_listed_from_the_models_folder(client, tmp_path):
    import torch
    from safetensors.torch import save_file

    (tmp_path / "embeddings").mkdir()
    save_file({"emb_params": torch.zeros(2, 768)}, str(tmp_path / "embeddings" / "easynegative.safetensors"))
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)},
              str(tmp_path / "embeddings" / "xl-style.safetensors"))
    (tmp_path / "embeddings" / "broken.pt").write_bytes(b"not a pickle")
    (tmp_path / "loras" / "styles").mkdir(parents=True)
    (tmp_path / "loras" / "styles" / "ink.safetensors").write_bytes(b"x")

    before = client.get("/sdapi/v1/embeddings").json()  # no model loaded yet: nothing to rule out
    assert set(before["loaded"]) == {"easynegative", "xl-style"} and before["skipped"] == {}
    client.post("/sdapi/v1/txt2img", json={"steps": 1, "width": 64, "height": 64})  # loads the (SD1) model
    after = client.get("/sdapi/v1/embeddings").json()
    assert after["loaded"] == {"easynegative": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                                "shape": 768, "vectors": 2}}
    assert set(after["skipped"]) == {"xl-style"}
    assert client.get("/sdapi/v1/loras").json() == [
        {"name": "ink", "alias": "ink", "path": "loras/styles/ink.safetensors", "metadata": {}}]
    # A trainer's metadata comes back as A1111 sends it (JSON objects decoded); its ss_output_name is the
    # alias unless another LoRA already goes by that name.
    frequency = {"img": {"red barn": 3}}
    for file, output_name in (("barn-v2", "barn"), ("other", "ink")):
        save_file({"x": torch.zeros(1)}, str(tmp_path / "loras" / f"{file}.safetensors"),
                  metadata={"ss_output_name": output_name, "ss_tag_frequency": json.dumps(frequency),
                            "ss_network_dim": "16"})
    listed = {item["name"]: item for item in client.get("/sdapi/v1/loras").json()}
    assert listed["barn-v2"]["alias"] == "barn" and listed["other"]["alias"] == "other"
    assert listed["barn-v2"]["metadata"] == {"ss_output_name": "barn", "ss_tag_frequency": frequency,
                                             "ss_network_dim": "16"}

    # The UI's token counter: embeddings count one token per vector (no model loaded: all of them listed).
    count = client.post("/underpaint/v1/token-count", json={"prompt": "a photo of a cat, easynegative"}).json()
    assert count == {"tokens": 8, "limit": 75}
    assert client.post("/underpaint/v1/token-count", json={"prompt": "a AND b", "negative": True}).json()["tokens"] == 3
    r = client.post("/underpaint/v1/token-count", json={"prompt": "x", "steps": 0})
    assert r.status_code == 422 and r.json()["field"] == "steps"

    # The UI's cards: A1111's preview picture and card metadata beside the file.
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "loras" / "barn-v2.png")
    (tmp_path / "loras" / "barn-v2.json").write_text(json.dumps({"activation text": "red barn", "preferred weight": 0.6,
                                                                 "description": "barns", "negative text": 7}))
    cards = client.get("/underpaint/v1/extra-networks").json()
    barn = next(c for c in cards["loras"] if c["name"] == "barn-v2")
    assert barn == {"name": "barn-v2", "path": "loras/barn-v2.safetensors", "description": "barns",
                    "activation_text": "red barn", "preferred_weight": 0.6, "negative_text": "", "fits": True,
                    "preview": "/underpaint/v1/extra-networks/preview?kind=loras&file=loras%2Fbarn-v2.safetensors"}
    assert [c["name"] for c in cards["checkpoints"]] == [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
    assert {c["name"]: c["fits"] for c in cards["embeddings"]} == {"easynegative": True, "xl-style": False}
    picture = client.get(barn["preview"])
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    for query in ("kind=loras&file=loras/other.safetensors", "kind=loras&file=../../etc/passwd",
                  "kind=../loras&file=loras/barn-v2.safetensors", "kind=loras&file=loras/barn-v2.png"):
        r = client.get("/underpaint/v1/extra-networks/preview?" + query)
        assert r.status_code == 404 and r.json()["error"], query
    assert client.get("/sdapi/v1/hypernetworks").json() == []
    (tmp_path / "hypernetworks" / "anime").mkdir(parents=True)
    for name in ("anime/v2.pt", "zz.pt", "notes.txt", ".hidden.pt"):
        (tmp_path / "hypernetworks" / name).write_bytes(b"x")
    assert client.get("/sdapi/v1/hypernetworks").json() == [
        {"name": "v2", "path": "hypernetworks/anime/v2.pt"}, {"name": "zz", "path": "hypernetworks/zz.pt"}]


def test_options_can_be_posted_back_as_read(client, backend):
    """Clients read /options, change a key and post the whole dict back."""
    options = client.get("/sdapi/v1/options").json()
    options["eta_noise_seed_delta"] = 31337
    r = client.post("/sdapi/v1/options", json=options)
    assert r.status_code == 200, r.text
    assert client.get("/sdapi/v1/options").json()["eta_noise_seed_delta"] == 31337


def test_live_preview_options_round_trip_and_reach_the_job(tmp_path):
    backend = FakeBackend()
    app = create_app(ServerConfig(models_dir=make_models_dir(tmp_path), preload=False), loader=backend)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        options = c.get("/sdapi/v1/options").json()
        assert (options["show_progress_type"], options["live_previews_enable"]) == ("Approx NN", True)
        c.post("/sdapi/v1/txt2img", json={"steps": 1, "width": 64, "height": 64})
        r = c.post("/sdapi/v1/options", json={"show_progress_type": "taesd", "live_previews_enable": False})
        assert r.status_code == 200, r.text
        options = c.get("/sdapi/v1/options").json()
        assert (options["show_progress_type"], options["live_previews_enable"]) == ("TAESD", False)
        c.post("/sdapi/v1/txt2img", json={"steps": 1, "width": 64, "height": 64})
        assert c.post("/sdapi/v1/options", json=options).status_code == 200  # posted back as read
    assert [p.preview_method for p in backend.params] == ["Approx NN", "TAESD"]


@pytest.mark.parametrize("body, field", [
    ({"show_progress_type": "Approx fancy"}, "show_progress_type"),
    ({"show_progress_type": 2}, "show_progress_type"),
    ({"live_previews_enable": "yes"}, "live_previews_enable"),
    ({"live_previews_enable": 1}, "live_previews_enable"),
])
def test_live_preview_options_refuse_bad_values_without_changing_anything(client, body, field):
    r = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 4, **body})
    assert r.status_code == 422 and r.json()["field"] == field, r.text
    assert field in r.json()["detail"] and ("Approx cheap" in r.json()["detail"]) == (field == "show_progress_type")
    options = client.get("/sdapi/v1/options").json()
    assert (options["CLIP_stop_at_last_layers"], options["show_progress_type"], options["live_previews_enable"]) == (
        1, "Approx NN", True)


# --------------------------------------------------------------------------- A1111's reading of the JSON


def test_null_fields_take_their_defaults_as_in_a1111(client, backend):
    """A1111 declares its processing fields Optional: null means "not given" (generated and
    JavaScript clients send it for unset values); its API-only fields refuse null."""
    nulls = {k: None for k in ("negative_prompt", "seed", "subseed", "subseed_strength", "cfg_scale", "batch_size",
                               "n_iter", "restore_faces", "tiling", "styles", "override_settings", "enable_hr",
                               "hr_scale", "firstphase_width", "do_not_save_samples", "disable_extra_networks",
                               "override_settings_restore_afterwards", "hr_prompt")}
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a kite", "steps": 2, "width": 64, "height": 64, **nulls})
    assert r.status_code == 200, r.text
    p = backend.params[-1]
    assert (p.negative_prompt, p.cfg_scale, p.batch_size, p.n_iter, p.subseed_strength, p.hires) == ("", 7.0, 1, 1,
                                                                                                     0.0, None)
    assert 0 <= json.loads(r.json()["info"])["seed"] < 2**32  # a random seed, as for -1
    assert r.json()["parameters"]["cfg_scale"] == 7.0
    for field in ("send_images", "script_args", "alwayson_scripts"):
        r = client.post("/sdapi/v1/txt2img", json={"steps": 1, "width": 64, "height": 64, field: None})
        assert r.status_code == 422 and r.json()["field"] == field, r.text


def test_fractions_for_integer_fields_are_cut_as_in_a1111(client, backend, photo):
    r = client.post("/sdapi/v1/txt2img", json={"steps": 2.9, "width": 64.7, "height": 72.2, "seed": 12.5,
                                               "cfg_scale": 6.5})
    assert r.status_code == 200, r.text
    p = backend.params[-1]
    assert (p.steps, p.width, p.height, p.seed, p.cfg_scale) == (2, 64, 72, 12, 6.5)
    r = client.post("/sdapi/v1/img2img", json={"init_images": [png_b64(photo)], "steps": 1, "width": 64, "height": 64,
                                               "mask": png_b64(photo.convert("L")), "mask_blur": 3.6,
                                               "inpainting_fill": 1.0})
    assert r.status_code == 200, r.text
    assert backend.params[-1].inpaint.mask_blur_x == 3 and backend.params[-1].inpaint.masked_content == "original"


def test_numbers_for_text_fields_are_their_text_as_in_a1111(client, backend):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": 42, "negative_prompt": 1.5, "steps": 1, "width": 64,
                                               "height": 64})
    assert r.status_code == 200, r.text
    assert (backend.params[-1].prompt, backend.params[-1].negative_prompt) == ("42", "1.5")
    r = client.post("/sdapi/v1/txt2img", json={"prompt": True, "steps": 1, "width": 64, "height": 64})
    assert r.status_code == 422 and r.json()["field"] == "prompt"


SOFT_DEFAULTS = [1, 0.5, 4, 0, 0.5, 2]


@pytest.mark.parametrize(("args", "soft", "field"), [
    ([True, *SOFT_DEFAULTS], True, None),
    ([True], True, None),
    ([1, None, 0.5], True, None),  # A1111 tests the switch for truth; null settings keep their defaults
    ([False, 3, 3, 3], False, None),  # off: its settings do nothing
    ([True, 1, 0.8], None, "alwayson_scripts.Soft Inpainting.args[2]"),
    ([True, 1, 0.5, 4, 0, 0.5, "2"], None, "alwayson_scripts.Soft Inpainting.args[6]"),
])
def test_soft_inpainting_takes_only_its_default_settings(client, backend, photo, args, soft, field):
    r = client.post("/sdapi/v1/img2img", json={
        "init_images": [png_b64(photo)], "mask": png_b64(photo.convert("L")), "steps": 1, "width": 64, "height": 64,
        "alwayson_scripts": {"Soft Inpainting": {"args": args}}})
    if field is None:
        assert r.status_code == 200, r.text
        assert backend.params[-1].inpaint.soft is soft
    else:
        assert r.status_code == 422 and r.json()["field"] == field, r.text
        assert "default" in r.json()["detail"]


# --------------------------------------------------------------------------- endpoints


def test_unknown_endpoints_are_404_and_wrong_methods_405(client):
    """The browser UI's files (served at /) never answer for an API path."""
    for path in ("/sdapi/v1/server-kill", "/sdapi/v1/create/embedding", "/controlnet/txt2img", "/underpaint/v1/x"):
        r = client.post(path, json={})
        assert r.status_code == 404 and r.json()["detail"] == "Not Found", (path, r.text)
    assert client.get("/sdapi/v1/txt2img").status_code == 405
    assert client.post("/sdapi/v1/samplers").status_code == 405
    assert client.get("/").status_code == 200  # the browser UI is still there


def test_scripts_list_the_scripts_requests_may_use(client):
    assert client.get("/sdapi/v1/scripts").json() == {
        "txt2img": ["prompt matrix", "prompts from file or textbox", "x/y/z plot", "controlnet", "freeu integrated",
                    "adetailer"],
        "img2img": ["loopback", "outpainting mk2", "poor man's outpainting", "prompt matrix",
                    "prompts from file or textbox", "sd upscale", "x/y/z plot",
                    "controlnet", "freeu integrated", "adetailer", "soft inpainting"]}
    info = {(s["name"], s["is_img2img"]): s for s in client.get("/sdapi/v1/script-info").json()}
    assert set(info) == {("controlnet", False), ("controlnet", True), ("soft inpainting", True), ("sd upscale", True),
                         ("x/y/z plot", False), ("x/y/z plot", True), ("freeu integrated", False),
                         ("freeu integrated", True), ("loopback", True), ("prompt matrix", False),
                         ("prompt matrix", True), ("prompts from file or textbox", False),
                         ("prompts from file or textbox", True), ("adetailer", False), ("adetailer", True),
                         ("poor man's outpainting", True), ("outpainting mk2", True)}
    assert len(info[("x/y/z plot", True)]["args"]) == 18
    assert not info[("sd upscale", True)]["is_alwayson"]
    soft = info[("soft inpainting", True)]["args"]
    assert [a["label"] for a in soft][:2] == ["Soft inpainting", "Schedule bias"] and len(soft) == 7
    assert [a["value"] for a in soft[1:]] == SOFT_DEFAULTS == [a["maximum"] for a in soft[1:]]


def test_refresh_embeddings_and_interrogate(client, photo):
    assert client.post("/sdapi/v1/refresh-embeddings").status_code == 200
    r = client.post("/sdapi/v1/interrogate", json={"image": png_b64(photo), "model": "deepdanbooru"})
    assert r.status_code == 404 and r.json()["field"] == "model" and "underpaint download deepbooru" in r.json()["detail"]


def _extras(client, picture, **fields):
    return client.post("/sdapi/v1/extra-single-image", json={"image": png_b64(picture), **fields})


def test_extras_nearest_by_2_repeats_each_pixel_and_records_it(client, photo):
    r = _extras(client, photo, upscaler_1="Nearest", upscaling_resize=2)
    assert r.status_code == 200, r.text
    out = decode_b64(r.json()["image"])
    src = np.asarray(photo)
    assert np.array_equal(np.asarray(out.convert("RGB")), src.repeat(2, axis=0).repeat(2, axis=1))
    assert out.info["postprocessing"] == "Postprocess upscale by: 2.0, Postprocess upscaler: Nearest"
    assert r.json()["html_info"] == "<p>Postprocess upscale by: 2.0, Postprocess upscaler: Nearest</p>"


def test_extras_keep_the_infotext_and_blend_a_second_upscaler(client, photo):
    made = client.post("/sdapi/v1/txt2img", json={"prompt": "a fox", "steps": 1, "width": 64, "height": 64}).json()
    original = decode_b64(made["images"][0])
    r = client.post("/sdapi/v1/extra-single-image", json={
        "image": made["images"][0], "upscaler_1": "lanczos", "upscaling_resize": 1.5, "upscaler_2": "Nearest",
        "extras_upscaler_2_visibility": 0.25})
    assert r.status_code == 200, r.text
    out = decode_b64(r.json()["image"])
    assert out.size == (96, 96) and out.info["parameters"] == original.info["parameters"]
    assert out.info["postprocessing"] == ("Postprocess upscale by: 1.5, Postprocess upscaler: Lanczos, "
                                          "Postprocess upscaler 2: Nearest")
    rgb = original.convert("RGB")
    lanczos = rgb.resize((96, 96), Image.Resampling.LANCZOS)
    nearest = rgb.resize((96, 96), Image.Resampling.NEAREST)
    assert np.array_equal(np.asarray(out), np.asarray(Image.blend(lanczos, nearest, 0.25)))


def test_extras_scale_to_a_size_rounds_to_8_and_centres_the_crop(client, photo):
    """96x64 to 100x100: scale 1.5625, upscaled to 150x100, then to 144x96 (multiples of 8),
    centred on a black 100x100 canvas, as A1111's Extras tab does."""
    r = _extras(client, photo, upscaler_1="Lanczos", resize_mode=1, upscaling_resize_w=100, upscaling_resize_h=100)
    assert r.status_code == 200, r.text
    out = np.asarray(decode_b64(r.json()["image"]).convert("RGB"))
    assert out.shape == (100, 100, 3)
    assert not out[:2].any() and not out[98:].any() and out[2:98].any()  # 96 rows centred: 2 black above and below
    assert "Postprocess upscale to: 100x100, Postprocess crop to: 100x100" in r.json()["html_info"]


def test_extras_none_upscaler_changes_nothing_and_batch_keeps_order(client, photo):
    r = _extras(client, photo)  # A1111's default upscaler_1 is "None"
    assert np.array_equal(np.asarray(decode_b64(r.json()["image"])), np.asarray(photo))
    small = photo.resize((48, 32))
    r = client.post("/sdapi/v1/extra-batch-images", json={
        "upscaler_1": "Lanczos", "upscaling_resize": 2,
        "imageList": [{"data": png_b64(photo), "name": "a.png"}, {"data": png_b64(small), "name": "b.png"}]})
    assert r.status_code == 200, r.text
    assert [decode_b64(i).size for i in r.json()["images"]] == [(192, 128), (96, 64)]


def test_extras_face_restoration_without_its_files_is_a_404_naming_them(client, photo):
    r = _extras(client, photo, gfpgan_visibility=0.5)
    assert r.status_code == 404 and r.json()["field"] == "gfpgan_visibility", r.text
    assert "GFPGANv1.4.pth" in r.json()["detail"]
    r = _extras(client, photo, codeformer_visibility=1)
    assert r.status_code == 404 and r.json()["field"] == "codeformer_visibility", r.text


@pytest.mark.parametrize(("fields", "field"), [
    ({"upscaler_1": "R-ESRGAN 4x+"}, "upscaler_1"),
    ({"upscaler_1": "Lanczos", "upscaler_2": "ScuNET"}, "upscaler_2"),
    ({"upscaler_1": "Lanczos", "upscaling_resize": 100}, "upscaling_resize"),
    ({"upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 9000}, "upscaling_resize_w"),
    ({"resize_mode": 2}, "resize_mode"),
    ({"image": "not base64!"}, "image"),
])
def test_extras_refusals_name_the_field(client, photo, fields, field):
    r = _extras(client, photo, **fields)
    assert r.status_code == 422 and r.json()["field"] == field, r.text


def test_controlnet_detect_reads_masks_and_the_extension_defaults(client, photo):
    mask = Image.new("L", photo.size, 0)
    mask.paste(255, (10, 8, 30, 24))
    body = {"controlnet_module": "inpaint_only", "controlnet_input_images": [png_b64(photo)],
            "controlnet_processor_res": -1}
    r = client.post("/controlnet/detect", json={**body, "controlnet_masks": [png_b64(mask)]})
    assert r.status_code == 200, r.text
    detected = np.asarray(decode_b64(r.json()["images"][0]))
    assert np.array_equal(detected[:, :, 3], np.asarray(mask)) and np.array_equal(detected[:, :, :3], np.asarray(photo))
    unmasked = np.asarray(decode_b64(client.post("/controlnet/detect", json=body).json()["images"][0]))
    assert not unmasked[:, :, 3].any()  # an opaque picture without a mask: nothing to repaint
    holed = photo.convert("RGBA")
    holed.putalpha(Image.eval(mask, lambda v: 255 - v))
    r = client.post("/controlnet/detect", json={**body, "controlnet_input_images": [png_b64(holed)]})
    assert np.array_equal(np.asarray(decode_b64(r.json()["images"][0]))[:, :, 3], np.asarray(mask))
    r = client.post("/controlnet/detect", json={**body, "controlnet_module": "canny"})  # -1: 512
    assert r.status_code == 200 and min(decode_b64(r.json()["images"][0]).size) == 512


def test_controlnet_control_types(client):
    types = client.get("/controlnet/control_types").json()["control_types"]
    assert {"All", "Canny", "Depth", "OpenPose", "Inpaint"} <= set(types)
    canny = types["Canny"]
    assert canny["module_list"][:2] == ["none", "canny"] and canny["model_list"] == ["None"]
    assert (canny["default_option"], canny["default_model"]) == ("canny", "None")
    assert types["All"]["default_option"] == "none" and "depth_midas" in types["All"]["module_list"]


def test_overrides_stay_set_when_not_restored_afterwards(client, backend):
    """override_settings_restore_afterwards false keeps the overridden settings for later jobs (A1111)."""
    overrides = {"CLIP_stop_at_last_layers": 2, "eta_noise_seed_delta": 31337, "randn_source": "CPU",
                 "token_merging_ratio": 0.3, "sd_model_checkpoint": "beta"}
    base = {"steps": 1, "width": 64, "height": 64}
    r = client.post("/sdapi/v1/txt2img", json={**base, "override_settings": overrides})
    assert r.status_code == 200, r.text
    options = client.get("/sdapi/v1/options").json()
    assert (options["CLIP_stop_at_last_layers"], options["eta_noise_seed_delta"]) == (1, 0)  # restored (the default)
    r = client.post("/sdapi/v1/txt2img", json={**base, "override_settings": overrides,
                                               "override_settings_restore_afterwards": False})
    assert r.status_code == 200, r.text
    options = client.get("/sdapi/v1/options").json()
    assert (options["CLIP_stop_at_last_layers"], options["eta_noise_seed_delta"], options["randn_source"],
            options["token_merging_ratio"]) == (2, 31337, "CPU", 0.3)
    assert options["sd_model_checkpoint"] == "beta.safetensors"
    client.post("/sdapi/v1/txt2img", json=base)
    p = backend.params[-1]
    assert (p.clip_skip, p.eta_noise_seed_delta, p.rng, p.token_merging_ratio) == (2, 31337, "cpu", 0.3)
