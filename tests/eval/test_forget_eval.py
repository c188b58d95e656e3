"""Selective forgetting (Table 4): exactness of forgetting (float64) and the experiment's contract."""

from __future__ import annotations

import json

import pytest
import torch

from larimar.eval import forget as fg
from larimar.eval.data import EditCase
from larimar.memory import MemoryState, closed_form_memory, random_reference
from larimar.modeling.model import Larimar
from larimar.testing import tiny_larimar

FACTS = [
    ("Danielle Darrieux", "The mother tongue of Danielle Darrieux is", "English", "French"),
    ("France", "The capital of France is", "Rome", "Paris"),
    ("Apple", "Apple was founded by", "Bill Gates", "Steve Jobs"),
    ("Eibenstock", "Eibenstock is located in", "Canada", "Germany"),
    ("Toko Yasuda", "Toko Yasuda plays the", "piano", "guitar"),
    ("Japan", "The official language of Japan is", "French", "Japanese"),
]




def cases() -> list[EditCase]:
    return [EditCase(i, s, p, new, true) for i, (s, p, new, true) in enumerate(FACTS)]


@pytest.fixture(scope="module")
def model() -> Larimar:
    torch.manual_seed(0)  # the encoder head's orthogonal init draws from the global generator
    return tiny_larimar()


@pytest.mark.parametrize("addressing", ["reference", "gaussian"])
@pytest.mark.parametrize("one_episode", [True, False])
def test_forget_equals_never_seen_float64(addressing, one_episode):
    g = torch.Generator().manual_seed(1)
    K, C, N = 12, 16, 7
    M_ref = random_reference(K, C, generator=g, dtype=torch.float64)
    Z = torch.randn(N, C, generator=g, dtype=torch.float64)
    u = torch.randn(1, C, generator=g, dtype=torch.float64)  # the "{prompt} unknown." latent
    empty = MemoryState.init(M_ref, lam=1e-3, addressing=addressing)
    if one_episode:
        full = empty.write(Z)
    else:
        full = empty
        for i in range(N):
            full = full.write(Z[i : i + 1])
    keep = [0, 1, 2, 4, 5, 6]
    forgot = full.forget(Z[3:4]).write(u)
    never = empty.write(Z[keep]).write(u)
    # float64 with lambda = 1e-3: Cov entries reach 1e3, so round-off differs by BLAS (seen: 2e-10 on an AMD EPYC)
    torch.testing.assert_close(forgot.M, never.M, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(forgot.cov, never.cov, rtol=1e-7, atol=1e-9)
    # and both equal the direct least-squares solution over the rows actually held
    rows = torch.cat([Z[keep], u])
    direct = closed_form_memory(empty.address(rows), rows, 1e-3, empty.M_prior)
    torch.testing.assert_close(forgot.M, direct, rtol=1e-7, atol=1e-8)
    # the forgotten row really mattered: the memory with it is different
    assert (full.write(u).M - never.M).abs().max() > 1e-3


def test_model_forget_equals_never_seen(model):
    """Through the model's fact ledger: forget + write 'unknown' == a memory that never saw the fact."""
    texts = [f"{p} {new}." for _, p, new, _ in FACTS]
    model.reset_memory()
    model.write(texts)
    Z_all = model.facts.Z.clone()
    model.forget([texts[2]])
    model.write(["Apple was founded by unknown."])
    u = model.facts.Z[-1:].clone()
    assert model.facts.state.dtype == torch.float64
    never = model.empty_memory().state.write(Z_all[[0, 1, 3, 4, 5]]).write(u)
    scale = float(never.M.abs().max())
    torch.testing.assert_close(model.facts.state.M, never.M, rtol=1e-7, atol=1e-8 * scale)
    assert model.facts.texts == [t for i, t in enumerate(texts) if i != 2] + ["Apple was founded by unknown."]
    model.reset_memory()


def test_parse_sizes():
    assert fg.parse_sizes("1,K,2K", 512) == [1, 512, 1024]
    assert fg.parse_sizes("4, 2, 4", 8) == [2, 4]
    with pytest.raises(ValueError):
        fg.parse_sizes("0", 8)


def test_icl_prompt_and_sentence():
    c = cases()[1]
    assert fg.forget_sentence(c) == "The capital of France is unknown."
    p = fg.icl_prompt(["A is B.", "C is D."], "The capital of France is", forget="C is D.")
    assert p.startswith("Facts:\nA is B.\nC is D.\n") and p.endswith("\n\nThe capital of France is")
    assert "Forget this fact" in p and "Forget" not in fg.icl_prompt(["A is B."], "q")


def test_run_forget_contract_and_resume(model, tmp_path, monkeypatch):
    data = {"counterfact": cases(), "zsre": cases()[:4]}
    cfg = {"task": "forget", "x": 1}
    longest = max(len(model.tokenizer(f"{p} {n}.\n", add_special_tokens=False)["input_ids"]) for _, p, n, _ in FACTS)
    budget = 64 + 4 * longest  # room for the forgotten fact (twice) and at least two others, not all five
    kw = dict(config=cfg, sizes=[1, 4, 6], trials=2, retained_max=3, icl=True, icl_retained_max=2,
              icl_max_tokens=budget, max_new_tokens=3, progress=False)
    summary = fg.run_forget(model, data, tmp_path, **kw)
    runs = summary["runs"]
    # zsre has only 4 cases: N=6 is skipped there
    assert [(r["method"], r["dataset"], r["N"]) for r in runs] == [
        ("larimar", "counterfact", 1), ("icl", "counterfact", 1), ("larimar", "counterfact", 4), ("icl", "counterfact", 4),
        ("larimar", "counterfact", 6), ("icl", "counterfact", 6), ("larimar", "zsre", 1), ("icl", "zsre", 1),
        ("larimar", "zsre", 4), ("icl", "zsre", 4),
    ]
    for r in runs:
        assert {"dataset", "N", "K", "forgotten_recall", "retained_recall"} <= set(r)
        assert 0.0 <= r["forgotten_recall"] <= 1.0
        if r["N"] == 1:
            assert r["retained_recall"] is None and r["trials"] == 1
        else:
            assert r["trials"] == 2 and 0.0 <= r["retained_recall"] <= 1.0
        assert r["K"] == (12 if r["method"] == "larimar" else None)
    icl6 = next(r for r in runs if r["method"] == "icl" and r["N"] == 6)
    assert 3 <= icl6["facts_in_context"] < 6  # the token budget keeps only part of the context
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert "| larimar | counterfact | 6 |" in (tmp_path / "summary.md").read_text()
    # every point is reused on a second run
    monkeypatch.setattr(fg, "larimar_point", lambda *a, **k: pytest.fail("recomputed"))
    monkeypatch.setattr(fg, "icl_point", lambda *a, **k: pytest.fail("recomputed"))
    assert fg.run_forget(model, data, tmp_path, **kw) == summary


def test_larimar_point_forgets_with_a_memory_that_recalls(model, monkeypatch):
    """With answers read off the memory state, the forgotten fact is gone and the others remain."""
    written: list[str] = []

    def fake_generate(m, prompts, **k):
        texts = m.facts.texts
        out = []
        for p in prompts:
            held = [t for t in texts if t.startswith(p + " ")]
            out.append(held[-1][len(p) + 1 :] if held else "nothing")
        written.append(list(texts))
        return out

    monkeypatch.setattr(fg, "batched_generate", fake_generate)
    rec = fg.larimar_point(model, cases(), 6, trials=3, retained_max=2)
    assert rec["recall_before"] == 1.0 and rec["retained_recall_before"] == 1.0
    assert rec["forgotten_recall"] == 0.0 and rec["forgotten_says_unknown"] == 1.0
    assert rec["retained_recall"] == 1.0 and rec["retained_misses_before"] == []
    # each trial starts again from the full memory: exactly one fact missing, one "unknown" added
    for texts in written[1:]:
        assert len(texts) == 6 and sum(t.endswith("unknown.") for t in texts) == 1


def test_larimar_point_lists_the_retained_facts_a_full_memory_misses(model, monkeypatch):
    """A retained fact answered wrongly before anything is forgotten is listed with its generation."""
    cs = cases()

    def one_wrong(m, prompts, **k):
        return ["nothing" if p == cs[1].prompt else cs[[c.prompt for c in cs].index(p)].target_new for p in prompts]

    monkeypatch.setattr(fg, "batched_generate", one_wrong)
    rec = fg.larimar_point(model, cs, 6, trials=1, retained_max=5)
    forgotten = rec["per_trial"][0]["index"]
    assert forgotten != 1 and rec["n_retained"] == 5
    assert rec["retained_misses_before"] == [{"prompt": cs[1].prompt, "target": cs[1].target_new, "generation": "nothing"}]
    assert rec["retained_recall_before"] == 0.8


def test_larimar_point_with_key_slots_reads_answers_from_memory(monkeypatch):
    """Key slots (Gaussian addressing against the prompts' encodings): the answer decoded as the
    value nearest to the real read-out is the written object before forgetting, "unknown" after,
    and the other facts' answers are untouched."""
    from larimar.eval.sequential import MemoryOptions, encode_latents
    from larimar.modeling.model import fact_value

    model = tiny_larimar(memory_size=40, keyed_writes=True, value_writes=True)
    cs = cases()
    answers = [new for _, _, new, _ in FACTS] + [fg.UNKNOWN]
    Zv = encode_latents(model, answers).double()
    assert fact_value(f"{cs[0].prompt} {cs[0].target_new}.", cs[0].prompt) == cs[0].target_new

    def nearest_value(m, prompts, **k):
        z = m.read(list(prompts)).double()
        cos = torch.nn.functional.normalize(z, dim=-1) @ torch.nn.functional.normalize(Zv, dim=-1).T
        return [answers[int(i)] for i in cos.argmax(-1)]

    monkeypatch.setattr(fg, "batched_generate", nearest_value)
    rec = fg.larimar_point(model, cs, 6, trials=3, retained_max=2, memory=MemoryOptions(addressing="gaussian"))
    assert rec["K"] == 40  # 6 key slots, 34 sentinel rows
    assert model.facts.state.addressing == "reference"  # the model's own memory is back afterwards
    assert rec["recall_before"] == 1.0 and rec["retained_recall_before"] == 1.0
    assert rec["forgotten_recall"] == 0.0 and rec["forgotten_says_unknown"] == 1.0
    assert rec["retained_recall"] == 1.0
