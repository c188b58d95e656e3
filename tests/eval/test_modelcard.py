"""Model-card measures on a tiny Larimar: stats against a manual computation, shapes of the results."""

from __future__ import annotations

import math

import torch

from larimar.eval.modelcard import continuation_stats, markdown, perplexity, reconstruction
from larimar.testing import tiny_larimar
from larimar.training.data import Item

ITEMS = [Item(f"Person {i} was born in", f" City{i % 5}", "fact") for i in range(20)]


def test_continuation_stats_plain_matches_manual():
    m = tiny_larimar()
    nll, correct, count = continuation_stats(m, ITEMS[:3], None, batch_size=2)
    ref_nll, ref_correct, ref_count = 0.0, 0, 0
    for it in ITEMS[:3]:
        q = m.tokenizer(it.query, add_special_tokens=False)["input_ids"]
        full = m.tokenizer(it.text, add_special_tokens=False)["input_ids"]
        logp = m.decoder(input_ids=torch.tensor([full])).logits[0].log_softmax(-1)
        for t in range(len(q) - 1, len(full) - 1):
            ref_nll -= float(logp[t, full[t + 1]])
            ref_correct += int(logp[t].argmax() == full[t + 1])
            ref_count += 1
    assert count == ref_count and correct == ref_correct
    assert math.isclose(nll, ref_nll, rel_tol=1e-4)


def test_reconstruction_and_perplexity_report_sane_numbers():
    m = tiny_larimar()
    r = reconstruction(m, ITEMS, 4, max_scored=8, batch_size=4)
    assert r["scored"] == 8 and r["tokens"] > 0 and 0 <= r["memory_acc"] <= 1 and r["memory_nll"] > 0
    assert len(m) == 0  # memory left empty
    p = perplexity(m, [it.text for it in ITEMS[:5]], batch_size=2)
    assert p["base_ppl"] > 1 and p["empty_memory_ppl"] > 1
    text = markdown({"reconstruction": {"facts": [r]}, "perplexity": p})
    assert "| facts | 4 | 8 |" in text
