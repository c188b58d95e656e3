"""Saving and loading :class:`~larimar.memory.MemoryState` as safetensors files.

File layout: a standard safetensors file whose tensors are ``M``, ``cov``, ``M_ref``,
``M_ref_pinv``, ``M_prior`` (plus ``precision`` and ``moment`` when tracked) and whose
``__metadata__`` holds one key, ``"larimar.memory"``, with a JSON object::

    {"format_version": 1, "K": ..., "C": ..., "batch_size": null | B, "dtype": "float32",
     "addressing": "reference", "lam": 1.0, "gaussian_alpha": 1.0, "pinv_method": "svd",
     "track_precision": true, "n_rows": ..., "n_writes": ..., "n_forgets": ...}

Writes are atomic (temporary file in the target directory, ``fsync``, ``os.replace``), so a failed
save never damages an existing file. Loading checks the header, the metadata, every tensor's
presence, shape, dtype and finiteness, and raises :class:`MemoryFileError` naming the problem.
``safetensors`` is imported lazily, inside the functions.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from typing import TYPE_CHECKING, Any

import torch

from .errors import MemoryEngineError, MemoryFileError

if TYPE_CHECKING:  # pragma: no cover
    from .sequential import MemoryState

__all__ = ["FORMAT_VERSION", "METADATA_KEY", "save_state", "load_state"]

FORMAT_VERSION = 1
METADATA_KEY = "larimar.memory"
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_REQUIRED = ("M", "cov", "M_ref", "M_ref_pinv", "M_prior")
_TRACKED = ("precision", "moment")


def save_state(state: MemoryState, path: str | os.PathLike[str]) -> None:
    """Write ``state`` to ``path`` (safetensors + JSON metadata) atomically."""
    from safetensors.torch import save as st_save

    from .sequential import MemoryState

    if not isinstance(state, MemoryState):
        raise TypeError(f"state must be a MemoryState, got {type(state).__name__}")
    names = _REQUIRED + (_TRACKED if state.track_precision else ())
    tensors = {n: getattr(state, n).detach().to("cpu").contiguous().clone() for n in names}
    meta = {
        "format_version": FORMAT_VERSION,
        "K": state.K,
        "C": state.C,
        "batch_size": state.batch_size,
        "dtype": str(state.dtype).removeprefix("torch."),
        "addressing": state.addressing,
        "lam": state.lam,
        "gaussian_alpha": state.gaussian_alpha,
        "pinv_method": state.pinv_method,
        "track_precision": state.track_precision,
        "n_rows": state.n_rows,
        "n_writes": state.n_writes,
        "n_forgets": state.n_forgets,
    }
    data = st_save(tensors, metadata={METADATA_KEY: json.dumps(meta)})

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _read_header(data: bytes, path: str) -> dict[str, Any]:
    if len(data) < 8:
        raise MemoryFileError(f"{path}: truncated file ({len(data)} bytes, no safetensors header)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise MemoryFileError(
            f"{path}: truncated or corrupt file (header claims {n} bytes, only {len(data) - 8} present)"
        )
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MemoryFileError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise MemoryFileError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header


def _parse_meta(header: dict[str, Any], path: str) -> dict[str, Any]:
    raw = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if raw is None:
        raise MemoryFileError(f"{path}: not a larimar memory file (no {METADATA_KEY!r} metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise MemoryFileError(f"{path}: corrupt {METADATA_KEY!r} metadata ({e})") from None
    if not isinstance(meta, dict):
        raise MemoryFileError(f"{path}: {METADATA_KEY!r} metadata is not a JSON object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise MemoryFileError(f"{path}: unsupported format_version {version!r} (this library reads {FORMAT_VERSION})")
    spec = {
        "K": int,
        "C": int,
        "dtype": str,
        "addressing": str,
        "lam": (int, float),
        "gaussian_alpha": (int, float),
        "pinv_method": str,
        "track_precision": bool,
        "n_rows": int,
        "n_writes": int,
        "n_forgets": int,
    }
    for key, typ in spec.items():
        if key not in meta:
            raise MemoryFileError(f"{path}: metadata field {key!r} is missing")
        v = meta[key]
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            raise MemoryFileError(f"{path}: metadata field {key!r} has invalid value {v!r}")
    if meta["K"] < 1 or meta["C"] < 1:
        raise MemoryFileError(f"{path}: metadata K={meta['K']}, C={meta['C']} must be >= 1")
    b = meta.get("batch_size")
    if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
        raise MemoryFileError(f"{path}: metadata field 'batch_size' has invalid value {b!r}")
    if meta["dtype"] not in _DTYPES:
        raise MemoryFileError(f"{path}: unsupported dtype {meta['dtype']!r} (expected float32 or float64)")
    return meta


def load_state(path: str | os.PathLike[str], *, device: torch.device | str = "cpu") -> MemoryState:
    """Load and validate a state written by :func:`save_state`, placing it on ``device``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        MemoryFileError: truncated/corrupt file, missing or unsupported metadata, a missing,
            unexpected, mis-shaped, wrongly typed or non-finite tensor, or inconsistent fields.
    """
    from safetensors.torch import load as st_load

    from .sequential import MemoryState

    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    header = _read_header(data, path)
    meta = _parse_meta(header, path)
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error type for malformed payloads
        raise MemoryFileError(f"{path}: corrupt or truncated tensor data ({e})") from None

    K, C, B = meta["K"], meta["C"], meta["batch_size"]
    dtype = _DTYPES[meta["dtype"]]
    batch = () if B is None else (B,)
    shapes = {
        "M": (*batch, K, C),
        "cov": (*batch, K, K),
        "M_ref": (*batch, K, C),
        "M_ref_pinv": (*batch, C, K),
        "M_prior": (*batch, K, C),
        "precision": (*batch, K, K),
        "moment": (*batch, K, C),
    }
    expected = set(_REQUIRED) | (set(_TRACKED) if meta["track_precision"] else set())
    missing = sorted(expected - tensors.keys())
    extra = sorted(tensors.keys() - expected)
    if missing:
        raise MemoryFileError(f"{path}: missing tensor(s) {', '.join(missing)}")
    if extra:
        raise MemoryFileError(f"{path}: unexpected tensor(s) {', '.join(extra)}")
    for name in (n for n in _REQUIRED + _TRACKED if n in expected):
        t = tensors[name]
        if t.dtype != dtype:
            raise MemoryFileError(f"{path}: tensor {name!r} has dtype {t.dtype}, metadata says {dtype}")
        if tuple(t.shape) != shapes[name]:
            raise MemoryFileError(
                f"{path}: tensor {name!r} has shape {tuple(t.shape)}, expected {shapes[name]} "
                f"(K={K}, C={C}, batch_size={B})"
            )
        if not bool(torch.isfinite(t).all()):
            raise MemoryFileError(f"{path}: tensor {name!r} contains NaN or Inf")
    try:
        state = MemoryState(
            M_base=tensors["M"],
            cov_base=tensors["cov"],
            M_ref=tensors["M_ref"],
            M_ref_pinv=tensors["M_ref_pinv"],
            M_prior=tensors["M_prior"],
            lam=float(meta["lam"]),
            addressing=meta["addressing"],
            gaussian_alpha=float(meta["gaussian_alpha"]),
            pinv_method=meta["pinv_method"],
            precision_base=tensors.get("precision"),
            moment_base=tensors.get("moment"),
            n_rows=meta["n_rows"],
            n_writes=meta["n_writes"],
            n_forgets=meta["n_forgets"],
        )
    except MemoryEngineError as e:
        raise MemoryFileError(f"{path}: inconsistent state ({e})") from None
    return state.to(device=device) if torch.device(device) != torch.device("cpu") else state
