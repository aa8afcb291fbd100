"""Divergence estimation: tr(J) = E[vᵀ J v] for probes with E[v vᵀ] = I (docs/math.md §5).

Every probe is handled in one batched call: ``torch.func.jvp`` (w = J v) or ``torch.func.vjp``
(w = Jᵀ v) under ``torch.func.vmap`` over the probes, in chunks of ``chunk_size`` probes to
bound memory. The results stay differentiable (the ISM ELBO trains through them).

A per-sample K×K **mixing** matrix N folds a constant linear map into the probe algebra: for
fn: (B, K_in, *data) → (B, K_out, *data) and N (B, K_in, K_out) the estimate is of

    ∇·((N ⊗ I) fn)(u) = tr((N ⊗ I) J) = E[vᵀ (N ⊗ I) J v]     (jvp: v over the input)
                                      = E[(Jᵀ v)ᵀ (N ⊗ I) v]   (vjp: v over the output)

so N never touches the network output tensor: per probe it is the reduction
q = Σ_{k,l,j} v[k, j] N[k, l] w[l, j] (``fastmdm.kernels.hutchinson`` fuses it on GPU,
regenerating v from its seed). For one probe, with S = (NJ + (NJ)ᵀ)/2,
Var = 2 Σ_{i≠j} S_ij² (Rademacher) or 2‖S‖_F² (Gaussian).

A model that calls torch.autograd itself (an energy model, s = −∇E) cannot run under torch.func;
with ``autograd=True`` the same products come from torch.autograd with ``create_graph``: Jᵀv by
one backward pass, J v by differentiating the linear map a ↦ Jᵀa once more (double backward).

Probes are a function of an integer seed: on the Triton path probe entry i of the whole
(P, B, K, d) set is Philox(seed, i) (any chunking gives the same probes); on the torch path
probe p is drawn from a ``torch.Generator`` seeded with (seed, p).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap

from .backend import dispatch
from .kernels.common import DISTRIBUTIONS, SEED_BOUND
from .ops import draw_seed
from .validation import check_callable, check_choice, check_int

MODES = ("jvp", "vjp")
_PROBE_STREAM = 1_000_003  # torch path: probe p of seed s uses Generator.manual_seed(s·_PROBE_STREAM + p)


def sample_probes(shape, distribution: str = "rademacher", generator: torch.Generator | None = None,
                  dtype=None, device=None) -> Tensor:
    """Probes v with E[v vᵀ] = I from a torch generator: Rademacher (±1) or standard Gaussian."""
    check_choice(distribution, DISTRIBUTIONS, "distribution")
    if distribution == "gaussian":
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)
    return torch.randint(0, 2, shape, generator=generator, device=device).to(dtype) * 2 - 1


def materialize_probes(probes: int, sample_shape, seed: int, distribution: str = "rademacher",
                       dtype: torch.dtype | None = None, device=None, first: int = 0) -> Tensor:
    """Probes first … first + probes − 1 of ``seed``, shape (probes, *sample_shape).

    Triton path: the kernel's Philox probes (bit-identical to what the fused reduction
    regenerates); torch path: probe p from a generator seeded with (seed, p).
    """
    check_choice(distribution, DISTRIBUTIONS, "distribution")
    if not (isinstance(seed, int) and 0 <= seed < SEED_BOUND):
        raise ValueError(f"seed must be an integer in [0, 2**31), got {seed!r}")
    dtype = dtype or torch.get_default_dtype()
    device = torch.device(device if device is not None else "cpu")
    sample_shape = tuple(sample_shape)
    fused = dispatch("generate_probes", device)
    if fused is not None:
        return fused((probes, *sample_shape), seed, distribution, dtype, device,
                     offset=first * math.prod(sample_shape))
    out = torch.empty((probes, *sample_shape), dtype=dtype, device=device)
    gen = torch.Generator(device=device)
    for p in range(probes):
        gen.manual_seed(seed * _PROBE_STREAM + first + p)
        out[p] = sample_probes(sample_shape, distribution, gen, dtype, device)
    return out


def probe_quadratic_forms(w: Tensor, mixing: Tensor, v: Tensor | None, seed: int,
                          distribution: str = "rademacher", first: int = 0) -> Tensor:
    """q[p, b] = Σ_{k,l,j} v[p, b, k, j] N[b, k, l] w[p, b, l, j], float64 (P, B).

    w: (P, B, K_w, d); mixing N: float64 (B, K_v, K_w); v: the probes (P, B, K_v, d) from
    ``materialize_probes(…, seed, distribution, first=first)``. The Triton path (K ≤ 8)
    regenerates v from the seed and ignores ``v``; the torch path needs it.
    """
    kv, kw = mixing.shape[1], mixing.shape[2]
    fused = dispatch("probe_quadratic_forms", w.device, kv, kw)
    if fused is not None:
        return fused(w, mixing, seed, distribution, offset=first * w.shape[1] * kv * w.shape[-1])
    if v is None:
        raise ValueError("the torch path of probe_quadratic_forms needs the probes v")
    work = torch.promote_types(w.dtype, torch.float32)
    mixed = torch.einsum("bkl,pbkj->pblj", mixing.to(work), v.to(work))
    return (mixed * w.to(work)).sum(-1).to(torch.float64).sum(-1)


def _as_mixing(mixing, u: Tensor) -> Tensor:
    """Mixing as float64 (B, K_in, K_out), K_in = u.shape[1]."""
    if not isinstance(mixing, Tensor):
        raise TypeError("mixing must be a tensor (K_in, K_out) or (B, K_in, K_out), "
                        f"got {type(mixing).__name__}")
    if u.dim() < 2:
        raise ValueError(f"with a mixing matrix u must be a state (B, K, *data), got shape {tuple(u.shape)}")
    if mixing.dim() == 2:
        mixing = mixing.expand(u.shape[0], *mixing.shape)
    if mixing.dim() != 3 or mixing.shape[0] != u.shape[0] or mixing.shape[1] != u.shape[1]:
        raise ValueError(f"mixing must have shape (K_in, K_out) or (B, K_in, K_out) with B={u.shape[0]}, "
                         f"K_in={u.shape[1]}, got {tuple(mixing.shape)}")
    if mixing.device != u.device:
        raise ValueError(f"mixing is on {mixing.device} but u is on {u.device}")
    return mixing.to(torch.float64)


def _check_input(fn, u: Tensor) -> None:
    check_callable(fn, "fn", "fn(u)")
    if not isinstance(u, Tensor) or not u.is_floating_point():
        raise TypeError(f"u must be a floating-point tensor, got {getattr(u, 'dtype', type(u).__name__)}")
    if u.dim() < 1 or u.shape[0] < 1 or u[0].numel() < 1:
        raise ValueError(f"u must have shape (B, …) with B >= 1 and a non-empty sample, got {tuple(u.shape)}")


def _variables(u: Tensor, out: Tensor, mixing: Tensor | None) -> tuple[Tensor, int, int, int]:
    """Validate fn's output; return (N (B, K_in, K_out) float64, K_in, K_out, d)."""
    if not isinstance(out, Tensor):
        raise TypeError(f"fn must return a tensor, got {type(out).__name__}")
    if mixing is None:
        if out.shape != u.shape:
            raise ValueError(f"fn must return the input's shape {tuple(u.shape)}, got {tuple(out.shape)}")
        ones = torch.ones((u.shape[0], 1, 1), dtype=torch.float64, device=u.device)
        return ones, 1, 1, u[0].numel()
    k_in, k_out = mixing.shape[1], mixing.shape[2]
    expected = (u.shape[0], k_out, *u.shape[2:])
    if tuple(out.shape) != expected:
        raise ValueError(f"fn must return shape {expected} (K_out = mixing.shape[-1]), "
                         f"got {tuple(out.shape)}")
    return mixing, k_in, k_out, u[0, 0].numel()


def is_functorch_conflict(err: BaseException) -> bool:
    """True for torch.func's refusal of a function that uses torch.autograd inside (requires_grad_, grad)."""
    return isinstance(err, RuntimeError) and "functorch" in str(err)


class _AutogradProducts:
    """fn(u) and its Jacobian products by torch.autograd, for an fn that calls torch.autograd itself.

    vjp: Jᵀv = ∂(outᵀ v)/∂u; jvp: J v = ∂((Jᵀa)ᵀ v)/∂a (Jᵀa is linear in a). The graph is kept
    (``create_graph``) when gradients are enabled, so the results stay differentiable.
    """

    def __init__(self, fn, u: Tensor):
        self.keep_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            self.u = u if u.requires_grad else u.detach().requires_grad_()
            self.out = fn(self.u)
        self.dummy, self.transposed = None, None

    def output(self) -> Tensor:
        return self.out if self.keep_graph else self.out.detach()

    @staticmethod
    def _grads(outputs: Tensor, inputs: Tensor, vectors: Tensor, keep_graph: bool) -> Tensor:
        """(∂(outputsᵀ v)/∂inputs for v in vectors), stacked."""
        return torch.stack([
            torch.autograd.grad(outputs, inputs, v, retain_graph=True, create_graph=keep_graph,
                                allow_unused=True, materialize_grads=True)[0]
            for v in vectors])

    def vjp(self, vectors: Tensor) -> Tensor:
        """Jᵀ v for each v of ``vectors`` (P, *out.shape): (P, *u.shape)."""
        with torch.enable_grad():
            return self._grads(self.out, self.u, vectors, self.keep_graph)

    def jvp(self, tangents: Tensor) -> Tensor:
        """J t for each t of ``tangents`` (P, *u.shape): (P, *out.shape)."""
        with torch.enable_grad():
            if self.transposed is None:
                self.dummy = torch.zeros_like(self.out, requires_grad=True)
                self.transposed = self._grads(self.out, self.u, self.dummy[None], True)[0]
            return self._grads(self.transposed, self.dummy, tangents, self.keep_graph)


def _batched(call, tangents: Tensor, out_dims):
    """vmap of ``call`` over the leading dim; a single probe skips vmap (its batch-of-one path is slow)."""
    if tangents.shape[0] > 1:
        return vmap(call, out_dims=out_dims, randomness="same")(tangents)
    result = call(tangents[0])
    dims = out_dims if isinstance(out_dims, tuple) else (out_dims,) * len(result)
    return tuple(r if dim is None else r.unsqueeze(0) for r, dim in zip(result, dims, strict=True))


def probe_estimates(fn, u: Tensor, probes: int = 1, *, distribution: str = "rademacher",
                    mode: str = "jvp", seed: int | None = None, mixing: Tensor | None = None,
                    chunk_size: int | None = None, autograd: bool = False) -> tuple[Tensor, Tensor]:
    """One estimate per probe of ∇·((N ⊗ I) fn)(u): returns (q (P, B) float64, fn(u)).

    q[p] = v_pᵀ (N ⊗ I) J v_p (jvp) or (Jᵀ v_p)ᵀ (N ⊗ I) v_p (vjp); N = 1 without mixing.
    All probes in one vmapped JVP/VJP per chunk of ``chunk_size`` probes (default: all);
    ``autograd``: by torch.autograd instead, for an fn that calls torch.autograd itself.
    """
    _check_input(fn, u)
    check_int(probes, "probes")
    check_choice(distribution, DISTRIBUTIONS, "distribution")
    check_choice(mode, MODES, "mode")
    chunk = probes if chunk_size is None else check_int(chunk_size, "chunk_size")
    seed = draw_seed() if seed is None else seed
    mix = None if mixing is None else _as_mixing(mixing, u)
    B = u.shape[0]
    products = _AutogradProducts(fn, u) if autograd else None
    estimates, out, pullback = [], None, None
    for first in range(0, probes, chunk):
        n = min(chunk, probes - first)
        if mode == "jvp":
            v = materialize_probes(n, u.shape, seed, distribution, u.dtype, u.device, first)
            if products is None:
                out, w = _batched(lambda t: jvp(fn, (u,), (t,)), v, (None, 0))
            else:
                out, w = products.output(), products.jvp(v)
            N, k_in, k_out, d = _variables(u, out, mix)
            q = probe_quadratic_forms(w.reshape(n, B, k_out, d), N, v.view(n, B, k_in, d), seed,
                                      distribution, first)
        else:
            if out is None:
                if products is None:
                    out, pullback = vjp(fn, u)
                else:
                    out = products.output()
                N, k_in, k_out, d = _variables(u, out, mix)
            v = materialize_probes(n, out.shape, seed, distribution, out.dtype, u.device, first)
            w = _batched(pullback, v, 0)[0] if products is None else products.vjp(v)
            q = probe_quadratic_forms(w.reshape(n, B, k_in, d).to(v.dtype), N.transpose(1, 2),
                                      v.view(n, B, k_out, d), seed, distribution, first)
        estimates.append(q)
    return torch.cat(estimates), out


def exact_divergence_and_output(fn, u: Tensor, mixing: Tensor | None = None, chunk_size: int | None = None,
                                autograd: bool = False) -> tuple[Tensor, Tensor]:
    """tr((N ⊗ I) J) exactly, one JVP per input coordinate (vmapped in chunks; by torch.autograd
    with ``autograd``): ((B,) float64, fn(u)).

    With e_i the i-th basis vector of one sample's input (coordinate (k, j)):
    tr((N ⊗ I) J) = Σ_i Σ_l N[k, l] (J e_i)[l, j].
    """
    _check_input(fn, u)
    mix = None if mixing is None else _as_mixing(mixing, u)
    B, n_in = u.shape[0], u[0].numel()
    chunk = n_in if chunk_size is None else check_int(chunk_size, "chunk_size")
    total = torch.zeros(B, dtype=torch.float64, device=u.device)
    products = _AutogradProducts(fn, u) if autograd else None
    out = None
    for first in range(0, n_in, chunk):
        index = torch.arange(first, min(first + chunk, n_in), device=u.device)
        basis = torch.zeros((index.numel(), n_in), dtype=u.dtype, device=u.device)
        basis[torch.arange(index.numel(), device=u.device), index] = 1
        tangents = basis.view(index.numel(), 1, *u.shape[1:]).expand(index.numel(), *u.shape)
        if products is None:
            out, w = vmap(lambda t: jvp(fn, (u,), (t,)), out_dims=(None, 0), randomness="same")(tangents)
        else:
            out, w = products.output(), products.jvp(tangents)
        N, _, k_out, d = _variables(u, out, mix)
        k, j = index // d, index % d
        picked = w.reshape(index.numel(), B, k_out, d)[torch.arange(index.numel(), device=u.device), :, :, j]
        total = total + torch.einsum("cbl,bcl->b", picked.to(torch.float64), N[:, k, :])
    return total, out


def divergence_and_output(fn, u: Tensor, mixing: Tensor | None = None, *, exact: bool = False,
                          probes: int = 1, distribution: str = "rademacher", mode: str = "jvp",
                          seed: int | None = None, chunk_size: int | None = None,
                          autograd: bool = False) -> tuple[Tensor, Tensor]:
    """(∇·((N ⊗ I) fn)(u) (B,) float64, fn(u)): exact, or the mean of ``probes`` probes of ``seed``;
    ``autograd``: by torch.autograd (for an fn that calls it itself), not torch.func."""
    if exact:
        return exact_divergence_and_output(fn, u, mixing, chunk_size, autograd)
    q, out = probe_estimates(fn, u, probes, distribution=distribution, mode=mode, seed=seed,
                             mixing=mixing, chunk_size=chunk_size, autograd=autograd)
    return q.mean(0), out


def hutchinson_divergence(fn, u: Tensor, probes: int = 10, distribution: str = "rademacher",
                          mode: str = "vjp", generator: torch.Generator | None = None, *,
                          mixing: Tensor | None = None, chunk_size: int | None = None,
                          return_stderr: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Hutchinson estimate of ∇·fn(u) = tr(∂fn/∂u) per sample, (B,) in u's dtype.

    fn maps (B, …) to the same shape, sample-wise. ``probes`` Rademacher or Gaussian probes,
    all in one batched VJP (``mode="vjp"``: one forward pass, P batched backward passes; the
    faster on CPU) or JVP (``"jvp"``) call per ``chunk_size`` probes.
    ``mixing`` N (K_in, K_out) or (B, K_in, K_out): estimate ∇·((N ⊗ I) fn) for
    fn: (B, K_in, *data) → (B, K_out, *data) without applying N to fn's output.
    ``return_stderr``: also the per-sample standard error std_p(q_p)/√P (needs probes ≥ 2).
    Differentiable (in fn's parameters, u and N).
    """
    if return_stderr:
        check_int(probes, "probes (with return_stderr)", minimum=2)
    q, _ = probe_estimates(fn, u, probes, distribution=distribution, mode=mode,
                           seed=draw_seed(generator), mixing=mixing, chunk_size=chunk_size)
    div = q.mean(0).to(u.dtype)
    if return_stderr:
        return div, (q.std(0, correction=1) / math.sqrt(probes)).to(u.dtype)
    return div


def exact_divergence(fn, u: Tensor, *, mixing: Tensor | None = None,
                     chunk_size: int | None = None) -> Tensor:
    """∇·fn(u) (or ∇·((N ⊗ I) fn)) exactly, one JVP per coordinate, (B,) in u's dtype.

    Cost grows with the sample size: for small dimensions and tests.
    """
    return exact_divergence_and_output(fn, u, mixing, chunk_size)[0].to(u.dtype)
