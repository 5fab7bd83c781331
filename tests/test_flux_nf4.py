"""FLUX transformers quantized to 4 bits by bitsandbytes (NF4, FP4), kept as stored and expanded per layer.

The tiny files are written by bitsandbytes itself: each linear weight goes through its
``Params4bit`` quantizer and its ``Linear4bit.state_dict`` (the serialization Forge's
``flux1-dev-bnb-nf4`` files and diffusers' NF4 checkpoints use), with and without double
quantization of the block scales. References: bitsandbytes' own dequantization (its portable
implementation: its AVX-512 CPU kernel takes the first block's scale for every block that spans
rows), diffusers' FLUX converter applied to those dequantized weights, and the same model written
back as an ordinary safetensors file of the dequantized weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_flux as tf
from flux_fixtures import flux_files  # noqa: F401  (session fixture)
from test_flux_models import assert_same_weights, run, transformer_inputs, witness_transformer
from underpaint.errors import ModelError
from underpaint.models.bnb4 import QUANT_STATE, stored_4bit
from underpaint.models.detect import detect
from underpaint.models.flux_loader import components_needed, is_flux, load_flux, read_any_header
from underpaint.models.quantized import BlockScales, StoredLinear, StoredWeight, module_bytes

bnb = pytest.importorskip("bitsandbytes")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

AIO = "model.diffusion_model."


# --- writing files the way bitsandbytes serializes them ----------------------------------------------------


def bnb_layer(weight: torch.Tensor, quant_type: str, nested: bool, blocksize: int = 64):
    """A ``Linear4bit`` holding ``weight`` quantized by bitsandbytes (``Params4bit`` quantizes on ``.to``)."""
    rows, cols = weight.shape
    layer = bnb.nn.Linear4bit(cols, rows, bias=False, quant_type=quant_type, compress_statistics=nested,
                              device="meta")
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=nested, blocksize=blocksize).to("cpu")
    return layer


def bnb_serialized(name: str, weight: torch.Tensor, quant_type: str, nested: bool,
                   blocksize: int = 64) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(``Linear4bit.state_dict`` of the quantized weight under ``name``, bitsandbytes' own dequantization)."""
    layer = bnb_layer(weight, quant_type, nested, blocksize)
    tensors = {k: v.clone() for k, v in layer.state_dict(prefix=name.removesuffix("weight")).items()}
    return tensors, bnb_dequantized(layer.weight.data, layer.weight.quant_state)


def bnb_dequantized(packed: torch.Tensor, state) -> torch.Tensor:
    """``bitsandbytes.functional.dequantize_4bit`` through bitsandbytes' portable implementation: on CPUs
    with AVX-512 its CPU kernel gives every block of a row shorter than the block the first block's scale
    (bitsandbytes 0.50.2), so the dispatching call is not a reference on every machine."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = state.absmax
    if state.nested:  # the block scales are themselves 8-bit blocks plus an offset
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    flat = packed.view(torch.uint8).reshape(-1)
    return _dequantize_4bit_compute(flat, absmax.float(), _get_4bit_code(state.quant_type, flat.device),
                                    state.blocksize, state.shape, state.dtype)


def quantize_transformer(tensors: dict[str, torch.Tensor], quant_type: str, nested: bool,
                         prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(file tensors with every transformer linear weight in 4 bits, the same tensors with those weights
    as bitsandbytes dequantizes them): Forge quantizes all the transformer's linear layers."""
    stored, reference = {}, {}
    for k, v in tensors.items():
        if k.startswith(prefix) and k.endswith(".weight") and v.ndim == 2:
            serialized, reference[k] = bnb_serialized(k, v, quant_type, nested)
            stored.update(serialized)
        else:
            stored[k] = reference[k] = v
    return stored, reference


def _save(path: Path, tensors: dict) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def files(flux_files, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    """Transformer-only files (NF4 with double quantization as Forge's first file, NF4 with float32 scales as
    its ``-v2``, FP4), each with an ordinary file of its dequantized weights, and a Forge-style all-in-one."""
    d = tmp_path_factory.mktemp("flux-nf4")
    out = dict(flux_files)
    plain = tf.materialise(tf.transformer_shapes(tf.DEV), 11)
    for key, quant_type, nested in (("nf4", "nf4", True), ("nf4_v2", "nf4", False), ("fp4", "fp4", True)):
        stored, reference = quantize_transformer(plain, quant_type, nested)
        out[key] = _save(d / f"flux1-dev-tiny-bnb-{key}.safetensors", stored)
        out[key + "_ref"] = _save(d / f"flux1-dev-tiny-{key}-dequantized.safetensors", reference)
    # flux1-dev-bnb-nf4-v2: transformer NF4, T5 in fp8 e4m3fn, CLIP-L in fp16, the VAE in bf16
    shapes = {**tf.transformer_shapes(tf.DEV, AIO), **tf.ae_shapes("vae."),
              **tf.clip_l_shapes("text_encoders.clip_l.transformer."),
              **tf.t5_shapes(prefix="text_encoders.t5xxl.transformer.")}
    tensors = tf.materialise(shapes, 15)
    for k, v in tensors.items():
        if k.startswith("text_encoders.t5xxl."):
            tensors[k] = v.to(torch.float8_e4m3fn) if v.ndim == 2 and "shared" not in k else v.half()
        elif k.startswith("text_encoders.clip_l.") and v.is_floating_point():
            tensors[k] = v.half()
        elif k.startswith("vae."):
            tensors[k] = v.bfloat16()
    stored, reference = quantize_transformer(tensors, "nf4", False, prefix=AIO)
    out["aio"] = _save(d / "flux1-dev-tiny-bnb-nf4-v2.safetensors", stored)
    out["aio_ref"] = _save(d / "flux1-dev-tiny-aio-dequantized.safetensors", reference)
    return out


def _load(files, key: str, dtype=torch.float32, keep: bool = True):
    return load_flux(files[key], clip_l=files["clip_l"], t5=files["t5"], vae=files["ae"], dtype=dtype,
                     keep_quantized=keep)


def _stored_layers(module: torch.nn.Module) -> dict[str, StoredLinear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, StoredLinear)}


def _parse(tensors: dict[str, torch.Tensor], name: str):
    """Our reading of one weight serialized by bitsandbytes."""
    kind = next(k.rpartition(QUANT_STATE)[2] for k in tensors if QUANT_STATE in k)
    state = json.loads(bytes(tensors[f"{name}.quant_state.bitsandbytes__{kind}"].tolist()).decode())
    stats = {s: tensors.get(f"{name}.{s}") for s in ("absmax", "quant_map", "nested_absmax", "nested_quant_map")}
    return stored_4bit(name, kind, tensors[name], stats, state)


# --- the layout ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nested", [True, False])
def test_layout_is_linear4bit_state_dict_with_bitsandbytes_json_state(nested):
    """What the reader expects is what ``Linear4bit.state_dict`` writes and ``QuantState.from_dict`` reads back."""
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    tensors, _ = bnb_serialized("blk.weight", weight, "nf4", nested)
    expected = {"blk.weight", "blk.weight.absmax", "blk.weight.quant_map", "blk.weight.quant_state.bitsandbytes__nf4"}
    if nested:
        expected |= {"blk.weight.nested_absmax", "blk.weight.nested_quant_map"}
    assert set(tensors) == expected
    assert tensors["blk.weight"].dtype == torch.uint8 and tuple(tensors["blk.weight"].shape) == (48 * 64 // 2, 1)
    state = bnb_functional.QuantState.from_dict({k.removeprefix("blk.weight."): v for k, v in tensors.items()
                                                 if k != "blk.weight"}, device=torch.device("cpu"))
    ours = _parse(tensors, "blk.weight")
    assert isinstance(ours, StoredWeight) and ours.kind == "nf4" and ours.shape == tuple(state.shape) == (48, 64)
    assert ours.scales.blocksize == state.blocksize == 64 and ours.scales.nested == state.nested
    if nested:
        assert ours.scales.offset == pytest.approx(float(state.offset), abs=0)
        assert ours.scales.nested_blocksize == state.state2.blocksize == 256


# --- the dequantizer -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize(("shape", "blocksize"), [((96, 64), 64), ((224, 32), 64), ((40, 130), 64),
                                                   ((300, 96), 128), ((7, 9), 64)])
def test_dequantizer_equals_bitsandbytes(quant_type, nested, shape, blocksize):
    """Exactly bitsandbytes' values, including a last short block (40x130, 7x9) and an odd row length
    (7x9, expanded when read since its rows are not whole bytes)."""
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 0.05
    tensors, reference = bnb_serialized("w.weight", weight, quant_type, nested, blocksize)
    ours = _parse(tensors, "w.weight")
    assert isinstance(ours, StoredWeight) == (shape[1] % 2 == 0)
    values = ours.dequantize(torch.float32) if isinstance(ours, StoredWeight) else ours
    assert values.dtype == torch.float32 and torch.equal(values, reference)
    assert (values - weight).abs().max() < weight.abs().max() / 3  # and it is a 4-bit copy of the weight


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantizer_equals_bitsandbytes_in_half_precision(dtype):
    """A weight quantized from bf16/fp16 comes back from bitsandbytes in that dtype (computed in float32,
    then rounded): ours, asked for that dtype, gives the same values."""
    weight = (torch.randn(64, 96, generator=torch.Generator().manual_seed(4)) * 0.05).to(dtype)
    tensors, reference = bnb_serialized("w.weight", weight, "nf4", True)
    assert reference.dtype == dtype
    assert torch.equal(_parse(tensors, "w.weight").dequantize(dtype), reference)


# --- row cuts (fused q, k, v) ----------------------------------------------------------------------------------


def _nf4(shape, nested=True, seed=0) -> tuple[StoredWeight, torch.Tensor]:
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    tensors, reference = bnb_serialized("w.weight", weight, "nf4", nested)
    return _parse(tensors, "w.weight"), reference


def test_row_cuts_on_block_boundaries_stay_stored():
    """1024x64: cuts at rows 256 and 512 fall on runs of 256 double-quantized scales (codes kept); a cut
    at row 100 falls on a block but inside a run (codes kept, that part's scales decoded to float32)."""
    stored, full = _nf4((1024, 64))
    parts = stored.split_rows((256, 256, 512))
    for part, rows in zip(parts, torch.split(full, [256, 256, 512])):
        assert isinstance(part, StoredWeight) and part.scales.nested
        assert torch.equal(part.dequantize(torch.float32), rows)
    first, second = stored.split_rows((100, 924))
    assert first.scales.nested and not second.scales.nested and second.scales.absmax.dtype == torch.float32
    assert torch.equal(first.dequantize(torch.float32), full[:100])
    assert torch.equal(second.dequantize(torch.float32), full[100:])
    swapped = stored.swap_halves()
    assert isinstance(swapped, StoredWeight) and swapped.scales.nested
    assert torch.equal(swapped.dequantize(torch.float32), torch.cat([full[512:], full[:512]]))
    odd = _nf4((768, 64))[0].swap_halves()  # halves of 384 blocks: whole blocks, not whole runs
    assert isinstance(odd, StoredWeight) and not odd.scales.nested


def test_row_cuts_inside_a_block_are_expanded():
    """10x96: a cut after 3 rows starts at value 288, inside a 64-value block: that part comes back
    expanded; the part before it stays stored."""
    stored, full = _nf4((10, 96))
    first, second = stored.split_rows((3, 7))
    assert isinstance(first, StoredWeight) and isinstance(second, torch.Tensor)
    assert torch.equal(first.dequantize(torch.float32), full[:3]) and torch.equal(second, full[3:])
    swapped = stored.swap_halves()  # halves of 5 rows (480 values): not whole blocks
    assert isinstance(swapped, torch.Tensor) and torch.equal(swapped, torch.cat([full[5:], full[:5]]))


def test_every_cut_flux1_needs_keeps_the_weight_stored():
    """FLUX.1's fused projections (hidden 3072): q, k, v of ``qkv``, q, k, v and the MLP input of
    ``linear1``, the halves of the final modulation. Each cut starts on a block of 64 and on a run of
    256 scales, so all parts keep their codes and their 8-bit scales (computed on zero-filled weights
    of the real shapes)."""
    hidden, mlp = 3072, 12288
    for rows, cuts in (((3 * hidden), (hidden,) * 3), ((3 * hidden + mlp), (hidden, hidden, hidden, mlp))):
        n = rows * hidden
        blocks = n // 64
        scales = BlockScales(torch.zeros(blocks, dtype=torch.uint8), 64, torch.ones(-(-blocks // 256)),
                             torch.zeros(256), 256, 0.0)
        stored = StoredWeight(torch.zeros(rows, hidden // 2, dtype=torch.uint8), "nf4", (rows, hidden), scales=scales)
        parts = stored.split_rows(cuts)
        assert all(isinstance(p, StoredWeight) and p.scales.nested for p in parts)
        # nothing decoded or copied twice, but for the 256-value code table (1 kB) each part carries
        assert sum(p.nbytes for p in parts) == stored.nbytes + 1024 * (len(parts) - 1)
    modulation = StoredWeight(torch.zeros(2 * hidden, hidden // 2, dtype=torch.uint8), "nf4", (2 * hidden, hidden),
                              scales=BlockScales(torch.zeros(2 * hidden * hidden // 64, dtype=torch.uint8), 64,
                                                 torch.ones(2 * hidden * hidden // 64 // 256), torch.zeros(256)))
    swapped = modulation.swap_halves()
    assert isinstance(swapped, StoredWeight) and swapped.scales.nested and swapped.nbytes == modulation.nbytes


# --- loading ---------------------------------------------------------------------------------------------------


def test_header_gives_the_logical_shapes(files):
    """The file lists (n/2, 1) bytes and statistics; the header the loader reads lists the weights."""
    ours = read_any_header(files["nf4"]).tensors
    reference = read_any_header(files["transformer"]).tensors
    assert set(ours) == set(reference)
    assert all(ours[k].shape == reference[k].shape for k in reference)
    assert ours["double_blocks.0.img_attn.qkv.weight"].dtype == "NF4"
    assert read_any_header(files["fp4"]).tensors["img_in.weight"].dtype == "FP4"
    assert is_flux(files["nf4"]) and detect(read_any_header(files["nf4"])).variant == "dev"
    with pytest.raises(ModelError, match="bitsandbytes"):  # the raw header alone cannot give the shapes
        from underpaint.models.header import read_header

        detect(read_header(files["nf4"]))


@pytest.mark.parametrize(("key", "storage"), [("nf4", "nf4"), ("nf4_v2", "nf4"), ("fp4", "fp4")])
def test_kept_4bit_matches_diffusers_conversion_of_bitsandbytes_dequantization(files, key, storage, monkeypatch):
    """Every linear layer keeps its 4-bit codes; split and swapped parts land where diffusers' converter
    puts bitsandbytes' dequantized rows, and the transformer computes the same."""
    model = _load(files, key)
    assert model.unet.weight_storage == storage
    linears = [m for m in model.unet.modules() if isinstance(m, (torch.nn.Linear, StoredLinear))]
    assert linears and all(isinstance(m, StoredLinear) and m.kind == storage for m in linears)
    ref = witness_transformer(load_file(str(files[key + "_ref"])), tf.transformer_config(), monkeypatch)
    assert_same_weights(model.unet, ref, key)
    inputs = transformer_inputs()
    torch.testing.assert_close(run(model.unet, inputs), run(ref, inputs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("key", ["nf4", "nf4_v2"])
def test_kept_4bit_takes_half_a_byte_a_weight_plus_statistics(files, key):
    kept, expanded = _load(files, key), _load(files, key, keep=False)
    assert expanded.unet.weight_storage == "fp32" and not _stored_layers(expanded.unet)
    layers = _stored_layers(kept.unet).values()
    values = sum(m.in_features * m.out_features for m in layers)
    codes = sum(m.packed.numel() for m in layers)
    statistics = sum(t.numel() for m in layers for t in (m.absmax, m.nested_absmax, m.nested_code) if t is not None)
    assert codes * 2 == values  # two 4-bit codes a byte
    assert module_bytes(kept.unet) == module_bytes(expanded.unet) - 4 * values + codes + statistics
    if key == "nf4_v2":  # one float32 scale per 64 values, cut exactly along the fused projections
        assert statistics == 4 * values // 64
    else:  # 8-bit scales, their run scales and code tables; cuts inside a run decode that part's scales
        assert values // 64 < statistics < 4 * values // 64 + 1024 * len(layers) + 4 * values // 64 // 256 + 64
    assert module_bytes(kept.unet) / module_bytes(expanded.unet) < 0.25


def test_kept_4bit_in_bf16_computes_what_the_dequantized_file_computes(files):
    kept = _load(files, "nf4", torch.bfloat16)
    plain = load_flux(files["nf4_ref"], clip_l=files["clip_l"], t5=files["t5"], vae=files["ae"], dtype=torch.bfloat16)
    assert kept.unet.weight_storage == "nf4" and plain.unet.weight_storage == "bf16"
    assert {p.dtype for p in kept.unet.parameters()} == {torch.bfloat16}
    assert_same_weights(kept.unet, plain.unet, "nf4 bf16")
    inputs = transformer_inputs()
    torch.testing.assert_close(run(kept.unet, inputs), run(plain.unet, inputs), rtol=0, atol=0)


def test_module_dtype_casts_leave_the_statistics_alone(files):
    layer = next(iter(_stored_layers(_load(files, "nf4_v2").unet).values()))
    before = layer.dequantized_weight(torch.float32)
    layer.to(torch.float16)
    assert {layer.packed.dtype, layer.absmax.dtype} == {torch.uint8} and layer.bias.dtype == torch.float16
    assert torch.equal(layer.dequantized_weight(torch.float32), before)


def test_all_in_one_nf4_file_loads_with_its_bundled_encoders_and_vae(files, monkeypatch):
    """Forge's layout: NF4 transformer under model.diffusion_model., T5 in fp8, CLIP-L in fp16, VAE in bf16."""
    assert is_flux(files["aio"]) and components_needed(files["aio"]) == set()
    model = load_flux(files["aio"], dtype=torch.float32, tokenizer_dir=files["spiece_dir"])
    assert model.unet.weight_storage == "nf4"
    reference = load_file(str(files["aio_ref"]))
    transformer = {k.removeprefix(AIO): v for k, v in reference.items() if k.startswith(AIO)}
    assert_same_weights(model.unet, witness_transformer(transformer, tf.transformer_config(), monkeypatch), "aio")
    clip, t5 = model.text_encoders
    assert not _stored_layers(t5) and {p.dtype for p in (*clip.parameters(), *t5.parameters(),
                                                         *model.vae.parameters())} == {torch.float32}
    q = t5.encoder.block[0].layer[0].SelfAttention.q.weight
    assert torch.equal(q, reference["text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"]
                       .float())


def test_img2img_on_nf4_equals_the_dequantized_model(files, tmp_path, photo):
    from underpaint.pipeline.engine import Engine

    picture = photo.resize((64, 64))
    parts = dict(models_dir=tmp_path, device="cpu", dtype="fp32", clip_l=files["clip_l"], t5=files["t5"],
                 vae=files["ae"])
    engine = Engine.load(files["nf4"], **parts)
    assert engine.model.unet.weight_storage == "nf4"
    result = engine.img2img(picture, prompt="a boat", strength=0.6, steps=2, seed=1)
    plain = Engine.load(files["nf4_ref"], **parts)
    again = plain.img2img(picture, prompt="a boat", strength=0.6, steps=2, seed=1)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(again.images[0]))


def test_lora_on_nf4_runs_at_run_time_and_equals_merging_into_the_dequantized_model(files, tmp_path):
    from test_flux_lora import _updates, _write
    from underpaint.models.lora import LoraPatcher, LoraRequest, ModuleIndex, load_lora

    kept = _load(files, "nf4")
    plain = load_flux(files["nf4_ref"], clip_l=files["clip_l"], t5=files["t5"], vae=files["ae"], dtype=torch.float32)
    path = _write(tmp_path / "lora.safetensors", _updates(load_file(str(files["transformer"])), seed=9), "kohya")
    inputs = transformer_inputs()
    before = run(kept.unet, inputs)
    patchers, outputs = [], []
    for model in (kept, plain):
        patcher = LoraPatcher()
        patcher.apply([(load_lora(path, ModuleIndex(model)), LoraRequest("q", te=0.7, unet=0.7))])
        patchers.append(patcher)
        outputs.append(run(model.unet, inputs))
    assert len([m for m in kept.unet.modules() if getattr(m, "low_rank", None)]) >= 4
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-4, rtol=1e-4)
    assert (outputs[0] - before).abs().max() > 1e-3
    for patcher in patchers:
        patcher.restore()
    assert torch.equal(run(kept.unet, inputs), before)


# --- damaged and unsupported files -------------------------------------------------------------------------------


def _rewrite(files, tmp_path, change) -> Path:
    tensors = load_file(str(files["nf4"]))
    change(tensors)
    return _save(tmp_path / "changed.safetensors", tensors)


def _state_key(name: str = "double_blocks.0.img_attn.qkv.weight") -> str:
    return f"{name}.quant_state.bitsandbytes__nf4"


def _set_state(tensors: dict, **fields) -> None:
    state = json.loads(bytes(tensors[_state_key()].tolist()).decode())
    state.update(fields)
    tensors[_state_key()] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)


def _retype(tensors: dict) -> None:
    tensors[_state_key().replace("__nf4", "__int4")] = tensors.pop(_state_key())


@pytest.mark.parametrize(("change", "message"), [
    (_retype, r"double_blocks\.0\.img_attn\.qkv\.weight is quantized by bitsandbytes as 'int4'"),
    (lambda t: _set_state(t, shape=[96, 64]), r"holds 1536 bytes of nf4 codes; its shape \(96, 64\) needs 3072"),
    (lambda t: t.update({_state_key(): torch.tensor(list(b"{not json"), dtype=torch.uint8)}),
     "not bitsandbytes' JSON quantization state"),
    (lambda t: t["double_blocks.0.img_attn.qkv.weight.quant_map"].mul_(0.5),
     "quant_map is not bitsandbytes' nf4 table"),
    (lambda t: t.pop("double_blocks.0.img_attn.qkv.weight.absmax"), "has no .*absmax"),
])
def test_damaged_or_unknown_4bit_weights_are_named(files, tmp_path, change, message):
    path = _rewrite(files, tmp_path, change)
    with pytest.raises(ModelError, match=message) as info:
        _load({**files, "changed": path}, "changed")
    assert str(path) in info.value.message
