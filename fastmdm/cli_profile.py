"""`fastmdm profile`: a few steps of training, sampling or ELBO evaluation under torch.profiler.

:func:`run_profile` writes the Chrome trace JSON and returns (and prints) the top ops by
self time; the stages it shows are those of :mod:`fastmdm.stages`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from .diffusion import alda
from .mixtures import GaussianMixture
from .models import MLPScore
from .objectives import dsm_elbo
from .sampling import sample
from .stages import PREFIX, stage
from .training import MDM, Trainer
from .validation import check_choice, check_int

WORKLOADS = ("train", "sample", "elbo")


def _toy_setup(device: torch.device, batch: int, seed: int = 0):
    """ALDA on 2-D data from an 8-component Gaussian mixture on a circle, and a small MLP."""
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
        trainer = Trainer(MDM(diffusion, model), lr=1e-3, warmup=1)

        def step():
            with stage("train_step"):
                return trainer.train_step(x0)

        return step
    if what == "sample":
        @torch.no_grad()
        def step():
            return sample(model, diffusion, shape=(batch, 2), steps=10)

        return step

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
    check_choice(what, WORKLOADS, "what")
    check_int(steps, "steps")
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
