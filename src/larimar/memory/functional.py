"""Algorithm 1 of Larimar (one-shot write, read, generate) as pure tensor functions.

Notation (paper): ``K`` memory slots, ``C`` code size, ``N`` rows in an episode.
``Z (N, C)`` encodings, ``M (K, C)`` memory, ``W (N, K)`` addressing weights; ``X^†`` is the
Moore–Penrose pseudo-inverse. Every function also takes a leading batch dimension
(``(B, N, C)`` / ``(B, K, C)``); an unbatched operand broadcasts against a batched one.
Nothing is modified in place and no global state (RNG included) is used: randomness comes only from
the optional ``generator``.
"""

from __future__ import annotations

import torch

from .errors import (
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
from .pinv import PINV_METHODS, pinv, product_pinv_factors

__all__ = ["write", "read", "generate"]


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def _check_pinv_of(P: torch.Tensor, name: str, M: torch.Tensor, M_name: str) -> None:
    check_tensor(P, name)
    check_same_kind(P, name, M, M_name)
    K, C = M.shape[-2:]
    if P.shape[-2:] != (C, K):
        raise MemoryInputError(
            f"{name} must be the pseudo-inverse of {M_name} with shape (..., C={C}, K={K}), "
            f"got {tuple(P.shape)}"
        )
    check_batch(P, name, M, M_name)


def _check_z_m(Z: torch.Tensor, z_name: str, M: torch.Tensor, m_name: str) -> None:
    check_tensor(Z, z_name)
    check_tensor(M, m_name)
    check_same_kind(Z, z_name, M, m_name)
    check_last_dim(Z, z_name, M.shape[-1], f"code size C (from {m_name})")
    check_batch(Z, z_name, M, m_name)
    check_finite(Z, z_name)
    check_finite(M, m_name)


def write(
    Z: torch.Tensor,
    M0: torch.Tensor,
    *,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
    pinv_method: str = "svd",
    M0_pinv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-shot write of an episode (Algorithm 1): ``M = W0^† Zξ`` with ``W0 = Zξ M0^†``.

    ``Zξ = Z + noise_std * ε`` with ``ε ~ N(0, I)`` drawn from ``generator``.

    With ``pinv_method="svd"`` and ``C < min(N, K)``, ``W0^†`` is obtained from the thin factors
    of ``W0 = Zξ M0^†`` (see :func:`larimar.memory.pinv.product_pinv_factors`) — the same exact
    pseudo-inverse, at ``O((N + K) C^2)`` instead of ``O(N K min(N, K))``.

    Args:
        Z: episode encodings ``(N, C)`` or ``(B, N, C)``.
        M0: prior / reference memory ``(K, C)`` or ``(B, K, C)``.
        noise_std: observation noise std (>= 0).
        generator: RNG for the noise.
        pinv_method: ``"svd"``, ``"lstsq"`` or ``"ben_israel_cohen"`` (see :func:`pinv`).
        M0_pinv: optional cached ``M0^†`` ``(C, K)`` / ``(B, C, K)``; M0 is usually fixed, so
            passing it skips one pseudo-inverse per write.

    Returns:
        ``(M, W0)``: posterior memory ``(…, K, C)`` and addressing weights ``(…, N, K)``.
    """
    _check_z_m(Z, "Z", M0, "M0")
    noise_std = check_positive(noise_std, "noise_std", allow_zero=True)
    check_choice(pinv_method, "pinv_method", PINV_METHODS)
    if M0_pinv is not None:
        _check_pinv_of(M0_pinv, "M0_pinv", M0, "M0")
        P = M0_pinv
    else:
        P = pinv(M0, pinv_method)  # (…, C, K)
    Z_xi = Z + noise_std * _randn_like(Z, generator) if noise_std > 0 else Z
    W0 = Z_xi @ P  # (…, N, K)
    N, C = Z.shape[-2:]
    K = M0.shape[-2]
    if pinv_method == "svd" and C < min(N, K):
        left, s_inv, right = product_pinv_factors(Z_xi, P)  # W0^† = left diag(s_inv) right
        M = left @ (s_inv.unsqueeze(-1) * (right @ Z_xi))
    else:
        M = pinv(W0, pinv_method) @ Z_xi  # (…, K, C)
    return M, W0


def read(
    Z: torch.Tensor,
    M: torch.Tensor,
    *,
    sigma_w: float = 0.0,
    generator: torch.Generator | None = None,
    pinv_method: str = "svd",
    M_pinv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read with queries ``Z``: ``W = Z M^† (+ sigma_w ε)``, ``Z_read = W M``.

    Args:
        Z: queries ``(N, C)`` or ``(B, N, C)``.
        M: memory ``(K, C)`` or ``(B, K, C)``.
        sigma_w: std of Gaussian noise added to the weights (>= 0).
        generator: RNG for that noise.
        pinv_method: see :func:`pinv`.
        M_pinv: optional cached ``M^†`` ``(C, K)`` / ``(B, C, K)``.

    Returns:
        ``(Z_read, W)``: read-out ``(…, N, C)`` and weights ``(…, N, K)``.
    """
    _check_z_m(Z, "Z", M, "M")
    sigma_w = check_positive(sigma_w, "sigma_w", allow_zero=True)
    check_choice(pinv_method, "pinv_method", PINV_METHODS)
    if M_pinv is not None:
        _check_pinv_of(M_pinv, "M_pinv", M, "M")
        P = M_pinv
    else:
        P = pinv(M, pinv_method)
    W = Z @ P
    if sigma_w > 0:
        W = W + sigma_w * _randn_like(W, generator)
    return W @ M, W


def generate(M: torch.Tensor, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample ``n`` encodings from memory: ``W ~ N(0, I)`` ``(…, n, K)``, ``Z = W M`` ``(…, n, C)``."""
    check_tensor(M, "M")
    check_int(n, "n", minimum=1)
    check_finite(M, "M")
    W = torch.randn((*M.shape[:-2], n, M.shape[-2]), generator=generator, dtype=M.dtype, device=M.device)
    return W @ M
