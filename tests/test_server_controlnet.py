"""ControlNet units as the A1111 extension's API sends them → underpaint's ControlUnit records."""

from __future__ import annotations

import pytest
from PIL import Image

from test_server_support import png_b64
from underpaint.errors import InvalidParameter, UnderpaintError, UnknownName
from underpaint.server.a1111.control_units import control_units, enabled_units, resolve_model
from underpaint.server.config import Limits

PREFIX = "alwayson_scripts.controlnet.args"


def _units(args, files=()):
    return control_units(args, prefix=PREFIX, limits=Limits(), allow_urls=False, files=lambda: list(files))


def test_webuiapi_unit_becomes_a_control_unit(tmp_path, photo):
    model = tmp_path / "control_v11p_sd15_canny.safetensors"
    model.write_bytes(b"x")
    raw = {"image": png_b64(photo), "mask": None, "module": "canny", "model": "control_v11p_sd15_canny [d14c016b]",
           "weight": 0.8, "resize_mode": "Resize and Fill", "low_vram": False, "processor_res": 256,
           "threshold_a": 64, "threshold_b": -1, "guidance_start": 0.1, "guidance_end": 0.9,
           "control_mode": "My prompt is more important", "pixel_perfect": True, "hr_option": "Both", "enabled": True}
    (unit,) = _units([raw], [model])
    assert unit.image.size == photo.size and unit.module == "canny" and unit.model == str(model)
    assert (unit.weight, unit.guidance_start, unit.guidance_end) == (0.8, 0.1, 0.9)
    assert unit.resize_mode == "Resize and Fill" and unit.control_mode == "My prompt is more important"
    assert (unit.processor_res, unit.threshold_a, unit.threshold_b, unit.pixel_perfect) == (256, 64, None, True)


def test_disabled_units_are_dropped_and_defaults_apply():
    units = _units([False, {"enabled": False, "module": "canny"}, {"module": "depth", "processor_res": -1}])
    assert len(units) == 1
    unit = units[0]
    assert unit.module == "depth_midas" and unit.image is None and unit.model is None
    assert unit.processor_res == 512 and unit.threshold_a is None and unit.control_mode == "Balanced"
    assert enabled_units([False, {"enabled": False}, {}, None]) == [2]


def test_inpaint_unit_mask_becomes_transparency(photo):
    mask = Image.new("L", photo.size, 0)
    mask.paste(255, (10, 10, 20, 20))
    (unit,) = _units([{"module": "inpaint_only", "image": {"image": png_b64(photo), "mask": png_b64(mask)}}])
    assert unit.image.mode == "RGBA"
    assert unit.image.getpixel((15, 15))[3] == 0 and unit.image.getpixel((40, 40))[3] == 255


@pytest.mark.parametrize(("raw", "field"), [
    ({"module": "cany"}, f"{PREFIX}[0].module"),
    ({"module": "canny", "weight": 5}, f"{PREFIX}[0].weight"),
    ({"module": "canny", "weight": "heavy"}, f"{PREFIX}[0].weight"),
    ({"module": "canny", "guidance_start": 0.8, "guidance_end": 0.2}, f"{PREFIX}[0].guidance_start"),
    ({"module": "canny", "control_mode": 7}, f"{PREFIX}[0].control_mode"),
    ({"module": "canny", "image": "!!"}, f"{PREFIX}[0].image"),
    ({"module": "canny", "image": "http://10.0.0.1/a.png"}, f"{PREFIX}[0].image"),
    ({"module": "canny", "model": "/etc/passwd"}, f"{PREFIX}[0].model"),
    ({"module": "canny", "model": "../checkpoints/x"}, f"{PREFIX}[0].model"),
    ({"module": "none", "union_control_type": "Sketch"}, f"{PREFIX}[0].union_control_type"),
    ({"module": "none", "union_control_type": 3}, f"{PREFIX}[0].union_control_type"),
    ("canny", f"{PREFIX}[0]"),
])
def test_bad_units_name_the_field(raw, field, tmp_path):
    model = tmp_path / "control_v11p_sd15_canny.safetensors"
    model.write_bytes(b"x")
    with pytest.raises(UnderpaintError) as exc:
        _units([raw], [model])
    assert exc.value.field == field


@pytest.mark.parametrize(("sent", "kept"), [
    ("Hard Edge", "Hard Edge"), ("Soft Edge", "Soft Edge"), ("Normal Map", "Normal Map"),
    ("Segmentation", "Segmentation"), ("OpenPose", "OpenPose"), ("Tile", "Tile"), ("Inpaint", "Inpaint"), ("canny", "Hard Edge"), ("Unknown", None),
    (None, None),
])
def test_union_control_type_takes_the_extension_values(sent, kept):
    """The extension's ControlNetUnionControlType values (and "Unknown", its default) as clients send them."""
    (unit,) = _units([{"module": "none", "union_control_type": sent}])
    assert unit.union_control_type == kept
    (unit,) = _units([{"module": "none"}])
    assert unit.union_control_type is None


def test_engine_errors_about_a_unit_name_the_request_field():
    from underpaint.errors import UnknownName
    from underpaint.server.a1111.control_units import request_field, unit_fields

    fields = unit_fields([{"enabled": False}, {"module": "canny"}, False, {"module": "none"}], PREFIX)
    assert fields == (f"{PREFIX}[1]", f"{PREFIX}[3]")
    renamed = request_field(InvalidParameter("control_units[1].union_control_type", None, "a type"), fields)
    assert renamed.field == f"{PREFIX}[3].union_control_type" and renamed.expected == "a type"
    unknown = request_field(UnknownName("control_units[0].model", "x", ["canny"]), fields)
    assert isinstance(unknown, UnknownName) and unknown.field == f"{PREFIX}[1].model"
    other = InvalidParameter("steps", 0, "at least 1")
    assert request_field(other, fields) is other


def test_txt2img_units_need_their_own_image():
    with pytest.raises(InvalidParameter) as exc:
        control_units([{"module": "canny"}], prefix=PREFIX, limits=Limits(), allow_urls=False, files=list,
                      needs_image=True)
    assert exc.value.field == f"{PREFIX}[0].image"


def test_model_names_resolve_only_to_listed_files(tmp_path):
    files = [tmp_path / "control_v11p_sd15_canny.safetensors", tmp_path / "Depth-XL.pth"]
    assert resolve_model("control_v11p_sd15_canny [d14c016b]", files, field="m") == files[0]
    assert resolve_model("depth-xl", files, field="m") == files[1]
    with pytest.raises(InvalidParameter):
        resolve_model(str(files[0].parent / ".." / files[0].name), files, field="m")


def test_model_names_fall_back_to_the_shortest_name_containing_them(tmp_path):
    """The extension's closest-name rule: a part of a name picks the shortest name that holds it."""
    files = [tmp_path / "control_v11p_sd15_canny_fp16.safetensors", tmp_path / "control_v11p_sd15_canny.pth",
             tmp_path / "Depth-XL.pth"]
    assert resolve_model("canny", files, field="m") == files[1]
    assert resolve_model("SD15_CANNY_fp16 [b18e0966]", files, field="m") == files[0]
    assert resolve_model("depth", files, field="m") == files[2]
    with pytest.raises(UnknownName):
        resolve_model("openpose", files, field="m")


def test_control_types_group_models_by_their_file_names():
    from underpaint.server.a1111.controlnet import control_type_table

    models = ["control_v11p_sd15_canny [d14c016b]", "control_v11f1p_sd15_depth [cfd03158]",
              "xinsir_controlnet_union_sdxl [a1b2c3d4]"]
    table = control_type_table(models)
    assert table["All"]["model_list"] == ["None", *models]
    canny = table["Canny"]
    assert canny["model_list"] == ["None", models[0], models[2]]  # a union model serves every type
    assert canny["default_model"] == models[0] and canny["default_option"] == "canny"
    assert "invert (from white bg & black line)" in canny["module_list"]
    assert table["Depth"]["module_list"][0] == "none" and table["Depth"]["default_option"] == "depth_midas"
    assert all(m == "none" or "openpose" in m for m in table["OpenPose"]["module_list"])
    assert table["NormalMap"]["default_option"] == "normal_midas"
    only_depth = control_type_table([models[1]])["Canny"]
    assert only_depth["model_list"] == ["None", models[1]] and only_depth["default_model"] == "None"
