"""Reading checkpoint files: the safetensors header without the weights, and state dicts safely.

A safetensors file is an 8-byte little-endian header length, a JSON header that names every
tensor with its dtype, shape and byte range, then the raw bytes. Everything the loader needs
to decide what a file is (family, configs) comes from that header, so a 7 GB checkpoint is
recognised after reading a few hundred kilobytes.

Pickle-based torch files (``.ckpt``, ``.pt``, ``.bin``) can run arbitrary code when loaded.
They are read only through ``torch.load(weights_only=True)``, which refuses any object that is
not a tensor or a plain container; such files raise :class:`UnsafeModelFile` and are never
loaded any other way.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ModelError, UnsafeModelFile

if TYPE_CHECKING:  # torch is imported where tensors are made, so header-only work stays light
    import torch

#: Bytes per element of each safetensors dtype (used to check that byte ranges match shapes).
_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}

_TORCH_DTYPE_NAMES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "int32": "I32", "int64": "I64",
    "float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64",
}

#: A header larger than this is not a checkpoint header (real SDXL headers are ~200 kB).
_MAX_HEADER_BYTES = 100 * 1024 * 1024

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80


@dataclass(frozen=True)
class TensorInfo:
    """Name-independent facts about one stored tensor."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class CheckpointHeader:
    """Every tensor's dtype and shape plus the file's string metadata, without any weights."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    #: "safetensors" or "torch" (a pickle-based file read with weights_only).
    format: str = "safetensors"

    def has(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of ``name``; a missing tensor is a :class:`ModelError`."""
        info = self.tensors.get(name)
        if info is None:
            raise ModelError(f"checkpoint has no tensor {name!r}")
        return info.shape

    def with_prefix(self, prefix: str) -> list[str]:
        return [k for k in self.tensors if k.startswith(prefix)]


def sniff_format(path: str | os.PathLike) -> str:
    """'safetensors', 'zip' (torch >= 1.6 save) or 'pickle' (legacy torch save), from the first bytes."""
    p = _existing_file(path)
    size = p.stat().st_size
    if size == 0:
        raise ModelError(f"{p}: the file is empty; expected a .safetensors or .ckpt checkpoint")
    with open(p, "rb") as f:
        head = f.read(9)
    if head[:4] == _ZIP_MAGIC:
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if len(head) >= 2 and head[0] == _PICKLE_PROTO and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) < 9:
        raise ModelError(f"{p}: only {size} bytes: truncated, or not a checkpoint")
    raise ModelError(f"{p}: not a safetensors or torch checkpoint (unrecognised first bytes {head[:8].hex()})")


def read_header(path: str | os.PathLike) -> CheckpointHeader:
    """The tensors and metadata of a checkpoint; for safetensors only the header is read."""
    p = _existing_file(path)
    kind = sniff_format(p)
    if kind == "safetensors":
        return _read_safetensors_header(p)
    return header_from_state_dict(_torch_load(p, kind), format="torch")


def header_from_state_dict(state_dict: dict[str, torch.Tensor], *, metadata: dict[str, str] | None = None,
                           format: str = "torch") -> CheckpointHeader:
    """A header built from loaded tensors, so torch files are detected exactly like safetensors."""
    tensors = {
        name: TensorInfo(_dtype_name(t.dtype), tuple(int(d) for d in t.shape)) for name, t in state_dict.items()
    }
    return CheckpointHeader(tensors=tensors, metadata=dict(metadata or {}), format=format)


def _dtype_name(dtype) -> str:
    """safetensors' name for a torch dtype (``torch.float16`` → ``F16``)."""
    plain = str(dtype).removeprefix("torch.")
    return _TORCH_DTYPE_NAMES.get(plain, plain)


def load_state_dict(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint (safetensors, or a torch file read with weights_only)."""
    p = _existing_file(path)
    kind = sniff_format(p)
    if kind == "safetensors":
        _read_safetensors_header(p)  # precise errors for damaged files before safetensors' own
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device=str(device))
        except Exception as exc:  # safetensors raises its own SafetensorError / OSError
            raise ModelError(f"{p}: cannot read the safetensors data ({exc})") from None
    import torch

    state_dict = _torch_load(p, kind)
    if torch.device(device).type != "cpu":
        state_dict = {k: v.to(device) for k, v in state_dict.items()}
    return state_dict


def safetensors_body_offset(path: str | os.PathLike) -> int:
    """Where the tensor bytes start: 8 + header length (the LoRA 'addnet' hash covers what follows)."""
    p = _existing_file(path)
    with open(p, "rb") as f:
        n = _header_length(p, f.read(8), p.stat().st_size)
    return 8 + n


def _existing_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        raise ModelError(f"{p}: is a directory; expected a checkpoint file (.safetensors or .ckpt)")
    if not p.exists():
        raise ModelError(f"{p}: no such file")
    return p


def _header_length(p: Path, first8: bytes, size: int) -> int:
    if len(first8) < 8:
        raise ModelError(f"{p}: truncated safetensors file ({size} bytes, shorter than the 8-byte header length)")
    (n,) = struct.unpack("<Q", first8)
    if n > size - 8:
        raise ModelError(f"{p}: safetensors header claims {n} bytes but the file has only {size - 8} after the length "
                         "(truncated or not a safetensors file)")
    if n > _MAX_HEADER_BYTES:
        raise ModelError(f"{p}: safetensors header of {n} bytes is implausibly large")
    return n


def _read_safetensors_header(p: Path) -> CheckpointHeader:
    size = p.stat().st_size
    with open(p, "rb") as f:
        n = _header_length(p, f.read(8), size)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{p}: safetensors header is not valid JSON ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(header, dict):
        raise ModelError(f"{p}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ModelError(f"{p}: safetensors __metadata__ is not a JSON object")
    body = size - 8 - n
    tensors = {name: _tensor_info(p, name, entry, body) for name, entry in header.items()}
    return CheckpointHeader(tensors=tensors, metadata={str(k): str(v) for k, v in metadata.items()},
                            format="safetensors")


def _tensor_info(p: Path, name: str, entry: object, body: int) -> TensorInfo:
    """Validate one header entry: dtype known, shape of ints, byte range inside the file and matching the shape."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise ModelError(f"{p}: header entry for {name!r} lacks dtype/shape/data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ModelError(f"{p}: tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise ModelError(f"{p}: tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise ModelError(f"{p}: tensor {name!r} has invalid data_offsets {offsets!r}")
    if end > body:
        raise ModelError(f"{p}: tensor {name!r} ends at byte {end} of the data but the file holds only {body} "
                         "(truncated download?)")
    itemsize = _ITEMSIZE.get(dtype)
    if itemsize is not None and (end - begin) != math.prod(shape) * itemsize:
        raise ModelError(f"{p}: tensor {name!r} spans {end - begin} bytes, expected {math.prod(shape) * itemsize} "
                         f"for {dtype} {shape}")
    return TensorInfo(str(dtype), tuple(shape))


def _torch_load(p: Path, kind: str) -> dict[str, torch.Tensor]:
    """The flat name → tensor mapping of a torch file (:func:`load_torch_object`)."""
    return _tensors_of(p, load_torch_object(p, kind))


def load_torch_object(p: Path, kind: str | None = None) -> object:
    """What a torch file holds, read with torch.load restricted to tensors and plain containers:
    code-carrying pickles are refused (:class:`UnsafeModelFile`). ``kind``: :func:`sniff_format`'s."""
    import torch

    kind = kind or sniff_format(p)
    try:
        if p.suffix.lower() == ".safetensors":  # torch.load would hand this name to safetensors: pass the bytes
            with open(p, "rb") as f:
                obj = torch.load(f, map_location="cpu", weights_only=True)
        else:
            obj = torch.load(str(p), map_location="cpu", weights_only=True, mmap=(kind == "zip"))
    except pickle.UnpicklingError as exc:
        raise UnsafeModelFile(
            f"{p}: refused: this pickle-based file needs arbitrary code to load "
            f"({_first_line(exc)}); convert it to .safetensors with a tool you trust, or get the .safetensors version"
        ) from None
    except Exception as exc:  # corrupt zip, truncated pickle, ...
        raise ModelError(f"{p}: cannot read this torch checkpoint ({exc.__class__.__name__}: {_first_line(exc)})") from None
    return obj


def _tensors_of(p: Path, obj: object) -> dict[str, torch.Tensor]:
    """The flat name → tensor mapping inside a loaded torch file (Lightning files nest it under 'state_dict')."""
    import torch

    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict):
        from .ip_adapter import flatten_nested

        obj = flatten_nested(obj) or obj  # an IP-Adapter .bin: {"image_proj": {...}, "ip_adapter": {...}}
    if not isinstance(obj, dict):
        raise ModelError(f"{p}: torch file holds a {type(obj).__name__}, expected a dict of tensors")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelError(f"{p}: torch file holds no tensors")
    return tensors


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__
