"""The one benchmark timer: interleaved samples, median and inter-quartile range.

One warm-up call per implementation, then ``n`` rounds in which every implementation takes
one sample of ``number`` back-to-back calls (CUDA: between CUDA events, then synchronised;
CPU: ``time.perf_counter``). Every ratio the suite reports divides two medians measured in
the same run with the samples interleaved, so a slowdown of a shared machine hits all alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import statistics
import time
import warnings
from collections.abc import Callable

import torch

from ..backend import get_backend, set_backend


@dataclasses.dataclass(frozen=True)
class Timing:
    """Per-call time: median and inter-quartile range over n samples of ``number`` calls."""

    median_s: float
    iqr_s: float
    n: int
    number: int
    warmup_s: float = 0.0  # the first call (with any compilation)



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


def under_backend(fn: Callable[[], object], name: str) -> Callable[[], object]:
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


def compiled(fn: Callable[[], object]) -> Callable[[], object]:
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


