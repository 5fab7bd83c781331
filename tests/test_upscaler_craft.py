"""CRAFT and SeemoRe upscalers, checked against spandrel 0.4.2 (what ComfyUI and Forge load these files with).

The reference networks are spandrel's own classes, tiny (widths 12-48, one or two groups, one to three
experts; SeemoRe's Large frame of sixteen groups at width 48 with a single narrow expert), every parameter
moved off its initial value by random noise, saved as files (CRAFT's window buffers included) and read by our
loader. The variants are the ones spandrel's loader tells apart: scales 1-4; for CRAFT the window (the
released 4x16, and 2x8, 4x4, 1x2), the conv after the body, the biases of ``qkv``, the MLP width, the groups'
depths and heads; for SeemoRe the number of experts and the growth of their widths (linear, double, exp), the
global stage's kernel, and the Large frame (no channel shuffle, one calibration step). Pictures that meet
spandrel's size requirements (multiples of 16 for CRAFT, at least 16 pixels a side for SeemoRe) go to its
network as they are; other sizes, down to a single pixel, through the padding its model descriptor adds,
which is what ComfyUI and Forge run.
"""

from __future__ import annotations

import pytest
import test_upscaler_models
import torch
from test_upscaler_models import _forward, _image, _loads_like_spandrel, _randomised, _without, assert_refused, \
    like_spandrels_call as _like_spandrels_call, close_to_spandrel as _close

from underpaint.errors import ModelError
from underpaint.models.upscaler import detect_upscaler, upscale_image, upscaler_from_state_dict
from underpaint.models.upscaler_craft import (ARCH_CRAFT, ARCH_SEEMORE, CRAFT, SeemoRe, craft_plan,
                                              craft_window_buffers, seemore_plan)

#: spandrel's model loader: the module-scoped fixture of test_upscaler_models (it skips where spandrel is absent).
spandrel_loader = test_upscaler_models.spandrel_loader


def _reference(name: str, kwargs: dict) -> torch.nn.Module:
    """spandrel's CRAFT or SeemoRe class (spandrel must already be imported: see ``spandrel_loader``)."""
    if name == "CRAFT":
        from spandrel.architectures.CRAFT import CRAFT as Reference
    else:
        from spandrel.architectures.SeemoRe import SeemoRe as Reference
    return Reference(**kwargs)


#: name → (spandrel class, its arguments, input size (w, h), expected arch, scale)
CASES = {
    # the released frame's window (4x16) and MLP ratio, two groups of different depths and heads
    "craft-4x": ("CRAFT", dict(upscale=4, embed_dim=32, depths=[1, 2], num_heads=[2, 4], split_size_0=4,
                               split_size_1=16), (16, 32), ARCH_CRAFT, 4),
    "craft-2x-window2x8-no-conv-after-body": ("CRAFT", dict(upscale=2, embed_dim=32, depths=[2], num_heads=[4],
                                                            split_size_0=2, split_size_1=8, mlp_ratio=1.5,
                                                            resi_connection="identity"), (32, 16), ARCH_CRAFT, 2),
    "craft-3x-window4x4-no-qkv-bias": ("CRAFT", dict(upscale=3, embed_dim=32, depths=[1], num_heads=[2],
                                                     split_size_0=4, split_size_1=4, qkv_bias=False),
                                       (16, 16), ARCH_CRAFT, 3),
    # width 16: the original's position-bias MLPs are zero wide (their last bias is the whole bias)
    "craft-1x-window1x2-width16": ("CRAFT", dict(upscale=1, embed_dim=16, depths=[1], num_heads=[2],
                                                 split_size_0=1, split_size_1=2, mlp_ratio=3.0),
                                   (16, 16), ARCH_CRAFT, 1),
    "seemore-4x-exp": ("SeemoRe", dict(scale=4, embedding_dim=12, num_layers=2, num_experts=3, lr_space="exp",
                                       global_kernel_size=5), (17, 19), ARCH_SEEMORE, 4),
    "seemore-2x-double": ("SeemoRe", dict(scale=2, embedding_dim=16, num_layers=1, num_experts=3,
                                          lr_space="double", global_kernel_size=11), (20, 16), ARCH_SEEMORE, 2),
    "seemore-3x-linear": ("SeemoRe", dict(scale=3, embedding_dim=8, num_layers=1, num_experts=4,
                                          global_kernel_size=3), (16, 18), ARCH_SEEMORE, 3),
    "seemore-1x-one-expert": ("SeemoRe", dict(scale=1, embedding_dim=12, num_layers=2, num_experts=1,
                                              global_kernel_size=7), (18, 17), ARCH_SEEMORE, 1),
    # the Large frame (16 groups of width 48): no channel shuffle, one calibration step
    "seemore-large-2x": ("SeemoRe", dict(scale=2, embedding_dim=48, num_layers=16, num_experts=1, use_shuffle=False,
                                         recursive=1, global_kernel_size=3), (16, 16), ARCH_SEEMORE, 2),
}


def _tensors(case: str) -> dict[str, torch.Tensor]:
    name, kwargs, _, _, _ = CASES[case]
    return _randomised(_reference(name, kwargs), seed=len(case))


@pytest.mark.parametrize("case", list(CASES))
def test_craft_and_seemore_load_like_spandrel(case, tmp_path, spandrel_loader):
    name, _, size, arch, scale = CASES[case]
    tensors = _tensors(case)
    if name == "CRAFT":
        assert all(n in tensors for n in ("relative_position_index_h", "biases_v"))
    _loads_like_spandrel(tmp_path, case, tensors, spandrel_loader, name, arch, scale, size)


@pytest.mark.parametrize("case,sizes", [
    ("craft-4x", [(5, 3), (1, 1), (17, 33)]),
    ("craft-2x-window2x8-no-conv-after-body", [(16, 16), (9, 20)]),
    ("seemore-4x-exp", [(5, 3), (1, 1), (33, 7)]),
    ("seemore-large-2x", [(15, 2)]),
])
def test_other_sizes_are_padded_as_spandrel_pads_them(case, sizes, spandrel_loader):
    """spandrel pads CRAFT's pictures to a multiple of 16 and SeemoRe's to at least 16 pixels a side
    (reflection, then the edge repeated), and CRAFT's network appends another 16 pixels of mirror image even to
    multiples of 16; our modules take any size and give what spandrel's call gives."""
    tensors = _tensors(case)
    descriptor = spandrel_loader.load_from_state_dict(tensors)
    model = upscaler_from_state_dict(tensors)
    for w, h in sizes:
        x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(w * 100 + h))
        got = _forward(model.module, x)
        assert got.shape == (1, 3, h * model.scale, w * model.scale)
        _close(got, _like_spandrels_call(descriptor, x))
    assert upscale_image(model, _image(3, 2), tile=0).size == (3 * model.scale, 2 * model.scale)


def test_batches_are_each_picture_on_its_own(spandrel_loader):
    """A batch gives what each picture gives alone (spandrel's call takes one picture): SeemoRe routes each
    picture of a batch to its own expert."""
    tensors = _tensors("seemore-3x-linear")
    descriptor = spandrel_loader.load_from_state_dict(tensors)
    model = upscaler_from_state_dict(tensors)
    x = torch.rand(2, 3, 16, 17, generator=torch.Generator().manual_seed(7))
    got = _forward(model.module, x)
    for i in range(2):
        _close(got[i:i + 1], _like_spandrels_call(descriptor, x[i:i + 1]))
    # the router on its own: opposite channel means choose different experts
    moe = model.module.body[0].local_block.block.moe_layer
    with torch.no_grad():
        moe.gate.body[2].weight.copy_(torch.tensor([[4.0] * 8, [-4.0] * 8, [0.0] * 8, [0.0] * 8]))
        features = torch.rand(2, 8, 4, 5, generator=torch.Generator().manual_seed(8)) - 0.5
        features[0] += 1
        features[1] -= 1
        k = torch.rand(2, 8, 4, 5, generator=torch.Generator().manual_seed(9))
        both = moe(features, k)
        chosen = moe.gate(features).argmax(dim=1).tolist()
        assert chosen == [0, 1]
        for i in range(2):
            torch.testing.assert_close(both[i:i + 1], moe(features[i:i + 1], k[i:i + 1]), atol=1e-6, rtol=1e-6)


def test_describe_and_detection(spandrel_loader):
    """The plans' descriptions name the hyper-parameters read; detection does not claim other networks."""
    from test_upscaler_models import _dat_file, _hat, _swinir_file

    from underpaint.models.upscaler_light import OmniSR, SAFMN

    craft = _tensors("craft-2x-window2x8-no-conv-after-body")
    assert craft_plan(craft, "a").describe == ("CRAFT 2x (embed 32, depths [2], heads [4], window 2x8, MLP 48, "
                                               "no conv after body)")
    seemore = _tensors("seemore-4x-exp")
    assert seemore_plan(seemore, "a").describe == "SeemoRe 4x (dim 12, 2 groups, 3 experts (exp widths), kernel 5)"
    large = _tensors("seemore-large-2x")
    assert seemore_plan(large, "a").describe == ("SeemoRe 2x (dim 48, 16 groups, 1 expert (linear widths), kernel 3, "
                                                 "Large)")
    assert detect_upscaler(large) == (ARCH_SEEMORE, 2)
    others = [_swinir_file(), _hat(), _dat_file(), test_upscaler_models.compact(2),
              dict(OmniSR(dim=8, groups=1, blocks=1, window=4, pe=True, bias=True, scale=2).state_dict()),
              dict(SAFMN(dim=8, blocks=1, hidden=16, scale=2).state_dict())]
    for sd in [*others, seemore]:
        assert craft_plan(sd, "x.pth") is None
    for sd in [*others, craft]:
        assert seemore_plan(sd, "x.pth") is None


# --------------------------------------------------------------------------------------------- damaged files


def _craft(split: tuple[int, int] = (2, 4), **kwargs) -> dict[str, torch.Tensor]:
    """Our own CRAFT's tensors and the saved window buffers (no spandrel needed): width 32, 2 groups of 1, 2x."""
    args = dict(dim=32, depths=[1, 1], heads=[2, 2], split=split, hidden=64, qkv_bias=True, conv_after_body=True,
                scale=2)
    return {**CRAFT(**{**args, **kwargs}).state_dict(), **craft_window_buffers(split)}


def _seemore(**kwargs) -> dict[str, torch.Tensor]:
    """Our own SeemoRe's tensors: width 8, 2 groups, experts 2 and 3 wide, kernel 3, 4x."""
    args = dict(dim=8, groups=2, widths=[2, 3], kernel=3, shuffle=True, recursive=2, scale=4)
    return dict(SeemoRe(**{**args, **kwargs}).state_dict())


def _renamed(sd: dict, old: str, new: str) -> dict:
    assert any(k.startswith(old) for k in sd)
    return {(new + k[len(old):] if k.startswith(old) else k): v for k, v in sd.items()}


_SRWA = "layers.0.residual_group.srwa_blocks."
_EXPERTS = "body.0.local_block.block.moe_layer.experts."


@pytest.mark.parametrize("make,named", [
    (lambda: _without(_craft(), "layers.1.residual_group.hf_blocks.0.ffn.project_in.weight"),
     "missing layers.1.residual_group.hf_blocks.0.ffn.project_in.weight"),
    (lambda: _without(_craft(), _SRWA + "1.attns.1.pos.pos3.2.bias"), "missing " + _SRWA + "1.attns.1.pos.pos3.2.bias"),
    (lambda: _without(_craft(), "relative_position_index_h"), "CRAFT model without a 2-D 'relative_position_index_h'"),
    (lambda: _without(_craft(), "upsample.0.weight"), "CRAFT model without a 4-D 'upsample.0.weight'"),
    (lambda: _without(_craft(), "layers.0.residual_group.hf_blocks.0.attn.temperature"),
     "without a 3-D 'layers.0.residual_group.hf_blocks.0.attn.temperature'"),
    # a window trained the other way round (8x4): its buffers are not those of the 4x8 its sizes give
    (lambda: {**_craft(split=(4, 8)), **craft_window_buffers((8, 4))},
     "relative_position_index_h is not that of a 4x8 window"),
    (lambda: {**_craft(), "biases_h": craft_window_buffers((2, 4))["biases_h"] + 1}, "biases_h is not that of a 2x4"),
    (lambda: {**_craft(), "biases_v": torch.zeros(20, 2)}, "window buffers of 8 positions and 20 offsets"),
    (lambda: {**_craft(), **craft_window_buffers((3, 4))}, "windows of 3x4; expected sides dividing the 16"),
    (lambda: {**_craft(), "conv_first.weight": torch.zeros(32, 4, 3, 3)}, "4-channel input"),
    (lambda: {**_craft(), "upsample.0.weight": torch.zeros(20, 32, 3, 3)}, "upsample.0 gives 20 channels"),
    (lambda: {**_craft(), "upsample.0.weight": torch.zeros(4, 32, 3, 3)}, "4-channel output"),
    (lambda: {**_craft(), "conv_first.weight": torch.zeros(33, 3, 3, 3)}, "width 33 with heads [2, 2]"),
    (lambda: {**_craft(), "layers.1.residual_group.hf_blocks.0.attn.temperature": torch.zeros(3, 1, 1)},
     "width 32 with heads [2, 3]"),
    (lambda: _renamed(_craft(), "layers.1.", "layers.2."), "groups (layers.N) numbered [0, 2]"),
    (lambda: _renamed(_craft(), _SRWA + "1.", _SRWA + "2."), "unexpected " + _SRWA + "2."),
    (lambda: {**_craft(), _SRWA + "0.attns.0.pos.pos_proj.weight": torch.zeros(2, 2)},
     "pos.pos_proj.weight is (2, 2)"),
    (lambda: {**_craft(), "layers.0.conv.weight": torch.zeros(32, 32, 1, 1)}, "layers.0.conv.weight is (32, 32, 1, 1)"),
    (lambda: _without(_seemore(), _EXPERTS + "1.conv_3.bias"), "missing " + _EXPERTS + "1.conv_3.bias"),
    (lambda: _without(_seemore(), "body.1.global_block.ffn.gate.weight"),
     "missing body.1.global_block.ffn.gate.weight"),
    (lambda: _without(_seemore(), "conv_1.weight"), "SeemoRe model without a 4-D 'conv_1.weight'"),
    (lambda: {**_seemore(), _EXPERTS + "1.conv_1.weight": torch.zeros(5, 8, 1, 1)}, "experts of widths [2, 5]"),
    (lambda: _renamed(_seemore(), _EXPERTS + "1.", _EXPERTS + "2."),
     "experts (" + _EXPERTS[:-1] + ".N) numbered [0, 2]"),
    (lambda: {**_seemore(), "body.0.global_block.block.attn.conv.0.weight": torch.zeros(8, 1, 1, 4)},
     "4-wide striped conv"),
    (lambda: {**_seemore(), "conv_1.weight": torch.zeros(8, 1, 3, 3)}, "1-channel input"),
    (lambda: {**_seemore(), "upsampler.0.weight": torch.zeros(7, 8, 3, 3)}, "upsampler.0 gives 7 channels"),
    (lambda: _renamed(_seemore(), "body.1.", "body.3."), "groups (body.N) numbered [0, 3]"),
    (lambda: {**_seemore(), "body.1.local_block.norm_1.weight": torch.zeros(9)}, "norm_1.weight is (9,)"),
    (lambda: {**_seemore(), "body.0.extra.weight": torch.zeros(1)}, "unexpected body.0.extra.weight"),
])
def test_damaged_craft_and_seemore_files(tmp_path, make, named):
    assert_refused(tmp_path / "4x-broken.safetensors", make(), named)


def test_complete_files_load_and_refusals_name_the_network_read():
    """The files the damaged ones were made from load; a file that does not fit is refused with the
    architecture and the sizes read from it."""
    assert detect_upscaler(_craft(), source="c.pth") == (ARCH_CRAFT, 2)
    assert detect_upscaler(_seemore(), source="s.pth") == (ARCH_SEEMORE, 4)
    model = upscaler_from_state_dict(_craft())
    assert upscale_image(model, _image(5, 3), tile=0).size == (10, 6)
    with pytest.raises(ModelError, match=r"^x\.pth: .*CRAFT 2x \(embed 32, depths \[1, 1\], heads \[2, 2\], "
                                         r"window 2x4, MLP 64\).*missing norm\.body\.bias"):
        upscaler_from_state_dict(_without(_craft(), "norm.body.bias"), source="x.pth")
    with pytest.raises(ModelError, match=r"^y\.pth: .*SeemoRe 4x \(dim 8, 2 groups, 2 experts \(linear widths\), "
                                         r"kernel 3\).*missing conv_2\.bias"):
        upscaler_from_state_dict(_without(_seemore(), "conv_2.bias"), source="y.pth")
