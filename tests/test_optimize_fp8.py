"""``--optimize fp8``: linear layers multiplying in fp8 through ``torch._scaled_mm`` (PyTorch's CPU
build runs it too, emulated, so the code path is exercised here; speed is a GPU matter).

References: the same quantization done by hand in float32 (scales, rounding to e4m3, back to
float32, a float32 matmul), ``F.linear`` on the full-precision weights, the checkpoint's own fp8
bytes, and a LoRA merged by hand from its file. The switch is lossy, so pictures are compared
with a bound measured on the tiny model (see :data:`PSNR_FLOOR`), and undo must give back the
model's own pictures bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flux_fixtures import flux_files  # noqa: F401 - a session fixture
from test_optimize import _load, _pixels, _request, write_attention_lora
from underpaint.errors import InvalidParameter
from underpaint.models import fp8, optimize
from underpaint.models.fp8 import Fp8Linear, Fp8StoredLinear
from underpaint.models.optimize import SpeedOptions
from underpaint.models.quantized import StoredLinear
from underpaint.pipeline.networks import request_networks

E4M3 = torch.float8_e4m3fn

#: Pictures of the tiny random-weight SD1 model with fp8 against without, 4 DPM++ 2M steps at
#: strength 0.6 in fp32: 27.8 dB measured (mean |Δ| 7.2 levels). This model amplifies any rounding:
#: bf16 instead of fp32, with no fp8 at all, already costs it 37 dB; fp8 rounds each weight and
#: activation 16 times more coarsely (3 mantissa bits against bf16's 7), about 3.7 % per layer.
#: Random weights cannot judge visual quality; the bound only catches a broken conversion (wrong
#: scales or layouts give noise, far below it), and the ceiling shows the switch is really on.
PSNR_FLOOR, PSNR_CEILING = 24.0, 45.0


def _hand_quantized(t: torch.Tensor) -> torch.Tensor:
    """``t`` (rows, k) through e4m3 with one scale per row (largest magnitude → 448), back in float32."""
    scale = t.abs().amax(dim=1, keepdim=True).float() / 448.0
    return (t.float() / scale).to(E4M3).float() * scale


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def _linear(k: int, n: int, seed: int = 0) -> tuple[torch.nn.Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(k, n)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n, k, generator=g) * 0.02)
        layer.bias.copy_(torch.randn(n, generator=g) * 0.01)
    return layer, torch.randn(3, 40, k, generator=g)


# --- the layer --------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float32, 1e-5), (torch.bfloat16, 8e-3)])
def test_fp8_linear_equals_the_quantization_done_by_hand(dtype, rtol):
    layer, x = _linear(96, 48)
    root = torch.nn.Sequential(layer).to(dtype)
    x = x.to(dtype)
    weight, bias = layer.weight.detach().float(), layer.bias.detach().float()
    expected = _hand_quantized(x.reshape(-1, 96).float()) @ _hand_quantized(weight).t() + bias
    assert fp8.convert(root, device=torch.device("cpu"), dtype=dtype) == 1
    assert isinstance(root[0], Fp8Linear) and root[0].fp8_weight.dtype == E4M3
    out = root(x)
    assert out.dtype == dtype and out.shape == (3, 40, 48)
    torch.testing.assert_close(out.float().reshape(-1, 48), expected, rtol=rtol, atol=rtol * expected.abs().max())


def test_fp8_linear_is_close_to_full_precision_but_not_equal():
    layer, x = _linear(320, 640, seed=1)
    plain = layer(x)
    root = torch.nn.Sequential(layer)
    fp8.convert(root, device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        relative = float((root(x) - plain).norm() / plain.norm())
    assert 0.005 < relative < 0.06  # e4m3 rounds to 3 mantissa bits: about 2.6 % RMS per operand


def test_only_widths_scaled_mm_takes_are_converted_and_restore_is_exact():
    root = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Linear(48, 40), torch.nn.Linear(40, 16, bias=False))
    weights = [m.weight for m in root]
    before = {k: v.clone() for k, v in root.state_dict().items()}
    assert fp8.convert(root, device=torch.device("cpu"), dtype=torch.float32) == 1
    assert [type(m) for m in root] == [Fp8Linear, torch.nn.Linear, torch.nn.Linear]
    assert root[0].weight is weights[0]  # the host copy is the layer's own Parameter
    assert [n for n, _ in root.named_parameters()] == ["0.bias", "1.weight", "1.bias", "2.weight"]
    assert set(root.state_dict()) == set(before)  # still reads as the linear layers it replaces
    fp8.restore(root)
    assert [type(m) for m in root] == [torch.nn.Linear] * 3
    assert [m.weight for m in root] == weights
    after = root.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert not hasattr(root[0], "fp8_weight") and not hasattr(root[0], "full_weight")


def test_output_dtype_is_the_compute_dtype_where_the_kernel_writes_it():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert fp8.output_dtype(torch.device("cpu"), dtype) == dtype


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("capability", "refused"), [((8, 6), True), ((8, 0), True), ((8, 9), False),
                                                     ((9, 0), False), ((12, 0), False)])
def test_fp8_needs_fp8_tensor_cores(monkeypatch, capability, refused):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    options = SpeedOptions.parse("fp8")
    if not refused:
        optimize.check(options, device=torch.device("cuda"))
        return
    with pytest.raises(InvalidParameter) as info:
        optimize.check(options, device=torch.device("cuda"))
    message = str(info.value)
    assert info.value.field == "optimize" and "fp8" in message and "8.9" in message
    assert f"{capability[0]}.{capability[1]}" in message


def test_fp8_runs_on_the_cpu_and_nowhere_else_without_cuda():
    options = SpeedOptions.parse("fp8")
    for vram in ("high", "medium", "low"):
        optimize.check(options, device=torch.device("cpu"), vram=vram)
    with pytest.raises(InvalidParameter, match="fp8"):
        optimize.check(options, device=torch.device("mps"))


def test_fp8_is_named_and_labelled_lossy(capsys):
    from underpaint.cli.main import build_parser

    options = SpeedOptions.parse("compile,fp8,fused_qkv")
    assert options.describe() == "fused_qkv,fp8,compile"  # applied in this order
    assert optimize.LOSSY == ("fp8",)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["img2img", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "fp8 (LOSSY, changes the picture: it trades quality for speed" in text


# --- through the engine (tiny SD1) ------------------------------------------------------------


LORA_TAG = " <lora:strong:0.3>"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, sd1_file):
    """A LoRA over every UNet attention projection (as in tests/test_optimize.py)."""
    root = tmp_path_factory.mktemp("fp8-models")
    (root / "loras").mkdir()
    write_attention_lora(_load(sd1_file).model.unet, root / "loras" / "strong.safetensors")
    return root


@pytest.fixture(scope="module")
def engine(sd1_file, models_dir):
    return _load(sd1_file, models_dir)


@pytest.fixture(scope="module")
def plain(engine, photo):
    return _pixels(engine.generate(_request(photo)))


@pytest.fixture(scope="module")
def fp8_picture(engine, photo):
    """The picture of :func:`_request` with fp8 on (undone afterwards)."""
    optimize.apply(engine.model, SpeedOptions(fp8=True))
    try:
        return _pixels(engine.generate(_request(photo)))
    finally:
        optimize.undo(engine.model)


@pytest.fixture()
def fp8_on(engine):
    optimize.apply(engine.model, SpeedOptions(fp8=True))
    yield engine
    optimize.undo(engine.model)


def test_engine_fp8_picture_is_close_and_undo_gives_the_model_back(engine, photo, plain):
    unet = engine.model.unet
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    linears = {n: m for n, m in unet.named_modules() if type(m) is torch.nn.Linear}
    weights = {n: m.weight for n, m in linears.items()}
    optimize.apply(engine.model, SpeedOptions(fp8=True))
    try:
        converted = {n for n, m in unet.named_modules() if isinstance(m, Fp8Linear)}
        assert converted == set(linears)  # every width of the tiny UNet is a multiple of 16
        assert not any(p.dtype == torch.float32 and p.ndim == 2 for n, p in unet.named_parameters()
                       if n.rpartition(".")[0] in converted)  # full-precision weights are not the module's
        fast = _pixels(engine.generate(_request(photo)))
    finally:
        optimize.undo(engine.model)
    psnr = _psnr(plain, fast)
    assert PSNR_FLOOR <= psnr <= PSNR_CEILING, psnr
    assert all(type(m) is torch.nn.Linear and m.weight is weights[n] for n, m in linears.items())
    after = unet.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)
    assert np.array_equal(_pixels(engine.generate(_request(photo))), plain)


def test_unet_output_error_is_a_few_percent(engine):
    unet = engine.model.unet
    g = torch.Generator().manual_seed(5)
    inputs = (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 16, generator=g))
    with torch.no_grad():
        plain_out = unet(*inputs).sample
        optimize.apply(engine.model, SpeedOptions(fp8=True))
        try:
            fast_out = unet(*inputs).sample
        finally:
            optimize.undo(engine.model)
    relative = float((fast_out - plain_out).norm() / plain_out.norm())
    assert 0.005 < relative < 0.15, relative


def test_fp8_after_fused_projections_converts_them_and_computes_the_same(engine, photo, fp8_picture):
    optimize.apply(engine.model, SpeedOptions(fused_qkv=True, fp8=True))
    try:
        attn = engine.model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
        assert isinstance(attn.to_qkv, Fp8Linear) and isinstance(attn.to_q, Fp8Linear)
        fused = _pixels(engine.generate(_request(photo)))
    finally:
        optimize.undo(engine.model)
    assert not hasattr(attn, "to_qkv") and type(attn.to_q) is torch.nn.Linear
    # one scale per output row and per token: the fused product is the three products side by side
    assert np.abs(fp8_picture - fused).mean() <= 0.05, np.abs(fp8_picture - fused).mean()


def test_fp8_in_vram_low_gives_the_same_picture(sd1_file, photo, fp8_picture):
    low = _load(sd1_file, optimize="fp8", vram="low")
    assert np.array_equal(_pixels(low.generate(_request(photo))), fp8_picture)
    assert all(m.fp8_weight.device.type == "cpu" for m in fp8.fp8_layers(low.model.unet))


# --- LoRAs ------------------------------------------------------------------------------------


def _merged_by_hand(engine, models_dir, factor: float) -> dict[str, torch.Tensor]:
    """Each LoRA-touched UNet weight plus factor · (alpha / rank) · up @ down, from the file."""
    lora = load_file(str(models_dir / "loras" / "strong.safetensors"))
    unet = engine.model.unet
    merged = {}
    for path, module in unet.named_modules():
        name = "lora_unet_" + path.replace(".", "_")
        if f"{name}.lora_up.weight" in lora:
            up, down = lora[f"{name}.lora_up.weight"], lora[f"{name}.lora_down.weight"]
            scale = float(lora[f"{name}.alpha"]) / down.shape[0]
            merged[path] = module.weight.detach().float() + factor * scale * (up @ down)
    return merged


def test_lora_refreshes_the_fp8_copies_and_restores_them(fp8_on, models_dir, photo):
    model = fp8_on.model
    layers = {n: m for n, m in model.unet.named_modules() if isinstance(m, Fp8Linear)}
    before = {n: (m.fp8_weight.clone(), m.fp8_scale.clone()) for n, m in layers.items()}
    expected = _merged_by_hand(fp8_on, models_dir, 0.3)
    with request_networks(model, _request(photo, prompt="a red house" + LORA_TAG)):
        for path, weight in expected.items():
            values, scale = fp8.quantize_rows(weight)
            layer = layers[path]
            torch.testing.assert_close(layer.fp8_scale, scale.reshape(1, -1), rtol=1e-6, atol=0)
            assert (layer.fp8_weight.float() != values.float()).float().mean() < 0.01  # ties may round apart
        untouched = [n for n in layers if n not in expected]
        assert untouched and all(torch.equal(layers[n].fp8_weight, before[n][0]) for n in untouched)
    for name, layer in layers.items():
        assert torch.equal(layer.fp8_weight, before[name][0]) and torch.equal(layer.fp8_scale, before[name][1])


def test_fp8_with_a_lora_equals_fp8_of_the_merged_weights(engine, models_dir, photo, fp8_picture):
    optimize.apply(engine.model, SpeedOptions(fp8=True))
    try:
        with_lora = _pixels(engine.generate(_request(photo, prompt="a red house by the sea" + LORA_TAG)))
    finally:
        optimize.undo(engine.model)
    merged = _merged_by_hand(engine, models_dir, 0.3)
    unet = engine.model.unet
    originals = {path: unet.get_submodule(path).weight.detach().clone() for path in merged}
    with torch.no_grad():
        for path, weight in merged.items():
            unet.get_submodule(path).weight.copy_(weight)
    optimize.apply(engine.model, SpeedOptions(fp8=True))
    try:
        by_hand = _pixels(engine.generate(_request(photo)))
    finally:
        optimize.undo(engine.model)
        with torch.no_grad():
            for path, weight in originals.items():
                unet.get_submodule(path).weight.copy_(weight)
    assert np.abs(with_lora - by_hand).mean() <= 0.05
    assert np.abs(with_lora - fp8_picture).mean() > 1  # the LoRA does change the picture


# --- checkpoint fp8 bytes (tiny FLUX) ---------------------------------------------------------


@pytest.fixture(scope="module")
def scaled_fp8(flux_files, tmp_path_factory):  # noqa: F811
    import tiny_flux as tf

    folder = tmp_path_factory.mktemp("fp8-flux")
    return tf.write_scaled_fp8_transformer(folder / "flux1-dev-tiny-scaled-fp8.safetensors")


@pytest.mark.parametrize("key", ["transformer_fp8", "scaled_fp8"])
def test_checkpoint_fp8_bytes_are_used_as_stored(flux_files, scaled_fp8, key):  # noqa: F811
    from test_flux_models import run, transformer_inputs
    from underpaint.models.loader import load_flux

    path = scaled_fp8 if key == "scaled_fp8" else flux_files[key]
    model = load_flux(path, clip_l=flux_files["clip_l"], t5=flux_files["t5"], vae=flux_files["ae"],
                      dtype=torch.float32)
    unet = model.unet
    stored = {n: m for n, m in unet.named_modules() if isinstance(m, StoredLinear)}
    assert stored
    packed = {n: (m.packed, m.packed.clone()) for n, m in stored.items()}
    inputs = transformer_inputs()
    plain = run(unet, inputs)
    optimize.apply(model, SpeedOptions(fp8=True))
    try:
        assert all(isinstance(m, Fp8StoredLinear) for m in stored.values())
        assert any(isinstance(m, Fp8Linear) for m in unet.modules())  # the layers the file keeps in bf16
        for name, layer in stored.items():
            same, copy = packed[name]
            assert layer.packed is same and torch.equal(layer.packed, copy)  # no requantization
            scale = 1.0 if layer.scale is None else layer.scale
            assert torch.equal(layer.fp8_scale, torch.full((1, layer.out_features), scale))
        if key == "scaled_fp8":
            assert any(m.scale is not None and m.scale != 1.0 for m in stored.values())
        layer = stored["single_transformer_blocks.0.proj_out"]
        x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(2))
        expected = _hand_quantized(x) @ layer.dequantized_weight(torch.float32).t() + layer.bias.detach()
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
        fast = run(unet, inputs)
    finally:
        optimize.undo(model)
    assert all(type(m) is StoredLinear for m in stored.values())
    assert not any(isinstance(m, (Fp8Linear, Fp8StoredLinear)) for m in unet.modules())
    relative = float((fast - plain).norm() / plain.norm())
    assert 0.001 < relative < 0.1, relative
    assert torch.equal(run(unet, inputs), plain)


def test_gguf_layers_are_left_as_they_are(flux_files):  # noqa: F811
    from underpaint.models.loader import load_flux

    model = load_flux(flux_files["gguf"], clip_l=flux_files["clip_l"], t5=flux_files["t5"], vae=flux_files["ae"],
                      dtype=torch.float32)
    stored = [m for m in model.unet.modules() if isinstance(m, StoredLinear)]
    assert stored and all(m.kind.startswith("Q") for m in stored)
    optimize.apply(model, SpeedOptions(fp8=True))
    try:
        assert all(type(m) is StoredLinear for m in stored)
    finally:
        optimize.undo(model)


# --- the GPU benchmark ------------------------------------------------------------------------


def test_benchmark_measures_an_fp8_row_instead_of_checking_it():
    import importlib.util
    import sys
    from pathlib import Path

    name = "underpaint_bench_gpu_img2img"
    if name not in sys.modules:
        script = Path(__file__).resolve().parents[1] / "bench" / "gpu_img2img.py"
        spec = importlib.util.spec_from_file_location(name, script)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    bench = sys.modules[name]
    settings = bench.settings_from(bench.parse_args(["--tiny", "--optimize", "fp8"]))
    assert [speed.fp8 for speed in settings.speeds] == [True]
    case = bench.select_cases(bench.parse_args(["--tiny", "--cases", "sd15"]))[0]
    g = np.random.default_rng(3)
    plain = [g.integers(0, 256, (8, 8, 3), dtype=np.uint8)]
    changed = [np.clip(plain[0].astype(np.int16) + g.integers(-12, 13, (8, 8, 3)), 0, 255).astype(np.uint8)]
    lossless = bench.compare(case, "fp8", plain, changed)
    lossy = bench.compare(case, "fp8", plain, changed, lossy=True)
    assert not lossless.passed and lossy.passed and lossy.lossy
    assert (lossy.mean_abs, lossy.psnr_db) == (lossless.mean_abs, lossless.psnr_db) and lossy.psnr_db < 40
