"""Sequential writing and forgetting (paper Eq. 2–4) and the :class:`MemoryState` value object.

Model. A ridge (Gaussian) prior ``M ~ N(M_prior, λ^{-1} I)`` per code column and episodes
``Z_j ≈ W_j M`` give the posterior mean

    M = A^{-1} (λ M_prior + Σ_j W_j^T Z_j),     A = λ I + Σ_j W_j^T W_j   (precision, K x K),

i.e. the minimiser of ``Σ_j ||Z_j - W_j M||² + λ ||M - M_prior||²``, and the covariance
``Cov = A^{-1}``. An episode ``(Z: N x C, W: N x K)`` enters (``α = +1``) or leaves
(``α = -1``) with the Kalman / Sherman–Morrison–Woodbury update

    S = α^{-1} I_N + W Cov W^T,   G = Cov W^T S^{-1},
    M ← M + G (Z - W M),          Cov ← Cov - G W Cov,

costing ``O(K² N + K N C)`` instead of the ``O(K³)`` of re-inverting ``A``. Internally
``P = α S = I + α W Cov W^T`` is Cholesky-factored (``P = L L^T``), which is both the solve and
the positive-definiteness test; for ``N = 1`` everything reduces to scalar arithmetic and two
rank-1 updates (``torch.addr``), and ``Cov - v v^T`` with ``v = u / sqrt(p)`` stays exactly
symmetric, so no symmetrisation pass is needed. For ``N > 1`` the new covariance is symmetrised.

Exactness. Writes and forgets are algebraically exact, so after any sequence of operations ``M``
equals :func:`closed_form_memory` of the episodes currently held (tested to 1e-8 relative error in
float64). ``α = -1`` with the same ``(W, Z)`` removes an episode exactly; with fixed addressing
(``"reference"`` / ``"gaussian"``) the ``W`` recomputed from ``Z`` is the one used at write time.

Drift and ``refresh()``. Long runs of rank-1 updates/downdates accumulate rounding error in
``Cov`` and ``M``. With ``track_precision=True`` (default) the state also keeps the exact
additive sufficient statistics ``A = λI + Σ α W^T W`` and ``B = λ M_prior + Σ α W^T Z`` (no
solves, only sums). To keep single-fact writes cheap, the rows written since the last fold are
kept in a small log (``pending``) and added to ``A``/``B`` with one matrix product every
``FOLD_ROWS`` rows (amortised ``O(K²)`` flops per row, but no extra ``K x K`` buffer per write).
:attr:`MemoryState.precision` / :attr:`MemoryState.moment` always include the log.
:meth:`MemoryState.drift` measures how far ``Cov``/``M`` are from ``A^{-1}``/``A^{-1} B`` and
:meth:`MemoryState.refresh` recomputes them exactly in ``O(K³ + K² C)``.

What forgetting can detect. The state counts the rows in memory; forgetting more rows than are
in memory raises :class:`ForgetError`. An episode that *is* in memory always satisfies
``W Cov W^T < I`` (eigenvalues of ``I - W Cov W^T`` in ``(0, 1]``), so if the Cholesky factor of
``I - W Cov W^T`` fails (or its smallest pivot is at rounding level) the episode cannot be in
memory and :class:`ForgetError` is raised before anything changes. The converse does not hold: an
episode that was never written but whose weights are small (``W Cov W^T < I``) cannot be told
apart from a written one by the memory alone and would be "forgotten" (the fact-level API keeps
the list of written texts for that).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .addressing import ADDRESSING_MODES, address_current, address_reference, gaussian_weights
from .errors import (
    ForgetError,
    MemoryDtypeError,
    MemoryInputError,
    MemoryNumericalError,
    SUPPORTED_DTYPES,
    check_batch,
    check_choice,
    check_finite,
    check_last_dim,
    check_positive,
    check_same_kind,
    check_tensor,
)
from .pinv import PINV_METHODS, pinv

__all__ = [
    "MemoryState",
    "closed_form_memory",
    "sequential_write",
    "sequential_forget",
]


def _pivot_tol(dtype: torch.dtype) -> float:
    """Smallest acceptable pivot of ``P = I + α W Cov W^T`` (whose eigenvalues are <= 1 + ...)."""
    return 16.0 * torch.finfo(dtype).eps


def _fail(alpha: int, detail: str) -> Exception:
    if alpha < 0:
        return ForgetError(
            "cannot forget this episode: it is not in memory (I - W Cov W^T is not positive "
            f"definite: {detail}); check that Z/W are exactly the ones written"
        )
    return MemoryNumericalError(
        f"covariance is no longer positive definite ({detail}); call refresh() or rebuild the state"
    )


def _update(
    M: torch.Tensor, cov: torch.Tensor, W: torch.Tensor, Z: torch.Tensor, alpha: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Core write (α=+1) / forget (α=-1) on validated tensors; returns new ``(M, Cov)``.

    Shapes: ``M (…, K, C)``, ``cov (…, K, K)``, ``W (…, N, K)``, ``Z (…, N, C)``.
    Raises before returning anything if ``P = I + α W Cov W^T`` is not positive definite.
    """
    tol = _pivot_tol(M.dtype)
    if W.shape[-2] == 1:
        if M.ndim == 2:  # rank-1, unbatched: scalars + torch.addr
            w, z = W[0], Z[0]
            u = torch.mv(cov, w)  # Cov w  (K,)
            p = 1.0 + alpha * float(torch.dot(w, u))
            if not p > tol:  # also catches NaN
                raise _fail(alpha, f"pivot 1 {'+' if alpha > 0 else '-'} w^T Cov w = {p:.3g}")
            r = z - torch.mv(M.mT, w)  # residual z - w M  (C,)
            M_new = torch.addr(M, u, r, alpha=alpha / p)
            v = u * (1.0 / math.sqrt(p))
            cov_new = torch.addr(cov, v, v, alpha=-alpha)  # exactly symmetric: entries c_ij -/+ v_i v_j
            return M_new, cov_new
        # rank-1, batched: per-batch scalars, batched rank-1 products
        u = cov @ W.mT  # (B, K, 1)
        p = 1.0 + alpha * (W @ u)  # (B, 1, 1)
        p_min = float(p.amin())
        if not p_min > tol:
            raise _fail(alpha, f"smallest pivot {p_min:.3g}")
        r = Z - W @ M  # (B, 1, C)
        M_new = torch.baddbmm(M, u * (alpha / p), r)
        v = u * p.rsqrt()
        cov_new = torch.baddbmm(cov, v, v.mT, alpha=-alpha)
        return M_new, cov_new

    N = W.shape[-2]
    U = cov @ W.mT  # (…, K, N)
    P = W @ U
    P = 0.5 * (P + P.mT)
    P = alpha * P + torch.eye(N, dtype=P.dtype, device=P.device)
    L, info = torch.linalg.cholesky_ex(P)
    if bool((info > 0).any()):
        raise _fail(alpha, "Cholesky factorisation failed")
    min_pivot = float(torch.diagonal(L, dim1=-2, dim2=-1).amin()) ** 2
    if not min_pivot > tol:
        raise _fail(alpha, f"smallest pivot {min_pivot:.3g}")
    R = Z - W @ M  # (…, N, C)
    Vt = torch.linalg.solve_triangular(L, U.mT, upper=False)  # L^{-1} U^T  (…, N, K)
    Y = torch.linalg.solve_triangular(L, R, upper=False)  # L^{-1} R    (…, N, C)
    V = Vt.mT
    M_new = M + alpha * (V @ Y)  # M + G R with G = α U P^{-1}
    cov_new = cov - alpha * (V @ Vt)  # Cov - G W Cov
    cov_new = 0.5 * (cov_new + cov_new.mT)
    return M_new, cov_new


def _check_episode(
    Z: torch.Tensor, W: torch.Tensor | None, M: torch.Tensor, cov: torch.Tensor
) -> torch.Tensor | None:
    """Validate ``Z`` (and ``W`` if given) against memory ``M (…, K, C)`` / ``cov (…, K, K)``."""
    check_tensor(Z, "Z", ndims=(M.ndim,))
    check_same_kind(Z, "Z", M, "M")
    check_last_dim(Z, "Z", M.shape[-1], "code size C")
    check_batch(Z, "Z", M, "M")
    check_finite(Z, "Z")
    if W is not None:
        check_tensor(W, "W", ndims=(M.ndim,))
        check_same_kind(W, "W", M, "M")
        expected = (*Z.shape[:-1], M.shape[-2])
        if tuple(W.shape) != expected:
            raise MemoryInputError(
                f"W must have shape {expected} (rows of Z, K slots), got {tuple(W.shape)}"
            )
        check_finite(W, "W")
    return W


def _check_memory(M: torch.Tensor, cov: torch.Tensor) -> None:
    check_tensor(M, "M")
    check_tensor(cov, "cov", ndims=(M.ndim,))
    check_same_kind(cov, "cov", M, "M")
    K = M.shape[-2]
    if tuple(cov.shape) != (*M.shape[:-1], K):
        raise MemoryInputError(f"cov must have shape {(*M.shape[:-1], K)} for M {tuple(M.shape)}, got {tuple(cov.shape)}")


def sequential_write(
    M: torch.Tensor, cov: torch.Tensor, Z: torch.Tensor, W: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add episode ``(Z (…, N, C), W (…, N, K))`` to ``(M (…, K, C), Cov (…, K, K))`` (α = +1).

    Returns new ``(M, Cov)``; inputs are not modified. Raises :class:`MemoryNumericalError` if
    ``Cov`` is not positive definite.
    """
    _check_memory(M, cov)
    _check_episode(Z, W, M, cov)
    return _update(M, cov, W, Z, +1)


def sequential_forget(
    M: torch.Tensor, cov: torch.Tensor, Z: torch.Tensor, W: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove episode ``(Z, W)`` previously written (α = -1); exact inverse of
    :func:`sequential_write`. Raises :class:`ForgetError` when ``I - W Cov W^T`` is not positive
    definite (the episode cannot be in memory)."""
    _check_memory(M, cov)
    _check_episode(Z, W, M, cov)
    return _update(M, cov, W, Z, -1)


def _stack(x: torch.Tensor | Sequence[torch.Tensor], name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if not isinstance(x, (list, tuple)) or len(x) == 0:
        raise MemoryInputError(f"{name} must be a tensor or a non-empty list of tensors")
    for i, t in enumerate(x):
        check_tensor(t, f"{name}[{i}]")
    try:
        return torch.cat(list(x), dim=-2)
    except RuntimeError as e:
        raise MemoryInputError(f"{name}: cannot concatenate the episodes along rows ({e})") from None


def closed_form_memory(
    W: torch.Tensor | Sequence[torch.Tensor],
    Z: torch.Tensor | Sequence[torch.Tensor],
    lam: float,
    M_prior: torch.Tensor,
) -> torch.Tensor:
    """Direct minimiser of ``Σ_j ||Z_j - W_j M||² + λ ||M - M_prior||²`` — the reference the
    sequential updates must reproduce.

    Solved independently of the state's algebra, as the stacked least-squares problem
    ``[W; sqrt(λ) I] M = [Z; sqrt(λ) M_prior]`` with ``torch.linalg.lstsq`` (QR based, never forms
    ``W^T W``).

    Args:
        W: stacked weights ``(…, N, K)`` or a list of per-episode ``(…, N_j, K)``.
        Z: stacked encodings ``(…, N, C)`` or a list of per-episode ``(…, N_j, C)``.
        lam: ridge strength ``λ > 0``.
        M_prior: prior mean ``(…, K, C)``.

    Returns:
        ``M (…, K, C)``.
    """
    W = _stack(W, "W")
    Z = _stack(Z, "Z")
    lam = check_positive(lam, "lam")
    check_tensor(W, "W")
    check_tensor(Z, "Z")
    check_tensor(M_prior, "M_prior")
    check_same_kind(W, "W", M_prior, "M_prior")
    check_same_kind(Z, "Z", M_prior, "M_prior")
    K, C = M_prior.shape[-2:]
    check_last_dim(W, "W", K, "K slots (from M_prior)")
    check_last_dim(Z, "Z", C, "code size C (from M_prior)")
    if W.shape[-2] != Z.shape[-2]:
        raise MemoryInputError(f"W and Z must have the same rows, got {tuple(W.shape)} and {tuple(Z.shape)}")
    batch = torch.broadcast_shapes(W.shape[:-2], Z.shape[:-2], M_prior.shape[:-2])
    s = math.sqrt(lam)
    eye = torch.eye(K, dtype=W.dtype, device=W.device)
    lhs = torch.cat([W.expand(*batch, *W.shape[-2:]), (s * eye).expand(*batch, K, K)], dim=-2)
    rhs = torch.cat([Z.expand(*batch, *Z.shape[-2:]), (s * M_prior).expand(*batch, K, C)], dim=-2)
    driver = "gelsy" if lhs.device.type == "cpu" else "gels"
    return torch.linalg.lstsq(lhs, rhs, driver=driver).solution


# --------------------------------------------------------------------------------------------
# MemoryState
# --------------------------------------------------------------------------------------------


#: Rows logged before they are folded into the tracked precision/moment with one matrix product.
FOLD_ROWS = 64


def _fold(
    A: torch.Tensor, B: torch.Tensor, pending: tuple[tuple[torch.Tensor, torch.Tensor, int], ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A + Σ α W^T W, B + Σ α W^T Z)`` over the logged rows, as new tensors (one GEMM each)."""
    if not pending:
        return A, B
    W = torch.cat([w for w, _, _ in pending], dim=-2)  # (…, L, K)
    Z = torch.cat([z for _, z, _ in pending], dim=-2)  # (…, L, C)
    signs = torch.cat(
        [torch.full((w.shape[-2],), float(a), dtype=W.dtype, device=W.device) for w, _, a in pending]
    )
    Ws = (W * signs.unsqueeze(-1)).mT  # (…, K, L)
    return A + Ws @ W, B + Ws @ Z


def _eye_like(cov_shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    K = cov_shape[-1]
    return torch.eye(K, dtype=dtype, device=device).expand(*cov_shape).clone()


@dataclass(frozen=True, eq=False, repr=False)
class MemoryState:
    """Immutable episodic-memory state; every operation returns a new state.

    Shapes use ``…`` for an optional leading batch dimension ``B`` shared by all tensors.

    Attributes:
        M: posterior mean memory ``(…, K, C)``.
        cov: posterior covariance ``Cov = A^{-1}`` ``(…, K, K)`` (row covariance shared by the C
            code columns).
        M_ref: fixed reference memory used by ``"reference"``/``"gaussian"`` addressing ``(…, K, C)``.
        M_ref_pinv: cached ``M_ref^†`` ``(…, C, K)``.
        M_prior: prior mean ``(…, K, C)``.
        lam: ridge strength ``λ > 0`` (prior covariance ``C_0 = λ^{-1} I``, precision ``λ I``).
        addressing: ``"reference"``, ``"current"`` or ``"gaussian"``.
        gaussian_alpha: bandwidth ``α`` of Gaussian addressing.
        pinv_method: pseudo-inverse method for ``"current"`` addressing (and ``M_ref^†``).
        precision_base: ``λI + Σ α W^T W`` over the rows folded so far ``(…, K, K)``, or
            ``None`` when the precision is not tracked. Use :attr:`precision` for the exact ``A``.
        moment_base: ``λ M_prior + Σ α W^T Z`` over the folded rows ``(…, K, C)`` or ``None``.
        pending: rows not yet folded into the bases, as ``(W, Z, α)`` tuples (private copies).
        n_rows: rows currently in memory (rows written minus rows forgotten); forgetting more
            rows than this raises :class:`ForgetError`.
        n_writes: number of successful ``write`` calls (episodes written, monotone).
        n_forgets: number of successful ``forget`` calls (monotone). Rows of one written episode
            may be forgotten one at a time or together with rows of other episodes — the posterior
            depends only on the multiset of rows — so episodes are counted, not matched.
    """

    M: torch.Tensor
    cov: torch.Tensor
    M_ref: torch.Tensor
    M_ref_pinv: torch.Tensor
    M_prior: torch.Tensor
    lam: float
    addressing: str = "reference"
    gaussian_alpha: float = 1.0
    pinv_method: str = "svd"
    precision_base: torch.Tensor | None = None
    moment_base: torch.Tensor | None = None
    pending: tuple[tuple[torch.Tensor, torch.Tensor, int], ...] = ()
    n_rows: int = 0
    n_writes: int = 0
    n_forgets: int = 0

    # ---------------------------------------------------------------- construction / checks
    def __post_init__(self) -> None:
        """Cheap structural validation (shapes, dtypes, devices, options); no data scans."""
        M = check_tensor(self.M, "M")
        K, C = M.shape[-2:]
        batch = tuple(M.shape[:-2])
        expected = {
            "cov": (*batch, K, K),
            "M_ref": (*batch, K, C),
            "M_ref_pinv": (*batch, C, K),
            "M_prior": (*batch, K, C),
            "precision_base": (*batch, K, K),
            "moment_base": (*batch, K, C),
        }
        for name, shape in expected.items():
            t = getattr(self, name)
            if t is None and name in ("precision_base", "moment_base"):
                continue
            check_tensor(t, name, ndims=(M.ndim,))
            check_same_kind(t, name, M, "M")
            if tuple(t.shape) != shape:
                raise MemoryInputError(f"{name} must have shape {shape} (K={K}, C={C}), got {tuple(t.shape)}")
        if (self.precision_base is None) != (self.moment_base is None):
            raise MemoryInputError("precision_base and moment_base must both be tracked or both be None")
        if not isinstance(self.pending, tuple) or (self.pending and self.precision_base is None):
            raise MemoryInputError("pending must be a tuple, and empty when the precision is not tracked")
        check_positive(self.lam, "lam")
        check_positive(self.gaussian_alpha, "gaussian_alpha")
        check_choice(self.addressing, "addressing mode", ADDRESSING_MODES)
        check_choice(self.pinv_method, "pinv_method", PINV_METHODS)
        for name in ("n_rows", "n_writes", "n_forgets"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise MemoryInputError(f"{name} must be an int >= 0, got {v!r}")

    @classmethod
    def init(
        cls,
        M_ref: torch.Tensor,
        *,
        lam: float = 1.0,
        M_prior: torch.Tensor | None = None,
        addressing: str = "reference",
        gaussian_alpha: float = 1.0,
        pinv_method: str = "svd",
        track_precision: bool = True,
    ) -> MemoryState:
        """Empty memory: ``M = M_prior``, ``Cov = λ^{-1} I``.

        Args:
            M_ref: reference memory ``(K, C)`` or ``(B, K, C)`` (see the constructors in
                :mod:`larimar.memory.addressing`); copied. Its pseudo-inverse is computed once here.
            lam: ridge strength ``λ > 0``.
            M_prior: prior mean, same shape as ``M_ref`` (a ``(K, C)`` prior broadcasts over a
                batch). Default: zeros, so an empty memory reads out zeros — except for
                ``"current"`` addressing, where it defaults to ``M_ref`` (with ``M = 0`` every
                address ``Z M^†`` would be zero and nothing could ever be written). Pass
                ``M_prior=M_ref`` to use the paper's learned prior mean ``M_0``.
            addressing: ``"reference"`` (default), ``"current"`` or ``"gaussian"``.
            gaussian_alpha: ``α`` of Gaussian addressing.
            pinv_method: pseudo-inverse method (see :func:`larimar.memory.pinv`).
            track_precision: also keep the exact precision/moment for :meth:`refresh` and
                :meth:`drift` (costs two extra rank-N updates per operation).
        """
        check_tensor(M_ref, "M_ref")
        check_finite(M_ref, "M_ref")
        lam = check_positive(lam, "lam")
        check_choice(addressing, "addressing mode", ADDRESSING_MODES)
        check_choice(pinv_method, "pinv_method", PINV_METHODS)
        if not isinstance(track_precision, bool):
            raise MemoryDtypeError(f"track_precision must be a bool, got {type(track_precision).__name__}")
        M_ref = M_ref.detach().clone()
        if M_prior is None:
            M_prior = M_ref.clone() if addressing == "current" else torch.zeros_like(M_ref)
        else:
            check_tensor(M_prior, "M_prior")
            check_same_kind(M_prior, "M_prior", M_ref, "M_ref")
            if M_prior.shape != M_ref.shape and M_prior.shape != M_ref.shape[-2:]:
                raise MemoryInputError(
                    f"M_prior must have shape {tuple(M_ref.shape)} (or {tuple(M_ref.shape[-2:])}), "
                    f"got {tuple(M_prior.shape)}"
                )
            check_finite(M_prior, "M_prior")
            M_prior = M_prior.detach().expand_as(M_ref).clone()
        cov_shape = (*M_ref.shape[:-1], M_ref.shape[-2])
        eye = _eye_like(cov_shape, M_ref.dtype, M_ref.device)
        return cls(
            M=M_prior.clone(),
            cov=eye / lam,
            M_ref=M_ref,
            M_ref_pinv=pinv(M_ref, pinv_method).contiguous(),
            M_prior=M_prior,
            lam=lam,
            addressing=addressing,
            gaussian_alpha=float(check_positive(gaussian_alpha, "gaussian_alpha")),
            pinv_method=pinv_method,
            precision_base=eye * lam if track_precision else None,
            moment_base=M_prior * lam if track_precision else None,
        )

    def __repr__(self) -> str:
        b = "" if self.batch_size is None else f"B={self.batch_size}, "
        return (
            f"MemoryState({b}K={self.K}, C={self.C}, dtype={self.dtype}, device={self.device}, "
            f"addressing={self.addressing!r}, lam={self.lam:g}, n_rows={self.n_rows}, "
            f"n_writes={self.n_writes}, n_forgets={self.n_forgets}, "
            f"track_precision={self.track_precision})"
        )

    # ---------------------------------------------------------------- properties
    @property
    def K(self) -> int:
        """Number of memory slots."""
        return self.M.shape[-2]

    @property
    def C(self) -> int:
        """Code (encoding) size."""
        return self.M.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.M.dtype

    @property
    def device(self) -> torch.device:
        return self.M.device

    @property
    def batch_size(self) -> int | None:
        """``B`` for a batched state, ``None`` for an unbatched one."""
        return self.M.shape[0] if self.M.ndim == 3 else None

    @property
    def track_precision(self) -> bool:
        return self.precision_base is not None

    @property
    def precision(self) -> torch.Tensor | None:
        """Exact precision ``A = λI + Σ α W^T W`` ``(…, K, K)`` (``None`` if not tracked)."""
        return None if self.precision_base is None else _fold(self.precision_base, self.moment_base, self.pending)[0]

    @property
    def moment(self) -> torch.Tensor | None:
        """Exact ``B = λ M_prior + Σ α W^T Z`` ``(…, K, C)`` so that ``M = A^{-1} B`` (``None`` if not tracked)."""
        return None if self.moment_base is None else _fold(self.precision_base, self.moment_base, self.pending)[1]

    # ---------------------------------------------------------------- addressing / reading
    def address(self, Z: torch.Tensor) -> torch.Tensor:
        """Addressing weights ``W (…, N, K)`` for encodings ``Z (…, N, C)`` under this state's mode."""
        check_tensor(Z, "Z", ndims=(self.M.ndim,))
        check_same_kind(Z, "Z", self.M, "memory")
        check_last_dim(Z, "Z", self.C, "code size C")
        check_batch(Z, "Z", self.M, "memory")
        return self._address(Z)

    def _address(self, Z: torch.Tensor) -> torch.Tensor:
        if self.addressing == "reference":
            return address_reference(Z, self.M_ref_pinv)
        if self.addressing == "gaussian":
            return gaussian_weights(Z, self.M_ref, alpha=self.gaussian_alpha)
        return address_current(Z, self.M, pinv_method=self.pinv_method)

    def read(self, Z: torch.Tensor, *, return_weights: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Read-out ``Z_read = W M`` ``(…, N, C)`` with ``W = address(Z)``; with
        ``return_weights=True`` returns ``(Z_read, W)``."""
        W = self.address(Z)
        check_finite(Z, "Z")
        Z_read = W @ self.M
        return (Z_read, W) if return_weights else Z_read

    # ---------------------------------------------------------------- write / forget
    def _apply(self, Z: torch.Tensor, W: torch.Tensor | None, alpha: int) -> MemoryState:
        W = _check_episode(Z, W, self.M, self.cov)
        W_given = W is not None
        if W is None:
            W = self._address(Z)
            check_finite(W, "W (computed by addressing)")
        N = Z.shape[-2]
        if alpha < 0 and N > self.n_rows:
            raise ForgetError(f"cannot forget {N} row(s): only {self.n_rows} row(s) are in memory")
        M_new, cov_new = _update(self.M, self.cov, W, Z, alpha)
        precision, moment, pending = self.precision_base, self.moment_base, self.pending
        if precision is not None:
            # private copies: the caller may later modify its Z / W in place
            pending = pending + ((W.clone() if W_given else W, Z.clone(), alpha),)
            if sum(p[0].shape[-2] for p in pending) >= FOLD_ROWS:
                precision, moment = _fold(precision, moment, pending)
                pending = ()
        return dataclasses.replace(
            self,
            M=M_new,
            cov=cov_new,
            precision_base=precision,
            moment_base=moment,
            pending=pending,
            n_rows=self.n_rows + alpha * N,
            n_writes=self.n_writes + (alpha > 0),
            n_forgets=self.n_forgets + (alpha < 0),
        )

    def write(self, Z: torch.Tensor, W: torch.Tensor | None = None) -> MemoryState:
        """Write one episode ``Z (…, N, C)`` (weights ``W (…, N, K)`` from the addressing mode
        unless given). Returns the new state; ``self`` is unchanged."""
        return self._apply(Z, W, +1)

    def forget(self, Z: torch.Tensor, W: torch.Tensor | None = None) -> MemoryState:
        """Remove a previously written episode ``Z (…, N, C)`` (α = -1). With fixed addressing the
        recomputed ``W`` equals the one used at write time; with ``"current"`` addressing pass the
        original ``W``. The rows may come from one or several written episodes. Raises
        :class:`ForgetError` if more rows would be forgotten than are in memory, or if ``I - W Cov W^T`` is not positive definite (see the module docstring)."""
        return self._apply(Z, W, -1)

    # ---------------------------------------------------------------- maintenance
    def drift(self, *, probes: int = 8, generator: torch.Generator | None = None) -> float:
        """Relative deviation of ``Cov``/``M`` from the exact ``A^{-1}``/``A^{-1} B``.

        Returns ``max(||A Cov X - X|| / ||X||, ||A M - B|| / ||B||)`` with ``probes`` random
        columns ``X`` — ``O(K² (probes + C))``. Requires ``track_precision``.
        """
        self._need_precision("drift")
        A, B = _fold(self.precision_base, self.moment_base, self.pending)
        X = torch.randn((*self.cov.shape[:-1], probes), generator=generator, dtype=self.dtype, device=self.device)
        e_cov = torch.linalg.norm(A @ (self.cov @ X) - X) / torch.linalg.norm(X)
        denom = torch.linalg.norm(B).clamp_min(torch.finfo(self.dtype).tiny)
        e_m = torch.linalg.norm(A @ self.M - B) / denom
        return float(torch.maximum(e_cov, e_m))

    def refresh(self) -> MemoryState:
        """Recompute ``Cov = A^{-1}`` and ``M = A^{-1} B`` exactly from the tracked precision
        (Cholesky, ``O(K³ + K² C)``) to remove accumulated rounding drift."""
        self._need_precision("refresh")
        A, B = _fold(self.precision_base, self.moment_base, self.pending)
        L, info = torch.linalg.cholesky_ex(0.5 * (A + A.mT))
        if bool((info > 0).any()):
            raise MemoryNumericalError("tracked precision is not positive definite; cannot refresh")
        return dataclasses.replace(
            self,
            cov=torch.cholesky_inverse(L),
            M=torch.cholesky_solve(B, L),
            precision_base=A,
            moment_base=B,
            pending=(),
        )

    def _need_precision(self, what: str) -> None:
        if self.precision_base is None:
            raise MemoryInputError(f"{what}() needs a state created with track_precision=True")

    # ---------------------------------------------------------------- conversion / persistence
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> MemoryState:
        """Copy of the state on ``device`` and/or in ``dtype`` (float32/float64)."""
        if dtype is not None and dtype not in SUPPORTED_DTYPES:
            raise MemoryDtypeError(f"dtype must be float32 or float64, got {dtype}")

        def conv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        return dataclasses.replace(
            self,
            M=conv(self.M),
            cov=conv(self.cov),
            M_ref=conv(self.M_ref),
            M_ref_pinv=conv(self.M_ref_pinv),
            M_prior=conv(self.M_prior),
            precision_base=conv(self.precision_base),
            moment_base=conv(self.moment_base),
            pending=tuple((conv(w), conv(z), a) for w, z, a in self.pending),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the state to a safetensors file atomically (see :func:`larimar.memory.io.save_state`)."""
        from .io import save_state

        save_state(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: torch.device | str = "cpu") -> MemoryState:
        """Load a state saved with :meth:`save`, validating it (see :func:`larimar.memory.io.load_state`)."""
        from .io import load_state

        return load_state(path, device=device)
