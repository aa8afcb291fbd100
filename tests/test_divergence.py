"""Divergence estimation (fastmdm.divergence, docs/math.md §5) on the torch path."""

import math

import pytest
import torch

import fastmdm as fm
from fastmdm.divergence import (
    exact_divergence,
    hutchinson_divergence,
    materialize_probes,
    probe_estimates,
)

F64 = torch.float64


@pytest.fixture(autouse=True)
def _torch_backend():
    fm.set_backend("torch")


def linear_field(B, K, d, seed):
    """fn(u) = J u per sample with a random dense J (B, K·d, K·d)."""
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(B, K * d, K * d, dtype=F64, generator=g)

    def fn(u):
        return torch.einsum("bij,bj->bi", J, u.reshape(B, -1)).reshape(u.shape)

    return J, fn


def mixed_jacobian(J, N, K, d):
    """(N ⊗ I_d) J for J (B, K·d, K·d), N (B, K, K)."""
    eye = torch.eye(d, dtype=F64)
    kron = torch.stack([torch.kron(n, eye) for n in N])
    return kron @ J


def variance(Mfull, distribution):
    """Var of vᵀ M v for one probe: S = (M + Mᵀ)/2; 2 Σ_{i≠j} S_ij² (Rademacher), 2‖S‖²_F (Gaussian)."""
    S = 0.5 * (Mfull + Mfull.transpose(-1, -2))
    total = 2 * (S**2).sum((-1, -2))
    if distribution == "rademacher":
        total = total - 2 * (torch.diagonal(S, dim1=-2, dim2=-1) ** 2).sum(-1)
    return total


def test_exact_divergence_of_linear_field_is_the_trace():
    B, K, d = 3, 2, 5
    J, fn = linear_field(B, K, d, 0)
    u = torch.randn(B, K, d, dtype=F64)
    trace = torch.diagonal(J, dim1=-2, dim2=-1).sum(-1)
    torch.testing.assert_close(exact_divergence(fn, u), trace, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(exact_divergence(fn, u, chunk_size=3), trace, rtol=1e-12, atol=1e-12)
    N = torch.randn(B, K, K, dtype=F64)
    mixed = torch.diagonal(mixed_jacobian(J, N, K, d), dim1=-2, dim2=-1).sum(-1)
    torch.testing.assert_close(exact_divergence(fn, u, mixing=N), mixed, rtol=1e-12, atol=1e-12)


def test_exact_divergence_with_rectangular_mixing():
    """fn: (B, K, d) -> (B, 1, d), N (K, 1): tr((N ⊗ I) J) against the dense Jacobian."""
    B, K, d = 2, 3, 4
    W = torch.randn(B, d, K * d, dtype=F64)

    def fn(u):
        return torch.tanh(torch.einsum("bij,bj->bi", W, u.reshape(B, -1))).view(B, 1, d)

    u = torch.randn(B, K, d, dtype=F64)
    N = torch.randn(K, 1, dtype=F64)
    jac = torch.autograd.functional.jacobian(fn, u)  # (B, 1, d, B, K, d)
    want = torch.stack([
        sum(N[k, 0] * jac[b, 0, j, b, k, j] for k in range(K) for j in range(d)) for b in range(B)
    ])
    torch.testing.assert_close(exact_divergence(fn, u, mixing=N), want, rtol=1e-12, atol=1e-12)
    q, _ = probe_estimates(fn, u, 4, seed=3, mixing=N, mode="vjp")
    assert q.shape == (4, B)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("mode", ["jvp", "vjp"])
def test_hutchinson_unbiased_with_the_variance_formula(distribution, mode):
    """Mean within 5 SE of tr((N⊗I)J); per-probe variance matches §5's formula within 5 SE."""
    B, K, d, P = 2, 2, 3, 4000
    J, fn = linear_field(B, K, d, 1)
    N = torch.randn(B, K, K, dtype=F64, generator=torch.Generator().manual_seed(2))
    u = torch.randn(B, K, d, dtype=F64)
    NJ = mixed_jacobian(J, N, K, d)
    # jvp estimates vᵀ(N⊗I)Jv; vjp estimates vᵀJ(N⊗I)v — same trace, different symmetric part
    M = NJ if mode == "jvp" else J @ mixed_jacobian(torch.eye(K * d, dtype=F64).expand(B, -1, -1), N, K, d)
    trace = torch.diagonal(NJ, dim1=-2, dim2=-1).sum(-1)
    var = variance(M, distribution)
    q, _ = probe_estimates(fn, u, P, distribution=distribution, mode=mode, seed=11, mixing=N, chunk_size=1000)
    assert ((q.mean(0) - trace).abs() <= 5 * (var / P).sqrt()).all()
    groups = q.view(40, P // 40, B).var(1, correction=1)  # 40 independent variance estimates
    se = groups.std(0) / math.sqrt(40)
    assert ((groups.mean(0) - var).abs() <= 5 * se).all()
    div, stderr = hutchinson_divergence(fn, u, probes=P, distribution=distribution, mode=mode,
                                        generator=torch.Generator().manual_seed(5), mixing=N,
                                        return_stderr=True)
    torch.testing.assert_close(stderr, (var / P).sqrt(), rtol=0.1, atol=0.0)


def test_rademacher_is_exact_on_a_diagonal_jacobian():
    B, n = 3, 7
    scale = torch.randn(B, n, dtype=F64)
    u = torch.randn(B, n, dtype=F64)
    div = hutchinson_divergence(lambda x: scale * torch.sin(x), u, probes=1)
    torch.testing.assert_close(div, (scale * torch.cos(u)).sum(1), rtol=1e-12, atol=1e-12)


def mlp(n, seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(n, 16), torch.nn.Tanh(), torch.nn.Linear(16, n)).to(F64)


@pytest.mark.parametrize("mode", ["jvp", "vjp"])
def test_batched_probes_equal_the_per_probe_loop(mode):
    """Same probes: the vmapped estimate equals one autograd pass per probe; chunking changes nothing."""
    B, n, P, seed = 3, 6, 5, 123
    net = mlp(n, 0)
    u = torch.randn(B, n, dtype=F64)
    q, out = probe_estimates(net, u, P, seed=seed, mode=mode, distribution="gaussian")
    q_chunked, _ = probe_estimates(net, u, P, seed=seed, mode=mode, distribution="gaussian", chunk_size=2)
    v = materialize_probes(P, u.shape, seed, "gaussian", F64, "cpu")
    loop = []
    for p in range(P):
        x = u.clone().requires_grad_(True)
        (vjp,) = torch.autograd.grad(net(x), x, v[p])
        loop.append((vjp * v[p]).sum(1))
    torch.testing.assert_close(q, torch.stack(loop), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q_chunked, q, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(out, net(u), rtol=1e-14, atol=1e-14)


def test_gradients_match_the_per_probe_loop():
    B, n, P, seed = 2, 5, 4, 7
    net = mlp(n, 1)
    u = torch.randn(B, n, dtype=F64)
    params = list(net.parameters())[:3]  # the output bias does not enter the divergence
    q, _ = probe_estimates(net, u, P, seed=seed)
    grads = torch.autograd.grad(q.mean(0).sum(), params)
    v = materialize_probes(P, u.shape, seed, "rademacher", F64, "cpu")
    x = u.clone().requires_grad_(True)
    out = net(x)
    total = sum((torch.autograd.grad(out, x, v[p], create_graph=True)[0] * v[p]).sum() for p in range(P)) / P
    want = torch.autograd.grad(total, params)
    for got, ref in zip(grads, want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_probes_depend_on_seed_and_index_only():
    a = materialize_probes(6, (2, 3), 9, "rademacher", F64, "cpu")
    b = materialize_probes(4, (2, 3), 9, "rademacher", F64, "cpu", first=2)
    torch.testing.assert_close(a[2:], b, rtol=0, atol=0)
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    assert not torch.equal(a, materialize_probes(6, (2, 3), 10, "rademacher", F64, "cpu"))


def test_float32_matches_float64():
    B, n = 4, 8
    net = mlp(n, 2)
    u = torch.randn(B, n, dtype=F64)
    want = exact_divergence(net, u)
    got = exact_divergence(net.float(), u.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_bad_input():
    u = torch.randn(2, 3)
    with pytest.raises(ValueError, match="probes"):
        hutchinson_divergence(torch.sin, u, probes=0)
    with pytest.raises(ValueError, match="distribution"):
        hutchinson_divergence(torch.sin, u, distribution="uniform")
    with pytest.raises(ValueError, match="mode"):
        hutchinson_divergence(torch.sin, u, mode="fwd")
    with pytest.raises(ValueError, match="shape"):
        hutchinson_divergence(lambda x: x[:, :2], u)
    with pytest.raises(ValueError, match="return_stderr"):
        hutchinson_divergence(torch.sin, u, probes=1, return_stderr=True)
    with pytest.raises(ValueError, match="mixing"):
        hutchinson_divergence(torch.sin, torch.randn(2, 3, 4), mixing=torch.eye(2))
    with pytest.raises(TypeError, match="u must be"):
        exact_divergence(torch.sin, torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="callable"):
        exact_divergence(3, u)
