"""Module configs derived from tensor shapes, so no config file or network is ever needed.

The original UNet (``openaimodel.UNetModel``) lays out ``input_blocks`` as: the input conv,
then per resolution level ``layers_per_block`` blocks (a ResBlock, plus a SpatialTransformer
where the level has attention), then a downsampler except at the last level; ``output_blocks``
mirror that with one block more per level. Counting those blocks and reading a few weight
shapes gives every number diffusers' ``UNet2DConditionModel`` needs. The VAE and the text
encoders are read the same way. Only head counts are conventions rather than shapes: SD1 uses 8
heads everywhere; SD2 and SDXL use 64-wide heads (``channels // 64``); CLIP text encoders use
64-wide heads too (at least one head, so the tiny test models work).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import ModelError
from .detect import UNET_PREFIX, Family, TextEncoderLayout
from .header import CheckpointHeader

#: Default sample sizes (latent pixels) of diffusers' configs for each family.
_SAMPLE_SIZE = {Family.SD1: 64, Family.SD2: 96, Family.SDXL: 128, Family.SDXL_REFINER: 128}
_VAE_SAMPLE_SIZE = {Family.SD1: 512, Family.SD2: 768, Family.SDXL: 1024, Family.FLUX: 1024}
#: VAEs whose float16 overflows: diffusers upcasts them to float32 (``force_upcast``).
_UPCAST = (Family.SDXL, Family.FLUX)


@dataclass(frozen=True)
class UNetLayout:
    """The block structure counted from an original UNet's key names."""

    levels: int
    layers_per_block: int
    channels: tuple[int, ...]
    #: Transformer depth of each level's down blocks (0 = no attention at that level).
    down_depth: tuple[int, ...]
    #: Transformer depth of each level's up blocks, listed deepest level first (diffusers' up order).
    up_depth: tuple[int, ...]
    mid_depth: int


def _indices(names: Iterable[str], pattern: str) -> set[int]:
    rx = re.compile(pattern)
    return {int(m.group(1)) for n in names if (m := rx.match(n))}


def _depth(names: set[str], block: str) -> int:
    """How many transformer blocks sit in ``block`` (e.g. ``input_blocks.1.1``), 0 if none."""
    return len(_indices(names, re.escape(block) + r"\.transformer_blocks\.(\d+)\."))


def unet_layout(header: CheckpointHeader, prefix: str = UNET_PREFIX) -> UNetLayout:
    """Count levels, blocks per level and transformer depths from the original UNet's keys."""
    names = {k[len(prefix):] for k in header.tensors if k.startswith(prefix)}
    n_in = len(_indices(names, r"input_blocks\.(\d+)\."))
    downsamplers = sorted(_indices(names, r"input_blocks\.(\d+)\.0\.op\."))
    levels = len(downsamplers) + 1
    per_level = (n_in - 1 - len(downsamplers)) / levels
    n_out = len(_indices(names, r"output_blocks\.(\d+)\."))
    if n_in < 2 or per_level != int(per_level) or n_out != levels * (int(per_level) + 1):
        raise ModelError(f"UNet block layout not understood: {n_in} input blocks, {len(downsamplers)} downsamplers, "
                         f"{n_out} output blocks")
    n = int(per_level)
    first = [1 + b * (n + 1) for b in range(levels)]
    channels = tuple(header.shape(f"{prefix}input_blocks.{i}.0.out_layers.3.weight")[0] for i in first)
    down_depth = tuple(_depth(names, f"input_blocks.{i}.1") for i in first)
    up_depth = tuple(_depth(names, f"output_blocks.{u * (n + 1)}.1") for u in range(levels))
    mid_depth = _depth(names, "middle_block.1")
    return UNetLayout(levels, n, channels, down_depth, up_depth, mid_depth)


def unet_config(header: CheckpointHeader, family: Family, *, pooled_dim: int | None = None,
                time_ids: int = 6) -> dict:
    """``UNet2DConditionModel`` keyword arguments for the UNet in ``header``; a ``label_emb`` takes the
    pooled text (``pooled_dim`` wide) and ``time_ids`` embedded numbers (SDXL 6, its refiner 5)."""
    p = UNET_PREFIX
    lay = unet_layout(header)
    attn_keys = [k for k in header.tensors if k.startswith(p) and k.endswith("attn2.to_k.weight")]
    proj_in = [k for k in header.tensors if k.startswith(p) and k.endswith(".proj_in.weight")]
    if not attn_keys or not proj_in:
        raise ModelError("the UNet has no transformer blocks (attn2/proj_in); not a Stable Diffusion UNet")
    heads = 8 if family == Family.SD1 else [max(1, c // 64) for c in lay.channels]
    # diffusers builds the mid block with the last level's depth; levels without attention ignore theirs.
    down_depth = [d if d else 1 for d in lay.down_depth]
    down_depth[-1] = lay.mid_depth or down_depth[-1]
    up_depth = [d if d else 1 for d in lay.up_depth]
    config = dict(
        sample_size=_SAMPLE_SIZE[family],
        in_channels=header.shape(p + "input_blocks.0.0.weight")[1],
        out_channels=header.shape(p + "out.2.weight")[0],
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in lay.down_depth],
        up_block_types=["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in lay.up_depth],
        mid_block_type="UNetMidBlock2DCrossAttn" if lay.mid_depth else None,
        block_out_channels=list(lay.channels),
        layers_per_block=lay.layers_per_block,
        cross_attention_dim=header.shape(attn_keys[0])[1],
        attention_head_dim=heads,
        use_linear_projection=len(header.shape(proj_in[0])) == 2,
        transformer_layers_per_block=down_depth if len(set(down_depth)) > 1 else down_depth[0],
        norm_num_groups=32,
        upcast_attention=family == Family.SD2,
    )
    if up_depth != down_depth[::-1]:
        config["reverse_transformer_layers_per_block"] = up_depth
    time_dim = header.shape(p + "time_embed.0.weight")[0]
    if time_dim != 4 * lay.channels[0]:
        config["time_embedding_dim"] = time_dim
    if p + "label_emb.0.0.weight" in header.tensors:
        if pooled_dim is None:
            raise ModelError("the UNet has a size/crop embedding (label_emb) but no pooled text width was given")
        adm_in = header.shape(p + "label_emb.0.0.weight")[1]
        time_ids_dim, rest = divmod(adm_in - pooled_dim, time_ids)
        if rest or time_ids_dim <= 0:
            raise ModelError(f"label_emb input width {adm_in} is not pooled text width {pooled_dim} "
                             f"+ {time_ids} embedded size ids")
        config.update(addition_embed_type="text_time", addition_time_embed_dim=time_ids_dim,
                      projection_class_embeddings_input_dim=adm_in)
    return config


def vae_config(header: CheckpointHeader, prefix: str, *, scaling_factor: float, family: Family = Family.SD1,
               shift_factor: float | None = None) -> dict:
    """``AutoencoderKL`` keyword arguments for an original-layout VAE under ``prefix``.

    FLUX's autoencoder has no ``quant_conv``/``post_quant_conv`` (its encoder's ``conv_out`` gives the
    moments directly) and a latent shift: those settings are added only when they apply, so SD
    configs are unchanged.
    """
    names = [k[len(prefix):] for k in header.tensors if k.startswith(prefix)]
    levels = sorted(_indices(names, r"encoder\.down\.(\d+)\."))
    if not levels:
        raise ModelError(f"no VAE encoder under {prefix or 'the top level'!r}")
    channels = [header.shape(f"{prefix}encoder.down.{b}.block.0.conv1.weight")[0] for b in levels]
    layers = len(_indices(names, r"encoder\.down\.0\.block\.(\d+)\."))
    config = dict(
        in_channels=header.shape(prefix + "encoder.conv_in.weight")[1],
        out_channels=header.shape(prefix + "decoder.conv_out.weight")[0],
        down_block_types=["DownEncoderBlock2D"] * len(channels),
        up_block_types=["UpDecoderBlock2D"] * len(channels),
        block_out_channels=channels,
        layers_per_block=layers,
        latent_channels=header.shape(prefix + "decoder.conv_in.weight")[1],
        norm_num_groups=32,
        sample_size=_VAE_SAMPLE_SIZE[family.latent_space],
        scaling_factor=scaling_factor,
        force_upcast=family.latent_space in _UPCAST,
    )
    return _vae_extras(config, header, prefix, shift_factor)


def _vae_extras(config: dict, header: CheckpointHeader, prefix: str, shift_factor: float | None) -> dict:
    """Settings only some VAEs need: no quant convs (FLUX), a latent shift."""
    if not header.has(prefix + "quant_conv.weight"):
        config["use_quant_conv"] = False
    if not header.has(prefix + "post_quant_conv.weight"):
        config["use_post_quant_conv"] = False
    if shift_factor:
        config["shift_factor"] = shift_factor
    return config


def vae_config_diffusers_names(header: CheckpointHeader, *, scaling_factor: float, family: Family = Family.SD1,
                               shift_factor: float | None = None) -> dict:
    """``AutoencoderKL`` keyword arguments for a standalone VAE saved in diffusers' names."""
    names = list(header.tensors)
    levels = sorted(_indices(names, r"encoder\.down_blocks\.(\d+)\."))
    channels = [header.shape(f"encoder.down_blocks.{b}.resnets.0.conv1.weight")[0] for b in levels]
    config = dict(
        in_channels=header.shape("encoder.conv_in.weight")[1],
        out_channels=header.shape("decoder.conv_out.weight")[0],
        down_block_types=["DownEncoderBlock2D"] * len(channels),
        up_block_types=["UpDecoderBlock2D"] * len(channels),
        block_out_channels=channels,
        layers_per_block=len(_indices(names, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")),
        latent_channels=header.shape("decoder.conv_in.weight")[1],
        norm_num_groups=32,
        sample_size=_VAE_SAMPLE_SIZE[family.latent_space],
        scaling_factor=scaling_factor,
        force_upcast=family.latent_space in _UPCAST,
    )
    return _vae_extras(config, header, "", shift_factor)


def text_encoder_config(header: CheckpointHeader, te: TextEncoderLayout, *, pad_token_id: int):
    """A ``transformers.CLIPTextConfig`` for one text encoder, from its token embedding and layer count."""
    from transformers import CLIPTextConfig

    names = [k[len(te.prefix):] for k in header.tensors if k.startswith(te.prefix)]
    vocab, hidden = header.shape(te.prefix + te.token_embedding)
    if te.naming == "hf":
        layers = len(_indices(names, r"text_model\.encoder\.layers\.(\d+)\."))
        intermediate = header.shape(te.prefix + "text_model.encoder.layers.0.mlp.fc1.weight")[0]
        positions = header.shape(te.prefix + "text_model.embeddings.position_embedding.weight")[0]
        projection = header.shape(te.prefix + "text_projection.weight")[0] if te.with_projection else hidden
    else:
        layers = len(_indices(names, r"transformer\.resblocks\.(\d+)\."))
        intermediate = header.shape(te.prefix + "transformer.resblocks.0.mlp.c_fc.weight")[0]
        positions = header.shape(te.prefix + "positional_embedding")[0]
        projection = header.shape(te.prefix + "text_projection")[1] if te.with_projection else hidden
    if te.drop_last_layer:
        layers -= 1
    if layers < 1:
        raise ModelError(f"text encoder under {te.prefix!r} has too few layers ({layers})")
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), max_position_embeddings=positions, hidden_act=te.hidden_act,
        layer_norm_eps=1e-5, projection_dim=projection, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=pad_token_id,
    )
