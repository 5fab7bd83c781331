"""Control-LoRAs (Stability AI's ``control-lora-canny-rank128.safetensors`` …): a ControlNet stored
as low-rank differences against the base model's UNet.

The file is a ControlNet in the original (``cldm``) names without a prefix, marked by a
``lora_controlnet`` tensor. Each Linear/Conv2d weight of the UNet's encoder copy is stored as a
pair ``<module>.up`` / ``<module>.down``: the ControlNet's weight is the base UNet's weight plus
``up @ down`` (both flattened to matrices, reshaped to the weight). Everything else is stored
in full: the hint encoder (``input_hint_block``), the zero convs, ``middle_block_out``, norms and
biases. A tensor the file does not mention keeps the base UNet's value.

So a Control-LoRA is built per base model: diffusers' ``ControlNetModel`` gets the base UNet's
config (``ControlNetModel.from_unet``, built empty), its weights are the base UNet's encoder
weights with the differences added, and the original names are mapped with the ControlNet
module map of ``controlnet.py``. It is built from the UNet's weights as they are when the unit
is first loaded; a loaded Control-LoRA is cached per UNet.
"""

from __future__ import annotations

import re

import torch

from ..errors import ModelError
from .configs import UNetLayout
from .detect import Family
from .header import CheckpointHeader

MARKER = "lora_controlnet"
_HINT = re.compile(r"input_hint_block\.(\d+)\.weight$")


def is_control_lora(names) -> bool:
    return MARKER in names


def file_family(names) -> Family:
    """Control-LoRAs for SDXL carry the size/crop embedding (``label_emb``); Stability's are all SDXL."""
    return Family.SDXL if any(n.startswith("label_emb.") for n in names) else Family.SD1


def hint_config(header: CheckpointHeader, what: str) -> dict:
    """The hint encoder's input channels and widths (its convs are every other index, the last the output)."""
    convs = sorted(int(m.group(1)) for n in header.tensors if (m := _HINT.match(n)))
    if len(convs) < 2:
        raise ModelError(f"{what}: a Control-LoRA without its hint encoder (input_hint_block.*) is not understood")
    widths = [header.shape(f"input_hint_block.{i}.weight")[0] for i in convs[:-1:2]]
    return {"conditioning_channels": header.shape(f"input_hint_block.{convs[0]}.weight")[1],
            "conditioning_embedding_out_channels": widths, "hint_convs": len(convs)}


def unet_is_sdxl(unet_config) -> bool:
    get = (lambda k: getattr(unet_config, k, None)) if hasattr(unet_config, "block_out_channels") else unet_config.get
    return get("addition_embed_type") == "text_time"


def check_base(name: str, family: Family, unet_config) -> None:
    """A Control-LoRA only makes sense against the family it was trained on (its deltas are on that UNet)."""
    if (family == Family.SDXL) != unet_is_sdxl(unet_config):
        base = "an SDXL" if unet_is_sdxl(unet_config) else "a non-SDXL (SD1/SD2)"
        raise ModelError(f"Control-LoRA {name} is made for {family.value} and is built from the base model's UNet; "
                         f"this checkpoint has {base} UNet. Use it with a {family.value} checkpoint")


def layout_of(unet_config) -> UNetLayout:
    """The encoder layout of a diffusers UNet config (for the original → diffusers name map)."""
    channels = tuple(unet_config.block_out_channels)
    layers = unet_config.layers_per_block
    if not isinstance(layers, int):
        raise ModelError("Control-LoRA: a UNet with different layer counts per level is not supported")
    tl = unet_config.transformer_layers_per_block
    tl = [tl] * len(channels) if isinstance(tl, int) else list(tl)
    down = tuple(int(d) if "CrossAttn" in t else 0 for d, t in zip(tl, unet_config.down_block_types))
    return UNetLayout(len(channels), layers, channels, down, tuple(reversed(down)), int(tl[-1]))


def build_control_lora(name: str, header: CheckpointHeader, state_dict: dict[str, torch.Tensor], base_unet,
                       device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The ControlNet of a Control-LoRA file on ``base_unet``: base weights + up @ down, full tensors as stored."""
    from diffusers import ControlNetModel

    from .controlnet import controlnet_module_map
    from .convert import _rename
    from .loader import _assign

    what = f"Control-LoRA {name}"
    check_base(name, file_family(header.tensors), base_unet.config)
    hint = hint_config(header, what)
    try:
        with torch.device("meta"):
            module = ControlNetModel.from_unet(
                base_unet, conditioning_embedding_out_channels=tuple(hint["conditioning_embedding_out_channels"]),
                conditioning_channels=hint["conditioning_channels"], load_weights_from_unet=False)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{what}: cannot build a ControlNet from the base UNet ({exc})") from None
    module_map = controlnet_module_map(layout_of(base_unet.config), hint["hint_convs"])

    full = {k: v for k, v in state_dict.items() if k != MARKER and not k.endswith((".up", ".down"))}
    ups = {k[: -len(".up")]: v for k, v in state_dict.items() if k.endswith(".up")}
    downs = {k[: -len(".down")]: v for k, v in state_dict.items() if k.endswith(".down")}
    if ups.keys() != downs.keys():
        odd = sorted(ups.keys() ^ downs.keys())
        raise ModelError(f"{what}: {len(odd)} low-rank pairs lack their up or down half, e.g. {', '.join(odd[:3])}")
    stored = _rename(full, module_map, what)
    lora_names = _rename({f"{k}.weight": k for k in ups}, module_map, what)  # diffusers name → original module

    base = base_unet.state_dict()
    expected = module.state_dict()
    weights: dict[str, torch.Tensor] = {}
    for key in expected:
        if key in stored:
            weights[key] = stored[key]
        elif key in lora_names:
            weights[key] = _apply_delta(base, key, ups[lora_names[key]], downs[lora_names[key]], what)
        elif key in base:
            weights[key] = base[key]
    return _assign(module, weights, what, device, dtype)


def _apply_delta(base: dict[str, torch.Tensor], key: str, up: torch.Tensor, down: torch.Tensor,
                 what: str) -> torch.Tensor:
    if key not in base:
        raise ModelError(f"{what}: a low-rank difference for {key}, which the base UNet does not have")
    weight = base[key]
    up2, down2 = up.flatten(1).float(), down.flatten(1).float()
    if up2.shape[1] != down2.shape[0] or up2.shape[0] * down2.shape[1] != weight.numel():
        raise ModelError(f"{what}: the low-rank pair for {key} ({tuple(up.shape)} @ {tuple(down.shape)}) does not "
                         f"fit the base weight {tuple(weight.shape)}")
    delta = (up2.to(weight.device) @ down2.to(weight.device)).reshape(weight.shape)
    return weight.float() + delta
