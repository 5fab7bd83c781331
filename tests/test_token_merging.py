"""Token merging (ToMe for SD, models/tome.py) against the ``tomesd`` library as A1111 calls it
(``apply_patch(unet, ratio, use_rand=False, merge_attn=True, merge_crossattn=False,
merge_mlp=False)`` on a copy of the same diffusers UNet), and its wiring: requests, hires. fix,
infotext, CLI flags and the A1111 API's settings with their img2img precedence."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

tomesd = pytest.importorskip("tomesd")

from underpaint.errors import InvalidParameter  # noqa: E402
from underpaint.models import tome  # noqa: E402
from underpaint.models.tome import match_tokens, merge_tokens, token_merging, unmerge_tokens  # noqa: E402
from underpaint.params import GenerationParams, HiresOptions  # noqa: E402

RATIOS = (0.3, 0.5, 0.9)


def _tomesd(unet: torch.nn.Module, ratio: float) -> torch.nn.Module:
    """A copy of ``unet`` patched as A1111 patches its model."""
    patched = copy.deepcopy(unet)
    tomesd.apply_patch(patched, ratio=ratio, use_rand=False, merge_attn=True, merge_crossattn=False, merge_mlp=False)
    return patched


def _inputs(unet, batch: int, height: int, width: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, unet.config.in_channels, height, width, generator=gen)
    t = torch.full((batch,), 500.0)
    ctx = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=gen)
    return x, t, ctx


def _run(unet, x, t, ctx, **extra) -> torch.Tensor:
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ctx, **extra).sample


def _hook_count(module: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


# --- merge / unmerge against the library's own matching ------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(8, 12), (7, 9), (6, 5)])
@pytest.mark.parametrize("ratio", RATIOS)
def test_merge_and_unmerge_equal_tomesd_matching(height, width, ratio):
    """Same dst cells (top-left of every 2×2 square, none in a last odd row or column), same
    matches, the same merged tokens and the same values back in every position as tomesd's
    bipartite matching. (The merged sequence's order may differ: tomesd orders its cells with an
    unstable sort. Self-attention does not depend on the order.)"""
    from tomesd.merge import bipartite_soft_matching_random2d

    gen = torch.Generator().manual_seed(height * 100 + width)
    x = torch.randn(3, height * width, 16, generator=gen)
    m_ref, u_ref = bipartite_soft_matching_random2d(x, width, height, 2, 2, int(height * width * ratio), no_rand=True)
    match = match_tokens(x, height, width, ratio)
    merged, merged_ref = merge_tokens(x, match), m_ref(x)
    assert merged.shape == merged_ref.shape and merged.shape[1] == match.merged_tokens < height * width

    def by_first_channel(t: torch.Tensor) -> torch.Tensor:
        return t.gather(1, t[..., :1].argsort(dim=1).expand_as(t))

    torch.testing.assert_close(by_first_channel(merged), by_first_channel(merged_ref), rtol=1e-6, atol=1e-6)
    mix = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh())  # stands in for attention, token-wise
    with torch.no_grad():
        torch.testing.assert_close(unmerge_tokens(mix(merged), match), u_ref(mix(merged_ref)), rtol=1e-6, atol=1e-6)


def test_ratio_zero_and_tiny_grids_merge_nothing():
    x = torch.randn(1, 16, 8)
    assert match_tokens(x, 4, 4, 0.0) is None
    assert match_tokens(x, 4, 4, 0.05) is None  # int(16 · 0.05) = 0 tokens
    assert match_tokens(torch.randn(1, 3, 8), 1, 3, 0.9) is None  # no whole 2×2 square: no dst cell


# --- the UNet against tomesd ---------------------------------------------------------------------


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize(("height", "width"), [(16, 24), (13, 18)])
def test_unet_equals_tomesd(sd1_engine, ratio, height, width):
    unet = sd1_engine.model.unet
    x, t, ctx = _inputs(unet, 2, height, width)
    plain = _run(unet, x, t, ctx)
    with token_merging(unet, ratio) as blocks:
        ours = _run(unet, x, t, ctx)
    assert blocks == len(tome.transformer_blocks(unet)) > 0
    theirs = _run(_tomesd(unet, ratio), x, t, ctx)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-2  # merging changes the output: the comparison means something


def test_ratio_zero_is_bit_identical_and_touches_nothing(sd1_engine):
    unet = sd1_engine.model.unet
    x, t, ctx = _inputs(unet, 2, 16, 16)
    plain = _run(unet, x, t, ctx)
    hooks = _hook_count(unet)
    with token_merging(unet, 0.0) as blocks:
        assert blocks == 0 and _hook_count(unet) == hooks
        assert torch.equal(_run(unet, x, t, ctx), plain)


def test_leaving_restores_the_model_exactly(sd1_engine):
    unet = sd1_engine.model.unet
    x, t, ctx = _inputs(unet, 2, 16, 16, seed=3)
    before = _run(unet, x, t, ctx)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    hooks, classes = _hook_count(unet), [type(m) for m in unet.modules()]
    with token_merging(unet, 0.5):
        assert _hook_count(unet) > hooks
        _run(unet, x, t, ctx)
    with pytest.raises(RuntimeError, match="stop"), token_merging(unet, 0.9):
        _run(unet, x, t, ctx)
        raise RuntimeError("stop")
    assert _hook_count(unet) == hooks and [type(m) for m in unet.modules()] == classes
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())
    assert torch.equal(_run(unet, x, t, ctx), before)


def test_sdxl_changes_nothing_at_full_resolution_only(sdxl_file):
    """SDXL's full-resolution level has no attention: nothing merges, as with tomesd's defaults."""
    from underpaint.pipeline.engine import Engine

    unet = Engine.load(sdxl_file, device="cpu", dtype="fp32").model.unet
    assert unet.config.down_block_types[0] == "DownBlock2D"
    x, t, ctx = _inputs(unet, 2, 16, 16)
    extra = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 16), "time_ids": torch.randn(2, 6)}}
    plain = _run(unet, x, t, ctx, **extra)
    with token_merging(unet, 0.9) as blocks:
        merged = _run(unet, x, t, ctx, **extra)
    assert blocks > 0 and torch.equal(merged, plain)
    torch.testing.assert_close(_run(_tomesd(unet, 0.9), x, t, ctx, **extra), plain, rtol=0, atol=0)
    with token_merging(unet, 0.9, max_downsample=2):  # the next level down does merge
        assert not torch.equal(_run(unet, x, t, ctx, **extra), plain)


def test_compiled_unet_runs_uncompiled_while_merging(sd1_file):
    """torch.compile does not notice hooks added to a compiled model: the compiled forward is set
    aside while merging, then put back (unmerged calls still run the compiled code)."""
    from underpaint.pipeline.engine import Engine

    unet = Engine.load(sd1_file, device="cpu", dtype="fp32").model.unet
    x, t, ctx = _inputs(unet, 2, 16, 16, seed=5)
    plain = _run(unet, x, t, ctx)
    with token_merging(unet, 0.5):
        merged = _run(unet, x, t, ctx)
    unet.forward = torch.compile(unet.forward, backend="eager")
    compiled = unet.__dict__["forward"]
    assert torch.equal(_run(unet, x, t, ctx), plain)
    with token_merging(unet, 0.5):
        assert "forward" not in unet.__dict__
        assert torch.equal(_run(unet, x, t, ctx), merged)
    assert unet.__dict__["forward"] is compiled
    assert torch.equal(_run(unet, x, t, ctx), plain)


def test_ratio_is_checked():
    with pytest.raises(InvalidParameter, match="token_merging_ratio"):
        with token_merging(torch.nn.Linear(1, 1), 0.95):
            pass
    for bad in (-0.1, 0.91, float("nan"), True, "0.5"):
        with pytest.raises(InvalidParameter) as err:
            GenerationParams(token_merging_ratio=bad)
        assert err.value.field == "token_merging_ratio"
    with pytest.raises(InvalidParameter) as err:
        HiresOptions(token_merging_ratio=1.0)
    assert err.value.field == "hires_token_merging_ratio"


# --- whole requests ------------------------------------------------------------------------------


def _diffusers_img2img(engine, unet, image, *, prompt, negative, steps, strength, cfg, seed):
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline

    from underpaint.imageio.convert import images_to_tensor

    m = engine.model
    with torch.no_grad():
        init = m.vae.encode(images_to_tensor([image])).latent_dist.mean * m.spec.scaling_factor
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, timestep_spacing="linspace")
    pipe = StableDiffusionImg2ImgPipeline(
        vae=m.vae, text_encoder=m.text_encoders[0], tokenizer=m.tokenizers[0], unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=prompt, negative_prompt=negative, image=init, strength=strength, num_inference_steps=steps,
               guidance_scale=cfg, generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
    return (np.clip(out, 0, 1) * 255).astype(np.uint8).astype(np.int16)  # A1111's truncation


def test_img2img_equals_diffusers_pipeline_patched_with_tomesd(sd1_engine, photo):
    """The engine's img2img at ratio 0.5 equals diffusers' img2img pipeline on a tomesd-patched copy
    of the UNet (the matched setup of test_engine_img2img: Euler, strength (t_enc + 1)/N)."""
    image = photo.resize((64, 48))
    steps, strength, seed = 4, 0.75, 1234
    request = dict(prompt="a red house by the sea", negative_prompt="blurry", init_images=(image,), strength=strength,
                   steps=steps, cfg_scale=7.0, sampler="Euler", scheduler="Automatic", seed=seed, rng="cpu")
    merged = sd1_engine.generate(GenerationParams(**request, token_merging_ratio=0.5))
    plain = sd1_engine.generate(GenerationParams(**request))
    t_enc = int(min(strength, 0.999) * steps)
    ref = _diffusers_img2img(sd1_engine, _tomesd(sd1_engine.model.unet, 0.5), image, prompt=request["prompt"],
                             negative=request["negative_prompt"], steps=steps, strength=(t_enc + 1) / steps, cfg=7.0,
                             seed=seed)
    ours = np.asarray(merged.images[0], dtype=np.int16)
    diff = np.abs(ours - ref)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, diff.max()
    assert np.abs(ours - np.asarray(plain.images[0], dtype=np.int16)).max() > 1  # merging made a difference
    assert "Token merging ratio: 0.5," in merged.infotexts[0] and "Token merging" not in plain.infotexts[0]
    zero = sd1_engine.generate(GenerationParams(**request, token_merging_ratio=0.0))
    assert zero.images[0].tobytes() == plain.images[0].tobytes() and zero.infotexts == plain.infotexts


def test_hires_pass_merges_at_its_own_ratio(sd1_engine, monkeypatch):
    from underpaint.pipeline import generate as generate_mod

    seen: list[float] = []
    real = generate_mod.request_token_merging

    def spy(model, ratio):
        seen.append(ratio)
        return real(model, ratio)

    monkeypatch.setattr(generate_mod, "request_token_merging", spy)
    base = dict(prompt="a hill", steps=2, sampler="Euler", seed=3, width=64, height=64)
    hires = HiresOptions(scale=1.5, steps=1, strength=0.5)
    result = sd1_engine.generate(GenerationParams(**base, token_merging_ratio=0.3, hires=hires))
    assert seen == [0.3, 0.3]
    assert "Token merging ratio: 0.3, Token merging ratio hr: 0.3," in result.infotexts[0]
    seen.clear()
    result = sd1_engine.generate(GenerationParams(**base, hires=HiresOptions(scale=1.5, steps=1, strength=0.5,
                                                                             token_merging_ratio=0.6)))
    assert seen == [0.0, 0.6]
    assert "Token merging ratio hr: 0.6" in result.infotexts[0] and "Token merging ratio:" not in result.infotexts[0]


def test_flux_ignores_the_ratio(monkeypatch):
    from underpaint.pipeline import generate as generate_mod

    params = GenerationParams(token_merging_ratio=0.5, hires=HiresOptions(token_merging_ratio=0.4))
    stripped = generate_mod._without_token_merging(params)
    assert stripped.token_merging_ratio == 0 and stripped.hires.token_merging_ratio == 0
    monkeypatch.setattr("underpaint.pipeline.flux.is_flux", lambda model: True)
    with tome.request_token_merging(object(), 0.5) as blocks:  # no UNet is looked for
        assert blocks == 0


# --- infotext ------------------------------------------------------------------------------------


def test_infotext_round_trip():
    from underpaint.imageio.infotext import parse_infotext
    from underpaint.pipeline.infotext import build_infotext
    from underpaint.pipeline.records import ModelInfo
    from underpaint.pipeline.reproduce import params_from_infotext

    info = ModelInfo(name="m", path="m.safetensors", family="sd1", prediction="eps", short_hash="0123456789")
    params = GenerationParams(prompt="p", seed=1, token_merging_ratio=0.4, clip_skip=2,
                              hires=HiresOptions(scale=2, token_merging_ratio=0.2))
    text = build_infotext(params, info, width=64, height=64, seed=1, subseed=1)
    assert "Clip skip: 2, Token merging ratio: 0.4, Token merging ratio hr: 0.2," in text
    fields = params_from_infotext(parse_infotext(text))
    assert fields["token_merging_ratio"] == 0.4 and fields["hires"].token_merging_ratio == 0.2
    again = GenerationParams(**{**fields, "seed": 1})
    assert build_infotext(again, info, width=64, height=64, seed=1, subseed=1) == text
    plain = build_infotext(GenerationParams(prompt="p"), info, width=64, height=64, seed=1, subseed=1)
    assert "token_merging_ratio" not in params_from_infotext(parse_infotext(plain))


# --- CLI -----------------------------------------------------------------------------------------


def _cli_params(argv: list[str]) -> GenerationParams:
    from underpaint.cli.generate import params_from_args
    from underpaint.cli.main import build_parser

    return params_from_args(build_parser().parse_args(argv))


def test_cli_flags(tmp_path):
    assert _cli_params(["txt2img", "-p", "x"]).token_merging_ratio == 0
    p = _cli_params(["txt2img", "-p", "x", "--token-merging", "0.5", "--hires-token-merging", "0.3"])
    assert p.token_merging_ratio == 0.5 and p.hires is not None and p.hires.token_merging_ratio == 0.3
    with pytest.raises(InvalidParameter) as err:
        _cli_params(["txt2img", "-p", "x", "--token-merging", "0.95"])
    assert err.value.field == "token_merging_ratio"
    # --from-infotext brings the ratio; the flag wins over it.
    (tmp_path / "p.txt").write_text("x\nSteps: 3, Sampler: Euler, Seed: 1, Size: 64x64, Token merging ratio: 0.4")
    assert _cli_params(["txt2img", "--from-infotext", str(tmp_path / "p.txt")]).token_merging_ratio == 0.4
    assert _cli_params(["txt2img", "--from-infotext", str(tmp_path / "p.txt"),
                        "--token-merging", "0"]).token_merging_ratio == 0


def test_cli_help_documents_the_flags(capsys):
    from underpaint.cli.main import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["txt2img", "--help"])
    out = capsys.readouterr().out
    assert "--token-merging RATIO" in out and "--hires-token-merging RATIO" in out


# --- A1111 API -----------------------------------------------------------------------------------



def _img2img(client, photo, **extra):
    from test_server_support import png_b64

    return client.post("/sdapi/v1/img2img", json={"init_images": [png_b64(photo)], "steps": 1, "width": 64,
                                                  "height": 64, **extra})


def test_api_options_round_trip(api):
    client, _ = api
    options = client.get("/sdapi/v1/options").json()
    assert [options[k] for k in ("token_merging_ratio", "token_merging_ratio_img2img", "token_merging_ratio_hr")] \
        == [0, 0, 0]
    options.update(token_merging_ratio=0.5, token_merging_ratio_img2img=0.3, token_merging_ratio_hr=0.2)
    assert client.post("/sdapi/v1/options", json=options).status_code == 200
    again = client.get("/sdapi/v1/options").json()
    assert [again[k] for k in ("token_merging_ratio", "token_merging_ratio_img2img", "token_merging_ratio_hr")] \
        == [0.5, 0.3, 0.2]


@pytest.mark.parametrize("key", ["token_merging_ratio", "token_merging_ratio_img2img", "token_merging_ratio_hr"])
@pytest.mark.parametrize("value", [0.95, -0.1, "half", True])
def test_api_bad_ratios_are_422_naming_the_setting(api, photo, key, value):
    client, backend = api
    r = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 3, key: value})
    assert r.status_code == 422 and r.json()["field"] == key, r.text
    assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1  # nothing changed
    r = _img2img(client, photo, override_settings={key: value})
    assert r.status_code == 422 and r.json()["field"] == f"override_settings.{key}", r.text
    assert not backend.params


@pytest.mark.parametrize(("options", "overrides", "txt2img", "img2img"), [
    ({}, {}, 0.0, 0.0),
    ({"token_merging_ratio": 0.5}, {}, 0.5, 0.5),
    ({"token_merging_ratio": 0.5, "token_merging_ratio_img2img": 0.3}, {}, 0.5, 0.3),
    ({"token_merging_ratio_img2img": 0.3}, {"token_merging_ratio": 0.6}, 0.6, 0.6),
    ({"token_merging_ratio": 0.5}, {"token_merging_ratio_img2img": 0.2}, 0.5, 0.2),
    # A1111 tests the override by its value: 0 lets the img2img setting apply.
    ({"token_merging_ratio": 0.5, "token_merging_ratio_img2img": 0.3}, {"token_merging_ratio": 0}, 0.0, 0.3),
    ({"token_merging_ratio": 0.5}, {"token_merging_ratio": 0}, 0.0, 0.0),
])
def test_api_ratio_precedence(api, photo, options, overrides, txt2img, img2img):
    client, backend = api
    if options:
        assert client.post("/sdapi/v1/options", json=options).status_code == 200
    r = client.post("/sdapi/v1/txt2img", json={"steps": 1, "width": 64, "height": 64, "override_settings": overrides})
    assert r.status_code == 200, r.text
    r = _img2img(client, photo, override_settings=overrides)
    assert r.status_code == 200, r.text
    assert [p.token_merging_ratio for p in backend.params] == [txt2img, img2img]


def test_api_hires_ratio(api):
    client, backend = api
    hires = {"steps": 1, "width": 64, "height": 64, "enable_hr": True, "hr_scale": 1.5}
    client.post("/sdapi/v1/options", json={"token_merging_ratio": 0.5, "token_merging_ratio_hr": 0.2})
    assert client.post("/sdapi/v1/txt2img", json=hires).status_code == 200
    assert client.post("/sdapi/v1/txt2img", json={
        **hires, "override_settings": {"token_merging_ratio_hr": 0.7}}).status_code == 200
    assert [(p.token_merging_ratio, p.hires_token_merging_ratio) for p in backend.params] == [(0.5, 0.2), (0.5, 0.7)]


def test_api_infotext_field_sets_the_ratios(api):
    client, backend = api
    text = "x\nSteps: 1, Sampler: Euler, Seed: 1, Size: 64x64, Denoising strength: 0.5, Token merging ratio: 0.4, " \
           "Token merging ratio hr: 0.3, Hires upscale: 1.5"
    r = client.post("/sdapi/v1/txt2img", json={"infotext": text})
    assert r.status_code == 200, r.text
    p = backend.params[0]
    assert (p.token_merging_ratio, p.hires.token_merging_ratio) == (0.4, 0.3)
    r = client.post("/sdapi/v1/txt2img", json={"infotext": text, "override_settings": {"token_merging_ratio": 0.1}})
    assert backend.params[1].token_merging_ratio == 0.1  # the request's own setting wins over the text

