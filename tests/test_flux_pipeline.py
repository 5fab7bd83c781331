"""FLUX through generate(): the same images as diffusers' FLUX pipelines on the same tiny weights.

The tiny modules are diffusers' and transformers' own classes (FluxTransformer2DModel,
AutoencoderKL with 16 latent channels, CLIPTextModel, T5EncoderModel) with random weights
and a sentencepiece model trained on the fly, so diffusers' pipelines are an independent
witness of the schedule, the start latent, packing, position ids, guidance and decoding.
diffusers samples the VAE posterior where underpaint (like A1111) takes its mean; the
witness runs are patched to take the mean too. diffusers rounds to uint8 where A1111
truncates, hence a tolerance of one level.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from PIL import Image

from underpaint.errors import InvalidParameter
from underpaint.params import GenerationParams, InpaintOptions
from underpaint.pipeline.generate import generate
from underpaint.pipeline.records import Cancellation, ModelInfo
from underpaint.sampling.flow import flow_sigmas, image_seq_len, shift_mu

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("sentencepiece")

WIDTH = HEIGHT = 64
PROMPT = "a cat sitting on a red chair"


def _spiece(folder) -> str:
    import sentencepiece as spm

    corpus = folder / "corpus.txt"
    lines = ["a photo of a cat sitting on a red chair in the sun", "the same street at night, rain, neon lights",
             "an oil painting of mountains and a lake at dawn", "portrait of an old man with a beard, studio light"]
    corpus.write_text("\n".join(lines * 30), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=60,
                                   model_type="bpe", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    return str(folder / "spiece.model")


def _tiny_flux(tmp_path_factory, *, guidance: bool, in_channels: int = 64, variant: str = "dev"):
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

    from underpaint.models.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, out_channels=64, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=guidance, axes_dims_rope=(4, 6, 6)).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 16, 16, 16], layers_per_block=1,
        latent_channels=16, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.3611, shift_factor=0.1159).eval()
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=32, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407)).eval()
    t5 = T5EncoderModel(T5Config(
        vocab_size=60, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8, relative_attention_max_distance=16)).eval()
    folder = tmp_path_factory.mktemp("spiece")
    t5_tok = T5TokenizerFast(vocab_file=_spiece(folder), extra_ids=0)
    spec = types.SimpleNamespace(
        family=types.SimpleNamespace(value="flux"), prediction="flow", in_channels=in_channels,
        latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, variant=variant,
        is_inpaint=in_channels != 64)
    return types.SimpleNamespace(
        spec=spec, unet=transformer, vae=vae, text_encoders=(clip, t5), tokenizers=(clip_tokenizer(), t5_tok),
        device=torch.device("cpu"), dtype=torch.float32, name=f"tiny-flux-{variant}", path=None)


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    return _tiny_flux(tmp_path_factory, guidance=True)


@pytest.fixture(scope="module")
def schnell(tmp_path_factory):
    return _tiny_flux(tmp_path_factory, guidance=False, variant="schnell")


@pytest.fixture(scope="module")
def fill(tmp_path_factory):
    return _tiny_flux(tmp_path_factory, guidance=True, in_channels=384, variant="fill")


@pytest.fixture(scope="module")
def picture():
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((HEIGHT, WIDTH, 3)) * 255).astype(np.uint8))


def _run(model, **fields):
    info = ModelInfo(name=model.name, path="tiny", family="flux", prediction="flow", short_hash=None, vae_name=None)
    defaults = dict(prompt=PROMPT, steps=10, seed=7, sampler="Euler", scheduler="Simple", cfg_scale=1.0, rng="cpu")
    return generate(model, GenerationParams(**{**defaults, **fields}), info=info, progress=None, cancel=Cancellation())


def _mean_latents(monkeypatch, module_name: str):
    """diffusers samples the VAE posterior; make its witness run take the mean, as underpaint does."""
    import importlib

    module = importlib.import_module(module_name)
    original = module.retrieve_latents
    monkeypatch.setattr(module, "retrieve_latents",
                        lambda enc, generator=None, sample_mode="sample": original(enc, generator, "argmax"))


def _scheduler(shifted: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if shifted:
        return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                               base_image_seq_len=256, max_image_seq_len=4096)
    return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)


def _pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def _close(ours, theirs) -> None:
    diff = np.abs(_pixels(ours) - _pixels(theirs))
    assert diff.max() <= 1, diff.max()
    assert _pixels(ours).std() > 5  # a real picture, not a flat one


@pytest.mark.parametrize("size", [(64, 64), (1024, 1024), (1344, 768)])
def test_schedule_is_diffusers_flow_match_with_the_resolution_shift(size):
    scheduler = _scheduler(True)
    seq = image_seq_len(*size)
    steps = 12
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=shift_mu(seq))
    ours = flow_sigmas(steps, mu=shift_mu(seq))
    torch.testing.assert_close(ours, scheduler.sigmas.float(), atol=1e-6, rtol=0)
    assert ours[0] == 1 and ours[-1] == 0


def test_unshifted_schedule_is_linear():
    torch.testing.assert_close(flow_sigmas(4, mu=None), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


def test_img2img_matches_diffusers_flux_img2img(dev, picture, monkeypatch):
    from diffusers import FluxImg2ImgPipeline

    # A1111 runs int(0.5·10) + 1 = 6 of 10 steps; diffusers runs int(0.6·10) = 6: the same tail.
    ours = _run(dev, init_images=(picture,), strength=0.5)
    _mean_latents(monkeypatch, "diffusers.pipelines.flux.pipeline_flux_img2img")
    pipe = FluxImg2ImgPipeline(scheduler=_scheduler(True), vae=dev.vae, text_encoder=dev.text_encoders[0],
                               tokenizer=dev.tokenizers[0], text_encoder_2=dev.text_encoders[1],
                               tokenizer_2=dev.tokenizers[1], transformer=dev.unet)
    theirs = pipe(prompt=PROMPT, image=picture, strength=0.6, num_inference_steps=10, guidance_scale=3.5,
                  generator=torch.Generator().manual_seed(7), height=HEIGHT, width=WIDTH,
                  max_sequence_length=512).images[0]
    _close(ours.images[0], theirs)
    # and the guidance input matters: another distilled scale gives another picture
    other = _run(dev, init_images=(picture,), strength=0.5, distilled_cfg_scale=1.0)
    assert np.abs(_pixels(other.images[0]) - _pixels(ours.images[0])).max() > 1


def test_true_cfg_with_a_negative_prompt_matches_diffusers(dev, picture, monkeypatch):
    from diffusers import FluxImg2ImgPipeline

    ours = _run(dev, init_images=(picture,), strength=0.5, cfg_scale=4.0, negative_prompt="blurry, dark")
    _mean_latents(monkeypatch, "diffusers.pipelines.flux.pipeline_flux_img2img")
    pipe = FluxImg2ImgPipeline(scheduler=_scheduler(True), vae=dev.vae, text_encoder=dev.text_encoders[0],
                               tokenizer=dev.tokenizers[0], text_encoder_2=dev.text_encoders[1],
                               tokenizer_2=dev.tokenizers[1], transformer=dev.unet)
    theirs = pipe(prompt=PROMPT, negative_prompt="blurry, dark", true_cfg_scale=4.0, image=picture, strength=0.6,
                  num_inference_steps=10, guidance_scale=3.5, generator=torch.Generator().manual_seed(7),
                  height=HEIGHT, width=WIDTH, max_sequence_length=512).images[0]
    _close(ours.images[0], theirs)


def test_schnell_txt2img_matches_diffusers_flux_pipeline(schnell):
    from diffusers import FluxPipeline

    ours = _run(schnell, steps=4, width=WIDTH, height=HEIGHT)
    pipe = FluxPipeline(scheduler=_scheduler(False), vae=schnell.vae, text_encoder=schnell.text_encoders[0],
                        tokenizer=schnell.tokenizers[0], text_encoder_2=schnell.text_encoders[1],
                        tokenizer_2=schnell.tokenizers[1], transformer=schnell.unet)
    theirs = pipe(prompt=PROMPT, num_inference_steps=4, guidance_scale=0.0, generator=torch.Generator().manual_seed(7),
                  height=HEIGHT, width=WIDTH, max_sequence_length=256).images[0]
    _close(ours.images[0], theirs)
    assert "Distilled CFG Scale" not in ours.infotexts[0]


def test_strength_zero_returns_the_input(dev, picture):
    result = _run(dev, init_images=(picture,), strength=0.0)
    assert result.images[0].tobytes() == picture.tobytes()


def test_inpainting_keeps_outside_pixels_bit_exact(dev, picture):
    mask = Image.new("L", picture.size, 0)
    mask.paste(255, (16, 16, 48, 48))
    result = _run(dev, init_images=(picture,), mask=mask, strength=0.8, inpaint=InpaintOptions(mask_blur_x=0, mask_blur_y=0))
    ours, original, inside = _pixels(result.images[0]), _pixels(picture), np.asarray(mask) > 0
    assert (ours[~inside] == original[~inside]).all()
    assert np.abs(ours[inside] - original[inside]).mean() > 5


def test_fill_channels_match_diffusers_fill_pipeline(fill, picture, monkeypatch):
    from diffusers import FluxFillPipeline

    from underpaint.imageio.convert import images_to_tensor
    from underpaint.pipeline import generate as gen

    rng = np.random.default_rng(1)
    mask = Image.fromarray(((rng.random((HEIGHT, WIDTH)) > 0.5) * 255).astype(np.uint8))
    params = GenerationParams(init_images=(picture,), mask=mask, prompt=PROMPT, seed=3, strength=1.0,
                              inpaint=InpaintOptions(mask_blur_x=0, mask_blur_y=0))
    plan = gen._plan(fill, params.with_seed())
    from underpaint.pipeline import inpaint

    plan = gen.replace(plan, inpaint=inpaint.prepare_inpaint(plan.params, plan.width, plan.height))
    ours = gen.flux_fill_channels(fill, plan, 2, lambda px: gen.encode_pixels(fill, px))

    _mean_latents(monkeypatch, "diffusers.pipelines.flux.pipeline_flux_fill")
    pipe = FluxFillPipeline(scheduler=_scheduler(True), vae=fill.vae, text_encoder=fill.text_encoders[0],
                            tokenizer=fill.tokenizers[0], text_encoder_2=fill.text_encoders[1],
                            tokenizer_2=fill.tokenizers[1], transformer=fill.unet)
    pixels = images_to_tensor([picture])
    bits = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None, None].round()
    mask_latents, masked_latents = pipe.prepare_mask_latents(bits, pixels * (1 - bits), 1, 16, 2, HEIGHT, WIDTH,
                                                             torch.float32, torch.device("cpu"), None)
    torch.testing.assert_close(ours, torch.cat([masked_latents, mask_latents], dim=-1), atol=1e-5, rtol=1e-5)


def test_fill_model_inpaints(fill, picture):
    mask = Image.new("L", picture.size, 0)
    mask.paste(255, (0, 0, 32, 64))
    result = _run(fill, init_images=(picture,), mask=mask, strength=1.0, inpaint=InpaintOptions(mask_blur_x=0, mask_blur_y=0))
    ours, original = _pixels(result.images[0]), _pixels(picture)
    assert (ours[:, 32:] == original[:, 32:]).all()
    assert "Distilled CFG Scale: 3.5" in result.infotexts[0]


def test_infotext_records_guidance_and_reads_back(dev, picture):
    from underpaint.imageio.infotext import parse_infotext
    from underpaint.pipeline.reproduce import params_from_infotext

    result = _run(dev, init_images=(picture,), strength=0.5, distilled_cfg_scale=2.5, steps=6)
    text = result.infotexts[0]
    assert "Sampler: Euler, Schedule type: Simple, CFG scale: 1, Distilled CFG Scale: 2.5, Seed: 7" in text
    fields = params_from_infotext(parse_infotext(text))
    assert fields["distilled_cfg_scale"] == 2.5 and fields["steps"] == 6 and fields["scheduler"] == "Simple"
    again = _run(dev, init_images=(picture,), **{k: v for k, v in fields.items() if k in ("prompt", "steps", "seed",
                                                                                            "strength", "scheduler",
                                                                                            "distilled_cfg_scale",
                                                                                            "cfg_scale", "sampler")})
    assert again.images[0].tobytes() == result.images[0].tobytes()


@pytest.mark.parametrize("fields, field", [
    ({"sampler": "Euler a"}, "sampler"),
    ({"sampler": "DDIM"}, "sampler"),
    ({"scheduler": "Align Your Steps"}, "scheduler"),
])
def test_what_flux_cannot_do_is_refused_by_field(dev, fields, field):
    with pytest.raises(InvalidParameter) as caught:
        _run(dev, **fields)
    assert caught.value.field == field


@pytest.mark.parametrize("sampler", ["Heun", "DPM++ 2M", "LMS"])
def test_other_flow_samplers_run_and_are_seeded(dev, picture, sampler):
    a = _run(dev, init_images=(picture,), strength=0.6, steps=6, sampler=sampler)
    b = _run(dev, init_images=(picture,), strength=0.6, steps=6, sampler=sampler)
    assert a.images[0].tobytes() == b.images[0].tobytes()
    assert f"Sampler: {sampler}" in a.infotexts[0]


def _tiny_controlnet(folder, *, num_mode=None, seed=4):
    from diffusers import FluxControlNetModel

    torch.manual_seed(seed)
    net = FluxControlNetModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                              num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                              guidance_embeds=True, axes_dims_rope=(4, 6, 6), num_mode=num_mode).eval()
    with torch.no_grad():  # the zero-initialised parts would make every residual zero
        for p in net.parameters():
            p.normal_(0.0, 0.05)
    net.save_pretrained(folder)
    return net


@pytest.fixture(scope="module")
def control_picture():
    a = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    a[10:20, 5:60] = 255
    a[30:60, 30:34] = 255
    return Image.fromarray(a)


def test_controlnet_matches_diffusers_flux_controlnet_img2img(dev, picture, control_picture, tmp_path, monkeypatch):
    from diffusers import FluxControlNetImg2ImgPipeline

    from underpaint.pipeline.control import ControlUnit

    net = _tiny_controlnet(tmp_path / "flux-controlnet-canny")
    unit = ControlUnit(image=control_picture, module="none", model=str(tmp_path / "flux-controlnet-canny"), weight=0.8)
    ours = _run(dev, init_images=(picture,), strength=0.5, control_units=(unit,))
    plain = _run(dev, init_images=(picture,), strength=0.5)
    assert np.abs(_pixels(ours.images[0]) - _pixels(plain.images[0])).max() > 1  # the unit does something
    assert 'ControlNet 0: "Module: none, Model: flux-controlnet-canny' in ours.infotexts[0]

    _mean_latents(monkeypatch, "diffusers.pipelines.flux.pipeline_flux_controlnet_image_to_image")
    pipe = FluxControlNetImg2ImgPipeline(scheduler=_scheduler(True), vae=dev.vae, text_encoder=dev.text_encoders[0],
                                         tokenizer=dev.tokenizers[0], text_encoder_2=dev.text_encoders[1],
                                         tokenizer_2=dev.tokenizers[1], transformer=dev.unet, controlnet=net)
    theirs = pipe(prompt=PROMPT, image=picture, control_image=control_picture, strength=0.6, num_inference_steps=10,
                  guidance_scale=3.5, controlnet_conditioning_scale=0.8, generator=torch.Generator().manual_seed(7),
                  height=HEIGHT, width=WIDTH, max_sequence_length=512).images[0]
    _close(ours.images[0], theirs)


def test_union_controlnet_gets_the_control_type_and_weight_zero_is_no_controlnet(dev, picture, control_picture,
                                                                                 tmp_path, monkeypatch):
    from diffusers import FluxControlNetModel

    from underpaint.pipeline.control import ControlUnit

    _tiny_controlnet(tmp_path / "flux-controlnet-union", num_mode=7)
    folder = str(tmp_path / "flux-controlnet-union")
    modes = []
    forward = FluxControlNetModel.forward

    def spy(self, *args, controlnet_mode=None, **kwargs):
        modes.append(None if controlnet_mode is None else controlnet_mode.flatten().tolist())
        return forward(self, *args, controlnet_mode=controlnet_mode, **kwargs)

    monkeypatch.setattr(FluxControlNetModel, "forward", spy)
    _run(dev, init_images=(picture,), strength=0.5, steps=2,
         control_units=(ControlUnit(image=control_picture, module="none", model=folder, union_control_type="Hard Edge"),
                        ControlUnit(image=control_picture, module="tile_resample", model=folder)))
    assert modes[:2] == [[0], [1]]  # a ready map typed Hard Edge is canny (0); tile is 1, as the union models number them
    off = _run(dev, init_images=(picture,), strength=0.5,
               control_units=(ControlUnit(image=control_picture, module="none", model=folder, weight=0.0,
                                          union_control_type="Hard Edge"),))
    plain = _run(dev, init_images=(picture,), strength=0.5)
    assert off.images[0].tobytes() == plain.images[0].tobytes()


def test_attention_weights_scale_t5_tokens_with_a1111_mean_restoration(dev):
    from underpaint.pipeline.flux import encode_prompt, encode_texts

    tok, t5 = dev.tokenizers[1], dev.text_encoders[1]
    weighted = encode_prompt(dev, "a (red:1.5) cat on a [chair]")
    plain = encode_texts(dev, ["a red cat on a chair"])
    assert torch.equal(weighted.pooled, plain.pooled)  # CLIP-L reads the words
    # by hand: each run tokenized alone, its tokens scaled, the mean put back
    ids, weights = [], []
    for text, weight in [("a ", 1.0), ("red", 1.5), (" cat on a ", 1.0), ("chair", 1 / 1.1)]:
        piece = tok(text, add_special_tokens=False).input_ids
        ids, weights = ids + piece, weights + [weight] * len(piece)
    ids, weights = ids + [tok.eos_token_id], weights + [1.0]
    ids, weights = ids + [tok.pad_token_id] * (512 - len(ids)), weights + [1.0] * (512 - len(weights))
    with torch.no_grad():
        z = t5(torch.tensor([ids]))[0]
    scaled = z * torch.tensor(weights)[None, :, None]
    torch.testing.assert_close(weighted.t5, scaled * (z.mean() / scaled.mean()))
    assert not torch.allclose(weighted.t5, plain.t5)
    # weight 1 everywhere is the plain encoding, exactly
    assert torch.equal(encode_prompt(dev, "a (red:1.0) cat").t5, encode_texts(dev, ["a red cat"]).t5)
