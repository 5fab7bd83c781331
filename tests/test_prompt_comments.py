"""A1111's prompt comments ("Enable comments", prompts/comments.py): ``#`` hides the rest of its line; they
go before anything reads the prompt, so the picture, the LoRA tags applied and the infotext are those of
the prompt without them; the setting turns them off, and the token counter counts what is left."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from test_server_support import FakeBackend, make_models_dir
from underpaint.params import GenerationParams, HiresOptions
from underpaint.prompts.comments import strip_comments, without_comments
from underpaint.server.app import create_app
from underpaint.server.config import ServerConfig


@pytest.mark.parametrize("text, want", [
    ("a castle", "a castle"),
    ("a castle # a tower next time", "a castle "),
    ("a castle\n# notes\nat dusk", "a castle\nat dusk"),
    ("# notes only", ""),
    ("a cat, #ff0000 eyes", "a cat, "),  # as A1111: every # starts a comment
    ("a (red:1.2) castle\n  # indented: only the rest of the line\nBREAK sky", "a (red:1.2) castle\n  \nBREAK sky"),
])
def test_what_a_comment_hides(text, want):
    assert strip_comments(text) == want


def test_the_hires_prompt_loses_its_comments_too_and_the_setting_keeps_them():
    params = GenerationParams(prompt="a barn # old", negative_prompt="fog # or mist", width=64, height=64,
                              hires=HiresOptions(scale=2.0, prompt="a detailed barn # hires only"))
    done = without_comments(params)
    assert (done.prompt, done.negative_prompt, done.hires.prompt) == ("a barn ", "fog ", "a detailed barn ")
    assert without_comments(params.replace(prompt_comments=False)) == params.replace(prompt_comments=False)


def test_a_commented_prompt_makes_the_uncommented_prompts_picture(sd1_engine):
    """The picture and infotext of "a red barn # ..." are those of "a red barn "; a LoRA tag in a comment is
    not applied (no such file is looked for); with comments off the text counts, # and all."""
    base = dict(steps=2, width=64, height=64, seed=3, sampler="Euler")
    commented = sd1_engine.generate(GenerationParams(prompt="a red barn # <lora:nowhere:1> old\n# ideas", **base))
    plain = sd1_engine.generate(GenerationParams(prompt="a red barn ", **base))
    assert commented.images[0].tobytes() == plain.images[0].tobytes()
    assert commented.infotexts[0].startswith("a red barn \nSteps: 2,")
    kept = sd1_engine.generate(GenerationParams(prompt="a red barn # old", prompt_comments=False, **base))
    assert kept.images[0].tobytes() != plain.images[0].tobytes()
    assert kept.infotexts[0].startswith("a red barn # old\n")


def test_the_api_setting_and_the_token_counter(tmp_path):
    backend = FakeBackend()
    app = create_app(ServerConfig(models_dir=make_models_dir(tmp_path), preload=False), loader=backend)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert client.get("/sdapi/v1/options").json()["enable_prompt_comments"] is True
        body = {"prompt": "a barn # note", "steps": 1, "width": 64, "height": 64}
        assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200
        assert backend.params[-1].prompt_comments is True
        r = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"enable_prompt_comments": False}})
        assert r.status_code == 200 and backend.params[-1].prompt_comments is False
        count = client.post("/underpaint/v1/token-count", json={"prompt": "a barn # one two three four"}).json()
        assert count == client.post("/underpaint/v1/token-count", json={"prompt": "a barn "}).json()
        assert client.post("/sdapi/v1/options", json={"enable_prompt_comments": False}).status_code == 200
        more = client.post("/underpaint/v1/token-count", json={"prompt": "a barn # one two three four"}).json()
        assert more["tokens"] > count["tokens"]
        info = json.loads(client.post("/sdapi/v1/txt2img", json=body).json()["info"])
        assert backend.params[-1].prompt_comments is False and info["prompt"] == "a barn # note"


def test_the_cli_strips_comments_unless_told_not_to(tmp_path, sd1_file):
    from PIL import Image

    from cli_runner import run_cli

    common = ["txt2img", "-p", "a barn # note", "--steps", "1", "-W", "64", "-H", "64", "--seed", "2",
              "--model", str(sd1_file)]
    assert run_cli(*common, "-o", str(tmp_path / "a.png")).returncode == 0
    assert run_cli(*common, "--no-prompt-comments", "-o", str(tmp_path / "b.png")).returncode == 0
    assert Image.open(tmp_path / "a.png").text["parameters"].startswith("a barn \nSteps: 1")
    assert Image.open(tmp_path / "b.png").text["parameters"].startswith("a barn # note\nSteps: 1")
