"""IKE: In-context Knowledge Editing (Zheng et al., "Can We Edit Factual Knowledge by In-Context
Learning?", EMNLP 2023).

No weights change. A query is answered after a context of ``k`` demonstrations followed by the new
fact and the query::

    New Fact: The capital of Eibenstock is Paris.        <- demonstration (update type)
    Prompt: Which country is Eibenstock located in? Paris

    ...                                                   <- k demonstrations, most similar last

    New Fact: The mother tongue of Danielle Darrieux is English.
    Prompt: {query}                                       <- scored continuation: " {candidate}"

Demonstrations come from a pool of *demonstration facts* (never from the evaluated edits), each
giving three demonstrations with the same ``New Fact`` line:

* **copy**   -- ``Prompt:`` the fact's own prompt, answered with the new object;
* **update** -- ``Prompt:`` a paraphrase (question form) of it, answered with the new object;
* **retain** -- ``Prompt:`` the same relation for *another* subject, answered with its true object.

Selection (when the edit is made, as IKE retrieves by the edit request): pool facts are ranked by
the similarity of their ``"New Fact: {prompt} {target_new}"`` line to the edit's; the ``k`` most
similar facts each give one demonstration, whose type follows a deterministic schedule with the
proportions ``type_ratio`` (copy : update : retain; default 1 : 3 : 4, so ``k = 8`` gives 1 copy,
3 update and 4 retain demonstrations). Ranking demonstrations of all types together by
similarity instead would almost only pick *copy* demonstrations (they repeat the fact verbatim)
and the model then copies the new object to neighbouring subjects as well. Demonstrations are
ordered from least to most similar (the most similar sits next to the query). Similarity is
deterministic: Jaccard overlap of lower-cased word sets by default, or cosine similarity of
``embed_fn`` embeddings when an ``embed_fn(list[str]) -> Tensor (n, d)`` is passed (IKE used a
sentence encoder); ties are broken by pool order. Pool facts whose subject is the edit's subject
are never used.

Built-in pool (``pool: templates``): for each relation of the shared data's
``templates/cloze_templates.json`` that has T-REx facts (``pararel/trex_lms_vocab``), up to
``pool_facts_per_relation`` facts are drawn with a seeded RNG; the new object is another object of
the same relation, the paraphrase uses ``templates/question_templates.json`` and the retain prompt
another subject of the relation. ``pool`` may instead be a path to a JSON list of records
``{"prompt", "subject", "target_new", "paraphrase", "neighbor_prompt", "neighbor_answer"}``, and a
list of such dicts (or :class:`DemoFact`) can be passed directly as ``demonstrations=``.

Several edits (sequential editing): the ``n_facts`` edits most similar to the query are written as
``New Fact:`` lines (most similar last) and the demonstrations of the most similar one are used.
With one edit (the standard protocol) this is exactly IKE.
"""

from __future__ import annotations

import json
import random
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from larimar.eval.baselines.common import check, hparams_from_dict
from larimar.eval.editors import BaseEditor, EditRequest

__all__ = [
    "DemoFact",
    "IKEEditor",
    "IKEHparams",
    "build_template_pool",
    "demonstrations_of",
    "jaccard",
    "type_schedule",
]

_TYPES = ("copy", "update", "retain")

_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class DemoFact:
    """A demonstration fact (an edit that is *not* evaluated) with its paraphrase and a neighbour.

    Attributes:
        prompt: cloze prompt with the subject, e.g. ``"The capital of Eibenstock is"``.
        subject: its subject.
        target_new: the (counterfactual) new object.
        paraphrase: another phrasing of the prompt (answered with ``target_new``).
        neighbor_prompt: the same relation for another subject.
        neighbor_answer: that subject's true object.
    """

    prompt: str
    subject: str
    target_new: str
    paraphrase: str
    neighbor_prompt: str
    neighbor_answer: str


def demonstrations_of(fact: DemoFact) -> list[tuple[str, str]]:
    """The copy / update / retain demonstrations of ``fact``: ``[(kind, text), ...]``."""
    new_fact = f"New Fact: {fact.prompt} {fact.target_new}\n"
    return [
        ("copy", f"{new_fact}Prompt: {fact.prompt} {fact.target_new}\n\n"),
        ("update", f"{new_fact}Prompt: {fact.paraphrase} {fact.target_new}\n\n"),
        ("retain", f"{new_fact}Prompt: {fact.neighbor_prompt} {fact.neighbor_answer}\n\n"),
    ]


def type_schedule(k: int, ratio: Sequence[float]) -> list[str]:
    """Demonstration types for ``k`` slots in the proportions ``ratio`` (copy, update, retain).

    Slot ``i`` gets the type furthest below its target count ``ratio_t / sum(ratio) * (i + 1)``
    (ties: copy, update, retain), so every prefix of the schedule is as close to the mix as possible.
    """
    total = float(sum(ratio))
    counts = [0, 0, 0]
    out = []
    for i in range(k):
        deficits = [ratio[t] / total * (i + 1) - counts[t] for t in range(3)]
        t = max(range(3), key=lambda j: (deficits[j], -j))
        counts[t] += 1
        out.append(_TYPES[t])
    return out


def jaccard(a: str, b: str) -> float:
    """Jaccard overlap of the lower-cased word sets of two texts (0 when both are empty)."""
    sa, sb = set(_WORD.findall(a.lower())), set(_WORD.findall(b.lower()))
    if not sa and not sb:
        return 0.0
    return len(sa & sb) / len(sa | sb)


def build_template_pool(
    data_dir: str | Path | None = None, *, facts_per_relation: int = 4, seed: int = 0
) -> list[DemoFact]:
    """Build the demonstration pool from the shared data's templates and T-REx facts.

    Args:
        data_dir: the shared data directory (holding ``templates/`` and ``pararel/``); default
            :func:`larimar.eval.data.default_data_dir`.
        facts_per_relation: facts drawn per relation.
        seed: RNG seed (per relation: ``seed + crc32(relation)``), so the pool is deterministic.

    Raises:
        FileNotFoundError: the templates or the T-REx facts are missing.
    """
    from larimar.eval.data import default_data_dir, load_pararel

    root = Path(data_dir) if data_dir is not None else default_data_dir()
    cloze_path = root / "templates" / "cloze_templates.json"
    question_path = root / "templates" / "question_templates.json"
    if not cloze_path.is_file():
        raise FileNotFoundError(
            f"IKE's built-in pool needs {cloze_path} (set $LARIMAR_DATA or data_dir, or pass demonstrations=)"
        )
    cloze = json.loads(cloze_path.read_text(encoding="utf-8"))
    questions = json.loads(question_path.read_text(encoding="utf-8")) if question_path.is_file() else {}
    relations = load_pararel(root / "pararel", relations=sorted(cloze))
    pool: list[DemoFact] = []
    for rel in sorted(cloze, key=lambda r: (int(r[1:]) if r[1:].isdigit() else 1 << 30, r)):
        template = cloze[rel]
        if rel not in relations or not template.rstrip().endswith("__") or "[X]" not in template:
            continue
        facts = list(dict.fromkeys(relations[rel].facts))
        objects = sorted({o for _, o in facts})
        if len(facts) < 2 or len(objects) < 2:
            continue
        rng = random.Random(seed + zlib.crc32(rel.encode()))
        picked = rng.sample(range(len(facts)), min(facts_per_relation, len(facts)))
        question = questions.get(rel)

        def cloze_of(subject: str, template: str = template) -> str:
            return template.replace("[X]", subject).replace("__", "").rstrip()

        for i in picked:
            subj, obj = facts[i]
            new_obj = rng.choice([o for o in objects if o != obj])
            j = rng.choice([x for x in range(len(facts)) if facts[x][0] != subj] or [i])
            n_subj, n_obj = facts[j]
            para = question.replace("[X]", subj) if question else cloze_of(subj)
            pool.append(DemoFact(cloze_of(subj), subj, new_obj, para, cloze_of(n_subj), n_obj))
    if not pool:
        raise FileNotFoundError(f"no demonstration facts could be built from {root}")
    return pool


def _load_pool_file(path: Path) -> list[DemoFact]:
    records = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of demonstration facts")
    return [_as_demo(r, f"{path}[{i}]") for i, r in enumerate(records)]


def _as_demo(rec: Any, where: str) -> DemoFact:
    if isinstance(rec, DemoFact):
        return rec
    fields = ("prompt", "subject", "target_new", "paraphrase", "neighbor_prompt", "neighbor_answer")
    if not isinstance(rec, dict) or any(not isinstance(rec.get(f), str) for f in fields):
        raise ValueError(f"ike: demonstration {where} must be a dict with string fields {list(fields)}")
    return DemoFact(*(rec[f] for f in fields))


@dataclass
class IKEHparams:
    """IKE hyper-parameters (defaults = ``configs/baselines/ike.yaml``).

    Attributes:
        k: number of demonstrations per edit.
        pool: ``"templates"`` (built-in pool) or a path to a JSON list of demonstration facts.
        pool_facts_per_relation: facts per relation in the built-in pool.
        pool_seed: seed of the built-in pool.
        data_dir: shared data directory for the built-in pool (default: auto-detected).
        n_facts: how many edits (most similar to the query) are written as ``New Fact:`` lines.
        type_ratio: proportions of copy, update and retain demonstrations.
        score_batch_size: sequences per forward pass when scoring.
    """

    k: int = 8
    pool: str = "templates"
    pool_facts_per_relation: int = 4
    pool_seed: int = 0
    data_dir: str | None = None
    n_facts: int = 1
    type_ratio: list[float] = field(default_factory=lambda: [1.0, 3.0, 4.0])
    score_batch_size: int = 8

    def __post_init__(self) -> None:
        m = "ike"
        for name in ("k", "pool_facts_per_relation", "n_facts", "score_batch_size"):
            val = getattr(self, name)
            check(isinstance(val, int) and not isinstance(val, bool) and val >= 1, m, f"{name} must be an int >= 1, got {val!r}")
        check(isinstance(self.pool, str) and bool(self.pool), m, f"pool must be 'templates' or a file path, got {self.pool!r}")
        r = self.type_ratio
        check(
            isinstance(r, (list, tuple)) and len(r) == 3 and all(isinstance(x, (int, float)) and x >= 0 for x in r)
            and sum(r) > 0,
            m, f"type_ratio must be three non-negative numbers (copy, update, retain) with a positive sum, got {r!r}",
        )
        self.type_ratio = [float(x) for x in r]


class IKEEditor(BaseEditor):
    """IKE editor (see the module docstring).

    Args:
        model, tokenizer: the causal LM.
        demonstrations: optional explicit pool (``DemoFact`` objects or dicts); overrides ``pool``.
        embed_fn: optional ``f(texts) -> (n, d)`` tensor for cosine-similarity retrieval.
        **hparams: :class:`IKEHparams`.
    """

    name = "ike"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        demonstrations: Sequence[DemoFact | dict[str, str]] | None = None,
        embed_fn: Callable[[list[str]], torch.Tensor] | None = None,
        **hparams: Any,
    ) -> None:
        self.hparams = hparams_from_dict(IKEHparams, "ike", hparams)
        super().__init__(model, tokenizer, score_batch_size=self.hparams.score_batch_size)
        self.embed_fn = embed_fn
        self._explicit = [_as_demo(d, f"demonstrations[{i}]") for i, d in enumerate(demonstrations)] if demonstrations is not None else None
        if self._explicit is not None and not self._explicit:
            raise ValueError("ike: demonstrations must not be empty")
        self._pool: list[DemoFact] | None = self._explicit
        self._demo_texts: list[str] | None = None
        self._demo_subjects: list[str] | None = None
        self._demo_emb: torch.Tensor | None = None
        #: selected demonstration texts per edit (same order as ``self.requests``)
        self.selected: list[list[str]] = []

    # -- pool ----------------------------------------------------------------------------------
    def pool(self) -> list[DemoFact]:
        """The demonstration facts (built or loaded on first use)."""
        if self._pool is None:
            hp = self.hparams
            if hp.pool == "templates":
                self._pool = build_template_pool(hp.data_dir, facts_per_relation=hp.pool_facts_per_relation, seed=hp.pool_seed)
            else:
                path = Path(hp.pool).expanduser()
                if not path.is_file():
                    raise FileNotFoundError(f"ike: pool file {path} does not exist")
                self._pool = _load_pool_file(path)
        return self._pool

    def _fact_lines(self) -> list[str]:
        if self._demo_texts is None:
            self._demo_texts = [f"New Fact: {f.prompt} {f.target_new}" for f in self.pool()]
            self._demo_subjects = [f.subject.strip().lower() for f in self.pool()]
        return self._demo_texts

    def _similarities(self, query: str, texts: list[str], cache: bool) -> list[float]:
        if self.embed_fn is None:
            return [jaccard(query, t) for t in texts]
        if cache:
            if self._demo_emb is None:
                self._demo_emb = torch.nn.functional.normalize(torch.as_tensor(self.embed_fn(texts)).float(), dim=-1)
            emb = self._demo_emb
        else:
            emb = torch.nn.functional.normalize(torch.as_tensor(self.embed_fn(texts)).float(), dim=-1)
        q = torch.nn.functional.normalize(torch.as_tensor(self.embed_fn([query])).float(), dim=-1)
        return (emb @ q[0]).tolist()

    def select_demonstrations(self, request: EditRequest) -> list[str]:
        """The ``k`` demonstrations for ``request``, least similar first."""
        lines = self._fact_lines()
        subjects = self._demo_subjects or []
        pool = self.pool()
        sims = self._similarities(f"New Fact: {request.prompt} {request.target_new}", lines, cache=True)
        banned = request.subject.strip().lower()
        ranked = sorted((i for i in range(len(lines)) if subjects[i] != banned), key=lambda i: (-sims[i], i))
        ranked = ranked[: self.hparams.k]
        kinds = type_schedule(len(ranked), self.hparams.type_ratio)
        demos = [dict(demonstrations_of(pool[i]))[kind] for i, kind in zip(ranked, kinds)]
        return list(reversed(demos))

    # -- BaseEditor ------------------------------------------------------------------------------
    def _apply(self, requests: list[EditRequest]) -> None:
        for req in requests:
            self.selected.append(self.select_demonstrations(req))

    def _restore(self) -> None:
        self.selected = []

    def context_for(self, query: str) -> str:
        """The text put before ``query`` (``"Prompt: "`` included; empty before any edit)."""
        if not self.requests:
            return ""
        n = min(self.hparams.n_facts, len(self.requests))
        if len(self.requests) == 1:
            chosen = [0]
        else:
            keys = [f"{r.prompt} {r.target_new}" for r in self.requests]
            sims = self._similarities(query, keys, cache=False)
            chosen = sorted(range(len(keys)), key=lambda i: (-sims[i], -i))[:n]
        demos = "".join(self.selected[chosen[0]])
        facts = "".join(f"New Fact: {self.requests[i].prompt} {self.requests[i].target_new}\n" for i in reversed(chosen))
        return f"{demos}{facts}Prompt: "

    def _stats(self, prompts: list[str], continuations: list[str]) -> list[Any]:
        contexts: dict[str, str] = {}
        full = []
        for p in prompts:
            if p not in contexts:
                contexts[p] = self.context_for(p)
            full.append(contexts[p] + p)
        return super()._stats(full, continuations)

    def _generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        return super()._generate([self.context_for(p) + p for p in prompts], max_new_tokens)
