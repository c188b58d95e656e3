"""Scope detector (paper §4, external ESD): is a query about any stored fact?

Stored facts keep their unit-normalised sentence embeddings. A query's score is the maximum cosine
similarity to any stored fact; a multi-sentence query is split into sentences and the maximum over its
sentences is taken (CounterFact paraphrase prompts start with an unrelated sentence). A query is in scope
when its score reaches the threshold. Pure torch except for sentence splitting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")


def split_sentences(text: str) -> list[str]:
    """Split on ., ! or ? followed by whitespace; always returns at least one non-empty piece."""
    parts = [p.strip() for p in _SENTENCE_END.split(text.strip()) if p.strip()]
    return parts or [text]


def max_cosine(queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """queries (Q, H), keys (N, H), both unit-norm -> (best cosine (Q,), index of best key (Q,))."""
    if keys.shape[0] == 0:
        return queries.new_full((queries.shape[0],), -1.0), torch.full((queries.shape[0],), -1, dtype=torch.long)
    sims = queries @ keys.T  # (Q, N)
    return sims.max(dim=1)


@dataclass
class ScopeResult:
    score: torch.Tensor  # (Q,) max cosine over the query's sentences and the stored facts
    nearest: torch.Tensor  # (Q,) index of the nearest stored fact (-1 if memory is empty)
    in_scope: torch.Tensor  # (Q,) bool
    query_embedding: torch.Tensor | None = None  # (Q, H) raw embedding of each whole query, if computed


class ScopeDetector:
    """1-nearest-neighbour cosine scope detector over stored fact embeddings.

    `embed_fn(texts) -> (N, H)` computes sentence embeddings (e.g. the Larimar encoder's pooled output).
    """

    def __init__(self, embed_fn, threshold: float = 0.6, split: bool = True):
        self.embed_fn = embed_fn
        self.threshold = float(threshold)
        self.split = split
        self.keys: torch.Tensor | None = None  # (N, H) unit-norm

    def __len__(self) -> int:
        return 0 if self.keys is None else self.keys.shape[0]

    @staticmethod
    def normalise(e: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(e.detach().float(), dim=-1)

    def set_keys(self, embeddings: torch.Tensor | None) -> None:
        self.keys = None if embeddings is None or embeddings.shape[0] == 0 else self.normalise(embeddings)

    @torch.no_grad()
    def score(self, queries: list[str]) -> ScopeResult:
        pieces, owner, whole = [], [], []
        for qi, q in enumerate(queries):
            parts = split_sentences(q) if self.split else [q]
            # the whole query counts too: a fact may span the split point
            if len(parts) > 1 or parts[0] != q:
                parts = parts + [q]
            whole.append(len(pieces) + len(parts) - 1)  # the last piece is always the whole query
            pieces.extend(parts)
            owner.extend([qi] * len(parts))
        if self.keys is None:
            n = len(queries)
            return ScopeResult(torch.full((n,), -1.0), torch.full((n,), -1, dtype=torch.long), torch.zeros(n, dtype=torch.bool))
        raw = self.embed_fn(pieces)
        emb = self.normalise(raw).to(self.keys.device)
        best, idx = max_cosine(emb, self.keys)  # per piece
        owner_t = torch.tensor(owner)
        score = torch.full((len(queries),), -2.0)
        nearest = torch.full((len(queries),), -1, dtype=torch.long)
        for p in range(len(pieces)):
            q = owner_t[p]
            if best[p] > score[q]:
                score[q] = best[p].cpu()
                nearest[q] = idx[p].cpu()
        return ScopeResult(score, nearest, score >= self.threshold, raw[whole])


def equal_error_rate(pos_scores: torch.Tensor, neg_scores: torch.Tensor) -> tuple[float, float]:
    """EER of a score threshold detector: positives should score high. Returns (eer, threshold).

    Sweeps every distinct score as a threshold (in scope iff score >= t) and returns the point where the
    false-rejection rate (positives below t) and false-acceptance rate (negatives >= t) are closest,
    reporting their mean there.
    """
    pos = pos_scores.double().flatten()
    neg = neg_scores.double().flatten()
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError("equal_error_rate needs at least one positive and one negative score")
    thresholds = torch.cat([pos, neg]).unique()  # sorted ascending
    frr = (pos[None, :] < thresholds[:, None]).double().mean(1)
    far = (neg[None, :] >= thresholds[:, None]).double().mean(1)
    i = int((frr - far).abs().argmin())
    return float((frr[i] + far[i]) / 2), float(thresholds[i])


def f1_at(pos_scores: torch.Tensor, neg_scores: torch.Tensor, threshold: float) -> float:
    """F1 of 'in scope' predictions at a threshold, positives being the in-scope class."""
    tp = float((pos_scores >= threshold).sum())
    fn = float((pos_scores < threshold).sum())
    fp = float((neg_scores >= threshold).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)
