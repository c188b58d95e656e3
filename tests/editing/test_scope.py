"""Scope detector: sentence splitting, nearest-neighbour scoring, EER and F1 against hand-computed cases."""

import math

import pytest
import torch

from larimar.editing.scope import ScopeDetector, build_idf, equal_error_rate, f1_at, idf_weights, split_sentences


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


def _words(text):
    return text.lower().replace(".", "").replace(",", "").replace("'s", "").split()


def test_lexical_recall_hand_computed():
    """score = (1 - λ)·cos + λ·Σ idf(shared tokens) / Σ idf(fact tokens); unseen tokens weigh the most."""
    vocab = ["mother", "tongue", "darrieux", "blum", "english"]
    idf = {"mother": 1.0, "tongue": 1.0, "english": 2.0, "": 4.0}  # darrieux, blum unseen -> 4
    det = ScopeDetector(_bag_embed(vocab), threshold=0.5, lexical_weight=0.25, tokenize=_words, idf=idf)
    fact = "Darrieux's mother tongue English."
    det.set_keys(_bag_embed(vocab)([fact]), [fact])
    queries = ["Darrieux, a native speaker of", "Blum's mother tongue is"]
    lex = det.lexical_recall(queries)
    # fact tokens {darrieux 4, mother 1, tongue 1, english 2}: total 8
    torch.testing.assert_close(lex, torch.tensor([[4 / 8], [2 / 8]]))
    cos_only = ScopeDetector(_bag_embed(vocab), threshold=0.5)
    cos_only.set_keys(_bag_embed(vocab)([fact]))
    cos = cos_only.score(queries).score
    torch.testing.assert_close(det.score(queries).score, 0.75 * cos + 0.25 * lex[:, 0])
    # the neighbour ("Blum") shares the relation words, so cosine alone ranks it above the paraphrase;
    # lexical recall of the rare name reverses that
    assert cos[1] > cos[0]
    full = ScopeDetector(_bag_embed(vocab), threshold=0.5, lexical_weight=0.9, tokenize=_words, idf=idf)
    full.set_keys(_bag_embed(vocab)([fact]), [fact])
    s = full.score(queries).score
    assert s[0] > s[1]


def test_lexical_recall_picks_the_best_fact_and_chunks():
    vocab = ["paris", "france", "rome", "italy"]
    det = ScopeDetector(_bag_embed(vocab), threshold=0.55, lexical_weight=0.5, tokenize=_words)
    facts = ["paris france.", "rome italy."] * 300
    det.set_keys(_bag_embed(vocab)(facts), facts)
    queries = ["rome italy", "paris", "nothing here"] * 50
    res = det.score(queries)
    # "paris": cos 1/sqrt(2), recall 1/2 -> 0.60; "nothing here": cos ~ 1/sqrt(2), recall 0 -> 0.35
    assert res.nearest[0] % 2 == 1 and res.nearest[1] % 2 == 0
    assert res.in_scope[:3].tolist() == [True, True, False]
    one_shot = det.lexical_recall(queries)
    det.gather_limit = 600 * 2 * 7  # 7 queries per chunk
    torch.testing.assert_close(det.lexical_recall(queries), one_shot)
    torch.testing.assert_close(det.lexical_recall(["paris"])[0, :2], torch.tensor([0.5, 0.0]))  # unit weights


def test_lexical_detector_checks_its_inputs():
    with pytest.raises(ValueError, match="tokenize"):
        ScopeDetector(lambda t: torch.ones(len(t), 3), lexical_weight=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ScopeDetector(lambda t: torch.ones(len(t), 3), lexical_weight=1.0, tokenize=str.split)
    det = ScopeDetector(lambda t: torch.ones(len(t), 3), lexical_weight=0.5, tokenize=str.split)
    with pytest.raises(ValueError, match="one text per key"):
        det.set_keys(torch.ones(2, 3))


def test_components_give_recall_on_request_whatever_the_weight():
    """A cosine-only detector gives lexical recall when asked (larimar scope sweeps λ from one pass)."""
    vocab = ["paris", "france", "rome"]
    det = ScopeDetector(_bag_embed(vocab), tokenize=_words)  # λ = 0
    det.set_keys(_bag_embed(vocab)(["paris france."]), ["paris france."])
    cos, recall, _ = det.components(["paris"])
    assert recall is None and torch.equal(det.score(["paris"]).score, cos[:, 0])
    torch.testing.assert_close(det.components(["paris"], recall=True)[1], torch.tensor([[0.5]]))
    bare = ScopeDetector(_bag_embed(vocab))
    bare.set_keys(_bag_embed(vocab)(["paris france."]))  # no texts, no tokenizer
    with pytest.raises(ValueError, match="lexical recall needs"):
        bare.components(["paris"], recall=True)


def test_build_idf_hand_computed():
    idf = build_idf(["a b", "a c", "a"], str.split)
    assert idf["a"] == pytest.approx(math.log(4 / 4)) and idf["b"] == pytest.approx(math.log(4 / 2))
    assert idf[""] == pytest.approx(math.log(4))  # weight of an unseen token
    assert idf_weights(["b", "zzz"], idf) == {"b": pytest.approx(math.log(2)), "zzz": pytest.approx(math.log(4))}
    with pytest.raises(ValueError, match="no documents"):
        build_idf([], str.split)
