"""Memory modes (--vram), VAE tiling, the fp16 VAE rules and out-of-memory handling, on the CPU.

The CPU is both the "device" and the "home" here, so every visit is a real swap of weight data
that moves nothing; the tests watch the visits through the offload's observer and, for the
strongest check, poison every resting weight with NaN so that any computation on a part that
is not on a visit would show in the output.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flux_fixtures import flux_files  # noqa: F401 - a session fixture
from underpaint.errors import OutOfMemory
from underpaint.models import offload
from underpaint.params import GenerationParams


def _load(path, vram="high", dtype="fp32"):
    from underpaint.pipeline.engine import Engine

    return Engine.load(path, device="cpu", dtype=dtype, vram=vram)


def _request(photo, **fields) -> GenerationParams:
    base = dict(prompt="a red house by the sea", negative_prompt="blurry", init_images=(photo.resize((64, 64)),),
                strength=0.6, steps=4, cfg_scale=7.0, sampler="Euler a", seed=1234, rng="cpu", batch_size=2)
    return GenerationParams(**{**base, **fields})


def _bytes(result) -> list[bytes]:
    return [np.asarray(image).tobytes() for image in result.images]


def _oom() -> BaseException:
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.fixture(scope="module")
def reference(sd1_file, photo):
    """The high-mode result every mode must reproduce byte for byte."""
    return _bytes(_load(sd1_file).generate(_request(photo)))


# --- modes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("vram", ["medium", "low"])
def test_modes_give_the_same_bytes_as_high(sd1_file, photo, reference, vram):
    engine = _load(sd1_file, vram)
    assert engine.model.offload.mode == vram
    assert _bytes(engine.generate(_request(photo))) == reference


def _poison_and_place(model, mode: str) -> None:
    """Replace every resting floating weight by NaN; only the offload's transfer hands out the real ones."""
    real: dict[int, torch.Tensor] = {}
    for module in (*model.text_encoders, model.vae, model.unet):
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.is_floating_point() and tensor.data_ptr() not in real:
                poison = torch.full_like(tensor.data, float("nan"))
                real[poison.data_ptr()] = tensor.data
                tensor.data = poison

    def transfer(tensor, device, dtype):
        return real.get(tensor.data_ptr(), tensor).to(device=device, dtype=dtype or tensor.dtype)

    offload.place(model, mode, device="cpu", home="cpu", transfer=transfer)


def test_modes_compute_only_with_weights_on_a_visit(sd1_file, photo, reference):
    """Low mode with every resting weight replaced by NaN and the real ones handed out only by
    the offload's transfer: the output is still exactly high mode's, so no text encoder, VAE or
    UNet block ever computed outside its visit (and visits restore the resting data)."""
    engine = _load(sd1_file, "low")
    model = engine.model
    _poison_and_place(model, "low")
    assert _bytes(engine.generate(_request(photo))) == reference
    resting = next(model.unet.parameters())
    assert torch.isnan(resting).all()  # back home after the request


def test_flux_transformer_blocks_visit_one_by_one(flux_files, photo):
    """The same check on a tiny FLUX.1-dev: CLIP-L and T5, the autoencoder and every
    ``transformer_blocks[i]`` / ``single_transformer_blocks[i]`` only compute on a visit."""
    from underpaint.models.loader import load_flux
    from underpaint.pipeline.engine import Engine

    def engine():
        return Engine(load_flux(flux_files["transformer"], clip_l=flux_files["clip_l"], t5=flux_files["t5"],
                                vae=flux_files["ae"], dtype=torch.float32))

    request = dict(prompt="a red house", steps=3, strength=0.7, seed=5, rng="cpu")
    picture = photo.resize((64, 64))
    expected = _bytes(engine().img2img(picture, **request))
    low = engine()
    _poison_and_place(low.model, "low")
    names = [name for name, _ in offload.offload_blocks(low.model.unet)]
    assert "transformer_blocks.0" in names and "single_transformer_blocks.0" in names
    assert _bytes(low.img2img(picture, **request)) == expected


def test_medium_visits_text_encoders_and_vae_around_their_calls(sd1_file, photo):
    engine = _load(sd1_file, "medium")
    model = engine.model
    inside: set[str] = set()
    events: list[tuple[str, str]] = []
    calls: list[tuple[str, bool]] = []

    def observe(event, part):
        events.append((event, part))
        (inside.add if event == "in" else inside.discard)(part)

    model.offload.observer = observe
    watch = {"text": model.text_encoders[0], "vae": model.vae.encoder, "vae ": model.vae.decoder}
    handles = [m.register_forward_pre_hook(lambda mod, args, part=part: calls.append((part, part.strip() in inside)))
               for part, m in watch.items()]
    handles.append(model.unet.register_forward_pre_hook(lambda mod, args: calls.append(("unet", bool(inside)))))
    try:
        engine.generate(_request(photo, batch_size=1))
    finally:
        for h in handles:
            h.remove()
    # Prompt encoding, then VAE encode, then the UNet with nothing else on the device, then VAE decode.
    assert events == [("in", "text"), ("out", "text"), ("in", "vae"), ("out", "vae"), ("in", "vae"), ("out", "vae")]
    assert {part for part, on in calls if on} == {"text", "vae", "vae "}
    assert [on for part, on in calls if part == "unet"] and not any(on for part, on in calls if part == "unet")


def test_low_visits_each_unet_block_for_its_forward_only(sd1_file, photo):
    engine = _load(sd1_file, "low")
    model = engine.model
    blocks = dict(offload.offload_blocks(model.unet))
    assert {"down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1", "conv_in",
            "conv_out"} <= set(blocks)
    events: list[tuple[str, str]] = []
    model.offload.observer = lambda event, part: events.append((event, part))
    ran: list[tuple[str, bool]] = []
    handles = [block.register_forward_pre_hook(
        lambda mod, args, name=name: ran.append((name, events[-1] == ("in", f"unet.{name}"))))
        for name, block in blocks.items()]
    try:
        engine.generate(_request(photo, batch_size=1))
    finally:
        for h in handles:
            h.remove()
    unet_events = [e for e in events if e[1].startswith("unet.")]
    # in/out pairs, one block at a time, every block once per UNet call, in forward order.
    assert all(a[0] == "in" and b == ("out", a[1]) for a, b in zip(unet_events[::2], unet_events[1::2]))
    assert ran and all(on for _, on in ran)
    calls = len(ran) // len(blocks)
    assert calls == 3 and len(unet_events) == 2 * len(ran)  # 4 steps at strength 0.6 run 3 steps
    order = [name for name, _ in ran[: len(blocks)]]
    assert order.index("down_blocks.0") < order.index("mid_block") < order.index("up_blocks.1") < order.index("conv_out")
    assert not model.offload.resident


# --- pinned host memory ------------------------------------------------------------------------


class _Pinner:
    """Stands in for ``pin_memory`` (which needs CUDA): records each tensor and returns a copy;
    after ``limit`` tensors it fails, as the system does when no more memory may be locked."""

    def __init__(self, limit: int | None = None):
        self.seen: list[int] = []
        self.limit = limit

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.limit is not None and len(self.seen) >= self.limit:
            raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")
        self.seen.append(id(tensor))
        return tensor.clone()


def _resting_tensors(*modules) -> int:
    return len(offload._tensors(modules))


@pytest.mark.parametrize("vram", ["medium", "low"])
def test_offloaded_weights_are_pinned_and_nothing_else(sd1_file, photo, reference, vram):
    engine = _load(sd1_file)
    model = engine.model
    pinner = _Pinner()
    offload.place(model, vram, device="cpu", pin=True, pinner=pinner)
    encoders = _resting_tensors(*model.text_encoders, model.vae)
    expected = encoders + (_resting_tensors(model.unet) if vram == "low" else 0)
    assert len(pinner.seen) == expected
    # The copies that rest now are what every visit takes along: the same pictures.
    assert _bytes(engine.generate(_request(photo))) == reference


def test_pinning_stops_where_the_system_refuses(sd1_file, photo, reference, caplog):
    engine = _load(sd1_file)
    pinner = _Pinner(limit=5)
    with caplog.at_level("WARNING", logger="underpaint.models.offload"):
        offload.place(engine.model, "low", device="cpu", pin=True, pinner=pinner)
    assert len(pinner.seen) == 5
    assert any("could not pin" in r.getMessage() for r in caplog.records)
    assert _bytes(engine.generate(_request(photo))) == reference


def test_pinning_is_for_cuda_devices_and_can_be_turned_off(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(offload.PIN_ENV, raising=False)
    assert offload.pins_by_default(cuda, cpu) and not offload.pins_by_default(cpu, cpu)
    monkeypatch.setenv(offload.PIN_ENV, "0")
    assert not offload.pins_by_default(cuda, cpu)


def test_vram_is_checked(sd1_file):
    from underpaint.errors import InvalidParameter

    with pytest.raises(InvalidParameter, match="vram"):
        _load(sd1_file, "tiny")


def test_cli_and_server_take_vram():
    from underpaint.cli.main import build_parser
    from underpaint.server.cli import config_from_args
    from underpaint.server.config import ServerConfig

    parser = build_parser()
    for command in ("img2img", "inpaint", "outpaint"):
        extra = ["--mask", "m.png"] if command == "inpaint" else []
        assert parser.parse_args([command, "x.png", *extra, "--vram", "low"]).vram == "low"
    assert parser.parse_args(["txt2img"]).vram == "high"
    assert config_from_args(parser.parse_args(["serve", "--vram", "medium"])).vram == "medium"
    with pytest.raises(SystemExit):
        parser.parse_args(["txt2img", "--vram", "huge"])
    with pytest.raises(Exception, match="vram"):
        ServerConfig(vram="huge")


# --- VAE tiling -------------------------------------------------------------------------------


class _Count:
    def __init__(self, module):
        self.n = 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.n += 1


def test_tiled_vae_really_tiles(sd1_engine, photo):
    """64 and 128 px tiles over a 256 px picture: the encoder and decoder run once per tile, the
    settings are restored after, and larger tiles come closer to the untiled decode.

    How close is not a property of tiling alone: with the tiny random-weight VAE of these tests
    the output is dominated by GroupNorm statistics and zero-padded borders, which change per
    tile, so tiled and untiled decodes differ by about as much as the picture varies (measured:
    mean |Δ| 31 levels of 255 with 128 px tiles, 52 with 64 px tiles; the picture's std is 52).
    A trained VAE's difference has to be measured on real weights (docs/performance.md)."""
    from underpaint.imageio.convert import images_to_tensor
    from underpaint.pipeline.generate import decode_latents, encode_pixels

    model = sd1_engine.model
    pixels = images_to_tensor([photo.resize((256, 256))])
    enc, dec = _Count(model.vae.encoder), _Count(model.vae.decoder)
    errors = {}
    try:
        latents = encode_pixels(model, pixels)
        whole = np.asarray(decode_latents(model, latents)[0], dtype=np.int16)
        assert (enc.n, dec.n) == (1, 1)
        for tile, count in ((128, 9), (64, 36)):  # tiles start every 3/4 tile: 3×3 and 6×6 of them
            enc.n = dec.n = 0
            with offload.tiled(model.vae, tile):
                tiled_latents = encode_pixels(model, pixels)
                tiles = np.asarray(decode_latents(model, latents)[0], dtype=np.int16)
            assert (enc.n, dec.n) == (count, count)
            assert tiled_latents.shape == latents.shape and tiles.shape == whole.shape
            errors[tile] = np.abs(tiles - whole).mean()
        assert not model.vae.use_tiling  # the previous settings are back
    finally:
        enc.handle.remove()
        dec.handle.remove()
    assert errors[128] < errors[64] < 64, errors


def test_low_mode_tiles_large_pictures_only(sd1_file, photo):
    engine = _load(sd1_file, "low")
    offload.place(engine.model, "low", tile_px=64)
    dec = _Count(engine.model.vae.decoder)
    try:
        engine.generate(_request(photo, batch_size=1, steps=2))  # 64 px: one tile
        assert dec.n == 1
        engine.generate(_request(photo, batch_size=1, steps=2, width=128, height=128))
        assert dec.n > 2
    finally:
        dec.handle.remove()
    offload.place(engine.model, "high")
    assert not engine.model.vae.use_tiling


# --- out of memory ----------------------------------------------------------------------------


def test_vae_out_of_memory_retries_once_in_tiles(sd1_file, photo, monkeypatch):
    from underpaint.pipeline.generate import decode_latents, encode_pixels
    from underpaint.imageio.convert import images_to_tensor

    engine = _load(sd1_file, "medium")
    model = engine.model
    offload.place(model, "medium", tile_px=64)
    latents = encode_pixels(model, images_to_tensor([photo.resize((128, 128))]))
    whole = np.asarray(decode_latents(model, latents)[0], dtype=np.int16)

    decoder = model.vae.decoder
    forward = decoder.forward
    sizes: list[tuple[int, int]] = []
    failed: list[bool] = []

    def flaky(z, *args, **kwargs):
        sizes.append(tuple(z.shape[-2:]))
        if not failed:
            failed.append(True)
            raise _oom()
        return forward(z, *args, **kwargs)

    with offload.tiled(model.vae, 64):
        tiled = np.asarray(decode_latents(model, latents)[0], dtype=np.int16)
    monkeypatch.setattr(decoder, "forward", flaky)
    retried = np.asarray(decode_latents(model, latents)[0], dtype=np.int16)
    assert sizes[0] == (16, 16) and len(sizes) == 1 + 9 and all(s[0] <= 8 for s in sizes[1:])  # then 8×8 tiles
    assert not model.vae.use_tiling and not model.offload.resident
    assert np.array_equal(retried, tiled) and not np.array_equal(retried, whole)
    # The visit ended with the failure: the VAE's weights are back home.
    assert next(model.vae.parameters()).device.type == "cpu"


def test_sampling_out_of_memory_is_a_clear_error_and_the_engine_goes_on(sd1_file, photo, reference, monkeypatch):
    engine = _load(sd1_file, "low")
    mid = engine.model.unet.mid_block
    forward = mid.forward
    failed: list[bool] = []

    def flaky(*args, **kwargs):
        if not failed:
            failed.append(True)
            raise _oom()
        return forward(*args, **kwargs)

    monkeypatch.setattr(mid, "forward", flaky)
    with pytest.raises(OutOfMemory) as caught:
        engine.generate(_request(photo))
    assert str(caught.value) == ("the GPU ran out of memory at 64x64, batch 2: try a smaller size or batch")
    assert not engine.model.offload.resident
    assert _bytes(engine.generate(_request(photo))) == reference  # the next request works


def _as_if_on_a_gpu(monkeypatch):
    """Let the out-of-memory fallback run on the CPU: it asks ``lower_vram_mode`` as for a CUDA model."""
    from underpaint.models.optimize import speed_of
    from underpaint.pipeline import engine as engine_module

    real = engine_module.lower_vram_mode
    monkeypatch.setattr(engine_module, "lower_vram_mode", lambda model: real(SimpleNamespace(
        device=torch.device("cuda"), offload=getattr(model, "offload", None), speed=speed_of(model))))


def _failing_in(engine, monkeypatch, modes: tuple[str, ...]) -> list[str]:
    """The UNet's mid block runs out of memory while the engine is in one of ``modes``; returns the
    mode of every failed try."""
    mid = engine.model.unet.mid_block
    forward = mid.forward
    failures: list[str] = []

    def flaky(*args, **kwargs):
        mode = engine.model.offload.mode
        if mode in modes:
            failures.append(mode)
            raise _oom()
        return forward(*args, **kwargs)

    monkeypatch.setattr(mid, "forward", flaky)
    return failures


def test_out_of_memory_moves_down_a_memory_mode_and_runs_the_request_again(sd1_file, photo, reference, monkeypatch,
                                                                          caplog):
    _as_if_on_a_gpu(monkeypatch)
    engine = _load(sd1_file, "high")
    failures = _failing_in(engine, monkeypatch, ("high",))
    with caplog.at_level("WARNING", logger="underpaint.pipeline.engine"):
        result = engine.generate(_request(photo))
    assert failures == ["high"] and engine.model.offload.mode == "medium"
    assert _bytes(result) == reference  # the same picture, from the start again
    assert "switching to --vram medium" in caplog.text
    assert next(engine.model.text_encoders[0].parameters()).device.type == "cpu"  # medium's home
    assert _bytes(engine.generate(_request(photo))) == reference and failures == ["high"]  # it stays there


def test_out_of_memory_in_every_mode_is_the_clear_error(sd1_file, photo, reference, monkeypatch):
    _as_if_on_a_gpu(monkeypatch)
    engine = _load(sd1_file, "high")
    failures = _failing_in(engine, monkeypatch, ("high", "medium", "low"))
    with pytest.raises(OutOfMemory, match=r"64x64, batch 2: try a smaller size or batch$"):
        engine.generate(_request(photo))
    assert failures == ["high", "medium", "low"] and not engine.model.offload.resident
    monkeypatch.undo()
    assert _bytes(engine.generate(_request(photo))) == reference  # the engine goes on, in low mode


def test_lower_vram_mode_respects_the_speed_switches_and_the_cpu():
    from underpaint.models.optimize import SpeedOptions
    from underpaint.pipeline.engine import lower_vram_mode

    def model(mode, device="cuda", **switches):
        return SimpleNamespace(device=torch.device(device), offload=SimpleNamespace(mode=mode),
                               speed=SpeedOptions(**switches))

    assert lower_vram_mode(model("high")) == "medium"
    assert lower_vram_mode(model("medium")) == "low"
    assert lower_vram_mode(model("low")) is None
    assert lower_vram_mode(model("high", fused_qkv=True)) is None  # fused projections need high
    assert lower_vram_mode(model("medium", compile=True)) is None  # compile refuses low
    assert lower_vram_mode(model("high", compile=True)) == "medium"
    assert lower_vram_mode(model("high", device="cpu")) is None  # nowhere else to rest


def test_out_of_memory_message_names_size_batch_and_lower_modes(sd1_engine, photo):
    from underpaint.pipeline.engine import out_of_memory_error

    params = GenerationParams(prompt="x", width=1024, height=1024, batch_size=4)
    assert str(out_of_memory_error(sd1_engine.model, params)) == (
        "the GPU ran out of memory at 1024x1024, batch 4: try --vram medium or low, a smaller size or batch")
    assert OutOfMemory("x").http_status == 507


def test_out_of_memory_message_names_the_switch_that_kept_the_mode(sd1_file):
    from underpaint.models.optimize import SpeedOptions, apply
    from underpaint.pipeline.engine import out_of_memory_error

    engine = _load(sd1_file, "high")
    params = GenerationParams(prompt="x", width=512, height=512)
    apply(engine.model, SpeedOptions(fused_qkv=True, channels_last=True))
    assert str(out_of_memory_error(engine.model, params)).endswith(
        "try --vram medium or low without --optimize fused_qkv, a smaller size or batch")
    apply(engine.model, SpeedOptions())
    offload.place(engine.model, "low", device="cpu")
    assert str(out_of_memory_error(engine.model, params)).endswith(": try a smaller size or batch")


def test_a_visit_that_runs_out_of_memory_half_way_leaves_everything_home(sd1_file, photo):
    engine = _load(sd1_file, "medium")
    model = engine.model
    before = [t.data_ptr() for t in model.text_encoders[0].parameters()]
    copies: list[int] = []

    def transfer(tensor, device, dtype):
        copies.append(1)
        if len(copies) == 5:
            raise _oom()
        return tensor.clone()  # a "device copy": a new tensor

    offload.place(model, "medium", transfer=transfer)
    with pytest.raises(OutOfMemory, match="64x64, batch 2: try --vram low"):
        engine.generate(_request(photo))
    assert len(copies) == 5
    assert [t.data_ptr() for t in model.text_encoders[0].parameters()] == before


def test_runtime_error_saying_out_of_memory_counts():
    assert offload.is_out_of_memory(_oom())
    assert offload.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not offload.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not offload.is_out_of_memory(ValueError("out of memory"))


def test_cli_prints_one_line_and_exits_2_on_out_of_memory(tmp_path, sd1_file, photo, monkeypatch, capsys):
    from diffusers import UNet2DConditionModel

    from underpaint.cli.main import main

    def boom(self, *args, **kwargs):
        raise _oom()

    monkeypatch.setattr(UNet2DConditionModel, "forward", boom)
    source = tmp_path / "in.png"
    photo.resize((64, 64)).save(source)
    code = main(["img2img", str(source), "-p", "x", "--steps", "2", "--model", str(sd1_file), "--device", "cpu",
                 "--vram", "medium", "-o", str(tmp_path / "out.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == ("underpaint: error: the GPU ran out of memory at 64x64, batch 1: try --vram low, "
                       "a smaller size or batch")
    assert not any("Traceback" in line for line in err)


def test_server_answers_507_and_serves_the_next_request(tmp_path, sd1_file, photo, monkeypatch):
    import base64
    import io

    from fastapi.testclient import TestClient

    from underpaint.server.app import create_app
    from underpaint.server.config import ServerConfig

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "tiny.safetensors").write_bytes(sd1_file.read_bytes())
    buffer = io.BytesIO()
    photo.resize((64, 64)).save(buffer, format="PNG")
    body = {"init_images": [base64.b64encode(buffer.getvalue()).decode()], "prompt": "x", "steps": 2,
            "denoising_strength": 0.5, "seed": 3, "width": 64, "height": 64}

    from diffusers import UNet2DConditionModel

    forward = UNet2DConditionModel.forward
    failed: list[bool] = []

    def flaky(self, *args, **kwargs):
        if not failed:
            failed.append(True)
            raise _oom()
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", flaky)
    app = create_app(ServerConfig(models_dir=tmp_path, device="cpu", vram="medium", preload=False))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        first = client.post("/sdapi/v1/img2img", json=body)
        assert first.status_code == 507, first.text
        assert first.json()["error"] == "out_of_memory"
        assert first.json()["detail"].startswith("the GPU ran out of memory at 64x64, batch 1: try --vram low")
        second = client.post("/sdapi/v1/img2img", json=body)
        assert second.status_code == 200, second.text
        assert len(second.json()["images"]) == 1


# --- VAE precision ----------------------------------------------------------------------------


def test_vae_compute_dtype_rules():
    f16, f32, bf16 = torch.float16, torch.float32, torch.bfloat16
    assert offload.vae_compute_dtype(f16, True) == f32  # SDXL's VAE in an fp16 model
    assert offload.vae_compute_dtype(f16, False) == f16  # an fp16-safe VAE (sdxl-vae-fp16-fix)
    assert offload.vae_compute_dtype(bf16, True) == bf16
    assert offload.vae_compute_dtype(f32, True) == f32


class _OverflowingVAE(torch.nn.Module):
    """Overflows in half precision as SDXL's VAE does (a large intermediate becomes inf, then NaN)."""

    def __init__(self, force_upcast: bool):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor([4.0e4], dtype=torch.float16), requires_grad=False)
        self.config = SimpleNamespace(force_upcast=force_upcast, block_out_channels=(8, 8, 8, 8))
        self.seen: list[torch.dtype] = []

    def decode(self, z):
        self.seen.append(self.gain.dtype)
        big = z[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2).abs() * self.gain + self.gain
        return SimpleNamespace(sample=(big - big).to(z.dtype))


def _stub_model(vae) -> SimpleNamespace:
    return SimpleNamespace(vae=vae, device=torch.device("cpu"), dtype=torch.float16,
                           spec=SimpleNamespace(scaling_factor=1.0, shift_factor=0.0))


def test_fp16_decode_with_nans_runs_again_in_fp32():
    from underpaint.pipeline.generate import decode_latents

    vae = _OverflowingVAE(force_upcast=False)
    image = decode_latents(_stub_model(vae), torch.ones(1, 4, 2, 2))[0]
    assert vae.seen == [torch.float16, torch.float32]
    assert set(np.unique(np.asarray(image))) == {127}  # (0 + 1) / 2 of 255, truncated
    assert vae.gain.dtype == torch.float16  # the weights are half precision again


def test_force_upcast_vae_runs_in_fp32_at_once():
    from underpaint.pipeline.generate import decode_latents

    vae = _OverflowingVAE(force_upcast=True)
    decode_latents(_stub_model(vae), torch.ones(1, 4, 2, 2))
    assert vae.seen == [torch.float32] and vae.gain.dtype == torch.float16


def test_sdxl_vae_in_an_fp16_model_decodes_in_fp32(sdxl_file):
    from underpaint.models.loader import load_model
    from underpaint.pipeline.generate import decode_latents

    model = load_model(sdxl_file, device="cpu", dtype=torch.float16)
    assert model.vae.config.force_upcast and offload.model_vae_dtype(model) == torch.float32
    seen: list[torch.dtype] = []
    handle = model.vae.decoder.register_forward_pre_hook(
        lambda mod, args: seen.append((next(mod.parameters()).dtype, args[0].dtype)))
    try:
        decode_latents(model, torch.zeros(1, 4, 4, 4))
    finally:
        handle.remove()
    assert seen == [(torch.float32, torch.float32)]
    assert next(model.vae.parameters()).dtype == torch.float16


def test_vae_upcast_holds_the_weights_once_and_restores_them_exactly(sdxl_file):
    """The fp16 weights of an upcast VAE are not kept beside their float32 copy while it runs (the
    VRAM peak would hold them twice), and come back bit for bit, in fp16, afterwards."""
    import gc

    from torch._subclasses.fake_tensor import is_fake

    from underpaint.models.loader import load_model
    from underpaint.pipeline.generate import decode_latents

    model = load_model(sdxl_file, device="cpu", dtype=torch.float16)
    before = {name: p.detach().clone() for name, p in model.vae.named_parameters()}
    half_storages = {p.untyped_storage().data_ptr() for p in model.vae.parameters()}
    kept: list[int] = []

    def holds_half_weights(t) -> bool:
        # Only tensors with memory can share it: the fake and functional tensors a compiled graph
        # from another test may leave alive have no data pointer to read.
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float16 or is_fake(t) or t.device.type == "meta":
            return False
        try:
            return t.untyped_storage().data_ptr() in half_storages
        except RuntimeError:
            return False

    def count_half_copies(mod, args):
        gc.collect()
        kept.append(sum(1 for t in gc.get_objects() if holds_half_weights(t)))

    handle = model.vae.decoder.register_forward_pre_hook(count_half_copies)
    try:
        decode_latents(model, torch.zeros(1, 4, 4, 4))
    finally:
        handle.remove()
    assert kept == [0]
    for name, p in model.vae.named_parameters():
        assert p.dtype == torch.float16 and torch.equal(p, before[name]), name


def test_a_narrowing_visit_keeps_the_original():
    """float32 weights visiting in fp16 come back as they were (a cast back could not restore them)."""
    layer = torch.nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight.mul_(1 + 1e-4)  # values fp16 cannot hold exactly
    weight = layer.weight.detach().clone()
    swapped = offload._swap_in((layer,), torch.device("cpu"), torch.float16, offload._transfer)
    assert layer.weight.dtype == torch.float16
    offload._swap_out(swapped)
    assert layer.weight.dtype == torch.float32 and torch.equal(layer.weight, weight)
