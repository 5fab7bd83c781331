"""Prompt styles: A1111's styles.csv, its joining rules, the API's list and ``styles``, the CLI's ``--style``.

The rules are A1111 1.10's (modules/styles.py ``merge_prompts``/``apply_styles_to_prompt``, applied
in processing.py ``setup_prompts`` to every prompt and negative prompt): a style text holding
``{prompt}`` has every ``{prompt}`` replaced by the prompt as given; any other is joined to the
stripped prompt with ", ", empty parts left out; styles apply in order. The infotext records the
resulting prompts and no "Styles" key. Files are written here with :class:`csv.DictWriter` in
``utf-8-sig``, the way A1111 saves its own styles.csv.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from fastapi.testclient import TestClient

from test_cli import assert_clean_error, run_cli
from test_server_support import FakeBackend, decode_b64, make_models_dir
from underpaint.errors import InvalidParameter
from underpaint.prompts import styles as styles_module
from underpaint.prompts.styles import PromptStyle, StylesFile, apply_style_texts, merge_style, read_styles
from underpaint.server.app import create_app
from underpaint.server.config import ServerConfig

STYLES = [
    PromptStyle("cinematic", "{prompt}, film grain, anamorphic", "cartoon, {prompt}"),
    PromptStyle("ink", "ink drawing, crosshatching", "colour"),
    PromptStyle("Quote, \"comma\"", "line one\nline two", ""),
    PromptStyle("empty", "", ""),
]


def write_styles(path, styles=STYLES, *, fieldnames=("name", "prompt", "negative_prompt")):
    """A styles file as A1111 writes one (csv.DictWriter, UTF-8 with a byte-order mark)."""
    with open(path, "w", encoding="utf-8-sig", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(fieldnames))
        writer.writeheader()
        for style in styles:
            row = {"name": style.name, "prompt": style.prompt, "negative_prompt": style.negative_prompt}
            writer.writerow({k: row[k if k != "text" else "prompt"] for k in fieldnames})
    return path


@pytest.mark.parametrize("prompt, style, expected", [
    ("a cat", "oil painting", "a cat, oil painting"),
    ("  a cat \n", " oil painting ", "a cat, oil painting"),  # both stripped before joining
    ("", "oil painting", "oil painting"),  # an empty prompt is left out, no leading comma
    ("a cat", "", "a cat"),
    ("  a cat  ", "   ", "a cat"),  # an empty style still strips the prompt
    ("a cat", "{prompt}, film grain", "a cat, film grain"),
    (" a cat ", "x {prompt} y {prompt}", "x  a cat  y  a cat "),  # every mark, the prompt as given
    ("", "{prompt}, film grain", ", film grain"),  # the mark is replaced even by nothing
    ("a cat", "{PROMPT} grain", "a cat, {PROMPT} grain"),  # the mark is case-sensitive
])
def test_one_style_joins_as_a1111(prompt, style, expected):
    assert merge_style(style, prompt) == expected


def test_styles_apply_in_order_each_to_the_result_of_the_one_before():
    assert apply_style_texts("a cat", ["{prompt}, film grain", "ink drawing"]) == "a cat, film grain, ink drawing"
    assert apply_style_texts("a cat", ["ink drawing", "{prompt}, film grain"]) == "a cat, ink drawing, film grain"
    assert apply_style_texts("a cat", ["ink", "(({prompt}))"]) == "((a cat, ink))"
    assert apply_style_texts("a cat", []) == "a cat"


def test_a1111_styles_file_reads_back(tmp_path):
    book = read_styles(write_styles(tmp_path / "styles.csv"))
    assert list(book.styles.values()) == STYLES  # quotes, commas and new lines survive, in file order
    assert book.apply(["cinematic", "ink"], "a cat", "dog", field="styles") == (
        "a cat, film grain, anamorphic, ink drawing, crosshatching", "cartoon, dog, colour")


def test_older_and_hand_written_files(tmp_path):
    old = write_styles(tmp_path / "old.csv", STYLES[:2], fieldnames=("name", "text"))  # A1111's first format
    assert read_styles(old).styles["ink"] == PromptStyle("ink", "ink drawing, crosshatching", "")
    hand = tmp_path / "hand.csv"
    hand.write_text("name, prompt, negative_prompt\n"
                    "# a comment row, skipped\n"
                    "\n"
                    "ink, ink drawing, colour\n"
                    ",no name,skipped\n"
                    "short\n"
                    "ink, pen drawing, smudges\n", encoding="utf-8")
    book = read_styles(hand)
    assert book.names == ["ink", "short"]
    assert book.styles["ink"] == PromptStyle("ink", "pen drawing", "smudges")  # the later row wins
    assert book.styles["short"] == PromptStyle("short", "", "")


def test_bad_files_are_refused_naming_the_file(tmp_path, monkeypatch):
    cases = {
        "header.csv": "title,text\nink,ink drawing\n".encode(),
        "latin1.csv": "name,prompt\ncaf\xe9,x\n".encode("latin-1"),
        "field.csv": b"name,prompt\nbig,\"" + b"x" * (csv.field_size_limit() + 10) + b"\"\n",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InvalidParameter) as exc:
            read_styles(tmp_path / name)
        assert exc.value.field == "styles_file" and name in str(exc.value), name
    monkeypatch.setattr(styles_module, "MAX_STYLES_FILE_BYTES", 64)
    write_styles(tmp_path / "large.csv", STYLES * 4)
    with pytest.raises(InvalidParameter, match="at most"):
        read_styles(tmp_path / "large.csv")
    assert read_styles(tmp_path / "missing.csv").styles == {}
    (tmp_path / "empty.csv").write_bytes(b"")
    assert read_styles(tmp_path / "empty.csv").styles == {}


def test_unknown_names_are_refused_listing_the_known_ones(tmp_path):
    book = read_styles(write_styles(tmp_path / "styles.csv"))
    with pytest.raises(InvalidParameter) as exc:
        book.apply(["ink", "cinematc"], "a", "", field="styles")
    assert exc.value.field == "styles" and exc.value.value == "cinematc"
    for style in STYLES:
        assert repr(style.name) in exc.value.expected
    with pytest.raises(InvalidParameter, match="does not exist"):
        read_styles(tmp_path / "nope.csv").apply(["ink"], "a", "", field="styles")


def test_the_file_is_read_again_when_it_changes(tmp_path):
    path = write_styles(tmp_path / "styles.csv", STYLES[:1])
    live = StylesFile(path)
    assert live.book().names == ["cinematic"]
    write_styles(path, STYLES[:2])
    os.utime(path, ns=(1, 10**18))  # a new modification time even on a coarse clock
    assert live.book().names == ["cinematic", "ink"]
    path.unlink()
    assert live.book().names == []


def test_saving_and_deleting_keep_the_rest_of_the_file(tmp_path):
    """A style saved replaces the row of its name in place (a later duplicate goes), or is added at the end;
    comment rows, other columns and the older "text" header stay; the file before is kept as .bak."""
    path = tmp_path / "styles.csv"
    original = ('name,text,negative_prompt,notes\n"# comment",,,\ncinematic,"{prompt}, film",blurry,mine\n'
                'ink,"ink, lines",,\ncinematic,older,,\n')
    path.write_text(original, encoding="utf-8")
    live = StylesFile(path)
    live.save(PromptStyle("cinematic", "movie still of {prompt}", "cartoon, \"flat\""))
    assert (tmp_path / "styles.csv.bak").read_text(encoding="utf-8") == original
    rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines()))
    assert rows == [["name", "text", "negative_prompt", "notes"], ["# comment", "", "", ""],
                    ["cinematic", "movie still of {prompt}", 'cartoon, "flat"', ""], ["ink", "ink, lines", "", ""]]
    live.save(PromptStyle("new one", "b", ""))
    assert live.book().names == ["cinematic", "ink", "new one"]
    assert read_styles(path).styles["cinematic"].negative_prompt == 'cartoon, "flat"'
    assert live.delete("ink") and not live.delete("ink")
    assert live.book().names == ["cinematic", "new one"]
    for bad in ("", " padded ", "#hidden", "two\nlines", "x" * 201):
        with pytest.raises(InvalidParameter) as err:
            live.save(PromptStyle(bad, "p", ""))
        assert err.value.field == "name"
    fresh = StylesFile(tmp_path / "none" / "styles.csv")  # no file yet: A1111's header is written
    fresh.save(PromptStyle("first", "a", "b"))
    assert (tmp_path / "none" / "styles.csv").read_text(encoding="utf-8") == "name,prompt,negative_prompt\nfirst,a,b\n"


# --------------------------------------------------------------------------- the API


@pytest.fixture()
def served(tmp_path):
    """A server whose styles.csv sits beside its models folder (the default place)."""
    backend = FakeBackend()
    write_styles(tmp_path / "styles.csv")
    app = create_app(ServerConfig(models_dir=make_models_dir(tmp_path / "models"), preload=False,
                                  outdir=tmp_path / "out"), loader=backend)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client, backend


def test_prompt_styles_lists_the_file(served):
    client, _ = served
    listed = client.get("/sdapi/v1/prompt-styles").json()
    assert listed == [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt} for s in STYLES]


def test_styles_are_saved_and_deleted_over_http(served, tmp_path):
    client, _ = served
    r = client.post("/underpaint/v1/prompt-styles", json={"name": "dusk", "prompt": "{prompt} at dusk"})
    assert r.status_code == 200 and r.json()["styles"][-1] == "dusk"
    assert client.get("/sdapi/v1/prompt-styles").json()[-1] == {"name": "dusk", "prompt": "{prompt} at dusk",
                                                               "negative_prompt": ""}
    r = client.post("/underpaint/v1/prompt-styles", json={"name": "", "prompt": "x"})
    assert r.status_code == 422 and r.json()["field"] == "name"
    assert client.delete("/underpaint/v1/prompt-styles", params={"name": "dusk"}).json()["styles"] == \
        [s.name for s in STYLES]
    r = client.delete("/underpaint/v1/prompt-styles", params={"name": "dusk"})
    assert r.status_code == 404 and r.json()["field"] == "name" and str(tmp_path) not in r.text


def test_request_styles_reach_the_prompts_and_the_infotext(served):
    client, backend = served
    r = client.post("/sdapi/v1/txt2img", json={
        "prompt": "a cat", "negative_prompt": "dog", "styles": ["cinematic", "ink"], "steps": 2, "width": 64,
        "height": 64, "seed": 3, "enable_hr": True, "hr_scale": 1.5, "hr_prompt": "a tabby"})
    assert r.status_code == 200, r.text
    params = backend.params[-1]
    assert params.prompt == "a cat, film grain, anamorphic, ink drawing, crosshatching"
    assert params.negative_prompt == "cartoon, dog, colour"
    assert params.hires.prompt == "a tabby, film grain, anamorphic, ink drawing, crosshatching"
    assert params.hires.negative_prompt == ""  # none of its own: it follows the styled negative prompt
    info = json.loads(r.json()["info"])
    assert info["prompt"] == params.prompt and info["negative_prompt"] == params.negative_prompt
    assert info["styles"] == ["cinematic", "ink"]
    text = info["infotexts"][0]
    assert text.startswith(f"{params.prompt}\nNegative prompt: {params.negative_prompt}\n")
    assert "Styles" not in text
    assert r.json()["parameters"]["prompt"] == "a cat"  # the request itself is echoed unchanged


def test_unknown_style_is_a_422_listing_the_known_ones(served, photo):
    client, backend = served
    for route, extra in (("txt2img", {}), ("img2img", {"init_images": [_png(photo)]})):
        r = client.post(f"/sdapi/v1/{route}", json={"prompt": "a", "styles": ["ink", "Cinematic"], **extra})
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["field"] == "styles" and "'Cinematic'" in body["detail"]
        assert "'cinematic'" in body["detail"] and "'ink'" in body["detail"]
    assert backend.params == []


def test_no_styles_file_means_no_styles(tmp_path):
    app = create_app(ServerConfig(models_dir=make_models_dir(tmp_path / "models"), preload=False),
                     loader=FakeBackend())
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert client.get("/sdapi/v1/prompt-styles").json() == []
        r = client.post("/sdapi/v1/txt2img", json={"styles": ["ink"]})
        assert r.status_code == 422 and r.json()["field"] == "styles"
    with pytest.raises(InvalidParameter):  # a file named on purpose must be there
        ServerConfig(styles_file=tmp_path / "nope.csv")


def test_styled_request_paints_the_same_as_the_final_prompt_typed_out(tmp_path, sd1_engine):
    write_styles(tmp_path / "my-styles.csv")
    app = create_app(ServerConfig(models_dir=make_models_dir(tmp_path / "models"), preload=False,
                                  styles_file=tmp_path / "my-styles.csv"), loader=lambda path: sd1_engine)
    job = {"steps": 2, "width": 64, "height": 64, "seed": 4, "sampler_name": "Euler"}
    with TestClient(app, base_url="http://127.0.0.1") as client:
        styled = client.post("/sdapi/v1/txt2img", json={**job, "prompt": "a cat", "styles": ["ink"]}).json()
        typed = client.post("/sdapi/v1/txt2img", json={**job, "prompt": "a cat, ink drawing, crosshatching",
                                                       "negative_prompt": "colour"}).json()
    a, b = decode_b64(styled["images"][0]), decode_b64(typed["images"][0])
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert a.info["parameters"] == b.info["parameters"]


def _png(image):
    from test_server_support import png_b64

    return png_b64(image.resize((64, 64)))


# --------------------------------------------------------------------------- the CLI


def test_cli_unknown_style_fails_before_loading_a_model(tmp_path):
    write_styles(tmp_path / "styles.csv")
    proc = run_cli("txt2img", "-p", "a", "--style", "ink", "--style", "inq", "--styles-file",
                   str(tmp_path / "styles.csv"), "--model", str(tmp_path / "no-such-model.safetensors"))
    assert_clean_error(proc, "--style", "'inq'", "'ink'", "'cinematic'")


def test_cli_styles_from_beside_the_models_folder(tmp_path, sd1_file):
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    (models / "checkpoints" / "tiny.safetensors").symlink_to(sd1_file)
    write_styles(tmp_path / "styles.csv")
    out = tmp_path / "styled.png"
    proc = run_cli("txt2img", "-p", "a cat", "-n", "dog", "--style", "cinematic", "--style", "ink",
                   "--steps", "2", "-W", "64", "-H", "64", "--seed", "5", "--models-dir", str(models), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    from PIL import Image

    text = Image.open(out).text["parameters"]
    assert text.startswith("a cat, film grain, anamorphic, ink drawing, crosshatching\n"
                           "Negative prompt: cartoon, dog, colour\nSteps: 2, ")
