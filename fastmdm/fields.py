"""Fields linear in the state and the score, their divergences, the probability-flow drift (docs/math.md §6).

The score is affine in the network output y (:mod:`fastmdm.parameterization`):
s(u, t) = (S_out ⊗ I) y + (S_state ⊗ I) u. So any field F = (S ⊗ I) u + (G ⊗ I) s with per-sample
K×K S, G is F = ((S + G S_state) ⊗ I) u + ((G S_out) ⊗ I) y and

    ∇·F = tr(S + G S_state) · d + tr(((G S_out) ⊗ I) ∂y/∂u),

the last term by Hutchinson probes (or exactly) with G S_out as the mixing matrix of
:mod:`fastmdm.divergence` — the K×K algebra never touches the network output tensor. A model
that calls torch.autograd itself (an energy model, s = −∇E) is detected by torch.func's refusal
and differentiated by torch.autograd instead. The
ELBO's implicit score-matching term and the likelihood both evaluate such fields. The
probability-flow drift is S = β(t) A, G = −β(t) D:

    h(u, t) = β(t)[A u − D s(u, t)]       (noise prediction: β(t)[A u + D L_t⁻ᵀ ε̂]).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import NamedTuple

import torch
from torch import Tensor

from .adapters import resolve_model
from .diffusion import LinearDiffusion
from .divergence import divergence_and_output, is_functorch_conflict
from .ops import apply_kk, compute_dtype, data_dim, draw_seed
from .parameterization import AffineMap, Parameterization
from .transition import TransitionKernel


class FieldEvaluation(NamedTuple):
    """A field F linear in (u, s), its divergence (float64 (B,) or None), the network output y
    and the score map s = (S_out ⊗ I) y + (S_state ⊗ I) u it was built from."""

    value: Tensor
    divergence: Tensor | None
    output: Tensor
    score_map: AffineMap

    def score(self, u: Tensor) -> Tensor:
        """s(u, t) at the evaluated state u."""
        return self.score_map.apply(self.output, u)


def score_linear_field(model, diffusion: LinearDiffusion, parameterization: Parameterization, u: Tensor,
                       t64: Tensor, state_mat: Tensor | None, score_mat: Tensor,
                       divergence: dict | None = None, tk: TransitionKernel | None = None) -> FieldEvaluation:
    """F(u) = (S ⊗ I) u + (G ⊗ I) s(u, t) and, if ``divergence`` is given, ∇·F per sample.

    F and the output y are in ``ops.compute_dtype(u.dtype)`` (float32 for float16/bfloat16 u).

    S (``state_mat``, or None for 0) and G (``score_mat``) are float64 (B, K, K); ``tk``: the
    hybrid-start kernel at t if already computed. ``divergence``: keyword options of
    :func:`fastmdm.divergence.divergence_and_output` (exact, probes, distribution, mode, seed,
    chunk_size); None: one plain network call.
    """
    d = data_dim(u.shape[1:])
    if tk is None and parameterization.needs_kernel:
        tk = diffusion.transition_f64(t64, "hybrid")
    smap = parameterization.score_map(tk)
    state = state_mat
    if smap.state is not None:
        state = score_mat @ smap.state if state is None else state + score_mat @ smap.state
    out_mat = score_mat if smap.out is None else score_mat @ smap.out

    def fn(x):
        return parameterization.output(model(x, t64.to(x.dtype)), x)

    if divergence is None:
        y, div = fn(u), None
    else:
        div, y = _divergence_and_output(model, fn, u, out_mat, divergence)
        if state is not None:
            div = div + torch.diagonal(state, dim1=-2, dim2=-1).sum(-1) * d
    y = y.to(compute_dtype(u.dtype))  # the maps' entries overflow float16 near t_min
    value = apply_kk(out_mat, y)
    if state is not None:
        value = value + apply_kk(state, u.to(y.dtype))
    return FieldEvaluation(value, div, y, smap)


_AUTOGRAD_MODELS: weakref.WeakSet = weakref.WeakSet()  # models that call torch.autograd inside


def _divergence_and_output(model, fn, u: Tensor, mixing: Tensor, options: dict) -> tuple[Tensor, Tensor]:
    """divergence_and_output by torch.func; for a model that calls torch.autograd itself (an energy
    model, s = −∇E), which torch.func refuses, by torch.autograd (remembered for the model)."""
    try:
        known = model in _AUTOGRAD_MODELS
    except TypeError:  # not weakly referenceable: detected on every call
        known = False
    if not known:
        try:
            return divergence_and_output(fn, u, mixing, **options)
        except RuntimeError as err:
            if not is_functorch_conflict(err):
                raise
        with contextlib.suppress(TypeError):
            _AUTOGRAD_MODELS.add(model)
    return divergence_and_output(fn, u, mixing, **options, autograd=True)


class ProbabilityFlow:
    """The probability-flow drift h(u, t) = β(t)[A u − D s(u, t)] of ``model`` (docs/math.md §6).

    ``flow(u, t)`` returns h (one network call); ``flow.with_divergence(u, t, …)`` returns
    (h, ∇·h) with ∇·h = β tr(A) d − β ∇·(D s) in float64, the mixing −β D S_out folded into
    the probe reduction. t: a float or a (B,) tensor in [t_min, T].
    """

    def __init__(self, model, diffusion: LinearDiffusion, prediction: str | None = None):
        self.model, self.parameterization = resolve_model(model, diffusion, prediction)
        self.diffusion = diffusion

    def _evaluate(self, u: Tensor, t, divergence: dict | None) -> FieldEvaluation:
        self.diffusion.check_state(u)
        t64 = self.diffusion.check_time(t, batch=u.shape[0], device=u.device)
        beta = self.diffusion.beta(t64)[:, None, None]
        A, D = self.diffusion.A.to(u.device), self.diffusion.D.to(u.device)
        return score_linear_field(self.model, self.diffusion, self.parameterization, u, t64, beta * A,
                                  -beta * D, divergence)

    def __call__(self, u: Tensor, t) -> Tensor:
        return self._evaluate(u, t, None).value.to(u.dtype)

    def with_divergence(self, u: Tensor, t, *, exact: bool = False, probes: int = 1,
                        distribution: str = "rademacher", mode: str = "jvp", seed: int | None = None,
                        chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
        """(h, ∇·h): exact (one JVP per coordinate) or Hutchinson with the probes of ``seed``."""
        options = dict(exact=exact, probes=probes, distribution=distribution, mode=mode,
                       seed=draw_seed() if seed is None and not exact else seed, chunk_size=chunk_size)
        evaluation = self._evaluate(u, t, options)
        return evaluation.value.to(u.dtype), evaluation.divergence


def probability_flow_drift(model, diffusion: LinearDiffusion,
                           prediction: str | None = None) -> ProbabilityFlow:
    """The probability-flow drift h(u, t) = β(t)[A u − D s(u, t)] as a callable (see ProbabilityFlow)."""
    return ProbabilityFlow(model, diffusion, prediction)


__all__ = ["FieldEvaluation", "ProbabilityFlow", "probability_flow_drift", "score_linear_field"]
