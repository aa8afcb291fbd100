"""The Triton transition kernel against the torch path, the 50-digit oracle and the reference.

Runs under TRITON_INTERPRET=1 on CPU tensors (CI) or on CUDA.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from triton_support import require_triton_kernels

import fastmdm as fm
from fastmdm import reference
from fastmdm.transition import transition_kernel

DEVICE = require_triton_kernels()

import fastmdm.kernels.transition as kt  # noqa: E402

from fastmdm.fused import fused_transition  # noqa: E402


def transition_kernel_triton(A, two_d, tau, init_aux_var, stationary_var):
    return fused_transition(kt.transition_coefficients, A, two_d, tau, init_aux_var, stationary_var)

TOL = 1e-10  # against the exact value
PAIR_TOL = 2 * TOL  # between two paths that are each within TOL of it
FIELDS = ("mean_coef", "cov", "chol", "chol_inv_t")


def learned(K, full_d=False, seed=0):
    g = torch.Generator().manual_seed(100 * K + seed + 7 * full_d)
    return fm.learned(K, full_d=full_d, init_noise=0.5, generator=g)


DIFFUSIONS = {
    "vpsde": fm.vpsde,
    "cld": fm.cld,
    "alda": fm.alda,
    **{f"malda{K}": (lambda K=K: fm.malda(K)) for K in range(2, 7)},
    **{f"learned{K}": (lambda K=K: learned(K)) for K in range(1, 7)},
    **{f"learned{K}_full_d": (lambda K=K: learned(K, full_d=True)) for K in (2, 4)},
}


def natural_scale(tk, name):
    """Scale of each entry: Σ sqrt(Σ_ii Σ_jj); L its row's max; L⁻ᵀ its column's max; M max."""
    X = getattr(tk, name)
    if name == "cov":
        d = torch.diagonal(X, dim1=-2, dim2=-1).abs().sqrt()
        return d[:, :, None] * d[:, None, :]
    if name == "chol":
        return X.abs().amax(-1, keepdim=True).expand_as(X)
    if name == "chol_inv_t":
        return X.abs().amax(-2, keepdim=True).expand_as(X)
    return X.abs().amax((-2, -1), keepdim=True).expand_as(X)


def componentwise_error(got, want):
    """Per field max |got − want| / (|want| + 1e-6 scale): relative error, except that entries
    below 1e-6 of their natural scale (rounding-level, e.g. exact zeros) are held to 1e-16 of
    that scale at TOL = 1e-10."""
    return {name: ((getattr(got, name) - getattr(want, name)).abs()
                   / (getattr(want, name).abs() + 1e-6 * natural_scale(want, name))).max().item()
            for name in FIELDS}


def normalised_error(got, want):
    """Per field max |got − want| / natural scale: the metric in which the two paths agree to
    rounding (their tiny entries, exact zeros included, differ by float64 rounding of the scale)."""
    return {name: ((getattr(got, name) - getattr(want, name)).abs()
                   / natural_scale(want, name)).max().item() for name in FIELDS}


def times(n, diff, generator):
    """t_min, T and n − 2 uniform times in between, float64 on DEVICE."""
    inner = diff.t_min + (diff.T - diff.t_min) * torch.rand(n - 2, dtype=torch.float64,
                                                            generator=generator)
    return torch.cat([torch.tensor([diff.t_min, diff.T], dtype=torch.float64), inner]).to(DEVICE)


def both_paths(diff, t, start):
    A, two_d = diff.A.detach().to(DEVICE), 2 * diff.D.detach().to(DEVICE)
    var, tau = diff.stationary_var.to(DEVICE), diff.tau(t)
    aux = diff.init_aux_var if start == "hybrid" else None
    return (transition_kernel_triton(A, two_d, tau, aux, var),
            transition_kernel(A, two_d, tau, aux, var))


@pytest.mark.parametrize("start", ["hybrid", "full"])
@pytest.mark.parametrize("name", sorted(DIFFUSIONS))
def test_matches_torch_path(name, start):
    diff = DIFFUSIONS[name]()
    g = torch.Generator().manual_seed(len(name))
    got, want = both_paths(diff, times(37, diff, g), start)
    for x in got:
        assert x.dtype == torch.float64 and x.shape == (37, diff.K, diff.K)
    errs = normalised_error(got, want)
    assert max(errs.values()) < PAIR_TOL, f"{name} {start}: {errs}"


@pytest.mark.parametrize("start", ["hybrid", "full"])
@pytest.mark.parametrize("t", [1e-3, 1.0])
def test_single_sample(t, start):
    diff = fm.alda()
    got, want = both_paths(diff, torch.tensor([t], dtype=torch.float64, device=DEVICE), start)
    errs = normalised_error(got, want)
    assert max(errs.values()) < PAIR_TOL, errs


@pytest.mark.parametrize("start", ["hybrid", "full"])
@pytest.mark.parametrize("name", ["cld", "alda", "malda3", "learned4"])
def test_matches_50_digit_oracle(name, start):
    """Independent of the torch path: componentwise 1e-10 at t_min, in the series range, at T."""
    from mp_oracle import mp_transition

    diff = DIFFUSIONS[name]()
    t = torch.tensor([1e-3, 0.03, 1.0], dtype=torch.float64, device=DEVICE)
    got, _ = both_paths(diff, t, start)
    s0 = [0.0] + [diff.init_aux_var if start == "hybrid" else 0.0] * (diff.K - 1)
    for i, tau in enumerate(diff.tau(t).tolist()):
        mp = mp_transition(diff.A.detach().numpy(), (2 * diff.D).detach().numpy(), tau, s0)
        want = fm.TransitionKernel(*(torch.from_numpy(m)[None] for m in mp))
        errs = componentwise_error(fm.TransitionKernel(*(x[i:i + 1].cpu() for x in got)), want)
        assert max(errs.values()) < TOL, f"{name} {start} t={t[i].item()}: {errs}"


@pytest.mark.parametrize("start", ["hybrid", "full"])
def test_agrees_with_reference(start):
    """The plain Van Loan reference (float64) where its closed form does not cancel."""
    diff = fm.malda(3)
    t = torch.linspace(0.05, 1.0, 9, dtype=torch.float64)
    want = reference.transition(diff.Q, diff.D, t, start, stationary_var=diff.stationary_var,
                                init_aux_var=diff.init_aux_var, dtype=torch.float64)
    got, _ = both_paths(diff, t.to(DEVICE), start)
    for x, w in zip(got, want, strict=True):
        torch.testing.assert_close(x.cpu(), w, rtol=1e-7, atol=1e-9)


def test_every_output_element_written(monkeypatch):
    """Outputs allocated NaN-filled (B = 37 spans two programs) come back finite."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", poisoned)
    monkeypatch.setattr(kt, "block_size", lambda n, device, **limits: 16)
    diff = fm.malda(4)
    got, want = both_paths(diff, times(37, diff, torch.Generator().manual_seed(1)), "hybrid")
    assert all(torch.isfinite(x).all() for x in got)
    assert max(componentwise_error(got, want).values()) < PAIR_TOL


@pytest.mark.parametrize("start", ["hybrid", "full"])
def test_backward_matches_finite_differences_of_the_kernel(start):
    """Forward by the kernel, backward by autograd through the torch path: the gradient's
    derivative along a random direction (two_d kept symmetric) equals a central difference of
    the kernel's own forward — one t in the series range, one in the squaring range."""
    diff = learned(3, seed=5)
    g = torch.Generator().manual_seed(4)
    x = [diff.A.detach(), 2 * diff.D.detach(),
         diff.tau(torch.tensor([0.01, 0.6], dtype=torch.float64))]
    S = torch.randn(3, 3, dtype=torch.float64, generator=g)
    v = [torch.randn(3, 3, dtype=torch.float64, generator=g), S + S.T,
         torch.randn(2, dtype=torch.float64, generator=g)]
    w = torch.randn(4, 2, 3, 3, dtype=torch.float64, generator=g)
    aux = diff.init_aux_var if start == "hybrid" else None

    def f(A, two_d, tau):
        tk = transition_kernel_triton(A.to(DEVICE), two_d.to(DEVICE), tau.to(DEVICE), aux,
                                      diff.stationary_var.to(DEVICE))
        return sum((w[i] * m.cpu() ** 2).sum() for i, m in enumerate(tk))

    leaves = [xi.clone().requires_grad_() for xi in x]
    grads = torch.autograd.grad(f(*leaves), leaves)
    h = 1e-6
    plus = f(*(xi + h * vi for xi, vi in zip(x, v, strict=True)))
    minus = f(*(xi - h * vi for xi, vi in zip(x, v, strict=True)))
    fd = plus - minus
    directional = sum((gi * vi).sum() for gi, vi in zip(grads, v, strict=True))
    torch.testing.assert_close(fd / (2 * h), directional, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("start", ["hybrid", "full"])
def test_module_gradients_match_torch_path(start):
    """d/d(q, d) of a nonlinear function of (M, Σ, L, L⁻ᵀ): Triton backend = torch backend."""
    diff = learned(4, seed=2)
    t = times(9, diff, torch.Generator().manual_seed(2))
    w = torch.randn(4, 9, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = {}
    for backend in ("triton", "torch"):
        fm.set_backend(backend)
        diff.zero_grad()
        tk = diff.transition(t, start)
        sum((w[i] * x.cpu() ** 2).sum() for i, x in enumerate(tk)).backward()
        grads[backend] = [p.grad.clone() for p in diff.parameters()]
    for g_triton, g_torch in zip(grads["triton"], grads["torch"], strict=True):
        torch.testing.assert_close(g_triton, g_torch, rtol=1e-8, atol=1e-12)


def test_dispatch_uses_the_kernel_and_fails_loudly(monkeypatch):
    diff = fm.cld()
    t = torch.tensor([0.2, 0.7], dtype=torch.float64, device=DEVICE)
    calls = []
    real = kt.transition_coefficients
    monkeypatch.setattr(kt, "transition_coefficients", lambda *a: calls.append(1) or real(*a))
    fm.set_backend("triton")
    diff.transition(t)
    assert calls == [1]
    fm.set_backend("torch")
    diff.transition(t)
    assert calls == [1]
    if DEVICE == "cpu":
        fm.set_backend("triton")
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            diff.transition(t)


def test_rejects_bad_inputs():
    A = fm.cld().A.to(DEVICE)
    tau = torch.tensor([0.5], dtype=torch.float64, device=DEVICE)
    var = torch.ones(2, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        transition_kernel_triton(A.float(), A, tau, None, var)
    with pytest.raises(ValueError, match="K <= 8"):
        eye = torch.eye(9, dtype=torch.float64, device=DEVICE)
        transition_kernel_triton(-eye, eye, tau, None, torch.ones(9, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        transition_kernel_triton(A, A, tau[None], None, var)


COMPILE_SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastmdm.kernels import dsm_loss, hutchinson, perturbation, sampler_step, transition
    from fastmdm.transition import LYAPUNOV_TERMS, TAYLOR_TERMS

    def build(fn, sig, **constexprs):
        sig = dict(sig, **{k: "constexpr" for k in constexprs})
        src = ASTSource(fn, sig, constexprs=constexprs)
        warps = 1 if fn is transition._transition_kernel else 4  # as launched
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})

    ptrs = lambda names, t="*fp64": {n: t for n in names.split()}
    ints = lambda names: {n: "i64" for n in names.split()}
    build(transition._transition_kernel,
          {**ptrs("a_ptr two_d_ptr var_ptr tau_ptr norm_ptr aux_std_ptr m_ptr cov_ptr chol_ptr "
                  "inv_t_ptr"), "B": "i32"},
          K=3, HYBRID=True, TAYLOR=TAYLOR_TERMS, LYAPUNOV=LYAPUNOV_TERMS, BLOCK_B=32)
    build(perturbation._perturb_fwd,
          {"x_ptr": "*bf16", **ptrs("coef_ptr chol_ptr noise_ptr", "*fp32"),
           "out_ptr": "*bf16", "eps_out_ptr": "*bf16",
           **ints("seed offset d sxb sxk sxj snb snk snj")},
          K=3, FULL=False, FROM_SEED=True, WRITE_NOISE=True, BLOCK_D=1024)
    build(perturbation._perturb_bwd,
          {"g_ptr": "*bf16", "x_ptr": "*bf16", **ptrs("coef_ptr noise_ptr", "*fp32"),
           "gx_ptr": "*bf16", **ptrs("gcoef_ptr gchol_ptr", "*fp32"),
           **ints("seed offset d sgb sgk sgj sxb sxk sxj snb snk snj")},
          K=3, FULL=True, FROM_SEED=True, NEED_X=True, NEED_COEF=True, NEED_CHOL=True,
          BLOCK_D=1024)
    strides = ints("seed offset d seb sek sej snb snk snj")
    build(dsm_loss._dsm_fwd,
          {"eh_ptr": "*fp16", **ptrs("noise_ptr w_ptr part_ptr", "*fp32"), **strides},
          K=3, FROM_SEED=True, BLOCK_D=1024)
    build(dsm_loss._dsm_bwd,
          {"eh_ptr": "*fp16", **ptrs("noise_ptr w_ptr go_ptr", "*fp32"), "geh_ptr": "*fp16",
           "gw_ptr": "*fp32", **strides},
          K=3, FROM_SEED=True, NEED_EPS_HAT=True, NEED_W=True, BLOCK_D=1024)
    build(sampler_step._sde_step_kernel,
          {**ptrs("u_ptr y0_ptr y1_ptr y2_ptr", "*bf16"), "coef_ptr": "*fp32", "seeds_ptr": "*i64",
           "out_ptr": "*bf16", **ints("index d")},
          K=3, INPUTS=2, NOISY=True, BLOCK_D=1024)
    build(hutchinson._probes_kernel, {"out_ptr": "*fp16", **ints("seed offset n")},
          GAUSSIAN=False, BLOCK=1024)
    build(hutchinson._quadratic_forms_kernel,
          {"w_ptr": "*bf16", **ptrs("mix_ptr partial_ptr"), **ints("seed offset B d n_chunks")},
          KV=3, KW=2, GAUSSIAN=True, BLOCK_D=1024)
    print("ok")
""")


def test_all_kernels_compile_for_hopper():
    """The real compiler (not the interpreter) lowers every kernel to sm_90 machine code."""
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@pytest.mark.parametrize("start", ["hybrid", "full"])
def test_triton_backend_serves_rank_deficient_d(start):
    """MALDA(4)'s Q with D = diag(0, 0, 0, 1): where the kernel's float64 factor of Σ_t is too ill
    conditioned, the Triton backend hands the batch to the torch path; either way the result is the
    torch backend's to rounding and free of NaN."""
    lower = torch.ones(4, 4, dtype=torch.float64).tril(-1)
    diff = fm.LinearDiffusion(lower - lower.T, torch.diag(torch.tensor([0.0, 0.0, 0.0, 1.0],
                                                                      dtype=torch.float64)))
    t = torch.tensor([diff.t_min, 0.01, 0.3, 1.0], dtype=torch.float64, device=DEVICE)
    results = {}
    for backend in ("triton", "torch"):
        fm.set_backend(backend)
        results[backend] = diff.transition(t, start)
    for x in results["triton"]:
        assert torch.isfinite(x).all()
    errs = normalised_error(results["triton"], results["torch"])
    assert max(errs.values()) < PAIR_TOL, errs
