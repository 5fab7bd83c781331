"""The loader against diffusers' own single-file loader (with local, hand-written configs) as witness.

``from_single_file`` reads the same tiny files with its own key converter and the configs from
:func:`tiny_models.tiny_diffusers_config_dir`; ours derives everything from tensor shapes. The
built modules must have identical weights and give the same outputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings

import pytest
import torch

import tiny_models as tm
from underpaint.errors import ModelError
from underpaint.models.detect import Family
from underpaint.models.loader import load_model, load_vae, scaled_linear_alphas_cumprod


def _witness(path, family, config_dir):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = cls.from_single_file(str(path), config=str(config_dir), local_files_only=True,
                                    torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def pair(request, tmp_path_factory):
    """(our LoadedModel, diffusers pipeline) for the same tiny file."""
    family = request.param
    d = tmp_path_factory.mktemp(f"witness-{family}")
    path = {"sd1": tm.write_sd1, "sd2": tm.write_sd2, "sdxl": tm.write_sdxl}[family](d / f"{family}.safetensors")
    config_dir = tm.tiny_diffusers_config_dir(d / "config", family)
    return load_model(path), _witness(path, family, config_dir)


def _assert_same_weights(ours: torch.nn.Module, theirs: torch.nn.Module, what: str):
    a, b = ours.state_dict(), theirs.state_dict()
    assert set(a) == set(b), f"{what}: key sets differ: {sorted(set(a) ^ set(b))[:5]}"
    for k in a:
        assert a[k].dtype == b[k].dtype, f"{what}.{k} dtype"
        assert torch.equal(a[k], b[k]), f"{what}.{k} differs"


def test_same_weights_as_diffusers(pair):
    ours, pipe = pair
    _assert_same_weights(ours.unet, pipe.unet, "unet")
    _assert_same_weights(ours.vae, pipe.vae, "vae")
    theirs = (pipe.text_encoder,) + ((pipe.text_encoder_2,) if hasattr(pipe, "text_encoder_2") else ())
    assert len(ours.text_encoders) == len(theirs)
    for i, (a, b) in enumerate(zip(ours.text_encoders, theirs)):
        assert type(a) is type(b)
        _assert_same_weights(a, b, f"text_encoder[{i}]")


def test_derived_configs_match_hand_written_ones(pair):
    ours, pipe = pair
    for key in ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "cross_attention_dim",
                "attention_head_dim", "use_linear_projection", "down_block_types", "up_block_types",
                "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        assert ours.unet.config[key] == pipe.unet.config[key], key
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "scaling_factor"):
        assert ours.vae.config[key] == pipe.vae.config[key], key
    for a, b in zip(ours.text_encoders, (pipe.text_encoder, getattr(pipe, "text_encoder_2", None))):
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "hidden_act", "intermediate_size",
                    "vocab_size", "max_position_embeddings"):
            assert getattr(a.config, key) == getattr(b.config, key), key


@torch.no_grad()
def test_same_outputs_as_diffusers(pair):
    ours, pipe = pair
    g = torch.Generator().manual_seed(0)
    ids = ours.tokenizers[0]("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    feats = []
    for a, b in zip(ours.text_encoders, (pipe.text_encoder, getattr(pipe, "text_encoder_2", None))):
        oa, ob = a(ids, output_hidden_states=True), b(ids, output_hidden_states=True)
        torch.testing.assert_close(oa.last_hidden_state, ob.last_hidden_state, rtol=0, atol=1e-6)
        torch.testing.assert_close(oa.hidden_states[-2], ob.hidden_states[-2], rtol=0, atol=1e-6)
        if hasattr(oa, "text_embeds"):
            torch.testing.assert_close(oa.text_embeds, ob.text_embeds, rtol=0, atol=1e-6)
        feats.append(oa)
    context = torch.cat([f.last_hidden_state for f in feats], dim=-1)
    x = torch.randn(1, ours.spec.in_channels, 16, 16, generator=g)
    kwargs = {}
    if ours.spec.family == Family.SDXL:
        kwargs["added_cond_kwargs"] = {"text_embeds": feats[-1].text_embeds,
                                       "time_ids": torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]])}
    for t in (999, 500, 1):
        a = ours.unet(x, t, encoder_hidden_states=context, **kwargs).sample
        b = pipe.unet(x, t, encoder_hidden_states=context, **kwargs).sample
        assert torch.isfinite(a).all() and a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    la, lb = ours.vae.encode(image).latent_dist.mean, pipe.vae.encode(image).latent_dist.mean
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-5)
    assert la.shape == (1, 4, 4, 4)  # 8x smaller, as with the real VAEs
    torch.testing.assert_close(ours.vae.decode(la).sample, pipe.vae.decode(lb).sample, rtol=0, atol=1e-5)


def test_loaded_model_record(pair):
    ours, pipe = pair
    assert ours.device == torch.device("cpu") and ours.dtype == torch.float32
    assert ours.name == ours.path.stem
    assert len(ours.tokenizers) == len(ours.text_encoders)
    assert ours.alphas_cumprod.dtype == torch.float64 and ours.alphas_cumprod.shape == (1000,)
    # diffusers computes the schedule in float32 arithmetic: equal to float32 rounding
    torch.testing.assert_close(ours.alphas_cumprod.float(), pipe.scheduler.alphas_cumprod, rtol=0, atol=1e-6)
    assert ours.vae.config.scaling_factor == ours.spec.scaling_factor
    for m in (ours.unet, ours.vae, *ours.text_encoders):
        assert not m.training
        assert all(not p.requires_grad and p.device.type == "cpu" for p in m.parameters())
        assert not any(b.is_meta for b in m.buffers())
    pads = [tok.pad_token for tok in ours.tokenizers]
    assert pads == {"sd1": ["<|endoftext|>"], "sd2": ["!"], "sdxl": ["<|endoftext|>", "!"]}[ours.spec.family.value]


def test_alphas_cumprod_from_file_and_default():
    """SD1/SD2 files carry alphas_cumprod; SDXL's schedule is the same scaled-linear one, rounded to float32."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    expected = torch.cumprod(1 - betas, 0).float().double()
    assert torch.equal(scaled_linear_alphas_cumprod(), expected)
    assert torch.equal(tm.schedule_buffers()["alphas_cumprod"].double(), expected)


def test_sd2_penultimate_layer(pair):
    """SD2 is conditioned on the penultimate OpenCLIP layer: the last of the file's blocks is not built."""
    ours, _ = pair
    if ours.spec.family == Family.SD2:
        assert ours.text_encoders[0].config.num_hidden_layers == tm.SD2_TEXT.layers - 1
    elif ours.spec.family == Family.SDXL:
        assert ours.text_encoders[1].config.num_hidden_layers == tm.SDXL_TEXT_G.layers
        assert ours.text_encoders[1].config.projection_dim == tm.SDXL_TEXT_G.projection


# --- files in other formats and dtypes --------------------------------------------------------------


def test_ckpt_and_fp16_files_load_like_safetensors(tmp_path):
    ref = load_model(tm.write_sd1(tmp_path / "a.safetensors"))
    ckpt = load_model(tm.write_sd1(tmp_path / "a.ckpt"))
    _assert_same_weights(ckpt.unet, ref.unet, "unet")
    _assert_same_weights(ckpt.text_encoders[0], ref.text_encoders[0], "text")
    half = load_model(tm.write_sd1(tmp_path / "h.safetensors", dtype=torch.float16))
    assert all(p.dtype == torch.float32 for p in half.unet.parameters())
    w = "conv_in.weight"
    assert torch.equal(half.unet.state_dict()[w], ref.unet.state_dict()[w].half().float())
    as_half = load_model(tmp_path / "a.safetensors", dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in as_half.vae.parameters())


def test_inpaint_model_loads_with_nine_channels(tmp_path):
    model = load_model(tm.write_sd1(tmp_path / "inpaint.safetensors", inpaint=True))
    assert model.spec.in_channels == 9 and model.unet.config.in_channels == 9
    with torch.no_grad():
        out = model.unet(torch.zeros(1, 9, 8, 8), 10, encoder_hidden_states=torch.zeros(1, 77, 16)).sample
    assert out.shape == (1, 4, 8, 8)


def test_sd2_without_metadata_is_probed(tmp_path):
    path = tm.write_sd2(tmp_path / "plain-sd2.safetensors", prediction=None)
    model = load_model(path)
    assert model.spec.prediction_source == "probe"
    with torch.no_grad():
        x = torch.full((1, 4, 8, 8), 0.5)
        out = model.unet(x, torch.tensor([999]), encoder_hidden_states=torch.full((1, 2, 16), 0.5)).sample
    assert model.spec.prediction == ("v" if (out - x).mean() < -1 else "eps")
    assert load_model(path, prediction="v").spec.prediction_source == "override"
    inpaint = load_model(tm.write_sd2(tmp_path / "sd2-inpaint.safetensors", prediction=None, inpaint=True))
    assert (inpaint.spec.in_channels, inpaint.spec.prediction, inpaint.spec.prediction_source) == (9, "eps", "default")


def test_missing_tensor_is_reported(tmp_path):
    from safetensors.torch import save_file

    tensors = tm.materialise(tm.sd1_shapes(), 1)
    del tensors["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"]
    del tensors["first_stage_model.decoder.up.0.block.1.conv2.bias"]
    path = tmp_path / "broken.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ModelError, match=r"UNet.*1 missing \(e\.g\. down_blocks\.0\.attentions\.0\."):
        load_model(path)


def test_unexpected_tensor_is_reported(tmp_path):
    from safetensors.torch import save_file

    tensors = tm.materialise(tm.sd1_shapes(), 1)
    tensors["model.diffusion_model.input_blocks.1.1.extra.weight"] = torch.zeros(2)
    path = tmp_path / "extra.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ModelError, match="unexpected"):
        load_model(path)


def test_checkpoint_without_vae(tmp_path):
    from safetensors.torch import save_file

    tensors = {k: v for k, v in tm.materialise(tm.sd1_shapes(), 1).items() if not k.startswith("first_stage_model.")}
    path = tmp_path / "novae.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ModelError, match="no VAE"):
        load_model(path)
    vae = tm.write_vae(tmp_path / "vae.safetensors")
    assert load_model(path, vae=vae).vae_path == vae


# --- separate VAE files ---------------------------------------------------------------------------


def _vae_reference(path):
    """The witness for a standalone VAE: diffusers' AutoencoderKL.from_single_file with a local config."""
    from diffusers import AutoencoderKL

    cfg = tm.tiny_diffusers_config_dir(path.parent / "vae-config", "sd1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoencoderKL.from_single_file(str(path), config=str(cfg), subfolder="vae", local_files_only=True)


def test_separate_vae_replaces_the_checkpoints(tmp_path, sd1_file):
    vae_path = tm.write_vae(tmp_path / "vae-ft-mse.safetensors")
    model = load_model(sd1_file, vae=vae_path)
    _assert_same_weights(model.vae, _vae_reference(vae_path), "vae")
    own = load_model(sd1_file).vae
    assert not torch.equal(own.state_dict()["decoder.conv_out.weight"], model.vae.state_dict()["decoder.conv_out.weight"])
    assert model.vae_path == vae_path
    assert model.vae_hash == hashlib.sha256(vae_path.read_bytes()).hexdigest()[:10]
    assert load_model(sd1_file).vae_hash is None


def test_vae_with_channel_changes_matches_diffusers(tmp_path, sd1_file):
    """Widening levels add nin_shortcut convs (conv_shortcut in diffusers); checked against from_single_file."""
    from diffusers import AutoencoderKL

    wide = tm.TinyVAE(channels=(32, 64, 64), layers=2)
    path = tm.write_vae(tmp_path / "wide.safetensors", vae=wide)
    cfg = tmp_path / "cfg" / "vae"
    cfg.mkdir(parents=True)
    (cfg / "config.json").write_text(__import__("json").dumps(tm.vae_config(0.18215, wide)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = AutoencoderKL.from_single_file(str(path), config=str(tmp_path / "cfg"), subfolder="vae",
                                             local_files_only=True)
    ours = load_vae(path, load_model(sd1_file).spec)
    _assert_same_weights(ours, ref, "vae")
    assert any("conv_shortcut" in k for k in ours.state_dict())
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x).latent_dist.mean, ref.encode(x).latent_dist.mean, rtol=0, atol=1e-5)


def test_vae_in_other_layouts(tmp_path, sd1_file):
    spec = load_model(sd1_file).spec
    ref = load_vae(tm.write_vae(tmp_path / "plain.safetensors", seed=9), spec)
    prefixed = load_vae(tm.write_vae(tmp_path / "prefixed.safetensors", seed=9, prefix="first_stage_model."), spec)
    _assert_same_weights(prefixed, ref, "vae")
    ckpt_path = tmp_path / "vae.ckpt"
    tensors = tm.materialise(tm.vae_shapes(tm.VAE, prefix=""), 9)
    tensors["loss.logvar"] = torch.zeros(())  # training leftovers in the original .ckpt VAEs
    torch.save({"state_dict": tensors}, ckpt_path)
    _assert_same_weights(load_vae(ckpt_path, spec), ref, "vae")
    from safetensors.torch import save_file

    diffusers_names = tmp_path / "diffusers-vae.safetensors"
    save_file(ref.state_dict(), str(diffusers_names))
    _assert_same_weights(load_vae(diffusers_names, spec), ref, "vae")
    with pytest.raises(ModelError, match="not a VAE"):
        load_vae(_lora(tmp_path), spec)
    ref.save_pretrained(str(tmp_path / "vae-folder"))
    _assert_same_weights(load_vae(tmp_path / "vae-folder", spec), ref, "vae")


def _lora(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(path))
    return path


# --- diffusers folders ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_diffusers_folder(tmp_path, family):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = tm.write_diffusers_folder(tmp_path / f"tiny-{family}", family, prediction="v" if family == "sd2" else "eps")
    model = load_model(folder)
    assert model.spec.family == Family(family)
    assert model.spec.prediction == ("v" if family == "sd2" else "eps")
    assert model.spec.prediction_source == "config"
    assert model.name == f"tiny-{family}" and model.short_hash is None
    _assert_same_weights(model.unet, UNet2DConditionModel.from_pretrained(str(folder / "unet")), "unet")
    _assert_same_weights(model.vae, AutoencoderKL.from_pretrained(str(folder / "vae")), "vae")
    assert len(model.text_encoders) == len(model.tokenizers) == (2 if family == "sdxl" else 1)
    assert model.tokenizers[-1].pad_token == ("<|endoftext|>" if family == "sd1" else "!")
    assert model.tokenizers[0]("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert model.alphas_cumprod.dtype == torch.float64


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ModelError, match="model_index.json"):
        load_model(tmp_path)


def test_short_hash_is_lazy_and_a1111_style(tmp_path, sd1_file):
    model = load_model(sd1_file)
    assert "short_hash" not in vars(model)
    assert model.short_hash == hashlib.sha256(sd1_file.read_bytes()).hexdigest()[:10]
    assert dataclasses.is_dataclass(model)


def test_loading_never_touches_the_network(tmp_path, sd1_file, monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hub"))
    assert load_model(sd1_file, dtype="fp32").spec.family == Family.SD1
    folder = tm.write_diffusers_folder(tmp_path / "folder", "sd1")
    assert load_model(folder).spec.family == Family.SD1


def test_lora_given_as_checkpoint(tmp_path):
    path = _lora(tmp_path)
    with pytest.raises(ModelError) as err:
        load_model(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: not a Stable Diffusion checkpoint") and "LoRA" in msg
