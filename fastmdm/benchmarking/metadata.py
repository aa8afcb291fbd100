"""What a report records about its run: date, command line, versions, device, timing settings."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

from ..backend import get_backend

CONTENTION_NOTE = (
    "Times are wall-clock on a possibly shared machine; contention inflates medians, but every "
    "ratio divides two medians of the same run whose samples were taken in alternation."
)


def _versions() -> dict:
    from .. import __version__

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


def run_metadata(preset, device, dtype, compile, config, copy_gbps, elapsed) -> dict:
    """The report's ``metadata``: what was run, where, with which versions and timing settings."""
    notes = [CONTENTION_NOTE]
    if device.type != "cuda":
        notes.append("No GPU was measured in this run: the fast path is fastmdm's torch path on CPU, "
                     "so the comparison is fastmdm (torch) vs fastmdm.reference (looped and batched); "
                     "Triton kernels and the >= 60% of copy bandwidth target apply to CUDA runs only.")
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

