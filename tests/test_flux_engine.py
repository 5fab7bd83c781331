"""FLUX end to end: files in the layouts people download → Engine / `underpaint` → pictures with infotext."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from flux_fixtures import flux_files  # noqa: F401  (session fixture)
from test_cli import assert_clean_error, run_cli

pytest.importorskip("sentencepiece")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, flux_files):  # noqa: F811
    """A models folder as a FLUX user keeps it: transformer in checkpoints/, CLIP-L and T5 in
    text_encoders/ (with T5's spiece.model), the autoencoder in vae/."""
    root = tmp_path_factory.mktemp("flux-models")
    for key, sub in (("transformer", "checkpoints"), ("schnell", "checkpoints"), ("fill", "checkpoints"),
                     ("clip_l", "text_encoders"), ("t5", "text_encoders"), ("ae", "vae")):
        (root / sub).mkdir(exist_ok=True)
        shutil.copy(flux_files[key], root / sub / flux_files[key].name)
    shutil.copy(flux_files["spiece_dir"] / "spiece.model", root / "text_encoders" / "spiece.model")
    return root


@pytest.fixture
def picture_file(tmp_path, photo):
    path = tmp_path / "photo.png"
    photo.resize((64, 64)).save(path)
    return path


def test_cli_img2img_with_separate_files_records_forge_keys(tmp_path, picture_file, flux_files):  # noqa: F811
    out = tmp_path / "night.png"
    proc = run_cli("img2img", str(picture_file), "-p", "the same street at night, rain, neon",
                   "--model", str(flux_files["transformer"]), "--clip-l", str(flux_files["clip_l"]),
                   "--t5", str(flux_files["t5"]), "--vae", str(flux_files["ae"]), "--strength", "0.7",
                   "--guidance", "2.5", "--steps", "4", "--seed", "3", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    text = Image.open(out).text["parameters"]
    assert ("Steps: 4, Sampler: Euler, Schedule type: Simple, CFG scale: 1, Distilled CFG Scale: 2.5, Seed: 3, "
            "Size: 64x64, Model hash: ") in text
    assert "Model: flux1-dev-tiny" in text and "Denoising strength: 0.7" in text


def test_cli_finds_the_companion_files_in_the_models_folder(tmp_path, picture_file, models_dir):
    out = tmp_path / "fromdir.png"
    proc = run_cli("img2img", str(picture_file), "-p", "a cat", "--models-dir", str(models_dir),
                   "--model", "flux1-schnell-tiny", "--strength", "0.8", "--seed", "5", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    text = Image.open(out).text["parameters"]
    # schnell's defaults: 4 steps, no distilled guidance
    assert "Steps: 4, Sampler: Euler, Schedule type: Simple, CFG scale: 1, Seed: 5" in text
    assert "Distilled CFG Scale" not in text


def test_cli_names_the_missing_text_encoder(tmp_path, picture_file, flux_files):  # noqa: F811
    empty = tmp_path / "empty-models"
    empty.mkdir()
    proc = run_cli("img2img", str(picture_file), "-p", "x", "--models-dir", str(empty),
                   "--model", str(flux_files["transformer"]), "--clip-l", str(flux_files["clip_l"]),
                   "--vae", str(flux_files["ae"]), "-o", str(tmp_path / "x.png"))
    assert_clean_error(proc, "T5", "--t5")
    assert not (tmp_path / "x.png").exists()


def test_cli_inpaint_with_fill_keeps_outside_pixels(tmp_path, picture_file, models_dir):
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    mask_file = tmp_path / "mask.png"
    mask.save(mask_file)
    out = tmp_path / "filled.png"
    proc = run_cli("inpaint", str(picture_file), "--mask", str(mask_file), "-p", "a window", "--mask-blur", "0",
                   "--models-dir", str(models_dir), "--model", "flux1-fill-dev-tiny", "--steps", "3", "--seed", "1",
                   "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    ours, original = np.asarray(Image.open(out).convert("RGB")), np.asarray(Image.open(picture_file).convert("RGB"))
    assert (ours[:, 32:] == original[:, 32:]).all()
    assert np.abs(ours[:, :32].astype(int) - original[:, :32]).mean() > 2


@pytest.mark.parametrize("key", ["all_in_one", "diffusers", "gguf", "transformer_fp8"])
def test_every_file_layout_generates_through_the_engine(key, flux_files, models_dir, photo):  # noqa: F811
    from underpaint.pipeline.engine import Engine

    engine = Engine.load(flux_files[key], models_dir=models_dir, device="cpu", dtype="fp32")
    assert engine.info.family == "flux"
    result = engine.img2img(photo.resize((64, 64)), prompt="a red boat", strength=0.6, seed=9, steps=3)
    assert result.images[0].size == (64, 64)
    assert "Sampler: Euler, Schedule type: Simple, CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 9" in result.infotexts[0]


def test_engine_conveniences_take_the_flux_defaults(flux_files, models_dir):  # noqa: F811
    from underpaint.pipeline.engine import Engine

    engine = Engine.load(flux_files["schnell"], models_dir=models_dir, device="cpu", dtype="fp32")
    result = engine.txt2img(prompt="a lighthouse", seed=2, width=64, height=64)
    assert "Steps: 4, Sampler: Euler, Schedule type: Simple, CFG scale: 1, Seed: 2" in result.infotexts[0]


def test_a1111_api_serves_flux_with_distilled_cfg_scale(models_dir, photo):
    import base64
    import io
    import json

    from fastapi.testclient import TestClient

    from underpaint.server.app import create_app
    from underpaint.server.config import ServerConfig

    buffer = io.BytesIO()
    photo.resize((64, 64)).save(buffer, format="PNG")
    picture = base64.b64encode(buffer.getvalue()).decode()
    app = create_app(ServerConfig(models_dir=models_dir, model="flux1-dev-tiny", device="cpu", dtype="fp32"))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        payload = {"init_images": [picture], "prompt": "a boat", "denoising_strength": 0.6, "steps": 3, "seed": 8,
                   "width": 64, "height": 64, "sampler_name": "Euler", "cfg_scale": 1, "distilled_cfg_scale": 2.0}
        r = client.post("/sdapi/v1/img2img", json=payload)
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert "Distilled CFG Scale: 2, " in info["infotexts"][0] and info["sd_model_name"] == "flux1-dev-tiny"
        # a sampler that does not run on the flow path is a 422 naming the field
        r = client.post("/sdapi/v1/img2img", json={**payload, "sampler_name": "Euler a"})
        assert r.status_code == 422 and "sampler" in r.text


def test_sd_models_and_sd_modules_list_flux_files(models_dir):
    from fastapi.testclient import TestClient

    from underpaint.server.app import create_app
    from underpaint.server.config import ServerConfig

    app = create_app(ServerConfig(models_dir=models_dir, device="cpu", dtype="fp32", preload=False))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        models = {m["model_name"]: m["family"] for m in client.get("/sdapi/v1/sd-models").json()}
        assert models["flux1-dev-tiny"] == "flux" and models["flux1-schnell-tiny"] == "flux"
        modules = {m["filename"] for m in client.get("/sdapi/v1/sd-modules").json()}
        assert {"text_encoders/clip_l.safetensors", "text_encoders/t5xxl_fp16.safetensors",
                "vae/ae.safetensors"} <= modules
