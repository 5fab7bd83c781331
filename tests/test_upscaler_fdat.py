"""FDAT and MoESR upscalers, checked against spandrel 0.4.2 (what ComfyUI and Forge load these files with).

The reference networks are spandrel's own classes, tiny (widths 8-28, one or two groups of one or two blocks or
block pairs), every parameter moved off its initial value by random noise, saved as files (the upsampler's
``MetaUpsample`` record and DySample's ``init_pos`` included) and read by our loader. The variants are the ones
spandrel's loader tells apart. FDAT: transpose+conv at 2x, 3x and 4x, pixelshuffle, nearest+conv, dysample with
and without its conv to the middle width, pa_up at 3x (and 4x), lda, pixelshuffledirect in the 2x
pixel-unshuffled model, the 1x unshuffled one, a 1x model's single conv; heads, window, block pairs, feed-forward
and channel-gate widths. MoESR: conv, pixelshuffledirect, pixelshuffle at 2x and 3x, nearest+conv, dysample;
groups, blocks and feed-forward widths. Files spandrel's loader misreads are checked against its class built
with their arguments. The pictures are not multiples of FDAT's windows (its attention pads itself) and have odd
sides (MoESR pads them to even ones); tiny ones are compared with spandrel's network given the picture as
spandrel's model descriptor pads it.
"""

from __future__ import annotations

import pytest
import test_upscaler_models
import torch
from safetensors.torch import save_file
from test_upscaler_models import _forward, _loads_like_spandrel, _randomised, _without, assert_refused, \
    close_to_spandrel as _close

from underpaint.errors import ModelError
from underpaint.models.upscaler import detect_upscaler, load_upscaler, upscaler_from_state_dict
from underpaint.models.upscaler_conv import MoSR
from underpaint.models.upscaler_dat import DAT
from underpaint.models.upscaler_fdat import (ARCH_FDAT, ARCH_MOESR, FDAT, UPSAMPLERS, MoESR, fdat_plan,
                                             moesr_plan)

#: spandrel's model loader: the module-scoped fixture of test_upscaler_models (it skips where spandrel is absent).
spandrel_loader = test_upscaler_models.spandrel_loader


def _reference(name: str, **kwargs) -> torch.nn.Module:
    """spandrel's FDAT or MoESR class (spandrel must already be imported: see ``spandrel_loader``)."""
    if name == "FDAT":
        from spandrel.architectures.FDAT import FDAT as Reference
    else:
        from spandrel.architectures.MoESR import MoESR as Reference
    return Reference(**kwargs)


@pytest.fixture
def unpinned(monkeypatch):
    """spandrel's FDAT DySample asks torch for a pinned tensor, which only an accelerator's runtime provides;
    without one the request is dropped (the tensor's values are the same)."""
    real = torch.tensor

    def tensor(*args, pin_memory=False, **kwargs):
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", tensor)


_SMALL = dict(embed_dim=16, num_groups=1, depth_per_group=1, num_heads=2, window_size=4)

#: name → (spandrel FDAT arguments, input size (w, h), scale)
FDAT_CASES = {
    "fdat-4x-transpose+conv-ffn1.5-aim4": (dict(_SMALL, num_groups=2, ffn_expansion_ratio=1.5, aim_reduction_ratio=4,
                                                scale=4), (19, 17), 4),
    "fdat-3x-transpose+conv-window8": (dict(_SMALL, num_heads=4, window_size=8, scale=3), (13, 10), 3),
    "fdat-2x-transpose+conv-2pairs": (dict(_SMALL, depth_per_group=2, scale=2), (11, 14), 2),
    "fdat-2x-pixelshuffle-mid8": (dict(_SMALL, upsampler_type="pixelshuffle", mid_dim=8, scale=2), (15, 9), 2),
    "fdat-4x-nearest+conv": (dict(_SMALL, upsampler_type="nearest+conv", scale=4), (9, 6), 4),
    "fdat-4x-dysample-mid12": (dict(_SMALL, upsampler_type="dysample", mid_dim=12, scale=4), (9, 11), 4),
    "fdat-2x-dysample": (dict(_SMALL, upsampler_type="dysample", mid_dim=16, scale=2), (13, 10), 2),
    "fdat-3x-pa_up-mid8": (dict(_SMALL, upsampler_type="pa_up", mid_dim=8, scale=3), (9, 7), 3),
    # at 1x every kind of upsampler is one conv
    "fdat-1x-pixelshuffle": (dict(_SMALL, num_heads=1, upsampler_type="pixelshuffle", scale=1), (12, 15), 1),
    "fdat-2x-unshuffle-pixelshuffledirect": (dict(_SMALL, unshuffle_mod=True, upsampler_type="pixelshuffledirect",
                                                  scale=2), (15, 13), 2),
    "fdat-1x-unshuffle": (dict(_SMALL, unshuffle_mod=True, scale=1), (18, 21), 1),
}

#: name → (spandrel MoESR arguments, input size (w, h), scale)
MOESR_CASES = {
    "moesr-4x-pixelshuffledirect": (dict(dim=16, n_blocks=2, n_block=1, scale=4), (11, 9), 4),
    "moesr-2x-pixelshuffle-mid8": (dict(dim=16, n_blocks=1, n_block=2, expansion_factor=1.5, expansion_msg=1.25,
                                        upsampler="pixelshuffle", upsample_dim=8, scale=2), (13, 10), 2),
    "moesr-3x-pixelshuffle": (dict(dim=8, n_blocks=1, n_block=1, upsampler="pixelshuffle", upsample_dim=8, scale=3),
                              (7, 9), 3),
    "moesr-3x-nearest+conv": (dict(dim=8, n_blocks=1, n_block=1, upsampler="nearest+conv", scale=3), (9, 7), 3),
    "moesr-4x-dysample": (dict(dim=16, n_blocks=1, n_block=1, upsampler="dysample", scale=4), (9, 11), 4),
    "moesr-1x-conv": (dict(dim=12, n_blocks=1, n_block=1, upsampler="conv", scale=4), (15, 12), 1),
}


def _tensors(case: str) -> dict[str, torch.Tensor]:
    if case in FDAT_CASES:
        return _randomised(_reference("FDAT", **FDAT_CASES[case][0]), seed=len(case))
    return _randomised(_reference("MoESR", **MOESR_CASES[case][0]), seed=len(case))


@pytest.mark.parametrize("case", list(FDAT_CASES))
def test_fdat_loads_like_spandrel(case, tmp_path, spandrel_loader, unpinned):
    _, size, scale = FDAT_CASES[case]
    tensors = _tensors(case)
    assert tensors["upsampler.MetaUpsample"].dtype == torch.uint8
    _loads_like_spandrel(tmp_path, case, tensors, spandrel_loader, "FDAT", ARCH_FDAT, scale, size)


@pytest.mark.parametrize("case", list(MOESR_CASES))
def test_moesr_loads_like_spandrel(case, tmp_path, spandrel_loader):
    _, size, scale = MOESR_CASES[case]
    _loads_like_spandrel(tmp_path, case, _tensors(case), spandrel_loader, "MoESR", ARCH_MOESR, scale, size)


@pytest.mark.parametrize("case,scale,mid", [("fdat-2x-lda", 2, 16), ("fdat-4x-lda-mid24", 4, 24)])
def test_fdat_lda_upsampler(case, scale, mid, tmp_path, spandrel_loader):
    """The local deformable attention upsampler equals spandrel's given the same features; the whole network
    within a looser bound, as its sampling places (11 · tanh of a conv) turn the attention's float32 rounding
    into larger differences."""
    tensors = _randomised(_reference("FDAT", **_SMALL, upsampler_type="lda", mid_dim=mid, scale=scale), seed=mid)
    path = tmp_path / f"{case}.safetensors"
    save_file(tensors, str(path))
    reference = spandrel_loader.load_from_file(str(path))
    model = load_upscaler(path)
    assert (reference.scale, model.arch, model.scale) == (scale, ARCH_FDAT, scale)
    features = torch.randn(2, 16, 7, 10, generator=torch.Generator().manual_seed(mid))
    _close(_forward(model.module.upsampler, features), _forward(reference.model.upsampler, features))
    x = torch.rand(1, 3, 9, 11, generator=torch.Generator().manual_seed(1))
    expected = _forward(reference.model.eval(), x)
    assert expected.shape == (1, 3, 9 * scale, 11 * scale) and expected.std() > 0.05
    _close(_forward(model.module, x), expected, tolerance=4e-5)


@pytest.mark.parametrize("case,sizes", [
    ("fdat-4x-transpose+conv-ffn1.5-aim4", [(1, 1), (5, 3)]),
    ("fdat-4x-dysample-mid12", [(1, 1), (3, 2)]),
    # the unshuffle models' own reflection fails on sides shorter than the padding: the edge is repeated there
    ("fdat-2x-unshuffle-pixelshuffledirect", [(1, 1), (3, 2), (5, 7)]),
    ("fdat-1x-unshuffle", [(1, 2), (7, 5)]),
    ("moesr-4x-pixelshuffledirect", [(1, 1), (5, 7)]),
    ("moesr-3x-nearest+conv", [(1, 4), (3, 1)]),
])
def test_small_pictures_are_padded_as_spandrel_pads_them(case, sizes, tmp_path, spandrel_loader, unpinned):
    """Tiny and odd pictures, one in a batch of two: FDAT's network takes them as they are (its windows pad
    themselves); the unshuffle models are given the picture padded to the factor by reflection as far as it
    goes and by repeating the edge beyond (their own reflection where it works); MoESR's spandrel's model
    descriptor pads to its size requirement (2 pixels a side) before the network pads odd sides."""
    from spandrel.__helpers.size_req import SizeRequirements, pad_tensor

    path = tmp_path / f"{case}.pth"
    torch.save(_tensors(case), path)
    reference = spandrel_loader.load_from_file(str(path))
    unshuffle = {"fdat-2x-unshuffle-pixelshuffledirect": 2, "fdat-1x-unshuffle": 4}.get(case, 1)
    requirement = SizeRequirements(multiple_of=unshuffle) if unshuffle > 1 else reference.size_requirements
    assert case.startswith("moesr") or reference.size_requirements.none
    model = load_upscaler(path)
    scale = reference.scale
    for k, (w, h) in enumerate(sizes):
        batch = 2 if k == len(sizes) - 1 else 1
        x = torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(w * 100 + h))
        _, padded = pad_tensor(x, requirement)
        expected = _forward(reference.model.eval(), padded)[..., : h * scale, : w * scale]
        assert expected.shape == (batch, 3, h * scale, w * scale)
        _close(_forward(model.module, x), expected)


def test_layouts_spandrels_loader_misreads(spandrel_loader):
    """Two files spandrel's loader misreads (and so cannot load), checked against its class built with the
    arguments: a "pa_up" FDAT whose middle width is not the width (the original records the middle width in
    the width's place of ``MetaUpsample``, where spandrel reads the width), and a feed-forward width that
    spandrel's ratio in floating point rounds down (int(28 · 2.18) = 61, int(28 · (61 / 28)) = 60)."""
    for kwargs in (dict(_SMALL, upsampler_type="pa_up", mid_dim=8, scale=4),
                   dict(_SMALL, embed_dim=28, window_size=3, ffn_expansion_ratio=2.18, scale=2,
                        upsampler_type="pixelshuffledirect")):
        reference = _reference("FDAT", **kwargs)
        tensors = _randomised(reference, seed=5)
        model = upscaler_from_state_dict(tensors)
        x = torch.rand(1, 3, 10, 7, generator=torch.Generator().manual_seed(2))
        _close(_forward(model.module, x), _forward(reference, x))
    assert fdat_plan(dict(tensors), "a").describe == ("FDAT 2x (dim 28, 1 group of 2 blocks, 2 heads, window 3, "
                                                      "pixelshuffledirect)")


def test_describe_and_detection(spandrel_loader):
    """The plan's description names what was read; detection claims neither network's neighbours (DAT's
    and MoSR's files) nor the other one's."""
    fdat = dict(_tensors("fdat-1x-unshuffle"))
    moesr = dict(_tensors("moesr-2x-pixelshuffle-mid8"))
    assert fdat_plan(fdat, "a").describe == ("FDAT 1x (dim 16, 1 group of 2 blocks, 2 heads, window 4, "
                                             "transpose+conv, unshuffle 4)")
    assert fdat_plan(dict(_tensors("fdat-3x-transpose+conv-window8")), "a").describe == (
        "FDAT 3x (dim 16, 1 group of 2 blocks, 4 heads, window 8, transpose+conv)")
    assert fdat_plan(dict(_tensors("fdat-1x-pixelshuffle")), "a").describe.endswith("window 4, conv)")
    assert moesr_plan(moesr, "a").describe == "MoESR 2x (dim 16, 1 group of 2 blocks, pixelshuffle)"
    assert moesr_plan(dict(_tensors("moesr-1x-conv")), "a").describe == "MoESR 1x (dim 12, 1 group of 1 block, conv)"
    assert detect_upscaler(fdat) == (ARCH_FDAT, 1) and detect_upscaler(moesr) == (ARCH_MOESR, 2)
    dat = dict(DAT(dim=16, depths=[2], spatial_heads=[1], channel_heads=[2], split=(2, 4), hidden=32, pos_width=2,
                   upsampler="pixelshuffle", factors=[2], num_feat=8).state_dict())
    mosr = dict(MoSR(dim=16, blocks=1, hidden=24, conv_channels=8, kernel=7, scale=2, upsampler="dys").state_dict())
    for sd in (dat, mosr, moesr):
        assert fdat_plan(sd, "a") is None
    for sd in (dat, mosr, fdat):
        assert moesr_plan(sd, "a") is None


# --------------------------------------------------------------------------------------------- damaged files


def _record(version: int, kind: str, scale: int, dim: int, mid: int) -> torch.Tensor:
    """A ``MetaUpsample`` record as traiNNer writes it (version 3 for FDAT's upsampler, 1 for MoESR's)."""
    return torch.tensor([version, UPSAMPLERS.index(kind), scale, dim, 3, mid, 4], dtype=torch.uint8)


def _fdat(**kwargs) -> dict[str, torch.Tensor]:
    """Our own FDAT's tensors and its record (no spandrel needed): dim 16, one group of one pair, 2x pixel
    shuffle through 8 channels."""
    args = {**dict(dim=16, groups=1, pairs=1, heads=2, window=4, hidden=32, reduced=2, upsampler="pixelshuffle",
                   scale=2, mid=8), **kwargs}
    sd = dict(FDAT(**args).state_dict())
    sd["upsampler.MetaUpsample"] = _record(3, args["upsampler"], args["scale"] * args.get("unshuffle", 1), 16,
                                           args["mid"])
    return sd


def _moesr(**kwargs) -> dict[str, torch.Tensor]:
    """Our own MoESR's tensors and its record: dim 16, one group of one block, 2x pixel shuffle through 8."""
    args = {**dict(dim=16, groups=1, blocks=1, hidden=24, msg_hidden=24, upsampler="pixelshuffle", scale=2, mid=8),
            **kwargs}
    sd = dict(MoESR(**args).state_dict())
    sd["upscale.MetaUpsample"] = _record(1, args["upsampler"], args["scale"], args["dim"], args["mid"])
    return sd


def _renamed(sd: dict, old: str, new: str) -> dict:
    assert any(k.startswith(old) for k in sd)
    return {(new + k[len(old):] if k.startswith(old) else k): v for k, v in sd.items()}


def _with_record(sd: dict, name: str, **changes) -> dict:
    """``sd`` with entries of its ``MetaUpsample`` record changed (index: version 0, kind 1, scale 2, width 3,
    output channels 4, middle width 5, groups 6)."""
    record = sd[name].clone()
    for index, value in changes.items():
        record[int(index[1:])] = value
    return {**sd, name: record}


_FM, _MM = "upsampler.MetaUpsample", "upscale.MetaUpsample"


@pytest.mark.parametrize("make,named", [
    (lambda: _without(_fdat(), _FM), "not a supported upscaling model"),
    (lambda: {**_fdat(), _FM: torch.zeros(5, dtype=torch.uint8)}, "MetaUpsample is (5,) torch.uint8; expected the "
                                                                   "seven whole numbers"),
    (lambda: {**_fdat(), _FM: _record(3, "pixelshuffle", 2, 16, 8).float() + 0.5}, "expected the seven whole numbers"),
    (lambda: {**_fdat(), _FM: torch.tensor([3.0, 2, float("inf"), 16, 3, 8, 4])}, "expected the seven whole numbers"),
    (lambda: _with_record(_fdat(), _FM, i1=9), "upsampler number 9 in upsampler.MetaUpsample; expected 0 to 7"),
    (lambda: _with_record(_fdat(), _FM, i2=0), "scale 0 in upsampler.MetaUpsample"),
    (lambda: _with_record(_fdat(), _FM, i4=1), "1-channel output"),
    (lambda: _with_record(_fdat(), _FM, i1=0), "2x model with the \"conv\" upsampler"),
    (lambda: _with_record(_fdat(), _FM, i2=5), "\"pixelshuffle\" upsampler at 5x; expected a power of 2 or 3"),
    (lambda: _with_record(_fdat(upsampler="transpose+conv"), _FM, i2=8), "at 8x; expected 2x, 3x or 4x"),
    (lambda: _with_record(_fdat(upsampler="dysample", mid=12), _FM, i5=4), "DySample over 4 channels"),
    (lambda: _with_record(_fdat(upsampler="lda", mid=16), _FM, i5=12), "\"lda\" upsampler over 12 channels"),
    (lambda: _with_record(_fdat(), _FM, i5=12), "upsampler.0.weight is (8, 16, 3, 3), expected (12, 16, 3, 3)"),
    (lambda: {**_fdat(), "conv_first.weight": torch.zeros(16, 4, 3, 3)}, "4-channel input"),
    (lambda: _renamed(_fdat(unshuffle=4, scale=1), "conv_first.1.weight", "conv_first.weight"), "48-channel input"),
    (lambda: {**_fdat(unshuffle=2, scale=2), "conv_first.1.weight": torch.zeros(16, 27, 3, 3)},
     "conv_first.1 takes 27 channels; expected 48 or 12"),
    (lambda: _without(_fdat(), "conv_first.weight"), "not a supported upscaling model"),
    (lambda: _renamed(_fdat(groups=2), "groups.1.", "groups.2."), "groups (groups.N) numbered [0, 2]"),
    (lambda: _renamed(_fdat(), "groups.0.blocks.1.", "groups.0.blocks.2."), "blocks (groups.0.blocks.N) numbered"),
    (lambda: {**_fdat(), "groups.0.blocks.2.n1.weight": torch.zeros(16)}, "FDAT group of 3 blocks"),
    (lambda: _without(_fdat(), "groups.0.blocks.0.attn.bias"),
     "FDAT model without a 3-D 'groups.0.blocks.0.attn.bias'"),
    (lambda: {**_fdat(), "groups.0.blocks.0.attn.bias": torch.zeros(2, 16, 15)}, "attn.bias is (2, 16, 15)"),
    (lambda: {**_fdat(), "groups.0.blocks.0.attn.bias": torch.zeros(3, 16, 16)}, "width 16 with 3 heads"),
    (lambda: {**_fdat(), "groups.0.blocks.0.inter.cg.1.weight": torch.zeros(17, 16, 1, 1)},
     "channel gate of 17 channels"),
    (lambda: _without(_fdat(), "groups.0.blocks.1.ffn.fc2.weight"), "missing groups.0.blocks.1.ffn.fc2.weight"),
    (lambda: {**_fdat(), "groups.0.blocks.0.attn.qkv.bias": torch.zeros(48)},
     "unexpected groups.0.blocks.0.attn.qkv.bias"),
    (lambda: {**_fdat(), "conv_after.weight": torch.zeros(16, 16, 1, 1)}, "conv_after.weight is (16, 16, 1, 1)"),
    (lambda: _without(_moesr(), _MM), "not a supported upscaling model"),
    (lambda: _with_record(_moesr(), _MM, i1=5), "upsampler number 5 in upscale.MetaUpsample; expected 0 to 4 (conv, "
                                                "pixelshuffledirect, pixelshuffle, nearest+conv, dysample)"),
    (lambda: _with_record(_moesr(), _MM, i1=0), "2x model with the \"conv\" upsampler"),
    (lambda: _with_record(_moesr(), _MM, i4=4), "4-channel output"),
    (lambda: {**_moesr(), "in_to_dim.weight": torch.zeros(16, 1, 3, 3)}, "1-channel input"),
    (lambda: {**_moesr(), "in_to_dim.weight": torch.zeros(10, 3, 3, 3)}, "MoESR of width 10"),
    (lambda: {**_moesr(), "blocks.0.blocks.0.fc1.weight": torch.zeros(16, 16, 3, 3)},
     "gated blocks 8 and 24 channels wide for width 16"),
    (lambda: _without(_moesr(), "blocks.0.msg.gated.0.fc1.weight"),
     "MoESR model without a 4-D 'blocks.0.msg.gated.0.fc1.weight'"),
    (lambda: _renamed(_moesr(groups=2), "blocks.1.", "blocks.2."), "groups (blocks.N) numbered [0, 2]"),
    (lambda: _without(_moesr(), "blocks.0.blocks.0.conv.dwconv_w.bias"),
     "missing blocks.0.blocks.0.conv.dwconv_w.bias"),
    (lambda: {**_moesr(), "blocks.0.blocks.0.gamma": torch.zeros(16)}, "blocks.0.blocks.0.gamma is (16,)"),
    (lambda: {**_moesr(), "blocks.0.msg.gated.3.gamma": torch.zeros(1, 16, 1, 1)},
     "unexpected blocks.0.msg.gated.3.gamma"),
])
def test_broken_fdat_and_moesr_files(tmp_path, make, named):
    assert_refused(tmp_path / "4x_broken.safetensors", make(), named)


def test_complete_files_load_and_refusals_name_the_network():
    """The files :func:`_fdat` and :func:`_moesr` make are whole (so each broken variant above is broken by one
    change), and a file that does not fit is refused with the architecture and the sizes read from it."""
    for sd, arch, scale in ((_fdat(), ARCH_FDAT, 2), (_fdat(unshuffle=4, scale=1), ARCH_FDAT, 1),
                            (_fdat(unshuffle=2, scale=2, upsampler="dysample", mid=12), ARCH_FDAT, 2),
                            (_fdat(upsampler="lda", mid=16, scale=3), ARCH_FDAT, 3), (_moesr(), ARCH_MOESR, 2)):
        assert detect_upscaler(sd) == (arch, scale)
        assert _forward(upscaler_from_state_dict(sd).module, torch.rand(1, 3, 5, 3)).shape == (1, 3, 5 * scale,
                                                                                              3 * scale)
    with pytest.raises(ModelError, match=r"^x\.pth: .*FDAT 2x \(dim 16, 1 group of 2 blocks, 2 heads, window 4, "
                                         r"pixelshuffle\).*missing conv_after\.weight"):
        upscaler_from_state_dict(_without(_fdat(), "conv_after.weight"), source="x.pth")
    with pytest.raises(ModelError, match=r"^y\.pth: .*MoESR 2x \(dim 16, 1 group of 1 block, pixelshuffle\)"
                                         r".*missing in_to_dim\.bias"):
        upscaler_from_state_dict(_without(_moesr(), "in_to_dim.bias"), source="y.pth")
