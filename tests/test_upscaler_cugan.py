"""Real-CUGAN upscalers (UpCunet 2x, 3x and 4x, their "pro" models and the 2x fast network) read from files,
checked against spandrel 0.4.2 (what ComfyUI and Forge load these files with).

The networks' widths are fixed by the architecture, so the references are spandrel's own classes at their
real widths with random noise on every parameter, run on small pictures. Pictures of 32 px and more a side
(40 and multiples of 4 for the fast network) are what spandrel's classes take as they are; smaller and odd
ones are compared with what spandrel runs them as, its size-requirement padding before the class and the
crop after. Damaged files are built from our own module's tensors and need no spandrel.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import test_upscaler_models
from test_upscaler_models import _loads_like_spandrel, assert_refused
from underpaint.models.upscaler import detect_upscaler, upscale_image, upscaler_from_state_dict
from underpaint.models.upscaler_cugan import ARCH_CUGAN, RealCUGAN

#: spandrel's loader (the module fixture, skipping where spandrel is absent), made available here.
spandrel_loader = test_upscaler_models.spandrel_loader

#: name → (spandrel class, its arguments, scale, picture size (w, h)); the sizes are odd where the class
#: pads to a multiple itself, and a multiple of 4 for the fast network, whose class cannot pad to one.
CUGAN_CASES = {
    "up2x": ("UpCunet2x", {}, 2, (35, 33)),
    "up2x-pro": ("UpCunet2x", dict(pro=True), 2, (33, 34)),
    "up3x": ("UpCunet3x", {}, 3, (34, 33)),
    "up3x-pro": ("UpCunet3x", dict(pro=True), 3, (33, 35)),
    "up4x": ("UpCunet4x", {}, 4, (33, 32)),
    "up4x-pro": ("UpCunet4x", dict(pro=True), 4, (32, 35)),
    "up2x-fast": ("UpCunet2x_fast", {}, 2, (44, 40)),
}


def _reference(name: str, kwargs: dict, seed: int) -> torch.nn.Module:
    """spandrel's Real-CUGAN class (spandrel must already be imported: see ``spandrel_loader``) with every
    parameter moved off its initial value; the ``pro`` marker is a buffer and stays as it is."""
    from spandrel.architectures import RealCUGAN as spandrel_cugan

    reference = getattr(spandrel_cugan, name)(**kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return reference.eval()


def _forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(x)


@pytest.mark.parametrize("case", list(CUGAN_CASES))
def test_real_cugan_loads_like_spandrel(case, tmp_path, spandrel_loader):
    name, kwargs, scale, size = CUGAN_CASES[case]
    tensors = _reference(name, kwargs, seed=len(case)).state_dict()
    assert ("pro" in tensors) == bool(kwargs)
    x, expected, atol = _loads_like_spandrel(tmp_path, case, tensors, spandrel_loader, "RealCUGAN", ARCH_CUGAN,
                                             scale, size)
    if "pro" in tensors:
        # the marker is read for its presence only: whatever it holds, the same model; without it, another
        marked = {**tensors, "pro": torch.ones(1)}
        torch.testing.assert_close(_forward(upscaler_from_state_dict(marked).module, x), expected, atol=atol,
                                   rtol=1e-5)
        plain = {k: v for k, v in tensors.items() if k != "pro"}
        assert detect_upscaler(plain) == (ARCH_CUGAN, scale)
        assert not torch.allclose(_forward(upscaler_from_state_dict(plain).module, x), expected, atol=atol,
                                  rtol=1e-5)


#: name → (spandrel class, its arguments, picture sizes (w, h)): smaller than the classes take, odd, and
#: for the fast network sides that are not multiples of 4.
SMALL_CASES = {
    "up2x": ("UpCunet2x", {}, [(9, 7), (1, 1), (2, 37)]),
    "up3x-pro": ("UpCunet3x", dict(pro=True), [(5, 11), (31, 3)]),
    "up4x": ("UpCunet4x", {}, [(7, 6), (1, 33)]),
    "up2x-fast": ("UpCunet2x_fast", {}, [(42, 41), (13, 6), (1, 2)]),
}


@pytest.mark.parametrize("case", list(SMALL_CASES))
def test_real_cugan_small_and_odd_pictures_as_spandrel_runs_them(case, spandrel_loader):
    """spandrel pads pictures smaller than its size requirements (32 px a side; the fast network 40 and
    multiples of 4) on the right and bottom, reflection then replication, before the class, and crops the
    result: the module does the same, so any size gives spandrel's picture."""
    from spandrel.__helpers.size_req import pad_tensor

    name, kwargs, sizes = SMALL_CASES[case]
    reference = _reference(name, kwargs, seed=len(case))
    descriptor = spandrel_loader.load_from_state_dict(dict(reference.state_dict()))
    model = upscaler_from_state_dict(reference.state_dict())
    scale = model.scale
    assert descriptor.scale == scale
    for w, h in sizes:
        x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(w * h))
        _, padded = pad_tensor(x, descriptor.size_requirements)
        expected = _forward(reference, padded)[..., : h * scale, : w * scale]
        out = _forward(model.module, x)
        assert out.shape == (1, 3, h * scale, w * scale)
        atol = 4e-6 * float(expected.abs().max())
        torch.testing.assert_close(out, expected, atol=atol, rtol=1e-5)


def test_real_cugan_upscales_a_picture_in_tiles():
    """Tiles of any size go through the fast network (its padding makes them multiples of 4)."""
    torch.manual_seed(0)
    model = upscaler_from_state_dict(RealCUGAN(scale=2, fast=True).state_dict(), source="up2x-fast.pth")
    image = Image.new("RGB", (57, 45), (200, 120, 40))
    out = upscale_image(model, image, tile=42, overlap=8)
    assert out.size == (114, 90) and out.mode == "RGB"


def _cugan(**kwargs) -> dict[str, torch.Tensor]:
    return dict(RealCUGAN(**kwargs).state_dict())


def _without(sd: dict, name: str) -> dict:
    assert name in sd
    return {k: v for k, v in sd.items() if k != name}


@pytest.mark.parametrize("make,named", [
    (lambda: _without(_cugan(scale=2), "unet2.conv3.seblock.conv2.bias"),
     "Real-CUGAN 2x they describe: missing unet2.conv3.seblock.conv2.bias"),
    (lambda: _without({**_cugan(scale=3, pro=True), "pro": torch.zeros(1)}, "unet1.conv2_up.weight"),
     "Real-CUGAN 3x (pro) they describe: missing unet1.conv2_up.weight"),
    (lambda: _without(_cugan(scale=2), "unet2.conv_bottom.weight"),
     "Real-CUGAN model without a 4-D 'unet2.conv_bottom.weight'"),
    (lambda: {**_cugan(scale=4), "conv_final.weight": torch.zeros(12)}, "Real-CUGAN model without a 4-D "
     "'conv_final.weight'"),
    (lambda: {**_cugan(scale=2), "unet1.conv_bottom.weight": torch.zeros(64, 3, 6, 6)}, "6x6 transposed conv"),
    (lambda: {**_cugan(scale=4), "unet2.conv4_up.weight": torch.zeros(64, 32, 2, 2)},
     "unet2.conv4_up.weight is (64, 32, 2, 2)"),
    (lambda: {**_cugan(scale=2), "unet1.conv3.seblock.conv1.weight": torch.zeros(8, 64, 1, 1)},
     "unexpected unet1.conv3.seblock.conv1.weight"),
    (lambda: {**_cugan(scale=2), "unet1.conv1.conv.0.weight": torch.zeros(32, 1, 3, 3),
              "unet2.conv_bottom.weight": torch.zeros(1, 64, 3, 3)}, "1-channel input and 1-channel output"),
    (lambda: {**_cugan(scale=4), "conv_final.weight": torch.zeros(16, 64, 3, 3)}, "3-channel input and 4-channel"),
    (lambda: {**_cugan(scale=2, fast=True), "pro": torch.zeros(1)}, "2x fast network with a \"pro\" marker"),
])
def test_broken_real_cugan_files(tmp_path, make, named):
    assert_refused(tmp_path / "up2x-broken.safetensors", make(), named)
