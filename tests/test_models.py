"""Score networks: shapes, per-sample independence, time conditioning, gradients, bad input."""

import pytest
import torch

from fastmdm.models import MLPScore, UNetScore, build_network

CASES = [(MLPScore, (2,), {"hidden": 16, "layers": 2}), (MLPScore, (3, 4), {"hidden": 16}),
         (UNetScore, (1, 8, 8), {"base": 8}), (UNetScore, (2, 4, 6), {"base": 8})]




@pytest.mark.parametrize("cls,data_shape,kwargs", CASES)
@pytest.mark.parametrize("K", [1, 3])
def test_output_shaped_like_state_and_samples_independent(cls, data_shape, kwargs, K):
    torch.manual_seed(0)
    net = cls(data_shape, K, **kwargs).double()
    u = torch.randn(5, K, *data_shape, dtype=torch.float64)
    t = torch.rand(5, dtype=torch.float64) * 0.999 + 1e-3
    out = net(u, t)
    assert out.shape == u.shape and out.dtype == torch.float64
    # no mixing across the batch: each row equals the network applied to that row alone
    rows = torch.cat([net(u[i: i + 1], t[i: i + 1]) for i in range(5)])
    torch.testing.assert_close(out, rows, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls,data_shape,kwargs", CASES[:3])
def test_time_conditioning_and_gradients_reach_every_parameter(cls, data_shape, kwargs):
    torch.manual_seed(1)
    net = cls(data_shape, 2, **kwargs)
    u = torch.randn(4, 2, *data_shape)
    t1, t2 = torch.full((4,), 0.1), torch.full((4,), 0.9)
    assert (net(u, t1) - net(u, t2)).abs().max() > 1e-4
    net(u, t1).square().sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_bad_input_is_named():
    net = UNetScore((1, 8, 8), 2, base=8)
    with pytest.raises(ValueError, match=r"state u of shape \(B, K=2, 1, 8, 8\)"):
        net(torch.randn(3, 3, 1, 8, 8), torch.rand(3))
    with pytest.raises(ValueError, match=r"t of shape \(3,\)"):
        net(torch.randn(3, 2, 1, 8, 8), torch.rand(3, 1))
    with pytest.raises(ValueError, match="even image sizes"):
        UNetScore((1, 7, 8), 2)
    with pytest.raises(ValueError, match="data_shape must be"):
        UNetScore((8, 8), 2)
    with pytest.raises(ValueError, match="K must be a positive integer"):
        MLPScore((2,), 0)
    with pytest.raises(ValueError, match="network must be one of"):
        build_network("transformer", (2,), 1)
