"""Upscaling models people download for hires. fix and Extras: ESRGAN (RRDBNet), Real-ESRGAN Compact, SwinIR,
HAT, DAT, SCUNet, SPAN, PLKSR, RCAN, MoSR, Swin2SR, ATD, DRCT, RGT, Real-CUGAN, OmniSR, SAFMN, CRAFT, SeemoRe,
FDAT and MoESR.

These are the files A1111 users keep in ``models/ESRGAN`` / ``models/RealESRGAN`` (ComfyUI:
``models/upscale_models``): "4x-UltraSharp", RealESRGAN_x4plus(_anime_6B), RealESRGAN_x2plus,
4x_foolhardy_Remacri, 4x_NMKD-Siax, realesr-general-x4v3, realesr-animevideov3, ... They come as
``.pth`` pickles (read with ``torch.load(weights_only=True)`` only; a file that needs code to load
is refused with :class:`UnsafeModelFile`) or ``.safetensors``, with no config: the network's
size and scale are worked out from the tensor names and shapes.

Architectures (written here as plain modules; the key layouts are those of the released files):

- **RRDBNet** (ESRGAN, Real-ESRGAN, BSRGAN). A first conv, ``nb`` residual-in-residual dense
  blocks (three dense blocks of five convs each, ``gc`` growth channels) and a trunk conv whose
  output is added to the first conv's, then one (nearest x2 → conv → LeakyReLU 0.2) stage per
  factor of two, an HR conv with LeakyReLU and a last conv. Key layouts read:

  - old ESRGAN: ``model.0`` (first conv), ``model.1.sub.{i}.RDB{1,2,3}.conv{1..5}.0``,
    ``model.1.sub.{nb}`` (trunk), the upsampling convs at ``model.{3k}``, the HR conv at
    ``model.{3n+2}`` and the last conv at ``model.{3n+4}`` (4x: 3, 6, 8, 10; 2x: 3, 5, 7; 1x: 2, 4);
  - Real-ESRGAN (BasicSR): ``conv_first``, ``body.{i}.rdb{1,2,3}.conv{1..5}``, ``conv_body``,
    ``conv_up1``, ``conv_up2``, ``conv_hr``, ``conv_last``, often nested under ``params_ema``
    (preferred) or ``params``;
  - BSRGAN / the later ESRGAN repository: ``conv_first``, ``RRDB_trunk.{i}.RDB{j}.conv{c}``,
    ``trunk_conv``, ``upconv{k}``, ``HRconv``, ``conv_last``.

  A first conv taking 4x or 16x the output channels marks a pixel-unshuffled input
  (RealESRGAN_x2plus: unshuffle 2, net scale 4 / 2; x1 models: unshuffle 4). The module pads such
  inputs to the multiple (reflection, or replication where the picture is too small to reflect)
  and crops the output back, so it takes any size like the others.
- **SRVGGNetCompact** (Real-ESRGAN "compact"): ``body.0`` conv, ``body.1`` PReLU, ``num_conv`` x
  (conv, PReLU), a last conv to ``out * upscale²`` channels, pixel shuffle, plus the
  nearest-upsampled input.
- **SwinIR** (``upscaler_swin.py``; A1111 keeps these in ``models/SwinIR``): ``conv_first``, RSTBs
  of Swin blocks at ``layers.N.residual_group.blocks.M``, ``conv_after_body`` and one of four
  upsamplers. Its width, depths, heads, window, MLP width, residual convs and upsampler (so its
  scale) come from the tensors; the saved ``relative_position_index`` and ``attn_mask`` buffers
  are derived, not read. A pixel-unshuffled input (``conv_first.1``) is refused by name.
- **HAT** (``upscaler_swin.py``; ``models/HAT``): SwinIR's frame with a channel-attention conv
  branch in every block (``conv_block.cab``) and an overlapping cross-attention block
  (``overlap_attn``) closing every group; pixel-shuffle upsampling. Widths, depths, heads, window,
  overlapping window (from its bias table) and scale come from the tensors; the saved
  ``relative_position_index_SA``/``_OCA`` buffers are derived.
- **DAT** (``upscaler_dat.py``; ``models/DAT``, A1111's "DAT x2/x3/x4"): residual groups of blocks
  alternating window attention over two transposed rectangular windows and attention between
  channels, each beside a depthwise-conv branch, with spatial-gate feed-forwards. Widths, depths,
  heads, window (from the first branch's saved offsets), upsampler and scale come from the tensors.
- **SCUNet** (``upscaler_scunet.py``; ``models/ScuNET``, A1111's "ScuNET GAN/PSNR"): a four-level
  U-Net of blocks that are half residual convs, half Swin blocks; a denoiser of scale 1. Its width
  and the blocks of each level come from the tensors.
- **SPAN**, **PLKSR** and **RealPLKSR** (``upscaler_conv.py``): the all-convolution networks of recent
  community models. Widths, block counts, kernels, mixers, norms, DySample and scale come from the
  tensors; PLKSR's sparse (dilated) large kernels are refused, their dilations not being in the files.
- **RCAN** (``upscaler_conv.py``): residual groups of channel-attention blocks; groups, blocks, width, kernel,
  reduction, upsampling, mean shifts and the pixel-unshuffled variants come from the tensors.
- **Swin2SR** (``upscaler_swin2.py``): SwinIR with Swin V2's post-norm cosine-attention blocks; as SwinIR's,
  plus the compressed-input models' "pixelshuffle_aux" upsampler, from the tensors.
- **MoSR** (``upscaler_conv.py``): MambaOut-style gated conv blocks and a conv shortcut; width, blocks, gate
  widths, kernel and upsampler (pixel shuffle, "geo ensemble" shuffle, DySample) come from the tensors.
- **ATD** and **DRCT** (``upscaler_atd.py``): SwinIR's frame with, for ATD, a learned token dictionary and
  grouped category attention beside the window attention, and for DRCT, densely connected Swin blocks.
- **RGT** (``upscaler_rgt.py``): DAT's frame with blocks alternating rectangular-window attention and
  attention to a recursively shrunk summary of the picture (RGT and RGT-S).
- **Real-CUGAN** (``upscaler_cugan.py``): bilibili's anime upscalers, two or three cascaded U-Nets (2x, 3x,
  4x, the "pro" models and the fast 2x network).
- **OmniSR** and **SAFMN** (``upscaler_light.py``): light networks of omni-scale (window and grid) attention,
  and of feature modulation over several scales.
- **CRAFT** and **SeemoRe** (``upscaler_craft.py``): CRAFT's rectangular-window attention beside its
  high-frequency convolution blocks; SeemoRe's mixture of low-rank experts routed per picture.
- **FDAT** and **MoESR** (``upscaler_fdat.py``).

The last ten are detected and planned in their own modules (:func:`_module_plans`).

Every module maps a float (N, 3, H, W) RGB tensor in [0, 1] to (N, 3, H*scale, W*scale), the
convention these models were trained with (and spandrel's). :func:`upscale_image` runs one on a
PIL picture, whole or in overlapping tiles blended with linear weights.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .upscaler_swin import pad_to_multiple

from ..errors import InvalidParameter, ModelError
from . import header
from .registry import UPSCALER_EXTENSIONS  # noqa: F401 - the file name endings listed as upscaling models

ARCH_ESRGAN = "ESRGAN"
ARCH_COMPACT = "Real-ESRGAN Compact"
ARCH_SWINIR = "SwinIR"
ARCH_HAT = "HAT"
ARCH_DAT = "DAT"
ARCH_SCUNET = "SCUNet"
ARCH_SPAN = "SPAN"
ARCH_PLKSR = "PLKSR"
ARCH_RCAN = "RCAN"
ARCH_MOSR = "MoSR"
ARCH_SWIN2SR = "Swin2SR"

#: What the error for an unknown file says is supported.
SUPPORTED_ARCHITECTURES = ("ESRGAN / Real-ESRGAN RRDBNet (old ESRGAN, Real-ESRGAN and BSRGAN key layouts), "
                           "Real-ESRGAN Compact (SRVGGNetCompact, PReLU), SwinIR, HAT, DAT, SCUNet, SPAN, "
                           "PLKSR, RealPLKSR, RCAN, MoSR, Swin2SR, ATD, DRCT, RGT, Real-CUGAN, OmniSR, SAFMN, "
                           "CRAFT, SeemoRe, FDAT and MoESR")

#: Nestings of released .pth files: BasicSR saves the EMA weights (the ones to use) next to the raw ones.
_NESTED_KEYS = ("params_ema", "params", "state_dict")


# --------------------------------------------------------------------------------------------- modules


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, 1, 1)


class _DenseBlock(nn.Module):
    """Five 3x3 convs, each seeing the block input and every earlier output; residual scaled by 0.2."""

    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.conv1 = _conv(nf, gc)
        self.conv2 = _conv(nf + gc, gc)
        self.conv3 = _conv(nf + 2 * gc, gc)
        self.conv4 = _conv(nf + 3 * gc, gc)
        self.conv5 = _conv(nf + 4 * gc, nf)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = F.leaky_relu(self.conv1(x), 0.2)
        x2 = F.leaky_relu(self.conv2(torch.cat((x, x1), 1)), 0.2)
        x3 = F.leaky_relu(self.conv3(torch.cat((x, x1, x2), 1)), 0.2)
        x4 = F.leaky_relu(self.conv4(torch.cat((x, x1, x2, x3), 1)), 0.2)
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class _RRDB(nn.Module):
    """Three dense blocks in a row; their output scaled by 0.2 is added to the input."""

    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.rdb1 = _DenseBlock(nf, gc)
        self.rdb2 = _DenseBlock(nf, gc)
        self.rdb3 = _DenseBlock(nf, gc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN's generator; ``unshuffle`` > 1 for the Real-ESRGAN x2/x1 variants fed a pixel-unshuffled input."""

    def __init__(self, *, in_ch: int, out_ch: int, nf: int, gc: int, nb: int, up_stages: int, unshuffle: int = 1):
        super().__init__()
        self.unshuffle = unshuffle
        self.scale = 2 ** up_stages // unshuffle
        self.conv_first = _conv(in_ch * unshuffle * unshuffle, nf)
        self.body = nn.Sequential(*(_RRDB(nf, gc) for _ in range(nb)))
        self.conv_body = _conv(nf, nf)
        self.ups = nn.ModuleList(_conv(nf, nf) for _ in range(up_stages))
        self.conv_hr = _conv(nf, nf)
        self.conv_last = _conv(nf, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(pad_to_multiple(x, self.unshuffle), self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for conv in self.ups:
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        out = self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))
        if self.unshuffle > 1:
            out = out[..., : h * self.scale, : w * self.scale]
        return out


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact network: convs with PReLU at low resolution, pixel shuffle, plus the
    nearest-upsampled input (the convs learn the residual)."""

    def __init__(self, *, in_ch: int, out_ch: int, nf: int, num_conv: int, upscale: int):
        super().__init__()
        self.scale = upscale
        layers: list[nn.Module] = [_conv(in_ch, nf), nn.PReLU(nf)]
        for _ in range(num_conv):
            layers += [_conv(nf, nf), nn.PReLU(nf)]
        layers.append(_conv(nf, out_ch * upscale * upscale))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.pixel_shuffle(self.body(x), self.scale)
        return out + F.interpolate(x, scale_factor=self.scale, mode="nearest")


# --------------------------------------------------------------------------------------------- detection


@dataclass
class _Plan:
    """What a state dict is: the module to build, and the file's name for each of its tensors."""

    arch: str
    scale: int
    build: Callable[[], nn.Module]
    describe: str
    #: The module's tensor name → the file's (identity where they agree).
    file_name: Callable[[str], str] = str
    #: Names in the file that the module derives itself (saved buffers such as SwinIR's attention
    #: masks): left out of the strict comparison and never loaded.
    derived: Callable[[str], bool] = lambda name: False


@dataclass(frozen=True)
class _RRDBLayout:
    """How one RRDB key layout names the layers. ``block`` is formatted with ``i`` (block), ``j``
    (dense block, 1-3), ``c`` (conv, 1-5); ``up`` with ``k`` (stage from 1) and ``k3`` (3k);
    ``trunk``, ``hr`` and ``last`` with ``nb``, ``hr`` (3n+2) and ``last`` (3n+4)."""

    first: str
    block: str
    trunk: str
    up: str
    hr: str
    last: str
    #: A block key that marks the layout, and a pattern whose group 1 is a block index.
    marker: str
    blocks: str
    #: Pattern whose group 1 numbers an upsampling conv (None: counted from the layer indices).
    ups: str | None


_OLD_LAYOUT = _RRDBLayout("model.0", "model.1.sub.{i}.RDB{j}.conv{c}.0", "model.1.sub.{nb}", "model.{k3}",
                          "model.{hr}", "model.{last}", "model.1.sub.0.RDB1.conv1.0.weight",
                          r"model\.1\.sub\.(\d+)\.RDB[123]\.", None)
_RRDB_LAYOUTS = (
    _OLD_LAYOUT,
    # Real-ESRGAN (BasicSR)
    _RRDBLayout("conv_first", "body.{i}.rdb{j}.conv{c}", "conv_body", "conv_up{k}", "conv_hr", "conv_last",
                "body.0.rdb1.conv1.weight", r"body\.(\d+)\.rdb[123]\.", r"conv_up(\d+)\.(?:weight|bias)"),
    # BSRGAN / the later ESRGAN repository
    _RRDBLayout("conv_first", "RRDB_trunk.{i}.RDB{j}.conv{c}", "trunk_conv", "upconv{k}", "HRconv", "conv_last",
                "RRDB_trunk.0.RDB1.conv1.weight", r"RRDB_trunk\.(\d+)\.RDB[123]\.", r"upconv(\d+)\.(?:weight|bias)"),
)
_OLD_TOP = re.compile(r"model\.(\d+)\.(?:weight|bias)")


def detect_upscaler(state_dict: Mapping[str, torch.Tensor], *, source: str = "state dict") -> tuple[str, int]:
    """(architecture, scale) of an upscaling model's tensors; :class:`ModelError` naming ``source``
    when they are not one of the supported architectures."""
    plan = _plan(unwrap_weights(state_dict), source)
    return plan.arch, plan.scale


def upscaler_from_state_dict(state_dict: Mapping[str, torch.Tensor], *, source: str = "state dict") -> UpscalerModel:
    """The model the tensors describe, built on the CPU in float32, weights loaded strictly, in eval mode."""
    tensors = unwrap_weights(state_dict)
    plan = _plan(tensors, source)
    module = plan.build()
    tensors = {name: t for name, t in tensors.items() if not plan.derived(name)}
    _load_strict(module, tensors, plan.file_name, source, plan.describe)
    module.eval().requires_grad_(False)
    return UpscalerModel(module=module, arch=plan.arch, scale=plan.scale)


def unwrap_weights(state_dict: Mapping) -> dict[str, torch.Tensor]:
    """The tensors of a state dict, out of BasicSR's ``params_ema``/``params`` nesting (EMA preferred)
    and without a ``module.`` prefix all names share (files saved from DataParallel)."""
    sd = state_dict
    for key in _NESTED_KEYS:
        if isinstance(sd.get(key), Mapping):
            sd = sd[key]
            break
    names = [str(k) for k in sd]
    for prefix in ("params_ema.", "params."):  # the same nesting, flattened into one safetensors file
        if any(n.startswith(prefix) for n in names):
            sd = {k[len(prefix):]: v for k, v in sd.items() if str(k).startswith(prefix)}
            break
    if sd and all(str(k).startswith("module.") for k in sd):
        sd = {str(k)[len("module."):]: v for k, v in sd.items()}
    return {str(k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _plan(sd: dict[str, torch.Tensor], source: str) -> _Plan:
    if any(".conv1x1." in n for n in sd):
        raise ModelError(f"{source}: ESRGAN+ (dense blocks with extra 1x1 convs) is not supported "
                         f"(supported: {SUPPORTED_ARCHITECTURES})")
    for layout in _RRDB_LAYOUTS:
        if layout.first + ".weight" in sd and layout.marker in sd:
            return _rrdb_plan(sd, source, layout)
    if _is_compact(sd):
        return _compact_plan(sd, source)
    if _is_swinir(sd):
        return _swinir_plan(sd, source)
    if _is_hat(sd):
        return _hat_plan(sd, source)
    if "conv_first.weight" in sd and "layers.0.residual_group.blocks.0.attn.logit_scale" in sd:
        return _swin2sr_plan(sd, source)
    if _is_dat(sd):
        return _dat_plan(sd, source)
    if "m_head.0.weight" in sd and "m_tail.0.weight" in sd:
        return _scunet_plan(sd, source)
    if "conv_1.sk.weight" in sd and "block_1.c1_r.sk.weight" in sd:
        return _span_plan(sd, source)
    if "feats.0.weight" in sd and ("feats.1.channe_mixer.0.weight" in sd or "feats.1.channel_mixer.0.weight" in sd):
        return _plksr_plan(sd, source)
    if "tail.1.weight" in sd and "body.0.body.0.body.3.conv_du.0.weight" in sd:
        return _rcan_plan(sd, source)
    if "gblocks.0.weight" in sd and "gblocks.1.fc1.weight" in sd:
        return _mosr_plan(sd, source)
    for plan in _module_plans():
        found = plan(sd, source)
        if found is not None:
            return found
    raise ModelError(f"{source}: not a supported upscaling model ({_what_else(sd)}supported: {SUPPORTED_ARCHITECTURES})")


def _module_plans() -> tuple[Callable[[dict[str, torch.Tensor], str], "_Plan | None"], ...]:
    """The architectures whose detection and plan live in their own modules: each plan returns None for a
    state dict that is not of its architecture."""
    from .upscaler_atd import atd_plan, drct_plan
    from .upscaler_craft import craft_plan, seemore_plan
    from .upscaler_cugan import cugan_plan
    from .upscaler_fdat import fdat_plan, moesr_plan
    from .upscaler_light import omnisr_plan, safmn_plan
    from .upscaler_rgt import rgt_plan

    return (atd_plan, drct_plan, cugan_plan, omnisr_plan, safmn_plan, rgt_plan, craft_plan, seemore_plan,
            fdat_plan, moesr_plan)


def _what_else(sd: Mapping[str, torch.Tensor]) -> str:
    """A hint at what a file is instead, where the names say so clearly."""
    names = list(sd)
    if not names:
        return "it holds no tensors; "
    if any(n.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner."))
           for n in names):
        return "it looks like a Stable Diffusion checkpoint; "
    if any(".residual_group." in n or "relative_position" in n or n.startswith("patch_embed.") for n in names):
        return "it looks like a transformer upscaler that is not one of these, or an incomplete one; "
    if "body.0.weight" in sd and "body.1.weight" not in sd:
        return "a Compact model without PReLU activations is not supported; "
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"tensors {shown}; "


def _rrdb_stages(sd: Mapping[str, torch.Tensor], source: str, layout: _RRDBLayout) -> int:
    """How many x2 upsampling stages: numbered convs in the named layouts; in the old one the index
    of the last layer, 3n+4."""
    if layout.ups is not None:
        ups = sorted({int(m.group(1)) for name in sd if (m := re.fullmatch(layout.ups, name))})
        if ups != list(range(1, len(ups) + 1)):
            raise ModelError(f"{source}: ESRGAN upsampling convs numbered {ups}; expected 1, 2, ... in a row")
        return len(ups)
    last = max(int(m.group(1)) for name in sd if (m := _OLD_TOP.fullmatch(name)))
    stages, rest = divmod(last - 4, 3)
    if rest or not 0 <= stages <= 3:
        raise ModelError(f"{source}: old-layout ESRGAN whose last layer is model.{last}; expected model.4 (1x), "
                         "model.7 (2x), model.10 (4x) or model.13 (8x)")
    return stages


def _rrdb_namer(layout: _RRDBLayout, nb: int, stages: int) -> Callable[[str], str]:
    fields = dict(nb=nb, hr=3 * stages + 2, last=3 * stages + 4)
    fixed = {"conv_first": layout.first, "conv_body": layout.trunk, "conv_hr": layout.hr, "conv_last": layout.last}

    def file_name(name: str) -> str:
        layer, _, kind = name.rpartition(".")
        if m := re.fullmatch(r"body\.(\d+)\.rdb([123])\.conv([1-5])", layer):
            i, j, c = m.groups()
            return f"{layout.block.format(i=i, j=j, c=c)}.{kind}"
        if m := re.fullmatch(r"ups\.(\d+)", layer):
            k = int(m.group(1)) + 1
            return f"{layout.up.format(k=k, k3=3 * k)}.{kind}"
        return f"{fixed[layer].format(**fields)}.{kind}"

    return file_name


def _rrdb_plan(sd: Mapping[str, torch.Tensor], source: str, layout: _RRDBLayout) -> _Plan:
    nb = 1 + max(int(m.group(1)) for name in sd if (m := re.match(layout.blocks, name)))
    stages = _rrdb_stages(sd, source, layout)
    file_name = _rrdb_namer(layout, nb, stages)

    def shape(name: str) -> tuple[int, ...]:
        tensor = sd.get(file_name(name))
        if tensor is None or tensor.ndim != 4:
            raise ModelError(f"{source}: ESRGAN model without a 4-D {file_name(name)!r}: incomplete or damaged file")
        return tuple(tensor.shape)

    nf, first_in = shape("conv_first.weight")[:2]
    gc = shape("body.0.rdb1.conv1.weight")[0]
    out_ch = shape("conv_last.weight")[0]
    unshuffle = 4 if first_in == 16 * out_ch else 2 if first_in == 4 * out_ch else 1
    in_ch = first_in // (unshuffle * unshuffle)
    _rgb_only(source, ARCH_ESRGAN, in_ch, out_ch)
    if 2 ** stages % unshuffle:
        raise ModelError(f"{source}: ESRGAN with {stages} upsampling stage(s) on a pixel-unshuffled input "
                         f"(factor {unshuffle}) would shrink the picture; not a usable upscaler")
    scale = 2 ** stages // unshuffle
    note = f", unshuffle {unshuffle}" if unshuffle > 1 else ""
    return _Plan(
        arch=ARCH_ESRGAN, scale=scale, file_name=file_name,
        describe=f"ESRGAN {scale}x (nf {nf}, nb {nb}, gc {gc}{note})",
        build=lambda: RRDBNet(in_ch=in_ch, out_ch=out_ch, nf=nf, gc=gc, nb=nb, up_stages=stages, unshuffle=unshuffle),
    )


def _is_compact(sd: Mapping[str, torch.Tensor]) -> bool:
    first, act = sd.get("body.0.weight"), sd.get("body.1.weight")
    return first is not None and act is not None and first.ndim == 4 and act.ndim == 1


def _compact_plan(sd: Mapping[str, torch.Tensor], source: str) -> _Plan:
    indices = {int(m.group(1)) for name in sd if (m := re.fullmatch(r"body\.(\d+)\.(weight|bias)", name))}
    last = max(indices)
    if last < 2 or last % 2:
        raise ModelError(f"{source}: Real-ESRGAN Compact model whose last layer is body.{last}; "
                         "expected an even index (the last conv, body.{2*num_conv+2})")
    last_weight = sd.get(f"body.{last}.weight")
    if last_weight is None or last_weight.ndim != 4:
        raise ModelError(f"{source}: Real-ESRGAN Compact model without a 4-D 'body.{last}.weight' (its last conv)")
    nf, in_ch = sd["body.0.weight"].shape[:2]
    num_conv = (last - 2) // 2
    shuffled = last_weight.shape[0]
    out_ch = in_ch
    upscale = round((shuffled / out_ch) ** 0.5) if shuffled % out_ch == 0 else 0
    if upscale < 1 or out_ch * upscale * upscale != shuffled:
        raise ModelError(f"{source}: Real-ESRGAN Compact model whose last conv gives {shuffled} channels; expected "
                         f"{out_ch} x scale² (e.g. {out_ch * 16} for 4x)")
    _rgb_only(source, ARCH_COMPACT, in_ch, out_ch)
    return _Plan(
        arch=ARCH_COMPACT, scale=upscale,
        describe=f"Real-ESRGAN Compact {upscale}x (nf {nf}, {num_conv} convs)",
        build=lambda: SRVGGNetCompact(in_ch=in_ch, out_ch=out_ch, nf=nf, num_conv=num_conv, upscale=upscale),
    )


_SWIN_BLOCK = re.compile(r"layers\.(\d+)\.residual_group\.blocks\.(\d+)\.")
#: Saved buffers SwinIR derives from the window and the picture's size (see upscaler_swin).
_SWIN_DERIVED = re.compile(r".*\.attn\.relative_position_index|.*\.attn_mask")


def _is_swinir(sd: Mapping[str, torch.Tensor]) -> bool:
    """SwinIR's names: RSTBs of Swin blocks under ``layers.N.residual_group.blocks.M`` after a
    ``conv_first``; HAT (channel-attention convs, overlapping attention) and Swin2SR (cosine
    attention) share the start of the layout and are told apart by their own layers."""
    names = list(sd)
    return ("conv_first.weight" in sd and "layers.0.residual_group.blocks.0.attn.relative_position_bias_table" in sd
            and not any(".conv_block." in n or ".overlap_attn." in n or ".attn.logit_scale" in n for n in names))


def _swin_layers(sd: Mapping[str, torch.Tensor], source: str, arch: str,
                 tensor: Callable[[str, int], torch.Tensor]) -> tuple[list[int], list[int], int]:
    """Depths and heads per group (blocks under ``layers.N.residual_group.blocks.M``, heads from
    each group's first bias table) and the window ((2w - 1)² bias rows) of SwinIR and HAT."""
    blocks: dict[int, set[int]] = {}
    for name in sd:
        if m := _SWIN_BLOCK.match(name):
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if sorted(blocks) != list(range(len(blocks))):
        raise ModelError(f"{source}: {arch} layers numbered {sorted(blocks)}; expected 0, 1, ... in a row")
    depths = [1 + max(blocks[i]) for i in range(len(blocks))]
    heads = [tensor(f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table", 2).shape[1]
             for i in range(len(blocks))]
    rows = tensor("layers.0.residual_group.blocks.0.attn.relative_position_bias_table", 2).shape[0]
    side = round(rows ** 0.5)
    if side * side != rows or side % 2 == 0:
        raise ModelError(f"{source}: {arch} bias table with {rows} rows; expected (2 x window - 1)²")
    return depths, heads, (side + 1) // 2


def _pixelshuffle_factors(sd: Mapping[str, torch.Tensor], source: str, arch: str, num_feat: int,
                          tensor: Callable[[str, int], torch.Tensor]) -> list[int]:
    """The factor (2 or 3) of each conv + pixel shuffle at ``upsample.0``, ``upsample.2``, ..."""
    factors, k = [], 0
    while f"upsample.{k}.weight" in sd:
        grown, _ = tensor(f"upsample.{k}.weight", 4).shape[:2]
        factor = round((grown / num_feat) ** 0.5)
        if factor not in (2, 3) or factor * factor * num_feat != grown:
            raise ModelError(f"{source}: {arch} upsampling conv upsample.{k} gives {grown} channels from "
                             f"{num_feat}; expected 4x or 9x (a pixel shuffle by 2 or 3)")
        factors.append(factor)
        k += 2
    return factors


def _tensor_getter(sd: Mapping[str, torch.Tensor], source: str, arch: str) -> Callable[[str, int], torch.Tensor]:
    def tensor(name: str, ndim: int) -> torch.Tensor:
        t = sd.get(name)
        if t is None or t.ndim != ndim:
            raise ModelError(f"{source}: {arch} model without a {ndim}-D {name!r}: incomplete or damaged file")
        return t

    return tensor


def _is_hat(sd: Mapping[str, torch.Tensor]) -> bool:
    return "conv_first.weight" in sd and "layers.0.residual_group.blocks.0.conv_block.cab.0.weight" in sd


#: Saved buffers HAT derives from its windows (and SwinIR-style ones, should a file hold them).
_HAT_DERIVED = re.compile(r"relative_position_index_(?:SA|OCA)|.*\.attn\.relative_position_index|.*\.attn_mask")


def _hat_plan(sd: Mapping[str, torch.Tensor], source: str) -> _Plan:
    """HAT's hyper-parameters from its tensors: as SwinIR's, plus the conv branch's widths
    (``conv_block.cab``), the overlapping window from the OCAB's bias table
    ((window + overlap - 1)² rows) and its MLP width."""
    from .upscaler_swin import HAT

    tensor = _tensor_getter(sd, source, ARCH_HAT)
    embed_dim, in_ch = tensor("conv_first.weight", 4).shape[:2]
    depths, heads, window = _swin_layers(sd, source, ARCH_HAT, tensor)
    rows = tensor("layers.0.residual_group.overlap_attn.relative_position_bias_table", 2).shape[0]
    overlap = round(rows ** 0.5) - window + 1
    if (overlap + window - 1) ** 2 != rows or overlap < window:
        raise ModelError(f"{source}: HAT overlapping-attention bias table with {rows} rows; expected "
                         f"(window + overlap - 1)² with an overlap of at least the window ({window})")
    compressed = tensor("layers.0.residual_group.blocks.0.conv_block.cab.0.weight", 4).shape[0]
    squeezed = tensor("layers.0.residual_group.blocks.0.conv_block.cab.3.attention.1.weight", 4).shape[0]
    mlp_hidden = tensor("layers.0.residual_group.blocks.0.mlp.fc1.weight", 2).shape[0]
    overlap_hidden = tensor("layers.0.residual_group.overlap_attn.mlp.fc1.weight", 2).shape[0]
    num_feat = tensor("conv_before_upsample.0.weight", 4).shape[0]
    factors = _pixelshuffle_factors(sd, source, ARCH_HAT, num_feat, tensor)
    out_ch = tensor("conv_last.weight", 4).shape[0]
    _rgb_only(source, ARCH_HAT, in_ch, out_ch)
    scale = math.prod(factors)
    conv_after_body = "conv_after_body.weight" in sd
    return _Plan(
        arch=ARCH_HAT, scale=scale, derived=_HAT_DERIVED.fullmatch,
        describe=(f"HAT {scale}x (embed {embed_dim}, depths {depths}, heads {heads}, window {window}, "
                  f"overlap {overlap})"),
        build=lambda: HAT(embed_dim=embed_dim, depths=depths, heads=heads, window=window, overlap=overlap,
                          mlp_hidden=mlp_hidden, overlap_hidden=overlap_hidden, compressed=compressed,
                          squeezed=squeezed, factors=factors, num_feat=num_feat, conv_after_body=conv_after_body,
                          patch_norm="patch_embed.norm.weight" in sd,
                          qkv_bias="layers.0.residual_group.blocks.0.attn.qkv.bias" in sd),
    )


def _is_dat(sd: Mapping[str, torch.Tensor]) -> bool:
    """DAT's frame (``before_RG``); RGT shares it and is told apart by its own layers."""
    from .upscaler_rgt import is_rgt

    return "conv_first.weight" in sd and "before_RG.1.weight" in sd and not is_rgt(sd)


#: Saved buffers DAT derives from its window (and PyTorch's batch-norm counters, which it does not use).
_DAT_DERIVED = re.compile(r".*\.attns\.[01]\.(?:rpe_biases|relative_position_index)|.*\.attn_mask_[01]"
                          r"|.*\.num_batches_tracked")
_DAT_BLOCK = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.")
#: The largest window side DAT's files are read with (the released ones use 8 x 32; 64 bounds the work).
_DAT_MAX_SPLIT = 64


def _dat_split(sd: Mapping[str, torch.Tensor], source: str, tensor: Callable[[str, int], torch.Tensor]
               ) -> tuple[int, int]:
    """DAT's (height, width) window: one more than the largest offset, the last row of the first
    branch's ``rpe_biases`` (the offsets grid, (2h - 1)(2w - 1) rows of (dy, dx))."""
    name = "layers.0.blocks.0.attn.attns.0.rpe_biases"
    offsets = tensor(name, 2)
    if (offsets.shape[0] < 1 or offsets.shape[1] != 2 or not offsets.is_floating_point()
            or not torch.isfinite(offsets[-1]).all()):
        raise ModelError(f"{source}: DAT {name} is {tuple(offsets.shape)} {offsets.dtype}; expected (rows, 2) "
                         "offsets")
    last = offsets[-1].float()
    split = (int(last[0]) + 1, int(last[1]) + 1)
    if (not torch.equal(last, last.round()) or not all(1 <= s <= _DAT_MAX_SPLIT for s in split)
            or offsets.shape[0] != (2 * split[0] - 1) * (2 * split[1] - 1) or max(split) % min(split)):
        raise ModelError(f"{source}: DAT {name} does not describe a window of 1 to {_DAT_MAX_SPLIT} pixels a side, "
                         "one side a multiple of the other")
    return split


def _dat_plan(sd: Mapping[str, torch.Tensor], source: str) -> _Plan:
    """DAT's hyper-parameters from its tensors: the width from the first conv; per group the depth
    (blocks under ``layers.N.blocks.M``), the window branches' heads (their bias MLPs' outputs) and
    the channel attention's (its ``temperature``); the window (:func:`_dat_split`), feed-forward and
    bias-MLP widths; the residual convs and upsampler (so the scale)."""
    from .upscaler_dat import DAT

    tensor = _tensor_getter(sd, source, ARCH_DAT)
    dim, in_ch = tensor("conv_first.weight", 4).shape[:2]
    blocks: dict[int, set[int]] = {}
    for name in sd:
        if m := _DAT_BLOCK.match(name):
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise ModelError(f"{source}: DAT groups numbered {sorted(blocks)}; expected 0, 1, ... in a row")
    depths = [1 + max(blocks[g]) for g in range(len(blocks))]
    spatial = [tensor(f"layers.{g}.blocks.0.attn.attns.0.pos.pos3.2.weight", 2).shape[0] for g in range(len(depths))]
    channel = [tensor(f"layers.{g}.blocks.1.attn.temperature", 3).shape[0] if depths[g] > 1 else 2 * spatial[g]
               for g in range(len(depths))]
    if dim % 2 or dim < 16 or any((dim // 2) % h for h in spatial) or any(dim % h for h in channel):
        raise ModelError(f"{source}: DAT of width {dim} with heads {spatial} (window) and {channel} (channel); "
                         "expected an even width of at least 16 that the heads divide")
    split = _dat_split(sd, source, tensor)
    hidden = tensor("layers.0.blocks.0.ffn.fc1.weight", 2).shape[0]
    pos_width = tensor("layers.0.blocks.0.attn.attns.0.pos.pos_proj.weight", 2).shape[0]
    three_conv = _three_conv(sd, source, ARCH_DAT)
    num_feat = 64
    if "conv_last.weight" in sd:
        upsampler = "pixelshuffle"
        num_feat = tensor("conv_before_upsample.0.weight", 4).shape[0]
        factors = _pixelshuffle_factors(sd, source, ARCH_DAT, num_feat, tensor)
        out_ch = tensor("conv_last.weight", 4).shape[0]
    else:
        upsampler, out_ch = "pixelshuffledirect", in_ch
        factors = [_direct_scale(source, ARCH_DAT, out_ch, tensor)]
    _rgb_only(source, ARCH_DAT, in_ch, out_ch)
    scale = math.prod(factors)
    return _Plan(
        arch=ARCH_DAT, scale=scale, derived=_DAT_DERIVED.fullmatch,
        describe=f"DAT {scale}x (dim {dim}, depths {depths}, heads {channel}, window {split[0]}x{split[1]})",
        build=lambda: DAT(dim=dim, depths=depths, spatial_heads=spatial, channel_heads=channel, split=split,
                          hidden=hidden, pos_width=pos_width, upsampler=upsampler, factors=factors,
                          num_feat=num_feat, three_conv=three_conv,
                          qkv_bias="layers.0.blocks.0.attn.qkv.bias" in sd),
    )


#: SCUNet's levels, top to bottom and back, and how many of each one's entries are (strided or
#: transposed) convs rather than blocks.
_SCUNET_LEVELS = (("m_down1", 1), ("m_down2", 1), ("m_down3", 1), ("m_body", 0), ("m_up3", 1), ("m_up2", 1),
                  ("m_up1", 1))


def _scunet_plan(sd: Mapping[str, torch.Tensor], source: str) -> _Plan:
    """SCUNet's width from its first conv and each level's block count from the entries under it
    (the down levels end with their strided conv, the up levels start with their transposed one)."""
    from .upscaler_scunet import HEAD_DIM, SCUNet

    tensor = _tensor_getter(sd, source, ARCH_SCUNET)
    dim, in_ch = tensor("m_head.0.weight", 4).shape[:2]
    out_ch = tensor("m_tail.0.weight", 4).shape[0]
    _rgb_only(source, ARCH_SCUNET, in_ch, out_ch)
    if dim % (2 * HEAD_DIM):
        raise ModelError(f"{source}: SCUNet of width {dim}; expected a multiple of {2 * HEAD_DIM} (its blocks' "
                         f"halves are heads of {HEAD_DIM} channels)")
    config = []
    for level, others in _SCUNET_LEVELS:
        entries = {int(m.group(1)) for name in sd if (m := re.match(rf"{level}\.(\d+)\.", name))}
        if entries != set(range(len(entries))) or len(entries) < others:
            raise ModelError(f"{source}: SCUNet {level} entries numbered {sorted(entries)}; expected 0, 1, ... "
                             "in a row")
        config.append(len(entries) - others)
    return _Plan(
        arch=ARCH_SCUNET, scale=1, describe=f"SCUNet (dim {dim}, blocks {config})",
        build=lambda: SCUNet(dim=dim, config=config),
    )


def _span_plan(sd: Mapping[str, torch.Tensor], source: str) -> _Plan:
    """SPAN's width from its first layer's shortcut, its scale from the last conv; a ``no_norm`` entry
    marks a model fed plain 0-1 values."""
    from .upscaler_conv import SPAN

    tensor = _tensor_getter(sd, source, ARCH_SPAN)
    dim, in_ch = tensor("conv_1.sk.weight", 4).shape[:2]
    shuffled = tensor("upsampler.0.weight", 4).shape[0]
    scale = round((shuffled / 3) ** 0.5)
    if scale < 1 or 3 * scale * scale != shuffled:
        raise ModelError(f"{source}: SPAN upsampler.0 gives {shuffled} channels; expected 3 x scale²")
    _rgb_only(source, ARCH_SPAN, in_ch, 3)
    norm = "no_norm" not in sd
    return _Plan(arch=ARCH_SPAN, scale=scale, derived=lambda name: name == "no_norm",
                 describe=f"SPAN {scale}x (dim {dim}{'' if norm else ', no norm'})",
                 build=lambda: SPAN(dim=dim, upscale=scale, norm=norm))


#: The largest large-kernel side PLKSR files are read with (the released ones use 17).
_PLKSR_MAX_KERNEL = 63


def _plksr_plan(sd: Mapping[str, torch.Tensor], source: str) -> _Plan:
    """PLKSR's or RealPLKSR's hyper-parameters from the tensors: the width from the first conv, the
    blocks from the entries of ``feats``, the scale from the last conv; the mixer from its kernels
    (PLKSR, which spells it ``channe_mixer``), the large kernel and the part it covers from ``lk``,
    the attention, norms and DySample from their tensors. SparsePLK blocks are refused: their
    dilations are not in the file."""
    from .upscaler_conv import PLKSR

    tensor = _tensor_getter(sd, source, ARCH_PLKSR)
    real = "feats.1.channel_mixer.0.weight" in sd
    dim, in_ch = tensor("feats.0.weight", 4).shape[:2]
    entries = sorted({int(m.group(1)) for name in sd if (m := re.match(r"feats\.(\d+)\.", name))})
    last = entries[-1]
    blocks = last - 2 if real else last - 1
    shuffled = tensor(f"feats.{last}.weight", 4).shape[0]
    scale = round((shuffled / 3) ** 0.5)
    if scale < 1 or 3 * scale * scale != shuffled:
        raise ModelError(f"{source}: PLKSR feats.{last} gives {shuffled} channels; expected 3 x scale²")
    _rgb_only(source, ARCH_PLKSR, in_ch, 3)
    if real:
        mixer = "Real"
    else:
        kernels = (tensor("feats.1.channe_mixer.0.weight", 4).shape[2],
                   tensor("feats.1.channe_mixer.2.weight", 4).shape[2])
        mixer = {(3, 1): "CCM", (1, 3): "ICCM", (3, 3): "DCCM"}.get(kernels, "")
        if not mixer:
            raise ModelError(f"{source}: PLKSR channel mixer with {kernels[0]}x{kernels[0]} and "
                             f"{kernels[1]}x{kernels[1]} convs; expected 3+1, 1+3 or 3+3")
    if "feats.1.lk.convs.0.weight" in sd:
        raise ModelError(f"{source}: PLKSR with sparse large kernels (lk.convs) is not supported: their dilations "
                         "are not recorded in the file")
    rect = "feats.1.lk.mn_conv.weight" in sd
    lk = tensor("feats.1.lk.mn_conv.weight" if rect else "feats.1.lk.conv.weight", 4)
    part, kernel = lk.shape[0], lk.shape[2]
    if kernel % 2 == 0 or not 1 <= kernel <= _PLKSR_MAX_KERNEL or not 1 <= part <= dim or (rect and kernel // 3 % 2 == 0):
        raise ModelError(f"{source}: PLKSR large kernel of {kernel} over {part} of {dim} channels; expected an odd "
                         f"size up to {_PLKSR_MAX_KERNEL} (a third of it odd too, for rectangular ones) over 1 to "
                         "all of them")
    norm = ("layer" if "feats.1.layer_norm.weight" in sd else "group") if real else ""
    if norm == "group" and dim % 4:
        raise ModelError(f"{source}: RealPLKSR of width {dim}; its group norms need a multiple of 4")
    dysample = real and "to_img.offset.weight" in sd
    kind = "RealPLKSR" if real else f"PLKSR ({mixer})"
    return _Plan(
        arch=ARCH_PLKSR, scale=scale, derived=lambda name: name == "to_img.init_pos",
        describe=f"{kind} {scale}x (dim {dim}, {blocks} blocks, kernel {kernel}{', DySample' if dysample else ''})",
        build=lambda: PLKSR(dim=dim, blocks=blocks, scale=scale, mixer=mixer, part=part, kernel=kernel, rect=rect,
                            attention="feats.1.attn.f.0.weight" in sd, norm=norm, dysample=dysample),
    )


def _rcan_plan(sd: Mapping[str, torch.Tensor], source: str) -> _Plan:
    """RCAN's groups and blocks from the entries of ``body``, its width and kernel from the first conv (``head.1``
    after a pixel unshuffle), the channel attention's reduction, the upsampler's factors; ``sub_mean`` marks the
    0-255 models."""
    from .upscaler_conv import RCAN

    tensor = _tensor_getter(sd, source, ARCH_RCAN)
    unshuffled = "head.1.weight" in sd
    head = tensor("head.1.weight" if unshuffled else "head.0.weight", 4)
    dim, in_ch, kernel = head.shape[0], head.shape[1], head.shape[2]
    # the last entry of the body (and of each group's) is its closing conv
    groups = max(int(m.group(1)) for n in sd if (m := re.match(r"body\.(\d+)\.", n)))
    blocks = max(int(m.group(1)) for n in sd if (m := re.match(r"body\.0\.body\.(\d+)\.", n)))
    reduced = tensor("body.0.body.0.body.3.conv_du.0.weight", 4).shape[0]
    factors = []
    while f"tail.0.{2 * len(factors)}.weight" in sd:
        grown = tensor(f"tail.0.{2 * len(factors)}.weight", 4).shape[0]
        factor = round((grown / dim) ** 0.5)
        if factor not in (2, 3) or factor * factor * dim != grown:
            raise ModelError(f"{source}: RCAN upsampling conv tail.0.{2 * len(factors)} gives {grown} channels from "
                             f"{dim}; expected 4x or 9x")
        factors.append(factor)
    out_ch = tensor("tail.1.weight", 4).shape[0]
    unshuffle = 1
    if unshuffled:
        unshuffle = math.isqrt(in_ch // 3)
        if 3 * unshuffle * unshuffle != in_ch or math.prod(factors) % unshuffle:
            raise ModelError(f"{source}: RCAN head.1 takes {in_ch} channels; expected 3 x a square dividing the "
                             f"upsampling ({math.prod(factors)}x)")
        in_ch = 3
    _rgb_only(source, ARCH_RCAN, in_ch, out_ch)
    if kernel % 2 == 0 or groups < 1 or blocks < 0:
        raise ModelError(f"{source}: RCAN of kernel {kernel}, {groups} groups of {blocks} blocks: not a usable model")
    scale = math.prod(factors) // unshuffle
    return _Plan(
        arch=ARCH_RCAN, scale=scale,
        describe=f"RCAN {scale}x (dim {dim}, {groups} groups of {blocks} blocks{', unshuffle' if unshuffled else ''})",
        build=lambda: RCAN(dim=dim, groups=groups, blocks=blocks, kernel=kernel, reduced=reduced, factors=factors,
                           norm="sub_mean.weight" in sd, unshuffle=unshuffle),
    )


def _mosr_plan(sd: Mapping[str, torch.Tensor], source: str) -> _Plan:
    """MoSR's width from its first conv, its blocks from the entries of ``gblocks`` (five closing layers after
    them), the gated blocks' widths and kernel from the first one, the upsampler and scale from its tensors."""
    from .upscaler_conv import MoSR

    tensor = _tensor_getter(sd, source, ARCH_MOSR)
    dim, in_ch = tensor("gblocks.0.weight", 4).shape[:2]
    _rgb_only(source, ARCH_MOSR, in_ch, 3)
    entries = max(int(m.group(1)) for n in sd if (m := re.match(r"gblocks\.(\d+)\.", n))) + 1
    blocks = entries - 6
    hidden = tensor("gblocks.1.fc1.weight", 4).shape[0] // 2
    conv = tensor("gblocks.1.conv.weight", 4)
    conv_channels, kernel = conv.shape[0], conv.shape[2]
    if blocks < 1 or kernel % 2 == 0 or not 1 <= conv_channels <= hidden:
        raise ModelError(f"{source}: MoSR with {blocks} blocks, a {kernel}-wide depthwise conv over {conv_channels} "
                         f"of {hidden} channels: not a usable model")
    gps_kernel = 3
    if "upsampler.offset.weight" in sd:
        upsampler, shuffled = "dys", tensor("upsampler.offset.weight", 4).shape[0] // 8
    elif "upsampler.in_to_k.weight" in sd:
        weight = tensor("upsampler.in_to_k.weight", 4)
        upsampler, shuffled, gps_kernel = "gps", weight.shape[0] // 8 // 3, weight.shape[2]
    else:
        upsampler, shuffled = "ps", tensor("upsampler.0.weight", 4).shape[0] // 3
    scale = math.isqrt(shuffled)
    if scale < 1 or scale * scale != shuffled:
        raise ModelError(f"{source}: MoSR upsampler ({upsampler}) for {shuffled} sub-pixels; expected a square")
    if upsampler == "dys" and dim % 4:
        raise ModelError(f"{source}: MoSR of width {dim} with DySample; expected a multiple of its 4 groups")
    return _Plan(
        arch=ARCH_MOSR, scale=scale, derived=lambda name: name == "upsampler.init_pos",
        describe=f"MoSR {scale}x (dim {dim}, {blocks} blocks, {upsampler})",
        build=lambda: MoSR(dim=dim, blocks=blocks, hidden=hidden, conv_channels=conv_channels, kernel=kernel,
                           scale=scale, upsampler=upsampler, gps_kernel=gps_kernel),
    )


#: Saved buffers Swin2SR derives from its window.
_SWIN2_DERIVED = re.compile(r".*\.attn\.(?:relative_coords_table|relative_position_index)|.*\.attn_mask")


def _swin2sr_plan(sd: Mapping[str, torch.Tensor], source: str) -> _Plan:
    """Swin2SR's hyper-parameters: as SwinIR's, the heads from each group's ``logit_scale`` and the window
    from the saved coordinates table ((2w - 1)² offsets); the "pixelshuffle_aux" upsampler from its
    ``conv_bicubic``. Its two-branch "pixelshuffle_hf" variant, absolute position embeddings and patches
    larger than a pixel are refused."""
    from .upscaler_swin2 import Swin2SR

    tensor = _tensor_getter(sd, source, ARCH_SWIN2SR)
    embed_dim, in_ch = tensor("conv_first.weight", 4).shape[:2]
    for name, what in (("conv_after_body_hf.weight", "its two-branch \"pixelshuffle_hf\" upsampler"),
                       ("absolute_pos_embed", "absolute position embeddings")):
        if name in sd:
            raise ModelError(f"{source}: Swin2SR with {what} is not supported")
    if tensor("patch_embed.proj.weight", 4).shape[-1] != 1:
        raise ModelError(f"{source}: Swin2SR with patches larger than one pixel is not supported")
    blocks: dict[int, set[int]] = {}
    for name in sd:
        if m := _SWIN_BLOCK.match(name):
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if sorted(blocks) != list(range(len(blocks))):
        raise ModelError(f"{source}: Swin2SR layers numbered {sorted(blocks)}; expected 0, 1, ... in a row")
    depths = [1 + max(blocks[i]) for i in range(len(blocks))]
    heads = [tensor(f"layers.{i}.residual_group.blocks.0.attn.logit_scale", 3).shape[0] for i in range(len(depths))]
    table = sd.get("layers.0.residual_group.blocks.0.attn.relative_coords_table")
    index = sd.get("layers.0.residual_group.blocks.0.attn.relative_position_index")
    if isinstance(table, torch.Tensor) and table.ndim == 4:
        window = (table.shape[1] + 1) // 2
    elif isinstance(index, torch.Tensor) and index.ndim == 2:
        window = math.isqrt(index.shape[0])
    else:
        raise ModelError(f"{source}: Swin2SR model without its window's coordinates table: incomplete or damaged file")
    if not 1 <= window <= 64:
        raise ModelError(f"{source}: Swin2SR window of {window}; expected 1 to 64")
    mlp_hidden = tensor("layers.0.residual_group.blocks.0.mlp.fc1.weight", 2).shape[0]
    three_conv = _three_conv(sd, source, ARCH_SWIN2SR)
    num_feat, out_ch = 64, in_ch
    if "conv_bicubic.weight" in sd or "conv_before_upsample.0.weight" in sd:
        upsampler = "pixelshuffle_aux" if "conv_bicubic.weight" in sd else "pixelshuffle"
        num_feat = tensor("conv_before_upsample.0.weight", 4).shape[0]
        factors = _pixelshuffle_factors(sd, source, ARCH_SWIN2SR, num_feat, tensor)
        out_ch = tensor("conv_last.weight", 4).shape[0]
        if "conv_hr.weight" in sd:
            upsampler, factors = "nearest+conv", [2, 2]
    elif "upsample.0.weight" in sd:
        upsampler, factors = "pixelshuffledirect", [_direct_scale(source, ARCH_SWIN2SR, in_ch, tensor)]
    else:
        upsampler, factors = "", []
        out_ch = tensor("conv_last.weight", 4).shape[0]
    _rgb_only(source, ARCH_SWIN2SR, in_ch, out_ch)
    scale = math.prod(factors)
    img_range = 255.0 if window == 7 else 1.0  # the JPEG models (spandrel's rule, as for SwinIR)
    return _Plan(
        arch=ARCH_SWIN2SR, scale=scale, derived=_SWIN2_DERIVED.fullmatch,
        describe=(f"Swin2SR {scale}x (embed {embed_dim}, depths {depths}, heads {heads}, window {window}, "
                  f"{upsampler or 'no upsampler'})"),
        build=lambda: Swin2SR(embed_dim=embed_dim, depths=depths, heads=heads, window=window, mlp_hidden=mlp_hidden,
                              upsampler=upsampler, factors=factors, num_feat=num_feat, three_conv=three_conv,
                              patch_norm="patch_embed.norm.weight" in sd,
                              qkv_bias="layers.0.residual_group.blocks.0.attn.q_bias" in sd, img_range=img_range),
    )


def _swinir_plan(sd: Mapping[str, torch.Tensor], source: str) -> _Plan:
    """SwinIR's hyper-parameters from its tensors: widths from the first conv and the MLPs, depth
    and heads per RSTB from the blocks and their bias tables, the window from the table's size
    ((2w - 1)² rows), the upsampler and scale from the layers after the body."""
    from .upscaler_swin import SwinIR

    tensor = _tensor_getter(sd, source, ARCH_SWINIR)
    if "conv_first.1.weight" in sd:
        raise ModelError(f"{source}: SwinIR with a pixel-unshuffled input (conv_first.1) is not supported "
                         f"(supported: {SUPPORTED_ARCHITECTURES})")
    embed_dim, in_ch = tensor("conv_first.weight", 4).shape[:2]
    depths, heads, window = _swin_layers(sd, source, ARCH_SWINIR, tensor)
    mlp_hidden = tensor("layers.0.residual_group.blocks.0.mlp.fc1.weight", 2).shape[0]
    three_conv = _three_conv(sd, source, ARCH_SWINIR)
    upsampler, num_feat, factors, out_ch = swin_tail(sd, source, ARCH_SWINIR, in_ch, tensor)
    _rgb_only(source, ARCH_SWINIR, in_ch, out_ch)
    scale = math.prod(factors)
    # SwinIR's JPEG artefact models are the ones with window 7 and work on 0-255 values (spandrel's rule too)
    img_range = 255.0 if window == 7 else 1.0
    three = ", 3conv" if three_conv else ""
    return _Plan(
        arch=ARCH_SWINIR, scale=scale, derived=_SWIN_DERIVED.fullmatch,
        describe=(f"SwinIR {scale}x (embed {embed_dim}, depths {depths}, heads {heads}, window {window}, "
                  f"{upsampler or 'no upsampler'}{three})"),
        build=lambda: SwinIR(embed_dim=embed_dim, depths=depths, heads=heads, window=window, mlp_hidden=mlp_hidden,
                             upsampler=upsampler, factors=factors, num_feat=num_feat, three_conv=three_conv,
                             patch_norm="patch_embed.norm.weight" in sd,
                             qkv_bias="layers.0.residual_group.blocks.0.attn.qkv.bias" in sd, img_range=img_range),
    )


def swin_tail(sd: Mapping[str, torch.Tensor], source: str, arch: str, in_ch: int,
              tensor: Callable[[str, int], torch.Tensor]) -> tuple[str, int, list[int], int]:
    """(upsampler, its width, factors, output channels) of SwinIR's four tails, which ATD shares: nearest
    upsampling and convs (``conv_up1``, ``conv_up2`` ...), convs and pixel shuffles, one conv and one pixel
    shuffle (``upsample.0``), or none (a 1x model's ``conv_last``)."""
    if "conv_before_upsample.0.weight" in sd:
        num_feat = tensor("conv_before_upsample.0.weight", 4).shape[0]
        out_ch = tensor("conv_last.weight", 4).shape[0]
        if "conv_up1.weight" in sd:  # one x2 stage per conv_upN (a damaged one is named by the strict load)
            stages = {m.group(1) for n in sd if (m := re.fullmatch(r"conv_up(\d+)\.\w+", n))}
            return "nearest+conv", num_feat, [2] * len(stages), out_ch
        return "pixelshuffle", num_feat, _pixelshuffle_factors(sd, source, arch, num_feat, tensor), out_ch
    if "upsample.0.weight" in sd:
        return "pixelshuffledirect", 64, [_direct_scale(source, arch, in_ch, tensor)], in_ch
    return "", 64, [], tensor("conv_last.weight", 4).shape[0]


def _direct_scale(source: str, arch: str, out_ch: int, tensor: Callable[[str, int], torch.Tensor]) -> int:
    """The scale of a one-step pixel shuffle (``upsample.0`` gives ``out_ch`` x scale² channels)."""
    shuffled = tensor("upsample.0.weight", 4).shape[0]
    scale = round((shuffled / out_ch) ** 0.5)
    if scale < 1 or scale * scale * out_ch != shuffled:
        raise ModelError(f"{source}: {arch} upsample.0 gives {shuffled} channels; expected {out_ch} x scale²")
    return scale


def _three_conv(sd: Mapping[str, torch.Tensor], source: str, arch: str) -> bool:
    """Whether SwinIR's or DAT's residual convs are "3conv" (``conv_after_body.0``) rather than one conv."""
    if "conv_after_body.weight" in sd:
        return False
    if "conv_after_body.0.weight" in sd:
        return True
    raise ModelError(f"{source}: {arch} model without 'conv_after_body': incomplete or damaged file")


def _rgb_only(source: str, arch: str, in_ch: int, out_ch: int) -> None:
    if (in_ch, out_ch) != (3, 3):
        raise ModelError(f"{source}: {arch} model for {in_ch}-channel input and {out_ch}-channel output; "
                         "only RGB models (3 in, 3 out) are supported")


def _load_strict(module: nn.Module, sd: dict[str, torch.Tensor], file_name: Callable[[str], str], source: str,
                 describe: str) -> None:
    """Load every tensor into ``module``; missing, extra or mis-shaped ones are one :class:`ModelError`
    that names them as the file does."""
    expected = {file_name(name): (name, tensor) for name, tensor in module.state_dict().items()}

    def listed(names: list[str]) -> str:
        return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")

    problems = []
    missing = [n for n in expected if n not in sd]
    extra = [n for n in sd if n not in expected]
    wrong = [n for n, (_, t) in expected.items() if n in sd and tuple(sd[n].shape) != tuple(t.shape)]
    if missing:
        problems.append(f"missing {listed(missing)}")
    if extra:
        problems.append(f"unexpected {listed(extra)}")
    if wrong:
        n = wrong[0]
        problems.append(f"{len(wrong)} tensor(s) of the wrong shape, e.g. {n} is {tuple(sd[n].shape)}, "
                        f"expected {tuple(expected[n][1].shape)}")
    if problems:
        raise ModelError(f"{source}: tensors do not fit the {describe} they describe: {'; '.join(problems)}")
    try:
        module.load_state_dict({expected[n][0]: t for n, t in sd.items()}, strict=True)
    except RuntimeError as exc:  # e.g. a tensor that cannot be copied into a float parameter
        raise ModelError(f"{source}: cannot load the {describe}: {header._first_line(exc)}") from None


# --------------------------------------------------------------------------------------------- files


@dataclass
class UpscalerModel:
    """A loaded upscaling model: its module maps (N, 3, H, W) RGB in [0, 1] to (N, 3, H*scale, W*scale)."""

    module: torch.nn.Module
    #: The architecture: one of the ARCH_* names above.
    arch: str
    #: Output size / input size.
    scale: int
    path: Path | None = None

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> UpscalerModel:
        """Move (and cast) the module in place; returns self."""
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        if kwargs:
            self.module.to(**kwargs)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype


def load_upscaler(path: str | Path, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> UpscalerModel:
    """The upscaling model in a ``.pth``/``.pt``/``.safetensors`` file, on ``device`` in ``dtype``."""
    p = Path(path)
    model = upscaler_from_state_dict(read_weights(p), source=str(p))
    model.path = p
    return model.to(device=device, dtype=dtype)


def read_weights(p: Path) -> Mapping[str, object]:
    """The file's tensors, keeping the ``params_ema``/``params`` nesting of BasicSR's .pth files
    (header's flat reader would keep only top-level tensors); pickle-based files are read with
    ``torch.load(weights_only=True)``, refused (:class:`UnsafeModelFile`) when they need code."""
    kind = header.sniff_format(p)  # missing, empty, or neither safetensors nor torch: ModelError
    if kind == "safetensors":
        return header.load_state_dict(p)
    obj = header.load_torch_object(p, kind)
    if not isinstance(obj, Mapping):
        raise ModelError(f"{p}: torch file holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


# --------------------------------------------------------------------------------------------- running


def upscale_image(model: UpscalerModel, image: Image.Image, *, tile: int = 192, overlap: int = 8,
                  cancel: Callable[[], None] | None = None) -> Image.Image:
    """One pass of ``model`` over ``image``: an RGB picture exactly ``scale`` times the size.

    Other modes are converted to RGB (alpha is dropped). Pixels go in as value / 255 (float32, then
    the model's dtype) and come out clamped to [0, 1] and rounded half up to 8 bits
    (floor(v * 255 + 0.5) in float32). With ``tile`` <= 0, or a picture no larger than ``tile`` on
    either side, the model sees the whole picture in one call; otherwise ``tile`` x ``tile`` pieces
    overlapping by ``overlap`` px (the last of a row or column moved back to end at the edge),
    blended with linear weights across each overlap. ``cancel`` is called before each piece and
    stops the work by raising.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    with torch.inference_mode():
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0)
        x = (x.float() / 255).to(device=model.device, dtype=model.dtype)
        y = _run(model.module, x, model.scale, tile, overlap, cancel)
        pixels = _to_uint8(y)
    return Image.fromarray(pixels, "RGB")


def _to_uint8(y: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) floats → (H, W, 3) uint8: NaN to 0, clamped to [0, 1], floor(v * 255 + 0.5)."""
    y = torch.nan_to_num(y[0].float(), nan=0.0).clamp_(0, 1)
    return y.mul_(255).add_(0.5).floor_().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def _run(module: nn.Module, x: torch.Tensor, scale: int, tile: int, overlap: int,
         cancel: Callable[[], None] | None) -> torch.Tensor:
    """The module's output for ``x`` (1, C, H, W): one call, or overlapping tiles blended (float32)."""
    h, w = x.shape[-2:]
    if tile <= 0 or (h <= tile and w <= tile):
        if cancel is not None:
            cancel()
        return module(x)
    if not 0 <= overlap < tile:
        raise InvalidParameter("overlap", overlap, f"0 to {tile - 1} px (less than the tile size {tile})")
    ys, xs = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
    th, tw = min(tile, h), min(tile, w)
    wy = [t.to(x.device) for t in _axis_weights(ys, th, h, scale)]
    wx = [t.to(x.device) for t in _axis_weights(xs, tw, w, scale)]
    out = None
    for i, y0 in enumerate(ys):
        for j, x0 in enumerate(xs):
            if cancel is not None:
                cancel()
            piece = module(x[..., y0:y0 + th, x0:x0 + tw]).float()
            if piece.shape[-2:] != (th * scale, tw * scale):
                raise ModelError(f"upscaler gave {tuple(piece.shape[-2:])} for a {th}x{tw} tile; "
                                 f"expected {(th * scale, tw * scale)}")
            if out is None:
                out = torch.zeros((1, piece.shape[1], h * scale, w * scale), dtype=torch.float32, device=x.device)
            out[..., y0 * scale:(y0 + th) * scale, x0 * scale:(x0 + tw) * scale] += piece * (wy[i][:, None] * wx[j])
    return out


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where tiles start along one side: every ``tile - overlap`` px, the last moved back to end at the edge."""
    if length <= tile:
        return [0]
    return list(range(0, length - tile, tile - overlap)) + [length - tile]


def _axis_weights(starts: list[int], size: int, length: int, scale: int) -> list[torch.Tensor]:
    """Each tile's blend weight along one side, in output pixels: linear ramps across the part it
    shares with the tile before and after (1 elsewhere), divided by their sum so that the weights
    of all tiles add up to 1 at every output pixel. Separable, so the 2-D weights also sum to 1."""
    span = size * scale
    ramps = []
    for k, a in enumerate(starts):
        weight = torch.ones(span, dtype=torch.float64)
        if k > 0 and (shared := (starts[k - 1] + size - a) * scale) > 0:
            weight[:shared] = (torch.arange(shared, dtype=torch.float64) + 0.5) / shared
        if k + 1 < len(starts) and (shared := (a + size - starts[k + 1]) * scale) > 0:
            down = (shared - 0.5 - torch.arange(shared, dtype=torch.float64)) / shared
            weight[span - shared:] = torch.minimum(weight[span - shared:], down)
        ramps.append(weight)
    total = torch.zeros(length * scale, dtype=torch.float64)
    for a, weight in zip(starts, ramps):
        total[a * scale:a * scale + span] += weight
    return [(weight / total[a * scale:a * scale + span]).float() for a, weight in zip(starts, ramps)]
