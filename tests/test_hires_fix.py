"""Hires. fix (txt2img's second pass at a larger size), against independent witnesses.

- the first pass is a plain txt2img (same seed, same size);
- with a picture upscaler the second pass is this engine's own img2img of the upscaled first
  picture, run for exactly the hires steps (A1111 hands ``steps`` to its img2img sampler);
- with the "Latent" upscaler the whole request equals diffusers' txt2img pipeline, the latent
  interpolated with torch, then diffusers' img2img pipeline on it (Euler, linspace timesteps);
- the latent modes are ``torch.nn.functional.interpolate`` with A1111's modes;
- sizes, infotext, the A1111 API, the CLI and FLUX.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from underpaint.errors import InvalidParameter
from underpaint.imageio.infotext import parse_infotext
from underpaint.params import GenerationParams, HiresOptions
from underpaint.pipeline.records import Cancellation

BASE = dict(prompt="a lighthouse on a cliff", negative_prompt="blurry", seed=1234, width=64, height=64, rng="cpu")


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _first_pass_only(engine, params: GenerationParams, stop=Cancellation.interrupt) -> Image.Image:
    """The first pass of a hires request: interrupted (or skipped) after its last step, the request
    returns it, marked unfinished (it lacks the second pass)."""
    cancel = Cancellation()

    def on_progress(p):
        if p.step == params.steps:
            stop(cancel)

    result = engine.generate(params, progress=on_progress, cancel=cancel)
    assert result.unfinished == (0,)
    return result.images[0]


# --------------------------------------------------------------------------- engine


def test_first_pass_is_plain_txt2img_and_progress_counts_both_passes(sd1_engine):
    hires = GenerationParams(**BASE, steps=3, sampler="Euler a", hires=HiresOptions(scale=1.5, steps=2))
    plain = sd1_engine.generate(hires.replace(hires=None)).images[0]
    first = _first_pass_only(sd1_engine, hires)
    assert first.size == (64, 64)
    assert np.array_equal(_pixels(first), _pixels(plain))
    assert np.array_equal(_pixels(_first_pass_only(sd1_engine, hires, Cancellation.skip)), _pixels(plain))

    seen = []
    result = sd1_engine.generate(hires, progress=lambda p: seen.append((p.job, p.step, p.steps)))
    assert result.images[0].size == (96, 96) and len(result.images) == 1
    assert seen == [(0, s, 5) for s in range(1, 6)]  # 3 first-pass steps, then the 2 hires steps


@pytest.mark.parametrize(("upscaler", "resample"), [("Lanczos", Image.Resampling.LANCZOS),
                                                    ("Nearest", Image.Resampling.NEAREST),
                                                    ("None", Image.Resampling.LANCZOS)])
def test_second_pass_is_img2img_of_the_upscaled_first_picture(sd1_engine, upscaler, resample):
    """Doubling 64 → 128 is one Pillow resize with the upscaler's filter (A1111's built-in upscalers);
    the second pass is img2img of that picture running exactly the hires steps (fix_steps)."""
    hires = HiresOptions(scale=2, upscaler=upscaler, steps=3, strength=0.45, prompt="a lighthouse at night")
    params = GenerationParams(**BASE, steps=3, sampler="Euler a", hires=hires)
    first = sd1_engine.generate(params.replace(hires=None)).images[0]
    upscaled = first.resize((128, 128), resample=resample)
    witness = sd1_engine.generate(GenerationParams(
        **{**BASE, "prompt": "a lighthouse at night", "width": 128, "height": 128}, init_images=(upscaled,),
        strength=0.45, steps=3, fix_steps=True, sampler="Euler a")).images[0]
    result = sd1_engine.generate(params)
    assert result.images[0].size == (128, 128)
    assert np.array_equal(_pixels(result.images[0]), _pixels(witness))


def test_latent_hires_matches_diffusers_txt2img_then_img2img(sd1_engine):
    """The "Latent" upscaler against diffusers: StableDiffusionPipeline's latents (Euler, 4 steps),
    interpolated bilinearly (no antialias) to twice the size, then StableDiffusionImg2ImgPipeline at
    strength 2/4 (hires steps 2 at strength 0.5: a 4-step schedule of which the last 2 run), with
    the same seed drawn again at the new size. linspace timesteps are A1111's Automatic for Euler
    where N-1 divides 999 (diffusers_latent_hires)."""
    m = sd1_engine.model
    cfg = 6.0
    ours = sd1_engine.generate(GenerationParams(
        **BASE, steps=4, cfg_scale=cfg, sampler="Euler", scheduler="Automatic",
        hires=HiresOptions(scale=2, upscaler="Latent", steps=2, strength=0.5))).images[0]
    ref_u8 = diffusers_latent_hires(m, m, cfg)
    diff = np.abs(_pixels(ours) - ref_u8)
    assert ours.size == (128, 128)
    assert diff.max() <= 1, diff.max()
    assert (diff > 0).mean() < 0.01


def diffusers_latent_hires(first, second, cfg: float, *, on_second_pass_step=None, on_first_pass_step=None) -> np.ndarray:
    """The "Latent" hires. fix written with diffusers: StableDiffusionPipeline's latents from ``first``'s
    parts (Euler, 4 steps), interpolated bilinearly (no antialias) to twice the size, then
    StableDiffusionImg2ImgPipeline from ``second``'s parts at strength 2/4 (hires steps 2 at strength 0.5:
    a 4-step schedule of which the last 2 run), with the same seed drawn again at the new size; as uint8,
    truncated as A1111 (and the engine) make them. linspace timesteps are A1111's Automatic for Euler
    where N-1 divides 999. ``on_second_pass_step``/``on_first_pass_step``: the img2img/txt2img pipeline's
    ``callback_on_step_end`` (with ``prompt_embeds`` among its tensors)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    def scheduler():
        return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      num_train_timesteps=1000, timestep_spacing="linspace")

    def parts(model):
        return dict(vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0],
                    unet=model.unet, safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    txt = StableDiffusionPipeline(scheduler=scheduler(), **parts(first))
    img = StableDiffusionImg2ImgPipeline(scheduler=scheduler(), **parts(second))
    for pipe in (txt, img):
        pipe.set_progress_bar_config(disable=True)
    common = dict(prompt=BASE["prompt"], negative_prompt=BASE["negative_prompt"], guidance_scale=cfg)
    first_callback = {} if on_first_pass_step is None else dict(
        callback_on_step_end=on_first_pass_step, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    latents = txt(**common, height=64, width=64, num_inference_steps=4, output_type="latent",
                  generator=torch.Generator().manual_seed(BASE["seed"]), **first_callback).images
    upscaled = F.interpolate(latents, size=(16, 16), mode="bilinear", antialias=False)
    callback = {} if on_second_pass_step is None else dict(
        callback_on_step_end=on_second_pass_step, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    ref = img(**common, image=upscaled, strength=0.5, num_inference_steps=4, output_type="np",
              generator=torch.Generator().manual_seed(BASE["seed"]), **callback).images[0]
    return (np.clip(ref, 0, 1) * 255).astype(np.uint8).astype(np.int16)


# A1111's shared.latent_upscale_modes: name → (interpolate mode, antialias).
A1111_LATENT_MODES = [("Latent", "bilinear", False), ("Latent (antialiased)", "bilinear", True),
                      ("Latent (bicubic)", "bicubic", False), ("Latent (bicubic antialiased)", "bicubic", True),
                      ("Latent (nearest)", "nearest", False), ("Latent (nearest-exact)", "nearest-exact", False)]


@pytest.mark.parametrize(("name", "mode", "antialias"), A1111_LATENT_MODES)
def test_latent_modes_are_torch_interpolate(name, mode, antialias):
    from underpaint.pipeline.hires import upscale_latents

    x = torch.randn(2, 4, 7, 9, generator=torch.Generator().manual_seed(0))
    out = upscale_latents(x, name, 100, 60)  # to (60 // 8, 100 // 8) latent cells
    assert torch.equal(out, F.interpolate(x, size=(7, 12), mode=mode, antialias=antialias))


def test_latent_modes_change_the_picture(sd1_engine):
    runs = {name: sd1_engine.generate(GenerationParams(**BASE, steps=2, sampler="Euler", hires=HiresOptions(
        scale=1.5, upscaler=name, steps=2))).images[0].tobytes() for name, _, _ in A1111_LATENT_MODES[::2]}
    assert len(set(runs.values())) == len(runs)


@pytest.mark.parametrize(("size", "hires", "upscale", "final"), [
    # hr_scale: int(size * scale); the latent is size // 8, the picture whole latent cells.
    ((64, 64), dict(scale=1.5), (96, 96, 0, 0), (96, 96)),
    ((520, 512), dict(scale=1.5), (780, 768, 0, 0), (776, 768)),
    ((512, 768), dict(scale=1.25), (640, 960, 0, 0), (640, 960)),
    # one side 0: the other keeps the aspect ratio, with floor division
    ((512, 768), dict(resize_x=1000), (1000, 1500, 0, 0), (1000, 1496)),
    ((512, 768), dict(resize_y=1000), (666, 1000, 0, 0), (664, 1000)),
    # both: cover the box, then cut (excess // 8) latent cells, the smaller half first
    ((512, 512), dict(resize_x=1000, resize_y=600), (1000, 1000, 0, 50), (1000, 600)),
    ((512, 768), dict(resize_x=1024, resize_y=1024), (1024, 1536, 0, 64), (1024, 1024)),
    ((640, 448), dict(resize_x=700, resize_y=700), (1000, 700, 37, 0), (704, 696)),
])
def test_hires_geometry_follows_a1111(size, hires, upscale, final):
    from underpaint.pipeline.hires import hires_size

    options = HiresOptions(**hires)
    got = hires_size(options, *size)
    assert (got.upscale_width, got.upscale_height, got.crop_x, got.crop_y) == upscale
    assert (got.width, got.height) == final


def test_cover_crop_takes_the_middle_of_the_upscaled_latent():
    from underpaint.pipeline.hires import crop_latents, hires_size

    size = hires_size(HiresOptions(resize_x=100, resize_y=64), 64, 64)  # covers at 100x100, 4 rows to cut
    latents = torch.arange(12 * 12, dtype=torch.float32).reshape(1, 1, 12, 12)
    cropped = crop_latents(latents, size)
    assert (size.crop_x, size.crop_y, size.width, size.height) == (0, 4, 96, 64)
    assert torch.equal(cropped, latents[..., 2:10, :])


def test_cropped_resize_runs_end_to_end(sd1_engine):
    result = sd1_engine.generate(GenerationParams(**{**BASE, "width": 96}, steps=2, sampler="Euler",
                                                  hires=HiresOptions(resize_x=150, resize_y=108, steps=1,
                                                                     upscaler="Lanczos")))
    # 96x64 covers 150x108 at 162x108; (162 - 150) // 8 = 1 latent column is cut: 19x13 cells
    assert result.images[0].size == (152, 104)
    assert "Hires resize: 150x108" in result.infotexts[0] and "Size: 96x64" in result.infotexts[0]


def test_what_hires_cannot_do_is_refused_by_field(photo):
    cases = [
        (dict(hires=HiresOptions(), init_images=(photo,)), "hires"),
        (dict(hires=HiresOptions(prompt="x <lora:other:1>"), prompt="x"), "hires_prompt"),
        (dict(hires=HiresOptions(sampler="Euler z")), "hires_sampler"),
        (dict(hires=HiresOptions(scale=8), width=2048, height=512), "hires_scale"),
        (dict(hires=HiresOptions(resize_x=32), width=512, height=512), "hires_resize_x"),
    ]
    for fields, field in cases:
        with pytest.raises(InvalidParameter) as err:
            GenerationParams(**fields)
        assert err.value.field == field
    for options, field in ((dict(upscaler=4), "hires_upscaler"), (dict(upscaler="  "), "hires_upscaler"),
                           (dict(strength=0), "hires_strength"), (dict(steps=-1), "hires_steps"),
                           (dict(scale=0), "hires_scale")):
        with pytest.raises(InvalidParameter) as err:
            HiresOptions(**options)
        assert err.value.field == field
    with pytest.raises(InvalidParameter, match="Latent .*Lanczos, Nearest.*upscaling model"):
        HiresOptions(upscaler=None or 3.5)
    # Any other name is an upscaling model's, looked up when the request runs (test_upscalers.py).
    assert HiresOptions(upscaler=" 4x-UltraSharp ").upscaler == "4x-UltraSharp"


# --------------------------------------------------------------------------- infotext


def _infotext(params: GenerationParams) -> str:
    from underpaint.pipeline.infotext import build_infotext
    from underpaint.pipeline.records import ModelInfo

    info = ModelInfo(name="m", path="/m.safetensors", family="sd1", prediction="eps", short_hash="0123456789")
    return build_infotext(params, info, width=params.width, height=params.height, seed=params.seed,
                          subseed=params.subseed)


@pytest.mark.parametrize("hires", [
    HiresOptions(),
    HiresOptions(scale=1.75, upscaler="Latent (bicubic antialiased)", steps=12, strength=0.45),
    HiresOptions(resize_x=1024, resize_y=0, upscaler="None", sampler="Euler a", prompt="sharp, detailed: 8k",
                 negative_prompt="soft"),
    HiresOptions(resize_x=900, resize_y=700, upscaler="Nearest", sampler="DPM++ 2M", scheduler="Exponential"),
    HiresOptions(sampler="Euler"),  # inherits the Karras the first pass was asked for, as A1111
    HiresOptions(sampler="Euler", scheduler="Automatic"),  # the model's own: written as Automatic
])
def test_infotext_round_trip(hires):
    from underpaint.pipeline.reproduce import params_from_infotext

    params = GenerationParams(prompt="a castle", negative_prompt="fog", steps=20, seed=7, subseed=1, width=512,
                              height=512, sampler="DPM++ 2M", scheduler="Karras", hires=hires)
    text = _infotext(params)
    fields = params_from_infotext(parse_infotext(text))
    again = GenerationParams(**fields)
    assert _infotext(again) == text
    assert (again.hires_sampler, again.hires_scheduler) == (params.hires_sampler, params.hires_scheduler)
    assert again.hires.output_size(512, 512) == params.hires.output_size(512, 512)
    assert (again.hires.steps, again.hires.strength, again.hires.upscaler_name) == \
           (hires.steps, hires.strength, hires.upscaler_name)


def test_infotext_keys_as_a1111_writes_them():
    text = _infotext(GenerationParams(prompt="p", steps=20, seed=1, width=512, height=512, sampler="DPM++ 2M",
                                      hires=HiresOptions(upscaler="Latent", strength=0.7)))
    assert text.endswith("Size: 512x512, Model hash: 0123456789, Model: m, Denoising strength: 0.7, Hires upscale: 2, "
                         "Hires upscaler: Latent, Version: underpaint " + __import__("underpaint").__version__)
    plain = _infotext(GenerationParams(prompt="p", steps=20, seed=1, width=512, height=512))
    assert "Denoising strength" not in plain and "Hires" not in plain


def test_a1111_infotexts_turn_hires_on_only_with_its_keys():
    from underpaint.pipeline.reproduce import params_from_infotext

    a1111 = ("a cat\nSteps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x768, "
             "Model hash: 6ce0161689, Model: v1-5, Denoising strength: 0.55, Hires upscale: 1.5, Hires steps: 10, "
             "Hires upscaler: Latent (nearest-exact), Version: v1.10.1")
    hires = params_from_infotext(parse_infotext(a1111))["hires"]
    assert hires == HiresOptions(scale=1.5, steps=10, upscaler="Latent (nearest-exact)", strength=0.55)
    img2img = "a cat\nSteps: 25, Sampler: Euler, Seed: 1, Size: 512x512, Denoising strength: 0.55"
    assert "hires" not in params_from_infotext(parse_infotext(img2img))
    other = a1111.replace("Version", "Hires checkpoint: anime [0123456789], Version")
    assert params_from_infotext(parse_infotext(other))["hires"].checkpoint == "anime [0123456789]"


def test_a_hires_checkpoint_runs_the_second_pass_as_diffusers_img2img_with_it(tmp_path):
    """A1111's Hires checkpoint, with the "Latent" upscaler: diffusers' txt2img on the base model (Euler, 4
    steps), its latents interpolated to twice the size, then StableDiffusionImg2ImgPipeline built from the
    other checkpoint's UNet, text encoder and VAE at strength 2/4: the same picture within one level. The
    infotext names the checkpoint as A1111 does, before the other hires keys."""
    from tiny_models import write_sd1
    from underpaint.pipeline.engine import Engine

    base_file, other_file = write_sd1(tmp_path / "base.safetensors", seed=1), write_sd1(tmp_path / "anime.safetensors",
                                                                                      seed=5)
    engine = Engine.load(base_file, device="cpu", dtype="fp32")
    cfg = 6.0
    result = engine.generate(GenerationParams(
        **BASE, steps=4, cfg_scale=cfg, sampler="Euler", scheduler="Automatic",
        hires=HiresOptions(scale=2, upscaler="Latent", steps=2, strength=0.5, checkpoint=str(other_file))))
    ours = result.images[0]
    m, o = engine.model, engine.refiner_model(str(other_file))
    ref_u8 = diffusers_latent_hires(m, o, cfg)
    diff = np.abs(_pixels(ours) - ref_u8)
    assert diff.max() <= 1, diff.max()
    assert f"Hires checkpoint: anime [{o.short_hash}], Hires upscale: 2" in result.infotexts[0]
    same = engine.generate(GenerationParams(**BASE, steps=4, cfg_scale=cfg, sampler="Euler", scheduler="Automatic",
                                            hires=HiresOptions(scale=2, upscaler="Latent", steps=2, strength=0.5)))
    assert np.abs(_pixels(same.images[0]) - _pixels(ours)).max() > 5


# --------------------------------------------------------------------------- A1111 API


@pytest.fixture(scope="module")
def api(sd1_file, tmp_path_factory):
    from test_server_support import real_api, tiny_models_dir

    with real_api(tiny_models_dir(tmp_path_factory.mktemp("hires-models"), sd1_file)) as client:
        yield client


def test_api_enable_hr_returns_hires_pictures_and_a1111_info(api):
    from test_server_support import decode_b64

    r = api.post("/sdapi/v1/txt2img", json={
        "prompt": "a red barn", "steps": 2, "width": 64, "height": 64, "seed": 11, "sampler_name": "Euler a",
        "batch_size": 2, "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent (antialiased)",
        "hr_second_pass_steps": 2, "denoising_strength": 0.6, "hr_prompt": "a red barn, sunset"})
    assert r.status_code == 200, r.text
    body = r.json()
    images = [decode_b64(b) for b in body["images"]]
    assert [im.size for im in images] == [(96, 96), (96, 96)]
    info = json.loads(body["info"])
    assert (info["width"], info["height"], info["denoising_strength"]) == (64, 64, 0.6)  # A1111: the first size
    assert info["all_seeds"] == [11, 12]
    extra = info["extra_generation_params"]
    assert extra["Hires upscale"] == "1.5" and extra["Hires upscaler"] == "Latent (antialiased)"
    assert extra["Hires steps"] == "2" and extra["Denoising strength"] == "0.6"
    assert extra["Hires prompt"] == "a red barn, sunset"
    assert images[0].info["parameters"] == info["infotexts"][0]
    assert "Size: 64x64" in info["infotexts"][0] and "Hires upscale: 1.5" in info["infotexts"][0]

    # The same request again through its own infotext: enable_hr and the hr_* fields come back.
    again = api.post("/sdapi/v1/txt2img", json={"infotext": info["infotexts"][0], "batch_size": 2})
    assert again.status_code == 200, again.text
    repeat = decode_b64(again.json()["images"][0])
    assert repeat.size == (96, 96) and np.array_equal(_pixels(repeat), _pixels(images[0]))


def test_api_lists_the_upscalers_it_has(api):
    assert [u["name"] for u in api.get("/sdapi/v1/upscalers").json()] == ["None", "Lanczos", "Nearest"]
    assert [m["name"] for m in api.get("/sdapi/v1/latent-upscale-modes").json()] == \
           [name for name, _, _ in A1111_LATENT_MODES]


def test_api_bad_upscaler_is_422_listing_what_there_is(api):
    r = api.post("/sdapi/v1/txt2img", json={"steps": 2, "width": 64, "height": 64, "enable_hr": True,
                                            "hr_upscaler": "R-ESRGAN 4x+"})
    assert r.status_code == 422 and r.json()["field"] == "hr_upscaler"
    assert "Latent (nearest-exact)" in r.json()["detail"] and "Lanczos" in r.json()["detail"]


# --------------------------------------------------------------------------- CLI


def test_cli_hires_writes_the_hires_picture_and_reproduces_it(tmp_path, sd1_file, capsys):
    from underpaint.cli.main import main

    from test_server_support import tiny_models_dir

    models = tiny_models_dir(tmp_path / "models", sd1_file)
    out = tmp_path / "hires.png"
    common = ["--models-dir", str(models), "--device", "cpu", "--dtype", "fp32"]
    assert main(["txt2img", "-p", "a windmill", "-W", "64", "-H", "64", "--steps", "2", "--seed", "3",
                 "--sampler", "Euler a", "--hires-scale", "1.5", "--hires-upscaler", "Lanczos", "--hires-steps", "2",
                 "--hires-strength", "0.6", "-o", str(out), *common]) == 0
    picture = Image.open(out)
    assert picture.size == (96, 96)
    text = picture.text["parameters"]
    assert "Denoising strength: 0.6, Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Lanczos" in text

    again = tmp_path / "again.png"
    assert main(["txt2img", "--from-infotext", str(out), "-o", str(again), *common]) == 0
    assert np.array_equal(_pixels(Image.open(again)), _pixels(picture))
    assert Image.open(again).text["parameters"] == text

    base = tmp_path / "base.png"
    assert main(["txt2img", "--from-infotext", str(out), "--no-hires", "-o", str(base), *common]) == 0
    assert Image.open(base).size == (64, 64)
    capsys.readouterr()


@pytest.mark.parametrize(("flags", "needle"), [(["--hires-upscaler", "ESRGAN_4x"], "--hires-upscaler"),
                                               (["--hires-strength", "0"], "--hires-strength"),
                                               (["--hires-resize", "big"], "--hires-resize"),
                                               (["-W", "512", "--hires-scale", "20"], "--hires-scale")])
def test_cli_bad_hires_values_exit_2(tmp_path, flags, needle, capsys):
    from underpaint.cli.main import main

    code = main(["txt2img", "-p", "x", *flags, "-o", str(tmp_path / "x.png"), "--models-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err


# --------------------------------------------------------------------------- FLUX


@pytest.fixture(scope="module")
def flux_model(tmp_path_factory):
    pytest.importorskip("sentencepiece")
    from test_flux_pipeline import _tiny_flux

    return _tiny_flux(tmp_path_factory, guidance=True)


def _flux_run(model, **fields):
    from underpaint.pipeline.generate import generate
    from underpaint.pipeline.records import ModelInfo

    info = ModelInfo(name=model.name, path="tiny", family="flux", prediction="flow")
    defaults = dict(prompt="a cat sitting on a red chair", steps=3, seed=7, sampler="Euler", scheduler="Simple",
                    cfg_scale=1.0, rng="cpu", width=64, height=64)
    return generate(model, GenerationParams(**{**defaults, **fields}), info=info, progress=None,
                    cancel=Cancellation())


def test_flux_hires_is_flux_img2img_of_the_upscaled_picture(flux_model):
    hires = HiresOptions(scale=2, upscaler="Nearest", steps=2, strength=0.6)
    first = _flux_run(flux_model).images[0]
    witness = _flux_run(flux_model, init_images=(first.resize((128, 128), Image.Resampling.NEAREST),),
                        strength=0.6, steps=2, fix_steps=True, width=128, height=128).images[0]
    result = _flux_run(flux_model, hires=hires)
    assert result.images[0].size == (128, 128)
    assert np.array_equal(_pixels(result.images[0]), _pixels(witness))
    assert "Hires upscale: 2" in result.infotexts[0] and "Distilled CFG Scale" in result.infotexts[0]


def test_flux_hires_keeps_whole_patches(flux_model):
    # 96x88 from 64x64 covers at 96x96 and cuts 1 latent row: 11 rows are left, one more goes for
    # FLUX's 2x2 patches: 96x80.
    result = _flux_run(flux_model, hires=HiresOptions(resize_x=96, resize_y=88, steps=1))
    assert result.images[0].size == (96, 80)
    with pytest.raises(InvalidParameter) as err:
        _flux_run(flux_model, hires=HiresOptions(sampler="Euler a", steps=1))
    assert err.value.field == "hires_sampler"
    with pytest.raises(InvalidParameter) as err:
        _flux_run(flux_model, hires=HiresOptions(scheduler="Align Your Steps", steps=1))
    assert err.value.field == "hires_scheduler"


def test_hires_checkpoint_api_and_cli(tmp_path):
    from test_server_support import fake_api

    from underpaint.cli.generate import params_from_args
    from underpaint.cli.main import build_parser

    args = build_parser().parse_args(["txt2img", "-p", "x", "--hires", "--hires-checkpoint", "anime"])
    assert params_from_args(args).hires.checkpoint == "anime"
    with fake_api(tmp_path) as (client, backend):
        title = client.get("/sdapi/v1/sd-models").json()[0]["title"]
        base = {"steps": 1, "width": 64, "height": 64, "enable_hr": True, "denoising_strength": 0.5}
        for name in (title, "Use same checkpoint"):
            r = client.post("/sdapi/v1/txt2img", json={**base, "hr_checkpoint_name": name})
            assert r.status_code == 200, r.text
        got = [p.hires.checkpoint for p in backend.params]
        assert got[0].endswith(".safetensors") and got[1] is None
        r = client.post("/sdapi/v1/txt2img", json={**base, "hr_checkpoint_name": "../../etc/passwd"})
        assert r.status_code == 404 and r.json()["field"] == "hr_checkpoint_name", r.text
