"""Hand-computed tests for larimar.eval.metrics."""

from __future__ import annotations

import math

import pytest
import torch

from larimar.eval.metrics import (
    aggregate_counterfact,
    aggregate_zsre,
    counterfact_case_metrics,
    counterfact_score,
    edit_retention_rate,
    exact_match,
    first_token_accuracy,
    nll_to_prob,
    normalize_answer,
    teacher_forced_correct,
    token_agreement,
    token_f1,
    zsre_case_metrics,
)


def nll(*probs: float) -> list[float]:
    """NLLs whose probabilities are exactly ``probs`` (P = exp(-NLL))."""
    return [-math.log(p) for p in probs]


# Case A (probabilities, new vs true):
#   rewrite 0.5 vs 0.25            -> S = 1,   M = 0.25
#   paraphrase [0.4, 0.1] vs [0.2, 0.3] -> S = 0.5, M = mean(0.2, -0.2) = 0
#   neighbourhood [0.1, 0.6] vs [0.7, 0.2] (true should win) -> S = 0.5, M = mean(0.6, -0.4) = 0.1
CASE_A = dict(
    nll_new_rewrite=nll(0.5)[0],
    nll_true_rewrite=nll(0.25)[0],
    nll_new_para=nll(0.4, 0.1),
    nll_true_para=nll(0.2, 0.3),
    nll_new_neigh=nll(0.1, 0.6),
    nll_true_neigh=nll(0.7, 0.2),
)
# Case B:
#   rewrite 0.1 vs 0.3             -> S = 0, M = -0.2
#   paraphrase [0.5] vs [0.1]      -> S = 1, M = 0.4
#   neighbourhood [0.2]*3 vs [0.5, 0.5, 0.1] -> S = 2/3, M = (0.3 + 0.3 - 0.1) / 3 = 1/6
CASE_B = dict(
    nll_new_rewrite=torch.tensor(nll(0.1)),
    nll_true_rewrite=torch.tensor(nll(0.3)),
    nll_new_para=torch.tensor(nll(0.5)),
    nll_true_para=torch.tensor(nll(0.1)),
    nll_new_neigh=torch.tensor(nll(0.2, 0.2, 0.2), dtype=torch.float64),
    nll_true_neigh=torch.tensor(nll(0.5, 0.5, 0.1), dtype=torch.float64),
)


def test_nll_to_prob() -> None:
    assert nll_to_prob(0.0) == 1.0
    assert nll_to_prob(math.log(4)) == pytest.approx(0.25)
    assert nll_to_prob(torch.tensor(math.log(2))) == pytest.approx(0.5)


def test_counterfact_case_metrics_by_hand() -> None:
    a = counterfact_case_metrics(**CASE_A)
    assert a["edit_success"]["S"] == 1.0
    assert a["edit_success"]["M"] == pytest.approx(0.25)
    assert a["paraphrase"]["S"] == 0.5
    assert a["paraphrase"]["M"] == pytest.approx(0.0, abs=1e-12)
    assert a["neighborhood"]["S"] == 0.5
    assert a["neighborhood"]["M"] == pytest.approx(0.1)

    b = counterfact_case_metrics(**CASE_B)  # tensors are accepted
    assert b["edit_success"] == pytest.approx({"S": 0.0, "M": -0.2})
    assert b["paraphrase"] == pytest.approx({"S": 1.0, "M": 0.4})
    assert b["neighborhood"] == pytest.approx({"S": 2 / 3, "M": 1 / 6}, abs=1e-6)


def test_counterfact_ties_fail_both_ways() -> None:
    m = counterfact_case_metrics(1.0, 1.0, [2.0], [2.0], [3.0], [3.0])
    assert m["edit_success"]["S"] == 0.0 and m["paraphrase"]["S"] == 0.0 and m["neighborhood"]["S"] == 0.0
    assert m["edit_success"]["M"] == 0.0 and m["neighborhood"]["M"] == 0.0


def test_counterfact_neighbourhood_sign_is_reversed() -> None:
    # Same numbers in every family: new is more likely than true.
    m = counterfact_case_metrics(*([nll(0.6)[0]], [nll(0.2)[0]]) * 3)
    assert m["edit_success"] == pytest.approx({"S": 1.0, "M": 0.4})
    assert m["paraphrase"] == pytest.approx({"S": 1.0, "M": 0.4})
    assert m["neighborhood"] == pytest.approx({"S": 0.0, "M": -0.4})


def test_aggregate_counterfact_by_hand() -> None:
    agg = aggregate_counterfact([counterfact_case_metrics(**CASE_A), counterfact_case_metrics(**CASE_B)])
    assert set(agg) == {"edit_success", "paraphrase", "neighborhood"}
    assert agg["edit_success"] == pytest.approx({"S": 50.0, "M": 2.5})
    # Per-case means, then mean over cases: (0.5 + 1) / 2 -> 75 (pooling the 3 prompts would give 66.7).
    assert agg["paraphrase"] == pytest.approx({"S": 75.0, "M": 20.0})
    assert agg["neighborhood"] == pytest.approx({"S": 100 * (0.5 + 2 / 3) / 2, "M": 100 * (0.1 + 1 / 6) / 2})
    # Harmonic mean of the three S values.
    expected = 3 / (1 / 50 + 1 / 75 + 1 / agg["neighborhood"]["S"])
    assert counterfact_score(agg) == pytest.approx(expected)


def test_counterfact_empty_family_is_skipped() -> None:
    no_para = counterfact_case_metrics(nll(0.5)[0], nll(0.25)[0], [], [], nll(0.7), nll(0.1))
    assert math.isnan(no_para["paraphrase"]["S"]) and math.isnan(no_para["paraphrase"]["M"])
    agg = aggregate_counterfact([no_para, counterfact_case_metrics(**CASE_B)])
    assert agg["paraphrase"] == pytest.approx({"S": 100.0, "M": 40.0})  # only case B counts
    assert agg["edit_success"]["S"] == 50.0
    empty = aggregate_counterfact([])
    assert all(math.isnan(empty[k][s]) for k in empty for s in ("S", "M"))
    assert math.isnan(counterfact_score(empty))
    zero = {"edit_success": {"S": 0.0}, "paraphrase": {"S": 50.0}, "neighborhood": {"S": 50.0}}
    assert counterfact_score(zero) == 0.0


def test_counterfact_length_mismatch() -> None:
    with pytest.raises(ValueError, match="paraphrase"):
        counterfact_case_metrics(1.0, 2.0, [1.0, 2.0], [1.0], [1.0], [2.0])


# ---------------------------------------------------------------------------------------------
# ZsRE
# ---------------------------------------------------------------------------------------------


def test_teacher_forced_correct() -> None:
    logits = torch.tensor([[0.1, 2.0, 0.3], [5.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    targets = torch.tensor([1, 2, 2])
    assert teacher_forced_correct(logits, targets).tolist() == [True, False, True]
    batched = teacher_forced_correct(logits[None].repeat(2, 1, 1), targets[None].repeat(2, 1))
    assert batched.shape == (2, 3)
    with pytest.raises(ValueError):
        teacher_forced_correct(logits, targets[:2])


def test_token_agreement() -> None:
    assert token_agreement([1, 2, 3], torch.tensor([1, 5, 3])).tolist() == [True, False, True]
    with pytest.raises(ValueError):
        token_agreement([1, 2], [1])


def test_zsre_case_and_aggregate_by_hand() -> None:
    c1 = zsre_case_metrics(
        torch.tensor([True, False, True, True]),  # 3/4
        [[True, False], torch.tensor([True])],  # tokens pooled over prompts: 2/3 (not mean of means 0.75)
        [1, 0],  # 1/2
    )
    assert c1 == pytest.approx({"edit": 0.75, "paraphrase": 2 / 3, "neighborhood": 0.5})
    c2 = zsre_case_metrics([True], [[False, False]], torch.tensor([[1, 1, 1]]))
    assert c2 == pytest.approx({"edit": 1.0, "paraphrase": 0.0, "neighborhood": 1.0})
    agg = aggregate_zsre([c1, c2])
    assert agg == pytest.approx({"edit": 87.5, "paraphrase": 100 / 3, "neighborhood": 75.0})


def test_first_token_accuracy_by_hand() -> None:
    assert first_token_accuracy([[True, False], [False, True], torch.tensor([True])]) == pytest.approx(2 / 3)
    assert first_token_accuracy([[], [False]]) == 0.0  # a prompt without tokens does not count
    assert math.isnan(first_token_accuracy([]))


def test_zsre_empty_family() -> None:
    c = zsre_case_metrics([True], [], [False])
    assert math.isnan(c["paraphrase"])
    agg = aggregate_zsre([c, zsre_case_metrics([False], [True, True], [True])])
    assert agg == pytest.approx({"edit": 50.0, "paraphrase": 100.0, "neighborhood": 50.0})


# ---------------------------------------------------------------------------------------------
# F1 / retention
# ---------------------------------------------------------------------------------------------


def test_normalize_answer() -> None:
    assert normalize_answer("  The Eiffel-Tower, in PARIS! ") == "eiffeltower in paris"
    assert normalize_answer("a an the") == ""


@pytest.mark.parametrize(
    ("pred", "ref", "f1"),
    [
        ("The Eiffel Tower", "eiffel tower!", 1.0),
        ("Paris France", "Paris", 2 / 3),  # P = 1/2, R = 1
        ("new york city", "york new", 0.8),  # P = 2/3, R = 1
        ("paris paris", "paris", 2 / 3),  # repeated tokens count once per match
        ("Rome", "Paris", 0.0),
        ("the", "a", 1.0),  # both normalise to nothing
        ("", "Paris", 0.0),
    ],
)
def test_token_f1(pred: str, ref: str, f1: float) -> None:
    assert token_f1(pred, ref) == pytest.approx(f1)


def test_exact_match() -> None:
    assert exact_match("The Beatles.", "beatles") == 1.0
    assert exact_match("Beatles band", "beatles") == 0.0


def test_edit_retention_rate() -> None:
    preds = ["Paris", "Rome Italy", "x"]
    refs: list[str | list[str]] = ["paris", ["Italy", "Rome, Italy"], "y"]
    assert edit_retention_rate(preds, refs) == pytest.approx(2 / 3)
    assert edit_retention_rate(["Paris France"], ["Paris"]) == pytest.approx(2 / 3)
    assert math.isnan(edit_retention_rate([], []))
    with pytest.raises(ValueError):
        edit_retention_rate(["a"], [])
    with pytest.raises(ValueError):
        edit_retention_rate(["a"], [[]])
