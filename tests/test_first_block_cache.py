"""First Block Cache (pipeline/first_block_cache.py) against diffusers' own ``FirstBlockCacheConfig``
on tiny FLUX transformers and through the engine, and every surface that turns it on (params,
CLI, API, infotext)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from flux_fixtures import flux_dev, flux_files  # noqa: F401  (session fixtures)
from underpaint.errors import InvalidParameter
from underpaint.params import GenerationParams
from underpaint.pipeline.first_block_cache import FirstBlockCache, relative_change

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("sentencepiece")
FirstBlockCacheConfig = pytest.importorskip("diffusers.hooks").FirstBlockCacheConfig


@pytest.fixture()
def one_thread():
    """Tiny models run fastest on one thread (and do not fight the other tests for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- the transformer alone, call by call ----------------------------------------------------------


def _transformer(double: int = 2, single: int = 2) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=double, num_single_layers=single,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
        guidance_embeds=True, axes_dims_rope=(2, 2, 4)).eval()


def _step_inputs(steps: int = 10, batch: int = 2) -> list[dict]:
    """The transformer's inputs along a flow-matching run: x_σ = (1 − σ)·x0 + σ·noise at falling σ."""
    g = torch.Generator().manual_seed(1)
    tokens, text = 16, 6
    noise, x0 = torch.randn(batch, tokens, 16, generator=g), torch.randn(batch, tokens, 16, generator=g)
    enc, pooled = torch.randn(batch, text, 16, generator=g), torch.randn(batch, 16, generator=g)
    img_ids = torch.zeros(tokens, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(tokens) // 4, torch.arange(tokens) % 4
    return [dict(hidden_states=(1 - s) * x0 + s * noise, encoder_hidden_states=enc, pooled_projections=pooled,
                 timestep=s.expand(batch), img_ids=img_ids, txt_ids=torch.zeros(text, 3),
                 guidance=torch.full((batch,), 3.5), return_dict=False)
            for s in torch.linspace(1.0, 0.1, steps)]


def _diffusers_run(transformer, inputs, threshold: float) -> tuple[list[torch.Tensor], list[bool]]:
    """diffusers' outputs on a copy of ``transformer``, and its decision per call (True: every block ran)."""
    from diffusers.hooks import first_block_cache as fbc

    ref = copy.deepcopy(transformer)
    ref.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    decisions: list[bool] = []
    original = fbc.FBCHeadBlockHook._should_compute_remaining_blocks

    def spy(self, residual):
        decisions.append(original(self, residual))
        return decisions[-1]

    fbc.FBCHeadBlockHook._should_compute_remaining_blocks = spy
    try:
        with torch.no_grad(), ref.cache_context("cond"):
            return [ref(**kw)[0] for kw in inputs], decisions
    finally:
        fbc.FBCHeadBlockHook._should_compute_remaining_blocks = original


@pytest.mark.parametrize(("double", "single", "threshold"), [(2, 2, 0.4), (2, 2, 0.35), (1, 3, 0.4), (3, 1, 0.45)])
def test_transformer_outputs_equal_diffusers_first_block_cache(one_thread, double, single, threshold):
    transformer = _transformer(double, single)
    inputs = _step_inputs()
    theirs, their_decisions = _diffusers_run(transformer, inputs, threshold)
    cache = FirstBlockCache(transformer, threshold)
    with torch.no_grad(), cache.installed():
        ours = [transformer(**kw)[0] for kw in inputs]
    assert cache.stats.full == their_decisions
    assert 0 < cache.stats.cached_calls < len(inputs) - 1  # some calls skipped, some refreshed
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        plain = [transformer(**kw)[0] for kw in inputs]
    for a, b, full in zip(ours, plain, cache.stats.full):
        assert torch.equal(a, b) if full else not torch.allclose(a, b, atol=1e-4)


def test_decisions_follow_the_relative_change_against_the_last_full_call(one_thread):
    transformer = _transformer()
    inputs = _step_inputs()
    head = transformer.transformer_blocks[0]
    residuals: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda m, a, kw, out: residuals.append(out[1] - kw["hidden_states"]),
                                      with_kwargs=True)
    cache = FirstBlockCache(transformer, 0.4)
    with torch.no_grad(), cache.installed():
        for kw in inputs:
            transformer(**kw)
    hook.remove()
    reference = None
    for residual, full, change in zip(residuals, cache.stats.full, cache.stats.changes):
        if reference is None:
            assert full and change is None
        else:
            expected = ((residual - reference).abs().mean() / reference.abs().mean()).item()
            assert change == pytest.approx(expected, rel=1e-5)
            assert full == (expected > 0.4)
        if full:
            reference = residual


def test_skipped_blocks_do_not_run_and_the_blocks_are_put_back(one_thread):
    transformer = _transformer()
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    runs = [0] * len(blocks)
    hooks = [b.register_forward_pre_hook(lambda *a, i=i: runs.__setitem__(i, runs[i] + 1)) for i, b in enumerate(blocks)]
    state = {k: v.clone() for k, v in transformer.state_dict().items()}
    cache = FirstBlockCache(transformer, 0.4)
    inputs = _step_inputs()
    with torch.no_grad(), cache.installed():
        for kw in inputs:
            transformer(**kw)
    assert runs == [len(inputs)] + [cache.stats.full_calls] * (len(blocks) - 1)
    assert list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks) == blocks
    assert transformer.state_dict().keys() == state.keys()
    with pytest.raises(RuntimeError), cache.installed():  # put back after an error too
        raise RuntimeError("boom")
    assert list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks) == blocks
    for h in hooks:
        h.remove()


def test_call_positions_within_an_evaluation_keep_their_own_residuals(one_thread):
    """Two calls per evaluation (as cond and uncond could be): each compares with its own last full call."""
    transformer = _transformer()
    a, b = _step_inputs(), [dict(kw, encoder_hidden_states=-kw["encoder_hidden_states"]) for kw in _step_inputs()]
    together = FirstBlockCache(transformer, 0.4)
    evaluate = together.wrap_denoiser(lambda i: (transformer(**a[i])[0], transformer(**b[i])[0]))
    apart = [FirstBlockCache(transformer, 0.4) for _ in range(2)]
    with torch.no_grad():
        with together.installed():
            both = [evaluate(i) for i in range(len(a))]
        for cache, inputs, k in zip(apart, (a, b), range(2)):
            with cache.installed():
                alone = [transformer(**kw)[0] for kw in inputs]
            assert all(torch.equal(x[k], y) for x, y in zip(both, alone))
    assert together.stats.full[0::2] == apart[0].stats.full and together.stats.full[1::2] == apart[1].stats.full


def test_relative_change():
    before = torch.tensor([1.0, -2.0, 3.0])
    assert relative_change(before + torch.tensor([0.2, 0.2, -0.2]), before) == pytest.approx(0.1)
    assert relative_change(before, torch.zeros(3)) == float("inf")


# --- through the engine -------------------------------------------------------------------------


def _engine(model):
    from underpaint.pipeline.engine import Engine

    return Engine(model)


def _img2img(picture, **fields) -> GenerationParams:
    defaults = dict(prompt="a cat sitting on a red chair", steps=10, seed=7, sampler="Euler", scheduler="Simple",
                    cfg_scale=1.0, rng="cpu", init_images=(picture,), strength=0.5)
    return GenerationParams(**{**defaults, **fields})


@pytest.fixture(scope="module")
def picture():
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))


def _pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def _head_calls(model) -> tuple[list[int], list[int], object]:
    """Counters of first-block and last-block runs of ``model``'s transformer."""
    head, tail = [0], [0]
    t = model.unet
    h1 = t.transformer_blocks[0].register_forward_pre_hook(lambda *a: head.__setitem__(0, head[0] + 1))
    h2 = t.single_transformer_blocks[-1].register_forward_pre_hook(lambda *a: tail.__setitem__(0, tail[0] + 1))
    return head, tail, (h1, h2)


@pytest.mark.parametrize("threshold", [0.55, 0.8])
def test_engine_img2img_equals_diffusers_flux_img2img_with_the_cache(one_thread, flux_dev, picture, monkeypatch,  # noqa: F811
                                                                     threshold):
    import importlib

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline

    engine = _engine(flux_dev)
    plain = engine.generate(_img2img(picture))
    head, tail, hooks = _head_calls(flux_dev)
    try:
        ours = engine.generate(_img2img(picture, first_block_cache=threshold))
    finally:
        for h in hooks:
            h.remove()
    # A1111 runs int(0.5·10) + 1 = 6 of 10 steps: 6 transformer calls, the last block on the full ones only.
    assert head[0] == 6 and 1 < tail[0] < 6, (head, tail)

    module = importlib.import_module("diffusers.pipelines.flux.pipeline_flux_img2img")
    original = module.retrieve_latents  # underpaint takes the posterior's mean
    monkeypatch.setattr(module, "retrieve_latents",
                        lambda enc, generator=None, sample_mode="sample": original(enc, generator, "argmax"))
    transformer = copy.deepcopy(flux_dev.unet)
    transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxImg2ImgPipeline(scheduler=scheduler, vae=flux_dev.vae, text_encoder=flux_dev.text_encoders[0],
                               tokenizer=flux_dev.tokenizers[0], text_encoder_2=flux_dev.text_encoders[1],
                               tokenizer_2=flux_dev.tokenizers[1], transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    with transformer.cache_context("cond"):  # FluxImg2ImgPipeline opens none itself
        theirs = pipe(prompt="a cat sitting on a red chair", image=picture, strength=0.6, num_inference_steps=10,
                      guidance_scale=3.5, generator=torch.Generator().manual_seed(7), height=64, width=64,
                      max_sequence_length=512).images[0]
    diff = np.abs(_pixels(ours.images[0]) - _pixels(theirs))
    assert diff.max() <= 1, diff.max()
    assert np.abs(_pixels(plain.images[0]) - _pixels(ours.images[0])).max() > 1  # the cache changed the picture
    assert f"First block cache: {threshold}" in ours.infotexts[0]


def test_threshold_zero_is_bit_identical_and_the_model_is_restored(one_thread, flux_dev, picture):  # noqa: F811
    engine = _engine(flux_dev)
    blocks = list(flux_dev.unet.transformer_blocks) + list(flux_dev.unet.single_transformer_blocks)
    state = {k: v.clone() for k, v in flux_dev.unet.state_dict().items()}
    plain = engine.generate(_img2img(picture, steps=6, batch_size=2))
    off = engine.generate(_img2img(picture, steps=6, batch_size=2, first_block_cache=0.0))
    assert [i.tobytes() for i in plain.images] == [i.tobytes() for i in off.images]
    assert plain.infotexts == off.infotexts and "First block cache" not in plain.infotexts[0]
    engine.generate(_img2img(picture, steps=6, first_block_cache=0.5))
    assert list(flux_dev.unet.transformer_blocks) + list(flux_dev.unet.single_transformer_blocks) == blocks
    after = flux_dev.unet.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    again = engine.generate(_img2img(picture, steps=6, batch_size=2))
    assert [i.tobytes() for i in plain.images] == [i.tobytes() for i in again.images]


def test_true_cfg_and_hires_run_with_the_cache(one_thread, flux_dev, picture):  # noqa: F811
    from underpaint.params import HiresOptions

    engine = _engine(flux_dev)
    head, tail, hooks = _head_calls(flux_dev)
    try:
        cfg = engine.generate(_img2img(picture, cfg_scale=3.0, negative_prompt="blurry", first_block_cache=0.8))
        # cond and uncond rows go through as one batch: one call, one decision per step
        assert head[0] == 6 and 1 < tail[0] < 6, (head, tail)
        head[0] = tail[0] = 0
        hires = engine.generate(GenerationParams(prompt="a boat", steps=4, width=64, height=64, seed=5, sampler="Euler",
                                                 scheduler="Simple", cfg_scale=1.0, first_block_cache=0.8,
                                                 hires=HiresOptions(scale=1.5, steps=3, strength=0.6)))
    finally:
        for h in hooks:
            h.remove()
    assert np.asarray(cfg.images[0]).std() > 0
    assert hires.images[0].size == (96, 96)
    assert head[0] == 7 and 2 <= tail[0] < 7, (head, tail)  # each pass starts with a full call


def test_refusals(flux_dev, sd1_engine, picture, flux_files):  # noqa: F811
    from underpaint.models.optimize import SpeedOptions
    from underpaint.pipeline.engine import Engine

    with pytest.raises(InvalidParameter) as exc:
        sd1_engine.generate(_img2img(picture, steps=2, first_block_cache=0.12))
    assert exc.value.field == "first_block_cache" and "deepcache" in str(exc.value)
    compiled = Engine.load(flux_files["transformer"], clip_l=flux_files["clip_l"], t5=flux_files["t5"],
                           vae=flux_files["ae"], device="cpu", dtype="fp32",
                           optimize=SpeedOptions(compile=True, compile_backend="eager"))
    with pytest.raises(InvalidParameter) as exc:
        compiled.generate(_img2img(picture, steps=2, first_block_cache=0.12))
    assert exc.value.field == "first_block_cache" and "compile" in str(exc.value)
    # An ahead-of-time package would run the transformer's own blocks, not the cache's.
    packaged = Engine.load(flux_files["transformer"], clip_l=flux_files["clip_l"], t5=flux_files["t5"],
                           vae=flux_files["ae"], device="cpu", dtype="fp32",
                           optimize=SpeedOptions(aot=True, aot_build=False))
    with pytest.raises(InvalidParameter) as exc:
        packaged.generate(_img2img(picture, steps=2, first_block_cache=0.12))
    assert exc.value.field == "first_block_cache" and "aot" in str(exc.value)
    from underpaint.pipeline.first_block_cache import for_request

    with pytest.raises(InvalidParameter) as exc:  # a FLUX ControlNet's residuals join after every block
        for_request(flux_dev, 0.12, control=object())
    assert exc.value.field == "first_block_cache" and "ControlNet" in str(exc.value)
    assert for_request(flux_dev, 0.0, control=object()) is None


def test_low_vram_mode_gives_the_same_picture_and_skipped_blocks_stay_home(one_thread, flux_files, picture):  # noqa: F811
    from underpaint.pipeline.engine import Engine

    files = dict(clip_l=flux_files["clip_l"], t5=flux_files["t5"], vae=flux_files["ae"], device="cpu", dtype="fp32")
    params = _img2img(picture, first_block_cache=0.8)
    high = Engine.load(flux_files["transformer"], **files).generate(params)
    low_engine = Engine.load(flux_files["transformer"], vram="low", **files)
    visits: list[str] = []
    low_engine.model.offload.observer = lambda event, part: visits.append(part) if event == "in" else None
    head, tail, hooks = _head_calls(low_engine.model)
    try:
        low = low_engine.generate(params)
    finally:
        for h in hooks:
            h.remove()
    assert np.array_equal(np.asarray(high.images[0]), np.asarray(low.images[0]))
    assert head[0] == 6 and tail[0] < 6
    assert visits.count("unet.transformer_blocks.0") == 6
    for block in ("transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1"):
        assert visits.count(f"unet.{block}") == tail[0], block


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), "0.1", True])
def test_bad_thresholds_name_the_field(value):
    with pytest.raises(InvalidParameter) as exc:
        GenerationParams(prompt="x", first_block_cache=value)
    assert exc.value.field == "first_block_cache"


# --- infotext, CLI, API ------------------------------------------------------------------------


def test_infotext_round_trip(one_thread, flux_dev, picture):  # noqa: F811
    from underpaint.imageio.infotext import parse_infotext
    from underpaint.pipeline.reproduce import params_from_infotext

    engine = _engine(flux_dev)
    params = _img2img(picture, steps=6, first_block_cache=0.8)
    result = engine.generate(params)
    fields = params_from_infotext(parse_infotext(result.infotexts[0]))
    assert fields["first_block_cache"] == 0.8
    again = engine.generate(params.replace(first_block_cache=0.0).replace(**{
        k: v for k, v in fields.items() if k in ("first_block_cache", "seed", "steps", "strength", "sampler")}))
    assert again.images[0].tobytes() == result.images[0].tobytes()
    plain = engine.generate(params.replace(first_block_cache=0.0))
    assert plain.images[0].tobytes() != result.images[0].tobytes()  # the cache did skip blocks
    assert "first_block_cache" not in params_from_infotext(parse_infotext("x\nSteps: 4, Seed: 1"))
    with pytest.raises(InvalidParameter) as exc:
        params_from_infotext(parse_infotext("x\nSteps: 4, Seed: 1, First block cache: lots"))
    assert exc.value.field == "First block cache"


def test_cli_flag(tmp_path):
    import argparse

    from underpaint.cli.generate import _add_generation_args, params_from_args

    parser = argparse.ArgumentParser()
    _add_generation_args(parser, img2img=False)
    assert params_from_args(parser.parse_args(["--first-block-cache", "0.12"])).first_block_cache == 0.12
    assert params_from_args(parser.parse_args([])).first_block_cache == 0.0
    infotext = tmp_path / "p.txt"
    infotext.write_text("a cat\nSteps: 4, Sampler: Euler, Seed: 1, First block cache: 0.2")
    assert params_from_args(parser.parse_args(["--from-infotext", str(infotext)])).first_block_cache == 0.2
    over = params_from_args(parser.parse_args(["--from-infotext", str(infotext), "--first-block-cache", "0.1"]))
    assert over.first_block_cache == 0.1
    off = params_from_args(parser.parse_args(["--from-infotext", str(infotext), "--first-block-cache", "0"]))
    assert off.first_block_cache == 0.0
    for value in ("-0.5", "2", "nan"):
        with pytest.raises(InvalidParameter) as exc:
            params_from_args(parser.parse_args(["--first-block-cache", value]))
        assert exc.value.field == "--first-block-cache"


def test_api_override_settings(tmp_path):
    from fastapi.testclient import TestClient

    from test_server_support import FakeBackend, make_models_dir
    from underpaint.server.app import create_app
    from underpaint.server.config import ServerConfig

    backend = FakeBackend()
    app = create_app(ServerConfig(models_dir=make_models_dir(tmp_path), preload=False), loader=backend)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        base = {"steps": 2, "width": 64, "height": 64}
        r = c.post("/sdapi/v1/txt2img", json={**base, "override_settings": {"first_block_cache_threshold": 0.12}})
        assert r.status_code == 200, r.text
        assert backend.params[-1].first_block_cache == 0.12
        assert "First block cache: 0.12" in r.json()["info"]
        r = c.post("/sdapi/v1/txt2img", json=base)
        assert r.status_code == 200 and backend.params[-1].first_block_cache == 0.0
        r = c.post("/sdapi/v1/txt2img", json={**base, "infotext": "x\nSteps: 2, Seed: 3, First block cache: 0.3"})
        assert r.status_code == 200, r.text
        assert backend.params[-1].first_block_cache == 0.3
        for value in ("x", -1, 1.5):
            r = c.post("/sdapi/v1/txt2img", json={**base, "override_settings": {"first_block_cache_threshold": value}})
            assert r.status_code == 422, r.text
            assert r.json()["field"] == "override_settings.first_block_cache_threshold"
