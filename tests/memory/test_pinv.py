"""Pseudo-inverses: exact methods against NumPy and the Penrose conditions, BIC behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from larimar.memory import MemoryDtypeError, MemoryInputError, pinv, pinv_of_product

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 2e-4, torch.float64: 1e-10}


def _rand(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype)


def _low_rank(m, n, r, seed=0, dtype=torch.float64):
    return _rand((m, r), seed, dtype) @ _rand((r, n), seed + 1, dtype)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _penrose(A, X, tol):
    assert _rel(A @ X @ A, A) < tol
    assert _rel(X @ A @ X, X) < tol
    AX, XA = A @ X, X @ A
    assert _rel(AX.mT, AX) < tol
    assert _rel(XA.mT, XA) < tol


@pytest.mark.parametrize("method", ["svd", "lstsq"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape_rank", [((12, 7), 7), ((7, 12), 7), ((15, 15), 15), ((20, 9), 4), ((9, 20), 3)])
def test_exact_methods_match_numpy(method, dtype, shape_rank):
    (m, n), r = shape_rank
    A = _low_rank(m, n, r, seed=m * n).to(dtype)
    X = pinv(A, method)
    assert X.shape == (n, m) and X.dtype == dtype
    rtol = max(m, n) * torch.finfo(dtype).eps  # the same cut-off as the default rcond
    ref = torch.from_numpy(np.linalg.pinv(A.double().numpy(), rtol=rtol))
    assert _rel(X.double(), ref) < TOL[dtype]
    _penrose(A.double(), X.double(), 1e-3 if dtype == torch.float32 else 1e-9)


@pytest.mark.parametrize("method", ["svd", "lstsq", "ben_israel_cohen"])
def test_batched_equals_looped_and_input_untouched(method):
    A = _rand((3, 10, 6), seed=3) * 0.1
    A_copy = A.clone()
    X = pinv(A, method, iters=10) if method == "ben_israel_cohen" else pinv(A, method)
    for b in range(3):
        Xb = pinv(A[b], method, iters=10) if method == "ben_israel_cohen" else pinv(A[b], method)
        torch.testing.assert_close(X[b], Xb, rtol=1e-12, atol=1e-12)
    assert torch.equal(A, A_copy)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ben_israel_cohen_converges_when_scaled(dtype):
    A = _rand((30, 12), seed=5)
    alpha = 5e-4
    s_max = torch.linalg.matrix_norm(A, ord=2)
    A = (A * (1.0 / (s_max * alpha**0.5))).to(dtype)  # alpha * s_max^2 = 1 < 2
    X = pinv(A, "ben_israel_cohen", iters=60, alpha=alpha)
    ref = torch.from_numpy(np.linalg.pinv(A.double().numpy()))
    assert _rel(X.double(), ref) < (1e-4 if dtype == torch.float32 else 1e-10)


def test_ben_israel_cohen_auto_alpha_converges():
    A = _rand((25, 40), seed=6) * 30.0  # 5e-4 * s_max^2 >> 2 here: the fixed alpha would diverge
    X = pinv(A, "ben_israel_cohen", iters=80, alpha=None)
    assert _rel(X, torch.linalg.pinv(A)) < 1e-10


def test_ben_israel_cohen_diverges_for_large_alpha():
    A = _rand((10, 6), seed=7)
    s_max = float(torch.linalg.matrix_norm(A, ord=2))
    alpha = 2.5 / s_max**2  # alpha * s_max^2 > 2
    X = pinv(A, "ben_israel_cohen", iters=30, alpha=alpha)
    assert not bool(torch.isfinite(X).all()) or float(X.norm()) > 1e6


def test_ben_israel_cohen_early_stop_is_spectral_filter():
    """After n steps each singular value s is mapped by x <- 2x - s^2 x^2 from x0 = alpha s."""
    A = _rand((8, 5), seed=8)
    A = A * (50.0 / torch.linalg.matrix_norm(A, ord=2))  # alpha * s_max^2 = 1.25 < 2
    alpha, n = 5e-4, 3
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    # X_k = V diag(c_k) U^T with c_0 = alpha s and c <- 2c - s c^2 (X A X = V diag(s c^2) U^T)
    c = alpha * S
    for _ in range(n):
        c = 2 * c - S * c**2
    expected = Vh.mT @ torch.diag(c) @ U.mT
    X = pinv(A, "ben_israel_cohen", iters=n, alpha=alpha)
    torch.testing.assert_close(X, expected, rtol=1e-10, atol=1e-12)
    # small singular values are not yet inverted: the soft pinv is far from the exact one there
    assert float((c * S).min()) < 0.9


def test_ben_israel_cohen_zero_iters_and_zero_matrix():
    A = _rand((4, 3), seed=9)
    torch.testing.assert_close(pinv(A, "ben_israel_cohen", iters=0), 5e-4 * A.mT)
    Z = torch.zeros(4, 3, dtype=torch.float64)
    assert torch.equal(pinv(Z, "ben_israel_cohen", alpha=None, iters=5), torch.zeros(3, 4, dtype=torch.float64))
    assert torch.equal(pinv(Z, "svd"), torch.zeros(3, 4, dtype=torch.float64))


@pytest.mark.parametrize("shapes", [((40, 8), (8, 30)), ((5, 8), (8, 30)), ((40, 8), (8, 6)), ((3, 20, 2), (2, 15))])
def test_pinv_of_product_matches_direct(shapes):
    a_shape, b_shape = shapes
    A = _rand(a_shape, seed=10)
    B = _rand(b_shape, seed=11)
    ref = torch.linalg.pinv(A @ B)
    assert _rel(pinv_of_product(A, B), ref) < 1e-10


def test_pinv_of_product_rank_deficient():
    A = _low_rank(30, 10, 3, seed=12)  # rank 3 through a rank-10 inner dimension
    B = _rand((10, 25), seed=13)
    ref = torch.from_numpy(np.linalg.pinv((A @ B).numpy()))
    assert _rel(pinv_of_product(A, B), ref) < 1e-9


def test_bad_arguments():
    A = _rand((4, 3))
    with pytest.raises(MemoryInputError, match="pinv method"):
        pinv(A, "qr")
    with pytest.raises(MemoryInputError, match="pinv method"):
        pinv(A, 1)  # integer mode codes are not accepted
    with pytest.raises(MemoryDtypeError, match="torch.Tensor"):
        pinv(A.numpy())
    with pytest.raises(MemoryDtypeError, match="float32 or float64"):
        pinv(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(MemoryInputError, match="matrix"):
        pinv(torch.ones(3, dtype=torch.float64))
    with pytest.raises(MemoryInputError, match="alpha"):
        pinv(A, "ben_israel_cohen", alpha=-1.0)
    with pytest.raises(MemoryInputError, match="iters"):
        pinv(A, "ben_israel_cohen", iters=-1)
    with pytest.raises(MemoryInputError, match="rcond"):
        pinv(A, "svd", rcond=-1.0)
    with pytest.raises(MemoryInputError, match="inner dimensions"):
        pinv_of_product(A, _rand((4, 4)))
    # errors are also plain ValueError / TypeError
    with pytest.raises(ValueError):
        pinv(A, "nope")
    with pytest.raises(TypeError):
        pinv([[1.0]])
