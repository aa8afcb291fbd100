"""The training layer: the :class:`MDM` module, its EMA, the training loop and checkpoints.

``MDM`` couples a :class:`~fastmdm.diffusion.LinearDiffusion` (learnable Q and D for
``learned``), a score network model(u, t) and a :class:`~fastmdm.data.DataTransform`
(dequantisation + logit for discrete data). Its losses are per-sample tensors (B,):

* ``dsm`` (default): the negative ELBO of the dequantised data x̃ in nats, −ELBO(y) − ldj,
  with the denoising score-matching integrand and importance-sampled t;
* ``ism``: the same bound with the implicit score-matching integrand;
* ``noise``: ‖ε̂ − ε‖², t uniform (not a bound).

Evaluation and sampling use the exponential moving average of every trainable
weight (network and learned Q, D): θ̄ ← δθ̄ + (1 − δ)θ, δ = min(decay, (1 + n)/(10 + n)).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import torch
from torch import Tensor, nn

from .adapters import resolve_model
from .bpd import bits_per_dim
from .data import DataTransform
from .diffusion import LinearDiffusion, alda, cld, learned, malda, vpsde
from .models import build_network
from .objectives import dsm_elbo, ism_elbo, noise_prediction_loss
from .stages import stage
from .validation import check_finite, check_number

OBJECTIVES = ("dsm", "ism", "noise")
DIFFUSIONS = ("vpsde", "cld", "alda", "malda", "learned")
CHECKPOINT_VERSION = 1
CONFIG_KEYS = ("diffusion", "network", "data_shape")  # what build_mdm cannot default
TRAINER_KEYS = ("model", "optimizer", "scheduler", "step", "batch_generator", "noise_generator", "history")


class EMA(nn.Module):
    """Shadow copies θ̄ of named tensors, updated θ̄ ← δθ̄ + (1 − δ)θ with δ = min(decay, (1+n)/(10+n)).

    The shadows are buffers, so they live in the owner's state_dict and move with ``.to()``.
    """

    def __init__(self, named: dict[str, Tensor], decay: float = 0.999):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.names = list(named)
        for name, value in named.items():
            self.register_buffer(self._key(name), value.detach().clone())
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @staticmethod
    def _key(name: str) -> str:
        return "shadow__" + name.replace(".", "__")

    def shadows(self) -> list[Tensor]:
        return [getattr(self, self._key(name)) for name in self.names]

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, values: list[Tensor]) -> None:
        weight = 1.0 - self.current_decay()
        for shadow, value in zip(self.shadows(), values, strict=True):
            shadow.lerp_(value.detach(), weight)
        self.num_updates += 1


class MDM(nn.Module):
    """A multivariate diffusion model: diffusion + score network (+ data transform), with EMA weights.

    score_model(u, t) maps a state (B, K, *data_shape) and t (B,) to a tensor shaped like u,
    read as ``prediction`` ("eps", "score" or "x0"; default: the model's own, else "eps").
    ``forward(x)`` is ``loss(x)``, so the module can be wrapped in DistributedDataParallel as is.
    """

    def __init__(self, diffusion: LinearDiffusion, score_model: nn.Module, *, prediction: str | None = None,
                 objective: str = "dsm", importance: bool = True, ema_decay: float = 0.999,
                 data_transform: DataTransform | None = None, data_shape=None):
        super().__init__()
        if not isinstance(diffusion, LinearDiffusion):
            raise TypeError(f"diffusion must be a LinearDiffusion, got {type(diffusion).__name__}")
        if not isinstance(score_model, nn.Module):
            raise TypeError(f"score_model must be an nn.Module, got {type(score_model).__name__}")
        prediction = resolve_model(score_model, diffusion, prediction)[1].name
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if objective == "noise" and prediction != "eps":
            raise ValueError(f"objective 'noise' needs prediction='eps', got {prediction!r}")
        net_k = getattr(score_model, "K", diffusion.K)
        if net_k != diffusion.K:
            raise ValueError(f"score_model takes K={net_k} variables but the diffusion has K={diffusion.K}")
        if data_transform is not None and not isinstance(data_transform, DataTransform):
            raise TypeError(f"data_transform must be a DataTransform, got {type(data_transform).__name__}")
        self.diffusion = diffusion
        self.score_model = score_model
        self.prediction, self.objective, self.importance = prediction, objective, bool(importance)
        self.transform = data_transform or DataTransform(None)
        shape = data_shape if data_shape is not None else getattr(score_model, "data_shape", None)
        self.data_shape = tuple(int(s) for s in shape) if shape is not None else None
        self.ema = EMA(dict(self._named_trainable()), ema_decay)

    # -- bookkeeping ----------------------------------------------------------------------
    def _named_trainable(self) -> list[tuple[str, Tensor]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def trainable_parameters(self) -> list[Tensor]:
        """Network weights and, for learned diffusions, the parameters of Q and D."""
        return [p for _, p in self._named_trainable()]

    def header(self) -> dict:
        """What a state_dict must agree on to be loaded into this model."""
        return {"diffusion": self.diffusion.name, "K": self.diffusion.K, "prediction": self.prediction,
                "data_shape": self.data_shape, "levels": self.transform.levels}

    def get_extra_state(self) -> dict:
        return self.header()

    def set_extra_state(self, state) -> None:
        self._check_header(state)

    def _check_header(self, state) -> None:
        if not isinstance(state, dict):
            return
        mine = self.header()
        for key, value in state.items():
            ours = mine.get(key)
            if isinstance(value, list):
                value = tuple(value)
            if key in mine and ours != value:
                raise ValueError(f"checkpoint mismatch: it was saved with {key}={value!r} but this model has "
                                 f"{key}={ours!r}")

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module.load_state_dict after checking diffusion, K, prediction, data shape and levels."""
        self._check_header(state_dict.get("_extra_state"))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @contextlib.contextmanager
    def ema_weights(self, enabled: bool = True):
        """Within the block, the trainable weights hold their EMA; restored on exit."""
        if not enabled:
            yield
            return
        params = self.trainable_parameters()
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, shadow in zip(params, self.ema.shadows(), strict=True):
                p.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, saved in zip(params, backup, strict=True):
                    p.copy_(saved)

    def update_ema(self) -> None:
        """One EMA step toward the current weights (called by the trainer after each optimizer step)."""
        self.ema.update(self.trainable_parameters())

    def check_data(self, x: Tensor, name: str = "x") -> Tensor:
        """Raise unless x is a finite float batch (B, *data_shape) matching the model."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if self.data_shape is not None and tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"{name} must have shape (B, {', '.join(map(str, self.data_shape))}) for this "
                             f"model, got {tuple(x.shape)}")
        if x.dim() < 2 or x.shape[0] < 1:
            raise ValueError(f"{name} must be a non-empty batch (B, *data_shape), got {tuple(x.shape)}")
        weight = next((p for p in self.score_model.parameters() if p.is_floating_point()), None)
        if weight is not None and weight.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but the score model's weights are {weight.dtype}; "
                            f"convert one to the other (x.to(dtype) or model.to(dtype))")
        return check_finite(x, name)

    # -- objectives -----------------------------------------------------------------------
    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.loss(x, generator)

    def loss(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample training loss (B,): −ELBO(x̃) in nats (dsm, ism) or ‖ε̂ − ε‖² (noise)."""
        self.check_data(x)
        y, ldj = self.transform.forward(x, generator)
        if self.objective == "noise":
            return noise_prediction_loss(self.score_model, self.diffusion, y, generator=generator)
        elbo_fn = dsm_elbo if self.objective == "dsm" else ism_elbo
        neg_elbo = elbo_fn(self.score_model, self.diffusion, y, prediction=self.prediction,
                           importance=self.importance, generator=generator)
        return neg_elbo - ldj.to(neg_elbo.dtype)

    @torch.no_grad()
    def elbo(self, x: Tensor, generator: torch.Generator | None = None, repeats: int = 1,
             use_ema: bool = True) -> Tensor:
        """ELBO of the dequantised data, log p(x̃) ≥ ELBO(y) + ldj, in nats per sample (B,).

        DSM integrand with importance-sampled t; averaged over ``repeats`` draws.
        """
        self.check_data(x)
        if not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        with self.ema_weights(use_ema):
            for _ in range(repeats):
                y, ldj = self.transform.forward(x, generator)
                neg = dsm_elbo(self.score_model, self.diffusion, y, prediction=self.prediction,
                               importance=True, generator=generator)
                total += ldj - neg.to(torch.float64)
        return total / repeats

    @torch.no_grad()
    def ode_log_likelihood(self, x: Tensor, generator: torch.Generator | None = None,
                           use_ema: bool = True, **ode_kwargs) -> Tensor:
        """log p(x̃) through the probability-flow ODE (+ ldj), nats per sample (B,), float64."""
        from .likelihood import ode_log_likelihood

        self.check_data(x)
        y, ldj = self.transform.forward(x, generator)
        with self.ema_weights(use_ema):
            logp, _ = ode_log_likelihood(self.score_model, self.diffusion, y, prediction=self.prediction,
                                         generator=generator, **ode_kwargs)
        return logp.to(torch.float64) + ldj

    def bpd(self, x: Tensor, method: str = "elbo", generator: torch.Generator | None = None,
            repeats: int = 1, use_ema: bool = True, **ode_kwargs) -> Tensor:
        """Bits per dim per sample (B,): from the ELBO ("elbo", a bound) or the probability-flow ODE ("ode").

        bpd = −log p(x̃) / (d ln 2) + log₂ n for n-level data (no log₂ n term for continuous data).
        ``ode_kwargs`` go to :func:`fastmdm.likelihood.ode_log_likelihood` (its ``method`` is
        passed as ``ode_method``).
        """
        if method == "elbo":
            if ode_kwargs:
                raise TypeError(f"unexpected arguments for method='elbo': {sorted(ode_kwargs)}")
            logp = self.elbo(x, generator, repeats, use_ema)
        elif method == "ode":
            if "ode_method" in ode_kwargs:
                ode_kwargs["method"] = ode_kwargs.pop("ode_method")
            logp = self.ode_log_likelihood(x, generator, use_ema, **ode_kwargs)
        else:
            raise ValueError(f"method must be 'elbo' or 'ode', got {method!r}")
        return bits_per_dim(-logp, x.shape, 0.0, self.transform.levels)

    @torch.no_grad()
    def sample(self, n: int, steps: int = 50, solver: str | None = None,
               generator: torch.Generator | None = None, use_ema: bool = True, data_shape=None,
               **sampler_kwargs) -> Tensor:
        """n samples in data space (n, *data_shape) through fastmdm.sampling.sample."""
        from .sampling import sample

        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        shape = data_shape if data_shape is not None else self.data_shape
        if shape is None:
            raise ValueError("data_shape is unknown: pass data_shape= to MDM(...) or to sample(...)")
        if solver is not None:
            sampler_kwargs["solver"] = solver
        was_training = self.training
        self.eval()
        try:
            with self.ema_weights(use_ema):
                y = sample(self.score_model, self.diffusion, shape=(n, *shape), steps=steps,
                           prediction=self.prediction, generator=generator, **sampler_kwargs)
        finally:
            self.train(was_training)
        return self.transform.inverse(y)


# -- configurations: build an MDM from a plain dict (what checkpoints store) -------------
def make_diffusion(kind: str, K: int | None = None) -> LinearDiffusion:
    """A diffusion by name; K is the number of variables (checked for the fixed-K ones)."""
    fixed_k = {"vpsde": 1, "cld": 2, "alda": 3}
    if kind not in DIFFUSIONS:
        raise ValueError(f"diffusion must be one of {DIFFUSIONS}, got {kind!r}")
    if kind in fixed_k:
        if K is not None and K != fixed_k[kind]:
            raise ValueError(f"K={K} does not match diffusion {kind!r}, which has K={fixed_k[kind]}")
        return {"vpsde": vpsde, "cld": cld, "alda": alda}[kind]()
    K = 3 if K is None else K
    if not isinstance(K, int) or K < (2 if kind == "malda" else 1):
        raise ValueError(f"K must be an integer >= {2 if kind == 'malda' else 1} for {kind!r}, got {K!r}")
    return malda(K) if kind == "malda" else learned(K)


def build_mdm(config: dict) -> MDM:
    """MDM from a config dict: diffusion, K, network, network_kwargs, data_shape, levels, prediction,
    objective, ema_decay (the dict a checkpoint stores)."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    missing = [key for key in CONFIG_KEYS if key not in config]
    if missing:
        raise ValueError(f"config lacks the entries {missing} (needs {list(CONFIG_KEYS)})")
    diffusion = make_diffusion(config["diffusion"], config.get("K"))
    net = build_network(config["network"], config["data_shape"], diffusion.K,
                        **config.get("network_kwargs", {}))
    return MDM(diffusion, net, prediction=config.get("prediction", "eps"),
               objective=config.get("objective", "dsm"), ema_decay=config.get("ema_decay", 0.999),
               data_transform=DataTransform(config.get("levels")), data_shape=config["data_shape"])


# -- training -------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> MDM:
    inner = getattr(model, "module", model)
    if not isinstance(inner, MDM):
        raise TypeError(f"model must be an MDM or a wrapper (e.g. DistributedDataParallel) around one, "
                        f"got {type(model).__name__}")
    return inner


class _DeferredInterrupt:
    """Within the block, a first Ctrl-C (SIGINT) only sets ``requested``; a second one raises at once.

    Installed in the main thread over Python's default handler only; elsewhere (another thread,
    a handler of the caller's) it changes nothing and ``requested`` stays False.
    """

    def __enter__(self) -> _DeferredInterrupt:
        self.requested, self._previous = False, None
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, exc_type, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        if self.requested and exc_type is None:  # a Ctrl-C after the last check is not lost
            raise KeyboardInterrupt


class Trainer:
    """Optimisation of an MDM: warm-up, gradient clipping, EMA, checkpoints with exact resume.

    ``model`` is an MDM or a DistributedDataParallel around one; ``optimizer`` any
    torch optimizer over its parameters (default Adam with ``lr``). The learning rate is
    multiplied by min(1, (n + 1)/warmup) at step n. All randomness (batches, t, noise,
    dequantisation) comes from generators seeded by ``seed`` and saved in checkpoints.
    A checkpoint resumes only into a Trainer with the same :meth:`hyperparameters`.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 lr: float = 2e-4, warmup: int = 100, grad_clip: float | None = 1.0, seed: int = 0,
                 config: dict | None = None):
        self.model, self.mdm = model, _unwrap(model)
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be a positive integer (steps), got {warmup!r}")
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip must be None or > 0, got {grad_clip}")
        check_number(lr, "lr", 0.0, low_open=True)
        self.optimizer = optimizer or torch.optim.Adam(self.mdm.trainable_parameters(), lr=lr)
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(self.optimizer).__name__}")
        self.warmup, self.grad_clip, self.seed = warmup, grad_clip, seed
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda n: min(1.0, (n + 1) / warmup))
        device = next(self.mdm.parameters()).device
        self.batch_generator = torch.Generator().manual_seed(seed)
        self.noise_generator = torch.Generator(device=device).manual_seed(seed + 1)
        self.step_count = 0
        self.history: dict[str, list] = {"step": [], "loss": [], "eval_step": [], "eval_bpd": []}
        self.config = dict(config or {})

    def hyperparameters(self) -> dict:
        """The settings a checkpoint records and a resumed run must repeat: optimizer and its
        per-group settings, base learning rates, warm-up, gradient clipping, EMA decay, seed."""
        settings = {"optimizer": type(self.optimizer).__name__, "lr": list(self.scheduler.base_lrs),
                    "warmup": self.warmup, "grad_clip": self.grad_clip, "ema_decay": self.mdm.ema.decay,
                    "seed": self.seed}
        for i, group in enumerate(self.optimizer.param_groups):
            for key, value in group.items():
                if key not in ("params", "lr", "initial_lr"):
                    settings[f"param_groups[{i}].{key}"] = value
        return settings

    def train_step(self, x: Tensor) -> float:
        """loss = mean over the batch; backward; clip; optimizer and warm-up steps; EMA update."""
        self.mdm.train()
        with stage("train.loss"):
            loss = self.model(x, generator=self.noise_generator).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.step_count}; lower the learning "
                                     "rate or check the data")
        self.optimizer.zero_grad(set_to_none=True)
        with stage("train.backward"):
            loss.backward()
        with stage("train.optimizer"):
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.mdm.trainable_parameters(), self.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.mdm.update_ema()
        self.step_count += 1
        return loss.item()

    def batch(self, data: Tensor, batch_size: int) -> Tensor:
        """A batch drawn uniformly with replacement from the batch generator."""
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=self.batch_generator)
        return data[idx.to(data.device)]

    def fit(self, data: Tensor, steps: int, batch_size: int = 128, *, out_dir: str | None = None,
            checkpoint_every: int = 500, eval_data: Tensor | None = None, eval_every: int = 250,
            callback=None) -> dict:
        """Train until ``steps`` total steps (continuing from step_count), checkpointing to out_dir.

        eval_data (if given) is scored every ``eval_every`` steps by the EMA ELBO in bits per dim;
        callback(trainer, loss) runs after every step. Ctrl-C (SIGINT, in the main thread) lets
        the step in progress finish, checkpoints it, then raises KeyboardInterrupt; a second
        Ctrl-C raises at once and keeps the last checkpoint. Either way the checkpoint resumes
        bit-identically. Returns the history.
        """
        for name, value, low in (("steps", steps, 0), ("batch_size", batch_size, 1),
                                 ("checkpoint_every", checkpoint_every, 1), ("eval_every", eval_every, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.mdm.check_data(data, "data")
        if eval_data is not None:
            self.mdm.check_data(eval_data, "eval_data")
        path = checkpoint_path(out_dir) if out_dir else None
        saved_step = None
        at_boundary = True  # every piece of state belongs to the same completed step
        try:
            with _DeferredInterrupt() as interrupt:
                while self.step_count < steps:
                    at_boundary = False
                    loss = self._step(data, steps, batch_size, eval_data, eval_every)
                    if path and (self.step_count % checkpoint_every == 0 or self.step_count == steps):
                        self.save(path)
                        saved_step = self.step_count
                    at_boundary = True
                    if callback is not None:
                        callback(self, loss)
                    if interrupt.requested:
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            if path and at_boundary and saved_step != self.step_count:
                self.save(path)
            raise
        return self.history

    def _step(self, data, steps, batch_size, eval_data, eval_every) -> float:
        """One optimisation step, its history entries and, when due, its evaluation."""
        loss = self.train_step(self.batch(data, batch_size))
        self.history["step"].append(self.step_count)
        self.history["loss"].append(loss)
        if eval_data is not None and (self.step_count % eval_every == 0 or self.step_count == steps):
            self.history["eval_step"].append(self.step_count)
            self.history["eval_bpd"].append(self.evaluate(eval_data))
        return loss

    def evaluate(self, x: Tensor) -> float:
        """Mean EMA ELBO bits per dim of x, with a fixed seed so evaluations are comparable."""
        generator = torch.Generator(device=x.device).manual_seed(12345)
        return self.mdm.bpd(x, generator=generator).mean().item()

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"version": CHECKPOINT_VERSION, "config": self.config, "model": self.mdm.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "step": self.step_count, "batch_generator": self.batch_generator.get_state(),
                "noise_generator": self.noise_generator.get_state(), "history": self.history,
                "hyperparameters": self.hyperparameters()}

    def load_state_dict(self, state: dict) -> None:
        """Restore model, EMA, optimizer, schedule, step, history and random state exactly.

        Raises ValueError, naming them, if the checkpoint's hyperparameters differ from this
        Trainer's: a resumed run continues the same run, it does not change its settings.
        """
        missing = [key for key in TRAINER_KEYS if key not in state]
        if missing:
            raise ValueError(f"the checkpoint lacks the entries {missing}; it cannot resume training")
        self._check_hyperparameters(state.get("hyperparameters", {}))
        self.mdm.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step_count = int(state["step"])
        self.batch_generator.set_state(state["batch_generator"])
        self.noise_generator.set_state(state["noise_generator"])
        self.history = {k: list(v) for k, v in state["history"].items()}

    def _check_hyperparameters(self, saved: dict) -> None:
        mine = self.hyperparameters()
        changed = [key for key in saved if key in mine and _plain(saved[key]) != _plain(mine[key])]
        if changed:
            was = ", ".join(f"{key}={saved[key]!r}" for key in changed)
            now = ", ".join(f"{key}={mine[key]!r}" for key in changed)
            raise ValueError(f"cannot resume with changed hyperparameters: the checkpoint was trained with "
                             f"{was}, this run asks for {now}; use the same settings or start a new run")

    def save(self, path: str) -> None:
        """Write the checkpoint atomically: a temporary file, flushed to disk, renamed over ``path``;
        then the directory is flushed so the rename itself survives a crash."""
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            torch.save(self.state_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if hasattr(os, "O_DIRECTORY"):  # POSIX: a directory can be opened and synced
            fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _plain(value):
    """Tuples as lists and tensors as Python values, so recorded settings compare by value."""
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def checkpoint_path(out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    return os.path.join(out_dir, "checkpoint.pt")


def read_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a fastmdm checkpoint dict, with a clear error for a missing or unreadable file."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for corrupt files
        raise ValueError(f"cannot read checkpoint {path!r} (corrupt or not a fastmdm checkpoint): "
                         f"{err}") from err
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{path!r} is not a fastmdm checkpoint (no 'model'/'config' entries)")
    bad = [name for name, value in state["model"].items()
           if isinstance(value, Tensor) and value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise ValueError(f"checkpoint {path!r} has NaN or infinite weights in {bad}; resume from an earlier "
                         "checkpoint or retrain with a lower learning rate")
    return state


def load_checkpoint(path: str, map_location="cpu") -> tuple[MDM, dict]:
    """(MDM with the checkpoint's weights and EMA, the checkpoint dict)."""
    state = read_checkpoint(path, map_location)
    mdm = build_mdm(state["config"])
    mdm.load_state_dict(state["model"])
    return mdm.to(map_location), state


__all__ = ["DIFFUSIONS", "EMA", "MDM", "OBJECTIVES", "Trainer", "build_mdm",
           "load_checkpoint", "make_diffusion", "read_checkpoint"]
