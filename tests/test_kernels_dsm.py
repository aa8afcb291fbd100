"""The fused weighted DSM loss: kernel (ε regenerated or read) vs torch path vs reference.

Runs under TRITON_INTERPRET=1 on CPU tensors (CI) or on CUDA.
"""

import pytest
import torch
from triton_support import require_triton_kernels

import fastmdm as fm
from fastmdm import reference
from fastmdm.dsm import NoiseSeed, weighted_dsm

DEVICE = require_triton_kernels()

import fastmdm.kernels.dsm_loss as kd  # noqa: E402
from fastmdm.kernels import perturb  # noqa: E402

from fastmdm.fused import fused_perturb  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SEED = 4321


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """16 data columns per program: d = 21 spans two programs, the second partial."""
    monkeypatch.setattr(kd, "block_size", lambda n, device, **limits: 16)


def problem(K, dtype, B=3, shape=(21,), seed=0):
    """ε̂, the ε of SEED (float32, as the kernels draw it) and a random SPD W (float64)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.zeros(B, *shape, device=DEVICE)
    a, eye = torch.zeros(B, K, device=DEVICE), torch.eye(K, device=DEVICE).expand(B, K, K)
    eps = perturb(x0, a, eye, seed=NoiseSeed(SEED), return_noise=True)[1]
    eps_hat = (eps + 0.3 * torch.randn(eps.shape, generator=g).to(DEVICE)).to(dtype)
    R = torch.randn(B, K, K, dtype=torch.float64, generator=g)
    return eps_hat, eps, (R @ R.mT + 0.1 * torch.eye(K, dtype=torch.float64)).to(DEVICE)


def torch_path(eps_hat, eps, W):
    fm.set_backend("torch")
    return weighted_dsm(eps_hat, eps, W)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [1, 2, 3, 6])
def test_seeded_kernel_matches_torch_path(K, dtype):
    eps_hat, eps, W = problem(K, dtype)
    fm.set_backend("triton")
    got = weighted_dsm(eps_hat, NoiseSeed(SEED), W)
    read = weighted_dsm(eps_hat, eps.to(dtype), W)
    want = torch_path(eps_hat, eps, W)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert got.dtype == read.dtype == want.dtype == acc and got.shape == (3,)
    torch.testing.assert_close(got, want, rtol=1e-5 if acc == torch.float32 else 1e-12, atol=0)
    torch.testing.assert_close(read, torch_path(eps_hat, eps.to(dtype), W), rtol=1e-5, atol=0)


def test_agrees_with_reference():
    """fastmdm.reference.dsm_loss_weighted builds W_t itself (float64, t where it is accurate)."""
    diff = fm.alda()
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    eps_hat, eps, _ = problem(3, torch.float64, shape=(4, 5))
    L_inv_t = diff.transition(t, dtype=torch.float64).chol_inv_t
    W = L_inv_t.mT @ (2 * diff.beta(t)[:, None, None] * diff.D) @ L_inv_t
    fm.set_backend("triton")
    got = weighted_dsm(eps_hat, NoiseSeed(SEED), W.to(DEVICE))
    want = reference.dsm_loss_weighted(eps_hat.cpu(), eps.double().cpu(), t, diff.Q, diff.D,
                                       stationary_var=diff.stationary_var, dtype=torch.float64)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_matches_torch_path(dtype):
    """d/dε̂ and d/dW under a non-uniform upstream gradient: ε regenerated (vs the torch path
    with the float32 ε) and ε read (vs the torch path with the same ε)."""
    eps_hat, eps, W = problem(3, dtype)
    upstream = torch.tensor([0.5, -1.0, 2.0], device=DEVICE)

    def grads(eps_arg, backend):
        fm.set_backend(backend)
        e, w = eps_hat.clone().requires_grad_(), W.clone().requires_grad_()
        (weighted_dsm(e, eps_arg, w) * upstream).sum().backward()
        return e.grad, w.grad

    tol = 1e-5 if dtype == torch.float32 else 2**-7  # one rounding of ∂/∂ε̂ to the data dtype
    for eps_kernel, eps_torch in ((NoiseSeed(SEED), eps), (eps.to(dtype), eps.to(dtype))):
        (g_eh, g_w), (want_eh, want_w) = grads(eps_kernel, "triton"), grads(eps_torch, "torch")
        assert g_eh.dtype == dtype and g_w.dtype == torch.float64
        scale = want_eh.float().abs().max()
        torch.testing.assert_close(g_eh.float(), want_eh.float(), rtol=tol, atol=tol * scale)
        torch.testing.assert_close(g_w, want_w, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64():
    """gradcheck of the torch path in (ε̂, ε, W) and of the kernel in (ε̂, W) and (ε̂, ε, W)."""
    eps_hat, eps, W = problem(2, torch.float64, B=2, shape=(3,))
    eh, w = eps_hat.requires_grad_(), W.requires_grad_()
    e = eps.double().requires_grad_()
    fm.set_backend("torch")
    assert torch.autograd.gradcheck(weighted_dsm, (eh, e, w))
    fm.set_backend("triton")
    assert torch.autograd.gradcheck(lambda eh, w: weighted_dsm(eh, NoiseSeed(SEED), w), (eh, w))
    assert torch.autograd.gradcheck(weighted_dsm, (eh, e, w))


def test_every_output_element_written(monkeypatch):
    empty = torch.empty

    def poisoned(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    eps_hat, eps, W = problem(4, torch.float16, shape=(37,))
    monkeypatch.setattr(torch, "empty", poisoned)
    fm.set_backend("triton")
    e = eps_hat.clone().requires_grad_()
    loss = weighted_dsm(e, NoiseSeed(SEED), W)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(e.grad).all()


def test_training_step_never_stores_eps():
    """Perturb with a seed, predict, score with the same seed: the loss of the stored-ε step."""
    diff = fm.cld().to(DEVICE)
    x0 = torch.randn(3, 21, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    t = torch.tensor([0.01, 0.4, 1.0], dtype=torch.float64, device=DEVICE)
    tk = diff.transition(t, dtype=torch.float64)
    W = tk.chol_inv_t.mT @ (2 * diff.beta(t)[:, None, None] * diff.D) @ tk.chol_inv_t
    net = torch.nn.Linear(21, 21, dtype=torch.float32).to(DEVICE)
    fm.set_backend("triton")
    losses = []
    for store in (False, True):
        g = torch.Generator().manual_seed(5)
        u, eps = fused_perturb(perturb, x0, tk, generator=g, store_noise=store)
        assert isinstance(eps, torch.Tensor) == store
        losses.append(weighted_dsm(net(u), eps, W))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)


def test_validation_and_dispatch():
    eps_hat, eps, W = problem(2, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        weighted_dsm(eps_hat, eps, W[:, :1])
    with pytest.raises(ValueError, match="eps"):
        weighted_dsm(eps_hat, eps[:, :, :5], W)
    with pytest.raises(TypeError, match="NoiseSeed"):
        weighted_dsm(eps_hat, 5, W)
    fm.set_backend("torch")
    with pytest.raises(TypeError, match="Triton backend"):
        weighted_dsm(eps_hat, NoiseSeed(SEED), W)
