"""A1111's Checkpoint Merger (``underpaint merge``): each method's tensors exactly, the keys it leaves alone,
an inpainting A with a normal B, refusals, a baked VAE, fp16, atomic output, and a merged file that loads and
generates."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from underpaint.errors import InvalidParameter, ModelError, OutputExists
from underpaint.models.merge import MergeRecipe, merge

POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """Three tiny SD 1.5 checkpoints of the same layout with different random weights, and an inpainting one."""
    from tiny_models import write_sd1

    folder = tmp_path_factory.mktemp("merge")
    return {name: write_sd1(folder / f"{name}.safetensors", seed=seed, **extra)
            for name, seed, extra in (("a", 1, {}), ("b", 2, {}), ("c", 3, {}), ("inpaint", 4, {"inpaint": True}))}


def combined_keys(a: dict) -> list[str]:
    return [k for k, v in a.items() if "model" in k and k != POSITION_IDS and v.is_floating_point()]


def test_weighted_sum_is_a_times_one_minus_m_plus_b_times_m(three, tmp_path):
    out = merge(MergeRecipe(three["a"], three["b"], multiplier=0.3), tmp_path / "ws.safetensors")
    a, b, merged = load_file(three["a"]), load_file(three["b"]), load_file(out)
    assert set(merged) == set(a)
    for key in combined_keys(a):
        expected = (a[key].float() * 0.7 + b[key].float() * 0.3).to(a[key].dtype)
        assert torch.equal(merged[key], expected), key
        assert merged[key].dtype == a[key].dtype
    if POSITION_IDS in a:
        assert torch.equal(merged[POSITION_IDS], a[POSITION_IDS])
    for m, expected in ((0.0, a), (1.0, b)):
        ends = load_file(merge(MergeRecipe(three["a"], three["b"], multiplier=m), tmp_path / f"m{m}.safetensors"))
        assert all(torch.equal(ends[k], expected[k]) for k in combined_keys(a))
    with safe_open(str(out), "pt") as f:
        recipe = json.loads(f.metadata()["sd_merge_recipe"])
    assert recipe["interp_method"] == "Weighted sum" and recipe["multiplier"] == 0.3


def test_add_difference_is_a_plus_b_minus_c_times_m(three, tmp_path):
    out = merge(MergeRecipe(three["a"], three["b"], three["c"], method="add-difference", multiplier=0.5),
                tmp_path / "ad.safetensors")
    a, b, c, merged = (load_file(p) for p in (three["a"], three["b"], three["c"], out))
    for key in combined_keys(a):
        expected = (a[key].float() + (b[key].float() - c[key].float()) * 0.5).to(a[key].dtype)
        assert torch.equal(merged[key], expected), key
    same = load_file(merge(MergeRecipe(three["a"], three["b"], three["b"], method="add-difference", multiplier=1.0),
                           tmp_path / "same.safetensors"))
    assert all(torch.equal(same[k], a[k]) for k in a)  # B − B adds nothing


def test_an_inpainting_a_takes_b_in_its_first_four_channels(three, tmp_path):
    key = "model.diffusion_model.input_blocks.0.0.weight"
    out = merge(MergeRecipe(three["inpaint"], three["a"], multiplier=0.25), tmp_path / "inp.safetensors")
    a, b, merged = load_file(three["inpaint"]), load_file(three["a"]), load_file(out)
    assert merged[key].shape == a[key].shape and a[key].shape[1] == 9
    assert torch.equal(merged[key][:, :4], (a[key][:, :4].float() * 0.75 + b[key].float() * 0.25).to(a[key].dtype))
    assert torch.equal(merged[key][:, 4:], a[key][:, 4:])
    with pytest.raises(ModelError, match="inpainting model must be A"):
        merge(MergeRecipe(three["a"], three["inpaint"]), tmp_path / "wrong.safetensors")


def test_fp16_discard_and_a_baked_vae(three, tmp_path):
    from tiny_models import write_vae

    vae_file = write_vae(tmp_path / "vae.safetensors")
    vae = load_file(vae_file)
    out = merge(MergeRecipe(three["a"], method="no-interpolation", fp16=True, bake_vae=vae_file,
                            discard=r"^cond_stage_model\."), tmp_path / "baked.safetensors")
    a, merged = load_file(three["a"]), load_file(out)
    assert not any(k.startswith("cond_stage_model.") for k in merged)
    for key, tensor in merged.items():
        assert tensor.dtype == torch.float16 or not tensor.is_floating_point()
        if key.startswith("first_stage_model."):
            name = key.removeprefix("first_stage_model.")
            source = vae.get(key, vae.get(name))
            assert torch.equal(tensor, source.to(torch.float16)), key
        else:
            assert torch.equal(tensor, a[key].to(torch.float16)), key


def test_refusals_and_atomic_output(three, tmp_path):
    with pytest.raises(InvalidParameter) as err:
        MergeRecipe(three["a"], method="add-difference", b=three["b"])
    assert err.value.field == "c"
    with pytest.raises(InvalidParameter) as err:
        MergeRecipe(three["a"], three["b"], discard="(")
    assert err.value.field == "discard"
    for pattern in ("a{1000000000}", "(a{1000}){1000}", "((x{30}){30}){30}"):  # gigabytes to compile
        with pytest.raises(InvalidParameter, match="repeats") as err:
            MergeRecipe(three["a"], three["b"], discard=pattern)
        assert err.value.field == "discard"
    MergeRecipe(three["a"], three["b"], discard=r"^(model_ema|first_stage_model)\.[a-z_]{1,50}")
    for pattern in (".", "diffusion_model"):  # nothing of the UNet left: no checkpoint is written
        with pytest.raises(InvalidParameter, match="UNet") as err:
            merge(MergeRecipe(three["a"], three["b"], discard=pattern), tmp_path / "empty.safetensors")
        assert err.value.field == "discard" and not (tmp_path / "empty.safetensors").exists()
    made = merge(MergeRecipe(three["a"], three["b"]), tmp_path / "new" / "folder" / "m.safetensors")
    assert made.is_file()
    pickle = tmp_path / "old.ckpt"
    pickle.write_bytes(b"not read")
    with pytest.raises(ModelError, match="safetensors"):
        merge(MergeRecipe(three["a"], pickle), tmp_path / "x.safetensors")
    target = tmp_path / "taken.safetensors"
    target.write_bytes(b"mine")
    with pytest.raises(OutputExists):
        merge(MergeRecipe(three["a"], three["b"]), target)
    assert target.read_bytes() == b"mine"
    merge(MergeRecipe(three["a"], three["b"]), target, overwrite=True)
    assert load_file(target)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_the_merged_file_loads_and_generates_between_its_parents(three, tmp_path):
    """A 0.5 weighted sum is a checkpoint like its parents (same detection, loads, makes a picture)."""
    from underpaint.params import GenerationParams
    from underpaint.pipeline.engine import Engine

    out = merge(MergeRecipe(three["a"], three["b"], multiplier=0.5), tmp_path / "half.safetensors")
    engine = Engine.load(out, device="cpu", dtype="fp32")
    assert engine.model.spec.family.value == "sd1"
    picture = engine.generate(GenerationParams(prompt="a cat", steps=2, width=64, height=64, seed=1)).images[0]
    assert picture.size == (64, 64)


def test_cli(three, tmp_path):
    from cli_runner import run_cli

    out = tmp_path / "cli.safetensors"
    done = run_cli("merge", str(three["a"]), str(three["b"]), "-o", str(out), "-M", "0.6")
    assert done.returncode == 0, done.stderr
    a, b, merged = load_file(three["a"]), load_file(three["b"]), load_file(out)
    key = combined_keys(a)[0]
    assert torch.equal(merged[key], (a[key].float() * 0.4 + b[key].float() * 0.6).to(a[key].dtype))
    done = run_cli("merge", str(three["a"]), str(three["b"]), "-o", str(out))
    assert done.returncode != 0 and "already exists" in done.stderr
    done = run_cli("merge", str(three["a"]), str(three["b"]), str(three["c"]), "-o", str(tmp_path / "y.safetensors"))
    assert done.returncode != 0 and "add-difference" in done.stderr
    done = run_cli("merge", str(three["a"]), str(three["b"]), "--method", "add-difference", "-o",
                   str(tmp_path / "z.safetensors"))
    assert done.returncode == 2 and "error: C: got None, expected a checkpoint C" in done.stderr, done.stderr


def test_a_pattern_that_never_ends_is_refused_in_time(three, tmp_path, monkeypatch):
    from underpaint.models import merge as merge_module

    monkeypatch.setattr(merge_module, "DISCARD_SECONDS", 0.2)
    with pytest.raises(InvalidParameter) as err:  # catastrophic backtracking on every tensor name
        merge(MergeRecipe(three["a"], three["b"], discard=r"^(\w|\w\w|\.)+[0-9]$"), tmp_path / "slow.safetensors")
    assert err.value.field == "discard" and "within" in str(err.value)
    assert not (tmp_path / "slow.safetensors").exists()


# --------------------------------------------------------------------------- over HTTP


@pytest.fixture()
def merger(three, tmp_path):
    """The app over a models folder holding the tiny checkpoints (and a VAE), with a fake engine (merging loads none)."""
    import shutil

    from fastapi.testclient import TestClient
    from test_server_support import FakeBackend
    from tiny_models import write_vae
    from underpaint.server.app import create_app
    from underpaint.server.config import ServerConfig

    (tmp_path / "checkpoints" / "sub").mkdir(parents=True)
    for name in ("a", "b", "c", "inpaint"):
        shutil.copy(three[name], tmp_path / "checkpoints" / ("sub" if name == "c" else "") / f"{name}.safetensors")
    write_vae(tmp_path / "vae" / "other-vae.safetensors", seed=9)
    app = create_app(ServerConfig(models_dir=tmp_path, preload=False), loader=FakeBackend())
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client, tmp_path


def test_http_merge_writes_a_new_listed_checkpoint(merger, three):
    client, root = merger
    r = client.post("/underpaint/v1/merge-checkpoints", json={
        "primary_model_name": "a", "secondary_model_name": "b.safetensors", "tertiary_model_name": "sub/c",
        "interp_method": "Add difference", "multiplier": 0.5, "save_as_half": True, "bake_in_vae": "other-vae"})
    assert r.status_code == 200, r.text
    body = r.json()
    name = "a + 0.5(b - sub_c).safetensors"  # A1111's name for the recipe, folders flattened
    assert body["path"] == f"checkpoints/{name}" and body["info"] == f"Checkpoint saved to checkpoints/{name}"
    assert body["checkpoint"].startswith(name)
    assert any(m["title"] == body["checkpoint"] for m in client.get("/sdapi/v1/sd-models").json())
    a, b, c, vae = (load_file(p) for p in (three["a"], three["b"], three["c"], root / "vae" / "other-vae.safetensors"))
    merged = load_file(root / body["path"])
    key = combined_keys(a)[0]
    assert torch.equal(merged[key], (a[key].float() + (b[key].float() - c[key].float()) * 0.5).half())
    vae_key = next(k for k in vae if k.startswith("decoder."))
    assert torch.equal(merged["first_stage_model." + vae_key], vae[vae_key].half())

    r = client.post("/underpaint/v1/merge-checkpoints", json={"primary_model_name": "inpaint",
                                                              "secondary_model_name": "b", "multiplier": 0.25})
    assert r.json()["path"] == "checkpoints/0.75(inpaint) + 0.25(b).inpainting.safetensors"
    r = client.post("/underpaint/v1/merge-checkpoints", json={"primary_model_name": "a", "custom_name": "mine",
                                                              "interp_method": "No interpolation"})
    assert r.json()["path"] == "checkpoints/mine.safetensors"
    assert torch.equal(load_file(root / "checkpoints" / "mine.safetensors")[key], a[key])


@pytest.mark.parametrize("payload, status, field, words", [
    ({"interp_method": "Sum"}, 422, "interp_method", "Weighted sum"),
    ({"secondary_model_name": "None"}, 422, "secondary_model_name", "Weighted sum"),
    ({"interp_method": "Add difference"}, 422, "tertiary_model_name", "Add difference"),
    ({"secondary_model_name": "../../etc/passwd"}, 404, "secondary_model_name", "not a checkpoint"),
    ({"custom_name": "../evil"}, 422, "custom_name", "plain file name"),
    ({"custom_name": ".hidden"}, 422, "custom_name", "plain file name"),
    ({"custom_name": "b"}, 409, "custom_name", "already a file"),
    ({"checkpoint_format": "ckpt"}, 422, "checkpoint_format", "safetensors"),
    ({"bake_in_vae": "zzzz"}, 422, "bake_in_vae", "other-vae"),
    ({"discard_weights": "("}, 422, "discard_weights", "regular expression"),
    ({"discard_weights": "a{1000000000}"}, 422, "discard_weights", "repeats"),
    ({"discard_weights": "."}, 422, "discard_weights", "UNet"),
    ({"custom_name": "\U0001F600" * 60}, 422, "custom_name", "bytes"),
    ({"multiplier": 11}, 422, "multiplier", "-10 to 10"),
])
def test_http_merge_refusals_name_the_field(merger, payload, status, field, words):
    client, root = merger
    before = sorted(p.name for p in (root / "checkpoints").iterdir())
    r = client.post("/underpaint/v1/merge-checkpoints",
                    json={"primary_model_name": "a", "secondary_model_name": "b", **payload})
    assert r.status_code == status, r.text
    assert r.json()["field"] == field and words in r.json()["detail"], r.json()
    assert str(root) not in r.text
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == before
