"""A1111's "Interrogate CLIP": BLIP's caption, then CLIP's best matches from word lists.

The captioner is written in the original BLIP repository's layout (the names of its ViT and of its
BERT decoder, the state under "model", as A1111's model_base_caption_capfilt_large.pth holds it)
from a tiny transformers BLIP with random weights; the references are that transformers model and
transformers' own CLIP with its image processor, run as BLIP and A1111 describe the procedure."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from underpaint.errors import ModelError, ModelNotFound
from underpaint.models import interrogate as it
from underpaint.models.registry import ModelsDir

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "picture", "of", "cat", "dog", "red", "blue", "on", "the",
         "mat", "sky", "tree", "house", "##s", "with", "and"]


def _original_name(name: str) -> str | None:
    """transformers BLIP name → the BLIP repository's (written out here, apart from the loader's table)."""
    vision = {"vision_model.embeddings.class_embedding": "visual_encoder.cls_token",
              "vision_model.embeddings.position_embedding": "visual_encoder.pos_embed",
              "vision_model.embeddings.patch_embedding.weight": "visual_encoder.patch_embed.proj.weight",
              "vision_model.embeddings.patch_embedding.bias": "visual_encoder.patch_embed.proj.bias",
              "vision_model.post_layernorm.weight": "visual_encoder.norm.weight",
              "vision_model.post_layernorm.bias": "visual_encoder.norm.bias"}
    if name in vision:
        return vision[name]
    m = re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.(\w+)\.?(\w*)\.(weight|bias)", name)
    if m:
        block, a, b, kind = m.groups()
        part = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.qkv": "attn.qkv",
                "self_attn.projection": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}[f"{a}.{b}".strip(".")]
        return f"visual_encoder.blocks.{block}.{part}.{kind}"
    return name if name.startswith("text_decoder.") else None


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    """(HF model, tokenizer, path of the original-layout file)."""
    return write_blip(tmp_path_factory.mktemp("interrogate") / "models" / "BLIP")


def write_blip(folder):
    """A tiny BLIP captioner in the original layout (with BERT's vocab.txt) in ``folder``: (HF model, tokenizer, path)."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration

    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    config = BlipConfig(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                           image_size=48, patch_size=16, layer_norm_eps=1e-6),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=1, encoder_hidden_size=64, max_position_embeddings=64,
                         bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id))
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 1.0)
    state = {_original_name(k): v.clone() for k, v in model.state_dict().items() if _original_name(k)}
    state["text_decoder.bert.embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    path = folder / "model_base_caption_capfilt_large.pth"
    torch.save({"model": state, "epoch": 3}, path)
    return model, tokenizer, path


def _reference_caption(model, tokenizer, image: Image.Image) -> str:
    """BLIP's procedure on transformers' model: bicubic resize, CLIP normalisation, "a picture of " with [DEC]
    first, greedy search of 24 to 48 tokens ending at [SEP], the prompt's characters cut."""
    from transformers import BlipImageProcessor

    size = model.config.vision_config.image_size
    pixels = BlipImageProcessor(size={"height": size, "width": size}, resample=Image.Resampling.BICUBIC,
                                image_mean=list(it.MEAN), image_std=list(it.STD))(image, return_tensors="pt").pixel_values
    ids = tokenizer(["a picture of "], return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(pixel_values=pixels, input_ids=ids, num_beams=1, min_length=24, max_length=48)
    return tokenizer.decode(out[0], skip_special_tokens=True)[len("a picture of "):]


def _photo() -> Image.Image:
    y, x = np.mgrid[0:40, 0:60]
    return Image.fromarray(np.stack([x * 4, y * 6, (x + y) * 2], -1).astype(np.uint8))


def test_original_blip_file_loads_every_tensor_in_place(blip):
    model, _, path = blip
    captioner = it.load_captioner(path)
    ours = captioner.model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(ours[name], tensor), name
    assert captioner.image_size == 48 and captioner.model.config.vision_config.layer_norm_eps == 1e-6


def test_caption_is_blips(blip):
    model, tokenizer, path = blip
    captioner = it.load_captioner(path)
    for picture in (_photo(), Image.new("RGB", (30, 90), (200, 30, 30))):
        got = captioner.caption(picture)
        assert got == _reference_caption(model, tokenizer, picture)
        assert len(tokenizer(got).input_ids) >= 24 - 4 and not got.startswith("a picture of")


def test_bad_blip_files_are_refused(blip, tmp_path):
    _, _, path = blip
    state = torch.load(path, weights_only=True)["model"]
    state["visual_encoder.blocks.0.mlp.fc1.weight"] = torch.zeros(3, 3)
    bad = tmp_path / "bad.pth"
    (tmp_path / "vocab.txt").write_text("\n".join(WORDS))
    torch.save({"model": state}, bad)
    with pytest.raises(ModelError, match="fc1.weight has shape"):
        it.load_captioner(bad)
    del state["visual_encoder.blocks.0.mlp.fc1.weight"]
    torch.save({"model": {"visual_encoder.pos_embed": state["visual_encoder.pos_embed"]}}, bad)
    with pytest.raises(ModelError, match="not a BLIP captioner"):
        it.load_captioner(bad)
    lone = tmp_path / "lone" / "blip.pth"
    lone.parent.mkdir()
    torch.save({"model": torch.load(path, weights_only=True)["model"]}, lone)
    with pytest.raises(ModelNotFound, match="vocab.txt"):
        it.load_captioner(lone)


# --------------------------------------------------------------------------- CLIP's matches


@pytest.fixture(scope="module")
def clip(blip):
    """A tiny transformers CLIP saved as one safetensors file in models/CLIP, and word lists in models/interrogate."""
    from tiny_models import write_clip

    root = blip[2].parent.parent
    model = write_clip(root / "CLIP" / "clip-vit-tiny.safetensors", projection_dim=32, patch_size=16,
                       vision_layers=2, seed=1)
    lists = root / "interrogate"
    lists.mkdir()
    (lists / "artists.txt").write_text("by Alice Example\nby Bob Sample\n\nby Carol Test\n")
    (lists / "flavors.top3.txt").write_text("\n".join(["oil painting", "watercolor", "sketch", "photo", "render"]))
    (lists / "mediums.txt").write_text("canvas\npaper\n")
    return model, root


def test_word_lists_are_read_as_a1111_reads_them(clip):
    _, root = clip
    found = it.categories(root / "interrogate")
    assert [(c.name, c.top, len(c.items)) for c in found] == [("artists", 1, 3), ("flavors", 3, 5), ("mediums", 1, 2)]
    assert it.categories(root / "interrogate", limit=2)[1].items == ("oil painting", "watercolor")
    assert [c.name for c in it.categories(root / "interrogate", skip=("artists",))] == ["flavors", "mediums"]


def test_ranking_is_clips_softmax(clip):
    from transformers import CLIPImageProcessor, CLIPTokenizer

    model, root = clip
    ranker = it.load_ranker(root / "CLIP" / "clip-vit-tiny.safetensors")
    picture = _photo()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                   resample=Image.Resampling.BICUBIC, image_mean=list(it.MEAN), image_std=list(it.STD))
    texts = ("oil painting", "watercolor", "sketch", "photo", "render")
    from underpaint.models.tokenizer import tokenizer_files

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_files())
    with torch.no_grad():
        image = model.get_image_features(pixel_values=processor(picture, return_tensors="pt").pixel_values)
        image = getattr(image, "pooler_output", image)
        text = model.get_text_features(**tokenizer(list(texts), padding="max_length", max_length=77,
                                                   return_tensors="pt"))
        text = getattr(text, "pooler_output", text)
    image, text = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
    want = (100 * image @ text.T).softmax(-1)[0]
    features = ranker.image_features(picture)
    assert torch.allclose(features, image, atol=2e-3)
    got = ranker.rank(features, texts, 3)
    order = want.argsort(descending=True)[:3]
    assert [t for t, _ in got] == [texts[i] for i in order]
    assert np.allclose([s for _, s in got], (want[order] * 100).numpy(), atol=0.2)


def test_interrogate_joins_the_caption_and_the_matches(blip, clip):
    model, tokenizer, _ = blip
    _, root = clip
    files = it.interrogate_files(ModelsDir(root))
    assert files.blip.name == "model_base_caption_capfilt_large.pth" and files.clip.name == "clip-vit-tiny.safetensors"
    picture = _photo()
    text = it.interrogate(picture, files)
    caption = _reference_caption(model, tokenizer, picture)
    assert text.startswith(caption + ", by ")
    parts = text[len(caption) + 2:].split(", ")
    assert len(parts) == 1 + 3 + 1 and parts[-1] in ("canvas", "paper")
    ranked = it.interrogate(picture, files, ranks=True)
    assert re.fullmatch(re.escape(caption) + r"(, \([a-zA-Z ]+:[01]\.\d{3}\)){5}", ranked), ranked
    alone = it.interrogate(picture, it.InterrogateFiles(files.blip, None, files.lists))
    assert alone == caption
    with pytest.raises(ModelNotFound) as err:
        it.interrogate_files(ModelsDir(root / "nowhere"))
    assert err.value.field == "model" and "BLIP" in err.value.message


# --------------------------------------------------------------------------- the A1111 API and the CLI


@pytest.fixture(scope="module")
def api(blip, clip, sd1_file):
    from test_server_support import real_api, tiny_models_dir

    root = clip[1]
    with real_api(tiny_models_dir(root, sd1_file)) as client:
        yield client


def test_api_interrogate_clip(api, blip):
    from test_server_support import png_b64

    model, tokenizer, _ = blip
    picture = _photo()
    r = api.post("/sdapi/v1/interrogate", json={"image": png_b64(picture), "model": "clip"})
    assert r.status_code == 200, r.text
    caption = r.json()["caption"]
    assert caption.startswith(_reference_caption(model, tokenizer, picture) + ", by ") and caption.count(", ") == 5
    # A1111's settings: the ranks, and a shorter caption
    assert api.post("/sdapi/v1/options", json={"interrogate_return_ranks": True, "interrogate_clip_max_length": 30,
                                               "interrogate_clip_min_length": 5}).status_code == 200
    ranked = api.post("/sdapi/v1/interrogate", json={"image": png_b64(picture)}).json()["caption"]
    assert ranked.count(":") == 5 and len(ranked) < len(caption) + 60
    assert api.get("/sdapi/v1/options").json()["interrogate_clip_max_length"] == 30
    api.post("/sdapi/v1/options", json={"interrogate_return_ranks": False, "interrogate_clip_max_length": 48,
                                        "interrogate_clip_min_length": 24})


@pytest.mark.parametrize("body, status, field", [
    ({"model": "deepdanbooru"}, 404, "model"),  # no tagger in this server's models folder
    ({"model": "blip2"}, 422, "model"),
    ({"image": ""}, 422, "image"),
    ({"image": "not base64!"}, 422, "image"),
])
def test_api_interrogate_refusals(api, body, status, field):
    from test_server_support import png_b64

    r = api.post("/sdapi/v1/interrogate", json={"image": png_b64(_photo()), **body})
    assert r.status_code == status and r.json()["field"] == field, r.text


def test_cli_interrogate_prints_the_caption(blip, clip, tmp_path):
    from cli_runner import run_cli

    from test_cli import assert_clean_error

    model, tokenizer, _ = blip
    picture = _photo()
    picture.save(tmp_path / "in.png")
    proc = run_cli("interrogate", str(tmp_path / "in.png"), "--models-dir", str(clip[1]), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(_reference_caption(model, tokenizer, picture) + ", by ")
    proc = run_cli("interrogate", str(tmp_path / "in.png"), "--models-dir", str(clip[1]), "--device", "cpu", "--ranks")
    assert proc.returncode == 0 and proc.stdout.count(":") == 5, proc.stderr
    assert_clean_error(run_cli("interrogate", str(tmp_path / "in.png"), "--models-dir", str(tmp_path / "none")),
                       "BLIP")
    assert_clean_error(run_cli("interrogate", str(tmp_path / "missing.png"), "--models-dir", str(clip[1])),
                       "missing.png")


# --------------------------------------------------------------------------- Loopback's appended reading


def assert_loopback_appends(engine, kind: str, read, photo) -> None:
    """Loopback with ``interrogate=kind`` (2 loops) makes the pictures and prompts of running each pass by
    hand with the request's prompt, ", " and ``read(picture)`` of the picture the pass starts from."""
    from underpaint.params import GenerationParams, LoopbackOptions

    base = dict(prompt="a lighthouse", seed=4, rng="cpu", steps=2, sampler="Euler", strength=0.6)
    picture = photo.resize((64, 64))
    result = engine.generate(GenerationParams(**base, init_images=(picture,), loopback=LoopbackOptions(
        loops=2, final_strength=0.6, interrogate=kind)))
    prompts = []
    for seed in (4, 5):
        prompt = "a lighthouse, " + read(picture)
        made = engine.generate(GenerationParams(**{**base, "seed": seed, "prompt": prompt}, init_images=(picture,)))
        picture = made.images[0]
        prompts.append(prompt)
        assert np.array_equal(np.asarray(result.images[len(prompts)]), np.asarray(made.images[0]))
    assert result.prompts[1:] == tuple(prompts)


def test_loopback_appends_each_pass_reading(blip, clip, sd1_file):
    from underpaint.params import LoopbackOptions
    from underpaint.pipeline.engine import Engine

    root = clip[1]
    engine = Engine.load(sd1_file, device="cpu", dtype="fp32", models_dir=root)
    files = it.interrogate_files(ModelsDir(root))
    assert_loopback_appends(engine, "clip", lambda picture: it.interrogate(picture, files), _photo())
    with pytest.raises(Exception) as err:
        LoopbackOptions(interrogate="BLIP2")
    assert err.value.field == "loopback_interrogate" and err.value.expected == "None, CLIP or DeepBooru"


def test_api_loopback_interrogates_with_the_servers_settings(api):
    from test_server_support import png_b64

    r = api.post("/sdapi/v1/img2img", json={"init_images": [png_b64(_photo().resize((64, 64)))], "steps": 1,
                                            "prompt": "", "script_name": "loopback",
                                            "script_args": [2, 0.5, "Linear", "CLIP"]})
    assert r.status_code == 200, r.text
    import json

    prompts = json.loads(r.json()["info"])["all_prompts"]
    assert len(prompts) == 3 and all(p.count(", ") == 5 for p in prompts[1:])  # caption + 5 matches, no prompt


def test_transformers_blip_folder_captions_alike(blip, tmp_path):
    """A transformers BLIP captioning folder (what `underpaint download blip` fetches) gives the same caption."""
    model, tokenizer, path = blip
    folder = tmp_path / "blip-image-captioning-base"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    picture = _photo()
    assert it.load_captioner(folder).caption(picture) == it.load_captioner(path).caption(picture)
    assert it._candidates([tmp_path]) == [folder]
    with pytest.raises(ModelError, match="not a BLIP captioning folder"):
        it.load_captioner(tmp_path)
