"""Moore–Penrose pseudo-inverses used by the memory (exact and the paper's iterative one).

All functions accept a single matrix ``(m, n)`` or a batch ``(..., m, n)`` and return ``(..., n, m)``.
Inputs are never modified.
"""

from __future__ import annotations

import torch

from .errors import MemoryDtypeError, MemoryInputError, SUPPORTED_DTYPES, check_choice, check_int

__all__ = ["PINV_METHODS", "pinv", "pinv_of_product", "product_pinv_factors"]

PINV_METHODS: tuple[str, ...] = ("svd", "lstsq", "ben_israel_cohen")

#: Step size of the Ben-Israel–Cohen initialisation ``X0 = alpha * A^T`` in the official code.
BIC_ALPHA: float = 5e-4
#: Number of Ben-Israel–Cohen steps in the official code (``pseudoinverse_approx_step``).
BIC_ITERS: int = 3


def _check_matrix(A: object, name: str = "A") -> torch.Tensor:
    if not isinstance(A, torch.Tensor):
        raise MemoryDtypeError(f"{name} must be a torch.Tensor, got {type(A).__name__}")
    if A.dtype not in SUPPORTED_DTYPES:
        raise MemoryDtypeError(f"{name} must be float32 or float64, got {A.dtype}")
    if A.ndim < 2:
        raise MemoryInputError(f"{name} must be a matrix (..., m, n), got shape {tuple(A.shape)}")
    if A.shape[-1] == 0 or A.shape[-2] == 0:
        raise MemoryInputError(f"{name} must not have an empty dimension, got shape {tuple(A.shape)}")
    return A


def _default_rcond(m: int, n: int, dtype: torch.dtype) -> float:
    # the LAPACK / NumPy convention: singular values below max(m, n) * eps * s_max count as zero
    return max(m, n) * torch.finfo(dtype).eps


def _pinv_svd(A: torch.Tensor, rcond: float) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)  # U (..., m, r), S (..., r), Vh (..., r, n)
    cutoff = rcond * S[..., :1]  # singular values are sorted descending
    S_inv = torch.where(S > cutoff, 1.0 / S, torch.zeros_like(S))
    return (Vh.mT * S_inv.unsqueeze(-2)) @ U.mT


def _pinv_lstsq(A: torch.Tensor, rcond: float | None) -> torch.Tensor:
    m, n = A.shape[-2:]
    if A.device.type == "cpu":
        eye = torch.eye(m, dtype=A.dtype, device=A.device).expand(*A.shape[:-2], m, m)
        # gelsd: SVD-based minimum-norm least squares, handles rank deficiency
        return torch.linalg.lstsq(A, eye, rcond=rcond, driver="gelsd").solution
    # accelerators only offer QR-based "gels", which requires full rank and a tall matrix:
    # pinv(A) = pinv(A^T)^T lets a wide A go through the tall path.
    if m >= n:
        eye = torch.eye(m, dtype=A.dtype, device=A.device).expand(*A.shape[:-2], m, m)
        return torch.linalg.lstsq(A, eye, driver="gels").solution
    return _pinv_lstsq(A.mT, rcond).mT


def _pinv_bic(A: torch.Tensor, iters: int, alpha: float | None) -> torch.Tensor:
    if alpha is None:
        # sigma_max^2 <= ||A||_1 * ||A||_inf, so this alpha always satisfies alpha * sigma_max^2 <= 1 < 2
        bound = A.abs().sum(-2).amax(-1) * A.abs().sum(-1).amax(-1)  # (...)
        a = torch.where(bound > 0, 1.0 / bound, torch.zeros_like(bound))[..., None, None]
        X = a * A.mT
    else:
        X = alpha * A.mT
    m, n = A.shape[-2:]
    for _ in range(iters):
        # X <- 2X - X A X ; associate the product so the intermediate square is min(m, n) wide
        XAX = X @ (A @ X) if m <= n else (X @ A) @ X
        X = 2.0 * X - XAX
    return X


def pinv(
    A: torch.Tensor,
    method: str = "svd",
    *,
    rcond: float | None = None,
    iters: int = BIC_ITERS,
    alpha: float | None = BIC_ALPHA,
) -> torch.Tensor:
    """Moore–Penrose pseudo-inverse ``A^†`` of ``A`` (``(..., m, n)`` -> ``(..., n, m)``).

    Methods (string options, validated):

    ``"svd"`` (default)
        Thin SVD ``A = U S V^T``; singular values ``<= rcond * s_max`` are treated as zero, the rest
        inverted: ``A^† = V S^{-1} U^T``. Exact up to rounding and numerically stable for any rank.
        Cost ``O(m n min(m, n))``. Differentiable, but the SVD backward is ill-conditioned when
        singular values are (nearly) repeated or cross the ``rcond`` cut-off.
    ``"lstsq"``
        Minimum-norm least-squares solve of ``A X = I_m`` (LAPACK ``gelsd`` on CPU, which is SVD
        based and rank-revealing; ``rcond`` as above). Same result as ``"svd"`` up to rounding and
        similar cost. On accelerators only the QR driver ``gels`` exists, which assumes ``A`` has
        full rank (rank-deficient inputs then give garbage). Autograd is supported for full-rank
        inputs only.
    ``"ben_israel_cohen"``
        The iteration of the official Larimar code: ``X_0 = alpha * A^T``,
        ``X <- 2 X - X A X`` for ``iters`` steps (defaults ``alpha = 5e-4``, ``iters = 3`` as in the
        official code). Each step maps every singular value ``s`` through
        ``1 - s^2 x_{k+1} = (1 - s^2 x_k)^2``, so

        * it converges (quadratically, to the exact ``A^†``) only if ``alpha < 2 / s_max^2``;
          otherwise it diverges. ``alpha=None`` picks ``1 / (||A||_1 ||A||_inf) <= 1 / s_max^2``,
          which always converges;
        * components with small singular values converge slowly: after ``n`` steps a singular
          value ``s`` with ``alpha s^2 << 1`` is inverted to about ``2^n alpha s`` instead of
          ``1 / s``, so an early-stopped iteration acts like a smooth, regularised ("soft")
          pseudo-inverse that suppresses directions with ``s < 1 / sqrt(2^n alpha)``;
        * it uses only matrix products (``2 * min(m, n) * m * n`` flops per step), which is fast on
          accelerators and smoothly differentiable — the reason the paper trains through it.

    Args:
        A: ``(..., m, n)`` float32/float64 tensor; not modified.
        method: ``"svd"``, ``"lstsq"`` or ``"ben_israel_cohen"``.
        rcond: relative singular-value cut-off for ``"svd"``/``"lstsq"``; default
            ``max(m, n) * eps(dtype)``.
        iters: number of Ben-Israel–Cohen steps (>= 0).
        alpha: Ben-Israel–Cohen initial scale, or ``None`` for the always-convergent automatic one.

    Returns:
        ``(..., n, m)`` tensor ``A^†`` with the dtype and device of ``A``.

    Raises:
        MemoryInputError: unknown method, bad ``rcond``/``iters``/``alpha``, non-matrix input.
        MemoryDtypeError: not a tensor or unsupported dtype.
    """
    A = _check_matrix(A)
    check_choice(method, "pinv method", PINV_METHODS)
    m, n = A.shape[-2:]
    if rcond is not None and not (isinstance(rcond, (int, float)) and rcond >= 0):
        raise MemoryInputError(f"rcond must be a number >= 0 or None, got {rcond!r}")
    if method == "svd":
        return _pinv_svd(A, _default_rcond(m, n, A.dtype) if rcond is None else float(rcond))
    if method == "lstsq":
        return _pinv_lstsq(A, _default_rcond(m, n, A.dtype) if rcond is None else float(rcond))
    check_int(iters, "iters", minimum=0)
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0):
        raise MemoryInputError(f"alpha must be a number > 0 or None, got {alpha!r}")
    return _pinv_bic(A, iters, None if alpha is None else float(alpha))


def product_pinv_factors(
    A: torch.Tensor, B: torch.Tensor, *, rcond: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Factors of ``(A B)^†`` computed without forming or decomposing the product.

    With thin QR factorisations ``A = Q_a R_a`` and ``B^T = Q_b R_b`` the product is
    ``A B = Q_a (R_a R_b^T) Q_b^T``, so an SVD of the small ``r_a x r_b`` core
    ``R_a R_b^T = U S V^T`` gives the SVD of ``A B`` and hence ``(A B)^† = (Q_b V) S^{-1} (Q_a U)^T``.
    Cost ``O((m + n) p^2 + p^3)`` instead of ``O(m n min(m, n))`` — a large saving when the inner
    dimension ``p`` is smaller than ``m`` and ``n`` (Algorithm 1 with ``C < min(N, K)``).

    Args:
        A: ``(..., m, p)``; B: ``(..., p, n)`` (batch dims broadcast).
        rcond: relative cut-off (default ``max(m, n) * eps``), as in :func:`pinv`.

    Returns:
        ``(left, s_inv, right)`` with ``left (..., n, r)``, ``s_inv (..., r)``, ``right (..., r, m)``
        such that ``(A B)^† = left @ diag(s_inv) @ right``; ``r = min(m, n, p)``.
    """
    A = _check_matrix(A, "A")
    B = _check_matrix(B, "B")
    if A.shape[-1] != B.shape[-2]:
        raise MemoryInputError(f"inner dimensions differ: A {tuple(A.shape)} vs B {tuple(B.shape)}")
    m, n = A.shape[-2], B.shape[-1]
    Qa, Ra = torch.linalg.qr(A)  # (..., m, ra), (..., ra, p)
    Qb, Rb = torch.linalg.qr(B.mT)  # (..., n, rb), (..., rb, p)
    U, S, Vh = torch.linalg.svd(Ra @ Rb.mT, full_matrices=False)  # core (..., ra, rb)
    rc = _default_rcond(m, n, A.dtype) if rcond is None else float(rcond)
    S_inv = torch.where(S > rc * S[..., :1], 1.0 / S, torch.zeros_like(S))
    return Qb @ Vh.mT, S_inv, (Qa @ U).mT


def pinv_of_product(A: torch.Tensor, B: torch.Tensor, *, rcond: float | None = None) -> torch.Tensor:
    """``(A B)^†`` (``(..., n, m)``) via :func:`product_pinv_factors` — exact like ``pinv(A @ B)``."""
    left, s_inv, right = product_pinv_factors(A, B, rcond=rcond)
    return (left * s_inv.unsqueeze(-2)) @ right
