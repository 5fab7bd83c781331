"""The FLUX.1 transformer: its diffusers config read from tensor shapes, and BFL → diffusers names.

Black Forest Labs' reference code (``flux.model.Flux``) names its modules ``img_in``,
``txt_in``, ``time_in``/``vector_in``/``guidance_in`` (two-layer MLP embedders), ``double_blocks``
(separate image and text streams that attend jointly) and ``single_blocks`` (one fused stream),
then ``final_layer``. diffusers' ``FluxTransformer2DModel`` holds the same weights with three
differences of form:

- the fused ``qkv`` projections of the double blocks are three linears (``to_q/to_k/to_v`` for the
  image stream, ``add_q_proj/...`` for the text stream);
- a single block's ``linear1`` (q, k, v and the MLP input, stacked) becomes ``to_q/to_k/to_v`` and
  ``proj_mlp``; its ``linear2`` is ``proj_out``;
- the final adaptive norm's projection yields (shift, scale) in the original and (scale, shift) in
  diffusers' ``AdaLayerNormContinuous``: the two halves are swapped.

Every width is read from the file (hidden size from ``img_in``, head size from the RMS-norm
scales, MLP width from ``linear1``), so checkpoints of any size load without a config file.

Weights kept as stored (fp8, GGUF blocks or bitsandbytes 4-bit codes, :class:`~.quantized.StoredWeight`)
go through the same renaming and splitting: all are cut by output rows, so q, k, v and the MLP
input of a fused projection are row ranges of its bytes (a 4-bit part that would begin inside a
block of scales comes back expanded instead; FLUX.1's never do). They end up in
:class:`~.quantized.StoredLinear` layers.
"""

from __future__ import annotations

import re

import torch

from ..errors import ModelError
from .detect import FluxLayout
from .header import CheckpointHeader
from .quantized import StoredWeight, _is_linear_weight, swap_linears, weight_storage

Weight = torch.Tensor | StoredWeight

#: Rotary-embedding split of a 128-wide head over (text index, image row, image column), as in FLUX.1.
FLUX_AXES_DIMS = (16, 56, 56)

# Original module → diffusers module, for modules that are only renamed.
_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_DOUBLE_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
               "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_SINGLE = {
    "modulation.lin": "norm.linear",
    "norm.query_norm": "attn.norm_q",
    "norm.key_norm": "attn.norm_k",
    "linear2": "proj_out",
}
_SINGLE_LINEAR1 = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """How a head's rotary dimensions split over (text, height, width): (16, 56, 56) for FLUX's 128.

    Other head sizes (small test models) keep the same proportions with even parts that add up
    to the head size, as every rotary pair needs two dimensions.
    """
    if head_dim == 128:
        return FLUX_AXES_DIMS
    if head_dim < 6 or head_dim % 2:
        raise ModelError(f"FLUX attention head size {head_dim} is not an even number of at least 6")
    side = (head_dim * FLUX_AXES_DIMS[1] // 128) // 2 * 2
    return (head_dim - 2 * side, side, side)


def _indices(names, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for n in names if (m := rx.match(n))})


def _contiguous(indices: list[int], what: str) -> int:
    if indices != list(range(len(indices))):
        raise ModelError(f"FLUX transformer {what} are numbered {indices[:6]}..., expected 0..{len(indices) - 1}")
    return len(indices)


def transformer_config(header: CheckpointHeader, layout: FluxLayout) -> dict:
    """``FluxTransformer2DModel`` keyword arguments for the transformer described by ``header``."""
    p = layout.prefix
    names = [k[len(p):] for k in header.tensors if k.startswith(p)]
    bfl = layout.naming == "bfl"

    def shape(bfl_name: str, diffusers_name: str) -> tuple[int, ...]:
        return header.shape(layout.key(bfl_name, diffusers_name))

    hidden, in_channels = shape("img_in.weight", "x_embedder.weight")
    head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale", "transformer_blocks.0.attn.norm_q.weight")[0]
    if head_dim <= 0 or hidden % head_dim:
        raise ModelError(f"FLUX transformer width {hidden} is not a whole number of {head_dim}-wide heads")
    double = _contiguous(_indices(names, r"double_blocks\.(\d+)\." if bfl else r"transformer_blocks\.(\d+)\."),
                         "double blocks")
    single = _contiguous(_indices(names, r"single_blocks\.(\d+)\." if bfl else r"single_transformer_blocks\.(\d+)\."),
                         "single blocks")
    out_features = shape("final_layer.linear.weight", "proj_out.weight")[0]
    return dict(
        patch_size=1,
        in_channels=in_channels,
        out_channels=out_features,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=head_dim,
        num_attention_heads=hidden // head_dim,
        joint_attention_dim=shape("txt_in.weight", "context_embedder.weight")[1],
        pooled_projection_dim=shape("vector_in.in_layer.weight", "time_text_embed.text_embedder.linear_1.weight")[1],
        guidance_embeds=layout.guidance_in in header.tensors,
        axes_dims_rope=rope_axes(head_dim),
    )


def _swap_halves(t: Weight) -> Weight:
    """(shift, scale) stacked along dim 0 → (scale, shift)."""
    if isinstance(t, StoredWeight):
        return t.swap_halves()
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _split_rows(t: Weight, sizes: tuple[int, ...], name: str) -> tuple[Weight, ...]:
    if t.shape[0] != sum(sizes):
        parts = " + ".join(map(str, sizes))
        raise ModelError(f"FLUX tensor {name} has {t.shape[0]} rows, expected {sum(sizes)} ({parts})")
    if isinstance(t, StoredWeight):
        return t.split_rows(sizes)
    return tuple(part.contiguous() for part in torch.split(t, list(sizes), dim=0))


def transformer_to_diffusers(state_dict: dict[str, Weight], hidden: int) -> dict[str, Weight]:
    """A FLUX transformer's original weights (prefix removed) in ``FluxTransformer2DModel`` names.

    ``state_dict`` is consumed. ``hidden`` is the model width; a single block's MLP width is what
    ``linear1`` holds beyond q, k and v.
    """
    out: dict[str, Weight] = {}
    unknown: list[str] = []
    for key in list(state_dict):
        value = state_dict.pop(key)
        module, _, param = key.rpartition(".")
        if param == "scale":  # the q/k RMS norms: a bare "scale" parameter in the original, "weight" in diffusers
            param = "weight"
        new = _rename(module, param, value, hidden, key)
        if new is None:
            unknown.append(key)
        else:
            out.update(new)
    if unknown:
        raise ModelError(f"FLUX transformer: {len(unknown)} unexpected tensors, e.g. {', '.join(sorted(unknown)[:4])}")
    return out


def _rename(module: str, param: str, value: Weight, hidden: int, key: str) -> dict[str, Weight] | None:
    if module in _TOP:
        return {f"{_TOP[module]}.{param}": value}
    if module == "final_layer.adaLN_modulation.1":
        return {f"norm_out.linear.{param}": _swap_halves(value)}
    m = re.match(r"(double|single)_blocks\.(\d+)\.(.+)$", module)
    if m is None:
        return None
    kind, index, inner = m.groups()
    if kind == "double":
        base = f"transformer_blocks.{index}."
        if inner in _DOUBLE:
            return {f"{base}{_DOUBLE[inner]}.{param}": value}
        if inner in _DOUBLE_QKV:
            parts = _split_rows(value, (hidden,) * 3, key)
            return {f"{base}{name}.{param}": part for name, part in zip(_DOUBLE_QKV[inner], parts)}
        return None
    base = f"single_transformer_blocks.{index}."
    if inner in _SINGLE:
        return {f"{base}{_SINGLE[inner]}.{param}": value}
    if inner == "linear1":
        mlp = value.shape[0] - 3 * hidden
        if mlp <= 0:
            raise ModelError(f"FLUX tensor {key} has {value.shape[0]} rows, fewer than q, k and v need ({3 * hidden})")
        parts = _split_rows(value, (hidden, hidden, hidden, mlp), key)
        return {f"{base}{name}.{param}": part for name, part in zip(_SINGLE_LINEAR1, parts)}
    return None


def build_transformer(header: CheckpointHeader, state_dict: dict[str, Weight], layout: FluxLayout, *,
                      device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """``FluxTransformer2DModel`` built on the meta device, then given the file's tensors (which are consumed).

    ``state_dict`` holds the transformer's tensors with the layout's prefix removed. Plain tensors
    (including fp8 or GGUF ones already expanded) are cast to ``dtype``. :class:`~.quantized.StoredWeight`
    values stay as stored in :class:`~.quantized.StoredLinear` layers that compute in ``dtype``; one
    that does not land on a linear layer's weight is expanded instead. The module's
    ``weight_storage`` says how its weights are held (``"bf16"``, ``"fp8_e4m3fn"``, ``"gguf:Q8_0"``, ...).
    """
    from diffusers import FluxTransformer2DModel

    from .loader import _assign

    config = transformer_config(header, layout)
    with torch.device("meta"):
        module = FluxTransformer2DModel(**config)
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    weights = transformer_to_diffusers(state_dict, hidden) if layout.naming == "bfl" else state_dict
    what = f"FLUX transformer ({layout.prefix}*)" if layout.prefix else "FLUX transformer"
    stored = {k: v for k, v in weights.items() if isinstance(v, StoredWeight)}
    for key in [k for k in stored if not _is_linear_weight(module, k)]:
        weights[key] = stored.pop(key).dequantize(dtype)
    for key in stored:
        del weights[key]
    layers = swap_linears(module, stored, what)
    module = _assign(module, weights, what, device, dtype)
    for key in list(stored):  # one at a time: each source copy is freed once placed
        layer = layers[key]
        layer.store(stored.pop(key).to(device))
        layer.compute_dtype = dtype
    module.weight_storage = weight_storage(module, dtype)
    return module


# --- LoRA support: the same renaming, applied to module names and output rows ------------------------


def original_module_names(config) -> list[str]:
    """Every original (BFL) Linear module name of a transformer with ``config``, for matching LoRA keys."""
    names = [m for m in _TOP if m != "guidance_in.in_layer" and m != "guidance_in.out_layer"]
    if getattr(config, "guidance_embeds", False):
        names += ["guidance_in.in_layer", "guidance_in.out_layer"]
    names.append("final_layer.adaLN_modulation.1")
    linear_double = [k for k in _DOUBLE if "norm" not in k] + list(_DOUBLE_QKV)
    linear_single = [k for k in _SINGLE if "norm" not in k] + ["linear1"]
    for i in range(config.num_layers):
        names += [f"double_blocks.{i}.{inner}" for inner in linear_double]
    for i in range(config.num_single_layers):
        names += [f"single_blocks.{i}.{inner}" for inner in linear_single]
    return names


def row_map(module: str, rows: int, hidden: int) -> dict[str, torch.Tensor]:
    """Where the ``rows`` output rows of original module ``module`` go: diffusers module → row indices.

    Computed by renaming a column of row numbers exactly as :func:`transformer_to_diffusers`
    renames a weight, so fused projections split (and the final modulation's halves swap) the
    same way for a LoRA update as for the checkpoint's weights.
    """
    numbers = torch.arange(rows).unsqueeze(1)
    renamed = _rename(module, "weight", numbers, hidden, module)
    if renamed is None:
        raise ModelError(f"{module!r} is not a FLUX transformer module")
    return {name.removesuffix(".weight"): index[:, 0] for name, index in renamed.items()}
