"""Live previews (pipeline/preview.py): the linear tables, TAESD from madebyollin's and diffusers'
file layouts, the fallback when the file is missing, and previews through generate() and the server."""

from __future__ import annotations

import base64
import io
import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from underpaint.errors import InvalidParameter
from underpaint.models.detect import Family
from underpaint.models.registry import ModelsDir
from underpaint.params import GenerationParams
from underpaint.pipeline import preview as pv

# The published latent → RGB tables, transcribed here on their own so that an edit to the module's
# copy shows: Keturn's SD 1.x/2.x fit (no bias); the SDXL and FLUX fits with a bias from ComfyUI's
# latent_formats.py.
PUBLISHED = {
    "sd1": ([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]],
            [0.0, 0.0, 0.0]),
    "sdxl": ([[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362],
              [-0.3165, -0.2492, -0.2188]], [0.1084, -0.0175, -0.0011]),
    "flux": ([[-0.0346, 0.0244, 0.0681], [0.0034, 0.0210, 0.0687], [0.0275, -0.0668, -0.0433],
              [-0.0174, 0.0160, 0.0617], [0.0859, 0.0721, 0.0329], [0.0004, 0.0383, 0.0115],
              [0.0405, 0.0861, 0.0915], [-0.0236, -0.0185, -0.0259], [-0.0245, 0.0250, 0.1180],
              [0.1008, 0.0755, -0.0421], [-0.0515, 0.0201, 0.0011], [0.0428, -0.0012, -0.0036],
              [0.0817, 0.0765, 0.0749], [-0.1264, -0.0522, -0.1103], [-0.0280, -0.0881, -0.0499],
              [-0.1262, -0.0982, -0.0778]], [-0.0329, -0.0718, -0.0851]),
}
PUBLISHED["sd2"] = PUBLISHED["sd1"]
CHANNELS = {"sd1": 4, "sd2": 4, "sdxl": 4, "flux": 16}
TAESD_FILE = {"sd1": "taesd", "sd2": "taesd", "sdxl": "taesdxl", "flux": "taef1"}


def _latents(channels: int, seed: int = 0, *, batch: int = 2, size: int = 8, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed)) * scale


def _stub_model(family: str, models_dir: Path) -> SimpleNamespace:
    """What preview_images reads from a loaded model: family, latent channels, device, dtype, models folder."""
    spec = SimpleNamespace(family=Family(family), latent_channels=CHANNELS[family])
    return SimpleNamespace(spec=spec, device=torch.device("cpu"), dtype=torch.float32,
                           models_dir=ModelsDir(models_dir))


def _uint8(pixels: np.ndarray) -> np.ndarray:
    """[-1, 1] pixels [B, 3, H, W] → HWC uint8 with A1111's truncation (what the pictures hold)."""
    return (255.0 * np.clip((pixels + 1.0) / 2.0, 0.0, 1.0)).transpose(0, 2, 3, 1).astype(np.uint8)


# --------------------------------------------------------------------------- Approx cheap


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "flux"])
def test_approx_cheap_is_the_published_linear_map(family, tmp_path):
    table, bias = (np.asarray(a, dtype=np.float64) for a in PUBLISHED[family])
    latents = _latents(CHANNELS[family], seed=len(family), scale=2.5)  # large enough that some pixels clip
    expected = np.einsum("bchw,cr->brhw", latents.double().numpy(), table) + bias[None, :, None, None]
    pixels = pv.cheap_pixels(Family(family), latents)
    assert pixels.shape == (2, 3, 8, 8)
    np.testing.assert_allclose(pixels.numpy(), np.clip(expected, -1, 1), atol=1e-5)
    assert (np.abs(expected) > 1).any() and (np.abs(expected) < 1).any()

    images = pv.preview_images(_stub_model(family, tmp_path), latents, "Approx cheap")
    assert [im.size for im in images] == [(8, 8), (8, 8)]  # latent resolution, not upscaled
    got = np.stack([np.asarray(im) for im in images]).astype(int)
    assert np.abs(got - _uint8(np.clip(expected, -1, 1))).max() <= 1


def test_approx_cheap_refuses_a_latent_of_the_wrong_width(tmp_path):
    from underpaint.errors import ModelError

    with pytest.raises(ModelError, match=r"16, height, width\] for a flux model"):
        pv.preview_images(_stub_model("flux", tmp_path), _latents(4), "Approx cheap")


def test_method_names_follow_a1111_and_bad_ones_name_the_field():
    assert GenerationParams().preview_method == "Approx NN"
    assert GenerationParams(preview_method="taesd").preview_method == "TAESD"
    assert GenerationParams(preview_method="approx CHEAP").preview_method == "Approx cheap"
    with pytest.raises(InvalidParameter, match="preview_method") as err:
        GenerationParams(preview_method="Approx fancy")
    assert err.value.field == "preview_method"


# --------------------------------------------------------------------------- TAESD


class _Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class _Block(nn.Module):
    def __init__(self, ch: int = 64):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1))
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


def original_decoder(latent_channels: int, seed: int) -> nn.Sequential:
    """madebyollin's TAESD decoder architecture (taesd.py) as the reference: clamp, conv, ReLU, then three
    stages of three blocks, ×2 upsampling and a bias-free conv, a last block and the RGB conv; pixels in
    [0, 1]. Its ``state_dict`` is the original file layout (``1.weight`` ... ``19.bias``). Weights are
    random with a spread that keeps the output varied rather than saturated."""
    layers: list[nn.Module] = [_Clamp(), nn.Conv2d(latent_channels, 64, 3, padding=1), nn.ReLU()]
    for _ in range(3):
        layers += [_Block(), _Block(), _Block(), nn.Upsample(scale_factor=2),
                   nn.Conv2d(64, 64, 3, padding=1, bias=False)]
    layers += [_Block(), nn.Conv2d(64, 3, 3, padding=1)]
    net = nn.Sequential(*layers)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) * (fan_in ** -0.5 if p.ndim > 1 else 0.05))
        net[-1].bias += 0.5
    return net.eval()


def _write_original(net: nn.Sequential, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("family", ["sd1", "sdxl", "flux"])
def test_taesd_from_the_original_file_layout_matches_the_original_network(family, tmp_path):
    net = original_decoder(CHANNELS[family], seed=7)
    path = _write_original(net, tmp_path / "VAE-approx" / f"{TAESD_FILE[family]}_decoder.safetensors")
    assert "1.weight" in net.state_dict() and "19.bias" in net.state_dict()  # the layout being tested
    model = _stub_model(family, tmp_path)
    latents = _latents(CHANNELS[family], seed=3, size=4)
    with torch.no_grad():
        reference = net(latents) * 2 - 1  # the original decoder answers in [0, 1]
    inside = ((reference > -1) & (reference < 1)).float().mean()
    assert reference.std() > 0.2 and inside > 0.3  # a varied picture: a wrong layer order would show

    decoder = pv.taesd_decoder(model)
    assert decoder is not None and pv.taesd_decoder(model) is decoder  # loaded once, kept on the model
    np.testing.assert_allclose(pv.taesd_pixels(decoder, latents).numpy(), reference.clamp(-1, 1).numpy(), atol=1e-4)
    images = pv.preview_images(model, latents, "TAESD")
    assert [im.size for im in images] == [(32, 32), (32, 32)]
    got = np.stack([np.asarray(im) for im in images]).astype(int)
    assert np.abs(got - _uint8(reference.clamp(-1, 1).numpy())).max() <= 1
    assert pv.preview_images(model, latents, "Approx NN")[0].tobytes() == images[0].tobytes()


def test_taesd_from_a_diffusers_folder_matches_diffusers_decode(tmp_path):
    from diffusers import AutoencoderTiny

    torch.manual_seed(11)
    written = AutoencoderTiny(latent_channels=4)
    with torch.no_grad():
        for name, p in written.decoder.named_parameters():
            p.mul_(3.0)  # spread the outputs beyond diffusers' near-constant initialisation
    folder = tmp_path / "VAE-approx" / "taesdxl"
    written.save_pretrained(folder, safe_serialization=True)
    witness = AutoencoderTiny.from_pretrained(folder).eval()
    latents = _latents(4, seed=5, size=4)
    with torch.no_grad():
        reference = witness.decode(latents).sample
    assert reference.std() > 0.05

    model = _stub_model("sdxl", tmp_path)
    got = pv.taesd_pixels(pv.taesd_decoder(model), latents)
    np.testing.assert_allclose(got.numpy(), reference.clamp(-1, 1).numpy(), atol=1e-5)


@pytest.mark.parametrize("name, tensors, message", [
    ("taesd_encoder.safetensors", {"0.weight": torch.zeros(64, 3, 3, 3)}, "unexpected key '0.weight'"),
    ("half.safetensors", {"1.weight": torch.zeros(64, 4, 3, 3)}, "not a TAESD decoder"),
    ("wide.safetensors", {"1.weight": torch.zeros(64, 4, 3, 3), "3.conv.0.weight": torch.zeros(32, 64, 3, 3)},
     "size mismatch"),
])
def test_files_that_are_not_taesd_decoders_are_named(tmp_path, name, tensors, message):
    from underpaint.errors import ModelError

    save_file(tensors, str(tmp_path / name))
    with pytest.raises(ModelError, match=message) as err:
        pv.load_taesd_decoder(tmp_path / name, latent_channels=4)
    assert name in str(err.value)


def test_taesd_missing_falls_back_to_approx_cheap_with_one_warning(tmp_path, caplog):
    (tmp_path / "VAE-approx").mkdir()
    (tmp_path / "VAE-approx" / "taesd_decoder.pth").write_bytes(b"a pickle is never opened")
    model = _stub_model("sd1", tmp_path)
    latents = _latents(4, seed=2, size=4)
    cheap = pv.preview_images(model, latents, "Approx cheap")
    with caplog.at_level(logging.WARNING, logger="underpaint.preview"):
        for _ in range(3):
            images = pv.preview_images(model, latents, "TAESD")
            assert [im.tobytes() for im in images] == [im.tobytes() for im in cheap]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "taesd_decoder.safetensors" in warnings[0].getMessage()

    quiet = _stub_model("sd1", tmp_path)  # Approx NN without the file: Approx cheap, silently
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="underpaint.preview"):
        assert pv.preview_images(quiet, latents, "Approx NN")[0].tobytes() == cheap[0].tobytes()
    assert not caplog.records

    # A file put there later is picked up without reloading the model.
    net = original_decoder(4, seed=1)
    _write_original(net, tmp_path / "VAE-approx" / "taesd_decoder.safetensors")
    assert pv.preview_images(model, latents, "TAESD")[0].size == (32, 32)


def test_a_decoder_for_other_latents_is_refused_once_and_falls_back(tmp_path, caplog):
    _write_original(original_decoder(4, seed=1), tmp_path / "VAE-approx" / "taef1_decoder.safetensors")
    model = _stub_model("flux", tmp_path)
    latents = _latents(16, seed=4, size=4)
    with caplog.at_level(logging.WARNING, logger="underpaint.preview"):
        for _ in range(2):
            assert pv.preview_images(model, latents, "TAESD")[0].size == (4, 4)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "4-channel latents, expected 16" in messages[0]


def test_vae_approx_is_found_in_an_a1111_install(tmp_path):
    (tmp_path / "models" / "Stable-diffusion").mkdir(parents=True)
    path = tmp_path / "models" / "VAE-approx" / "taesd_decoder.safetensors"
    _write_original(original_decoder(4, seed=1), path)
    folder = ModelsDir(tmp_path)
    assert folder.find_vae_approx("taesd") == path and folder.find_vae_approx("taef1") is None
    assert folder.vae_approx_dir == tmp_path / "models" / "VAE-approx"
    assert ModelsDir(tmp_path / "elsewhere").vae_approx_dir == tmp_path / "elsewhere" / "VAE-approx"


# --------------------------------------------------------------------------- through generate()


def _fingerprint_decoder(path: Path) -> Path:
    """A TAESD decoder whose every picture is one colour: (0.8, 0.1, 0.3) from the last conv's bias."""
    net = original_decoder(4, seed=3)
    with torch.no_grad():
        net[-1].weight.zero_()
        net[-1].bias.copy_(torch.tensor([0.8, 0.1, 0.3]))
    return _write_original(net, path)


FINGERPRINT = (204, 25, 76)  # 255 × (0.8, 0.1, 0.3), truncated


def test_full_preview_is_the_vae_decode(sd1_engine):
    from underpaint.pipeline.generate import decode_latents

    latents = _latents(4, seed=6, batch=1)
    full = pv.preview_images(sd1_engine.model, latents, "Full")
    assert full[0].size == (64, 64) and full[0].tobytes() == decode_latents(sd1_engine.model, latents)[0].tobytes()


def test_generate_previews_each_step_by_the_method_asked(sd1_file, tmp_path):
    from underpaint.pipeline.engine import Engine

    _fingerprint_decoder(tmp_path / "VAE-approx" / "taesd_decoder.safetensors")
    engine = Engine.load(sd1_file, models_dir=tmp_path, device="cpu", dtype="fp32")
    sizes = {}
    for method in ("Full", "Approx cheap", "TAESD", "Approx NN"):
        previews = []
        engine.generate(GenerationParams(prompt="a kite", steps=2, width=64, height=64, seed=1, sampler="Euler",
                                         preview_method=method),
                        progress=lambda p: previews.append(p.preview()))
        assert len(previews) == 2
        sizes[method] = previews[-1][0].size
        colours = set(previews[-1][0].getdata())
        if method in ("TAESD", "Approx NN"):
            assert colours == {FINGERPRINT}
        else:
            assert FINGERPRINT not in colours
    assert sizes == {"Full": (64, 64), "Approx cheap": (8, 8), "TAESD": (64, 64), "Approx NN": (64, 64)}


# --------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def served(sd1_file, tmp_path_factory):
    from test_server_support import live_server
    from underpaint.server.app import create_app
    from underpaint.server.config import ServerConfig

    models = tmp_path_factory.mktemp("preview-models")
    (models / "checkpoints").mkdir()
    (models / "checkpoints" / "tiny-sd1.safetensors").symlink_to(sd1_file)
    _fingerprint_decoder(models / "VAE-approx" / "taesd_decoder.safetensors")
    app = create_app(ServerConfig(models_dir=models, device="cpu", dtype="fp32", webui=False))
    with live_server(app) as base:
        yield base


def _preview_during_a_job(base: str, *, expect_image: bool = True,
                          overrides: dict | None = None) -> tuple[Image.Image | None, list[dict]]:
    """Start a long job (with ``overrides`` as its override_settings) and poll /progress: until a picture
    comes, or (``expect_image`` false) until a few steps have run with previews asked for at each poll;
    then interrupt the job."""
    import httpx

    done = {}
    body = {"prompt": "a slow sunset", "steps": 150, "width": 64, "height": 64, "sampler_name": "Euler", "seed": 5,
            "override_settings": overrides or {}}
    job = threading.Thread(target=lambda: done.setdefault("r", httpx.post(
        base + "/sdapi/v1/txt2img", json=body, timeout=120)))
    job.start()
    seen, image = [], None
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            p = httpx.get(base + "/sdapi/v1/progress", timeout=30).json()
            seen.append(p)
            if p["current_image"]:
                image = Image.open(io.BytesIO(base64.b64decode(p["current_image"])))
                break
            steps = [s["state"]["sampling_step"] for s in seen if s["state"]["sampling_step"] >= 1]
            if not expect_image and len(steps) >= 3 and steps[-1] > steps[0]:
                break
            time.sleep(0.02)
    finally:
        httpx.post(base + "/sdapi/v1/interrupt", timeout=30)
        job.join(120)
    assert done["r"].status_code == 200
    return image, seen


@pytest.mark.parametrize("method, size, fingerprint", [
    ("Full", (64, 64), False), ("Approx cheap", (8, 8), False), ("TAESD", (64, 64), True),
    ("Approx NN", (64, 64), True)])
def test_server_previews_by_show_progress_type(served, method, size, fingerprint):
    import httpx

    r = httpx.post(served + "/sdapi/v1/options", json={"show_progress_type": method, "live_previews_enable": True})
    assert r.status_code == 200, r.text
    assert httpx.get(served + "/sdapi/v1/options").json()["show_progress_type"] == method
    image, _ = _preview_during_a_job(served)
    assert image is not None, "a preview arrives while the job runs"
    assert image.size == size
    assert (set(image.convert("RGB").getdata()) == {FINGERPRINT}) is fingerprint


def test_server_without_live_previews_sends_none(served):
    import httpx

    r = httpx.post(served + "/sdapi/v1/options", json={"show_progress_type": "Approx cheap",
                                                       "live_previews_enable": False})
    assert r.status_code == 200, r.text
    try:
        image, seen = _preview_during_a_job(served, expect_image=False)
    finally:
        httpx.post(served + "/sdapi/v1/options", json={"live_previews_enable": True})
    assert image is None and all(s["current_image"] is None for s in seen)
    assert len([s for s in seen if s["state"]["sampling_step"] >= 1]) >= 3



def test_a_request_overrides_the_preview_settings_for_itself(served):
    """``override_settings`` may choose the method or turn previews off (or on) for one job only."""
    import httpx

    r = httpx.post(served + "/sdapi/v1/options", json={"show_progress_type": "Full", "live_previews_enable": True})
    assert r.status_code == 200, r.text
    image, _ = _preview_during_a_job(served, overrides={"show_progress_type": "approx cheap"})
    assert image is not None and image.size == (8, 8)  # Approx cheap's 1/8 size, not Full's 64x64
    image, seen = _preview_during_a_job(served, expect_image=False, overrides={"live_previews_enable": False})
    assert image is None and all(s["current_image"] is None for s in seen)
    assert httpx.get(served + "/sdapi/v1/options").json()["show_progress_type"] == "Full"  # settings untouched
    bad = httpx.post(served + "/sdapi/v1/txt2img", json={"steps": 1, "width": 64, "height": 64,
                                                          "override_settings": {"show_progress_type": "Fast"}})
    assert bad.status_code == 422 and bad.json()["field"] == "override_settings.show_progress_type"
