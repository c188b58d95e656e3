"""Addressing modes and reference-memory constructors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from larimar.memory import (
    MemoryDtypeError,
    MemoryInputError,
    address,
    address_current,
    address_reference,
    gaussian_weights,
    pinv,
    random_reference,
    reference_from_encodings,
    reference_from_tensor,
)


def _rand(shape, seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _gaussian_reference(Z, M_ref, alpha):
    """Direct (loop) evaluation of Eq. 7-8 in float64 NumPy."""
    Z, M = Z.double().numpy(), M_ref.double().numpy()
    out = np.zeros((Z.shape[0], M.shape[0]))
    for i, z in enumerate(Z):
        d = np.array([np.linalg.norm(z - m) for m in M])
        sigma = d.min()
        logits = -(d**2) / (2 * alpha * sigma**2)
        e = np.exp(logits - logits.max())
        out[i] = e / e.sum()
    return torch.from_numpy(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alpha", [0.3, 1.0, 5.0])
def test_gaussian_weights_match_formula_and_sum_to_one(dtype, alpha):
    Z = _rand((6, 5), seed=1, dtype=dtype)
    M_ref = _rand((9, 5), seed=2, dtype=dtype)
    W = gaussian_weights(Z, M_ref, alpha=alpha)
    assert W.shape == (6, 9) and W.dtype == dtype
    assert bool((W >= 0).all())
    torch.testing.assert_close(W.sum(-1), torch.ones(6, dtype=dtype))
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(W.double(), _gaussian_reference(Z, M_ref, alpha), rtol=tol, atol=tol)


def test_gaussian_weights_become_one_hot_as_alpha_goes_to_zero():
    Z = _rand((8, 4), seed=3)
    M_ref = _rand((10, 4), seed=4)
    nearest = torch.cdist(Z, M_ref).argmin(-1)
    one_hot = torch.nn.functional.one_hot(nearest, 10).double()
    errs = [float((gaussian_weights(Z, M_ref, alpha=a) - one_hot).abs().max()) for a in (1.0, 0.1, 0.01, 1e-4)]
    assert errs == sorted(errs, reverse=True)  # monotone approach
    assert errs[-1] < 1e-12
    assert errs[0] > 0.05


def test_gaussian_weights_exact_hit_and_extreme_scale():
    M_ref = _rand((5, 3), seed=5)
    Z = torch.cat([M_ref[2:3], 1e6 * _rand((1, 3), seed=6)])
    W = gaussian_weights(Z, M_ref)
    torch.testing.assert_close(W[0], torch.nn.functional.one_hot(torch.tensor(2), 5).double())
    assert bool(torch.isfinite(W).all())
    torch.testing.assert_close(W.sum(-1), torch.ones(2, dtype=torch.float64))


def test_gaussian_batched_equals_looped():
    Z = _rand((3, 4, 6), seed=7)
    M_ref = _rand((3, 5, 6), seed=8)
    W = gaussian_weights(Z, M_ref, alpha=0.7)
    for b in range(3):
        torch.testing.assert_close(W[b], gaussian_weights(Z[b], M_ref[b], alpha=0.7))


def test_reference_and_current_addressing():
    M_ref = _rand((12, 7), seed=9)
    Z = _rand((4, 7), seed=10)
    expected = torch.from_numpy(Z.numpy() @ np.linalg.pinv(M_ref.numpy()))
    torch.testing.assert_close(address_reference(Z, pinv(M_ref)), expected)
    torch.testing.assert_close(address_current(Z, M_ref), expected)
    torch.testing.assert_close(address(Z, "reference", M_ref=M_ref), expected)
    torch.testing.assert_close(address(Z, "reference", M_ref_pinv=pinv(M_ref)), expected)
    torch.testing.assert_close(address(Z, "current", M=M_ref), expected)
    torch.testing.assert_close(address(Z, "gaussian", M_ref=M_ref, alpha=2.0), gaussian_weights(Z, M_ref, alpha=2.0))


def test_mode_validation():
    Z = _rand((2, 3))
    M = _rand((4, 3))
    for bad in ("Reference", "cosine", 0, None):
        with pytest.raises(MemoryInputError, match="addressing mode"):
            address(Z, bad, M=M, M_ref=M)
    with pytest.raises(MemoryInputError, match="needs the current memory"):
        address(Z, "current")
    with pytest.raises(MemoryInputError, match="needs M_ref"):
        address(Z, "gaussian")
    with pytest.raises(MemoryInputError, match="gaussian alpha"):
        gaussian_weights(Z, M, alpha=0.0)
    with pytest.raises(MemoryInputError, match="code size C = 3"):
        address_reference(_rand((2, 4)), pinv(M))
    with pytest.raises(MemoryDtypeError, match="dtype mismatch"):
        gaussian_weights(Z.float(), M)


def test_random_reference_is_seeded():
    a = random_reference(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64, std=2.0)
    b = random_reference(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64, std=2.0)
    c = random_reference(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64, std=2.0)
    assert a.shape == (6, 4) and a.dtype == torch.float64
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(a, 2.0 * torch.randn((6, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    assert random_reference(6, 4, batch_size=3).shape == (3, 6, 4)
    with pytest.raises(MemoryInputError, match="K must be >= 1"):
        random_reference(0, 4)
    with pytest.raises(MemoryDtypeError):
        random_reference(3, 4, dtype=torch.int32)


def test_reference_from_encodings():
    Z = _rand((10, 3), seed=11)
    first = reference_from_encodings(Z, 4)
    assert torch.equal(first, Z[:4])
    first[0, 0] = 99.0  # a copy, not a view
    assert Z[0, 0] != 99.0
    rnd = reference_from_encodings(Z, 6, selection="random", generator=torch.Generator().manual_seed(3))
    rows = {tuple(r.tolist()) for r in rnd}
    assert len(rows) == 6 and rows <= {tuple(r.tolist()) for r in Z}
    rnd2 = reference_from_encodings(Z, 6, selection="random", generator=torch.Generator().manual_seed(3))
    assert torch.equal(rnd, rnd2)
    with pytest.raises(MemoryInputError, match="at least K = 11"):
        reference_from_encodings(Z, 11)
    with pytest.raises(MemoryInputError, match="reference selection"):
        reference_from_encodings(Z, 2, selection="kmeans")


def test_reference_from_tensor_copies_and_detaches():
    M0 = _rand((5, 3)).requires_grad_(True)
    M = reference_from_tensor(M0)
    assert not M.requires_grad and torch.equal(M, M0.detach())
    with torch.no_grad():
        M0.add_(1.0)
    assert not torch.equal(M, M0.detach())
    bad = _rand((5, 3))
    bad[0, 0] = float("inf")
    with pytest.raises(MemoryInputError, match="non-finite"):
        reference_from_tensor(bad)


# ------------------------------------------------------------------ key slots


def test_key_slot_reference_rows_and_far_sentinels():
    from larimar.memory import key_slot_reference

    g = torch.Generator().manual_seed(0)
    keys = torch.randn(5, 3, generator=g, dtype=torch.float64)
    ref = key_slot_reference(keys, 9)
    assert ref.shape == (9, 3)
    torch.testing.assert_close(ref[:5], keys, rtol=0, atol=0)
    # the sentinels are distinct, and each one is >= far x the keys' spread from the centroid
    spread = float((keys - keys.mean(0)).norm(dim=-1).max())
    d = (ref[5:] - keys.mean(0)).norm(dim=-1)
    assert bool((d >= 1e3 * spread * (1 - 1e-12)).all())
    assert torch.cdist(ref[5:], ref[5:]).add(torch.eye(4, dtype=ref.dtype)).min() > 0
    # queries near the keys never address a sentinel, and each key addresses its own slot alone
    q = keys + 0.3 * torch.randn(5, 3, generator=g, dtype=torch.float64)
    W = gaussian_weights(torch.cat([keys, q]), ref, alpha=0.1)
    assert float(W[:, 5:].max()) == 0.0
    torch.testing.assert_close(W[:5], torch.eye(5, 9, dtype=W.dtype), rtol=0, atol=1e-12)
    # more keys than K: the first K, no sentinels
    torch.testing.assert_close(key_slot_reference(keys, 4), keys[:4], rtol=0, atol=0)
    # more sentinels than dimensions: still all distinct
    many = key_slot_reference(keys[:1], 8)
    assert torch.cdist(many, many).add(torch.eye(8, dtype=many.dtype)).min() > 0


@pytest.mark.parametrize("bad", [torch.zeros(2, 2, 3), torch.tensor([[float("nan"), 0.0]])])
def test_key_slot_reference_rejects_bad_keys(bad):
    from larimar.memory import MemoryInputError, key_slot_reference

    with pytest.raises((MemoryInputError, ValueError, TypeError)):
        key_slot_reference(bad, 4)


def test_key_slots_store_more_keys_than_dimensions_exactly():
    """K = 24 keys in C = 6 dimensions: with key slots every value is read back exactly
    (scaled 1/(1+λ)); with pseudo-inverse addressing against any reference it cannot be."""
    from larimar.memory import MemoryState, key_slot_reference

    g = torch.Generator().manual_seed(3)
    keys = torch.randn(24, 6, generator=g, dtype=torch.float64)
    values = torch.randn(24, 6, generator=g, dtype=torch.float64)
    lam = 1e-2
    slots = MemoryState.init(key_slot_reference(keys, 24), lam=lam, addressing="gaussian", gaussian_alpha=0.1)
    slots = slots.write(values, slots.address(keys))  # keyed write: values stored at the keys' addresses
    torch.testing.assert_close(slots.read(keys), values / (1 + lam), rtol=1e-9, atol=1e-9)
    pinv = MemoryState.init(random_reference(24, 6, generator=g, dtype=torch.float64), lam=lam)
    pinv = pinv.write(values, pinv.address(keys))
    assert float((pinv.read(keys) - values).norm() / values.norm()) > 0.3


def test_key_slot_reference_without_keys_is_all_sentinels():
    from larimar.memory import key_slot_reference

    ref = key_slot_reference(torch.zeros(0, 3, dtype=torch.float64), 5, scale=2.0)
    assert ref.shape == (5, 3)
    torch.testing.assert_close(ref.norm(dim=-1), torch.tensor([2e3, 2e3, 2e3, 4e3, 4e3], dtype=torch.float64))
    assert torch.cdist(ref, ref).add(torch.eye(5, dtype=ref.dtype)).min() > 0
