"""Exceptions of the memory engine and the argument checks that raise them.

Every error raised on bad input derives from both :class:`MemoryEngineError` (catch-all for this
package) and a builtin (``ValueError`` or ``TypeError``) so callers can use either. Messages name
the offending argument and show expected vs. got.

Hierarchy::

    MemoryEngineError
    ├── MemoryInputError(ValueError)        bad shape / value / mode string / NaN / Inf / lam <= 0
    │   ├── MemoryDtypeError(TypeError)     not a tensor, unsupported dtype, dtype/device mismatch
    │   └── ForgetError                     forgetting something that cannot be in memory
    ├── MemoryNumericalError(ArithmeticError)  the state lost positive definiteness (call refresh())
    └── MemoryFileError(ValueError)         corrupt, truncated or mismatched state file
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

__all__ = [
    "MemoryEngineError",
    "MemoryInputError",
    "MemoryDtypeError",
    "ForgetError",
    "MemoryNumericalError",
    "MemoryFileError",
    "SUPPORTED_DTYPES",
]

SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64)


class MemoryEngineError(Exception):
    """Base class of every error raised by :mod:`larimar.memory`."""


class MemoryInputError(MemoryEngineError, ValueError):
    """An argument has the wrong shape, value or mode string, or contains NaN/Inf."""


class MemoryDtypeError(MemoryInputError, TypeError):
    """An argument is not a tensor, has an unsupported dtype, or mismatches another's dtype/device."""


class ForgetError(MemoryInputError):
    """Forgetting would remove something that cannot have been written (see ``MemoryState.forget``)."""


class MemoryNumericalError(MemoryEngineError, ArithmeticError):
    """The covariance lost positive definiteness (numerical breakdown); ``refresh()`` may repair it."""


class MemoryFileError(MemoryEngineError, ValueError):
    """A saved memory-state file is corrupt, truncated, or does not match the expected format."""


# --------------------------------------------------------------------------------------------
# argument checks (private helpers shared by the modules of this package)
# --------------------------------------------------------------------------------------------


def check_tensor(x: object, name: str, ndims: Iterable[int] = (2, 3)) -> torch.Tensor:
    """Check that ``x`` is a float32/float64 tensor with one of ``ndims`` dimensions.

    Raises:
        MemoryDtypeError: not a tensor or unsupported dtype.
        MemoryInputError: wrong number of dimensions or an empty dimension.
    """
    if not isinstance(x, torch.Tensor):
        raise MemoryDtypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise MemoryDtypeError(f"{name} must be float32 or float64, got {x.dtype}")
    ndims = tuple(ndims)
    if x.ndim not in ndims:
        expected = " or ".join(f"{d}-D" for d in ndims)
        raise MemoryInputError(f"{name} must be {expected}, got shape {tuple(x.shape)} ({x.ndim}-D)")
    if any(s == 0 for s in x.shape[-2:]):
        raise MemoryInputError(f"{name} must not have an empty dimension, got shape {tuple(x.shape)}")
    return x


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise :class:`MemoryInputError` if ``x`` contains NaN or +-Inf (one device sync)."""
    if not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise MemoryInputError(f"{name} contains non-finite values ({n_nan} NaN, {n_inf} Inf)")


def check_same_kind(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    """Raise :class:`MemoryDtypeError` unless ``a`` and ``b`` share dtype and device."""
    if a.dtype != b.dtype:
        raise MemoryDtypeError(
            f"dtype mismatch: {a_name} is {a.dtype} but {b_name} is {b.dtype} (convert one with .to())"
        )
    if a.device != b.device:
        raise MemoryDtypeError(f"device mismatch: {a_name} is on {a.device} but {b_name} is on {b.device}")


def check_batch(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    """Both batched (3-D) tensors must have the same batch size; an unbatched one broadcasts."""
    if a.ndim == 3 and b.ndim == 3 and a.shape[0] != b.shape[0]:
        raise MemoryInputError(
            f"batch size mismatch: {a_name} has batch {a.shape[0]} (shape {tuple(a.shape)}) but "
            f"{b_name} has batch {b.shape[0]} (shape {tuple(b.shape)})"
        )


def check_last_dim(x: torch.Tensor, name: str, expected: int, what: str) -> None:
    """Raise :class:`MemoryInputError` unless ``x.shape[-1] == expected``."""
    if x.shape[-1] != expected:
        raise MemoryInputError(
            f"{name} must have {what} = {expected} in its last dimension, got shape {tuple(x.shape)}"
        )


def check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    """Validate a string option; integer codes or unknown strings raise :class:`MemoryInputError`."""
    if not isinstance(value, str) or value not in choices:
        raise MemoryInputError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}")
    return value


def check_positive(value: object, name: str, *, allow_zero: bool = False) -> float:
    """Validate a finite real number that is > 0 (or >= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MemoryDtypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise MemoryInputError(f"{name} must be finite and {bound}, got {value!r}")
    return v


def check_int(value: object, name: str, *, minimum: int = 0) -> int:
    """Validate an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise MemoryDtypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise MemoryInputError(f"{name} must be >= {minimum}, got {value}")
    return value
