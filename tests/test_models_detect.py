"""Family and prediction detection from headers, on every fixture and on look-alike files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import tiny_models as tm
from underpaint.errors import InvalidParameter, ModelError
from underpaint.models.detect import Family, ModelSpec, detect, probe_prediction
from underpaint.models.header import CheckpointHeader, TensorInfo, read_header


def _header(shapes: dict, metadata: dict | None = None) -> CheckpointHeader:
    """A header from a fixture's name → (kind, shape) table, without writing weights."""
    return CheckpointHeader({k: TensorInfo("F32", tuple(s)) for k, (_, s) in shapes.items()}, dict(metadata or {}))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("detect")
    return {
        "sd1": tm.write_sd1(d / "sd1.safetensors"),
        "sd1-inpaint": tm.write_sd1(d / "sd1-inpaint.safetensors", inpaint=True),
        "sd2-v": tm.write_sd2(d / "sd2v.safetensors", prediction="v"),
        "sd2-eps": tm.write_sd2(d / "sd2eps.safetensors", prediction="eps"),
        "sdxl": tm.write_sdxl(d / "sdxl.safetensors"),
        "sdxl-refiner": tm.write_sdxl_refiner(d / "sdxl-refiner.safetensors"),
    }


@pytest.mark.parametrize(("name", "family", "prediction", "in_channels", "scaling", "source", "size"), [
    ("sd1", Family.SD1, "eps", 4, 0.18215, "default", 512),
    ("sd1-inpaint", Family.SD1, "eps", 9, 0.18215, "default", 512),
    ("sd2-v", Family.SD2, "v", 4, 0.18215, "metadata", 768),
    ("sd2-eps", Family.SD2, "eps", 4, 0.18215, "metadata", 512),
    ("sdxl", Family.SDXL, "eps", 4, 0.13025, "default", 1024),
    ("sdxl-refiner", Family.SDXL_REFINER, "eps", 4, 0.13025, "default", 1024),
])
def test_detection_table(files, name, family, prediction, in_channels, scaling, source, size):
    spec = detect(read_header(files[name]))
    assert spec == ModelSpec(family=family, prediction=prediction, in_channels=in_channels, latent_channels=4,
                             scaling_factor=scaling, prediction_source=source)
    assert spec.is_inpaint == (in_channels == 9)
    assert spec.default_size == size
    assert Family(family.value) is family and family == family.value  # str enum: "sd1" == Family.SD1


def test_prediction_precedence():
    """override > v_pred key > modelspec.prediction_type metadata > family default."""
    shapes = tm.sdxl_shapes()
    assert detect(_header(shapes)).prediction == "eps"
    assert detect(_header(shapes, {"modelspec.prediction_type": "v_prediction"})).prediction_source == "metadata"
    with_key = {**shapes, "v_pred": ("w", ())}
    spec = detect(_header(with_key, {"modelspec.prediction_type": "epsilon"}))
    assert (spec.prediction, spec.prediction_source) == ("v", "v_pred key")
    spec = detect(_header(with_key), prediction="epsilon")
    assert (spec.prediction, spec.prediction_source) == ("eps", "override")
    with pytest.raises(InvalidParameter, match="prediction"):
        detect(_header(shapes), prediction="x0")


def test_sd2_without_hints_is_left_to_the_probe():
    spec = detect(_header(tm.sd2_shapes()))
    assert (spec.family, spec.prediction, spec.prediction_source) == (Family.SD2, "eps", "default")


def test_probe_follows_a1111_rule():
    """eps models return about their input at t=999; v models about -x0: mean(out - in) < -1 means v."""
    seen = {}

    def eps_like(x, t, ctx):
        seen.update(x=x, t=t, ctx=ctx)
        return x + 0.1 * torch.randn_like(x)

    assert probe_prediction(eps_like, 1024) == "eps"
    assert seen["x"].shape == (1, 4, 8, 8) and torch.all(seen["x"] == 0.5)
    assert seen["t"].tolist() == [999]
    assert seen["ctx"].shape == (1, 2, 1024) and torch.all(seen["ctx"] == 0.5)
    assert probe_prediction(lambda x, t, c: x - 1.5, 1024) == "v"
    assert probe_prediction(lambda x, t, c: x - 0.9, 1024) == "eps"


@pytest.mark.parametrize(("marker", "what"), [
    ("model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias", "SD3"),
])
def test_recognisable_unsupported_models(marker, what):
    header = CheckpointHeader({marker: TensorInfo("F16", (8,)), "model.diffusion_model.x": TensorInfo("F16", (1,))})
    with pytest.raises(ModelError, match=f"unsupported: looks like .*{what}"):
        detect(header)


def test_instruct_pix2pix_channels_make_an_edit_model():
    shapes = tm.sd1_shapes()
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = ("w", (32, 8, 3, 3))
    spec = detect(_header(shapes))
    assert spec.is_edit and not spec.is_inpaint and spec.in_channels == 8
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = ("w", (32, 7, 3, 3))
    with pytest.raises(ModelError, match="8 \\(InstructPix2Pix\\)"):
        detect(_header(shapes))


def test_mixed_parts_refused():
    shapes = {**tm.sd1_shapes(), **tm.clip_hf_shapes(tm.TinyText(hidden=24, layers=1), "cond_stage_model.transformer.")}
    with pytest.raises(ModelError, match="width 16 but its text encoder gives 24"):
        detect(_header(shapes))


@pytest.mark.parametrize(("tensors", "looks_like"), [
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 32),
      "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (32, 4)}, "LoRA"),
    ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (4, 32)}, "LoRA"),
    ({"emb_params": (2, 768)}, "textual-inversion embedding"),
    ({"clip_l": (2, 768), "clip_g": (2, 1280)}, "textual-inversion embedding"),
    ({"control_model.input_hint_block.0.weight": (16, 3, 3, 3)}, "ControlNet"),
    ({"down_blocks.0.resnets.0.conv1.weight": (32, 32, 3, 3)}, "UNet in diffusers' names"),
    ({"alpha": (3, 3), "beta": (2,)}, "match no known layout"),
    ({}, "holds no tensors"),
])
def test_non_checkpoints_say_what_they_look_like(tensors, looks_like):
    header = CheckpointHeader({k: TensorInfo("F32", s) for k, s in tensors.items()})
    with pytest.raises(ModelError, match="not a Stable Diffusion checkpoint") as err:
        detect(header)
    assert looks_like in str(err.value)
    assert "expected an SD1, SD2 or SDXL" in str(err.value)


def test_vae_file_is_not_a_checkpoint(tmp_path):
    path = tm.write_vae(tmp_path / "vae.safetensors")
    with pytest.raises(ModelError, match="VAE on its own"):
        detect(read_header(path))


def test_random_tensor_file(tmp_path):
    path = tmp_path / "random.safetensors"
    save_file({"weights": torch.randn(10, 10)}, str(path))
    with pytest.raises(ModelError, match="weights"):
        detect(read_header(path))


def test_text_encoder_without_unet():
    shapes = tm.clip_hf_shapes(tm.SD1_TEXT, "cond_stage_model.transformer.")
    with pytest.raises(ModelError, match="has no UNet"):
        detect(_header(shapes))
