"""Linear layers whose weights stay as the file stores them: fp8, GGUF quantized blocks, or bitsandbytes 4-bit.

A 12B FLUX.1 transformer takes about 24 GB in bf16. Its fp8 copy (``float8_e4m3fn``, one byte
a weight), its GGUF quantizations (Q8_0 about 1.06 bytes a weight, Q4_0 about 0.56) and its
bitsandbytes NF4 copy (half a byte a weight plus one scale per 64) only save memory if the
weights are *kept* that way: :class:`StoredLinear` holds the stored bytes and
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

bitsandbytes' 4-bit weights (``"nf4"``, ``"fp4"``; read by :mod:`.bnb4`) differ in one way: their
blocks of 64 values run along the *flattened* weight, and their scales sit apart from the codes
(:class:`BlockScales`, optionally themselves 8-bit codes: "double quantization"). The codes
still split by rows (two a byte, a row of ``in_features`` values is ``in_features / 2`` bytes);
a row cut keeps the weight stored when it falls on a block boundary, which every cut FLUX.1
needs does (its ``in_features`` are all multiples of 64), and expands that part otherwise. A
cut that falls inside a run of 256 double-quantized scales keeps the codes but decodes that
part's scales to float32 (4 bytes a block instead of 1).
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


# --- bitsandbytes 4-bit blocks ---------------------------------------------------------------------------

#: The value each 4-bit code stands for, before its block's scale. NF4 ("NormalFloat", from the
#: QLoRA paper, as bitsandbytes tabulates it): 16 quantiles of a standard normal scaled to [-1, 1],
#: with an exact zero. FP4 (see :func:`_code_table`): a sign bit, two exponent bits and one mantissa bit.
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
#: FP4 codes 0-15 in bitsandbytes' bit order (the sign is the high bit), before division by 12, the largest.
FP4_CODE = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
FOUR_BIT_KINDS = ("nf4", "fp4")
_PAIRS: dict[tuple[str, torch.device], torch.Tensor] = {}


def code_table(kind: str) -> torch.Tensor:
    """The 16 float32 values of the 4-bit codes of ``kind`` ("nf4" or "fp4"), scaled to [-1, 1]."""
    if kind == "nf4":
        return torch.tensor(NF4_CODE, dtype=torch.float32)
    if kind == "fp4":
        return torch.tensor(FP4_CODE, dtype=torch.float32) / 12.0  # float32 division, as bitsandbytes builds it
    raise ModelError(f"unknown 4-bit type {kind!r}; known: {', '.join(FOUR_BIT_KINDS)}")


def _code_pairs(kind: str, device: torch.device) -> torch.Tensor:
    """(256, 2) float32: the two values a byte stands for, its high nibble first (bitsandbytes' packing)."""
    key = (kind, device)
    if key not in _PAIRS:
        table = code_table(kind).to(device)
        _PAIRS[key] = torch.stack([table.repeat_interleave(16), table.repeat(16)], dim=-1)
    return _PAIRS[key]


@dataclass(frozen=True)
class BlockScales:
    """The per-block scales ("absmax") of a bitsandbytes 4-bit weight.

    Each run of ``blocksize`` consecutive values of the flattened weight has one scale (the last
    run may be shorter). The scales are float32 values (``absmax`` float32), or with double
    quantization 8-bit codes (``absmax`` uint8), each standing for
    ``nested_code[c] * nested_absmax[i // nested_blocksize] + offset`` in float32.
    """

    absmax: torch.Tensor
    blocksize: int
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = 256
    offset: float = 0.0

    def __post_init__(self) -> None:
        if self.blocksize <= 0 or self.absmax.ndim != 1:
            raise ModelError(f"4-bit scales: expected one per block of a positive size, got {self.blocksize} "
                             f"and shape {tuple(self.absmax.shape)}")
        if not self.nested:
            if self.absmax.dtype != torch.float32:
                raise ModelError(f"4-bit scales: expected float32 values, got {self.absmax.dtype}")
            return
        if self.absmax.dtype != torch.uint8 or self.nested_code is None or self.nested_code.numel() != 256:
            raise ModelError("double-quantized 4-bit scales: expected uint8 codes and a 256-value code table")
        if self.nested_blocksize <= 0 or self.nested_absmax.numel() != -(-self.blocks // self.nested_blocksize):
            raise ModelError(f"double-quantized 4-bit scales: {self.blocks} codes in runs of "
                             f"{self.nested_blocksize} need {-(-self.blocks // max(self.nested_blocksize, 1))} "
                             f"nested scales, got {self.nested_absmax.numel()}")

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def blocks(self) -> int:
        return self.absmax.numel()

    @property
    def nbytes(self) -> int:
        parts = (self.absmax, self.nested_absmax, self.nested_code)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def values(self) -> torch.Tensor:
        """One float32 scale per block."""
        if not self.nested:
            return self.absmax
        n, run = self.blocks, self.nested_blocksize
        codes = self.nested_code[self.absmax.int()]
        scaled = (F.pad(codes, (0, -n % run)).view(-1, run) * self.nested_absmax.view(-1, 1)).reshape(-1)
        return scaled[:n] + self.offset

    def part(self, first: int, stop: int) -> BlockScales:
        """The scales of blocks ``first`` to ``stop - 1``; double-quantized ones stay codes when ``first``
        starts a run of ``nested_blocksize``, else they are decoded."""
        if not self.nested:
            return replace(self, absmax=self.absmax[first:stop])
        run = self.nested_blocksize
        if first % run:
            return BlockScales(self.values()[first:stop].contiguous(), self.blocksize)
        return replace(self, absmax=self.absmax[first:stop],
                       nested_absmax=self.nested_absmax[first // run:-(-stop // run)])

    def then(self, other: BlockScales) -> BlockScales:
        """These scales followed by ``other``'s (this part must end on a block boundary)."""
        if other.blocksize != self.blocksize:
            raise ModelError(f"cannot join 4-bit scales of blocks of {self.blocksize} and {other.blocksize}")
        if (self.nested and other.nested and self.blocks % self.nested_blocksize == 0
                and other.nested_blocksize == self.nested_blocksize and other.offset == self.offset
                and torch.equal(other.nested_code, self.nested_code)):
            return replace(self, absmax=torch.cat([self.absmax, other.absmax]),
                           nested_absmax=torch.cat([self.nested_absmax, other.nested_absmax]))
        return BlockScales(torch.cat([self.values(), other.values()]), self.blocksize)

    def to(self, device: torch.device | str) -> BlockScales:
        move = (lambda t: None if t is None else t.to(device))
        return replace(self, absmax=self.absmax.to(device), nested_absmax=move(self.nested_absmax),
                       nested_code=move(self.nested_code))


def dequantize_4bit(packed: torch.Tensor, kind: str, scales: BlockScales, shape: Sequence[int],
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """bitsandbytes 4-bit codes (``uint8``, two a byte, the first in the high nibble, any shape holding
    ``ceil(n / 2)`` bytes) → a ``shape`` tensor of ``dtype`` on their device.

    Each value is its code's table value times its block's scale, computed in float32 as
    bitsandbytes' own dequantizer does, then cast.
    """
    n = _numel(shape)
    if packed.dtype != torch.uint8 or packed.numel() != -(-n // 2):
        raise ModelError(f"{kind} data must be {-(-n // 2)} bytes (uint8) for {tuple(shape)}, got {packed.numel()} "
                         f"{packed.dtype} values")
    size = scales.blocksize
    if scales.blocks != -(-n // size):
        raise ModelError(f"{kind} weight {tuple(shape)} in blocks of {size} needs {-(-n // size)} scales, "
                         f"got {scales.blocks}")
    values = _code_pairs(kind, packed.device).index_select(0, packed.reshape(-1).int()).reshape(-1)[:n]
    scale = scales.values()
    full = n - n % size
    if full == n:
        out = values.view(-1, size) * scale.view(-1, 1)
    else:  # a last, shorter block
        head = (values[:full].view(-1, size) * scale[:-1].view(-1, 1)).reshape(-1)
        out = torch.cat([head, values[full:] * scale[-1]])
    return out.reshape(tuple(shape)).to(dtype)


# --- a weight as stored ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredWeight:
    """A 2-D weight as a file stores it: ``data`` is uint8 with one row of bytes per output row.

    ``kind`` is ``"float8_e4m3fn"``/``"float8_e5m2"`` (one byte a value; ``scale`` multiplies them,
    as in "scaled fp8" files), a GGUF type name such as ``"Q8_0"`` (blocks along the input
    dimension), or ``"nf4"``/``"fp4"`` (bitsandbytes: two codes a byte, blocks along the flattened
    weight with their ``scales`` kept beside the bytes). ``shape`` is the logical (out_features, in_features).
    """

    data: torch.Tensor
    kind: str
    shape: tuple[int, int]
    scale: float | None = None
    scales: BlockScales | None = None

    def __post_init__(self) -> None:
        if self.data.dtype != torch.uint8 or self.data.ndim != 2 or self.data.shape[0] != self.shape[0]:
            raise ModelError(f"stored {self.kind} weight: expected uint8 rows for {self.shape}, got "
                             f"{self.data.dtype} {tuple(self.data.shape)}")
        if self.data.shape[1] != row_bytes(self.kind, self.shape[1]):
            raise ModelError(f"stored {self.kind} weight of shape {self.shape}: rows of {self.data.shape[1]} bytes, "
                             f"expected {row_bytes(self.kind, self.shape[1])}")
        if self.kind in FOUR_BIT_KINDS:
            if self.scales is None:
                raise ModelError(f"stored {self.kind} weight of shape {self.shape} has no block scales")
            needed = -(-self.shape[0] * self.shape[1] // self.scales.blocksize)
            if self.scales.blocks != needed:
                raise ModelError(f"stored {self.kind} weight of shape {self.shape} in blocks of "
                                 f"{self.scales.blocksize} needs {needed} scales, got {self.scales.blocks}")

    @classmethod
    def fp8(cls, tensor: torch.Tensor, scale: float | None = None) -> StoredWeight:
        """A 2-D float8 tensor, kept byte for byte."""
        kind = str(tensor.dtype).removeprefix("torch.")
        if kind not in FP8_KINDS or tensor.ndim != 2:
            raise ModelError(f"expected a 2-D float8 weight, got {tensor.dtype} {tuple(tensor.shape)}")
        return cls(tensor.contiguous().view(torch.uint8), kind, (int(tensor.shape[0]), int(tensor.shape[1])), scale)

    @property
    def label(self) -> str:
        """``"fp8_e4m3fn"``, ``"fp8_e5m2"``, ``"gguf:Q8_0"`` (and so on), ``"nf4"`` or ``"fp4"``."""
        if self.kind in FP8_KINDS:
            return "fp8_" + self.kind.removeprefix("float8_")
        return self.kind if self.kind in FOUR_BIT_KINDS else f"gguf:{self.kind}"

    @property
    def nbytes(self) -> int:
        return self.data.numel() + (self.scales.nbytes if self.scales is not None else 0)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The logical weight in ``dtype``, on the data's device."""
        if self.kind in FP8_KINDS:
            values = self.data.view(FP8_KINDS[self.kind])
            if self.scale is None:
                return values.to(dtype)  # exact: every fp8 value is representable in fp16/bf16/fp32
            return (values.float() * self.scale).to(dtype)
        if self.kind in FOUR_BIT_KINDS:
            return dequantize_4bit(self.data, self.kind, self.scales, self.shape, dtype)
        return dequantize_gguf(self.data, self.kind, self.shape, dtype)

    def to(self, device: torch.device | str) -> StoredWeight:
        scales = None if self.scales is None else self.scales.to(device)
        return replace(self, data=self.data.to(device), scales=scales)

    def split_rows(self, sizes: Sequence[int]) -> tuple[StoredWeight | torch.Tensor, ...]:
        """Consecutive row ranges (output features) of the given sizes, as stored weights of their own.

        A 4-bit part whose first value falls inside a block (its scale shared with the part before)
        comes back expanded, as a float32 tensor; none of FLUX.1's cuts do.
        """
        if sum(sizes) != self.shape[0]:
            raise ModelError(f"cannot cut the {self.shape[0]} rows of a stored {self.kind} weight into {list(sizes)}")
        if self.kind not in FOUR_BIT_KINDS:
            parts = torch.split(self.data, list(sizes), dim=0)
            return tuple(replace(self, data=p.contiguous(), shape=(int(p.shape[0]), self.shape[1])) for p in parts)
        cols, size = self.shape[1], self.scales.blocksize
        out: list[StoredWeight | torch.Tensor] = []
        expanded: torch.Tensor | None = None
        row = 0
        for rows in sizes:
            start, stop = row * cols, (row + rows) * cols
            if start % size:
                expanded = self.dequantize(torch.float32) if expanded is None else expanded
                out.append(expanded[row:row + rows].contiguous())
            else:
                out.append(replace(self, data=self.data[row:row + rows].contiguous(), shape=(rows, cols),
                                   scales=self.scales.part(start // size, -(-stop // size))))
            row += rows
        return tuple(out)

    def swap_halves(self) -> StoredWeight | torch.Tensor:
        """The two halves of the rows exchanged ((shift, scale) → (scale, shift)); a 4-bit weight whose
        halves do not each hold whole blocks comes back expanded (float32)."""
        if self.kind not in FOUR_BIT_KINDS:
            first, second = self.data.chunk(2, dim=0)
            return replace(self, data=torch.cat([second, first], dim=0))
        rows = self.shape[0]
        first, second = self.split_rows((rows - rows // 2, rows // 2))
        if isinstance(first, StoredWeight) and isinstance(second, StoredWeight) \
                and second.shape[0] * second.shape[1] % second.scales.blocksize == 0:
            return replace(self, data=torch.cat([second.data, first.data], dim=0),
                           scales=second.scales.then(first.scales))
        halves = [h if isinstance(h, torch.Tensor) else h.dequantize(torch.float32) for h in (second, first)]
        return torch.cat(halves, dim=0)


def row_bytes(kind: str, in_features: int) -> int:
    """Bytes of one stored row of ``in_features`` values."""
    if kind in FP8_KINDS:
        return in_features
    if kind in FOUR_BIT_KINDS:
        if in_features % 2:
            raise ModelError(f"a {kind} row holds two values a byte; {in_features} is odd")
        return in_features // 2
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
    ``.to(device)`` moves it); so are a 4-bit weight's block scales (``absmax``, ``nested_absmax``,
    ``nested_code``, held as their bytes for the same reason). The bias is an ordinary parameter
    in the compute dtype.
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
        # 4-bit kinds: the block scales (uint8 codes, or float32 values as bytes) and, when those are
        # codes, the float32 scales of their runs and the 256-value code table (as bytes)
        self.register_buffer("absmax", None, persistent=False)
        self.register_buffer("nested_absmax", None, persistent=False)
        self.register_buffer("nested_code", None, persistent=False)
        self.blocksize, self.nested_blocksize, self.offset = 0, 0, 0.0
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
        return StoredWeight(self.packed, self.kind, (self.out_features, self.in_features), self.scale,
                            self._block_scales())

    def _block_scales(self) -> BlockScales | None:
        if self.absmax is None:
            return None
        if self.nested_absmax is None:
            return BlockScales(self.absmax.view(torch.float32), self.blocksize)
        return BlockScales(self.absmax, self.blocksize, self.nested_absmax.view(torch.float32),
                           self.nested_code.view(torch.float32), self.nested_blocksize, self.offset)

    def store(self, weight: StoredWeight) -> None:
        """Take ``weight`` (already on the layer's device) as this layer's weight."""
        if weight.shape != (self.out_features, self.in_features) or weight.kind != self.kind:
            raise ModelError(f"a {weight.kind} weight of shape {weight.shape} does not fit a {self.kind} layer "
                             f"({self.in_features} → {self.out_features})")
        self.packed = weight.data
        self.scale = weight.scale
        scales = weight.scales
        self.absmax = self.nested_absmax = self.nested_code = None
        if scales is not None:
            self.absmax = _as_bytes(scales.absmax)
            self.blocksize, self.nested_blocksize = scales.blocksize, scales.nested_blocksize
            self.offset = scales.offset
            if scales.nested:
                self.nested_absmax, self.nested_code = _as_bytes(scales.nested_absmax), _as_bytes(scales.nested_code)

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


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor's bytes (uint8), so that casting the module's dtype leaves it alone."""
    return t.contiguous().view(torch.uint8)


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
    (``"fp8_e4m3fn"``, ``"gguf:Q8_0"``, ``"nf4"``, ...), or the compute dtype's short name (``"bf16"``)
    when none are."""
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


__all__ = ["BlockScales", "StoredLinear", "StoredWeight", "code_table", "dequantize_4bit", "dequantize_gguf",
           "fill_stored", "module_bytes", "row_bytes", "swap_linears", "take_stored", "weight_storage",
           "FOUR_BIT_KINDS", "GGUF_BLOCKS"]
