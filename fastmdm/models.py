"""Small score networks for MDMs: model(u, t) over the state u (B, K, *data_shape).

Both networks return a tensor shaped like u (what it means is the MDM's
``prediction``, "eps" by default) and take t of shape (B,) in u's dtype.

* :class:`MLPScore` for low-dimensional data: flattens the K variables into one
  vector of K·d features, adds a sinusoidal time embedding in each hidden layer.
* :class:`UNetScore` for images (C, H, W): the K variables become K·C channels of
  one image; residual blocks with group norm and time embedding, skip connections
  across two resolutions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _check_positive_int(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class TimeEmbedding(nn.Module):
    """e(t) = MLP([sin(ω_i t'), cos(ω_i t')]), t' = 1000 t, ω_i = 10000^(−i/(n/2)) (Transformer style)."""

    def __init__(self, dim: int):
        super().__init__()
        _check_positive_int(dim, "time embedding dim")
        half = max(dim // 2, 1)
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(half) / half),
                             persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * half, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        arg = 1000.0 * t[:, None] * self.freqs.to(t.dtype)
        return self.mlp(torch.cat([arg.sin(), arg.cos()], dim=1))


def _check_call(u: Tensor, t: Tensor, K: int, data_shape: tuple[int, ...], name: str) -> None:
    if not isinstance(u, Tensor) or not isinstance(t, Tensor):
        raise TypeError(f"{name} expects tensors u and t, got {type(u).__name__} and {type(t).__name__}")
    if u.dim() != 2 + len(data_shape) or u.shape[1] != K or tuple(u.shape[2:]) != data_shape:
        raise ValueError(f"{name} expects a state u of shape (B, K={K}, {', '.join(map(str, data_shape))}), "
                         f"got {tuple(u.shape)}")
    if t.shape != (u.shape[0],):
        raise ValueError(f"{name} expects t of shape ({u.shape[0]},), got {tuple(t.shape)}")


class MLPScore(nn.Module):
    """MLP score network: h_{l+1} = SiLU(W_l h_l + E_l e(t)), output reshaped to u's shape."""

    def __init__(self, data_shape, K: int, hidden: int = 256, layers: int = 3, time_dim: int = 64):
        super().__init__()
        self.data_shape = tuple(int(s) for s in data_shape)
        if not self.data_shape or min(self.data_shape) < 1:
            raise ValueError(f"data_shape must be a non-empty tuple of positive sizes, got {data_shape!r}")
        self.K = _check_positive_int(K, "K")
        _check_positive_int(hidden, "hidden")
        _check_positive_int(layers, "layers")
        features = K * math.prod(self.data_shape)
        self.time = TimeEmbedding(time_dim)
        widths = [features] + [hidden] * layers
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.time_proj = nn.ModuleList(nn.Linear(time_dim, hidden) for _ in range(layers))
        self.out = nn.Linear(hidden, features)
        self.act = nn.SiLU()

    def forward(self, u: Tensor, t: Tensor) -> Tensor:
        _check_call(u, t, self.K, self.data_shape, "MLPScore")
        emb = self.time(t)
        h = u.flatten(1)
        for linear, proj in zip(self.linears, self.time_proj, strict=True):
            h = self.act(linear(h) + proj(emb))
        return self.out(h).view(u.shape)


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


class ResBlock(nn.Module):
    """h + conv(SiLU(GN(conv(SiLU(GN(h))) + proj(e(t))))) with a 1×1 skip when widths differ."""

    def __init__(self, c_in: int, c_out: int, time_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.act = nn.SiLU()

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        z = self.conv1(self.act(self.norm1(h))) + self.time_proj(emb)[:, :, None, None]
        z = self.conv2(self.act(self.norm2(z)))
        return self.skip(h) + z


class UNetScore(nn.Module):
    """Small U-Net over images (C, H, W) with the K variables stacked as K·C input/output channels.

    Two resolutions (H, W) and (H/2, W/2), ``base`` and 2·``base`` channels, one
    residual block per level on the way down and two on the way up (with skips).
    H and W must be even.
    """

    def __init__(self, data_shape, K: int, base: int = 32, time_dim: int = 64):
        super().__init__()
        self.data_shape = tuple(int(s) for s in data_shape)
        if len(self.data_shape) != 3 or min(self.data_shape) < 1:
            raise ValueError(f"data_shape must be (C, H, W), got {data_shape!r}")
        channels, height, width = self.data_shape
        if height % 2 or width % 2:
            raise ValueError(f"UNetScore needs even image sizes, got H={height}, W={width}")
        self.K = _check_positive_int(K, "K")
        _check_positive_int(base, "base")
        c_io = K * channels
        self.time = TimeEmbedding(time_dim)
        self.inp = nn.Conv2d(c_io, base, 3, padding=1)
        self.down1 = ResBlock(base, base, time_dim)
        self.pool = nn.Conv2d(base, base, 3, stride=2, padding=1)
        self.down2 = ResBlock(base, 2 * base, time_dim)
        self.mid = ResBlock(2 * base, 2 * base, time_dim)
        self.up2 = ResBlock(4 * base, 2 * base, time_dim)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.up1 = ResBlock(3 * base, base, time_dim)
        self.norm = nn.GroupNorm(_groups(base), base)
        self.out = nn.Conv2d(base, c_io, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, u: Tensor, t: Tensor) -> Tensor:
        _check_call(u, t, self.K, self.data_shape, "UNetScore")
        emb = self.time(t)
        h0 = self.inp(u.flatten(1, 2))
        h1 = self.down1(h0, emb)
        h2 = self.down2(self.pool(h1), emb)
        h = self.mid(h2, emb)
        h = self.up2(torch.cat([h, h2], dim=1), emb)
        h = self.up1(torch.cat([self.upsample(h), h1], dim=1), emb)
        return self.out(self.act(self.norm(h))).view(u.shape)


NETWORKS = {"mlp": MLPScore, "unet": UNetScore}


def build_network(kind: str, data_shape, K: int, **kwargs) -> nn.Module:
    """Construct a network by name ("mlp" or "unet") for data of shape data_shape and K variables."""
    if kind not in NETWORKS:
        raise ValueError(f"network must be one of {tuple(NETWORKS)}, got {kind!r}")
    return NETWORKS[kind](data_shape, K, **kwargs)


__all__ = ["MLPScore", "NETWORKS", "TimeEmbedding", "UNetScore", "build_network"]
