"""Upscaling models in hires. fix, the Extras API, /upscalers and `underpaint upscale`.

The networks themselves are checked against spandrel in test_upscaler_models.py. Here a model
whose convolutions are all zero serves as an exact reference: a Real-ESRGAN compact network adds
its learned residual to the nearest-neighbour enlargement of its input, so with zero weights it
*is* a nearest-neighbour 4x upscale, which Pillow computes independently. Every path that runs a
model (hires. fix, Extras, the CLI) must then give exactly what the built-in "Nearest" gives at
the same scale.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from test_server_support import decode_b64, real_api
from underpaint.errors import InvalidParameter, UnknownName
from underpaint.params import GenerationParams, HiresOptions


def compact_state_dict(*, nf: int = 4, num_conv: int = 1, scale: int = 4, zero: bool = True) -> dict:
    """An SRVGGNetCompact (realesr-general-x4v3's layout) state dict: conv, PReLU, ..., last conv."""
    gen = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.zeros(shape) if zero else torch.randn(shape, generator=gen) * 0.1

    sd = {"body.0.weight": t(nf, 3, 3, 3), "body.0.bias": t(nf), "body.1.weight": torch.full((nf,), 0.25)}
    for i in range(num_conv):
        sd[f"body.{2 + 2 * i}.weight"], sd[f"body.{2 + 2 * i}.bias"] = t(nf, nf, 3, 3), t(nf)
        sd[f"body.{3 + 2 * i}.weight"] = torch.full((nf,), 0.25)
    last = 2 * num_conv + 2
    sd[f"body.{last}.weight"], sd[f"body.{last}.bias"] = t(3 * scale * scale, nf, 3, 3), t(3 * scale * scale)
    return sd


def nearest(image: Image.Image, scale: int) -> Image.Image:
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


@pytest.fixture(scope="module")
def models(tmp_path_factory, sd1_file):
    """A models folder with the tiny SD checkpoint, a zero compact model under a made-up name and
    one saved under a Real-ESRGAN file name A1111 knows."""
    from test_server_support import tiny_models_dir

    root = tiny_models_dir(tmp_path_factory.mktemp("upscaler-models"), sd1_file)
    folder = root / "upscale_models"
    folder.mkdir()
    torch.save(compact_state_dict(), folder / "4x-Zero.pth")
    from safetensors.torch import save_file

    save_file(compact_state_dict(), str(folder / "realesr-general-x4v3.safetensors"))
    return root


@pytest.fixture(scope="module")
def engine(models):
    from underpaint.pipeline.engine import Engine

    return Engine.load(models / "checkpoints" / "tiny-sd1.safetensors", models_dir=models, device="cpu",
                       dtype="fp32")


def test_names_and_listing(models):
    from underpaint.models.registry import ModelsDir
    from underpaint.pipeline import upscale

    folder = ModelsDir(models)
    assert upscale.names(folder) == ("None", "Lanczos", "Nearest", "4x-Zero", "R-ESRGAN General 4xV3")
    assert upscale.resolve(folder, "r-esrgan general 4xv3", "f").filename == "realesr-general-x4v3.safetensors"
    assert upscale.resolve(folder, "realesr-general-x4v3", "f").name == "R-ESRGAN General 4xV3"  # the file's stem
    assert upscale.resolve(folder, "4x-Zero.pth", "f").name == "4x-Zero"
    assert upscale.resolve(folder, " lanczos ", "f") == "Lanczos"
    with pytest.raises(UnknownName) as err:
        upscale.resolve(folder, "../checkpoints/tiny-sd1", "upscaler_1")  # never a path: only listed names
    assert err.value.field == "upscaler_1" and "4x-Zero" in str(err.value)


def test_a1111_install_folders(tmp_path):
    from underpaint.models.registry import ModelsDir
    from underpaint.pipeline import upscale

    (tmp_path / "models" / "Stable-diffusion").mkdir(parents=True)
    for sub, name in (("ESRGAN", "4x-UltraSharp.pth"), ("RealESRGAN", "RealESRGAN_x4plus.pth"),
                      ("RealESRGAN", "RealESRGAN_x2plus.pth"), ("SwinIR", "SwinIR_4x.pth"),
                      ("SwinIR", "001_classicalSR_DF2K_s64w8_SwinIR-M_x2.pth"), ("DAT", "4xNomos8kDAT.pth"),
                      ("DAT", "DAT_x3.pth"), ("HAT", "4xNomos8kSCHAT-L.safetensors"), ("ScuNET", "ScuNET.pth"),
                      ("ScuNET", "scunet_color_real_psnr.pth")):
        (tmp_path / "models" / sub).mkdir(exist_ok=True)
        (tmp_path / "models" / sub / name).write_bytes(b"")
    folder = ModelsDir(tmp_path)
    entries = {e.name: e for e in upscale.model_entries(folder)}
    assert set(entries) == {"4x-UltraSharp", "R-ESRGAN 4x+", "R-ESRGAN 2x+", "SwinIR 4x",
                            "001_classicalSR_DF2K_s64w8_SwinIR-M_x2", "4xNomos8kDAT", "4xNomos8kSCHAT-L", "DAT x3",
                            "ScuNET GAN", "ScuNET PSNR"}
    assert upscale.nominal_scale(entries["DAT x3"]) == 3
    # the GAN model is the file A1111 saves as ScuNET.pth, and goes by that name too
    assert upscale.resolve(folder, "ScuNET", "f") == entries["ScuNET GAN"]
    assert entries["ScuNET PSNR"].filename == "scunet_color_real_psnr.pth"
    assert [upscale.nominal_scale(entries[n]) for n in ("4x-UltraSharp", "R-ESRGAN 4x+", "R-ESRGAN 2x+")] == [4, 4, 2]
    assert upscale.nominal_scale(entries["001_classicalSR_DF2K_s64w8_SwinIR-M_x2"]) == 2
    assert entries["SwinIR 4x"].filename == "SwinIR_4x.pth" and not entries["SwinIR 4x"].is_realesrgan
    assert upscale.resolve(folder, "SwinIR_4x", "f") == entries["SwinIR 4x"]  # its stem, as A1111 lists it later
    assert folder.upscalers_dir == tmp_path / "models" / "ESRGAN"


def test_upscale_by_runs_passes_until_the_target_is_covered():
    from underpaint.pipeline.upscale import upscale_by

    calls = []

    def twice(image, scale):
        calls.append(image.size)
        return image.resize((image.width * 2, image.height * 2))

    image = Image.new("RGB", (20, 12))
    assert upscale_by(image, 6, twice).size == (120, 72) and calls == [(20, 12), (40, 24), (80, 48)]
    calls.clear()  # three passes at most (A1111's limit): 8x then Lanczos up to 9.6x
    assert upscale_by(image, 10, twice).size == (200, 120) and len(calls) == 3
    calls.clear()  # scale 1 still runs the model once (a 1x restoration model), then back to size
    assert upscale_by(image, 1, twice).size == (16, 8) and len(calls) == 1


def test_model_pass_is_nearest_for_a_zero_network(models, photo):
    from underpaint.models.registry import ModelsDir
    from underpaint.pipeline import upscale

    entry = upscale.resolve(ModelsDir(models), "4x-Zero", "f")
    big = photo.resize((300, 200))  # larger than a 192 px tile: the tiled path
    for image in (photo, big):
        out = upscale.picture_pass(entry)(image, 4)
        assert np.array_equal(np.asarray(out), np.asarray(nearest(image, 4)))


def test_scunet_cleans_the_picture_in_its_own_tiles_then_lanczos_makes_the_size(tmp_path, monkeypatch):
    """A1111's ScuNET: the 1x denoiser runs once (in 256 px tiles, its SCUNET_tile), and a Lanczos resize
    brings the result to the scale asked."""
    from underpaint.models import upscaler
    from underpaint.models.registry import ModelsDir
    from underpaint.models.upscaler_scunet import SCUNet
    from underpaint.pipeline import upscale

    network = SCUNet(dim=64, config=[1] * 7)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    (tmp_path / "models" / "Stable-diffusion").mkdir(parents=True)
    path = tmp_path / "models" / "ScuNET" / "scunet_color_real_gan.pth"
    path.parent.mkdir()
    torch.save(network.state_dict(), path)
    tiles = []
    real = upscaler.upscale_image

    def recording(model, image, **kwargs):
        tiles.append(kwargs["tile"])
        return real(model, image, **kwargs)

    monkeypatch.setattr(upscaler, "upscale_image", recording)
    entry = upscale.resolve(ModelsDir(tmp_path), "ScuNET GAN", "hr_upscaler")
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 44, 3), dtype=np.uint8))
    out = upscale.upscale(picture, entry, 1.5)
    assert out.size == (64, 40) and tiles == [256]  # 66 x 45 rounded down to multiples of 8
    cleaned = real(upscaler.load_upscaler(path), picture, tile=0)
    assert cleaned.size == picture.size and not np.array_equal(np.asarray(cleaned), np.asarray(picture))
    assert np.array_equal(np.asarray(out), np.asarray(cleaned.resize((64, 40), Image.Resampling.LANCZOS)))


def test_hires_with_a_model_equals_nearest_at_its_scale(engine):
    base = dict(prompt="a lighthouse", steps=2, sampler="Euler", seed=11, width=64, height=64, rng="cpu")
    with_model = engine.generate(GenerationParams(**base, hires=HiresOptions(scale=4, steps=1, upscaler="4x-Zero")))
    with_nearest = engine.generate(GenerationParams(**base, hires=HiresOptions(scale=4, steps=1, upscaler="Nearest")))
    assert with_model.images[0].size == (256, 256)
    assert np.array_equal(np.asarray(with_model.images[0]), np.asarray(with_nearest.images[0]))
    assert "Hires upscaler: 4x-Zero" in with_model.infotexts[0]


def test_hires_unknown_model_is_refused_before_the_first_pass(engine):
    steps = []
    with pytest.raises(UnknownName) as err:
        engine.generate(GenerationParams(prompt="x", steps=2, width=64, height=64,
                                         hires=HiresOptions(upscaler="4x-Missing")),
                        progress=lambda p: steps.append(p))
    assert err.value.field == "hires_upscaler" and not steps
    assert "Latent (nearest-exact)" in str(err.value) and "4x-Zero" in str(err.value)


def test_hires_interrupted_while_the_model_runs_returns_the_first_pass(engine, monkeypatch):
    from underpaint.pipeline import upscale
    from underpaint.pipeline.records import Cancellation

    cancel = Cancellation()
    real = upscale.model_pass

    def interrupting(entry, *, device="cpu", cancel=None):
        run = real(entry, device=device, cancel=cancel)

        def go(image, scale):
            stop.interrupt()
            return run(image, scale)  # its first tile checks, and stops

        return go

    stop = cancel
    monkeypatch.setattr(upscale, "model_pass", interrupting)
    result = engine.generate(GenerationParams(prompt="x", steps=2, sampler="Euler", seed=3, width=64, height=64,
                                              hires=HiresOptions(scale=2, steps=1, upscaler="4x-Zero")),
                             cancel=cancel)
    assert result.images[0].size == (64, 64)  # the first pass's picture, as A1111 returns it


# --------------------------------------------------------------------------- the API


@pytest.fixture(scope="module")
def api(models):
    with real_api(models) as client:
        yield client


def _png(image: Image.Image, parameters: str | None = None) -> str:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode()


def test_api_lists_the_models(api):
    items = api.get("/sdapi/v1/upscalers").json()
    assert [i["name"] for i in items] == ["None", "Lanczos", "Nearest", "4x-Zero", "R-ESRGAN General 4xV3"]
    assert items[3] == {"name": "4x-Zero", "model_name": "4x-Zero", "model_path": "4x-Zero.pth", "model_url": None,
                        "scale": 4}
    assert api.get("/sdapi/v1/realesrgan-models").json() == [
        {"name": "R-ESRGAN General 4xV3", "path": "realesr-general-x4v3.safetensors", "scale": 4}]


def test_api_extras_with_a_model(api, photo):
    r = api.post("/sdapi/v1/extra-single-image", json={"image": _png(photo, "a cat\nSteps: 2"),
                                                       "upscaler_1": "4x-zero", "upscaling_resize": 4})
    assert r.status_code == 200, r.text
    out = decode_b64(r.json()["image"])
    assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(nearest(photo, 4)))
    assert out.info["parameters"] == "a cat\nSteps: 2"
    assert out.info["postprocessing"] == "Postprocess upscale by: 4.0, Postprocess upscaler: 4x-Zero"
    # 2x from a 4x model: one pass, then Lanczos down to the target (A1111's upscaler step)
    r = api.post("/sdapi/v1/extra-single-image", json={"image": _png(photo), "upscaler_1": "R-ESRGAN General 4xV3",
                                                       "upscaling_resize": 2})
    want = nearest(photo, 4).resize((192, 128), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(decode_b64(r.json()["image"]).convert("RGB")), np.asarray(want))


def test_api_refuses_unknown_upscalers_by_field(api, photo):
    r = api.post("/sdapi/v1/extra-single-image", json={"image": _png(photo), "upscaler_1": "4x-Missing"})
    assert r.status_code == 422 and r.json()["field"] == "upscaler_1" and "4x-Zero" in r.json()["detail"]
    r = api.post("/sdapi/v1/txt2img", json={"steps": 2, "width": 64, "height": 64, "enable_hr": True,
                                            "hr_upscaler": "4x-Missing"})
    assert r.status_code == 422 and r.json()["field"] == "hr_upscaler"
    assert "Latent" in r.json()["detail"] and "4x-Zero" in r.json()["detail"]


def test_api_hires_with_a_model(api):
    r = api.post("/sdapi/v1/txt2img", json={"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64,
                                            "seed": 5, "sampler_name": "Euler", "enable_hr": True, "hr_scale": 2,
                                            "hr_second_pass_steps": 1, "hr_upscaler": "R-ESRGAN General 4xV3"})
    assert r.status_code == 200, r.text
    assert decode_b64(r.json()["images"][0]).size == (128, 128)
    assert "Hires upscaler: R-ESRGAN General 4xV3" in r.json()["info"]


# --------------------------------------------------------------------------- the CLI


def test_cli_upscale(models, tmp_path, photo):
    from cli_runner import run_cli

    source = tmp_path / "in.png"
    photo.save(source)
    out = tmp_path / "out.png"
    r = run_cli(*["upscale", str(source), "--upscaler", "4x-Zero", "--scale", "4", "-o", str(out),
                 "--models-dir", str(models)])
    assert r.returncode == 0, r.stderr
    saved = Image.open(out)
    assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(nearest(photo, 4)))
    assert saved.info["postprocessing"] == "Postprocess upscale by: 4.0, Postprocess upscaler: 4x-Zero"
    before = out.read_bytes()  # an existing file is kept
    r = run_cli(*["upscale", str(source), "--upscaler", "Lanczos", "--scale", "2", "-o", str(out),
                 "--models-dir", str(models)])
    assert r.returncode == 2 and "already exists" in r.stderr and out.read_bytes() == before
    r = run_cli(*["upscale", str(source), "--upscaler", "4x-Missing", "-o", str(tmp_path / "x.png"),
                 "--models-dir", str(models)])
    assert r.returncode == 2 and "--upscaler" in r.stderr and "4x-Zero" in r.stderr
    assert not (tmp_path / "x.png").exists()
    r = run_cli(*["upscale", str(source), "--upscaler", "Lanczos", "--resize", "100x50", "--crop",
                 "-o", str(tmp_path / "crop.png"), "--models-dir", str(models)])
    assert r.returncode == 0 and Image.open(tmp_path / "crop.png").size == (100, 50)


def test_cli_hires_refuses_a_missing_model_before_loading(models, tmp_path):
    from cli_runner import run_cli

    r = run_cli(*["txt2img", "-p", "x", "--hires-upscaler", "4x-Missing", "-o", str(tmp_path / "x.png"),
                 "--models-dir", str(tmp_path)])
    assert r.returncode == 2 and "--hires-upscaler" in r.stderr and "checkpoint" not in r.stderr


def test_python_engine_upscale(engine, photo):
    out = engine.upscale(photo, "4x-zero", scale=4)
    assert np.array_equal(np.asarray(out), np.asarray(nearest(photo, 4)))
    assert engine.upscale(photo, "Lanczos", scale=2).size == (192, 128)
    for upscaler, scale, field in (("4x-Missing", 2, "upscaler"), ("None", 2, "upscaler"), ("Lanczos", 0, "scale")):
        with pytest.raises(InvalidParameter) as err:
            engine.upscale(photo, upscaler, scale=scale)
        assert err.value.field == field


# --------------------------------------------------------------------------- a SwinIR model


def test_swinir_model_in_an_a1111_install(tmp_path, sd1_file, photo):
    """A SwinIR file in an A1111 install's models/SwinIR, under the name A1111 downloads its default
    model as: listed by /sdapi/v1/upscalers under A1111's name for it, and Extras with it gives
    exactly what the model gives on the picture (the network itself is checked against spandrel
    in test_upscaler_models.py)."""
    import shutil

    from test_server_support import real_api
    from underpaint.models.upscaler import ARCH_SWINIR, load_upscaler, upscale_image
    from underpaint.models.upscaler_swin import SwinIR

    (tmp_path / "models" / "Stable-diffusion").mkdir(parents=True)
    shutil.copy(sd1_file, tmp_path / "models" / "Stable-diffusion" / "tiny-sd1.safetensors")
    (tmp_path / "models" / "SwinIR").mkdir()
    torch.manual_seed(0)
    module = SwinIR(embed_dim=8, depths=[2], heads=[2], window=8, mlp_hidden=16, upsampler="nearest+conv",
                    factors=[2, 2], num_feat=8, three_conv=True)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "models" / "SwinIR" / "SwinIR_4x.pth"
    torch.save(module.state_dict(), path)
    model = load_upscaler(path)
    assert (model.arch, model.scale) == (ARCH_SWINIR, 4)
    want = np.asarray(upscale_image(model, photo, tile=192, overlap=8))
    assert want.shape == (256, 384, 3) and want.std() > 5

    with real_api(tmp_path) as api:
        items = api.get("/sdapi/v1/upscalers").json()
        assert items[3:] == [{"name": "SwinIR 4x", "model_name": "SwinIR 4x", "model_path": "SwinIR_4x.pth",
                              "model_url": None, "scale": 4}]
        r = api.post("/sdapi/v1/extra-single-image", json={"image": _png(photo), "upscaler_1": "SwinIR 4x",
                                                           "upscaling_resize": 4})
        assert r.status_code == 200, r.text
        out = decode_b64(r.json()["image"])
        assert np.array_equal(np.asarray(out.convert("RGB")), want)
        assert out.info["postprocessing"] == "Postprocess upscale by: 4.0, Postprocess upscaler: SwinIR 4x"
