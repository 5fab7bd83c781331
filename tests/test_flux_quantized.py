"""FLUX transformer weights kept as stored (fp8, GGUF blocks) and expanded per layer at run time.

References: the ``gguf`` package's own dequantization (``gguf.quants.dequantize``) for every block
type, the same file loaded with everything expanded at load (``keep_quantized=False``), diffusers'
FLUX converter applied to the reference-dequantized weights, and the stored sizes the file itself
reports.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_flux as tf
from flux_fixtures import flux_files  # noqa: F401  (session fixture)
from test_flux_models import assert_same_weights, run, transformer_inputs, witness_transformer
from underpaint.models.flux_loader import load_flux
from underpaint.models.quantized import (GGUF_BLOCKS, StoredLinear, StoredWeight, dequantize_gguf, module_bytes,
                                         weight_storage)

gguf = pytest.importorskip("gguf")

ON_THE_FLY = sorted(GGUF_BLOCKS)


@pytest.fixture(scope="module")
def files(flux_files, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    d = tmp_path_factory.mktemp("flux-stored")
    return {**flux_files, "gguf_mixed": tf.write_gguf_mixed(d / "flux1-dev-tiny-mixed.gguf"),
            "scaled_fp8": tf.write_scaled_fp8_transformer(d / "flux1-dev-tiny-scaled-fp8.safetensors")}


def _load(files, key: str, dtype=torch.float32, keep: bool = True):
    return load_flux(files[key], clip_l=files["clip_l"], t5=files["t5"], vae=files["ae"], dtype=dtype,
                     keep_quantized=keep)


def _gguf_reference(path: Path) -> dict[str, torch.Tensor]:
    reader = gguf.GGUFReader(str(path))
    return {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
            .reshape(tuple(int(d) for d in reversed(t.shape.tolist()))) for t in reader.tensors}


def _stored_layers(module: torch.nn.Module) -> dict[str, StoredLinear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, StoredLinear)}


# --- dequantizers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ON_THE_FLY)
def test_torch_dequantizers_match_gguf_on_random_blocks(qtype):
    blocks = tf.random_blocks(qtype, 64, seed=7)
    expected = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype]).reshape(-1)
    ours = dequantize_gguf(torch.from_numpy(blocks), qtype, (expected.size,))
    assert ours.dtype == torch.float32
    assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(expected, dtype=np.float32)))
    assert ours.abs().max() > 0


@pytest.mark.parametrize("qtype", [t for t in ON_THE_FLY if not t.endswith("_K")])
def test_torch_dequantizers_match_gguf_on_quantized_weights(qtype):
    """Blocks made by gguf's own quantizer from a weight: same values, and close to the weight."""
    weight = torch.randn(48, 96, generator=torch.Generator().manual_seed(1)).numpy()
    q = gguf.quants.quantize(weight, gguf.GGMLQuantizationType[qtype])
    expected = gguf.quants.dequantize(q, gguf.GGMLQuantizationType[qtype])
    ours = dequantize_gguf(torch.from_numpy(q), qtype, weight.shape)
    assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(expected, dtype=np.float32)))
    assert (ours - torch.from_numpy(weight)).abs().max() < 0.5
    assert dequantize_gguf(torch.from_numpy(q), qtype, weight.shape, torch.bfloat16).dtype == torch.bfloat16


def test_row_splits_of_stored_blocks_are_row_splits_of_the_weight():
    """Blocks run along the input dimension, so output rows cut the byte rows cleanly (q, k, v of a qkv)."""
    weight = torch.randn(96, 64, generator=torch.Generator().manual_seed(2)).numpy()
    q = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q5_1)
    full = dequantize_gguf(torch.from_numpy(q), "Q5_1", weight.shape)
    parts = StoredWeight(torch.from_numpy(q), "Q5_1", (96, 64)).split_rows((32, 32, 32))
    for part, rows in zip(parts, torch.split(full, 32)):
        assert part.shape == (32, 64) and torch.equal(part.dequantize(torch.float32), rows)
    swapped = StoredWeight(torch.from_numpy(q), "Q5_1", (96, 64)).swap_halves().dequantize(torch.float32)
    assert torch.equal(swapped, torch.cat([full[48:], full[:48]]))


def test_stored_linear_computes_like_linear():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 32, generator=g).to(torch.float8_e4m3fn)
    bias, x = torch.randn(24, generator=g), torch.randn(5, 32, generator=g)
    layer = StoredLinear(32, 24, "float8_e4m3fn", dtype=torch.float32)
    layer.bias = torch.nn.Parameter(bias)
    layer.store(StoredWeight.fp8(w, scale=0.25))
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, w.float() * 0.25, bias), rtol=0, atol=1e-6)
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    layer.to(torch.float16)  # a dtype cast leaves the stored bytes alone
    assert layer.packed.dtype == torch.uint8 and layer.bias.dtype == torch.float16
    assert set(layer.state_dict()) == {"weight", "bias"} and layer.state_dict()["weight"].dtype == torch.float16


# --- loading ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "storage"), [("gguf", "gguf:Q8_0"), ("transformer_fp8", "fp8_e4m3fn"),
                                              ("scaled_fp8", "fp8_e4m3fn"), ("gguf_mixed", "gguf:Q8_0")])
def test_kept_weights_compute_what_expanded_weights_compute(files, key, storage):
    kept, expanded = _load(files, key), _load(files, key, keep=False)
    assert kept.unet.weight_storage == storage and expanded.unet.weight_storage == "fp32"
    assert _stored_layers(kept.unet) and not _stored_layers(expanded.unet)
    assert_same_weights(kept.unet, expanded.unet, key)
    inputs = transformer_inputs()
    torch.testing.assert_close(run(kept.unet, inputs), run(expanded.unet, inputs), rtol=0, atol=1e-6)


def test_kept_weights_in_bf16(files):
    kept, expanded = _load(files, "gguf", torch.bfloat16), _load(files, "gguf", torch.bfloat16, keep=False)
    assert kept.unet.weight_storage == "gguf:Q8_0" and expanded.unet.weight_storage == "bf16"
    assert {p.dtype for p in kept.unet.parameters()} == {torch.bfloat16}
    inputs = transformer_inputs()
    torch.testing.assert_close(run(kept.unet, inputs), run(expanded.unet, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("key", ["gguf", "gguf_mixed"])
def test_gguf_kept_matches_diffusers_conversion_of_gguf_dequantization(files, key, monkeypatch):
    """Split and swapped blocks land where diffusers' converter puts the reference-dequantized rows."""
    ref = witness_transformer(_gguf_reference(files[key]), tf.transformer_config(), monkeypatch)
    model = _load(files, key)
    assert_same_weights(model.unet, ref, key)
    inputs = transformer_inputs()
    torch.testing.assert_close(run(model.unet, inputs), run(ref, inputs), rtol=0, atol=1e-5)


def test_mixed_gguf_keeps_each_type_and_expands_the_rest(files):
    layers = _stored_layers(_load(files, "gguf_mixed").unet)
    kinds = {name: layer.kind for name, layer in layers.items()}
    assert kinds["transformer_blocks.0.attn.to_q"] == kinds["transformer_blocks.0.attn.to_v"] == "Q4_1"
    assert kinds["single_transformer_blocks.1.proj_mlp"] == "Q5_1"
    assert kinds["transformer_blocks.1.attn.add_k_proj"] == "Q5_0"
    assert kinds["norm_out.linear"] == "Q4_0"
    assert kinds["time_text_embed.timestep_embedder.linear_1"] == "Q6_K"
    assert "time_text_embed.guidance_embedder.linear_1" not in kinds  # Q2_K: expanded at load
    assert "transformer_blocks.0.ff_context.net.2" not in kinds  # BF16 in the file: an ordinary weight


def test_scaled_fp8_factor_is_applied(files):
    from safetensors.torch import load_file

    stored = load_file(str(files["scaled_fp8"]))
    layer = _stored_layers(_load(files, "scaled_fp8").unet)["single_transformer_blocks.0.proj_out"]
    scale = stored["single_blocks.0.linear2.scale_weight"]
    assert layer.scale == pytest.approx(float(scale))
    expected = stored["single_blocks.0.linear2.weight"].float() * scale
    assert torch.equal(layer.dequantized_weight(torch.float32), expected)


def _stored_file_bytes(path: Path) -> tuple[int, int]:
    """(bytes of the 2-D weights a kept load holds as stored, element count of those weights), from the file."""
    if path.suffix == ".gguf":
        kept = [t for t in gguf.GGUFReader(str(path)).tensors
                if t.tensor_type.name in GGUF_BLOCKS and len(t.shape) == 2]
        return sum(int(t.n_bytes) for t in kept), sum(int(t.n_elements) for t in kept)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        kept = [f.get_slice(k) for k in f.keys() if k.endswith(".weight")]
        kept = [s for s in kept if s.get_dtype() == "F8_E4M3" and len(s.get_shape()) == 2]
        n = sum(int(np.prod(s.get_shape())) for s in kept)
    return n, n


@pytest.mark.parametrize(("key", "most"), [("gguf", 0.35), ("transformer_fp8", 0.45), ("scaled_fp8", 0.45)])
def test_kept_weights_take_their_stored_size(files, key, most):
    kept, expanded = _load(files, key), _load(files, key, keep=False)
    stored_bytes, values = _stored_file_bytes(files[key])
    assert values > 0
    # the expanded model holds those values as fp32; the kept one exactly as the file stores them
    assert module_bytes(kept.unet) == module_bytes(expanded.unet) - 4 * values + stored_bytes
    assert module_bytes(kept.unet) / module_bytes(expanded.unet) < most


def test_keep_quantized_off_and_plain_files_report_their_dtype(files):
    plain = _load(files, "transformer", torch.bfloat16)
    assert plain.unet.weight_storage == "bf16" and not _stored_layers(plain.unet)
    assert weight_storage(plain.unet, torch.bfloat16) == "bf16"
    folder = load_flux(files["diffusers"], dtype=torch.float32)
    assert folder.unet.weight_storage == "fp32"


def test_all_in_one_keeps_the_transformer_only(files, tmp_path):
    """fp8 text encoder weights in an all-in-one file are expanded; the transformer's stay fp8."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(files["all_in_one"]))
    for k in [k for k in sd if k.endswith(".weight") and sd[k].ndim == 2
              and k.startswith(("model.diffusion_model.double_blocks.", "text_encoders.t5xxl.transformer.encoder."))]:
        sd[k] = sd[k].to(torch.float8_e4m3fn)
    path = tmp_path / "aio-fp8.safetensors"
    save_file(sd, str(path))
    model = load_flux(path, dtype=torch.float32, tokenizer_dir=files["spiece_dir"])
    assert model.unet.weight_storage == "fp8_e4m3fn"
    t5 = model.text_encoders[1]
    assert not _stored_layers(t5) and {p.dtype for p in t5.parameters()} == {torch.float32}


# --- generation -------------------------------------------------------------------------------------------------


def test_engine_generates_with_kept_gguf_weights(files, tmp_path, photo):
    from underpaint.pipeline.engine import Engine

    picture = photo.resize((64, 64))
    engine = Engine.load(files["gguf"], models_dir=tmp_path, device="cpu", dtype="fp32", clip_l=files["clip_l"],
                         t5=files["t5"], vae=files["ae"])
    assert engine.model.unet.weight_storage == "gguf:Q8_0"
    result = engine.img2img(picture, prompt="x", strength=0.6, steps=2, seed=1)
    assert result.images[0].size == (64, 64)
    # the same request on the weights expanded at load gives the same picture
    expanded = Engine(_load(files, "gguf", keep=False), models_dir=engine.models_dir)
    again = expanded.img2img(picture, prompt="x", strength=0.6, steps=2, seed=1)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(again.images[0]))
