"""safetensors persistence of MemoryState: round trip, validation, atomic writes."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save as st_save

import larimar.memory.io as mio
from larimar.memory import MemoryFileError, MemoryState, load_state, random_reference, save_state

F64 = torch.float64
TENSORS = ("M", "cov", "M_ref", "M_ref_pinv", "M_prior", "precision", "moment")


def _state(dtype=F64, batch_size=None, **kw):
    g = torch.Generator().manual_seed(0)
    M_ref = random_reference(12, 5, generator=g, dtype=dtype, batch_size=batch_size)
    s = MemoryState.init(M_ref, lam=0.3, addressing="gaussian", gaussian_alpha=0.25, **kw)
    shape = (3, 5) if batch_size is None else (batch_size, 3, 5)
    Z = torch.randn(shape, generator=g, dtype=dtype)
    return s.write(Z).write(Z[..., :1, :]).forget(Z[..., :1, :])


def _assert_same(a: MemoryState, b: MemoryState):
    for name in TENSORS:
        ta, tb = getattr(a, name), getattr(b, name)
        if ta is None:
            assert tb is None
        else:
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), name
    for name in ("lam", "addressing", "gaussian_alpha", "pinv_method", "n_rows", "n_writes", "n_forgets"):
        assert getattr(a, name) == getattr(b, name), name


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("batch_size", [None, 2])
@pytest.mark.parametrize("track", [True, False])
def test_round_trip_is_exact(tmp_path, dtype, batch_size, track):
    s = _state(dtype, batch_size, track_precision=track)
    path = tmp_path / "mem.safetensors"
    s.save(path)
    t = MemoryState.load(path)
    _assert_same(s, t)
    assert t.n_rows == 3 and t.n_writes == 2 and t.n_forgets == 1
    # the loaded state keeps working the same (the file holds the materialised M / Cov, the
    # original still carries its unfolded low-rank log, so they agree to rounding)
    z = torch.ones((1, 5) if batch_size is None else (2, 1, 5), dtype=dtype)
    s2, t2 = s.write(z), t.write(z)
    for name in TENSORS if track else TENSORS[:5]:
        torch.testing.assert_close(getattr(s2, name), getattr(t2, name))
    # metadata
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[mio.METADATA_KEY])
    assert meta["format_version"] == mio.FORMAT_VERSION
    assert (meta["K"], meta["C"], meta["batch_size"]) == (12, 5, batch_size)
    assert meta["dtype"] == str(dtype).removeprefix("torch.")
    assert meta["addressing"] == "gaussian" and meta["lam"] == 0.3 and meta["track_precision"] is track


def test_save_overwrites_atomically_and_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "mem.safetensors"
    s = _state()
    save_state(s, path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(mio.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_state(s.write(torch.ones(1, 5, dtype=F64)), path)
    assert path.read_bytes() == before  # old file intact
    assert sorted(os.listdir(tmp_path)) == ["mem.safetensors"]  # no temp file left behind
    monkeypatch.undo()
    save_state(s.write(torch.ones(1, 5, dtype=F64)), path)
    assert load_state(path).n_rows == 4


def _rewrite(path, tensors=None, meta_update=None, drop_meta=False):
    """Re-save a valid file with modified tensors / metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[mio.METADATA_KEY])
        data = {k: f.get_tensor(k) for k in f.keys()}
    data.update(tensors or {})
    data = {k: v for k, v in data.items() if v is not None}
    meta.update(meta_update or {})
    md = None if drop_meta else {mio.METADATA_KEY: json.dumps(meta)}
    path.write_bytes(st_save(data, metadata=md))


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "mem.safetensors"
    _state().save(path)
    return path


def test_truncated_file(saved):
    data = saved.read_bytes()
    for cut in (4, 20, len(data) // 2, len(data) - 1):
        saved.write_bytes(data[:cut])
        with pytest.raises(MemoryFileError, match="truncated"):
            load_state(saved)


def test_corrupt_file(saved):
    saved.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"not json at all!" + b"\x00" * 64)
    with pytest.raises(MemoryFileError, match="corrupt"):
        load_state(saved)
    saved.write_bytes(os.urandom(300))
    with pytest.raises(MemoryFileError):
        load_state(saved)


def test_corrupt_tensor_payload(saved):
    data = bytearray(saved.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    # point a tensor's offsets past the end of the payload
    header["M"]["data_offsets"] = [0, 10**9]
    raw = json.dumps(header).encode()
    saved.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data[8 + n :]))
    with pytest.raises(MemoryFileError, match="corrupt or truncated tensor data"):
        load_state(saved)


def test_wrong_shape_dtype_missing_and_extra(saved):
    good = saved.read_bytes()
    cases = [
        ({"tensors": {"M": torch.zeros(12, 6, dtype=F64)}}, r"tensor 'M' has shape \(12, 6\), expected \(12, 5\)"),
        ({"tensors": {"cov": torch.eye(11, dtype=F64)}}, r"tensor 'cov' has shape"),
        ({"tensors": {"M_prior": torch.zeros(12, 5, dtype=torch.float32)}}, "tensor 'M_prior' has dtype torch.float32"),
        ({"tensors": {"moment": None}}, "missing tensor.*moment"),
        ({"tensors": {"bogus": torch.zeros(1)}}, "unexpected tensor.*bogus"),
        ({"tensors": {"M": torch.full((12, 5), float("nan"), dtype=F64)}}, "'M' contains NaN"),
        ({"meta_update": {"K": 13}}, r"expected \(13, 5\)"),
        ({"meta_update": {"format_version": 99}}, "unsupported format_version 99"),
        ({"meta_update": {"dtype": "float16"}}, "unsupported dtype"),
        ({"meta_update": {"lam": -1.0}}, "inconsistent state.*lam"),
        ({"meta_update": {"addressing": "nearest"}}, "inconsistent state.*addressing"),
        ({"meta_update": {"n_rows": "3"}}, "'n_rows' has invalid value"),
        ({"meta_update": {"batch_size": 0}}, "batch_size"),
        ({"drop_meta": True}, "not a larimar memory file"),
    ]
    for kwargs, msg in cases:
        saved.write_bytes(good)
        _rewrite(saved, **kwargs)
        with pytest.raises(MemoryFileError, match=msg):
            load_state(saved)
    saved.write_bytes(good)
    from safetensors import safe_open

    with safe_open(str(saved), framework="pt") as f:
        meta = json.loads(f.metadata()[mio.METADATA_KEY])
        data = {k: f.get_tensor(k) for k in f.keys()}
    del meta["n_rows"]
    saved.write_bytes(st_save(data, metadata={mio.METADATA_KEY: json.dumps(meta)}))
    with pytest.raises(MemoryFileError, match="'n_rows' is missing"):
        load_state(saved)


def test_errors_are_value_errors_and_missing_file(tmp_path):
    assert issubclass(MemoryFileError, ValueError)
    with pytest.raises(FileNotFoundError):
        load_state(tmp_path / "nope.safetensors")
    with pytest.raises(TypeError):
        save_state("not a state", tmp_path / "x.safetensors")
