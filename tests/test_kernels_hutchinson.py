"""Triton probe kernels (kernels/hutchinson.py) against the torch path, under TRITON_INTERPRET=1."""

import math
import os

import pytest
import torch

import fastmdm as fm
from fastmdm.backend import triton_available

pytestmark = pytest.mark.skipif(
    not triton_available() or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
    reason="needs triton with TRITON_INTERPRET=1 (CPU tensors)",
)

F64 = torch.float64
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.fixture(autouse=True)
def _triton_backend():
    fm.set_backend("triton")


def kernels():
    from fastmdm.kernels import hutchinson

    return hutchinson


def reference_forms(v, mixing, w):
    """Σ_{k,l,j} v[p,b,k,j] N[b,k,l] w[p,b,l,j] in float64 from materialised probes."""
    return torch.einsum("pbkj,bkl,pblj->pb", v.to(F64), mixing, w.to(F64))


@pytest.fixture
def nan_empty(monkeypatch):
    """Every torch.empty the launchers allocate starts as NaN: unwritten outputs show up."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", poisoned)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("P,B,KV,KW,d", [(3, 2, 2, 3, 37), (1, 1, 1, 1, 5000), (2, 3, 4, 1, 1)])
def test_fused_reduction_matches_float64_reference(distribution, dtype, P, B, KV, KW, d, nan_empty):
    """The kernel regenerates exactly the materialised probes: agreement to float64 rounding."""
    hk = kernels()
    g = torch.Generator().manual_seed(P * 100 + d)
    w = torch.randn(P, B, KW, d, generator=g, dtype=F64).to(dtype)
    mixing = torch.randn(B, KV, KW, generator=g, dtype=F64)
    seed = int(torch.randint(0, 2**31, (1,), generator=g))
    v = hk.generate_probes((P, B, KV, d), seed, distribution, dtype, "cpu")
    assert v.dtype == dtype and torch.isfinite(v).all()
    got = hk.probe_quadratic_forms(w, mixing, seed, distribution)
    want = reference_forms(v, mixing, w)
    assert got.dtype == F64 and got.shape == (P, B)
    scale = torch.einsum("pbkj,bkl,pblj->pb", v.to(F64).abs(), mixing.abs(), w.to(F64).abs())
    assert ((got - want).abs() <= 1e-13 * scale).all()


def test_generated_probes_are_independent_of_chunking_and_well_distributed(nan_empty):
    hk = kernels()
    full = hk.generate_probes((4, 3, 2, 50), 77, "gaussian", F64, "cpu")
    tail = hk.generate_probes((2, 3, 2, 50), 77, "gaussian", F64, "cpu", offset=2 * 3 * 2 * 50)
    assert torch.equal(full[2:], tail)
    n = 20000
    for distribution in ("rademacher", "gaussian"):
        v = hk.generate_probes((n,), 5, distribution, F64, "cpu")
        assert abs(v.mean().item()) <= 5 / math.sqrt(n)  # mean 0, variance 1
        var_of_square = 2.0 if distribution == "gaussian" else 0.0  # Var(v²)
        assert abs((v * v).mean().item() - 1) <= 5 * math.sqrt(var_of_square / n) + 1e-12
    assert set(hk.generate_probes((1000,), 5, "rademacher", F64, "cpu").unique().tolist()) == {-1.0, 1.0}


def test_chunked_reduction_uses_the_global_probe_index():
    hk = kernels()
    P, B, KV, KW, d = 5, 2, 2, 2, 9
    w = torch.randn(P, B, KW, d, dtype=F64)
    mixing = torch.randn(B, KV, KW, dtype=F64)
    whole = hk.probe_quadratic_forms(w, mixing, 3)
    tail = hk.probe_quadratic_forms(w[2:], mixing, 3, offset=2 * B * KV * d)
    torch.testing.assert_close(tail, whole[2:], rtol=1e-14, atol=1e-14)


def test_gradients_match_the_torch_path():
    hk = kernels()
    P, B, KV, KW, d = 3, 2, 3, 2, 11
    w = torch.randn(P, B, KW, d, dtype=F64, requires_grad=True)
    mixing = torch.randn(B, KV, KW, dtype=F64, requires_grad=True)
    grad_out = torch.randn(P, B, dtype=F64)
    got = torch.autograd.grad(hk.probe_quadratic_forms(w, mixing, 21, "gaussian"), (w, mixing), grad_out)
    v = hk.generate_probes((P, B, KV, d), 21, "gaussian", F64, "cpu")
    want = torch.autograd.grad(reference_forms(v, mixing, w), (w, mixing), grad_out)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["jvp", "vjp"])
def test_divergence_on_the_triton_path_matches_the_dense_jacobian(mode):
    """probe_estimates with backend 'triton': materialised probes for the JVP/VJP, fused reduction."""
    from fastmdm.divergence import materialize_probes, probe_estimates

    B, K, d, P, seed = 2, 2, 5, 6, 99
    J = torch.randn(B, K, d, K, d, dtype=F64)
    N = torch.randn(B, K, K, dtype=F64)

    def fn(u):
        return torch.einsum("bkjlm,blm->bkj", J, u)

    u = torch.randn(B, K, d, dtype=F64)
    q, _ = probe_estimates(fn, u, P, seed=seed, mixing=N, mode=mode, chunk_size=4)
    v = materialize_probes(P, u.shape, seed, "rademacher", F64, "cpu")
    if mode == "jvp":
        want = torch.einsum("pbkj,bkl,pblj->pb", v, N, torch.einsum("bkjlm,pblm->pbkj", J, v))
    else:
        want = torch.einsum("pblm,blk,pbkm->pb", torch.einsum("bkjlm,pbkj->pblm", J, v), N, v)
    torch.testing.assert_close(q, want, rtol=1e-12, atol=1e-12)


def test_bad_input():
    hk = kernels()
    w = torch.randn(1, 2, 2, 3, dtype=F64)
    with pytest.raises(ValueError, match="seed"):
        hk.probe_quadratic_forms(w, torch.randn(2, 2, 2, dtype=F64), -1)
    with pytest.raises(ValueError, match="distribution"):
        hk.generate_probes((3,), 1, "uniform", F64, "cpu")
    with pytest.raises(ValueError, match="mixing"):
        hk.probe_quadratic_forms(w, torch.randn(3, 2, 2, dtype=F64), 1)
    with pytest.raises(TypeError, match="float64"):
        hk.probe_quadratic_forms(w, torch.randn(2, 2, 2), 1)
    with pytest.raises(ValueError, match="K_v, K_w"):
        hk.probe_quadratic_forms(w, torch.randn(2, 9, 2, dtype=F64), 1)
