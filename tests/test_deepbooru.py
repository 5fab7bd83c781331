"""Interrogate DeepBooru (models/deepbooru.py): DeepDanbooru's tagger as A1111 runs it, and A1111's prompt.

The network is checked against a functional statement of the converted model as A1111's port runs it
(NHWC input permuted, explicit paddings: [2, 3, 2, 3] before the stem conv, [0, 1, 0, 1] of -inf before
the pool, [0, 1, 0, 1] before each stride-2 3x3 conv and [1, 1, 1, 1] before the others), on a file with
every one of the real model's 179 convs at small widths: the module computes TensorFlow's "same"
padding instead, so the two agree only if that rule gives those paddings at 512 px.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from deepbooru_support import tiny_tagger_state
from underpaint.errors import ModelError, ModelNotFound, UnsafeModelFile
from underpaint.models import deepbooru as db

TAGS = ["1girl", "solo", "long_hair", "smile", "looking_at_viewer", "rating:safe", "hat_(object)", "blue_sky"]


def _reference(state: dict, nhwc: torch.Tensor) -> torch.Tensor:
    """The converted model's forward, stated with its literal paddings, on (N, 512, 512, 3) input."""
    def conv(n, x, stride=1):
        return F.conv2d(x, state[f"n_Conv_{n}.weight"], state.get(f"n_Conv_{n}.bias"), stride=stride)

    x = nhwc.permute(0, 3, 1, 2)
    x = F.relu(conv(0, F.pad(x, [2, 3, 2, 3]), 2))
    x = F.max_pool2d(F.pad(x, [0, 1, 0, 1], value=float("-inf")), 3, 2)
    for block in db.LAYOUT:
        y = F.relu(conv(block.reduce, x))
        pad = [0, 1, 0, 1] if block.stride == 2 else [1, 1, 1, 1]
        y = F.relu(conv(block.middle, F.pad(y, pad), block.stride))
        y = conv(block.expand, y)
        x = F.relu(y + (x if block.shortcut is None else conv(block.shortcut, x, block.stride)))
    y = conv(178, x)
    return torch.sigmoid(F.avg_pool2d(y, y.shape[-1]).squeeze(3).squeeze(2))


def test_the_layout_numbers_the_convs_as_the_converted_file():
    firsts = [(b.shortcut, b.reduce, b.middle, b.expand, b.stride) for b in db.LAYOUT if b.shortcut is not None]
    assert firsts == [(1, 2, 3, 4, 1), (11, 12, 13, 14, 2), (36, 37, 38, 39, 2), (100, 97, 98, 99, 2),
                      (158, 159, 160, 161, 2), (168, 169, 170, 171, 2)]
    assert db.CONVS == 179 and len(db.LAYOUT) == 57
    assert (db.LAYOUT[1].reduce, db.LAYOUT[-1].expand) == (5, 177)
    numbers = sorted(n for b in db.LAYOUT for n in (b.reduce, b.middle, b.expand, b.shortcut) if n is not None)
    assert numbers == list(range(1, 178))


def test_same_padding_is_tensorflows():
    assert db.same_padding(512, 7, 2) == (2, 3)
    assert db.same_padding(256, 3, 2) == (0, 1)
    assert db.same_padding(64, 3, 1) == (1, 1)
    assert db.same_padding(5, 3, 2) == (1, 1) and db.same_padding(4, 1, 2) == (0, 0)


def test_network_equals_the_converted_models_forward():
    state = tiny_tagger_state(TAGS, seed=1, scale=1.5)
    tagger = db.tagger_from_state_dict(state)
    x = torch.rand(2, 512, 512, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = tagger.model(x.permute(0, 3, 1, 2))
        expected = _reference(state, x)
    assert ours.shape == (2, len(TAGS)) and float(expected.std()) > 0.01
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)


def test_the_picture_goes_in_resized_and_filled_to_512_as_rgb_over_255():
    from underpaint.imageio.resize import resize_image

    state = tiny_tagger_state(TAGS, seed=2, scale=1.5)
    tagger = db.tagger_from_state_dict(state)
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 310, 3), dtype=np.uint8))
    filled = np.asarray(resize_image(picture, 512, 512, 2), dtype=np.float32)
    assert filled.shape == (512, 512, 3) and filled[0].std() > 0  # the bars are the stretched edges, not black
    expected = _reference(state, torch.from_numpy(filled / 255)[None])[0]
    torch.testing.assert_close(tagger.probabilities(picture), expected, atol=1e-6, rtol=1e-5)
    rgba = picture.convert("RGBA")
    torch.testing.assert_close(tagger.probabilities(rgba), expected, atol=1e-6, rtol=1e-5)


PROBS = [0.9, 0.5, 0.49, 0.7, 0.7, 0.99, 0.8, 0.6]


def test_prompt_with_a1111s_defaults():
    """At or above 0.5 (solo's 0.5 is in, long_hair's 0.49 out), no rating tags, by name, underscores as
    spaces, brackets escaped."""
    assert db.tag_text(PROBS, TAGS) == r"1girl, blue sky, hat \(object\), looking at viewer, smile, solo"


def test_prompt_by_score_keeps_ties_in_model_order_and_ranks():
    text = db.tag_text(PROBS, TAGS, sort_alpha=False, ranks=True, threshold=0.6)
    assert text == r"(1girl:0.900), (hat \(object\):0.800), (smile:0.700), (looking at viewer:0.700), (blue sky:0.600)"


def test_prompt_filter_spaces_and_escapes():
    text = db.tag_text(PROBS, TAGS, filter_tags="looking at viewer, blue_sky ,solo", use_spaces=False, escape=False)
    assert text == "1girl, hat_(object), smile"
    assert db.tag_text([1.0], ["a\\b_[c]"]) == r"a\\b [c]"  # square brackets are not escaped
    assert db.tag_text(PROBS, TAGS, threshold=1.0) == ""


def test_file_with_its_tags_loads_and_code_is_refused(tmp_path):
    path = tmp_path / "torch_deepdanbooru" / db.FILE_NAME
    path.parent.mkdir()
    torch.save(tiny_tagger_state(TAGS), path)
    tagger = db.load_tagger(path)
    assert tagger.tags == tuple(TAGS)

    class RunsCode:
        def __reduce__(self):
            return (print, ("this must never run",))

    evil = tmp_path / "evil.pt"
    torch.save({**tiny_tagger_state(TAGS), "hook": RunsCode()}, evil)
    with pytest.raises(UnsafeModelFile, match="evil.pt"):
        db.load_tagger(evil)


def _broken(change) -> dict:
    state = tiny_tagger_state(TAGS)
    change(state)
    return state


@pytest.mark.parametrize("change,named", [
    (lambda s: s.pop("tags"), "no list of tag names under 'tags'"),
    (lambda s: s["tags"].append("extra"), "9 tag names for 8 outputs"),
    (lambda s: s.pop("n_Conv_98.weight"), "without a 4-D 'n_Conv_98.weight'"),
    (lambda s: s.pop("n_Conv_98.bias"), "missing n_Conv_98.bias"),
    (lambda s: s.update({"n_Conv_178.bias": torch.zeros(8)}), "unexpected n_Conv_178.bias"),
    (lambda s: s.update({"n_Conv_13.weight": torch.zeros(3, 3, 1, 1)}), "n_Conv_13 is a 1x1 conv"),
    (lambda s: s.update({"n_Conv_40.weight": torch.zeros(3, 5, 1, 1)}), "n_Conv_40 is a 1x1 conv from 5 channels"),
    (lambda s: s.update({"n_Conv_100.weight": torch.zeros(7, 6, 1, 1)}), "n_Conv_100 gives 7 channels"),
])
def test_broken_files_name_the_file_and_the_conv(tmp_path, change, named):
    path = tmp_path / "model-resnet_custom_v3.pt"
    torch.save(_broken(change), path)
    with pytest.raises(ModelError) as info:
        db.load_tagger(path)
    message = str(info.value)
    assert message.startswith(str(path)) and named in message and "\n" not in message


def test_the_file_is_found_in_a1111s_folder_or_named_missing(tmp_path):
    from underpaint.models.registry import ModelsDir

    (tmp_path / "models" / "Stable-diffusion").mkdir(parents=True)
    folder = ModelsDir(tmp_path)
    with pytest.raises(ModelNotFound) as err:
        db.tagger_file(folder)
    assert err.value.field == "model" and "underpaint download deepbooru" in str(err.value)
    assert str(tmp_path / "models" / "torch_deepdanbooru") in str(err.value)
    path = tmp_path / "models" / "torch_deepdanbooru" / db.FILE_NAME
    path.parent.mkdir()
    torch.save(tiny_tagger_state(TAGS), path)
    assert db.tagger_file(folder) == path
    picture = Image.new("RGB", (64, 48), (200, 120, 40))
    tagger = db.load_tagger(path)
    assert db.deepbooru(picture, path, ranks=True, threshold=0.0) == db.tag_text(
        tagger.probabilities(picture), tagger.tags, ranks=True, threshold=0.0)


# --------------------------------------------------------------------------- the API, Loopback and the CLI


@pytest.fixture(scope="module")
def tagged_models(tmp_path_factory, sd1_file):
    """A models folder with the tiny SD 1.5 checkpoint and a tiny tagger."""
    from test_server_support import tiny_models_dir

    root = tiny_models_dir(tmp_path_factory.mktemp("deepbooru-models"), sd1_file)
    path = root / "torch_deepdanbooru" / db.FILE_NAME
    path.parent.mkdir()
    torch.save(tiny_tagger_state(TAGS, seed=4, scale=1.0), path)  # probabilities from 0.04 to 0.99
    return root, path


def _photo() -> Image.Image:
    rng = np.random.default_rng(5)
    return Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))


def test_api_interrogate_deepdanbooru_with_the_servers_settings(tagged_models):
    from test_server_support import png_b64, real_api

    root, path = tagged_models
    picture = _photo()
    probabilities = db.load_tagger(path).probabilities(picture)
    with real_api(root) as api:
        options = api.get("/sdapi/v1/options").json()
        assert (options["interrogate_deepbooru_score_threshold"], options["deepbooru_sort_alpha"],
                options["deepbooru_use_spaces"], options["deepbooru_escape"], options["deepbooru_filter_tags"]) \
            == (0.5, True, True, True, "")
        r = api.post("/sdapi/v1/interrogate", json={"image": png_b64(picture), "model": "deepdanbooru"})
        assert r.status_code == 200, r.text
        assert r.json()["caption"] == db.tag_text(probabilities, tuple(TAGS))
        changes = {"interrogate_deepbooru_score_threshold": 0.0, "deepbooru_sort_alpha": False,
                   "deepbooru_use_spaces": False, "deepbooru_escape": False, "deepbooru_filter_tags": "solo, smile",
                   "interrogate_return_ranks": True}
        assert api.post("/sdapi/v1/options", json=changes).status_code == 200
        caption = api.post("/sdapi/v1/interrogate", json={"image": png_b64(picture), "model": "DeepDanbooru"}
                           ).json()["caption"]
        assert caption == db.tag_text(probabilities, tuple(TAGS), threshold=0.0, sort_alpha=False, use_spaces=False,
                                      escape=False, filter_tags="solo, smile", ranks=True)
        assert caption.count(":") == len(TAGS) - 3 and "hat_(object)" in caption  # no rating, solo or smile
        for body, field in (({"interrogate_deepbooru_score_threshold": 1.5}, "interrogate_deepbooru_score_threshold"),
                            ({"deepbooru_sort_alpha": "yes"}, "deepbooru_sort_alpha"),
                            ({"deepbooru_filter_tags": ["solo"]}, "deepbooru_filter_tags")):
            r = api.post("/sdapi/v1/options", json=body)
            assert r.status_code == 422 and r.json()["field"] == field, r.text


def test_loopback_appends_deepboorus_tags_each_pass(tagged_models):
    """A1111's Loopback with "DeepBooru": each pass's prompt is the request's, then the tags of the picture
    the pass starts from; through the engine (A1111's defaults) and the API (the server's settings)."""
    from test_server_support import png_b64, real_api
    from underpaint.pipeline.engine import Engine

    from test_interrogate import assert_loopback_appends

    root, path = tagged_models
    engine = Engine.load(root / "checkpoints" / "tiny-sd1.safetensors", device="cpu", dtype="fp32", models_dir=root)
    assert_loopback_appends(engine, "deepbooru", lambda picture: db.deepbooru(picture, path), _photo())
    photo = _photo().resize((64, 64))
    with real_api(root) as api:
        api.post("/sdapi/v1/options", json={"interrogate_deepbooru_score_threshold": 0.0, "deepbooru_use_spaces": False})
        r = api.post("/sdapi/v1/img2img", json={"init_images": [png_b64(photo)], "steps": 1, "prompt": "",
                                                "script_name": "loopback", "script_args": [2, 0.5, "Linear", "DeepBooru"]})
        assert r.status_code == 200, r.text
        import json

        passes = json.loads(r.json()["info"])["all_prompts"][1:]
        assert len(passes) == 2 and all(p.count(", ") == len(TAGS) - 2 and "long_hair" in p for p in passes)


def test_loopback_without_a_tagger_names_the_field(tmp_path, sd1_file):
    from test_server_support import png_b64, real_api, tiny_models_dir

    with real_api(tiny_models_dir(tmp_path, sd1_file)) as api:
        r = api.post("/sdapi/v1/img2img", json={"init_images": [png_b64(_photo())], "steps": 1,
                                                "script_name": "loopback", "script_args": [2, 0.5, "Linear", "DeepBooru"]})
    assert r.status_code == 422 and r.json()["field"] == "script_args[3]", r.text
    assert "underpaint download deepbooru" in r.json()["detail"]


def test_cli_interrogate_deepdanbooru(tagged_models, tmp_path):
    from cli_runner import run_cli

    from test_cli import assert_clean_error

    root, path = tagged_models
    picture = _photo()
    picture.save(tmp_path / "in.png")
    probabilities = db.load_tagger(path).probabilities(Image.open(tmp_path / "in.png"))
    proc = run_cli("interrogate", str(tmp_path / "in.png"), "--model", "deepdanbooru", "--models-dir", str(root))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == db.tag_text(probabilities, tuple(TAGS))
    proc = run_cli("interrogate", str(tmp_path / "in.png"), "--model", "deepdanbooru", "--models-dir", str(root),
                   "--threshold", "0", "--sort", "score", "--underscores", "--no-escape", "--filter-tags", "solo",
                   "--ranks")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == db.tag_text(probabilities, tuple(TAGS), threshold=0.0, sort_alpha=False,
                                              use_spaces=False, escape=False, filter_tags="solo", ranks=True)
    assert_clean_error(run_cli("interrogate", str(tmp_path / "in.png"), "--model", "deepdanbooru", "--models-dir",
                               str(tmp_path / "none")), "underpaint download deepbooru")
    assert_clean_error(run_cli("interrogate", str(tmp_path / "in.png"), "--model", "deepdanbooru", "--models-dir",
                               str(root), "--threshold", "2"), "threshold")
