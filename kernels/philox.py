"""The noise layout of :mod:`fastmdm.kernels.common` as ``@triton.jit`` helpers."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_normals(seed, offset, row, d, blk, BLOCK_D: tl.constexpr):
    """Grouped layout: ε of data row ``row`` = b K + k at columns blk·BLOCK_D + [0, BLOCK_D),
    float32; column j is output j mod 4 of randn4x(seed, offset + row ⌈d/4⌉ + ⌊j/4⌋)."""
    first = offset + row * tl.cdiv(d, 4) + blk * (BLOCK_D // 4)
    n0, n1, n2, n3 = tl.randn4x(seed, first + tl.arange(0, BLOCK_D // 4))
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), [BLOCK_D])  # 4i + m ← n_m[i]


@triton.jit
def flat_values(seed, index, GAUSSIAN: tl.constexpr):
    """Flat layout at counters ``index`` (int64): N(0, 1), or ±1 from the top random bit."""
    if GAUSSIAN:
        value = tl.randn(seed, index)
    else:
        bits = tl.randint(seed, index)
        value = tl.where((bits >> 31) == 0, 1.0, -1.0)
    return value
