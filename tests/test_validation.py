"""The shared argument checks: accepted values come back, rejected ones name the argument."""

import pytest
import torch

from fastmdm.validation import (
    check_callable,
    check_choice,
    check_finite,
    check_instance,
    check_int,
    check_like,
    check_number,
    check_shape,
)


def test_check_int():
    assert check_int(3, "steps") == 3
    assert check_int(2, "K", minimum=2) == 2
    for bad in (0, -1, 2.0, True, "3", None):
        with pytest.raises(ValueError, match=r"steps must be an integer >= 1"):
            check_int(bad, "steps")
    with pytest.raises(ValueError, match=r"K must be an integer >= 2, got 1"):
        check_int(1, "K", minimum=2)


def test_check_number():
    assert check_number(0.5, "eta", 0.0, 1.0) == 0.5
    assert check_number(1, "eta", 0.0, 1.0) == 1.0
    for bad in (1.5, -0.1, float("nan"), float("inf"), True, "0.5"):
        with pytest.raises(ValueError, match=r"eta must be a finite number >= 0.0 and <= 1.0"):
            check_number(bad, "eta", 0.0, 1.0)
    with pytest.raises(ValueError, match=r"snr must be a finite number > 0.0, got 0.0"):
        check_number(0.0, "snr", 0.0, low_open=True)
    assert check_number(-3.0, "shift") == -3.0


def test_check_choice_instance_callable():
    assert check_choice("a", ("a", "b"), "mode") == "a"
    with pytest.raises(ValueError, match=r"mode must be one of \('a', 'b'\), got 'c'"):
        check_choice("c", ("a", "b"), "mode")
    with pytest.raises(TypeError, match="diffusion must be a Tensor, got str"):
        check_instance("vp", torch.Tensor, "diffusion")
    with pytest.raises(TypeError, match=r"model must be callable as model\(u, t\), got int"):
        check_callable(3, "model", "model(u, t)")


def test_check_finite():
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    assert check_finite(x, "x0") is x
    x[1, 2], x[3, 0] = float("nan"), float("-inf")
    with pytest.raises(ValueError, match="x0 has 2 NaN or infinite values"):
        check_finite(x, "x0")
    with pytest.raises(TypeError, match="x0 must be a torch.Tensor"):
        check_finite([1.0], "x0")


def test_check_shape():
    assert check_shape([4, 2, 3]) == (4, 2, 3) and check_shape(torch.Size([2, 1])) == (2, 1)
    for bad in (4, "42", (2.5, 2), (True, 2)):
        with pytest.raises(TypeError, match="shape must be a tuple"):
            check_shape(bad)
    for bad in ((4,), (0, 2)):
        with pytest.raises(ValueError, match="shape must be"):
            check_shape(bad)


def test_check_like():
    ref = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(3, 2, 2, generator=torch.Generator().manual_seed(1))
    assert check_like(noise, "noise", (3, 2, 2), ref) is noise
    with pytest.raises(TypeError, match="noise must have the data's dtype torch.float32, got torch.float64"):
        check_like(noise.double(), "noise", (3, 2, 2), ref)
    with pytest.raises(TypeError, match="noise must have the data's dtype"):
        check_like(noise.long(), "noise", (3, 2, 2), ref)
    with pytest.raises(ValueError, match=r"noise must have shape \(3, 2, 2\)"):
        check_like(noise[:2], "noise", (3, 2, 2), ref)
    with pytest.raises(TypeError, match="noise must be a torch.Tensor"):
        check_like([0.0], "noise", (3, 2, 2), ref)
