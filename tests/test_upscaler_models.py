"""Upscaling models (ESRGAN / Real-ESRGAN RRDBNet, Real-ESRGAN Compact, SwinIR, HAT, DAT, SCUNet, SPAN and
PLKSR) read from the
files people download, checked against spandrel 0.4.2 (what ComfyUI and Forge load these files with).

The state dicts are random, small (nf 8-16, nb 1-2) and written in the released files' key layouts:
old ESRGAN (``model.N``), Real-ESRGAN / BasicSR (``conv_first``, ``body.N.rdbM``, nested under
``params_ema``), the pixel-unshuffled x2plus/x1 variants, and SRVGGNetCompact with PReLU.
spandrel builds its RRDB with 32 growth channels whatever the file says, so the spandrel
comparisons use gc 32; other widths are checked against a functional re-statement of the network
written from the layout description (plain ``F.conv2d`` over the file's own tensor names).
SwinIR, HAT, DAT, SCUNet, SPAN and PLKSR networks are built with spandrel's own classes and compared on pictures
that are not multiples of the window.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from underpaint.errors import InvalidParameter, ModelError, UnsafeModelFile
from underpaint.models.upscaler import (
    ARCH_COMPACT,
    ARCH_DAT,
    ARCH_ESRGAN,
    ARCH_HAT,
    ARCH_MOSR,
    ARCH_PLKSR,
    ARCH_RCAN,
    ARCH_SCUNET,
    ARCH_SPAN,
    ARCH_SWIN2SR,
    ARCH_SWINIR,
    UPSCALER_EXTENSIONS,
    _axis_weights,
    _run,
    detect_upscaler,
    load_upscaler,
    upscale_image,
    upscaler_from_state_dict,
)

# --------------------------------------------------------------------------------------------- layouts


def _t(gen: torch.Generator, *shape: int, std: float = 0.05) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * std


def _conv(sd: dict, name: str, gen, cout: int, cin: int, suffix: str = "") -> None:
    sd[f"{name}{suffix}.weight"] = _t(gen, cout, cin, 3, 3)
    sd[f"{name}{suffix}.bias"] = _t(gen, cout, std=0.01)


def _rrdb_blocks(sd: dict, gen, nf: int, gc: int, nb: int, name) -> None:
    """``name(i, j, c)`` gives a dense-block conv's key prefix."""
    for i in range(nb):
        for j in (1, 2, 3):
            for c in range(1, 6):
                _conv(sd, name(i, j, c), gen, nf if c == 5 else gc, nf + (c - 1) * gc)


def old_esrgan(stages: int, *, nf=8, gc=32, nb=1, in_nc=3, out_nc=3, seed=0) -> dict[str, torch.Tensor]:
    """The original ESRGAN layout: ``model.0``, ``model.1.sub.i.RDBj.convc.0``, ``model.1.sub.nb``,
    upsampling convs at ``model.3k``, HR conv at ``model.3n+2``, last conv at ``model.3n+4``."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    _conv(sd, "model.0", gen, nf, in_nc)
    _rrdb_blocks(sd, gen, nf, gc, nb, lambda i, j, c: f"model.1.sub.{i}.RDB{j}.conv{c}.0")
    _conv(sd, f"model.1.sub.{nb}", gen, nf, nf)
    for k in range(1, stages + 1):
        _conv(sd, f"model.{3 * k}", gen, nf, nf)
    _conv(sd, f"model.{3 * stages + 2}", gen, nf, nf)
    _conv(sd, f"model.{3 * stages + 4}", gen, out_nc, nf)
    return sd


def real_esrgan(*, unshuffle=1, nf=8, gc=32, nb=1, seed=0) -> dict[str, torch.Tensor]:
    """BasicSR's RRDBNet: always two upsampling convs; x2plus/x1 take a pixel-unshuffled input."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    _conv(sd, "conv_first", gen, nf, 3 * unshuffle * unshuffle)
    _rrdb_blocks(sd, gen, nf, gc, nb, lambda i, j, c: f"body.{i}.rdb{j}.conv{c}")
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        _conv(sd, name, gen, nf, nf)
    _conv(sd, "conv_last", gen, 3, nf)
    return sd


def bsrgan(*, nf=8, gc=32, nb=1, seed=0) -> dict[str, torch.Tensor]:
    """BSRGAN / the later ESRGAN repository: ``RRDB_trunk``, ``trunk_conv``, ``upconvK``, ``HRconv``."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    _conv(sd, "conv_first", gen, nf, 3)
    _rrdb_blocks(sd, gen, nf, gc, nb, lambda i, j, c: f"RRDB_trunk.{i}.RDB{j}.conv{c}")
    for name in ("trunk_conv", "upconv1", "upconv2", "HRconv"):
        _conv(sd, name, gen, nf, nf)
    _conv(sd, "conv_last", gen, 3, nf)
    return sd


def compact(upscale: int, *, nf=16, num_conv=2, seed=0, pointwise=False) -> dict[str, torch.Tensor]:
    """SRVGGNetCompact: ``body.0`` conv, ``body.1`` PReLU, num_conv x (conv, PReLU), last conv."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    widths = [(nf, 3)] + [(nf, nf)] * num_conv + [(3 * upscale * upscale, nf)]
    for k, (cout, cin) in enumerate(widths):
        _conv(sd, f"body.{2 * k}", gen, cout, cin)
        if k < len(widths) - 1:
            sd[f"body.{2 * k + 1}.weight"] = 0.25 + _t(gen, nf, std=0.1)
    if pointwise:  # only the centre taps: every output pixel depends on its own input pixel only
        for name, tensor in sd.items():
            if tensor.ndim == 4:
                centre = tensor[:, :, 1, 1].clone()
                tensor.zero_()
                tensor[:, :, 1, 1] = centre * 4
    return sd


# --------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def spandrel_loader():
    try:
        from spandrel_ref import model_loader

        return model_loader()
    except ImportError as exc:
        pytest.skip(f"spandrel is not available: {exc}")


def _save_both(tmp_path, name: str, obj: dict, flat: dict) -> tuple:
    """``obj`` as a .pth (torch.save, nesting kept) and ``flat`` as a .safetensors."""
    pth, st = tmp_path / f"{name}.pth", tmp_path / f"{name}.safetensors"
    torch.save(obj, pth)
    save_file({k: v.contiguous() for k, v in flat.items()}, str(st))
    return pth, st


def _image(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)


def _as_tensor(image: Image.Image) -> torch.Tensor:
    """The documented input convention: RGB order, value / 255 in float32, (1, 3, H, W)."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None].float() / 255


def _as_uint8(y: torch.Tensor) -> np.ndarray:
    """The documented output convention: clamp to [0, 1], floor(v * 255 + 0.5)."""
    return np.floor(y[0].clamp(0, 1).permute(1, 2, 0).numpy().astype(np.float32) * 255 + 0.5).astype(np.uint8)


def _forward(module, x):
    with torch.no_grad():
        return module(x)


# --------------------------------------------------------------------------------------------- vs spandrel

#: name → (what is saved in the .pth, the flat tensors, input size (w, h), expected arch, scale)
CASES = {
    "esrgan-old-4x": lambda: (old_esrgan(2), (11, 9), ARCH_ESRGAN, 4),
    "esrgan-old-2x": lambda: (old_esrgan(1, nb=2), (11, 9), ARCH_ESRGAN, 2),
    "esrgan-old-1x": lambda: (old_esrgan(0, nf=16), (11, 9), ARCH_ESRGAN, 1),
    "esrgan-old-8x": lambda: (old_esrgan(3), (7, 5), ARCH_ESRGAN, 8),
    "esrgan-old-unshuffle-1x": lambda: (old_esrgan(2, in_nc=48), (13, 10), ARCH_ESRGAN, 1),
    "realesrgan-x4plus": lambda: (real_esrgan(), (11, 9), ARCH_ESRGAN, 4),
    "realesrgan-x2plus": lambda: (real_esrgan(unshuffle=2, nb=2), (13, 10), ARCH_ESRGAN, 2),
    "realesrgan-x1": lambda: (real_esrgan(unshuffle=4), (14, 11), ARCH_ESRGAN, 1),
    "bsrgan-4x": lambda: (bsrgan(nb=2), (11, 9), ARCH_ESRGAN, 4),
    "compact-x4": lambda: (compact(4), (11, 9), ARCH_COMPACT, 4),
    "compact-x2": lambda: (compact(2, num_conv=3, nf=8), (11, 9), ARCH_COMPACT, 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_files_load_like_spandrel(case, tmp_path, spandrel_loader):
    tensors, (w, h), arch, scale = CASES[case]()
    nested = case.startswith("realesrgan")
    # BasicSR's .pth: EMA weights under params_ema next to different raw weights under params
    # (the EMA ones are the ones to use); the .safetensors holds the EMA tensors flat.
    decoy = {k: torch.randn_like(v) for k, v in tensors.items()}
    obj = {"params_ema": tensors, "params": decoy} if nested else tensors
    pth, st = _save_both(tmp_path, case, obj, tensors)

    reference = spandrel_loader.load_from_file(str(pth))
    assert reference.scale == scale
    assert detect_upscaler(obj, source=case) == (arch, scale)

    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(1))
    expected = _forward(reference.model.eval(), x)
    assert expected.shape == (1, 3, h * scale, w * scale)
    for path in (pth, st):
        model = load_upscaler(path)
        assert (model.arch, model.scale, model.path) == (arch, scale, path)
        got = _forward(model.module, x)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if nested:  # the raw weights really differ, so preferring them would have been seen
        assert not torch.allclose(_forward(upscaler_from_state_dict(decoy).module, x), expected, atol=1e-3)


def _functional_rrdb(sd: dict, x: torch.Tensor, *, old: bool, nb: int, stages: int) -> torch.Tensor:
    """ESRGAN restated over the file's own names (old or BasicSR layout, no unshuffle)."""
    def conv(name, t):
        return F.conv2d(t, sd[name + ".weight"], sd[name + ".bias"], padding=1)

    def lrelu(t):
        return F.leaky_relu(t, 0.2)

    feat = conv("model.0" if old else "conv_first", x)
    trunk = feat
    for i in range(nb):
        block_in = trunk
        for j in (1, 2, 3):
            seen = [trunk]
            for c in range(1, 6):
                name = f"model.1.sub.{i}.RDB{j}.conv{c}.0" if old else f"body.{i}.rdb{j}.conv{c}"
                y = conv(name, torch.cat(seen, 1))
                seen.append(lrelu(y) if c < 5 else y)
            trunk = seen[-1] * 0.2 + trunk
        trunk = trunk * 0.2 + block_in
    feat = feat + conv(f"model.1.sub.{nb}" if old else "conv_body", trunk)
    for k in range(1, stages + 1):
        feat = lrelu(conv(f"model.{3 * k}" if old else f"conv_up{k}", F.interpolate(feat, scale_factor=2, mode="nearest")))
    hr, last = (f"model.{3 * stages + 2}", f"model.{3 * stages + 4}") if old else ("conv_hr", "conv_last")
    return conv(last, lrelu(conv(hr, feat)))


@pytest.mark.parametrize("old,stages,gc,nb", [(True, 2, 4, 2), (True, 1, 8, 1), (True, 0, 5, 1), (False, 2, 6, 2)])
def test_growth_channels_other_than_32(old, stages, gc, nb):
    """Growth channels come from the file (spandrel fixes them at 32, so the reference here is the
    functional restatement)."""
    sd = old_esrgan(stages, gc=gc, nb=nb, seed=3) if old else real_esrgan(gc=gc, nb=nb, seed=3)
    model = upscaler_from_state_dict(sd)
    assert model.scale == 2 ** stages
    x = torch.rand(1, 3, 9, 7, generator=torch.Generator().manual_seed(2))
    want = _functional_rrdb(sd, x, old=old, nb=nb, stages=stages)
    torch.testing.assert_close(_forward(model.module, x), want, atol=1e-5, rtol=1e-5)


def test_model_is_frozen_and_moves_in_place():
    model = upscaler_from_state_dict(compact(2, nf=8, num_conv=1))
    assert not model.module.training
    assert not any(p.requires_grad for p in model.module.parameters())
    assert model.path is None and model.device.type == "cpu" and model.dtype == torch.float32
    assert model.to(dtype=torch.float64) is model and model.dtype == torch.float64
    assert model.to() is model and model.dtype == torch.float64
    x = _image(6, 5)
    got = np.asarray(upscale_image(model, x, tile=0))
    want = _as_uint8(_forward(model.module, _as_tensor(x).double()))
    assert np.array_equal(got, want)


def test_extensions():
    assert UPSCALER_EXTENSIONS == (".pth", ".pt", ".safetensors")


# --------------------------------------------------------------------------------------------- pictures


@pytest.mark.parametrize("make,size", [(lambda: compact(4, nf=8, num_conv=1), (23, 17)),
                                       (lambda: real_esrgan(unshuffle=2, nb=1), (15, 9)),
                                       (lambda: old_esrgan(1, nb=1), (12, 10))])
def test_whole_picture_is_one_module_call(make, size):
    model = upscaler_from_state_dict(make())
    picture = _image(*size, seed=5)
    want = _as_uint8(_forward(model.module, _as_tensor(picture)))
    assert want.shape == (size[1] * model.scale, size[0] * model.scale, 3)
    for tile in (0, -1, max(size)):  # off, and a tile as large as the picture
        got = upscale_image(model, picture, tile=tile)
        assert got.mode == "RGB" and got.size == (size[0] * model.scale, size[1] * model.scale)
        assert np.array_equal(np.asarray(got), want)


def test_other_modes_are_converted_and_alpha_dropped():
    model = upscaler_from_state_dict(compact(2, nf=8, num_conv=1))
    rgba = _image(9, 7, seed=2, mode="RGBA")
    rgb = rgba.convert("RGB")
    assert np.array_equal(np.asarray(upscale_image(model, rgba, tile=0)), np.asarray(upscale_image(model, rgb, tile=0)))
    grey = _image(9, 7, seed=3, mode="L")
    got = np.asarray(upscale_image(model, grey, tile=0))
    assert np.array_equal(got, _as_uint8(_forward(model.module, _as_tensor(grey.convert("RGB")))))


def test_rounding_is_half_up():
    """A 1x Compact model that passes the picture through plus a constant: outputs land exactly
    on k + 0.5 levels, which must round up (banker's rounding would send even k + 0.5 down)."""
    sd = compact(1, nf=8, num_conv=0)
    for name in sd:
        sd[name].zero_()
    sd["body.2.bias"].fill_(0.5 / 255)
    model = upscaler_from_state_dict(sd)
    levels = np.arange(0, 240, dtype=np.uint8).reshape(16, 15)
    picture = Image.fromarray(np.stack([levels] * 3, -1))
    got = np.asarray(upscale_image(model, picture, tile=0))[..., 0].astype(int)
    exact = levels.astype(np.float32) / 255 + np.float32(0.5 / 255)
    assert np.array_equal(got, np.floor(exact * 255 + 0.5).astype(int))
    # float32 puts most of these a hair above or below k + 0.5; all must end at k or k + 1
    assert set(np.unique(got - levels)) <= {0, 1} and (got - levels).sum() > 0


@pytest.mark.parametrize("make,size,scale", [(lambda: real_esrgan(unshuffle=2), (1, 1), 2),
                                             (lambda: real_esrgan(unshuffle=4), (3, 2), 1),
                                             (lambda: real_esrgan(unshuffle=4), (6, 5), 1),
                                             (lambda: compact(4, nf=8, num_conv=1), (1, 1), 4),
                                             (lambda: old_esrgan(2), (1, 2), 4)])
def test_tiny_pictures(make, size, scale):
    """Any size of at least 1 px: pixel-unshuffled inputs are padded (replicated where a side is
    too short to reflect) and the output cropped back."""
    model = upscaler_from_state_dict(make())
    got = upscale_image(model, _image(*size), tile=0)
    assert got.size == (size[0] * scale, size[1] * scale)


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    return list(range(0, length - tile, tile - overlap)) + [length - tile]


def test_blend_weights_are_linear_ramps_that_sum_to_one():
    starts = _tile_starts(50, 16, 4)
    assert starts == [0, 12, 24, 34]
    weights = _axis_weights(starts, 16, 50, 2)
    total = torch.zeros(100)
    for a, weight in zip(starts, weights):
        total[2 * a:2 * a + 32] += weight
    torch.testing.assert_close(total, torch.ones(100), atol=1e-6, rtol=0)
    # tiles 0 and 1 share input px 12-15 (output 24-31): tile 1 rises there in equal steps, tile 0 falls
    torch.testing.assert_close(weights[1][:8].diff(), torch.full((7,), 1 / 8))
    torch.testing.assert_close(weights[0][24:].diff(), torch.full((7,), -1 / 8))
    assert torch.equal(weights[0][:24], torch.ones(24)) and torch.equal(weights[1][8:24], torch.ones(16))
    # the last tile, moved back to end at the edge, shares 6 px (12 output px) with the one before
    torch.testing.assert_close(weights[3][:12].diff(), torch.full((11,), 1 / 12))
    assert torch.equal(weights[3][12:], torch.ones(20))


def test_tiles_of_a_pointwise_model_equal_the_whole_picture():
    """Each output pixel of this model depends on its own input pixel only, so every tile computes
    the untiled values exactly and the blend returns them when its weights sum to 1 (and when each
    tile lands where it came from)."""
    model = upscaler_from_state_dict(compact(2, nf=8, num_conv=1, pointwise=True))
    x = _as_tensor(_image(50, 37, seed=7))
    with torch.inference_mode():
        whole = _run(model.module, x, 2, 0, 8, None)
        tiled = _run(model.module, x, 2, 16, 4, None)
        wide_overlap = _run(model.module, x, 2, 16, 11, None)  # more than half a tile: three tiles share pixels
    assert whole.abs().max() > 0.5
    torch.testing.assert_close(tiled, whole, atol=2e-6, rtol=0)
    torch.testing.assert_close(wide_overlap, whole, atol=2e-6, rtol=0)
    picture = _image(50, 37, seed=7)
    a = np.asarray(upscale_image(model, picture, tile=16, overlap=4)).astype(int)
    b = np.asarray(upscale_image(model, picture, tile=0)).astype(int)
    assert np.abs(a - b).max() <= 1  # a float32 hair either side of k + 0.5
    assert (a != b).mean() < 0.01
    strip = _as_tensor(_image(40, 12, seed=8))  # tiled along one side only
    with torch.inference_mode():
        torch.testing.assert_close(_run(model.module, strip, 2, 16, 4, None), _run(model.module, strip, 2, 0, 4, None),
                                   atol=2e-6, rtol=0)


def test_tiles_match_the_whole_picture_beyond_the_receptive_field():
    """A random Compact model with num_conv convs sees (num_conv + 2) px either side. A tile's zero
    padding at an inner edge changes only pixels closer than that to the edge; every output pixel
    that is at least that far inside every tile covering it must equal the untiled value. Pixels
    near seams may differ (less context), which shows the tiles really ran separately."""
    num_conv, tile, overlap, scale = 1, 16, 8, 2
    reach = num_conv + 2
    model = upscaler_from_state_dict(compact(scale, nf=8, num_conv=num_conv, seed=4))
    w, h = 45, 38
    x = _as_tensor(_image(w, h, seed=9))
    with torch.inference_mode():
        whole = _run(model.module, x, scale, 0, overlap, None)
        tiled = _run(model.module, x, scale, tile, overlap, None)

    def safe(length: int) -> np.ndarray:
        starts = _tile_starts(length, tile, overlap)
        ok = np.ones(length, dtype=bool)
        for a in starts:
            b = a + tile
            for p in range(a, b):
                if (a > 0 and p - a < reach) or (b < length and b - 1 - p < reach):
                    ok[p] = False
        return np.repeat(ok, scale)

    mask = torch.from_numpy(safe(h)[:, None] & safe(w)[None, :])
    diff = (tiled - whole).abs()[0].amax(0)
    assert mask.float().mean() > 0.3  # the check covers a good part of the picture
    assert diff[mask].max() <= 1e-5
    assert diff[~mask].max() > 1e-3
    # in 8 bits the seams of this weak random model move few pixels by a level (measured: 8% by 1);
    # the bound leaves room for other BLAS kernels, not for misplaced or unnormalised tiles
    a = np.asarray(upscale_image(model, _image(w, h, seed=9), tile=tile, overlap=overlap)).astype(int)
    b = np.asarray(upscale_image(model, _image(w, h, seed=9), tile=0)).astype(int)
    assert np.abs(a - b).max() <= 2 and np.abs(a - b).mean() < 0.25


def test_cancel_is_called_before_each_tile():
    model = upscaler_from_state_dict(compact(2, nf=8, num_conv=1))
    picture = _image(50, 37)
    calls = []
    upscale_image(model, picture, tile=16, overlap=4, cancel=lambda: calls.append(1))
    # columns start at 0, 12, 24 and 34 (moved back to end at 50), rows at 0, 12 and 21
    assert len(calls) == 4 * 3
    calls.clear()
    upscale_image(model, picture, tile=0, cancel=lambda: calls.append(1))
    assert len(calls) == 1

    class Stop(Exception):
        pass

    def stop_at_third():
        calls.append(1)
        if len(calls) == 3:
            raise Stop

    calls.clear()
    with pytest.raises(Stop):
        upscale_image(model, picture, tile=16, overlap=4, cancel=stop_at_third)
    assert len(calls) == 3


def test_overlap_must_be_smaller_than_the_tile():
    model = upscaler_from_state_dict(compact(2, nf=8, num_conv=1))
    for overlap in (16, 20, -1):
        with pytest.raises(InvalidParameter, match="overlap"):
            upscale_image(model, _image(40, 40), tile=16, overlap=overlap)


# --------------------------------------------------------------------------------------------- refusals


class _RunsCode:
    """Pickles as a call to os.system: a file only code execution can load (the command is a no-op)."""

    def __reduce__(self):
        return (os.system, (":",))


@pytest.mark.parametrize("legacy", [False, True])
def test_code_carrying_pickle_is_refused(tmp_path, legacy):
    path = tmp_path / "4x-evil.pth"
    torch.save({"params_ema": real_esrgan(), "hook": _RunsCode()}, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeModelFile, match="4x-evil.pth"):
        load_upscaler(path)


def _sd_checkpoint() -> dict[str, torch.Tensor]:
    return {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
            "model.diffusion_model.input_blocks.0.0.bias": torch.zeros(8),
            "first_stage_model.decoder.conv_in.weight": torch.zeros(8, 4, 3, 3),
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(16, 8)}


def _swin_start() -> dict[str, torch.Tensor]:
    """The first tensors of a SwinIR-like transformer (a first conv, a patch norm, one bias table)."""
    return {"conv_first.weight": torch.zeros(8, 3, 3, 3), "conv_first.bias": torch.zeros(8),
            "patch_embed.norm.weight": torch.zeros(8),
            "layers.0.residual_group.blocks.0.attn.relative_position_bias_table": torch.zeros(9, 2),
            "conv_after_body.weight": torch.zeros(8, 8, 3, 3), "conv_last.weight": torch.zeros(3, 8, 3, 3)}


def _hat() -> dict[str, torch.Tensor]:
    return {**_swin_start(), "layers.0.residual_group.blocks.0.conv_block.cab.0.weight": torch.zeros(2, 8, 3, 3),
            "layers.0.residual_group.overlap_attn.qkv.weight": torch.zeros(24, 8)}


def _swin2sr() -> dict[str, torch.Tensor]:
    return {**_swin_start(), "layers.0.residual_group.blocks.0.attn.logit_scale": torch.zeros(2, 1, 1),
            "layers.0.residual_group.blocks.0.attn.cpb_mlp.0.weight": torch.zeros(16, 2)}


def _swinir_unshuffled() -> dict[str, torch.Tensor]:
    sd = _swin_start()
    sd["conv_first.1.weight"] = torch.zeros(8, 12, 3, 3)
    return sd


def _esrgan_plus() -> dict[str, torch.Tensor]:
    return {**old_esrgan(2), "model.1.sub.0.RDB1.conv1x1.weight": torch.zeros(32, 8, 1, 1)}


@pytest.mark.parametrize("make,hint", [(_sd_checkpoint, "Stable Diffusion checkpoint"),
                                       (_esrgan_plus, "ESRGAN+"),
                                       (_swinir_unshuffled, "pixel-unshuffled"),
                                       (lambda: {"foo.weight": torch.zeros(2)}, "foo.weight")])
def test_other_architectures_name_the_file_and_what_is_supported(tmp_path, make, hint):
    path = tmp_path / "not-an-esrgan.safetensors"
    save_file(make(), str(path))
    with pytest.raises(ModelError) as info:
        load_upscaler(path)
    message = str(info.value)
    assert str(path) in message and hint in message
    assert "supported: " in message and "ESRGAN" in message and "Compact" in message and "SCUNet" in message
    assert "\n" not in message
    with pytest.raises(ModelError, match="^upscale.pth: .*supported"):
        detect_upscaler(make(), source="upscale.pth")


def _swinir_file() -> dict[str, torch.Tensor]:
    """A complete SwinIR state dict (SWINIR_CASES' realsr-4x-3conv) without spandrel: our own module's
    tensors plus the buffers the released files carry."""
    from underpaint.models.upscaler_swin import SwinIR, relative_position_index

    module = SwinIR(embed_dim=16, depths=[2, 2], heads=[2, 4], window=4, mlp_hidden=64, upsampler="nearest+conv",
                    factors=[2, 2], three_conv=True)
    sd = dict(module.state_dict())
    for i in range(2):
        for j in range(2):
            sd[f"layers.{i}.residual_group.blocks.{j}.attn.relative_position_index"] = relative_position_index(4)
    return sd


def _without(sd: dict, name: str) -> dict:
    assert name in sd
    return {k: v for k, v in sd.items() if k != name}


@pytest.mark.parametrize("make,named", [
    (lambda: _without(old_esrgan(2), "model.1.sub.0.RDB2.conv3.0.bias"), "missing model.1.sub.0.RDB2.conv3.0.bias"),
    (lambda: _without(real_esrgan(nb=2), "conv_hr.weight"), "missing conv_hr.weight"),
    (lambda: _without(real_esrgan(nb=2), "body.1.rdb3.conv5.weight"), "missing body.1.rdb3.conv5.weight"),
    (lambda: _without(old_esrgan(2), "model.10.weight"), "model.10"),
    (lambda: _without(compact(4), "body.3.weight"), "missing body.3.weight"),
    (lambda: {**old_esrgan(1), "model.1.sub.0.RDB1.conv6.0.weight": torch.zeros(1)}, "unexpected model.1.sub.0.RDB1"),
    (lambda: {**real_esrgan(), "conv_body.weight": torch.zeros(8, 9, 3, 3)}, "conv_body.weight is (8, 9, 3, 3)"),
    (_swin_start, "SwinIR model without a 2-D 'layers.0.residual_group.blocks.0.mlp.fc1.weight'"),
    (_hat, "HAT model without a 2-D 'layers.0.residual_group.overlap_attn.relative_position_bias_table'"),
    (_swin2sr, "Swin2SR model without a 4-D 'patch_embed.proj.weight'"),
    (lambda: _without(_swinir_file(), "layers.0.residual_group.blocks.1.attn.qkv.weight"),
     "missing layers.0.residual_group.blocks.1.attn.qkv.weight"),
    (lambda: _without(_swinir_file(), "layers.0.conv.0.bias"), "missing layers.0.conv.0.bias"),
    (lambda: _without(_swinir_file(), "conv_up2.weight"), "missing conv_up2.weight"),
    (lambda: {**_swinir_file(), "layers.1.residual_group.blocks.0.attn.relative_position_bias_table":
              torch.zeros(25, 4)}, "relative_position_bias_table is (25, 4)"),
])
def test_incomplete_or_mismatched_tensors(tmp_path, make, named):
    assert_refused(tmp_path / "4x-broken.safetensors", make(), named)


def assert_refused(path, tensors: dict, named: str) -> None:
    """``tensors`` saved at ``path`` (safetensors, or a torch pickle for other names) are refused with one
    line that starts with the file and says ``named``."""
    if path.suffix == ".safetensors":
        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    with pytest.raises(ModelError) as info:
        load_upscaler(path)
    message = str(info.value)
    assert message.startswith(str(path)) and named in message and "\n" not in message, message


def test_pickle_with_nested_ema_and_prefix(tmp_path):
    """A .pth saved from DataParallel (names under ``module.``) inside ``params``, read with weights_only."""
    sd = compact(2, nf=8, num_conv=1)
    path = tmp_path / "2x-compact.pt"
    torch.save({"params": {"module." + k: v for k, v in sd.items()}}, path)
    model = load_upscaler(path)
    x = torch.rand(1, 3, 5, 4)
    torch.testing.assert_close(_forward(model.module, x), _forward(upscaler_from_state_dict(sd).module, x),
                               atol=0, rtol=0)


# --------------------------------------------------------------------------------------------- SwinIR
#
# Tiny SwinIR networks built with spandrel's own SwinIR class (random weights: every parameter,
# LayerNorms and bias tables included, moved off its initial value), saved as files in the
# released layout (buffers ``relative_position_index`` and ``attn_mask`` included) and read by our
# loader. The inputs are not multiples of the window, so the padding and crop are exercised.


def _randomised(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return module.eval().state_dict()


def swinir_reference(**kwargs) -> torch.nn.Module:
    """spandrel's SwinIR class (spandrel must already be imported: see ``spandrel_loader``)."""
    from spandrel.architectures.SwinIR import SwinIR

    return SwinIR(**kwargs)


#: name → (spandrel SwinIR arguments, input size (w, h), scale); img_size is the training patch size
#: (it sizes the saved masks), larger than the window as in every released model.
SWINIR_CASES = {
    # A1111's "SwinIR 4x" shape in small: real-world SR, nearest+conv, 3conv residual convs
    "realsr-4x-3conv": (dict(upscale=4, upsampler="nearest+conv", resi_connection="3conv", embed_dim=16,
                             depths=[2, 2], num_heads=[2, 4], window_size=4, img_size=16), (22, 19), 4),
    "realsr-2x": (dict(upscale=2, upsampler="nearest+conv", embed_dim=12, depths=[2], num_heads=[3],
                       window_size=4, img_size=16), (17, 18), 2),
    "realsr-8x": (dict(upscale=8, upsampler="nearest+conv", embed_dim=8, depths=[1], num_heads=[2],
                       window_size=4, img_size=16), (17, 16), 8),
    "classical-2x-window8": (dict(upscale=2, upsampler="pixelshuffle", embed_dim=12, depths=[2], num_heads=[3],
                                  window_size=8, img_size=32, mlp_ratio=2.0), (21, 18), 2),
    "classical-3x": (dict(upscale=3, upsampler="pixelshuffle", embed_dim=12, depths=[3], num_heads=[3],
                          window_size=4, img_size=16), (18, 17), 3),
    "classical-4x-3conv": (dict(upscale=4, upsampler="pixelshuffle", resi_connection="3conv", embed_dim=16,
                                depths=[2], num_heads=[4], window_size=4, img_size=16), (16, 19), 4),
    "lightweight-3x": (dict(upscale=3, upsampler="pixelshuffledirect", embed_dim=12, depths=[2, 1],
                            num_heads=[2, 3], window_size=4, img_size=16), (22, 17), 3),
    # the JPEG artefact models: window 7, 0-255 values, the input plus a conv
    "car-1x-window7": (dict(upscale=1, upsampler="", embed_dim=12, depths=[2], num_heads=[2], window_size=7,
                            img_size=28, img_range=255.0), (23, 20), 1),
}


def like_spandrels_call(descriptor, x: torch.Tensor) -> torch.Tensor:
    """What spandrel's call gives before it clamps: ``x`` padded to the size requirement, the model, the crop."""
    from spandrel.__helpers.size_req import pad_tensor

    h, w = x.shape[-2:]
    _, padded = pad_tensor(x, descriptor.size_requirements)
    return _forward(descriptor.model.eval(), padded)[..., : h * descriptor.scale, : w * descriptor.scale]


def close_to_spandrel(got: torch.Tensor, expected: torch.Tensor, tolerance: float = 4e-6) -> None:
    """Equal within float32 rounding, which scales with the outputs (far outside [0, 1] with random weights)."""
    torch.testing.assert_close(got, expected, atol=tolerance * float(expected.abs().max()), rtol=1e-5)


def _loads_like_spandrel(tmp_path, case, tensors, spandrel_loader, spandrel_id, arch, scale, size):
    """``tensors`` saved as .pth (under params_ema) and .safetensors: spandrel and our loader agree on the
    architecture and scale, and our network's output equals spandrel's within float32 rounding on a
    random ``size`` picture; returns (picture, spandrel's output, tolerance)."""
    pth, st = _save_both(tmp_path, case, {"params_ema": tensors}, tensors)
    reference = spandrel_loader.load_from_file(str(pth))
    assert (reference.architecture.id, reference.scale) == (spandrel_id, scale)
    assert detect_upscaler(tensors, source=case) == (arch, scale)
    w, h = size
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(1))
    expected = _forward(reference.model.eval(), x.clone())  # spandrel's RCAN scales its input in place
    assert expected.shape == (1, 3, h * scale, w * scale) and expected.std() > 0.05
    # random weights give outputs far outside [0, 1] (up to ~50 here): float32 rounding scales with them
    atol = 4e-6 * float(expected.abs().max())
    for path in (pth, st):
        model = load_upscaler(path)
        assert (model.arch, model.scale) == (arch, scale)
        torch.testing.assert_close(_forward(model.module, x), expected, atol=atol, rtol=1e-5)
    return x, expected, atol


@pytest.mark.parametrize("case", list(SWINIR_CASES))
def test_swinir_loads_like_spandrel(case, tmp_path, spandrel_loader):
    kwargs, (w, h), scale = SWINIR_CASES[case]
    tensors = _randomised(swinir_reference(**kwargs), seed=len(case))
    assert any(n.endswith(".attn_mask") for n in tensors) == any(d > 1 for d in kwargs["depths"])
    assert any(n.endswith(".relative_position_index") for n in tensors)
    x, expected, atol = _loads_like_spandrel(tmp_path, case, tensors, spandrel_loader, "SwinIR", ARCH_SWINIR,
                                             scale, (w, h))
    # the saved buffers are derived from the window and the picture: a file without them is the same model
    bare = {k: v for k, v in tensors.items() if not k.endswith((".attn_mask", ".relative_position_index"))}
    torch.testing.assert_close(_forward(upscaler_from_state_dict(bare).module, x), expected, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(patch_norm=False), dict(qkv_bias=False), dict(mlp_ratio=1.5)])
def test_swinir_variants_spandrel_does_not_infer(kwargs, spandrel_loader):
    """Layouts spandrel's loader would build differently (it assumes a patch norm, qkv biases)
    checked against its class built with the same arguments."""
    reference = swinir_reference(upscale=2, upsampler="pixelshuffle", embed_dim=12, depths=[2], num_heads=[3],
                                 window_size=4, img_size=16, **kwargs)
    tensors = _randomised(reference, seed=9)
    model = upscaler_from_state_dict(tensors)
    x = torch.rand(1, 3, 18, 21, generator=torch.Generator().manual_seed(2))
    expected = _forward(reference, x)
    torch.testing.assert_close(_forward(model.module, x), expected, atol=2e-6 * float(expected.abs().max()), rtol=1e-5)


def test_swinir_pictures_and_tiles(spandrel_loader):
    """Through upscale_image: whole, the reference's values in 8 bits; in tiles (attention reaches
    past any tile edge, so tiles are not exact) the right size and close to the whole picture; and
    pictures smaller than the window (replicated where reflection cannot pad)."""
    kwargs = dict(upscale=2, upsampler="nearest+conv", resi_connection="3conv", embed_dim=12, depths=[2],
                  num_heads=[2], window_size=4, img_size=16)
    reference = swinir_reference(**kwargs)
    tensors = _randomised(reference, seed=4)
    with torch.no_grad():  # outputs mostly inside [0, 1], so that 8 bits show the differences
        reference.conv_last.weight.mul_(0.02)
        reference.conv_last.bias.mul_(0.02)
    model = upscaler_from_state_dict(tensors)
    picture = _image(40, 34, seed=3)
    want = _as_uint8(_forward(reference, _as_tensor(picture)))
    whole = np.asarray(upscale_image(model, picture, tile=0)).astype(int)
    assert whole.shape == (68, 80, 3)
    assert np.abs(whole - want).max() <= 1 and (whole != want).mean() < 0.01
    tiled = np.asarray(upscale_image(model, picture, tile=16, overlap=4)).astype(int)
    assert tiled.shape == whole.shape
    assert 0 < np.abs(tiled - whole).mean() < 3  # measured: 0.94
    for size in ((3, 2), (1, 1), (5, 9)):
        small = upscale_image(model, _image(*size), tile=0)
        assert small.size == (size[0] * 2, size[1] * 2)



# --------------------------------------------------------------------------------------------- HAT


def hat_reference(**kwargs) -> torch.nn.Module:
    """spandrel's HAT class (spandrel must already be imported: see ``spandrel_loader``)."""
    from spandrel.architectures.HAT import HAT

    return HAT(**kwargs)


#: name → (spandrel HAT arguments, input size (w, h), scale)
HAT_CASES = {
    "4x": (dict(upscale=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4, img_size=16,
                compress_ratio=4, squeeze_factor=8), (22, 19), 4),
    "3x-window8-no-conv": (dict(upscale=3, embed_dim=12, depths=[3], num_heads=[3], window_size=8, img_size=32,
                                compress_ratio=3, squeeze_factor=6, resi_connection="identity", mlp_ratio=2.0),
                           (21, 18), 3),
    "2x-overlap-1": (dict(upscale=2, embed_dim=12, depths=[2], num_heads=[2], window_size=4, img_size=16,
                          overlap_ratio=1.0, compress_ratio=3, squeeze_factor=4), (17, 18), 2),
}


@pytest.mark.parametrize("case", list(HAT_CASES))
def test_hat_loads_like_spandrel(case, tmp_path, spandrel_loader):
    kwargs, (w, h), scale = HAT_CASES[case]
    tensors = _randomised(hat_reference(**kwargs), seed=len(case))
    assert "relative_position_index_OCA" in tensors
    _loads_like_spandrel(tmp_path, case, tensors, spandrel_loader, "HAT", ARCH_HAT, scale, (w, h))


def test_hat_picture_smaller_than_the_window(spandrel_loader):
    kwargs, _, scale = HAT_CASES["3x-window8-no-conv"]
    model = upscaler_from_state_dict(_randomised(hat_reference(**kwargs), seed=2))
    for size in ((3, 2), (9, 5)):
        assert upscale_image(model, _image(*size), tile=0).size == (size[0] * scale, size[1] * scale)


def test_a_tensor_the_module_refuses_is_a_model_error_naming_the_file():
    """When the module itself refuses the tensors (after names and shapes passed), the file is named with
    the first line of the reason."""
    import torch

    from underpaint.errors import ModelError
    from underpaint.models.upscaler import _load_strict

    class Refusing(torch.nn.Linear):
        def load_state_dict(self, *args, **kwargs):
            raise RuntimeError("cannot copy this tensor\nsecond line")

    module = Refusing(2, 2)
    sd = {name: t.clone() for name, t in module.state_dict().items()}
    with pytest.raises(ModelError, match=r"x\.pth: cannot load the tiny net: cannot copy this tensor$"):
        _load_strict(module, sd, lambda name: name, "x.pth", "tiny net")


# --------------------------------------------------------------------------------------------- DAT


def _randomised_with_statistics(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """:func:`_randomised`, and the batch norms' saved statistics moved off 0 and 1 too."""
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(torch.randn(buffer.shape, generator=gen) * 0.1)
            elif name.endswith("running_var"):
                buffer.copy_(torch.rand(buffer.shape, generator=gen) + 0.5)
    return _randomised(module, seed)


def dat_reference(**kwargs) -> torch.nn.Module:
    """spandrel's DAT class (spandrel must already be imported: see ``spandrel_loader``)."""
    from spandrel.architectures.DAT import DAT

    return DAT(**kwargs)


#: name → (spandrel DAT arguments, input size (w, h), scale). img_size sizes the shifted blocks' saved
#: masks; the pictures are not multiples of the window, so the padded keys take part.
DAT_CASES = {
    # A1111's "DAT x4" frame in small: 1conv, pixel shuffle, rectangular windows, shifted blocks 2 (and 0 in group 1)
    "4x": (dict(upscale=4, embed_dim=32, depth=[4, 2], num_heads=[4, 2], split_size=[4, 8], img_size=16,
                expansion_factor=2.0), (21, 18), 4),
    "2x-3conv": (dict(upscale=2, embed_dim=32, depth=[6], num_heads=[2], split_size=[2, 4], img_size=16,
                      resi_connection="3conv"), (17, 22), 2),
    "3x": (dict(upscale=3, embed_dim=48, depth=[3, 2], num_heads=[6, 4], split_size=[4, 4], img_size=8,
                qkv_bias=False), (13, 11), 3),
    # DAT-light's frame: one conv and pixel shuffle at the end
    "light-2x": (dict(upscale=2, embed_dim=32, depth=[3, 2], num_heads=[2, 2], split_size=[2, 8], img_size=16,
                      upsampler="pixelshuffledirect", resi_connection="3conv"), (19, 10), 2),
}


@pytest.mark.parametrize("case", list(DAT_CASES))
def test_dat_loads_like_spandrel(case, tmp_path, spandrel_loader):
    kwargs, (w, h), scale = DAT_CASES[case]
    tensors = _randomised_with_statistics(dat_reference(**kwargs), seed=len(case))
    assert any(n.endswith(".attn_mask_0") for n in tensors) and any(n.endswith(".num_batches_tracked") for n in tensors)
    x, expected, atol = _loads_like_spandrel(tmp_path, case, tensors, spandrel_loader, "DAT", ARCH_DAT, scale, (w, h))
    # the derived buffers and the batch-norm counters are not needed
    bare = {k: v for k, v in tensors.items()
            if not k.endswith(("attn_mask_0", "attn_mask_1", "rpe_biases", "relative_position_index",
                               "num_batches_tracked")) or k.endswith("attns.0.rpe_biases")}
    torch.testing.assert_close(_forward(upscaler_from_state_dict(bare).module, x), expected, atol=atol, rtol=1e-5)


def test_dat_shapes_spandrel_does_not_infer(spandrel_loader):
    """A first group of one block (spandrel reads the window masks' size from group 0's block 2, so it
    builds this one differently) checked against its class built with the same arguments; pictures
    smaller than the window, and a picture in a batch of two."""
    reference = dat_reference(upscale=2, embed_dim=32, depth=[1, 5], num_heads=[2, 4], split_size=[2, 4],
                              img_size=8, expansion_factor=1.5)
    model = upscaler_from_state_dict(_randomised_with_statistics(reference, seed=5))
    for h, w in ((9, 14), (3, 2), (1, 1)):
        x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h))
        expected = _forward(reference, x)
        torch.testing.assert_close(_forward(model.module, x), expected, atol=2e-6 * float(expected.abs().max()),
                                   rtol=1e-5)


def _dat_file() -> dict[str, torch.Tensor]:
    """A complete DAT state dict without spandrel: our own module's tensors plus the first branch's offsets."""
    from underpaint.models.upscaler_dat import DAT

    module = DAT(dim=16, depths=[2], spatial_heads=[1], channel_heads=[2], split=(2, 4), hidden=32, pos_width=2,
                 upsampler="pixelshuffle", factors=[2], num_feat=8)
    sd = dict(module.state_dict())
    sd["layers.0.blocks.0.attn.attns.0.rpe_biases"] = module.layers[0].blocks[0].attn.attns[0].offsets
    return sd


@pytest.mark.parametrize("make,named", [
    (lambda: _without(_dat_file(), "layers.0.blocks.0.attn.attns.0.rpe_biases"),
     "DAT model without a 2-D 'layers.0.blocks.0.attn.attns.0.rpe_biases'"),
    (lambda: {**_dat_file(), "layers.0.blocks.0.attn.attns.0.rpe_biases": torch.zeros(21, 2)},
     "rpe_biases does not describe a window"),
    (lambda: {**_dat_file(), "layers.0.blocks.0.attn.attns.0.rpe_biases": torch.full((3, 2), 1e9)},
     "rpe_biases does not describe a window"),
    (lambda: {**_dat_file(), "layers.0.blocks.0.attn.attns.0.rpe_biases": torch.zeros(0, 2)}, "expected (rows, 2)"),
    (lambda: {**_dat_file(), "layers.0.blocks.0.attn.attns.0.rpe_biases": torch.zeros(21, 2, dtype=torch.int64)},
     "expected (rows, 2)"),
    (lambda: _without(_dat_file(), "layers.0.blocks.1.attn.dwconv.1.running_var"),
     "missing layers.0.blocks.1.attn.dwconv.1.running_var"),
    (lambda: _without(_dat_file(), "conv_after_body.weight"), "DAT model without 'conv_after_body'"),
    (lambda: {**_dat_file(), "layers.2.blocks.0.norm1.weight": torch.zeros(16)}, "DAT groups numbered [0, 2]"),
])
def test_incomplete_or_odd_dat_files(tmp_path, make, named):
    assert_refused(tmp_path / "4xBroken-DAT.safetensors", make(), named)


def test_a_complete_dat_file_loads():
    """The file :func:`_dat_file` makes is whole (so each broken variant above is broken by one change)."""
    model = upscaler_from_state_dict(_dat_file())
    assert (model.arch, model.scale) == (ARCH_DAT, 2)
    assert upscale_image(model, _image(9, 7), tile=0).size == (18, 14)


# --------------------------------------------------------------------------------------------- SCUNet


def scunet_reference(**kwargs) -> torch.nn.Module:
    """spandrel's SCUNet class (spandrel must already be imported: see ``spandrel_loader``)."""
    from spandrel.architectures.SCUNet import SCUNet

    return SCUNet(**kwargs)


def _scunet_tensors(config: list[int], seed: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A small-noise random SCUNet (64 channels, its narrowest; larger noise sends the U-Net's values to 1e13)."""
    reference = scunet_reference(dim=64, config=config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.03)
    return reference.eval(), reference.state_dict()


def test_scunet_loads_like_spandrel(tmp_path, spandrel_loader):
    """A1111's ScuNET GAN / PSNR frame with fewer blocks per level: the picture is padded to 64 (by reflection,
    as the original) and cropped back, scale 1."""
    _, tensors = _scunet_tensors([2, 1, 2, 2, 1, 2, 2], seed=0)
    _loads_like_spandrel(tmp_path, "scunet", tensors, spandrel_loader, "SCUNet", ARCH_SCUNET, 1, (70, 41))


def test_scunet_pictures_smaller_than_its_padding(spandrel_loader):
    """Sides too short to reflect to 64 are replicated (the original fails there): the size comes back."""
    _, tensors = _scunet_tensors([1, 1, 1, 1, 1, 1, 1], seed=1)
    model = upscaler_from_state_dict(tensors)
    for size in ((3, 2), (20, 31)):
        assert upscale_image(model, _image(*size), tile=0).size == size


@pytest.mark.parametrize("make,named", [
    (lambda: {**_scunet_tensors([1, 1, 1, 1, 1, 1, 1], 0)[1], "m_down2.3.conv1_1.weight": torch.zeros(1)},
     "SCUNet m_down2 entries numbered [0, 1, 3]"),
    (lambda: _without(_scunet_tensors([1, 1, 1, 1, 1, 1, 1], 0)[1], "m_up1.0.weight"),
     "SCUNet m_up1 entries numbered [1]"),
    (lambda: {"m_head.0.weight": torch.zeros(48, 3, 3, 3), "m_tail.0.weight": torch.zeros(3, 48, 3, 3)},
     "SCUNet of width 48; expected a multiple of 64"),
])
def test_broken_scunet_files(tmp_path, make, named, spandrel_loader):
    assert_refused(tmp_path / "scunet_broken.pth", make(), named)


# --------------------------------------------------------------------------------------------- SPAN, PLKSR


def _spandrel_class(name: str):
    """A class of spandrel's SPAN, RCAN or PLKSR architecture (spandrel must already be imported)."""
    if name == "SPAN":
        from spandrel.architectures.SPAN import SPAN

        return SPAN
    if name == "RCAN":
        from spandrel.architectures.RCAN import RCAN

        return RCAN
    if name == "MoSR":
        from spandrel.architectures.MoSR import MoSR

        return MoSR
    from spandrel.architectures import PLKSR

    return getattr(PLKSR, name)


#: name → (spandrel class, its arguments, weight noise, expected arch, scale)
CONV_CASES = {
    "span-4x": ("SPAN", dict(num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=4), 0.03, ARCH_SPAN, 4),
    "span-2x-no-norm": ("SPAN", dict(num_in_ch=3, num_out_ch=3, feature_channels=12, upscale=2, norm=False), 0.1,
                        ARCH_SPAN, 2),
    "plksr-ccm-2x": ("PLKSR", dict(dim=16, n_blocks=2, upscaling_factor=2, ccm_type="CCM", kernel_size=7), 0.1,
                     ARCH_PLKSR, 2),
    "plksr-iccm-3x-no-attention": ("PLKSR", dict(dim=16, n_blocks=2, upscaling_factor=3, ccm_type="ICCM",
                                                 kernel_size=9, split_ratio=0.5, use_ea=False), 0.1, ARCH_PLKSR, 3),
    "plksr-dccm-rect-4x": ("PLKSR", dict(dim=16, n_blocks=1, upscaling_factor=4, ccm_type="DCCM", kernel_size=9,
                                         lk_type="RectSparsePLK"), 0.1, ARCH_PLKSR, 4),
    "realplksr-2x": ("RealPLKSR", dict(dim=16, n_blocks=2, upscaling_factor=2, kernel_size=7), 0.1, ARCH_PLKSR, 2),
    # 4xNomos2_realplksr_dysample's frame: DySample upsampling, here with the layer-norm variant
    "realplksr-dysample-layernorm-4x": ("RealPLKSR", dict(dim=16, n_blocks=2, upscaling_factor=4, kernel_size=7,
                                                          dysample=True, layer_norm=True), 0.1, ARCH_PLKSR, 4),
    "realplksr-dysample-3x": ("RealPLKSR", dict(dim=16, n_blocks=1, upscaling_factor=3, kernel_size=5,
                                                dysample=True), 0.1, ARCH_PLKSR, 3),
    # Kim2091's AnimeSharpV4 frame in small: RCAN at 0-255 with its mean shifts, and the unshuffled 2x / 1x ones
    "rcan-4x": ("RCAN", dict(scale=4, n_resgroups=2, n_resblocks=2, n_feats=16, reduction=4), 0.05, ARCH_RCAN, 4),
    "rcan-3x-kernel5-no-norm": ("RCAN", dict(scale=3, n_resgroups=1, n_resblocks=1, n_feats=16, reduction=8,
                                             kernel_size=5, norm=False), 0.05, ARCH_RCAN, 3),
    "rcan-unshuffle-2x": ("RCAN", dict(scale=2, n_resgroups=1, n_resblocks=2, n_feats=16, reduction=4,
                                       unshuffle_mod=True), 0.05, ARCH_RCAN, 2),
    "rcan-unshuffle-1x": ("RCAN", dict(scale=1, n_resgroups=1, n_resblocks=1, n_feats=16, reduction=4,
                                       unshuffle_mod=True), 0.05, ARCH_RCAN, 1),
    # MoSR with each of its upsamplers: pixel shuffle, "geo ensemble" shuffle, DySample
    "mosr-ps-4x": ("MoSR", dict(upscale=4, n_block=2, dim=16, upsampler="ps"), 0.05, ARCH_MOSR, 4),
    "mosr-gps-2x": ("MoSR", dict(upscale=2, n_block=3, dim=16, upsampler="gps", kernel_size=5, expansion_ratio=2.0,
                                 conv_ratio=0.5), 0.05, ARCH_MOSR, 2),
    "mosr-dysample-3x": ("MoSR", dict(upscale=3, n_block=1, dim=16, upsampler="dys"), 0.05, ARCH_MOSR, 3),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_span_plksr_rcan_and_mosr_load_like_spandrel(case, tmp_path, spandrel_loader):
    name, kwargs, noise, arch, scale = CONV_CASES[case]
    reference = _spandrel_class(name)(**kwargs)
    gen = torch.Generator().manual_seed(len(case))
    with torch.no_grad():
        for p_name, p in reference.named_parameters():
            if "_mean." not in p_name:  # RCAN's mean shifts are fixed, as trained
                p.add_(torch.randn(p.shape, generator=gen) * noise)
    tensors = reference.eval().state_dict()
    spandrel_id = name if name in ("SPAN", "RCAN", "MoSR") else "PLKSR"
    _loads_like_spandrel(tmp_path, case, tensors, spandrel_loader, spandrel_id, arch, scale, (17, 13))


def test_span_recomputes_its_fused_convs_from_the_branches(spandrel_loader):
    """A file whose saved ``eval_conv`` is stale (or zero) gives the same picture: the original recomputes
    that conv from the branches on every call, and so does the module."""
    name, kwargs, noise, _, _ = CONV_CASES["span-2x-no-norm"]
    reference = _spandrel_class(name)(**kwargs)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * noise)
    tensors = dict(reference.eval().state_dict())
    x = torch.rand(1, 3, 9, 11, generator=torch.Generator().manual_seed(4))
    expected = _forward(reference, x)
    stale = {k: torch.zeros_like(v) if ".eval_conv." in k else v for k, v in tensors.items()}
    torch.testing.assert_close(_forward(upscaler_from_state_dict(stale).module, x), expected, atol=1e-5, rtol=1e-5)


def _plksr(**kwargs) -> dict[str, torch.Tensor]:
    from underpaint.models.upscaler_conv import PLKSR

    return dict(PLKSR(**{**dict(dim=16, blocks=1, scale=2, mixer="CCM", part=4, kernel=7), **kwargs}).state_dict())


@pytest.mark.parametrize("make,named", [
    (lambda: {**_plksr(), "feats.1.lk.convs.0.weight": torch.zeros(4, 4, 5, 5)}, "sparse large kernels"),
    (lambda: {**_plksr(), "feats.1.lk.conv.weight": torch.zeros(4, 4, 6, 6)}, "large kernel of 6 over 4 of 16"),
    (lambda: _plksr(rect=True, kernel=7), "large kernel of 7 over 4 of 16"),  # its k/3 side (2) would grow the picture
    (lambda: {**_plksr(), "feats.1.channe_mixer.2.weight": torch.zeros(16, 32, 5, 5)}, "3x3 and 5x5 convs"),
    (lambda: {**_plksr(), "feats.2.weight": torch.zeros(10, 16, 3, 3)}, "feats.2 gives 10 channels"),
    (lambda: _without(_plksr(mixer="Real", norm="group"), "feats.1.norm.weight"), "missing feats.1.norm.weight"),
])
def test_broken_plksr_files(tmp_path, make, named):
    assert_refused(tmp_path / "4x_broken_plksr.safetensors", make(), named)


# --------------------------------------------------------------------------------------------- Swin2SR


#: name → (spandrel Swin2SR arguments, input size (w, h), scale): the released models' upsamplers in small.
SWIN2SR_CASES = {
    "classical-2x": (dict(upscale=2, upsampler="pixelshuffle", embed_dim=12, depths=[2], num_heads=[3], window_size=4,
                          img_size=16), (21, 18), 2),
    "compressed-4x-aux-3conv": (dict(upscale=4, upsampler="pixelshuffle_aux", embed_dim=16, depths=[2, 2],
                                     num_heads=[2, 4], window_size=4, img_size=16, resi_connection="3conv"), (17, 13), 4),
    "lightweight-3x": (dict(upscale=3, upsampler="pixelshuffledirect", embed_dim=12, depths=[2], num_heads=[2],
                            window_size=4, img_size=16), (19, 14), 3),
    "realworld-4x": (dict(upscale=4, upsampler="nearest+conv", embed_dim=12, depths=[2], num_heads=[3], window_size=4,
                          img_size=16), (15, 18), 4),
    "jpeg-1x-window7": (dict(upscale=1, upsampler="", embed_dim=12, depths=[2], num_heads=[2], window_size=7,
                             img_size=28, img_range=255.0), (23, 20), 1),
}


@pytest.mark.parametrize("case", list(SWIN2SR_CASES))
def test_swin2sr_loads_like_spandrel(case, tmp_path, spandrel_loader):
    from spandrel.architectures.Swin2SR import Swin2SR

    kwargs, size, scale = SWIN2SR_CASES[case]
    tensors = _randomised(Swin2SR(**kwargs), seed=len(case))
    assert any(n.endswith(".relative_coords_table") for n in tensors)
    x, expected, atol = _loads_like_spandrel(tmp_path, case, tensors, spandrel_loader, "Swin2SR", ARCH_SWIN2SR, scale,
                                             size)
    # the saved buffers are derived from the window: a file keeping one of them is the same model
    lean = {k: v for k, v in tensors.items() if not k.endswith((".attn_mask", ".relative_position_index"))}
    torch.testing.assert_close(_forward(upscaler_from_state_dict(lean).module, x), expected, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("extra,named", [({"conv_after_body_hf.weight": torch.zeros(12, 12, 3, 3)}, "pixelshuffle_hf"),
                                         ({"absolute_pos_embed": torch.zeros(1, 256, 12)}, "absolute position")])
def test_swin2sr_variants_we_do_not_run_are_refused(tmp_path, extra, named, spandrel_loader):
    from spandrel.architectures.Swin2SR import Swin2SR

    kwargs, _, _ = SWIN2SR_CASES["classical-2x"]
    assert_refused(tmp_path / "Swin2SR_odd.safetensors", {**Swin2SR(**kwargs).state_dict(), **extra}, named)
