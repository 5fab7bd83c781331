"""Control models that are not full ControlNets: T2I-Adapters (and Control-LoRAs), loaded from the
layouts people download and run as ControlNet units.

References: diffusers' ``T2IAdapter.from_pretrained`` for the adapter weights (the folder is written
by diffusers itself from the original file, renamed by the structure of TencentARC's classes), and
diffusers' ``StableDiffusionAdapterPipeline`` for a whole generation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_controlnet import t2i_adapter_config, write_t2i_adapter, write_t2i_adapter_folder
from underpaint.errors import ModelError
from underpaint.models.controlnet import inspect_controlnet, list_controlnets, load_controlnet, resolve_controlnet
from underpaint.models.detect import Family
from underpaint.params import GenerationParams
from underpaint.pipeline.control import ControlUnit


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def sd1_adapter(adapter_dir):
    return write_t2i_adapter(adapter_dir / "t2iadapter_canny_sd15v2.safetensors", "full")


@pytest.fixture(scope="module")
def control_map() -> Image.Image:
    from tiny_controlnet import ready_map

    return ready_map()


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# --- loading ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["full", "light", "xl"])
def test_original_adapter_loads_to_the_module_diffusers_loads_from_its_folder(adapter_dir, kind):
    from diffusers import T2IAdapter

    original = write_t2i_adapter(adapter_dir / f"orig-{kind}.pth", kind)  # torch file, as TencentARC ships them
    folder = write_t2i_adapter_folder(adapter_dir / f"folder-{kind}", original, kind)
    reference = T2IAdapter.from_pretrained(str(folder), local_files_only=True).state_dict()
    for path, layout in ((original, "original"), (folder, "diffusers-folder"),
                         (folder / "diffusion_pytorch_model.safetensors", "diffusers-file")):
        info = inspect_controlnet(path)
        assert info.kind == "t2i-adapter" and info.layout == layout
        expected = {k: v for k, v in t2i_adapter_config(kind).items() if not k.startswith("_")}
        assert {k: info.config[k] for k in expected} == expected
        assert info.family == (Family.SDXL if kind == "xl" else Family.SD1)
        ours = load_controlnet(path).module.state_dict()
        assert ours.keys() == reference.keys(), layout
        assert all(torch.equal(ours[k], reference[k]) for k in ours), layout


def test_original_names_under_adapter_prefix_load_the_same(adapter_dir, sd1_adapter):
    from safetensors.torch import load_file, save_file

    prefixed = adapter_dir / "t2iadapter_prefixed.safetensors"
    save_file({"adapter." + k: v for k, v in load_file(str(sd1_adapter)).items()}, str(prefixed))
    info = inspect_controlnet(prefixed)
    assert (info.kind, info.layout, info.prefix) == ("t2i-adapter", "original", "adapter.")
    ours, plain = load_controlnet(prefixed).module.state_dict(), load_controlnet(sd1_adapter).module.state_dict()
    assert ours.keys() == plain.keys() and all(torch.equal(ours[k], plain[k]) for k in ours)


def test_grey_map_adapter_takes_one_channel(adapter_dir):
    path = write_t2i_adapter(adapter_dir / "t2iadapter_sketch_sd15v2.safetensors", "full", in_channels=1)
    info = inspect_controlnet(path)
    assert info.config["in_channels"] == 1 and info.config["downscale_factor"] == 8


def test_adapters_are_listed_and_named_like_controlnets(adapter_dir, sd1_adapter):
    assert sd1_adapter in list_controlnets(adapter_dir)
    assert resolve_controlnet("t2iadapter_canny_sd15v2", adapter_dir, kind=None, family=None) == sd1_adapter


def test_style_adapter_is_refused_by_name(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "t2iadapter_style_sd14v1.safetensors"
    save_file({"style_embedding": torch.zeros(1, 8, 16), "ln_post.weight": torch.ones(16)}, str(path))
    with pytest.raises(ModelError, match="style adapter"):
        inspect_controlnet(path)


# --- generation -----------------------------------------------------------------------------------------------


def test_adapter_unit_equals_diffusers_adapter_pipeline(sd1_engine, sd1_adapter, control_map):
    from diffusers import EulerDiscreteScheduler, StableDiffusionAdapterPipeline

    steps, weight, seed, cfg = 4, 0.8, 123, 6.0
    prompt, negative = "a lighthouse at dusk", "blurry"
    unit = ControlUnit(image=control_map, module="none", model=str(sd1_adapter), weight=weight)
    ours = sd1_engine.generate(GenerationParams(
        prompt=prompt, negative_prompt=negative, width=64, height=64, steps=steps, cfg_scale=cfg, sampler="Euler",
        scheduler="Automatic", seed=seed, rng="cpu", control_units=(unit,))).images[0]

    m = sd1_engine.model
    pipe = StableDiffusionAdapterPipeline(
        vae=m.vae, text_encoder=m.text_encoders[0], tokenizer=m.tokenizers[0], unet=m.unet,
        adapter=load_controlnet(sd1_adapter).module,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         num_train_timesteps=1000, timestep_spacing="linspace"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt=prompt, negative_prompt=negative, image=control_map, height=64, width=64,
               num_inference_steps=steps, guidance_scale=cfg, adapter_conditioning_scale=weight,
               generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
    ref_u8 = (np.clip(ref, 0, 1) * 255).astype(np.uint8).astype(np.int16)
    diff = np.abs(_pixels(ours) - ref_u8)
    assert diff.max() <= 1, diff.max()
    plain = sd1_engine.generate(GenerationParams(
        prompt=prompt, negative_prompt=negative, width=64, height=64, steps=steps, cfg_scale=cfg, sampler="Euler",
        seed=seed, rng="cpu")).images[0]
    assert np.abs(_pixels(plain) - _pixels(ours)).max() > 2  # the adapter did something


def test_adapter_modes_scale_features_as_the_extension_does(sd1_adapter, control_map):
    """Balanced: weight x features; the other two modes: the extension's soft ramp (0.25, 0.62, 0.825, 1.0
    of the weight, shallow first); "ControlNet is more important" also gives the negative prompt nothing."""
    from underpaint.models.t2i_adapter import adapter_features
    from underpaint.pipeline.control import (BALANCED, CONTROL_MORE_IMPORTANT, PROMPT_MORE_IMPORTANT, ActiveUnit,
                                             ControlStack, hint_tensor)

    net = load_controlnet(sd1_adapter)
    hint = hint_tensor(np.asarray(control_map), device="cpu", dtype=torch.float32)
    with torch.no_grad():
        reference = net.module(hint)  # diffusers' T2IAdapter forward

    def stack(mode):
        unit = ControlUnit(image=control_map, module="none", model=str(sd1_adapter), weight=0.5, control_mode=mode)
        return ControlStack([ActiveUnit(unit, net, hint, adapter_features(net.module, hint, "x"))], steps=4)

    for mode, ramp in ((BALANCED, (1.0, 1.0)), (PROMPT_MORE_IMPORTANT, (0.25, 0.62))):
        got = stack(mode).intrablock(2)
        assert len(got) == len(reference) == 2
        for g, r, k in zip(got, reference, ramp):
            assert g.shape == (2, *r.shape[1:])
            torch.testing.assert_close(g, (r * (0.5 * k)).expand(2, -1, -1, -1), rtol=1e-6, atol=0)
    rows = torch.tensor([1.0, 0.0])
    strong = stack(CONTROL_MORE_IMPORTANT).intrablock(2, rows)
    soft = stack(PROMPT_MORE_IMPORTANT).intrablock(2)
    for g, s in zip(strong, soft):
        assert torch.equal(g[0], s[0]) and not g[1].any()
    # Outside the guidance window nothing is added; each call returns a fresh list (the UNet pops it).
    late = ControlStack([ActiveUnit(ControlUnit(image=control_map, module="none", guidance_start=0.5), net, hint,
                                    adapter_features(net.module, hint, "x"))], steps=4)
    assert late.intrablock(2) is None
    late.on_step(2)
    first = late.intrablock(2)
    first.pop(0)
    assert len(late.intrablock(2)) == 2


def _txt2img(engine, units, **extra):
    return engine.generate(GenerationParams(prompt="a castle", steps=extra.pop("steps", 3), sampler="Euler",
                                            seed=9, width=64, height=64, control_units=tuple(units), **extra))


def test_adapter_weight_zero_equals_no_adapter(sd1_engine, sd1_adapter, control_map):
    unit = ControlUnit(image=control_map, module="none", model=str(sd1_adapter), weight=0.0)
    assert _txt2img(sd1_engine, [unit]).images[0].tobytes() == _txt2img(sd1_engine, []).images[0].tobytes()


def test_adapter_guidance_window_and_infotext(sd1_engine, sd1_adapter, control_map):
    from underpaint.models.controlnet import infotext_name

    full = ControlUnit(image=control_map, module="none", model=str(sd1_adapter))
    late = ControlUnit(image=control_map, module="none", model=str(sd1_adapter), guidance_start=0.9)
    plain = _txt2img(sd1_engine, []).images[0]
    result = _txt2img(sd1_engine, [full])
    assert np.abs(_pixels(result.images[0]) - _pixels(plain)).max() > 2
    # A window that no step reaches (3 steps: counters 0, 0, 1) is the same as no adapter.
    assert _txt2img(sd1_engine, [late]).images[0].tobytes() == plain.tobytes()
    assert f"Model: {infotext_name(sd1_adapter)}" in result.infotexts[0]


def test_adapter_of_another_family_is_refused(sd1_engine, adapter_dir, control_map):
    xl = write_t2i_adapter(adapter_dir / "t2i-adapter_xl_canny.safetensors", "xl")
    with pytest.raises(ModelError, match="sdxl"):
        _txt2img(sd1_engine, [ControlUnit(image=control_map, module="none", model=str(xl))])


def test_sdxl_adapter_steers_an_sdxl_model(sdxl_file, adapter_dir, control_map):
    from underpaint.pipeline.engine import Engine

    engine = Engine.load(sdxl_file, device="cpu", dtype="fp32")
    xl = write_t2i_adapter(adapter_dir / "t2i-adapter_xl_sketch.safetensors", "xl")
    common = dict(prompt="a castle", steps=2, sampler="Euler", seed=3, width=64, height=64)
    plain = engine.generate(GenerationParams(**common)).images[0]
    steered = engine.generate(GenerationParams(
        control_units=(ControlUnit(image=control_map, module="none", model=str(xl)),), **common)).images[0]
    assert np.abs(_pixels(plain) - _pixels(steered)).max() > 2


# --- Control-LoRA -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_engine(sdxl_file):
    from underpaint.pipeline.engine import Engine

    return Engine.load(sdxl_file, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def control_lora(adapter_dir):
    from tiny_controlnet import write_control_lora

    return write_control_lora(adapter_dir / "control-lora-canny-rank4.safetensors", "sdxl")


@pytest.fixture(scope="module")
def merged_file(adapter_dir, control_lora, sdxl_file):
    """The same ControlNet written out in full (original layout), from the checkpoint file's own weights."""
    from safetensors.torch import save_file

    from tiny_controlnet import merged_control_lora

    path = adapter_dir / "control-lora-merged.safetensors"
    save_file(merged_control_lora(control_lora, sdxl_file), str(path))
    return path


def test_control_lora_is_detected_by_its_marker(control_lora):
    info = inspect_controlnet(control_lora)
    assert info.kind == "control-lora" and info.family == Family.SDXL
    with pytest.raises(ModelError, match="base model"):
        load_controlnet(control_lora)  # it needs a UNet to be built on


def test_control_lora_weights_are_base_plus_up_down(sdxl_engine, control_lora, merged_file, adapter_dir):
    from safetensors.torch import load_file

    from tiny_controlnet import SDXL_TIME_IDS, diffusers_reference

    built = load_controlnet(control_lora, base_unet=sdxl_engine.model.unet).module.state_dict()
    reference = diffusers_reference(merged_file, "sdxl", adapter_dir / "merged-config", fill_label_emb=True)
    ref = reference.state_dict()
    assert built.keys() == ref.keys()
    for key in built:
        assert torch.equal(built[key], ref[key]), key
    # Full tensors are the file's own values; low-rank ones really moved away from the base.
    raw = load_file(str(control_lora))
    assert torch.equal(built["controlnet_cond_embedding.conv_in.weight"], raw["input_hint_block.0.weight"])
    base = sdxl_engine.model.unet.state_dict()
    assert not torch.equal(built["down_blocks.1.attentions.0.proj_in.weight"],
                           base["down_blocks.1.attentions.0.proj_in.weight"])
    assert reference.config.addition_time_embed_dim == SDXL_TIME_IDS


def test_control_lora_unit_equals_the_full_controlnet_it_stands_for(sdxl_engine, control_lora, merged_file,
                                                                   control_map):
    common = dict(prompt="a castle", steps=2, sampler="Euler", seed=3, width=64, height=64)

    def run(model, weight=1.0):
        unit = ControlUnit(image=control_map, module="none", model=str(model), weight=weight)
        return sdxl_engine.generate(GenerationParams(control_units=(unit,), **common))

    lora_result = run(control_lora)
    assert lora_result.images[0].tobytes() == run(merged_file).images[0].tobytes()
    plain = sdxl_engine.generate(GenerationParams(**common)).images[0]
    assert np.abs(_pixels(plain) - _pixels(lora_result.images[0])).max() > 2
    assert run(control_lora, 0.0).images[0].tobytes() == plain.tobytes()
    assert "Model: control-lora-canny-rank4 [" in lora_result.infotexts[0]


def test_control_lora_on_an_sd1_checkpoint_is_refused(sd1_engine, control_lora, control_map):
    with pytest.raises(ModelError, match="Control-LoRA control-lora-canny-rank4 is made for sdxl"):
        _txt2img(sd1_engine, [ControlUnit(image=control_map, module="none", model=str(control_lora))])


def test_control_lora_is_built_on_the_checkpoint_not_on_a_request_lora(sdxl_file, control_lora, merged_file,
                                                                       control_map, tmp_path):
    from safetensors.torch import save_file

    from underpaint.pipeline.engine import Engine

    models = tmp_path / "models"
    (models / "loras").mkdir(parents=True)
    engine = Engine.load(sdxl_file, models_dir=models, device="cpu", dtype="fp32")
    weight = engine.model.unet.get_submodule("down_blocks.1.attentions.0.proj_in").weight
    g = torch.Generator().manual_seed(0)
    key = "lora_unet_down_blocks_1_attentions_0_proj_in"
    save_file({f"{key}.lora_up.weight": torch.randn(weight.shape[0], 4, generator=g),
               f"{key}.lora_down.weight": torch.randn(4, weight.shape[1], generator=g),
               f"{key}.alpha": torch.tensor(4.0)}, str(models / "loras" / "strong.safetensors"))
    common = dict(steps=2, sampler="Euler", seed=3, width=64, height=64)

    def run(model, prompt="a castle"):
        unit = ControlUnit(image=control_map, module="none", model=str(model))
        return engine.generate(GenerationParams(prompt=prompt, control_units=(unit,), **common)).images[0]

    run(control_lora, "a castle <lora:strong:1>")  # the Control-LoRA is first built while the LoRA is merged
    assert run(control_lora).tobytes() == run(merged_file).tobytes()
