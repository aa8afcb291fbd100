"""The MDM module and Trainer: loss decreases, BPD, EMA, warm-up, clipping, exact resume, bad input."""

import io
import math
import os
import signal

import pytest
import torch

import fastmdm as fm
from fastmdm.data import DataTransform, load_toy
from fastmdm.models import MLPScore, UNetScore
from fastmdm.training import MDM, Trainer, build_mdm, load_checkpoint, make_diffusion, read_checkpoint

DIFFUSIONS = [("vpsde", None), ("cld", None), ("alda", None), ("malda", 3), ("learned", 2), ("learned", 3)]


@pytest.fixture(scope="module")
def toy():
    return load_toy("8gaussians", seed=0, n=2000).train


def _mdm(kind="cld", K=None, hidden=32, seed=0, **kwargs):
    torch.manual_seed(seed)
    diffusion = make_diffusion(kind, K)
    return MDM(diffusion, MLPScore((2,), diffusion.K, hidden=hidden, layers=2), **kwargs)


@pytest.mark.parametrize("kind,K", DIFFUSIONS)
def test_short_training_lowers_the_loss(toy, kind, K):
    trainer = Trainer(_mdm(kind, K), lr=3e-3, warmup=5)
    trainer.fit(toy, 80, 128)
    loss = torch.tensor(trainer.history["loss"], dtype=torch.float64)
    first, last = loss[:15], loss[-15:]
    # the mean over the last steps lies below the first ones by more than 4 standard errors
    se = math.sqrt(first.var() / 15 + last.var() / 15)
    assert last.mean() < first.mean() - 4 * se, (first.mean().item(), last.mean().item())


def test_learned_matrices_are_trained(toy):
    mdm = _mdm("learned", 3)
    Q0, D0 = mdm.diffusion.Q.detach().clone(), mdm.diffusion.D.detach().clone()
    Trainer(mdm, lr=1e-2, warmup=1).fit(toy, 5, 64)
    assert (mdm.diffusion.Q - Q0).abs().max() > 1e-3 and (mdm.diffusion.D - D0).abs().max() > 1e-3
    torch.testing.assert_close(mdm.diffusion.Q, -mdm.diffusion.Q.T)


def test_elbo_bpd_batched_matches_per_sample(toy):
    """Same expectation whether a sample is scored alone or in a batch (z-test over R draws)."""
    mdm = _mdm("cld")
    Trainer(mdm, lr=3e-3, warmup=5).fit(toy, 30, 128)
    x, R = toy[:4], 64
    gen = torch.Generator().manual_seed(0)
    batched = mdm.bpd(x.repeat(R, 1), generator=gen).view(R, 4)
    single = torch.stack([mdm.bpd(x[i: i + 1].repeat(R, 1), generator=gen) for i in range(4)], 1)
    assert torch.isfinite(batched).all() and torch.isfinite(single).all()
    se = (batched.var(0) / R + single.var(0) / R).sqrt()
    assert ((batched.mean(0) - single.mean(0)).abs() < 5 * se).all()


def test_ode_bpd_batched_matches_per_sample(toy):
    """Exact divergence on a fixed RK4 grid: deterministic, so batched and per-sample agree to rounding."""
    mdm = _mdm("vpsde", hidden=16)
    Trainer(mdm, lr=3e-3, warmup=5).fit(toy, 20, 128)
    x = toy[:3].double()
    mdm.double()
    kw = dict(method="ode", exact_divergence=True, ode_method="rk4", steps=20)
    batched = mdm.bpd(x, **kw)
    single = torch.cat([mdm.bpd(x[i: i + 1], **kw) for i in range(3)])
    assert torch.isfinite(batched).all()
    torch.testing.assert_close(batched, single, rtol=1e-10, atol=1e-10)


def test_digits_unet_bpd_is_finite_and_above_zero():
    torch.manual_seed(0)
    x = torch.randint(0, 17, (6, 1, 8, 8)).float() / 16
    diffusion = fm.malda(3)
    mdm = MDM(diffusion, UNetScore((1, 8, 8), 3, base=8), data_transform=DataTransform(17))
    bpd = mdm.bpd(x, generator=torch.Generator().manual_seed(0))
    assert bpd.shape == (6,) and torch.isfinite(bpd).all() and (bpd > 0).all()
    loss = mdm.loss(x, torch.Generator().manual_seed(0))
    # the training loss is −ELBO(x̃) in nats: bpd = loss / (d ln 2) + log2(17) for the same draws
    d = 64
    again = mdm.bpd(x, generator=torch.Generator().manual_seed(0), use_ema=False)
    torch.testing.assert_close(again, loss.double() / (d * math.log(2)) + math.log2(17), rtol=1e-5, atol=1e-5)


def test_ema_follows_the_documented_recursion_and_scope_restores(toy):
    mdm = _mdm("vpsde", hidden=8, ema_decay=0.9)
    trainer = Trainer(mdm, lr=1e-2, warmup=1)
    params = mdm.trainable_parameters()
    expected = [p.detach().clone() for p in params]
    for n in range(4):
        trainer.train_step(toy[:32])
        decay = min(0.9, (1 + n) / (10 + n))
        expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, params, strict=True)]
    for e, s in zip(expected, mdm.ema.shadows(), strict=True):
        torch.testing.assert_close(s, e)
    live = [p.detach().clone() for p in params]
    with mdm.ema_weights():
        assert all(torch.equal(p, s) for p, s in zip(params, mdm.ema.shadows(), strict=True))
    assert all(torch.equal(p, q) for p, q in zip(params, live, strict=True))


def test_warmup_and_gradient_clipping(toy):
    mdm = _mdm("cld", hidden=8)
    sgd = torch.optim.SGD(mdm.trainable_parameters(), lr=0.5)
    trainer = Trainer(mdm, sgd, warmup=4, grad_clip=1e-3)
    for n in range(6):
        assert sgd.param_groups[0]["lr"] == pytest.approx(0.5 * min(1.0, (n + 1) / 4))
        before = torch.cat([p.detach().flatten() for p in mdm.trainable_parameters()])
        lr = sgd.param_groups[0]["lr"]
        trainer.train_step(toy[:64])
        after = torch.cat([p.detach().flatten() for p in mdm.trainable_parameters()])
        # plain SGD on a clipped gradient moves the weights by exactly lr · clip
        assert (after - before).norm().item() == pytest.approx(lr * 1e-3, rel=1e-4)


@pytest.mark.parametrize("optimizer", ["adam", "sgd-momentum", "adamw"])
def test_resume_reproduces_an_uninterrupted_run_exactly(toy, optimizer, tmp_path):
    def make():
        mdm = _mdm("learned", 2, hidden=16)
        params = mdm.trainable_parameters()
        opt = {"adam": lambda: torch.optim.Adam(params, lr=1e-3),
               "sgd-momentum": lambda: torch.optim.SGD(params, lr=1e-2, momentum=0.9),
               "adamw": lambda: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)}[optimizer]()
        return Trainer(mdm, opt, warmup=3, seed=7, config={"tag": optimizer})

    straight = make()
    straight.fit(toy, 6, 32)
    first = make()
    first.fit(toy, 3, 32, out_dir=str(tmp_path), checkpoint_every=3)
    resumed = make()
    resumed.load_state_dict(read_checkpoint(str(tmp_path)))
    assert resumed.step_count == 3
    resumed.fit(toy, 6, 32)
    assert resumed.history["loss"] == straight.history["loss"]
    for a, b in zip(straight.mdm.state_dict().values(), resumed.mdm.state_dict().values(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
    buf_a, buf_b = io.BytesIO(), io.BytesIO()
    torch.save(straight.optimizer.state_dict(), buf_a)
    torch.save(resumed.optimizer.state_dict(), buf_b)
    state_a = torch.load(io.BytesIO(buf_a.getvalue()))["state"]
    state_b = torch.load(io.BytesIO(buf_b.getvalue()))["state"]
    for key in state_a:
        for name, value in state_a[key].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state_b[key][name]))


def test_interrupted_run_keeps_every_completed_step(toy, tmp_path):
    def make():
        return Trainer(_mdm("cld", hidden=8), warmup=2, seed=3)

    straight = make()
    straight.fit(toy, 10, 16)

    def interrupt(trainer, loss):
        if trainer.step_count == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make().fit(toy, 10, 16, out_dir=str(tmp_path), checkpoint_every=5, callback=interrupt)
    resumed = make()
    resumed.load_state_dict(read_checkpoint(str(tmp_path / "checkpoint.pt")))
    assert resumed.step_count == 7
    resumed.fit(toy, 10, 16)
    assert resumed.history["loss"] == straight.history["loss"]


def test_bad_input_gives_clear_errors(toy, tmp_path):
    mdm = _mdm("cld")
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2\)"):
        mdm.loss(torch.randn(4, 3))
    bad = toy[:4].clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        mdm.loss(bad)
    with pytest.raises(ValueError, match="K=3 variables but the diffusion has K=2"):
        MDM(fm.cld(), MLPScore((2,), 3))
    with pytest.raises(ValueError, match="K=3 does not match diffusion 'cld'"):
        make_diffusion("cld", 3)
    with pytest.raises(ValueError, match="objective must be one of"):
        MDM(fm.cld(), MLPScore((2,), 2), objective="vlb")
    # a checkpoint from another diffusion: same K = 2, different (Q, D)
    cld_state = mdm.state_dict()
    with pytest.raises(ValueError, match="diffusion='cld'"):
        _mdm("malda", 2).load_state_dict(cld_state)
    with pytest.raises(ValueError, match="checkpoint mismatch"):
        _mdm("malda", 3).load_state_dict(cld_state)
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(str(tmp_path / "junk.pt"))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(str(tmp_path / "nothing.pt"))


def test_training_stops_on_a_non_finite_loss(toy):
    mdm = _mdm("vpsde", hidden=8)
    with torch.no_grad():
        mdm.score_model.out.bias.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="loss is"):
        Trainer(mdm).train_step(toy[:8])


class SignallingMLP(MLPScore):
    """An MLP that sends itself ``signals`` SIGINTs during its ``at``-th call (counted from 1)."""

    def __init__(self, at: int, signals: int = 1):
        super().__init__((2,), 2, hidden=8, layers=2)
        self.at, self.signals, self.calls = at, signals, 0

    def forward(self, u, t):
        self.calls += 1
        if self.calls == self.at:
            for _ in range(self.signals):
                signal.raise_signal(signal.SIGINT)
        return super().forward(u, t)


def _signalling_trainer(at=0, signals=1):
    torch.manual_seed(0)
    return Trainer(MDM(fm.cld(), SignallingMLP(at, signals)), warmup=3, seed=5)


def _assert_same_run(a: Trainer, b: Trainer):
    assert a.step_count == b.step_count and a.history == b.history
    for x, y in zip(a.mdm.state_dict().values(), b.mdm.state_dict().values(), strict=True):
        assert not isinstance(x, torch.Tensor) or torch.equal(x, y)
    assert torch.equal(a.batch_generator.get_state(), b.batch_generator.get_state())
    assert torch.equal(a.noise_generator.get_state(), b.noise_generator.get_state())
    assert a.scheduler.state_dict() == b.scheduler.state_dict()


# network calls: 1-2 step 1; 3-4 step 2, 5-6 its evaluation; 7-8 step 3; 9-10 step 4, 11-12 its evaluation
@pytest.mark.parametrize("at", [1, 2, 4, 5, 6, 9, 12])
def test_sigint_mid_step_finishes_the_step_checkpoints_it_and_resumes_exactly(toy, tmp_path, at):
    straight = _signalling_trainer()
    straight.fit(toy, 8, 16, eval_data=toy[:256], eval_every=2)
    with pytest.raises(KeyboardInterrupt):
        _signalling_trainer(at).fit(toy, 8, 16, out_dir=str(tmp_path), checkpoint_every=100,
                                    eval_data=toy[:256], eval_every=2)
    resumed = _signalling_trainer()
    resumed.load_state_dict(read_checkpoint(str(tmp_path)))
    assert 1 <= resumed.step_count < 8
    resumed.fit(toy, 8, 16, eval_data=toy[:256], eval_every=2)
    _assert_same_run(straight, resumed)


def test_second_sigint_stops_at_once_and_keeps_the_last_checkpoint(toy, tmp_path):
    straight = _signalling_trainer()
    straight.fit(toy, 6, 16)
    with pytest.raises(KeyboardInterrupt):
        _signalling_trainer(at=7, signals=2).fit(toy, 6, 16, out_dir=str(tmp_path), checkpoint_every=2)
    resumed = _signalling_trainer()
    resumed.load_state_dict(read_checkpoint(str(tmp_path)))
    assert resumed.step_count == 2  # step 4 (calls 7-8) is cut short; the last checkpoint is step 2
    resumed.fit(toy, 6, 16)
    _assert_same_run(straight, resumed)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_checkpoint_is_flushed_to_disk_before_the_rename(toy, tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    Trainer(_mdm("cld", hidden=8)).save(str(tmp_path / "checkpoint.pt"))
    assert calls[:2] == ["fsync", "replace"] and calls.count("fsync") >= 1
    assert not (tmp_path / "checkpoint.pt.tmp").exists()


@pytest.mark.parametrize("change", [{"lr": 1e-3}, {"warmup": 5}, {"grad_clip": 0.5}, {"seed": 4},
                                    {"ema_decay": 0.99}, {"lr": 1e-3, "warmup": 5}])
def test_resume_refuses_changed_hyperparameters(toy, tmp_path, change):
    def make(lr=2e-3, warmup=3, grad_clip=1.0, seed=0, ema_decay=0.999):
        return Trainer(_mdm("cld", hidden=8, ema_decay=ema_decay), lr=lr, warmup=warmup, grad_clip=grad_clip,
                       seed=seed)

    make().fit(toy, 2, 16, out_dir=str(tmp_path))
    state = read_checkpoint(str(tmp_path))
    with pytest.raises(ValueError, match="changed hyperparameters") as info:
        make(**change).load_state_dict(state)
    for name in change:
        assert f"{name}=" in str(info.value)
    custom = make()
    custom.optimizer = torch.optim.Adam(custom.mdm.trainable_parameters(), lr=2e-3, betas=(0.8, 0.9))
    with pytest.raises(ValueError, match=r"betas=\(0\.9"):
        custom.load_state_dict(state)
    make().load_state_dict(state)  # the same settings resume


@pytest.mark.parametrize("kwargs,name", [({"eval_every": 0}, "eval_every"), ({"checkpoint_every": 0},
                                         "checkpoint_every"), ({"batch_size": 2.0}, "batch_size"),
                                         ({"steps": -1}, "steps")])
def test_fit_rejects_bad_periods(toy, tmp_path, kwargs, name):
    trainer = Trainer(_mdm("cld", hidden=8))
    with pytest.raises(ValueError, match=f"{name} must be an integer"):
        trainer.fit(toy, **{"steps": 3, "out_dir": str(tmp_path), "eval_data": toy[:8], **kwargs})


def test_model_weights_of_another_dtype_than_the_data(toy):
    mdm = _mdm("cld", hidden=8).double()
    with pytest.raises(TypeError, match="x has dtype torch.float32 but the score model's weights are torch.float64"):
        mdm.loss(toy[:4])
    with pytest.raises(TypeError, match="data has dtype torch.float32"):
        Trainer(mdm).fit(toy, 1, 4)


def test_broken_checkpoints_give_clear_errors(toy, tmp_path):
    trainer = Trainer(_mdm("cld", hidden=8), config={"diffusion": "cld", "network": "mlp", "data_shape": (2,)})
    trainer.save(str(tmp_path / "checkpoint.pt"))
    state = read_checkpoint(str(tmp_path))
    with pytest.raises(ValueError, match=r"config lacks the entries \['network'\]"):
        build_mdm({"diffusion": "cld", "data_shape": (2,)})
    with pytest.raises(ValueError, match=r"lacks the entries \['optimizer'\]"):
        Trainer(_mdm("cld", hidden=8)).load_state_dict({k: v for k, v in state.items() if k != "optimizer"})
    with torch.no_grad():
        trainer.mdm.score_model.out.weight[0, 0] = float("nan")
    trainer.save(str(tmp_path / "checkpoint.pt"))
    with pytest.raises(ValueError, match=r"NaN or infinite weights in \['score_model.out.weight'"):
        load_checkpoint(str(tmp_path))
