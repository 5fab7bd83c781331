"""``vae_precision`` (``--vae-precision auto|fp32|fp16|bf16``): the dtype every VAE call of a model runs in.

The dtype is read inside the VAE, by forward pre-hooks on its encoder and decoder (the weights'
dtype and the input's), for every kind of call a request makes: img2img's encode, the decode,
an inpaint's masked-picture encode, the hires. fix's decode and encode again, a "Full" preview,
FLUX's autoencoder. Pictures are compared with float32's: byte for byte where the same float32
computation must run (fp32 against auto on a float32 model; an overflowed fp16 call redone in
float32), within a measured tolerance for bf16.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flux_fixtures import flux_files  # noqa: F401 - a session fixture
from underpaint.errors import InvalidParameter
from underpaint.imageio.convert import images_to_tensor
from underpaint.models import offload
from underpaint.params import GenerationParams, HiresOptions
from underpaint.pipeline.generate import decode_latents, encode_pixels

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
ROOT = Path(__file__).resolve().parents[1]


def _load(path, *, dtype="fp32", vram="high", vae_precision="auto"):
    from underpaint.pipeline.engine import Engine

    return Engine.load(path, device="cpu", dtype=dtype, vram=vram, vae_precision=vae_precision)


class _Seen:
    """What the VAE's encoder and decoder compute in: (part, weight dtype, input dtype) per forward."""

    def __init__(self, vae: torch.nn.Module):
        self.calls: list[tuple[str, torch.dtype, torch.dtype]] = []
        self._handles = [part.register_forward_pre_hook(
            lambda mod, args, name=name: self.calls.append((name, next(mod.parameters()).dtype, args[0].dtype)))
            for name, part in (("encoder", vae.encoder), ("decoder", vae.decoder))]

    def dtypes(self, part: str | None = None) -> set[torch.dtype]:
        """The dtypes seen (weights and inputs alike), of one part or both."""
        return {d for name, w, x in self.calls if part in (None, name) for d in (w, x)}

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _watch(model) -> _Seen:
    return _Seen(model.vae)


def _pixels(photo, size=(96, 64)) -> torch.Tensor:
    return images_to_tensor([photo.resize(size)])


def _latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(seed))


def _picture(images) -> np.ndarray:
    return np.stack([np.asarray(i, dtype=np.int16) for i in images])


def _request(photo, **fields) -> GenerationParams:
    base = dict(prompt="a red house by the sea", negative_prompt="blurry", init_images=(photo.resize((64, 64)),),
                strength=0.6, steps=3, cfg_scale=7.0, sampler="Euler a", seed=1234, rng="cpu")
    return GenerationParams(**{**base, **fields})


# --- auto: today's rule ------------------------------------------------------------------------


def test_auto_is_the_force_upcast_rule_and_the_others_are_their_dtype():
    for stored in (F16, BF16, F32):
        for upcast in (False, True):
            expected = F32 if (stored == F16 and upcast) else stored  # diffusers' rule, as before
            assert offload.vae_compute_dtype(stored, upcast) == expected
            assert offload.vae_compute_dtype(stored, upcast, "auto") == expected
            assert offload.vae_compute_dtype(stored, upcast, "fp32") == F32
            assert offload.vae_compute_dtype(stored, upcast, "fp16") == F16
            assert offload.vae_compute_dtype(stored, upcast, "bf16") == BF16
            # On a GPU with native bfloat16 (Ampere on), auto takes bfloat16 where it would upcast, as ComfyUI.
            fast = BF16 if (stored == F16 and upcast) else stored
            assert offload.vae_compute_dtype(stored, upcast, "auto", fast_bf16=True) == fast
            assert offload.vae_compute_dtype(stored, upcast, "fp32", fast_bf16=True) == F32


def test_fast_bfloat16_means_a_cuda_gpu_from_ampere_on(monkeypatch):
    assert not offload.fast_bf16("cpu") and not offload.fast_bf16(None) and not offload.fast_bf16("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, fast in (((7, 5), False), ((8, 0), True), ((8, 9), True), ((9, 0), True), ((6, 1), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert offload.fast_bf16("cuda") is fast and offload.fast_bf16(torch.device("cuda", 0)) is fast


@pytest.mark.parametrize("fast", [False, True], ids=["cpu-or-older-gpu", "ampere-or-later"])
def test_auto_on_loaded_models(sdxl_file, sd1_file, monkeypatch, fast):
    """An fp16 SDXL model's VAE (force_upcast) decodes in float32, or in bfloat16 where the model's
    device computes it natively; an fp16 SD1 model's in fp16; fp32 asks for float32 everywhere."""
    from underpaint.models.loader import load_model

    seen_devices = []
    if fast:
        monkeypatch.setattr(offload, "fast_bf16", lambda device: seen_devices.append(device) or True)
    for path, expected in ((sdxl_file, BF16 if fast else F32), (sd1_file, F16)):
        model = load_model(path, device="cpu", dtype=F16)
        assert model.vae_precision == "auto" and offload.model_vae_dtype(model) == expected
        seen = _watch(model)
        try:
            decode_latents(model, _latents())
        finally:
            seen.close()
        assert seen.dtypes() == {expected}
        assert next(model.vae.parameters()).dtype == F16  # stored as loaded
    if fast:  # asked about the model's own device
        assert seen_devices and all(torch.device(d) == torch.device("cpu") for d in seen_devices)
    offload.set_vae_precision(model, "fp32")
    assert offload.model_vae_dtype(model) == F32


def test_a_model_without_the_attribute_is_auto():
    assert offload.vae_precision_of(SimpleNamespace()) == "auto"


# --- fp32 ---------------------------------------------------------------------------------------


def test_fp32_runs_in_float32_and_equals_auto_on_a_float32_model(sd1_file, photo):
    auto = _load(sd1_file)
    fp32 = _load(sd1_file, vae_precision="fp32")
    assert fp32.vae_precision == "fp32" and fp32.model.vae_precision == "fp32"
    seen = _watch(fp32.model)
    try:
        picture = _picture(fp32.generate(_request(photo)).images)
    finally:
        seen.close()
    assert [name for name, _, _ in seen.calls] == ["encoder", "decoder"] and seen.dtypes() == {F32}
    assert np.array_equal(picture, _picture(auto.generate(_request(photo)).images))


def test_fp32_upcasts_an_fp16_vae_that_auto_runs_in_fp16(sd1_file):
    """SD1's VAE has no force_upcast: auto keeps it in fp16, fp32 (--no-half-vae) does not."""
    from underpaint.models.loader import load_model

    model = load_model(sd1_file, device="cpu", dtype=F16)
    offload.set_vae_precision(model, "fp32")
    seen = _watch(model)
    try:
        decode_latents(model, _latents())
        encode_pixels(model, torch.zeros(1, 3, 64, 64))
    finally:
        seen.close()
    assert seen.dtypes() == {F32} and len(seen.calls) == 2
    assert next(model.vae.parameters()).dtype == F16


# --- bf16 ---------------------------------------------------------------------------------------

#: bf16 decode of the same latents against float32's, in uint8 levels. Measured with the tiny
#: SD1 and SDXL VAEs over four latents of std 0.3 and 1 (batch 2, 64x96): mean |Δ| 0.57-0.93,
#: max 5-9, PSNR 45-49 dB; the pictures' own std is ~60 levels. Limits with about 2x margin.
BF16_MEAN_ABS, BF16_MAX_ABS, BF16_PSNR_DB = 2.0, 20, 40.0


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_runs_in_bfloat16_and_decodes_close_to_fp32(sdxl_file, seed):
    from underpaint.models.loader import load_model

    model = load_model(sdxl_file, device="cpu", dtype=F16)  # auto would upcast to float32
    latents = _latents(seed) * (0.3 if seed == 0 else 1.0)
    offload.set_vae_precision(model, "fp32")
    reference = _picture(decode_latents(model, latents))
    offload.set_vae_precision(model, "bf16")
    seen = _watch(model)
    try:
        picture = _picture(decode_latents(model, latents))
    finally:
        seen.close()
    assert seen.dtypes() == {BF16}
    assert next(model.vae.parameters()).dtype == F16  # a copy visited; the stored weights are as loaded
    diff = np.abs(picture - reference)
    psnr = 10 * np.log10(255**2 / (diff.astype(np.float64) ** 2).mean())
    assert 0 < diff.mean() <= BF16_MEAN_ABS and diff.max() <= BF16_MAX_ABS and psnr >= BF16_PSNR_DB, \
        (diff.mean(), diff.max(), psnr)


def _kinds(photo):
    """One request of each kind that calls the VAE, with the calls it makes."""
    from underpaint.params import InpaintOptions

    mask = photo.resize((64, 64)).convert("L").point(lambda v: 255 if v > 128 else 0)
    return {
        "img2img": (_request(photo), ["encoder", "decoder"]),
        # the masked picture for the init latents, its decode
        "inpaint": (_request(photo, mask=mask, inpaint=InpaintOptions(mask_blur_x=0, mask_blur_y=0)),
                    ["encoder", "decoder"]),
        # first pass decoded, upscaled in pixels, encoded again, decoded
        "hires": (_request(photo, init_images=(), width=64, height=64, steps=2,
                           hires=HiresOptions(scale=1.5, upscaler="Lanczos", steps=2)),
                  ["decoder", "encoder", "decoder"]),
    }


@pytest.mark.parametrize("kind", ["img2img", "inpaint", "hires"])
def test_every_vae_call_of_a_request_runs_at_the_precision(sd1_file, photo, kind):
    engine = _load(sd1_file, vae_precision="bf16")
    params, calls = _kinds(photo)[kind]
    seen = _watch(engine.model)
    try:
        result = engine.generate(params)
    finally:
        seen.close()
    assert [name for name, _, _ in seen.calls] == calls and seen.dtypes() == {BF16}
    assert result.images and "VAE precision" not in result.infotexts[0]  # A1111 writes nothing for it


def test_full_previews_decode_at_the_precision(sd1_file):
    from underpaint.pipeline.preview import preview_images

    engine = _load(sd1_file, vae_precision="bf16")
    seen = _watch(engine.model)
    try:
        images = preview_images(engine.model, _latents() * 0.2, "Full")
    finally:
        seen.close()
    assert len(images) == 2 and [n for n, _, _ in seen.calls] == ["decoder"] and seen.dtypes() == {BF16}


def test_flux_autoencoder_runs_at_the_precision(flux_files, photo):
    from underpaint.models.loader import load_flux
    from underpaint.pipeline.engine import Engine

    model = load_flux(flux_files["transformer"], clip_l=flux_files["clip_l"], t5=flux_files["t5"],
                      vae=flux_files["ae"], dtype=F32)
    engine = Engine(model)
    assert engine.vae_precision == "auto"
    engine.vae_precision = "bf16"
    seen = _watch(model)
    try:
        engine.img2img(photo.resize((64, 64)), prompt="a red house", steps=2, strength=0.7, seed=5, rng="cpu")
    finally:
        seen.close()
    assert [n for n, _, _ in seen.calls] == ["encoder", "decoder"] and seen.dtypes() == {BF16}


@pytest.mark.parametrize("vram", ["medium", "low"])
def test_memory_modes_with_bf16(sd1_file, photo, vram):
    """The visits carry the weights over in bfloat16 and back: the same bytes as high mode in
    bf16, and the resting weights are float32 on the host after."""
    high = _picture(_load(sd1_file, vae_precision="bf16").generate(_request(photo)).images)
    engine = _load(sd1_file, vram=vram, vae_precision="bf16")
    model = engine.model
    events: list[tuple[str, str]] = []
    model.offload.observer = lambda event, part: events.append((event, part))
    seen = _watch(model)
    try:
        picture = _picture(engine.generate(_request(photo)).images)
    finally:
        seen.close()
    assert seen.dtypes() == {BF16} and len(seen.calls) == 2
    assert [e for e in events if e[1] == "vae"] == [("in", "vae"), ("out", "vae")] * 2
    assert np.array_equal(picture, high)
    assert {(t.dtype, t.device.type) for t in model.vae.parameters()} == {(F32, "cpu")}
    assert not model.offload.resident


def test_low_mode_tiles_at_the_precision(sd1_file, photo):
    engine = _load(sd1_file, vram="low", vae_precision="bf16")
    offload.place(engine.model, "low", tile_px=64)
    seen = _watch(engine.model)
    try:
        encode_pixels(engine.model, _pixels(photo, (128, 128)))
    finally:
        seen.close()
    assert len(seen.calls) == 9 and seen.dtypes() == {BF16}  # 3x3 tiles of 64 px every 48 px


# --- fp16: overflow redone in float32 ---------------------------------------------------------------


def _overflowing(path, part: str):
    """A float32 model whose VAE ``part`` overflows in fp16: its first convolution's weights
    scaled 1e6 (activations far past fp16's 65504; the GroupNorm after it makes the float32
    picture finite, and no different from the unscaled one but for rounding)."""
    from underpaint.models.loader import load_model

    model = load_model(path, device="cpu", dtype=F32)
    with torch.no_grad():
        getattr(model.vae, part).conv_in.weight.mul_(1e6)
    return model


@pytest.mark.parametrize("part", ["decoder", "encoder"])
def test_fp16_overflow_is_computed_again_in_float32(sd1_file, photo, part, caplog):
    model = _overflowing(sd1_file, part)
    latents = _latents()

    def call():
        return encode_pixels(model, _pixels(photo)) if part == "encoder" else _picture(decode_latents(model, latents))

    offload.set_vae_precision(model, "fp32")
    reference = call()
    offload.set_vae_precision(model, "fp16")
    with torch.inference_mode():  # the overflow is real: fp16's own result is not finite
        half = offload._vae_once(model, lambda vae, device, dtype: (
            vae.encode(_pixels(photo).to(dtype)).latent_dist.mean if part == "encoder"
            else vae.decode((latents / model.spec.scaling_factor).to(dtype)).sample), F16)
    assert half.dtype == F16 and not torch.isfinite(half).all()
    seen = _watch(model)
    try:
        with caplog.at_level(logging.INFO, logger="underpaint.models.offload"):
            out = call()
    finally:
        seen.close()
    assert [(n, w) for n, w, _ in seen.calls] == [(part, F16), (part, F32)]
    if part == "encoder":
        assert torch.equal(out, reference)
    else:
        assert np.array_equal(out, reference)
    notes = [r for r in caplog.records if "float32" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO
    assert ("encode" if part == "encoder" else "decode") in notes[0].getMessage()
    assert next(model.vae.parameters()).dtype == F32


def test_fp16_without_overflow_keeps_the_half_precision_result(sd1_file, caplog):
    model = _overflowing(sd1_file, "encoder")  # the decoder is untouched
    offload.set_vae_precision(model, "fp16")
    seen = _watch(model)
    try:
        with caplog.at_level(logging.INFO, logger="underpaint.models.offload"):
            decode_latents(model, _latents())
    finally:
        seen.close()
    assert seen.dtypes() == {F16} and len(seen.calls) == 1 and not caplog.records


class _InfVAE(torch.nn.Module):
    """Decodes to +inf in half precision, without NaN: 4e4 + 4e4 is past fp16's largest value (65504),
    and inf - 4e4 - 4e4 stays inf; float32 gives 0."""

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor([4.0e4]), requires_grad=False)
        self.config = SimpleNamespace(force_upcast=False, block_out_channels=(8, 8, 8, 8))
        self.seen: list[torch.dtype] = []

    def decode(self, z):
        self.seen.append(self.gain.dtype)
        zero = z[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2) * 0
        pixels = (zero + self.gain + self.gain) - self.gain - self.gain
        return SimpleNamespace(sample=pixels)


def test_fp16_redoes_an_inf_result_where_auto_looks_for_nans_only():
    for precision, expected in (("fp16", [F16, F32]), ("auto", [F16])):
        vae = _InfVAE().to(F16)
        model = SimpleNamespace(vae=vae, device=torch.device("cpu"), dtype=F16, vae_precision=precision,
                                spec=SimpleNamespace(scaling_factor=1.0, shift_factor=0.0))
        image = decode_latents(model, torch.ones(1, 4, 2, 2))[0]
        assert vae.seen == expected, precision
        # float32's answer, 0, is mid grey; fp16's inf, kept by auto, is white
        assert set(np.unique(np.asarray(image))) == ({127} if precision == "fp16" else {255})
        assert vae.gain.dtype == F16


# --- checks and refusals -----------------------------------------------------------------------------


def test_unknown_precision_is_refused(sd1_file):
    with pytest.raises(InvalidParameter, match="vae_precision: got 'fp8', expected auto, fp32, fp16 or bf16"):
        _load(sd1_file, vae_precision="fp8")


def test_bf16_is_refused_on_a_cuda_device_without_it(sd1_file, monkeypatch):
    from underpaint.models import device as device_module
    from underpaint.models.device import Placement

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    expected = r"vae_precision: got 'bf16', expected auto, fp32 or fp16 on cuda:0, which does not support bfloat16"
    with pytest.raises(InvalidParameter, match=expected):
        offload.check_vae_precision("bf16", "cuda:0")
    assert offload.check_vae_precision("bf16", "cpu") == "bf16"  # the CPU computes bfloat16
    assert offload.check_vae_precision("fp16", "cuda:0") == "fp16"
    # Engine.load refuses before reading the checkpoint.
    monkeypatch.setattr(device_module, "pick_placement", lambda *a, **k: Placement(torch.device("cuda:0"), F16))
    monkeypatch.setattr("underpaint.models.loader.load_model", lambda *a, **k: pytest.fail("loaded anyway"))
    with pytest.raises(InvalidParameter, match=expected):
        _load(sd1_file, vae_precision="bf16")
    # Set later on a model that runs on such a device: refused, and the setting stays.
    model = SimpleNamespace(device=torch.device("cuda:0"), vae_precision="fp32")
    with pytest.raises(InvalidParameter, match="cuda:0"):
        offload.set_vae_precision(model, "bf16")
    assert model.vae_precision == "fp32"


def test_bf16_is_allowed_on_a_cuda_device_that_has_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert offload.check_vae_precision("BF16", "cuda") == "bf16"


def test_changed_later_applies_to_the_next_call(sd1_file):
    engine = _load(sd1_file, vae_precision="bf16")
    engine.vae_precision = "fp32"
    with pytest.raises(InvalidParameter, match="vae_precision"):
        engine.vae_precision = "half"
    assert engine.vae_precision == "fp32"
    seen = _watch(engine.model)
    try:
        decode_latents(engine.model, _latents())
    finally:
        seen.close()
    assert seen.dtypes() == {F32}


# --- command line, server, bench ---------------------------------------------------------------------


def test_cli_refuses_a_bad_value_naming_the_option(capsys):
    from underpaint.cli.main import main

    with pytest.raises(SystemExit) as exited:
        main(["img2img", "x.png", "--vae-precision", "fp8"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--vae-precision" in err and "fp8" in err


def test_cli_and_serve_take_the_precision():
    from underpaint.cli.main import build_parser
    from underpaint.server.cli import config_from_args
    from underpaint.server.config import ServerConfig

    parser = build_parser()
    for command in ("img2img", "inpaint", "outpaint", "txt2img"):
        extra = {"img2img": ["x.png"], "outpaint": ["x.png"], "inpaint": ["x.png", "--mask", "m.png"]}.get(command, [])
        assert parser.parse_args([command, *extra]).vae_precision == "auto"
        assert parser.parse_args([command, *extra, "--vae-precision", "bf16"]).vae_precision == "bf16"
    assert config_from_args(parser.parse_args(["serve", "--vae-precision", "fp16"])).vae_precision == "fp16"
    assert config_from_args(parser.parse_args(["serve"])).vae_precision == "auto"
    with pytest.raises(InvalidParameter, match="vae_precision"):
        ServerConfig(vae_precision="half")


def test_cli_loads_the_model_with_the_precision(tmp_path, sd1_file, photo, monkeypatch):
    from underpaint.cli.main import main
    from underpaint.pipeline.engine import Engine

    loaded: list[Engine] = []
    load = Engine.load.__func__

    def recording(cls, *args, **kwargs):
        loaded.append(load(cls, *args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(Engine, "load", classmethod(recording))
    source = tmp_path / "in.png"
    photo.resize((64, 64)).save(source)
    code = main(["img2img", str(source), "-p", "x", "--steps", "2", "--model", str(sd1_file), "--device", "cpu",
                 "--vae-precision", "bf16", "-o", str(tmp_path / "out.png")])
    assert code == 0 and (tmp_path / "out.png").exists()
    assert [e.vae_precision for e in loaded] == ["bf16"]


def test_server_loads_models_at_the_precision(sd1_file):
    from underpaint.server.app import engine_loader
    from underpaint.server.config import ServerConfig

    config = ServerConfig(device="cpu", dtype="fp32", vae_precision="bf16", preload=False)
    assert engine_loader(config)(sd1_file).vae_precision == "bf16"


def test_bench_row_with_a_vae_precision(tmp_path):
    """bench/gpu_img2img.py --vae-precision bf16: one more underpaint row, taking turns with the
    plain rows, its pictures' difference to the plain row's reported as lossy, not judged."""
    out = tmp_path / "vae.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_img2img.py"), "--tiny", "--cases", "sd15", "--runs", "1",
           "--warmup", "0", "--vae-precision", "bf16", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert [r["runner"] for r in data["results"]] == ["underpaint", "underpaint vae=bf16", "diffusers"]
    (check,) = data["checks"]
    assert check["optimizations"] == "vae=bf16" and check["lossy"] and check["passed"] and check["mean_abs"] > 0
    assert "lossy, measured only" in proc.stdout
