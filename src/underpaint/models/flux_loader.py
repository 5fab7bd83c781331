"""Loading a FLUX.1 model: transformer, 16-channel autoencoder, CLIP-L and T5 encoders, tokenizers.

FLUX.1 comes in pieces more often than whole. The usual set is a transformer file
(``flux1-dev.safetensors`` in Black Forest Labs' names, an fp8 copy of it, or a GGUF
quantization), ``ae.safetensors``, ``clip_l.safetensors`` and a T5-XXL encoder
(``t5xxl_fp16.safetensors`` or its fp8 copy), plus T5's ``spiece.model``. ComfyUI's all-in-one
checkpoints hold everything in one file under ``model.diffusion_model.``, ``vae.`` (or
``first_stage_model.``), ``text_encoders.clip_l.transformer.`` and
``text_encoders.t5xxl.transformer.``; diffusers folders keep each part in its own subfolder.

:func:`load_flux` takes the main file or folder and, for the parts it lacks, the separate files
(``clip_l=``, ``t5=``, ``vae=``; on the command line ``--clip-l``, ``--t5``, ``--vae``). A part given
explicitly wins over a bundled one. Every module is built on the meta device with its config read
from shapes and then given the file's tensors (see :mod:`.loader`).

fp8 tensors (``float8_e4m3fn``/``e5m2``, including ComfyUI's "scaled" fp8 files whose weights
carry a ``scale_weight`` factor), GGUF blocks and bitsandbytes 4-bit weights (NF4/FP4, as in
Forge's all-in-one ``flux1-dev-bnb-nf4-v2.safetensors``; see :mod:`.bnb4`) are, by default
(``keep_quantized=True``), kept as stored for the transformer's linear layers
(:class:`~.quantized.StoredLinear`): they are expanded to the compute dtype one layer at a time as
the model runs, so a 12B transformer holds about 11.9 GB in fp8, 6.7-12.7 GB in GGUF Q4_0-Q8_0
or 6.1-6.7 GB in NF4 instead of 23.8 GB in bf16 (computed from FLUX.1's shapes). The same holds for the linear layers of a separate fp8 T5 file
(``t5xxl_fp8_e4m3fn.safetensors``, scaled or not): T5-XXL's 4.76B parameters take 9.5 GB in
bf16 and 4.9 GB with its 4.63B linear weights kept in fp8 (computed from its shapes), and for a
GGUF T5 in llama.cpp's names (``t5-v1_1-xxl-encoder-Q8_0.gguf``: 5.2 GB; Q4_K_M: 3.0 GB, computed).
Everything else (norms, biases, embeddings, CLIP-L, a T5 inside an all-in-one file, the
autoencoder, GGUF types without an on-the-fly dequantizer) is converted to the compute dtype as
it is read; ``keep_quantized=False`` converts everything. ``unet.weight_storage`` says which way the
transformer went (``"bf16"``, ``"fp8_e4m3fn"``, ``"gguf:Q8_0"``, ``"nf4"``, ...).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import ModelError
from . import bnb4, flux
from . import t5 as t5mod
from .detect import (FluxLayout, ModelSpec, _clip_l, describe_tensors, detect_diffusers_folder, detect_flux,
                     flux_layout)
from .gguf import is_gguf, load_gguf, read_gguf_header
from .header import CheckpointHeader, read_header, sniff_format
from .loader import (LoadedModel, _build_text_encoder, _build_vae_original, _dtype, _from_pretrained, _naming, _read,
                     _take, load_vae)
from .quantized import StoredWeight, weight_storage
from .tokenizer import clip_tokenizer

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
CLIP_MARKER = "text_model.embeddings.token_embedding.weight"
#: Where all-in-one files keep the autoencoder.
VAE_PREFIXES = ("vae.", "first_stage_model.")
#: What real FLUX.1 text features measure, for messages (tiny test models differ).
CLIP_L_WIDTH = 768


def is_flux(path: str | os.PathLike) -> bool:
    """True for files and folders :func:`load_flux` should take: GGUF files, safetensors files holding a
    FLUX transformer, and diffusers folders with a ``transformer/`` instead of a ``unet/``."""
    p = Path(path)
    if p.is_dir():
        return (p / "model_index.json").is_file() and (p / "transformer").is_dir() and not (p / "unet").is_dir()
    if not p.is_file():
        return False
    if is_gguf(p):
        return True
    try:
        return sniff_format(p) == "safetensors" and flux_layout(read_header(p).tensors) is not None
    except ModelError:
        return False  # the Stable Diffusion loader reports damaged files


def load_flux(path: str | os.PathLike, *, clip_l: str | os.PathLike | None = None,
              t5: str | os.PathLike | None = None, vae: str | os.PathLike | None = None,
              tokenizer_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu",
              dtype: torch.dtype | str = torch.bfloat16, prediction: str | None = None,
              keep_quantized: bool = True) -> LoadedModel:
    """A FLUX.1 model, offline, from a transformer or all-in-one file (.safetensors, .gguf) or a diffusers folder.

    ``clip_l``, ``t5`` and ``vae`` name separate component files (or a diffusers VAE folder);
    ``tokenizer_dir`` is one more place to look for T5's ``spiece.model`` (after the folder of the
    T5 file, or of ``path`` when T5 is bundled). ``spec.family`` is FLUX; ``unet`` is the
    ``FluxTransformer2DModel``; ``text_encoders`` are (CLIPTextModel, T5EncoderModel) with their
    tokenizers; ``alphas_cumprod`` is empty (flow models have no DDPM schedule).

    ``keep_quantized`` keeps the transformer's fp8, GGUF or 4-bit (NF4/FP4) linear weights, and those
    of a separate fp8 T5 file, as stored, expanded per layer at run time; False expands them to
    ``dtype`` at load.
    """
    path = Path(path)
    device = torch.device(device)
    if isinstance(dtype, str):
        dtype = _dtype(dtype)
    parts = {"clip_l": _opt_path(clip_l), "t5": _opt_path(t5), "vae": _opt_path(vae)}
    if path.is_dir():
        return _load_folder(path, parts, tokenizer_dir, device, dtype, prediction, keep_quantized)
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    with _naming(path):
        header, sd = read_weights(path, dtype, keep_quantized=keep_quantized)
        spec = detect_flux(header, prediction=prediction)
        layout = flux_layout(header.tensors)
        assert layout is not None  # detect_flux checked
        bundled = _bundled(header, layout)
        _require(path, parts, bundled)
        spiece = t5mod.find_spiece([parts["t5"] or path], tokenizer_dir)
        transformer = flux.build_transformer(header, _transformer_tensors(sd, layout, bundled), layout,
                                             device=device, dtype=dtype)
        expand_stored(sd, dtype)  # bundled text encoders and autoencoder hold ordinary tensors
        clip = (_build_clip(header, sd, bundled["clip_l"], device, dtype, "CLIP-L text encoder "
                            f"({bundled['clip_l']}*)") if parts["clip_l"] is None else None)
        t5_model = (t5mod.build_t5(header, sd, bundled["t5"], device=device, dtype=dtype,
                                what=f"T5 encoder ({bundled['t5']}*)") if parts["t5"] is None else None)
        ae = _build_vae_original(header, sd, bundled["vae"], spec, device, dtype) if parts["vae"] is None else None
        sd.clear()
    if clip is None:
        clip = load_clip_l(parts["clip_l"], device=device, dtype=dtype)
    if t5_model is None:
        t5_model = load_t5(parts["t5"], device=device, dtype=dtype, keep_quantized=keep_quantized)
    if ae is None:
        ae = load_vae(parts["vae"], spec, device=device, dtype=dtype)
    t5_tok = t5mod.t5_tokenizer(spiece)
    return _finish(spec, transformer, ae, clip, t5_model, clip_tokenizer(), t5_tok, path, parts["vae"], device, dtype)


def _opt_path(p: str | os.PathLike | None) -> Path | None:
    return None if p is None else Path(p)


# --- reading ------------------------------------------------------------------------------------------


def read_weights(path: Path, dtype: torch.dtype, *,
                 keep_quantized: bool = False) -> tuple[CheckpointHeader, dict[str, torch.Tensor | StoredWeight]]:
    """Header and tensors of a safetensors, torch or GGUF file; fp8, GGUF and bitsandbytes 4-bit
    (NF4/FP4) tensors come back in ``dtype``.

    With ``keep_quantized``, 2-D fp8, GGUF-quantized and 4-bit weights come back as
    :class:`~.quantized.StoredWeight` instead (see :func:`keep_fp8`, :func:`.gguf.load_gguf` and
    :func:`.bnb4.take_4bit`). A 4-bit file's header lists its weights at their logical shapes.
    """
    if is_gguf(path):
        return load_gguf(path, dtype=dtype, keep_quantized=keep_quantized)
    header, sd = _read(path)
    if bnb4.holds_4bit(header.tensors):
        header, sd = bnb4.take_4bit(header, sd, dtype, keep=keep_quantized)
    return header, keep_fp8(sd, dtype) if keep_quantized else upcast_fp8(sd, dtype)


def keep_fp8(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor | StoredWeight]:
    """2-D fp8 ``*.weight`` tensors as :class:`~.quantized.StoredWeight` (with their ``scale_weight``
    factor, when it is a single number), in place; every other fp8 tensor to ``dtype`` as
    :func:`upcast_fp8` does."""
    for key in [k for k in sd if k.endswith(".scale_weight")]:
        weight_key = key[: -len("scale_weight")] + "weight"
        if _keepable(weight_key, sd.get(weight_key)) and sd[key].numel() == 1:
            sd[weight_key] = StoredWeight.fp8(sd[weight_key], float(sd.pop(key).float().item()))
    for key in [k for k in sd if _keepable(k, sd[k]) and k[: -len("weight")] + "scale_weight" not in sd]:
        sd[key] = StoredWeight.fp8(sd[key])
    stored = {k: sd.pop(k) for k in [k for k in sd if isinstance(sd[k], StoredWeight)]}
    upcast_fp8(sd, dtype)  # the remaining scale factors, markers and fp8 tensors
    sd.update(stored)
    return sd


def _keepable(key: str, value) -> bool:
    return (isinstance(value, torch.Tensor) and value.dtype in FP8_DTYPES and value.ndim == 2
            and key.endswith(".weight"))


def expand_stored(sd: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every :class:`~.quantized.StoredWeight` in ``sd`` expanded to a ``dtype`` tensor, in place."""
    for key, value in sd.items():
        if isinstance(value, StoredWeight):
            sd[key] = value.dequantize(dtype)
    return sd


def read_any_header(path: Path) -> CheckpointHeader:
    """Tensor names and shapes of a safetensors, torch or GGUF file, without dequantizing anything
    (bitsandbytes 4-bit weights at their logical shapes, see :func:`.bnb4.read_4bit_header`)."""
    if is_gguf(path):
        return read_gguf_header(path)
    header = read_header(path)
    return bnb4.read_4bit_header(path, header) if bnb4.holds_4bit(header.tensors) else header


def upcast_fp8(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """fp8 tensors to ``dtype``, in place; "scaled fp8" weights times their ``scale_weight``.

    Scaled fp8 files store ``w / s`` in fp8 with the factor ``s`` beside it (``<layer>.scale_weight``),
    a ``scaled_fp8`` marker tensor, and sometimes ``<layer>.scale_input`` (used only by fp8 matmuls).
    """
    for key in [k for k in sd if k.endswith(".scale_weight")]:
        scale = sd.pop(key).float()
        weight_key = key[: -len("scale_weight")] + "weight"
        if weight_key not in sd:
            raise ModelError(f"scaled fp8 factor {key} has no weight {weight_key}")
        sd[weight_key] = (sd[weight_key].float() * scale).to(dtype)
    for key in [k for k in sd if k == "scaled_fp8" or k.endswith((".scaled_fp8", ".scale_input"))]:
        del sd[key]
    for key, value in sd.items():
        if value.dtype in FP8_DTYPES:
            sd[key] = value.to(dtype)
    return sd


# --- components inside the main file -------------------------------------------------------------------


def _find_prefix(names, marker: str) -> str | None:
    for key in names:
        if key.endswith(marker):
            prefix = key[: -len(marker)]
            if prefix == "" or prefix.endswith("."):
                return prefix
    return None


def _bundled(header: CheckpointHeader, layout: FluxLayout) -> dict[str, str | None]:
    """The prefixes of the CLIP-L, T5 and VAE that the main file carries (None where absent)."""
    names = header.tensors
    vae = next((p for p in VAE_PREFIXES if p + "encoder.conv_in.weight" in names), None)
    if vae is None and layout.prefix and "encoder.conv_in.weight" in names:
        vae = ""
    return {"clip_l": _find_prefix(names, CLIP_MARKER), "t5": t5mod.t5_prefix(names), "vae": vae}


def _require(path: Path, parts: dict[str, Path | None], bundled: dict[str, str | None]) -> None:
    """One message naming every component neither given nor bundled, with the flags that supply them."""
    what = {"clip_l": ("the CLIP-L text encoder", "clip_l= / --clip-l clip_l.safetensors"),
            "t5": ("the T5-XXL text encoder", "t5= / --t5 t5xxl_fp16.safetensors"),
            "vae": ("the VAE", "vae= / --vae ae.safetensors")}
    missing = [k for k in what if parts[k] is None and bundled[k] is None]
    if missing:
        listed = [what[k][0] for k in missing]
        names = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " and " + listed[-1]
        flags = "; ".join(what[k][1] for k in missing)
        raise ModelError(f"{path}: this FLUX file does not include {names}; pass {flags}",
                         field=missing[0])


def _transformer_tensors(sd: dict[str, torch.Tensor], layout: FluxLayout,
                         bundled: dict[str, str | None]) -> dict[str, torch.Tensor]:
    """Take the transformer's tensors (prefix removed) out of ``sd``."""
    if layout.prefix:
        return _take(sd, layout.prefix)
    others = tuple(p for p in bundled.values() if p)
    return {k: sd.pop(k) for k in [k for k in sd if not k.startswith(others)]}


def _build_clip(header: CheckpointHeader, sd: dict[str, torch.Tensor], prefix: str, device: torch.device,
                dtype: torch.dtype, what: str) -> torch.nn.Module:
    """OpenAI CLIP-L's text model (``CLIPTextModel``) from the ``text_model.*`` tensors under ``prefix``.

    Standalone ``clip_l.safetensors`` files may also carry the contrastive ``text_projection`` and
    ``logit_scale``; FLUX uses the pooled output before the projection, so those are left out.
    """
    te = _clip_l(prefix)
    mine = {k: sd.pop(k) for k in [k for k in sd if k.startswith(prefix + "text_model.")]}
    tok = clip_tokenizer(te.pad_token)
    try:
        return _build_text_encoder(header, mine, te, tok.pad_token_id, device, dtype)
    except ModelError as exc:
        raise ModelError(f"{what}: {exc.message}", field=exc.field) from None


def load_clip_l(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """CLIP-L's text model from a single file in transformers' names (``clip_l.safetensors``), any prefix."""
    path = Path(path)
    with _naming(path):
        if path.is_dir():
            from transformers import CLIPTextModel

            return _from_pretrained(CLIPTextModel, path, dtype).to(device).eval().requires_grad_(False)
        header, sd = read_weights(path, dtype)
        prefix = _find_prefix(header.tensors, CLIP_MARKER)
        if prefix is None:
            raise ModelError(f"not a CLIP text encoder: {describe_tensors(header.tensors)}; expected "
                             f"{CLIP_MARKER} and the other text_model.* tensors (clip_l.safetensors)")
        return _build_clip(header, sd, prefix, torch.device(device), dtype, "CLIP-L text encoder")


def load_t5(path: str | os.PathLike, *, device: str | torch.device = "cpu",
            dtype: torch.dtype = torch.bfloat16, keep_quantized: bool = True) -> torch.nn.Module:
    """The T5 encoder from a single file in transformers' names (``t5xxl_fp16.safetensors``, fp8 copies), any prefix,
    or a GGUF in llama.cpp's names (``t5-v1_1-xxl-encoder-Q8_0.gguf``, see :func:`.t5.read_gguf_t5`).

    ``keep_quantized`` keeps an fp8 file's linear weights (``t5xxl_fp8_e4m3fn.safetensors``, and
    "scaled fp8" copies with their ``scale_weight`` factors), and a GGUF's quantized ones, as stored,
    expanded per layer at run time, as :func:`load_flux` does for the transformer; False expands
    them to ``dtype`` at load.
    """
    path = Path(path)
    with _naming(path):
        if path.is_dir():
            from transformers import T5EncoderModel

            return _from_pretrained(T5EncoderModel, path, dtype).to(device).eval().requires_grad_(False)
        if is_gguf(path):  # llama.cpp's names (t5-v1_1-xxl-encoder-Q8_0.gguf), renamed to transformers'
            header, sd = t5mod.read_gguf_t5(path, dtype=dtype, keep_quantized=keep_quantized)
        else:
            header, sd = read_weights(path, dtype, keep_quantized=keep_quantized)
        prefix = t5mod.t5_prefix(header.tensors)
        if prefix is None:
            raise ModelError(f"not a T5 encoder: {describe_tensors(header.tensors)}; expected "
                             f"{t5mod.T5_MARKER} and the other encoder.* tensors (t5xxl_fp16.safetensors)")
        return t5mod.build_t5(header, sd, prefix, device=torch.device(device), dtype=dtype)


# --- diffusers folders -------------------------------------------------------------------------------


def _load_folder(folder: Path, parts: dict[str, Path | None], tokenizer_dir, device: torch.device,
                 dtype: torch.dtype, prediction: str | None, keep_quantized: bool = True) -> LoadedModel:
    """A diffusers FLUX folder (FluxPipeline, FluxImg2ImgPipeline, FluxFillPipeline, ...);
    ``keep_quantized`` applies to a separate fp8 T5 file."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    if not (folder / "model_index.json").exists():
        raise ModelError(f"{folder}: a folder but not a diffusers model (no model_index.json)")
    _check_index(folder)
    spec = detect_diffusers_folder(folder, prediction=prediction)
    with _naming(folder):
        transformer = _from_pretrained(FluxTransformer2DModel, folder / "transformer", dtype)
        ae = _from_pretrained(AutoencoderKL, folder / "vae", dtype) if parts["vae"] is None else None
        clip = _from_pretrained(CLIPTextModel, folder / "text_encoder", dtype) if parts["clip_l"] is None else None
        t5_model = (_from_pretrained(T5EncoderModel, folder / "text_encoder_2", dtype)
                    if parts["t5"] is None else None)
    if ae is None:
        ae = load_vae(parts["vae"], spec, device=device, dtype=dtype)
    if clip is None:
        clip = load_clip_l(parts["clip_l"], device=device, dtype=dtype)
    if t5_model is None:
        t5_model = load_t5(parts["t5"], device=device, dtype=dtype, keep_quantized=keep_quantized)
    tok_dir = folder / "tokenizer"
    clip_tok = clip_tokenizer(folder=tok_dir if (tok_dir / "vocab.json").exists() and (tok_dir / "merges.txt").exists()
                              else None)
    tok2 = folder / "tokenizer_2"
    if (tok2 / "tokenizer.json").is_file() or (tok2 / t5mod.SPIECE).is_file():
        t5_tok = t5mod.t5_tokenizer(tok2)
    else:
        t5_tok = t5mod.t5_tokenizer(t5mod.find_spiece([parts["t5"] or folder], tokenizer_dir))
    modules = [m.to(device).eval().requires_grad_(False) for m in (transformer, ae, clip, t5_model)]
    return _finish(spec, *modules, clip_tok, t5_tok, folder, parts["vae"], device, dtype)


def _check_index(folder: Path) -> None:
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{folder / 'model_index.json'}: unreadable ({exc})") from None
    name = str(index.get("_class_name", ""))
    if name and not name.startswith("Flux"):
        raise ModelError(f"unsupported: {folder} is a {name} folder; expected a FLUX.1 pipeline (FluxPipeline, ...)")
    if name.startswith(("FluxControl", "FluxKontext", "FluxPrior")):
        raise ModelError(f"unsupported: {folder} is a {name} folder; underpaint loads FLUX.1 dev, schnell and Fill")


# --- the assembled model --------------------------------------------------------------------------------


def _finish(spec: ModelSpec, transformer, ae, clip, t5_model, clip_tok, t5_tok, path: Path, vae_path: Path | None,
            device: torch.device, dtype: torch.dtype) -> LoadedModel:
    _check_widths(transformer, ae, clip, t5_model, t5_tok, spec)
    if not hasattr(transformer, "weight_storage"):  # diffusers folders: ordinary tensors
        transformer.weight_storage = weight_storage(transformer, dtype)
    return LoadedModel(spec=spec, unet=transformer, vae=ae, text_encoders=(clip, t5_model),
                       tokenizers=(clip_tok, t5_tok), alphas_cumprod=torch.empty(0, dtype=torch.float64),
                       name=path.stem if path.is_file() else path.name, path=path, device=device, dtype=dtype,
                       vae_path=vae_path)


def _check_widths(transformer, ae, clip, t5_model, t5_tok, spec: ModelSpec) -> None:
    """The parts must fit together: text widths, latent channels, tokenizer size (mixed-up files fail here)."""
    cfg = transformer.config
    if clip.config.hidden_size != cfg.pooled_projection_dim:
        raise ModelError(f"the FLUX transformer expects pooled CLIP features of width {cfg.pooled_projection_dim} "
                         f"but the CLIP-L encoder gives {clip.config.hidden_size} (real FLUX.1 files use "
                         f"{CLIP_L_WIDTH}); check the --clip-l file", field="clip_l")
    if t5_model.config.d_model != cfg.joint_attention_dim:
        raise ModelError(f"the FLUX transformer expects T5 features of width {cfg.joint_attention_dim} but the T5 "
                         f"encoder gives {t5_model.config.d_model} (real FLUX.1 files use {t5mod.T5_XXL_WIDTH}); "
                         "check the --t5 file", field="t5")
    if ae.config.latent_channels != spec.latent_channels:
        raise ModelError(f"the VAE has {ae.config.latent_channels} latent channels but FLUX uses "
                         f"{spec.latent_channels} (an SD VAE given for a FLUX model?); check the --vae file",
                         field="vae")
    if len(t5_tok) > t5_model.config.vocab_size:
        raise ModelError(f"the T5 tokenizer has {len(t5_tok)} tokens but the T5 encoder embeds only "
                         f"{t5_model.config.vocab_size}; the spiece.model does not belong to this encoder", field="t5")


__all__ = ["is_flux", "load_flux", "load_clip_l", "load_t5", "read_weights", "read_any_header", "upcast_fp8",
           "keep_fp8", "expand_stored"]


def components_needed(path: str | os.PathLike) -> set[str]:
    """Which of "clip_l", "t5" and "vae" a FLUX file does not carry itself (empty for a diffusers folder)."""
    p = Path(path)
    if p.is_dir():
        return set()
    header = read_any_header(p)
    layout = flux_layout(header.tensors)
    if layout is None:
        return set()
    return {name for name, prefix in _bundled(header, layout).items() if prefix is None}
