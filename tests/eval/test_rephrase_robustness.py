"""Unseen phrasings (Figs. 2b/5) and read-noise robustness (Fig. 6) on a tiny Larimar."""

from __future__ import annotations

import json

import pytest
import torch

from larimar.eval import rephrase as rp
from larimar.eval import robustness as rb
from larimar.eval.data import EditCase, load_pararel
from larimar.memory import MemoryState, random_reference
from larimar.modeling.model import Larimar
from larimar.testing import tiny_larimar

PATTERNS = {
    "P17": ["[X] is located in [Y] .", "[X], which is located in [Y].", "[X], located in [Y].", "[X] is in [Y].",
            "[Y] is the country of [X]."],  # the last one is not a cloze pattern
    "P36": ["The capital of [X] is [Y].", "[X]'s capital is [Y].", "[X] has its capital in [Y]."],  # too few
    "P103": ["The mother tongue of [X] is [Y].", "[X] is a native speaker of [Y].", "[X] speaks [Y].",
             "The native language of [X] is [Y]."],
}
FACTS = {
    "P17": [("Eibenstock", "Germany"), ("Simcoe Composite School", "Canada"), ("Tokyo", "Japan"), ("Rome", ""),
            ("Paris", "France")],
    "P36": [("France", "Paris")],
    "P103": [("Danielle Darrieux", "French"), ("Barack Obama", "English"), ("Michel Rocard", "French")],
}


def write_pararel(root):
    (root / "graphs_json").mkdir(parents=True)
    (root / "trex_lms_vocab").mkdir(parents=True)
    for rel, pats in PATTERNS.items():
        (root / "graphs_json" / f"{rel}.jsonl").write_text("".join(json.dumps({"pattern": p}) + "\n" for p in pats))
        (root / "trex_lms_vocab" / f"{rel}.jsonl").write_text(
            "".join(json.dumps({"sub_label": s, "obj_label": o}) + "\n" for s, o in FACTS[rel])
        )
    return root




@pytest.fixture(scope="module")
def model() -> Larimar:
    return tiny_larimar()


# ---------------------------------------------------------------- rephrase


def test_select_pararel_facts(tmp_path):
    rels = load_pararel(write_pararel(tmp_path / "pararel"))
    facts = rp.select_pararel_facts(rels, 6, writes_per_fact=2, queries_per_fact=2, seed=0)
    # P36 has 3 cloze patterns (< 4): excluded; the empty object is skipped; round-robin P17 / P103
    assert len(facts) == 6 and {f.relation for f in facts} == {"P17", "P103"}
    assert [f.relation for f in facts[:4]] == ["P17", "P103", "P17", "P103"]
    assert all(f.object for f in facts)
    for f in facts:
        assert len(f.written) == 2 and len(f.queries) == 2
        assert all(f.subject in w and w.endswith(f.object + ".") for w in f.written)
        assert all(f.subject in q and f.object not in q for q in f.queries)
        # written and queried phrasings come from different patterns
        assert not {w[: -len(f.object) - 1].rstrip() for w in f.written} & set(f.queries)
    assert facts == rp.select_pararel_facts(rels, 6, seed=0)
    assert facts != rp.select_pararel_facts(rels, 6, seed=1)
    with pytest.raises(ValueError):
        rp.select_pararel_facts(rels, 2, writes_per_fact=4, queries_per_fact=2)


def test_rephrase_both_addressing_modes_run(model, tmp_path, monkeypatch):
    rels = load_pararel(write_pararel(tmp_path / "pararel"))
    facts = rp.select_pararel_facts(rels, 5, seed=0)
    cfg = {"task": "rephrase", "max_writes": 10}
    kw = dict(config=cfg, memory_size=6, eval_every=4, eval_max=3, max_new_tokens=3, progress=False)
    summary = rp.run_rephrase(model, facts, tmp_path / "out", **kw)
    assert summary["K"] == 5  # only five reference phrasings available
    assert set(summary["modes"]) == {"reference", "gaussian"}
    for mode, res in summary["modes"].items():
        assert [w for w, _ in res["curve"]] == [4, 8, 10]
        assert all(0.0 <= f <= 1.0 for _, f in res["curve"]) and res["final_f1"] == res["curve"][-1][1]
        prog = json.loads((tmp_path / "out" / mode / "progress.json").read_text())
        assert prog["points"][0]["n_facts_eval"] == 2 and prog["points"][-1]["n_facts_eval"] == 3
    assert (tmp_path / "out" / "curve.png").is_file()
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    # the two modes really used different addressing
    seen = []
    orig = rp.LarimarStream.write

    states = {}

    def spy(self, index):
        seen.append(self.model.facts.state.addressing)
        states[self.model.facts.state.addressing] = self.model.facts.state
        return orig(self, index)

    monkeypatch.setattr(rp.LarimarStream, "write", spy)
    rp.run_rephrase(model, facts[:2], tmp_path / "again", **kw)
    assert seen == ["reference"] * 4 + ["gaussian"] * 4
    # pseudo-inverse: rows rescaled to M0's norm, the config's ridge; Gaussian: the raw encodings
    # (sentinels past the two facts), ridge 0.01, alpha 0.1
    from larimar.eval.sequential import encode_latents, reference_memory

    first = [f.written[0] for f in facts[:2]]
    raw = encode_latents(model, first)
    ref, gauss = states["reference"], states["gaussian"]
    torch.testing.assert_close(ref.M_ref.float(), reference_memory(model, first, 2).float())
    assert ref.lam == model.config.ridge
    torch.testing.assert_close(gauss.M_ref[:2].float(), raw.float(), rtol=1e-5, atol=1e-6)
    assert gauss.lam == pytest.approx(0.01) and gauss.gaussian_alpha == pytest.approx(0.1)


# ---------------------------------------------------------------- robustness


def test_noisy_read_is_the_state_read_plus_scaled_noise():
    g = torch.Generator().manual_seed(0)
    M_ref = random_reference(12, 16, generator=g, dtype=torch.float64)
    state = MemoryState.init(M_ref, lam=1e-3).write(torch.randn(5, 16, generator=g, dtype=torch.float64))
    z = torch.randn(3, 16, generator=g, dtype=torch.float64)
    clean, W0 = rb.noisy_read(state, z, 0.0)
    torch.testing.assert_close(clean, state.read(z))
    eps = torch.randn(3, 12, generator=g, dtype=torch.float64)
    for sigma in (0.1, 0.5):
        noisy, W = rb.noisy_read(state, z, sigma, eps=eps)
        torch.testing.assert_close(W - W0, sigma * eps)
        torch.testing.assert_close(noisy - clean, sigma * eps @ state.M)
    with pytest.raises(ValueError):
        rb.noisy_read(state, z, -1.0)


CF = [
    EditCase(0, "Danielle Darrieux", "The mother tongue of Danielle Darrieux is", "English", "French",
             generation_prompts=["Danielle Darrieux's mother tongue is"]),
    EditCase(1, "France", "The capital of France is", "Rome", "Paris"),
    EditCase(2, "Apple", "Apple was founded by", "Bill Gates", "Steve Jobs", generation_prompts=["Apple is"]),
]


def test_run_robustness_contract_and_resume(model, tmp_path, monkeypatch):
    cfg = {"task": "robustness"}
    kw = dict(config=cfg, sigmas=[0.0, 0.5, 5.0], gen_tokens=4, progress=False)
    summary = rb.run_robustness(model, CF, tmp_path, **kw)
    assert summary["n"] == 3 and summary["sigmas"] == [0.0, 0.5, 5.0] and summary["w_rms"] > 0
    assert [r["sigma_w"] for r in summary["results"]] == [0.0, 0.5, 5.0]
    for r in summary["results"]:
        assert r["n"] == 3 and 0.0 <= r["edit_success"] <= 100.0
        assert r["perplexity"] is None or r["perplexity"] >= 1.0
    recs = [json.loads((tmp_path / "cases" / f"sigma_{s:g}" / "1.json").read_text()) for s in (0.0, 0.5, 5.0)]
    assert recs[0]["nll_new"] != recs[2]["nll_new"]  # the noise reaches the decoder
    assert (tmp_path / "robustness.png").is_file() and "sigma_W" in (tmp_path / "summary.md").read_text()
    assert len(model) == 0
    # resume: cached points are reused; a new sigma only computes the new one
    asked = []
    orig = rb.robustness_case

    def spy(m, case, sigmas, **k):
        asked.append(list(sigmas))
        return orig(m, case, sigmas, **k)

    monkeypatch.setattr(rb, "robustness_case", spy)
    again = rb.run_robustness(model, CF, tmp_path, **kw)
    assert asked == [] and again == summary
    more = rb.run_robustness(model, CF, tmp_path, **(kw | {"sigmas": [0.0, 0.5, 1.0, 5.0]}))
    assert asked == [[1.0]] * 3
    assert [r["sigma_w"] for r in more["results"]] == [0.0, 0.5, 1.0, 5.0]
    assert more["results"][0] == summary["results"][0]


def test_rephrase_unedited_mode_answers_without_memory(model, tmp_path):
    rels = load_pararel(write_pararel(tmp_path / "pararel"))
    facts = rp.select_pararel_facts(rels, 3, seed=0)
    kw = dict(config={"task": "rephrase", "u": 1}, memory_size=6, eval_every=2, eval_max=3, max_new_tokens=3, progress=False)
    summary = rp.run_rephrase(model, facts, tmp_path / "out", modes=("unedited",), **kw)
    assert set(summary["modes"]) == {"unedited"}
    prog = json.loads((tmp_path / "out" / "unedited" / "progress.json").read_text())
    ex = prog["points"][-1]["examples"]
    model.reset_memory()
    plain = model.generate([e["prompt"] for e in ex], max_new_tokens=3, use_memory="never")
    assert [e["generation"] for e in ex] == list(plain)
    assert len(model) == 0  # nothing was written
    with pytest.raises(ValueError, match="subset"):
        rp.run_rephrase(model, facts, tmp_path / "bad", modes=("nothing",), **kw)


def test_companions_follow_the_case_wrap_round_and_skip_it():
    ids = lambda cs: [c.case_id for c in cs]  # noqa: E731
    assert ids(rb.companions(CF, CF[1], 2)) == [2, 0]
    assert ids(rb.companions(CF, CF[2], 1)) == [0]
    assert rb.companions(CF, CF[0], 0) == []
    outsider = EditCase(9, "Rome", "Rome is in", "France", "Italy")
    assert ids(rb.companions(CF, outsider, 3)) == [0, 1, 2]
    with pytest.raises(ValueError, match="only 2"):
        rb.companions(CF, CF[0], 3)


def test_run_robustness_writes_each_fact_with_its_companions(model, tmp_path, monkeypatch):
    written = []
    orig = model.write_facts

    def spy(texts, prompts, *a, **k):
        written.append(list(prompts))
        return orig(texts, prompts, *a, **k)

    monkeypatch.setattr(model, "write_facts", spy)
    kw = dict(config={"task": "robustness", "memory_facts": 3}, sigmas=[0.0, 0.5], gen_tokens=2, progress=False)
    summary = rb.run_robustness(model, CF[:2], tmp_path / "m3", memory_facts=3, pool=CF, **kw)
    assert summary["memory_facts"] == 3 and summary["n"] == 2
    assert written == [[CF[0].prompt, CF[1].prompt, CF[2].prompt], [CF[1].prompt, CF[2].prompt, CF[0].prompt]]
    rec = json.loads((tmp_path / "m3" / "cases" / "sigma_0" / "0.json").read_text())
    assert rec["memory_facts"] == 3
    # the other facts change the read-out the decoder sees, so the scores differ from one fact alone
    alone = rb.run_robustness(model, CF[:2], tmp_path / "m1", **(kw | {"config": {"task": "robustness"}}))
    one = json.loads((tmp_path / "m1" / "cases" / "sigma_0" / "0.json").read_text())
    assert one["memory_facts"] == 1 and alone["memory_facts"] == 1
    assert one["nll_new"] != rec["nll_new"]
    # a record made with another number of facts in memory is not reused
    assert rb._load(tmp_path / "m3" / "cases" / "sigma_0" / "0.json", 0, 0.0, 3) == rec
    assert rb._load(tmp_path / "m3" / "cases" / "sigma_0" / "0.json", 0, 0.0, 1) is None
    # bad sizes fail before anything is written
    with pytest.raises(ValueError, match="memory_facts=4"):
        rb.run_robustness(model, CF, tmp_path / "m4", memory_facts=4, **kw)
    with pytest.raises(ValueError, match=">= 1"):
        rb.run_robustness(model, CF, tmp_path / "m0", memory_facts=0, **kw)
    assert not (tmp_path / "m4").exists() and not (tmp_path / "m0").exists()
