"""FLUX.1 loading against independent witnesses: diffusers' own converters and loaders, transformers'
modules loaded directly, sentencepiece and gguf's reference dequantization.

The tiny files (:mod:`tiny_flux`) follow the real layouts; the loader derives every config from
shapes. Each module it builds must hold exactly the weights the witness builds and compute the
same outputs.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_flux as tf
import tiny_models as tm
from flux_fixtures import flux_dev, flux_files  # noqa: F401  (fixtures)
from underpaint.errors import InvalidParameter, ModelError
from underpaint.models import flux as flux_mod
from underpaint.models.detect import Family, detect, detect_diffusers_folder, flux_layout
from underpaint.models.flux_loader import is_flux, load_clip_l, load_t5, read_any_header
from underpaint.models.header import CheckpointHeader, TensorInfo, read_header
from underpaint.models.loader import load_flux, load_model, load_vae


@pytest.fixture(scope="session")
def files(flux_files) -> dict[str, Path]:
    return flux_files


@pytest.fixture(scope="session")
def dev(flux_dev):
    """The dev transformer with separate CLIP-L, T5 and ae files, in float32."""
    return flux_dev


# --- witnesses ----------------------------------------------------------------------------------------


class _ScaledSplit:
    """``torch`` as seen by diffusers' FLUX converter, whose single-block split assumes FLUX.1's width (3072):
    the split sizes it asks for are scaled to the tensor at hand, keeping their proportions (1:1:1:4)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def split(t, sizes, dim=0):
        total, n = sum(sizes), t.shape[dim]
        return torch.split(t, [s * n // total for s in sizes], dim=dim)


def witness_state_dict(sd: dict[str, torch.Tensor], monkeypatch) -> dict[str, torch.Tensor]:
    from diffusers.loaders import single_file_utils

    with monkeypatch.context() as m:
        m.setattr(single_file_utils, "torch", _ScaledSplit())
        return single_file_utils.convert_flux_transformer_checkpoint_to_diffusers(dict(sd))


def witness_transformer(sd: dict[str, torch.Tensor], config: dict, monkeypatch):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**config)
    model.load_state_dict(witness_state_dict(sd, monkeypatch), strict=True)
    return model.eval()


def transformer_inputs(f: tf.TinyFlux = tf.DEV, *, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    h, w, txt = 4, 4, 7  # a 4x4 grid of packed latent patches, 7 text tokens
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    out = dict(hidden_states=torch.randn(1, h * w, f.in_features, generator=g),
               encoder_hidden_states=torch.randn(1, txt, f.context, generator=g),
               pooled_projections=torch.randn(1, f.pooled, generator=g),
               timestep=torch.tensor([0.7]), img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(txt, 3))
    if f.guidance:
        out["guidance"] = torch.tensor([3.5])
    return out


def run(model, inputs: dict) -> torch.Tensor:
    p = next(model.parameters())
    with torch.no_grad():
        return model(**{k: v.to(p.dtype) if v.is_floating_point() and k != "img_ids" and k != "txt_ids" else v
                        for k, v in inputs.items()}).sample.float()


def assert_same_weights(ours: torch.nn.Module, theirs: dict | torch.nn.Module, what: str) -> None:
    a = ours.state_dict()
    b = theirs if isinstance(theirs, dict) else theirs.state_dict()
    assert set(a) == set(b), f"{what}: key sets differ: {sorted(set(a) ^ set(b))[:5]}"
    for k in a:
        assert torch.equal(a[k], b[k].to(a[k].dtype)), f"{what}.{k} differs"


# --- detection ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "variant", "in_channels"), [
    ("transformer", "dev", 64), ("schnell", "schnell", 64), ("fill", "fill", 384), ("all_in_one", "dev", 64),
    ("gguf", "dev", 64), ("transformer_fp8", "dev", 64),
])
def test_detect_variants(files, key, variant, in_channels):
    spec = detect(read_any_header(files[key]))
    assert spec.family == Family.FLUX and spec.variant == variant and spec.in_channels == in_channels
    assert (spec.prediction, spec.latent_channels, spec.scaling_factor, spec.shift_factor) == ("flow", 16, 0.3611,
                                                                                               0.1159)
    assert spec.default_size == 1024 and spec.is_inpaint == (variant == "fill")


def test_gguf_header_has_torch_order_shapes(files):
    """GGML lists dimensions reversed; the header must report torch's order, as the safetensors file does."""
    ours = read_any_header(files["gguf"]).tensors
    reference = read_header(files["transformer"]).tensors
    assert set(ours) == set(reference)
    assert all(ours[k].shape == reference[k].shape for k in reference)
    assert ours["double_blocks.1.img_mlp.0.weight"].dtype == "Q4_0"


def test_detect_diffusers_folder(files):
    spec = detect_diffusers_folder(files["diffusers"])
    assert (spec.family, spec.variant, spec.prediction_source, spec.shift_factor) == (Family.FLUX, "dev", "config",
                                                                                      0.1159)


def test_flux_prediction_override():
    header = CheckpointHeader({k: TensorInfo("F32", s) for k, (_, s) in tf.transformer_shapes().items()})
    assert detect(header, prediction="flow").prediction_source == "override"
    with pytest.raises(InvalidParameter, match="'flow'"):
        detect(header, prediction="v")


@pytest.mark.parametrize(("change", "message"), [
    ({"img_in.weight": None}, "no image input img_in.weight"),
    ({"img_in.weight": (32, 128)}, "128 image features .*Canny/Depth"),
    ({"double_blocks.0.img_attn.qkv.weight.absmax": (4,)}, "bitsandbytes"),
])
def test_unusable_flux_files_are_named(change, message):
    shapes = {k: s for k, (_, s) in tf.transformer_shapes().items()}
    for k, v in change.items():
        if v is None:
            del shapes[k]
        else:
            shapes[k] = v
    with pytest.raises(ModelError, match=message):
        detect(CheckpointHeader({k: TensorInfo("F32", s) for k, s in shapes.items()}))


def test_sd_checkpoints_are_not_flux(sd1_file):
    assert not is_flux(sd1_file)
    assert detect(read_header(sd1_file)).family == Family.SD1


# --- transformer: config and conversion --------------------------------------------------------------


@pytest.mark.parametrize("head_dim", [6, 8, 16, 24, 32, 64, 96, 128, 256])
def test_rope_axes_fill_the_head_with_even_parts(head_dim):
    axes = flux_mod.rope_axes(head_dim)
    assert sum(axes) == head_dim and all(a > 0 and a % 2 == 0 for a in axes)
    if head_dim == 128:
        assert axes == (16, 56, 56)


@pytest.mark.parametrize("key", ["transformer", "schnell", "fill"])
def test_conversion_matches_diffusers(files, key, monkeypatch):
    """Config from shapes equals the hand-written one; converted weights equal diffusers' converter's."""
    f = {"transformer": tf.DEV, "schnell": tf.SCHNELL, "fill": tf.FILL}[key]
    header = read_header(files[key])
    config = flux_mod.transformer_config(header, flux_layout(header.tensors))
    assert config == {**tf.transformer_config(f), "axes_dims_rope": (4, 6, 6)}
    sd = load_file(str(files[key]))
    ours = flux_mod.transformer_to_diffusers(dict(sd), f.hidden)
    theirs = witness_state_dict(sd, monkeypatch)
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_transformer_forward_matches_witness(dev, files, monkeypatch):
    assert type(dev.unet).__name__ == "FluxTransformer2DModel"
    ref = witness_transformer(load_file(str(files["transformer"])), tf.transformer_config(), monkeypatch)
    assert_same_weights(dev.unet, ref, "transformer")
    inputs = transformer_inputs()
    torch.testing.assert_close(run(dev.unet, inputs), run(ref, inputs), rtol=0, atol=1e-6)


def test_fill_transformer_forward(files, monkeypatch):
    model = load_flux(files["fill"], clip_l=files["clip_l"], t5=files["t5"], vae=files["ae"], dtype=torch.float32)
    assert (model.unet.config.in_channels, model.unet.config.out_channels) == (384, 64)
    ref = witness_transformer(load_file(str(files["fill"])), tf.transformer_config(tf.FILL), monkeypatch)
    inputs = transformer_inputs(tf.FILL)
    out = run(model.unet, inputs)
    assert out.shape == (1, 16, 64)
    torch.testing.assert_close(out, run(ref, inputs), rtol=0, atol=1e-6)


def test_fp8_transformer_is_upcast(files, monkeypatch):
    """fp8 e4m3fn tensors are taken as stored and computed in the compute dtype."""
    stored = load_file(str(files["transformer_fp8"]))
    assert stored["double_blocks.0.img_attn.qkv.weight"].dtype == torch.float8_e4m3fn
    model = load_flux(files["transformer_fp8"], clip_l=files["clip_l"], t5=files["t5"], vae=files["ae"],
                      dtype=torch.float32)
    upcast = {k: v.float() for k, v in stored.items()}
    ref = witness_transformer(upcast, tf.transformer_config(), monkeypatch)
    assert_same_weights(model.unet, ref, "fp8 transformer")
    inputs = transformer_inputs()
    torch.testing.assert_close(run(model.unet, inputs), run(ref, inputs), rtol=0, atol=1e-6)


def test_transformer_in_diffusers_names(dev, files, tmp_path):
    """A transformer saved in FluxTransformer2DModel's own names (one file) loads without conversion."""
    path = tmp_path / "flux-diffusers-names.safetensors"
    save_file({k: v.contiguous() for k, v in dev.unet.state_dict().items()}, str(path))
    assert detect(read_header(path)).variant == "dev"
    model = load_flux(path, clip_l=files["clip_l"], t5=files["t5"], vae=files["ae"], dtype=torch.float32)
    assert model.unet.config.axes_dims_rope == (4, 6, 6)
    assert_same_weights(model.unet, dev.unet, "diffusers-named transformer")


def test_bf16_load(files):
    model = load_flux(files["transformer"], clip_l=files["clip_l"], t5=files["t5_fp8"], vae=files["ae"])
    assert model.dtype == torch.bfloat16
    assert {p.dtype for m in (model.unet, model.vae, *model.text_encoders) for p in m.parameters()} == {torch.bfloat16}
    assert torch.isfinite(run(model.unet, transformer_inputs())).all()


# --- GGUF ----------------------------------------------------------------------------------------------


def test_gguf_weights_and_forward(files, dev, monkeypatch):
    """Weights equal gguf's own dequantization; the output stays within quantization error of fp32."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(files["gguf"]))
    kinds = {t.tensor_type.name for t in reader.tensors}
    assert {"Q8_0", "Q4_0", "Q5_0", "BF16", "F16", "F32"} <= kinds
    reference = {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
                 .reshape(tuple(int(d) for d in reversed(t.shape.tolist()))) for t in reader.tensors}
    model = load_flux(files["gguf"], clip_l=files["clip_l"], t5=files["t5"], vae=files["ae"], dtype=torch.float32)
    ref = witness_transformer(reference, tf.transformer_config(), monkeypatch)
    assert_same_weights(model.unet, ref, "gguf transformer")
    full = load_file(str(files["transformer"]))
    q8 = model.unet.state_dict()["transformer_blocks.0.attn.to_q.weight"]
    assert 0 < (q8 - full["double_blocks.0.img_attn.qkv.weight"][:32]).abs().max() < 0.01
    inputs = transformer_inputs()
    quantized, exact = run(model.unet, inputs), run(dev.unet, inputs)
    assert not torch.equal(quantized, exact)
    assert (quantized - exact).abs().max() < 0.05 * exact.abs().max()
    assert model.name == files["gguf"].stem and model.short_hash is not None


def test_gguf_that_is_not_flux(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "llm-Q8_0.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match=f"{path}: not a FLUX model"):
        load_model(path)


# --- autoencoder --------------------------------------------------------------------------------------


def _ae_reference(tmp_path, path):
    from diffusers import AutoencoderKL

    cfg = tmp_path / "ae-config" / "vae"
    cfg.mkdir(parents=True)
    (cfg / "config.json").write_text(json.dumps(tf.ae_config()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoencoderKL.from_single_file(str(path), config=str(cfg.parent), subfolder="vae",
                                              local_files_only=True)


def test_ae_matches_diffusers(dev, files, tmp_path):
    cfg = dev.vae.config
    assert (cfg.latent_channels, cfg.use_quant_conv, cfg.use_post_quant_conv) == (16, False, False)
    assert (cfg.scaling_factor, cfg.shift_factor) == (0.3611, 0.1159)
    ref = _ae_reference(tmp_path, files["ae"])
    assert_same_weights(dev.vae, ref, "ae")
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        z = dev.vae.encode(x).latent_dist.mean
        assert z.shape == (1, 16, 4, 4)
        torch.testing.assert_close(z, ref.encode(x).latent_dist.mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(dev.vae.decode(z).sample, ref.decode(z).sample, rtol=0, atol=1e-5)


def test_ae_in_diffusers_names(dev, files, tmp_path):
    path = tmp_path / "ae-diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in dev.vae.state_dict().items()}, str(path))
    vae = load_vae(path, dev.spec)
    assert_same_weights(vae, dev.vae, "ae (diffusers names)")
    assert vae.config.shift_factor == 0.1159 and not vae.config.use_quant_conv


def test_sd_vae_refused_for_flux(files, tmp_path):
    sd_vae = tm.write_vae(tmp_path / "sd-vae.safetensors")
    with pytest.raises(ModelError, match=f"{sd_vae}: .*4 latent channels but the flux model uses 16"):
        load_flux(files["transformer"], clip_l=files["clip_l"], t5=files["t5"], vae=sd_vae)


# --- text encoders --------------------------------------------------------------------------------------


def test_clip_l_matches_transformers(dev, files):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = tm._text_config(tf.CLIP_L, "quick_gelu", tf.CLIP_L.layers, False)
    ref = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}))
    tensors = load_file(str(files["clip_l"]))
    tensors.pop("text_model.embeddings.position_ids")
    missing, unexpected = ref.load_state_dict({k.removeprefix("text_model."): v for k, v in tensors.items()},
                                              strict=False)
    assert not unexpected and set(missing) <= {"embeddings.position_ids"}
    clip = dev.text_encoders[0]
    assert_same_weights(clip, ref.eval(), "clip_l")
    ids = dev.tokenizers[0]("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ours, theirs = clip(ids), ref(ids)
    torch.testing.assert_close(ours.pooler_output, theirs.pooler_output, rtol=0, atol=1e-6)
    assert ours.pooler_output.shape == (1, tf.DEV.pooled)


def test_clip_l_with_prefix_and_projection(dev, tmp_path):
    """A CLIP-L cut from an SD1 checkpoint, with the contrastive projection some files keep: same encoder."""
    tensors = {f"cond_stage_model.transformer.{k}": v for k, v in dev.text_encoders[0].state_dict().items()
               if k != "embeddings.position_ids"}
    tensors = {k.replace("transformer.", "transformer.text_model.", 1): v for k, v in tensors.items()}
    tensors["cond_stage_model.transformer.text_projection.weight"] = torch.zeros(16, 16)
    tensors["cond_stage_model.transformer.logit_scale"] = torch.tensor(4.6)
    save_file(tensors, str(tmp_path / "clip.safetensors"))
    assert_same_weights(load_clip_l(tmp_path / "clip.safetensors", dtype=torch.float32), dev.text_encoders[0],
                        "prefixed clip_l")


def _t5_reference(path) -> torch.nn.Module:
    from transformers import T5EncoderModel

    ref = T5EncoderModel(tf.t5_config())
    tensors = {k: v.float() for k, v in load_file(str(path)).items()}
    missing, unexpected = ref.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight", "shared.weight"}
    ref.encoder.set_input_embeddings(ref.shared)
    return ref.eval()


def test_t5_matches_transformers(dev, files):
    t5 = dev.text_encoders[1]
    cfg, ref_cfg = t5.config, tf.t5_config()
    for field in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                  "relative_attention_num_buckets", "feed_forward_proj", "dense_act_fn", "is_gated_act"):
        assert getattr(cfg, field) == getattr(ref_cfg, field), field
    ref = _t5_reference(files["t5"])
    assert_same_weights(t5, ref, "t5")
    assert t5.encoder.embed_tokens.weight is t5.shared.weight
    ids = dev.tokenizers[1]("a cat on a red chair", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(t5(ids).last_hidden_state, ref(ids).last_hidden_state, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("shared", "embed_tokens"), [(False, True), (True, True)])
def test_t5_embedding_under_either_name(tmp_path, shared, embed_tokens):
    path = tf.write_t5(tmp_path / "t5.safetensors", shared=shared, embed_tokens=embed_tokens)
    t5 = load_t5(path, dtype=torch.float32)
    stored = load_file(str(path))
    expected = stored.get("shared.weight", stored.get("encoder.embed_tokens.weight"))
    assert torch.equal(t5.shared.weight, expected) and t5.encoder.embed_tokens.weight is t5.shared.weight


def test_t5_fp8_and_scaled_fp8(files, tmp_path):
    stored = load_file(str(files["t5_fp8"]))
    q = "encoder.block.1.layer.0.SelfAttention.q.weight"
    assert stored[q].dtype == torch.float8_e4m3fn
    t5 = load_t5(files["t5_fp8"], dtype=torch.float32)
    assert torch.equal(t5.state_dict()[q], stored[q].float())
    # ComfyUI-style scaled fp8: weight stored divided by a per-layer factor kept beside it
    scaled = dict(stored)
    scaled[q] = (stored[q].float() / 4).to(torch.float8_e4m3fn)
    scaled[q.replace(".weight", ".scale_weight")] = torch.tensor(4.0)
    scaled[q.replace(".weight", ".scale_input")] = torch.tensor(1.0)
    scaled["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(scaled, str(tmp_path / "t5_scaled.safetensors"))
    t5s = load_t5(tmp_path / "t5_scaled.safetensors", dtype=torch.float32)
    assert torch.equal(t5s.state_dict()[q], scaled[q].float() * 4)


def test_t5_tokenizer_matches_sentencepiece(dev, files):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(files["spiece_dir"] / "spiece.model"))
    tok = dev.tokenizers[1]
    for text in ("a cat on a red chair", "mountains at sunset", "zebra xylophone"):
        assert tok(text).input_ids == sp.encode(text) + [sp.eos_id()]
    assert (tok.pad_token_id, tok.eos_token_id, len(tok)) == (0, 1, sp.get_piece_size() + 100)
    padded = tok("a cat", padding="max_length", max_length=12).input_ids
    assert padded[-1] == 0 and len(padded) == 12


def test_spiece_lookup_order(files, tmp_path):
    """Next to the T5 file first, then the folder passed in; a missing one is one line naming the file."""
    t5_dir = tmp_path / "elsewhere"
    t5_dir.mkdir()
    t5_path = t5_dir / "t5xxl_fp16.safetensors"
    t5_path.write_bytes(files["t5"].read_bytes())
    kwargs = dict(clip_l=files["clip_l"], t5=t5_path, vae=files["ae"])
    with pytest.raises(ModelError) as err:
        load_flux(files["transformer"], **kwargs)
    msg = str(err.value)
    assert "\n" not in msg and "spiece.model" in msg and str(t5_dir) in msg and "underpaint download flux-dev" in msg
    assert len(load_flux(files["transformer"], tokenizer_dir=files["spiece_dir"], **kwargs).tokenizers[1]) == 140
    tf.write_spiece(t5_dir, vocab_size=36)  # a different model next to the T5 file wins
    near = load_flux(files["transformer"], tokenizer_dir=files["spiece_dir"], **kwargs).tokenizers[1]
    assert len(near) != 140


def test_spiece_from_the_models_folder(files, tmp_path, monkeypatch):
    """With nothing beside the files, the models folder's text_encoders/ is used, then a downloaded FLUX folder's
    tokenizer_2/."""
    import shutil

    alone = tmp_path / "alone"
    alone.mkdir()
    t5_path = alone / "t5.safetensors"
    shutil.copy(files["t5"], t5_path)
    models = tmp_path / "models"
    monkeypatch.setenv("UNDERPAINT_MODELS_DIR", str(models))
    kwargs = dict(clip_l=files["clip_l"], t5=t5_path, vae=files["ae"])
    with pytest.raises(ModelError, match=f"in {models / 'text_encoders'}"):
        load_flux(files["transformer"], **kwargs)
    downloaded = models / "checkpoints" / "FLUX.1-dev"
    shutil.copytree(files["diffusers"], downloaded)
    assert len(load_flux(files["transformer"], **kwargs).tokenizers[1]) == 140
    tf.write_spiece(models / "text_encoders", vocab_size=36)  # text_encoders/ comes first
    assert len(load_flux(files["transformer"], **kwargs).tokenizers[1]) != 140


# --- assembling ------------------------------------------------------------------------------------------


def test_loaded_model_shape(dev, files):
    assert dev.spec.family == Family.FLUX and dev.spec.variant == "dev"
    assert [type(m).__name__ for m in dev.text_encoders] == ["CLIPTextModel", "T5EncoderModel"]
    assert [type(t).__name__ for t in dev.tokenizers] == ["CLIPTokenizer", "T5Tokenizer"]
    assert dev.alphas_cumprod.numel() == 0 and dev.alphas_cumprod.dtype == torch.float64
    assert dev.vae_path == files["ae"] and dev.name == files["transformer"].stem
    modules = (dev.unet, dev.vae, *dev.text_encoders)
    assert all(not m.training and not any(p.requires_grad for p in m.parameters()) for m in modules)
    assert all(not t.is_meta for m in modules for t in (*m.parameters(), *m.buffers()))


def test_missing_components_named_with_their_flags(files):
    with pytest.raises(ModelError) as err:
        load_model(files["transformer"])
    msg = str(err.value)
    assert str(files["transformer"]) in msg and "\n" not in msg
    for part, flag in (("CLIP-L", "--clip-l"), ("T5-XXL", "--t5"), ("VAE", "--vae")):
        assert part in msg and flag in msg
    with pytest.raises(ModelError, match="does not include the T5-XXL text encoder; pass t5= / --t5") as err:
        load_model(files["transformer"], clip_l=files["clip_l"], vae=files["ae"])
    assert "CLIP" not in str(err.value)


@pytest.mark.parametrize("vae_prefix", ["vae.", "first_stage_model."])
def test_all_in_one(dev, files, tmp_path, vae_prefix, monkeypatch):
    path = files["all_in_one"] if vae_prefix == "vae." else tf.write_all_in_one(tmp_path / "aio.safetensors",
                                                                                 vae_prefix=vae_prefix)
    model = load_model(path, tokenizer_dir=files["spiece_dir"])
    assert model.spec.family == Family.FLUX and model.vae_path is None
    stored = load_file(str(path))

    def part(prefix):
        return {k[len(prefix):]: v for k, v in stored.items() if k.startswith(prefix)}

    assert_same_weights(model.unet, witness_state_dict(part("model.diffusion_model."), monkeypatch), "transformer")
    clip = {k.removeprefix("text_model."): v for k, v in part("text_encoders.clip_l.transformer.").items()
            if k != "text_model.embeddings.position_ids"}
    assert_same_weights(model.text_encoders[0], clip, "clip_l")
    t5 = part("text_encoders.t5xxl.transformer.")
    t5["encoder.embed_tokens.weight"] = t5["shared.weight"]
    assert_same_weights(model.text_encoders[1], t5, "t5")
    save_file(part(vae_prefix), str(tmp_path / "ae-cut.safetensors"))
    assert_same_weights(model.vae, _ae_reference(tmp_path, tmp_path / "ae-cut.safetensors"), "ae")
    # an explicit VAE replaces the bundled one
    other = load_model(path, tokenizer_dir=files["spiece_dir"], vae=files["ae"])
    assert_same_weights(other.vae, dev.vae, "explicit ae")


def test_diffusers_folder(files):
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import T5EncoderModel

    folder = files["diffusers"]
    assert is_flux(folder)
    model = load_model(folder)
    assert model.spec.variant == "dev" and model.dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_same_weights(model.unet, FluxTransformer2DModel.from_pretrained(folder / "transformer"), "transformer")
        assert_same_weights(model.vae, AutoencoderKL.from_pretrained(folder / "vae"), "vae")
        assert_same_weights(model.text_encoders[1], T5EncoderModel.from_pretrained(folder / "text_encoder_2"), "t5")
    assert model.tokenizers[1]("a cat").input_ids == load_flux(
        files["transformer"], clip_l=files["clip_l"], t5=files["t5"], vae=files["ae"]).tokenizers[1]("a cat").input_ids
    assert model.vae.config.shift_factor == 0.1159


def test_mixed_up_text_encoders_are_refused(files, tmp_path):
    wide = tm.TinyText(hidden=24, layers=1)
    clip = tm._save(tmp_path / "clip_wide.safetensors", tm.materialise(tm.clip_hf_shapes(wide, ""), 5))
    with pytest.raises(ModelError, match="pooled CLIP features of width 16 but the CLIP-L encoder gives 24"):
        load_flux(files["transformer"], clip_l=clip, t5=files["t5"], vae=files["ae"])
    with pytest.raises(ModelError, match=f"{files['clip_l']}: not a T5 encoder"):
        load_flux(files["transformer"], clip_l=files["clip_l"], t5=files["clip_l"], vae=files["ae"])


def test_sd_loading_ignores_flux_arguments(sd1_file, files):
    model = load_model(sd1_file, clip_l=files["clip_l"], t5=files["t5"])
    assert model.spec.family == Family.SD1 and len(model.text_encoders) == 1


def test_models_folder_lists_text_encoders_and_gguf(tmp_path, files):
    from underpaint.models.registry import ModelsDir

    root = ModelsDir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "flux1-dev-Q8_0.gguf").write_bytes(files["gguf"].read_bytes())
    (tmp_path / "text_encoders").mkdir()
    (tmp_path / "text_encoders" / "clip_l.safetensors").write_bytes(files["clip_l"].read_bytes())
    assert [e.name for e in root.list_checkpoints()] == ["flux1-dev-Q8_0"]
    assert root.resolve_text_encoder("clip_l") == tmp_path / "text_encoders" / "clip_l.safetensors"
    assert root.text_encoders_dir == tmp_path / "text_encoders"


# --- full-size layouts on the meta device ------------------------------------------------------------------

REAL_DEV = tf.TinyFlux(hidden=3072, head_dim=128, double=19, single=38, context=4096, pooled=768)
REAL_T5 = tf.TinyT5(d_model=4096, d_kv=64, heads=64, d_ff=10240, layers=24, buckets=32, vocab=32128)


def _meta(shapes: dict) -> tuple[CheckpointHeader, dict[str, torch.Tensor]]:
    header = CheckpointHeader({k: TensorInfo("BF16", tuple(s)) for k, (_, s) in shapes.items()})
    return header, {k: torch.empty(s, device="meta", dtype=torch.bfloat16) for k, (_, s) in shapes.items()}


@pytest.mark.parametrize("guidance", [True, False])
def test_full_size_transformer_matches_diffusers_defaults(guidance):
    """FLUX.1 dev/schnell widths: the derived module is diffusers' default (FLUX.1) configuration."""
    from diffusers import FluxTransformer2DModel

    f = tf.TinyFlux(**{**REAL_DEV.__dict__, "guidance": guidance})
    header, sd = _meta(tf.transformer_shapes(f, "model.diffusion_model."))
    model = flux_mod.build_transformer(header, {k.removeprefix("model.diffusion_model."): v for k, v in sd.items()},
                                       flux_layout(header.tensors), device=torch.device("meta"), dtype=torch.bfloat16)
    with torch.device("meta"):
        ref = FluxTransformer2DModel(guidance_embeds=guidance)
    ours, theirs = model.state_dict(), ref.state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert model.config.axes_dims_rope == (16, 56, 56) and model.config.num_attention_heads == 24


def test_full_size_t5_and_ae_configs():
    from transformers import T5EncoderModel

    from underpaint.models import configs, t5
    from underpaint.models.detect import FLUX_SCALING_FACTOR, FLUX_SHIFT_FACTOR

    header, sd = _meta(tf.t5_shapes(REAL_T5, "text_encoders.t5xxl.transformer."))
    cfg = t5.t5_config(header, "text_encoders.t5xxl.transformer.")
    assert (cfg.d_model, cfg.d_kv, cfg.num_heads, cfg.d_ff, cfg.num_layers, cfg.vocab_size) == (
        4096, 64, 64, 10240, 24, 32128)
    with torch.device("meta"):
        assert sum(p.numel() for p in T5EncoderModel(cfg).parameters()) == 4_762_310_656  # t5-v1_1-xxl encoder
    real_ae = tm.TinyVAE(channels=(128, 256, 512, 512), layers=2, z=16)
    shapes = {k: v for k, v in tm.vae_shapes(real_ae, "vae.").items() if "quant_conv" not in k}
    header, _ = _meta(shapes)
    ae = configs.vae_config(header, "vae.", scaling_factor=FLUX_SCALING_FACTOR, family=Family.FLUX,
                            shift_factor=FLUX_SHIFT_FACTOR)
    assert (ae["block_out_channels"], ae["layers_per_block"], ae["latent_channels"]) == ([128, 256, 512, 512], 2, 16)
    assert (ae["use_quant_conv"], ae["use_post_quant_conv"], ae["shift_factor"]) == (False, False, 0.1159)
