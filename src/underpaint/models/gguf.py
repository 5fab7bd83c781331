"""GGUF files (``flux1-dev-Q8_0.gguf`` and the like): tensor names and shapes, and dequantized weights.

GGUF is llama.cpp's container: a header of key/value metadata, then tensor descriptions, then
the data, each tensor in a GGML type (F32, F16, BF16, or a block quantization such as Q8_0,
Q5_0, Q4_K). FLUX GGUFs keep the transformer's original names. GGML lists a tensor's
dimensions fastest-varying first, the reverse of torch's order; the ``gguf`` package's reader
already hands the data over in torch (row-major) order with quantized rows as raw bytes, so
the torch shape is the listed one reversed.

Weights are dequantized with the ``gguf`` package's own reference code, one tensor at a time,
straight to the compute dtype: the module then holds ordinary tensors. With
``keep_quantized=True`` the 2-D weights in a type :mod:`.quantized` can expand on the fly (Q8_0,
Q5_0/Q5_1, Q4_0/Q4_1, Q4_K, Q5_K, Q6_K) come back as :class:`~.quantized.StoredWeight` (the raw
blocks, one row of bytes per output row) for :class:`~.quantized.StoredLinear` layers; other
types are still expanded here.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

import torch

from ..errors import ModelError
from .header import CheckpointHeader, TensorInfo
from .quantized import GGUF_BLOCKS, StoredWeight

MAGIC = b"GGUF"
#: Metadata key some converters write when they had to store a tensor reshaped.
_ORIG_SHAPE = "comfy.gguf.orig_shape."


def is_gguf(path: str | os.PathLike) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == MAGIC


def _reader(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelError(f"{path}: reading GGUF files needs the 'gguf' package "
                         "(pip install 'underpaint[flux]')") from None
    try:
        return GGUFReader(str(path))
    except Exception as exc:  # truncated or damaged files raise ValueError, IndexError, ...
        raise ModelError(f"{path}: cannot read this GGUF file ({type(exc).__name__}: {exc})") from None


def _field_value(reader, name: str):
    field = reader.fields.get(name)
    if field is None:
        return None
    try:
        return field.contents()
    except Exception:  # older gguf versions: the last part holds the value
        return field.parts[-1].tolist()


def _torch_shape(reader, tensor) -> tuple[int, ...]:
    orig = _field_value(reader, _ORIG_SHAPE + tensor.name)
    if orig:
        return tuple(int(d) for d in orig)
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def read_gguf_header(path: str | os.PathLike) -> CheckpointHeader:
    """Every tensor's name, torch-order shape and GGML type, plus the string metadata; no data is read."""
    p = Path(path)
    reader = _reader(p)
    tensors = {t.name: TensorInfo(t.tensor_type.name, _torch_shape(reader, t)) for t in reader.tensors}
    metadata = {}
    for name in reader.fields:
        if name.startswith("general."):
            value = _field_value(reader, name)
            if isinstance(value, str):
                metadata[name] = value
    return CheckpointHeader(tensors=tensors, metadata=metadata, format="gguf")


def load_gguf(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, keep_quantized: bool = False,
              only: Collection[str] | None = None) -> tuple[CheckpointHeader, dict[str, torch.Tensor | StoredWeight]]:
    """The header and every tensor dequantized to ``dtype`` (integer tensors keep their type).

    With ``keep_quantized``, 2-D tensors of a type in :data:`.quantized.GGUF_BLOCKS` are returned
    as :class:`~.quantized.StoredWeight` instead (copied into memory as stored). ``only`` names the
    tensors to read (the header still lists them all); the others are not read at all.
    """
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    p = Path(path)
    reader = _reader(p)
    header = read_gguf_header(p)
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if only is not None and t.name not in only:
            continue
        shape = header.tensors[t.name].shape
        if t.tensor_type in (Q.I8, Q.I16, Q.I32, Q.I64):
            out[t.name] = torch.from_numpy(np.array(t.data)).reshape(shape)
            continue
        if keep_quantized and t.tensor_type.name in GGUF_BLOCKS and len(shape) == 2:
            stored = _stored(t, shape)
            if stored is not None:
                out[t.name] = stored
                continue
        try:
            values = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ModelError(f"{p}: tensor {t.name} is stored as {t.tensor_type.name}, which the gguf package cannot "
                             "dequantize") from None
        if values.size != int(np.prod(shape)):
            raise ModelError(f"{p}: tensor {t.name} holds {values.size} values, expected {shape}")
        out[t.name] = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape).to(dtype)  # a writable copy
    return header, out


def _stored(tensor, shape: tuple[int, ...]) -> StoredWeight | None:
    """A quantized 2-D tensor's blocks as rows of bytes, or None where its rows do not hold whole blocks
    (a tensor a converter stored reshaped), which is then expanded at load instead."""
    import numpy as np

    block, size = GGUF_BLOCKS[tensor.tensor_type.name]
    rows, cols = shape
    data = np.array(tensor.data, dtype=np.uint8)  # a copy in memory, as stored
    if cols % block or data.size != rows * (cols // block) * size:
        return None
    return StoredWeight(torch.from_numpy(data).reshape(rows, cols // block * size), tensor.tensor_type.name,
                        (rows, cols))
