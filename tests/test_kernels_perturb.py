"""The fused perturbation kernel: values, noise statistics, determinism, strides, gradients.

Runs under TRITON_INTERPRET=1 on CPU tensors (CI) or on CUDA.
"""

import math

import pytest
import torch
from triton_support import require_triton_kernels

import fastmdm as fm
from fastmdm.ops import apply_kk

DEVICE = require_triton_kernels()

import fastmdm.kernels.perturbation as kp  # noqa: E402
from fastmdm.kernels import NoiseSeed  # noqa: E402

# |u − exact| ≤ RTOL·(|x₀-term| + |ε-term|) magnitude: one rounding to the data dtype
RTOL = {torch.float32: 1e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float64: 1e-14}
DTYPES = list(RTOL)


def perturb_seeded(x0, coef, chol, seed, start="hybrid", offset=0, return_noise=False):
    return kp.perturb(x0, coef, chol, start, seed=NoiseSeed(seed, offset), return_noise=return_noise)


def perturb_with_noise(x0, coef, chol, noise, start="hybrid"):
    return kp.perturb(x0, coef, chol, start, noise=noise)


def diffusion(K):
    return {1: fm.vpsde, 2: fm.cld, 3: fm.alda}.get(K, lambda: fm.malda(K))()


@pytest.fixture
def small_blocks(monkeypatch):
    """16 data columns per program: d = 21 or 37 spans several programs, the last partial."""
    monkeypatch.setattr(kp, "block_size", lambda n, device, **limits: 16)


@pytest.fixture
def poisoned(monkeypatch):
    """Every float tensor from torch.empty / empty_like starts as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan(empty_like(*a, **k)))


def setup(K, start, B, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    diff = diffusion(K)
    t = diff.t_min + (diff.T - diff.t_min) * torch.rand(B, dtype=torch.float64, generator=g)
    tk = diff.transition(t.to(DEVICE), start, dtype=torch.float64)
    lead = (B, K) if start == "full" else (B,)
    x0 = torch.randn(*lead, *shape, generator=g).to(DEVICE, dtype)
    coef = tk.mean_coef if start == "full" else tk.mean_coef[:, :, 0]
    return diff, tk, x0, coef, t.to(DEVICE)


def exact(diff, tk, x0, eps, start):
    """M m₀ + L ε in float64, and the magnitude |M||m₀| + |L||ε| of its two terms."""
    x, e = x0.double(), eps.double()
    mean = diff.mean(x, tk, start)
    scale = diff.mean(x.abs(), tk._replace(mean_coef=tk.mean_coef.abs()), start)
    return mean + apply_kk(tk.chol, e), scale + apply_kk(tk.chol.abs(), e.abs())


def float32_noise(x0, coef, chol, seed, start):
    """The exact ε of a seed (the kernel draws float32 whatever the data dtype)."""
    return perturb_seeded(x0.float(), coef, chol, seed, start, return_noise=True)[1]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("start", ["hybrid", "full"])
@pytest.mark.parametrize("K", [1, 2, 3, 4, 5, 6])
def test_matches_exact_value(K, start, dtype, small_blocks):
    diff, tk, x0, coef, t = setup(K, start, 2, (21,), dtype, seed=K)
    u, eps = perturb_seeded(x0, coef, tk.chol, 1234, start, return_noise=True)
    assert u.dtype == eps.dtype == dtype and u.shape == eps.shape == (2, K, 21)
    eps32 = float32_noise(x0, coef, tk.chol, 1234, start)
    # ε is the float32 draw rounded once (the interpreter's bfloat16 rounding is not torch's)
    torch.testing.assert_close(eps.float(), eps32, rtol=2 * RTOL[dtype], atol=0)
    want, scale = exact(diff, tk, x0, eps32, start)
    assert ((u.double() - want).abs() <= 2 * RTOL[dtype] * scale + 1e-30).all()
    # the kernel reading the (data-dtype) ε, and the torch path with it (a few roundings)
    want, scale = exact(diff, tk, x0, eps, start)
    u_read = perturb_with_noise(x0, coef, tk.chol, eps, start)
    assert ((u_read.double() - want).abs() <= 2 * RTOL[dtype] * scale + 1e-30).all()
    fm.set_backend("torch")
    u_torch, _ = diff.perturb(x0, t, start, noise=eps)
    assert ((u_torch.double() - want).abs() <= 8 * RTOL[dtype] * scale + 1e-30).all()


@pytest.mark.parametrize("start", ["hybrid", "full"])
def test_batch_of_one_and_image_shapes(start):
    diff, tk, x0, coef, t = setup(3, start, 1, (3, 5, 7), torch.float32)
    u, eps = perturb_seeded(x0, coef, tk.chol, 5, start, return_noise=True)
    assert u.shape == (1, 3, 3, 5, 7)
    want, scale = exact(diff, tk, x0, eps, start)
    assert ((u.double() - want).abs() <= 2e-6 * scale).all()


def test_noise_statistics():
    """n = B K d = 49,152 draws: moments, neighbours, variables, samples and seeds, within
    5 standard errors (for n independent N(0, 1): mean 1/√n, variance √(2/n), E ε⁴ √(96/n),
    a correlation 1/√n)."""
    B, K, d = 4, 3, 4096
    x0 = torch.zeros(B, d, device=DEVICE)
    coef, chol = torch.zeros(B, K, device=DEVICE), torch.eye(K, device=DEVICE).expand(B, K, K)
    eps = perturb_seeded(x0, coef, chol, 2024, return_noise=True)[1].double()
    other = perturb_seeded(x0, coef, chol, 2025, return_noise=True)[1].double()
    n = eps.numel()
    se = 1 / math.sqrt(n)
    assert abs(eps.mean()) < 5 * se
    assert abs(eps.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs((eps**4).mean() - 3) < 5 * math.sqrt(96 / n)

    def corr(a, b):
        a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
        return (a @ b / (a.norm() * b.norm())).item()

    m = eps[:, :, :-1].numel()
    assert abs(corr(eps[:, :, 1:], eps[:, :, :-1])) < 5 / math.sqrt(m)  # neighbouring j
    assert abs(corr(eps[:, 1:], eps[:, :-1])) < 5 / math.sqrt(eps[:, 1:].numel())  # k, k + 1
    assert abs(corr(eps[1:], eps[:-1])) < 5 / math.sqrt(eps[1:].numel())  # samples b, b + 1
    assert abs(corr(eps, other)) < 5 * se  # seeds
    # the per-sample-and-variable covariance is the identity (L = I, M = 0: u = ε)
    cov = torch.cov(eps.permute(1, 0, 2).reshape(K, -1))
    assert (cov - torch.eye(K, dtype=cov.dtype)).abs().max() < 5 * math.sqrt(2 / (B * d))


def test_deterministic_and_independent_of_the_grid(monkeypatch):
    diff, tk, x0, coef, t = setup(3, "hybrid", 2, (37,), torch.float32)
    u1, e1 = perturb_seeded(x0, coef, tk.chol, 77, return_noise=True)
    u2, e2 = perturb_seeded(x0, coef, tk.chol, 77, return_noise=True)
    monkeypatch.setattr(kp, "block_size", lambda n, device, **limits: 16)
    u3, e3 = perturb_seeded(x0, coef, tk.chol, 77, return_noise=True)
    assert torch.equal(u1, u2) and torch.equal(u1, u3) and torch.equal(e1, e3)
    assert not torch.equal(e1, perturb_seeded(x0, coef, tk.chol, 78, return_noise=True)[1])
    # the counter is offset + (b K + k)⌈d/4⌉ + ⌊j/4⌋: an offset of K⌈d/4⌉ shifts the batch
    shifted = perturb_seeded(x0, coef, tk.chol, 77, offset=3 * 10, return_noise=True)[1]
    assert torch.equal(shifted[0], e1[1])


def test_generator_makes_diffusion_perturb_reproducible():
    fm.set_backend("triton")
    diff = fm.cld().to(DEVICE)
    x0 = torch.randn(3, 2, 5, device=DEVICE)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64, device=DEVICE)
    u1, e1 = diff.perturb(x0, t, generator=torch.Generator().manual_seed(0))
    u2, e2 = diff.perturb(x0, t, generator=torch.Generator().manual_seed(0))
    assert torch.equal(u1, u2) and torch.equal(e1, e2) and e1.shape == (3, 2, 2, 5)
    fm.set_backend("torch")
    u_torch, _ = diff.perturb(x0, t, noise=e1)
    torch.testing.assert_close(u1, u_torch, rtol=1e-5, atol=1e-6)


def test_every_output_element_written(poisoned, small_blocks):
    for start in ("hybrid", "full"):
        diff, tk, x0, coef, t = setup(4, start, 3, (37,), torch.float16)
        u, eps = perturb_seeded(x0, coef, tk.chol, 9, start, return_noise=True)
        assert torch.isfinite(u).all() and torch.isfinite(eps).all()
        x0.requires_grad_()
        (perturb_seeded(x0, coef, tk.chol, 9, start).float() ** 2).sum().backward()
        assert torch.isfinite(x0.grad).all()


def test_strided_inputs(small_blocks):
    """Batch-strided, column-strided and channels-last x₀ and a transposed ε: same result."""
    diff, tk, _, coef, t = setup(2, "hybrid", 3, (37,), torch.float32)
    base = torch.randn(6, 74, device=DEVICE)
    for x0 in (base[::2, ::2], base[1::2, :37]):
        want = perturb_seeded(x0.contiguous(), coef, tk.chol, 3)
        assert torch.equal(perturb_seeded(x0, coef, tk.chol, 3), want)
    img = torch.randn(3, 4, 5, 6, device=DEVICE).to(memory_format=torch.channels_last)
    want = perturb_seeded(img.contiguous(), coef, tk.chol, 3)
    assert torch.equal(perturb_seeded(img, coef, tk.chol, 3), want)
    eps = torch.randn(3, 37, 2, device=DEVICE).transpose(1, 2)
    x0 = base[::2, :37]
    assert torch.equal(perturb_with_noise(x0, coef, tk.chol, eps),
                       perturb_with_noise(x0, coef, tk.chol, eps.contiguous()))


def test_rejects_bad_inputs():
    diff, tk, x0, coef, t = setup(2, "hybrid", 2, (5,), torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        perturb_seeded(x0.to(torch.int32), coef, tk.chol, 0)
    with pytest.raises(ValueError, match="coef"):
        perturb_seeded(x0, tk.mean_coef, tk.chol, 0)
    with pytest.raises(ValueError, match="start"):
        perturb_seeded(x0, coef, tk.chol, 0, start="middle")
    with pytest.raises(ValueError, match="K <= 8"):
        eye = torch.eye(9, dtype=torch.float64, device=DEVICE).expand(2, 9, 9)
        perturb_seeded(x0, coef.new_zeros(2, 9), eye, 0)
    with pytest.raises(ValueError, match="noise"):
        perturb_with_noise(x0, coef, tk.chol, torch.zeros(2, 2, 4, device=DEVICE))


def test_forced_triton_without_interpreter_is_an_error(monkeypatch):
    if DEVICE != "cpu":
        pytest.skip("the CPU-without-interpreter case")
    fm.set_backend("triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fm.cld().perturb(torch.zeros(2, 3), 0.5)


# -- gradients ----------------------------------------------------------------------------
def learned_paths(start, K=2, B=2, d=2, seed=11):
    """f(x₀, q, d) = Σ w u_t² for a learned diffusion, by the kernels and by the torch path
    (the latter with the kernels' ε for the same Philox seed), in float64."""
    g = torch.Generator().manual_seed(seed)
    diff = fm.learned(K, init_noise=0.5, generator=g)
    t = torch.linspace(0.05, 0.7, B, dtype=torch.float64)
    tau, var = diff.tau(t).to(DEVICE), diff.stationary_var.to(DEVICE)
    aux = diff.init_aux_var if start == "hybrid" else None
    lead = (B, K) if start == "full" else (B,)
    x0 = torch.randn(*lead, d, dtype=torch.float64, generator=g).to(DEVICE)
    w = torch.randn(B, K, d, dtype=torch.float64, generator=g).to(DEVICE)
    seed = 31
    zero = torch.zeros((B, K, K) if start == "full" else (B, K), device=DEVICE)
    eye = torch.eye(K, device=DEVICE).expand(B, K, K)
    eps = float32_noise(x0, zero, eye, seed, start).double()

    def f(x0, q, dp, kernels):
        D = torch.diag(torch.nn.functional.softplus(dp)) + 1e-3 * torch.eye(K, dtype=dp.dtype)
        A, two_d = (-(q - q.T + D) / diff.stationary_var).to(DEVICE), (2 * D).to(DEVICE)
        if kernels:
            from fastmdm.kernels.transition import transition_coefficients

            from fastmdm.fused import fused_transition

            tk = fused_transition(transition_coefficients, A, two_d, tau, aux, var)
            coef = tk.mean_coef if start == "full" else tk.mean_coef[:, :, 0]
            u = perturb_seeded(x0, coef, tk.chol, seed, start)
        else:
            from fastmdm.transition import transition_kernel

            tk = transition_kernel(A, two_d, tau, aux, var)
            u = diff.mean(x0, tk, start) + apply_kk(tk.chol, eps)
        return (w * u * u).sum()

    params = (diff.Q_param.q.detach().clone(), diff.D_param.d.detach().clone())
    return f, (x0, *params)


@pytest.mark.parametrize("start", ["hybrid", "full"])
def test_gradcheck_float64(start):
    """gradcheck of both paths in x₀, q and d (through M_t, L_t; the kernel regenerates ε in
    its backward), and the two paths' values and gradients agree."""
    f, inputs = learned_paths(start)
    inputs = tuple(x.requires_grad_() for x in inputs)
    for kernels in (False, True):
        assert torch.autograd.gradcheck(lambda *xs, k=kernels: f(*xs, k), inputs)
    values = [f(*inputs, kernels) for kernels in (False, True)]
    grads = [torch.autograd.grad(v, inputs) for v in values]
    torch.testing.assert_close(values[0], values[1], rtol=1e-12, atol=0)
    for g_torch, g_kernel in zip(*grads, strict=True):
        torch.testing.assert_close(g_kernel, g_torch, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("start", ["hybrid", "full"])
def test_triton_gradients_match_torch_path(start):
    """LinearDiffusion.perturb, float32 data: d/d(x₀, q, d), Triton backend = torch backend."""
    g = torch.Generator().manual_seed(12)
    diff = fm.learned(3, init_noise=0.5, generator=g).to(DEVICE)
    t = torch.tensor([0.02, 0.3, 0.9], dtype=torch.float64, device=DEVICE)
    shape = (3, 3, 11) if start == "full" else (3, 11)
    x0 = torch.randn(shape, generator=g).to(DEVICE)
    w = torch.randn(3, 3, 11, generator=g).to(DEVICE)
    grads, noise = {}, None
    for backend in ("triton", "torch"):
        fm.set_backend(backend)
        diff.zero_grad()
        x = x0.clone().requires_grad_()
        u, noise = diff.perturb(x, t, start, generator=torch.Generator().manual_seed(0),
                                noise=noise)
        (w * u * u).sum().backward()
        grads[backend] = [x.grad] + [p.grad.clone() for p in diff.parameters()]
    for got, want in zip(grads["triton"], grads["torch"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
