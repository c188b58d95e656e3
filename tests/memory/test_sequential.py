"""Sequential write/forget (Eq. 2-4) against the closed-form ridge solution, and MemoryState."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from larimar.memory import (
    ForgetError,
    MemoryDtypeError,
    MemoryInputError,
    MemoryState,
    closed_form_memory,
    random_reference,
    sequential_forget,
    sequential_write,
)
from larimar.memory.sequential import FOLD_ROWS

F64 = torch.float64


def _rand(shape, seed=0, dtype=F64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _state(K=24, C=12, *, seed=0, dtype=F64, lam=1.0, **kw):
    M_ref = random_reference(K, C, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return MemoryState.init(M_ref, lam=lam, **kw)


def _snapshot(state):
    return {f.name: (v.clone() if isinstance(v := getattr(state, f.name), torch.Tensor) else v) for f in dataclasses.fields(state)}


def _assert_unchanged(state, snap):
    for name, v in snap.items():
        cur = getattr(state, name)
        if isinstance(v, torch.Tensor):
            assert torch.equal(cur, v), name
        else:
            assert cur == v, name


def _episodes(n, C, seed, sizes=(1, 1, 3, 2), scale=1.0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(sizes[i % len(sizes)], C, generator=g, dtype=dtype) for i in range(n)]


def _cov_reference(W_list, lam, K):
    W = torch.cat(W_list)
    return torch.linalg.inv(lam * torch.eye(K, dtype=W.dtype) + W.mT @ W)


@pytest.mark.parametrize("addressing", ["reference", "gaussian", "current"])
@pytest.mark.parametrize("lam", [0.1, 1.0, 10.0])
def test_sequential_equals_closed_form(addressing, lam):
    K, C = 20, 12
    M_prior = _rand((K, C), seed=5)
    state = _state(K, C, lam=lam, addressing=addressing, M_prior=M_prior)
    eps = _episodes(30, C, seed=1)
    Ws = []
    for Z in eps:
        Ws.append(state.address(Z))  # the weights the write will use
        state = state.write(Z)
    M_cf = closed_form_memory(Ws, eps, lam, M_prior)
    assert _rel(state.M, M_cf) <= 1e-8
    assert _rel(state.cov, _cov_reference(Ws, lam, K)) <= 1e-8
    assert state.n_rows == sum(z.shape[0] for z in eps) and state.n_writes == 30


def test_chunked_writes_equal_one_batch_write():
    K, C = 16, 10
    Z = _rand((12, C), seed=2)
    one = _state(K, C).write(Z)
    chunked = _state(K, C)
    for chunk in (Z[:1], Z[1:5], Z[5:6], Z[6:12]):
        chunked = chunked.write(chunk)
    assert _rel(chunked.M, one.M) < 1e-12
    assert _rel(chunked.cov, one.cov) < 1e-12
    assert _rel(chunked.precision, one.precision) < 1e-14
    assert chunked.n_rows == one.n_rows == 12
    rows = _state(K, C)
    for i in range(12):
        rows = rows.write(Z[i : i + 1])
    assert _rel(rows.M, one.M) < 1e-12 and _rel(rows.cov, one.cov) < 1e-12


@pytest.mark.parametrize("j", [0, 3, 7])
def test_forget_equals_closed_form_without_episode(j):
    K, C, lam = 20, 8, 0.5
    state = _state(K, C, lam=lam, addressing="reference")
    eps = _episodes(10, C, seed=3)
    for Z in eps:
        state = state.write(Z)
    forgotten = state.forget(eps[j])  # W_j recomputed from the fixed reference memory
    keep = [z for i, z in enumerate(eps) if i != j]
    Ws = [forgotten.address(z) for z in keep]
    assert _rel(forgotten.M, closed_form_memory(Ws, keep, lam, state.M_prior)) <= 1e-8
    assert _rel(forgotten.cov, _cov_reference(Ws, lam, K)) <= 1e-8
    assert forgotten.n_rows == state.n_rows - eps[j].shape[0]
    assert forgotten.n_forgets == 1


def test_forget_rows_across_episodes_and_back_to_prior():
    K, C = 12, 6
    state0 = _state(K, C, M_prior=_rand((K, C), seed=4), addressing="gaussian", gaussian_alpha=0.5)
    Z = _rand((5, C), seed=5)
    state = state0.write(Z[:3]).write(Z[3:])
    # rows of different episodes, forgotten together and one at a time
    s1 = state.forget(Z[[1, 4]])
    s2 = state.forget(Z[1:2]).forget(Z[4:5])
    assert _rel(s1.M, s2.M) < 1e-12 and _rel(s1.cov, s2.cov) < 1e-12
    empty = s1.forget(Z[[0, 2, 3]])
    assert empty.n_rows == 0
    assert _rel(empty.M, state0.M_prior) < 1e-12
    assert _rel(empty.cov, torch.eye(K, dtype=F64)) < 1e-12


def test_write_1000_forget_500_in_random_order():
    K, C, lam = 96, 32, 1.0
    state = _state(K, C, lam=lam, seed=11)
    g = torch.Generator().manual_seed(12)
    eps = [torch.randn(1 if i % 4 else 2, C, generator=g, dtype=F64) for i in range(1000)]
    for Z in eps:
        state = state.write(Z)
    order = torch.randperm(1000, generator=g)[:500].tolist()
    for j in order:
        state = state.forget(eps[j])
    gone = set(order)
    keep = [z for i, z in enumerate(eps) if i not in gone]
    Ws = [state.address(z) for z in keep]
    assert _rel(state.M, closed_form_memory(Ws, keep, lam, state.M_prior)) <= 1e-8
    assert _rel(state.cov, _cov_reference(Ws, lam, K)) <= 1e-8
    assert state.n_rows == sum(z.shape[0] for z in keep)
    assert state.drift() < 1e-8


def test_float32_sequential_is_close_to_float64_closed_form():
    K, C = 64, 32
    st32 = _state(K, C, dtype=torch.float32, seed=2)
    eps = _episodes(200, C, seed=6, dtype=torch.float32)
    for Z in eps:
        st32 = st32.write(Z)
    for Z in eps[::3]:
        st32 = st32.forget(Z)
    keep = [z for i, z in enumerate(eps) if i % 3]
    st64 = st32.to(dtype=F64)
    Ws = [st64.address(z.double()) for z in keep]
    M_cf = closed_form_memory(Ws, [z.double() for z in keep], 1.0, st64.M_prior)
    assert st32.M.dtype == torch.float32
    assert _rel(st32.M.double(), M_cf) < 1e-3
    assert st32.drift() < 1e-3
    refreshed = st32.refresh()
    assert _rel(refreshed.M.double(), M_cf) < 1e-4


def test_tracked_precision_and_moment_are_exact_sums():
    K, C, lam = 16, 8, 0.5
    M_prior = _rand((K, C), seed=3)
    state = _state(K, C, lam=lam, M_prior=M_prior)
    eps = _episodes(90, C, seed=4)  # 157 rows: several folds of the row log happen on the way
    for Z in eps:
        state = state.write(Z)
    for Z in eps[:10]:
        state = state.forget(Z)
    keep = eps[10:]
    W = torch.cat([state.address(z) for z in keep])
    Z = torch.cat(keep)
    assert state.pending is None or state.pending.L < FOLD_ROWS
    torch.testing.assert_close(state.precision, lam * torch.eye(K, dtype=F64) + W.mT @ W, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.moment, lam * M_prior + W.mT @ Z, rtol=1e-12, atol=1e-12)
    # the logged rows are private copies: modifying the caller's tensor later changes nothing
    z = _rand((1, C), seed=5)
    s2 = state.write(z)
    before = s2.moment.clone()
    z.mul_(100.0)
    assert torch.equal(s2.moment, before)


def test_refresh_and_drift():
    state = _state(16, 8)
    for Z in _episodes(40, 8, seed=7):
        state = state.write(Z)
    fresh = state.refresh()
    assert _rel(fresh.M, state.M) < 1e-12 and _rel(fresh.cov, state.cov) < 1e-12
    # a corrupted covariance is detected and repaired
    state = fresh
    assert state.pending is None
    broken = dataclasses.replace(state, cov_base=state.cov * 1.01)
    assert broken.drift() > 1e-3
    assert broken.refresh().drift() < 1e-12
    untracked = _state(16, 8, track_precision=False).write(_rand((2, 8)))
    assert untracked.precision is None and untracked.moment is None
    with pytest.raises(MemoryInputError, match="track_precision=True"):
        untracked.refresh()
    with pytest.raises(MemoryInputError, match="track_precision=True"):
        untracked.drift()


def test_explicit_w_and_pure_functions():
    K, C = 10, 6
    state = _state(K, C, M_prior=_rand((K, C), seed=7))
    Z = _rand((3, C), seed=8)
    W = torch.softmax(_rand((3, K), seed=9), -1)
    Z0, W0 = Z.clone(), W.clone()
    s = state.write(Z, W)
    M, cov = sequential_write(state.M, state.cov, Z, W)
    torch.testing.assert_close(s.M, M, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(s.cov, cov, rtol=1e-14, atol=1e-14)
    assert _rel(s.M, closed_form_memory(W, Z, 1.0, state.M_prior)) < 1e-12
    M2, cov2 = sequential_forget(M, cov, Z, W)
    assert _rel(M2, state.M) < 1e-12 and _rel(cov2, state.cov) < 1e-12
    s1 = s.forget(Z[1:2], W[1:2])
    assert _rel(s1.M, closed_form_memory(W[[0, 2]], Z[[0, 2]], 1.0, state.M_prior)) < 1e-12
    assert torch.equal(Z, Z0) and torch.equal(W, W0)


def test_batched_state_equals_looped():
    B, K, C = 3, 14, 6
    M_ref = random_reference(K, C, generator=torch.Generator().manual_seed(1), dtype=F64, batch_size=B)
    batched = MemoryState.init(M_ref, lam=0.7, M_prior=_rand((K, C), seed=2))
    singles = [MemoryState.init(M_ref[b], lam=0.7, M_prior=_rand((K, C), seed=2)) for b in range(B)]
    eps = [_rand((B, n, C), seed=10 + i) for i, n in enumerate((1, 4, 1, 2))]
    for Z in eps:
        batched = batched.write(Z)
        singles = [s.write(Z[b]) for b, s in enumerate(singles)]
    batched = batched.forget(eps[0]).forget(eps[1])
    singles = [s.forget(eps[0][b]).forget(eps[1][b]) for b, s in enumerate(singles)]
    q = _rand((B, 2, C), seed=99)
    for b in range(B):
        assert _rel(batched.M[b], singles[b].M) < 1e-12
        assert _rel(batched.cov[b], singles[b].cov) < 1e-12
        assert _rel(batched.precision[b], singles[b].precision) < 1e-12
        assert _rel(batched.read(q)[b], singles[b].read(q[b])) < 1e-12
    assert batched.batch_size == B and batched.n_rows == 3


def test_states_share_bases_and_fold_the_log():
    K, C = 12, 6
    s0 = _state(K, C)
    s1 = s0.write(_rand((1, C), seed=1))
    s2 = s1.write(_rand((2, C), seed=2))
    # no K x K / K x C buffer is written per operation: the bases are shared
    assert s1.cov_base is s0.cov_base and s2.M_base is s0.M_base
    assert s2.pending.L == 3 and s0.pending is None
    # the old states are untouched and still correct
    assert torch.equal(s0.M, torch.zeros(K, C, dtype=F64))
    torch.testing.assert_close(s1.M, s0.write(_rand((1, C), seed=1)).M)
    # reading through the log equals reading the materialised memory
    q = _rand((4, C), seed=3)
    torch.testing.assert_close(s2.read(q), s2.address(q) @ s2.M)
    s3 = s2.forget(_rand((1, C), seed=1))
    torch.testing.assert_close(s3.read(q), s3.address(q) @ s3.M)
    torch.testing.assert_close(s3.M, s0.write(_rand((2, C), seed=2)).M)
    # the log is folded into new bases every FOLD_ROWS rows
    s = s0
    for i in range(FOLD_ROWS):
        s = s.write(_rand((1, C), seed=10 + i))
    assert s.pending is None and s.cov_base is not s0.cov_base
    assert torch.equal(s.cov_base, s.cov_base.mT)  # symmetrised when folded
    big = s0.write(_rand((FOLD_ROWS + 1, C), seed=4))
    assert big.pending is None


def test_read_and_address():
    state = _state(12, 6, addressing="reference")
    Z = _rand((4, 6), seed=3)
    s = state.write(Z)
    W = s.address(Z)
    torch.testing.assert_close(W, Z @ torch.linalg.pinv(s.M_ref))
    Zr, W2 = s.read(Z, return_weights=True)
    torch.testing.assert_close(Zr, W @ s.M)
    assert torch.equal(W, W2) and torch.equal(s.read(Z), Zr)
    cur = _state(12, 6, addressing="current").write(Z)
    torch.testing.assert_close(cur.address(Z), Z @ torch.linalg.pinv(cur.M))
    # current addressing defaults to the reference memory as prior (a zero memory addresses nothing)
    assert torch.equal(_state(12, 6, addressing="current").M, _state(12, 6).M_ref)
    assert torch.equal(_state(12, 6).M, torch.zeros(12, 6, dtype=F64))


def test_to_dtype_and_repr():
    s = _state(8, 4).write(_rand((2, 4)))
    s32 = s.to(dtype=torch.float32)
    assert s32.dtype == torch.float32 and s32.precision.dtype == torch.float32
    assert s32.n_rows == 2 and s.dtype == F64
    s32.write(torch.zeros(1, 4))
    assert "K=8" in repr(s) and "n_rows=2" in repr(s)
    with pytest.raises(MemoryDtypeError):
        s.to(dtype=torch.int64)


def test_forgetting_what_was_never_written_is_detected():
    K, C = 16, 8
    state = _state(K, C)
    with pytest.raises(ForgetError, match="only 0 row"):
        state.forget(_rand((1, C)))
    Z = _rand((2, C), seed=1)
    state = state.write(Z)
    snap = _snapshot(state)
    with pytest.raises(ForgetError, match="cannot forget 3 row"):
        state.forget(_rand((3, C)))
    # a never-written episode with large weights makes I - W Cov W^T indefinite
    with pytest.raises(ForgetError, match="not in memory"):
        state.forget(100.0 * _rand((1, C), seed=5))
    with pytest.raises(ForgetError, match="not in memory"):
        state.forget(100.0 * _rand((2, C), seed=6))
    # forgetting the same row twice: the second time it is no longer in memory (the row count
    # alone would still allow it); with a small ridge its weight is large relative to Cov
    sharp = _state(K, C, lam=0.01).write(Z[:1]).write(Z[1:])
    once = sharp.forget(Z[:1])
    with pytest.raises(ForgetError, match="not in memory"):
        once.forget(Z[:1])
    # documented limit: a never-written episode with small weights cannot be told apart
    assert state.forget(1e-3 * _rand((1, C), seed=7)).n_rows == 1
    _assert_unchanged(state, snap)
    # ForgetError is a ValueError
    assert issubclass(ForgetError, ValueError)


def test_bad_inputs_leave_state_unchanged():
    K, C = 10, 5
    state = _state(K, C).write(_rand((2, C)))
    snap = _snapshot(state)
    Z = _rand((1, C), seed=3)
    nan = Z.clone()
    nan[0, 1] = float("nan")
    cases = [
        (lambda: state.write(Z[0]), MemoryInputError, r"Z must be 2-D, got shape \(5,\)"),
        (lambda: state.write(_rand((1, 1, C))), MemoryInputError, "Z must be 2-D"),
        (lambda: state.write(_rand((1, C + 1))), MemoryInputError, r"code size C = 5"),
        (lambda: state.write(Z.float()), MemoryDtypeError, "dtype mismatch"),
        (lambda: state.write(nan), MemoryInputError, "Z contains non-finite"),
        (lambda: state.write(Z, torch.ones(1, K + 1, dtype=F64)), MemoryInputError, r"W must have shape \(1, 10\)"),
        (lambda: state.write(Z, torch.full((1, K), float("inf"), dtype=F64)), MemoryInputError, "W contains"),
        (lambda: state.forget(nan), MemoryInputError, "non-finite"),
        (lambda: state.read(nan), MemoryInputError, "non-finite"),
        (lambda: state.read(_rand((1, C + 2))), MemoryInputError, "code size"),
        (lambda: state.write("z"), MemoryDtypeError, "torch.Tensor"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()
        _assert_unchanged(state, snap)
    M_ref = _rand((K, C))
    for kwargs, exc, msg in [
        ({"lam": 0.0}, MemoryInputError, "lam must be finite and > 0"),
        ({"lam": -1.0}, MemoryInputError, "lam"),
        ({"lam": float("inf")}, MemoryInputError, "lam"),
        ({"addressing": "nearest"}, MemoryInputError, "addressing mode"),
        ({"addressing": 1}, MemoryInputError, "addressing mode"),
        ({"pinv_method": "qr"}, MemoryInputError, "pinv_method"),
        ({"M_prior": _rand((K + 1, C))}, MemoryInputError, "M_prior must have shape"),
        ({"M_prior": M_ref.float()}, MemoryDtypeError, "dtype mismatch"),
        ({"gaussian_alpha": -1.0}, MemoryInputError, "gaussian_alpha"),
    ]:
        with pytest.raises(exc, match=msg):
            MemoryState.init(M_ref, **kwargs)
    nan_ref = M_ref.clone()
    nan_ref[0, 0] = float("nan")
    with pytest.raises(MemoryInputError, match="M_ref contains non-finite"):
        MemoryState.init(nan_ref)
    with pytest.raises(MemoryInputError, match="batch size mismatch"):
        MemoryState.init(_rand((2, K, C))).write(_rand((3, 1, C)))
    # inconsistent hand-built states are rejected
    with pytest.raises(MemoryInputError, match="cov_base must have shape"):
        dataclasses.replace(state, cov_base=torch.eye(K + 1, dtype=F64))


def test_closed_form_validation():
    with pytest.raises(MemoryInputError, match="same rows"):
        closed_form_memory(_rand((3, 4)), _rand((2, 5)), 1.0, _rand((4, 5)))
    with pytest.raises(MemoryInputError, match="lam"):
        closed_form_memory(_rand((3, 4)), _rand((3, 5)), 0.0, _rand((4, 5)))
    with pytest.raises(MemoryInputError, match="non-empty list"):
        closed_form_memory([], [], 1.0, _rand((4, 5)))
    # stacked and list forms agree, and the solution satisfies the normal equations
    W, Z, P = _rand((6, 4), 1), _rand((6, 5), 2), _rand((4, 5), 3)
    M = closed_form_memory(W, Z, 2.0, P)
    torch.testing.assert_close(M, closed_form_memory([W[:2], W[2:]], [Z[:2], Z[2:]], 2.0, P))
    torch.testing.assert_close((2.0 * torch.eye(4, dtype=F64) + W.mT @ W) @ M, 2.0 * P + W.mT @ Z)
