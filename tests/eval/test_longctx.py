"""Long input context (Table 6): the hierarchical read against an independent computation; the run's contract."""

from __future__ import annotations

import json

import pytest
import torch

from larimar.eval import longctx as lc
from larimar.eval.data import EditCase
from larimar.memory import MemoryState, address, closed_form_memory, random_reference
from larimar.modeling.model import Larimar
from larimar.testing import tiny_larimar as _tiny_larimar

LAM = 1e-2


def _independent_memory(rows: torch.Tensor, M_ref: torch.Tensor, mode: str) -> torch.Tensor:
    W = address(rows, mode, M_ref=M_ref, alpha=1.0)
    return closed_form_memory(W, rows, LAM, torch.zeros_like(M_ref))


def _independent_read(q: torch.Tensor, M: torch.Tensor, M_ref: torch.Tensor, mode: str) -> torch.Tensor:
    return address(q, mode, M_ref=M_ref, alpha=1.0) @ M


@pytest.mark.parametrize("mode", ["reference", "gaussian"])
def test_hierarchical_read_equals_two_level_computation(mode):
    g = torch.Generator().manual_seed(0)
    K, C, n, cs = 12, 16, 16, 4
    M_ref = random_reference(K, C, generator=g, dtype=torch.float64)
    Z = torch.randn(n, C, generator=g, dtype=torch.float64)
    q = torch.randn(3, C, generator=g, dtype=torch.float64)
    empty = MemoryState.init(M_ref, lam=LAM, addressing=mode)
    got, sizes = lc.hierarchical_read(Z, q, empty, cs)
    assert sizes == [16, 4, 1] and got.shape == (3, C)
    # level 1: four memories of four facts each, read with every query
    level1 = [_independent_memory(Z[i : i + cs], M_ref, mode) for i in range(0, n, cs)]
    expected = []
    for i in range(q.shape[0]):
        R = torch.cat([_independent_read(q[i : i + 1], M, M_ref, mode) for M in level1])  # (4, C)
        top = _independent_memory(R, M_ref, mode)  # level 2: the four read-outs in one memory
        expected.append(_independent_read(q[i : i + 1], top, M_ref, mode)[0])
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-7, atol=1e-9)
    # the hierarchy matters: a single flat memory of all facts reads out something else
    flat = _independent_read(q, _independent_memory(Z, M_ref, mode), M_ref, mode)
    assert (flat - got).abs().max() > 1e-6


def test_hierarchy_levels_and_errors():
    g = torch.Generator().manual_seed(1)
    empty = MemoryState.init(random_reference(12, 8, generator=g, dtype=torch.float64), lam=LAM)
    Z = torch.randn(20, 8, generator=g, dtype=torch.float64)
    z, sizes = lc.hierarchical_read(Z, Z[:2], empty, 4)
    assert sizes == [20, 5, 2, 1] and z.shape == (2, 8)
    _, sizes = lc.hierarchical_read(Z[:3], Z[:1], empty, 4)
    assert sizes == [3, 1]
    with pytest.raises(ValueError):
        lc.hierarchical_read(Z, Z[:1], empty, 1)


def test_query_indices_and_prompt():
    assert lc.query_indices(64, 5) == [0, 16, 32, 47, 63]
    assert lc.query_indices(4, 10) == [0, 1, 2, 3]
    assert lc.query_indices(10, 1) == [0]
    p = lc.context_prompt(["A is B.", "C is D."], ["C is D."], "A is")
    assert p == "Facts:\nA is B.\nC is D.\n\nAnswer from the facts above.\nC is D.\nA is"
    assert lc._demos(["a", "b", "c", "d", "e"], 3) == ["e", "a", "b"]



def tiny_larimar() -> Larimar:
    return _tiny_larimar(randomize_offset=False)


WORDS = ["Paris", "Rome", "France", "Italy", "Tokyo", "Canada", "Germany", "English", "French", "Japanese", "guitar", "piano"]


def test_run_longctx_contract_and_resume(tmp_path, monkeypatch):
    model = tiny_larimar()
    cases = [EditCase(i, f"S{i}", f"The capital of {w} is", WORDS[(i + 3) % 12], w) for i, w in enumerate(WORDS)]
    cfg = {"task": "longctx"}
    kw = dict(config=cfg, sizes=[8, 12, 40], n=3, chunk_size=4, max_new_tokens=3, batch_size=2, progress=False)
    summary = lc.run_longctx(model, cases, tmp_path, **kw)
    assert summary["sizes"] == [8, 12, 40] and summary["chunk_size"] == 4
    got = [(r["method"], r["context_facts"], r["n"]) for r in summary["results"]]
    assert got == [("larimar", 8, 3), ("base", 8, 3), ("larimar", 12, 3), ("base", 12, 3)]  # 40 > 12 cases: skipped
    for r in summary["results"]:
        assert 0.0 <= r["recall"] <= 1.0 and r["seconds_per_query"] >= 0
        if r["method"] == "larimar":
            assert r["levels"] == ([8, 2, 1] if r["context_facts"] == 8 else [12, 3, 1]) and r["encoder_tokens"] > 0
        else:
            assert r["encoder_tokens"] == 0
    base8 = next(r for r in summary["results"] if r["method"] == "base" and r["context_facts"] == 8)
    lar8 = next(r for r in summary["results"] if r["method"] == "larimar" and r["context_facts"] == 8)
    assert base8["decoder_tokens_per_query"] > 3 * lar8["decoder_tokens_per_query"]  # the context is in the prompt
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert (tmp_path / "recall.png").is_file() and (tmp_path / "cases" / "base_n12" / "11.json").is_file()
    # a lost per-query result is recomputed alone; the rest is reused
    (tmp_path / "cases" / "larimar_n12" / "0.json").unlink()
    calls = []
    orig = lc._LarimarContext.answer

    def spy(self, idx):
        calls.append(list(idx))
        return orig(self, idx)

    monkeypatch.setattr(lc._LarimarContext, "answer", spy)
    monkeypatch.setattr(lc._BaseContext, "answer", lambda *a: pytest.fail("base recomputed"))
    again = lc.run_longctx(model, cases, tmp_path, **kw)
    assert calls == [[0]]
    strip = lambda s: [{k: v for k, v in r.items() if k != "seconds_per_query"} for r in s["results"]]  # noqa: E731
    assert strip(again) == strip(summary)
