"""xinsir's SDXL union ControlNets (controlnet-union-sdxl-1.0, promax): loading the layouts people
download, and a unit run as its explicit ``union_control_type`` or the control type of its preprocessor.

References: diffusers' ``ControlNetUnionModel`` (built and saved by diffusers in ``tiny_controlnet``)
for the weights, and diffusers' ``StableDiffusionXLControlNetUnionPipeline`` for a whole generation.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_controlnet import write_union_folder
from underpaint.errors import InvalidParameter, ModelError
from underpaint.models.controlnet import inspect_controlnet, load_controlnet
from underpaint.models.detect import Family
from underpaint.params import GenerationParams
from underpaint.pipeline.control import ControlUnit


@pytest.fixture(scope="module")
def union_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("union")


@pytest.fixture(scope="module")
def promax_folder(union_dir):
    return write_union_folder(union_dir / "controlnet-union-sdxl-promax")


@pytest.fixture(scope="module")
def promax_file(union_dir, promax_folder):
    """The weights file alone, as people download ``diffusion_pytorch_model_promax.safetensors``."""
    path = union_dir / "diffusion_pytorch_model_promax.safetensors"
    shutil.copyfile(promax_folder / "diffusion_pytorch_model.safetensors", path)
    return path


@pytest.fixture(scope="module")
def union6_file(union_dir):
    """The first release's 6 control types (no tile, no inpaint)."""
    folder = write_union_folder(union_dir / "union6", 6, seed=43)
    path = union_dir / "controlnet-union-sdxl-1.0.safetensors"
    shutil.copyfile(folder / "diffusion_pytorch_model.safetensors", path)
    return path


@pytest.fixture(scope="module")
def sdxl_engine(sdxl_file):
    from underpaint.pipeline.engine import Engine

    return Engine.load(sdxl_file, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def lines() -> Image.Image:
    """White lines on black: a ready edge/scribble map, which tile, threshold and invert (of its
    negative) all turn into itself."""
    from tiny_controlnet import ready_map

    return ready_map()


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


COMMON = dict(prompt="a lighthouse at dusk", negative_prompt="blurry", steps=3, cfg_scale=6.0, sampler="Euler",
              scheduler="Automatic", seed=77, rng="cpu", width=64, height=64)


def _generate(engine, *units):
    return engine.generate(GenerationParams(control_units=tuple(units), **COMMON))


# --- loading ---------------------------------------------------------------------------------------------------


def test_folder_single_file_and_xinsir_folder_load_the_same_module(union_dir, promax_folder, promax_file):
    from diffusers import ControlNetUnionModel

    reference = ControlNetUnionModel.from_pretrained(str(promax_folder), local_files_only=True)
    ref = reference.state_dict()
    xinsir = union_dir / "xinsir-folder"  # xinsir's own config.json names the class ControlNetModel
    shutil.copytree(promax_folder, xinsir)
    cfg = json.loads((xinsir / "config.json").read_text())
    cfg["_class_name"] = "ControlNetModel"
    (xinsir / "config.json").write_text(json.dumps(cfg))
    for path in (promax_folder, promax_file, xinsir):
        info = inspect_controlnet(path)
        assert (info.kind, info.family) == ("union", Family.SDXL), path
        net = load_controlnet(path)
        assert type(net.module) is ControlNetUnionModel
        ours = net.module.state_dict()
        assert ours.keys() == ref.keys(), path
        assert all(torch.equal(ours[k], ref[k]) for k in ours), path
        for key in ("num_control_type", "num_trans_channel", "num_trans_head", "num_trans_layer", "num_proj_channel",
                    "addition_time_embed_dim", "block_out_channels", "transformer_layers_per_block",
                    "conditioning_embedding_out_channels", "attention_head_dim", "cross_attention_dim"):
            assert net.module.config[key] == reference.config[key], (path, key)
    assert inspect_controlnet(promax_file).config["num_control_type"] == 8


def test_six_type_file_is_read_from_its_shapes(union6_file):
    info = inspect_controlnet(union6_file)
    assert info.kind == "union" and info.config["num_control_type"] == 6


def test_an_incomplete_union_file_is_refused(tmp_path, promax_file):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(promax_file))
    del sd["spatial_ch_projs.weight"]
    path = tmp_path / "broken-union.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ModelError, match=r"broken-union\.safetensors: .*without spatial_ch_projs\.weight"):
        inspect_controlnet(path)


# --- generation ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields", [{"module": "tile_resample"}, {"module": "none", "union_control_type": "Tile"}],
                         ids=["tile-preprocessor", "ready-map-typed-tile"])
def test_union_unit_equals_diffusers_union_pipeline(sdxl_engine, promax_file, lines, fields):
    """A tile unit through the engine against diffusers' union pipeline with control mode 6 (tile), the
    same UNet, VAE, text embeddings (taken from the engine's first UNet call), noise and schedule; the
    tile preprocessor leaves the map as it is, so a ready-made map typed "Tile" must match as well."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLControlNetUnionPipeline

    m = sdxl_engine.model
    weight = 0.8
    unit = ControlUnit(image=lines, model=str(promax_file), weight=weight, **fields)
    seen = []
    hook = m.unet.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        ours = _generate(sdxl_engine, unit).images[0]
    finally:
        hook.remove()
    first = seen[0]
    context, extra = first["encoder_hidden_states"], first["added_cond_kwargs"]
    assert context.shape[0] == 2  # [prompt; negative] in one call
    assert extra["time_ids"][0].tolist() == [64, 64, 0, 0, 64, 64]  # what diffusers uses for 64x64

    pipe = StableDiffusionXLControlNetUnionPipeline(
        vae=m.vae, text_encoder=m.text_encoders[0], text_encoder_2=m.text_encoders[1], tokenizer=m.tokenizers[0],
        tokenizer_2=m.tokenizers[1], unet=m.unet, controlnet=load_controlnet(promax_file).module,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         num_train_timesteps=1000, timestep_spacing="linspace"),
    )
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt_embeds=context[:1], negative_prompt_embeds=context[1:],
               pooled_prompt_embeds=extra["text_embeds"][:1], negative_pooled_prompt_embeds=extra["text_embeds"][1:],
               control_image=[lines], control_mode=[6], height=64, width=64, num_inference_steps=COMMON["steps"],
               guidance_scale=COMMON["cfg_scale"], controlnet_conditioning_scale=weight,
               generator=torch.Generator().manual_seed(COMMON["seed"]), output_type="np").images[0]
    ref_u8 = (np.clip(ref, 0, 1) * 255).astype(np.uint8).astype(np.int16)
    diff = np.abs(_pixels(ours) - ref_u8)
    assert diff.max() <= 1, diff.max()
    plain = _generate(sdxl_engine).images[0]
    assert np.abs(_pixels(plain) - _pixels(ours)).max() > 2  # the union model did something


@pytest.fixture
def union_calls(monkeypatch) -> list[dict]:
    """The keyword arguments of every union ControlNet call (control type, hint, ...) while the test runs."""
    from diffusers import ControlNetUnionModel

    calls: list[dict] = []
    real = ControlNetUnionModel.forward

    def spy(self, *args, **kwargs):
        calls.append({key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in kwargs.items()})
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ControlNetUnionModel, "forward", spy)
    return calls


def test_each_preprocessor_kind_selects_its_control_type(sdxl_engine, promax_file, lines, union_calls):
    """The same map (tile of the map, threshold of it, invert of its negative) as three control types:
    the model sees three type vectors and makes three pictures."""
    from underpaint.pipeline.control import control_map

    negative = Image.fromarray(255 - np.asarray(lines))
    units = {6: ControlUnit(image=lines, module="tile_resample", model=str(promax_file)),
             2: ControlUnit(image=lines, module="threshold", model=str(promax_file), processor_res=64),
             3: ControlUnit(image=negative, module="invert", model=str(promax_file))}
    for unit in units.values():
        assert np.array_equal(control_map(unit, 64, 64), np.asarray(lines))
    pictures = {}
    for index, unit in units.items():
        union_calls.clear()
        pictures[index] = _pixels(_generate(sdxl_engine, unit).images[0])
        assert union_calls, unit.module
        for control_type, idx in ((c["control_type"], list(c["control_type_idx"])) for c in union_calls):
            expected = torch.zeros(control_type.shape[0], 8)
            expected[:, index] = 1
            assert torch.equal(control_type, expected) and idx == [index], unit.module
    assert np.abs(pictures[6] - pictures[2]).max() > 2
    assert np.abs(pictures[6] - pictures[3]).max() > 2
    assert np.abs(pictures[2] - pictures[3]).max() > 2


def test_inpaint_unit_uses_the_repaint_type_with_masked_pixels_black(sdxl_engine, promax_file, photo,
                                                                      union_calls):
    """xinsir's repaint type (7) was trained on the picture with the masked area black (0), not the
    -1 of lllyasviel's inpaint ControlNet."""
    rgba = photo.resize((64, 64)).convert("RGBA")
    alpha = np.full((64, 64), 255, dtype=np.uint8)
    alpha[16:40, 8:48] = 0  # transparent = to repaint
    rgba.putalpha(Image.fromarray(alpha))
    _generate(sdxl_engine, ControlUnit(image=rgba, module="inpaint_only", model=str(promax_file)))
    hint, idx = union_calls[0]["controlnet_cond"][0], list(union_calls[0]["control_type_idx"])
    assert idx == [7]
    colour = torch.from_numpy(np.asarray(rgba.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    hole = torch.from_numpy(alpha == 0)
    assert torch.equal(hint[0][:, hole], torch.zeros(3, int(hole.sum())))
    assert torch.equal(hint[0][:, ~hole], colour[:, ~hole])
    assert hint.shape[0] == 2 and torch.equal(hint[0], hint[1])


def test_control_modes_scale_union_residuals_as_for_any_controlnet(promax_file, lines):
    """Residuals of diffusers' forward (tile type), times the weight (Balanced) or the extension's
    soft decay 0.825 ** (12 - i) (the other two modes; "ControlNet is more important" also leaves the
    negative prompt's rows without control)."""
    from underpaint.pipeline.control import (BALANCED, CONTROL_MORE_IMPORTANT, PROMPT_MORE_IMPORTANT, ActiveUnit,
                                             ControlStack)

    net = load_controlnet(promax_file)
    g = torch.Generator().manual_seed(5)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 48, generator=g)
    extra = {"text_embeds": torch.randn(2, 16, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    t = torch.tensor([500.0, 500.0])
    hint = torch.from_numpy(np.asarray(lines, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    tile = torch.zeros(2, 8)
    tile[:, 6] = 1
    with torch.no_grad():
        down, mid = net.module(x, t, encoder_hidden_states=context, controlnet_cond=[hint.expand(2, -1, -1, -1)],
                               control_type=tile, control_type_idx=[6], added_cond_kwargs=extra, return_dict=False)
    reference = [*down, mid]
    n = len(reference)
    for mode, factors in ((BALANCED, [0.5] * n), (PROMPT_MORE_IMPORTANT, [0.5 * 0.825 ** (12 - i) for i in range(n)])):
        unit = ControlUnit(image=lines, module="tile_resample", model=str(promax_file), weight=0.5, control_mode=mode)
        with torch.no_grad():
            got_down, got_mid = ControlStack([ActiveUnit(unit, net, hint, control_type=6)], steps=4).residuals(
                x, t, context, extra)
        for got, ref, k in zip([*got_down, got_mid], reference, factors):
            torch.testing.assert_close(got, ref * k, rtol=1e-5, atol=1e-6)
    unit = ControlUnit(image=lines, module="tile_resample", model=str(promax_file), weight=0.5,
                       control_mode=CONTROL_MORE_IMPORTANT)
    with torch.no_grad():
        strong = ControlStack([ActiveUnit(unit, net, hint, control_type=6)], steps=4).residuals(
            x, t, context, extra, torch.tensor([1.0, 0.0]))
    for got, ref, i in zip([*strong[0], strong[1]], reference, range(n)):
        torch.testing.assert_close(got[0], ref[0] * 0.5 * 0.825 ** (12 - i), rtol=1e-5, atol=1e-6)
        assert not got[1].any()


def test_weight_zero_equals_no_controlnet(sdxl_engine, promax_file, lines):
    unit = ControlUnit(image=lines, module="tile_resample", model=str(promax_file), weight=0.0)
    assert _generate(sdxl_engine, unit).images[0].tobytes() == _generate(sdxl_engine).images[0].tobytes()


def test_explicit_type_equals_the_preprocessor_type_for_the_same_map(sdxl_engine, promax_file, lines, union_calls):
    """A ready-made map (module "none") with the type named runs exactly as the preprocessor whose
    output is that same map: threshold → Soft Edge (2), invert of the negative → Hard Edge (3,
    named by its alias "canny"), tile → Tile (6). Same type vector, same picture, byte for byte."""
    from underpaint.pipeline.control import control_map

    negative = Image.fromarray(255 - np.asarray(lines))
    pairs = [
        (2, ControlUnit(image=lines, module="threshold", model=str(promax_file), processor_res=64),
         ControlUnit(image=lines, module="none", model=str(promax_file), union_control_type="Soft Edge")),
        (3, ControlUnit(image=negative, module="invert", model=str(promax_file)),
         ControlUnit(image=lines, module="none", model=str(promax_file), union_control_type="canny")),
        (6, ControlUnit(image=lines, module="tile_resample", model=str(promax_file)),
         ControlUnit(image=lines, module="none", model=str(promax_file), union_control_type="tile")),
    ]
    calls = union_calls
    for index, derived, explicit in pairs:
        assert np.array_equal(control_map(derived, 64, 64), control_map(explicit, 64, 64))
        calls.clear()
        by_preprocessor = _generate(sdxl_engine, derived).images[0]
        assert calls and all(list(c["control_type_idx"]) == [index] for c in calls), derived.module
        calls.clear()
        by_type = _generate(sdxl_engine, explicit).images[0]
        assert calls and all(list(c["control_type_idx"]) == [index] for c in calls), explicit.union_control_type
        assert by_type.tobytes() == by_preprocessor.tobytes(), explicit.union_control_type


def test_explicit_type_overrides_the_preprocessor(sdxl_engine, promax_file, lines, union_calls):
    calls = union_calls
    tile_as_depth = _generate(sdxl_engine, ControlUnit(image=lines, module="tile_resample", model=str(promax_file),
                                                       union_control_type="Depth")).images[0]
    assert calls and all(list(c["control_type_idx"]) == [1] for c in calls)
    depth = _generate(sdxl_engine, ControlUnit(image=lines, module="none", model=str(promax_file),
                                               union_control_type="Depth")).images[0]
    tile = _generate(sdxl_engine, ControlUnit(image=lines, module="tile_resample", model=str(promax_file))).images[0]
    assert tile_as_depth.tobytes() == depth.tobytes()
    assert np.abs(_pixels(tile_as_depth) - _pixels(tile)).max() > 2
    # "Unknown" (the extension's default) is the preprocessor's type
    unknown = ControlUnit(image=lines, module="tile_resample", model=str(promax_file), union_control_type="Unknown")
    assert unknown.union_control_type is None
    assert _generate(sdxl_engine, unknown).images[0].tobytes() == tile.tobytes()


def test_a_plain_controlnet_ignores_the_union_type(sdxl_engine, tmp_path, lines):
    """Clients send the extension's whole unit, union_control_type included, for any model."""
    from tiny_controlnet import write_controlnet

    path = write_controlnet(tmp_path / "control-sdxl-canny.safetensors", "sdxl")
    plain = ControlUnit(image=lines, module="none", model=str(path))
    typed = ControlUnit(image=lines, module="none", model=str(path), union_control_type="OpenPose")
    assert _generate(sdxl_engine, typed).images[0].tobytes() == _generate(sdxl_engine, plain).images[0].tobytes()


def test_a_ready_map_without_a_type_is_refused_naming_the_field(sdxl_engine, promax_file, lines):
    unit = ControlUnit(image=lines, module="none", model=str(promax_file))
    with pytest.raises(InvalidParameter, match=r"control_units\[1\]\.union_control_type: got None, .*ready-made map"
                                               r".*3 Hard Edge.*7 Inpaint.*--control-type") as exc:
        _generate(sdxl_engine, ControlUnit(image=lines, module="tile_resample", model=str(promax_file)), unit)
    assert exc.value.field == "control_units[1].union_control_type"


def test_a_type_or_kind_without_a_slot_is_refused(sdxl_engine, promax_file, union6_file, lines):
    with pytest.raises(InvalidParameter, match=r"module: got 'shuffle'.*kind 'shuffle'.*union_control_type") as exc:
        _generate(sdxl_engine, ControlUnit(image=lines, module="shuffle", model=str(promax_file)))
    assert exc.value.field == "control_units[0].module"
    # the 6-type model has no tile slot, whether the type comes from the preprocessor or is named
    with pytest.raises(InvalidParameter, match=r"module: got 'tile_resample'.*Tile type.*5 Segmentation") as exc:
        _generate(sdxl_engine, ControlUnit(image=lines, module="tile_resample", model=str(union6_file)))
    assert "6 Tile" not in str(exc.value) and exc.value.field == "control_units[0].module"
    with pytest.raises(InvalidParameter, match=r"union_control_type: got 'Tile', .*union-sdxl-1\.0 has: 0 OpenPose"
                                               r".*5 Segmentation$") as exc:
        _generate(sdxl_engine, ControlUnit(image=lines, module="none", model=str(union6_file),
                                           union_control_type="tile"))
    assert exc.value.field == "control_units[0].union_control_type"
    # FLUX union models' own types are not SDXL's
    with pytest.raises(InvalidParameter, match=r"union_control_type: got 'Blur'.*7 Inpaint"):
        _generate(sdxl_engine, ControlUnit(image=lines, module="none", model=str(promax_file),
                                           union_control_type="blur"))


def test_an_unknown_type_name_is_refused_with_the_allowed_values(promax_file, lines):
    with pytest.raises(InvalidParameter, match=r"union_control_type: got 'Sketch'.*'Hard Edge'.*'Unknown'") as exc:
        ControlUnit(image=lines, module="none", model=str(promax_file), union_control_type="Sketch")
    assert exc.value.field == "union_control_type"
    with pytest.raises(InvalidParameter, match="union_control_type: got 3"):
        ControlUnit(image=lines, module="none", union_control_type=3)


def test_api_refuses_a_ready_map_without_a_type_with_422_naming_the_field(sdxl_file, promax_file, lines,
                                                                           tmp_path):
    """Through the A1111 API on a real engine: the extension's field, per request unit."""
    from fastapi.testclient import TestClient

    from test_server_support import png_b64
    from underpaint.server.app import create_app
    from underpaint.server.config import ServerConfig

    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    (models / "controlnet").mkdir()
    (models / "checkpoints" / "tiny-sdxl.safetensors").symlink_to(sdxl_file)
    (models / "controlnet" / "union-promax.safetensors").symlink_to(promax_file)
    app = create_app(ServerConfig(models_dir=models, device="cpu", dtype="fp32"))
    unit = {"enabled": True, "image": png_b64(lines), "module": "none", "model": "union-promax [0123abcd]"}
    body = {"prompt": "a lighthouse", "steps": 1, "width": 64, "height": 64, "sampler_name": "Euler",
            "alwayson_scripts": {"controlnet": {"args": [{"enabled": False}, unit]}}}
    with TestClient(app, base_url="http://127.0.0.1") as client:
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 422, r.text
        answer = r.json()
        assert answer["field"] == "alwayson_scripts.controlnet.args[1].union_control_type"
        assert "ready-made map" in answer["detail"] and "3 Hard Edge" in answer["detail"]
        body["alwayson_scripts"]["controlnet"]["args"][1] = {**unit, "union_control_type": "Gray"}
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 422 and r.json()["field"] == "alwayson_scripts.controlnet.args[1].union_control_type"
        assert "got 'Gray'" in r.json()["detail"] and "7 Inpaint" in r.json()["detail"]
        body["alwayson_scripts"]["controlnet"]["args"][1] = {**unit, "union_control_type": "Hard Edge"}
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        assert len(r.json()["images"]) >= 1


def test_six_type_model_runs_a_canny_unit(sdxl_engine, union6_file, lines):
    unit = ControlUnit(image=lines, module="canny", model=str(union6_file))
    plain = _generate(sdxl_engine).images[0]
    assert np.abs(_pixels(plain) - _pixels(_generate(sdxl_engine, unit).images[0])).max() > 2


def test_sdxl_union_on_an_sd1_checkpoint_is_refused(sd1_engine, promax_file, lines):
    unit = ControlUnit(image=lines, module="tile_resample", model=str(promax_file))
    with pytest.raises(ModelError, match=r"diffusion_pytorch_model_promax is a sdxl model.*does not fit"):
        sd1_engine.generate(GenerationParams(prompt="a castle", steps=1, width=64, height=64, control_units=(unit,)))
