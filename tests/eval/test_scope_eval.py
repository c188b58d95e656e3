"""`larimar scope`: mixing the two signals and choosing the lexical weight, against hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from larimar.eval.data import EditCase
from larimar.eval.scope_eval import mixed_scores, scope_components, select_lexical_weight
from larimar.testing import tiny_larimar


def part(cos: list[float], rec: list[float]):
    return torch.tensor([cos]), torch.tensor([rec])


def test_mixed_scores_take_the_best_fact_of_the_mix():
    parts = [part([0.9, 0.2], [0.0, 1.0]), part([0.4], [0.6])]
    torch.testing.assert_close(mixed_scores(parts, 0.0), torch.tensor([0.9, 0.4]))
    torch.testing.assert_close(mixed_scores(parts, 0.5), torch.tensor([0.6, 0.5]))  # max(0.45, 0.6); 0.2 + 0.3
    torch.testing.assert_close(mixed_scores(parts, 0.75), torch.tensor([0.8, 0.55]))  # max(0.225, 0.05 + 0.75)


def test_select_prefers_the_weight_that_lets_the_fewest_negatives_through():
    # positives share their name with the fact (recall high), negatives share the relation (cosine high)
    pos = [part([0.6], [0.9]), part([0.5], [0.8]), part([0.7], [0.2])]
    neg = [part([0.8], [0.3]), part([0.7], [0.4]), part([0.3], [0.1]), part([0.75], [0.5])]
    sel = select_lexical_weight(pos, neg, rate=2 / 3, grid=(0.0, 0.5, 1.0))
    rows = {r["lexical_weight"]: r for r in sel["grid"]}
    # λ = 0: positives 0.6, 0.5, 0.7 -> keep 2 -> threshold 0.6; negatives 0.8, 0.7, 0.75 pass: 3 of 4
    assert rows[0.0]["threshold"] == pytest.approx(0.6) and rows[0.0]["neighbours_in_scope"] == 0.75
    # λ = 1: positives 0.9, 0.8, 0.2 -> threshold 0.8; negatives 0.3, 0.4, 0.1, 0.5: none
    assert rows[1.0]["threshold"] == pytest.approx(0.8) and rows[1.0]["neighbours_in_scope"] == 0.0
    assert rows[1.0]["paraphrase_in_scope"] == pytest.approx(2 / 3, abs=1e-4)
    # λ = 0.5: positives 0.75, 0.65, 0.45 -> threshold 0.65; negatives 0.55, 0.55, 0.2, 0.625: none
    assert rows[0.5]["neighbours_in_scope"] == 0.0
    assert sel["best"]["lexical_weight"] == 0.5  # tie with λ = 1: the smaller weight
    with pytest.raises(ValueError, match="RATE"):
        select_lexical_weight(pos, neg, rate=0.0)


def test_scope_components_score_each_query_against_its_case_fact_or_all():
    model = tiny_larimar()
    cases = [
        EditCase(0, "Paris", "Paris is the capital of", "Italy", "France", paraphrase_prompts=["The capital city Paris is in"],
                 neighborhood_prompts=["Lyon is a city of", "Nice lies in"], neighborhood_targets=["France", "France"]),
        EditCase(1, "Rome", "Rome is the capital of", "Spain", "Italy", paraphrase_prompts=["Rome, a capital of"]),
    ]
    one = scope_components(model, cases, shared=False, progress=False)
    assert [p[0].shape for p in one["pos"]] == [(1, 1), (1, 1)] and len(one["neg"]) == 2
    det = model.new_scope_detector()
    det.lexical_weight = 0.5
    det.set_keys(model.encoder.embed(["Paris is the capital of Italy."]), ["Paris is the capital of Italy."])
    want = det.score(["Lyon is a city of"]).score
    torch.testing.assert_close(mixed_scores(one["neg"][:1], 0.5), want)
    shared = scope_components(model, cases, shared=True, progress=False)
    assert [p[0].shape for p in shared["pos"]] == [(1, 2), (1, 2)]
    torch.testing.assert_close(shared["pos"][0][0][:, :1], one["pos"][0][0])
