"""A1111's Refiner: the picture against diffusers' pipeline whose UNet and prompt embeddings are swapped for
the refiner's at A1111's switch, the switch rule itself, the refusals, the infotext both ways, and the
wiring through the CLI and the API."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from underpaint.errors import InvalidParameter
from underpaint.params import GenerationParams, HiresOptions, RefinerOptions

BASE = dict(prompt="a lighthouse on a cliff", negative_prompt="blurry", seed=1234, rng="cpu", steps=6,
            sampler="Euler", scheduler="Automatic", width=64, height=64)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A base engine and a second tiny SD 1.5 checkpoint (other weights) as its refiner."""
    from tiny_models import write_sd1

    from underpaint.pipeline.engine import Engine

    folder = tmp_path_factory.mktemp("refiner")
    base = write_sd1(folder / "base.safetensors", seed=1)
    refiner = write_sd1(folder / "refiner.safetensors", seed=2)
    return Engine.load(base, device="cpu", dtype="fp32"), refiner


def training_sigmas(model) -> torch.Tensor:
    ac = model.alphas_cumprod.double()
    return ((1 - ac) / ac) ** 0.5


def test_the_picture_is_diffusers_with_the_refiner_swapped_in_at_the_switch(pair):
    """Euler, 6 steps (linspace timesteps: A1111's Automatic for Euler): diffusers' StableDiffusionPipeline
    runs the base UNet until the next step's sigma is nearest a training level t with (999 − t)/1000 ≥ 0.5,
    then the refiner's UNet with the refiner's text encoder's prompt embeddings; the same picture, within one
    level, and not the picture without the refiner."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    engine, refiner_file = pair
    ours = engine.generate(GenerationParams(**BASE, refiner=RefinerOptions(str(refiner_file), 0.5))).images[0]
    base, refiner = engine.model, engine.refiner_model(str(refiner_file))

    def pipeline(m):
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           num_train_timesteps=1000, timestep_spacing="linspace")
        pipe = StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoders[0], tokenizer=m.tokenizers[0],
                                       unet=m.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    pipe, other = pipeline(base), pipeline(refiner)
    positive, negative = other.encode_prompt(BASE["prompt"], "cpu", 1, True, BASE["negative_prompt"])
    table = training_sigmas(base)
    switched = []

    def on_step_end(p, i, t, outputs):
        sigma = float(p.scheduler.sigmas[i + 1])
        ratio = (999 - int(torch.argmin((table - sigma).abs()))) / 1000
        if not switched and ratio >= 0.5 and i + 1 < len(p.scheduler.timesteps):
            switched.append(i + 1)
            p.unet = refiner.unet
            return {"prompt_embeds": torch.cat([negative, positive])}
        return {}

    try:
        ref = pipe(prompt=BASE["prompt"], negative_prompt=BASE["negative_prompt"], guidance_scale=7.0, height=64,
                   width=64, num_inference_steps=6, generator=torch.Generator().manual_seed(BASE["seed"]),
                   callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["prompt_embeds"],
                   output_type="np").images[0]
    finally:
        pipe.unet = base.unet
    assert switched and 0 < switched[0] < 6
    ref_u8 = (np.clip(ref, 0, 1) * 255).astype(np.uint8).astype(np.int16)  # A1111 truncates, as the engine
    diff = np.abs(np.asarray(ours, dtype=np.int16) - ref_u8)
    assert diff.max() <= 1, diff.max()
    plain = engine.generate(GenerationParams(**BASE)).images[0]
    assert np.abs(np.asarray(plain, dtype=np.int16) - np.asarray(ours, dtype=np.int16)).max() > 5


def test_the_switch_rule():
    from underpaint.pipeline.refiner import SwitchingDenoiser, completed_ratio, will_switch

    table = torch.linspace(0.03, 14.6, 1000, dtype=torch.float64)
    assert completed_ratio(14.6, table) == 0.0 and completed_ratio(0.03, table) == 0.999
    assert completed_ratio(float(table[199]) + 1e-4, table) == 0.8
    calls = []
    made = []

    def base(x, sigma):
        calls.append("base")
        return x

    def make():
        made.append(1)
        return lambda x, sigma: calls.append("refiner") or x

    d = SwitchingDenoiser(base, make, table, 0.8)
    for sigma in (14.6, 5.0, float(table[200]), float(table[199]), 0.5, 9.0):  # once switched, it stays
        d(torch.zeros(1), torch.tensor([sigma]))
    assert calls == ["base", "base", "base", "refiner", "refiner", "refiner"] and made == [1]
    assert will_switch(torch.tensor([14.6, 5.0, 0.0]), table, 0.7) is False  # 5.0 is 0.658 of the way
    assert will_switch(torch.tensor([14.6, 5.0, 1.0, 0.0]), table, 0.7) is True


def test_no_switch_no_refiner_keys_and_the_refiner_kept_only_while_used(pair):
    engine, refiner_file = pair
    never = engine.generate(GenerationParams(**BASE, refiner=RefinerOptions(str(refiner_file), 1.0)))
    kept = engine.refiner_model(str(refiner_file))
    assert engine.refiner_model(str(refiner_file)) is kept  # loaded once while requests name it
    plain = engine.generate(GenerationParams(**BASE))
    assert engine._refiner is None  # a request without it lets it go
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(never.images[0]))
    assert "Refiner" not in never.infotexts[0]


def test_refusals_name_the_field(pair, tmp_path):
    from tiny_models import write_sdxl

    engine, refiner_file = pair
    for fields, field in ((dict(hires=HiresOptions(scale=2, upscaler="Latent", steps=2, strength=0.5,
                                                   checkpoint=str(refiner_file))),
                           "hires_checkpoint"),
                          (dict(deepcache=__import__("underpaint.params", fromlist=["DeepCacheOptions"]).DeepCacheOptions(
                              interval=2)), "deepcache")):
        with pytest.raises(InvalidParameter) as err:
            engine.generate(GenerationParams(**BASE, refiner=RefinerOptions(str(refiner_file)), **fields))
        assert err.value.field == field
    xl = write_sdxl(tmp_path / "xl.safetensors")
    with pytest.raises(InvalidParameter) as err:
        engine.generate(GenerationParams(**BASE, refiner=RefinerOptions(str(xl))))
    assert err.value.field == "refiner_checkpoint" and "latent space" in str(err.value)
    for bad, field in ((dict(checkpoint=""), "refiner_checkpoint"), (dict(checkpoint="x", switch_at=1.5),
                                                                     "refiner_switch_at")):
        with pytest.raises(InvalidParameter) as err:
            RefinerOptions(**bad)
        assert err.value.field == field


def test_infotext_round_trip(pair):
    from underpaint.imageio.infotext import parse_infotext
    from underpaint.pipeline.reproduce import params_from_infotext, unavailable_features

    engine, refiner_file = pair
    text = engine.generate(GenerationParams(**BASE, refiner=RefinerOptions(str(refiner_file), 0.6))).infotexts[0]
    short = engine.refiner_model(str(refiner_file)).short_hash
    assert f"Refiner: refiner [{short}], Refiner switch at: 0.6, Version" in text
    parsed = parse_infotext(text)
    assert params_from_infotext(parsed)["refiner"] == RefinerOptions(f"refiner [{short}]", 0.6)
    assert unavailable_features(parsed) == []


def test_cli_flags_and_a_run(pair, tmp_path):
    from cli_runner import run_cli

    from underpaint.cli.generate import params_from_args
    from underpaint.cli.main import build_parser
    from underpaint.pipeline.reproduce import read_infotext

    engine, refiner_file = pair
    p = params_from_args(build_parser().parse_args(["txt2img", "-p", "x", "--refiner", "r", "--refiner-switch-at",
                                                    "0.6"]))
    assert p.refiner == RefinerOptions("r", 0.6)
    assert params_from_args(build_parser().parse_args(["txt2img", "-p", "x", "--refiner", "r"])).refiner.switch_at == 0.8
    out = tmp_path / "refined.png"
    done = run_cli("txt2img", "-p", "a lighthouse", "--model", str(engine.model.path), "--refiner", str(refiner_file),
                   "--refiner-switch-at", "0.5", "--steps", "4", "-W", "64", "-H", "64", "--device", "cpu",
                   "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert read_infotext(out).params["Refiner"].startswith("refiner [")
    done = run_cli("txt2img", "-p", "x", "--model", str(engine.model.path), "--refiner", "no-such-model",
                   "--steps", "2", "-W", "64", "-H", "64", "--device", "cpu", "-o", str(tmp_path / "no.png"))
    assert done.returncode != 0 and "no-such-model" in done.stderr
    assert not (tmp_path / "no.png").exists()



def test_api_fields(api):
    client, backend = api
    base = {"steps": 1, "width": 64, "height": 64}
    title = client.get("/sdapi/v1/sd-models").json()[0]["title"]
    for body in ({**base, "refiner_checkpoint": title, "refiner_switch_at": 0.7}, {**base, "refiner_checkpoint": title},
                 {**base, "refiner_checkpoint": "None", "refiner_switch_at": 0.5},
                 {"infotext": f"x\nSteps: 1, Sampler: Euler, Seed: 1, Size: 64x64, Refiner: {title}, "
                              "Refiner switch at: 0.65"}):
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
    got = [(p.refiner.switch_at, p.refiner.checkpoint.endswith(".safetensors")) if p.refiner else None
           for p in backend.params]
    assert got == [(0.7, True), (0.8, True), None, (0.65, True)]
    for body, field, status in (({**base, "refiner_checkpoint": "nope"}, "refiner_checkpoint", 404),
                                ({**base, "refiner_checkpoint": "/etc/passwd"}, "refiner_checkpoint", 404),
                                ({**base, "refiner_checkpoint": title, "refiner_switch_at": 2}, "refiner_switch_at", 422)):
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == status and r.json()["field"] == field, r.text


@pytest.mark.parametrize("which", ["second pass", "first pass", "both passes"])
def test_with_hires_fix_the_refiner_takes_part_in_the_passes_named(pair, which):
    """A1111's "Hires fix: which pass to enable refiner for" (default: second pass). In a pass the refiner
    takes part in, diffusers' pipeline of that pass swaps in the refiner's UNet and prompt embeddings at the
    step whose sigma passes Switch at (judged on that pass's noise levels); each pass starts on the base
    model. The same picture within one level; the infotext records the refiner, and "Hires refiner" where
    the setting is not the default."""
    from diffusers import StableDiffusionPipeline
    from test_hires_fix import BASE as HIRES_BASE
    from test_hires_fix import diffusers_latent_hires

    engine, refiner_file = pair
    base, refiner = engine.model, engine.refiner_model(str(refiner_file))
    result = engine.generate(GenerationParams(
        **{**HIRES_BASE, "steps": 4, "cfg_scale": 6.0, "sampler": "Euler", "scheduler": "Automatic"},
        hires=HiresOptions(scale=2, upscaler="Latent", steps=2, strength=0.5),
        refiner=RefinerOptions(str(refiner_file), 0.75, which)))
    encoder = StableDiffusionPipeline(vae=refiner.vae, text_encoder=refiner.text_encoders[0],
                                      tokenizer=refiner.tokenizers[0], unet=refiner.unet, scheduler=None,
                                      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    positive, negative = encoder.encode_prompt(HIRES_BASE["prompt"], "cpu", 1, True, HIRES_BASE["negative_prompt"])
    table = training_sigmas(base)
    switched = {}

    def switch_in(name):
        def on_step_end(p, i, t, outputs):
            steps = p.scheduler.sigmas
            index = p.scheduler.step_index  # the next step's sigma, as the scheduler stands after step i
            ratio = (999 - int(torch.argmin((table - float(steps[index])).abs()))) / 1000
            if name not in switched and ratio >= 0.75 and float(steps[index]) > 0:
                switched[name] = index
                p.unet = refiner.unet
                return {"prompt_embeds": torch.cat([negative, positive])}
            return {}
        return on_step_end

    hooks = {}
    if which != "second pass":
        hooks["on_first_pass_step"] = switch_in("first")
    if which != "first pass":
        hooks["on_second_pass_step"] = switch_in("second")
    ref_u8 = diffusers_latent_hires(base, base, 6.0, **hooks)  # swaps only its own pipelines
    assert set(switched) == {name.split("_")[1] for name in hooks}
    diff = np.abs(np.asarray(result.images[0], dtype=np.int16) - ref_u8)
    assert diff.max() <= 1, diff.max()
    # The first pass's refiner steps show through the second pass faintly: without them, about 10 % of
    # the values move by one level; rounding alone moves a few in ten thousand.
    assert (diff > 0).mean() < 0.01, (diff > 0).mean()
    assert "Refiner switch at: 0.75" in result.infotexts[0]
    assert ("Hires refiner: " + which in result.infotexts[0]) == (which != "second pass")


def test_python_api_takes_a1111s_names(pair):
    from underpaint.params import request_fields

    engine, refiner_file = pair
    fields = request_fields({"refiner_checkpoint": str(refiner_file), "refiner_switch_at": 0.4, "steps": 4})
    assert fields["refiner"] == RefinerOptions(str(refiner_file), 0.4)
    assert "refiner" not in request_fields({"refiner_checkpoint": "None"})
    with pytest.raises(InvalidParameter) as err:
        request_fields({"refiner_switch_at": 0.4})
    assert err.value.field == "refiner_switch_at"
    made = engine.txt2img(prompt="a lighthouse", steps=4, width=64, height=64, seed=2, refiner_checkpoint=str(refiner_file),
                          refiner_switch_at=0.5)
    assert "Refiner switch at: 0.5" in made.infotexts[0]


def test_which_hires_pass_through_the_cli_the_api_and_the_infotext(api, tmp_path):
    """A1111's "Hires fix: which pass to enable refiner for": --hires-refiner-pass, the hires_fix_refiner_pass
    setting (in /options and override_settings), and the infotext's "Hires refiner", each refused by name
    when it is not one of the three passes."""
    from underpaint.cli.generate import params_from_args
    from underpaint.cli.main import build_parser
    from underpaint.params import hires_refiner_pass
    from underpaint.pipeline.reproduce import params_from_infotext
    from underpaint.imageio.infotext import parse_infotext

    def cli(*flags):
        return params_from_args(build_parser().parse_args(["txt2img", "-p", "x", *flags]))

    assert cli("--refiner", "r").refiner.hires_pass == "second pass"
    assert cli("--refiner", "r", "--hires-refiner-pass", "both").refiner == RefinerOptions("r", 0.8, "both passes")
    with pytest.raises(InvalidParameter) as err:
        cli("--hires-refiner-pass", "first")
    assert err.value.field == "--hires-refiner-pass"
    assert [hires_refiner_pass(v) for v in ("First pass", "second", " BOTH passes ")] == [
        "first pass", "second pass", "both passes"]
    with pytest.raises(InvalidParameter) as err:
        RefinerOptions("r", 0.5, "third pass")
    assert err.value.field == "hires_fix_refiner_pass"
    fields = params_from_infotext(parse_infotext("x\nSteps: 4, Seed: 1, Refiner: r, Refiner switch at: 0.5, "
                                                 "Hires refiner: first pass"))
    assert fields["refiner"] == RefinerOptions("r", 0.5, "first pass")

    client, backend = api
    title = client.get("/sdapi/v1/sd-models").json()[0]["title"]
    assert client.get("/sdapi/v1/options").json()["hires_fix_refiner_pass"] == "second pass"
    base = {"steps": 1, "width": 64, "height": 64, "refiner_checkpoint": title}
    for body in (base, {**base, "override_settings": {"hires_fix_refiner_pass": "both passes"}},
                 {"infotext": f"x\nSteps: 1, Seed: 1, Size: 64x64, Refiner: {title}, Hires refiner: first pass"}):
        assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200
    assert client.post("/sdapi/v1/options", json={"hires_fix_refiner_pass": "first pass"}).status_code == 200
    assert client.post("/sdapi/v1/txt2img", json=base).status_code == 200
    assert [p.refiner.hires_pass for p in backend.params] == ["second pass", "both passes", "first pass", "first pass"]
    r = client.post("/sdapi/v1/txt2img", json={**base, "override_settings": {"hires_fix_refiner_pass": "all"}})
    assert r.status_code == 422 and r.json()["field"] == "override_settings.hires_fix_refiner_pass", r.text
    r = client.post("/sdapi/v1/options", json={"hires_fix_refiner_pass": 3})
    assert r.status_code == 422 and r.json()["field"] == "hires_fix_refiner_pass", r.text
