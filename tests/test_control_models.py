"""ControlNet files in the layouts people download: detection, loading, caching, name resolution.

The diffusers layouts of the tiny ControlNets are made from the original file by diffusers' own
single-file converter, so "every layout loads to the same module" checks our key conversion
against an independent one.
"""

from __future__ import annotations

import pickle

import pytest
import torch

from tiny_controlnet import (LABEL_EMB, SDXL_TIME_IDS, diffusers_reference, write_controlnet, write_diffusers_file,
                             write_diffusers_folder)
from underpaint.errors import ModelError, ModelNotFound, UnknownName, UnsafeModelFile
from underpaint.models.controlnet import (ControlNetCache, check_compatible, infotext_name, inspect_controlnet,
                                          legacy_hash, load_controlnet, resolve_controlnet)
from underpaint.models.detect import Family

TIME_DIM = {"sd1": None, "sd2": None, "sdxl": SDXL_TIME_IDS}


@pytest.fixture(scope="module")
def cn_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("controlnets")


@pytest.fixture(scope="module")
def originals(cn_dir):
    return {fam: write_controlnet(cn_dir / f"control_tiny_{fam}.safetensors", fam) for fam in ("sd1", "sd2", "sdxl")}


@pytest.fixture(scope="module")
def folders(cn_dir, originals):
    """diffusers folders made from the original files by diffusers' own single-file converter."""
    return {fam: write_diffusers_folder(cn_dir / f"folder-{fam}", originals[fam], fam) for fam in ("sd1", "sdxl")}


def _state(path, family):
    return load_controlnet(path, time_embed_dim=TIME_DIM[family]).module.state_dict()


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_original_layout_matches_diffusers_single_file_converter(originals, cn_dir, family):
    ours = _state(originals[family], family)
    ref = diffusers_reference(originals[family], family, cn_dir / f"ref-config-{family}").state_dict()
    assert ours.keys() == ref.keys()
    # diffusers 0.42's ControlNet converter leaves SDXL's add_embedding unconverted (random): skip it there.
    skipped = {f"{m}.{p}" for m in LABEL_EMB for p in ("weight", "bias")} if family == "sdxl" else set()
    for key in ours.keys() - skipped:
        assert torch.equal(ours[key], ref[key]), key


def test_sdxl_label_emb_maps_to_add_embedding(originals):
    from safetensors.torch import load_file

    raw = load_file(str(originals["sdxl"]))
    ours = _state(originals["sdxl"], "sdxl")
    for new, old in LABEL_EMB.items():
        assert torch.equal(ours[new + ".weight"], raw[f"control_model.{old}.weight"])


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_every_layout_loads_to_the_same_module(originals, folders, cn_dir, family):
    ours = _state(originals[family], family)
    single = write_diffusers_file(cn_dir / f"diffusers-{family}.safetensors", folders[family])
    bare = write_controlnet(cn_dir / f"bare-{family}.pth", family, prefix="")  # no control_model. prefix, torch file
    layouts = {"diffusers-folder": folders[family], "diffusers-file": single, "original": bare}
    for layout, path in layouts.items():
        info = inspect_controlnet(path, time_embed_dim=TIME_DIM[family])
        assert info.layout == layout
        assert info.family == Family(family)
        other = _state(path, family)
        assert other.keys() == ours.keys()
        assert all(torch.equal(other[k], ours[k]) for k in ours), layout


def test_detects_family_and_sizes_from_the_header_alone(originals):
    info = inspect_controlnet(originals["sdxl"], time_embed_dim=SDXL_TIME_IDS)
    assert info.family == Family.SDXL and info.layout == "original" and info.prefix == "control_model."
    assert info.config["block_out_channels"] == [32, 64]
    assert info.config["transformer_layers_per_block"] == [1, 2]
    assert info.config["addition_time_embed_dim"] == SDXL_TIME_IDS
    assert inspect_controlnet(originals["sd1"]).config["attention_head_dim"] == 8
    assert inspect_controlnet(originals["sd2"]).family == Family.SD2


def test_unsafe_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"input_hint_block.0.weight": Evil()}, f)
    with pytest.raises(UnsafeModelFile):
        load_controlnet(path)


def test_wrong_files_give_clear_errors(tmp_path, originals):
    from safetensors.torch import save_file

    lora = tmp_path / "control-lora.safetensors"
    save_file({"lora_controlnet": torch.zeros(1), "input_blocks.0.0.weight": torch.zeros(2)}, str(lora))
    with pytest.raises(ModelError, match="Control-LoRA"):
        inspect_controlnet(lora)
    other = tmp_path / "other.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(other))
    with pytest.raises(ModelError, match="not a ControlNet"):
        load_controlnet(other)
    with pytest.raises(ModelNotFound):
        load_controlnet(tmp_path / "missing.safetensors")


def test_cache_loads_each_file_once(originals):
    cache = ControlNetCache(capacity=1)
    a = cache.get(originals["sd1"])
    assert cache.get(originals["sd1"]) is a
    cache.get(originals["sd2"])
    assert len(cache) == 1 and cache.get(originals["sd1"]) is not a


def test_compatibility_check_names_both_sides(originals):
    sd1 = inspect_controlnet(originals["sd1"])
    check_compatible(sd1, {"block_out_channels": [32, 64], "cross_attention_dim": 16, "layers_per_block": 2})
    with pytest.raises(ModelError, match="sd1"):
        check_compatible(sd1, {"block_out_channels": [32, 64], "cross_attention_dim": 32, "layers_per_block": 1})


def test_resolution_by_name_path_and_default(tmp_path):
    folder = tmp_path / "controlnet"
    for name in ("control_v11p_sd15_canny.safetensors", "control_v11f1p_sd15_depth.pth",
                 "diffusers_xl_canny_full.safetensors", "controlnet-openpose-sdxl/config.json"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"{}")
    assert resolve_controlnet("control_v11p_sd15_canny", folder, kind="canny", family=None).name == \
        "control_v11p_sd15_canny.safetensors"
    assert resolve_controlnet("control_v11p_sd15_canny [d14c016b]", folder, kind=None, family=None).suffix == ".safetensors"
    assert resolve_controlnet(None, folder, kind="canny", family=Family.SD1).name == "control_v11p_sd15_canny.safetensors"
    assert resolve_controlnet(None, folder, kind="canny", family=Family.SDXL).name == "diffusers_xl_canny_full.safetensors"
    assert resolve_controlnet(None, [folder], kind="openpose", family=Family.SDXL).name == "controlnet-openpose-sdxl"
    with pytest.raises(ModelNotFound, match="openpose"):
        resolve_controlnet(None, folder, kind="openpose", family=Family.SD1)
    with pytest.raises(UnknownName):
        resolve_controlnet("control_v11p_sd15_cany_typo", folder, kind=None, family=None)


def test_infotext_name_uses_a1111_short_hash(tmp_path):
    import hashlib

    path = tmp_path / "control_x.safetensors"
    data = bytes(range(256)) * 8192  # 2 MiB
    path.write_bytes(data)
    expected = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert legacy_hash(path) == expected
    assert infotext_name(path) == f"control_x [{expected}]"
