"""One resolver (fastmdm.adapters.resolve_model): every entry point reads an adapter with its own prediction."""

import pytest
import torch

import fastmdm as fm
from fastmdm import adapters
from fastmdm.mixtures import GaussianMixture, exact_score_model

F64 = torch.float64
MIX = GaussianMixture([0.4, 0.6], [[1.0, 0.0], [-0.5, 0.8]], [0.2, 0.4])

pytestmark = pytest.mark.usefixtures("float64_default")


def _k_diffusion_pair(diff):
    """(x0 state model, the same model as a k-diffusion denoiser(x, σ) wrapped by the adapter)."""
    x0_model = exact_score_model(MIX, diff, "x0")

    def denoiser(x, sigma):  # x = x₀ + σ n  ⇔  x_t = α x, α = (1 + σ²)^(-1/2)
        alpha = (1 + sigma**2).rsqrt()
        t = diff.tau_inverse(torch.log1p(sigma.to(F64) ** 2))
        return x0_model((x * alpha.view(-1, 1)).unsqueeze(1), t)[:, 0]

    return x0_model, adapters.from_k_diffusion(denoiser)


def _data(n=6, seed=3):
    return MIX.sample(n, generator=torch.Generator().manual_seed(seed)).to(F64)


@pytest.mark.parametrize("objective", [fm.dsm_elbo, fm.ism_elbo])
def test_objectives_read_an_adapter_with_its_own_prediction(objective):
    diff = fm.vpsde()
    x0_model, wrapped = _k_diffusion_pair(diff)
    x = _data()
    want = objective(x0_model, diff, x, prediction="x0", generator=torch.Generator().manual_seed(5))
    got = objective(wrapped, diff, x, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    read_as_eps = objective(x0_model, diff, x, prediction="eps", generator=torch.Generator().manual_seed(5))
    assert (read_as_eps - want).abs().max() > 1.0  # what the adapter was silently read as before


def test_likelihood_reads_an_adapter_with_its_own_prediction():
    diff = fm.vpsde()
    x0_model, wrapped = _k_diffusion_pair(diff)
    x = _data(4)
    options = dict(method="rk4", steps=12, exact_divergence=True)
    want, _ = fm.ode_log_likelihood(x0_model, diff, x, "x0", **options)
    got, _ = fm.ode_log_likelihood(wrapped, diff, x, **options)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    drift = fm.probability_flow_drift(wrapped, diff)
    u, t = torch.randn(4, 1, 2, dtype=F64), torch.full((4,), 0.3, dtype=F64)
    torch.testing.assert_close(drift(u, t), fm.probability_flow_drift(x0_model, diff, "x0")(u, t))


def test_encode_decode_read_an_adapter_with_its_own_prediction():
    diff = fm.vpsde()
    x0_model, wrapped = _k_diffusion_pair(diff)
    x = _data(3)
    z = fm.encode(wrapped, diff, x, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(z, fm.encode(x0_model, diff, x, "x0", rtol=1e-7, atol=1e-7))
    torch.testing.assert_close(fm.decode(wrapped, diff, z, rtol=1e-7, atol=1e-7), x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("call", [
    lambda m, d, x: fm.sample(m, d, (2, 2), steps=2, prediction="eps"),
    lambda m, d, x: fm.encode(m, d, x, "score"),
    lambda m, d, x: fm.decode(m, d, x.unsqueeze(1), "eps"),
    lambda m, d, x: fm.dsm_elbo(m, d, x, prediction="eps"),
    lambda m, d, x: fm.ism_elbo(m, d, x, prediction="score"),
    lambda m, d, x: fm.ode_log_likelihood(m, d, x, "eps"),
    lambda m, d, x: fm.probability_flow_drift(m, d, "eps"),
], ids=["sample", "encode", "decode", "dsm_elbo", "ism_elbo", "ode_log_likelihood", "drift"])
def test_a_conflicting_prediction_raises_naming_both(call):
    diff = fm.vpsde()
    _, wrapped = _k_diffusion_pair(diff)
    with pytest.raises(ValueError, match=r"prediction='(eps|score)'.*'x0'"):
        call(wrapped, diff, _data(2))


def test_resolver_defaults_and_agreement():
    diff = fm.vpsde()
    _, wrapped = _k_diffusion_pair(diff)
    model, param = adapters.resolve_model(wrapped, diff, "x0")  # the same prediction is fine
    assert param.name == "x0" and model.diffusion is diff
    plain = exact_score_model(MIX, diff, "score")
    model, param = adapters.resolve_model(plain, diff)
    assert model is plain and param.name == "eps"
    assert adapters.resolve_model(plain, diff, "score")[1].name == "score"
    score_sde = adapters.from_score_sde(lambda x, t: x)
    assert adapters.resolve_model(score_sde, diff)[1].name == "eps"
    with pytest.raises(ValueError, match="prediction must be one of"):
        adapters.resolve_model(wrapped, diff, "v")


def test_noise_prediction_loss_refuses_a_model_that_does_not_predict_eps():
    diff = fm.vpsde()
    _, wrapped = _k_diffusion_pair(diff)
    with pytest.raises(ValueError, match="'eps'.*'x0'"):
        fm.noise_prediction_loss(wrapped, diff, _data(2))


def test_mdm_takes_the_model_prediction():
    diff = fm.vpsde()
    net = fm.MLPScore(K=1, data_shape=(2,), hidden=8)
    net.prediction = "score"
    assert fm.MDM(diff, net).prediction == "score"
    with pytest.raises(ValueError, match="prediction='eps'.*'score'"):
        fm.MDM(diff, net, prediction="eps")
    assert fm.MDM(diff, fm.MLPScore(K=1, data_shape=(2,), hidden=8)).prediction == "eps"
