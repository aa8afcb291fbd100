"""Data: embedded digits, toys, user files (.npy, .npz, IDX), the dequantise/logit transform."""

import gzip
import math

import numpy as np
import pytest
import torch

from fastmdm.bpd import bits_per_dim, dequantize, logit_transform
from fastmdm.data import (
    TOYS,
    DataTransform,
    check_finite,
    load_dataset,
    load_digits,
    load_file,
    read_idx,
    toy_2d,
)


def test_digits_levels_shape_and_fixed_split():
    ds = load_digits(seed=0)
    assert ds.levels == 17 and ds.data_shape == (1, 8, 8)
    assert ds.train.shape[0] + ds.test.shape[0] == 1797
    levels = torch.cat([ds.train, ds.test]).unique() * 16
    torch.testing.assert_close(levels, torch.arange(17, dtype=levels.dtype))
    again = load_digits(seed=0)
    assert torch.equal(ds.test, again.test)
    assert not torch.equal(ds.test, load_digits(seed=1).test)


def test_transform_inverts_to_the_right_bin_and_ldj_is_the_log_jacobian():
    n = 17
    x = torch.randint(0, n, (6, 1, 4, 4), generator=torch.Generator().manual_seed(0)).double() / (n - 1)
    tf = DataTransform(levels=n)
    y, ldj = tf.forward(x, torch.Generator().manual_seed(1))
    assert torch.equal(torch.floor(tf.inverse(y) * n), torch.round(x * (n - 1)))
    # the map x̃ -> y acts elementwise: ldj = Σ log dy/dx̃
    x_tilde = tf.inverse(y).requires_grad_(True)
    s = tf.alpha + (1 - 2 * tf.alpha) * x_tilde
    (dy,) = torch.autograd.grad((torch.log(s) - torch.log1p(-s)).sum(), x_tilde)
    torch.testing.assert_close(ldj, dy.log().flatten(1).sum(1), rtol=1e-10, atol=1e-10)


def test_continuous_transform_is_identity():
    x = torch.randn(3, 2)
    y, ldj = DataTransform(None).forward(x)
    assert y is x and torch.equal(ldj, torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("name", TOYS)
def test_toys_reproducible_and_shaped(name):
    a = toy_2d(name, 500, torch.Generator().manual_seed(3))
    b = toy_2d(name, 500, torch.Generator().manual_seed(3))
    assert a.shape == (500, 2) and torch.equal(a, b) and torch.isfinite(a).all()
    if name == "checkerboard":  # alternate unit squares of [-2, 2]²: floor(x1) + floor(x2) is even
        assert (a.abs() <= 2).all()
        assert ((torch.floor(a[:, 0]) + torch.floor(a[:, 1])) % 2 == 0).all()
    if name == "8gaussians":  # modes at radius 2, std 0.1 per coordinate
        assert (a.norm(dim=1) - 2).abs().max() < 0.1 * 6


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_user_files_npy_npz_idx(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 6, 6), dtype=np.uint8)
    np.save(tmp_path / "a.npy", images)
    ds = load_file(str(tmp_path / "a.npy"))
    assert ds.levels == 256 and ds.data_shape == (1, 6, 6)
    full = torch.cat([ds.train, ds.test]) * 255
    assert sorted(full.flatten().round().long().tolist()) == sorted(images.flatten().tolist())
    for name in ("b.idx", "c-ubyte.gz"):
        _write_idx(tmp_path / name, images)
        np.testing.assert_array_equal(read_idx(str(tmp_path / name)), images)
        assert load_dataset(str(tmp_path / name)).levels == 256
    points = rng.normal(size=(30, 2))
    np.savez(tmp_path / "d.npz", x=points, labels=np.arange(30))
    ds = load_file(str(tmp_path / "d.npz"))
    assert ds.levels is None and ds.data_shape == (2,)
    np.testing.assert_allclose(np.sort(torch.cat([ds.train, ds.test]).numpy(), 0),
                               np.sort(points.astype(np.float32), 0))


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_file(str(tmp_path / "missing.npy"))
    (tmp_path / "junk.npy").write_bytes(b"not an array at all")
    with pytest.raises(ValueError, match="cannot read data file"):
        load_file(str(tmp_path / "junk.npy"))
    bad = np.ones((10, 2))
    bad[3, 1] = math.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        load_file(str(tmp_path / "nan.npy"))
    np.savez(tmp_path / "two.npz", a=bad, b=bad)
    with pytest.raises(ValueError, match="name the data array 'x'"):
        load_file(str(tmp_path / "two.npz"))
    with pytest.raises(ValueError, match="data must be one of"):
        load_dataset("cifar10")


BAD_BPD_INPUT = [
    (lambda: bits_per_dim(0.5, (1, 2)), TypeError, "neg_elbo must be a torch.Tensor"),
    (lambda: bits_per_dim(torch.ones(3), (3, 2), torch.ones(2)), ValueError, r"ldj must be .* shape \(\) or \(3,\)"),
    (lambda: bits_per_dim(torch.ones(3), (3, 2), np.zeros(3)), TypeError, "ldj must be a number or a torch.Tensor"),
    (lambda: bits_per_dim(torch.ones(3), (3, 2), levels=1), ValueError, "levels must be None or an integer >= 2"),
    (lambda: bits_per_dim(torch.ones(3), (3, 2), levels=2.5), ValueError, "levels must be None or an integer >= 2"),
    (lambda: dequantize(np.full((2, 3), 0.5)), TypeError, "x must be a torch.Tensor, got ndarray"),
    (lambda: dequantize(torch.tensor([0.5, float("nan")])), ValueError, "x has 1 NaN values"),
    (lambda: dequantize(torch.tensor([0.5]), levels=True), ValueError, "levels must be an integer >= 2"),
    (lambda: logit_transform(torch.tensor(0.5)), ValueError, r"x must be a batch \(B, \*data_shape\), got a 0-d"),
    (lambda: logit_transform(torch.tensor([[1.5]])), ValueError, r"x must lie in \[0, 1\], got values in \[1.5"),
    (lambda: logit_transform(1.5), TypeError, "x must be a torch.Tensor, got float"),
    (lambda: check_finite(np.zeros(2), "data"), TypeError, "data must be a torch.Tensor"),
]


@pytest.mark.parametrize("call,error,message", BAD_BPD_INPUT)
def test_bad_input_to_the_transform_and_bpd_names_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_bits_per_dim_accepts_a_per_sample_or_scalar_ldj():
    neg, ldj = torch.rand(3, dtype=torch.float64) + 1, torch.rand(3, dtype=torch.float64)
    per_sample = bits_per_dim(neg, (3, 2), ldj, levels=None)
    torch.testing.assert_close(per_sample, (neg - ldj) / (2 * math.log(2)), rtol=1e-15, atol=0)
    torch.testing.assert_close(bits_per_dim(neg, (3, 2), ldj[0]), bits_per_dim(neg, (3, 2), float(ldj[0])))
