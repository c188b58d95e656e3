"""`larimar bench` sub-command: argument parsing, JSON/table output, model-target dispatch."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types

import pytest

from larimar import bench

TINY = ["--ks", "16,24", "--cs", "8", "--repeats", "2", "--seq-writes", "5", "--seq-size", "16,8"]


def _parse(argv):
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return p.parse_args(argv)


def test_module_import_is_light():
    code = "import sys, larimar.bench; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_arguments():
    a = _parse(["memory", "--json"])
    assert a.target == "memory" and a.json is True and a.repeats == 20
    assert _parse(["model"]).json is False
    with pytest.raises(SystemExit):
        _parse(["gpu"])


def test_memory_json(capsys):
    assert bench.run(_parse(["memory", "--json", *TINY])) == 0
    out = capsys.readouterr().out
    doc = json.loads(out)  # exactly one JSON object on stdout
    rows = doc["rows"]
    assert [(r["op"], r["K"]) for r in rows] == [
        (op, K) for K in (16, 24) for op in ("write_oneshot", "write_seq", "forget", "read", "write_slot")
    ] + [("write_seq_x5", 16)]
    for r in rows:
        assert set(r) == {"op", "K", "C", "N", "median_ms", "naive_median_ms"}
        assert r["median_ms"] > 0
    assert rows[0]["N"] == 16 and rows[1]["N"] == 1 and rows[-1]["N"] == 5
    assert rows[-1]["naive_median_ms"] is None
    assert all(r["naive_median_ms"] > 0 for r in rows[:-1] if r["op"] != "write_slot")
    assert all(r["naive_median_ms"] is None for r in rows if r["op"] == "write_slot")


def test_memory_table(capsys):
    assert bench.run(_parse(["memory", *TINY])) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].split() == ["op", "K", "C", "N", "median_ms", "naive_ms", "speedup"]
    assert any(line.startswith("write_seq_x5") for line in lines)
    assert all(line.rstrip().endswith("x") for line in lines[2:-1] if not line.startswith("write_slot"))
    assert any(line.startswith("write_slot") for line in lines)


def test_format_table_alignment():
    rows = [
        {"op": "read", "K": 8, "C": 4, "N": 1, "median_ms": 0.5, "naive_median_ms": 5.0},
        {"op": "write_seq_x10", "K": 1000, "C": 768, "N": 10, "median_ms": 12.0, "naive_median_ms": None},
    ]
    lines = bench.format_table(rows).splitlines()
    assert len({len(line) for line in lines}) == 1
    assert "10.0x" in lines[2] and lines[3].rstrip().endswith("-")


def test_model_target_dispatch(monkeypatch, capsys):
    seen = {}
    fake = types.ModuleType("larimar.modeling.bench")
    fake.run_model_bench = lambda args: seen.setdefault("args", args) and 0
    monkeypatch.setitem(sys.modules, "larimar.modeling.bench", fake)
    args = _parse(["model", "--json"])
    assert bench.run(args) == 0 and seen["args"] is args


def test_model_target_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "larimar.modeling.bench", None)  # makes the import fail
    assert bench.run(_parse(["model"])) == 2
    assert "larimar.modeling.bench is not available" in capsys.readouterr().err


def test_bad_sizes():
    with pytest.raises(SystemExit, match="--ks"):
        bench.run(_parse(["memory", "--ks", "10,x"]))
    with pytest.raises(SystemExit, match="--seq-size"):
        bench.run(_parse(["memory", "--ks", "8", "--cs", "4", "--seq-size", "8"]))
