"""Key slots allocated as keys arrive: Gaussian addressing whose reference rows are the keys.

With ``"gaussian"`` addressing against a reference memory whose row ``k`` is a key, a query equal to
that key has weights one-hot on slot ``k`` (:func:`larimar.memory.gaussian_weights`), so each key
owns a slot and up to ``K`` keyed facts are stored without overlap, whatever ``C`` is. When the keys
are known in advance, :func:`larimar.memory.key_slot_reference` builds such a reference once.

Here the keys come one write at a time. The reference starts as far *sentinel* rows (no query ever
addresses them), and before each keyed write :func:`allocate_key_slots` gives every new key a free,
*unused* slot: its reference row becomes the key. A slot is unused while no write has touched it:
with Gaussian weights that underflow to exactly 0 on it, the Woodbury updates leave its row of
``M`` at the prior and its row of ``Cov`` at ``λ^{-1} e_k`` bit for bit (:meth:`unused_slots`).
Changing the reference row of an unused slot changes nothing already stored. The one thing it could
change is the address of a held key that sits *between* slots (written when no slot was free), which
forgetting recomputes. So the held keys' addresses are recomputed and compared, and slots are not
allocated when any of them would move, which keeps forgetting exact.

Pure tensor code on unbatched states ``M (K, C)``; the state is never modified in place.
"""

from __future__ import annotations

import dataclasses

import torch

from .errors import MemoryInputError, check_finite, check_last_dim, check_tensor
from .sequential import MemoryState

__all__ = ["allocate_key_slots", "unused_slots", "with_reference_rows"]


def _check_unbatched_gaussian(state: MemoryState, what: str) -> None:
    if state.addressing != "gaussian":
        raise MemoryInputError(f"{what} needs 'gaussian' addressing (other modes address every slot), got {state.addressing!r}")
    if state.M_base.ndim != 2:
        raise MemoryInputError(f"{what} works on unbatched memories (K, C), got shape {tuple(state.M_base.shape)}")


def unused_slots(state: MemoryState, *, rtol: float = 1e-9) -> torch.Tensor:
    """``(K,)`` bool: slots that no write has touched. The row of ``Cov`` equals ``λ^{-1} e_k`` to
    ``rtol`` relative, and the row of ``M`` the prior's to ``rtol`` times ``max(|M|, |M_prior|, 1)``
    (a slot written and then forgotten again counts as unused: only rounding is left)."""
    check_tensor(state.M_base, "M", ndims=(2,))
    M, cov, prior = state.M, state.cov, state.M_prior
    scale_m = max(float(M.abs().max()), float(prior.abs().max()), 1.0)  # floor: residues of a forgotten write
    m_ok = (M - prior).abs().amax(-1) <= rtol * scale_m  # (K,)
    ref_cov = torch.eye(state.K, dtype=cov.dtype, device=cov.device) / state.lam
    c_ok = (cov - ref_cov).abs().amax(-1) <= rtol / state.lam  # (K,)
    return m_ok & c_ok


def with_reference_rows(state: MemoryState, slots: torch.Tensor, rows: torch.Tensor) -> MemoryState:
    """A copy of ``state`` whose reference rows ``slots (n,)`` are ``rows (n, C)``.

    Only for unused slots of a ``"gaussian"`` memory (raises :class:`MemoryInputError` otherwise):
    what is stored does not change, only where future queries land. ``M_ref_pinv``, which Gaussian
    addressing does not use, is set to zeros rather than recomputed.
    """
    _check_unbatched_gaussian(state, "with_reference_rows")
    check_tensor(rows, "rows", ndims=(2,))
    check_last_dim(rows, "rows", state.C, "code size C")
    check_finite(rows, "rows")
    slots = torch.as_tensor(slots, dtype=torch.long).reshape(-1)
    if slots.numel() != rows.shape[0]:
        raise MemoryInputError(f"{slots.numel()} slots but {rows.shape[0]} rows")
    if slots.numel() == 0:
        return state
    if int(slots.min()) < 0 or int(slots.max()) >= state.K or slots.unique().numel() != slots.numel():
        raise MemoryInputError(f"slots must be distinct indices in [0, {state.K}), got {slots.tolist()}")
    free = unused_slots(state)
    taken = [int(k) for k in slots if not bool(free[k])]
    if taken:
        raise MemoryInputError(f"slots {taken} already hold written content; only unused slots can move")
    return _replace_rows(state, slots, rows)


def _replace_rows(state: MemoryState, slots: torch.Tensor, rows: torch.Tensor) -> MemoryState:
    """:func:`with_reference_rows` without its checks, for callers that picked ``slots`` among the
    unused ones themselves."""
    M_ref = state.M_ref.clone()
    M_ref[slots.to(M_ref.device)] = rows.to(M_ref)
    # Gaussian addressing never uses M_ref^†; recomputing it (an SVD, ~0.1-1 s at K = 512) at every
    # write would dominate, so it is not maintained: zeros make any misuse obvious.
    return dataclasses.replace(state, M_ref=M_ref, M_ref_pinv=torch.zeros_like(state.M_ref_pinv))


def allocate_key_slots(
    state: MemoryState,
    keys: torch.Tensor,
    held_keys: torch.Tensor | None = None,
    *,
    free: torch.Tensor | None = None,
    atol: float = 1e-5,
) -> tuple[MemoryState, torch.Tensor]:
    """Give each new key of ``keys (n, C)`` a free slot before it is written.

    A key that is already a reference row (within ``atol`` relative to its norm, e.g. the prompt of
    a fact written before) keeps that row's slot, and a repeat inside ``keys`` shares the slot of
    its first occurrence. The default tolerance absorbs float32 encoders, whose latents for one
    text differ by ~1e-7 between batches. The other keys take the free slots in index order. When
    there are fewer free slots than new keys, the first keys get them and the rest land between the
    nearest slots, as Gaussian addressing puts any query.

    ``free (K,)`` bool: slots that may be given out (default: :func:`unused_slots`); it is
    intersected with :func:`unused_slots`, so a slot holding content is never moved. Pass the
    slots whose rows are still sentinels to keep rows reserved for known keys.
    ``held_keys (m, C)``: the keys of the facts in memory (those forgetting will re-address). If
    their addresses would change, nothing is allocated.

    Returns ``(state, slots)``: the new state and the indices ``(a,)`` of the slots given out.
    """
    _check_unbatched_gaussian(state, "allocate_key_slots")
    check_tensor(keys, "keys", ndims=(2,))
    check_last_dim(keys, "keys", state.C, "code size C")
    check_finite(keys, "keys")
    keys = keys.to(state.M_ref)
    n = keys.shape[0]
    exact = "donot_use_mm_for_euclid_dist"  # no cancellation: repeats are ~1e-7 apart
    tol = atol * keys.norm(dim=-1).clamp_min(1.0)  # (n,)
    known = (torch.cdist(keys, state.M_ref, compute_mode=exact) <= tol[:, None]).any(-1)  # (n,) already a row
    earlier = torch.ones(n, n, dtype=torch.bool, device=keys.device).tril(-1)  # (n, n) j < i
    repeat = ((torch.cdist(keys, keys, compute_mode=exact) <= tol[:, None]) & earlier).any(-1)  # (n,)
    new = keys[~known & ~repeat]  # (n_new, C), in order
    none = torch.zeros(0, dtype=torch.long)
    if new.shape[0] == 0:
        return state, none
    usable = unused_slots(state)
    if free is not None:
        free = torch.as_tensor(free, dtype=torch.bool, device=usable.device).reshape(-1)
        if free.numel() != state.K:
            raise MemoryInputError(f"free must have K = {state.K} entries, got {free.numel()}")
        usable = usable & free
    slots = torch.nonzero(usable).reshape(-1)[: new.shape[0]].cpu()
    if slots.numel() == 0:
        return state, none
    moved = _replace_rows(state, slots, new[: slots.numel()])  # slots come from unused_slots above
    if held_keys is not None and held_keys.shape[0] > 0:
        held = held_keys.to(state.M_ref)
        if not torch.allclose(moved.address(held), state.address(held), rtol=0.0, atol=1e-12):
            return state, none
    return moved, slots
