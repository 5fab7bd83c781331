"""The A1111 wire: request fields, response shapes, lists, options, png-info (fake engine, in process)."""

from __future__ import annotations

import json

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
                                  "randn_source": "CPU", "img2img_fix_steps": True},
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
    assert p.sampler_options.eta == 0.5 and p.sampler_options.s_tmax == float("inf")


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
    ({"seed": 2**40}, "seed"),
    ({"width": 10}, "width"),
    ({"restore_faces": True}, "restore_faces"),
    ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"),
    ({"enable_hr": True, "hr_scale": 300}, "hr_scale"),
    ({"enable_hr": True, "hr_resize_x": 100000}, "hr_resize_x"),
    ({"enable_hr": True, "denoising_strength": 0}, "denoising_strength"),
    ({"enable_hr": True, "hr_sampler_name": "Euler z"}, "hr_sampler_name"),
    ({"enable_hr": True, "hr_scheduler": "Karass"}, "hr_scheduler"),
    ({"enable_hr": True, "hr_second_pass_steps": -1}, "hr_second_pass_steps"),
    ({"enable_hr": True, "hr_checkpoint_name": "beta.safetensors"}, "hr_checkpoint_name"),
    ({"firstphase_width": 32, "firstphase_height": 64}, "firstphase_width"),
    ({"enable_hr": True, "hr_resize_x": 512, "width": 0}, "width"),
    ({"styles": ["cinematic"]}, "styles"),
    ({"script_name": "x/y/z plot"}, "script_name"),
    ({"alwayson_scripts": {"ADetailer": {"args": [True, {}]}}}, "alwayson_scripts"),
    # ControlNet is available: an unknown ControlNet model is named down to the unit's field.
    ({"alwayson_scripts": {"controlnet": {"args": [{"module": "canny", "model": "x"}]}}},
     "alwayson_scripts.controlnet.args[0].model"),
    ({"override_settings": {"CLIP_stop_at_last_layers": "two"}}, "override_settings.CLIP_stop_at_last_layers"),
    ({"override_settings": {"token_merging_ratio": 0.95}}, "override_settings.token_merging_ratio"),
    ({"enable_hr": True, "override_settings": {"token_merging_ratio_hr": "x"}}, "override_settings.token_merging_ratio_hr"),
    ({"override_settings": {"sd_model_checkpoint": "nope.safetensors"}}, "sd_model_checkpoint"),
    ({"override_settings": {"sd_model_checkpoint": "/etc/passwd"}}, "sd_model_checkpoint"),
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


def test_options_refuse_bad_values_without_changing_anything(client):
    r = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 3, "randn_source": "quantum"})
    assert r.status_code == 422 and r.json()["field"] == "randn_source"
    assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "gamma"})
    assert r.status_code == 404 and r.json()["field"] == "sd_model_checkpoint"


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

    before = threading.active_count()
    create_app(ServerConfig(models_dir=make_models_dir(tmp_path)), loader=backend)
    assert backend.loads == [] and threading.active_count() == before


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
