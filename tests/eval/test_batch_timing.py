"""Batch-editing evaluation (results per (K, N), summary, plot, resume) and the timing comparison."""

from __future__ import annotations

import json

import pytest
import torch

from larimar.eval.batch import evaluate_batch_point, result_file, run_batch
from larimar.eval.data import load_cases
from larimar.eval.larimar_editor import LarimarEditor
from larimar.eval.runner import ConfigMismatchError
from larimar.eval.timing import run_timing, time_edits, timing_summary
from larimar.modeling.config import LarimarConfig
from larimar.modeling.model import Larimar
from larimar.testing import tiny_bert, tiny_bert_tokenizer, tiny_gpt2, tiny_tokenizer


def records(n: int) -> list[dict]:
    return [
        {
            "case_id": i,
            "prompt": f"The language of person {i} is",
            "target_new": ["English", "Dutch", "French", "Greek"][i % 4],
            "ground_truth": ["Latin", "Polish", "Czech", "Irish"][i % 4],
            "subject": f"person {i}",
            "rephrase_prompt": f"Person {i} speaks",
            "locality_prompt": f"The language of city {i} is",
            "locality_ground_truth": "Latin",
        }
        for i in range(n)
    ]


@pytest.fixture()
def cases(tmp_path):
    p = tmp_path / "edit.json"
    p.write_text(json.dumps(records(6)))
    return load_cases(p)


def tiny_larimar() -> Larimar:
    config = LarimarConfig(latent_size=16, memory_size=12, prefix_len=2, prefix_hidden=8)
    model = Larimar(config, tiny_bert(), tiny_bert_tokenizer(), tiny_gpt2(), tiny_tokenizer(pad_token=True))
    with torch.no_grad():
        model.kv_prefix.out.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    model.eval()
    return model


class CountingLarimarEditor(LarimarEditor):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.facts_written = 0

    def edit(self, requests, rephrases=None):
        self.facts_written += len(requests)
        super().edit(requests, rephrases)


def cfg(**kw):
    c = {"task": "batch", "method": "larimar", "data": "edit.json", "hparams": {}, "model": None, "seed": 0, "eval_n": 2}
    c.update(kw)
    return c


def test_batch_results_summary_plot_and_resume(tmp_path, cases):
    model = tiny_larimar()
    editor = CountingLarimarEditor(model)
    out = tmp_path / "batch"
    summary = run_batch(
        editor, cases, out, config=cfg(), sizes=[1, 4, 16], memory_sizes=[8, 12], eval_n=2, progress=False
    )
    # N=16 > 6 cases is skipped; grid K x N = 2 x 2
    assert [(r["K"], r["N"], r["eval_n"]) for r in summary["results"]] == [(8, 1, 1), (8, 4, 2), (12, 1, 1), (12, 4, 2)]
    for r in summary["results"]:
        for fam in ("edit_success", "paraphrase", "neighborhood"):
            assert set(r[fam]) == {"S", "M"} and 0 <= r[fam]["S"] <= 100
        assert r["write_seconds"] >= 0 and "per_case" not in r
    assert editor.facts_written == 10  # 1 + 4 per K
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["eval_n"] == 2 and len(on_disk["results"]) == 4
    assert result_file(out, 8, 4).is_file() and len(json.loads(result_file(out, 8, 4).read_text())["per_case"]) == 2
    png = (out / "batch.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "| 12 | 4 | 2 |" in (out / "summary.md").read_text()
    assert model.config.memory_size == 12 and model.M0.shape[0] == 12  # K restored

    # resume: only the new point is computed; a corrupt point is recomputed
    result_file(out, 8, 1).write_text("{")
    run_batch(
        editor, cases, out, config=cfg(), sizes=[1, 4, 6], memory_sizes=[8, 12], eval_n=2, progress=False, plot=False
    )
    assert editor.facts_written == 10 + 1 + 6 + 6
    with pytest.raises(ConfigMismatchError, match="eval_n"):
        run_batch(editor, cases, out, config=cfg(eval_n=3), sizes=[1], memory_sizes=[8], eval_n=3, progress=False)


def test_batch_point_metrics_and_fixed_eval_subset(cases):
    class Fake:
        """Edited facts (in the current batch) make target_new win on their rewrite prompt only."""

        name = "fake"

        def __init__(self):
            self.edited = set()

        def reset(self):
            self.edited = set()

        def edit(self, requests):
            self.edited |= {r.prompt for r in requests}

        def score(self, prompts, candidates):
            return torch.tensor([[0.5, 1.0] if p in self.edited else [1.0, 0.5] for p in prompts])

    fake = Fake()
    r = evaluate_batch_point(fake, cases, 5, eval_n=3)
    assert r["eval_n"] == 3 and [c["case_id"] for c in r["per_case"]] == [0, 1, 2]
    assert r["edit_success"]["S"] == 100.0 and r["paraphrase"]["S"] == 0.0 and r["neighborhood"]["S"] == 100.0
    with pytest.raises(ValueError):
        evaluate_batch_point(fake, cases, 7, eval_n=3)
    with pytest.raises(ValueError, match="memory size"):
        run_batch(fake, cases, "unused", config=cfg(), sizes=[1], memory_sizes=[8], progress=False)


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class FakeTimedEditor:
    def __init__(self, name, costs, clock):
        self.name, self.costs, self.clock, self.i, self.resets = name, list(costs), clock, 0, 0

    def edit(self, requests):
        self.clock.t += self.costs[self.i % len(self.costs)]
        self.i += 1

    def reset(self):
        self.resets += 1


def test_time_edits_uses_clock_and_skips_warmup():
    clock = FakeClock()
    ed = FakeTimedEditor("x", [50.0, 1.0, 2.0, 3.0], clock)
    times = time_edits(ed, ["r1", "r2", "r3"], clock=clock, warmup=1)  # type: ignore[list-item]
    assert times == [1.0, 2.0, 3.0]  # the 50 s warm-up edit is not counted
    assert ed.resets == 1 + 3 + 1


def test_timing_summary_shape_and_ratios(tmp_path):
    clock = FakeClock()
    costs = {"larimar": [0.0, 0.2, 0.1, 0.3], "rome": [0.0, 4.0, 5.0, 30.0], "unedited": [0.0, 0.0, 0.0, 0.0]}
    factories = {name: (lambda n=name: FakeTimedEditor(n, costs[n], clock)) for name in costs}

    def broken():
        raise RuntimeError("no such model")

    factories["grace"] = broken
    summary = run_timing(factories, ["a", "b", "c"], tmp_path / "t", clock=clock, warmup=1, progress=False)  # type: ignore[arg-type]
    assert set(summary) == {"methods"}
    m = summary["methods"]
    assert list(m) == ["larimar", "rome", "unedited", "grace"]
    assert m["larimar"] == {"median_s_per_edit": pytest.approx(0.2), "ratio_to_larimar": pytest.approx(1.0)}
    assert m["rome"]["median_s_per_edit"] == pytest.approx(5.0)
    assert m["rome"]["ratio_to_larimar"] == pytest.approx(25.0)
    assert m["unedited"]["ratio_to_larimar"] == 0.0
    assert m["grace"]["median_s_per_edit"] is None and "no such model" in m["grace"]["error"]
    on_disk = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert on_disk["methods"]["rome"]["ratio_to_larimar"] == pytest.approx(25.0)
    assert json.loads((tmp_path / "t" / "times.json").read_text())["times"]["rome"] == pytest.approx([4.0, 5.0, 30.0])
    assert "25x" in (tmp_path / "t" / "summary.md").read_text()
    # without Larimar there is no ratio
    assert timing_summary({"rome": [1.0, 3.0]})["methods"]["rome"] == {"median_s_per_edit": 2.0, "ratio_to_larimar": None}
