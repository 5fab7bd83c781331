"""FLUX union ControlNets (InstantX / Shakker-Labs diffusers layout): the unit's control type.

As for SDXL's union models, the mode id is the unit's ``union_control_type`` when set, else its
preprocessor's type; a ready-made map (module "none") needs the type. The mode ids are the ones
the model cards give (canny 0, tile 1, depth 2, blur 3, pose 4, gray 5, low quality 6), checked on
what diffusers' ``FluxControlNetModel`` receives; a typed ready-made map must give the very picture
of the preprocessor that makes the same map.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flux_fixtures import flux_dev, flux_files  # noqa: F401  (fixtures)
from tiny_flux import DEV
from underpaint.errors import InvalidParameter
from underpaint.params import GenerationParams
from underpaint.pipeline.control import ControlUnit
from underpaint.pipeline.generate import generate
from underpaint.pipeline.records import Cancellation, ModelInfo

pytest.importorskip("diffusers")

SIZE = 64


def _write_controlnet(folder, num_mode: int | None, seed: int):
    from diffusers import FluxControlNetModel

    torch.manual_seed(seed)
    net = FluxControlNetModel(patch_size=1, in_channels=DEV.in_features, num_layers=1, num_single_layers=1,
                              attention_head_dim=DEV.head_dim, num_attention_heads=DEV.hidden // DEV.head_dim,
                              joint_attention_dim=DEV.context, pooled_projection_dim=DEV.pooled,
                              guidance_embeds=DEV.guidance, axes_dims_rope=(4, 6, 6), num_mode=num_mode).eval()
    with torch.no_grad():  # the zero-initialised parts would make every residual zero
        for p in net.parameters():
            p.normal_(0.0, 0.05)
    net.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def union(tmp_path_factory):
    """A union model with the released models' 10 mode rows (7 of them named on the model cards)."""
    return _write_controlnet(tmp_path_factory.mktemp("flux-cn") / "flux-controlnet-union", 10, seed=4)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return _write_controlnet(tmp_path_factory.mktemp("flux-cn") / "flux-controlnet-canny", None, seed=5)


@pytest.fixture(scope="module")
def lines() -> Image.Image:
    from tiny_controlnet import ready_map

    return ready_map(SIZE)


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8))


@pytest.fixture()
def modes(monkeypatch):
    """The mode ids FluxControlNetModel is called with, one list per call."""
    from diffusers import FluxControlNetModel

    seen: list = []
    forward = FluxControlNetModel.forward

    def spy(self, *args, controlnet_mode=None, **kwargs):
        seen.append(None if controlnet_mode is None else sorted(set(controlnet_mode.flatten().tolist())))
        return forward(self, *args, controlnet_mode=controlnet_mode, **kwargs)

    monkeypatch.setattr(FluxControlNetModel, "forward", spy)
    return seen


def _run(model, picture, *units, steps: int = 2):
    info = ModelInfo(name="tiny-flux", path="tiny", family="flux", prediction="flow", short_hash=None, vae_name=None)
    params = GenerationParams(prompt="a cat sitting on a red chair", steps=steps, seed=7, sampler="Euler",
                              scheduler="Simple", cfg_scale=1.0, rng="cpu", init_images=(picture,), strength=0.6,
                              width=SIZE, height=SIZE, control_units=tuple(units))
    return generate(model, params, info=info, progress=None, cancel=Cancellation()).images[0]


def test_explicit_type_equals_the_preprocessor_type_for_the_same_map(flux_dev, union, lines, picture, modes):
    """tile → Tile (1), invert of the negative → Hard Edge (0), threshold (a scribble) → Soft Edge, which
    these models take as canny (0): the same map typed by hand gives the same mode and picture."""
    from underpaint.pipeline.control import control_map

    negative = Image.fromarray(255 - np.asarray(lines))
    pairs = [
        (1, ControlUnit(image=lines, module="tile_resample", model=union),
         ControlUnit(image=lines, module="none", model=union, union_control_type="Tile")),
        (0, ControlUnit(image=negative, module="invert", model=union),
         ControlUnit(image=lines, module="none", model=union, union_control_type="Hard Edge")),
        (0, ControlUnit(image=lines, module="threshold", model=union, processor_res=SIZE),
         ControlUnit(image=lines, module="none", model=union, union_control_type="soft_edge")),
    ]
    for mode, derived, explicit in pairs:
        assert np.array_equal(control_map(derived, SIZE, SIZE), control_map(explicit, SIZE, SIZE))
        modes.clear()
        by_preprocessor = _run(flux_dev, picture, derived)
        assert modes and all(m == [mode] for m in modes), (derived.module, modes)
        modes.clear()
        by_type = _run(flux_dev, picture, explicit)
        assert modes and all(m == [mode] for m in modes), (explicit.union_control_type, modes)
        assert by_type.tobytes() == by_preprocessor.tobytes(), explicit.union_control_type
    plain = _run(flux_dev, picture)
    assert np.abs(np.asarray(plain, dtype=np.int16) - np.asarray(by_type, dtype=np.int16)).max() > 1


@pytest.mark.parametrize(("name", "mode"), [("Depth", 2), ("Blur", 3), ("OpenPose", 4), ("Gray", 5),
                                            ("Low Quality", 6), ("lq", 6), ("Normal Map", 2)])
def test_each_type_reaches_the_model_as_its_mode_id(flux_dev, union, lines, picture, modes, name, mode):
    _run(flux_dev, picture, ControlUnit(image=lines, module="tile_resample", model=union, union_control_type=name),
         steps=1)
    assert modes and all(m == [mode] for m in modes), modes


def test_a_ready_map_without_a_type_is_refused_as_for_sdxl(flux_dev, union, lines, picture):
    """No more silent canny: the unit is refused, naming the field and the model's types."""
    with pytest.raises(InvalidParameter, match=r"control_units\[0\]\.union_control_type: got None, .*ready-made map"
                                               r".*0 Hard Edge/Soft Edge, 1 Tile.*6 Low Quality") as exc:
        _run(flux_dev, picture, ControlUnit(image=lines, module="none", model=union))
    assert exc.value.field == "control_units[0].union_control_type"


@pytest.mark.parametrize("name", ["Segmentation", "Inpaint"])
def test_a_type_without_a_slot_is_refused(flux_dev, union, lines, picture, name):
    with pytest.raises(InvalidParameter, match=rf"union_control_type: got '{name}', .*flux-controlnet-union has: "
                                               r"0 Hard Edge/Soft Edge.*3 Blur.*6 Low Quality$") as exc:
        _run(flux_dev, picture, ControlUnit(image=lines, module="none", model=union, union_control_type=name))
    assert exc.value.field == "control_units[0].union_control_type"


def test_a_single_type_controlnet_takes_a_ready_map_and_ignores_the_type(flux_dev, plain, lines, picture, modes):
    untyped = _run(flux_dev, picture, ControlUnit(image=lines, module="none", model=plain))
    typed = _run(flux_dev, picture, ControlUnit(image=lines, module="none", model=plain, union_control_type="Depth"))
    assert modes and all(m is None for m in modes)
    assert typed.tobytes() == untyped.tobytes()
