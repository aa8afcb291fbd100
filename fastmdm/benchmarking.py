"""Benchmark suite: every fastmdm fast path against fastmdm.reference and the plain torch path.

One registry (:data:`CASES`) holds every case; each builds, for a size (B, K, d) on a
device, the callables compared in the same run:

* ``fast``      -- what fastmdm runs by default on the device (Triton on CUDA, torch on CPU);
* ``torch``     -- the same fastmdm call with the backend forced to "torch" (only measured
                   where it differs from ``fast``);
* ``compile``   -- ``torch.compile`` of that torch path (optional, time-bounded);
* ``reference`` -- :mod:`fastmdm.reference`, the plain published-style baseline.

Timing: one warm-up call each, then ``n`` rounds in which every implementation takes one
sample of ``number`` back-to-back calls (CUDA: between CUDA events, then synchronised;
CPU: ``time.perf_counter``); a row reports the median and the inter-quartile range of the
per-call time. Every ratio is a quotient of two medians measured in the same run, with
the implementations' samples interleaved. Memory-bound rows also report
the achieved bandwidth floor_bytes / median against the device's copy bandwidth
measured in the same run (2 · bytes / time of ``dst.copy_(src)``).

:func:`run_bench` runs a preset, prints the ratio table and writes
``bench-<date>-<device>-<preset>.json`` plus a Markdown report; :func:`validate_report`
checks the JSON schema.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from . import reference
from .backend import get_backend, set_backend, use_triton
from .ops import apply_kk

PRESETS = ("tiny", "quick", "full")
IMPLS = ("fast", "torch", "compile", "reference")
STATUSES = ("ok", "skipped", "failed", "n/a")
SCHEMA_VERSION = 1
# Times are drawn from [T_LOW, 1]: below t ≈ 0.05 the float32 reference's Cholesky fails for
# ALDA (mdm-math.md §2), and the timings do not depend on t.
T_LOW = 0.1
CONTENTION_NOTE = (
    "Times are wall-clock on a possibly shared machine; contention inflates medians, but every "
    "ratio divides two medians of the same run whose samples were taken in alternation."
)


class CaseSkipped(Exception):
    """A case cannot run here (a module it needs is missing); the reason goes in the report."""


@dataclasses.dataclass(frozen=True)
class Size:
    """Problem size of one benchmark row: batch B, variables K, data dim d, case extras."""

    B: int
    K: int
    d: int
    extra: tuple[tuple[str, int], ...] = ()

    def get(self, name: str) -> int:
        return dict(self.extra)[name]

    def label(self) -> str:
        return " ".join([f"B={self.B}", f"K={self.K}", f"d={self.d}"] + [f"{k}={v}" for k, v in self.extra])


@dataclasses.dataclass
class Workload:
    """The callables one case compares; each runs the whole operation on prepared inputs.

    ``torch_path`` is the fastmdm call (under backend "torch" it takes the torch path);
    ``fast`` a different fastmdm entry point for the fused path when there is one;
    ``floor_bytes`` the least memory traffic of the operation (memory-bound cases).
    """

    torch_path: Callable[[], object]
    reference: Callable[[], object]
    fast: Callable[[], object] | None = None
    floor_bytes: int | None = None
    note: str | None = None


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    description: str
    build: Callable[[Size, torch.device, torch.dtype], Workload]
    memory_bound: bool = False


@dataclasses.dataclass(frozen=True)
class Timing:
    """Per-call time: median and inter-quartile range over n samples of ``number`` calls."""

    median_s: float
    iqr_s: float
    n: int
    number: int
    warmup_s: float = 0.0  # the first call (with any compilation)


# -- shared inputs ----------------------------------------------------------------------------
def bench_diffusion(K: int, device: torch.device):
    """The built-in diffusion with K variables (VP-SDE, CLD, ALDA, MALDA-K), t ∈ [T_LOW, 1]."""
    from . import diffusion as dmod

    if K == 1:
        diff = dmod.vpsde(t_min=T_LOW)
    elif K == 2:
        diff = dmod.cld(t_min=T_LOW)
    elif K == 3:
        diff = dmod.alda(t_min=T_LOW)
    else:
        diff = dmod.malda(K, t_min=T_LOW)
    return diff.to(device)


def _generator(device: torch.device, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _times(B: int, device: torch.device, seed: int = 1) -> torch.Tensor:
    """B float64 times uniform on [T_LOW, 1] (fixed seed)."""
    g = _generator(device, seed)
    return T_LOW + (1.0 - T_LOW) * torch.rand(B, dtype=torch.float64, device=device, generator=g)


def _randn(shape, dtype, device, seed: int) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, device=device, generator=_generator(device, seed))


def _reference_args(diff, dtype) -> dict:
    """Keyword arguments that make a fastmdm.reference call use ``diff``'s process."""
    return dict(beta_min=diff.beta_min, beta_max=diff.beta_max, init_aux_var=diff.init_aux_var,
                stationary_var=diff.stationary_var.to(dtype), dtype=dtype)


def _matrices(diff, dtype):
    return diff.Q.detach().to(dtype), diff.D.detach().to(dtype)


def _require(module: str, attr: str | None = None):
    """Import fastmdm.<module> (and an attribute) or raise CaseSkipped saying what is missing."""
    try:
        mod = importlib.import_module(f"fastmdm.{module}")
    except ImportError as err:
        raise CaseSkipped(f"fastmdm.{module} is not available ({err})") from None
    if attr is None:
        return mod
    if not hasattr(mod, attr):
        raise CaseSkipped(f"fastmdm.{module}.{attr} is not available")
    return getattr(mod, attr)


def _network(size: Size, device, dtype, hidden: int = 128):
    MLPScore = _require("models", "MLPScore")
    torch.manual_seed(0)
    return MLPScore((size.d,), size.K, hidden=hidden, layers=2).to(device=device, dtype=dtype)


# -- the cases --------------------------------------------------------------------------------
def _build_transition(size: Size, device, dtype) -> Workload:
    diff = bench_diffusion(size.K, device)
    t64 = _times(size.B, device)
    Q, D = _matrices(diff, dtype)
    t_ref, ref_args = t64.to(dtype), _reference_args(diff, dtype)
    return Workload(
        torch_path=lambda: diff.transition_f64(t64, "hybrid"),
        reference=lambda: reference.transition(Q, D, t_ref, "hybrid", **ref_args),
        floor_bytes=size.B * 8 * (1 + 4 * size.K * size.K),  # read τ, write M, Σ, L, L⁻ᵀ (float64)
    )


def _build_perturb(size: Size, device, dtype) -> Workload:
    diff = bench_diffusion(size.K, device)
    t64 = _times(size.B, device)
    x0 = _randn((size.B, size.d), dtype, device, seed=2)
    Q, D = _matrices(diff, dtype)
    t_ref, ref_args = t64.to(dtype), _reference_args(diff, dtype)
    item = torch.finfo(dtype).bits // 8
    return Workload(
        torch_path=lambda: diff.perturb(x0, t64),
        reference=lambda: reference.perturb(Q, D, x0, t_ref, "hybrid", **ref_args),
        # read x0 and t, write u_t and the ε that perturb returns
        floor_bytes=size.B * (item * size.d * (1 + 2 * size.K) + 8),
    )


def _build_perturb_data(size: Size, device, dtype) -> Workload:
    """The data pass of the perturbation given the coefficients: u_t = a x0 + L ε, ε drawn.

    Fast on CUDA: the seeded Triton kernel (ε drawn in registers, never stored); torch path:
    randn + rank-one mean + batched K×K product; reference: the published randn + einsum.
    """
    diff = bench_diffusion(size.K, device)
    tk = diff.transition_f64(_times(size.B, device), "hybrid")
    x0 = _randn((size.B, size.d), dtype, device, seed=2)
    a, L = tk.mean_coef[:, :, 0].to(dtype), tk.chol.to(dtype)
    shape = (size.B, size.K, size.d)
    item = torch.finfo(dtype).bits // 8
    fast = None
    if use_triton(device):
        from .kernels import NoiseSeed, perturb

        def fast():
            return perturb(x0, tk.mean_coef[:, :, 0], tk.chol, seed=NoiseSeed(1234))

    def torch_path():
        return diff.mean(x0, tk) + apply_kk(tk.chol, torch.randn(shape, dtype=dtype, device=device))

    def published():
        eps = torch.randn(shape, dtype=dtype, device=device)
        return a[:, :, None] * x0[:, None] + torch.einsum("bkl,bld->bkd", L, eps)

    return Workload(torch_path=torch_path, reference=published, fast=fast,
                    floor_bytes=size.B * item * size.d * (1 + size.K))  # read x0, write u_t


def _build_dsm_loss(size: Size, device, dtype) -> Workload:
    weighted_dsm = _require("dsm", "weighted_dsm")
    from .objectives import dsm_weight

    diff = bench_diffusion(size.K, device)
    t64 = _times(size.B, device)
    eps_hat = _randn((size.B, size.K, size.d), dtype, device, seed=3)
    eps = _randn((size.B, size.K, size.d), dtype, device, seed=4)
    Q, D = _matrices(diff, dtype)
    t_ref, ref_args = t64.to(dtype), _reference_args(diff, dtype)
    item = torch.finfo(dtype).bits // 8
    return Workload(
        torch_path=lambda: weighted_dsm(eps_hat, eps, dsm_weight(diff, t64, diff.transition_f64(t64))),
        reference=lambda: reference.dsm_loss_weighted(eps_hat, eps, t_ref, Q, D, "hybrid", **ref_args),
        floor_bytes=size.B * (2 * item * size.K * size.d + 8 + item),  # read ε̂, ε, t; write (B,)
    )


def _build_hutchinson(size: Size, device, dtype) -> Workload:
    from .divergence import hutchinson_divergence

    net = _network(size, device, dtype)
    t = _times(size.B, device).to(dtype)
    u = _randn((size.B, size.K, size.d), dtype, device, seed=5)
    probes = size.get("probes")

    def fn(x):
        return net(x, t)

    return Workload(
        torch_path=lambda: hutchinson_divergence(fn, u, probes=probes),
        reference=lambda: reference.hutchinson_divergence(fn, u, probes=probes),
    )


def _build_train_step(size: Size, device, dtype) -> Workload:
    """One optimiser step of the noise-prediction loss: fastmdm.MDM vs the reference loss."""
    MDM = _require("training", "MDM")
    diff = bench_diffusion(size.K, device)
    x0 = _randn((size.B, size.d), dtype, device, seed=6)
    Q, D = _matrices(diff, dtype)
    ref_args = _reference_args(diff, dtype)
    mdm = MDM(diff, _network(size, device, dtype), objective="noise")
    ref_net = _network(size, device, dtype)
    fast_opt = torch.optim.Adam(mdm.trainable_parameters(), lr=1e-4)
    ref_opt = torch.optim.Adam(ref_net.parameters(), lr=1e-4)

    def step(optimizer, loss_fn):
        optimizer.zero_grad(set_to_none=True)
        loss_fn().mean().backward()
        optimizer.step()

    return Workload(
        torch_path=lambda: step(fast_opt, lambda: mdm.loss(x0)),
        reference=lambda: step(ref_opt, lambda: reference.noise_prediction_loss(
            ref_net, Q, D, x0, t_min=diff.t_min, T=diff.T, **ref_args)),
    )


EULER_MARUYAMA_NAMES = ("euler-maruyama", "em", "euler_maruyama", "sde-euler")


def _build_sampling(size: Size, device, dtype) -> Workload:
    """A sampling run of ``steps`` network evaluations from the prior (steps = 1: one step).

    fastmdm.sample with its Euler–Maruyama solver when it has one (the reference's
    algorithm), else its default solver at the same number of steps.
    """
    sample = _require("sampling", "sample")
    if dtype != torch.get_default_dtype():
        raise CaseSkipped(f"fastmdm.sample draws the prior in torch's default dtype, not {dtype}")
    solvers = tuple(getattr(_require("sampling"), "SOLVERS", ()))
    solver = next((name for name in EULER_MARUYAMA_NAMES if name in solvers), None)
    diff = bench_diffusion(size.K, device)
    net = _network(size, device, dtype)
    Q, D = _matrices(diff, dtype)
    ref_args = _reference_args(diff, dtype)
    steps, shape = size.get("steps"), (size.B, size.d)
    solver_args = {} if solver is None else {"solver": solver}

    @torch.no_grad()
    def fast():
        return sample(net, diff, shape=shape, steps=steps, **solver_args)

    @torch.no_grad()
    def ref():
        return reference.euler_maruyama_sample(net, Q, D, shape, steps=steps, t_min=diff.t_min,
                                               T=diff.T, **ref_args)

    return Workload(torch_path=fast, reference=ref,
                    note=f"fastmdm solver: {solver or 'default'}; reference: Euler–Maruyama")


CASES: dict[str, Case] = {
    case.name: case
    for case in (
        Case("transition", "transition coefficients (M, Σ, L, L⁻ᵀ) for B times", _build_transition),
        Case("perturb", "u_t = M_t x0 + L_t ε (hybrid start), returns (u_t, ε)", _build_perturb,
             memory_bound=True),
        Case("perturb_data", "u_t = a x0 + L ε given the coefficients (ε not stored when fused)",
             _build_perturb_data, memory_bound=True),
        Case("dsm_loss", "weighted DSM ½ Σ_j (ε̂−ε)ᵀ W_t (ε̂−ε), W_t from t", _build_dsm_loss,
             memory_bound=True),
        Case("hutchinson", "Hutchinson divergence of an MLP, `probes` Rademacher probes",
             _build_hutchinson),
        Case("sampler_step", "one sampler step from the prior (MLP, eps prediction)", _build_sampling),
        Case("sample_run", "a whole sampling run of `steps` network evaluations", _build_sampling),
        Case("train_step", "zero_grad + noise-prediction loss + backward + Adam step (MLP)",
             _build_train_step),
    )
}


# -- presets ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Preset:
    """Sizes per case and the time allowed to each measurement and to torch.compile."""

    name: str
    sizes: dict[str, tuple[Size, ...]]
    budget_s: float  # time spent sampling one (case, size, impl)
    min_samples: int
    max_samples: int
    compile: bool
    compile_budget_s: float  # total compile time after which compile rows become "n/a"
    copy_bytes: int
    compile_cases: tuple[str, ...] | None = None  # cases with a compile column (None: all)


def _grid(Bs, Ks, ds, **extra) -> tuple[Size, ...]:
    ext = tuple(sorted(extra.items()))
    return tuple(Size(B, K, d, ext) for B in Bs for K in Ks for d in ds)


PRESET_CONFIGS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        sizes={
            "transition": _grid([4], [2], [1]),
            "perturb": _grid([4], [2], [3]),
            "perturb_data": _grid([4], [2], [3]),
            "dsm_loss": _grid([4], [2], [3]),
            "hutchinson": _grid([4], [2], [3], probes=2),
            "sampler_step": _grid([4], [2], [3], steps=1),
            "sample_run": _grid([4], [2], [3], steps=2),
            "train_step": _grid([4], [2], [3]),
        },
        budget_s=0.01, min_samples=3, max_samples=5, compile=False, compile_budget_s=0.0,
        copy_bytes=1 << 20,
    ),
    "quick": Preset(
        name="quick",
        sizes={
            "transition": _grid([512], [2, 3, 6], [1]),
            "perturb": _grid([512], [3], [2, 784]),
            "perturb_data": _grid([512], [3], [784, 3072]),
            "dsm_loss": _grid([512], [3], [2, 784]),
            "hutchinson": _grid([128], [3], [2], probes=8) + _grid([64], [3], [784], probes=4),
            "sampler_step": _grid([512], [3], [2, 784], steps=1),
            "sample_run": _grid([128], [3], [2], steps=20),
            "train_step": _grid([256], [3], [2, 784]),
        },
        budget_s=1.0, min_samples=7, max_samples=200, compile=True, compile_budget_s=100.0,
        copy_bytes=64 << 20, compile_cases=("perturb_data",),
    ),
    "full": Preset(
        name="full",
        sizes={
            "transition": _grid([64, 512, 4096], [1, 2, 3, 6], [1]),
            "perturb": _grid([64, 512, 4096], [1, 2, 3, 6], [2, 784, 3072]) + _grid([128], [2, 3], [3072]),
            "perturb_data": _grid([64, 512, 4096], [1, 2, 3, 6], [2, 784, 3072]),
            "dsm_loss": _grid([64, 512, 4096], [1, 2, 3, 6], [2, 784, 3072]),
            "hutchinson": _grid([64, 512], [3], [2, 784], probes=8),
            "sampler_step": _grid([512, 4096], [2, 3], [2, 784, 3072], steps=1),
            "sample_run": _grid([512], [2, 3], [2, 784], steps=100),
            "train_step": _grid([512], [3], [2, 784, 3072]),
        },
        budget_s=1.0, min_samples=10, max_samples=500, compile=True, compile_budget_s=1200.0,
        copy_bytes=256 << 20, compile_cases=("transition", "perturb", "perturb_data", "dsm_loss"),
    ),
}


def iter_cases(preset: str) -> Iterator[tuple[Case, Size]]:
    """Every (case, size) of a preset, in registry order (cases absent from CASES are skipped)."""
    config = _preset(preset)
    for name, case in CASES.items():
        for size in config.sizes.get(name, ()):
            yield case, size


def _preset(preset: str) -> Preset:
    if preset not in PRESET_CONFIGS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    return PRESET_CONFIGS[preset]


# -- timing -----------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_calls(fn: Callable[[], object], number: int, device: torch.device) -> float:
    """Seconds for ``number`` back-to-back calls (CUDA events on CUDA, perf_counter elsewhere)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    for _ in range(number):
        fn()
    return time.perf_counter() - begin


def _warm_up(fn: Callable[[], object], device: torch.device, budget_s: float) -> tuple[float, float]:
    """Call once (lazy initialisation, allocator, compilation); returns (warm-up s, call estimate s)."""
    _sync(device)
    begin = time.perf_counter()
    fn()
    _sync(device)
    warmup = time.perf_counter() - begin
    estimate = _time_calls(fn, 1, device) if warmup < budget_s else warmup  # a second, warm call
    return warmup, estimate


def measure_interleaved(fns: dict[str, Callable[[], object]], device, *, budget_s: float = 0.5,
                        min_samples: int = 5, max_samples: int = 200,
                        min_sample_s: float = 1e-3) -> dict[str, Timing | Exception]:
    """Time several implementations in alternation: one sample of each per round.

    Each is warmed up, then ``number`` calls per sample make one sample last at least
    ``min_sample_s``; n rounds fill ``budget_s`` per implementation within [min_samples,
    max_samples]. Interleaving spreads any slowdown of a shared machine over every
    implementation alike, so the ratios of the medians stay fair. An implementation that
    raises gets its exception instead of a Timing.
    """
    if min_samples < 2:
        raise ValueError(f"min_samples must be >= 2 (an IQR needs two samples), got {min_samples}")
    device = torch.device(device)
    results: dict[str, Timing | Exception | None] = dict.fromkeys(fns)
    plans: dict[str, tuple[Callable, int, float]] = {}  # name -> (fn, calls per sample, warm-up s)
    round_s = 0.0  # estimated length of one round of samples
    for name, fn in fns.items():
        try:
            warmup, estimate = _warm_up(fn, device, budget_s)
        except Exception as err:  # noqa: BLE001 -- reported per implementation
            results[name] = err
            continue
        number = max(1, math.ceil(min_sample_s / max(estimate, 1e-9)))
        plans[name] = (fn, number, warmup)
        round_s += number * estimate
    n = int(min(max_samples, max(min_samples, budget_s * len(plans) // max(round_s, 1e-12))))
    samples: dict[str, list[float]] = {name: [] for name in plans}
    for _ in range(n if plans else 0):
        for name, (fn, number, _) in plans.items():
            if results[name] is None:
                try:
                    samples[name].append(_time_calls(fn, number, device) / number)
                except Exception as err:  # noqa: BLE001 -- reported per implementation
                    results[name] = err
    for name, (_, number, warmup) in plans.items():
        if results[name] is None:
            q1, _, q3 = statistics.quantiles(samples[name], n=4, method="inclusive")
            results[name] = Timing(median_s=statistics.median(samples[name]), iqr_s=q3 - q1, n=n,
                                   number=number, warmup_s=warmup)
    return results


def measure(fn: Callable[[], object], device, **options) -> Timing:
    """Median and IQR of the per-call time of one function (see :func:`measure_interleaved`)."""
    result = measure_interleaved({"fn": fn}, device, **options)["fn"]
    if isinstance(result, Exception):
        raise result
    return result


def copy_bandwidth(device, nbytes: int = 64 << 20, budget_s: float = 0.5) -> float:
    """Measured device copy bandwidth in GB/s: 2 · nbytes / median time of dst.copy_(src)."""
    device = torch.device(device)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device, budget_s=budget_s, min_samples=5)
    return 2 * src.numel() * 4 / timing.median_s / 1e9


@contextlib.contextmanager
def forced_backend(name: str):
    """Run the block with fastmdm's backend set to ``name``, then restore the previous one."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _under_backend(fn: Callable[[], object], name: str) -> Callable[[], object]:
    def call():
        with forced_backend(name):
            return fn()

    return call


@contextlib.contextmanager
def _quiet_dynamo():
    """Silence dynamo's graph-break and inductor's deprecation warnings (the column is "where it works")."""
    logger = logging.getLogger("torch._dynamo")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecations inside inductor
            yield
    finally:
        logger.setLevel(level)


def _compiled(fn: Callable[[], object]) -> Callable[[], object]:
    """torch.compile of the torch path, built on the first call (which then also compiles).

    Dynamo's caches are reset first so that no recompile limit is hit across sizes; the
    first call's duration (compilation included, even if it fails) is ``call.first_call_s``.
    """
    compiled = None

    def call():
        nonlocal compiled
        first = compiled is None
        begin = time.perf_counter()
        try:
            if first:
                torch._dynamo.reset()
                compiled = torch.compile(fn)
            with forced_backend("torch"), _quiet_dynamo():
                return compiled()
        finally:
            if first:
                call.first_call_s = time.perf_counter() - begin

    call.first_call_s = 0.0
    return call


def implementations(workload: Workload, device, compile: bool = False) -> dict[str, Callable]:
    """The callables to time, by impl name; "torch" only where the fast path is not the torch path."""
    device = torch.device(device)
    impls = {"fast": workload.fast or workload.torch_path}
    if use_triton(device):
        impls["torch"] = _under_backend(workload.torch_path, "torch")
    if compile:
        impls["compile"] = _compiled(workload.torch_path)
    impls["reference"] = workload.reference
    return impls


# -- the suite --------------------------------------------------------------------------------
def _row(case: Case, size: Size, impl: str, device, dtype, status: str, timing: Timing | None = None,
         reason: str | None = None, floor_bytes: int | None = None,
         copy_gbps: float | None = None) -> dict:
    row = {"case": case.name, "impl": impl, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
           "B": size.B, "K": size.K, "d": size.d, "extra": dict(size.extra), "status": status,
           "median_s": None, "iqr_s": None, "n": 0, "number": 0, "memory_bound": case.memory_bound}
    if reason is not None:
        row["reason"] = reason
    if timing is not None:
        row.update(median_s=timing.median_s, iqr_s=timing.iqr_s, n=timing.n, number=timing.number,
                   warmup_s=timing.warmup_s)
        if floor_bytes is not None:
            row["floor_bytes"] = floor_bytes
            row["gbps"] = floor_bytes / timing.median_s / 1e9
            if copy_gbps:
                row["fraction_of_copy"] = row["gbps"] / copy_gbps
    return row


def _reason(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return text[:300]


def params_key(row: dict) -> tuple:
    return (row["case"], row["B"], row["K"], row["d"], tuple(sorted(row["extra"].items())), row["dtype"])


def compute_ratios(rows: list[dict]) -> list[dict]:
    """fast / other median-time ratios (< 1: fast is quicker) per case and size, same run only."""
    groups: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        groups.setdefault(params_key(row), {})[row["impl"]] = row
    ratios = []
    for key, by_impl in groups.items():
        fast = by_impl.get("fast")
        if fast is None or fast["status"] != "ok":
            continue
        entry = {"case": key[0], "params": {"B": key[1], "K": key[2], "d": key[3], **dict(key[4])},
                 "dtype": key[5]}
        for impl in ("reference", "torch", "compile"):
            other = by_impl.get(impl)
            ok = other is not None and other["status"] == "ok"
            entry[f"fast_over_{impl}"] = fast["median_s"] / other["median_s"] if ok else None
        ratios.append(entry)
    return ratios


def _case_rows(case: Case, size: Size, device, dtype, config: Preset, compile: bool,
               copy_gbps: float, compile_clock: list[float], log: Callable[[str], None]) -> list[dict]:
    """Rows of one (case, size): every implementation timed, or the reason it was not.

    ``compile_clock`` holds the compile seconds spent so far in the run (updated here).
    """
    compile_here = compile and (config.compile_cases is None or case.name in config.compile_cases)
    try:
        workload = case.build(size, device, dtype)
        impls = implementations(workload, device, compile=compile_here)
    except Exception as err:  # noqa: BLE001 -- a missing module or broken case becomes a row, not a crash
        status = "skipped" if isinstance(err, CaseSkipped) else "failed"
        reason = str(err) if status == "skipped" else _reason(err)
        log(f"{case.name:<13} {size.label():<28} {status}: {reason}")
        return [_row(case, size, "fast", device, dtype, status, reason=reason)]
    rows = []
    if compile and not compile_here:
        rows.append(_row(case, size, "compile", device, dtype, "n/a",
                         reason=f"the {config.name} preset compiles only {', '.join(config.compile_cases)}"))
    if "compile" in impls and compile_clock[0] >= config.compile_budget_s:
        del impls["compile"]
        rows.append(_row(case, size, "compile", device, dtype, "n/a",
                         reason=f"compile budget of {config.compile_budget_s:.0f} s spent"))
    results = measure_interleaved(impls, device, budget_s=config.budget_s, min_samples=config.min_samples,
                                  max_samples=config.max_samples)
    if "compile" in impls:
        torch._dynamo.reset()
        compile_clock[0] += impls["compile"].first_call_s
    for impl, result in results.items():
        if isinstance(result, Timing):
            row = _row(case, size, impl, device, dtype, "ok", result, floor_bytes=workload.floor_bytes,
                       copy_gbps=copy_gbps)
        else:
            row = _row(case, size, impl, device, dtype, "n/a" if impl == "compile" else "failed",
                       reason=_reason(result))
        if workload.note:
            row["note"] = workload.note
        rows.append(row)
        shown = f"{row['median_s'] * 1e3:10.3f} ms" if row["status"] == "ok" else row["status"]
        log(f"{case.name:<13} {size.label():<28} {impl:<9} {shown} {row.get('reason', '')}")
    return rows


def run_suite(preset: str = "quick", device=None, *, dtype: torch.dtype = torch.float32,
              compile: bool | None = None, cases: list[str] | None = None,
              log: Callable[[str], None] | None = print) -> dict:
    """Measure every case of ``preset`` on ``device``; returns the report (see validate_report)."""
    config = _preset(preset)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but torch.cuda.is_available() is False")
    if cases is not None:
        unknown = sorted(set(cases) - set(CASES))
        if unknown:
            raise ValueError(f"cases must be among {sorted(CASES)}, got unknown {unknown}")
    compile = config.compile if compile is None else compile
    log = log or (lambda _msg: None)
    started = time.perf_counter()
    # On a GPU the copy must be far larger than L2 to measure DRAM bandwidth.
    copy_gbps = copy_bandwidth(device, config.copy_bytes if device.type == "cpu" else 1 << 30)
    log(f"copy bandwidth on {device}: {copy_gbps:.1f} GB/s")
    rows, compile_clock = [], [0.0]
    for case, size in iter_cases(preset):
        if cases is None or case.name in cases:
            rows += _case_rows(case, size, device, dtype, config, compile, copy_gbps, compile_clock, log)
    return {
        "schema_version": SCHEMA_VERSION,
        "metadata": _metadata(preset, device, dtype, compile, config, copy_gbps,
                              time.perf_counter() - started),
        "rows": rows,
        "ratios": compute_ratios(rows),
    }


# -- metadata ---------------------------------------------------------------------------------
def _versions() -> dict:
    from . import __version__

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 -- triton is optional off Linux
        triton_version = None
    try:
        import numpy

        numpy_version = numpy.__version__
    except ImportError:
        numpy_version = None
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
            "numpy": numpy_version, "fastmdm": __version__, "cuda": torch.version.cuda}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name()


COMMAND_ENV = ("OMP_NUM_THREADS", "FASTMDM_BACKEND", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")


def default_command() -> str:
    """The command line that started this process, as a user would type it (with the env it reads)."""
    argv = list(sys.argv)
    head = Path(argv[0]).name if argv else "python"
    if head in ("cli.py", "__main__.py"):
        head = "python -m fastmdm.cli"
    env = [f"{name}={shlex.quote(os.environ[name])}" for name in COMMAND_ENV if name in os.environ]
    return " ".join(env + [head] + [shlex.quote(a) for a in argv[1:]])


def _metadata(preset, device, dtype, compile, config, copy_gbps, elapsed) -> dict:
    notes = [CONTENTION_NOTE]
    if device.type != "cuda":
        notes.append("No GPU was measured in this run: the fast path is fastmdm's torch path on CPU, "
                     "so the comparison is fastmdm (torch) vs fastmdm.reference; Triton kernels and "
                     "the >= 60% of copy bandwidth target apply to CUDA runs only.")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": default_command(),
        "preset": preset,
        "versions": _versions(),
        "device": {"type": device.type, "name": _device_name(device)},
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "backend": get_backend(),
        "dtype": str(dtype).replace("torch.", ""),
        "copy_bandwidth_gbps": copy_gbps,
        "compile": {"enabled": bool(compile), "budget_s": config.compile_budget_s},
        "timing": {"budget_s": config.budget_s, "min_samples": config.min_samples,
                   "max_samples": config.max_samples,
                   "clock": "cuda events" if device.type == "cuda" else "time.perf_counter"},
        "elapsed_s": elapsed,
        "notes": notes,
    }


# -- schema -----------------------------------------------------------------------------------
_METADATA_KEYS = {"date": str, "command": str, "preset": str, "versions": dict, "device": dict,
                  "cpu_count": int, "copy_bandwidth_gbps": float, "notes": list}
_ROW_KEYS = {"case": str, "impl": str, "device": str, "dtype": str, "B": int, "K": int, "d": int,
             "extra": dict, "status": str, "n": int}
_RATIO_FIELDS = tuple(f"fast_over_{impl}" for impl in ("reference", "torch", "compile"))


def _check_type(value, kind, where: str) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else (
        isinstance(value, kind) and not (kind is int and isinstance(value, bool)))
    if not ok:
        raise ValueError(f"{where} must be {kind.__name__}, got {value!r}")


def validate_report(report: dict, rel_tol: float = 1e-9) -> None:
    """Raise ValueError naming the first field that breaks the report schema.

    Checks metadata fields and versions, every row (known case and impl, sizes >= 1,
    ok rows with median > 0, IQR >= 0, n >= 2), and that every ratio equals the quotient
    of the same run's medians.
    """
    if not isinstance(report, dict):
        raise ValueError(f"report must be a dict, got {type(report).__name__}")
    for key in ("schema_version", "metadata", "rows", "ratios"):
        if key not in report:
            raise ValueError(f"report lacks {key!r}")
    if report["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"schema_version must be {SCHEMA_VERSION}, got {report['schema_version']!r}")
    meta = report["metadata"]
    for key, kind in _METADATA_KEYS.items():
        if key not in meta:
            raise ValueError(f"metadata lacks {key!r}")
        _check_type(meta[key], kind, f"metadata.{key}")
    if meta["preset"] not in PRESETS:
        raise ValueError(f"metadata.preset must be one of {PRESETS}, got {meta['preset']!r}")
    for key in ("python", "torch", "triton", "fastmdm"):
        if key not in meta["versions"]:
            raise ValueError(f"metadata.versions lacks {key!r}")
    for key in ("type", "name"):
        if key not in meta["device"]:
            raise ValueError(f"metadata.device lacks {key!r}")
    datetime.datetime.fromisoformat(meta["date"])
    rows = report["rows"]
    if not isinstance(rows, list) or not rows:
        raise ValueError("rows must be a non-empty list")
    medians = {}
    for i, row in enumerate(rows):
        where = f"rows[{i}]"
        for key, kind in _ROW_KEYS.items():
            if key not in row:
                raise ValueError(f"{where} lacks {key!r}")
            _check_type(row[key], kind, f"{where}.{key}")
        if row["impl"] not in IMPLS:
            raise ValueError(f"{where}.impl must be one of {IMPLS}, got {row['impl']!r}")
        if row["status"] not in STATUSES:
            raise ValueError(f"{where}.status must be one of {STATUSES}, got {row['status']!r}")
        if min(row["B"], row["K"], row["d"]) < 1:
            raise ValueError(f"{where}: B, K, d must be >= 1")
        if row["status"] == "ok":
            _check_type(row["median_s"], float, f"{where}.median_s")
            _check_type(row["iqr_s"], float, f"{where}.iqr_s")
            if not (row["median_s"] > 0 and row["iqr_s"] >= 0 and row["n"] >= 2):
                raise ValueError(f"{where}: need median_s > 0, iqr_s >= 0 and n >= 2")
            if "gbps" in row:
                expected = row["floor_bytes"] / row["median_s"] / 1e9
                if not math.isclose(row["gbps"], expected, rel_tol=rel_tol):
                    raise ValueError(f"{where}.gbps != floor_bytes / median_s")
            medians[(params_key(row), row["impl"])] = row["median_s"]
        elif not row.get("reason"):
            raise ValueError(f"{where}: a {row['status']!r} row needs a reason")
    for i, ratio in enumerate(report["ratios"]):
        where = f"ratios[{i}]"
        params = dict(ratio["params"])
        key = (ratio["case"], params.pop("B"), params.pop("K"), params.pop("d"),
               tuple(sorted(params.items())), ratio["dtype"])
        fast = medians.get((key, "fast"))
        if fast is None:
            raise ValueError(f"{where} has no ok 'fast' row in the same report")
        for field in _RATIO_FIELDS:
            other = medians.get((key, field.removeprefix("fast_over_")))
            value = ratio.get(field)
            if other is None:
                if value is not None:
                    raise ValueError(f"{where}.{field} is set but the run has no ok row for it")
            elif value is None or not math.isclose(value, fast / other, rel_tol=rel_tol):
                raise ValueError(f"{where}.{field} = {value!r} is not the quotient of the medians "
                                 f"{fast!r} / {other!r}")


# -- rendering --------------------------------------------------------------------------------
def _ms(row: dict | None) -> str:
    if row is None:
        return "—"
    if row["status"] != "ok":
        return row["status"]
    return f"{row['median_s'] * 1e3:.3g} ± {row['iqr_s'] * 1e3:.2g}"


def _ratio(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3g} ({1 / value:.3g}×)"


def ratio_table(report: dict) -> str:
    """Markdown table: per case and size the fast median (ms ± IQR) and the fast/other ratios."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for row in report["rows"]:
        by_key.setdefault(params_key(row), {})[row["impl"]] = row
    lines = [
        "| case | size | dtype | fast ms (± IQR) | reference ms | fast/ref (speed-up) | torch ms "
        "| fast/torch | compile ms | fast/compile | fast GB/s (% of copy) of floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios = {(r["case"], tuple(sorted(r["params"].items())), r["dtype"]): r for r in report["ratios"]}
    for key, impls in by_key.items():
        case, B, K, d, extra, dtype = key
        fast = impls.get("fast")
        size = Size(B, K, d, extra).label()
        if fast is not None and fast["status"] in ("skipped", "failed"):
            lines.append(f"| {case} | {size} | {dtype} | {fast['status']}: {fast['reason']} "
                         "| | | | | | | |")
            continue
        ratio = ratios.get((case, tuple(sorted({"B": B, "K": K, "d": d, **dict(extra)}.items())), dtype), {})
        bandwidth = "—"
        if fast is not None and "gbps" in fast:
            bandwidth = f"{fast['gbps']:.3g}"
            if "fraction_of_copy" in fast:
                bandwidth += f" ({100 * fast['fraction_of_copy']:.0f}%)"
            bandwidth += f" of {fast['floor_bytes'] / 1e6:.3g} MB"
        torch_cell = _ms(impls.get("torch")) if "torch" in impls else "= fast"
        lines.append(
            f"| {case} | {size} | {dtype} | {_ms(fast)} | {_ms(impls.get('reference'))} "
            f"| {_ratio(ratio.get('fast_over_reference'))} | {torch_cell} "
            f"| {_ratio(ratio.get('fast_over_torch'))} | {_ms(impls.get('compile'))} "
            f"| {_ratio(ratio.get('fast_over_compile'))} | {bandwidth} |")
    return "\n".join(lines)


BANDWIDTH_TARGET = 0.6  # memory-bound fast rows should reach 60% of the measured copy bandwidth
# The bandwidth target applies to rows whose bytes floor takes at least this long at copy
# bandwidth; below it launch and host overheads, not memory, bound the time.
BANDWIDTH_MIN_FLOOR_S = 1e-4


def target_summary(report: dict) -> list[str]:
    """The issue's GPU targets, checked on this report: one line per miss, or why unchecked.

    On CUDA every memory-bound fast row large enough to be bandwidth-bound (floor bytes
    moving for >= BANDWIDTH_MIN_FLOOR_S at copy bandwidth) needs >= BANDWIDTH_TARGET of the
    copy bandwidth, and every fast path must beat the reference and torch.compile (ratio < 1).
    """
    meta = report["metadata"]
    if meta["device"]["type"] != "cuda":
        return ["Not evaluated: the targets are for GPUs, and no GPU was measured in this run."]
    lines, small = [], 0
    for row in report["rows"]:
        if row["impl"] != "fast" or not row["memory_bound"] or "fraction_of_copy" not in row:
            continue
        if row["floor_bytes"] / (meta["copy_bandwidth_gbps"] * 1e9) < BANDWIDTH_MIN_FLOOR_S:
            small += 1
        elif row["fraction_of_copy"] < BANDWIDTH_TARGET:
            size = Size(row["B"], row["K"], row["d"], tuple(sorted(row["extra"].items()))).label()
            lines.append(f"{row['case']} {size}: {100 * row['fraction_of_copy']:.0f}% of copy "
                         f"bandwidth (< {100 * BANDWIDTH_TARGET:.0f}%)")
    for ratio in report["ratios"]:
        for other in ("reference", "compile"):
            value = ratio.get(f"fast_over_{other}")
            if value is not None and value >= 1:
                lines.append(f"{ratio['case']} {ratio['params']}: fast / {other} = {value:.3g} (not ahead)")
    if not lines:
        lines.append("Every checked row meets the targets.")
    if small:
        lines.append(f"{small} memory-bound rows move their bytes floor in under "
                     f"{BANDWIDTH_MIN_FLOOR_S * 1e6:.0f} µs at copy bandwidth: not checked for bandwidth.")
    return lines


def render_markdown(report: dict) -> str:
    """The Markdown report: header (command, device, versions, copy bandwidth, notes) and tables."""
    meta = report["metadata"]
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v is not None)
    reasons = [r for r in report["rows"] if r["status"] == "n/a"]
    lines = [
        f"# fastmdm benchmark — preset `{meta['preset']}` on {meta['device']['type']}",
        "",
        f"- Date (UTC): {meta['date']}",
        f"- Command: `{meta['command']}`",
        f"- Device: {meta['device']['type']} — {meta['device']['name']}; {meta['cpu_count']} CPUs, "
        f"{meta.get('torch_threads')} torch threads",
        f"- Versions: {versions}",
        f"- Backend: {meta.get('backend')}; dtype {meta.get('dtype')}; "
        f"torch.compile column {'on' if meta.get('compile', {}).get('enabled') else 'off'}",
        f"- Measured copy bandwidth: {meta['copy_bandwidth_gbps']:.1f} GB/s (2 · bytes / time of a "
        "tensor copy, same run)",
        f"- Total time: {meta.get('elapsed_s', 0.0):.0f} s",
        "",
        *[f"> {note}" for note in meta["notes"]],
        "",
        "Times are per call: median ± inter-quartile range. A ratio is fast median / other median "
        "(< 1: fast is quicker); the speed-up other / fast is in parentheses. GB/s is the bytes "
        "floor of the operation (the least it must read and write) divided by the fast median; "
        "the perturbation and DSM rows are the memory-bound ones.",
        "",
        ratio_table(report),
        "",
        f"## Targets (memory-bound >= {100 * BANDWIDTH_TARGET:.0f}% of copy bandwidth; fast ahead of "
        "reference and torch.compile)",
        "",
        *[f"- {line}" for line in target_summary(report)],
        "",
    ]
    notes = dict.fromkeys(f"{r['case']}: {r['note']}" for r in report["rows"] if r.get("note"))
    if notes:
        lines += ["## Case notes", "", *[f"- {note}" for note in notes], ""]
    if reasons:
        grouped: dict[tuple[str, str], list[str]] = {}
        for r in reasons:
            size = Size(r["B"], r["K"], r["d"], tuple(sorted(r["extra"].items()))).label()
            grouped.setdefault((r["impl"], r["reason"]), []).append(f"{r['case']} {size}")
        lines += ["## Columns not measured", ""]
        lines += [f"- {impl}: {reason} ({'; '.join(where)})" for (impl, reason), where in grouped.items()]
        lines.append("")
    return "\n".join(lines)


def write_report(report: dict, out) -> tuple[Path, Path]:
    """Write bench-<date>-<device>-<preset>.json and .md under ``out``; returns both paths."""
    validate_report(report)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = report["metadata"]
    stem = f"bench-{meta['date'][:10]}-{meta['device']['type']}-{meta['preset']}"
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(render_markdown(report))
    return json_path, md_path


def run_bench(preset: str = "quick", device=None, out="benchmarks/results", *,
              compile: bool | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """`fastmdm bench`: run the suite, print the ratio table, write JSON + Markdown under ``out``."""
    report = run_suite(preset, device, dtype=dtype, compile=compile)
    print()
    print(ratio_table(report))
    print("\ntargets:", *target_summary(report), sep="\n  ")
    json_path, md_path = write_report(report, out)
    print(f"\nwrote {json_path} and {md_path}")
    return report
