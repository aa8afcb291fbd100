"""Profiling: named stages (NVTX + torch.profiler ranges) and `fastmdm profile`.

``with stage("perturb"):`` marks a fastmdm stage. On CUDA it opens an NVTX range
``fastmdm.perturb`` (seen by Nsight Systems / Nsight Compute); while torch.profiler
records it also opens a ``record_function`` range of the same name (seen in the
Chrome/Perfetto trace). Otherwise it does nothing, so it is cheap on hot CPU paths.

:func:`run_profile` runs a few steps of training, sampling or ELBO evaluation under
torch.profiler, writes the Chrome trace JSON and returns (and prints) the top ops by
self time.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

WORKLOADS = ("train", "sample", "elbo")
PREFIX = "fastmdm."
# True while dynamo traces (stages then vanish from compiled graphs instead of breaking them)
_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)


class stage:  # noqa: N801 -- used as a lowercase context manager, like torch.no_grad
    """Context manager naming a fastmdm stage: NVTX range on CUDA, profiler range while profiling."""

    __slots__ = ("label", "_nvtx", "_record")

    def __init__(self, name: str):
        self.label = PREFIX + name
        self._nvtx = False
        self._record = None

    def __enter__(self) -> stage:
        if _is_compiling():
            return self
        if torch.cuda.is_initialized():
            torch.cuda.nvtx.range_push(self.label)
            self._nvtx = True
        if torch.autograd._profiler_enabled():  # a profiler is recording: add a named range
            self._record = torch.profiler.record_function(self.label)
            self._record.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._record is not None:
            self._record.__exit__(*exc)
            self._record = None
        if self._nvtx:
            torch.cuda.nvtx.range_pop()
            self._nvtx = False


def staged(name: str):
    """Decorator: run the function inside ``stage(name)``."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with stage(name):
                return fn(*args, **kwargs)

        return wrapper

    return decorate


def _toy_setup(device: torch.device, batch: int, seed: int = 0):
    """ALDA on 2-D data from an 8-component Gaussian mixture on a circle, and a small MLP."""
    from .diffusion import alda
    from .mixtures import GaussianMixture
    from .models import MLPScore

    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    mixture = GaussianMixture(torch.ones(8), 4 * torch.stack([angles.cos(), angles.sin()], 1),
                              torch.full((8,), 0.1))
    g = torch.Generator().manual_seed(seed)
    x0 = mixture.sample(batch, generator=g, dtype=torch.float32).to(device)
    diffusion = alda().to(device)
    torch.manual_seed(seed)
    model = MLPScore((2,), diffusion.K, hidden=128, layers=2).to(device)
    return diffusion, model, x0


def _workload(what: str, device: torch.device, batch: int) -> Callable[[], object]:
    """One step of the profiled workload, as a zero-argument callable."""
    diffusion, model, x0 = _toy_setup(device, batch)
    if what == "train":
        from .training import MDM, Trainer

        trainer = Trainer(MDM(diffusion, model), lr=1e-3, warmup=1)

        def step():
            with stage("train_step"):
                return trainer.train_step(x0)

        return step
    if what == "sample":
        try:
            from .sampling import sample
        except ImportError as err:
            raise ValueError(f"what='sample' needs fastmdm.sampling, not available ({err})") from None

        @torch.no_grad()
        def step():
            return sample(model, diffusion, shape=(batch, 2), steps=10)

        return step
    from .objectives import dsm_elbo

    @torch.no_grad()
    def step():
        return dsm_elbo(model, diffusion, x0)

    return step


def top_ops(prof, n: int = 10, device_time: bool = False) -> list[dict]:
    """The n ops with the largest self time; with ``device_time`` the n device kernels.

    fastmdm stage ranges and profiler steps are left out.
    """
    rows = []
    for event in prof.key_averages():
        if event.key.startswith((PREFIX, "ProfilerStep")):
            continue
        if device_time and event.device_type == torch.autograd.DeviceType.CPU:
            continue  # a CPU op: its kernels are listed on their own
        self_us = event.self_device_time_total if device_time else event.self_cpu_time_total
        if self_us > 0:
            rows.append({"name": event.key, "self_time_us": float(self_us), "calls": int(event.count)})
    rows.sort(key=lambda r: r["self_time_us"], reverse=True)
    return rows[:n]


def run_profile(what: str = "train", out="profiles", device=None, *, steps: int = 3,
                batch: int = 256, top: int = 10) -> dict:
    """`fastmdm profile`: record ``steps`` steps of ``what`` under torch.profiler.

    Writes ``profile-<what>-<device>.json`` (Chrome trace, opens in Perfetto or
    chrome://tracing) under ``out``, prints the top ops by self time (CUDA kernels on
    a GPU) and returns {"trace": path, "top": [{name, self_time_us, calls}, ...]}.
    """
    if what not in WORKLOADS:
        raise ValueError(f"what must be one of {WORKLOADS}, got {what!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but torch.cuda.is_available() is False")
    step = _workload(what, device, batch)
    step()  # warm-up outside the trace (lazy initialisation, autotuning, compilation)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step()
            prof.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trace = out / f"profile-{what}-{device.type}.json"
    prof.export_chrome_trace(str(trace))
    ranking = top_ops(prof, top, device_time=device.type == "cuda")
    clock = "device" if device.type == "cuda" else "CPU"
    print(f"top {len(ranking)} {'kernels' if device.type == 'cuda' else 'ops'} by self {clock} time "
          f"({steps} {what} steps on {device}):")
    width = max((len(r["name"]) for r in ranking), default=4)
    width = min(width, 80)
    for r in ranking:
        print(f"  {r['name'][:width]:<{width}}  {r['self_time_us'] / 1e3:10.3f} ms  {r['calls']:6d} calls")
    print(f"trace: {trace}")
    return {"trace": str(trace), "top": ranking}


def load_trace(path) -> dict:
    """Parse a Chrome trace written by run_profile (a JSON object with ``traceEvents``)."""
    with open(path) as f:
        trace = json.load(f)
    if not isinstance(trace, dict) or "traceEvents" not in trace:
        raise ValueError(f"{path} is not a Chrome trace (no 'traceEvents')")
    return trace
