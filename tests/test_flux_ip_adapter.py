"""IP-Adapter units on FLUX (XLabs' flux-ip-adapter layout), checked against diffusers' FLUX IP-Adapter.

A tiny adapter for the tiny FLUX transformer of test_flux_pipeline is written with XLabs' key names
(``ip_adapter_proj_model.*``; per double block ``double_blocks.N.processor.ip_adapter_double_stream_{k,v}_proj``,
with biases). The witness is diffusers' own path: the same tensors through its FLUX converter
(``FluxTransformer2DModel._load_ip_adapter_weights``, ``FluxIPAdapterAttnProcessor``), the picture read by
the same CLIP vision model through transformers' processor, a whole ``FluxPipeline`` run with true CFG, whose
negative pass reads a black picture.
"""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from test_flux_pipeline import HEIGHT, PROMPT, WIDTH, _close, _pixels, _run, _scheduler, _tiny_flux
from test_ip_adapter import _encoder, _picture, _processor

from underpaint.errors import InvalidParameter, ModelError
from underpaint.pipeline.control import ControlUnit

pytest.importorskip("sentencepiece")


def xlabs_tensors(transformer, *, tokens: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A FLUX IP-Adapter for ``transformer`` with XLabs' key names, reading a 24-wide image embedding."""
    gen = torch.Generator().manual_seed(seed)

    def t(*shape, std=0.2):
        return torch.randn(*shape, generator=gen) * std

    joint, inner = transformer.config.joint_attention_dim, transformer.transformer_blocks[0].attn.inner_dim
    sd = {"ip_adapter_proj_model.proj.weight": t(tokens * joint, 24), "ip_adapter_proj_model.proj.bias": t(tokens * joint),
          "ip_adapter_proj_model.norm.weight": 1 + t(joint), "ip_adapter_proj_model.norm.bias": t(joint)}
    for i in range(len(transformer.transformer_blocks)):
        for kv in "kv":
            p = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj."
            sd[p + "weight"], sd[p + "bias"] = t(inner, joint, std=0.5), t(inner)
    return sd


def as_diffusers(sd: dict[str, torch.Tensor]) -> dict:
    """The same tensors as diffusers' FLUX IP-Adapter loader names them ({"image_proj", "ip_adapter"})."""
    out: dict = {"image_proj": {}, "ip_adapter": {}}
    for key, value in sd.items():
        if key.startswith("ip_adapter_proj_model."):
            out["image_proj"][key.removeprefix("ip_adapter_proj_model.")] = value
        else:
            block, _, rest = key.removeprefix("double_blocks.").partition(".processor.")
            name = rest.replace("ip_adapter_double_stream_k_proj", "to_k_ip").replace("ip_adapter_double_stream_v_proj",
                                                                                    "to_v_ip")
            out["ip_adapter"][f"{block}.{name}"] = value
    return out


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """The tiny FLUX dev model with a models folder: the adapter in controlnet/, the encoder in clip_vision/."""
    from underpaint.models.registry import ModelsDir

    model = _tiny_flux(tmp_path_factory, guidance=True)
    root = tmp_path_factory.mktemp("flux-ip-models")
    (root / "controlnet").mkdir()
    (root / "clip_vision").mkdir()
    save_file(xlabs_tensors(model.unet), str(root / "controlnet" / "flux-ip-adapter.safetensors"))
    encoder = _encoder()
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()},
              str(root / "clip_vision" / "clip-vision-tiny.safetensors"))
    return types.SimpleNamespace(**vars(model), models_dir=ModelsDir(root)), root, encoder


def _unit(root, **fields):
    defaults = dict(image=_picture(5), module="ip-adapter-auto", model=str(root / "controlnet" / "flux-ip-adapter.safetensors"),
                    weight=0.8)
    return ControlUnit(**{**defaults, **fields})


def test_true_cfg_generation_equals_diffusers(flux):
    from diffusers import FluxPipeline

    model, root, encoder = flux
    unit = _unit(root)
    ours = _run(model, width=WIDTH, height=HEIGHT, cfg_scale=4.0, negative_prompt="blurry, dark", control_units=(unit,))
    plain = _run(model, width=WIDTH, height=HEIGHT, cfg_scale=4.0, negative_prompt="blurry, dark")
    assert np.abs(_pixels(ours.images[0]) - _pixels(plain.images[0])).max() > 2  # the picture steers it
    assert 'ControlNet 0: "Module: ip-adapter-auto, Model: flux-ip-adapter' in ours.infotexts[0]

    transformer = copy.deepcopy(model.unet)
    transformer._load_ip_adapter_weights([as_diffusers(xlabs_tensors(model.unet))], low_cpu_mem_usage=False)
    pipe = FluxPipeline(scheduler=_scheduler(True), vae=model.vae, text_encoder=model.text_encoders[0],
                        tokenizer=model.tokenizers[0], text_encoder_2=model.text_encoders[1],
                        tokenizer_2=model.tokenizers[1], transformer=transformer, image_encoder=encoder,
                        feature_extractor=_processor())
    pipe.set_ip_adapter_scale(0.8)
    theirs = pipe(prompt=PROMPT, negative_prompt="blurry, dark", true_cfg_scale=4.0, ip_adapter_image=unit.image,
                  num_inference_steps=10, guidance_scale=3.5, generator=torch.Generator().manual_seed(7),
                  height=HEIGHT, width=WIDTH, max_sequence_length=512).images[0]
    _close(ours.images[0], theirs)


def test_without_cfg_and_the_guidance_window(flux):
    """Distilled guidance alone (CFG 1, FLUX's default): one call per step, the picture's tokens on it; weight 0
    and a window that ends before the first step are no adapter at all."""
    model, root, _ = flux
    plain = _pixels(_run(model, width=WIDTH, height=HEIGHT).images[0])
    steered = _pixels(_run(model, width=WIDTH, height=HEIGHT, control_units=(_unit(root),)).images[0])
    assert np.abs(steered - plain).max() > 2
    for off in (_unit(root, weight=0.0), _unit(root, guidance_start=0.99)):
        assert np.array_equal(_pixels(_run(model, width=WIDTH, height=HEIGHT, control_units=(off,)).images[0]), plain)
    two = _unit(root, extra_images=(_picture(5),))  # Multi-Inputs: the same picture twice is that picture
    assert np.array_equal(_pixels(_run(model, width=WIDTH, height=HEIGHT, control_units=(two,)).images[0]), steered)


def test_adapters_for_the_other_family_are_refused(flux, tmp_path):
    import test_ip_adapter

    from underpaint.models.controlnet import inspect_controlnet, load_controlnet
    from underpaint.models.detect import Family
    from underpaint.models.ip_adapter import check_fits

    model, root, _ = flux
    path = root / "controlnet" / "flux-ip-adapter.safetensors"
    assert inspect_controlnet(path).family == Family.FLUX and inspect_controlnet(path).kind == "ip-adapter"
    net = load_controlnet(path)
    assert net.module.shape.kind == "flux" and net.module.shape.tokens == 4
    sd_unet = types.SimpleNamespace(config=types.SimpleNamespace(cross_attention_dim=32), attn_processors={})
    with pytest.raises(ModelError, match="made for FLUX; this checkpoint is an SD/SDXL UNet"):
        check_fits(net.module, sd_unet, "flux-ip-adapter")

    sd15 = tmp_path / "ip-adapter_sd15.safetensors"  # an SD adapter on FLUX: named, not run
    sd = {"image_proj.proj.weight": torch.zeros(128, 24), "image_proj.proj.bias": torch.zeros(128),
          "image_proj.norm.weight": torch.ones(32), "image_proj.norm.bias": torch.zeros(32),
          "ip_adapter.1.to_k_ip.weight": torch.zeros(32, 32), "ip_adapter.1.to_v_ip.weight": torch.zeros(32, 32)}
    save_file(sd, str(sd15))
    with pytest.raises(ModelError, match="made for SD/SDXL; this checkpoint is FLUX"):
        _run(model, width=WIDTH, height=HEIGHT, control_units=(_unit(root, model=str(sd15)),))
    assert test_ip_adapter.CLIP_SIZE == 32  # the encoder the adapters were written for

    broken = xlabs_tensors(model.unet)
    del broken["double_blocks.0.processor.ip_adapter_double_stream_v_proj.bias"]
    save_file(broken, str(tmp_path / "flux-ip-broken.safetensors"))
    with pytest.raises(ModelError, match="flux-ip-broken.*missing double_blocks.0.processor.ip_adapter_double_stream_v"):
        load_controlnet(tmp_path / "flux-ip-broken.safetensors")
    with pytest.raises(InvalidParameter) as err:  # txt2img without a picture for the unit
        _run(model, width=WIDTH, height=HEIGHT, control_units=(_unit(root, image=None),))
    assert err.value.field == "control_units[0].image"


def test_black_picture_for_the_negative_rows(flux):
    """The negative prompt's tokens are the adapter's reading of a black picture (diffusers' FLUX pipeline)."""
    from underpaint.models.controlnet import load_controlnet
    from underpaint.models.ip_adapter import picture_states

    model, root, encoder = flux
    net = load_controlnet(root / "controlnet" / "flux-ip-adapter.safetensors")
    states, empty = picture_states(encoder, net.module, _picture(5))
    black = Image.new("RGB", (WIDTH, HEIGHT))
    with torch.no_grad():
        want = encoder(_processor()([_picture(5), black], return_tensors="pt").pixel_values).image_embeds
    torch.testing.assert_close(torch.cat([states, empty]), want, atol=1e-5, rtol=1e-5)


def test_a_whole_clip_model_serves_as_the_encoder(flux, tmp_path):
    """openai/clip-vit-large-patch14 as Interrogate CLIP keeps it (a transformers folder in models/clip, text
    half included) or as its one model.safetensors in clip_vision/: its vision half reads the picture."""
    from transformers import CLIPConfig, CLIPModel

    from underpaint.models.registry import ModelsDir

    model, root, encoder = flux
    vision = encoder.config.to_dict()
    whole = CLIPModel(CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                  num_attention_heads=2, vocab_size=100),
                                 vision_config=vision, projection_dim=vision["projection_dim"]))
    whole.vision_model.load_state_dict(encoder.vision_model.state_dict())
    whole.visual_projection.load_state_dict(encoder.visual_projection.state_dict())
    want = _pixels(_run(model, width=WIDTH, height=HEIGHT, control_units=(_unit(root),)).images[0])

    folder_root = tmp_path / "as-folder"
    (folder_root / "CLIP").mkdir(parents=True)
    whole.save_pretrained(folder_root / "CLIP" / "clip-vit-tiny")
    (folder_root / "CLIP" / "blip-captioner").mkdir()  # another transformers model there is passed over
    (folder_root / "CLIP" / "blip-captioner" / "config.json").write_text('{"model_type": "blip"}')
    file_root = tmp_path / "as-file"
    (file_root / "clip_vision").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in whole.state_dict().items()}, str(file_root / "clip_vision" / "clip-l.safetensors"))
    for where in (folder_root, file_root):
        other = types.SimpleNamespace(**{**vars(model), "models_dir": ModelsDir(where)})
        other.__dict__.pop("_clip_vision", None)
        got = _pixels(_run(other, width=WIDTH, height=HEIGHT, control_units=(_unit(root),)).images[0])
        assert np.array_equal(got, want), where
