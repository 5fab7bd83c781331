"""Building ready-to-run diffusers/transformers modules from a checkpoint file or a diffusers folder.

Modules are created on the meta device (no memory, no random init) and then take the
checkpoint's tensors as their parameters (``load_state_dict(assign=True)``), so a 7 GB SDXL
file is held in memory once. Key sets are compared exactly before loading: a missing or
unexpected tensor is a :class:`ModelError` that names a few of them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError
from . import configs, convert
from .detect import (UNET_PREFIX, VAE_PREFIX, Family, ModelSpec, TextEncoderLayout, describe_tensors, detect,
                     detect_diffusers_folder, layout_of, probe_prediction)
from .header import CheckpointHeader, header_from_state_dict, load_state_dict, read_header, sniff_format
from .tokenizer import clip_tokenizer


@dataclass
class LoadedModel:
    """A checkpoint's components, placed on one device in one dtype."""

    spec: ModelSpec
    unet: torch.nn.Module
    vae: torch.nn.Module
    #: SD1 (CLIP-L,), SD2 (OpenCLIP-H as CLIPTextModel,), SDXL (CLIP-L, bigG CLIPTextModelWithProjection),
    #: the SDXL refiner (bigG,), FLUX (CLIP-L CLIPTextModel, T5EncoderModel); ``unet`` is FLUX's
    #: FluxTransformer2DModel.
    text_encoders: tuple
    tokenizers: tuple
    #: ᾱ_t for t = 0..999, float64 holding the float32 values the original code trains and samples with;
    #: empty for FLUX (a flow model has no DDPM schedule).
    alphas_cumprod: torch.Tensor
    name: str
    path: Path
    device: torch.device
    dtype: torch.dtype
    vae_path: Path | None = field(default=None)
    #: Where the parts are kept between uses (``--vram``; models/offload.py); None: all on ``device``.
    offload: Any = field(default=None, repr=False)
    #: The speed switches applied (``--optimize``; models/optimize.py); None: none.
    speed: Any = field(default=None, repr=False)
    #: The dtype every VAE call runs in (``--vae-precision``: auto, fp32, fp16 or bf16;
    #: models/offload.py: ``set_vae_precision``, which checks it against the device).
    vae_precision: str = "auto"

    @cached_property
    def short_hash(self) -> str | None:
        """A1111's 'Model hash' (sha256, 10 hex digits) of the checkpoint file; None for a diffusers folder."""
        if self.path.is_dir():
            return None
        from .hashes import model_hash

        return model_hash(self.path)

    @property
    def short_title(self) -> str:
        """A1111's short title, as its infotexts name a refiner or hires checkpoint: ``name [hash]``
        (the name alone when there is no hash)."""
        return f"{self.name} [{self.short_hash}]" if self.short_hash else self.name

    @cached_property
    def vae_hash(self) -> str | None:
        """A1111's 'VAE hash' (sha256, 10 hex digits) of a separate VAE file; None when the checkpoint's own is used."""
        if self.vae_path is None:
            return None
        from .hashes import model_hash

        return model_hash(self.vae_path)


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
               vae: str | os.PathLike | None = None, prediction: str | None = None,
               clip_l: str | os.PathLike | None = None, t5: str | os.PathLike | None = None,
               tokenizer_dir: str | os.PathLike | None = None) -> LoadedModel:
    """Load a single-file checkpoint (.safetensors/.ckpt/.gguf) or a diffusers folder, offline.

    FLUX.1 models go to :func:`load_flux`, with ``clip_l``, ``t5`` and ``tokenizer_dir``;
    Stable Diffusion checkpoints ignore those three.
    """
    path = Path(path)
    device = torch.device(device)
    if isinstance(dtype, str):
        dtype = _dtype(dtype)
    from .flux_loader import is_flux, load_flux as _load_flux

    if is_flux(path):
        return _load_flux(path, clip_l=clip_l, t5=t5, vae=vae, tokenizer_dir=tokenizer_dir, device=device,
                          dtype=dtype, prediction=prediction)
    if path.is_dir():
        model = _load_folder(path, device, dtype, prediction)
    else:
        model = _load_single_file(path, device, dtype, prediction, build_vae=vae is None)
    if vae is not None:
        model.vae = load_vae(vae, model.spec, device=device, dtype=dtype)
        model.vae_path = Path(vae)
    return model


def load_flux(path: str | os.PathLike, *, clip_l: str | os.PathLike | None = None,
              t5: str | os.PathLike | None = None, vae: str | os.PathLike | None = None,
              tokenizer_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu",
              dtype: torch.dtype | str = torch.bfloat16, prediction: str | None = None,
              keep_quantized: bool = True) -> LoadedModel:
    """A FLUX.1 model (transformer file, GGUF, all-in-one file or diffusers folder); see :mod:`.flux_loader`.

    ``keep_quantized`` keeps fp8, GGUF and bitsandbytes NF4/FP4 transformer weights compressed in
    memory (expanded per layer as it runs); False expands them to ``dtype`` once, at load.
    """
    from .flux_loader import load_flux as _load_flux

    return _load_flux(path, clip_l=clip_l, t5=t5, vae=vae, tokenizer_dir=tokenizer_dir, device=device,
                      dtype=dtype, prediction=prediction, keep_quantized=keep_quantized)


def _dtype(name: str) -> torch.dtype:
    from .device import DTYPES

    if name not in DTYPES:
        from ..errors import InvalidParameter

        raise InvalidParameter("dtype", name, "fp16, bf16 or fp32")
    return DTYPES[name]


def _read(path: Path) -> tuple[CheckpointHeader, dict[str, torch.Tensor]]:
    """Header and tensors; a torch file is unpickled (safely) only once."""
    if sniff_format(path) == "safetensors":
        header = read_header(path)
        return header, load_state_dict(path)
    state_dict = load_state_dict(path)
    return header_from_state_dict(state_dict), state_dict


@contextmanager
def _naming(path: Path):
    """Prefix model errors raised while reading ``path`` with the file name, once."""
    try:
        yield
    except ModelError as exc:
        if str(path) in exc.message:
            raise
        raise type(exc)(f"{path}: {exc.message}", field=exc.field) from None


def _load_single_file(path: Path, device: torch.device, dtype: torch.dtype, prediction: str | None,
                      *, build_vae: bool = True) -> LoadedModel:
    with _naming(path):
        return _build_single_file(path, device, dtype, prediction, build_vae)


def _build_single_file(path: Path, device: torch.device, dtype: torch.dtype, prediction: str | None,
                       build_vae: bool) -> LoadedModel:
    header, sd = _read(path)
    return assemble(header, sd, path=path, device=device, dtype=dtype, prediction=prediction, build_vae=build_vae)


def assemble(header: CheckpointHeader, sd: dict[str, torch.Tensor], *, path: Path, device: torch.device,
             dtype: torch.dtype, prediction: str | None = None, build_vae: bool = True) -> LoadedModel:
    """Detect, configure and build every component from a checkpoint's header and tensors.

    ``sd`` is consumed (emptied) as components take their tensors. With ``device="meta"`` and
    meta tensors this checks a full-size layout without allocating any memory.
    """
    spec = detect(header, prediction=prediction)
    if spec.family == Family.FLUX:
        raise ModelError(f"{path}: a FLUX model in a pickle-based torch file; use its .safetensors or .gguf version")
    layout = layout_of(spec.family)
    if build_vae and not header.with_prefix(VAE_PREFIX):
        raise ModelError(f"{path}: the checkpoint has no VAE ({VAE_PREFIX}*); pass a VAE file with vae=")
    alphas_cumprod = _alphas_cumprod(sd)
    tokenizers = tuple(clip_tokenizer(te.pad_token) for te in layout.text_encoders)
    text_encoders = tuple(
        _build_text_encoder(header, sd, te, tok.pad_token_id, device, dtype)
        for te, tok in zip(layout.text_encoders, tokenizers)
    )
    pooled = getattr(text_encoders[-1].config, "projection_dim", None) if layout.time_ids else None
    unet = _build_unet(header, sd, spec.family, pooled, device, dtype)
    vae = _build_vae_original(header, sd, VAE_PREFIX, spec, device, dtype) if build_vae else None
    if layout.probe_prediction and spec.prediction_source == "default" and spec.in_channels == 4:
        spec = replace(spec, prediction=probe_prediction(_unet_forward(unet), unet.config.cross_attention_dim),
                       prediction_source="probe")
    return LoadedModel(spec=spec, unet=unet, vae=vae, text_encoders=text_encoders, tokenizers=tokenizers,
                       alphas_cumprod=alphas_cumprod, name=path.stem, path=path, device=device, dtype=dtype)


def _take(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove and return the tensors under ``prefix`` (prefix stripped), so each is held only once."""
    return {k[len(prefix):]: sd.pop(k) for k in [k for k in sd if k.startswith(prefix)]}


def _build_text_encoder(header: CheckpointHeader, sd: dict, te: TextEncoderLayout, pad_id: int,
                        device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = configs.text_encoder_config(header, te, pad_token_id=pad_id)
    cls = CLIPTextModelWithProjection if te.with_projection else CLIPTextModel
    with torch.device("meta"):
        module = cls(config)
    flat = not any(k.startswith("text_model.") for k in module.state_dict())
    weights = convert.text_encoder_to_transformers(_take(sd, te.prefix), te, config.num_hidden_layers, flat=flat)
    return _assign(module, weights, f"text encoder ({te.prefix}*)", device, dtype)


def _build_unet(header: CheckpointHeader, sd: dict, family: Family, pooled_dim: int | None,
                device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    config = configs.unet_config(header, family, pooled_dim=pooled_dim, time_ids=layout_of(family).time_ids)
    with torch.device("meta"):
        module = UNet2DConditionModel(**config)
    weights = convert.unet_to_diffusers(_take(sd, UNET_PREFIX), configs.unet_layout(header))
    return _assign(module, weights, f"UNet ({UNET_PREFIX}*)", device, dtype)


def _build_vae_original(header: CheckpointHeader, sd: dict, prefix: str, spec: ModelSpec,
                        device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    config = configs.vae_config(header, prefix, scaling_factor=spec.scaling_factor, family=spec.family,
                                shift_factor=spec.shift_factor or None)
    parts = _take(sd, prefix)
    parts = {k: v for k, v in parts.items() if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))}
    weights = convert.vae_to_diffusers(parts, len(config["block_out_channels"]), config["layers_per_block"])
    return _vae_module(config, weights, f"VAE ({prefix or 'top level'})", spec, device, dtype)


def _vae_module(config: dict, weights: dict, what: str, spec: ModelSpec, device: torch.device,
                dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    if config["latent_channels"] != spec.latent_channels:
        raise ModelError(f"{what}: has {config['latent_channels']} latent channels but the "
                         f"{spec.family.value} model uses {spec.latent_channels}")
    with torch.device("meta"):
        module = AutoencoderKL(**config)
    return _assign(module, weights, what, device, dtype)


def load_vae(path: str | os.PathLike, spec: ModelSpec, *, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A standalone VAE for ``spec``'s model: a file in original names (as ``vae-ft-mse-840000``) or diffusers
    names, or a diffusers VAE folder."""
    path = Path(path)
    with _naming(path):
        if path.is_dir():  # a diffusers VAE folder (config.json + weights)
            from diffusers import AutoencoderKL

            vae = _from_pretrained(AutoencoderKL, path, dtype)
            if vae.config.latent_channels != spec.latent_channels:
                raise ModelError(f"VAE has {vae.config.latent_channels} latent channels but the "
                                 f"{spec.family.value} model uses {spec.latent_channels}")
            return vae.to(device).eval().requires_grad_(False)
        return _build_vae_file(path, spec, torch.device(device), dtype)


def load_own_vae(path: str | os.PathLike, spec: ModelSpec, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> torch.nn.Module | None:
    """The VAE a Stable Diffusion checkpoint carries, built as :func:`load_model` builds it, without
    reading the checkpoint's other weights (to return to it after a separate VAE file).

    A safetensors file gives only its ``first_stage_model.*`` tensors; a torch file is read through
    ``torch.load`` memory-mapped where it is a zip file, so only the VAE's bytes are touched there
    too; a diffusers folder gives its ``vae/``. None for a FLUX file (its VAE, when it carries one,
    is read with the transformer's fp8/GGUF handling: load the model again instead).
    """
    path = Path(path)
    device = torch.device(device)
    if path.is_dir():
        from diffusers import AutoencoderKL

        with _naming(path):
            return _from_pretrained(AutoencoderKL, path / "vae", dtype).to(device).eval().requires_grad_(False)
    if spec.family == Family.FLUX:
        return None
    with _naming(path):
        if sniff_format(path) == "safetensors":
            header = read_header(path)
            sd = _read_tensors(path, header.with_prefix(VAE_PREFIX))
        else:
            sd = load_state_dict(path)
            header = header_from_state_dict(sd)
            sd = {k: sd[k] for k in header.with_prefix(VAE_PREFIX)}
        if not sd:
            raise ModelError(f"{path}: the checkpoint has no VAE ({VAE_PREFIX}*); pass a VAE file with vae=")
        return _build_vae_original(header, sd, VAE_PREFIX, spec, device, dtype)


def _read_tensors(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Only the tensors ``names`` of a safetensors file (the rest of the file is never read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in names}
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError
        raise ModelError(f"{path}: cannot read the safetensors data ({exc})") from None


def _build_vae_file(path: Path, spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    header, sd = _read(path)
    names = header.tensors
    what = "VAE file"
    if any(k.startswith(VAE_PREFIX + "encoder.") for k in names):
        return _build_vae_original(header, sd, VAE_PREFIX, spec, device, dtype)
    if "encoder.down.0.block.0.conv1.weight" in names:
        return _build_vae_original(header, sd, "", spec, device, dtype)
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in names:
        config = configs.vae_config_diffusers_names(header, scaling_factor=spec.scaling_factor, family=spec.family,
                                                    shift_factor=spec.shift_factor or None)
        parts = {k: v for k, v in sd.items() if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))}
        return _vae_module(config, convert.vae_diffusers_names(parts), what, spec, device, dtype)
    raise ModelError(f"not a VAE: {describe_tensors(names)}; expected encoder.*/decoder.* tensors")


def _assign(module: torch.nn.Module, weights: dict[str, torch.Tensor], what: str, device: torch.device,
            dtype: torch.dtype) -> torch.nn.Module:
    """Give a meta-device module the checkpoint tensors as its parameters, after checking names and shapes."""
    expected = module.state_dict()
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise ModelError(f"{what}: the weights do not fit the derived model: " + "; ".join(parts))
    for name, target in expected.items():
        if tuple(weights[name].shape) != tuple(target.shape):
            raise ModelError(f"{what}: tensor {name} has shape {tuple(weights[name].shape)}, "
                             f"expected {tuple(target.shape)}")
    placed = {}
    for k in list(weights):  # one tensor at a time: the source copy is freed as soon as it is converted
        v = weights.pop(k)
        placed[k] = v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
    module.load_state_dict(placed, strict=True, assign=True)
    _materialise_buffers(module, device)
    return module.eval().requires_grad_(False)


def _materialise_buffers(module: torch.nn.Module, device: torch.device) -> None:
    """Non-persistent buffers are not in checkpoints and stay on meta: rebuild the known ones."""
    for mod_name, mod in module.named_modules():
        for name, buf in list(mod.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if name == "position_ids":  # transformers' CLIP embeddings: 0..n-1
                mod.register_buffer(name, torch.arange(buf.shape[-1], device=device).expand(buf.shape).clone(),
                                    persistent=False)
            else:
                raise ModelError(f"cannot initialise buffer {mod_name}.{name} of {type(module).__name__}")


def _unet_forward(unet: torch.nn.Module) -> Callable:
    def forward(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        p = next(unet.parameters())
        out = unet(x.to(p.device, p.dtype), t.to(p.device), encoder_hidden_states=context.to(p.device, p.dtype))
        return out.sample.float().cpu()

    return forward


def scaled_linear_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = 1000,
                                 schedule: str = "scaled_linear") -> torch.Tensor:
    """ᾱ of the LDM training schedule (betas linear in sqrt space), rounded to float32 as the original buffers are."""
    if schedule == "scaled_linear":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    elif schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
    else:
        raise ModelError(f"unsupported beta schedule {schedule!r}; expected scaled_linear or linear")
    return torch.cumprod(1.0 - betas, dim=0).float().double()


def _alphas_cumprod(sd: dict[str, torch.Tensor]) -> torch.Tensor:
    """The file's own ``alphas_cumprod`` (SD1/SD2 files carry it), else the shared SD schedule."""
    stored = sd.get("alphas_cumprod")
    if stored is not None and stored.ndim == 1 and stored.numel() > 1:
        return stored.detach().to("cpu", torch.float32).double()
    return scaled_linear_alphas_cumprod()


# --- diffusers folders -------------------------------------------------------------------------


def _load_folder(folder: Path, device: torch.device, dtype: torch.dtype, prediction: str | None) -> LoadedModel:
    """A diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder[_2]/, tokenizer[_2]/)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if not (folder / "model_index.json").exists():
        raise ModelError(f"{folder}: a folder but not a diffusers model (no model_index.json)")
    spec = detect_diffusers_folder(folder, prediction=prediction)
    layout = layout_of(spec.family)
    unet = _from_pretrained(UNet2DConditionModel, folder / "unet", dtype)
    vae = _from_pretrained(AutoencoderKL, folder / "vae", dtype)
    # The refiner's only encoder, bigG, is SDXL's second one and keeps its folder name.
    names = ("text_encoder_2",) if spec.family == Family.SDXL_REFINER else ("text_encoder", "text_encoder_2")
    encoders, tokenizers = [], []
    for te, sub in zip(layout.text_encoders, names):
        tok_sub = sub.replace("text_encoder", "tokenizer")
        cls = CLIPTextModelWithProjection if te.with_projection else CLIPTextModel
        encoders.append(_from_pretrained(cls, folder / sub, dtype))
        tok_dir = folder / tok_sub
        has_files = (tok_dir / "vocab.json").exists() and (tok_dir / "merges.txt").exists()
        tokenizers.append(clip_tokenizer(te.pad_token, folder=tok_dir if has_files else None))
    modules = [m.to(device).eval().requires_grad_(False) for m in (unet, vae, *encoders)]
    return LoadedModel(spec=spec, unet=modules[0], vae=modules[1], text_encoders=tuple(modules[2:]),
                       tokenizers=tuple(tokenizers), alphas_cumprod=_folder_alphas_cumprod(folder),
                       name=folder.name, path=folder, device=device, dtype=dtype)


def _from_pretrained(cls, sub: Path, dtype: torch.dtype):
    """``from_pretrained`` on a local subfolder only; an fp16-only variant is picked up too."""
    if not sub.is_dir():
        raise ModelError(f"{sub.parent}: diffusers folder lacks {sub.name}/")
    kwargs: dict = {"local_files_only": True}
    if not any(p.name.endswith((".safetensors", ".bin")) and ".fp16." not in p.name for p in sub.iterdir()):
        kwargs["variant"] = "fp16"
    kwargs["dtype" if cls.__module__.startswith("transformers") else "torch_dtype"] = dtype
    try:
        return cls.from_pretrained(str(sub), **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{sub}: cannot load {cls.__name__} ({str(exc).splitlines()[0] if str(exc) else exc!r})") from None


def _folder_alphas_cumprod(folder: Path) -> torch.Tensor:
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.exists():
        return scaled_linear_alphas_cumprod()
    cfg = json.loads(path.read_text(encoding="utf-8"))
    return scaled_linear_alphas_cumprod(cfg.get("beta_start", 0.00085), cfg.get("beta_end", 0.012),
                                        cfg.get("num_train_timesteps", 1000), cfg.get("beta_schedule", "scaled_linear"))
