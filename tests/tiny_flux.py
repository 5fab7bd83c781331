"""Tiny FLUX.1 files in the real layouts: BFL transformer, ``ae.safetensors``, CLIP-L, T5, GGUF, all-in-one.

Names and shape rules follow Black Forest Labs' reference code (``flux.model.Flux`` with its
``DoubleStreamBlock``/``SingleStreamBlock``/``LastLayer``, the LDM-style ``AutoEncoder`` without
quant convs), transformers' ``T5EncoderModel`` and ``CLIPTextModel`` state dicts, ComfyUI's
all-in-one prefixes and city96-style GGUF files (original names, 2-D weights quantized, norms and
biases in float). Nothing here uses underpaint's model code. Widths are tiny (hidden 32, 16-wide
heads, T5 width 32) so every file writes in milliseconds; the token embedding of CLIP keeps its
49,408 rows so real prompts tokenize.

:func:`tiny_flux_set` writes them all and returns their paths.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

import tiny_models as tm

#: Each timestep/guidance embedder sees a 256-wide sinusoidal embedding, as in FLUX.1.
TIME_FEATURES = 256


@dataclass(frozen=True)
class TinyFlux:
    hidden: int = 32
    head_dim: int = 16
    double: int = 2
    single: int = 2
    #: Image-input features: 16 latent channels x (2x2 patches); 384 for Fill.
    in_features: int = 64
    out_features: int = 64
    #: Width of the T5 features (``txt_in``) and of CLIP's pooled output (``vector_in``).
    context: int = 32
    pooled: int = 16
    guidance: bool = True
    mlp_ratio: int = 4


@dataclass(frozen=True)
class TinyT5:
    d_model: int = 32
    d_kv: int = 8
    heads: int = 4
    d_ff: int = 64
    layers: int = 2
    buckets: int = 32
    vocab: int = 160


DEV = TinyFlux()
SCHNELL = TinyFlux(guidance=False)
FILL = TinyFlux(in_features=384)
CLIP_L = tm.TinyText(hidden=DEV.pooled, layers=2)
T5 = TinyT5()
AE = tm.TinyVAE(channels=(32, 32, 32, 32), layers=1, z=16)

#: The inline corpus the tiny sentencepiece model is trained on.
SPIECE_TEXT = """a photo of a cat sitting on a red chair
the quick brown fox jumps over the lazy dog
an oil painting of mountains at sunset with soft clouds
a portrait of an old sailor, dramatic light, highly detailed
a watercolor of a small harbour town in the morning"""


# --- shapes ------------------------------------------------------------------------------------------


def _lin(out: dict, name: str, n_out: int, n_in: int, bias: bool = True) -> None:
    tm._linear(out, name, n_out, n_in, bias)


def _mlp_embedder(out: dict, name: str, n_in: int, hidden: int) -> None:
    _lin(out, f"{name}.in_layer", hidden, n_in)
    _lin(out, f"{name}.out_layer", hidden, hidden)


def transformer_shapes(f: TinyFlux = DEV, prefix: str = "") -> dict:
    """flux.model.Flux in its original module names."""
    h, mlp, d = f.hidden, f.hidden * f.mlp_ratio, f.head_dim
    out: dict = {}
    _lin(out, "img_in", h, f.in_features)
    _mlp_embedder(out, "time_in", TIME_FEATURES, h)
    _mlp_embedder(out, "vector_in", f.pooled, h)
    if f.guidance:
        _mlp_embedder(out, "guidance_in", TIME_FEATURES, h)
    _lin(out, "txt_in", h, f.context)
    for i in range(f.double):
        b = f"double_blocks.{i}"
        for stream in ("img", "txt"):
            _lin(out, f"{b}.{stream}_mod.lin", 6 * h, h)
            _lin(out, f"{b}.{stream}_attn.qkv", 3 * h, h)
            out[f"{b}.{stream}_attn.norm.query_norm.scale"] = ("norm", (d,))
            out[f"{b}.{stream}_attn.norm.key_norm.scale"] = ("norm", (d,))
            _lin(out, f"{b}.{stream}_attn.proj", h, h)
            _lin(out, f"{b}.{stream}_mlp.0", mlp, h)
            _lin(out, f"{b}.{stream}_mlp.2", h, mlp)
    for i in range(f.single):
        b = f"single_blocks.{i}"
        _lin(out, f"{b}.linear1", 3 * h + mlp, h)
        _lin(out, f"{b}.linear2", h, h + mlp)
        out[f"{b}.norm.query_norm.scale"] = ("norm", (d,))
        out[f"{b}.norm.key_norm.scale"] = ("norm", (d,))
        _lin(out, f"{b}.modulation.lin", 3 * h, h)
    _lin(out, "final_layer.linear", f.out_features, h)
    _lin(out, "final_layer.adaLN_modulation.1", 2 * h, h)
    return {prefix + k: v for k, v in out.items()}


def ae_shapes(prefix: str = "") -> dict:
    """BFL's ``ae.safetensors``: the LDM encoder/decoder with 16 latent channels and no quant convs."""
    shapes = tm.vae_shapes(AE, prefix="")
    return {prefix + k: v for k, v in shapes.items() if not k.startswith(("quant_conv.", "post_quant_conv."))}


def t5_shapes(t: TinyT5 = T5, prefix: str = "", *, shared: bool = True, embed_tokens: bool = False) -> dict:
    """transformers' T5EncoderModel (v1.1: gated-GELU feed-forward, no biases, RMS layer norms)."""
    inner = t.heads * t.d_kv
    out: dict = {}
    if shared:
        out["shared.weight"] = ("emb", (t.vocab, t.d_model))
    if embed_tokens:
        out["encoder.embed_tokens.weight"] = ("emb", (t.vocab, t.d_model))
    for i in range(t.layers):
        b = f"encoder.block.{i}.layer"
        for name in ("q", "k", "v"):
            _lin(out, f"{b}.0.SelfAttention.{name}", inner, t.d_model, bias=False)
        _lin(out, f"{b}.0.SelfAttention.o", t.d_model, inner, bias=False)
        if i == 0:
            out[f"{b}.0.SelfAttention.relative_attention_bias.weight"] = ("emb", (t.buckets, t.heads))
        out[f"{b}.0.layer_norm.weight"] = ("norm", (t.d_model,))
        _lin(out, f"{b}.1.DenseReluDense.wi_0", t.d_ff, t.d_model, bias=False)
        _lin(out, f"{b}.1.DenseReluDense.wi_1", t.d_ff, t.d_model, bias=False)
        _lin(out, f"{b}.1.DenseReluDense.wo", t.d_model, t.d_ff, bias=False)
        out[f"{b}.1.layer_norm.weight"] = ("norm", (t.d_model,))
    out["encoder.final_layer_norm.weight"] = ("norm", (t.d_model,))
    return {prefix + k: v for k, v in out.items()}


def clip_l_shapes(prefix: str = "") -> dict:
    return tm.clip_hf_shapes(CLIP_L, prefix)


def materialise(shapes: dict, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """tiny_models.materialise plus embeddings of unit scale (T5 multiplies nothing by 1/sqrt(d))."""
    emb = {k: v for k, v in shapes.items() if v[0] == "emb"}
    rest = {k: v for k, v in shapes.items() if v[0] != "emb"}
    out = tm.materialise(rest, seed, dtype)
    g = torch.Generator().manual_seed(seed + 1000)
    for name in sorted(emb):
        out[name] = torch.randn(emb[name][1], generator=g).to(dtype)
    return out


# --- writers -----------------------------------------------------------------------------------------


def write_transformer(path, f: TinyFlux = DEV, *, seed: int = 11, prefix: str = "", dtype: torch.dtype = torch.float32,
                      fp8: tuple[str, ...] = ()) -> Path:
    """``flux1-dev.safetensors``-style transformer; tensors whose names contain any of ``fp8`` are stored as
    float8_e4m3fn (as in ``flux1-dev-fp8.safetensors``)."""
    tensors = materialise(transformer_shapes(f, prefix), seed, dtype)
    for k in tensors:
        if any(s in k for s in fp8):
            tensors[k] = tensors[k].to(torch.float8_e4m3fn)
    return tm._save(path, tensors)


def write_ae(path, *, seed: int = 12, prefix: str = "") -> Path:
    return tm._save(path, materialise(ae_shapes(prefix), seed))


def write_clip_l(path, *, seed: int = 13, prefix: str = "") -> Path:
    """``clip_l.safetensors``: transformers' CLIPTextModel names (``text_model.*``)."""
    return tm._save(path, tm.materialise(clip_l_shapes(prefix), seed))


def write_t5(path, *, seed: int = 14, prefix: str = "", shared: bool = True, embed_tokens: bool = False,
             dtype: torch.dtype = torch.float32) -> Path:
    """``t5xxl_fp16.safetensors`` (``dtype=torch.float8_e4m3fn`` for ``t5xxl_fp8_e4m3fn``: weights in fp8,
    norms kept in float16 as such files do)."""
    tensors = materialise(t5_shapes(prefix=prefix, shared=shared, embed_tokens=embed_tokens), seed)
    if dtype == torch.float8_e4m3fn:
        tensors = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 and "embed" not in k and "shared" not in k
                   else v.half() for k, v in tensors.items()}
    else:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    return tm._save(path, tensors)


def write_spiece(folder, *, vocab_size: int = 40) -> Path:
    """A sentencepiece unigram model (``spiece.model``) trained on :data:`SPIECE_TEXT`, with T5's special ids:
    pad 0, eos 1, unk 2."""
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = SPIECE_TEXT.splitlines() * 8
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(folder / "spiece"), vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        hard_vocab_limit=False, minloglevel=2,
    )
    (folder / "spiece.vocab").unlink(missing_ok=True)
    return folder / "spiece.model"


def write_all_in_one(path, *, seed: int = 15, vae_prefix: str = "vae.", dtype: torch.dtype = torch.float32) -> Path:
    """ComfyUI's all-in-one FLUX checkpoint: transformer, both text encoders and the VAE under prefixes."""
    shapes = {**transformer_shapes(DEV, "model.diffusion_model."), **ae_shapes(vae_prefix),
              **clip_l_shapes("text_encoders.clip_l.transformer."),
              **t5_shapes(prefix="text_encoders.t5xxl.transformer.")}
    return tm._save(path, materialise(shapes, seed, dtype))


def gguf_quant_plan(shapes: dict) -> dict[str, str]:
    """Which tensor is stored how in the tiny GGUF: 2-D weights with 32-multiple rows quantized (mostly Q8_0,
    a Q4_0, a Q5_0 and a BF16 one), everything else F32, one weight F16 — like city96's FLUX GGUFs."""
    plan = {}
    for name, (_, shape) in shapes.items():
        if len(shape) == 2 and shape[1] % 32 == 0:
            plan[name] = "Q8_0"
        elif len(shape) == 2:
            plan[name] = "F16"
        else:
            plan[name] = "F32"
    plan["double_blocks.1.img_mlp.0.weight"] = "Q4_0"
    plan["single_blocks.0.linear2.weight"] = "Q5_0"
    plan["double_blocks.0.txt_mlp.2.weight"] = "BF16"
    return plan


def write_gguf(path, f: TinyFlux = DEV, *, seed: int = 11) -> Path:
    """``flux1-dev-Q8_0.gguf``-style file of the same weights :func:`write_transformer` writes for ``seed``.

    gguf stores each quantized row as bytes; the writer is given the quantized array and the
    original (torch-order) shape, and the file records the dimensions reversed, as GGML does.
    """
    import gguf
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = transformer_shapes(f)
    tensors = materialise(shapes, seed)
    plan = gguf_quant_plan(shapes)
    writer = gguf.GGUFWriter(str(path), "flux")
    for name in sorted(tensors):
        arr = tensors[name].numpy()
        kind = plan[name]
        if kind == "F32":
            writer.add_tensor(name, arr.astype(np.float32))
        elif kind == "F16":
            writer.add_tensor(name, arr.astype(np.float16))
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            q = gguf.quants.quantize(arr, qtype)
            writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- diffusers folder ----------------------------------------------------------------------------------


def transformer_config(f: TinyFlux = DEV) -> dict:
    """The FluxTransformer2DModel config of the tiny transformer, written out by hand."""
    return {"patch_size": 1, "in_channels": f.in_features, "out_channels": f.out_features, "num_layers": f.double,
            "num_single_layers": f.single, "attention_head_dim": f.head_dim,
            "num_attention_heads": f.hidden // f.head_dim, "joint_attention_dim": f.context,
            "pooled_projection_dim": f.pooled, "guidance_embeds": f.guidance, "axes_dims_rope": (4, 6, 6)}


def ae_config() -> dict:
    return {**tm.vae_config(0.3611, AE), "shift_factor": 0.1159, "use_quant_conv": False,
            "use_post_quant_conv": False}


def t5_config():
    from transformers import T5Config

    return T5Config(vocab_size=T5.vocab, d_model=T5.d_model, d_kv=T5.d_kv, d_ff=T5.d_ff, num_layers=T5.layers,
                    num_heads=T5.heads, relative_attention_num_buckets=T5.buckets, feed_forward_proj="gated-gelu",
                    dense_act_fn="gelu_new", is_gated_act=True, tie_word_embeddings=False)


def write_diffusers_folder(folder, *, seed: int = 16, spiece: Path | None = None) -> Path:
    """A FluxPipeline folder as ``save_pretrained`` writes it, with seeded random weights."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5EncoderModel, T5TokenizerFast

    from underpaint.models.tokenizer import clip_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    FluxTransformer2DModel(**transformer_config()).save_pretrained(str(folder / "transformer"))
    AutoencoderKL(**{k: v for k, v in ae_config().items() if k != "_class_name"}).save_pretrained(str(folder / "vae"))
    clip_cfg = CLIPTextConfig(**{k: v for k, v in tm._text_config(CLIP_L, "quick_gelu", CLIP_L.layers, False).items()
                                 if k not in ("architectures", "model_type")})
    CLIPTextModel(clip_cfg).save_pretrained(str(folder / "text_encoder"))
    T5EncoderModel(t5_config()).save_pretrained(str(folder / "text_encoder_2"))
    clip_tokenizer().save_pretrained(str(folder / "tokenizer"))
    spiece = spiece or write_spiece(folder / "tokenizer_2")
    (folder / "tokenizer_2").mkdir(exist_ok=True)
    if spiece.parent != folder / "tokenizer_2":
        shutil.copy(spiece, folder / "tokenizer_2" / "spiece.model")
    T5TokenizerFast.from_pretrained(str(folder / "tokenizer_2"), local_files_only=True).save_pretrained(
        str(folder / "tokenizer_2"))
    index = {"_class_name": "FluxPipeline", "_diffusers_version": "0.42.1",
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
             "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    sched = {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
             "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
             "use_dynamic_shifting": True}
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=1))
    return folder


# --- everything at once ----------------------------------------------------------------------------------


def tiny_flux_set(tmp_dir) -> dict[str, Path]:
    """Write every tiny FLUX file into ``tmp_dir`` (once; reused when present) and return their paths.

    Keys: ``transformer`` (dev, BFL names), ``schnell``, ``fill``, ``transformer_fp8``, ``ae``,
    ``clip_l``, ``t5``, ``t5_fp8``, ``spiece_dir`` (holding ``spiece.model``), ``all_in_one``
    (ComfyUI prefixes, VAE under ``vae.``), ``diffusers`` (a FluxPipeline folder), ``gguf``
    (the dev transformer's weights, quantized). The single-file text encoders sit in
    ``text_encoders/`` next to ``spiece.model``, as they would in a models folder.
    """
    d = Path(tmp_dir)
    te = d / "text_encoders"
    paths = {
        "transformer": d / "flux1-dev-tiny.safetensors",
        "schnell": d / "flux1-schnell-tiny.safetensors",
        "fill": d / "flux1-fill-dev-tiny.safetensors",
        "transformer_fp8": d / "flux1-dev-fp8-tiny.safetensors",
        "ae": d / "ae.safetensors",
        "clip_l": te / "clip_l.safetensors",
        "t5": te / "t5xxl_fp16.safetensors",
        "t5_fp8": te / "t5xxl_fp8_e4m3fn.safetensors",
        "spiece_dir": te,
        "all_in_one": d / "flux1-dev-aio-tiny.safetensors",
        "diffusers": d / "FLUX.1-dev-tiny",
        "gguf": d / "flux1-dev-tiny-Q8_0.gguf",
    }
    done = d / ".tiny-flux-complete"
    if done.exists():
        return paths
    write_transformer(paths["transformer"], DEV)
    write_transformer(paths["schnell"], SCHNELL, seed=21)
    write_transformer(paths["fill"], FILL, seed=22)
    write_transformer(paths["transformer_fp8"], DEV, fp8=("blocks.",))
    write_ae(paths["ae"])
    write_clip_l(paths["clip_l"])
    write_t5(paths["t5"], dtype=torch.float16)
    write_t5(paths["t5_fp8"], dtype=torch.float8_e4m3fn)
    spiece = write_spiece(te)
    write_all_in_one(paths["all_in_one"])
    write_diffusers_folder(paths["diffusers"], spiece=spiece)
    write_gguf(paths["gguf"], DEV)
    done.write_text("ok")
    return paths


# --- stored-weight variants: scaled fp8, GGUF of many block types ------------------------------------------

#: Where each GGUF block type keeps its float16 scale fields (byte offsets in a block), from GGML's block layouts.
GGUF_F16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
                   "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(qtype: str, n_blocks: int, seed: int = 0):
    """``n_blocks`` blocks of GGUF type ``qtype`` with random quant bits and small finite float16 scales
    (a stand-in for types the ``gguf`` package can read but not write, such as the K-quants)."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    _, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    blocks = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for offset in GGUF_F16_FIELDS[qtype]:
        scales = (rng.uniform(0.001, 0.02, n_blocks) * rng.choice([-1, 1], n_blocks)).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def write_scaled_fp8_transformer(path, f: TinyFlux = DEV, *, seed: int = 11) -> Path:
    """ComfyUI's "scaled fp8" transformer: each 2-D weight of the blocks stored as fp8(w / s) with the
    per-tensor factor s (float32) beside it as ``<layer>.scale_weight``, and a ``scaled_fp8`` marker."""
    tensors = materialise(transformer_shapes(f), seed)
    for k in [k for k in tensors if "blocks." in k and k.endswith(".weight") and tensors[k].ndim == 2]:
        scale = tensors[k].abs().max() / 448.0
        tensors[k] = (tensors[k] / scale).to(torch.float8_e4m3fn)
        tensors[k[: -len("weight")] + "scale_weight"] = scale.reshape(()).float()
    tensors["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return tm._save(path, tensors)


#: A GGUF of many types: legacy quants on fused and swapped tensors, a K-quant, and Q2_K (which underpaint
#: expands at load), over the Q8_0 plan of :func:`gguf_quant_plan`.
GGUF_MIXED = {"double_blocks.0.img_attn.qkv.weight": "Q4_1", "single_blocks.1.linear1.weight": "Q5_1",
              "double_blocks.1.txt_attn.qkv.weight": "Q5_0", "final_layer.adaLN_modulation.1.weight": "Q4_0",
              "time_in.in_layer.weight": "Q6_K", "guidance_in.in_layer.weight": "Q2_K"}


def write_gguf_mixed(path, f: TinyFlux = DEV, *, seed: int = 11, overrides: dict[str, str] = GGUF_MIXED) -> Path:
    """:func:`write_gguf` with some tensors in other types; types the ``gguf`` package cannot quantize
    (K-quants) are written as :func:`random_blocks`."""
    import gguf
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = transformer_shapes(f)
    tensors = materialise(shapes, seed)
    plan = {**gguf_quant_plan(shapes), **overrides}
    writer = gguf.GGUFWriter(str(path), "flux")
    for i, name in enumerate(sorted(tensors)):
        arr, kind = tensors[name].numpy(), plan[name]
        if kind in ("F32", "F16"):
            writer.add_tensor(name, arr.astype(np.float32 if kind == "F32" else np.float16))
            continue
        qtype = gguf.GGMLQuantizationType[kind]
        try:
            q = gguf.quants.quantize(arr, qtype)
        except NotImplementedError:
            block, _ = gguf.GGML_QUANT_SIZES[qtype]
            q = random_blocks(kind, arr.size // block, seed=i).reshape(arr.shape[0], -1)
        writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


#: The linear layers of a T5 v1.1 block, as tensor-name endings.
T5_LINEARS = ("SelfAttention.q.weight", "SelfAttention.k.weight", "SelfAttention.v.weight", "SelfAttention.o.weight",
              "DenseReluDense.wi_0.weight", "DenseReluDense.wi_1.weight", "DenseReluDense.wo.weight")


def write_scaled_fp8_t5(path, *, seed: int = 14) -> Path:
    """ComfyUI's "scaled fp8" T5 (``t5xxl_fp8_e4m3fn_scaled``): each linear weight stored as fp8(w / s)
    with its float32 factor s as ``<layer>.scale_weight`` (and a ``scale_input`` of 1), a ``scaled_fp8``
    marker; embeddings, the position bias and norms in float16."""
    tensors = materialise(t5_shapes(), seed)
    for k in [k for k in tensors if k.endswith(T5_LINEARS)]:
        scale = tensors[k].abs().max() / 448.0
        tensors[k] = (tensors[k] / scale).to(torch.float8_e4m3fn)
        tensors[k[: -len("weight")] + "scale_weight"] = scale.reshape(()).float()
        tensors[k[: -len("weight")] + "scale_input"] = torch.ones((), dtype=torch.float32)
    tensors = {k: v.half() if v.dtype == torch.float32 and not k.endswith(("scale_weight", "scale_input")) else v
               for k, v in tensors.items()}
    tensors["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return tm._save(path, tensors)
