"""Tiny checkpoints in the real single-file layouts (CompVis LDM for SD1/SD2, SGM for SDXL).

Every tensor name and every shape rule follows the original model code (``openaimodel.UNetModel``,
the LDM ``Encoder``/``Decoder``, OpenAI CLIP in transformers' names, OpenCLIP's text tower);
only the widths are small. Nothing here uses underpaint's own model code, so the loader and the
diffusers reference (``from_single_file`` with the hand-written configs from
:func:`tiny_diffusers_config_dir`) are both checked against an independent statement of the
layout. Weights are seeded random numbers, small enough (std 0.02) that outputs stay finite.

Sizes in float32: SD1 ~9 MB, SD2 ~10 MB, SDXL ~16 MB, standalone VAE ~1.5 MB; each writes in a
fraction of a second. A third to a half of each is token embeddings, which keep all 49,408 rows so
that real prompts tokenize; ``dtype=torch.float16`` halves the SD1 file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

VOCAB = 49408
POSITIONS = 77


@dataclass(frozen=True)
class TinyUNet:
    channels: tuple[int, ...]
    layers: int
    #: Transformer depth per level (0 = no attention at that level).
    depth: tuple[int, ...]
    mid_depth: int
    context_dim: int
    linear_proj: bool
    #: SD1 uses 8 heads everywhere; SD2/SDXL 64-wide heads (at least one).
    heads: int | tuple[int, ...]
    in_channels: int = 4
    adm_in: int | None = None


@dataclass(frozen=True)
class TinyText:
    hidden: int
    layers: int
    projection: int | None = None


@dataclass(frozen=True)
class TinyVAE:
    #: Four levels like the real VAE (128, 256, 512, 512): images are 8x the latent size.
    channels: tuple[int, ...] = (32, 32, 32, 32)
    layers: int = 1
    z: int = 4


SD1_UNET = TinyUNet(channels=(32, 64), layers=2, depth=(1, 0), mid_depth=1, context_dim=16, linear_proj=False, heads=8)
SD1_TEXT = TinyText(hidden=16, layers=2)
SD2_UNET = TinyUNet(channels=(64, 64), layers=1, depth=(1, 0), mid_depth=1, context_dim=16, linear_proj=True,
                    heads=(1, 1))
SD2_TEXT = TinyText(hidden=16, layers=3, projection=16)  # the loader builds 2: SD2 uses the penultimate layer
SDXL_TIME_IDS = 8
SDXL_TEXT_L = TinyText(hidden=16, layers=2)
# Widths differ as in the real files (768 vs 1280): diffusers tells the two encoders apart by width.
# projection != hidden catches a missing transpose of OpenCLIP's text_projection.
SDXL_TEXT_G = TinyText(hidden=32, layers=2, projection=16)
SDXL_UNET = TinyUNet(channels=(32, 64), layers=1, depth=(0, 2), mid_depth=2, context_dim=16 + 32,
                     linear_proj=True, heads=(1, 1), adm_in=16 + 6 * SDXL_TIME_IDS)
# The refiner: bigG alone (as conditioner.embedders.0), attention on the middle levels only, as in
# the real file (0, 4, 4, 0), and five size ids (original size, crop, aesthetic score).
SDXL_REFINER_TEXT = TinyText(hidden=32, layers=2, projection=16)
SDXL_REFINER_UNET = TinyUNet(channels=(32, 64, 64), layers=1, depth=(0, 2, 0), mid_depth=2, context_dim=32,
                             linear_proj=True, heads=(1, 1, 1), adm_in=16 + 5 * SDXL_TIME_IDS)
VAE = TinyVAE()


# --- shapes of the original modules --------------------------------------------------------------


def _norm(out: dict, name: str, ch: int) -> None:
    out[f"{name}.weight"] = ("norm", (ch,))
    out[f"{name}.bias"] = ("bias", (ch,))


def _linear(out: dict, name: str, n_out: int, n_in: int, bias: bool = True) -> None:
    out[f"{name}.weight"] = ("w", (n_out, n_in))
    if bias:
        out[f"{name}.bias"] = ("bias", (n_out,))


def _conv(out: dict, name: str, n_out: int, n_in: int, k: int = 3) -> None:
    out[f"{name}.weight"] = ("w", (n_out, n_in, k, k))
    out[f"{name}.bias"] = ("bias", (n_out,))


def _resblock(out: dict, p: str, ch_in: int, ch_out: int, emb: int) -> None:
    """openaimodel.ResBlock: in_layers (norm, SiLU, conv), emb_layers (SiLU, linear), out_layers (norm, SiLU, dropout, conv)."""
    _norm(out, f"{p}.in_layers.0", ch_in)
    _conv(out, f"{p}.in_layers.2", ch_out, ch_in)
    _linear(out, f"{p}.emb_layers.1", ch_out, emb)
    _norm(out, f"{p}.out_layers.0", ch_out)
    _conv(out, f"{p}.out_layers.3", ch_out, ch_out)
    if ch_in != ch_out:
        _conv(out, f"{p}.skip_connection", ch_out, ch_in, k=1)


def _transformer(out: dict, p: str, ch: int, depth: int, ctx: int, linear: bool) -> None:
    """attention.SpatialTransformer with BasicTransformerBlocks (self-attn, cross-attn, GEGLU feed-forward)."""
    _norm(out, f"{p}.norm", ch)
    for io in ("proj_in", "proj_out"):
        if linear:
            _linear(out, f"{p}.{io}", ch, ch)
        else:
            _conv(out, f"{p}.{io}", ch, ch, k=1)
    for d in range(depth):
        b = f"{p}.transformer_blocks.{d}"
        for attn, kv in (("attn1", ch), ("attn2", ctx)):
            _linear(out, f"{b}.{attn}.to_q", ch, ch, bias=False)
            _linear(out, f"{b}.{attn}.to_k", ch, kv, bias=False)
            _linear(out, f"{b}.{attn}.to_v", ch, kv, bias=False)
            _linear(out, f"{b}.{attn}.to_out.0", ch, ch)
        _linear(out, f"{b}.ff.net.0.proj", ch * 8, ch)
        _linear(out, f"{b}.ff.net.2", ch, ch * 4)
        for i in (1, 2, 3):
            _norm(out, f"{b}.norm{i}", ch)


def unet_shapes(u: TinyUNet, prefix: str = "model.diffusion_model.") -> dict:
    out: dict = {}
    c0 = u.channels[0]
    emb = 4 * c0
    _linear(out, "time_embed.0", emb, c0)
    _linear(out, "time_embed.2", emb, emb)
    if u.adm_in:
        _linear(out, "label_emb.0.0", emb, u.adm_in)
        _linear(out, "label_emb.0.2", emb, emb)
    _conv(out, "input_blocks.0.0", c0, u.in_channels)
    skips, prev, i = [c0], c0, 1
    for level, ch in enumerate(u.channels):
        for _ in range(u.layers):
            _resblock(out, f"input_blocks.{i}.0", prev, ch, emb)
            if u.depth[level]:
                _transformer(out, f"input_blocks.{i}.1", ch, u.depth[level], u.context_dim, u.linear_proj)
            prev = ch
            skips.append(ch)
            i += 1
        if level < len(u.channels) - 1:
            _conv(out, f"input_blocks.{i}.0.op", ch, ch)
            skips.append(ch)
            i += 1
    _resblock(out, "middle_block.0", prev, prev, emb)
    _transformer(out, "middle_block.1", prev, u.mid_depth, u.context_dim, u.linear_proj)
    _resblock(out, "middle_block.2", prev, prev, emb)
    i = 0
    for level in reversed(range(len(u.channels))):
        ch = u.channels[level]
        for layer in range(u.layers + 1):
            _resblock(out, f"output_blocks.{i}.0", prev + skips.pop(), ch, emb)
            prev = ch
            sub = 1
            if u.depth[level]:
                _transformer(out, f"output_blocks.{i}.1", ch, u.depth[level], u.context_dim, u.linear_proj)
                sub = 2
            if level and layer == u.layers:
                _conv(out, f"output_blocks.{i}.{sub}.conv", ch, ch)
            i += 1
    _norm(out, "out.0", c0)
    _conv(out, "out.2", 4, c0)
    return {prefix + k: v for k, v in out.items()}


def _vae_resnet(out: dict, p: str, ch_in: int, ch_out: int) -> None:
    _norm(out, f"{p}.norm1", ch_in)
    _conv(out, f"{p}.conv1", ch_out, ch_in)
    _norm(out, f"{p}.norm2", ch_out)
    _conv(out, f"{p}.conv2", ch_out, ch_out)
    if ch_in != ch_out:
        _conv(out, f"{p}.nin_shortcut", ch_out, ch_in, k=1)


def _vae_mid(out: dict, p: str, ch: int) -> None:
    _vae_resnet(out, f"{p}.block_1", ch, ch)
    _norm(out, f"{p}.attn_1.norm", ch)
    for name in ("q", "k", "v", "proj_out"):
        _conv(out, f"{p}.attn_1.{name}", ch, ch, k=1)  # 1x1 convs in the original code
    _vae_resnet(out, f"{p}.block_2", ch, ch)


def vae_shapes(v: TinyVAE, prefix: str = "first_stage_model.") -> dict:
    """ldm.modules.diffusionmodules.model Encoder/Decoder plus the (post_)quant_conv of AutoencoderKL."""
    out: dict = {}
    chs, n = v.channels, v.layers
    _conv(out, "encoder.conv_in", chs[0], 3)
    prev = chs[0]
    for b, ch in enumerate(chs):
        for layer in range(n):
            _vae_resnet(out, f"encoder.down.{b}.block.{layer}", prev, ch)
            prev = ch
        if b < len(chs) - 1:
            _conv(out, f"encoder.down.{b}.downsample.conv", ch, ch)
    _vae_mid(out, "encoder.mid", prev)
    _norm(out, "encoder.norm_out", prev)
    _conv(out, "encoder.conv_out", 2 * v.z, prev)
    _conv(out, "quant_conv", 2 * v.z, 2 * v.z, k=1)
    _conv(out, "post_quant_conv", v.z, v.z, k=1)
    _conv(out, "decoder.conv_in", chs[-1], v.z)
    _vae_mid(out, "decoder.mid", chs[-1])
    prev = chs[-1]
    for b in reversed(range(len(chs))):
        for layer in range(n + 1):
            _vae_resnet(out, f"decoder.up.{b}.block.{layer}", prev, chs[b])
            prev = chs[b]
        if b:
            _conv(out, f"decoder.up.{b}.upsample.conv", chs[b], chs[b])
    _norm(out, "decoder.norm_out", chs[0])
    _conv(out, "decoder.conv_out", 3, chs[0])
    return {prefix + k: v for k, v in out.items()}


def clip_hf_shapes(t: TinyText, prefix: str) -> dict:
    """OpenAI CLIP text model in transformers' names, as SD1 and SDXL checkpoints store it."""
    out: dict = {}
    p = "text_model."
    out[p + "embeddings.token_embedding.weight"] = ("w", (VOCAB, t.hidden))
    out[p + "embeddings.position_embedding.weight"] = ("w", (POSITIONS, t.hidden))
    out[p + "embeddings.position_ids"] = ("position_ids", (1, POSITIONS))
    for i in range(t.layers):
        b = f"{p}encoder.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(out, f"{b}.self_attn.{name}", t.hidden, t.hidden)
        _norm(out, f"{b}.layer_norm1", t.hidden)
        _linear(out, f"{b}.mlp.fc1", 4 * t.hidden, t.hidden)
        _linear(out, f"{b}.mlp.fc2", t.hidden, 4 * t.hidden)
        _norm(out, f"{b}.layer_norm2", t.hidden)
    _norm(out, p + "final_layer_norm", t.hidden)
    return {prefix + k: v for k, v in out.items()}


def openclip_shapes(t: TinyText, prefix: str) -> dict:
    """OpenCLIP's text tower (SD2's ViT-H, SDXL's bigG) in OpenCLIP's own names."""
    out: dict = {
        "token_embedding.weight": ("w", (VOCAB, t.hidden)),
        "positional_embedding": ("w", (POSITIONS, t.hidden)),
        "text_projection": ("w", (t.hidden, t.projection or t.hidden)),
        "logit_scale": ("scalar", ()),
    }
    for i in range(t.layers):
        b = f"transformer.resblocks.{i}"
        _norm(out, f"{b}.ln_1", t.hidden)
        out[f"{b}.attn.in_proj_weight"] = ("w", (3 * t.hidden, t.hidden))
        out[f"{b}.attn.in_proj_bias"] = ("bias", (3 * t.hidden,))
        _linear(out, f"{b}.attn.out_proj", t.hidden, t.hidden)
        _norm(out, f"{b}.ln_2", t.hidden)
        _linear(out, f"{b}.mlp.c_fc", 4 * t.hidden, t.hidden)
        _linear(out, f"{b}.mlp.c_proj", t.hidden, 4 * t.hidden)
    _norm(out, "ln_final", t.hidden)
    return {prefix + k: v for k, v in out.items()}


def schedule_buffers() -> dict[str, torch.Tensor]:
    """The DDPM buffers LDM stores in SD1/SD2 files (scaled-linear betas 0.00085 → 0.012, 1000 steps), float32."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    return {"betas": betas.float(), "alphas_cumprod": ac.float(), "alphas_cumprod_prev": prev.float(),
            "sqrt_alphas_cumprod": ac.sqrt().float(), "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt().float()}


def materialise(shapes: dict, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Seeded random tensors for a name → (kind, shape) table, in sorted name order (reproducible)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        kind, shape = shapes[name]
        if kind == "position_ids":
            out[name] = torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
            continue
        if kind == "scalar":
            t = torch.tensor(4.6052)
        elif kind == "norm":
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif kind == "bias":
            t = 0.02 * torch.randn(shape, generator=g)
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod().item())) if len(shape) > 1 else 1
            t = torch.randn(shape, generator=g) * min(0.02 * 8, fan_in ** -0.5)
        out[name] = t.to(dtype)
    return out


def _save(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".ckpt", ".pt", ".bin"):
        torch.save({"state_dict": tensors, "global_step": 1}, path)
    else:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


# --- the checkpoint writers ----------------------------------------------------------------------


def sd1_shapes(*, inpaint: bool = False, edit: bool = False) -> dict:
    """SD1's tensors; ``inpaint``: a 9-channel inpainting UNet, ``edit``: an 8-channel InstructPix2Pix one."""
    channels = 9 if inpaint else 8 if edit else 4
    unet = TinyUNet(**{**SD1_UNET.__dict__, "in_channels": channels}) if channels != 4 else SD1_UNET
    return {**unet_shapes(unet), **vae_shapes(VAE), **clip_hf_shapes(SD1_TEXT, "cond_stage_model.transformer.")}


def write_sd1(path, *, inpaint: bool = False, edit: bool = False, dtype: torch.dtype = torch.float32,
              seed: int = 1) -> Path:
    """SD1.x (v1-5 layout): CLIP-L in transformers' names, conv proj_in, DDPM buffers; .ckpt paths get torch.save."""
    tensors = materialise(sd1_shapes(inpaint=inpaint, edit=edit), seed, dtype)
    tensors.update(schedule_buffers())
    return _save(path, tensors)


def sd2_shapes(*, inpaint: bool = False) -> dict:
    unet = SD2_UNET if not inpaint else TinyUNet(**{**SD2_UNET.__dict__, "in_channels": 9})
    return {**unet_shapes(unet), **vae_shapes(VAE), **openclip_shapes(SD2_TEXT, "cond_stage_model.model.")}


def write_sd2(path, *, prediction: str | None = "v", inpaint: bool = False, seed: int = 2) -> Path:
    """SD2.x (v2-1 layout): OpenCLIP-H names, linear proj_in; ``prediction`` goes into modelspec metadata.

    Real SD2 files carry no metadata: the loader's forward-pass probe decides for them. Random
    tiny weights would make that probe meaningless, so the fixture states it (``None`` omits it).
    """
    tensors = materialise(sd2_shapes(inpaint=inpaint), seed)
    tensors.update(schedule_buffers())
    meta = {"modelspec.prediction_type": {"v": "v", "eps": "epsilon"}[prediction]} if prediction else None
    return _save(path, tensors, meta)


def sdxl_shapes() -> dict:
    return {**unet_shapes(SDXL_UNET), **vae_shapes(VAE),
            **clip_hf_shapes(SDXL_TEXT_L, "conditioner.embedders.0.transformer."),
            **openclip_shapes(SDXL_TEXT_G, "conditioner.embedders.1.model.")}


def write_sdxl(path, *, seed: int = 3, metadata: dict[str, str] | None = None) -> Path:
    """SDXL base 1.0 layout: CLIP-L + OpenCLIP bigG under conditioner.embedders, label_emb size/crop embedding."""
    return _save(path, materialise(sdxl_shapes(), seed), metadata)


def sdxl_refiner_shapes() -> dict:
    return {**unet_shapes(SDXL_REFINER_UNET), **vae_shapes(VAE),
            **openclip_shapes(SDXL_REFINER_TEXT, "conditioner.embedders.0.model.")}


def write_sdxl_refiner(path, *, seed: int = 6) -> Path:
    """SDXL refiner 1.0 layout: OpenCLIP bigG alone as conditioner.embedders.0, label_emb taking 5 size ids."""
    return _save(path, materialise(sdxl_refiner_shapes(), seed))


def write_vae(path, *, seed: int = 4, prefix: str = "", vae: TinyVAE = VAE) -> Path:
    """A standalone VAE as distributed (``vae-ft-mse-840000-ema-pruned``: original names, no prefix)."""
    return _save(path, materialise(vae_shapes(vae, prefix=prefix), seed))


# --- diffusers configs for the same tiny models (hand-written, for the reference loaders) ----------


def _unet_config(u: TinyUNet) -> dict:
    cfg = {
        "_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": u.in_channels, "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in u.depth],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(u.depth)],
        "block_out_channels": list(u.channels), "layers_per_block": u.layers,
        "cross_attention_dim": u.context_dim, "attention_head_dim": u.heads if isinstance(u.heads, int) else list(u.heads),
        "use_linear_projection": u.linear_proj, "norm_num_groups": 32,
        "transformer_layers_per_block": [d or 1 for d in u.depth[:-1]] + [u.mid_depth],
    }
    if u.adm_in:
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_IDS,
                   projection_class_embeddings_input_dim=u.adm_in)
    return cfg


def vae_config(scaling: float, v: TinyVAE = VAE) -> dict:
    return {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": v.z,
            "block_out_channels": list(v.channels), "layers_per_block": v.layers,
            "down_block_types": ["DownEncoderBlock2D"] * len(v.channels),
            "up_block_types": ["UpDecoderBlock2D"] * len(v.channels), "norm_num_groups": 32,
            "sample_size": 64, "scaling_factor": scaling}


def _text_config(t: TinyText, act: str, layers: int, projection: bool) -> dict:
    return {"architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
            "model_type": "clip_text_model", "vocab_size": VOCAB, "hidden_size": t.hidden,
            "intermediate_size": 4 * t.hidden, "num_hidden_layers": layers, "num_attention_heads": 1,
            "max_position_embeddings": POSITIONS, "hidden_act": act, "layer_norm_eps": 1e-5,
            "projection_dim": t.projection or t.hidden, "bos_token_id": 49406, "eos_token_id": 49407}


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def _write_tokenizer(folder: Path, pad: str) -> None:
    from underpaint.models.tokenizer import clip_tokenizer

    clip_tokenizer(pad).save_pretrained(str(folder))


def tiny_diffusers_config_dir(folder, family: str, *, inpaint: bool = False, prediction: str = "eps") -> Path:
    """A diffusers pipeline folder with configs and tokenizers but no weights, describing the tiny files."""
    folder = Path(folder)
    sched = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
             "prediction_type": "v_prediction" if prediction == "v" else "epsilon", "timestep_spacing": "leading",
             "steps_offset": 1}
    index = {"_diffusers_version": "0.42.1", "scheduler": ["diffusers", "EulerDiscreteScheduler"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}
    if family == "sd1":
        unet = SD1_UNET if not inpaint else TinyUNet(**{**SD1_UNET.__dict__, "in_channels": 9})
        index.update(_class_name="StableDiffusionPipeline", safety_checker=[None, None],
                     feature_extractor=[None, None], image_encoder=[None, None], requires_safety_checker=False)
        texts = [("text_encoder", _text_config(SD1_TEXT, "quick_gelu", SD1_TEXT.layers, False), "<|endoftext|>")]
        scaling = 0.18215
    elif family == "sd2":
        unet = SD2_UNET
        index.update(_class_name="StableDiffusionPipeline", safety_checker=[None, None],
                     feature_extractor=[None, None], image_encoder=[None, None], requires_safety_checker=False)
        texts = [("text_encoder", _text_config(SD2_TEXT, "gelu", SD2_TEXT.layers - 1, False), "!")]
        scaling = 0.18215
    elif family == "sdxl":
        unet = SDXL_UNET
        index.update(_class_name="StableDiffusionXLPipeline", text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"], image_encoder=[None, None],
                     feature_extractor=[None, None], force_zeros_for_empty_prompt=True)
        texts = [("text_encoder", _text_config(SDXL_TEXT_L, "quick_gelu", SDXL_TEXT_L.layers, False), "<|endoftext|>"),
                 ("text_encoder_2", _text_config(SDXL_TEXT_G, "gelu", SDXL_TEXT_G.layers, True), "!")]
        scaling = 0.13025
    elif family == "sdxl_refiner":
        unet = SDXL_REFINER_UNET
        index.update(_class_name="StableDiffusionXLImg2ImgPipeline", text_encoder=[None, None], tokenizer=[None, None],
                     text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"], image_encoder=[None, None],
                     feature_extractor=[None, None], requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
        texts = [("text_encoder_2", _text_config(SDXL_REFINER_TEXT, "gelu", SDXL_REFINER_TEXT.layers, True), "!")]
        scaling = 0.13025
    else:
        raise ValueError(family)
    _write_json(folder / "model_index.json", index)
    _write_json(folder / "scheduler" / "scheduler_config.json", sched)
    _write_json(folder / "unet" / "config.json", _unet_config(unet))
    _write_json(folder / "vae" / "config.json", vae_config(scaling))
    for sub, cfg, pad in texts:
        _write_json(folder / sub / "config.json", cfg)
        _write_tokenizer(folder / sub.replace("text_encoder", "tokenizer"), pad)
    return folder


def write_diffusers_folder(folder, family: str, *, seed: int = 5, prediction: str = "eps") -> Path:
    """A complete diffusers folder (configs, tokenizers, seeded random weights in safetensors)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = tiny_diffusers_config_dir(folder, family, prediction=prediction)
    torch.manual_seed(seed)
    UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder / "unet"))).save_pretrained(
        str(folder / "unet"))
    AutoencoderKL.from_config(AutoencoderKL.load_config(str(folder / "vae"))).save_pretrained(str(folder / "vae"))
    for sub in ("text_encoder", "text_encoder_2"):
        if (folder / sub).is_dir():
            cfg = CLIPTextConfig.from_pretrained(str(folder / sub))
            cls = CLIPTextModelWithProjection if sub.endswith("_2") else CLIPTextModel
            cls(cfg).save_pretrained(str(folder / sub))
    return folder


def write_hypernetwork(path, widths=(SD1_TEXT.hidden, *SD1_UNET.channels), *, seed: int = 8,
                       scale: float = 0.2) -> Path:
    """A hypernetwork as A1111 saves it (layer structure [1, 2, 1], ReLU; random weights) for the given
    attention widths; by default every width of the tiny SD1 model (its text embedding's and its levels')."""
    gen = torch.Generator().manual_seed(seed)

    def branch(w: int) -> dict:
        return {"linear.0.weight": torch.randn(2 * w, w, generator=gen) * scale, "linear.0.bias": torch.zeros(2 * w),
                "linear.2.weight": torch.randn(w, 2 * w, generator=gen) * scale, "linear.2.bias": torch.zeros(w)}

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**{w: [branch(w), branch(w)] for w in widths}, "activation_func": "relu", "layer_structure": [1, 2, 1],
                "name": path.stem}, path)
    return path


def write_clip(path: Path, *, projection_dim: int, patch_size: int, vision_layers: int, seed: int):
    """A tiny transformers CLIP (OpenAI's vocabulary and 77 positions, 32-pixel pictures) saved as one
    safetensors file in transformers' layout; returns the model."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=1, max_position_embeddings=77),
                        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=vision_layers,
                                           num_attention_heads=1, image_size=32, patch_size=patch_size),
                        projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model
