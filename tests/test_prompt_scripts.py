"""A1111's scripts "Prompt matrix" and "Prompts from file or textbox": each picture (or line) is an
ordinary request, checked here against the same request made alone."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from underpaint.errors import InvalidParameter
from underpaint.params import GenerationParams, PromptMatrixOptions, PromptsFromFileOptions
from underpaint.pipeline import prompt_matrix, prompts_file
from underpaint.pipeline.xyz_plot import cell_origin

BASE = dict(steps=1, sampler="Euler", rng="cpu", width=64, height=64)


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


# --------------------------------------------------------------------------- Prompt matrix


@pytest.mark.parametrize("text, options, want", [
    # A1111 keeps the first part as written: "a cat " then ", " then the part
    ("a cat | red | wearing a hat", {}, ["a cat ", "a cat , red", "a cat , wearing a hat", "a cat , red, wearing a hat"]),
    ("a cat|red,|, blue", {"joiner": "space"}, ["a cat", "a cat red", "a cat  blue", "a cat red  blue"]),
    ("cat|red|blue", {"put_at_start": True}, ["cat", "red, cat", "blue, cat", "red, blue, cat"]),
    ("no parts", {}, ["no parts"]),
])
def test_combinations_are_a1111s(text, options, want):
    assert prompt_matrix.combinations(text, PromptMatrixOptions(**options)) == want


def test_labels_split_the_parts_between_columns_and_rows():
    columns, rows = prompt_matrix.labels("base|a|b|c")
    assert [[(a.text, a.active) for a in label] for label in columns] == [
        [("a", False), ("b", False)], [("a", True), ("b", False)], [("a", False), ("b", True)], [("a", True), ("b", True)]]
    assert [[(a.text, a.active) for a in label] for label in rows] == [[("c", False)], [("c", True)]]


def test_every_picture_is_a_plain_request(sd1_engine):
    options = PromptMatrixOptions(margin_size=4)
    progress = []
    params = GenerationParams(**BASE, prompt="a cat|red|blue hat", negative_prompt="blurry", seed=21,
                              subseed=7, subseed_strength=0.3, batch_size=3, prompt_matrix=options)
    result = sd1_engine.generate(params, progress=progress.append)
    assert len(result.images) == 1 + 4
    prompts = ["a cat", "a cat, red", "a cat, blue hat", "a cat, red, blue hat"]
    assert list(result.prompts[1:]) == prompts and result.prompts[0] == prompts[0]
    grid = result.images[0]
    pad_top = grid.height - 2 * 64 - 4
    assert grid.width == 64 * 3 // 4 + 2 * 64 + 4 and pad_top > 0  # one part across, one down: labels above and left
    for i, prompt in enumerate(prompts):
        plain = sd1_engine.generate(GenerationParams(**BASE, prompt=prompt, negative_prompt="blurry", seed=21,
                                                     subseed=7 + i, subseed_strength=0.3))
        assert np.array_equal(_pixels(result.images[1 + i]), _pixels(plain.images[0]))
        assert result.infotexts[1 + i] == plain.infotexts[0]
        x, y = cell_origin(i % 2, i // 2, (64, 64), grid.width - 2 * 64 - 4, pad_top, 4)
        assert np.array_equal(_pixels(grid.crop((x, y, x + 64, y + 64))), _pixels(plain.images[0]))
    assert result.infotexts[0] == result.infotexts[1] and result.seeds == (21,) * 5
    assert {(p.job, p.job_count) for p in progress} == {(j, 4) for j in range(4)}


def test_grid_labels_grey_out_the_parts_left_out(sd1_engine):
    result = sd1_engine.generate(GenerationParams(**BASE, prompt="x|MMMM", seed=1, prompt_matrix=PromptMatrixOptions()))
    grid = _pixels(result.images[0])
    band = grid[:grid.shape[0] - 64]  # one part: two columns, one row, the labels above
    left, right = band[:, :64], band[:, 64:]
    grey = np.all(left == 153, axis=-1)
    assert grey.any() and not np.all(left < 100, axis=-1).any()  # struck-through grey over the first column
    assert np.all(right < 100, axis=-1).any() and not np.all(right == 153, axis=-1).any()  # black over the second


def test_negative_prompt_different_seeds_and_styles(sd1_engine):
    def styled(prompt, negative):
        return prompt + ", oil", negative + ", text"

    options = PromptMatrixOptions(prompt_type="negative", different_seeds=True, joiner="space", styles=styled)
    result = sd1_engine.generate(GenerationParams(**BASE, prompt="a cat|not split", negative_prompt="dog|fog",
                                                  seed=5, prompt_matrix=options))
    assert result.negative_prompts[1:] == ("dog, text", "dog fog, text")
    assert result.prompts[1:] == ("a cat|not split, oil",) * 2 and result.seeds[1:] == (5, 6)
    plain = sd1_engine.generate(GenerationParams(**BASE, prompt="a cat|not split, oil", negative_prompt="dog fog, text",
                                                 seed=6, subseed=result.subseeds[2]))
    assert np.array_equal(_pixels(result.images[2]), _pixels(plain.images[0]))


@pytest.mark.parametrize("options, field", [
    ({"prompt_type": "both"}, "prompt_matrix_prompt_type"), ({"joiner": ";"}, "prompt_matrix_joiner"),
    ({"margin_size": 501}, "prompt_matrix_margin_size"), ({"put_at_start": "yes"}, "prompt_matrix_put_at_start"),
])
def test_matrix_options_are_checked(options, field):
    with pytest.raises(InvalidParameter) as err:
        PromptMatrixOptions(**options)
    assert err.value.field == field


def test_matrix_refusals():
    with pytest.raises(InvalidParameter) as err:
        GenerationParams(prompt="a" + "|b" * 13, prompt_matrix=PromptMatrixOptions())
    assert err.value.field == "prompt" and "at most 12" in err.value.expected
    with pytest.raises(InvalidParameter) as err:
        GenerationParams(prompt="a|b", prompt_matrix=PromptMatrixOptions(),
                         prompts_from_file=PromptsFromFileOptions(text="x"))
    assert "one script at a time" in err.value.expected


# --------------------------------------------------------------------------- Prompts from file


def test_lines_read_as_a1111_reads_them():
    lines = prompts_file.parse_lines(
        "  a lighthouse at dusk  \n\n"
        "--prompt a harbour at dawn --negative_prompt \"fog, rain\" --steps 3 --cfg_scale 4.5 --seed 9\n"
        "--sampler_name \"DPM++ 2M Karras\" --width 96 --tiling true --restore_faces false --do_not_save_grid true\n"
        "--sampler_index 1 --sd_model other.safetensors --prompt_for_display x --n_iter 2 --batch_size 2\n")
    assert [line.number for line in lines] == [1, 3, 4, 5]
    assert lines[0].prompt == "a lighthouse at dusk" and lines[0].changes == {}
    assert lines[1].prompt == "a harbour at dawn" and lines[1].negative_prompt == "fog, rain"
    assert lines[1].changes == {"steps": 3, "cfg_scale": 4.5, "seed": 9}
    assert lines[2].changes == {"sampler": "DPM++ 2M Karras", "width": 96, "tiling": True, "restore_faces": False}
    assert lines[2].prompt is None
    assert lines[3].changes == {"sampler": "DPM++ SDE", "n_iter": 2, "batch_size": 2}  # A1111 1.10's second sampler
    assert lines[3].checkpoint == "other.safetensors"


@pytest.mark.parametrize("text, needle", [
    ("--steps", "a value after --steps"),
    ("--steps three", "a whole number"),
    ("--stepz 3", "did you mean '--steps'"),
    ("--prompt \"unclosed", "shell"),
    ("--outpath_samples /etc", "does not choose where"),
    ("--sampler_name Eulr", "did you mean 'Euler'"),
    ("--tiling yes", "true or false"),
    ("--steps 3 4", "starting with \"--\""),
    ("--sampler_index 99", "an index into /sdapi/v1/samplers"),
    ("\n \n", "at least one line"),
])
def test_bad_lines_are_refused_naming_the_line(text, needle):
    with pytest.raises(InvalidParameter) as err:
        PromptsFromFileOptions(text="a cat\n" + text if text.strip() else text)
    assert err.value.field == "prompts_text" and needle in err.value.expected
    if text.strip():
        assert str(err.value.value).startswith("line 2: ")


def test_each_line_is_a_plain_request(sd1_engine):
    text = "red hat\n--prompt blue hat --negative_prompt fog --steps 2 --seed 40\n--cfg_scale 3 --n_iter 2\n"
    options = PromptsFromFileOptions(text=text, iterate_seed=True, position="end")
    progress = []
    result = sd1_engine.generate(GenerationParams(**BASE, prompt="a cat", negative_prompt="blurry", seed=10,
                                                  batch_size=2, prompts_from_file=options), progress=progress.append)
    # seeds: 10 for line 1 (two pictures), line 2's own 40, line 3 at 10 + 2 x 2 x 1 lines gone by
    want = [
        dict(prompt="a cat red hat", negative_prompt="blurry", seed=10, batch_size=2),
        dict(prompt="a cat blue hat", negative_prompt="blurry fog", seed=40, steps=2, batch_size=2),
        dict(prompt="a cat", negative_prompt="blurry", seed=14, cfg_scale=3.0, batch_size=2, n_iter=2),
    ]
    pictures, infotexts = [], []
    for fields in want:
        plain = sd1_engine.generate(GenerationParams(**{**BASE, **fields}))
        pictures += plain.images
        infotexts += plain.infotexts
    assert len(result.images) == len(pictures) == 8
    for got, expected in zip(result.images, pictures):
        assert np.array_equal(_pixels(got), _pixels(expected))
    assert list(result.infotexts) == infotexts and result.seeds == (10, 11, 40, 41, 14, 15, 16, 17)
    assert {p.job_count for p in progress} == {4} and {p.job for p in progress} == {0, 1, 2, 3}


def test_seeds_drawn_once_or_per_line(sd1_engine, monkeypatch):
    import underpaint.params as params_mod

    draws = iter([111, 222, 333, 444, 555, 666])
    monkeypatch.setattr(params_mod, "random_seed", lambda: next(draws))
    same = sd1_engine.generate(GenerationParams(**BASE, prompt="cat", seed=-1, prompts_from_file=PromptsFromFileOptions(
        text="a\nb", same_seed=True)))
    assert same.seeds == (111, 111)
    own = sd1_engine.generate(GenerationParams(**BASE, prompt="cat", seed=-1, subseed=0,
                                               prompts_from_file=PromptsFromFileOptions(text="a\nb")))
    assert own.seeds[0] != own.seeds[1]


def test_line_styles_and_combined_grid(sd1_engine, tmp_path):
    from underpaint.prompts.styles import read_styles

    (tmp_path / "styles.csv").write_text("name,prompt,negative_prompt\nink,\"{prompt}, ink\",smudge\n")
    book = read_styles(tmp_path / "styles.csv")
    options = PromptsFromFileOptions(text="--prompt cat --styles ink\ndog", style_book=book, combined=True,
                                     styles=lambda p, n: (p + ", request style", n))
    result = sd1_engine.generate(GenerationParams(**BASE, seed=3, prompts_from_file=options))
    assert result.prompts[1:] == ("cat, ink", "dog, request style")
    assert result.negative_prompts[1] == "smudge"
    assert result.images[0].size == (128, 64) and result.infotexts[0] == "\n".join(result.infotexts[1:])
    assert np.array_equal(_pixels(result.images[0])[:, 64:], _pixels(result.images[2]))


def test_each_prompt_made_gets_the_added_text_last():
    """``add_to_prompt`` (a server's "Add hypernetwork to prompt") goes after the styles, line styles too."""
    from underpaint.pipeline import prompt_matrix, prompts_file
    from underpaint.prompts.styles import PromptStyle, StyleBook

    def add(prompt):
        return prompt + "<hypernet:anime:1.0>"

    matrix = PromptMatrixOptions(styles=lambda p, n: (p + ", oil", n), add_to_prompt=add)
    made = prompt_matrix.requests(GenerationParams(**BASE, prompt="a cat|red", prompt_matrix=matrix))
    assert [p.prompt for p in made] == ["a cat, oil<hypernet:anime:1.0>", "a cat, red, oil<hypernet:anime:1.0>"]
    book = StyleBook({"ink": PromptStyle("ink", "{prompt}, ink")})
    lines = PromptsFromFileOptions(text="--prompt cat --styles ink\ndog", style_book=book, add_to_prompt=add)
    jobs = prompts_file.plan(GenerationParams(**BASE, prompts_from_file=lines))
    assert [job.params.prompt for job in jobs] == ["cat, ink<hypernet:anime:1.0>", "dog<hypernet:anime:1.0>"]


def test_line_values_a_request_cannot_take_are_refused_before_any_runs(sd1_engine):
    ran = []
    with pytest.raises(InvalidParameter) as err:
        sd1_engine.generate(GenerationParams(**BASE, prompt="cat", prompts_from_file=PromptsFromFileOptions(
            text="fine\n--steps 0")), progress=ran.append)
    assert err.value.field == "prompts_text" and err.value.value == "line 2: --steps 0" and not ran
    with pytest.raises(InvalidParameter) as err:
        sd1_engine.generate(GenerationParams(**BASE, prompts_from_file=PromptsFromFileOptions(
            text="--sd_model other")))
    assert "the server" in err.value.expected


# --------------------------------------------------------------------------- the A1111 API


@pytest.fixture(scope="module")
def api(sd1_file, tmp_path_factory):
    from test_server_support import real_api, tiny_models_dir

    folder = tiny_models_dir(tmp_path_factory.mktemp("prompt-scripts") / "models", sd1_file)
    (folder.parent / "styles.csv").write_text("name,prompt,negative_prompt\nink,\"{prompt}, ink\",smudge\n")
    with real_api(folder) as client:
        yield client


REQUEST = {"steps": 1, "width": 64, "height": 64, "seed": 8, "sampler_name": "Euler",
           "override_settings": {"randn_source": "CPU"}}


def _post(client, path="/sdapi/v1/txt2img", **body):
    import json

    from test_server_support import decode_b64

    r = client.post(path, json={**REQUEST, **body})
    assert r.status_code == 200, r.text
    return [np.asarray(decode_b64(data).convert("RGB")) for data in r.json()["images"]], json.loads(r.json()["info"])


def test_api_lists_the_scripts_with_their_arguments(api):
    scripts = api.get("/sdapi/v1/scripts").json()
    assert scripts["txt2img"][:3] == ["prompt matrix", "prompts from file or textbox", "x/y/z plot"]
    assert scripts["img2img"][:7] == ["loopback", "outpainting mk2", "poor man's outpainting", "prompt matrix",
                                      "prompts from file or textbox", "sd upscale", "x/y/z plot"]
    info = {(s["name"], s["is_img2img"]): s for s in api.get("/sdapi/v1/script-info").json()}
    assert [a["label"] for a in info["prompt matrix", False]["args"]][2:4] == ["Select prompt", "Select joining char"]
    assert info["prompts from file or textbox", True]["args"][3]["label"] == "List of prompt inputs"


def test_api_prompt_matrix_styles_each_prompt(api):
    images, info = _post(api, prompt="a cat|red", styles=["ink"], script_name="Prompt matrix",
                         script_args=[False, False, "positive", "comma", 0])
    assert len(images) == 3 and info["all_prompts"][1:] == ["a cat, ink", "a cat, red, ink"]
    want, plain = _post(api, prompt="a cat, red, ink", negative_prompt="smudge", subseed=info["all_subseeds"][2])
    assert np.array_equal(images[2], want[0]) and plain["infotexts"][0] == info["infotexts"][2]


def test_api_prompts_from_file_runs_each_line(api, photo):
    from test_server_support import png_b64

    text = "red\n--prompt blue --steps 2\n"
    images, info = _post(api, "/sdapi/v1/img2img", prompt="a cat", init_images=[png_b64(photo)],
                         denoising_strength=0.5, script_name="prompts from file or textbox",
                         script_args=[True, False, "end", text])
    assert info["all_prompts"] == ["a cat red", "a cat blue"] and info["all_seeds"] == [8, 9]
    want, _ = _post(api, "/sdapi/v1/img2img", prompt="a cat blue", steps=2, seed=9, init_images=[png_b64(photo)],
                    denoising_strength=0.5)
    assert np.array_equal(images[1], want[0])
    # A1111 before 1.7: [iterate, same seed, text]
    images, info = _post(api, prompt="", script_name="prompts from file or textbox", script_args=[False, True, "dog"])
    assert info["all_prompts"] == ["dog"] and len(images) == 1


@pytest.mark.parametrize("name, args, field, needle", [
    ("prompt matrix", [False, False, "sideways"], "script_args[2]", "positive"),
    ("prompt matrix", [False, False, "positive", "comma", 0, 1], "script_args", "at most 5"),
    ("prompts from file or textbox", [False, False, "start", "a\n--steps 0"], "script_args[3]", "line 2"),
    ("prompts from file or textbox", [False, False, "start", "--sd_model nowhere"], "script_args[3]",
     "sd-models"),
    ("prompts from file or textbox", [False, False, "start", "--n_iter 70"], "script_args", "at most 64"),
    ("prompts from file or textbox", [False, False, "start", "--styles nope"], "script_args[3]", "ink"),
    ("prompts from file or textbox", [False, False, "start", "--width 8192"], "script_args[3]", "limits"),
])
def test_api_refusals_name_the_argument(api, name, args, field, needle):
    r = api.post("/sdapi/v1/txt2img", json={**REQUEST, "prompt": "a|b", "script_name": name, "script_args": args})
    assert r.status_code == 422 and r.json()["field"] == field and needle in r.text, r.text


from test_xyz_plot import switching_api, two_models  # noqa: E402,F401  (fixtures: two checkpoints, a server over them)


def test_api_line_checkpoints_switch_models_and_come_back(switching_api):
    client, loads = switching_api
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-a", "sd_vae": "None"}).status_code == 200
    images, info = _post(client, prompt="cat", script_name="prompts from file or textbox",
                         script_args=[False, False, "start", "--sd_model tiny-b --prompt red\nblue"])
    assert info["all_prompts"] == ["red cat", "blue cat"]
    assert "Model: tiny-b," in info["infotexts"][0] and "Model: tiny-a," in info["infotexts"][1]
    for picture, (prompt, checkpoint) in zip(images, (("red cat", "tiny-b"), ("blue cat", "tiny-a"))):
        want, _ = _post(client, prompt=prompt, override_settings={"randn_source": "CPU",
                                                                  "sd_model_checkpoint": checkpoint})
        assert np.array_equal(picture, want[0])
    assert _post(client, prompt="x")[1]["sd_model_name"] == "tiny-a"  # the selected checkpoint stays


# --------------------------------------------------------------------------- the CLI


def test_cli_prompt_matrix_writes_the_grid_then_the_pictures(tmp_path, sd1_file, sd1_engine):
    from cli_runner import run_cli

    styles = tmp_path / "styles.csv"
    styles.write_text("name,prompt,negative_prompt\nink,\"{prompt}, ink\",smudge\n")
    proc = run_cli("txt2img", "-p", "a cat|red", "--steps", "1", "--sampler", "Euler", "--rng", "cpu", "-W", "64",
                   "-H", "64", "--seed", "6", "--model", str(sd1_file), "-o", str(tmp_path / "m.png"),
                   "--prompt-matrix", "--prompt-matrix-different-seeds", "--style", "ink", "--styles-file", str(styles))
    assert proc.returncode == 0, proc.stderr
    grid, first, second = (Image.open(tmp_path / f"m-{i}.png") for i in (1, 2, 3))
    assert grid.width == 128 and grid.height > 64
    plain = sd1_engine.generate(GenerationParams(**BASE, prompt="a cat, red, ink", negative_prompt="smudge", seed=7))
    assert np.array_equal(_pixels(second), _pixels(plain.images[0]))
    assert second.text["parameters"].startswith("a cat, red, ink\nNegative prompt: smudge")
    assert first.text["parameters"].startswith("a cat, ink\n") and grid.text["parameters"] == first.text["parameters"]


def test_cli_prompts_from_a_file_switch_checkpoints(tmp_path, two_models):
    from cli_runner import run_cli

    lines = tmp_path / "lines.txt"
    lines.write_text("red\n--sd_model tiny-b --prompt blue --seed 3\n", encoding="utf-8")
    common = ["-p", "cat", "--steps", "1", "--sampler", "Euler", "--rng", "cpu", "-W", "64", "-H", "64", "--seed", "6",
              "--models-dir", str(two_models), "--device", "cpu", "--dtype", "fp32"]
    proc = run_cli("txt2img", *common, "--model", "tiny-a", "-o", str(tmp_path / "l.png"), "--prompts-from", str(lines),
                   "--prompts-combined")
    assert proc.returncode == 0, proc.stderr
    combined, red, blue = (Image.open(tmp_path / f"l-{i}.png") for i in (1, 2, 3))
    assert combined.size == (128, 64)
    for picture, extra, name in ((red, ["--model", "tiny-a", "-p", "red cat"], "r"),
                                 (blue, ["--model", "tiny-b", "-p", "blue cat", "--seed", "3"], "b")):
        proc = run_cli("txt2img", *common, *extra, "-o", str(tmp_path / f"{name}.png"))
        assert proc.returncode == 0, proc.stderr
        want = Image.open(tmp_path / f"{name}.png")
        assert np.array_equal(_pixels(picture), _pixels(want)) and picture.text["parameters"] == want.text["parameters"]


@pytest.mark.parametrize("extra, needles", [
    (["--prompt-matrix-joiner", "space"], ["--prompt-matrix-joiner", "--prompt-matrix beside it"]),
    (["--prompts-at", "end"], ["--prompts-at", "--prompts-from FILE beside it"]),
    (["--prompts-from", "missing.txt"], ["--prompts-from: got 'missing.txt'", "exists"]),
    (["--prompts-from", "LINES"], ["--prompts-from: got 'line 2: --stepz'", "--steps"]),
    (["--prompt-matrix", "--prompts-from", "GOOD"], ["one script at a time"]),
])
def test_cli_refusals_name_the_flag(tmp_path, sd1_file, extra, needles):
    from cli_runner import run_cli

    from test_cli import assert_clean_error

    (tmp_path / "lines.txt").write_text("fine\n--stepz 3\n")
    (tmp_path / "good.txt").write_text("fine\n")
    files = {"LINES": str(tmp_path / "lines.txt"), "GOOD": str(tmp_path / "good.txt")}
    extra = [files.get(word, word) for word in extra]
    proc = run_cli("txt2img", "-p", "a|b", "--steps", "1", "-W", "64", "-H", "64", "--model", str(sd1_file),
                   "-o", str(tmp_path / "o.png"), *extra)
    assert_clean_error(proc, *needles)
