"""Infotext in, image out: write → parse → request → write gives the same text, and an image's own
infotext (PNG, JPEG, WebP or a text file) reproduces its pixels through ``--from-infotext``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from underpaint.cli.main import main
from underpaint.errors import ImageError, InvalidParameter
from underpaint.imageio.infotext import format_infotext, parse_infotext
from underpaint.imageio.metadata import read_metadata, save_image
from underpaint.params import GenerationParams, InpaintOptions, SamplerOptions
from underpaint.pipeline.infotext import build_infotext
from underpaint.pipeline.inpaint import inpaint_infotext
from underpaint.pipeline.records import ModelInfo
from underpaint.pipeline.reproduce import checkpoint_from_infotext, params_from_infotext, read_infotext
from underpaint.sampling.names import sampler_labels, schedule_labels

INFO = ModelInfo(name="dreamshaper_8", path="/m/dreamshaper_8.safetensors", family="sd1", prediction="eps",
                 short_hash="879db523c3", vae_name="vae-ft-mse-840000", vae_hash="c6a580b13a")
PICTURE = Image.new("RGB", (64, 64), (120, 90, 60))

OPTION_SETS = [
    {},
    {"init_images": (PICTURE,), "strength": 0.65, "cfg_scale": 7.5, "clip_skip": 2, "seed_resize_from_w": 512,
     "seed_resize_from_h": 768, "subseed": 99, "subseed_strength": 0.3, "rng": "nv", "eta_noise_seed_delta": 31337,
     "sampler_options": SamplerOptions(eta=0.67, s_churn=0.5, s_noise=1.003, sigma_min=0.03, sigma_max=14.6, rho=5.0,
                                       discard_penultimate_sigma=True)},
    {"init_images": (PICTURE,), "strength": 1.0, "rng": "cpu", "eta_noise_seed_delta": 1,
     "sampler_options": SamplerOptions(eta=0.0, sigma_max=80.0)},
    {"prompt": 'a "quoted", (weighted:1.2) [edit:ed:0.5] prompt\nsecond line <lora:film grain:0.8>',
     "negative_prompt": "blurry: lowres, (bad hands)", "cfg_scale": 3.0, "steps": 37},
]


def _write(params: GenerationParams, width=512, height=768) -> str:
    return build_infotext(params, INFO, width=width, height=height, seed=params.seed, subseed=params.subseed)


def _reparse(text: str, base: dict) -> GenerationParams:
    fields = params_from_infotext(parse_infotext(text))
    return GenerationParams(**{**fields, **base})


@pytest.mark.parametrize("sampler", sampler_labels())
def test_write_parse_write_is_identical(sampler):
    for schedule in schedule_labels():
        for options in OPTION_SETS:
            fields = {"prompt": "a castle, golden hour", "steps": 20, "seed": 1234, "subseed": 5, **options}
            params = GenerationParams(sampler=sampler, scheduler=schedule, **fields)
            text = _write(params)
            again = _reparse(text, {"init_images": params.init_images})
            assert _write(again) == text, (sampler, schedule, options)
            assert (again.sampler, again.seed, again.steps, again.cfg_scale) == \
                   (params.sampler, params.seed, params.steps, params.cfg_scale)
            if not options.get("init_images"):
                continue
            assert (again.strength, again.rng, again.clip_skip, again.subseed_strength) == \
                   (params.strength, params.rng, params.clip_skip, params.subseed_strength)


def test_inpaint_entries_round_trip():
    for options in (InpaintOptions(mask_blur_x=8, mask_blur_y=8, masked_content="latent noise", full_res=True,
                                   full_res_padding=48, invert=True, mask_weight=0.5, soft=True),
                    InpaintOptions(masked_content="fill"), InpaintOptions()):
        entries = inpaint_infotext(options, cropped=options.full_res, conditioning=True)
        text = format_infotext("p", "", {"Steps": 20, "Sampler": "Euler", "Seed": 1, **dict(entries)})
        again = params_from_infotext(parse_infotext(text))["inpaint"]
        assert inpaint_infotext(again, cropped=again.full_res, conditioning=True) == entries


def test_a1111_spellings_and_defaults():
    text = ("a cat\nSteps: 30, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 42, Size: 640x448, "
            "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Sigma churn: 0.2, Sigma noise: 1.01, "
            "Eta DDIM: 0.3, Schedule max sigma: 0, Schedule rho: 0, RNG: NV, Version: v1.10.1")
    fields = params_from_infotext(parse_infotext(text))
    params = GenerationParams(**fields)
    assert (params.sampler, params.scheduler) == ("DPM++ 2M", "Automatic")  # Karras is DPM++ 2M's own default
    assert (params.width, params.height, params.steps, params.cfg_scale, params.seed) == (640, 448, 30, 6.5, 42)
    assert params.rng == "nv" and params.clip_skip == 1 and params.negative_prompt == ""
    assert params.sampler_options == SamplerOptions(eta=0.3, s_churn=0.2, s_noise=1.01)
    assert "strength" not in fields and "subseed" not in fields
    assert checkpoint_from_infotext(parse_infotext(text)) == "v1-5-pruned-emaonly [6ce0161689]"
    assert checkpoint_from_infotext(parse_infotext("x\nSteps: 1, Seed: 2, Model: m")) == "m"
    assert checkpoint_from_infotext(parse_infotext("x\nSteps: 1, Seed: 2, Sampler: Euler")) is None


@pytest.mark.parametrize("line, key", [("Steps: many", "Steps"), ("CFG scale: high", "CFG scale"), ("RNG: TPU", "RNG"),
                                       ("Discard penultimate sigma: maybe", "Discard penultimate sigma")])
def test_bad_values_name_their_key(line, key):
    with pytest.raises(InvalidParameter) as err:
        params_from_infotext(parse_infotext(f"p\nSeed: 1, Sampler: Euler, {line}"))
    assert err.value.field == key


def test_read_from_png_jpeg_webp_and_text(tmp_path):
    text = "a barn\nNegative prompt: fog\nSteps: 12, Sampler: Euler a, CFG scale: 5, Seed: 3, Size: 64x64"
    for suffix in ("png", "jpg", "webp"):
        path = save_image(PICTURE, tmp_path / f"p.{suffix}", infotext=text)
        assert read_infotext(path) == parse_infotext(text)
    (tmp_path / "p.txt").write_text(text, encoding="utf-8")
    assert read_infotext(tmp_path / "p.txt") == parse_infotext(text)
    PICTURE.save(tmp_path / "bare.png")
    with pytest.raises(ImageError, match="no A1111 generation parameters"):
        read_infotext(tmp_path / "bare.png")
    with pytest.raises(ImageError, match="not found"):
        read_infotext(tmp_path / "missing.png")
    (tmp_path / "bin.dat").write_bytes(b"\x00\xff\xfe" * 10)
    with pytest.raises(ImageError, match="neither an image nor"):
        read_infotext(tmp_path / "bin.dat")


# --- through the command line -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory, sd1_file):
    """A models folder with the tiny checkpoint, a LoRA and an embedding."""
    from underpaint.models.loader import load_model

    root = tmp_path_factory.mktemp("models")
    (root / "checkpoints").mkdir()
    shutil.copy(sd1_file, root / "checkpoints" / "tiny-sd1.safetensors")
    (root / "loras").mkdir()
    (root / "embeddings").mkdir()
    model = load_model(sd1_file)
    gen = torch.Generator().manual_seed(1)
    sd = {}
    for path, module in model.unet.named_modules():
        if isinstance(module, torch.nn.Linear) and ".attn" in path:
            name = "lora_unet_" + path.replace(".", "_")
            sd[f"{name}.lora_down.weight"] = torch.randn(4, module.weight.shape[1], generator=gen)
            sd[f"{name}.lora_up.weight"] = torch.randn(module.weight.shape[0], 4, generator=gen) * 0.5
            sd[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(sd, str(root / "loras" / "style.safetensors"))
    hidden = model.text_encoders[0].config.hidden_size
    save_file({"emb_params": torch.randn(2, hidden, generator=gen)}, str(root / "embeddings" / "moody.safetensors"))
    return root


def _run(capsys, *args) -> list[str]:
    code = main(list(args))
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out.split()


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_an_image_reproduces_from_its_infotext(tmp_path, models, photo, capsys):
    source = tmp_path / "photo.png"
    photo.save(source)
    first = tmp_path / "first.png"
    _run(capsys, "img2img", str(source), "-p", "a barn, moody <lora:style:0.7>", "-n", "fog", "--steps", "3",
         "--sampler", "Euler a", "--seed", "5", "--cfg", "5", "-s", "0.6", "-W", "64", "-H", "64",
         "--rng", "cpu", "--subseed", "9", "--subseed-strength", "0.3", "--ensd", "3", "--eta", "0.8",
         "--clip-skip", "2", "-o", str(first), "--models-dir", str(models))
    infotext = read_metadata(first).infotext
    assert "Lora hashes" in infotext and "TI hashes" in infotext and "Model: tiny-sd1" in infotext

    again = tmp_path / "again.png"
    _run(capsys, "img2img", str(source), "--from-infotext", str(first), "-o", str(again), "--models-dir", str(models))
    assert np.array_equal(_pixels(again), _pixels(first))
    assert read_metadata(again).infotext == infotext

    # Flags given on the command line win, even when they equal the flag's own default.
    tweaked = tmp_path / "tweaked.png"
    _run(capsys, "img2img", str(source), "--params-from", str(first), "--steps", "2", "--cfg", "7",
         "--rng", "gpu", "-o", str(tweaked), "--models-dir", str(models))
    changed = parse_infotext(read_metadata(tweaked).infotext).params
    original = parse_infotext(infotext).params
    assert (changed["Steps"], changed["CFG scale"]) == ("2", "7") and "RNG" not in changed
    assert {k: changed[k] for k in ("Seed", "Sampler", "Variation seed", "Clip skip", "Eta", "Lora hashes")} == \
           {k: original[k] for k in ("Seed", "Sampler", "Variation seed", "Clip skip", "Eta", "Lora hashes")}


def test_lora_flag_is_the_prompt_tag(tmp_path, models, photo, capsys):
    source = tmp_path / "photo.png"
    photo.save(source)
    common = [str(source), "--steps", "2", "--sampler", "Euler", "--seed", "1", "-W", "64", "-H", "64",
              "--models-dir", str(models)]
    _run(capsys, "img2img", *common, "-p", "a barn <lora:style:0.5:1>", "-o", str(tmp_path / "tag.png"))
    _run(capsys, "img2img", *common, "-p", "a barn ", "--lora", "style:0.5:1", "-o", str(tmp_path / "flag.png"))
    assert np.array_equal(_pixels(tmp_path / "tag.png"), _pixels(tmp_path / "flag.png"))
    assert read_metadata(tmp_path / "flag.png").infotext.startswith("a barn <lora:style:0.5:1>\n")


def test_unknown_checkpoint_in_infotext_says_what_to_do(tmp_path, models, photo, capsys):
    source = tmp_path / "photo.png"
    photo.save(source)
    text = tmp_path / "params.txt"
    text.write_text("a barn\nSteps: 2, Sampler: Euler, Seed: 1, Model: not-here, Model hash: 0123456789")
    code = main(["img2img", str(source), "--from-infotext", str(text), "-o", str(tmp_path / "x.png"),
                 "--models-dir", str(models)])
    err = capsys.readouterr().err
    assert code == 2 and "not-here" in err and "--model" in err


def test_info_shows_comfyui_prompt_and_workflow(tmp_path, capsys):
    prompt = {"3": {"class_type": "KSampler", "inputs": {"seed": 8, "steps": 20}}}
    workflow = {"nodes": [{"id": 3, "type": "KSampler"}], "version": 0.4}
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(prompt))
    info.add_text("workflow", json.dumps(workflow))
    path = tmp_path / "comfy.png"
    PICTURE.save(path, pnginfo=info)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ComfyUI prompt:" in out and "KSampler" in out and "ComfyUI workflow:" in out
    assert main(["info", str(path), "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert parsed == {"comfyui_prompt": prompt, "comfyui_workflow": workflow}


@pytest.mark.parametrize("sampler, options, written", [
    ("DPM++ 2M", SamplerOptions(eta=0.5, s_churn=0.3, s_tmin=0.1, s_noise=1.01), {}),  # takes none of them
    ("Euler a", SamplerOptions(eta=1.0), {}),  # the ancestral default
    ("Euler a", SamplerOptions(eta=0.5, s_churn=0.3), {"Eta": "0.5"}),
    ("DDIM", SamplerOptions(eta=0.0), {}),  # DDIM's default
    ("DDIM", SamplerOptions(eta=0.3), {"Eta DDIM": "0.3"}),
    ("Euler", SamplerOptions(eta=0.5, s_churn=0.3, s_noise=1.01), {"Sigma churn": "0.3", "Sigma noise": "1.01"}),
    ("DPM++ 2M SDE", SamplerOptions(eta=0.7, s_churn=0.3, s_noise=1.01), {"Eta": "0.7", "Sigma noise": "1.01"}),
])
def test_sampler_settings_are_written_only_where_a1111_writes_them(sampler, options, written):
    """A1111 records eta and the churn settings only for a sampler that takes them, eta only away
    from its default, and DDIM's eta as "Eta DDIM"."""
    text = _write(GenerationParams(prompt="a castle", sampler=sampler, sampler_options=options))
    keys = ("Eta", "Eta DDIM", "Sigma churn", "Sigma tmin", "Sigma tmax", "Sigma noise")
    found = {k: v for k, v in parse_infotext(text).params.items() if k in keys}
    assert found == written
