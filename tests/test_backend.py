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
