"""DeepCache (pipeline/deepcache.py) against the authors' own implementation, DeepCacheSDHelper
(the ``DeepCache`` package), on tiny diffusers UNets and through the engine; the schedule, the
counting, and every surface that turns it on (params, CLI, API, infotext)."""

from __future__ import annotations

import functools
import types

import numpy as np
import pytest
import torch

from underpaint.errors import InvalidParameter
from underpaint.params import DeepCacheOptions, GenerationParams
from underpaint.pipeline.deepcache import DeepCache, branch_positions

DeepCacheSDHelper = pytest.importorskip("DeepCache").DeepCacheSDHelper


# --- tiny UNets, built directly with diffusers ----------------------------------------------------


@functools.lru_cache(maxsize=None)
def _unet(kind: str) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    common = dict(sample_size=8, out_channels=4, layers_per_block=2, norm_num_groups=8)
    if kind == "sd":  # SD 1.x's layout: attention on the upper levels, a plain deepest level
        cfg = dict(in_channels=4, block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=4)
    elif kind == "inpaint":  # a 9-channel input (latents + mask + masked picture)
        cfg = dict(in_channels=9, block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=4)
    else:  # SDXL's layout: a plain top level, text_time embeddings, deeper transformers
        cfg = dict(in_channels=4, block_out_channels=(16, 32, 32),
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   transformer_layers_per_block=(1, 2, 2), cross_attention_dim=16, attention_head_dim=4,
                   use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                   projection_class_embeddings_input_dim=16 + 6 * 8)
    return UNet2DConditionModel(**common, **cfg).eval()


TIMESTEPS = torch.tensor([950.0, 800.0, 600.0, 400.0, 250.0, 100.0])


def _inputs(kind: str, unet) -> tuple[list[torch.Tensor], dict]:
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, unet.config.in_channels, 8, 8, generator=g) for _ in TIMESTEPS]
    kwargs = {"encoder_hidden_states": torch.randn(2, 5, 16, generator=g)}
    if kind == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 16, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    return xs, kwargs


def _reference(unet, xs, kwargs, interval: int, branch: int) -> list[torch.Tensor]:
    """DeepCacheSDHelper's outputs: it reads the step from the pipeline scheduler's timesteps."""
    pipe = types.SimpleNamespace(unet=unet, scheduler=types.SimpleNamespace(timesteps=TIMESTEPS))
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        with torch.no_grad():
            return [unet(x, t, **kwargs).sample for x, t in zip(xs, TIMESTEPS)]
    finally:
        helper.disable()


def _ours(unet, xs, kwargs, options: DeepCacheOptions) -> tuple[list[torch.Tensor], DeepCache]:
    """One evaluation per step, the step callback after it, as a first-order sampler runs them."""
    cache = DeepCache(unet, options)
    evaluate = cache.wrap_denoiser(lambda x, t: unet(x, t, **kwargs).sample)
    tick = cache.wrap_callback(None)
    out = []
    with torch.no_grad(), cache.installed():
        for i, (x, t) in enumerate(zip(xs, TIMESTEPS)):
            out.append(evaluate(x, t))
            tick(i, len(xs), x, out[-1])
    return out, cache


@pytest.fixture()
def one_thread():
    """Tiny models run fastest on one thread (and do not fight the other tests for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("kind", "interval", "branches"), [
    ("sd", 2, range(6)), ("sd", 3, range(6)), ("inpaint", 3, (0, 2, 4)), ("sdxl", 3, (0, 1, 2, 3, 5, 8)),
])
def test_unet_outputs_equal_deepcache_sd_helper(one_thread, kind, interval, branches):
    unet = _unet(kind)
    xs, kwargs = _inputs(kind, unet)
    with torch.no_grad():
        plain = [unet(x, t, **kwargs).sample for x, t in zip(xs, TIMESTEPS)]
    for branch in branches:
        ref = _reference(unet, xs, kwargs, interval, branch)
        ours, cache = _ours(unet, xs, kwargs, DeepCacheOptions(interval=interval, branch=branch))
        for step, (a, b, p) in enumerate(zip(ours, ref, plain)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"branch {branch}, step {step}")
            if step % interval == 0:
                assert torch.equal(a, p), (branch, step)  # full steps are the plain UNet's
            else:
                assert not torch.allclose(a, p, atol=1e-4), (branch, step)  # cached steps are not
        full = len(range(0, len(xs), interval))
        assert (cache.stats.full_calls, cache.stats.cached_calls) == (full, len(xs) - full)
    # The UNet is as it was: same modules, no hooks left behind.
    with torch.no_grad():
        again = [unet(x, t, **kwargs).sample for x, t in zip(xs, TIMESTEPS)]
    assert all(torch.equal(a, b) for a, b in zip(again, plain))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())


def test_branch_numbers_follow_the_reference_and_skipped_modules_do_not_run(one_thread):
    unet = _unet("sd")
    assert branch_positions(unet) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    xs, kwargs = _inputs("sd", unet)
    ran: dict[str, int] = {}
    handles = [module.register_forward_hook(lambda m, a, o, name=name: ran.__setitem__(name, ran.get(name, 0) + 1))
               for name, module in unet.named_modules() if name.count(".") <= 3]
    try:
        _, cache = _ours(unet, xs[:4], kwargs, DeepCacheOptions(interval=4, branch=1))
    finally:
        for h in handles:
            h.remove()
    assert cache.stats.skipped_modules == [
        "down_blocks.1", "down_blocks.0.resnets.1", "down_blocks.0.attentions.1", "down_blocks.0.downsamplers.0",
        "mid_block", "up_blocks.0", "up_blocks.1.resnets.0", "up_blocks.1.attentions.0"]
    assert (cache.stats.full_calls, cache.stats.cached_calls) == (1, 3)
    for name in cache.stats.skipped_modules:
        assert ran[name] == 1, name  # the full step only
    for name in ("conv_in", "down_blocks.0", "down_blocks.0.resnets.0", "up_blocks.1", "up_blocks.1.resnets.1",
                 "up_blocks.1.resnets.2", "conv_out"):
        assert ran[name] == 4, name


def test_schedule_start_end_and_refusals():
    unet = _unet("sd")
    cache = DeepCache(unet, DeepCacheOptions(interval=3, start=2, end=9))
    assert [cache.is_full_step(s) for s in range(11)] == [
        True, True, True, False, False, True, False, False, True, True, True]
    with pytest.raises(InvalidParameter, match="deepcache_branch"):
        DeepCache(unet, DeepCacheOptions(branch=6))


@pytest.mark.parametrize(("fields", "field"), [
    ({"interval": 0}, "deepcache_interval"), ({"interval": 2.5}, "deepcache_interval"),
    ({"branch": -1}, "deepcache_branch"), ({"start": -2}, "deepcache_start"),
    ({"start": 4, "end": 4}, "deepcache_end"), ({"end": 0}, "deepcache_end"),
])
def test_bad_options_name_the_field(fields, field):
    with pytest.raises(InvalidParameter) as exc:
        DeepCacheOptions(**fields)
    assert exc.value.field == field
    with pytest.raises(InvalidParameter, match="deepcache"):
        GenerationParams(deepcache={"interval": 3})


# --- through the engine ------------------------------------------------------------------------


def _img2img(**fields) -> GenerationParams:
    from PIL import Image

    base = dict(prompt="a red house by the sea", negative_prompt="blurry", strength=0.5, steps=10, cfg_scale=7.0,
                sampler="Euler", scheduler="Automatic", seed=1234, rng="cpu")
    base.update(fields)
    if "init_images" not in base:
        gradient = np.linspace(0, 255, 64 * 64 * 3).reshape(64, 64, 3).astype(np.uint8)
        base["init_images"] = (Image.fromarray(gradient),)
    return GenerationParams(**base)


def test_engine_img2img_equals_diffusers_pipeline_with_deepcache_sd_helper(sd1_engine, photo):
    """Our Euler img2img with DeepCache = diffusers' StableDiffusionImg2ImgPipeline with the authors'
    helper enabled (matched as in test_engine_img2img: strength (t_enc + 1)/N, uint8 truncation)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline
    from test_engine_img2img import _init_latents, _pixels

    image = photo.resize((64, 64))
    steps, strength, interval = 10, 0.5, 3
    params = _img2img(init_images=(image,), steps=steps, strength=strength)
    plain = sd1_engine.generate(params).images[0]
    ours = sd1_engine.generate(params.replace(deepcache=DeepCacheOptions(interval=interval))).images[0]

    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, timestep_spacing="linspace")
    t_enc = int(min(strength, 0.999) * steps)
    m = sd1_engine.model
    pipe = StableDiffusionImg2ImgPipeline(
        vae=m.vae, text_encoder=m.text_encoders[0], tokenizer=m.tokenizers[0], unet=m.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=0)
    helper.enable()
    try:
        ref = pipe(prompt=params.prompt, negative_prompt=params.negative_prompt, image=_init_latents(sd1_engine, image),
                   strength=(t_enc + 1) / steps, num_inference_steps=steps, guidance_scale=params.cfg_scale,
                   generator=torch.Generator().manual_seed(params.seed), output_type="np").images[0]
    finally:
        helper.disable()
    assert m.unet.forward.__func__ is type(m.unet).forward  # the helper is gone again
    ref_u8 = (np.clip(ref, 0, 1) * 255).astype(np.uint8).astype(np.int16)
    diff = np.abs(_pixels(ours) - ref_u8)
    assert diff.max() <= 1, diff.max()
    assert (diff > 0).mean() < 0.01
    assert np.abs(_pixels(plain) - _pixels(ours)).max() > 1  # the cache changed the picture


def _count_calls(engine):
    """Counters of UNet calls and mid-block runs (the mid block runs on full calls only)."""
    unet = engine.model.unet
    counts = {"unet": 0, "mid": 0}
    h1 = unet.register_forward_pre_hook(lambda *a: counts.__setitem__("unet", counts["unet"] + 1))
    h2 = unet.mid_block.register_forward_pre_hook(lambda *a: counts.__setitem__("mid", counts["mid"] + 1))
    return counts, (h1, h2)


@pytest.mark.parametrize(("fields", "unet_calls", "full_calls"), [
    # Euler, 6 steps (strength 0.5 of 10 + 1): full at steps 0 and 3.
    ({}, 6, 2),
    # start 1 / end 4: steps 0 (before start), 1 (start), 4, 5 (from end) full; 2, 3 cached.
    ({"start": 1, "end": 4}, 6, 4),
    # Heun, 4 steps: 7 evaluations. The correction of step i goes with step i + 1: full at steps 0, 2
    # = evaluations 0, 3, 4 of (0 | 1 2 | 3 4 | 5 6).
    ({"sampler": "Heun", "steps": 4, "strength": 1.0, "interval": 2}, 7, 3),
    # A prompt longer than 75 tokens: cond and uncond as two calls per evaluation, each cached apart.
    ({"prompt": "a red house by the sea " * 16}, 12, 4),
])
def test_engine_counts_unet_calls_per_sampler_step(sd1_engine, fields, unet_calls, full_calls):
    fields = dict(fields)
    options = {k: fields.pop(k) for k in ("interval", "start", "end") if k in fields}
    params = _img2img(**fields, deepcache=DeepCacheOptions(**{"interval": 3, **options}))
    counts, handles = _count_calls(sd1_engine)
    try:
        sd1_engine.generate(params)
    finally:
        for h in handles:
            h.remove()
    assert counts == {"unet": unet_calls, "mid": full_calls}


def test_hires_fix_starts_each_pass_with_a_full_step(sd1_engine):
    from underpaint.params import HiresOptions

    params = GenerationParams(prompt="a boat", steps=4, width=64, height=64, seed=5, sampler="Euler",
                              hires=HiresOptions(scale=1.5, steps=3, strength=0.6),
                              deepcache=DeepCacheOptions(interval=2))
    counts, handles = _count_calls(sd1_engine)
    try:
        result = sd1_engine.generate(params)
    finally:
        for h in handles:
            h.remove()
    # First pass: steps 0-3, full at 0, 2. Second pass, 3 steps of its own: full at 0, 2.
    assert counts == {"unet": 7, "mid": 4}
    assert result.images[0].size == (96, 96)


def test_interval_one_and_off_are_bit_identical_to_the_plain_path(sd1_engine):
    params = _img2img(steps=6, strength=0.7, sampler="DPM++ 2M", batch_size=2)
    plain = sd1_engine.generate(params)
    one = sd1_engine.generate(params.replace(deepcache=DeepCacheOptions(interval=1, branch=3)))
    assert [i.tobytes() for i in plain.images] == [i.tobytes() for i in one.images]
    assert plain.infotexts == one.infotexts
    assert "DeepCache" not in plain.infotexts[0]


def test_low_vram_mode_gives_the_same_picture_and_skips_block_visits(sd1_file):
    from underpaint.pipeline.engine import Engine

    params = _img2img(steps=7, strength=1.0, width=64, height=64, deepcache=DeepCacheOptions(interval=3))
    high = Engine.load(sd1_file, device="cpu", dtype="fp32").generate(params)
    low_engine = Engine.load(sd1_file, device="cpu", dtype="fp32", vram="low")
    visits: list[str] = []
    low_engine.model.offload.observer = lambda event, part: visits.append(part) if event == "in" else None
    low = low_engine.generate(params)
    assert np.array_equal(np.asarray(high.images[0]), np.asarray(low.images[0]))
    # 7 steps, full at 0, 3, 6. Branch 0 skips every down block and all but the last up block.
    for block in ("down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0"):
        assert visits.count(f"unet.{block}") == 3, block
    assert visits.count("unet.up_blocks.1") == visits.count("unet.conv_in") == 7


def test_refusals_through_the_engine(sd1_engine, sdxl_file):
    from underpaint.pipeline.engine import Engine

    with pytest.raises(InvalidParameter) as exc:  # SD 1.x tiny UNet: 2 levels, branches 0-5
        sd1_engine.generate(_img2img(deepcache=DeepCacheOptions(branch=6)))
    assert exc.value.field == "deepcache_branch" and "0 to 5" in str(exc.value)
    xl = Engine.load(sdxl_file, device="cpu", dtype="fp32")
    result = xl.generate(_img2img(steps=4, strength=1.0, width=64, height=64,
                                  deepcache=DeepCacheOptions(interval=2, branch=1)))
    assert np.asarray(result.images[0]).std() > 0
    assert "DeepCache interval: 2, DeepCache branch: 1" in result.infotexts[0]


def test_compiled_unet_is_refused(sd1_file):
    from underpaint.models.optimize import SpeedOptions
    from underpaint.pipeline.engine import Engine

    engine = Engine.load(sd1_file, device="cpu", dtype="fp32",
                         optimize=SpeedOptions(compile=True, compile_backend="eager"))
    with pytest.raises(InvalidParameter) as exc:
        engine.generate(_img2img(deepcache=DeepCacheOptions(interval=2)))
    assert exc.value.field == "deepcache_interval" and "compile" in str(exc.value)


# --- infotext, CLI, API ------------------------------------------------------------------------


def test_infotext_round_trip(sd1_engine):
    from underpaint.imageio.infotext import parse_infotext
    from underpaint.pipeline.reproduce import params_from_infotext

    params = _img2img(steps=5, deepcache=DeepCacheOptions(interval=4, branch=2, start=1, end=4))
    result = sd1_engine.generate(params)
    assert "DeepCache interval: 4, DeepCache branch: 2, DeepCache start: 1, DeepCache end: 4" in result.infotexts[0]
    fields = params_from_infotext(parse_infotext(result.infotexts[0]))
    assert fields["deepcache"] == params.deepcache
    again = sd1_engine.generate(params.replace(deepcache=None).replace(**{
        k: v for k, v in fields.items() if k in ("deepcache", "seed", "steps", "strength", "sampler")}))
    assert again.images[0].tobytes() == result.images[0].tobytes()
    with pytest.raises(InvalidParameter) as exc:
        params_from_infotext(parse_infotext("x\nSteps: 4, Seed: 1, DeepCache interval: 3, DeepCache branch: two"))
    assert exc.value.field == "DeepCache branch"


def test_cli_flags(tmp_path):
    import argparse

    from underpaint.cli.generate import _add_generation_args, params_from_args

    parser = argparse.ArgumentParser()
    _add_generation_args(parser, img2img=False)
    args = parser.parse_args(["--deepcache", "3", "--deepcache-branch", "2", "--deepcache-end", "15"])
    assert params_from_args(args).deepcache == DeepCacheOptions(interval=3, branch=2, end=15)
    assert params_from_args(parser.parse_args([])).deepcache is None
    assert params_from_args(parser.parse_args(["--deepcache", "1"])).deepcache is None
    infotext = tmp_path / "p.txt"
    infotext.write_text("a cat\nSteps: 4, Sampler: Euler, Seed: 1, DeepCache interval: 5, DeepCache branch: 1")
    from_text = params_from_args(parser.parse_args(["--from-infotext", str(infotext)]))
    assert from_text.deepcache == DeepCacheOptions(interval=5, branch=1)
    over = params_from_args(parser.parse_args(["--from-infotext", str(infotext), "--deepcache", "2"]))
    assert over.deepcache == DeepCacheOptions(interval=2, branch=1)
    off = params_from_args(parser.parse_args(["--from-infotext", str(infotext), "--deepcache", "0"]))
    assert off.deepcache is None
    for flags, field in ((["--deepcache-branch", "1"], "--deepcache-branch"),
                         (["--deepcache", "3", "--deepcache-start", "-1"], "deepcache_start")):
        with pytest.raises(InvalidParameter) as exc:
            params_from_args(parser.parse_args(flags))
        assert exc.value.field == field


def test_api_override_settings(tmp_path):
    from fastapi.testclient import TestClient

    from test_server_support import FakeBackend, make_models_dir
    from underpaint.server.app import create_app
    from underpaint.server.config import ServerConfig

    backend = FakeBackend()
    app = create_app(ServerConfig(models_dir=make_models_dir(tmp_path), preload=False), loader=backend)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        base = {"steps": 2, "width": 64, "height": 64}
        r = c.post("/sdapi/v1/txt2img", json={**base, "override_settings": {
            "deepcache_interval": 3, "deepcache_branch": 1, "deepcache_start": 2}})
        assert r.status_code == 200, r.text
        assert backend.params[-1].deepcache == DeepCacheOptions(interval=3, branch=1, start=2)
        assert "DeepCache interval: 3, DeepCache branch: 1, DeepCache start: 2" in r.json()["info"]
        r = c.post("/sdapi/v1/txt2img", json={**base, "override_settings": {"deepcache_interval": 1}})
        assert r.status_code == 200 and backend.params[-1].deepcache is None
        # A pasted infotext turns it on again, as A1111 takes settings from one.
        r = c.post("/sdapi/v1/txt2img", json={**base, "infotext": "x\nSteps: 2, Seed: 3, DeepCache interval: 4, "
                                                                   "DeepCache branch: 0"})
        assert r.status_code == 200, r.text
        assert backend.params[-1].deepcache == DeepCacheOptions(interval=4)
        for settings, field in (({"deepcache_interval": "x"}, "override_settings.deepcache_interval"),
                                ({"deepcache_interval": 3, "deepcache_branch": -1}, "override_settings.deepcache_branch"),
                                ({"deepcache_branch": 2}, "override_settings.deepcache_branch")):
            r = c.post("/sdapi/v1/txt2img", json={**base, "override_settings": settings})
            assert r.status_code == 422, r.text
            assert r.json()["field"] == field
