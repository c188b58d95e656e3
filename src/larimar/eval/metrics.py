"""Knowledge-editing metrics: CounterFact (ROME), ZsRE (MEND/ROME) and token-level F1.

Pure functions over floats, sequences and tensors; nothing here touches a model.

CounterFact (as ROME's official evaluation, ``experiments/summarize.py``)
--------------------------------------------------------------------------
For a prompt and a target string, the model's *probability* of the target is
``P = exp(-NLL)`` where ``NLL`` is the mean negative log-likelihood of the target's tokens
(``scoring.continuation_nll``). With o* = ``target_new`` and o_c = ``target_true``:

* per case and per prompt family (rewrite prompt(s), paraphrase prompts, neighbourhood prompts),
  ``S_case`` = fraction of the family's prompts with the desired ordering and ``M_case`` = mean over the
  family's prompts of the probability difference:

  - edit success (efficacy) and paraphrase (generalisation): success iff ``P(o*) > P(o_c)``,
    i.e. ``NLL(o*) < NLL(o_c)`` (strict; ties fail); difference ``P(o*) - P(o_c)``;
  - neighbourhood (specificity): success iff ``P(o_c) > P(o*)``; difference ``P(o_c) - P(o*)``
    (reversed sign, so that larger is better for every family, as in ROME);

* the reported ``S`` and ``M`` average ``S_case`` / ``M_case`` over cases (a case with several
  paraphrase prompts contributes its *mean* over them, so every case has equal weight) and are
  multiplied by 100 (percent), as in the ROME / MEMIT / Larimar tables.

ZsRE (as ROME's ``compute_rewrite_quality_zsre`` + ``summarize.py``)
---------------------------------------------------------------------
Accuracy is teacher-forced token accuracy: for each token of the target answer, whether the argmax of
the model's logits at the previous position equals that token. Per case, the flags of all tokens of
all prompts in a family are pooled and averaged (ROME flattens the paraphrase prompts' tokens), then
the per-case accuracies are averaged over cases and reported in percent. Neighbourhood accuracy, by
default, compares the (edited) model's argmax with the tokens of ``loc_ans`` (ROME's definition). The
MEND / EasyEdit alternative -- agreement of the edited model's argmax with the *unedited* model's
argmax on the same teacher-forced positions -- is available through :func:`token_agreement`, whose
flags can be passed as ``neighborhood_correct`` instead.

Sequential editing (GRACE / Larimar "edit retention")
-----------------------------------------------------
Token-level F1 with SQuAD answer normalisation (:func:`token_f1`), and :func:`edit_retention_rate`
= mean F1 of the model's answers to all edited facts (fractions in [0, 1], not percent).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "COUNTERFACT_KEYS",
    "ZSRE_KEYS",
    "nll_to_prob",
    "counterfact_case_metrics",
    "aggregate_counterfact",
    "counterfact_score",
    "teacher_forced_correct",
    "token_agreement",
    "zsre_case_metrics",
    "first_token_accuracy",
    "aggregate_zsre",
    "normalize_answer",
    "token_f1",
    "exact_match",
    "edit_retention_rate",
]

#: Keys of the CounterFact metric families (each maps to ``{"S": ..., "M": ...}``).
COUNTERFACT_KEYS: tuple[str, ...] = ("edit_success", "paraphrase", "neighborhood")
#: Keys of the ZsRE accuracy families.
ZSRE_KEYS: tuple[str, ...] = ("edit", "paraphrase", "neighborhood")

FloatLike = float | int | torch.Tensor
FloatSeq = FloatLike | Sequence[FloatLike] | torch.Tensor


def _flat_floats(values: FloatSeq | None) -> list[float]:
    """Turn a float, a tensor (any shape) or a (nested) sequence of those into a flat float list."""
    if values is None:
        return []
    if isinstance(values, torch.Tensor):
        return [float(v) for v in values.detach().reshape(-1).tolist()]
    if isinstance(values, (int, float)):
        return [float(values)]
    out: list[float] = []
    for v in values:
        out.extend(_flat_floats(v))
    return out


def nll_to_prob(nll: FloatLike) -> float:
    """Probability of a target from its mean token NLL: ``exp(-nll)``."""
    return math.exp(-float(nll))


def _family(nll_good: FloatSeq, nll_bad: FloatSeq, name: str) -> dict[str, float]:
    """Per-case S (fraction) and M (mean prob difference) for one prompt family.

    ``nll_good`` is the NLL of the answer that should win. Returns NaNs for an empty family.
    """
    good, bad = _flat_floats(nll_good), _flat_floats(nll_bad)
    if len(good) != len(bad):
        raise ValueError(f"{name}: {len(good)} NLLs for one target but {len(bad)} for the other")
    if not good:
        return {"S": math.nan, "M": math.nan}
    wins = [g < b for g, b in zip(good, bad)]
    diffs = [nll_to_prob(g) - nll_to_prob(b) for g, b in zip(good, bad)]
    return {"S": sum(wins) / len(wins), "M": sum(diffs) / len(diffs)}


def counterfact_case_metrics(
    nll_new_rewrite: FloatSeq,
    nll_true_rewrite: FloatSeq,
    nll_new_para: FloatSeq,
    nll_true_para: FloatSeq,
    nll_new_neigh: FloatSeq,
    nll_true_neigh: FloatSeq,
) -> dict[str, dict[str, float]]:
    """CounterFact metrics of one case from mean target-token NLLs.

    Each argument is a float or a sequence/tensor of floats, one per prompt of the family (the
    rewrite family usually has one prompt). ``nll_new_*`` are NLLs of o* (``target_new``) and
    ``nll_true_*`` of o_c (``target_true``) on the same prompts.

    Returns:
        ``{"edit_success": {"S", "M"}, "paraphrase": {"S", "M"}, "neighborhood": {"S", "M"}}`` with
        ``S`` a fraction in [0, 1] and ``M`` a probability difference in [-1, 1] (*not* percent;
        :func:`aggregate_counterfact` converts). Edit success / paraphrase: ``S`` = fraction of
        prompts with NLL(o*) < NLL(o_c), ``M`` = mean P(o*) - P(o_c). Neighbourhood: ``S`` =
        fraction with NLL(o_c) < NLL(o*), ``M`` = mean P(o_c) - P(o*). An empty family gives NaN.
    """
    return {
        "edit_success": _family(nll_new_rewrite, nll_true_rewrite, "rewrite"),
        "paraphrase": _family(nll_new_para, nll_true_para, "paraphrase"),
        "neighborhood": _family(nll_true_neigh, nll_new_neigh, "neighborhood"),
    }


def _nanmean(values: Iterable[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def aggregate_counterfact(cases: Sequence[Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, float]]:
    """Average per-case CounterFact metrics over cases, in percent.

    Args:
        cases: outputs of :func:`counterfact_case_metrics`.

    Returns:
        ``{"edit_success": {"S", "M"}, "paraphrase": {"S", "M"}, "neighborhood": {"S", "M"}}``:
        the case-wise means of ``S`` and ``M`` times 100. Cases whose family is empty (NaN) are
        skipped for that family; a family with no values at all (or no cases) gives NaN.
    """
    out: dict[str, dict[str, float]] = {}
    for key in COUNTERFACT_KEYS:
        out[key] = {
            stat: 100.0 * _nanmean(float(c[key][stat]) for c in cases if key in c) for stat in ("S", "M")
        }
    return out


def counterfact_score(aggregate: Mapping[str, Mapping[str, float]]) -> float:
    """Harmonic mean of edit-success, paraphrase and neighbourhood ``S`` (MEMIT's "Score").

    Takes the output of :func:`aggregate_counterfact`; returns a percentage (0 if any S is 0).
    ROME's original summariser used the harmonic mean of only paraphrase and neighbourhood S.
    """
    vals = [float(aggregate[k]["S"]) for k in COUNTERFACT_KEYS]
    if any(math.isnan(v) for v in vals):
        return math.nan
    if any(v <= 0 for v in vals):
        return 0.0
    return len(vals) / sum(1.0 / v for v in vals)


# --------------------------------------------------------------------------------------------
# ZsRE
# --------------------------------------------------------------------------------------------


def teacher_forced_correct(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Argmax-correct flags of teacher-forced target tokens.

    Args:
        logits: ``(..., L, V)`` logits at the positions that *predict* the targets (i.e. the
            position before each target token).
        target_ids: ``(..., L)`` target token ids.

    Returns:
        bool tensor ``(..., L)``: ``argmax(logits) == target_ids``.
    """
    if logits.shape[:-1] != target_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(target_ids.shape)}")
    return logits.argmax(dim=-1) == target_ids


def token_agreement(pre_ids: torch.Tensor | Sequence[int], post_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Flags where the edited model's argmax equals the unedited model's (MEND-style locality)."""
    pre = torch.as_tensor(pre_ids)
    post = torch.as_tensor(post_ids)
    if pre.shape != post.shape:
        raise ValueError(f"shape mismatch: {tuple(pre.shape)} vs {tuple(post.shape)}")
    return pre == post


def _flat_flags(flags: Any) -> list[float]:
    if flags is None:
        return []
    if isinstance(flags, torch.Tensor):
        return [float(v) for v in flags.detach().reshape(-1).float().tolist()]
    if isinstance(flags, (bool, int, float)):
        return [float(flags)]
    out: list[float] = []
    for f in flags:
        out.extend(_flat_flags(f))
    return out


def _mean_or_nan(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def zsre_case_metrics(rewrite_correct: Any, paraphrase_correct: Any, neighborhood_correct: Any) -> dict[str, float]:
    """ZsRE accuracies of one case from per-token correctness flags.

    Each argument is a bool/0-1 tensor or a (nested) sequence of flags: for a family with several
    prompts pass one flag sequence per prompt; all tokens of the family are pooled (ROME's
    definition). Flags come from :func:`teacher_forced_correct` (or ``scoring.continuation_token_stats``);
    for MEND-style locality pass :func:`token_agreement` flags as ``neighborhood_correct``.

    Returns:
        ``{"edit", "paraphrase", "neighborhood"}`` accuracies as fractions in [0, 1]; NaN for a
        family without tokens.
    """
    return {
        "edit": _mean_or_nan(_flat_flags(rewrite_correct)),
        "paraphrase": _mean_or_nan(_flat_flags(paraphrase_correct)),
        "neighborhood": _mean_or_nan(_flat_flags(neighborhood_correct)),
    }


def first_token_accuracy(prompts_correct: Sequence[Sequence[Any]]) -> float:
    """Fraction of prompts whose *first* target token is right, from per-prompt token flags
    (one flag sequence per prompt, as in :func:`zsre_case_metrics`); NaN without prompts.

    A generated answer can only be right if it starts right, so this bounds what generation scores
    (``[[True, False], [False, True]]`` -> 0.5)."""
    flags = [_flat_flags(p) for p in prompts_correct]
    return _mean_or_nan([float(bool(f[0])) for f in flags if f])


def aggregate_zsre(cases: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Average per-case ZsRE accuracies (:func:`zsre_case_metrics`) over cases, in percent.

    NaN entries (families without tokens) are skipped; a family with no values gives NaN.
    """
    return {key: 100.0 * _nanmean(float(c[key]) for c in cases if key in c) for key in ZSRE_KEYS}


# --------------------------------------------------------------------------------------------
# Token F1 (SQuAD normalisation) and edit retention
# --------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD answer normalisation: lower-case, drop punctuation and articles, squeeze white space."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    """Token-level F1 between two strings after :func:`normalize_answer` (SQuAD style).

    If either side normalises to no tokens, the score is 1.0 when both do and 0.0 otherwise.
    """
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred)
    recall = overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the two strings are equal after :func:`normalize_answer`, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def edit_retention_rate(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean token F1 of the model's answers over edited facts (a fraction in [0, 1]).

    ``references[i]`` is the answer of fact ``i`` or a list of acceptable answers (the best F1
    counts). Returns NaN for no facts.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return math.nan
    scores = []
    for pred, ref in zip(predictions, references):
        refs = [ref] if isinstance(ref, str) else list(ref)
        if not refs:
            raise ValueError("empty list of reference answers")
        scores.append(max(token_f1(pred, r) for r in refs))
    return sum(scores) / len(scores)
