"""CUDA's normal random numbers on any machine: Philox4x32-10 plus Box–Muller in NumPy.

torch's CUDA ``randn`` (float32) gives element i the first Box–Muller output of Philox
subsequence i at a counter offset that advances by one block per call (for tensors up to
the GPU's thread count — every SD latent). This reproduces that stream, which is A1111's
"NV" random number source. The transform is evaluated in float64 and rounded, exactly as
A1111's NV source does; CUDA's own fast ``sincos`` differs from it by at most a few
millionths, so NV noise matches GPU noise to that precision and A1111's NV noise exactly.
"""

from __future__ import annotations

import numpy as np

_MUL = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_KEY_STEP = (np.uint32(0x9E3779B9), np.uint32(0xBB67AE85))
_SHIFT = np.uint64(32)
#: curand's float32 constants: 2^-32 and 2^-32·2π.
_TWO_POW32_INV = np.float32(2.3283064e-10)
_TWO_POW32_INV_2PI = np.float32(2.3283064e-10 * 6.2831855)


def philox4x32(counter: tuple[np.ndarray, ...], key: tuple[np.ndarray, np.ndarray], rounds: int = 10):
    """Salmon et al. (2011) Philox4x32: ``rounds`` multiply-xor rounds, the key bumped between them."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_index in range(rounds):
        product0 = c0.astype(np.uint64) * _MUL[0]
        product1 = c2.astype(np.uint64) * _MUL[1]
        hi0, lo0 = (product0 >> _SHIFT).astype(np.uint32), product0.astype(np.uint32)
        hi1, lo1 = (product1 >> _SHIFT).astype(np.uint32), product1.astype(np.uint32)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        if round_index < rounds - 1:
            k0, k1 = k0 + _KEY_STEP[0], k1 + _KEY_STEP[1]
    return c0, c1, c2, c3


def box_muller(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The first normal of curand's Box–Muller pair: sqrt(−2 ln u)·sin(v), as float32."""
    u = x.astype(np.float64) * np.float64(_TWO_POW32_INV) + np.float64(_TWO_POW32_INV / 2)
    v = y.astype(np.float64) * np.float64(_TWO_POW32_INV_2PI) + np.float64(_TWO_POW32_INV_2PI / 2)
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)


class PhiloxGenerator:
    """A seeded stream of CUDA-compatible normal draws; each ``randn`` call advances the offset."""

    def __init__(self, seed: int, offset: int = 0):
        self.seed = int(seed)
        self.offset = int(offset)

    def randn(self, shape) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64))
        index = np.arange(n, dtype=np.uint64)
        counter = (
            np.full(n, self.offset & 0xFFFFFFFF, dtype=np.uint32),
            np.full(n, self.offset >> 32, dtype=np.uint32),
            index.astype(np.uint32),
            (index >> _SHIFT).astype(np.uint32),
        )
        key = (
            np.full(n, self.seed & 0xFFFFFFFF, dtype=np.uint32),
            np.full(n, (self.seed >> 32) & 0xFFFFFFFF, dtype=np.uint32),
        )
        self.offset += 1
        x, y, _, _ = philox4x32(counter, key)
        return box_muller(x, y).reshape(tuple(shape))
