"""Stability's SDXL refiner architecture (OpenCLIP bigG alone, a UNet conditioned on an aesthetic score):
loaded from its single-file layout and from a diffusers folder, checked against diffusers' own loader
and pipelines on the same tiny weights, used on its own for img2img and as the Refiner of an SDXL base."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import tiny_models as tm
from underpaint.errors import InvalidParameter
from underpaint.models.detect import Family
from underpaint.params import GenerationParams, RefinerOptions


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl-refiner")
    return {"refiner": tm.write_sdxl_refiner(folder / "sd_xl_refiner_tiny.safetensors"),
            "base": tm.write_sdxl(folder / "sd_xl_base_tiny.safetensors"),
            "refiner_config": tm.tiny_diffusers_config_dir(folder / "refiner-config", "sdxl_refiner"),
            "base_config": tm.tiny_diffusers_config_dir(folder / "base-config", "sdxl"),
            "folder": folder}


@pytest.fixture(scope="module")
def engine(files):
    from underpaint.pipeline.engine import Engine

    return Engine.load(files["refiner"], device="cpu", dtype="fp32")


def _single_file(cls, path, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = cls.from_single_file(str(path), config=str(config), local_files_only=True, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def witness(files):
    """diffusers' refiner pipeline, loaded by diffusers from the same single file."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    return _single_file(StableDiffusionXLImg2ImgPipeline, files["refiner"], files["refiner_config"])


def _euler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, timestep_spacing="linspace")


def _u8(picture: np.ndarray) -> np.ndarray:
    return (np.clip(picture, 0, 1) * 255).astype(np.uint8).astype(np.int16)  # A1111 truncates, as the engine


def test_detected_and_built_as_diffusers_builds_it(engine, witness):
    """Family, one bigG encoder with projection, the 5-number size embedding; every weight equal to
    diffusers' own conversion of the file."""
    model = engine.model
    assert model.spec.family == Family.SDXL_REFINER and model.spec.scaling_factor == 0.13025
    assert [type(t).__name__ for t in model.text_encoders] == ["CLIPTextModelWithProjection"]
    assert model.unet.config.projection_class_embeddings_input_dim == 16 + 5 * tm.SDXL_TIME_IDS
    assert model.vae.config.force_upcast
    for ours, theirs, what in ((model.unet, witness.unet, "unet"), (model.vae, witness.vae, "vae"),
                               (model.text_encoders[0], witness.text_encoder_2, "bigG")):
        a, b = ours.state_dict(), theirs.state_dict()
        assert set(a) == set(b), what
        assert all(torch.equal(a[k], b[k]) for k in a), what


@pytest.mark.parametrize(("negative", "scores"), [("blurry", (7.5, 1.0)), ("", (6.0, 2.5))])
def test_img2img_is_diffusers_refiner_pipeline(engine, witness, photo, negative, scores):
    """Euler img2img at A1111's strength rule equals diffusers' StableDiffusionXLImg2ImgPipeline with
    requires_aesthetics_score, its own prompt encoding and size ids, within one level. An empty
    negative prompt is zeros (A1111 zeroes it; the reference is given zero negative embeddings)."""
    from underpaint.imageio.convert import images_to_tensor

    image, steps, strength, seed = photo.resize((64, 64)), 6, 0.6, 321
    ours = engine.generate(GenerationParams(
        prompt="a misty harbour", negative_prompt=negative, init_images=(image,), strength=strength, steps=steps,
        cfg_scale=6.0, sampler="Euler", scheduler="Automatic", seed=seed, rng="cpu",
        aesthetic_score=scores[0], negative_aesthetic_score=scores[1])).images[0]

    with torch.no_grad():
        latents = witness.vae.encode(images_to_tensor([image])).latent_dist.mean * 0.13025
    extra = {}
    if negative == "":
        extra = dict(negative_prompt_embeds=torch.zeros(1, 77, tm.SDXL_REFINER_TEXT.hidden),
                     negative_pooled_prompt_embeds=torch.zeros(1, tm.SDXL_REFINER_TEXT.projection))
    witness.scheduler = _euler()
    t_enc = int(strength * steps)
    ref = witness(prompt="a misty harbour", negative_prompt=negative or None, image=latents,
                  strength=(t_enc + 1) / steps, num_inference_steps=steps, guidance_scale=6.0,
                  aesthetic_score=scores[0], negative_aesthetic_score=scores[1],
                  generator=torch.Generator().manual_seed(seed), output_type="np", **extra).images[0]
    diff = np.abs(np.asarray(ours, dtype=np.int16) - _u8(ref))
    assert diff.max() <= 1, diff.max()

    # The scores reach the UNet: other scores give another picture.
    other = engine.generate(GenerationParams(
        prompt="a misty harbour", negative_prompt=negative, init_images=(image,), strength=strength, steps=steps,
        cfg_scale=6.0, sampler="Euler", scheduler="Automatic", seed=seed, rng="cpu",
        aesthetic_score=scores[1], negative_aesthetic_score=scores[0])).images[0]
    assert np.abs(np.asarray(other, dtype=np.int16) - np.asarray(ours, dtype=np.int16)).max() > 2


def test_sdxl_base_with_the_refiner_is_diffusers_with_both_swapped_at_the_switch(files, witness):
    """SDXL base txt2img with the refiner from "Switch at" 0.4: diffusers' StableDiffusionXLPipeline whose
    UNet, prompt embeddings, pooled embeddings and size ids (now with the aesthetic scores) become the
    refiner pipeline's at the step A1111's rule names, within one level."""
    from diffusers import StableDiffusionXLPipeline

    from underpaint.pipeline.engine import Engine

    engine = Engine.load(files["base"], device="cpu", dtype="fp32")
    prompt, negative, steps, seed = "a red barn in snow", "lowres", 6, 99
    ours = engine.generate(GenerationParams(
        prompt=prompt, negative_prompt=negative, steps=steps, cfg_scale=5.0, sampler="Euler",
        scheduler="Automatic", seed=seed, rng="cpu", width=64, height=64, aesthetic_score=9.0,
        negative_aesthetic_score=0.5, refiner=RefinerOptions(str(files["refiner"]), 0.4)))
    assert "Refiner: sd_xl_refiner_tiny [" in ours.infotexts[0]

    base = _single_file(StableDiffusionXLPipeline, files["base"], files["base_config"])
    base.scheduler = _euler()
    positive, neg, pooled, neg_pooled = witness.encode_prompt(prompt, device="cpu", negative_prompt=negative)
    ids, neg_ids = witness._get_add_time_ids((64, 64), (0, 0), (64, 64), 9.0, 0.5, (64, 64), (0, 0), (64, 64),
                                             dtype=torch.float32, text_encoder_projection_dim=16)
    table = ((1 - engine.model.alphas_cumprod) / engine.model.alphas_cumprod) ** 0.5
    switched = []

    def on_step_end(p, i, t, outputs):
        sigma = float(p.scheduler.sigmas[i + 1])
        ratio = (999 - int(torch.argmin((table - sigma).abs()))) / 1000
        if not switched and ratio >= 0.4 and i + 1 < len(p.scheduler.timesteps):
            switched.append(i + 1)
            p.unet = witness.unet
            return {"prompt_embeds": torch.cat([neg, positive]), "add_text_embeds": torch.cat([neg_pooled, pooled]),
                    "add_time_ids": torch.cat([neg_ids, ids])}
        return {}

    ref = base(prompt=prompt, negative_prompt=negative, guidance_scale=5.0, height=64, width=64,
               num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="np",
               callback_on_step_end=on_step_end,
               callback_on_step_end_tensor_inputs=["prompt_embeds", "add_text_embeds", "add_time_ids"]).images[0]
    assert switched and 0 < switched[0] < steps
    diff = np.abs(np.asarray(ours.images[0], dtype=np.int16) - _u8(ref))
    assert diff.max() <= 1, diff.max()
    # Late in the run the scores move the tiny model's picture by one level, in many places (the
    # scores swapped: 15 % of the values); rounding alone moves a few.
    assert (diff > 0).mean() < 0.02, (diff > 0).mean()
    without = engine.generate(GenerationParams(
        prompt=prompt, negative_prompt=negative, steps=steps, cfg_scale=5.0, sampler="Euler",
        scheduler="Automatic", seed=seed, rng="cpu", width=64, height=64)).images[0]
    assert np.abs(np.asarray(without, dtype=np.int16) - np.asarray(ours.images[0], dtype=np.int16)).max() > 2


def test_a_diffusers_refiner_folder_loads_as_the_same_model(files):
    """A refiner folder (text_encoder_2 and tokenizer_2 only) is the refiner family with its one encoder."""
    from underpaint.models.loader import load_model

    folder = tm.write_diffusers_folder(files["folder"] / "refiner-diffusers", "sdxl_refiner")
    model = load_model(folder)
    assert model.spec.family == Family.SDXL_REFINER
    assert len(model.text_encoders) == len(model.tokenizers) == 1
    assert model.unet.config.addition_time_embed_dim == tm.SDXL_TIME_IDS


def test_full_size_refiner_layout_has_the_published_parts(files):
    """The real refiner's widths (384-channel UNet with attention on the middle levels, bigG 1280 wide,
    5 x 256 size features) build on the meta device into the UNet of the config published with
    diffusers' refiner folder: the same tensors, the same shapes."""
    from pathlib import Path

    from diffusers import UNet2DConditionModel

    from underpaint.models.header import CheckpointHeader, TensorInfo
    from underpaint.models.loader import assemble

    unet = tm.TinyUNet((384, 768, 1536, 1536), 2, (0, 4, 4, 0), 4, 1280, True, (6, 12, 24, 24), adm_in=2560)
    shapes = {**tm.unet_shapes(unet), **tm.vae_shapes(tm.TinyVAE(channels=(128, 256, 512, 512), layers=2)),
              **tm.openclip_shapes(tm.TinyText(1280, 32, 1280), "conditioner.embedders.0.model.")}
    header = CheckpointHeader({k: TensorInfo("F16", tuple(s)) for k, (_, s) in shapes.items()})
    sd = {k: torch.empty(s, device="meta", dtype=torch.float16) for k, (_, s) in shapes.items()}
    model = assemble(header, sd, path=Path("sd_xl_refiner_1.0.safetensors"), device=torch.device("meta"),
                     dtype=torch.float16)
    published = dict(
        addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=[6, 12, 24, 24],
        block_out_channels=[384, 768, 1536, 1536], cross_attention_dim=1280, layers_per_block=2,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        projection_class_embeddings_input_dim=2560, sample_size=128, transformer_layers_per_block=4,
        use_linear_projection=True, norm_num_groups=32, in_channels=4, out_channels=4)
    with torch.device("meta"):
        reference = UNet2DConditionModel(**published)
    ours, theirs = model.unet.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    assert sum(p.numel() for p in model.unet.parameters()) == sum(p.numel() for p in reference.parameters())
    assert model.text_encoders[0].config.num_hidden_layers == 32
    assert model.text_encoders[0].config.projection_dim == 1280


def test_refused_where_it_cannot_refine(files, engine):
    """The refiner's latents are SDXL's: an SD 1.5 model cannot hand over to it, and it cannot take an
    SD 1.5 refiner; each refusal names the field."""
    from underpaint.pipeline.engine import Engine

    sd1 = tm.write_sd1(files["folder"] / "sd15.safetensors")
    with pytest.raises(InvalidParameter) as err:
        Engine.load(sd1, device="cpu", dtype="fp32").generate(GenerationParams(
            prompt="x", steps=2, width=64, height=64, refiner=RefinerOptions(str(files["refiner"]), 0.5)))
    assert err.value.field == "refiner_checkpoint" and "latent space" in str(err.value)
    with pytest.raises(InvalidParameter) as err:
        engine.generate(GenerationParams(prompt="x", steps=2, width=64, height=64,
                                         refiner=RefinerOptions(str(sd1), 0.5)))
    assert err.value.field == "refiner_checkpoint"


@pytest.mark.parametrize("name", ["aesthetic_score", "negative_aesthetic_score"])
@pytest.mark.parametrize("value", [-1.0, 10.5, float("nan")])
def test_aesthetic_scores_out_of_range_are_refused_by_name(name, value):
    with pytest.raises(InvalidParameter) as err:
        GenerationParams(prompt="x", **{name: value})
    assert err.value.field == name


def test_cli_flags():
    from underpaint.cli.generate import params_from_args
    from underpaint.cli.main import build_parser

    p = params_from_args(build_parser().parse_args(["txt2img", "-p", "x"]))
    assert (p.aesthetic_score, p.negative_aesthetic_score) == (6.0, 2.5)
    p = params_from_args(build_parser().parse_args(["txt2img", "-p", "x", "--aesthetic-score", "8",
                                                    "--negative-aesthetic-score", "1.5"]))
    assert (p.aesthetic_score, p.negative_aesthetic_score) == (8.0, 1.5)


def test_cli_names_the_flag_of_a_bad_score(tmp_path):
    from cli_runner import run_cli

    result = run_cli("txt2img", "-p", "x", "--model", str(tmp_path / "none.safetensors"), "--aesthetic-score", "11",
                     "-o", str(tmp_path / "out.png"))
    assert result.returncode == 2 and "--aesthetic-score" in result.stderr, result.stderr


def test_api_settings_and_overrides(api):
    """A1111's SDXL high/low aesthetic score settings: in /options (kept, checked by name), per request in
    override_settings, reaching the request as its scores."""
    client, backend = api
    options = client.get("/sdapi/v1/options").json()
    assert (options["sdxl_refiner_high_aesthetic_score"], options["sdxl_refiner_low_aesthetic_score"]) == (6.0, 2.5)
    assert client.post("/sdapi/v1/txt2img", json={"steps": 1}).status_code == 200
    body = {"steps": 1, "override_settings": {"sdxl_refiner_high_aesthetic_score": 7,
                                              "sdxl_refiner_low_aesthetic_score": 1}}
    assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200
    assert client.post("/sdapi/v1/options", json={"sdxl_refiner_high_aesthetic_score": 5.5}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["sdxl_refiner_high_aesthetic_score"] == 5.5
    assert client.post("/sdapi/v1/txt2img", json={"steps": 1}).status_code == 200
    assert [(p.aesthetic_score, p.negative_aesthetic_score) for p in backend.params] == [(6.0, 2.5), (7.0, 1.0),
                                                                                         (5.5, 2.5)]
    r = client.post("/sdapi/v1/txt2img", json={"steps": 1, "override_settings": {"sdxl_refiner_low_aesthetic_score": 12}})
    assert r.status_code == 422 and r.json()["field"] == "override_settings.sdxl_refiner_low_aesthetic_score", r.text
    r = client.post("/sdapi/v1/options", json={"sdxl_refiner_high_aesthetic_score": "high"})
    assert r.status_code == 422 and r.json()["field"] == "sdxl_refiner_high_aesthetic_score", r.text


def test_sdxl_crop_settings_are_diffusers_crops_coords(files):
    """A1111's SDXL "crop top/left coordinate" settings: SDXL base txt2img conditioned on that crop equals
    diffusers' StableDiffusionXLPipeline with crops_coords_top_left, within one level; another picture than
    the uncropped one."""
    from diffusers import StableDiffusionXLPipeline

    from underpaint.pipeline.engine import Engine

    engine = Engine.load(files["base"], device="cpu", dtype="fp32")
    common = dict(prompt="a red barn in snow", negative_prompt="lowres", steps=4, cfg_scale=5.0, sampler="Euler",
                  scheduler="Automatic", seed=5, rng="cpu", width=64, height=64)
    ours = engine.generate(GenerationParams(**common, sdxl_crop_top=48, sdxl_crop_left=16)).images[0]
    plain = engine.generate(GenerationParams(**common)).images[0]
    base = _single_file(StableDiffusionXLPipeline, files["base"], files["base_config"])
    base.scheduler = _euler()
    ref = base(prompt=common["prompt"], negative_prompt=common["negative_prompt"], guidance_scale=5.0, height=64,
               width=64, num_inference_steps=4, crops_coords_top_left=(48, 16),
               generator=torch.Generator().manual_seed(5), output_type="np").images[0]
    diff = np.abs(np.asarray(ours, dtype=np.int16) - _u8(ref))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.02, (diff.max(), (diff > 0).mean())
    assert (np.asarray(plain, dtype=np.int16) != _u8(ref)).mean() > 0.05


def test_sdxl_crop_through_the_cli_and_the_api(api):
    from underpaint.cli.generate import params_from_args
    from underpaint.cli.main import build_parser

    p = params_from_args(build_parser().parse_args(["txt2img", "-p", "x", "--sdxl-crop", "8,24"]))
    assert (p.sdxl_crop_top, p.sdxl_crop_left) == (8, 24)
    with pytest.raises(InvalidParameter) as err:
        params_from_args(build_parser().parse_args(["txt2img", "-p", "x", "--sdxl-crop", "8"]))
    assert err.value.field == "--sdxl-crop"
    client, backend = api
    assert client.get("/sdapi/v1/options").json()["sdxl_crop_top"] == 0
    assert client.post("/sdapi/v1/txt2img", json={"steps": 1, "override_settings": {"sdxl_crop_top": 32}}
                       ).status_code == 200
    assert client.post("/sdapi/v1/options", json={"sdxl_crop_left": 16}).status_code == 200
    assert client.post("/sdapi/v1/txt2img", json={"steps": 1}).status_code == 200
    assert [(p.sdxl_crop_top, p.sdxl_crop_left) for p in backend.params] == [(32, 0), (0, 16)]
    r = client.post("/sdapi/v1/txt2img", json={"steps": 1, "override_settings": {"sdxl_crop_top": -1}})
    assert r.status_code == 422 and r.json()["field"] == "override_settings.sdxl_crop_top", r.text
