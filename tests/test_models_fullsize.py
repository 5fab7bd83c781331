"""Full-size SD1.5, SD2.1 and SDXL layouts checked on the meta device: no weights, no memory.

The headers use the real widths and depths (via the same independent shape rules as the tiny
fixtures), so config derivation and key conversion are exercised exactly as for the real files.
The parameter counts are the published sizes of the diffusers/transformers modules.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tiny_models as tm
from underpaint.models.detect import Family
from underpaint.models.header import CheckpointHeader, TensorInfo
from underpaint.models.loader import assemble

REAL_VAE = tm.TinyVAE(channels=(128, 256, 512, 512), layers=2)
SD_CHANNELS = (320, 640, 1280, 1280)

LAYOUTS = {
    "sd15": {
        **tm.unet_shapes(tm.TinyUNet(SD_CHANNELS, 2, (1, 1, 1, 0), 1, 768, False, 8)),
        **tm.vae_shapes(REAL_VAE),
        **tm.clip_hf_shapes(tm.TinyText(768, 12), "cond_stage_model.transformer."),
    },
    "sd21": {
        **tm.unet_shapes(tm.TinyUNet(SD_CHANNELS, 2, (1, 1, 1, 0), 1, 1024, True, (5, 10, 20, 20))),
        **tm.vae_shapes(REAL_VAE),
        **tm.openclip_shapes(tm.TinyText(1024, 24, 1024), "cond_stage_model.model."),
    },
    "sdxl": {
        **tm.unet_shapes(tm.TinyUNet((320, 640, 1280), 2, (0, 2, 10), 10, 2048, True, (5, 10, 20), adm_in=2816)),
        **tm.vae_shapes(REAL_VAE),
        **tm.clip_hf_shapes(tm.TinyText(768, 12), "conditioner.embedders.0.transformer."),
        **tm.openclip_shapes(tm.TinyText(1280, 32, 1280), "conditioner.embedders.1.model."),
    },
}

# Published parameter counts: UNet, VAE, text encoder(s).
PARAMS = {
    "sd15": (859_520_964, 83_653_863, (123_060_480,)),
    "sd21": (865_910_724, 83_653_863, (340_387_840,)),
    "sdxl": (2_567_463_684, 83_653_863, (123_060_480, 694_659_840)),
}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module", params=list(LAYOUTS))
def meta_model(request):
    shapes = LAYOUTS[request.param]
    header = CheckpointHeader({k: TensorInfo("F16", tuple(s)) for k, (_, s) in shapes.items()})
    sd = {k: torch.empty(s, device="meta", dtype=torch.int64 if kind == "position_ids" else torch.float16)
          for k, (kind, s) in shapes.items()}
    model = assemble(header, sd, path=Path(f"{request.param}.safetensors"), device=torch.device("meta"),
                     dtype=torch.float16, prediction="v" if request.param == "sd21" else None)
    assert not sd, "every tensor of the file was used"
    return request.param, model


def test_parameter_counts(meta_model):
    name, model = meta_model
    unet, vae, texts = PARAMS[name]
    assert _count(model.unet) == unet
    assert _count(model.vae) == vae
    assert tuple(_count(t) for t in model.text_encoders) == texts
    assert all(p.dtype == torch.float16 for p in model.unet.parameters())


def test_configs_match_the_published_ones(meta_model):
    name, model = meta_model
    u, v = model.unet.config, model.vae.config
    assert list(v.block_out_channels) == [128, 256, 512, 512] and v.layers_per_block == 2 and v.latent_channels == 4
    if name == "sd15":
        assert model.spec.family == Family.SD1 and v.scaling_factor == 0.18215
        assert (u.attention_head_dim, u.cross_attention_dim, u.use_linear_projection) == (8, 768, False)
        assert list(u.block_out_channels) == list(SD_CHANNELS) and u.layers_per_block == 2
        assert list(u.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
        te = model.text_encoders[0].config
        assert (te.hidden_size, te.num_hidden_layers, te.num_attention_heads, te.hidden_act) == (768, 12, 12, "quick_gelu")
    elif name == "sd21":
        assert model.spec.family == Family.SD2 and model.spec.default_size == 768
        assert (list(u.attention_head_dim), u.cross_attention_dim, u.use_linear_projection) == ([5, 10, 20, 20], 1024, True)
        te = model.text_encoders[0].config
        assert (te.hidden_size, te.num_hidden_layers, te.num_attention_heads, te.hidden_act) == (1024, 23, 16, "gelu")
        assert te.intermediate_size == 4096
    else:
        assert model.spec.family == Family.SDXL and v.scaling_factor == 0.13025
        assert (list(u.attention_head_dim), u.cross_attention_dim) == ([5, 10, 20], 2048)
        assert list(u.transformer_layers_per_block) == [1, 2, 10]
        assert (u.addition_embed_type, u.addition_time_embed_dim, u.projection_class_embeddings_input_dim) == (
            "text_time", 256, 2816)
        assert list(u.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
        g = model.text_encoders[1].config
        assert (g.hidden_size, g.num_hidden_layers, g.num_attention_heads, g.projection_dim) == (1280, 32, 20, 1280)
