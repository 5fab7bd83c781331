"""ATD and DRCT upscalers read from the files people download, checked against spandrel 0.4.2 (what
ComfyUI and Forge load these files with).

Tiny networks are built with spandrel's own classes (every parameter moved off its initial value),
saved in the released layout (the buffers ``relative_position_index_SA``, ``relative_position_index``
and ``attn_mask`` included) and read by our loader; the variants are those spandrel's loader tells apart
(upsamplers, scales, residual convs, biases, patch norm, ATD's mean shift and light models, DRCT's
unshifted models). ATD's pictures have more tokens than a category group (256, or 128 for the light
models), so that the category attention's sorting, grouping and filling up are exercised. Pictures that
are not multiples of the window (and tiny ones) are compared with what spandrel's call gives: its
padding to its size requirement, the model, the crop.
"""

from __future__ import annotations

import pytest
import torch
import test_upscaler_models
from test_upscaler_models import _forward, _image, _loads_like_spandrel, _randomised, _without, assert_refused, \
    like_spandrels_call as _like_spandrels_call, close_to_spandrel as _close

from underpaint.models.upscaler import detect_upscaler, upscale_image, upscaler_from_state_dict
from underpaint.models.upscaler_atd import ARCH_ATD, ARCH_DRCT, ATD, DRCT, atd_plan, drct_plan
from underpaint.models.upscaler_swin import relative_position_index, shift_mask

#: spandrel's model loader: the module-scoped fixture of test_upscaler_models (it skips where spandrel is absent).
spandrel_loader = test_upscaler_models.spandrel_loader


def _reference(name: str, **kwargs) -> torch.nn.Module:
    """spandrel's ATD or DRCT class (spandrel must already be imported: see ``spandrel_loader``)."""
    if name == "ATD":
        from spandrel.architectures.ATD import ATD as reference
    else:
        from spandrel.architectures.DRCT import DRCT as reference
    return reference(**kwargs)


# --------------------------------------------------------------------------------------------- ATD

#: name → (spandrel ATD arguments, input size (w, h), scale). The padded pictures hold 320 to 576
#: tokens: two or three category groups (four of 128 for the light model), the last filled up.
ATD_CASES = {
    "4x-pixelshuffle": (dict(upscale=4, upsampler="pixelshuffle", embed_dim=16, depths=[3, 2], num_heads=[2, 4],
                             window_size=4, num_tokens=8, reducted_dim=4, convffn_kernel_size=3), (22, 19), 4),
    "3x-pixelshuffle-3conv-window8": (dict(upscale=3, upsampler="pixelshuffle", resi_connection="3conv",
                                           embed_dim=16, depths=[2], num_heads=[2], window_size=8, num_tokens=6,
                                           reducted_dim=3, convffn_kernel_size=5, mlp_ratio=1.5), (21, 18), 3),
    "realsr-4x-nearest-no-qkv-bias": (dict(upscale=4, upsampler="nearest+conv", embed_dim=12, depths=[2],
                                           num_heads=[3], window_size=4, num_tokens=8, reducted_dim=4,
                                           convffn_kernel_size=3, qkv_bias=False), (17, 18), 4),
    # the light models: one-step pixel shuffle at width 48, category groups of 128
    "light-2x": (dict(upscale=2, upsampler="pixelshuffledirect", embed_dim=48, depths=[2, 1], num_heads=[3, 2],
                      window_size=4, num_tokens=8, reducted_dim=4, convffn_kernel_size=3, category_size=128,
                      patch_norm=False), (19, 17), 2),
    "3x-direct": (dict(upscale=3, upsampler="pixelshuffledirect", embed_dim=16, depths=[2], num_heads=[4],
                       window_size=4, num_tokens=4, reducted_dim=2, convffn_kernel_size=3), (24, 23), 3),
    "1x-no-norm": (dict(upscale=1, upsampler="", embed_dim=12, depths=[2], num_heads=[2], window_size=4,
                        num_tokens=8, reducted_dim=4, convffn_kernel_size=3, norm=False), (18, 15), 1),
}


@pytest.mark.parametrize("case", list(ATD_CASES))
def test_atd_loads_like_spandrel(case, tmp_path, spandrel_loader):
    kwargs, (w, h), scale = ATD_CASES[case]
    tensors = _randomised(_reference("ATD", **kwargs), seed=len(case))
    assert "relative_position_index_SA" in tensors and ("no_norm" in tensors) == (kwargs.get("norm") is False)
    x, expected, atol = _loads_like_spandrel(tmp_path, case, tensors, spandrel_loader, "ATD", ARCH_ATD, scale, (w, h))
    # the saved position index is derived from the window: a file without it is the same model
    bare = {k: v for k, v in tensors.items() if k != "relative_position_index_SA"}
    torch.testing.assert_close(_forward(upscaler_from_state_dict(bare).module, x), expected, atol=atol, rtol=1e-5)


def test_atd_pictures_of_any_size_are_padded_as_spandrel_pads_them(spandrel_loader):
    """Sides under 8 are padded to 8 (reflection, then the edge repeated), then to the window with the
    mirror image, as spandrel's call and ATD's own padding do; smaller than a window and sides needing
    more than one mirror image included."""
    kwargs, _, scale = ATD_CASES["3x-pixelshuffle-3conv-window8"]
    reference = _reference("ATD", **kwargs)
    tensors = _randomised(reference, seed=3)
    descriptor = spandrel_loader.load_from_state_dict(tensors)
    model = upscaler_from_state_dict(tensors)
    for w, h in ((5, 3), (1, 1), (13, 6), (9, 10)):
        x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(w * h))
        got = _forward(model.module, x)
        assert got.shape == (1, 3, h * scale, w * scale)
        _close(got, _like_spandrels_call(descriptor, x))
    assert upscale_image(model, _image(2, 3), tile=0).size == (2 * scale, 3 * scale)


# --------------------------------------------------------------------------------------------- DRCT

#: name → (spandrel DRCT arguments, input size (w, h), scale). img_size is the training patch size: larger
#: than the window, the shifted blocks save their masks; equal to it, nothing is shifted. The sizes are
#: multiples of 16 and of the window, as spandrel's call would pad them (its class does not pad).
DRCT_CASES = {
    # 4 heads in the first group: the 18- and 30-channel blocks get 2
    "4x": (dict(upscale=4, upsampler="pixelshuffle", embed_dim=12, depths=[6, 6], num_heads=[4, 3], window_size=4,
                img_size=16, gc=6), (32, 16), 4),
    "2x-window8-no-conv-after-body": (dict(upscale=2, upsampler="pixelshuffle", resi_connection="identity",
                                           embed_dim=16, depths=[6], num_heads=[2], window_size=8, img_size=32,
                                           gc=8, mlp_ratio=1.5), (16, 32), 2),
    "3x-unshifted-no-qkv-bias-no-patch-norm": (dict(upscale=3, upsampler="pixelshuffle", embed_dim=8, depths=[6],
                                                    num_heads=[2], window_size=4, img_size=4, gc=4, qkv_bias=False,
                                                    patch_norm=False), (16, 16), 3),
}


@pytest.mark.parametrize("case", list(DRCT_CASES))
def test_drct_loads_like_spandrel(case, tmp_path, spandrel_loader):
    kwargs, (w, h), scale = DRCT_CASES[case]
    tensors = _randomised(_reference("DRCT", **kwargs), seed=len(case))
    shifted = kwargs["img_size"] > kwargs["window_size"]
    assert any(n.endswith(".attn_mask") for n in tensors) == shifted
    x, expected, atol = _loads_like_spandrel(tmp_path, case, tensors, spandrel_loader, "DRCT", ARCH_DRCT, scale,
                                             (w, h))
    if shifted:  # the saved buffers are derived: a file without any of them is the same (shifted) model
        bare = {k: v for k, v in tensors.items() if not k.endswith((".attn_mask", ".relative_position_index"))}
        torch.testing.assert_close(_forward(upscaler_from_state_dict(bare).module, x), expected, atol=atol,
                                   rtol=1e-5)


@pytest.mark.parametrize("case", ["4x", "2x-window8-no-conv-after-body"])
def test_drct_pictures_of_any_size_are_padded_as_spandrel_pads_them(case, spandrel_loader):
    """To a multiple of 16 (and of the window), by reflection, the edge repeated where a side is too short."""
    kwargs, _, scale = DRCT_CASES[case]
    tensors = _randomised(_reference("DRCT", **kwargs), seed=5)
    descriptor = spandrel_loader.load_from_state_dict(tensors)
    model = upscaler_from_state_dict(tensors)
    for w, h in ((3, 2), (20, 9)):
        x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(w * h))
        got = _forward(model.module, x)
        assert got.shape == (1, 3, h * scale, w * scale)
        _close(got, _like_spandrels_call(descriptor, x))
    assert upscale_image(model, _image(1, 1), tile=0).size == (scale, scale)


# --------------------------------------------------------------------------------------------- damaged files


def _atd_file(**overrides) -> dict[str, torch.Tensor]:
    """A complete ATD state dict without spandrel: our module's tensors and the saved position index."""
    arguments = dict(embed_dim=16, depths=[2, 2], heads=[2, 4], window=4, mlp_hidden=32, category=256, tokens=8,
                     reduced=4, kernel=3, upsampler="pixelshuffle", factors=[2])
    module = ATD(**{**arguments, **overrides})
    return {**module.state_dict(), "relative_position_index_SA": relative_position_index(4)}


def _drct_file() -> dict[str, torch.Tensor]:
    """A complete DRCT state dict without spandrel: our module's tensors and the saved buffers."""
    module = DRCT(embed_dim=12, heads=[[4, 2, 4, 2, 4]], hidden=[[24, 36, 48, 30, 36]], window=4, gc=6, factors=[2])
    sd = dict(module.state_dict())
    for k in range(1, 6):
        sd[f"layers.0.swin{k}.attn.relative_position_index"] = relative_position_index(4)
    for k in (2, 4):
        sd[f"layers.0.swin{k}.attn_mask"] = shift_mask(16, 16, 4, 2, torch.device("cpu"))
    return sd


def _with(sd: dict, **tensors: torch.Tensor) -> dict:
    """``sd`` with tensors replaced or added (names with ``__`` for dots)."""
    return {**sd, **{k.replace("__", "."): v for k, v in tensors.items()}}


def _renumbered(sd: dict, old: str, new: str) -> dict:
    return {new + k[len(old):] if k.startswith(old) else k: v for k, v in sd.items()}


_ATD_LAYER = "layers.0.residual_group.layers.0."


@pytest.mark.parametrize("make,named", [
    (lambda: _without(_atd_file(), _ATD_LAYER + "attn_aca.logit_scale"),
     "missing layers.0.residual_group.layers.0.attn_aca.logit_scale"),
    (lambda: _without(_atd_file(), "layers.1.residual_group.layers.0.sigma"),
     "missing layers.1.residual_group.layers.0.sigma"),
    (lambda: _without(_atd_file(), _ATD_LAYER + "attn_atd.scale"),
     "ATD model without a 1-D 'layers.0.residual_group.layers.0.attn_atd.scale'"),
    (lambda: _with(_atd_file(), absolute_pos_embed=torch.zeros(1, 4096, 16)), "ATD with absolute position embeddings"),
    (lambda: _with(_atd_file(), relative_position_index_SA=relative_position_index(8)),
     "relative_position_index_SA is (64, 64)"),
    (lambda: _with(_atd_file(), **{_ATD_LAYER.replace(".", "__") + "attn_win__relative_position_bias_table":
                                   torch.zeros(10, 2)}), "with 10 rows"),
    (lambda: _with(_atd_file(), conv_first__weight=torch.zeros(16, 1, 3, 3)), "only RGB models"),
    (lambda: _with(_atd_file(), **{_ATD_LAYER.replace(".", "__") + "convffn__dwconv__depthwise_conv__0__weight":
                                   torch.zeros(32, 1, 4, 4)}), "an odd kernel"),
    (lambda: _renumbered(_atd_file(), "layers.1.", "layers.2."), "ATD groups numbered [0, 2]"),
    (lambda: _renumbered(_atd_file(), "layers.1.residual_group.layers.1.", "layers.1.residual_group.layers.2."),
     "ATD group 1 has layers numbered [0, 2]"),
    (lambda: _without(_atd_file(upsampler="nearest+conv", factors=[2, 2]), "conv_up2.weight"),
     "missing conv_up2.weight"),
    (lambda: _without(_drct_file(), "conv_last.weight"), "DRCT without its pixel-shuffle upsampler (conv_last)"),
    (lambda: _without(_drct_file(), "layers.0.adjust3.bias"), "missing layers.0.adjust3.bias"),
    (lambda: _without(_drct_file(), "layers.0.swin4.mlp.fc1.weight"),
     "DRCT model without a 2-D 'layers.0.swin4.mlp.fc1.weight'"),
    (lambda: _with(_drct_file(), absolute_pos_embed=torch.zeros(1, 4096, 12)),
     "DRCT with absolute position embeddings"),
    (lambda: _with(_drct_file(), layers__0__swin2__attn__relative_position_bias_table=torch.zeros(49, 4)),
     "DRCT group 0 has heads [4, 4, 4, 2, 4]"),
    (lambda: _with(_drct_file(), layers__0__swin3__attn__relative_position_bias_table=torch.zeros(25, 4)),
     "relative_position_bias_table is (25, 4)"),
    (lambda: _renumbered(_drct_file(), "layers.0.adjust5.", "layers.1.adjust5."),
     "DRCT model without a 2-D 'layers.1.swin1.attn.relative_position_bias_table'"),
])
def test_damaged_atd_and_drct_files(tmp_path, make, named):
    assert_refused(tmp_path / "4x-broken.safetensors", make(), named)


def test_complete_files_load_and_other_architectures_are_not_taken():
    """The files the damaged ones were made from load; SwinIR's, HAT's and DAT's layouts are not taken for these."""
    from test_upscaler_models import _dat_file, _hat, _swinir_file

    assert detect_upscaler(_atd_file(), source="a.pth") == (ARCH_ATD, 2)
    assert detect_upscaler(_drct_file(), source="d.pth") == (ARCH_DRCT, 2)
    model = upscaler_from_state_dict(_drct_file())
    assert upscale_image(model, _image(5, 3), tile=0).size == (10, 6)
    for sd in (_swinir_file(), _hat(), _dat_file()):
        assert atd_plan(sd, "x.pth") is None and drct_plan(sd, "x.pth") is None
