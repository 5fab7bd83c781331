"""A1111's "VAE type for encode/decode" set to TAESD: the pictures against diffusers' ``AutoencoderTiny``
holding the same weights, the checkpoint's VAE left alone, the refusal when the file is missing, and
the wiring through infotext, CLI and the API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from underpaint.errors import InvalidParameter
from underpaint.params import GenerationParams, HiresOptions

BASE = dict(prompt="a lighthouse on a cliff", negative_prompt="blurry", seed=21, rng="cpu", steps=3,
            sampler="Euler", width=64, height=64)


def tiny_autoencoder(seed: int):
    """diffusers' AutoencoderTiny (TAESD's architecture) with random weights of a trained network's scale."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    net = AutoencoderTiny(latent_channels=4).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.6)
    return net


def write_original_files(net, folder: Path, name: str = "taesd") -> None:
    """``net`` as madebyollin's two files: ``<name>_encoder.safetensors`` (Sequential indices as
    diffusers' EncoderTiny.layers) and ``<name>_decoder.safetensors`` (one index later: its Sequential
    starts with a Clamp that diffusers' DecoderTiny applies in its forward)."""
    folder.mkdir(parents=True, exist_ok=True)
    encoder = {k.removeprefix("layers."): v.contiguous() for k, v in net.encoder.state_dict().items()}
    decoder = {}
    for key, value in net.decoder.state_dict().items():
        index, _, rest = key.removeprefix("layers.").partition(".")
        decoder[f"{int(index) + 1}.{rest}"] = value.contiguous()
    save_file(encoder, str(folder / f"{name}_encoder.safetensors"))
    save_file(decoder, str(folder / f"{name}_decoder.safetensors"))


def truncated(pixels: torch.Tensor) -> np.ndarray:
    """[-1, 1] pixels as A1111 turns them into bytes (truncating), HWC per image."""
    x = ((pixels.clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy().astype(np.int16)


class Calls:
    """Counts calls of a module method (the checkpoint's VAE encode/decode)."""

    def __init__(self, monkeypatch, owner, name):
        self.count = 0
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


@pytest.fixture(scope="module")
def taesd(tmp_path_factory):
    return tiny_autoencoder(seed=5)


@pytest.fixture(scope="module")
def engine(sd1_file, taesd, tmp_path_factory):
    from underpaint.pipeline.engine import Engine

    models = tmp_path_factory.mktemp("vae-type-models")
    write_original_files(taesd, models / "VAE-approx")
    return Engine.load(sd1_file, models_dir=models, device="cpu", dtype="fp32")


def test_taesd_decode_is_the_tiny_decoder_of_the_same_latents(engine, taesd, monkeypatch):
    """The picture is AutoencoderTiny's decode of the latents the Full run decodes, to the byte; the
    checkpoint's VAE does not run."""
    model = engine.model
    seen = []
    decode = model.vae.decode
    monkeypatch.setattr(model.vae, "decode", lambda z, *a, **k: seen.append(z.clone()) or decode(z, *a, **k))
    full = engine.generate(GenerationParams(**BASE)).images[0]
    latents = seen[0] * model.spec.scaling_factor  # what the VAE is given is latents / scaling factor
    fast = engine.generate(GenerationParams(**BASE, vae_decode_method="TAESD")).images[0]
    assert len(seen) == 1  # the TAESD run did not use the checkpoint's VAE
    with torch.no_grad():
        reference = truncated(taesd.decode(latents).sample)[0]
    assert np.array_equal(np.asarray(fast, dtype=np.int16), reference)
    assert not np.array_equal(np.asarray(full), np.asarray(fast))


def test_with_tiling_taesd_wraps_around_too(engine, taesd, monkeypatch):
    """A Tiling request decoded by TAESD: AutoencoderTiny's decode with its convolutions padding
    circularly, of the latents the checkpoint's VAE is given in the same request decoded in full."""
    model = engine.model
    seen = []
    decode = model.vae.decode
    monkeypatch.setattr(model.vae, "decode", lambda z, *a, **k: seen.append(z.clone()) or decode(z, *a, **k))
    engine.generate(GenerationParams(**BASE, tiling=True))
    latents = seen[0] * model.spec.scaling_factor
    fast = engine.generate(GenerationParams(**BASE, tiling=True, vae_decode_method="TAESD")).images[0]
    convs = [m for m in taesd.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        for conv in convs:
            conv.padding_mode = "circular"
        with torch.no_grad():
            reference = truncated(taesd.decode(latents).sample)[0]
    finally:
        for conv in convs:
            conv.padding_mode = "zeros"
    assert np.array_equal(np.asarray(fast, dtype=np.int16), reference)
    with torch.no_grad():
        assert not np.array_equal(truncated(taesd.decode(latents).sample)[0], reference)


def test_taesd_encode_is_the_tiny_encoder(engine, taesd, photo, monkeypatch):
    from underpaint.imageio.convert import images_to_tensor
    from underpaint.pipeline.generate import encode_pixels

    pixels = images_to_tensor([photo.resize((64, 64))])
    with torch.no_grad():
        expected = taesd.encode(pixels).latents
    assert torch.equal(encode_pixels(engine.model, pixels, "TAESD"), expected)
    calls = Calls(monkeypatch, engine.model.vae, "encode")
    params = GenerationParams(**BASE, init_images=(photo.resize((64, 64)),), strength=0.5)
    fast = engine.generate(params.replace(vae_encode_method="TAESD")).images[0]
    assert calls.count == 0
    full = engine.generate(params).images[0]
    assert calls.count == 1 and not np.array_equal(np.asarray(full), np.asarray(fast))


def test_both_layouts_and_a_diffusers_folder_load(taesd, tmp_path):
    from underpaint.pipeline.vae_type import load_taesd_encoder

    folder = tmp_path / "VAE-approx" / "taesd"
    taesd.save_pretrained(folder, safe_serialization=True)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = taesd.encode(x).latents
        got = load_taesd_encoder(folder / "diffusion_pytorch_model.safetensors", latent_channels=4).encode(x).latents
    assert torch.equal(got, expected)
    with pytest.raises(Exception, match="4-channel latents, expected 16"):
        load_taesd_encoder(folder / "diffusion_pytorch_model.safetensors", latent_channels=16)


def test_hires_fix_in_pixels_decodes_and_encodes_with_taesd(engine, monkeypatch):
    decodes, encodes = Calls(monkeypatch, engine.model.vae, "decode"), Calls(monkeypatch, engine.model.vae, "encode")
    hires = HiresOptions(scale=1.5, upscaler="Lanczos", steps=2, strength=0.5)
    result = engine.generate(GenerationParams(**BASE, hires=hires, vae_encode_method="TAESD",
                                              vae_decode_method="TAESD"))
    assert result.images[0].size == (96, 96) and (decodes.count, encodes.count) == (0, 0)
    assert "VAE Encoder: TAESD, VAE Decoder: TAESD" in result.infotexts[0]


def test_a_missing_file_is_refused_before_any_work(engine, tmp_path, monkeypatch):
    from underpaint.models.registry import ModelsDir

    monkeypatch.setattr(engine.model, "models_dir", ModelsDir(tmp_path))
    unet = Calls(monkeypatch, engine.model.unet, "forward")
    with pytest.raises(InvalidParameter) as err:
        engine.generate(GenerationParams(**BASE, vae_decode_method="TAESD"))
    assert err.value.field == "vae_decode_method" and "taesd_decoder.safetensors" in str(err.value)
    assert str(tmp_path / "VAE-approx") in str(err.value) and unet.count == 0
    with pytest.raises(InvalidParameter) as err:  # txt2img encodes nothing: only img2img needs the encoder
        engine.generate(GenerationParams(**BASE, init_images=(engine_picture(),), strength=0.5,
                                         vae_encode_method="TAESD"))
    assert err.value.field == "vae_encode_method" and "taesd_encoder.safetensors" in str(err.value)


def engine_picture():
    from PIL import Image

    return Image.new("RGB", (64, 64), (90, 120, 150))


# --- infotext, CLI, API --------------------------------------------------------------------------


def test_infotext_round_trip():
    from underpaint.imageio.infotext import parse_infotext
    from underpaint.pipeline.infotext import build_infotext
    from underpaint.pipeline.records import ModelInfo
    from underpaint.pipeline.reproduce import params_from_infotext

    info = ModelInfo(name="m", path="m.safetensors", family="sd1", prediction="eps", short_hash="0123456789")
    img2img = GenerationParams(prompt="p", seed=1, init_images=(engine_picture(),), vae_encode_method="taesd",
                               vae_decode_method="TAESD")
    text = build_infotext(img2img, info, width=64, height=64, seed=1, subseed=1)
    assert "VAE Encoder: TAESD, VAE Decoder: TAESD" in text
    fields = params_from_infotext(parse_infotext(text))
    assert (fields["vae_encode_method"], fields["vae_decode_method"]) == ("TAESD", "TAESD")
    # txt2img encodes nothing (A1111 writes the encoder only where it encodes); Full is never written.
    txt2img = build_infotext(GenerationParams(prompt="p", vae_encode_method="TAESD"), info, width=64, height=64,
                             seed=1, subseed=1)
    assert "VAE Encoder" not in txt2img and "VAE Decoder" not in txt2img
    fields = params_from_infotext(parse_infotext(txt2img))  # A1111 reads a missing key as Full
    assert (fields["vae_encode_method"], fields["vae_decode_method"]) == ("Full", "Full")


def test_bad_names_name_the_field():
    for field in ("vae_encode_method", "vae_decode_method"):
        with pytest.raises(InvalidParameter) as err:
            GenerationParams(**{field: "tiny"})
        assert err.value.field == field


def _cli_params(argv: list[str]) -> GenerationParams:
    from underpaint.cli.generate import params_from_args
    from underpaint.cli.main import build_parser

    return params_from_args(build_parser().parse_args(argv))


def test_cli_flags(tmp_path):
    from cli_runner import run_cli

    p = _cli_params(["img2img", "in.png", "-p", "x", "--vae-decoder", "taesd", "--vae-encoder", "TAESD"])
    assert (p.vae_encode_method, p.vae_decode_method) == ("TAESD", "TAESD")
    assert _cli_params(["txt2img", "-p", "x"]).vae_decode_method == "Full"
    done = run_cli("txt2img", "-p", "x", "--vae-decoder", "tiny", "--model", str(tmp_path / "none.safetensors"))
    assert done.returncode != 0 and "--vae-decoder" in done.stderr, done.stderr



def test_api_settings_and_overrides(api):
    client, backend = api
    base = {"steps": 1, "width": 64, "height": 64}
    options = client.get("/sdapi/v1/options").json()
    assert (options["sd_vae_encode_method"], options["sd_vae_decode_method"]) == ("Full", "Full")
    assert client.post("/sdapi/v1/options", json={"sd_vae_decode_method": "TAESD"}).status_code == 200
    assert client.post("/sdapi/v1/txt2img", json=base).status_code == 200
    r = client.post("/sdapi/v1/txt2img", json={**base, "override_settings": {"sd_vae_decode_method": "Full",
                                                                           "sd_vae_encode_method": "taesd"}})
    assert r.status_code == 200, r.text
    assert [(p.vae_encode_method, p.vae_decode_method) for p in backend.params] == [("Full", "TAESD"),
                                                                                     ("TAESD", "Full")]
    r = client.post("/sdapi/v1/txt2img", json={**base, "override_settings": {"sd_vae_decode_method": "Tiny"}})
    assert r.status_code == 422 and r.json()["field"] == "override_settings.sd_vae_decode_method", r.text
    r = client.post("/sdapi/v1/options", json={"sd_vae_encode_method": 3})
    assert r.status_code == 422 and r.json()["field"] == "sd_vae_encode_method", r.text
    text = "x\nSteps: 1, Sampler: Euler, Seed: 1, Size: 64x64, VAE Decoder: TAESD"
    assert client.post("/sdapi/v1/txt2img", json={"infotext": text}).status_code == 200
    assert backend.params[-1].vae_decode_method == "TAESD"


def test_the_engines_refusal_is_named_as_the_api_names_it():
    from underpaint.server.a1111.convert import ENGINE_CHECKED_FIELDS, _renamed

    renamed = _renamed(InvalidParameter("vae_decode_method", "TAESD", "a file"), ENGINE_CHECKED_FIELDS)
    assert renamed.field == "override_settings.sd_vae_decode_method"
