"""Bad inputs at every public entry point: each raises ValueError/TypeError naming the argument
(FileNotFoundError for a missing checkpoint)."""

from __future__ import annotations

import pytest
import torch

import fastmdm as fm
from fastmdm import adapters
from fastmdm.dsm import weighted_dsm

NAN = float("nan")
INF = float("inf")


def _diff():
    return fm.cld()


def _model(u, t):
    return torch.zeros_like(u)


def _x(*shape, value=None):
    x = torch.randn(*(shape or (4, 2)), generator=torch.Generator().manual_seed(0))
    if value is not None:
        x[0, 0] = value
    return x


def _state(value=None):
    return _x(4, 2, 2, value=value)


def _mdm():
    return fm.MDM(_diff(), fm.MLPScore((2,), 2, hidden=8, layers=1, time_dim=8))


# (public name, case id, call, error type, text the message must contain)
CASES = [
    ("LinearDiffusion", "T-nan", lambda: fm.LinearDiffusion([[0.0]], [[0.5]], T=NAN), ValueError, "T"),
    ("LinearDiffusion", "t_min-inf", lambda: fm.LinearDiffusion([[0.0]], [[0.5]], t_min=INF), ValueError,
     "t_min"),
    ("LinearDiffusion", "beta_max-nan", lambda: fm.LinearDiffusion([[0.0]], [[0.5]], beta_max=NAN), ValueError,
     "beta_max"),
    ("LinearDiffusion", "init_aux_var-inf", lambda: fm.cld(init_aux_var=INF), ValueError, "init_aux_var"),
    ("LinearDiffusion", "stationary_var-tiny", lambda: fm.cld(stationary_var=1e-300), ValueError,
     "stationary_var"),
    ("LinearDiffusion", "D-not-psd", lambda: fm.LinearDiffusion([[0.0]], [[-1.0]]), ValueError, "D"),
    ("LinearDiffusion", "Q-nan", lambda: fm.LinearDiffusion([[NAN]], [[0.5]]), ValueError, "Q"),
    ("LinearDiffusion.transition", "t-nan", lambda: _diff().transition(NAN), ValueError, "t must"),
    ("LinearDiffusion.transition", "start", lambda: _diff().transition(0.5, start="half"), ValueError, "start"),
    ("LinearDiffusion.perturb", "x0-nan", lambda: _diff().perturb(_x(value=NAN), 0.5), ValueError, "x0"),
    ("LinearDiffusion.perturb", "noise-inf",
     lambda: _diff().perturb(_x(), 0.5, noise=_state(value=INF)), ValueError, "noise"),
    ("LinearDiffusion.perturb", "noise-int",
     lambda: _diff().perturb(_x(), 0.5, noise=torch.ones(4, 2, 2, dtype=torch.int64)), TypeError, "noise"),
    ("LinearDiffusion.perturb", "noise-float64",
     lambda: _diff().perturb(_x(), 0.5, noise=_state().double()), TypeError, "noise"),
    ("LinearDiffusion.perturb", "t-outside", lambda: _diff().perturb(_x(), 2.0), ValueError, "t must"),
    ("LinearDiffusion.prior_sample", "shape-int", lambda: _diff().prior_sample(4), TypeError, "shape"),
    ("LinearDiffusion.prior_sample", "shape-float", lambda: _diff().prior_sample((2.5, 2)), TypeError, "shape"),
    ("LinearDiffusion.prior_sample", "shape-1d", lambda: _diff().prior_sample((4,)), ValueError, "shape"),
    ("LinearDiffusion.prior_sample", "dtype-int",
     lambda: _diff().prior_sample((2, 2), dtype=torch.int64), TypeError, "dtype"),
    ("LinearDiffusion.prior_log_prob", "u-data", lambda: _diff().prior_log_prob(_x()), ValueError, "u"),
    ("cld", "aux_var-negative", lambda: fm.cld(aux_var=-1.0), ValueError, "aux_var"),
    ("cld", "aux_var-nan", lambda: fm.cld(aux_var=NAN), ValueError, "aux_var"),
    ("alda", "aux_var-zero", lambda: fm.alda(aux_var=0.0), ValueError, "aux_var"),
    ("alda", "psi-negative", lambda: fm.alda(psi=-1.0), ValueError, "psi"),
    ("malda", "aux_var-nan", lambda: fm.malda(aux_var=NAN), ValueError, "aux_var"),
    ("malda", "K-one", lambda: fm.malda(K=1), ValueError, "K"),
    ("vpsde", "beta_min-negative", lambda: fm.vpsde(beta_min=-1.0), ValueError, "beta_min"),
    ("cld_sgm", "mass-nan", lambda: fm.cld_sgm(mass=NAN), ValueError, "mass"),
    ("cld_sgm", "Gamma-negative", lambda: fm.cld_sgm(Gamma=-1.0), ValueError, "Gamma"),
    ("NoiseSeed", "torch-path", lambda: weighted_dsm(_state(), fm.NoiseSeed(3), torch.eye(2).expand(4, 2, 2)),
     TypeError, "eps"),
    ("learned", "K-zero", lambda: fm.learned(K=0), ValueError, "K"),
    ("dsm_elbo", "x0-nan", lambda: fm.dsm_elbo(_model, _diff(), _x(value=NAN)), ValueError, "x0"),
    ("dsm_elbo", "diffusion", lambda: fm.dsm_elbo(_model, "cld", _x()), TypeError, "diffusion"),
    ("dsm_elbo", "prediction", lambda: fm.dsm_elbo(_model, _diff(), _x(), prediction="v"), ValueError,
     "prediction"),
    ("ism_elbo", "x0-inf", lambda: fm.ism_elbo(_model, _diff(), _x(value=INF)), ValueError, "x0"),
    ("ism_elbo", "probes", lambda: fm.ism_elbo(_model, _diff(), _x(), probes=0), ValueError, "probes"),
    ("noise_prediction_loss", "x0-nan", lambda: fm.noise_prediction_loss(_model, _diff(), _x(value=NAN)),
     ValueError, "x0"),
    ("noise_prediction_loss", "t-outside", lambda: fm.noise_prediction_loss(_model, _diff(), _x(), t=5.0),
     ValueError, "t must"),
    ("ode_log_likelihood", "x0-nan", lambda: fm.ode_log_likelihood(_model, _diff(), _x(value=NAN)), ValueError,
     "x0"),
    ("ode_log_likelihood", "method", lambda: fm.ode_log_likelihood(_model, _diff(), _x(), method="rk2"),
     ValueError, "method"),
    ("ode_bits_per_dim", "levels", lambda: fm.ode_bits_per_dim(_model, _diff(), _x().clamp(0, 1), levels=1),
     ValueError, "levels"),
    ("probability_flow_drift", "model", lambda: fm.probability_flow_drift(3, _diff()), TypeError, "model"),
    ("sample", "shape-int", lambda: fm.sample(_model, _diff(), 4), TypeError, "shape"),
    ("sample", "x_T-nan", lambda: fm.sample(_model, _diff(), x_T=_state(value=NAN)), ValueError, "x_T"),
    ("sample", "solver", lambda: fm.sample(_model, _diff(), (2, 2), solver="euler"), ValueError, "solver"),
    ("SOLVERS", "unknown", lambda: fm.sample(_model, _diff(), (2, 2), solver="dpm"), ValueError, "solver"),
    ("encode", "x-nan", lambda: fm.encode(_model, _diff(), _x(value=NAN)), ValueError, "x"),
    ("encode", "x-and-state", lambda: fm.encode(_model, _diff(), _x(), state=_state()), ValueError, "state"),
    ("encode", "aux-dtype", lambda: fm.encode(_model, _diff(), _x(), aux=_x(4, 1, 2).double()), TypeError,
     "aux"),
    ("encode", "state-inf", lambda: fm.encode(_model, _diff(), state=_state(value=INF)), ValueError, "state"),
    ("decode", "z-nan", lambda: fm.decode(_model, _diff(), _state(value=NAN)), ValueError, "z"),
    ("decode", "z-data", lambda: fm.decode(_model, _diff(), _x()), ValueError, "z"),
    ("exact_divergence", "fn", lambda: fm.exact_divergence(3, _x()), TypeError, "fn"),
    ("hutchinson_divergence", "probes", lambda: fm.hutchinson_divergence(torch.sin, _x(), probes=0), ValueError,
     "probes"),
    ("hutchinson_divergence", "distribution",
     lambda: fm.hutchinson_divergence(torch.sin, _x(), distribution="normal"), ValueError, "distribution"),
    ("bits_per_dim", "levels", lambda: fm.bits_per_dim(torch.ones(4), (4, 2), levels=1), ValueError, "levels"),
    ("dequantize", "x-nan", lambda: fm.dequantize(_x(value=NAN)), ValueError, "x"),
    ("logit_transform", "alpha", lambda: fm.logit_transform(_x().clamp(0, 1), alpha=0.7), ValueError, "alpha"),
    ("DataTransform", "levels", lambda: fm.DataTransform(levels=1), ValueError, "levels"),
    ("GaussianMixture", "weights", lambda: fm.GaussianMixture([0.5, -0.5], [[0.0], [1.0]], [1.0, 1.0]),
     ValueError, "weights"),
    ("MLPScore", "K", lambda: fm.MLPScore((2,), 0), ValueError, "K"),
    ("UNetScore", "data_shape", lambda: fm.UNetScore((8,), 2), ValueError, "data_shape"),
    ("MDM", "diffusion", lambda: fm.MDM("cld", fm.MLPScore((2,), 2)), TypeError, "diffusion"),
    ("MDM", "objective", lambda: fm.MDM(_diff(), fm.MLPScore((2,), 2), objective="nll"), ValueError, "objective"),
    ("Trainer", "lr", lambda: fm.Trainer(_mdm(), lr=-1.0), ValueError, "lr"),
    ("evaluate_bpd", "method", lambda: fm.evaluate_bpd(_mdm(), _x(), method="exact"), ValueError, "method"),
    ("load_checkpoint", "path", lambda: fm.load_checkpoint("no/such/checkpoint.pt"), FileNotFoundError,
     "checkpoint"),
    ("load_dataset", "name", lambda: fm.load_dataset("nope"), ValueError, "data"),  # the CLI's --data
    ("set_backend", "name", lambda: fm.set_backend("cuda"), ValueError, "backend"),
    ("TransitionKernel", "start", lambda: _diff().transition(0.5, start="zero"), ValueError, "start"),
    ("adapters", "eps_model", lambda: adapters.from_score_sde(3), TypeError, "eps_model"),
    ("adapters", "denoiser", lambda: adapters.from_k_diffusion(None), TypeError, "denoiser"),
    ("adapters", "diffusion-K", lambda: adapters.from_k_diffusion(_model, fm.cld()), ValueError, "K = 1"),
]


@pytest.mark.parametrize("name, case, call, error, text", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_input_raises_naming_the_argument(name, case, call, error, text):
    with pytest.raises(error) as info:
        call()
    assert text in str(info.value), f"{name} ({case}): message does not name {text!r}: {info.value}"


def test_get_backend_names_the_bad_environment_variable(monkeypatch):
    monkeypatch.setattr(fm.backend, "_state", {"backend": None})
    monkeypatch.setenv("FASTMDM_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTMDM_BACKEND"):
        fm.get_backend()


def test_every_public_name_has_a_bad_input_case():
    covered = {case[0].split(".")[0] for case in CASES} | {"get_backend"}
    assert set(fm.__all__) <= covered, f"no bad-input case for {sorted(set(fm.__all__) - covered)}"
    methods = {case[0] for case in CASES if case[0].startswith("LinearDiffusion.")}
    for method in ("transition", "perturb", "prior_sample", "prior_log_prob"):
        assert f"LinearDiffusion.{method}" in methods


# -- a model whose output turns non-finite -----------------------------------------------------------
def _nan_after(calls: int):
    """A model that returns zeros for ``calls`` evaluations, then NaN."""
    count = [0]

    def model(u, t):
        count[0] += 1
        return torch.zeros_like(u) if count[0] <= calls else torch.full_like(u, NAN)

    return model


@pytest.mark.parametrize("solver", ["euler-maruyama", "ei-ode", "ancestral", "heun", "sscs"])
def test_non_finite_model_output_names_step_t_and_solver(solver):
    with pytest.raises(FloatingPointError) as info:
        fm.sample(_nan_after(3), _diff(), (4, 2), steps=6, solver=solver)
    message = str(info.value)
    assert f"solver {solver!r}" in message and "t = " in message
    step = 3 if solver != "heun" else 1  # heun: two evaluations per step
    assert f"at step {step} " in message, message


@pytest.mark.parametrize("call, caller", [
    (lambda m: fm.sample(m, _diff(), (4, 2), steps=4, solver="rk45"), "rk45"),
    (lambda m: fm.encode(m, _diff(), _x()), "encode"),
    (lambda m: fm.decode(m, _diff(), _state()), "decode"),
])
def test_non_finite_model_output_in_the_adaptive_solver(call, caller):
    with pytest.raises(FloatingPointError, match=f"solver {caller!r}"):
        call(_nan_after(2))


def test_encode_reads_data_whose_first_axis_equals_k_as_data():
    """x of shape (B, K, d) is data with K rows, never a state; a state goes through state=."""
    diff = _diff()

    def model(u, t):
        return 0.1 * u

    x = _x(3, 2, 2)  # (B, K=2, d): data of shape (2, 2)
    z = fm.encode(model, diff, x, rtol=1e-4, atol=1e-4)
    assert z.shape == (3, 2, 2, 2)
    u0 = torch.cat([x.unsqueeze(1), torch.zeros(3, 1, 2, 2)], dim=1)
    assert torch.equal(fm.encode(model, diff, state=u0, rtol=1e-4, atol=1e-4), z)


# -- low-precision state -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("solver, prediction", [("euler-maruyama", "eps"), ("ei-ode", "eps"), ("ancestral", "eps"),
                                                ("heun", "eps"), ("sscs", "eps"), ("ei-ode", "x0")])
def test_low_precision_sampling_stays_finite_and_near_float32(dtype, solver, prediction):
    """x_T in float16/bfloat16: the state stays in that dtype, finite, within 64 eps·max|x| of the
    float32 run from the same start (20 steps, each rounding the state once, near-t_min stiffness
    amplifying the rounding a few-fold). The exact score is evaluated in float64."""
    from fastmdm.mixtures import GaussianMixture, exact_score_model

    diff = _diff()
    mixture = GaussianMixture([0.3, 0.7], [[1.0, 0.5], [-1.0, -0.5]], [0.3, 0.5])
    exact = exact_score_model(mixture, diff, prediction)

    def model(u, t):
        return exact(u.double(), t.double().clamp(diff.t_min, diff.T)).to(u.dtype)

    x_T = diff.prior_sample((256, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    options = dict(steps=20, solver=solver, prediction=prediction)
    ref = fm.sample(model, diff, x_T=x_T, generator=torch.Generator().manual_seed(1), **options)
    x = fm.sample(model, diff, x_T=x_T.to(dtype), generator=torch.Generator().manual_seed(1), **options)
    assert x.dtype == dtype and torch.isfinite(x).all()
    assert (x.float() - ref).abs().max() <= 64 * torch.finfo(dtype).eps * ref.abs().max()
