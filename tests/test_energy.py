"""Energy-based models (s = −∇E by torch.autograd inside the model) in the likelihood and the ISM ELBO."""

import pytest
import torch
from torch import nn

import fastmdm as fm

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("float64_default")


class EnergyMLP(nn.Module):
    """E(u, t) = wᵀ tanh(W [u; t] + b) + c per sample; ``forward`` is the score −∇_u E by torch.autograd."""

    def __init__(self, K: int, d: int, hidden: int = 16, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.hidden = nn.Linear(K * d + 1, hidden)
        self.out = nn.Linear(hidden, 1)
        self.calls = 0

    def energy(self, u, t):
        return self.out(torch.tanh(self.hidden(torch.cat([u.flatten(1), t[:, None]], 1))))[:, 0]

    def forward(self, u, t):
        self.calls += 1
        with torch.enable_grad():
            u.requires_grad_(True)
            (grad,) = torch.autograd.grad(self.energy(u, t).sum(), u, create_graph=True)
        return -grad


def explicit_score(energy: EnergyMLP):
    """The same model's score written out: −∇_u E = −W_uᵀ (w ⊙ (1 − tanh²(W [u; t] + b)))."""

    def score(u, t):
        pre = energy.hidden(torch.cat([u.flatten(1), t[:, None]], 1))
        w_u = energy.hidden.weight[:, : u[0].numel()]
        return -(((1 - torch.tanh(pre) ** 2) * energy.out.weight) @ w_u).view_as(u)

    return score


def _data(n=5):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(11), dtype=F64)


def test_the_explicit_score_is_the_energy_gradient():
    energy = EnergyMLP(2, 2)
    u, t = torch.randn(4, 2, 2, dtype=F64), torch.rand(4, dtype=F64)
    torch.testing.assert_close(energy(u.clone(), t), explicit_score(energy)(u, t), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("options", [dict(exact_divergence=True), dict(probes=3, mode="jvp"),
                                     dict(probes=2, mode="vjp")], ids=["exact", "jvp", "vjp"])
def test_ode_log_likelihood_of_an_energy_model(options):
    diff = fm.cld()
    energy = EnergyMLP(2, 2)
    x = _data()
    run = dict(method="rk4", steps=6, **options)
    want, nfe = fm.ode_log_likelihood(explicit_score(energy), diff, x, "score",
                                      generator=torch.Generator().manual_seed(1), **run)
    got, nfe_energy = fm.ode_log_likelihood(energy, diff, x, "score",
                                            generator=torch.Generator().manual_seed(1), **run)
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)
    assert nfe_energy == nfe
    assert energy.calls == nfe + 1  # torch.func refuses the model once, then torch.autograd throughout
    assert not got.requires_grad


def test_ism_elbo_of_an_energy_model_and_its_gradient():
    diff = fm.cld()
    energy = EnergyMLP(2, 2)
    x = _data()
    explicit = explicit_score(energy)

    weights = [energy.hidden.weight, energy.hidden.bias, energy.out.weight]  # the score's parameters

    def loss_and_grads(model):
        loss = fm.ism_elbo(model, diff, x, "score", probes=2, generator=torch.Generator().manual_seed(4))
        return loss.detach(), torch.autograd.grad(loss.sum(), weights)

    want, want_grads = loss_and_grads(explicit)
    got, got_grads = loss_and_grads(energy)
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_other_errors_are_not_taken_for_an_energy_model():
    def broken(u, t):
        raise RuntimeError("a model bug")

    with pytest.raises(RuntimeError, match="a model bug"):
        fm.ode_log_likelihood(broken, fm.cld(), _data(2), "score", method="euler", steps=2)
