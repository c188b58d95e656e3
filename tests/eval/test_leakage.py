"""Information leakage (Table 5): attack counting with fake systems of known outputs; the run's contract."""

from __future__ import annotations

import argparse
import json

import pytest

from larimar.eval import leakage as lk
from larimar.eval.data import EditCase
from larimar.modeling.model import Larimar
from larimar.testing import tiny_larimar as _tiny_larimar


def case(i: int, prompt: str, true: str, paras: list[str]) -> EditCase:
    return EditCase(i, "S", prompt, "Rome", true, paraphrase_prompts=paras)


CASES = [
    case(0, "The capital of France is", "Paris", ["France's capital is", "The French capital city is"]),
    case(1, "Apple was founded by", "Steve Jobs", ["The founder of Apple is"]),
    case(2, "The mother tongue of Danielle Darrieux is", "French", []),
]


class FakeSystem:
    """Outputs scripted per prompt (cycled); records what it was asked."""

    def __init__(self, name: str, script: dict[str, list[str]]) -> None:
        self.name = name
        self.script = script
        self.applied: list[object] = []
        self.undone = 0
        self.calls: list[tuple[list[str], int]] = []

    def apply(self, c: EditCase) -> None:
        self.applied.append(c.case_id)

    def sample(self, prompts: list[str], *, max_new_tokens: int, seed: int) -> list[str]:
        self.calls.append((list(prompts), seed))
        seen: dict[str, int] = {}
        out = []
        for p in prompts:
            k = seen.get(p, 0)
            seen[p] = k + 1
            opts = self.script.get(p, ["nothing"])
            out.append(opts[k % len(opts)])
        return out

    def undo(self) -> None:
        self.undone += 1


def test_split_budget_and_prompts():
    assert lk.split_budget(20, 3) == [7, 7, 6]
    assert lk.split_budget(20, 1) == [20]
    assert sum(lk.split_budget(5, 4)) == 5
    with pytest.raises(ValueError):
        lk.split_budget(0, 2)
    assert lk.attack_prompts(CASES[0]) == [CASES[0].prompt] + CASES[0].paraphrase_prompts
    assert lk.attack_prompts(case(9, "a", "b", ["a", "c"])) == ["a", "c"]


def test_attack_counting_with_known_outputs():
    # only the 3rd sample of the second paraphrase leaks "Paris" (whole word, any case)
    script = {
        "The capital of France is": ["unknown", "Parisian food", "I don't know"],
        "France's capital is": ["unknown."],
        "The French capital city is": ["unknown", "Lyon", " paris, of course", "unknown"],
    }
    sys_ = FakeSystem("fake", script)
    rec = lk.attack_case(sys_, CASES[0], budget=20, max_new_tokens=5, seed=3)
    assert rec["counts"] == [7, 7, 6] and [len(g) for g in rec["generations"]] == [7, 7, 6]
    # " paris, of course" comes up at positions 2 (and cycles to 6) of 6 samples -> 1 hit ("Parisian" is not)
    assert rec["hits"] == 1 and rec["leaked"] is True
    assert sys_.applied == [0] and sys_.undone == 1
    assert len(sys_.calls) == 1 and len(sys_.calls[0][0]) == 20
    assert sys_.calls[0][1] == lk.case_seed(3, 0)
    clean = lk.attack_case(FakeSystem("clean", {}), CASES[0], budget=20, max_new_tokens=5, seed=3)
    assert clean["hits"] == 0 and clean["leaked"] is False


def test_attack_undoes_even_when_sampling_fails():
    class Broken(FakeSystem):
        def sample(self, prompts, *, max_new_tokens, seed):
            raise RuntimeError("boom")

    b = Broken("broken", {})
    with pytest.raises(RuntimeError):
        lk.attack_case(b, CASES[1], budget=4, max_new_tokens=3, seed=0)
    assert b.undone == 1


def test_summary_counts_and_reduction():
    recs = {
        "base": [{"leaked": True, "hits": 3}, {"leaked": True, "hits": 1}, {"leaked": False, "hits": 0}, {"leaked": True, "hits": 2}],
        "sys": [{"leaked": True, "hits": 1}, {"leaked": False, "hits": 0}, {"leaked": False, "hits": 0}, {"leaked": False, "hits": 0}],
    }
    s = lk.summarize_leakage(recs)
    assert s["base"]["attack_success"] == 75.0 and "reduction_vs_base" not in s["base"]
    assert s["sys"]["attack_success"] == 25.0
    assert s["sys"]["reduction_vs_base"] == 50.0
    assert s["sys"]["relative_reduction"] == pytest.approx(50.0 / 75.0)



def tiny_larimar() -> Larimar:
    return _tiny_larimar(randomize_offset=False)


def test_run_leakage_with_fakes_and_resume(tmp_path, monkeypatch):
    model = tiny_larimar()
    # selection: the "base model" knows cases 0 and 2 only
    known = {"The capital of France is": " Paris.", "Apple was founded by": " Bill", "The mother tongue of Danielle Darrieux is": " French"}
    monkeypatch.setattr(lk, "batched_generate", lambda m, prompts, **k: [known[p] for p in prompts])
    base = FakeSystem("base", {p: ["It is Paris"] for p in lk.attack_prompts(CASES[0])} | {CASES[2].prompt: ["french!"]})
    deleted = FakeSystem("deleted", {CASES[0].paraphrase_prompts[1]: ["unknown", "Paris"]})
    cfg = {"task": "leakage", "n": 2}
    summary = lk.run_leakage(model, CASES, tmp_path, config=cfg, n=2, systems={"base": base, "deleted": deleted},
                             budget=6, progress=False)
    assert summary["n"] == 2 and summary["scanned"] == 3 and summary["budget"] == 6
    assert summary["systems"]["base"]["attack_success"] == 100.0
    assert summary["systems"]["deleted"]["attack_success"] == 50.0
    assert summary["systems"]["deleted"]["reduction_vs_base"] == 50.0
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert json.loads((tmp_path / "selection.json").read_text())["case_ids"] == [0, 2]
    assert (tmp_path / "cases" / "deleted" / "2.json").is_file()
    assert "| deleted | 2 | 50.0 | 50.0 |" in (tmp_path / "summary.md").read_text()
    # resume: nothing is attacked or selected again
    monkeypatch.setattr(lk, "batched_generate", lambda *a, **k: pytest.fail("re-selected"))
    again = lk.run_leakage(model, CASES, tmp_path, config=cfg, n=2,
                           systems={"base": FakeSystem("base", {}), "deleted": FakeSystem("deleted", {})},
                           budget=6, progress=False)
    assert again == summary


def test_real_systems_on_tiny_model_run(tmp_path):
    """Base and Larimar systems on a tiny model: sampling is reproducible and the memory is emptied after."""
    model = tiny_larimar()
    lar = lk.LarimarSystem(model, use_memory="always", temperature=1.0, top_p=0.95, batch_size=4)
    r1 = lk.attack_case(lar, CASES[1], budget=5, max_new_tokens=3, seed=0)
    r2 = lk.attack_case(lar, CASES[1], budget=5, max_new_tokens=3, seed=0)
    assert r1["generations"] == r2["generations"] and r1["memory_routed"] == 1.0
    assert len(model) == 0
    base = lk.BaseSystem(model, temperature=1.0, top_p=0.95, batch_size=4)
    r3 = lk.attack_case(base, CASES[1], budget=5, max_new_tokens=3, seed=0)
    assert sum(r3["counts"]) == 5


@pytest.mark.parametrize("release", [False, True])
def test_larimar_system_passes_release_after_answer(monkeypatch, release):
    seen = {}

    def fake(model, prompts, **kw):
        seen.update(kw)
        return ["x"] * len(prompts)

    monkeypatch.setattr(lk, "batched_generate", fake)
    lar = lk.LarimarSystem(tiny_larimar(), use_memory="always", release_after_answer=release, temperature=1.0, top_p=0.95, batch_size=4)
    lar.apply(CASES[0])
    lar.sample([CASES[0].prompt], max_new_tokens=2, seed=0)
    assert seen["release_after_answer"] is release and seen["do_sample"] is True


def test_stop_after_answer_reaches_every_system_and_excludes_release(monkeypatch):
    seen = []

    def fake(model, prompts, **kw):
        seen.append(kw["stop_after_answer"])
        return ["x"] * len(prompts)

    monkeypatch.setattr(lk, "batched_generate", fake)
    model = tiny_larimar()
    kw = {"temperature": 1.0, "top_p": 0.95, "batch_size": 4, "stop_after_answer": True}
    for system in (lk.BaseSystem(model, **kw), lk.LarimarSystem(model, use_memory="always", **kw)):
        system.apply(CASES[0])
        system.sample([CASES[0].prompt], max_new_tokens=2, seed=0)
    assert seen == [True, True]
    p = argparse.ArgumentParser()
    lk.add_arguments(p)
    assert p.parse_args(["--out", "x", "--stop-after-answer"]).stop_after_answer is True
    with pytest.raises(SystemExit):
        p.parse_args(["--out", "x", "--stop-after-answer", "--release-after-answer"])
