"""Addressing: how encodings ``Z (N, C)`` are turned into slot weights ``W (N, K)``.

Modes (string options, validated):

``"current"``
    ``W = Z M^†`` with the *current* memory (Pham et al., generative pseudo-inverse memory). Needs a
    pseudo-inverse of ``M`` per call (``O(K C min(K, C))``), and ``W`` changes as the memory
    changes, so forgetting with recomputed weights is not exact — pass the ``W`` used at write
    time instead.
``"reference"``
    ``W = Z M_ref^†`` with a fixed reference memory ``M_ref`` (random, built from encodings, or a
    learned ``M0``). ``M_ref^†`` is computed once, so addressing costs ``O(N K C)``; ``W`` depends
    only on ``Z``, which makes forgetting exact.
``"gaussian"``
    Gaussian-convolution addressing (paper Eq. 7–8) against the rows of ``M_ref``:
    ``w_k ∝ exp(-||z - M_ref[k]||^2 / (2 α σ^2))`` with ``σ = min_k ||z - M_ref[k]||`` and
    ``Σ_k w_k = 1``. Also fixed, so forgetting is exact. As ``α → 0`` the weights become one-hot on
    the nearest slot (ties share the mass).

Every function accepts unbatched ``(N, C)`` / ``(K, C)`` or batched ``(B, N, C)`` / ``(B, K, C)``
tensors and never modifies its inputs.
"""

from __future__ import annotations

import torch

from .errors import (
    SUPPORTED_DTYPES,
    MemoryDtypeError,
    MemoryInputError,
    check_batch,
    check_choice,
    check_finite,
    check_int,
    check_last_dim,
    check_positive,
    check_same_kind,
    check_tensor,
)
from .pinv import pinv

__all__ = [
    "ADDRESSING_MODES",
    "REFERENCE_SELECTIONS",
    "check_addressing_mode",
    "address",
    "address_current",
    "address_reference",
    "gaussian_weights",
    "random_reference",
    "reference_from_encodings",
    "reference_from_tensor",
    "key_slot_reference",
]

ADDRESSING_MODES: tuple[str, ...] = ("current", "reference", "gaussian")
REFERENCE_SELECTIONS: tuple[str, ...] = ("first", "random")


def check_addressing_mode(mode: object) -> str:
    """Return ``mode`` if it is one of :data:`ADDRESSING_MODES`, else raise ``MemoryInputError``."""
    return check_choice(mode, "addressing mode", ADDRESSING_MODES)


def _check_z_against(Z: torch.Tensor, M: torch.Tensor, m_name: str) -> None:
    check_tensor(Z, "Z")
    check_same_kind(Z, "Z", M, m_name)
    check_last_dim(Z, "Z", M.shape[-1], f"code size C (from {m_name})")
    check_batch(Z, "Z", M, m_name)


def address_current(Z: torch.Tensor, M: torch.Tensor, *, pinv_method: str = "svd") -> torch.Tensor:
    """``W = Z M^†`` with the current memory ``M (…, K, C)``; returns ``(…, N, K)``."""
    check_tensor(M, "M")
    _check_z_against(Z, M, "M")
    return Z @ pinv(M, pinv_method)


def address_reference(Z: torch.Tensor, M_ref_pinv: torch.Tensor) -> torch.Tensor:
    """``W = Z M_ref^†`` given the cached ``M_ref^† (…, C, K)``; returns ``(…, N, K)``."""
    check_tensor(M_ref_pinv, "M_ref_pinv")
    check_tensor(Z, "Z")
    check_same_kind(Z, "Z", M_ref_pinv, "M_ref_pinv")
    if Z.shape[-1] != M_ref_pinv.shape[-2]:
        raise MemoryInputError(
            f"Z must have code size C = {M_ref_pinv.shape[-2]} (from M_ref_pinv of shape "
            f"{tuple(M_ref_pinv.shape)} = (C, K)), got shape {tuple(Z.shape)}"
        )
    check_batch(Z, "Z", M_ref_pinv, "M_ref_pinv")
    return Z @ M_ref_pinv


def gaussian_weights(Z: torch.Tensor, M_ref: torch.Tensor, *, alpha: float = 1.0) -> torch.Tensor:
    """Gaussian-convolution addressing weights (paper Eq. 7–8), each row summing to one.

    ``d²_k = ||z - M_ref[k]||²``, ``σ² = min_k d²_k`` and ``w = softmax_k(-d²_k / (2 α σ²))``
    (a softmax, so it is computed stably: the largest logit is ``-1 / (2α)``). If ``z``
    coincides with a row (``σ = 0``) the weights are one-hot on that row (split among exact ties).

    Args:
        Z: ``(N, C)`` or ``(B, N, C)``.
        M_ref: ``(K, C)`` or ``(B, K, C)``.
        alpha: bandwidth factor ``α > 0``.

    Returns:
        ``W (…, N, K)``, rows non-negative and summing to one.
    """
    check_tensor(M_ref, "M_ref")
    _check_z_against(Z, M_ref, "M_ref")
    alpha = check_positive(alpha, "gaussian alpha")
    # squared distances via the expansion ||z||^2 - 2 z.m + ||m||^2 (one O(N K C) matmul)
    d2 = (
        (Z * Z).sum(-1, keepdim=True)
        - 2.0 * (Z @ M_ref.mT)
        + (M_ref * M_ref).sum(-1).unsqueeze(-2)
    ).clamp_min(0.0)  # (…, N, K)
    sigma2 = d2.amin(-1, keepdim=True)  # (…, N, 1)
    tiny = torch.finfo(Z.dtype).tiny
    exact = sigma2 <= tiny
    logits = -d2 / (2.0 * alpha * sigma2.clamp_min(tiny))
    # rows where z hits a slot exactly: uniform over the zero-distance slots
    logits = torch.where(exact, torch.where(d2 <= tiny, 0.0, -torch.inf), logits)
    return torch.softmax(logits, dim=-1)


def address(
    Z: torch.Tensor,
    mode: str,
    *,
    M: torch.Tensor | None = None,
    M_ref: torch.Tensor | None = None,
    M_ref_pinv: torch.Tensor | None = None,
    alpha: float = 1.0,
    pinv_method: str = "svd",
) -> torch.Tensor:
    """Dispatch on ``mode``: ``"current"`` needs ``M``; ``"reference"`` needs ``M_ref_pinv`` (or
    ``M_ref``, pseudo-inverted on the fly); ``"gaussian"`` needs ``M_ref`` and ``alpha``.

    Returns ``W (…, N, K)``.
    """
    check_addressing_mode(mode)
    if mode == "current":
        if M is None:
            raise MemoryInputError("addressing mode 'current' needs the current memory M")
        return address_current(Z, M, pinv_method=pinv_method)
    if mode == "reference":
        if M_ref_pinv is None:
            if M_ref is None:
                raise MemoryInputError("addressing mode 'reference' needs M_ref_pinv or M_ref")
            check_tensor(M_ref, "M_ref")
            M_ref_pinv = pinv(M_ref, pinv_method)
        return address_reference(Z, M_ref_pinv)
    if M_ref is None:
        raise MemoryInputError("addressing mode 'gaussian' needs M_ref")
    return gaussian_weights(Z, M_ref, alpha=alpha)


# --------------------------------------------------------------------------------------------
# reference-memory constructors
# --------------------------------------------------------------------------------------------


def random_reference(
    K: int,
    C: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    std: float = 1.0,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Gaussian random reference memory ``M_ref ~ N(0, std² I)`` of shape ``(K, C)``
    (or ``(batch_size, K, C)``), reproducible through ``generator``."""
    check_int(K, "K", minimum=1)
    check_int(C, "C", minimum=1)
    std = check_positive(std, "std")
    if dtype not in SUPPORTED_DTYPES:
        raise MemoryDtypeError(f"dtype must be float32 or float64, got {dtype}")
    shape = (K, C) if batch_size is None else (check_int(batch_size, "batch_size", minimum=1), K, C)
    return std * torch.randn(shape, generator=generator, dtype=dtype, device=device)


def reference_from_encodings(
    Z: torch.Tensor,
    K: int,
    *,
    selection: str = "first",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Reference memory made of ``K`` rows of given encodings ``Z (…, N, C)`` (requires ``N >= K``).

    ``selection="first"`` takes rows ``0..K-1``; ``"random"`` takes a uniformly random subset of
    ``K`` distinct rows (same indices for every batch element, in random order) drawn from
    ``generator``. No clustering is done: with ``"gaussian"`` addressing the slots are then
    actual encodings, which keeps the nearest-slot distance ``σ`` meaningful. Returns a new tensor
    ``(…, K, C)``.
    """
    check_tensor(Z, "Z")
    check_int(K, "K", minimum=1)
    check_choice(selection, "reference selection", REFERENCE_SELECTIONS)
    check_finite(Z, "Z")
    N = Z.shape[-2]
    if N < K:
        raise MemoryInputError(f"need at least K = {K} encodings to build the reference, got N = {N}")
    if selection == "first":
        return Z[..., :K, :].clone()
    idx = torch.randperm(N, generator=generator, device=generator.device if generator is not None else "cpu")
    return Z.index_select(-2, idx[:K].to(Z.device))


def reference_from_tensor(M0: torch.Tensor) -> torch.Tensor:
    """Validate a given (e.g. learned) reference memory ``M0 (K, C)`` / ``(B, K, C)`` and return a
    detached copy, so later changes to the trained parameter do not silently change the state."""
    check_tensor(M0, "M0")
    check_finite(M0, "M0")
    return M0.detach().clone()


def key_slot_reference(keys: torch.Tensor, K: int, *, far: float = 1e3, scale: float = 1.0) -> torch.Tensor:
    """Reference memory ``(K, C)`` of *key slots* for Gaussian addressing: row ``i`` is key ``i``
    (the first ``K`` rows of ``keys (N, C)``), so a query equal to key ``i`` addresses slot ``i``
    alone and up to ``K`` keys each get a slot of their own, whatever ``C`` is (pseudo-inverse
    addressing separates at most ``C`` keys).

    With fewer keys than ``K`` the remaining rows are *sentinels*: the keys' centroid plus ``far``
    times their largest distance from it (at least ``scale``), along distinct coordinate axes (cycled
    when ``K - N > C``, each repeat one radius further out). A query near the keys has a nearest-key
    distance ``σ`` far below the sentinels' distance, so its Gaussian weight on them underflows to 0.
    With no keys at all (``keys (0, C)``) every row is a sentinel around the origin at radius
    ``far · scale`` (pass the typical norm of a key as ``scale``); :func:`larimar.memory.allocate_key_slots`
    then turns sentinels into slots as keys arrive. Unbatched only. Returns a new tensor.
    """
    if isinstance(keys, torch.Tensor) and keys.ndim == 2 and keys.shape[0] == 0 and keys.shape[1] > 0:
        if keys.dtype not in SUPPORTED_DTYPES:
            raise MemoryDtypeError(f"keys must be float32 or float64, got {keys.dtype}")
    else:
        check_tensor(keys, "keys", ndims=(2,))
        check_finite(keys, "keys")
    check_int(K, "K", minimum=1)
    far = check_positive(far, "far")
    scale = check_positive(scale, "scale")
    N, C = keys.shape
    rows = keys[:K].clone()
    missing = K - rows.shape[0]
    if missing <= 0:
        return rows
    centre = rows.mean(0) if N > 0 else torch.zeros(C, dtype=keys.dtype, device=keys.device)  # (C,)
    spread = float((rows - centre).norm(dim=-1).max()) if N > 0 else 0.0
    radius = far * max(spread, scale)
    j = torch.arange(missing, device=keys.device)
    axes = torch.zeros(missing, C, dtype=keys.dtype, device=keys.device)
    axes[j, j % C] = 1.0
    shells = (1 + j // C).to(keys.dtype).unsqueeze(-1)  # (missing, 1): 1, 1, ..., 2, 2, ...
    sentinels = centre + radius * shells * axes  # (missing, C)
    return torch.cat([rows, sentinels])
