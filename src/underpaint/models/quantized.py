"""Linear layers whose weights stay as the file stores them: fp8, or GGUF quantized blocks.

A 12B FLUX.1 transformer takes about 24 GB in bf16. Its fp8 copy (``float8_e4m3fn``, one byte
a weight) and its GGUF quantizations (Q8_0 about 1.06 bytes a weight, Q4_0 about 0.56) only save
memory if the weights are *kept* that way: :class:`StoredLinear` holds the stored bytes and
expands them to the input's dtype on every call, one layer at a time, so the full-precision
copy of a weight lives only while its matmul runs. Computation is unchanged (``F.linear`` in
the compute dtype); only storage differs.

:class:`StoredWeight` is a weight in transit from the file to a layer: raw bytes (``uint8``,
one row of the logical weight per row of bytes) plus what they mean. Both fp8 rows (one byte a
value) and GGUF rows (whole blocks of 32 or 256 values along the input dimension) are cut by
output rows, so the fused projections FLUX files carry (``qkv``, ``linear1``) split into q, k,
v and the MLP input by slicing rows of bytes.

GGUF block layouts follow GGML's definitions (as documented by the ``gguf`` package's
``gguf.quants``); the torch dequantizers here run on the weight's own device and give the same
float32 values as ``gguf.quants.dequantize``. Types without one here (the i-quants, Q2_K, Q3_K,
...) are expanded when the file is read instead.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..errors import ModelError

FP8_KINDS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
#: Values per block and bytes per block of the GGUF types dequantized here.
GGUF_BLOCKS: dict[str, tuple[int, int]] = {
    "Q4_0": (32, 2 + 16),
    "Q4_1": (32, 2 + 2 + 16),
    "Q5_0": (32, 2 + 4 + 16),
    "Q5_1": (32, 2 + 2 + 4 + 16),
    "Q8_0": (32, 2 + 32),
    "Q4_K": (256, 2 + 2 + 12 + 128),
    "Q5_K": (256, 2 + 2 + 12 + 32 + 128),
    "Q6_K": (256, 128 + 64 + 16 + 2),
}
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# --- GGUF blocks --------------------------------------------------------------------------------------


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The little-endian float16 at byte ``start`` of every block, as an (n, 1) float32 column."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, k) bytes → (n, 2k) values: the k low nibbles first, then the k high ones (GGML's order)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(qh: torch.Tensor) -> torch.Tensor:
    """(n, k) bytes → (n, 8k) single bits, bit j of byte i at 8i + j (a little-endian bit field)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh.unsqueeze(-1) >> shifts) & 1).flatten(-2)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    return b[:, 2:].contiguous().view(torch.int8).float() * d


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    return d * (_nibbles(b[:, 2:]).to(torch.int8) - 8).float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b, 0), _f16(b, 2)
    return d * _nibbles(b[:, 4:]).float() + m


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    q = _nibbles(b[:, 6:]) | (_bits(b[:, 2:6]) << 4)
    return d * (q.to(torch.int8) - 16).float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles(b[:, 8:]) | (_bits(b[:, 4:8]) << 4)
    return d * q.float() + m


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes → eight 6-bit scales and eight 6-bit minimums per 256-value block.

    Bytes 0-3 hold scales 0-3 (low 6 bits), bytes 4-7 minimums 0-3; scales and minimums 4-7 take
    their low 4 bits from bytes 8-11 (scale low nibble, minimum high nibble) and their top 2 bits
    from the top bits of bytes 0-3 and 4-7.
    """
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scale = torch.cat([lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)], dim=-1)
    minimum = torch.cat([mid & 0x3F, (hi >> 4) | ((mid >> 2) & 0x30)], dim=-1)
    return scale.float(), minimum.float()


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """128 bytes → eight sub-blocks of 32 values: each 32-byte chunk gives its low nibbles, then its high."""
    n = qs.shape[0]
    chunks = qs.reshape(n, 4, 32)
    return torch.stack([chunks & 0x0F, chunks >> 4], dim=2).reshape(n, 8, 32)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scales(b[:, 4:16])
    scale, offset = (d * sc).reshape(n, 8, 1), (dmin * mn).reshape(n, 8, 1)
    return (scale * _k_nibbles(b[:, 16:]).float() - offset).reshape(n, 256)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scales(b[:, 4:16])
    scale, offset = (d * sc).reshape(n, 8, 1), (dmin * mn).reshape(n, 8, 1)
    # high bits: bit j of the 32 bytes belongs to sub-block j
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device).reshape(1, 8, 1)
    high = (b[:, 16:48].unsqueeze(1) >> shifts) & 1
    q = _k_nibbles(b[:, 48:]) | (high << 4)
    return (scale * q.float() - offset).reshape(n, 256)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh, scales = b[:, 0:128], b[:, 128:192], b[:, 192:208]
    d = _f16(b, 208)
    scale = (d * scales.contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    low = ql.reshape(n, 2, 64)
    low = torch.stack([low & 0x0F, low >> 4], dim=2).reshape(n, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).reshape(1, 1, 4, 1)
    high = ((qh.reshape(n, 2, 1, 32) >> shifts) & 0x03).reshape(n, 8, 32)
    q = (low | (high << 4)).to(torch.int8) - 32
    return (scale * q.reshape(n, 16, 16).float()).reshape(n, 256)


_DEQUANTIZE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
    "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}


def dequantize_gguf(packed: torch.Tensor, qtype: str, shape: Sequence[int],
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """GGUF blocks (``uint8``, any shape holding whole blocks) → a ``shape`` tensor of ``dtype`` on their device.

    Values are computed in float32, in the order GGML's reference code uses, then cast.
    """
    if qtype not in _DEQUANTIZE:
        raise ModelError(f"GGUF type {qtype} cannot be dequantized on the fly; known: {', '.join(_DEQUANTIZE)}")
    block, size = GGUF_BLOCKS[qtype]
    if packed.dtype != torch.uint8 or packed.numel() % size:
        raise ModelError(f"GGUF {qtype} data must be whole {size}-byte blocks of uint8, got {packed.numel()} "
                         f"{packed.dtype} values")
    values = _DEQUANTIZE[qtype](packed.reshape(-1, size))
    if values.numel() != _numel(shape):
        raise ModelError(f"GGUF {qtype} data holds {values.numel()} values, expected {tuple(shape)}")
    return values.reshape(tuple(shape)).to(dtype)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# --- a weight as stored ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredWeight:
    """A 2-D weight as a file stores it: ``data`` is uint8 with one row of bytes per output row.

    ``kind`` is ``"float8_e4m3fn"``/``"float8_e5m2"`` (one byte a value; ``scale`` multiplies them,
    as in "scaled fp8" files) or a GGUF type name such as ``"Q8_0"`` (blocks along the input
    dimension). ``shape`` is the logical (out_features, in_features).
    """

    data: torch.Tensor
    kind: str
    shape: tuple[int, int]
    scale: float | None = None

    def __post_init__(self) -> None:
        if self.data.dtype != torch.uint8 or self.data.ndim != 2 or self.data.shape[0] != self.shape[0]:
            raise ModelError(f"stored {self.kind} weight: expected uint8 rows for {self.shape}, got "
                             f"{self.data.dtype} {tuple(self.data.shape)}")
        if self.data.shape[1] != row_bytes(self.kind, self.shape[1]):
            raise ModelError(f"stored {self.kind} weight of shape {self.shape}: rows of {self.data.shape[1]} bytes, "
                             f"expected {row_bytes(self.kind, self.shape[1])}")

    @classmethod
    def fp8(cls, tensor: torch.Tensor, scale: float | None = None) -> StoredWeight:
        """A 2-D float8 tensor, kept byte for byte."""
        kind = str(tensor.dtype).removeprefix("torch.")
        if kind not in FP8_KINDS or tensor.ndim != 2:
            raise ModelError(f"expected a 2-D float8 weight, got {tensor.dtype} {tuple(tensor.shape)}")
        return cls(tensor.contiguous().view(torch.uint8), kind, (int(tensor.shape[0]), int(tensor.shape[1])), scale)

    @property
    def label(self) -> str:
        """``"fp8_e4m3fn"``, ``"fp8_e5m2"`` or ``"gguf:Q8_0"`` (and so on)."""
        return "fp8_" + self.kind.removeprefix("float8_") if self.kind in FP8_KINDS else f"gguf:{self.kind}"

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The logical weight in ``dtype``, on the data's device."""
        if self.kind in FP8_KINDS:
            values = self.data.view(FP8_KINDS[self.kind])
            if self.scale is None:
                return values.to(dtype)  # exact: every fp8 value is representable in fp16/bf16/fp32
            return (values.float() * self.scale).to(dtype)
        return dequantize_gguf(self.data, self.kind, self.shape, dtype)

    def to(self, device: torch.device | str) -> StoredWeight:
        return replace(self, data=self.data.to(device))

    def split_rows(self, sizes: Sequence[int]) -> tuple[StoredWeight, ...]:
        """Consecutive row ranges (output features) of the given sizes, as stored weights of their own."""
        parts = torch.split(self.data, list(sizes), dim=0)
        return tuple(replace(self, data=p.contiguous(), shape=(int(p.shape[0]), self.shape[1])) for p in parts)

    def swap_halves(self) -> StoredWeight:
        """The two halves of the rows exchanged ((shift, scale) → (scale, shift))."""
        first, second = self.data.chunk(2, dim=0)
        return replace(self, data=torch.cat([second, first], dim=0))


def row_bytes(kind: str, in_features: int) -> int:
    """Bytes of one stored row of ``in_features`` values."""
    if kind in FP8_KINDS:
        return in_features
    if kind not in GGUF_BLOCKS:
        raise ModelError(f"unknown stored weight kind {kind!r}")
    block, size = GGUF_BLOCKS[kind]
    if in_features % block:
        raise ModelError(f"a {kind} row holds whole blocks of {block} values; {in_features} is not a multiple")
    return in_features // block * size


# --- the layer ------------------------------------------------------------------------------------------


class StoredLinear(torch.nn.Module):
    """``nn.Linear``'s computation with the weight kept as stored, expanded to the input's dtype per call.

    The stored bytes are a buffer (``packed``, uint8: ``module.to(dtype)`` leaves it alone and
    ``.to(device)`` moves it); the bias is an ordinary parameter in the compute dtype.
    ``state_dict()`` gives ``weight`` as the expanded tensor in the bias's dtype, so the module
    reads like the ``nn.Linear`` it replaces; ``load_state_dict`` takes the bias only.
    """

    def __init__(self, in_features: int, out_features: int, kind: str, *, bias: bool = True,
                 scale: float | None = None, device=None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.kind, self.scale = kind, scale
        self.compute_dtype = dtype or torch.get_default_dtype()
        self.register_buffer("packed", None, persistent=False)
        #: LoRA updates applied at run time, since the stored weight cannot take them: low-rank
        #: pairs (up, down, factor) and one dense difference for other network kinds.
        self.low_rank: list[tuple[torch.Tensor, torch.Tensor, float]] = []
        self.dense_delta: torch.Tensor | None = None
        if bias:
            self.bias = torch.nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    @property
    def stored(self) -> StoredWeight:
        if self.packed is None:
            raise ModelError(f"{self.kind} linear layer ({self.in_features} → {self.out_features}) has no weight yet")
        return StoredWeight(self.packed, self.kind, (self.out_features, self.in_features), self.scale)

    def store(self, weight: StoredWeight) -> None:
        """Take ``weight`` (already on the layer's device) as this layer's weight."""
        if weight.shape != (self.out_features, self.in_features) or weight.kind != self.kind:
            raise ModelError(f"a {weight.kind} weight of shape {weight.shape} does not fit a {self.kind} layer "
                             f"({self.in_features} → {self.out_features})")
        self.packed = weight.data
        self.scale = weight.scale

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full weight, (out_features, in_features), in ``dtype`` (default: the bias's dtype)."""
        return self.stored.dequantize(dtype or self._dtype())

    def _dtype(self) -> torch.dtype:
        return self.bias.dtype if self.bias is not None else self.compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        out = F.linear(x, self.dequantized_weight(x.dtype), bias)
        for up, down, factor in self.low_rank:  # kept where they were made: moved with the input (offload)
            out = out + F.linear(F.linear(x, down.to(x.device, x.dtype)), up.to(x.device, x.dtype)) * factor
        if self.dense_delta is not None:
            out = out + F.linear(x, self.dense_delta.to(x.device, x.dtype))
        return out

    def clear_updates(self) -> None:
        """Drop the run-time LoRA updates (the stored weight itself is never changed)."""
        self.low_rank = []
        self.dense_delta = None

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        if self.packed is not None:
            destination[prefix + "weight"] = self.dequantized_weight()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def extra_repr(self) -> str:
        scaled = ", scaled" if self.scale is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"stored={self.kind}{scaled}")


def swap_linears(module: torch.nn.Module, stored: dict[str, StoredWeight], what: str) -> dict[str, StoredLinear]:
    """Replace the ``nn.Linear`` layers named by ``stored``'s keys (``"<path>.weight"``) with empty
    :class:`StoredLinear` layers of the same shape and bias; fill them with :meth:`StoredLinear.store`.

    Works on a module built on the meta device (the new layers' biases stay meta until assigned).
    Keys that do not name an ``nn.Linear`` weight of the stored shape raise :class:`ModelError`.
    """
    layers: dict[str, StoredLinear] = {}
    for key, weight in stored.items():
        path, _, param = key.rpartition(".")
        try:
            old = module.get_submodule(path) if param == "weight" else None
        except AttributeError:
            old = None
        if not isinstance(old, torch.nn.Linear):
            raise ModelError(f"{what}: {key} is stored as {weight.kind} but is not the weight of a linear layer")
        if (old.out_features, old.in_features) != weight.shape:
            raise ModelError(f"{what}: tensor {key} has shape {weight.shape}, "
                             f"expected {(old.out_features, old.in_features)}")
        bias = old.bias
        new = StoredLinear(old.in_features, old.out_features, weight.kind, bias=bias is not None,
                           scale=weight.scale, device=old.weight.device, dtype=old.weight.dtype)
        if bias is not None:
            new.bias = bias
        parent_path, _, name = path.rpartition(".")
        setattr(module.get_submodule(parent_path) if parent_path else module, name, new)
        layers[key] = new
    return layers


def take_stored(module: torch.nn.Module, weights: dict, dtype: torch.dtype) -> dict[str, StoredWeight]:
    """Remove from ``weights`` the :class:`StoredWeight` values that are the weight of one of
    ``module``'s ``nn.Linear`` layers and return them; every other stored value (an embedding,
    a norm, a bias) is expanded to ``dtype`` in place, since only linear layers compute from
    stored bytes."""
    stored: dict[str, StoredWeight] = {}
    for key in [k for k, v in weights.items() if isinstance(v, StoredWeight)]:
        if _is_linear_weight(module, key):
            stored[key] = weights.pop(key)
        else:
            weights[key] = weights[key].dequantize(dtype)
    return stored


def fill_stored(layers: dict[str, StoredLinear], stored: dict[str, StoredWeight], device: torch.device,
                dtype: torch.dtype) -> None:
    """Give each layer of :func:`swap_linears` its weight (consuming ``stored``, one at a time so that a
    source copy is freed once placed) and ``dtype`` as its compute dtype."""
    for key in list(stored):
        layer = layers[key]
        layer.store(stored.pop(key).to(device))
        layer.compute_dtype = dtype


def _is_linear_weight(module: torch.nn.Module, key: str) -> bool:
    """Whether ``key`` ("<path>.weight") is the weight of an ``nn.Linear`` in ``module``."""
    path, _, param = key.rpartition(".")
    try:
        return param == "weight" and isinstance(module.get_submodule(path), torch.nn.Linear)
    except AttributeError:
        return False


def weight_storage(module: torch.nn.Module, dtype: torch.dtype) -> str:
    """How ``module``'s weights are held: the stored kind of most of its :class:`StoredLinear` bytes
    (``"fp8_e4m3fn"``, ``"gguf:Q8_0"``, ...), or the compute dtype's short name (``"bf16"``) when none are."""
    sizes: Counter[str] = Counter()
    for layer in module.modules():
        if isinstance(layer, StoredLinear) and layer.packed is not None:
            sizes[layer.stored.label] += layer.packed.numel()
    if not sizes:
        return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    return sizes.most_common(1)[0][0]


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (stored weights at their stored size)."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


__all__ = ["StoredLinear", "StoredWeight", "dequantize_gguf", "fill_stored", "module_bytes", "row_bytes",
           "swap_linears", "take_stored", "weight_storage", "GGUF_BLOCKS"]
