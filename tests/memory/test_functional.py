"""Algorithm 1 (write / read / generate) against closed-form expectations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from larimar.memory import (
    MemoryDtypeError,
    MemoryInputError,
    generate,
    pinv,
    random_reference,
    read,
    write,
)

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def _rand(shape, seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,C", [(16, 32), (64, 32)])
def test_single_fact_readout_is_projection(dtype, K, C):
    """One fact z written with Algorithm 1, read with q via current-memory addressing: (<q,z>/|z|^2) z."""
    M0 = random_reference(K, C, generator=torch.Generator().manual_seed(1), dtype=dtype)
    z = _rand((1, C), seed=2, dtype=dtype)
    q = _rand((3, C), seed=3, dtype=dtype)
    M, W0 = write(z, M0)
    assert M.shape == (K, C) and W0.shape == (1, K)
    Z_read, W = read(q, M)
    expected = (q @ z.mT) / (z @ z.mT) * z  # (3, 1) * (1, C)
    assert _rel(Z_read, expected) < TOL[dtype] * 10
    assert W.shape == (3, K)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,K,C", [(10, 16, 32), (20, 64, 32), (8, 8, 12), (48, 48, 32), (30, 100, 20)])
def test_read_after_write_returns_episode(dtype, N, K, C):
    """read(write(Z)) == Z for N <= K (covers the factored SVD path when C < min(N, K))."""
    M0 = random_reference(K, C, generator=torch.Generator().manual_seed(N), dtype=dtype)
    Z = _rand((N, C), seed=K, dtype=dtype)
    M, _ = write(Z, M0)
    Z_read, _ = read(Z, M)
    assert _rel(Z_read, Z) < TOL[dtype] * 20


@pytest.mark.parametrize("N,K,C", [(40, 50, 12), (60, 30, 12), (10, 50, 12), (40, 50, 60)])
def test_write_matches_numpy_algorithm1(N, K, C):
    """M = pinv(Z pinv(M0)) Z computed independently with NumPy (both code paths of write)."""
    M0 = _rand((K, C), seed=1)
    Z = _rand((N, C), seed=2)
    M, W0 = write(Z, M0)
    W_ref = Z.numpy() @ np.linalg.pinv(M0.numpy())
    M_ref = np.linalg.pinv(W_ref) @ Z.numpy()
    assert _rel(W0, torch.from_numpy(W_ref)) < 1e-12
    assert _rel(M, torch.from_numpy(M_ref)) < 1e-9


@pytest.mark.parametrize("method", ["lstsq", "ben_israel_cohen"])
def test_pinv_methods_agree_with_svd(method):
    K, C, N = 12, 24, 6
    M0 = _rand((K, C), seed=4)
    Z = _rand((N, C), seed=5)
    M_svd, _ = write(Z, M0, pinv_method="svd")
    if method == "lstsq":
        M_other, _ = write(Z, M0, pinv_method="lstsq")
        assert _rel(M_other, M_svd) < 1e-10
    else:
        # the official 3-step iteration with alpha = 5e-4 is a heavily regularised approximation
        M_bic, _ = write(Z, M0, pinv_method="ben_israel_cohen")
        assert M_bic.shape == M_svd.shape and bool(torch.isfinite(M_bic).all())
        assert _rel(M_bic, M_svd) > 1e-3


def test_cached_m0_pinv_equals_recomputed():
    M0 = _rand((20, 8), seed=6)
    Z = _rand((30, 8), seed=7)
    M_a, W_a = write(Z, M0)
    M_b, W_b = write(Z, M0, M0_pinv=pinv(M0))
    torch.testing.assert_close(M_a, M_b)
    torch.testing.assert_close(W_a, W_b)


def test_noise_is_reproducible_and_inputs_untouched():
    M0 = _rand((16, 8), seed=8)
    Z = _rand((5, 8), seed=9)
    Z0, M00 = Z.clone(), M0.clone()
    a = write(Z, M0, noise_std=0.1, generator=torch.Generator().manual_seed(3))
    b = write(Z, M0, noise_std=0.1, generator=torch.Generator().manual_seed(3))
    c = write(Z, M0, noise_std=0.1, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    # noise_std = 0 is deterministic and ignores the generator
    d = write(Z, M0)
    e = write(Z, M0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(d[0], e[0])
    # read noise
    r1 = read(Z, d[0], sigma_w=0.5, generator=torch.Generator().manual_seed(1))
    r2 = read(Z, d[0], sigma_w=0.5, generator=torch.Generator().manual_seed(1))
    r0 = read(Z, d[0])
    assert torch.equal(r1[0], r2[0]) and not torch.equal(r1[0], r0[0])
    # the noisy weights are the clean ones plus sigma_w * eps
    eps = torch.randn(r0[1].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(r1[1], r0[1] + 0.5 * eps)
    torch.testing.assert_close(r1[0], r1[1] @ d[0])
    assert torch.equal(Z, Z0) and torch.equal(M0, M00)


@pytest.mark.parametrize("dtype", DTYPES)
def test_generate(dtype):
    M = _rand((2, 10, 6), seed=10, dtype=dtype)
    Zg = generate(M, 7, generator=torch.Generator().manual_seed(2))
    assert Zg.shape == (2, 7, 6) and Zg.dtype == dtype
    W = torch.randn((2, 7, 10), generator=torch.Generator().manual_seed(2), dtype=dtype)
    torch.testing.assert_close(Zg, W @ M)
    assert generate(M[0], 3).shape == (3, 6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_equals_looped(dtype):
    B, N, K, C = 3, 6, 12, 10
    M0 = _rand((B, K, C), seed=11, dtype=dtype)
    Z = _rand((B, N, C), seed=12, dtype=dtype)
    M, W0 = write(Z, M0)
    Zr, W = read(Z, M)
    for b in range(B):
        Mb, W0b = write(Z[b], M0[b])
        Zrb, Wb = read(Z[b], Mb)
        torch.testing.assert_close(M[b], Mb, rtol=TOL[dtype], atol=TOL[dtype])
        torch.testing.assert_close(W0[b], W0b, rtol=TOL[dtype], atol=TOL[dtype])
        torch.testing.assert_close(Zr[b], Zrb, rtol=TOL[dtype], atol=TOL[dtype])
    # an unbatched memory broadcasts over batched queries
    Zr2, _ = read(Z, M[0])
    torch.testing.assert_close(Zr2[1], read(Z[1], M[0])[0])


def test_bad_inputs():
    M0 = _rand((8, 4), seed=1)
    Z = _rand((3, 4), seed=2)
    with pytest.raises(MemoryInputError, match=r"Z must be 2-D or 3-D, got shape \(4,\)"):
        write(Z[0], M0)
    with pytest.raises(MemoryInputError, match=r"code size C.*= 4.*got shape \(3, 5\)"):
        write(_rand((3, 5)), M0)
    with pytest.raises(MemoryDtypeError, match="dtype mismatch"):
        write(Z.float(), M0)
    with pytest.raises(MemoryDtypeError, match="float32 or float64"):
        read(Z.half(), M0.half())
    bad = Z.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(MemoryInputError, match="Z contains non-finite values"):
        write(bad, M0)
    bad[1, 2] = float("inf")
    with pytest.raises(MemoryInputError, match="non-finite"):
        read(bad, M0)
    with pytest.raises(MemoryInputError, match="batch size mismatch"):
        write(_rand((2, 3, 4)), _rand((3, 8, 4)))
    with pytest.raises(MemoryInputError, match="noise_std"):
        write(Z, M0, noise_std=-1.0)
    with pytest.raises(MemoryInputError, match="sigma_w"):
        read(Z, M0, sigma_w=float("nan"))
    with pytest.raises(MemoryInputError, match="pinv_method"):
        write(Z, M0, pinv_method="exact")
    with pytest.raises(MemoryInputError, match=r"M0_pinv .* shape \(\.\.\., C=4, K=8\)"):
        write(Z, M0, M0_pinv=_rand((8, 4)))
    with pytest.raises(MemoryInputError, match="n must be >= 1"):
        generate(M0, 0)
    with pytest.raises(MemoryDtypeError, match="torch.Tensor"):
        read(Z.tolist(), M0)
