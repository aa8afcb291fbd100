"""Named stages of the hot paths: NVTX ranges on CUDA, torch.profiler ranges while profiling.

``with stage("perturb"):`` marks a fastmdm stage. On CUDA it opens an NVTX range
``fastmdm.perturb`` (seen by Nsight Systems / Nsight Compute); while torch.profiler
records it also opens a ``record_function`` range of the same name (seen in the
Chrome/Perfetto trace). Otherwise it does nothing, so it is cheap on hot CPU paths.
A leaf module: it imports only torch and the standard library.
"""

from __future__ import annotations

import functools

import torch

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


__all__ = ["PREFIX", "stage", "staged"]
