"""The T5 v1.1 encoder FLUX.1 conditions on, from a single file, and its sentencepiece tokenizer.

Single-file T5 encoders (``t5xxl_fp16.safetensors``, ``t5xxl_fp8_e4m3fn.safetensors``) are
transformers' ``T5EncoderModel`` state dicts, sometimes under a prefix (ComfyUI's all-in-one
files use ``text_encoders.t5xxl.transformer.``). Their config is read from shapes: the width
from ``q``, the head count and bucket count from block 0's ``relative_attention_bias`` (T5 shares
one position bias across layers), the feed-forward width and kind from ``wi_0``/``wi_1`` (gated
GELU in v1.1) or ``wi`` (ReLU in the original T5).

The token embedding is one matrix that transformers names twice (``shared`` and
``encoder.embed_tokens``); files carry either or both, and the module gets one tensor for both.

GGUF T5 encoders (city96's ``t5-v1_1-xxl-encoder-Q8_0.gguf``, ``-Q5_K_M``, ``-Q4_K_M`` ...) are
llama.cpp conversions (``general.architecture`` ``t5encoder``, or ``t5`` with a decoder beside
it) and use llama.cpp's names: ``token_embd``, ``enc.blk.{i}.attn_q``/``attn_k``/``attn_v``/
``attn_o``, ``attn_rel_b`` (block 0's position bias), ``attn_norm``, ``ffn_gate``/``ffn_up``/
``ffn_down``, ``ffn_norm`` and ``enc.output_norm``. :func:`gguf_t5_names` maps them onto
transformers' names (the ``gguf`` package's ``TensorNameMap`` for ``MODEL_ARCH.T5ENCODER`` is the
table they come from); shapes are the same once GGML's reversed dimension order is undone.
:func:`read_gguf_t5` reads such a file with its quantized linear weights kept as stored.

The tokenizer is T5's sentencepiece model, ``spiece.model``. It is not inside any weights file:
diffusers folders keep it in ``tokenizer_2/``; for single files it is looked for next to the
T5 file (or the all-in-one checkpoint), then in the folder the caller names, then in the models
folder's ``text_encoders/``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import ModelError
from .header import CheckpointHeader

#: A tensor every T5 encoder file has; what precedes it in a key is the file's prefix.
T5_MARKER = "encoder.block.0.layer.0.SelfAttention.q.weight"
SPIECE = "spiece.model"
#: FLUX.1-dev's T5 sequence length (schnell uses 256): the tokenizer's default maximum.
T5_MAX_LENGTH = 512
#: Width of real FLUX.1 T5 features, for messages.
T5_XXL_WIDTH = 4096
#: Parts of full T5 checkpoints that an encoder has no place for.
_IGNORED_PREFIXES = ("decoder.", "lm_head.")


def t5_prefix(names) -> str | None:
    """The prefix of a T5 encoder in a file's tensor names, or None when it has none."""
    for key in names:
        if key.endswith(T5_MARKER):
            prefix = key[: -len(T5_MARKER)]
            if prefix == "" or prefix.endswith("."):
                return prefix
    return None


#: A tensor every llama.cpp T5 encoder GGUF has (transformers' ``encoder.block.0.layer.0.SelfAttention.q``).
GGUF_T5_MARKER = "enc.blk.0.attn_q.weight"
#: llama.cpp's names for the tensors of encoder block ``i`` (``enc.blk.{i}.<name>.weight``) → transformers'
#: (``encoder.block.{i}.<name>.weight``). ``ffn_up`` is ``wi_1`` beside a ``ffn_gate`` (``wi_0``), else ``wi``.
_GGUF_T5_BLOCK = {
    "attn_q": "layer.0.SelfAttention.q",
    "attn_k": "layer.0.SelfAttention.k",
    "attn_v": "layer.0.SelfAttention.v",
    "attn_o": "layer.0.SelfAttention.o",
    "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias",
    "attn_norm": "layer.0.layer_norm",
    "ffn_gate": "layer.1.DenseReluDense.wi_0",
    "ffn_up": "layer.1.DenseReluDense.wi_1",
    "ffn_down": "layer.1.DenseReluDense.wo",
    "ffn_norm": "layer.1.layer_norm",
}
_GGUF_T5_GLOBAL = {"token_embd.weight": "shared.weight", "enc.output_norm.weight": "encoder.final_layer_norm.weight"}
#: Parts of a whole T5 in GGUF (``t5``: decoder blocks, decoder norm, LM head) that an encoder has no place for.
_GGUF_T5_IGNORED = ("dec.", "output.")
_GGUF_T5_BLOCK_NAME = re.compile(r"enc\.blk\.(\d+)\.(\w+)\.weight")


def gguf_t5_names(names) -> dict[str, str] | None:
    """llama.cpp T5 encoder tensor names → transformers' ``T5EncoderModel`` names, for every tensor the
    encoder uses (a decoder and LM head are left out); None when ``names`` are not llama.cpp's T5
    encoder's. A tensor of the encoder that has no place in the model is a :class:`ModelError`."""
    names = list(names)
    if GGUF_T5_MARKER not in names:
        return None
    present = set(names)
    out: dict[str, str] = {}
    for name in names:
        if name.startswith(_GGUF_T5_IGNORED):
            continue
        if name in _GGUF_T5_GLOBAL:
            out[name] = _GGUF_T5_GLOBAL[name]
            continue
        m = _GGUF_T5_BLOCK_NAME.fullmatch(name)
        if m is None or m.group(2) not in _GGUF_T5_BLOCK:
            raise ModelError(f"unexpected tensor {name} in a GGUF T5 encoder; expected token_embd.weight, "
                             f"enc.output_norm.weight and enc.blk.N.{{{','.join(_GGUF_T5_BLOCK)}}}.weight")
        i, part = m.group(1), _GGUF_T5_BLOCK[m.group(2)]
        if m.group(2) == "ffn_up" and f"enc.blk.{i}.ffn_gate.weight" not in present:
            part = "layer.1.DenseReluDense.wi"  # the original T5's ReLU feed-forward has no gate
        out[name] = f"encoder.block.{i}.{part}.weight"
    return out


def read_gguf_t5(path: str | os.PathLike, *, dtype: torch.dtype,
                 keep_quantized: bool) -> tuple[CheckpointHeader, dict]:
    """A GGUF T5 encoder's header and tensors in transformers' names (see :func:`gguf_t5_names`).

    With ``keep_quantized`` the 2-D weights in a type :mod:`.quantized` expands on the fly stay
    as stored (:class:`~.quantized.StoredWeight`; :func:`build_t5` keeps those of linear layers and
    expands the token embedding); everything else comes in ``dtype``. A GGUF that holds something
    else (a FLUX transformer) is a :class:`ModelError` saying what was expected.
    """
    from .detect import describe_tensors, flux_layout
    from .gguf import load_gguf, read_gguf_header

    header = read_gguf_header(path)
    names = gguf_t5_names(header.tensors)
    if names is None:
        if t5_prefix(header.tensors) is not None:  # transformers' own names in a GGUF container
            return load_gguf(path, dtype=dtype, keep_quantized=keep_quantized)
        arch = header.metadata.get("general.architecture")
        what = f"general.architecture {arch!r}; " if arch else ""
        looks = ("it looks like a FLUX transformer, a --model file" if flux_layout(header.tensors) is not None
                 else describe_tensors(header.tensors))
        raise ModelError(f"not a T5 encoder GGUF ({what}{looks}); expected llama.cpp's "
                         f"T5 encoder tensors ({GGUF_T5_MARKER}, token_embd.weight, ...) as in "
                         "t5-v1_1-xxl-encoder-Q8_0.gguf", field="t5")
    _, tensors = load_gguf(path, dtype=dtype, keep_quantized=keep_quantized, only=names)
    renamed = CheckpointHeader(tensors={names[k]: v for k, v in header.tensors.items() if k in names},
                               metadata=header.metadata, format=header.format)
    return renamed, {names[k]: v for k, v in tensors.items()}


def t5_config(header: CheckpointHeader, prefix: str = ""):
    """A ``transformers.T5Config`` for the T5 encoder under ``prefix``, from its tensor shapes."""
    from transformers import T5Config

    p = prefix
    names = [k[len(p):] for k in header.tensors if k.startswith(p)]
    inner, d_model = header.shape(p + T5_MARKER)
    bias_key = p + "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    if not header.has(bias_key):
        raise ModelError(f"T5 encoder has no relative position bias ({bias_key}); not a T5 encoder")
    buckets, heads = header.shape(bias_key)
    if inner % heads:
        raise ModelError(f"T5 attention width {inner} is not a whole number of its {heads} heads")
    layers = sorted({int(m.group(1)) for n in names if (m := re.match(r"encoder\.block\.(\d+)\.", n))})
    if layers != list(range(len(layers))):
        raise ModelError(f"T5 encoder blocks are numbered {layers[:6]}..., expected 0..{len(layers) - 1}")
    ff = p + "encoder.block.0.layer.1.DenseReluDense."
    gated = header.has(ff + "wi_0.weight")
    d_ff = header.shape(ff + ("wi_0.weight" if gated else "wi.weight"))[0]
    embedding = next((p + k for k in ("shared.weight", "encoder.embed_tokens.weight") if header.has(p + k)), None)
    if embedding is None:
        raise ModelError("T5 encoder has no token embedding (shared.weight or encoder.embed_tokens.weight)")
    return T5Config(
        vocab_size=header.shape(embedding)[0], d_model=d_model, d_kv=inner // heads, d_ff=d_ff,
        num_layers=len(layers), num_heads=heads, relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128, feed_forward_proj="gated-gelu" if gated else "relu",
        dense_act_fn="gelu_new" if gated else "relu", is_gated_act=gated, layer_norm_epsilon=1e-6,
        tie_word_embeddings=False, use_cache=False, is_encoder_decoder=False,
    )


def t5_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """T5 encoder tensors (prefix removed) in ``T5EncoderModel`` names: one embedding under both names."""
    out = {k: v for k, v in state_dict.items() if not k.startswith(_IGNORED_PREFIXES)}
    shared = out.get("shared.weight", out.get("encoder.embed_tokens.weight"))
    if shared is not None:
        out["shared.weight"] = out["encoder.embed_tokens.weight"] = shared
    return out


def build_t5(header: CheckpointHeader, state_dict: dict, prefix: str, *, device: torch.device,
             dtype: torch.dtype, what: str = "T5 encoder") -> torch.nn.Module:
    """``T5EncoderModel`` built on the meta device from the tensors under ``prefix`` (which are taken from
    ``state_dict``).

    :class:`~.quantized.StoredWeight` values (fp8 kept as stored) that are the weights of the
    attention and feed-forward linear layers stay as stored in :class:`~.quantized.StoredLinear`
    layers computing in ``dtype``; stored embeddings and norms are expanded to ``dtype``. The
    module's ``weight_storage`` says how its weights are held (``"bf16"``, ``"fp8_e4m3fn"``, ...).
    """
    from transformers import T5EncoderModel

    from .loader import _assign, _take
    from .quantized import fill_stored, swap_linears, take_stored, weight_storage

    config = t5_config(header, prefix)
    with torch.device("meta"):
        module = T5EncoderModel(config)
    weights = {k: v for k, v in _take(state_dict, prefix).items() if not k.startswith(_IGNORED_PREFIXES)}
    stored = take_stored(module, weights, dtype)  # before the embedding is tied: it is expanded once
    layers = swap_linears(module, stored, what)
    for name, layer in layers.items():
        if name.endswith(".DenseReluDense.wo.weight"):
            # transformers' feed-forward casts its input to ``wo.weight.dtype`` when that is a tensor;
            # a stored layer computes in its input's dtype, so there is nothing to cast to.
            layer.weight = None
    module = _assign(module, t5_weights(weights), what, device, dtype)
    fill_stored(layers, stored, device, dtype)
    module.encoder.set_input_embeddings(module.shared)  # one matrix, as in the trained model
    module.weight_storage = weight_storage(module, dtype)
    return module


# --- tokenizer -----------------------------------------------------------------------------------------


def spiece_candidates(near: list[Path], tokenizer_dir: str | os.PathLike | None) -> list[Path]:
    """Where ``spiece.model`` is looked for, in order: next to the given files, the given folder
    (or its ``tokenizer_2/``), the models folder's ``text_encoders/``, then the ``tokenizer_2/`` of
    FLUX diffusers folders in its ``checkpoints/`` (where ``underpaint download flux-dev`` puts one)."""
    dirs: list[Path] = [p if p.is_dir() else p.parent for p in near]
    if tokenizer_dir is not None:
        dirs += [Path(tokenizer_dir), Path(tokenizer_dir) / "tokenizer_2"]
    dirs.append(_default_text_encoders_dir())
    seen: dict[Path, None] = {}
    for d in dirs:
        seen.setdefault(d / SPIECE, None)
    for found in _downloaded_spiece():
        seen.setdefault(found, None)
    return list(seen)


def _models_dir():
    from .registry import ModelsDir, default_models_dir

    return ModelsDir(default_models_dir())


def _default_text_encoders_dir() -> Path:
    return _models_dir().folder("text_encoders")


def _downloaded_spiece() -> list[Path]:
    """``spiece.model`` files of diffusers folders directly inside the models folder's checkpoint folders."""
    found: list[Path] = []
    for base in _models_dir().folders("checkpoints"):
        found += sorted(p for p in base.glob(f"*/tokenizer_2/{SPIECE}")
                        if (p.parent.parent / "model_index.json").is_file())
    return found


def find_spiece(near: list[Path], tokenizer_dir: str | os.PathLike | None) -> Path:
    """The first ``spiece.model`` of :func:`spiece_candidates`; a one-line ModelError when there is none."""
    candidates = spiece_candidates(near, tokenizer_dir)
    for c in candidates:
        if c.is_file():
            return c
    looked = ", ".join(str(c.parent) for c in candidates if c.parent.name != "tokenizer_2")
    raise ModelError(f"the T5 tokenizer file {SPIECE} is missing (looked in {looked}); put {SPIECE} from the "
                     f"FLUX.1 repository's tokenizer_2/ folder next to the T5 file or in "
                     f"{_default_text_encoders_dir()} (`underpaint download flux-dev` fetches it)", field="t5")


def t5_tokenizer(source: str | os.PathLike, *, max_length: int = T5_MAX_LENGTH):
    """A T5 tokenizer from a ``spiece.model`` file or a tokenizer folder (diffusers' ``tokenizer_2/``).

    A lone ``spiece.model`` is copied into a private folder first, so that no other tokenizer
    file that happens to sit beside it is picked up.
    """
    from transformers import T5TokenizerFast

    source = Path(source)
    try:
        if source.is_dir():
            return T5TokenizerFast.from_pretrained(str(source), local_files_only=True, model_max_length=max_length)
        with tempfile.TemporaryDirectory(prefix="underpaint-t5-") as tmp:
            shutil.copyfile(source, Path(tmp) / SPIECE)
            return T5TokenizerFast.from_pretrained(tmp, local_files_only=True, model_max_length=max_length)
    except ImportError as exc:
        raise ModelError(f"{source}: building the T5 tokenizer needs the sentencepiece and protobuf packages "
                         f"(pip install 'underpaint[flux]'): {exc}") from None
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{source}: cannot build the T5 tokenizer ({first})") from None
