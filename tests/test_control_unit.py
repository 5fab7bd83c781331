"""ControlNet units: validation, control maps at the generation size, residuals, schedule, infotext."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_controlnet import write_controlnet
from underpaint.errors import InvalidParameter, UnknownName
from underpaint.models.controlnet import load_controlnet
from underpaint.pipeline.control import (BALANCED, CONTROL_MORE_IMPORTANT, PROMPT_MORE_IMPORTANT, ActiveUnit,
                                         ControlStack, ControlUnit, control_infotext, control_map, hint_tensor,
                                         layer_scales, unit_active, unit_infotext)


@pytest.fixture(scope="module")
def sd1_net(tmp_path_factory):
    path = write_controlnet(tmp_path_factory.mktemp("cn") / "control_tiny_sd1_canny.safetensors", "sd1")
    return load_controlnet(path)


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 5, 16, generator=g)
    hint = torch.rand(1, 3, 64, 64, generator=g)
    return x, t, ctx, hint


def _direct(net, x, t, ctx, hint, scale=1.0):
    with torch.no_grad():
        down, mid = net.module(x, t, encoder_hidden_states=ctx, controlnet_cond=hint.expand(x.shape[0], -1, -1, -1),
                               conditioning_scale=scale, return_dict=False)
    return list(down), mid


def _stack(net, hint, steps=10, **unit):
    return ControlStack([ActiveUnit(ControlUnit(**unit), net, hint)], steps)


def test_unit_defaults_and_names():
    u = ControlUnit(module="Canny", control_mode=2, resize_mode=0)
    assert (u.module, u.control_mode, u.resize_mode) == ("canny", CONTROL_MORE_IMPORTANT, "Just Resize")
    assert u.thresholds == (100, 200)
    assert ControlUnit(module="depth").module == "depth_midas"
    assert ControlUnit(control_mode="prompt").control_mode == PROMPT_MORE_IMPORTANT
    assert ControlUnit().resize_mode == "Crop and Resize"  # the extension's default


@pytest.mark.parametrize("fields", [dict(weight=2.5), dict(guidance_start=0.6, guidance_end=0.4),
                                    dict(control_mode="loud"), dict(resize_mode="squash"), dict(processor_res=10)])
def test_invalid_units_are_refused(fields):
    with pytest.raises(InvalidParameter):
        ControlUnit(**fields)


def test_unknown_module_suggests():
    with pytest.raises(UnknownName, match="canny"):
        ControlUnit(module="cany")


def test_balanced_residuals_are_diffusers_controlnet_times_weight(sd1_net, inputs):
    x, t, ctx, hint = inputs
    down, mid = _stack(sd1_net, hint, weight=0.7).residuals(x, t, ctx)
    ref_down, ref_mid = _direct(sd1_net, x, t, ctx, hint, scale=0.7)
    assert len(down) == len(ref_down)
    for a, b in zip(down, ref_down):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mid, ref_mid, rtol=1e-6, atol=1e-6)


def test_weight_zero_adds_nothing(sd1_net, inputs):
    x, t, ctx, hint = inputs
    assert _stack(sd1_net, hint, weight=0.0).residuals(x, t, ctx) == (None, None)


def test_prompt_more_important_decays_shallow_layers(sd1_net, inputs):
    x, t, ctx, hint = inputs
    down, mid = _stack(sd1_net, hint, weight=0.5, control_mode=PROMPT_MORE_IMPORTANT).residuals(x, t, ctx)
    ref_down, ref_mid = _direct(sd1_net, x, t, ctx, hint)
    n = len(ref_down) + 1
    for i, (a, b) in enumerate(zip([*down, mid], [*ref_down, ref_mid])):
        torch.testing.assert_close(a, b * 0.5 * 0.825 ** (12 - i), rtol=1e-5, atol=1e-7)
    assert n == 7  # tiny SD1: conv_in, 2 levels x 2 blocks, 1 downsampler, middle


def test_layer_scales_follow_the_extension():
    sd1 = layer_scales(1.0, 13, PROMPT_MORE_IMPORTANT)
    assert sd1[-1] == 1.0 and sd1[0] == pytest.approx(0.825 ** 12)
    sdxl = layer_scales(2.0, 10, CONTROL_MORE_IMPORTANT)  # SDXL: the first ten of SD1's thirteen factors
    assert sdxl == pytest.approx([2.0 * 0.825 ** (12 - i) for i in range(10)])
    assert layer_scales(0.3, 13, BALANCED) == [0.3] * 13


def test_hires_second_pass_refits_the_map_and_always_decays(sd1_net, inputs):
    """The extension's hires. fix pass: the preprocessed map fitted to the second pass's size, and
    the soft-injection scales even for Balanced (the negative prompt still free for "ControlNet")."""
    x, t, ctx, _ = inputs
    detected = np.zeros((32, 48, 3), dtype=np.uint8)
    detected[8:24, 20:28] = 255
    first = hint_tensor(control_map(ControlUnit(image=Image.fromarray(detected)), 64, 64), device="cpu",
                        dtype=torch.float32)
    units = [ActiveUnit(ControlUnit(weight=0.6), sd1_net, first, detected=detected),
             ActiveUnit(ControlUnit(weight=0.4, control_mode=CONTROL_MORE_IMPORTANT), sd1_net, first,
                        detected=detected)]
    second = ControlStack(units, 3).second_pass(96, 80, 5)
    assert (second.steps, second.high_res) == (5, True)
    refit = hint_tensor(control_map(ControlUnit(image=Image.fromarray(detected)), 96, 80), device="cpu",
                        dtype=torch.float32)
    assert second.units[0].hint.shape == (1, 3, 80, 96)
    torch.testing.assert_close(second.units[0].hint, refit)
    x2 = torch.randn(2, 4, 10, 12, generator=torch.Generator().manual_seed(3))
    down, mid = second.residuals(x2, t, ctx, cond_rows=torch.tensor([1.0, 0.0]))
    ref_down, ref_mid = _direct(sd1_net, x2, t, ctx, refit)
    for i, (a, b) in enumerate(zip([*down, mid], [*ref_down, ref_mid])):
        decay = 0.825 ** (12 - i)
        torch.testing.assert_close(a[0], b[0] * (0.6 + 0.4) * decay, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a[1], b[1] * 0.6 * decay, rtol=1e-5, atol=1e-6)


def test_controlnet_more_important_leaves_the_negative_prompt_free(sd1_net, inputs):
    x, t, ctx, hint = inputs
    stack = _stack(sd1_net, hint, control_mode=CONTROL_MORE_IMPORTANT)
    prompt, negative = object(), object()
    stack.set_conds(prompt, negative)
    rows = stack.prompt_rows(object(), 2)  # a joint [prompt; negative] call
    assert rows.tolist() == [1.0, 0.0]
    down, mid = stack.residuals(x, t, ctx, cond_rows=rows)
    soft_down, soft_mid = _stack(sd1_net, hint, control_mode=PROMPT_MORE_IMPORTANT).residuals(x, t, ctx)
    torch.testing.assert_close(mid[0], soft_mid[0])
    assert torch.count_nonzero(mid[1]) == 0 and all(torch.count_nonzero(d[1]) == 0 for d in down)
    assert stack.prompt_rows(negative, 3).tolist() == [0.0, 0.0, 0.0]
    assert stack.prompt_rows(prompt, 1).tolist() == [1.0]


def test_units_add_up(sd1_net, inputs):
    x, t, ctx, hint = inputs
    two = ControlStack([ActiveUnit(ControlUnit(weight=0.3), sd1_net, hint),
                        ActiveUnit(ControlUnit(weight=0.5), sd1_net, hint)], 10)
    down, mid = two.residuals(x, t, ctx)
    one_down, one_mid = _stack(sd1_net, hint, weight=0.8).residuals(x, t, ctx)
    torch.testing.assert_close(mid, one_mid, rtol=1e-5, atol=1e-6)


def test_guidance_window_uses_a1111_step_counter():
    """A1111 compares start/end with (last finished step) / steps: 0 during both step 0 and step 1."""
    unit = ControlUnit(guidance_start=0.2, guidance_end=0.5)
    steps = 10
    counter = [max(k - 1, 0) for k in range(steps)]  # what the callback has set when step k's model call runs
    on = [unit_active(unit, c, steps) for c in counter]
    assert on == [False, False, False, True, True, True, True, False, False, False]
    full = ControlUnit()
    assert all(unit_active(full, c, steps) for c in counter)


def test_stack_switches_on_and_off_with_the_step(sd1_net, inputs):
    x, t, ctx, hint = inputs
    stack = _stack(sd1_net, hint, steps=4, guidance_start=0.5)
    seen = []
    for finished in (0, 0, 1, 2):  # the step counter during steps 0..3
        stack.on_step(finished)
        seen.append(stack.residuals(x, t, ctx)[1] is not None)
    assert seen == [False, False, False, True]  # 1/4 < 0.5 <= 2/4


def test_control_map_is_fitted_to_the_generation_size(photo):
    pytest.importorskip("cv2")
    unit = ControlUnit(image=photo, module="canny")
    detected = control_map(unit, 64, 48)
    assert detected.shape == (48, 64, 3) and detected.dtype == np.uint8
    assert set(np.unique(detected)) <= {0, 255}
    filled = control_map(ControlUnit(image=photo, resize_mode="Resize and Fill"), 64, 64)
    assert filled.shape == (64, 64, 3)
    # Resize and fill pads top and bottom with the border's median colour.
    assert (filled[0] == filled[0, 0]).all()


def test_pixel_perfect_picks_the_output_resolution(photo):
    pytest.importorskip("cv2")
    from underpaint.preprocess.common import pixel_perfect_resolution

    assert pixel_perfect_resolution((64, 96), 192, 128, "Crop and Resize") == 128
    assert pixel_perfect_resolution((64, 96), 96, 96, "Resize and Fill") == 64
    assert pixel_perfect_resolution((64, 96), 96, 96, "Crop and Resize") == 96
    m = control_map(ControlUnit(image=photo, module="canny", pixel_perfect=True, processor_res=64), 192, 128)
    assert m.shape == (128, 192, 3)


def test_inpaint_hint_marks_the_hole():
    picture = Image.new("RGBA", (16, 16), (255, 0, 0, 255))
    picture.putpixel((3, 4), (0, 0, 0, 0))  # transparent = to repaint
    detected = control_map(ControlUnit(image=picture, module="inpaint"), 16, 16)
    assert detected.shape == (16, 16, 4) and detected[4, 3, 3] == 255
    hint = hint_tensor(detected, device="cpu", dtype=torch.float32)
    assert hint.shape == (1, 3, 16, 16)
    assert hint[0, :, 4, 3].tolist() == [-1.0, -1.0, -1.0] and hint[0, :, 0, 0].tolist() == [1.0, 0.0, 0.0]


def test_infotext_matches_the_extension_format():
    unit = ControlUnit(module="canny", weight=1.0)
    text = unit_infotext(unit, "control_v11p_sd15_canny [d14c016b]")
    assert text == ("Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1.0, Resize Mode: Crop and Resize, "
                    "Processor Res: 512, Threshold A: 100.0, Threshold B: 200.0, Guidance Start: 0.0, Guidance End: 1.0, "
                    "Pixel Perfect: False, Control Mode: Balanced, Hr Option: Both")
    entries = control_infotext([unit, ControlUnit(module="depth", guidance_end=0.5, control_mode=1)], ["a [1]", "b [2]"])
    assert [k for k, _ in entries] == ["ControlNet 0", "ControlNet 1"]
    # depth_midas has no threshold sliders: the extension's unit holds -1 there and leaves them out
    assert entries[1][1] == ("Module: depth_midas, Model: b [2], Weight: 1.0, Resize Mode: Crop and Resize, "
                             "Processor Res: 512, Guidance Start: 0.0, Guidance End: 0.5, Pixel Perfect: False, "
                             "Control Mode: My prompt is more important, Hr Option: Both")
    ready = unit_infotext(ControlUnit(module="none", weight=0.5), "c [3]")
    assert ready == ("Module: none, Model: c [3], Weight: 0.5, Resize Mode: Crop and Resize, Guidance Start: 0.0, "
                     "Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced, Hr Option: Both")


def test_sdxl_residuals_see_the_size_embedding(tmp_path):
    from tiny_controlnet import SDXL_TIME_IDS, SDXL_UNET

    net = load_controlnet(write_controlnet(tmp_path / "xl.safetensors", "sdxl"), time_embed_dim=SDXL_TIME_IDS)
    g = torch.Generator().manual_seed(1)
    pooled = SDXL_UNET.adm_in - 6 * SDXL_TIME_IDS
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([300.0, 300.0])
    ctx = torch.randn(2, 5, SDXL_UNET.context_dim, generator=g)
    hint = torch.rand(1, 3, 64, 64, generator=g)
    added = {"text_embeds": torch.randn(2, pooled, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    down, mid = _stack(net, hint, weight=0.9, control_mode=PROMPT_MORE_IMPORTANT).residuals(x, t, ctx, added)
    with torch.no_grad():
        ref_down, ref_mid = net.module(x, t, encoder_hidden_states=ctx, controlnet_cond=hint.expand(2, -1, -1, -1),
                                       added_cond_kwargs=added, return_dict=False)
    assert len(down) == 4  # conv_in, one block per level, one downsampler
    for i, (a, b) in enumerate(zip([*down, mid], [*ref_down, ref_mid])):
        torch.testing.assert_close(a, b * 0.9 * 0.825 ** (12 - i), rtol=1e-5, atol=1e-7)
    other = dict(added, time_ids=torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2))
    assert not torch.allclose(_stack(net, hint).residuals(x, t, ctx, other)[1], _stack(net, hint).residuals(x, t, ctx, added)[1])

