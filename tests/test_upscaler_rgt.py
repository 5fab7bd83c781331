"""RGT upscalers (RGT and RGT-S, Chen et al. 2024), checked against spandrel 0.4.2 (what ComfyUI and Forge
load these files with).

The reference networks are spandrel's own RGT class, tiny (width 32, one to three groups of one to three
blocks), every parameter moved off its initial value by random noise, saved as files (the shifted blocks'
attention masks included) and read by our loader. The variants are the ones spandrel's loader tells
apart: scales 1, 2, 3, 4 and 8; 1conv and 3conv residual convs; the released frames (RGT: eight groups,
RGT-S: six; here three and two), the heads, the window, the feed-forward width, ``c_ratio`` and the
biases. Pictures of at least 16 pixels a side go to
spandrel's network as they are (not multiples of the window, so the attention's own padding runs);
smaller ones through the padding spandrel's model descriptor adds (its ``size_requirements``), which is
what ComfyUI and Forge run. Windows spandrel's loader cannot read from a file are checked against its
class built with the same arguments.
"""

from __future__ import annotations

import math

import pytest
import test_upscaler_models
import torch
from test_upscaler_models import _forward, _loads_like_spandrel, _randomised, _without, assert_refused

from underpaint.models.upscaler import detect_upscaler, load_upscaler, upscaler_from_state_dict
from underpaint.models.upscaler_rgt import ARCH_RGT, RGT, recursions, rgt_plan

#: spandrel's model loader: the module-scoped fixture of test_upscaler_models (it skips where spandrel is absent).
spandrel_loader = test_upscaler_models.spandrel_loader


def rgt_reference(**kwargs) -> torch.nn.Module:
    """spandrel's RGT class (spandrel must already be imported: see ``spandrel_loader``)."""
    from spandrel.architectures.RGT import RGT as Reference

    return Reference(**kwargs)


#: name → (spandrel RGT arguments, input size (w, h)); the scale is the arguments' ``upscale``
CASES = {
    # RGT's frame in small (1conv, 8x32-like rectangular windows, feed-forward twice the width, c_ratio 0.5):
    # three groups, so both group parities' shifted blocks run (block 2 in even groups, block 0 in odd ones)
    "rgt-4x": (dict(upscale=4, embed_dim=32, depth=[3, 1, 2], num_heads=[2, 2, 4], split_size=[2, 8],
                    mlp_ratio=2.0), (21, 18)),
    # RGT-S's: fewer groups, here with 3conv residual convs and square windows
    "rgt-s-2x-3conv": (dict(upscale=2, embed_dim=32, depth=[2, 2], num_heads=[4, 2], split_size=[4, 4],
                            mlp_ratio=2.0, resi_connection="3conv"), (17, 20)),
    "3x-c_ratio-0.25-no-bias": (dict(upscale=3, embed_dim=32, depth=[2], num_heads=[2], split_size=[4, 8],
                                     mlp_ratio=1.5, c_ratio=0.25, qkv_bias=False), (19, 16)),
    "1x-window8": (dict(upscale=1, embed_dim=32, depth=[2, 1], num_heads=[2, 2], split_size=[8, 8]), (16, 23)),
    "8x-c_ratio-1": (dict(upscale=8, embed_dim=32, depth=[2], num_heads=[2], split_size=[2, 2], c_ratio=1.0,
                          mlp_ratio=1.0), (16, 17)),
}


def _tensors(case: str) -> dict[str, torch.Tensor]:
    kwargs, _ = CASES[case]
    return _randomised(rgt_reference(**kwargs), seed=len(case))


@pytest.mark.parametrize("case", list(CASES))
def test_rgt_loads_like_spandrel(case, tmp_path, spandrel_loader):
    kwargs, size = CASES[case]
    scale, depths = kwargs["upscale"], kwargs["depth"]
    tensors = _tensors(case)
    # shifted blocks (block 2 of even groups, 0 of odd ones) save their masks
    assert any(n.endswith(".attn_mask_0") for n in tensors) == any(g % 2 or d > 2 for g, d in enumerate(depths))
    x, expected, atol = _loads_like_spandrel(tmp_path, case, tensors, spandrel_loader, "RGT", ARCH_RGT, scale, size)
    # the window's saved buffers are derived: a file keeping only the first branch's offsets is the same model
    bare = {k: v for k, v in tensors.items()
            if not k.endswith(("attn_mask_0", "attn_mask_1", "rpe_biases", "relative_position_index"))
            or k == "layers.0.blocks.0.attn.attns.0.rpe_biases"}
    torch.testing.assert_close(_forward(upscaler_from_state_dict(bare).module, x), expected, atol=atol, rtol=1e-5)


def test_small_pictures_are_padded_as_spandrel_pads_them(tmp_path, spandrel_loader):
    """Pictures with a side under 16 pixels (the original's summary of them would be empty), down to a
    single pixel, and a batch of two: our module equals spandrel's model descriptor, which pads the picture
    (reflection, then the edge repeated), runs the network and crops the result."""
    from spandrel.__helpers.size_req import pad_tensor

    path = tmp_path / "4x-RGT.pth"
    torch.save(_tensors("rgt-4x"), path)
    reference = spandrel_loader.load_from_file(str(path))
    model = load_upscaler(path)
    for batch, (w, h) in ((1, (15, 7)), (1, (1, 1)), (2, (40, 9)), (1, (3, 16))):
        x = torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(w * 100 + h))
        _, padded = pad_tensor(x, reference.size_requirements)
        expected = _forward(reference.model.eval(), padded)[..., : h * 4, : w * 4]
        assert expected.shape == (batch, 3, h * 4, w * 4)
        atol = 4e-6 * float(expected.abs().max())
        torch.testing.assert_close(_forward(model.module, x), expected, atol=atol, rtol=1e-5)


def test_wide_pictures_summarise_more_times(spandrel_loader):
    """From 1024 pixels a side the recursive attention applies its strided conv three times (a summary 64
    times smaller): as spandrel's network runs it; a short side that the summary would empty (the original
    fails there) is padded to 64 as the small pictures are, the same as spandrel given the padded picture."""
    from spandrel.__helpers.size_req import SizeRequirements, pad_tensor

    reference = rgt_reference(upscale=1, embed_dim=32, depth=[2], num_heads=[2], split_size=[2, 4], mlp_ratio=1.0)
    model = upscaler_from_state_dict(_randomised(reference, seed=7))
    assert recursions(64, 1030) == 3 and recursions(64, 1023) == 2
    for w, h in ((1030, 64), (1030, 20)):
        x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h))
        _, padded = pad_tensor(x, SizeRequirements(minimum=64))
        expected = _forward(reference, padded)[..., :h, :w]
        atol = 4e-6 * float(expected.abs().max())
        torch.testing.assert_close(_forward(model.module, x), expected, atol=atol, rtol=1e-5)


def test_recursions_follow_the_original_rule():
    """The original's float rule, max(int(log4(h // 16)), int(log4(w // 16)), 2), worked out on integers."""
    for side in list(range(16, 5000)) + [4 ** k * 16 + d for k in range(2, 9) for d in (-1, 0, 1)]:
        expected = max(int(math.log(side // 16, 4)), 2)
        assert recursions(side, 16) == recursions(16, side) == expected, side
    assert recursions(1, 1) == recursions(15, 3) == 2


@pytest.mark.parametrize("split,depth", [((4, 2), [3]), ((3, 6), [2])])
def test_windows_spandrel_does_not_read(split, depth, spandrel_loader):
    """The window is read from the first branch's offsets. spandrel's loader guesses it from the buffers'
    sizes, assuming the first side is the shorter and, when they differ, powers of two: a 4x2 window it reads
    as 2x4, a 3x6 one not at all. Checked against its class built with the window (which sizes the shifted
    blocks' saved masks for 64-pixel patches, so the 3x6 network has none)."""
    reference = rgt_reference(upscale=2, embed_dim=32, depth=depth, num_heads=[2], split_size=list(split))
    tensors = _randomised(reference, seed=sum(split))
    plan = rgt_plan(dict(tensors), "x")
    assert f"window {split[0]}x{split[1]}" in plan.describe
    model = upscaler_from_state_dict(tensors)
    x = torch.rand(1, 3, 19, 22, generator=torch.Generator().manual_seed(3))
    expected = _forward(reference, x)
    torch.testing.assert_close(_forward(model.module, x), expected, atol=4e-6 * float(expected.abs().max()),
                               rtol=1e-5)


def test_describe_and_detection(spandrel_loader):
    """The plan's description names what was read; detection claims neither DAT's files (the same frame)
    nor others."""
    from underpaint.models.upscaler_dat import DAT

    tensors = _tensors("rgt-s-2x-3conv")
    assert rgt_plan(dict(tensors), "a").describe == ("RGT 2x (dim 32, 2 groups, depths [2, 2], heads [4, 2], "
                                                     "window 4x4, c_ratio 0.5)")
    assert rgt_plan(dict(_tensors("3x-c_ratio-0.25-no-bias")), "a").describe.endswith("window 4x8, c_ratio 0.25)")
    dat = DAT(dim=16, depths=[2], spatial_heads=[1], channel_heads=[2], split=(2, 4), hidden=32, pos_width=2,
              upsampler="pixelshuffle", factors=[2], num_feat=8)
    assert rgt_plan(dict(dat.state_dict()), "a") is None
    assert rgt_plan({"conv_first.weight": torch.zeros(8, 3, 3, 3), "conv_last.weight": torch.zeros(3, 8, 3, 3)},
                    "a") is None


# --------------------------------------------------------------------------------------------- damaged files


def _rgt_file(**kwargs) -> dict[str, torch.Tensor]:
    """A complete RGT state dict without spandrel: our own module's tensors plus the first branch's saved
    offsets and position index (the released files keep every branch's)."""
    module = RGT(**{**dict(dim=16, depths=[2], heads=[1], split=(2, 4), hidden=32, pos_width=1, reduced=8,
                           factors=[2], num_feat=8), **kwargs})
    sd = dict(module.state_dict())
    branch = module.layers[0].blocks[0].attn.attns[0]
    sd["layers.0.blocks.0.attn.attns.0.rpe_biases"] = branch.offsets
    sd["layers.0.blocks.0.attn.attns.0.relative_position_index"] = branch.position_index
    return sd


_OFFSETS = "layers.0.blocks.0.attn.attns.0.rpe_biases"


@pytest.mark.parametrize("make,named", [
    (lambda: _without(_rgt_file(), _OFFSETS), f"RGT model without a 2-D '{_OFFSETS}'"),
    (lambda: {**_rgt_file(), _OFFSETS: torch.zeros(21, 2)}, "rpe_biases does not describe a window"),
    (lambda: {**_rgt_file(), _OFFSETS: torch.full((3, 2), 1e9)}, "rpe_biases does not describe a window"),
    (lambda: {**_rgt_file(), _OFFSETS: torch.zeros(21, 2, dtype=torch.int64)}, "expected (rows, 2)"),
    (lambda: {**_rgt_file(), "layers.0.blocks.0.attn.attns.0.relative_position_index": torch.zeros(16, 16)},
     "relative_position_index is (16, 16); expected (8, 8)"),
    (lambda: {**_rgt_file(), "layers.2.blocks.0.gamma": torch.zeros(16)}, "RGT groups numbered [0, 2]"),
    (lambda: _without(_rgt_file(), "conv_after_body.weight"), "RGT model without 'conv_after_body'"),
    (lambda: _without(_rgt_file(), "conv_before_upsample.0.weight"),
     "RGT model without a 4-D 'conv_before_upsample.0.weight'"),
    (lambda: _without(_rgt_file(), "layers.0.blocks.1.attn.cpe.weight"), "missing layers.0.blocks.1.attn.cpe.weight"),
    (lambda: {**_rgt_file(), "layers.0.blocks.0.gamma": torch.zeros(8)}, "layers.0.blocks.0.gamma is (8,)"),
    (lambda: {**_rgt_file(), "conv_first.weight": torch.zeros(16, 1, 3, 3)}, "only RGB models"),
    (lambda: {**_rgt_file(), "upsample.0.weight": torch.zeros(24, 8, 3, 3)}, "upsampling conv upsample.0 gives 24"),
    (lambda: {**_rgt_file(), "layers.0.blocks.1.attn.conv.weight": torch.zeros(7, 16, 1, 1)},
     "recursive attention 7 channels wide"),
    (lambda: {**_rgt_file(), "layers.0.blocks.0.mlp.fc1.weight": torch.zeros(33, 16)}, "feed-forward 33 channels"),
    (lambda: {**_rgt_file(), "layers.0.blocks.0.attn.attns.0.pos.pos3.2.weight": torch.zeros(3, 1)},
     "with [3] heads per window half"),
])
def test_incomplete_or_odd_rgt_files(tmp_path, make, named):
    assert_refused(tmp_path / "4xBroken-RGT.safetensors", make(), named)


def test_a_complete_rgt_file_loads():
    """The file :func:`_rgt_file` makes is whole (so each broken variant above is broken by one change)."""
    tensors = _rgt_file()
    assert detect_upscaler(tensors) == (ARCH_RGT, 2)
    model = upscaler_from_state_dict(tensors)
    assert _forward(model.module, torch.rand(1, 3, 7, 9)).shape == (1, 3, 14, 18)
