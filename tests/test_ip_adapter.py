"""IP-Adapter units (models/ip_adapter.py): a picture as a prompt, checked against diffusers.

Tiny files in the released layouts are written here: a CLIP vision model (transformers'
``CLIPVisionModelWithProjection``, saved as one safetensors file as ComfyUI keeps them, and as a
transformers folder), and IP-Adapters for the tiny SD 1.5 UNet with Tencent's key names (base, Plus
with its Resampler, full-face) as flat safetensors and as the nested ``.bin``. The reference is
diffusers' own IP-Adapter path: the same tensors given to ``UNet2DConditionModel._load_ip_adapter_weights``
(diffusers' converter and ``IPAdapterAttnProcessor2_0``), the picture read by the same encoder through
transformers' ``CLIPImageProcessor``, a whole txt2img run with ``ip_adapter_image``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from underpaint.errors import ModelError, ModelNotFound
from underpaint.models import ip_adapter as ipa
from underpaint.params import GenerationParams
from underpaint.pipeline.control import ControlUnit

CLIP_SIZE = 32


def _clip_config():
    from transformers import CLIPVisionConfig

    # one head and quick GELU: what the shapes of a 32-wide encoder say (models/ip_adapter.clip_vision_config)
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, projection_dim=24, num_hidden_layers=2,
                            num_attention_heads=1, image_size=CLIP_SIZE, patch_size=8, hidden_act="quick_gelu")


def _encoder():
    from transformers import CLIPVisionModelWithProjection

    torch.manual_seed(0)
    return CLIPVisionModelWithProjection(_clip_config()).eval()


def _processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(do_resize=True, size={"shortest_edge": CLIP_SIZE}, resample=3, do_center_crop=True,
                              crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE}, do_normalize=True,
                              image_mean=list(ipa.CLIP_MEAN), image_std=list(ipa.CLIP_STD), do_convert_rgb=True)


def _cross_layers(unet) -> list[tuple[int, int]]:
    """(text width, inner width) of each cross-attention layer, in diffusers' processor order."""
    out = []
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            layer = unet.get_submodule(name.removesuffix(".processor"))
            out.append((layer.to_k.in_features, layer.to_k.out_features))
    return out


def adapter_tensors(unet, kind: str, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """An IP-Adapter for ``unet`` with Tencent's flat key names: "base" (4 tokens from the 24-wide image
    embedding), "plus" (a 4-layer Resampler, as released, with 6 queries over the 32-wide hidden states) or "full"."""
    gen = torch.Generator().manual_seed(seed)

    def t(*shape, std=0.2):
        return torch.randn(*shape, generator=gen) * std

    cross = unet.config.cross_attention_dim
    sd: dict[str, torch.Tensor] = {}
    if kind == "base":
        sd.update({"image_proj.proj.weight": t(4 * cross, 24), "image_proj.proj.bias": t(4 * cross),
                   "image_proj.norm.weight": 1 + t(cross), "image_proj.norm.bias": t(cross)})
    elif kind == "full":
        sd.update({"image_proj.proj.0.weight": t(32, 32), "image_proj.proj.0.bias": t(32),
                   "image_proj.proj.2.weight": t(cross, 32), "image_proj.proj.2.bias": t(cross),
                   "image_proj.proj.3.weight": 1 + t(cross), "image_proj.proj.3.bias": t(cross)})
    else:
        dim = 64
        sd.update({"image_proj.latents": t(1, 6, dim, std=1.0), "image_proj.proj_in.weight": t(dim, 32),
                   "image_proj.proj_in.bias": t(dim), "image_proj.proj_out.weight": t(cross, dim),
                   "image_proj.proj_out.bias": t(cross), "image_proj.norm_out.weight": 1 + t(cross),
                   "image_proj.norm_out.bias": t(cross)})
        for i in range(4):
            p = f"image_proj.layers.{i}."
            sd.update({p + "0.norm1.weight": 1 + t(dim), p + "0.norm1.bias": t(dim), p + "0.norm2.weight": 1 + t(dim),
                       p + "0.norm2.bias": t(dim), p + "0.to_q.weight": t(dim, dim), p + "0.to_kv.weight": t(2 * dim, dim),
                       p + "0.to_out.weight": t(dim, dim), p + "1.0.weight": 1 + t(dim), p + "1.0.bias": t(dim),
                       p + "1.1.weight": t(4 * dim, dim), p + "1.3.weight": t(dim, 4 * dim)})
    for i, (width, inner) in enumerate(_cross_layers(unet)):
        sd[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = t(inner, width, std=0.5)
        sd[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = t(inner, width, std=0.5)
    return sd


def nested(sd: dict[str, torch.Tensor]) -> dict:
    """The ``.bin`` form: {"image_proj": {...}, "ip_adapter": {...}}."""
    out: dict = {"image_proj": {}, "ip_adapter": {}}
    for key, value in sd.items():
        part, _, rest = key.partition(".")
        out[part][rest] = value
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory, sd1_file, sd1_engine):
    """A models folder: the tiny checkpoint, the encoder in clip_vision/, base/plus/full adapters in controlnet/."""
    from test_server_support import tiny_models_dir

    root = tiny_models_dir(tmp_path_factory.mktemp("ip-adapter-models"), sd1_file)
    (root / "clip_vision").mkdir()
    encoder = _encoder()
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()},
              str(root / "clip_vision" / "CLIP-ViT-tiny.safetensors"))
    (root / "controlnet").mkdir()
    unet = sd1_engine.model.unet
    for kind in ("base", "plus", "full"):
        save_file(adapter_tensors(unet, kind), str(root / "controlnet" / f"ip-adapter-{kind}_sd15.safetensors"))
    torch.save(nested(adapter_tensors(unet, "plus")), root / "controlnet" / "ip-adapter-plus_sd15.bin")
    return root, encoder


@pytest.fixture(scope="module")
def engine(models, sd1_file):
    from underpaint.pipeline.engine import Engine

    root, _ = models
    return Engine.load(root / "checkpoints" / "tiny-sd1.safetensors", device="cpu", dtype="fp32", models_dir=root)


def _picture(seed: int = 1, size=(40, 56)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# --- reading the files and the picture ----------------------------------------------------------------------


def test_clip_pixels_equal_transformers_processor():
    for size in ((40, 56), (57, 31), (32, 32)):
        picture = _picture(size=size)
        expected = _processor()(picture, return_tensors="pt").pixel_values
        torch.testing.assert_close(ipa.clip_pixels(picture, CLIP_SIZE), expected, atol=1e-5, rtol=0)
    strip = _picture(size=(3, 20000))  # a strip is cut to its middle 8:1 first: no 32 x 213333 resize
    assert ipa.clip_pixels(strip, CLIP_SIZE).shape == (1, 3, CLIP_SIZE, CLIP_SIZE)


def test_encoder_from_one_file_or_a_folder_equals_transformers(models, tmp_path):
    root, encoder = models
    x = ipa.clip_pixels(_picture(), CLIP_SIZE)
    want = encoder(x, output_hidden_states=True)
    folder = tmp_path / "clip-vision-folder"
    encoder.save_pretrained(folder)
    for path in (root / "clip_vision" / "CLIP-ViT-tiny.safetensors", folder):
        ours = ipa.load_clip_vision(path)(x, output_hidden_states=True)
        torch.testing.assert_close(ours.image_embeds, want.image_embeds)
        torch.testing.assert_close(ours.hidden_states[-2], want.hidden_states[-2])


@pytest.mark.parametrize("kind", ["base", "plus", "full"])
def test_projections_equal_diffusers(sd1_engine, kind):
    """The image projections against diffusers' own (ImageProjection, IPAdapterPlusImageProjection,
    IPAdapterFullImageProjection), built by its converter from the same tensors."""
    unet = copy.deepcopy(sd1_engine.model.unet)
    sd = adapter_tensors(unet, kind, seed=3)
    ours = ipa.build_ip_adapter(sd, kind, "cpu", torch.float32)
    unet._load_ip_adapter_weights([nested(sd)])
    reference = unet.encoder_hid_proj.image_projection_layers[0]
    states = torch.randn(2, 24) if kind == "base" else torch.randn(2, 5, 32)
    torch.testing.assert_close(ours.tokens(states), reference(states), atol=1e-5, rtol=1e-5)


def test_bin_and_safetensors_load_alike(models):
    from underpaint.models.controlnet import load_controlnet

    root, _ = models
    a = load_controlnet(root / "controlnet" / "ip-adapter-plus_sd15.safetensors")
    b = load_controlnet(root / "controlnet" / "ip-adapter-plus_sd15.bin")
    assert a.info.kind == b.info.kind == "ip-adapter" and a.module.shape == b.module.shape
    assert a.module.shape.kind == "plus" and a.module.shape.tokens == 6
    for (name, x), (_, y) in zip(a.module.state_dict().items(), b.module.state_dict().items()):
        assert torch.equal(x, y), name


# --- whole generations against diffusers ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["base", "plus", "full"])
def test_ip_adapter_unit_equals_diffusers(engine, models, kind):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    root, encoder = models
    steps, weight, seed, cfg = 4, 0.7, 21, 6.0
    prompt, negative = "a lighthouse at dusk", "blurry"
    picture = _picture()
    unit = ControlUnit(image=picture, module="ip-adapter-auto", model=f"ip-adapter-{kind}_sd15", weight=weight)
    base = dict(prompt=prompt, negative_prompt=negative, width=64, height=64, steps=steps, cfg_scale=cfg,
                sampler="Euler", scheduler="Automatic", seed=seed, rng="cpu")
    result = engine.generate(GenerationParams(**base, control_units=(unit,)))
    ours = result.images[0]

    m = engine.model
    unet = copy.deepcopy(m.unet)
    unet._load_ip_adapter_weights([nested(adapter_tensors(m.unet, kind))])
    pipe = StableDiffusionPipeline(
        vae=m.vae, text_encoder=m.text_encoders[0], tokenizer=m.tokenizers[0], unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         num_train_timesteps=1000, timestep_spacing="linspace"),
        safety_checker=None, feature_extractor=_processor(), image_encoder=encoder, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.set_ip_adapter_scale(weight)
    ref = pipe(prompt=prompt, negative_prompt=negative, ip_adapter_image=picture, height=64, width=64,
               num_inference_steps=steps, guidance_scale=cfg, generator=torch.Generator().manual_seed(seed),
               output_type="np").images[0]
    ref_u8 = (np.clip(ref, 0, 1) * 255).astype(np.uint8).astype(np.int16)
    diff = np.abs(_pixels(ours) - ref_u8)
    assert diff.max() <= 1, diff.max()
    plain = engine.generate(GenerationParams(**base)).images[0]
    assert np.abs(_pixels(plain) - _pixels(ours)).max() > 2  # the picture steered it
    assert f"Module: ip-adapter-auto, Model: ip-adapter-{kind}_sd15" in result.infotexts[0]


def test_weight_zero_and_guidance_window(engine):
    base = dict(prompt="a lighthouse", width=64, height=64, steps=4, sampler="Euler", seed=5, rng="cpu")
    plain = engine.generate(GenerationParams(**base)).images[0]
    unit = ControlUnit(image=_picture(), module="ip-adapter_clip_h", model="ip-adapter-base_sd15", weight=0.0)
    off = engine.generate(GenerationParams(**base, control_units=(unit,))).images[0]
    assert np.array_equal(_pixels(off), _pixels(plain))
    late = ControlUnit(image=_picture(), module="ip-adapter_clip_sd15", model="ip-adapter-base_sd15", weight=1.0,
                       guidance_start=0.5)
    early = ControlUnit(image=_picture(), module="ip-adapter_clip_sd15", model="ip-adapter-base_sd15", weight=1.0,
                        guidance_end=0.4)
    full = ControlUnit(image=_picture(), module="ip-adapter_clip_sd15", model="ip-adapter-base_sd15", weight=1.0)
    outs = [_pixels(engine.generate(GenerationParams(**base, control_units=(u,))).images[0]) for u in (late, early, full)]
    assert all(np.abs(o - _pixels(plain)).max() > 0 for o in outs)
    assert np.abs(outs[0] - outs[2]).max() > 0 and np.abs(outs[1] - outs[2]).max() > 0


def test_img2img_unit_without_a_picture_reads_the_input(engine):
    """As other units: without a picture of its own, the unit reads the img2img input."""
    photo = _picture(7, (64, 64))
    base = dict(prompt="a lighthouse", steps=3, sampler="Euler", seed=5, rng="cpu", strength=0.7, init_images=(photo,))
    own = ControlUnit(image=photo, module="ip-adapter-auto", model="ip-adapter-plus_sd15.bin")
    none = ControlUnit(module="ip-adapter-auto", model="ip-adapter-plus_sd15.bin")
    a = engine.generate(GenerationParams(**base, control_units=(own,))).images[0]
    b = engine.generate(GenerationParams(**base, control_units=(none,))).images[0]
    assert np.array_equal(_pixels(a), _pixels(b))


@pytest.mark.parametrize("kind", ["base", "plus"])
def test_several_pictures_average_their_tokens(engine, models, kind):
    """Multi-Inputs: the unit's image tokens are the mean of each picture's, each read as diffusers reads one
    (transformers' processor and encoder, diffusers' projection of the same adapter tensors)."""
    from underpaint.models.controlnet import load_controlnet
    from underpaint.pipeline.control import image_prompt_unit

    root, encoder = models
    pictures = [_picture(11), _picture(12, (70, 30)), _picture(13, (33, 33))]
    net = load_controlnet(root / "controlnet" / f"ip-adapter-{kind}_sd15.safetensors")
    unit = ControlUnit(image=pictures[0], extra_images=pictures[1:], module="ip-adapter-auto",
                       model=f"ip-adapter-{kind}_sd15")
    cond, uncond = image_prompt_unit(engine.model, unit, net, 0, None, 64, 64).ip

    unet = copy.deepcopy(engine.model.unet)
    unet._load_ip_adapter_weights([nested(adapter_tensors(engine.model.unet, kind))])
    project = unet.encoder_hid_proj.image_projection_layers[0]
    with torch.no_grad():
        out = encoder(_processor()(pictures, return_tensors="pt").pixel_values, output_hidden_states=True)
        states = out.image_embeds if kind == "base" else out.hidden_states[-2]
        want = torch.stack([project(states[i:i + 1]) for i in range(3)]).mean(0)
    torch.testing.assert_close(cond, want, atol=1e-5, rtol=1e-5)
    alone = image_prompt_unit(engine.model, ControlUnit(image=pictures[0], module="ip-adapter-auto",
                                                        model=f"ip-adapter-{kind}_sd15"), net, 0, None, 64, 64).ip
    assert torch.equal(uncond, alone[1]) and not torch.allclose(cond, alone[0], atol=1e-3)


def test_several_pictures_in_a_generation(engine):
    """The same picture twice is that picture once; the order of the pictures does not matter."""
    a, b = _picture(21), _picture(22)
    base = dict(prompt="a lighthouse", width=64, height=64, steps=3, sampler="Euler", seed=4, rng="cpu")

    def run(first, *more):
        unit = ControlUnit(image=first, extra_images=more, module="ip-adapter-auto", model="ip-adapter-plus_sd15")
        return _pixels(engine.generate(GenerationParams(**base, control_units=(unit,))).images[0])

    once, twice, ab, ba = run(a), run(a, a), run(a, b), run(b, a)
    assert np.array_equal(once, twice) and np.array_equal(ab, ba)
    assert np.abs(ab - once).max() > 0 and np.abs(ab - run(b)).max() > 0


def test_several_pictures_only_for_ip_adapter_units():
    from underpaint.errors import InvalidParameter

    with pytest.raises(InvalidParameter) as err:
        ControlUnit(image=_picture(), extra_images=(_picture(2),), module="canny")
    assert err.value.field == "extra_images" and "only IP-Adapter units" in str(err.value)
    with pytest.raises(InvalidParameter) as err:
        ControlUnit(extra_images=(_picture(2),), module="ip-adapter-auto")
    assert err.value.field == "extra_images" and "first picture" in str(err.value)


def test_refusals_name_the_field(engine, models, tmp_path, sd1_file):
    from underpaint.errors import InvalidParameter
    from underpaint.pipeline.engine import Engine

    base = dict(prompt="x", width=64, height=64, steps=2, sampler="Euler", seed=1, rng="cpu")
    with pytest.raises(InvalidParameter) as err:  # txt2img without a picture for the unit
        engine.generate(GenerationParams(**base, control_units=(ControlUnit(module="ip-adapter-auto",
                                                                            model="ip-adapter-base_sd15"),)))
    assert err.value.field == "control_units[0].image"
    with pytest.raises(InvalidParameter) as err:  # an IP-Adapter with a map preprocessor
        engine.generate(GenerationParams(**base, control_units=(ControlUnit(image=_picture(), module="canny",
                                                                            model="ip-adapter-base_sd15"),)))
    assert err.value.field == "control_units[0].module"
    root, _ = models
    bare = tmp_path / "bare"
    (bare / "checkpoints").mkdir(parents=True)
    (bare / "controlnet").mkdir()
    (bare / "checkpoints" / "tiny-sd1.safetensors").write_bytes(sd1_file.read_bytes())
    (bare / "controlnet" / "ip-adapter-base_sd15.safetensors").write_bytes(
        (root / "controlnet" / "ip-adapter-base_sd15.safetensors").read_bytes())
    other = Engine.load(bare / "checkpoints" / "tiny-sd1.safetensors", device="cpu", dtype="fp32", models_dir=bare)
    with pytest.raises(ModelNotFound, match="CLIP vision model whose image embedding are 24 wide"):
        other.generate(GenerationParams(**base, control_units=(ControlUnit(image=_picture(), module="ip-adapter-auto",
                                                                           model="ip-adapter-base_sd15"),)))


def test_adapter_for_another_unet_is_refused(sdxl_file, models):
    from underpaint.pipeline.engine import Engine

    root, _ = models
    sdxl = Engine.load(sdxl_file, device="cpu", dtype="fp32", models_dir=root)
    unit = ControlUnit(image=_picture(), module="ip-adapter-auto", model=str(root / "controlnet" /
                                                                             "ip-adapter-base_sd15.safetensors"))
    with pytest.raises(ModelError, match="cross-attention layers"):
        sdxl.generate(GenerationParams(prompt="x", width=64, height=64, steps=2, sampler="Euler", seed=1, rng="cpu",
                                       control_units=(unit,)))


@pytest.mark.parametrize("change,named", [
    (lambda sd: sd.pop("ip_adapter.3.to_v_ip.weight"), "without a 2-D 'ip_adapter.3.to_v_ip.weight'"),
    (lambda sd: sd.update({"ip_adapter.4.to_k_ip.weight": torch.zeros(2, 2)}), "layers numbered [1, 3, 4"),
    (lambda sd: sd.update({"image_proj.norm.weight": torch.zeros(5)}), "not a whole number of 5-wide tokens"),
    (lambda sd: sd.update({"image_proj.extra": torch.zeros(5)}), "unexpected image_proj.extra"),
    (lambda sd: sd.update({"image_proj.proj.bias": torch.zeros(3)}), "image_proj.proj.bias is (3,)"),
    (lambda sd: sd.update({"image_proj.perceiver_resampler.x": torch.zeros(1)}), "FaceID"),
])
def test_broken_adapter_files_name_the_file(sd1_engine, tmp_path, change, named):
    from underpaint.models.controlnet import load_controlnet

    sd = adapter_tensors(sd1_engine.model.unet, "base")
    change(sd)
    path = tmp_path / "ip-adapter_broken.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ModelError) as info:
        load_controlnet(path)
    assert str(path) in str(info.value) and named in str(info.value), str(info.value)


def test_api_unit_as_the_extension_sends_it(engine, models):
    """An A1111 client's ControlNet unit with the extension's IP-Adapter module and model names: the same
    picture as the engine's, the unit in the infotext, the module listed."""
    from test_server_support import decode_b64, png_b64, real_api

    root, _ = models
    picture = _picture(3)
    unit = {"image": png_b64(picture), "module": "ip-adapter_clip_sd15", "model": "ip-adapter-base_sd15 [0badc0de]",
            "weight": 0.8, "enabled": True}
    body = {"prompt": "a lighthouse", "steps": 3, "width": 64, "height": 64, "sampler_name": "Euler", "seed": 5,
            "cfg_scale": 7, "alwayson_scripts": {"controlnet": {"args": [unit]}}}
    with real_api(root) as api:
        assert "ip-adapter_clip_h" in api.get("/controlnet/module_list").json()["module_list"]
        assert "ip-adapter-base_sd15" in " ".join(api.get("/controlnet/model_list").json()["model_list"])
        kind = api.get("/controlnet/control_types").json()["control_types"]["IP-Adapter"]
        assert kind["module_list"][0] == kind["default_option"] == "ip-adapter-auto" and "none" not in kind["module_list"]
        assert len(kind["model_list"]) == 5 and all("ip-adapter" in m for m in kind["model_list"][1:])
        r = api.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        got = decode_b64(r.json()["images"][0])
        bad = api.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [
            {**unit, "module": "canny"}]}}})
        assert bad.status_code == 422 and bad.json()["field"] == "alwayson_scripts.controlnet.args[0].module", bad.text
    import json

    info = json.loads(r.json()["info"])["infotexts"][0]
    assert "ControlNet 0: \"Module: ip-adapter_clip_h, Model: ip-adapter-base_sd15" in info
    want = engine.generate(GenerationParams(prompt="a lighthouse", steps=3, width=64, height=64, sampler="Euler",
                                            seed=5, cfg_scale=7, control_units=(ControlUnit(
                                                image=picture, module="ip-adapter_clip_h",
                                                model="ip-adapter-base_sd15", weight=0.8),))).images[0]
    assert np.array_equal(_pixels(got), _pixels(want))


def test_api_unit_with_several_pictures(engine, models):
    """The extension's Multi-Inputs form (``image`` a list of {"image", "mask"} entries) and its refusals."""
    from test_server_support import decode_b64, png_b64, real_api

    root, _ = models
    a, b = _picture(31), _picture(32)
    unit = {"image": [{"image": png_b64(a), "mask": None}, {"image": png_b64(b)}], "module": "ip-adapter-auto",
            "model": "ip-adapter-plus_sd15", "enabled": True}
    body = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler", "seed": 6}

    def with_unit(**change):
        return {**body, "alwayson_scripts": {"controlnet": {"args": [{**unit, **change}]}}}

    with real_api(root) as api:
        r = api.post("/sdapi/v1/txt2img", json=with_unit())
        assert r.status_code == 200, r.text
        got = decode_b64(r.json()["images"][0])
        refusals = [(with_unit(module="canny"), "image", "only IP-Adapter units"),
                    (with_unit(mask=png_b64(a)), "mask", "each entry's"),
                    (with_unit(image=[{"image": png_b64(a)}, {"mask": png_b64(b)}]), "image[1].mask", "no mask"),
                    (with_unit(image=[png_b64(a)]), "image", "a list of")]
        for request, field, words in refusals:
            bad = api.post("/sdapi/v1/txt2img", json=request)
            assert bad.status_code == 422, bad.text
            assert bad.json()["field"] == f"alwayson_scripts.controlnet.args[0].{field}", bad.text
            assert words in bad.text, bad.text
    want = engine.generate(GenerationParams(prompt="a lighthouse", steps=2, width=64, height=64, sampler="Euler",
                                            seed=6, control_units=(ControlUnit(
                                                image=a, extra_images=(b,), module="ip-adapter-auto",
                                                model="ip-adapter-plus_sd15"),))).images[0]
    assert np.array_equal(_pixels(got), _pixels(want))


def test_command_line_unit(engine, models, tmp_path, capsys):
    """``--control ip-adapter:REF[:WEIGHT] --control-model NAME`` as any unit: the picture the engine makes."""
    from underpaint.cli.main import main

    root, _ = models
    reference = tmp_path / "ref.png"
    _picture(9).save(reference)
    common = ["-p", "a lighthouse", "--models-dir", str(root), "--model", "tiny-sd1", "--steps", "2", "-W", "64",
              "-H", "64", "--device", "cpu", "--dtype", "fp32", "--seed", "3", "--sampler", "Euler",
              "--control", f"ip-adapter:{reference}:0.9", "--control-model", "ip-adapter-plus_sd15"]
    out = tmp_path / "out.png"
    assert main(["txt2img", *common, "-o", str(out)]) == 0, capsys.readouterr().err
    want = engine.generate(GenerationParams(prompt="a lighthouse", steps=2, width=64, height=64, sampler="Euler",
                                            seed=3, control_units=(ControlUnit(
                                                image=Image.open(reference), module="ip-adapter-auto",
                                                model="ip-adapter-plus_sd15", weight=0.9),))).images[0]
    assert np.array_equal(_pixels(Image.open(out)), _pixels(want))

    second = tmp_path / "second.png"  # --control-add-image: Multi-Inputs
    _picture(10).save(second)
    out2 = tmp_path / "out2.png"
    assert main(["txt2img", *common, "--control-add-image", str(second), "-o", str(out2)]) == 0, capsys.readouterr().err
    want = engine.generate(GenerationParams(prompt="a lighthouse", steps=2, width=64, height=64, sampler="Euler",
                                            seed=3, control_units=(ControlUnit(
                                                image=Image.open(reference), extra_images=(Image.open(second),),
                                                module="ip-adapter-auto", model="ip-adapter-plus_sd15",
                                                weight=0.9),))).images[0]
    assert np.array_equal(_pixels(Image.open(out2)), _pixels(want))
    with pytest.raises(SystemExit):
        main(["txt2img", *common[:-4], "--control-add-image", str(second), "-o", str(tmp_path / "x.png")])
    assert "--control-add-image must come after the --control" in capsys.readouterr().err
    assert main(["txt2img", *common, "--control", "canny:" + str(reference), "--control-add-image", str(second),
                 "-o", str(tmp_path / "y.png")]) != 0
    assert "only IP-Adapter units" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["base", "plus"])
def test_sdxl_unet_with_an_adapter_equals_diffusers(sdxl_file, kind):
    """SDXL's many cross-attention layers (numbered down, up, then middle) against diffusers' UNet with the
    same adapter loaded by its own converter, at one call with prompt and negative rows."""
    from underpaint.models.loader import load_model

    unet = load_model(sdxl_file).unet
    reference = copy.deepcopy(unet)
    sd = adapter_tensors(unet, kind, seed=4)
    reference._load_ip_adapter_weights([nested(sd)])
    for processor in reference.attn_processors.values():
        if hasattr(processor, "scale"):
            processor.scale = [0.6]
    adapter = ipa.build_ip_adapter(sd, "sdxl adapter", "cpu", torch.float32)
    gen = torch.Generator().manual_seed(0)
    states = torch.randn(2, 24, generator=gen) if kind == "base" else torch.randn(2, 5, 32, generator=gen)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([500, 500])
    context = torch.randn(2, 7, unet.config.cross_attention_dim, generator=gen)
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(2, pooled, generator=gen), "time_ids": torch.randn(2, 6, generator=gen)}
    with torch.no_grad():
        with ipa.adapters_applied(unet, [(adapter, adapter.tokens(states), 0.6)]):
            ours = unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
        theirs = reference(x, t, encoder_hidden_states=context,
                           added_cond_kwargs={**added, "image_embeds": [states.unsqueeze(1)]}).sample
        plain = unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
    assert len(ipa.cross_attention_layers(unet)) == len(adapter.shape.layers) > 4
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert (ours - plain).abs().max() > 1e-3


def test_only_masked_inpainting_keeps_the_reference_whole(engine):
    """"Only masked" crops the other units' maps to the region it paints; an IP-Adapter's picture is a
    reference, not a map, so it stays whole (and a unit without one reads the whole input picture)."""
    from underpaint.params import InpaintOptions

    photo = _picture(11, (64, 64))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (24, 24, 40, 40))
    base = dict(prompt="a lighthouse", steps=3, sampler="Euler", seed=5, rng="cpu", strength=0.8,
                init_images=(photo,), mask=mask, inpaint=InpaintOptions(full_res=True, full_res_padding=4))
    whole = ControlUnit(image=photo, module="ip-adapter-auto", model="ip-adapter-plus_sd15")
    none = ControlUnit(module="ip-adapter-auto", model="ip-adapter-plus_sd15")
    cropped = ControlUnit(image=photo.crop((20, 20, 44, 44)), module="ip-adapter-auto", model="ip-adapter-plus_sd15")
    a, b, c = (_pixels(engine.generate(GenerationParams(**base, control_units=(u,))).images[0])
               for u in (whole, none, cropped))
    assert np.array_equal(a, b) and np.abs(a - c).max() > 0


def test_sdxl_generation_with_an_adapter(sdxl_file, models, tmp_path):
    """Through the engine on an SDXL checkpoint: the adapter steers the picture, and at weight 0 it is
    the plain picture exactly."""
    from underpaint.pipeline.engine import Engine

    root, _ = models
    sdxl = Engine.load(sdxl_file, device="cpu", dtype="fp32", models_dir=root)
    path = tmp_path / "ip-adapter-plus_sdxl_vit-h.safetensors"
    save_file(adapter_tensors(sdxl.model.unet, "plus", seed=8), str(path))
    base = dict(prompt="a lighthouse", width=64, height=64, steps=3, sampler="Euler", seed=2, rng="cpu")
    plain = _pixels(sdxl.generate(GenerationParams(**base)).images[0])
    for weight, changed in ((0.0, False), (1.0, True)):
        unit = ControlUnit(image=_picture(), module="ip-adapter_clip_sdxl_plus_vith", model=str(path), weight=weight)
        out = _pixels(sdxl.generate(GenerationParams(**base, control_units=(unit,))).images[0])
        assert (np.abs(out - plain).max() > 0) == changed
