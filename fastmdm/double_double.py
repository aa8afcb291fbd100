"""Double-double arithmetic on torch tensors: x = hi + lo, about 32 significant digits.

Built from float64 error-free transformations (Knuth's TwoSum, Dekker's split and
TwoProd; docs/math.md §2). Used for the K×K transition math where float64 alone cannot
resolve a nearly singular covariance. Differentiable: the gradient flows through the hi
parts (the lo parts' derivatives vanish), which is the float64 derivative.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

SPLITTER = 134217729.0  # 2²⁷ + 1


class DD(NamedTuple):
    """A double-double tensor hi + lo, |lo| ≤ ulp(hi)/2."""

    hi: Tensor
    lo: Tensor

    @staticmethod
    def of(x: Tensor) -> DD:
        return DD(x, torch.zeros_like(x))

    @property
    def mT(self) -> DD:
        return DD(self.hi.mT, self.lo.mT)

    def __getitem__(self, index) -> DD:  # type: ignore[override]
        return DD(self.hi[index], self.lo[index])


def _two_sum(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    s = a + b
    v = s - a
    return s, (a - (s - v)) + (b - v)


def _fast_two_sum(a: Tensor, b: Tensor) -> DD:
    s = a + b
    return DD(s, b - (s - a))


def _split(a: Tensor) -> tuple[Tensor, Tensor]:
    c = SPLITTER * a
    hi = c - (c - a)
    return hi, a - hi


def _two_prod(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def add(x: DD, y: DD) -> DD:
    """x + y to double-double accuracy (also when they cancel)."""
    s, e = _two_sum(x.hi, y.hi)
    t, f = _two_sum(x.lo, y.lo)
    s, e = _fast_two_sum(s, e + t)
    return _fast_two_sum(s, e + f)


def neg(x: DD) -> DD:
    return DD(-x.hi, -x.lo)


def mul(x: DD, y: DD) -> DD:
    p, e = _two_prod(x.hi, y.hi)
    return _fast_two_sum(p, e + (x.hi * y.lo + x.lo * y.hi))


def div(x: DD, y: DD) -> DD:
    """x / y: one float64 quotient and two corrections."""
    q1 = x.hi / y.hi
    r = add(x, neg(mul(y, DD.of(q1))))
    q2 = r.hi / y.hi
    r = add(r, neg(mul(y, DD.of(q2))))
    return add(_fast_two_sum(q1, q2), DD.of(r.hi / y.hi))


def div_int(x: DD, n: int) -> DD:
    """x / n for a small integer n (exact in float64)."""
    q1 = x.hi / n
    p, e = _two_prod(q1, torch.full_like(q1, float(n)))
    return _fast_two_sum(q1, (((x.hi - p) - e) + x.lo) / n)


def sqrt(x: DD) -> DD:
    """√x by one Newton correction of the float64 root."""
    s = torch.sqrt(x.hi)
    r = add(x, neg(mul(DD.of(s), DD.of(s))))
    return _fast_two_sum(s, r.hi / (2 * s))


def _narrow(x: DD, dim: int, start: int, length: int) -> DD:
    return DD(x.hi.narrow(dim, start, length), x.lo.narrow(dim, start, length))


def total(x: DD, dim: int) -> DD:
    """Sum over ``dim`` by pairwise double-double additions."""
    while (n := x.hi.shape[dim]) > 1:
        half = n // 2
        pairs = add(_narrow(x, dim, 0, half), _narrow(x, dim, half, half))
        if n % 2:
            last = _narrow(x, dim, n - 1, 1)
            pairs = DD(torch.cat([pairs.hi, last.hi], dim), torch.cat([pairs.lo, last.lo], dim))
        x = pairs
    return DD(x.hi.squeeze(dim), x.lo.squeeze(dim))


def matmul(X: DD, Y: DD) -> DD:
    """(…, K, J) @ (…, J, N) in double-double: all products at once, then pairwise sums."""
    return total(mul(DD(X.hi[..., :, :, None], X.lo[..., :, :, None]),
                     DD(Y.hi[..., None, :, :], Y.lo[..., None, :, :])), dim=-2)


def where(mask: Tensor, x: DD, y: DD) -> DD:
    return DD(torch.where(mask, x.hi, y.hi), torch.where(mask, x.lo, y.lo))


def cholesky(S: DD) -> DD:
    """Lower L with L Lᵀ = S (…, K, K), column by column in double-double."""
    K = S.hi.shape[-1]
    columns = []
    for j in range(K):
        v = _narrow(DD(S.hi[..., :, j], S.lo[..., :, j]), -1, j, K - j)  # S[j:, j]
        if j:
            done = DD(torch.stack([c.hi for c in columns], -1), torch.stack([c.lo for c in columns], -1))
            v = add(v, neg(total(mul(_narrow(done, -2, j, K - j), done[..., j:j + 1, :]), dim=-1)))
        pivot = sqrt(v[..., 0:1])
        column = div(v, pivot)
        column = DD(torch.cat([pivot.hi, column.hi[..., 1:]], -1),
                    torch.cat([pivot.lo, column.lo[..., 1:]], -1))
        pad = column.hi.new_zeros(*column.hi.shape[:-1], j)
        columns.append(DD(torch.cat([pad, column.hi], -1), torch.cat([pad, column.lo], -1)))
    return DD(torch.stack([c.hi for c in columns], -1), torch.stack([c.lo for c in columns], -1))


def lower_inverse(L: DD) -> DD:
    """L⁻¹ of a lower-triangular L by forward substitution, row by row in double-double."""
    K = L.hi.shape[-1]
    eye = torch.eye(K, dtype=L.hi.dtype, device=L.hi.device).expand_as(L.hi)
    rows: list[DD] = []
    for i in range(K):
        rhs = DD.of(eye[..., i, :])
        if i:
            done = DD(torch.stack([r.hi for r in rows], -2), torch.stack([r.lo for r in rows], -2))
            rhs = add(rhs, neg(total(mul(L[..., i, :i, None], done), dim=-2)))
        rows.append(div(rhs, L[..., i, i:i + 1]))
    return DD(torch.stack([r.hi for r in rows], -2), torch.stack([r.lo for r in rows], -2))


class Float64:
    """The same operations in plain float64, for τ where float64 is accurate enough."""

    terms = 26  # series terms at h‖A‖₂ ≤ ½: 2⁻²⁶/27! ≈ 1e-36 of the sum

    @staticmethod
    def of(x: Tensor) -> Tensor:
        return x

    @staticmethod
    def value(x: Tensor) -> Tensor:
        return x

    add, mul, neg = staticmethod(torch.add), staticmethod(torch.mul), staticmethod(torch.neg)
    matmul, where = staticmethod(torch.matmul), staticmethod(torch.where)

    @staticmethod
    def div_int(x: Tensor, n: int) -> Tensor:
        return x / n

    @staticmethod
    def cholesky(S: Tensor) -> Tensor:
        return torch.linalg.cholesky_ex(S).L  # a failed factor is caught by the caller's check

    @staticmethod
    def lower_inverse(L: Tensor) -> Tensor:
        eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand_as(L)
        return torch.linalg.solve_triangular(L, eye, upper=False)


class DoubleDouble:
    """The operations of this module under the names :class:`Float64` uses."""

    terms = 36  # 2⁻³⁶/37! ≈ 1e-54: room for entries far below the sum (P₁₁ ~ τ¹⁵ in a chain)

    of = staticmethod(DD.of)
    add, mul, neg, matmul = staticmethod(add), staticmethod(mul), staticmethod(neg), staticmethod(matmul)
    where, div_int = staticmethod(where), staticmethod(div_int)
    cholesky, lower_inverse = staticmethod(cholesky), staticmethod(lower_inverse)

    @staticmethod
    def value(x: DD) -> Tensor:
        return x.hi
