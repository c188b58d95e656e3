"""Pure-tensor episodic memory engine of Larimar (Das et al., ICML 2024).

Depends only on torch (and, lazily inside :mod:`larimar.memory.io`, safetensors). Notation:
``K`` slots, ``C`` code size, ``N`` rows of an episode; ``Z (N, C)`` encodings, ``M (K, C)``
memory, ``W (N, K)`` addressing weights. Every function also accepts a leading batch dimension.

* :mod:`~larimar.memory.functional` — Algorithm 1: :func:`write`, :func:`read`, :func:`generate`.
* :mod:`~larimar.memory.pinv` — :func:`pinv` (``"svd"``, ``"lstsq"``, ``"ben_israel_cohen"``).
* :mod:`~larimar.memory.addressing` — ``"current"``, ``"reference"``, ``"gaussian"`` addressing and
  reference-memory constructors.
* :mod:`~larimar.memory.sequential` — :class:`MemoryState` with exact sequential write/forget
  (Eq. 2–4) and :func:`closed_form_memory`.
* :mod:`~larimar.memory.slots` — key slots allocated as keys arrive (Gaussian addressing whose
  reference rows are the keys): :func:`allocate_key_slots`.
* :mod:`~larimar.memory.io` — atomic safetensors persistence.
"""

from .addressing import (
    ADDRESSING_MODES,
    address,
    address_current,
    address_reference,
    gaussian_weights,
    key_slot_reference,
    random_reference,
    reference_from_encodings,
    reference_from_tensor,
)
from .errors import (
    ForgetError,
    MemoryDtypeError,
    MemoryEngineError,
    MemoryFileError,
    MemoryInputError,
    MemoryNumericalError,
)
from .functional import generate, read, write
from .io import load_state, save_state
from .pinv import PINV_METHODS, pinv, pinv_of_product
from .sequential import MemoryState, closed_form_memory, sequential_forget, sequential_write
from .slots import allocate_key_slots, unused_slots, with_reference_rows

__all__ = [
    # Algorithm 1
    "write",
    "read",
    "generate",
    # pseudo-inverse
    "PINV_METHODS",
    "pinv",
    "pinv_of_product",
    # addressing
    "ADDRESSING_MODES",
    "address",
    "address_current",
    "address_reference",
    "gaussian_weights",
    "random_reference",
    "reference_from_encodings",
    "reference_from_tensor",
    "key_slot_reference",
    "allocate_key_slots",
    "unused_slots",
    "with_reference_rows",
    # sequential
    "MemoryState",
    "closed_form_memory",
    "sequential_write",
    "sequential_forget",
    # persistence
    "save_state",
    "load_state",
    # errors
    "MemoryEngineError",
    "MemoryInputError",
    "MemoryDtypeError",
    "ForgetError",
    "MemoryNumericalError",
    "MemoryFileError",
]
