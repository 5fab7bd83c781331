"""A1111's "Negative Guidance minimum sigma" (NGMS) and "Ignore negative prompt during early sampling"
(Skip Early CFG): which model evaluations run the prompt alone, the pictures against a hand-written
diffusers loop that follows A1111's rule, and the wiring through infotext, CLI and the API."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flux_fixtures import flux_dev, flux_files  # noqa: F401 - fixtures
from underpaint.errors import InvalidParameter
from underpaint.params import GenerationParams
from underpaint.pipeline.guidance import UncondSkip, parts_alone

PROMPT, NEGATIVE, CFG, SEED = "a red house by the sea", "blurry, dark", 7.0, 1234


class UnetRows:
    """Records the batch of every UNet call."""

    def __init__(self, unet):
        self.rows: list[int] = []
        self.handle = unet.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        self.rows.append(sample.shape[0])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _run(engine, **fields):
    params = GenerationParams(**{"prompt": PROMPT, "negative_prompt": NEGATIVE, "cfg_scale": CFG, "seed": SEED,
                                 "rng": "cpu", "sampler": "Euler", "scheduler": "Automatic", "width": 64,
                                 "height": 64, **fields})
    with UnetRows(engine.model.unet) as rows:
        result = engine.generate(params)
    return result, rows.rows


# --- the rule ------------------------------------------------------------------------------------


def test_the_rules_as_a1111_states_them():
    sigma = lambda value: torch.tensor([value])  # noqa: E731
    ngms = UncondSkip(min_sigma=2.0, total=10)
    # Odd evaluations below the threshold only; at or above it, or on even ones, both halves run.
    assert [ngms.skips(i, sigma(1.0)) for i in range(4)] == [False, True, False, True]
    assert not ngms.skips(3, sigma(2.0)) and not ngms.skips(3, sigma(5.0))
    everyone = UncondSkip(min_sigma=2.0, all_steps=True, total=10)
    assert [everyone.skips(i, sigma(1.0)) for i in range(4)] == [True] * 4
    # Skip Early CFG: evaluation / total <= fraction, evaluation 0 included, whatever sigma.
    early = UncondSkip(early=0.25, total=10)
    assert [early.skips(i, sigma(14.0)) for i in range(5)] == [True, True, True, False, False]
    assert not UncondSkip(total=10).skips(1, sigma(0.1))


@pytest.mark.parametrize(("sampler", "steps", "total"), [("Euler", 20, 20), ("Heun", 10, 20), ("DPM++ 2M", 7, 7)])
def test_the_run_length_the_early_rule_divides_by(sampler, steps, total):
    """A1111 divides by the steps it launches the sampler with (txt2img: the steps; img2img and a
    hires. fix pass: t_enc + 1, the steps that run), doubled for samplers that evaluate twice a step."""
    p = GenerationParams(sampler=sampler, skip_early_cond=0.5)
    assert UncondSkip.of(p, steps=steps).total == total
    assert UncondSkip.of(GenerationParams(sampler=sampler), steps=steps) is None


def test_composable_parts_alone_combine_at_scale_one():
    """A1111 1.10 puts the first part's answer where the negative prompt's would be and combines at 1."""
    gen = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, 4, 3, 3, generator=gen), torch.tensor([0.5, 0.5])
    factors = torch.tensor([1.0, 2.0, 0.5])  # one per part
    calls = []

    def toy(x_in, sigma_in, parts):
        calls.append(x_in.shape[0])
        return x_in * factors.repeat_interleave(2)[:, None, None, None] + sigma_in[:, None, None, None]

    weights = (1.0, 0.5, -0.25)
    out = parts_alone(toy, None, weights, x, sigma)
    answers = [x * f + 0.5 for f in factors]
    expected = answers[0] + sum((a - answers[0]) * w for a, w in zip(answers, weights))
    torch.testing.assert_close(out, expected)
    assert calls == [6]


# --- pictures ------------------------------------------------------------------------------------


def _reference_euler(engine, *, steps: int, min_sigma: float, early: float) -> np.ndarray:
    """txt2img with Euler written from diffusers' parts (its EulerDiscreteScheduler, the UNet, the VAE),
    skipping the negative prompt where A1111's CFG denoiser does: evaluation i (0-based) at σᵢ runs
    the prompt alone when early is on and i / steps <= early, or when i is odd and σᵢ < min_sigma."""
    from diffusers import EulerDiscreteScheduler

    m = engine.model
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, timestep_spacing="linspace")
    scheduler.set_timesteps(steps)
    tokenizer, encoder = m.tokenizers[0], m.text_encoders[0]

    def embed(text):
        ids = tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return encoder(ids)[0]

    with torch.no_grad():
        cond, uncond = embed(PROMPT), embed(NEGATIVE)
        latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(SEED)) * scheduler.sigmas[0]
        for i, t in enumerate(scheduler.timesteps):
            sigma = float(scheduler.sigmas[i])
            x_in = scheduler.scale_model_input(latents, t)
            if (early and i / steps <= early) or (i % 2 and sigma < min_sigma):
                eps = m.unet(x_in, t, encoder_hidden_states=cond).sample
            else:
                both = m.unet(torch.cat([x_in, x_in]), t, encoder_hidden_states=torch.cat([cond, uncond])).sample
                eps = both[1:] + (both[:1] - both[1:]) * CFG
            latents = scheduler.step(eps, t, latents).prev_sample
        pixels = m.vae.decode(latents / m.spec.scaling_factor).sample
    pixels = ((pixels[0] / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8)  # A1111 truncates
    return pixels.permute(1, 2, 0).numpy().astype(np.int16)


@pytest.mark.parametrize(("min_sigma", "all_steps", "early", "rows"), [
    (0.0, False, 0.0, [2] * 10),
    # The Automatic (discrete) schedule at 10 steps: 14.6, 7.84, 4.61, 2.92, 1.95, ...: σ is below 2
    # from evaluation 4 on.
    (2.0, False, 0.0, [2, 2, 2, 2, 2, 1, 2, 1, 2, 1]),
    (2.0, True, 0.0, [2, 2, 2, 2, 1, 1, 1, 1, 1, 1]),
    (0.0, False, 0.3, [1, 1, 1, 1, 2, 2, 2, 2, 2, 2]),
    (2.0, False, 0.2, [1, 1, 1, 2, 2, 1, 2, 1, 2, 1]),
])
def test_txt2img_equals_a_diffusers_loop_with_a1111s_rule(sd1_engine, min_sigma, all_steps, early, rows):
    result, seen = _run(sd1_engine, steps=10, s_min_uncond=min_sigma, s_min_uncond_all=all_steps,
                        skip_early_cond=early)
    assert seen == rows
    if all_steps:
        return  # the reference follows the every-other rule; the rows above say which evaluations ran alone
    ours = np.asarray(result.images[0].convert("RGB"), dtype=np.int16)
    diff = np.abs(ours - _reference_euler(sd1_engine, steps=10, min_sigma=min_sigma, early=early))
    assert diff.max() <= 1, diff.max()


def test_img2img_counts_the_steps_that_run(sd1_engine, photo):
    """img2img at 10 steps and 0.5 runs t_enc + 1 = 6 steps, what A1111 launches the sampler with:
    the early rule at 0.5 skips evaluations 0 to 3 (3/6 = 0.5)."""
    _, seen = _run(sd1_engine, steps=10, strength=0.5, init_images=(photo.resize((64, 64)),), skip_early_cond=0.5)
    assert seen == [1, 1, 1, 1, 2, 2]


def test_everything_skipped_is_the_prompt_alone(sd1_engine):
    """Skipping at every evaluation gives what guidance at scale 1 gives (uncond + (cond − uncond)·1)."""
    skipped, seen = _run(sd1_engine, steps=4, skip_early_cond=1.0)
    scale_one, _ = _run(sd1_engine, steps=4, cfg_scale=1.0)
    assert seen == [1] * 4
    diff = np.abs(np.asarray(skipped.images[0], dtype=np.int16) - np.asarray(scale_one.images[0], dtype=np.int16))
    assert diff.max() <= 1


def test_hires_pass_counts_its_own_evaluations(sd1_engine):
    from underpaint.params import HiresOptions

    _, seen = _run(sd1_engine, steps=4, skip_early_cond=0.25, hires=HiresOptions(scale=1.5, steps=4, strength=0.5))
    # Each pass runs 4 steps (the hires pass exactly its steps, as A1111's) counted from 0: 0/4 and 1/4 skip.
    assert seen == [1, 1, 2, 2, 1, 1, 2, 2]


def test_flux_true_cfg_skips_too(flux_dev):
    from underpaint.pipeline.generate import generate
    from underpaint.pipeline.records import Cancellation, ModelInfo

    info = ModelInfo(name="tiny", path="tiny", family="flux", prediction="flow", short_hash=None, vae_name=None)

    def run(**fields):
        params = GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, steps=4, seed=7, sampler="Euler",
                                  scheduler="Simple", rng="cpu", width=64, height=64, **fields)
        with UnetRows(flux_dev.unet) as rows:
            result = generate(flux_dev, params, info=info, progress=None, cancel=Cancellation())
        return np.asarray(result.images[0], dtype=np.int16), rows.rows

    skipped, rows = run(cfg_scale=4.0, skip_early_cond=1.0)
    plain, plain_rows = run(cfg_scale=1.0)
    assert rows == plain_rows == [1] * 4
    assert np.array_equal(skipped, plain)  # the same calls: the prompt alone at every step
    _, rows = run(cfg_scale=4.0, skip_early_cond=0.25)
    assert rows == [1, 1, 2, 2]


# --- infotext, CLI, API --------------------------------------------------------------------------


def test_infotext_round_trip():
    from underpaint.imageio.infotext import parse_infotext
    from underpaint.pipeline.infotext import build_infotext
    from underpaint.pipeline.records import ModelInfo
    from underpaint.pipeline.reproduce import params_from_infotext

    info = ModelInfo(name="m", path="m.safetensors", family="sd1", prediction="eps", short_hash="0123456789")
    params = GenerationParams(prompt="p", seed=1, s_min_uncond=1.5, s_min_uncond_all=True, skip_early_cond=0.2)
    text = build_infotext(params, info, width=64, height=64, seed=1, subseed=1)
    assert "Skip Early CFG: 0.2, NGMS: 1.5, NGMS all steps: True," in text
    fields = params_from_infotext(parse_infotext(text))
    assert (fields["s_min_uncond"], fields["s_min_uncond_all"], fields["skip_early_cond"]) == (1.5, True, 0.2)
    assert build_infotext(GenerationParams(**{**fields, "seed": 1}), info, width=64, height=64, seed=1,
                          subseed=1) == text
    plain = build_infotext(GenerationParams(prompt="p"), info, width=64, height=64, seed=1, subseed=1)
    assert "NGMS" not in plain and "Skip Early" not in plain
    assert "s_min_uncond" not in params_from_infotext(parse_infotext(plain))


@pytest.mark.parametrize(("field", "value"), [("s_min_uncond", -1.0), ("s_min_uncond", float("nan")),
                                              ("skip_early_cond", 1.5), ("s_min_uncond_all", "yes")])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(InvalidParameter) as err:
        GenerationParams(**{field: value})
    assert err.value.field == field


def _cli_params(argv: list[str]) -> GenerationParams:
    from underpaint.cli.generate import params_from_args
    from underpaint.cli.main import build_parser

    return params_from_args(build_parser().parse_args(argv))


def test_cli_flags(tmp_path):
    p = _cli_params(["txt2img", "-p", "x"])
    assert (p.s_min_uncond, p.s_min_uncond_all, p.skip_early_cond) == (0, False, 0)
    p = _cli_params(["img2img", "in.png", "-p", "x", "--ngms", "1.5", "--ngms-all-steps", "--skip-early-cfg", "0.1"])
    assert (p.s_min_uncond, p.s_min_uncond_all, p.skip_early_cond) == (1.5, True, 0.1)
    (tmp_path / "p.txt").write_text("x\nSteps: 3, Sampler: Euler, Seed: 1, Size: 64x64, NGMS: 2, NGMS all steps: True")
    p = _cli_params(["txt2img", "--from-infotext", str(tmp_path / "p.txt")])
    assert (p.s_min_uncond, p.s_min_uncond_all) == (2.0, True)
    assert _cli_params(["txt2img", "--from-infotext", str(tmp_path / "p.txt"), "--ngms", "0"]).s_min_uncond == 0


def test_cli_refuses_by_flag(tmp_path):
    from cli_runner import run_cli

    done = run_cli("txt2img", "-p", "x", "--skip-early-cfg", "2", "--model", str(tmp_path / "none.safetensors"))
    assert done.returncode != 0 and "--skip-early-cfg" in done.stderr, done.stderr



def test_api_request_overrides_and_options(api):
    client, backend = api
    base = {"steps": 1, "width": 64, "height": 64}
    options = client.get("/sdapi/v1/options").json()
    assert (options["s_min_uncond"], options["s_min_uncond_all"], options["skip_early_cond"]) == (0, False, 0)
    assert client.post("/sdapi/v1/options", json={"s_min_uncond": 1.0, "skip_early_cond": 0.1}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["s_min_uncond"] == 1.0
    for extra in ({}, {"s_min_uncond": 3.0}, {"override_settings": {"s_min_uncond": 2.0, "s_min_uncond_all": True}},
                  {"s_min_uncond": 0, "override_settings": {"s_min_uncond": 2.0, "skip_early_cond": 0}}):
        r = client.post("/sdapi/v1/txt2img", json={**base, **extra})
        assert r.status_code == 200, r.text
    assert [(p.s_min_uncond, p.s_min_uncond_all, p.skip_early_cond) for p in backend.params] == [
        (1.0, False, 0.1), (3.0, False, 0.1), (2.0, True, 0.1), (0.0, False, 0.0)]


@pytest.mark.parametrize(("body", "field"), [
    ({"s_min_uncond": -0.5}, "s_min_uncond"),
    ({"override_settings": {"s_min_uncond": "low"}}, "override_settings.s_min_uncond"),
    ({"override_settings": {"skip_early_cond": 1.5}}, "override_settings.skip_early_cond"),
    ({"override_settings": {"s_min_uncond_all": "yes"}}, "override_settings.s_min_uncond_all"),
])
def test_api_bad_values_are_422_naming_the_field(api, body, field):
    client, backend = api
    r = client.post("/sdapi/v1/txt2img", json={"steps": 1, "width": 64, "height": 64, **body})
    assert r.status_code == 422 and r.json()["field"] == field, r.text
    r = client.post("/sdapi/v1/options", json={"skip_early_cond": -1})
    assert r.status_code == 422 and r.json()["field"] == "skip_early_cond"
    assert not backend.params


def test_api_infotext_field(api):
    client, backend = api
    text = "x\nSteps: 1, Sampler: Euler, Seed: 1, Size: 64x64, Skip Early CFG: 0.3, NGMS: 1.5, NGMS all steps: True"
    assert client.post("/sdapi/v1/txt2img", json={"infotext": text}).status_code == 200
    p = backend.params[0]
    assert (p.s_min_uncond, p.s_min_uncond_all, p.skip_early_cond) == (1.5, True, 0.3)
