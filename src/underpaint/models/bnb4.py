"""bitsandbytes 4-bit (NF4, FP4) weights in safetensors files, read without bitsandbytes.

Forge's ``flux1-dev-bnb-nf4.safetensors`` and ``-v2`` (the FLUX.1 transformer in NF4 with CLIP-L,
T5 and the VAE beside it in ComfyUI's all-in-one prefixes), transformer-only NF4 files, and
models saved by diffusers or transformers with a ``BitsAndBytesConfig`` all store a quantized
linear weight the way bitsandbytes' ``Linear4bit`` serializes it (``QuantState.as_dict(packed=True)``
under ``<layer>.weight.``):

- ``<layer>.weight``: the codes, uint8 of shape (ceil(n / 2), 1) for the n values of the
  logical weight in row-major order, two a byte, the first of each pair in the high nibble;
- ``<layer>.weight.absmax``: one scale per block of ``blocksize`` consecutive values (64 in
  these files), float32; or, with double quantization ("compress statistics", Forge's first
  NF4 file), one uint8 code per block;
- ``<layer>.weight.quant_map``: the 16 values a code stands for (the NF4 or FP4 table);
- with double quantization, ``<layer>.weight.nested_absmax`` (float32, one per run of
  ``nested_blocksize`` codes, 256) and ``<layer>.weight.nested_quant_map`` (the 256 values an
  8-bit code stands for);
- ``<layer>.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``): the UTF-8 bytes (uint8) of a
  JSON object with ``quant_type``, ``blocksize``, ``dtype`` (the weight's before quantization),
  ``shape`` (the logical shape) and, with double quantization, ``nested_blocksize``,
  ``nested_dtype`` and ``nested_offset`` (a number added to every decoded scale).

:func:`take_4bit` turns each such group into one :class:`~.quantized.StoredWeight` (kind
``"nf4"``/``"fp4"``) of the logical shape, or expands it, and :func:`logical_header` gives the
header the rest of the loader reads shapes from: each weight at its logical shape (dtype
``"NF4"``/``"FP4"``), the statistics gone. :func:`read_4bit_header` does the same from the file,
reading only the small JSON tensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import ModelError
from .header import CheckpointHeader, TensorInfo
from .quantized import FOUR_BIT_KINDS, BlockScales, StoredWeight, code_table, dequantize_4bit

#: What follows a weight's name in the key of its JSON quantization state.
QUANT_STATE = ".quant_state.bitsandbytes__"
#: The statistics tensors beside a quantized weight (``<weight>.<name>``).
STATISTICS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def holds_4bit(names) -> bool:
    """Whether any tensor name is a bitsandbytes 4-bit quantization state."""
    return any(QUANT_STATE in k for k in names)


def quantized_weights(names) -> dict[str, str]:
    """Each quantized weight's name → its 4-bit type as the state's key names it ("nf4", "fp4", ...)."""
    out = {}
    for key in names:
        weight, sep, kind = key.rpartition(QUANT_STATE)
        if sep and weight:
            out[weight] = kind
    return out


def quant_state(blob: torch.Tensor, key: str) -> dict:
    """The JSON object held by the uint8 tensor ``key``."""
    if blob.dtype != torch.uint8:
        raise ModelError(f"tensor {key}: expected the uint8 bytes of bitsandbytes' JSON quantization state, "
                         f"got {blob.dtype}")
    try:
        state = json.loads(bytes(blob.reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"tensor {key}: not bitsandbytes' JSON quantization state ({exc})") from None
    if not isinstance(state, dict):
        raise ModelError(f"tensor {key}: bitsandbytes' quantization state should be a JSON object")
    return state


def _field(state: dict, name: str, key: str):
    if name not in state:
        raise ModelError(f"tensor {key}: the quantization state has no {name!r}")
    return state[name]


def logical_shape(state: dict, key: str) -> tuple[int, ...]:
    """The shape the quantized weight had, from its state."""
    shape = _field(state, "shape", key)
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ModelError(f"tensor {key}: quantization state shape {shape!r} is not a list of positive sizes")
    return tuple(shape)


def logical_header(header: CheckpointHeader, states: dict[str, tuple[str, dict]]) -> CheckpointHeader:
    """``header`` with each quantized weight (``states``: weight name → (type, JSON state)) at its
    logical shape, typed ``"NF4"``/``"FP4"``, and its statistics and state left out."""
    tensors = dict(header.tensors)
    for weight, (kind, state) in states.items():
        for name in (*STATISTICS, QUANT_STATE.removeprefix(".") + kind):
            tensors.pop(f"{weight}.{name}", None)
        tensors[weight] = TensorInfo(kind.upper(), logical_shape(state, weight + QUANT_STATE + kind))
    return CheckpointHeader(tensors=tensors, metadata=header.metadata, format=header.format)


def read_4bit_header(path: str | os.PathLike, header: CheckpointHeader) -> CheckpointHeader:
    """:func:`logical_header` of a safetensors file, reading only its JSON quantization states."""
    from safetensors import safe_open

    states = {}
    with safe_open(str(Path(path)), "pt") as f:
        for weight, kind in quantized_weights(header.tensors).items():
            key = weight + QUANT_STATE + kind
            states[weight] = (kind, quant_state(f.get_tensor(key), key))
    return logical_header(header, states)


def take_4bit(header: CheckpointHeader, sd: dict, dtype: torch.dtype, *,
              keep: bool) -> tuple[CheckpointHeader, dict]:
    """Every bitsandbytes-quantized weight of ``sd`` (in place) as one :class:`~.quantized.StoredWeight`
    (``keep``, where its rows hold whole bytes) or expanded to ``dtype``, its statistics removed;
    with the :func:`logical_header`."""
    states = {}
    for weight, kind in quantized_weights(sd).items():
        key = weight + QUANT_STATE + kind
        state = quant_state(sd.pop(key), key)
        stats = {name: sd.pop(f"{weight}.{name}", None) for name in STATISTICS}
        if weight not in sd:
            raise ModelError(f"tensor {key} is a quantization state but the file has no weight {weight}")
        value = stored_4bit(weight, kind, sd.pop(weight), stats, state)
        if isinstance(value, StoredWeight) and not keep:
            value = value.dequantize(dtype)
        sd[weight] = value if isinstance(value, StoredWeight) else value.to(dtype)
        states[weight] = (kind, state)
    return logical_header(header, states), sd


def stored_4bit(weight: str, kind: str, codes: torch.Tensor, stats: dict[str, torch.Tensor | None],
                state: dict) -> StoredWeight | torch.Tensor:
    """One quantized weight from its codes, statistics and JSON state: a :class:`~.quantized.StoredWeight`
    when it is 2-D with an even row length, else (rows not whole bytes) expanded to float32."""
    if kind not in FOUR_BIT_KINDS:
        raise ModelError(f"tensor {weight} is quantized by bitsandbytes as {kind!r}; underpaint reads "
                         f"{' and '.join(FOUR_BIT_KINDS)}")
    key = weight + QUANT_STATE + kind
    if _field(state, "quant_type", key) != kind:
        raise ModelError(f"tensor {key}: its state says quant_type {state['quant_type']!r}")
    shape = logical_shape(state, key)
    n = 1
    for d in shape:
        n *= d
    packed = codes.contiguous().view(torch.uint8).reshape(-1)  # other storage dtypes hold the same bytes
    if packed.numel() != -(-n // 2):
        raise ModelError(f"tensor {weight} holds {packed.numel()} bytes of {kind} codes; its shape {shape} "
                         f"needs {-(-n // 2)}")
    _check_table(weight, kind, stats.get("quant_map"))
    scales = _scales(weight, stats, state, key, n)
    if len(shape) == 2 and shape[1] % 2 == 0:
        return StoredWeight(packed.reshape(shape[0], shape[1] // 2), kind, (shape[0], shape[1]), scales=scales)
    return dequantize_4bit(packed, kind, scales, shape, torch.float32)


def _check_table(weight: str, kind: str, table: torch.Tensor | None) -> None:
    """The file's code table must be bitsandbytes' own for ``kind`` (it is what the codes were chosen from)."""
    if table is None:
        raise ModelError(f"tensor {weight} has no {weight}.quant_map (the 16 values of its {kind} codes)")
    ours = code_table(kind)
    if table.numel() != 16 or not torch.allclose(table.reshape(-1).float(), ours, rtol=0, atol=1e-6):
        raise ModelError(f"tensor {weight}.quant_map is not bitsandbytes' {kind} table")


def _scales(weight: str, stats: dict, state: dict, key: str, n: int) -> BlockScales:
    absmax = stats.get("absmax")
    if absmax is None:
        raise ModelError(f"tensor {weight} has no {weight}.absmax (its block scales)")
    blocksize = _field(state, "blocksize", key)
    if not isinstance(blocksize, int) or blocksize <= 0:
        raise ModelError(f"tensor {key}: blocksize {blocksize!r} is not a positive whole number")
    absmax = absmax.reshape(-1)
    if absmax.numel() != -(-n // blocksize):
        raise ModelError(f"tensor {weight}.absmax holds {absmax.numel()} scales; {n} values in blocks of "
                         f"{blocksize} need {-(-n // blocksize)}")
    nested = stats.get("nested_absmax")
    if nested is None:
        if not absmax.is_floating_point():
            raise ModelError(f"tensor {weight}.absmax is {absmax.dtype} codes but the file has no "
                             f"{weight}.nested_absmax to decode them")
        return BlockScales(absmax.float(), blocksize)
    code = stats.get("nested_quant_map")
    if code is None or code.numel() != 256:
        raise ModelError(f"tensor {weight}: double quantization needs {weight}.nested_quant_map of 256 values")
    if absmax.dtype != torch.uint8:
        raise ModelError(f"tensor {weight}.absmax: double-quantized scales should be uint8 codes, got {absmax.dtype}")
    run = _field(state, "nested_blocksize", key)
    offset = _field(state, "nested_offset", key)
    if not isinstance(run, int) or run <= 0 or not isinstance(offset, (int, float)):
        raise ModelError(f"tensor {key}: nested_blocksize {run!r} and nested_offset {offset!r} should be numbers")
    nested = nested.reshape(-1).float()
    if nested.numel() != -(-absmax.numel() // run):
        raise ModelError(f"tensor {weight}.nested_absmax holds {nested.numel()} scales; {absmax.numel()} codes in "
                         f"runs of {run} need {-(-absmax.numel() // run)}")
    return BlockScales(absmax, blocksize, nested, code.reshape(-1).float(), run, float(offset))


__all__ = ["QUANT_STATE", "holds_4bit", "logical_header", "quant_state", "quantized_weights", "read_4bit_header",
           "stored_4bit", "take_4bit"]
