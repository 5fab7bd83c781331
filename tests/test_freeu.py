"""FreeU (ComfyUI's FreeU_V2, Forge's "FreeU Integrated"): the UNet's output against diffusers' own FreeU
code path (its up blocks' ``apply_freeu`` hook) carrying the V2 rule written here from the FreeU paper's
description, the engine's pictures, and the wiring through infotext, CLI and the API."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from underpaint.errors import InvalidParameter
from underpaint.params import FreeUOptions, GenerationParams

BASE = dict(prompt="a lighthouse on a cliff", negative_prompt="blurry", seed=31, rng="cpu", steps=4,
            sampler="Euler", width=64, height=64)
PAPER = FreeUOptions(b1=1.3, b2=1.4, s1=0.9, s2=0.2)  # the FreeU authors' values for SD and SDXL


def sd15_shaped_unet() -> torch.nn.Module:
    """A small UNet with SD 1.5's block layout (channels 1:2:4:4 of the first, attention in the first
    three levels), so that FreeU's 4× and 2× channel counts both occur."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64, 128, 128), layers_per_block=2, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=16, attention_head_dim=8).eval()


def v2_rule(options: FreeUOptions, base: int, seen: list[int]):
    """FreeU V2 where the decoder's features have 4× (b1, s1) or 2× (b2, s2) the first block's channels:
    the first half of the backbone channels times 1 + (b - 1)·(channel mean, min-max scaled per image),
    the skip features through diffusers' Fourier filter (low frequencies times s)."""
    from diffusers.utils.torch_utils import fourier_filter

    def apply(resolution_idx, h, hsp, **_):
        seen.append(h.shape[1])
        factors = {4 * base: (options.b1, options.s1), 2 * base: (options.b2, options.s2)}.get(h.shape[1])
        if factors is None:
            return h, hsp
        b, s = factors
        mean = h.mean(1, keepdim=True)
        lo = mean.amin(dim=(2, 3), keepdim=True)
        hi = mean.amax(dim=(2, 3), keepdim=True)
        h = h.clone()
        half = h.shape[1] // 2
        h[:, :half] = h[:, :half] * ((b - 1) * (mean - lo) / (hi - lo) + 1)
        return h, fourier_filter(hsp, threshold=1, scale=s)

    return apply


def test_the_unet_matches_diffusers_freeu_path_with_the_v2_rule(monkeypatch):
    import diffusers.models.unets.unet_2d_blocks as up_blocks

    from underpaint.models.freeu import freeu

    unet = sd15_shaped_unet()
    gen = torch.Generator().manual_seed(1)
    x, t, text = torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([500.0, 500.0]), torch.randn(2, 7, 16, generator=gen)
    with torch.no_grad():
        plain = unet(x, t, text).sample
        with freeu(unet, PAPER) as hooked:
            ours = unet(x, t, text).sample
        after = unet(x, t, text).sample
        seen: list[int] = []
        monkeypatch.setattr(up_blocks, "apply_freeu", v2_rule(PAPER, 32, seen))
        unet.enable_freeu(s1=PAPER.s1, s2=PAPER.s2, b1=PAPER.b1, b2=PAPER.b2)  # turns the hook's branch on
        reference = unet(x, t, text).sample
    assert hooked == 12
    # SD 1.5's layout: 1280 channels in the first two up blocks and the first resnet of the third (by count,
    # not by block position, as the FreeU authors and ComfyUI match them), 640 in the next three.
    assert seen == [128] * 7 + [64] * 3 + [32] * 2
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-2
    assert torch.equal(after, plain)  # the hooks are gone


def test_ones_change_nothing_and_compiled_code_is_set_aside(sd1_engine):
    """b = s = 1 is the plain picture (to rounding of the Fourier round trip); other factors are another
    picture; compiled code set aside for the run is back after, not run meanwhile."""
    m = sd1_engine.model
    plain = np.asarray(sd1_engine.generate(GenerationParams(**BASE)).images[0], dtype=np.int16)
    calls = []

    def compiled_stand_in(*args, **kwargs):
        calls.append(1)
        return type(m.unet).forward(m.unet, *args, **kwargs)

    m.unet.forward = compiled_stand_in
    try:
        ones = sd1_engine.generate(GenerationParams(**BASE, freeu=FreeUOptions(1, 1, 1, 1))).images[0]
        assert calls == [] and m.unet.__dict__["forward"] is compiled_stand_in
    finally:
        del m.unet.forward
    assert np.abs(np.asarray(ones, dtype=np.int16) - plain).max() <= 1
    strong = sd1_engine.generate(GenerationParams(**BASE, freeu=PAPER)).images[0]
    assert np.abs(np.asarray(strong, dtype=np.int16) - plain).max() > 10
    assert not any(block._forward_pre_hooks for block in m.unet.up_blocks)


def test_a_flat_feature_map_is_left_as_it_is():
    from underpaint.models.freeu import backbone_scale

    h = torch.ones(1, 4, 3, 3)
    assert torch.equal(backbone_scale(h, 1.5), h)


def test_bad_factors_and_flux_are_refused_naming_the_field():
    from underpaint.pipeline.generate import _check_flux_request

    with pytest.raises(InvalidParameter) as err:
        FreeUOptions(b1=11)
    assert err.value.field == "freeu_b1"
    with pytest.raises(InvalidParameter) as err:
        _check_flux_request(GenerationParams(prompt="x", sampler="Euler", freeu=FreeUOptions()))
    assert err.value.field == "freeu" and "FLUX" in str(err.value)


def test_infotext_round_trip(sd1_engine):
    from underpaint.imageio.infotext import parse_infotext
    from underpaint.pipeline.reproduce import params_from_infotext

    text = sd1_engine.generate(GenerationParams(**BASE, freeu=PAPER)).infotexts[0]
    assert "freeu_enabled: True, freeu_b1: 1.3, freeu_b2: 1.4, freeu_s1: 0.9, freeu_s2: 0.2" in text
    assert params_from_infotext(parse_infotext(text))["freeu"] == PAPER
    plain = parse_infotext("x\nSteps: 4, Sampler: Euler, Seed: 1, freeu_enabled: False, freeu_b1: 1.3")
    assert "freeu" not in params_from_infotext(plain)
    with pytest.raises(InvalidParameter) as err:
        params_from_infotext(parse_infotext("x\nSteps: 4, Sampler: Euler, Seed: 1, freeu_enabled: True, freeu_s1: a"))
    assert err.value.field == "freeu_s1"


def test_cli_flag(tmp_path):
    from cli_runner import run_cli

    from underpaint.cli.generate import params_from_args
    from underpaint.cli.main import build_parser

    def params(*argv):
        return params_from_args(build_parser().parse_args(list(argv)))

    assert params("txt2img", "-p", "x", "--freeu").freeu == FreeUOptions()
    assert params("txt2img", "-p", "x", "--freeu", "1.3,1.4,0.9,0.2").freeu == PAPER
    assert params("txt2img", "-p", "x").freeu is None
    shared = tmp_path / "shared.txt"
    shared.write_text("a wall\nSteps: 5, Sampler: Euler, Seed: 1, freeu_enabled: True, freeu_b1: 1.3, freeu_b2: 1.4, "
                      "freeu_s1: 0.9, freeu_s2: 0.2")
    assert params("txt2img", "--from-infotext", str(shared)).freeu == PAPER
    assert params("txt2img", "--from-infotext", str(shared), "--freeu", "off").freeu is None
    for bad in ("1,2,3", "1,2,3,30"):
        done = run_cli("txt2img", "-p", "x", "--freeu", bad, "--model", str(tmp_path / "none.safetensors"))
        assert done.returncode == 2 and "--freeu" in done.stderr, done.stderr



def test_api_script_listing_and_infotext(api):
    client, backend = api
    base = {"steps": 1, "width": 64, "height": 64}
    assert "freeu integrated" in client.get("/sdapi/v1/scripts").json()["txt2img"]
    info = {s["name"]: s for s in client.get("/sdapi/v1/script-info").json() if not s["is_img2img"]}
    assert [a["value"] for a in info["freeu integrated"]["args"]] == [False, 1.01, 1.02, 0.99, 0.95]
    bodies = [{**base, "alwayson_scripts": {"FreeU Integrated": {"args": [True, 1.3, 1.4, 0.9, 0.2]}}},
              {**base, "alwayson_scripts": {"FreeU Integrated": {"args": [True]}}},
              {**base, "alwayson_scripts": {"FreeU Integrated": {"args": [False, 1.3]}}},
              {"infotext": "x\nSteps: 1, Sampler: Euler, Seed: 1, Size: 64x64, freeu_enabled: True, freeu_b1: 1.3, "
                           "freeu_b2: 1.4, freeu_s1: 0.9, freeu_s2: 0.2"}]
    for body in bodies:
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
    assert [p.freeu for p in backend.params] == [PAPER, FreeUOptions(), None, PAPER]
    r = client.post("/sdapi/v1/txt2img", json={**base, "alwayson_scripts": {"FreeU Integrated": {"args": [True, 1, 1, 9, 99]}}})
    assert r.status_code == 422 and r.json()["field"] == "alwayson_scripts.FreeU Integrated.args[4]", r.text
    r = client.post("/sdapi/v1/txt2img", json={**base, "alwayson_scripts": {"FreeU Integrated": {"args": [True, "x"]}}})
    assert r.status_code == 422 and r.json()["field"] == "alwayson_scripts.FreeU Integrated.args[1]", r.text
