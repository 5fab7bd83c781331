"""Tiny ControlNets in the layouts people download, matching the tiny checkpoints of ``tiny_models``.

The original layout follows lllyasviel's ``cldm.ControlNet``: the UNet's encoder half
(``time_embed``, ``label_emb`` for SDXL, ``input_blocks``, ``middle_block``) plus the hint encoder
``input_hint_block`` (conv, then a conv and a stride-2 conv per width step, SiLUs at the odd
indices, a zero conv last), one 1x1 ``zero_convs.i.0`` per skip connection and
``middle_block_out.0``. Shapes come from ``tiny_models``' helpers, not from underpaint.

The diffusers layouts are produced from that file by diffusers' own converter
(``ControlNetModel.from_single_file`` with a hand-written local config), so the two layouts hold
the same weights by an independent route. Weights are seeded random numbers; the zero convs are
random too (real trained ones are not zero), so residuals are non-zero.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tiny_models import (SD1_UNET, SD2_UNET, SDXL_TIME_IDS, SDXL_UNET, TinyUNet, _conv, _linear, _resblock,
                         _save, _transformer, materialise)

#: Widths of the hint encoder (real models: 16, 32, 96, 256); four widths downsample by 8, as in real files.
HINT_WIDTHS = (8, 8, 16, 16)
UNETS = {"sd1": SD1_UNET, "sd2": SD2_UNET, "sdxl": SDXL_UNET}


def controlnet_shapes(u: TinyUNet, *, prefix: str = "control_model.", hint_channels: int = 3,
                      hint_widths: tuple[int, ...] = HINT_WIDTHS) -> dict:
    out: dict = {}
    c0 = u.channels[0]
    emb = 4 * c0
    _linear(out, "time_embed.0", emb, c0)
    _linear(out, "time_embed.2", emb, emb)
    if u.adm_in:
        _linear(out, "label_emb.0.0", emb, u.adm_in)
        _linear(out, "label_emb.0.2", emb, emb)
    # Hint encoder: indices 0, 2, 4, ... are convs (the odd ones are SiLUs without weights).
    convs = [(hint_widths[0], hint_channels)]
    for a, b in zip(hint_widths[:-1], hint_widths[1:]):
        convs += [(a, a), (b, a)]
    convs.append((c0, hint_widths[-1]))
    for k, (n_out, n_in) in enumerate(convs):
        _conv(out, f"input_hint_block.{2 * k}", n_out, n_in)
    _conv(out, "input_blocks.0.0", c0, u.in_channels)
    _conv(out, "zero_convs.0.0", c0, c0, k=1)
    prev, i = c0, 1
    for level, ch in enumerate(u.channels):
        for _ in range(u.layers):
            _resblock(out, f"input_blocks.{i}.0", prev, ch, emb)
            if u.depth[level]:
                _transformer(out, f"input_blocks.{i}.1", ch, u.depth[level], u.context_dim, u.linear_proj)
            _conv(out, f"zero_convs.{i}.0", ch, ch, k=1)
            prev = ch
            i += 1
        if level < len(u.channels) - 1:
            _conv(out, f"input_blocks.{i}.0.op", ch, ch)
            _conv(out, f"zero_convs.{i}.0", ch, ch, k=1)
            i += 1
    _resblock(out, "middle_block.0", prev, prev, emb)
    _transformer(out, "middle_block.1", prev, u.mid_depth, u.context_dim, u.linear_proj)
    _resblock(out, "middle_block.2", prev, prev, emb)
    _conv(out, "middle_block_out.0", prev, prev, k=1)
    return {prefix + k: v for k, v in out.items()}


def write_controlnet(path, family: str = "sd1", *, prefix: str = "control_model.", seed: int = 11,
                     dtype: torch.dtype = torch.float32) -> Path:
    """An original-layout ControlNet (``.safetensors``, or ``.pth`` via torch.save of the bare dict)."""
    tensors = materialise(controlnet_shapes(UNETS[family], prefix=prefix), seed, dtype)
    path = Path(path)
    if path.suffix == ".pth":
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(tensors, path)
        return path
    return _save(path, tensors)


def controlnet_config(family: str) -> dict:
    """diffusers' ControlNetModel config for the tiny ControlNet of ``family``, written by hand."""
    u = UNETS[family]
    cfg = {
        "_class_name": "ControlNetModel", "in_channels": u.in_channels, "conditioning_channels": 3,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in u.depth],
        "block_out_channels": list(u.channels), "layers_per_block": u.layers,
        "cross_attention_dim": u.context_dim,
        "attention_head_dim": u.heads if isinstance(u.heads, int) else list(u.heads),
        "use_linear_projection": u.linear_proj, "norm_num_groups": 32,
        "transformer_layers_per_block": [d or 1 for d in u.depth[:-1]] + [u.mid_depth],
        "conditioning_embedding_out_channels": list(HINT_WIDTHS),
        "upcast_attention": family == "sd2",
    }
    if u.adm_in:
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_IDS,
                   projection_class_embeddings_input_dim=u.adm_in)
    return cfg


def write_config_dir(folder, family: str) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(controlnet_config(family), indent=1))
    return folder


#: diffusers' single-file ControlNet converter (0.42) does not map SDXL's size/crop embedding.
LABEL_EMB = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def diffusers_reference(original: Path, family: str, config_dir: Path, *, fill_label_emb: bool = False):
    """The original file loaded by diffusers' own single-file converter (offline, local config).

    That converter leaves SDXL's ``add_embedding`` (original ``label_emb``) at its random
    initialisation; ``fill_label_emb`` copies it over by its plain one-to-one name mapping.
    """
    from diffusers import ControlNetModel
    from safetensors.torch import load_file

    write_config_dir(config_dir, family)
    model = ControlNetModel.from_single_file(str(original), config=str(config_dir), local_files_only=True)
    if fill_label_emb and UNETS[family].adm_in:
        sd = load_file(str(original)) if original.suffix == ".safetensors" else torch.load(original, weights_only=True)
        prefix = "control_model." if any(k.startswith("control_model.") for k in sd) else ""
        with torch.no_grad():
            for new, old in LABEL_EMB.items():
                module = model.get_submodule(new)
                module.weight.copy_(sd[f"{prefix}{old}.weight"])
                module.bias.copy_(sd[f"{prefix}{old}.bias"])
    return model


def write_diffusers_folder(folder, original: Path, family: str) -> Path:
    """A diffusers ControlNet folder holding the same weights as ``original`` (converted by diffusers)."""
    folder = Path(folder)
    model = diffusers_reference(original, family, folder.parent / (folder.name + "-config"), fill_label_emb=True)
    model.save_pretrained(str(folder))
    return folder


def write_diffusers_file(path, folder: Path) -> Path:
    """A single file in diffusers' names (as ``diffusers_xl_canny_full.safetensors`` ships): a folder's weights."""
    import shutil

    path = Path(path)
    shutil.copyfile(Path(folder) / "diffusion_pytorch_model.safetensors", path)
    return path


# --- T2I-Adapters ---------------------------------------------------------------------------------------
#
# The original layouts follow TencentARC's ``ldm/modules/encoders/adapter.py`` as released (``sk=True``,
# ``ksize=1``, average-pool downsampling): ``Adapter`` is ``conv_in`` after a pixel unshuffle, then a flat
# ``body`` of ResnetBlocks, ``nums_rb`` per level, each ``block1`` 3x3 and ``block2`` 1x1, with a 1x1
# ``in_conv`` where the width changes (at each new level; for SDXL's ``Adapter_XL`` at level 1, without
# downsampling, and level 2). ``Adapter_light`` is one ``extractor`` per level: ``in_conv`` to a quarter
# width, ``body`` of light ResnetBlocks (two 3x3 convs) and ``out_conv``.

#: Levels of each tiny adapter: widths match the tiny UNets' levels.
ADAPTER_WIDTHS = {"full": SD1_UNET.channels, "light": SD1_UNET.channels + SD1_UNET.channels[-1:],
                  "xl": SDXL_UNET.channels}
ADAPTER_RES_BLOCKS = {"full": 2, "light": 3, "xl": 2}


def t2i_adapter_shapes(kind: str = "full", *, in_channels: int = 3) -> dict:
    widths = ADAPTER_WIDTHS[kind]
    rb = ADAPTER_RES_BLOCKS[kind]
    factor = 16 if kind == "xl" else 8
    cin = in_channels * factor * factor
    out: dict = {}
    if kind == "light":
        for i, ch in enumerate(widths):
            inter = ch // 4
            _conv(out, f"body.{i}.in_conv", inter, cin if i == 0 else widths[i - 1], k=1)
            for j in range(rb):
                _conv(out, f"body.{i}.body.{j}.block1", inter, inter)
                _conv(out, f"body.{i}.body.{j}.block2", inter, inter)
            _conv(out, f"body.{i}.out_conv", ch, inter, k=1)
        return out
    _conv(out, "conv_in", widths[0], cin)
    for i, ch in enumerate(widths):
        for j in range(rb):
            k = i * rb + j
            if j == 0 and i > 0 and widths[i - 1] != ch:
                _conv(out, f"body.{k}.in_conv", ch, widths[i - 1], k=1)
            _conv(out, f"body.{k}.block1", ch, ch)
            _conv(out, f"body.{k}.block2", ch, ch, k=1)
    return out


def write_t2i_adapter(path, kind: str = "full", *, in_channels: int = 3, seed: int = 21) -> Path:
    """An original-layout T2I-Adapter (``.safetensors``, or ``.pth``: torch.save of the bare dict, as released)."""
    tensors = materialise(t2i_adapter_shapes(kind, in_channels=in_channels), seed)
    path = Path(path)
    if path.suffix == ".pth":
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(tensors, path)
        return path
    return _save(path, tensors)


def t2i_adapter_config(kind: str = "full", *, in_channels: int = 3) -> dict:
    """diffusers' T2IAdapter config for the tiny adapter of ``kind``, written by hand."""
    widths = list(ADAPTER_WIDTHS[kind])
    return {"_class_name": "T2IAdapter", "in_channels": in_channels,
            "channels": widths[:-1] if kind == "light" else widths, "num_res_blocks": ADAPTER_RES_BLOCKS[kind],
            "downscale_factor": 16 if kind == "xl" else 8,
            "adapter_type": {"full": "full_adapter", "light": "light_adapter", "xl": "full_adapter_xl"}[kind]}


def _adapter_diffusers_name(key: str, kind: str) -> str:
    """TencentARC's names → diffusers' (``adapter.body.<level>.resnets.<j>...``), by the classes' structure."""
    parts = key.split(".")
    if parts[0] == "conv_in":
        return "adapter." + key
    if kind == "light":
        if parts[2] == "body":  # body.i.body.j.blockN.weight
            return f"adapter.body.{parts[1]}.resnets.{parts[3]}.{parts[4]}.{parts[5]}"
        return "adapter." + key
    level, j = divmod(int(parts[1]), ADAPTER_RES_BLOCKS[kind])
    if parts[2] == "in_conv":
        return f"adapter.body.{level}.in_conv.{parts[3]}"
    return f"adapter.body.{level}.resnets.{j}.{parts[2]}.{parts[3]}"


def write_t2i_adapter_folder(folder, original: Path, kind: str = "full", *, in_channels: int = 3) -> Path:
    """A diffusers T2IAdapter folder with the original file's weights (diffusers builds and saves it, strictly)."""
    from diffusers import T2IAdapter
    from safetensors.torch import load_file

    sd = load_file(str(original)) if original.suffix == ".safetensors" else torch.load(original, weights_only=True)
    config = {k: v for k, v in t2i_adapter_config(kind, in_channels=in_channels).items() if not k.startswith("_")}
    model = T2IAdapter(**config)
    model.load_state_dict({_adapter_diffusers_name(k, kind): v for k, v in sd.items()}, strict=True)
    model.save_pretrained(str(folder))
    return Path(folder)


# --- Control-LoRA -----------------------------------------------------------------------------------------
#
# Stability's layout: a ControlNet in the original names without a prefix plus a ``lora_controlnet``
# marker; each Linear/Conv2d weight of the encoder copy is a low-rank pair ``<module>.up`` (out x r,
# 1x1 for convs) and ``<module>.down`` (r x in, k x k for convs); the hint encoder, zero convs,
# middle_block_out, norms and biases are stored in full.

_CONTROL_LORA_FULL = ("input_hint_block.", "zero_convs.", "middle_block_out.")


def control_lora_tensors(family: str = "sdxl", *, rank: int = 4, seed: int = 31) -> dict[str, torch.Tensor]:
    shapes = controlnet_shapes(UNETS[family], prefix="")
    values = materialise(shapes, seed)
    g = torch.Generator().manual_seed(seed + 1)
    out = {"lora_controlnet": torch.zeros(1)}
    for name in sorted(shapes):
        shape = shapes[name][1]
        if name.startswith(_CONTROL_LORA_FULL) or len(shape) < 2:
            out[name] = values[name]
            continue
        module, n_out = name[: -len(".weight")], shape[0]
        r = min(rank, n_out)
        up = 0.1 * torch.randn(n_out, r, generator=g)
        out[f"{module}.up"] = up.reshape(n_out, r, 1, 1) if len(shape) == 4 else up
        out[f"{module}.down"] = 0.1 * torch.randn(r, *shape[1:], generator=g)
    return out


def write_control_lora(path, family: str = "sdxl", **kwargs) -> Path:
    return _save(Path(path), control_lora_tensors(family, **kwargs))


def merged_control_lora(lora: Path, checkpoint: Path, family: str = "sdxl") -> dict[str, torch.Tensor]:
    """The full original-layout ControlNet a Control-LoRA stands for on ``checkpoint`` (``control_model.``
    names): the checkpoint's UNet weight + up @ down for low-rank pairs, the stored tensor otherwise."""
    from safetensors.torch import load_file

    sd, base = load_file(str(lora)), load_file(str(checkpoint))
    out = {}
    for name, (_, shape) in controlnet_shapes(UNETS[family], prefix="").items():
        if name in sd:
            out["control_model." + name] = sd[name]
        else:
            module = name[: -len(".weight")]
            up, down = sd[module + ".up"].flatten(1).float(), sd[module + ".down"].flatten(1).float()
            out["control_model." + name] = base["model.diffusion_model." + name].float() + (up @ down).reshape(shape)
    return out


# --- union ControlNets (xinsir's controlnet-union-sdxl-1.0 / promax) --------------------------------------
#
# diffusers' ControlNetUnionModel built from a hand-written config (the tiny SDXL ControlNet's plus the
# union sizes) and saved by diffusers itself. The condition transformer is as wide as the first UNet
# level, as in the real model (320). Parts diffusers initialises to zero (zero convs, the hint encoder's
# last conv, the transformer's output projection) get seeded random values, else the residuals are zero.


def union_config(num_control_type: int = 8) -> dict:
    c0 = SDXL_UNET.channels[0]
    cfg = controlnet_config("sdxl")
    cfg.update(_class_name="ControlNetUnionModel", num_control_type=num_control_type, num_trans_channel=c0,
               num_trans_head=8, num_trans_layer=1, num_proj_channel=c0)
    return cfg


def union_model(num_control_type: int = 8, *, seed: int = 41):
    from diffusers import ControlNetUnionModel

    config = {k: v for k, v in union_config(num_control_type).items() if not k.startswith("_")}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ControlNetUnionModel(**config)
        with torch.no_grad():
            for p in model.parameters():
                if not p.any():
                    p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def write_union_folder(folder, num_control_type: int = 8, *, class_name: str = "ControlNetUnionModel",
                       seed: int = 41) -> Path:
    """A diffusers folder; ``class_name="ControlNetModel"`` writes it as xinsir's own folders name the class."""
    folder = Path(folder)
    union_model(num_control_type, seed=seed).save_pretrained(str(folder))
    if class_name != "ControlNetUnionModel":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["_class_name"] = class_name
        (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    return folder


def ready_map(size: int = 64):
    """A ready-made control map: white lines on black, as an edge or scribble map looks."""
    import numpy as np
    from PIL import Image

    a = np.zeros((size, size, 3), dtype=np.uint8)
    a[10:20, 5:60] = 255
    a[30:60, 30:34] = 255
    return Image.fromarray(a)
