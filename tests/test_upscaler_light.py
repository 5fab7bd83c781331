"""OmniSR and SAFMN upscalers, checked against spandrel 0.4.2 (what ComfyUI and Forge load these files with).

The reference networks are spandrel's own classes, tiny (widths 8-16, one to three blocks), every parameter
moved off its initial value by random noise, saved as files and read by our loader. The variants are the
ones spandrel's loader tells apart: scales 1-4; for OmniSR the biases, the position bias table (and with it
the window, 4 or 8), groups and blocks, and the profiler counts some files carry; for SAFMN the width, blocks
and feed-forward width. Pictures of at least 16 pixels a side (OmniSR) or multiples of 8 (SAFMN) are given to
spandrel's network as they are; smaller and other sizes go through the padding spandrel's model descriptor
adds before calling the network (its ``size_requirements``), which is what ComfyUI and Forge run.
"""

from __future__ import annotations

import pytest
import test_upscaler_models
import torch
from test_upscaler_models import _forward, _loads_like_spandrel, _without, assert_refused

from underpaint.errors import ModelError
from underpaint.models.upscaler import detect_upscaler, load_upscaler, upscaler_from_state_dict
from underpaint.models.upscaler_light import ARCH_OMNISR, ARCH_SAFMN, OmniSR, SAFMN, omnisr_plan, safmn_plan

#: spandrel's model loader: the module-scoped fixture of test_upscaler_models (it skips where spandrel is absent).
spandrel_loader = test_upscaler_models.spandrel_loader


def _reference(name: str, kwargs: dict, seed: int, noise: float) -> torch.nn.Module:
    """spandrel's OmniSR or SAFMN class (spandrel must already be imported: see ``spandrel_loader``), every
    parameter plus Gaussian noise of std ``noise``, in eval mode."""
    if name == "OmniSR":
        from spandrel.architectures.OmniSR import OmniSR as Reference
    else:
        from spandrel.architectures.SAFMN import SAFMN as Reference
    module = Reference(**kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise)
    return module.eval()


#: Operation counts the thop profiler leaves in a model (spandrel drops them before loading).
_PROFILER_JUNK = {"total_ops": torch.zeros(1, dtype=torch.float64), "total_params": torch.zeros(1, dtype=torch.float64),
                  "input.total_ops": torch.zeros(1, dtype=torch.float64),
                  "residual_layer.0.esa.conv1.total_params": torch.zeros(1, dtype=torch.float64)}

#: name → (spandrel class, its arguments, weight noise, input size (w, h), expected arch, scale, extra tensors)
CASES = {
    "omnisr-4x": ("OmniSR", dict(num_feat=8, block_num=1, res_num=2, up_scale=4), 0.1, (19, 17), ARCH_OMNISR, 4, {}),
    "omnisr-2x-window4-no-bias": ("OmniSR", dict(num_feat=12, block_num=2, res_num=1, window_size=4, bias=False,
                                                 up_scale=2), 0.1, (17, 18), ARCH_OMNISR, 2, {}),
    # without a position bias table the window is not in the file: spandrel (and we) take the default 8
    "omnisr-3x-no-pe": ("OmniSR", dict(num_feat=8, block_num=1, res_num=1, pe=False, up_scale=3), 0.1, (16, 20),
                        ARCH_OMNISR, 3, {}),
    "omnisr-1x-window4-profiled": ("OmniSR", dict(num_feat=16, block_num=1, res_num=1, window_size=4, up_scale=1),
                                   0.1, (18, 16), ARCH_OMNISR, 1, _PROFILER_JUNK),
    "safmn-4x": ("SAFMN", dict(dim=8, n_blocks=2, upscaling_factor=4), 0.1, (24, 16), ARCH_SAFMN, 4, {}),
    "safmn-2x-ffn1.5": ("SAFMN", dict(dim=12, n_blocks=1, ffn_scale=1.5, upscaling_factor=2), 0.1, (16, 24),
                        ARCH_SAFMN, 2, {}),
    "safmn-3x": ("SAFMN", dict(dim=8, n_blocks=3, upscaling_factor=3), 0.1, (16, 16), ARCH_SAFMN, 3, {}),
    "safmn-1x-ffn0.5": ("SAFMN", dict(dim=16, n_blocks=1, ffn_scale=0.5, upscaling_factor=1), 0.1, (24, 32),
                        ARCH_SAFMN, 1, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_omnisr_and_safmn_load_like_spandrel(case, tmp_path, spandrel_loader):
    name, kwargs, noise, size, arch, scale, extra = CASES[case]
    tensors = {**_reference(name, kwargs, len(case), noise).state_dict(), **extra}
    _loads_like_spandrel(tmp_path, case, tensors, spandrel_loader, name, arch, scale, size)


@pytest.mark.parametrize("case,sizes", [
    ("omnisr-4x", [(17, 13), (5, 3), (1, 1), (40, 9)]),
    ("omnisr-2x-window4-no-bias", [(15, 7), (2, 17)]),
    ("safmn-4x", [(17, 13), (5, 3), (1, 1)]),
    ("safmn-2x-ffn1.5", [(9, 23), (7, 2)]),
])
def test_other_sizes_are_padded_as_spandrel_pads_them(case, sizes, tmp_path, spandrel_loader):
    """Pictures spandrel's network would not take as they are (smaller than OmniSR's 16 pixels, or not a
    multiple of SAFMN's 8, down to a single pixel): our module equals spandrel's model descriptor, which
    pads the picture (reflection, then the edge repeated), runs the network and crops the result."""
    from spandrel.__helpers.size_req import pad_tensor

    name, kwargs, noise, _, arch, scale, _ = CASES[case]
    tensors = _reference(name, kwargs, len(case), noise).state_dict()
    path = tmp_path / f"{case}.pth"
    torch.save(tensors, path)
    reference = spandrel_loader.load_from_file(str(path))
    model = load_upscaler(path)
    for w, h in sizes:
        x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(w * 100 + h))
        _, padded = pad_tensor(x, reference.size_requirements)
        expected = _forward(reference.model.eval(), padded)[..., : h * scale, : w * scale]
        assert expected.shape == (1, 3, h * scale, w * scale)
        atol = 4e-6 * float(expected.abs().max())
        torch.testing.assert_close(_forward(model.module, x), expected, atol=atol, rtol=1e-5)


def test_describe_and_detection(spandrel_loader):
    """The plan's description names the hyper-parameters read; detection does not claim other networks."""
    from spandrel.architectures.PLKSR import PLKSR

    name, kwargs, noise, _, _, _, _ = CASES["omnisr-2x-window4-no-bias"]
    omnisr = dict(_reference(name, kwargs, 0, noise).state_dict())
    assert omnisr_plan(omnisr, "a").describe == "OmniSR 2x (dim 12, 1 group of 2 blocks, window 4, no biases)"
    safmn = dict(_reference("SAFMN", dict(dim=8, n_blocks=2, upscaling_factor=4), 0, 0.0).state_dict())
    assert safmn_plan(safmn, "a").describe == "SAFMN 4x (dim 8, 2 blocks, feed-forward 16)"
    assert detect_upscaler(safmn) == (ARCH_SAFMN, 4)
    # PLKSR's files also have feats.N and to_img.0 (and nothing else of either network)
    plksr = dict(PLKSR(dim=16, n_blocks=1, upscaling_factor=2).state_dict())
    for sd in (omnisr, plksr):
        assert safmn_plan(sd, "a") is None
    for sd in (safmn, plksr):
        assert omnisr_plan(sd, "a") is None


# --------------------------------------------------------------------------------------------- damaged files


def _omnisr(**kwargs) -> dict[str, torch.Tensor]:
    """Our own OmniSR's tensors (no spandrel needed): 2 groups of 1 block, dim 8, window 4, 2x."""
    args = dict(dim=8, groups=2, blocks=1, window=4, pe=True, bias=True, scale=2)
    return dict(OmniSR(**{**args, **kwargs}).state_dict())


def _safmn(**kwargs) -> dict[str, torch.Tensor]:
    """Our own SAFMN's tensors: dim 8, 2 blocks, feed-forward 16, 4x."""
    return dict(SAFMN(**{**dict(dim=8, blocks=2, hidden=16, scale=4), **kwargs}).state_dict())


def _renamed(sd: dict, old: str, new: str) -> dict:
    assert any(k.startswith(old) for k in sd)
    return {(new + k[len(old):] if k.startswith(old) else k): v for k, v in sd.items()}


_TABLE = "residual_layer.0.residual_layer.0.layer.2.fn.rel_pos_bias.weight"


@pytest.mark.parametrize("make,named", [
    (lambda: _without(_omnisr(), "residual_layer.1.esa.conv3.weight"), "missing residual_layer.1.esa.conv3.weight"),
    (lambda: _without(_omnisr(), "up.0.bias"), "missing up.0.bias"),
    (lambda: _without(_omnisr(), "up.0.weight"), "OmniSR model without a 4-D 'up.0.weight'"),
    (lambda: _renamed(_omnisr(), "residual_layer.1.", "residual_layer.2."),
     "groups (residual_layer.N) numbered [0, 2]"),
    (lambda: {**_omnisr(), "input.weight": torch.zeros(8, 4, 3, 3)}, "4-channel input"),
    (lambda: {**_omnisr(), "input.weight": torch.zeros(10, 3, 3, 3)}, "width 10; expected a multiple of its 4"),
    (lambda: {**_omnisr(), "up.0.weight": torch.zeros(20, 8, 3, 3)}, "up.0 gives 20 channels"),
    (lambda: {**_omnisr(), "up.0.weight": torch.zeros(16, 8, 3, 3)}, "4-channel output"),
    (lambda: {**_omnisr(), _TABLE: torch.zeros(50, 4)}, "position bias table with 50 rows"),
    # a second group's table for another window than the first's
    (lambda: {**_omnisr(), _TABLE.replace("residual_layer.0.", "residual_layer.1.", 1): torch.zeros(225, 4)},
     "rel_pos_bias.weight is (225, 4)"),
    (lambda: {**_omnisr(), "residual_layer.0.residual_layer.0.layer.4.fn.project_in.bias": torch.zeros(16)},
     "unexpected residual_layer.0.residual_layer.0.layer.4.fn.project_in.bias"),
    (lambda: _without(_safmn(), "feats.1.ccm.ccm.2.weight"), "missing feats.1.ccm.ccm.2.weight"),
    (lambda: _without(_safmn(), "to_img.0.weight"), "SAFMN model without a 4-D 'to_img.0.weight'"),
    (lambda: {**_safmn(), "feats.0.safm.mfr.4.weight": torch.zeros(2, 1, 3, 3)}, "modulation in 5 parts"),
    (lambda: {**_safmn(), "to_feat.weight": torch.zeros(10, 3, 3, 3)}, "width 10; expected a multiple of its 4"),
    (lambda: {**_safmn(), "to_feat.weight": torch.zeros(8, 1, 3, 3)}, "1-channel input"),
    (lambda: {**_safmn(), "to_img.0.weight": torch.zeros(7, 8, 3, 3)}, "to_img.0 gives 7 channels"),
    (lambda: _renamed(_safmn(), "feats.1.", "feats.3."), "blocks (feats.N) numbered [0, 3]"),
    (lambda: {**_safmn(), "feats.1.ccm.ccm.0.weight": torch.zeros(24, 8, 3, 3)}, "ccm.ccm.0.weight is (24, 8, 3, 3)"),
])
def test_broken_omnisr_and_safmn_files(tmp_path, make, named):
    assert_refused(tmp_path / "4x_broken_light.safetensors", make(), named)


def test_refusals_name_the_network_read():
    """A file that does not fit is refused with the architecture and the sizes read from it."""
    with pytest.raises(ModelError, match=r"^x\.pth: .*OmniSR 2x \(dim 8, 2 groups of 1 block, window 4\).*"
                                         r"missing output\.bias"):
        upscaler_from_state_dict(_without(_omnisr(), "output.bias"), source="x.pth")
    with pytest.raises(ModelError, match=r"^y\.pth: .*SAFMN 3x \(dim 12, 1 block, feed-forward 20\).*unexpected"):
        upscaler_from_state_dict({**_safmn(dim=12, blocks=1, hidden=20, scale=3), "feats.0.extra": torch.zeros(1)},
                                 source="y.pth")
