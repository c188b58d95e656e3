"""Scope detector (paper §4, external ESD): is a query about any stored fact?

Stored facts keep their unit-normalised sentence embeddings. A query's cosine to a fact is the maximum
over the query's sentences (CounterFact paraphrase prompts start with an unrelated sentence) and the
whole query. A query's score is its best score over the stored facts; it is in scope when the score
reaches the threshold.

Optionally (`lexical_weight` λ > 0) the score against each fact mixes in *lexical recall*: the
IDF-weighted share of the fact's tokens that occur in the query,

    score(q, f) = (1 - λ) · cos(q, f) + λ · Σ_{t ∈ f ∩ q} idf(t) / Σ_{t ∈ f} idf(t)   (token sets).

A sentence embedding is dominated by the relation's wording, so a prompt about another subject with the
same relation ("Léon Blum's mother tongue is") scores almost as high as a paraphrase of the stored
fact. The rare tokens (names) tell them apart: a paraphrase repeats them, a neighbour does not.
IDF comes from a table of document frequencies over generic text (`build_idf`); tokens missing from
the table count as the rarest. Pure torch except for sentence splitting and tokenisation.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")


def split_sentences(text: str) -> list[str]:
    """Split on ., ! or ? followed by whitespace; always returns at least one non-empty piece."""
    parts = [p.strip() for p in _SENTENCE_END.split(text.strip()) if p.strip()]
    return parts or [text]


@dataclass
class ScopeResult:
    score: torch.Tensor  # (Q,) best score over the stored facts (cosine, mixed with lexical recall if on)
    nearest: torch.Tensor  # (Q,) index of the nearest stored fact (-1 if memory is empty)
    in_scope: torch.Tensor  # (Q,) bool
    query_embedding: torch.Tensor | None = None  # (Q, H) raw embedding of each whole query, if computed


class ScopeDetector:
    """1-nearest-neighbour scope detector over stored fact embeddings (cosine, optionally + lexical recall).

    `embed_fn(texts) -> (N, H)` computes sentence embeddings (e.g. the Larimar encoder's pooled output).
    `lexical_weight` λ in [0, 1) mixes in lexical recall (module docstring); it needs `tokenize(text) ->
    list[str]` and takes IDF weights from `idf` ({token: idf}, see `build_idf`; None: every token weighs 1).
    """

    def __init__(
        self,
        embed_fn,
        threshold: float = 0.6,
        split: bool = True,
        *,
        lexical_weight: float = 0.0,
        tokenize: Callable[[str], list[str]] | None = None,
        idf: dict[str, float] | None = None,
    ):
        if not 0.0 <= lexical_weight < 1.0:
            raise ValueError(f"ScopeDetector: lexical_weight must be in [0, 1), got {lexical_weight}")
        if lexical_weight > 0 and tokenize is None:
            raise ValueError("ScopeDetector: lexical_weight > 0 needs a tokenize function")
        self.embed_fn = embed_fn
        self.threshold = float(threshold)
        self.split = split
        self.lexical_weight = float(lexical_weight)
        self.tokenize = tokenize
        self.idf = idf
        self.keys: torch.Tensor | None = None  # (N, H) unit-norm
        self._key_texts: list[str] = []
        self._lexical: tuple[dict[str, int], torch.Tensor, torch.Tensor] | None = None  # built on first use
        self._weights_cache: dict[str, dict[str, float]] = {}
        self.gather_limit = 1 << 23  # lexical recall gathers at most this many (query, fact, token) weights at a time

    def __len__(self) -> int:
        return 0 if self.keys is None else self.keys.shape[0]

    @staticmethod
    def normalise(e: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(e.detach().float(), dim=-1)

    def token_weights(self, text: str) -> dict[str, float]:
        """{token: weight} over the distinct tokens of `text`, IDF-weighted and summing to 1 (empty if none weigh)."""
        cached = self._weights_cache.get(text)
        if cached is not None:
            return cached
        w = idf_weights(set(self.tokenize(text)), self.idf)  # type: ignore[misc]
        total = sum(w.values())
        out = {t: v / total for t, v in w.items()} if total > 0 else {}
        if len(self._weights_cache) > 100_000:
            self._weights_cache.clear()
        self._weights_cache[text] = out
        return out

    def set_keys(self, embeddings: torch.Tensor | None, texts: list[str] | None = None) -> None:
        """Stored facts: (N, H) embeddings and their N texts (needed when lexical recall is on)."""
        self._lexical = None
        if embeddings is None or embeddings.shape[0] == 0:
            self.keys, self._key_texts = None, []
            return
        if texts is not None or self.lexical_weight > 0:
            if texts is None or len(texts) != embeddings.shape[0]:
                raise ValueError(f"ScopeDetector.set_keys: lexical recall needs one text per key ({embeddings.shape[0]} keys)")
            self._key_texts = list(texts)
        self.keys = self.normalise(embeddings)

    @property
    def key_tokens(self) -> list[dict[str, float]]:
        """Per stored fact: {token: normalised idf weight}, weights summing to 1."""
        return [self.token_weights(t) for t in self._key_texts]

    def _lexical_index(self) -> tuple[dict[str, int], torch.Tensor, torch.Tensor]:
        """(vocabulary of the keys' tokens, padded (N, L) token ids, their (N, L) weights; 0 = padding).

        Built when a query is first scored after the keys changed, not on every write: evaluations
        that write many times and never route (sequential editing) do not pay for it.
        """
        if self._lexical is None:
            vocab: dict[str, int] = {}
            rows = [[(vocab.setdefault(t, len(vocab)), v) for t, v in self.token_weights(text).items()] for text in self._key_texts]
            L = max((len(r) for r in rows), default=0) or 1
            ids = torch.tensor([[i for i, _ in r] + [0] * (L - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), L)
            w = torch.tensor([[v for _, v in r] + [0.0] * (L - len(r)) for r in rows], dtype=torch.float32).reshape(len(rows), L)
            self._lexical = (vocab, ids, w)
        return self._lexical

    def lexical_recall(self, queries: list[str]) -> torch.Tensor:
        """(Q, N): IDF-weighted share of each stored fact's tokens that occur in each query."""
        vocab, key_ids, key_w = self._lexical_index()
        present = torch.zeros(len(queries), len(vocab) + 1)  # (Q, V): the query has the token
        for qi, q in enumerate(queries):
            for t in set(self.tokenize(q)):  # type: ignore[misc]
                j = vocab.get(t)
                if j is not None:
                    present[qi, j] = 1.0
        N, L = key_ids.shape
        step = max(1, self.gather_limit // (N * L))  # queries per chunk
        return torch.cat([(present[i : i + step, key_ids] * key_w).sum(-1) for i in range(0, len(queries), step)])  # (Q, N)

    @torch.no_grad()
    def score(self, queries: list[str]) -> ScopeResult:
        if self.keys is None:
            n = len(queries)
            return ScopeResult(torch.full((n,), -1.0), torch.full((n,), -1, dtype=torch.long), torch.zeros(n, dtype=torch.bool))
        cos, recall, raw = self.components(queries)
        per_fact = cos if recall is None else (1 - self.lexical_weight) * cos + self.lexical_weight * recall  # (Q, N)
        score, nearest = per_fact.max(dim=1)  # (Q,), (Q,)
        return ScopeResult(score, nearest, score >= self.threshold, raw)

    @torch.no_grad()
    def components(self, queries: list[str], *, recall: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The two signals of `score` against each stored fact -> (cosine (Q, N): best over the query's
        sentences and the whole query; lexical recall (Q, N), computed when `recall` (default: when
        `lexical_weight` > 0), else None; the raw embedding of each whole query (Q, H)). Needs stored facts."""
        if self.keys is None:
            raise ValueError("ScopeDetector.components: no stored facts")
        want_recall = self.lexical_weight > 0 if recall is None else recall
        if want_recall and (self.tokenize is None or len(self._key_texts) != self.keys.shape[0]):
            raise ValueError("ScopeDetector.components: lexical recall needs a tokenize function and one text per stored fact")
        pieces, owner, whole = [], [], []
        for qi, q in enumerate(queries):
            parts = split_sentences(q) if self.split else [q]
            # the whole query counts too: a fact may span the split point
            if len(parts) > 1 or parts[0] != q:
                parts = parts + [q]
            whole.append(len(pieces) + len(parts) - 1)  # the last piece is always the whole query
            pieces.extend(parts)
            owner.extend([qi] * len(parts))
        raw = self.embed_fn(pieces)
        emb = self.normalise(raw).to(self.keys.device)
        sims = (emb @ self.keys.T).cpu()  # (P, N) cosine of every piece to every fact
        owner_t = torch.tensor(owner).unsqueeze(1).expand_as(sims)  # (P, N)
        cos = torch.full((len(queries), sims.shape[1]), -2.0).scatter_reduce(0, owner_t, sims, "amax")  # (Q, N)
        return cos, self.lexical_recall(queries) if want_recall else None, raw[whole]


def idf_weights(tokens: Iterable[str], idf: dict[str, float] | None) -> dict[str, float]:
    """{token: idf} for `tokens`; without a table every token weighs 1, tokens missing from it weigh the most."""
    if idf is None:
        return dict.fromkeys(tokens, 1.0)
    top = idf[""] if "" in idf else max(idf.values(), default=1.0)
    return {t: idf.get(t, top) for t in tokens}


def build_idf(documents: Iterable[str], tokenize: Callable[[str], list[str]]) -> dict[str, float]:
    """Inverse document frequencies idf(t) = log((D + 1) / (df(t) + 1)) over D documents.

    The table also holds the weight of an unseen token, log(D + 1), under the empty string, so that
    unseen tokens weigh the most (`idf_weights`). Raises ValueError without documents.
    """
    df: Counter[str] = Counter()
    D = 0
    for doc in documents:
        D += 1
        df.update(set(tokenize(doc)))
    if D == 0:
        raise ValueError("build_idf: no documents")
    table = {t: math.log((D + 1) / (c + 1)) for t, c in df.items()}
    table[""] = math.log(D + 1)
    return table


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
