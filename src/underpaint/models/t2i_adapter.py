"""T2I-Adapters (TencentARC) as people download them, built into diffusers' ``T2IAdapter``.

A T2I-Adapter is a small convolutional network that turns a control map into one feature map
per UNet level; the features are added inside the UNet's encoder (diffusers'
``down_intrablock_additional_residuals``). Unlike a ControlNet it never sees the latent, the
timestep or the prompt, so its features are computed once per map.

Layouts read (all offline, config from the tensor shapes):

- the original single files (``t2iadapter_canny_sd15v2.pth``, ``t2iadapter_color_sd14v1.pth``,
  the SDXL ``adapter-xl`` files; names bare or under ``adapter.``): the full adapter is ``conv_in`` (after a pixel unshuffle)
  and a flat list ``body.N`` of residual blocks (``block1`` 3x3, ``block2`` 1x1, ``in_conv``
  1x1 where the width changes), ``num_res_blocks`` per level; the light adapter (colour) is
  ``body.L`` extractors each with ``in_conv``, ``body.J.block1/block2`` and ``out_conv``;
- a single file in diffusers' names (``adapter.conv_in.weight``, ``adapter.body.L.resnets.J...``);
- a diffusers folder (``config.json`` with ``_class_name: T2IAdapter`` + weights).

The pixel-unshuffle factor follows from ``conv_in``'s input width (channels x factor²): 8 for
SD1.5 adapters, 16 for SDXL's (whose adapter downsamples once instead of at every level).
"""

from __future__ import annotations

import re

import torch

from ..errors import ModelError
from .detect import Family
from .header import CheckpointHeader

#: Keys that mark a T2I-Adapter: original full, original light, and diffusers' names.
ORIGINAL_FULL_MARKER = "body.0.block1.weight"
ORIGINAL_LIGHT_MARKER = "body.0.body.0.block1.weight"
DIFFUSERS_MARKER = "adapter.body.0.resnets.0.block1.weight"
#: The style adapter works on CLIP vision tokens, not on a map.
STYLE_MARKER = "style_embedding"
#: The ControlNet extension's "soft injection" factors for an adapter's four features, shallow first
#: (used by "My prompt is more important" and "ControlNet is more important").
SOFT_FACTORS = (0.25, 0.62, 0.825, 1.0)


#: Prefixes the original names are found under.
ORIGINAL_PREFIXES = ("", "adapter.")


def adapter_layout(names) -> tuple[str, str] | None:
    """("original", prefix) or ("diffusers-file", "") when the tensor names are a T2I-Adapter's, else None."""
    names = set(names)
    if STYLE_MARKER in names:
        raise ModelError("unsupported: a T2I style adapter (it needs CLIP vision features, not a control map)")
    if DIFFUSERS_MARKER in names:
        return "diffusers-file", ""
    for prefix in ORIGINAL_PREFIXES:
        if prefix + ORIGINAL_FULL_MARKER in names or prefix + ORIGINAL_LIGHT_MARKER in names:
            return "original", prefix
    return None


def _indices(names, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for n in names if (m := rx.match(n))})


def _unshuffle(total: int, what: str) -> tuple[int, int]:
    """(image channels, pixel-unshuffle factor) for an input conv that is ``total`` wide."""
    for factor in (8, 16):
        for channels in (3, 1):
            if total == channels * factor * factor:
                return channels, factor
    raise ModelError(f"{what}: its input layer takes {total} channels; expected 3 or 1 image channels "
                     "unshuffled by 8 (SD1.5 adapters: 192 or 64) or by 16 (SDXL adapters: 768 or 256)")


def adapter_config(header: CheckpointHeader, layout: str, what: str = "T2I-Adapter", prefix: str = "") -> dict:
    """``T2IAdapter`` keyword arguments from the shapes of an original (names under ``prefix``)
    or diffusers-named file."""
    if layout == "original" and prefix:
        header = _strip(header, prefix)
    names = list(header.tensors)
    p = "adapter." if layout == "diffusers-file" else ""
    light = (f"{p}body.0.out_conv.weight" in header.tensors)
    if light:
        levels = _indices(names, rf"{re.escape(p)}body\.(\d+)\.out_conv\.weight")
        inner = "resnets" if p else "body"
        res = len(_indices(names, rf"{re.escape(p)}body\.0\.{inner}\.(\d+)\.block1\.weight"))
        widths = [header.shape(f"{p}body.{i}.out_conv.weight")[0] for i in levels]
        channels, factor = _unshuffle(header.shape(f"{p}body.0.in_conv.weight")[1], what)
        if len(widths) < 2 or widths[-1] != widths[-2]:
            raise ModelError(f"{what}: light adapter widths {widths} not understood (the last level repeats the one before)")
        return dict(in_channels=channels, channels=widths[:-1], num_res_blocks=res, downscale_factor=factor,
                    adapter_type="light_adapter")
    if f"{p}conv_in.weight" not in header.tensors:
        raise ModelError(f"{what}: a T2I-Adapter without conv_in.weight is not understood")
    channels, factor = _unshuffle(header.shape(f"{p}conv_in.weight")[1], what)
    if p:
        levels = _indices(names, r"adapter\.body\.(\d+)\.")
        res = len(_indices(names, r"adapter\.body\.0\.resnets\.(\d+)\.block1\.weight"))
        widths = [header.shape(f"adapter.body.{i}.resnets.0.block1.weight")[0] for i in levels]
    else:
        if any(n.endswith(".skep.weight") for n in names):
            raise ModelError(f"{what}: unsupported T2I-Adapter variant (skip convolutions, 'skep')")
        blocks = _indices(names, r"body\.(\d+)\.block1\.weight")
        changes = _indices(names, r"body\.(\d+)\.in_conv\.weight")
        if not changes or changes[0] == 0:
            raise ModelError(f"{what}: cannot tell the blocks per level (no width change after the first block)")
        res = changes[0]
        if len(blocks) % res:
            raise ModelError(f"{what}: {len(blocks)} blocks do not split into levels of {res}")
        widths = [header.shape(f"body.{k}.block1.weight")[0] for k in blocks[::res]]
    kind = "full_adapter_xl" if factor == 16 else "full_adapter"
    return dict(in_channels=channels, channels=widths, num_res_blocks=res, downscale_factor=factor,
                adapter_type=kind)


def _strip(header: CheckpointHeader, prefix: str) -> CheckpointHeader:
    from dataclasses import replace

    return replace(header, tensors={k[len(prefix):]: v for k, v in header.tensors.items() if k.startswith(prefix)})


def original_to_diffusers(state_dict: dict[str, torch.Tensor], config: dict, what: str,
                          prefix: str = "") -> dict[str, torch.Tensor]:
    """Original adapter weights (names under ``prefix``) in ``T2IAdapter`` names."""
    state_dict = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}
    res = config["num_res_blocks"]
    light = config["adapter_type"] == "light_adapter"
    full_rx = re.compile(r"body\.(\d+)\.(block1|block2|in_conv)\.(weight|bias)$")
    light_rx = re.compile(r"body\.(\d+)\.(?:body\.(\d+)\.(block1|block2)|(in_conv|out_conv))\.(weight|bias)$")
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key.startswith("conv_in.") and not light:
            out["adapter." + key] = value
        elif light and (m := light_rx.match(key)):
            level, j, conv, edge, kind = m.groups()
            inner = f"resnets.{j}.{conv}" if j is not None else edge
            out[f"adapter.body.{level}.{inner}.{kind}"] = value
        elif not light and (m := full_rx.match(key)):
            k, conv, kind = int(m.group(1)), m.group(2), m.group(3)
            level, j = divmod(k, res)
            if conv == "in_conv":
                if j:
                    raise ModelError(f"{what}: {key}: a width change inside a level is not understood")
                out[f"adapter.body.{level}.in_conv.{kind}"] = value
            else:
                out[f"adapter.body.{level}.resnets.{j}.{conv}.{kind}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ModelError(f"{what}: {len(unknown)} unexpected tensors, e.g. {', '.join(sorted(unknown)[:4])}")
    return out


def adapter_family(config: dict) -> Family:
    """SDXL adapters unshuffle by 16 (``full_adapter_xl``); the others are made for SD1.5."""
    return Family.SDXL if config.get("adapter_type") == "full_adapter_xl" else Family.SD1


def feature_channels(config: dict) -> list[int]:
    """Widths of the features the adapter returns, shallow first."""
    widths = list(config.get("channels", ()))
    if config.get("adapter_type") == "light_adapter":
        widths.append(widths[-1])
    return widths


def build_adapter(config: dict, weights: dict[str, torch.Tensor], what: str, device: torch.device,
                  dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import T2IAdapter

    from .loader import _assign

    try:
        with torch.device("meta"):
            module = T2IAdapter(**config)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{what}: cannot build a T2I-Adapter from its config ({exc})") from None
    return _assign(module, weights, what, device, dtype)


def check_adapter_compatible(name: str, config: dict, unet_config) -> None:
    """The adapter's features must have the UNet's level widths, and SDXL adapters need an SDXL UNet."""
    get = (lambda k: getattr(unet_config, k, None)) if hasattr(unet_config, "block_out_channels") else unet_config.get
    blocks = list(get("block_out_channels") or ())
    widths = feature_channels(config)
    unet_xl = get("addition_embed_type") == "text_time"
    adapter_xl = config.get("adapter_type") == "full_adapter_xl"
    if widths[: len(blocks)] != blocks or unet_xl != adapter_xl:
        fam = adapter_family(config).value
        raise ModelError(f"T2I-Adapter {name} is a {fam} adapter (features {widths}) and does not fit this "
                         f"checkpoint's UNet (blocks {blocks}{', SDXL' if unet_xl else ''}); "
                         "use an adapter made for the same family")


def adapter_input(hint: torch.Tensor, config: dict, name: str) -> torch.Tensor:
    """The hint (1 x 3 x H x W in [0, 1]) as the adapter takes it: one channel for the grey-map
    adapters (canny, sketch), and a size the pixel unshuffle divides."""
    if config.get("in_channels", 3) == 1:
        hint = hint[:, :1]
    factor = config.get("downscale_factor", 8)
    h, w = hint.shape[-2:]
    if h % factor or w % factor:
        from ..errors import InvalidParameter

        raise InvalidParameter("size", f"{w}x{h}", f"width and height divisible by {factor} for T2I-Adapter {name}")
    return hint


def adapter_features(module: torch.nn.Module, hint: torch.Tensor, name: str) -> list[torch.Tensor]:
    """The adapter's features for one map (batch 1), shallow first."""
    config = dict(module.config)
    with torch.no_grad():
        return list(module(adapter_input(hint, config, name)))


def feature_scales(weight: float, n: int, soft: bool) -> list[float]:
    """Per-feature factors: the weight everywhere, or the extension's soft-injection ramp."""
    if not soft:
        return [weight] * n
    factors = list(SOFT_FACTORS) + [1.0] * max(0, n - len(SOFT_FACTORS))
    return [weight * f for f in factors[:n]]
