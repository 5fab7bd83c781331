"""ControlNet files as people download them, built into diffusers' ``ControlNetModel``.

Three layouts are read, all offline:

- the original single file (lllyasviel's ControlNet 1.0/1.1 ``.pth``/``.safetensors``, SD2 and
  SDXL conversions of it): the UNet's encoder half in ``openaimodel`` names, optionally under
  ``control_model.``, plus ``input_hint_block.*`` (the hint encoder), ``zero_convs.*`` (one 1x1
  conv per skip connection) and ``middle_block_out.*``;
- a single file in diffusers' names (``controlnet_cond_embedding.*``, the common SDXL download);
- a diffusers folder (``config.json`` + weights).

xinsir's SDXL union ControlNets (``controlnet-union-sdxl-1.0``, ``promax``), one model for several
control types, load from a folder or their weights file into diffusers' ``ControlNetUnionModel``
(``models/controlnet_union.py``); ``ControlNetInfo.kind`` is then "union".

T2I-Adapters (``models/t2i_adapter.py``) are recognised by their keys (``body.0.block1.weight``,
``adapter.body.*``) or a ``T2IAdapter`` config and load through the same functions, so a unit
names either kind of model the same way; ``ControlNetInfo.kind`` tells them apart. Control-LoRAs
(``models/control_lora.py``, marked by a ``lora_controlnet`` tensor) are ControlNets stored as
differences against the base UNet: they are built when a generation loads them, on its UNet.

As for checkpoints, the config comes from the tensor shapes (:func:`controlnet_config`), the
family from the layout (size/crop embedding → SDXL, linear attention projections → SD2, else
SD1), and pickle files are read only with ``weights_only``. Loaded units are kept in a
:class:`ControlNetCache` owned by the caller (no module-level state).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelError, ModelNotFound
from .configs import UNetLayout
from .detect import Family
from .registry import listable, split_hash
from .header import CheckpointHeader, header_from_state_dict, load_state_dict, read_header, sniff_format

#: File name endings of ControlNet weights in a models folder (A1111's list).
CONTROLNET_EXTENSIONS = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
_ORIGINAL_PREFIXES = ("control_model.", "")
_DIFFUSERS_MARKER = "controlnet_cond_embedding.conv_in.weight"
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "diffusion_pytorch_model.bin")
#: SDXL's time ids are embedded 256 wide in every released model.
_SDXL_TIME_EMBED_DIM = 256

# Recognisable control files that are not a full ControlNet: (what, exact keys, key prefixes).
_OTHER_CONTROL_FILES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("a ControlLLLite model", (), ("lllite_unet_",)),
)
#: config.json classes of control models that are recognised but not loaded.
_OTHER_CONTROL_CLASSES = {"MultiAdapter": "several T2I-Adapters saved together (MultiAdapter)"}


def _refuse_other_kinds(path: Path, names) -> None:
    """A clear "not supported yet" for control files recognised by their keys but not loaded."""
    for what, keys, prefixes in _OTHER_CONTROL_FILES:
        if any(k in names for k in keys) or (prefixes and any(n.startswith(prefixes) for n in names)):
            raise ModelError(f"{path}: {what} is not supported yet; underpaint loads full ControlNets "
                             "(original control_model.* or diffusers layout), T2I-Adapters and Control-LoRAs")


@dataclass(frozen=True)
class ControlNetInfo:
    """What a ControlNet file is, decided from its header or config before any weights are read."""

    path: Path
    family: Family
    #: "original" (control_model.* / input_hint_block.*), "diffusers-file" or "diffusers-folder".
    layout: str
    #: Key prefix of the original layout ("control_model." or "").
    prefix: str = ""
    #: ``ControlNetModel`` keyword arguments (for a folder: its config.json); for an adapter ``T2IAdapter``'s.
    config: dict = field(default_factory=dict, compare=False, hash=False)
    #: "controlnet", "union" (xinsir's union models), "t2i-adapter", "control-lora" or "ip-adapter".
    kind: str = "controlnet"

    @property
    def is_adapter(self) -> bool:
        return self.kind == "t2i-adapter"

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name


@dataclass
class LoadedControlNet:
    """A ControlNet placed on a device, with what it was loaded from."""

    info: ControlNetInfo
    module: torch.nn.Module
    device: torch.device
    dtype: torch.dtype

    @property
    def family(self) -> Family:
        return self.info.family

    @property
    def name(self) -> str:
        return self.info.name


# --- recognising the file --------------------------------------------------------------------------


def inspect_controlnet(path: str | os.PathLike, *, time_embed_dim: int | None = None) -> ControlNetInfo:
    """Family, layout and config of a ControlNet file or folder, from its header or config.json."""
    p = Path(path)
    if p.is_dir():
        return _inspect_folder(p)
    if not p.exists():
        raise ModelNotFound(f"{p}: no such ControlNet file")
    return info_from_header(p, read_header(p), time_embed_dim=time_embed_dim)


def info_from_header(path: Path, header: CheckpointHeader, *, time_embed_dim: int | None = None) -> ControlNetInfo:
    from . import control_lora, ip_adapter, t2i_adapter

    names = header.tensors
    if ip_adapter.is_ip_adapter(names):
        return ControlNetInfo(path, ip_adapter_family(header), "ip-adapter", "", {}, kind="ip-adapter")
    try:
        adapter = t2i_adapter.adapter_layout(names)
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from None
    if adapter is not None:
        layout, prefix = adapter
        config = t2i_adapter.adapter_config(header, layout, f"T2I-Adapter {path}", prefix)
        return ControlNetInfo(path, t2i_adapter.adapter_family(config), layout, prefix, config, kind="t2i-adapter")
    if control_lora.is_control_lora(names):
        config = control_lora.hint_config(header, f"Control-LoRA {path}")
        return ControlNetInfo(path, control_lora.file_family(names), "control-lora", "", config, kind="control-lora")
    _refuse_other_kinds(path, names)
    from .controlnet_union import is_union, union_config

    if is_union(names):
        config = union_config(header, str(path))
        return ControlNetInfo(path, _family_of(config), "diffusers-file", "", config, kind="union")
    for prefix in _ORIGINAL_PREFIXES:
        if prefix + "input_hint_block.0.weight" in names:
            config = controlnet_config(header, prefix, time_embed_dim=time_embed_dim)
            return ControlNetInfo(path, _family_of(config), "original", prefix, config)
    if _DIFFUSERS_MARKER in names:
        config = controlnet_config_diffusers_names(header, time_embed_dim=time_embed_dim)
        return ControlNetInfo(path, _family_of(config), "diffusers-file", "", config)
    if any(n.startswith("model.diffusion_model.") for n in names):
        raise ModelError(f"{path}: this is a Stable Diffusion checkpoint, not a ControlNet; "
                         "put it in models/checkpoints/ and pass it with --model")
    sample = ", ".join(sorted(names)[:3])
    raise ModelError(f"{path}: not a ControlNet: its {len(names)} tensors ({sample}, ...) have no "
                     "input_hint_block.* or controlnet_cond_embedding.* (the hint encoder every ControlNet has)")


def _inspect_folder(folder: Path) -> ControlNetInfo:
    cfg_path = folder / "config.json"
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{folder}: not a diffusers ControlNet folder (config.json is missing)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{cfg_path}: unreadable config ({exc})") from None
    cls = raw.get("_class_name", "ControlNetModel")
    config = {k: v for k, v in raw.items() if not k.startswith("_")}
    if cls == "T2IAdapter":
        from .t2i_adapter import adapter_family

        return ControlNetInfo(folder, adapter_family(config), "diffusers-folder", "", config, kind="t2i-adapter")
    if cls in _OTHER_CONTROL_CLASSES:
        raise ModelError(f"{folder}: {_OTHER_CONTROL_CLASSES[cls]} is not supported yet")
    weights = next((folder / n for n in _WEIGHT_FILES if (folder / n).is_file()), None)
    header = read_header(weights) if weights is not None and sniff_format(weights) == "safetensors" else None
    if header is not None:
        _refuse_other_kinds(folder, header.tensors)
    from .controlnet_union import accepted_config, is_union, union_config

    # xinsir's own folders name the class ControlNetModel; the weights tell a union model apart.
    union_weights = header is not None and is_union(header.tensors)
    if cls == "ControlNetUnionModel" or (cls == "ControlNetModel" and union_weights):
        config = union_config(header, str(folder), config) if header is not None else accepted_config(config)
        return ControlNetInfo(folder, _family_of(config), "diffusers-folder", "", config, kind="union")
    if cls != "ControlNetModel":
        raise ModelError(f"{folder}: unsupported: config.json describes a {cls}; expected a ControlNetModel, "
                         "a ControlNetUnionModel or a T2IAdapter")
    return ControlNetInfo(folder, _family_of(config), "diffusers-folder", "", config)


def ip_adapter_family(header: CheckpointHeader) -> Family:
    """An IP-Adapter's family: FLUX for XLabs' layout, else from the text width its projection makes: 2048
    SDXL, 1024 SD2, else SD1 (whether it fits a checkpoint is checked on the model itself when it runs)."""
    from .ip_adapter import is_flux_ip_adapter

    if is_flux_ip_adapter(header.tensors):
        return Family.FLUX
    shape = header.tensors.get("image_proj.norm.weight") or header.tensors.get("image_proj.norm_out.weight") \
        or header.tensors.get("image_proj.proj.3.weight")
    width = shape.shape[0] if shape is not None else 0
    return {2048: Family.SDXL, 1024: Family.SD2}.get(width, Family.SD1)


def _family_of(config: dict) -> Family:
    """SDXL has the size/crop ("text_time") embedding; SD2 uses linear attention projections; SD1 neither."""
    if config.get("addition_embed_type") == "text_time":
        return Family.SDXL
    if config.get("use_linear_projection"):
        return Family.SD2
    return Family.SD1


# --- configs from shapes -----------------------------------------------------------------------------


def _indices(names, pattern: str) -> set[int]:
    rx = re.compile(pattern)
    return {int(m.group(1)) for n in names if (m := rx.match(n))}


def _count(names, pattern: str) -> int:
    return len(_indices(names, pattern))


def encoder_layout(header: CheckpointHeader, prefix: str) -> UNetLayout:
    """The encoder-half block structure of an original-layout ControlNet (no output blocks)."""
    names = {k[len(prefix):] for k in header.tensors if k.startswith(prefix)}
    n_in = _count(names, r"input_blocks\.(\d+)\.")
    downsamplers = sorted(_indices(names, r"input_blocks\.(\d+)\.0\.op\."))
    levels = len(downsamplers) + 1
    per_level = (n_in - 1 - len(downsamplers)) / levels
    if n_in < 2 or per_level != int(per_level):
        raise ModelError(f"ControlNet block layout not understood: {n_in} input blocks, {len(downsamplers)} downsamplers")
    n = int(per_level)
    first = [1 + b * (n + 1) for b in range(levels)]
    channels = tuple(header.shape(f"{prefix}input_blocks.{i}.0.out_layers.3.weight")[0] for i in first)
    down = tuple(_count(names, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.") for i in first)
    mid = _count(names, r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    return UNetLayout(levels, n, channels, down, tuple(reversed(down)), mid)


def _heads(family: Family, channels) -> int | list[int]:
    """SD1 uses 8 heads everywhere; SD2 and SDXL 64-wide heads (at least one), as for the UNet."""
    return 8 if family == Family.SD1 else [max(1, c // 64) for c in channels]


def _common_config(*, channels, layers, down_depth, mid_depth, in_channels, hint_channels, hint_widths,
                   context_dim, linear, adm_in, time_dim, time_embed_dim) -> dict:
    family = Family.SDXL if adm_in else (Family.SD2 if linear else Family.SD1)
    depth = [d or 1 for d in down_depth]
    depth[-1] = mid_depth or depth[-1]  # diffusers builds the mid block with the last level's depth
    config = dict(
        in_channels=in_channels,
        conditioning_channels=hint_channels,
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in down_depth],
        mid_block_type="UNetMidBlock2DCrossAttn" if mid_depth else None,
        block_out_channels=list(channels),
        layers_per_block=layers,
        cross_attention_dim=context_dim,
        attention_head_dim=_heads(family, channels),
        use_linear_projection=linear,
        transformer_layers_per_block=depth if len(set(depth)) > 1 else depth[0],
        conditioning_embedding_out_channels=list(hint_widths),
        upcast_attention=family == Family.SD2,
    )
    if time_dim != 4 * channels[0]:
        raise ModelError(f"ControlNet time embedding is {time_dim} wide; expected 4 x {channels[0]}")
    if adm_in:
        config.update(addition_embed_type="text_time",
                      addition_time_embed_dim=time_embed_dim or _SDXL_TIME_EMBED_DIM,
                      projection_class_embeddings_input_dim=adm_in)
    return config


def controlnet_config(header: CheckpointHeader, prefix: str = "control_model.", *,
                      time_embed_dim: int | None = None) -> dict:
    """``ControlNetModel`` keyword arguments for an original-layout ControlNet under ``prefix``.

    ``time_embed_dim`` is the width SDXL embeds each size/crop number with; it is not stored in
    the file (256 in every released SDXL model), so a caller that knows its UNet passes it.
    """
    p = prefix
    lay = encoder_layout(header, p)
    names = [k for k in header.tensors if k.startswith(p)]
    attn = [k for k in names if k.endswith("attn2.to_k.weight")]
    proj = [k for k in names if k.endswith(".proj_in.weight")]
    hint = sorted(_indices([k[len(p):] for k in names], r"input_hint_block\.(\d+)\.weight"))
    # The hint encoder is conv, (conv, conv stride 2) per width step, zero conv: every other index a conv.
    widths = [header.shape(f"{p}input_hint_block.{i}.weight")[0] for i in hint[:-1:2]]
    return _common_config(
        channels=lay.channels, layers=lay.layers_per_block, down_depth=lay.down_depth, mid_depth=lay.mid_depth,
        in_channels=header.shape(p + "input_blocks.0.0.weight")[1],
        hint_channels=header.shape(f"{p}input_hint_block.0.weight")[1], hint_widths=widths,
        context_dim=header.shape(attn[0])[1] if attn else 768,
        linear=bool(proj) and len(header.shape(proj[0])) == 2,
        adm_in=header.shape(p + "label_emb.0.0.weight")[1] if p + "label_emb.0.0.weight" in header.tensors else None,
        time_dim=header.shape(p + "time_embed.0.weight")[0], time_embed_dim=time_embed_dim,
    )


def controlnet_config_diffusers_names(header: CheckpointHeader, *, time_embed_dim: int | None = None) -> dict:
    """``ControlNetModel`` keyword arguments for a single file already in diffusers' names."""
    names = list(header.tensors)
    levels = sorted(_indices(names, r"down_blocks\.(\d+)\."))
    channels = [header.shape(f"down_blocks.{b}.resnets.0.conv2.weight")[0] for b in levels]
    layers = _count(names, r"down_blocks\.0\.resnets\.(\d+)\.")
    down = [_count(names, rf"down_blocks\.{b}\.attentions\.0\.transformer_blocks\.(\d+)\.") for b in levels]
    mid = _count(names, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.")
    blocks = sorted(_indices(names, r"controlnet_cond_embedding\.blocks\.(\d+)\.weight"))
    widths = [header.shape("controlnet_cond_embedding.conv_in.weight")[0]]
    widths += [header.shape(f"controlnet_cond_embedding.blocks.{i}.weight")[0] for i in blocks[1::2]]
    attn = [k for k in names if k.endswith("attn2.to_k.weight")]
    proj = [k for k in names if k.endswith(".proj_in.weight")]
    return _common_config(
        channels=channels, layers=layers, down_depth=down, mid_depth=mid,
        in_channels=header.shape("conv_in.weight")[1],
        hint_channels=header.shape(_DIFFUSERS_MARKER)[1], hint_widths=widths,
        context_dim=header.shape(attn[0])[1] if attn else 768,
        linear=bool(proj) and len(header.shape(proj[0])) == 2,
        adm_in=header.shape("add_embedding.linear_1.weight")[1] if "add_embedding.linear_1.weight" in names else None,
        time_dim=header.shape("time_embedding.linear_1.weight")[0], time_embed_dim=time_embed_dim,
    )


# --- renaming original weights -------------------------------------------------------------------------


def controlnet_module_map(lay: UNetLayout, hint_convs: int) -> dict[str, tuple[str, dict[str, str]]]:
    """Original module prefix → (diffusers prefix, inner renames): the UNet encoder's map plus the
    hint encoder (convs at even indices), the zero convs and the middle-block output conv."""
    from .convert import unet_module_map

    m = {k: v for k, v in unet_module_map(lay).items() if not k.startswith(("output_blocks.", "out."))}
    convs = [f"input_hint_block.{2 * i}" for i in range(hint_convs)]
    m[convs[0]] = ("controlnet_cond_embedding.conv_in", {})
    for i, name in enumerate(convs[1:-1]):
        m[name] = (f"controlnet_cond_embedding.blocks.{i}", {})
    m[convs[-1]] = ("controlnet_cond_embedding.conv_out", {})
    n_skips = 1 + lay.levels * lay.layers_per_block + (lay.levels - 1)
    for i in range(n_skips):
        m[f"zero_convs.{i}.0"] = (f"controlnet_down_blocks.{i}", {})
    m["middle_block_out.0"] = ("controlnet_mid_block", {})
    return m


def original_to_diffusers(state_dict: dict[str, torch.Tensor], header: CheckpointHeader,
                          prefix: str) -> dict[str, torch.Tensor]:
    """Original ControlNet weights in ``ControlNetModel`` names (the prefix removed, extras dropped)."""
    from .convert import _rename

    lay = encoder_layout(header, prefix)
    hint = _indices([k[len(prefix):] for k in header.tensors if k.startswith(prefix)],
                    r"input_hint_block\.(\d+)\.weight")
    ours = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    # Full ControlNet 1.0 checkpoints also carry the SD model; only control_model.* is ours.
    ours = {k: v for k, v in ours.items() if not k.startswith(("model.", "first_stage_model.", "cond_stage_model."))}
    return _rename(ours, controlnet_module_map(lay, len(hint)), "ControlNet")


# --- loading -----------------------------------------------------------------------------------------------


def load_controlnet(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, time_embed_dim: int | None = None,
                    base_unet=None) -> LoadedControlNet:
    """Build and fill a ``ControlNetModel`` (or ``T2IAdapter``) from any of the layouts; never touches
    the network. A Control-LoRA is built on ``base_unet`` (the checkpoint's diffusers UNet)."""
    p = Path(path)
    device = torch.device(device)
    if p.is_dir():
        info = _inspect_folder(p)
        header, sd = _read(_folder_weights(p))
        weights = sd
    else:
        if not p.exists():
            raise ModelNotFound(f"{p}: no such ControlNet file")
        header, sd = _read(p)
        info = info_from_header(p, header, time_embed_dim=time_embed_dim)
        if info.kind == "control-lora":
            from .control_lora import build_control_lora

            if base_unet is None:
                raise ModelError(f"{p}: a Control-LoRA is built on the base model's UNet; load it for a checkpoint")
            module = build_control_lora(info.name, header, sd, base_unet, device, dtype)
            info = ControlNetInfo(p, info.family, info.layout, "", dict(module.config), kind="control-lora")
            return LoadedControlNet(info=info, module=module, device=device, dtype=dtype)
        if info.kind == "ip-adapter":
            from .ip_adapter import build_ip_adapter

            module = build_ip_adapter(sd, f"IP-Adapter {p}", device, dtype)
            return LoadedControlNet(info=info, module=module, device=device, dtype=dtype)
        if info.is_adapter:
            from .t2i_adapter import original_to_diffusers as adapter_names

            weights = adapter_names(sd, info.config, f"T2I-Adapter {p}", info.prefix) if info.layout == "original" else sd
        else:
            weights = original_to_diffusers(sd, header, info.prefix) if info.layout == "original" else sd
    if info.is_adapter:
        from .t2i_adapter import build_adapter

        module = build_adapter(info.config, weights, f"T2I-Adapter {info.path}", device, dtype)
    elif info.kind == "union":
        from .controlnet_union import build_union

        module = build_union(info.path, info.config, weights, device, dtype)
    else:
        module = _build(info, weights, device, dtype)
    return LoadedControlNet(info=info, module=module, device=device, dtype=dtype)


def _read(path: Path) -> tuple[CheckpointHeader, dict[str, torch.Tensor]]:
    if sniff_format(path) == "safetensors":
        return read_header(path), load_state_dict(path)
    sd = load_state_dict(path)  # torch.load(weights_only=True): code-carrying pickles are refused
    return header_from_state_dict(sd), sd


def _folder_weights(folder: Path) -> Path:
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise ModelError(f"{folder}: the ControlNet folder has no weights (expected {_WEIGHT_FILES[0]})")


def _build(info: ControlNetInfo, weights: dict[str, torch.Tensor], device: torch.device,
           dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import ControlNetModel

    from .loader import _assign

    try:
        with torch.device("meta"):
            module = ControlNetModel(**info.config)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{info.path}: cannot build a ControlNet from its config ({exc})") from None
    return _assign(module, weights, f"ControlNet {info.path}", device, dtype)


def check_compatible(control: LoadedControlNet | ControlNetInfo, unet_config) -> None:
    """A ControlNet feeds the UNet's skip connections: widths, levels and text width must match."""
    info = control.info if isinstance(control, LoadedControlNet) else control
    if info.kind == "ip-adapter":  # checked against the UNet's layers themselves (models/ip_adapter.check_fits)
        return
    if info.is_adapter:
        from .t2i_adapter import check_adapter_compatible

        check_adapter_compatible(info.name, info.config, unet_config)
        return
    if info.kind == "control-lora":
        from .control_lora import check_base

        check_base(info.name, info.family, unet_config)
        return
    cfg = info.config
    ours = list(cfg.get("block_out_channels", ()))
    theirs = list(unet_config.block_out_channels if hasattr(unet_config, "block_out_channels")
                  else unet_config["block_out_channels"])
    get = (lambda k: getattr(unet_config, k, None)) if hasattr(unet_config, "block_out_channels") else unet_config.get
    mismatch = ours != theirs or cfg.get("cross_attention_dim") != get("cross_attention_dim") or \
        cfg.get("layers_per_block") != get("layers_per_block")
    if mismatch:
        raise ModelError(f"ControlNet {info.name} is a {info.family.value} model (blocks {ours}, text width "
                         f"{cfg.get('cross_attention_dim')}) and does not fit this checkpoint's UNet (blocks {theirs}, "
                         f"text width {get('cross_attention_dim')}); use a ControlNet made for the same family")


# --- hashes, names, cache -------------------------------------------------------------------------------------


def legacy_hash(path: str | os.PathLike) -> str:
    """A1111's old 8-digit model hash (sha256 of 64 KiB at offset 1 MiB): the ControlNet extension
    names models ``name [hash]`` with it in its dropdown and in infotext."""
    p = Path(path)
    if p.is_dir():
        p = _folder_weights(p)
    with open(p, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def infotext_name(path: str | os.PathLike) -> str:
    p = Path(path)
    name = p.name if p.is_dir() else p.stem
    return f"{name} [{legacy_hash(p)}]"


def list_controlnets(folders) -> list[Path]:
    """ControlNet files and diffusers folders under ``folders`` (one path or several), sorted by name."""
    if isinstance(folders, (str, os.PathLike)):
        folders = [folders]
    found: list[Path] = []
    for root in map(Path, folders or ()):
        if not root.is_dir():
            continue
        for p in sorted(root.rglob("*")):
            if not listable(p):
                continue
            if p.is_file() and p.suffix.lower() in CONTROLNET_EXTENSIONS and not _inside_folder_model(p, root):
                found.append(p)
            elif p.is_dir() and (p / "config.json").is_file():
                found.append(p)
    return sorted(found, key=lambda q: q.name.lower())


def _inside_folder_model(p: Path, root: Path) -> bool:
    return any((parent / "config.json").is_file() for parent in p.parents if parent != root and root in parent.parents)


#: Words in a ControlNet's file name that say which preprocessors it was trained on.
MODEL_KEYWORDS: dict[str, tuple[str, ...]] = {
    "canny": ("canny",), "depth": ("depth",), "openpose": ("openpose", "pose"), "lineart": ("lineart",),
    "softedge": ("softedge", "hed", "pidi"), "scribble": ("scribble", "sketch"), "mlsd": ("mlsd",),
    "normal": ("normal",), "tile": ("tile",), "inpaint": ("inpaint",), "shuffle": ("shuffle",),
    "seg": ("seg",), "ip2p": ("ip2p",), "ip-adapter": ("ip-adapter", "ip_adapter"),
}
_FAMILY_WORDS = {Family.SD1: ("sd15", "sd1.5", "v11", "sd14", "v1"), Family.SD2: ("sd21", "sd2"),
                 Family.SDXL: ("sdxl", "xl"), Family.FLUX: ("flux",)}


def resolve_controlnet(name: str | None, folders, *, kind: str | None, family: Family | None) -> Path:
    """The ControlNet to use: a path, a file name in ``folders`` (with or without extension or the
    ``[hash]`` A1111 appends), or, with no name, the file whose name mentions ``kind`` and the family."""
    if name:
        cleaned = split_hash(name.strip(), (8, 10))[0]
        direct = Path(cleaned).expanduser()
        if direct.exists():
            return direct
        candidates = list_controlnets(folders)
        for p in candidates:
            if cleaned in (p.name, p.stem):
                return p
        lowered = cleaned.lower()
        for p in candidates:
            if lowered in (p.name.lower(), p.stem.lower()):
                return p
        from ..errors import UnknownName

        if not candidates:
            raise ModelNotFound(f"ControlNet {name!r}: no such file, and no ControlNets in {_where(folders)}")
        raise UnknownName("control_model", name, [p.stem for p in candidates])
    return _default_controlnet(folders, kind, family)


def _where(folders) -> str:
    if isinstance(folders, (str, os.PathLike)):
        folders = [folders]
    return ", ".join(str(f) for f in folders or ()) or "models/controlnet/"


def _default_controlnet(folders, kind: str | None, family: Family | None) -> Path:
    candidates = list_controlnets(folders)
    words = MODEL_KEYWORDS.get(kind or "", (kind,) if kind else ())
    matching = [p for p in candidates if any(w in p.name.lower() for w in words if w)]
    if family is not None and len(matching) > 1:
        fam = [p for p in matching if _mentions_family(p.name.lower(), family)]
        matching = fam or matching
    if family is not None:
        # A file that names another family is never the default.
        matching = [p for p in matching if not any(_mentions_family(p.name.lower(), f) for f in Family if f != family)
                    or _mentions_family(p.name.lower(), family)]
    if not matching:
        where = _where(folders)
        fam = f" {family.value}" if family else ""
        raise ModelNotFound(f"no{fam} ControlNet for {kind!r} in {where}: put one there (e.g. "
                            f"control_v11p_sd15_{kind}.safetensors) or pass --control-model PATH")
    return matching[0]


def _mentions_family(lowered: str, family: Family) -> bool:
    words = _FAMILY_WORDS.get(family, (family.value,))
    if family == Family.SD1 and "xl" in lowered:
        return False
    return any(w in lowered for w in words)


class ControlNetCache:
    """Loaded ControlNets by (file, modification time, device, dtype); the least recently used go first."""

    def __init__(self, capacity: int = 4) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple, LoadedControlNet] = OrderedDict()

    def get(self, path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
            time_embed_dim: int | None = None, base_unet=None) -> LoadedControlNet:
        """``base_unet`` is the checkpoint's UNet, which Control-LoRAs are built on: their entries
        are kept per UNet, the others whatever the UNet."""
        found = self.cached(path, device=device, dtype=dtype, time_embed_dim=time_embed_dim, base_unet=base_unet)
        if found is not None:
            return found
        p = Path(path).resolve()
        stamp = p.stat().st_mtime_ns if p.exists() else 0
        plain = (str(p), stamp, str(torch.device(device)), dtype, time_embed_dim)
        loaded = load_controlnet(p, device=device, dtype=dtype, time_embed_dim=time_embed_dim, base_unet=base_unet)
        key = (*plain, id(base_unet)) if loaded.info.kind == "control-lora" else plain
        self._items[key] = loaded
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return loaded

    def cached(self, path: str | os.PathLike, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, time_embed_dim: int | None = None,
               base_unet=None) -> LoadedControlNet | None:
        """The entry :meth:`get` would return without loading anything, or None."""
        p = Path(path).resolve()
        stamp = p.stat().st_mtime_ns if p.exists() else 0
        plain = (str(p), stamp, str(torch.device(device)), dtype, time_embed_dim)
        for key in (plain, (*plain, id(base_unet))):
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
