"""FLUX's T5 encoder from a GGUF file in llama.cpp's names (city96's ``t5-v1_1-xxl-encoder-Q8_0.gguf`` and kin).

The tiny files are written with the ``gguf`` package itself: tensor names from its own
``TensorNameMap`` for ``MODEL_ARCH.T5ENCODER`` (Hugging Face names → llama.cpp's), Q8_0 blocks
from ``gguf.quants.quantize``, K-quant blocks (which that package cannot quantize) as random bits
with small scales. The reference is transformers' ``T5EncoderModel`` holding the weights
``gguf.quants.dequantize`` reads back from the very blocks written; end to end, the same
picture from a safetensors copy of those weights.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_flux as tf
from flux_fixtures import flux_files  # noqa: F401  (session fixture)
from test_flux_t5_memory import _poison_and_place
from underpaint.errors import ModelError
from underpaint.models.flux_loader import load_flux, load_t5
from underpaint.models.quantized import StoredLinear, module_bytes
from underpaint.models.t5 import gguf_t5_names

gguf = pytest.importorskip("gguf")
pytest.importorskip("sentencepiece")

#: Width 32 (Q8_0 rows of one block) and FLUX's tiny joint width, so it also serves end to end.
T5_SMALL = tf.TinyT5()
#: Every linear layer 256-wide or more along its input, as the K-quants need.
T5_WIDE = tf.TinyT5(d_model=256, d_kv=32, heads=8, d_ff=512)
#: Tiny FLUX's width with a 256-wide feed-forward: ``ffn_down`` can take a K-quant.
T5_FFN256 = tf.TinyT5(d_ff=256)
IDS = torch.tensor([[5, 17, 3, 42, 9, 1, 0, 0], [7, 7, 120, 1, 0, 0, 0, 0]])

Plan = Callable[[str], str]


def _q8_0(name: str) -> str:
    """llama.cpp's Q8_0 file: every 2-D weight Q8_0 (token embedding included), norms and position bias F32."""
    return "F32" if name.endswith(("_norm.weight", "attn_rel_b.weight")) else "Q8_0"


def _q4_k_m(name: str) -> str:
    """llama.cpp's Q4_K_M recipe in small: Q4_K, with attn_v and ffn_down in Q6_K in some blocks (here
    block 1) and the token embedding in Q6_K; norms and position bias F32."""
    if name.endswith(("_norm.weight", "attn_rel_b.weight")):
        return "F32"
    if name == "token_embd.weight" or name in ("enc.blk.1.attn_v.weight", "enc.blk.1.ffn_down.weight"):
        return "Q6_K"
    return "Q4_K"


#: Other types side by side: Q5_K, Q3_K (no on-the-fly dequantizer: expanded at load), legacy quants and an
#: F16 linear weight; everything not named here F16 (token embedding, norms, the other linear weights).
MIXED = {"enc.blk.0.attn_q.weight": "Q5_K", "enc.blk.0.attn_k.weight": "Q3_K", "enc.blk.1.attn_o.weight": "Q4_0",
         "enc.blk.1.ffn_gate.weight": "Q5_1", "enc.blk.0.ffn_up.weight": "Q4_1", "enc.blk.0.ffn_down.weight": "Q8_0",
         "enc.blk.1.ffn_down.weight": "Q8_0", "enc.blk.0.attn_rel_b.weight": "F32"}


def _mixed(name: str) -> str:
    return MIXED.get(name, "F16")


def _ffn_k(name: str) -> str:
    """T5_FFN256 as a K-quant file: ffn_down (256 wide) in Q4_K / Q6_K, the narrower weights Q8_0, an F16 embedding."""
    if name.endswith(("_norm.weight", "attn_rel_b.weight")):
        return "F32"
    if name == "token_embd.weight":
        return "F16"
    if name.endswith("ffn_down.weight"):
        return "Q6_K" if name.startswith("enc.blk.1.") else "Q4_K"
    return "Q8_0"


def _k_blocks(qtype, shape: tuple[int, int], seed: int) -> np.ndarray:
    """Blocks of a K-quant for a ``shape`` weight: random quant bits, small positive float16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = shape[0] * shape[1] // block
    blocks = tf.random_blocks(qtype.name, n, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for offset in tf.GGUF_F16_FIELDS[qtype.name]:
        blocks[:, offset:offset + 2] = rng.uniform(1e-4, 1e-3, n).astype(np.float16).view(np.uint8).reshape(n, 2)
    return blocks.reshape(shape[0], shape[1] // block * size)


def write_t5_gguf(path: Path, t: tf.TinyT5, plan: Plan, *, seed: int = 14, arch: str = "t5encoder",
                  decoder: bool = False) -> dict[str, torch.Tensor]:
    """A T5 encoder GGUF in llama.cpp's names (from gguf's own table); returns the weights the file holds,
    in transformers' names, as ``gguf.quants.dequantize`` reads them (float32). ``decoder`` adds a
    decoder block and LM head, as a whole-T5 (``t5``) file has."""
    from gguf.quants import dequantize, quantize

    hf = tf.materialise(tf.t5_shapes(t), seed)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, t.layers)
    writer = gguf.GGUFWriter(str(path), arch)
    held: dict[str, torch.Tensor] = {}
    for i, key in enumerate(sorted(hf)):
        name = names.get_name(key, try_suffixes=(".weight",))
        assert name is not None, key
        arr, kind = hf[key].numpy(), plan(name)
        if kind in ("F32", "F16"):
            data = arr.astype(np.float32 if kind == "F32" else np.float16)
            writer.add_tensor(name, data)
            values = data.astype(np.float32)
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            try:
                data = quantize(arr, qtype)
            except NotImplementedError:  # the K-quants
                data = _k_blocks(qtype, arr.shape, seed + i)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
            values = dequantize(data, qtype)
        held[key] = torch.from_numpy(np.array(values, dtype=np.float32).reshape(arr.shape))
    if decoder:
        rng = np.random.default_rng(seed)
        writer.add_tensor("dec.blk.0.attn_q.weight", rng.standard_normal((t.d_model, t.d_model), dtype=np.float32))
        writer.add_tensor("dec.output_norm.weight", np.ones(t.d_model, dtype=np.float32))
        writer.add_tensor("output.weight", rng.standard_normal((t.vocab, t.d_model), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


def _config(t: tf.TinyT5):
    from transformers import T5Config

    return T5Config(vocab_size=t.vocab, d_model=t.d_model, d_kv=t.d_kv, d_ff=t.d_ff, num_layers=t.layers,
                    num_heads=t.heads, relative_attention_num_buckets=t.buckets, feed_forward_proj="gated-gelu",
                    dense_act_fn="gelu_new", is_gated_act=True, tie_word_embeddings=False)


def _witness(t: tf.TinyT5, held: dict[str, torch.Tensor]) -> torch.nn.Module:
    from transformers import T5EncoderModel

    ref = T5EncoderModel(_config(t))
    missing, unexpected = ref.load_state_dict(held, strict=False)
    assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight"}
    ref.encoder.set_input_embeddings(ref.shared)
    return ref.eval()


def _encode(t5: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return t5(IDS).last_hidden_state


def _stored(module: torch.nn.Module) -> dict[str, StoredLinear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, StoredLinear)}


def _file_types(path: Path) -> dict[str, tuple[str, int]]:
    """Each tensor's GGML type and stored bytes, as the file lists them."""
    reader = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in reader.tensors}


CASES = {
    "Q8_0": (T5_SMALL, _q8_0, {}),
    "Q4_K_M": (T5_WIDE, _q4_k_m, {}),
    "mixed": (T5_WIDE, _mixed, {}),
    "t5-with-decoder": (T5_SMALL, _q8_0, {"arch": "t5", "decoder": True}),
}


@pytest.fixture(scope="module")
def t5_files(tmp_path_factory) -> dict[str, tuple[Path, tf.TinyT5, dict[str, torch.Tensor]]]:
    d = tmp_path_factory.mktemp("t5-gguf")
    out = {}
    for key, (t, plan, extra) in CASES.items():
        path = d / f"t5-v1_1-tiny-encoder-{key}.gguf"
        out[key] = (path, t, write_t5_gguf(path, t, plan, **extra))
    return out


# --- the names --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gated", [True, False])
def test_names_invert_gguf_own_table(gated):
    """gguf's TensorNameMap (HF → llama.cpp) and underpaint's map (llama.cpp → HF) are inverses, for v1.1's
    gated feed-forward (wi_0, wi_1) and the original T5's ReLU one (wi), and cover every T5 encoder
    tensor kind gguf lists except the LM head."""
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, T5_SMALL.layers)
    hf = list(tf.t5_shapes(T5_SMALL))
    if not gated:
        hf = [k.replace("wi_1", "wi") for k in hf if "wi_0" not in k]
    written = {table.get_name(k, try_suffixes=(".weight",)): k for k in hf}
    assert None not in written and len(written) == len(hf)
    assert gguf_t5_names(written) == written
    kinds = {gguf.TENSOR_NAMES[k].format(bid=0) + ".weight" for k in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.T5ENCODER]}
    lacking = {"output.weight"} if gated else {"output.weight", "enc.blk.0.ffn_gate.weight"}
    assert kinds - {n.replace(".blk.1.", ".blk.0.") for n in written} == lacking


def test_names_leave_out_a_decoder_and_refuse_strangers():
    enc = ["token_embd.weight", "enc.blk.0.attn_q.weight", "enc.output_norm.weight"]
    assert gguf_t5_names([*enc, "dec.blk.0.attn_q.weight", "dec.output_norm.weight", "output.weight"]) == {
        "token_embd.weight": "shared.weight", "enc.blk.0.attn_q.weight": "encoder.block.0.layer.0.SelfAttention.q.weight",
        "enc.output_norm.weight": "encoder.final_layer_norm.weight"}
    assert gguf_t5_names(["double_blocks.0.img_attn.qkv.weight"]) is None
    with pytest.raises(ModelError, match="enc.blk.0.attn_qkv.weight"):
        gguf_t5_names([*enc, "enc.blk.0.attn_qkv.weight"])


# --- loading ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(CASES))
def test_gguf_t5_computes_what_transformers_computes(t5_files, key):
    path, t, held = t5_files[key]
    types = _file_types(path)
    t5 = load_t5(path, dtype=torch.float32)
    assert t5.config.d_model == t.d_model and t5.config.num_heads == t.heads and t5.config.d_ff == t.d_ff
    assert t5.config.num_layers == t.layers and t5.config.vocab_size == t.vocab and t5.config.is_gated_act
    # every linear weight in a type with an on-the-fly dequantizer stays as stored, in that type
    names = gguf_t5_names(types)
    expected = {names[n][: -len(".weight")]: kind for n, (kind, _) in types.items()
                if n in names and kind in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
                and n.endswith(("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_o.weight",
                                "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"))}
    assert {name: layer.kind for name, layer in _stored(t5).items()} == expected
    if key == "mixed":  # Q3_K and F16 weights are ordinary linear layers, expanded at load
        assert len(expected) == 6
        assert type(t5.encoder.block[0].layer[0].SelfAttention.k) is torch.nn.Linear
    else:
        assert len(expected) == 7 * t.layers
    assert {p.dtype for p in t5.parameters()} == {torch.float32}
    assert t5.encoder.embed_tokens.weight is t5.shared.weight
    assert t5.weight_storage == {"Q8_0": "gguf:Q8_0", "Q4_K_M": "gguf:Q4_K", "mixed": "gguf:Q8_0",
                                 "t5-with-decoder": "gguf:Q8_0"}[key]
    torch.testing.assert_close(_encode(t5), _encode(_witness(t, held)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_gguf_t5_equals_the_expanded_one(t5_files, dtype):
    path, _, _ = t5_files["Q4_K_M"]
    kept, expanded = (load_t5(path, dtype=dtype, keep_quantized=k) for k in (True, False))
    assert _stored(kept) and not _stored(expanded)
    assert expanded.weight_storage == {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    kept_sd, expanded_sd = kept.state_dict(), expanded.state_dict()
    assert set(kept_sd) == set(expanded_sd) and all(torch.equal(kept_sd[k], expanded_sd[k]) for k in kept_sd)
    assert torch.equal(_encode(kept), _encode(expanded))


@pytest.mark.parametrize("key", ["Q8_0", "Q4_K_M"])
def test_gguf_t5_holds_its_linear_weights_at_their_stored_size(t5_files, key):
    path, t, held = t5_files[key]
    types = _file_types(path)
    names = gguf_t5_names(types)
    t5 = load_t5(path, dtype=torch.bfloat16)
    stored = {names[n][: -len(".weight")]: nbytes for n, (_, nbytes) in types.items()
              if names[n][: -len(".weight")] in _stored(t5)}
    assert len(stored) == 7 * t.layers
    assert {name: layer.packed.numel() for name, layer in _stored(t5).items()} == stored
    linear_values = sum(v.numel() for k, v in held.items() if k[: -len(".weight")] in stored)
    other_values = sum(v.numel() for k, v in held.items()) - linear_values
    # the stored bytes of the file, plus the embedding, norms and position bias in bf16
    assert module_bytes(t5) == sum(stored.values()) + 2 * other_values
    assert module_bytes(load_t5(path, dtype=torch.bfloat16, keep_quantized=False)) == 2 * (linear_values + other_values)
    # what the GGML types promise: Q8_0 34 bytes per 32 values; Q4_K 144, Q6_K 210 per 256
    per_value = {"Q8_0": (34 / 32,) * 2, "Q4_K_M": (144 / 256, 210 / 256)}[key]
    assert per_value[0] * linear_values <= sum(stored.values()) <= per_value[1] * linear_values


# --- not a T5 ----------------------------------------------------------------------------------------------


def test_a_flux_gguf_given_as_t5_is_refused_by_name(flux_files):  # noqa: F811
    flux_gguf = flux_files["gguf"]
    with pytest.raises(ModelError) as err:
        load_t5(flux_gguf)
    message = err.value.message
    assert str(flux_gguf) in message and "not a T5 encoder GGUF" in message and "'flux'" in message
    assert "enc.blk.0.attn_q.weight" in message and "FLUX transformer" in message and err.value.field == "t5"
    with pytest.raises(ModelError, match="not a T5 encoder GGUF"):
        load_flux(flux_files["transformer"], clip_l=flux_files["clip_l"], t5=flux_gguf, vae=flux_files["ae"],
                  tokenizer_dir=flux_files["spiece_dir"], dtype=torch.float32)


# --- FLUX end to end ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, flux_files):  # noqa: F811
    """A models folder with the tiny FLUX transformer, CLIP-L, ae, spiece.model and, in text_encoders/, two
    GGUF T5s (Q8_0, and Q4_K/Q6_K feed-forward) each beside a safetensors copy of the weights it holds."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("flux-gguf-t5-models")
    te = root / "text_encoders"
    for sub in ("checkpoints", "text_encoders", "vae"):
        (root / sub).mkdir()
    shutil.copy(flux_files["transformer"], root / "checkpoints" / flux_files["transformer"].name)
    shutil.copy(flux_files["clip_l"], te / "clip_l.safetensors")
    shutil.copy(flux_files["spiece_dir"] / "spiece.model", te / "spiece.model")
    shutil.copy(flux_files["ae"], root / "vae" / "ae.safetensors")
    for name, t, plan in (("Q8_0", T5_SMALL, _q8_0), ("K", T5_FFN256, _ffn_k)):
        held = write_t5_gguf(te / f"t5-v1_1-tiny-encoder-{name}.gguf", t, plan)
        save_file({k: v.contiguous() for k, v in held.items()}, str(te / f"t5-tiny-{name}-expanded.safetensors"))
    return root


@pytest.mark.parametrize("name", ["Q8_0", "K"])
def test_engine_paints_the_same_picture_with_the_gguf_t5(models_dir, photo, name):
    from underpaint.pipeline.engine import Engine

    te = models_dir / "text_encoders"
    picture = photo.resize((64, 64))
    request = dict(prompt="a red house by the sea", strength=0.6, steps=2, seed=3, rng="cpu")
    engines = [Engine.load("flux1-dev-tiny", models_dir=models_dir, device="cpu", dtype="fp32", t5=t5)
               for t5 in (te / f"t5-v1_1-tiny-encoder-{name}.gguf", te / f"t5-tiny-{name}-expanded.safetensors")]
    gguf_t5, expanded_t5 = (e.model.text_encoders[1] for e in engines)
    assert _stored(gguf_t5) and gguf_t5.weight_storage == "gguf:Q8_0" and not _stored(expanded_t5)
    images = [np.asarray(e.img2img(picture, **request).images[0]) for e in engines]
    assert np.array_equal(images[0], images[1])


def test_low_mode_moves_the_gguf_t5_blocks(models_dir, photo):
    """Low mode with every resting weight poisoned (GGUF blocks as 0xFF bytes, NaN scales): the picture is
    still high mode's, so the stored blocks of each T5 layer computed only on their block's visit."""
    from underpaint.pipeline.engine import Engine

    t5 = models_dir / "text_encoders" / "t5-v1_1-tiny-encoder-K.gguf"
    picture = photo.resize((64, 64))
    request = dict(prompt="a red house", steps=3, strength=0.7, seed=5, rng="cpu")

    def engine():
        return Engine.load("flux1-dev-tiny", models_dir=models_dir, device="cpu", dtype="fp32", t5=t5)

    expected = np.asarray(engine().img2img(picture, **request).images[0])
    low = engine()
    _poison_and_place(low.model, "low")
    assert np.array_equal(np.asarray(low.img2img(picture, **request).images[0]), expected)
    layer = _stored(low.model.text_encoders[1])["encoder.block.1.layer.1.DenseReluDense.wo"]
    assert layer.kind == "Q6_K" and bool((layer.packed == 0xFF).all())  # back home, poisoned, after the run


def test_a_gguf_t5_in_the_models_folder_is_found_by_name_and_by_itself(models_dir, tmp_path):
    from underpaint.models.registry import ModelsDir
    from underpaint.pipeline.engine import Engine

    by_name = Engine.load("flux1-dev-tiny", models_dir=models_dir, device="cpu", dtype="fp32",
                          t5="t5-v1_1-tiny-encoder-Q8_0")
    assert by_name.model.text_encoders[1].weight_storage == "gguf:Q8_0"
    # A folder whose only T5 is a GGUF file: found without --t5, as a .safetensors T5 would be.
    alone = tmp_path / "models"
    shutil.copytree(models_dir, alone)
    for extra in ("t5-v1_1-tiny-encoder-K.gguf", "t5-tiny-Q8_0-expanded.safetensors", "t5-tiny-K-expanded.safetensors"):
        (alone / "text_encoders" / extra).unlink()
    assert [e.filename for e in ModelsDir(alone).list_text_encoders()] == [
        "clip_l.safetensors", "t5-v1_1-tiny-encoder-Q8_0.gguf"]
    found = Engine.load("flux1-dev-tiny", models_dir=alone, device="cpu", dtype="fp32")
    assert found.model.text_encoders[1].weight_storage == "gguf:Q8_0"
