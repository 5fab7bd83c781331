"""Renaming original single-file weights to diffusers' and transformers' module names.

Each converter builds a table from original module prefixes to diffusers module prefixes
(from the derived config, so it follows any depth or width), then renames every key through
it. Inside a module most names are shared; the few that differ (ResBlock layers, the VAE's
attention) have small per-kind tables.
"""

from __future__ import annotations

import torch

from ..errors import ModelError
from .configs import UNetLayout
from .detect import TextEncoderLayout

# Inner names of an original ResBlock → diffusers ResnetBlock2D.
_UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# Older diffusers VAE files name the attention projections differently.
_OLD_DIFFUSERS_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_DOWNSAMPLE = {"op": "conv"}
_SAME: dict[str, str] = {}


def _rename_inner(rest: str, table: dict[str, str]) -> str:
    """Rename the leading part of ``rest`` (``in_layers.0.weight`` → ``norm1.weight``) by ``table``."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def _rename(state_dict: dict[str, torch.Tensor], modules: dict[str, tuple[str, dict[str, str]]],
            what: str) -> dict[str, torch.Tensor]:
    """Rename keys by the longest matching module prefix; keys matching no module are an error."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        parts = key.split(".")
        match = None
        for i in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in modules:
                match = prefix
                break
        if match is None:
            unknown.append(key)
            continue
        new_prefix, inner = modules[match]
        out[new_prefix + "." + _rename_inner(key[len(match) + 1:], inner)] = value
    if unknown:
        raise ModelError(f"{what}: {len(unknown)} unexpected tensors, e.g. {', '.join(sorted(unknown)[:4])}")
    return out


def unet_module_map(lay: UNetLayout) -> dict[str, tuple[str, dict[str, str]]]:
    """Original UNet module prefix → (diffusers prefix, inner renames), following the block layout."""
    m: dict[str, tuple[str, dict[str, str]]] = {
        "time_embed.0": ("time_embedding.linear_1", _SAME), "time_embed.2": ("time_embedding.linear_2", _SAME),
        "label_emb.0.0": ("add_embedding.linear_1", _SAME), "label_emb.0.2": ("add_embedding.linear_2", _SAME),
        "input_blocks.0.0": ("conv_in", _SAME), "out.0": ("conv_norm_out", _SAME), "out.2": ("conv_out", _SAME),
        "middle_block.0": ("mid_block.resnets.0", _UNET_RESNET), "middle_block.1": ("mid_block.attentions.0", _SAME),
        "middle_block.2": ("mid_block.resnets.1", _UNET_RESNET),
    }
    n = lay.layers_per_block
    for b in range(lay.levels):
        for layer in range(n):
            i = 1 + b * (n + 1) + layer
            m[f"input_blocks.{i}.0"] = (f"down_blocks.{b}.resnets.{layer}", _UNET_RESNET)
            m[f"input_blocks.{i}.1"] = (f"down_blocks.{b}.attentions.{layer}", _SAME)
        if b < lay.levels - 1:
            m[f"input_blocks.{1 + b * (n + 1) + n}.0"] = (f"down_blocks.{b}.downsamplers.0", _DOWNSAMPLE)
    for u in range(lay.levels):
        has_attn = lay.up_depth[u] > 0
        for layer in range(n + 1):
            i = u * (n + 1) + layer
            m[f"output_blocks.{i}.0"] = (f"up_blocks.{u}.resnets.{layer}", _UNET_RESNET)
            if has_attn:
                m[f"output_blocks.{i}.1"] = (f"up_blocks.{u}.attentions.{layer}", _SAME)
        if u < lay.levels - 1:
            m[f"output_blocks.{u * (n + 1) + n}.{2 if has_attn else 1}"] = (f"up_blocks.{u}.upsamplers.0", _SAME)
    return m


def unet_to_diffusers(state_dict: dict[str, torch.Tensor], lay: UNetLayout) -> dict[str, torch.Tensor]:
    """Original UNet weights (prefix removed) in ``UNet2DConditionModel`` names."""
    return _rename(state_dict, unet_module_map(lay), "UNet")


def vae_module_map(levels: int, layers: int) -> dict[str, tuple[str, dict[str, str]]]:
    """Original VAE module prefix → (diffusers prefix, inner renames); the decoder's levels run backwards."""
    m: dict[str, tuple[str, dict[str, str]]] = {}
    for side in ("encoder", "decoder"):
        m[f"{side}.conv_in"] = (f"{side}.conv_in", _SAME)
        m[f"{side}.conv_out"] = (f"{side}.conv_out", _SAME)
        m[f"{side}.norm_out"] = (f"{side}.conv_norm_out", _SAME)
        m[f"{side}.mid.block_1"] = (f"{side}.mid_block.resnets.0", _VAE_RESNET)
        m[f"{side}.mid.block_2"] = (f"{side}.mid_block.resnets.1", _VAE_RESNET)
        m[f"{side}.mid.attn_1"] = (f"{side}.mid_block.attentions.0", _VAE_ATTENTION)
    for b in range(levels):
        for layer in range(layers):
            m[f"encoder.down.{b}.block.{layer}"] = (f"encoder.down_blocks.{b}.resnets.{layer}", _VAE_RESNET)
        for layer in range(layers + 1):
            m[f"decoder.up.{b}.block.{layer}"] = (f"decoder.up_blocks.{levels - 1 - b}.resnets.{layer}", _VAE_RESNET)
        m[f"encoder.down.{b}.downsample"] = (f"encoder.down_blocks.{b}.downsamplers.0", _SAME)
        m[f"decoder.up.{b}.upsample"] = (f"decoder.up_blocks.{levels - 1 - b}.upsamplers.0", _SAME)
    for name in ("quant_conv", "post_quant_conv"):
        m[name] = (name, _SAME)
    return m


def vae_to_diffusers(state_dict: dict[str, torch.Tensor], levels: int, layers: int) -> dict[str, torch.Tensor]:
    """Original VAE weights (prefix removed) in ``AutoencoderKL`` names; 1x1-conv attention becomes linear."""
    return _squeeze_attention(_rename(state_dict, vae_module_map(levels, layers), "VAE"))


def vae_diffusers_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A VAE already in diffusers' names, with the older attention names and conv-shaped weights fixed."""
    out = {}
    for key, value in state_dict.items():
        head, sep, rest = key.partition(".mid_block.attentions.0.")
        out[head + sep + _rename_inner(rest, _OLD_DIFFUSERS_VAE_ATTENTION) if sep else key] = value
    return _squeeze_attention(out)


def _squeeze_attention(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The VAE mid-block attention was a 1x1 conv in the original code; diffusers uses linear layers."""
    for key, value in state_dict.items():
        if ".mid_block.attentions.0." in key and key.endswith(".weight") and value.ndim == 4:
            state_dict[key] = value[:, :, 0, 0]
    return state_dict


# OpenCLIP residual-block inner names → transformers CLIPEncoderLayer names.
_OPENCLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                   "attn.out_proj": "self_attn.out_proj"}
# Tensors of the original files that the transformers model has no place for.
_HF_CLIP_IGNORED = ("text_model.embeddings.position_ids",)
_OPENCLIP_IGNORED = ("logit_scale", "attn_mask")


def text_encoder_to_transformers(state_dict: dict[str, torch.Tensor], te: TextEncoderLayout, num_layers: int,
                                 *, flat: bool) -> dict[str, torch.Tensor]:
    """One text encoder's weights (its prefix removed) in transformers' names.

    Checkpoints keep CLIP-L as ``text_model.*``; transformers 5 flattened ``CLIPTextModel``
    (no ``text_model.`` prefix) while ``CLIPTextModelWithProjection`` keeps it: ``flat`` says which.
    """
    if te.naming == "hf":
        out = {}
        for key, value in state_dict.items():
            key = key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key
            if key not in _HF_CLIP_IGNORED:
                out[key] = value
    else:
        out = _openclip_to_transformers(state_dict, num_layers, te.with_projection)
    if flat:
        out = {k.removeprefix("text_model."): v for k, v in out.items()}
    return out


def _openclip_to_transformers(state_dict: dict[str, torch.Tensor], num_layers: int,
                              with_projection: bool) -> dict[str, torch.Tensor]:
    """OpenCLIP's text tower in transformers' CLIP names: fused q/k/v split, projection transposed."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    fixed = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
             "positional_embedding": "text_model.embeddings.position_embedding.weight",
             "ln_final.weight": "text_model.final_layer_norm.weight",
             "ln_final.bias": "text_model.final_layer_norm.bias"}
    for key, value in state_dict.items():
        if key in fixed:
            out[fixed[key]] = value
        elif key == "text_projection":
            if with_projection:
                out["text_projection.weight"] = value.t().contiguous()
        elif key.startswith("transformer.resblocks."):
            index, _, rest = key[len("transformer.resblocks."):].partition(".")
            if int(index) >= num_layers:
                continue  # SD2 conditions on the penultimate layer: the last block is not built
            base = f"text_model.encoder.layers.{index}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{base}self_attn.{name}.{kind}"] = part.contiguous()
            else:
                out[base + _rename_inner(rest, _OPENCLIP_BLOCK)] = value
        elif key not in _OPENCLIP_IGNORED:
            unknown.append(key)
    if unknown:
        raise ModelError(f"OpenCLIP text encoder: unexpected tensors, e.g. {', '.join(sorted(unknown)[:4])}")
    return out
