import pytest
import torch

import fastmdm as fm
from fastmdm import backend


def test_backend_names_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        fm.set_backend("cuda")
    monkeypatch.setenv("FASTMDM_BACKEND", "fast")
    backend._state["backend"] = None
    with pytest.raises(ValueError, match="FASTMDM_BACKEND"):
        fm.get_backend()


def test_auto_uses_torch_on_cpu_and_torch_is_always_possible():
    fm.set_backend("auto")
    assert not backend.use_triton(torch.device("cpu"))
    fm.set_backend("torch")
    assert not backend.use_triton("cpu")


def test_forced_triton_without_interpreter_on_cpu_is_an_error(monkeypatch):
    fm.set_backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not backend.triton_available():
        with pytest.raises(RuntimeError, match="not importable"):
            backend.use_triton("cpu")
    else:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            backend.use_triton("cpu")


def test_dispatch_picks_torch_unless_the_kernels_run():
    for name in ("torch", "auto"):
        fm.set_backend(name)
        assert backend.dispatch("perturb", "cpu", 2) is None
        assert backend.dispatch("generate_probes", torch.device("cpu")) is None
    with pytest.raises(TypeError, match="takes 2 sizes"):
        backend.dispatch("sde_step", "cpu", 2)


def test_dispatch_beyond_the_kernel_limits(monkeypatch):
    """"auto" runs torch where a kernel cannot take the sizes; a forced "triton" raises."""
    monkeypatch.setattr(backend, "use_triton", lambda device: True)
    fm.set_backend("auto")
    assert backend.dispatch("perturb", "cuda", 9) is None
    assert backend.dispatch("sde_step", "cuda", 2, 4) is None
    fm.set_backend("triton")
    with pytest.raises(RuntimeError, match="the perturb kernel supports sizes up to"):
        backend.dispatch("perturb", "cuda", 9)
    with pytest.raises(RuntimeError, match="probe_quadratic_forms"):
        backend.dispatch("probe_quadratic_forms", "cuda", 2, 9)


def test_forced_triton_dispatches_to_the_kernels(monkeypatch):
    fm.set_backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not backend.triton_available():
        with pytest.raises(RuntimeError, match="not importable"):
            backend.dispatch("weighted_dsm", "cpu", 2)
        return
    from fastmdm.kernels import dsm_loss

    assert backend.dispatch("weighted_dsm", "cpu", 2) is dsm_loss.weighted_dsm
