"""Scope detector: sentence splitting, nearest-neighbour scoring, EER and F1 against hand-computed cases."""

import pytest
import torch

from larimar.editing.scope import ScopeDetector, equal_error_rate, f1_at, split_sentences


def test_split_sentences():
    assert split_sentences("Shayna does this. Danielle Darrieux, a native") == ["Shayna does this.", "Danielle Darrieux, a native"]
    assert split_sentences("one piece only") == ["one piece only"]
    assert split_sentences("Is it? Yes! Fine.") == ["Is it?", "Yes!", "Fine."]


def _bag_embed(vocab):
    def embed(texts):
        out = torch.zeros(len(texts), len(vocab))
        for i, t in enumerate(texts):
            for w in t.lower().replace(".", "").replace(",", "").split():
                if w in vocab:
                    out[i, vocab.index(w)] += 1
        return out + 1e-6
    return embed


def test_detector_max_over_sentences_and_facts():
    vocab = ["paris", "france", "capital", "rome", "apple", "gates", "banana"]
    det = ScopeDetector(_bag_embed(vocab), threshold=0.8)
    det.set_keys(_bag_embed(vocab)(["capital france paris", "apple gates"]))
    res = det.score(["banana banana. The capital of France", "apple founded by gates", "banana"])
    assert res.in_scope.tolist() == [True, True, False]
    assert res.nearest.tolist()[:2] == [0, 1]
    # the first query only matches through its second sentence
    whole = ScopeDetector(_bag_embed(vocab), threshold=0.8, split=False)
    whole.set_keys(det.keys)
    assert whole.score(["banana banana. The capital of France"]).score[0] < res.score[0]


def test_empty_detector_is_out_of_scope():
    det = ScopeDetector(lambda t: torch.ones(len(t), 3))
    res = det.score(["anything"])
    assert not res.in_scope.any() and res.nearest.tolist() == [-1]


def test_equal_error_rate_hand_computed():
    pos = torch.tensor([0.9, 0.8, 0.7, 0.4])
    neg = torch.tensor([0.1, 0.2, 0.5, 0.75])
    eer, thr = equal_error_rate(pos, neg)
    # at t=0.7: FRR = 1/4 (0.4), FAR = 1/4 (0.75) -> EER 0.25
    assert eer == pytest.approx(0.25) and thr == pytest.approx(0.7)
    sep_eer, _ = equal_error_rate(torch.tensor([0.9, 0.8]), torch.tensor([0.1, 0.2]))
    assert sep_eer == 0.0


def test_f1_hand_computed():
    pos = torch.tensor([0.9, 0.8, 0.3])
    neg = torch.tensor([0.85, 0.1])
    # t=0.5: tp=2, fn=1, fp=1 -> F1 = 4 / (4 + 1 + 1)
    assert f1_at(pos, neg, 0.5) == pytest.approx(4 / 6)
    with pytest.raises(ValueError):
        equal_error_rate(torch.tensor([]), neg)
