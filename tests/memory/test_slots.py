"""Key slots allocated as keys arrive (larimar.memory.slots), against independent constructions."""

from __future__ import annotations

import pytest
import torch

from larimar.memory import (
    MemoryInputError,
    MemoryState,
    allocate_key_slots,
    closed_form_memory,
    key_slot_reference,
    unused_slots,
    with_reference_rows,
)

LAM = 1e-2


def _keys(n: int, C: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, C, generator=g, dtype=torch.float64), torch.randn(n, C, generator=g, dtype=torch.float64)


def _sentinels(K: int, C: int = 6) -> MemoryState:
    ref = key_slot_reference(torch.zeros(0, C, dtype=torch.float64), K, scale=10.0)
    return MemoryState.init(ref, lam=LAM, addressing="gaussian", gaussian_alpha=0.1)


def test_unused_slots_track_exactly_the_written_ones():
    keys, values = _keys(3)
    state = MemoryState.init(key_slot_reference(keys, 5, scale=10.0), lam=LAM, addressing="gaussian", gaussian_alpha=0.1)
    assert unused_slots(state).tolist() == [True] * 5
    state = state.write(values[1:2], state.address(keys[1:2]))
    assert unused_slots(state).tolist() == [True, False, True, True, True]
    # forgetting it again frees the slot (up to float rounding)
    assert unused_slots(state.forget(values[1:2], state.address(keys[1:2]))).tolist() == [True] * 5


def test_with_reference_rows_moves_only_unused_slots_and_keeps_the_memory():
    keys, values = _keys(3)
    state = MemoryState.init(key_slot_reference(keys[:1], 4, scale=10.0), lam=LAM, addressing="gaussian", gaussian_alpha=0.1)
    state = state.write(values[:1], state.address(keys[:1]))
    moved = with_reference_rows(state, torch.tensor([2]), keys[1:2])
    assert torch.equal(moved.M, state.M) and torch.equal(moved.cov, state.cov)
    assert torch.equal(moved.M_ref[2], keys[1]) and torch.equal(moved.M_ref[[0, 1, 3]], state.M_ref[[0, 1, 3]])
    with pytest.raises(MemoryInputError, match="already hold"):
        with_reference_rows(state, torch.tensor([0]), keys[1:2])
    with pytest.raises(MemoryInputError, match="distinct"):
        with_reference_rows(state, torch.tensor([1, 1]), keys[1:3])
    with pytest.raises(MemoryInputError, match="gaussian"):
        with_reference_rows(MemoryState.init(state.M_ref, lam=LAM), torch.tensor([1]), keys[1:2])


def test_keys_arriving_one_by_one_equal_keys_known_in_advance():
    """30 keys in C = 6 dimensions, written one at a time into sentinel slots: the memory equals the
    one built with all keys known up front, and each key reads its value back exactly."""
    keys, values = _keys(30)
    state, held = _sentinels(32), keys[:0]
    for i in range(30):
        state, slots = allocate_key_slots(state, keys[i : i + 1], held)
        assert slots.tolist() == [i]
        state = state.write(values[i : i + 1], state.address(keys[i : i + 1]))
        held = keys[: i + 1]
    known = MemoryState.init(key_slot_reference(keys, 32, scale=10.0), lam=LAM, addressing="gaussian", gaussian_alpha=0.1)
    known = known.write(values, known.address(keys))
    torch.testing.assert_close(state.M_ref[:30], keys, rtol=0, atol=0)
    torch.testing.assert_close(state.M, known.M, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(state.read(keys), values / (1 + LAM), rtol=1e-9, atol=1e-12)
    # a key seen before keeps its slot; a repeat inside one write takes one slot
    again, slots = allocate_key_slots(state, torch.cat([keys[3:4], keys[:0]]), held)
    assert slots.numel() == 0 and again is state
    _, slots = allocate_key_slots(_sentinels(4), torch.cat([keys[:1], keys[:1], keys[1:2]]))
    assert slots.tolist() == [0, 1]


def test_over_capacity_keys_land_between_slots_and_forgetting_stays_exact():
    keys, values = _keys(6)
    state, slots = allocate_key_slots(_sentinels(4), keys)
    assert slots.tolist() == [0, 1, 2, 3]  # the first four keys get slots
    W = state.address(keys)
    state = state.write(values, W)
    assert float(W[4:].max(-1).values.max()) < 1.0  # the last two spread over the nearest slots
    forgot = state.forget(values[4:5], state.address(keys[4:5]))
    keep = [0, 1, 2, 3, 5]
    direct = closed_form_memory(W[keep], values[keep], LAM, state.M_prior)
    torch.testing.assert_close(forgot.M, direct, rtol=1e-8, atol=1e-10)


def test_no_allocation_when_a_held_key_would_be_re_addressed():
    keys, values = _keys(3)
    ref = torch.cat([keys[:2], key_slot_reference(keys[:2], 3, scale=10.0)[2:]])
    state = MemoryState.init(ref, lam=LAM, addressing="gaussian", gaussian_alpha=1.0)
    between = (0.5 * (keys[0] + keys[1])).unsqueeze(0)  # written between the two slots
    state = state.write(values[:1], state.address(between))
    near = between + 1e-3  # a new key next to it would pull its address onto the new slot
    unchanged, slots = allocate_key_slots(state, near, between)
    assert slots.numel() == 0 and unchanged is state
    _, slots = allocate_key_slots(state, near)  # without held keys to protect, the slot is given
    assert slots.tolist() == [2]


def test_free_mask_keeps_reserved_rows_and_checks():
    keys, _ = _keys(4)
    state = MemoryState.init(key_slot_reference(keys[:2], 4, scale=10.0), lam=LAM, addressing="gaussian", gaussian_alpha=0.1)
    reserved = torch.tensor([True, True, False, False])
    _, slots = allocate_key_slots(state, keys[2:4], free=~reserved)
    assert slots.tolist() == [2, 3]
    with pytest.raises(MemoryInputError, match="K = 4"):
        allocate_key_slots(state, keys[2:3], free=torch.ones(3, dtype=torch.bool))
    with pytest.raises(MemoryInputError, match="gaussian"):
        allocate_key_slots(MemoryState.init(state.M_ref, lam=LAM), keys[2:3])
