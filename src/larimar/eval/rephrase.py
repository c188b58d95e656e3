"""Generalisation to unseen phrasings (paper Figs. 2b and 5, Table 14): PARAREL phrasings written
one at a time, unseen phrasings queried; pseudo-inverse vs Gaussian addressing.

Protocol (``larimar eval rephrase``)
------------------------------------
* Facts: T-REx ``(subject, object)`` pairs of the PARAREL relations with at least
  ``writes_per_fact + queries_per_fact`` cloze patterns (:attr:`PararelRelation.cloze_patterns`).
  Facts are drawn round-robin over those relations (each relation's facts in a seeded random order)
  until ``n`` facts are chosen; facts with an empty object are skipped. For every fact the eligible
  patterns are put in a seeded random order: the first ``writes_per_fact`` give the *written*
  phrasings (``render(pattern, subject, object).sentence``, e.g. ``"Eibenstock is located in
  Germany."``), the next ``queries_per_fact`` the *unseen* query prompts (``render(pattern,
  subject).prompt``, e.g. ``"Eibenstock, located in"``) whose answer is the object.
* Writes: every written phrasing is one write (the sequential update, Eq. 4), fact after fact, so the
  total number of writes is ``n * writes_per_fact``, capped by ``--max-writes`` (default 3000; ``n``
  defaults to ``max_writes // writes_per_fact``).
* Memory: ``K = --memory-size`` slots (default 1000) with a fixed reference made of the encodings of
  the first written phrasing of the first ``K`` facts of the pool (the pool continues past the ``n``
  written facts when ``n < K``), so that with Gaussian addressing the slots are actual fact encodings.
  Both addressing modes use these texts (:class:`larimar.eval.sequential.MemoryOptions`):
  ``"reference"`` (pseudo-inverse, ``W = z M_ref^†``, rows rescaled to the trained M0's norm, ridge =
  the config's) and ``"gaussian"`` (paper Eq. 7-8, bandwidth ``--gaussian-alpha``, default 0.1, against
  the *raw* encodings, ridge 0.01 unless ``--ridge``). Gaussian distances are only meaningful against
  raw encodings: against rescaled rows every query is about equally far from every slot and the
  weights are nearly uniform (the setting of the session-6 run). Queries always read memory.
* Checkpoints every ``--eval-every`` writes (rounded to whole facts) and after the last: for the facts
  fully written so far (a seeded sample of at most ``--eval-max`` facts), every unseen query prompt is
  answered greedily with as many tokens as the object has (``--max-new-tokens`` fixes a number);
  score = token F1 of :func:`larimar.eval.sequential.first_answer` vs the object.

Output: ``DIR/<mode>/progress.json`` + snapshots (resumable, as in :mod:`larimar.eval.sequential`),
``DIR/summary.json``::

    {"n_facts", "max_writes", "writes_per_fact", "queries_per_fact", "K",
     "modes": {"reference": {"curve": [[writes, mean_f1], ...], "final_f1", "seconds_per_write"},
               "gaussian": {...}}}

``DIR/summary.md`` and ``DIR/curve.png`` (mean F1 vs writes, one line per addressing mode).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from larimar.eval.sequential import (
    LarimarStream,
    MemoryOptions,
    StreamSystem,
    add_common_arguments,
    answer_by_length,
    batched_generate,
    first_answer,
    markdown_table,
    plot_curves,
    run_stream,
    stream_checkpoints,
    target_token_counts,
)

if TYPE_CHECKING:  # pragma: no cover
    from larimar.eval.data import PararelRelation
    from larimar.modeling.model import Larimar

log = logging.getLogger(__name__)

__all__ = ["ADDRESSING", "MODES", "RephraseFact", "UneditedStream", "add_arguments", "run", "run_rephrase", "select_pararel_facts"]

#: addressing modes compared: pseudo-inverse against the fixed reference, and Gaussian.
ADDRESSING: tuple[str, ...] = ("reference", "gaussian")
#: the modes ``--modes`` accepts: the two addressing modes, and the decoder without memory
MODES: tuple[str, ...] = ADDRESSING + ("unedited",)


class UneditedStream:
    """The decoder alone, no memory (``use_memory="never"``), answering the same unseen phrasings:
    what the model gets right from its own knowledge (T-REx facts are true facts)."""

    name = "unedited"

    def __init__(self, model: "Larimar", *, batch_size: int = 16) -> None:
        self.model = model
        self.batch_size = int(batch_size)

    def reset(self) -> None:
        self.model.reset_memory()

    def write(self, index: int) -> None:  # nothing is written
        return None

    def answer(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        return batched_generate(self.model, prompts, max_new_tokens=max_new_tokens, use_memory="never", batch_size=self.batch_size)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "UNEDITED").write_text("no memory: the decoder alone\n", encoding="utf-8")

    def load(self, directory: Path, count: int) -> None:
        if not (directory / "UNEDITED").is_file():
            raise ValueError(f"{directory}: not a snapshot of the unedited stream")


@dataclass(frozen=True)
class RephraseFact:
    """One fact with its written phrasings and unseen query prompts.

    Attributes:
        fact_id: ``"<relation>:<index in the relation's T-REx file>"``.
        relation: Wikidata relation id.
        subject, object: the T-REx labels.
        written: sentences written to memory (``writes_per_fact`` of them).
        queries: cloze prompts of other patterns; the answer is ``object``.
    """

    fact_id: str
    relation: str
    subject: str
    object: str
    written: list[str] = field(hash=False)
    queries: list[str] = field(hash=False)


def select_pararel_facts(
    relations: Mapping[str, "PararelRelation"],
    n: int,
    *,
    writes_per_fact: int = 2,
    queries_per_fact: int = 2,
    seed: int = 0,
) -> list[RephraseFact]:
    """Choose ``n`` facts round-robin over the relations with enough cloze patterns (see the module
    docstring). Deterministic given ``seed``; fewer than ``n`` if the data runs out."""
    from larimar.eval.data import render

    need = writes_per_fact + queries_per_fact
    if writes_per_fact < 1 or queries_per_fact < 1:
        raise ValueError("writes_per_fact and queries_per_fact must be >= 1")
    rng = random.Random(seed)
    pools: list[tuple[str, list[str], list[tuple[int, tuple[str, str]]]]] = []
    for rel_id in relations:  # in the given order (load_pararel: numeric relation ids)
        rel = relations[rel_id]
        pats = rel.cloze_patterns
        if len(pats) >= need and rel.facts:
            order = list(enumerate(rel.facts))
            rng.shuffle(order)
            pools.append((rel_id, pats, order))
    if not pools:
        raise ValueError(f"no PARAREL relation has {need} cloze patterns and facts")
    chosen: list[RephraseFact] = []
    cursor = [0] * len(pools)
    while len(chosen) < n and any(c < len(p[2]) for c, p in zip(cursor, pools)):
        for r, (rel_id, pats, order) in enumerate(pools):
            if len(chosen) >= n:
                break
            while cursor[r] < len(order):
                idx, (subj, obj) = order[cursor[r]]
                cursor[r] += 1
                if subj.strip() and obj.strip():
                    perm = list(pats)
                    random.Random(f"{seed}:{rel_id}:{idx}").shuffle(perm)
                    written = [render(p, subj, obj).sentence or "" for p in perm[:writes_per_fact]]
                    queries = [render(p, subj).prompt for p in perm[writes_per_fact:need]]
                    if all(w.strip() for w in written) and all(q.strip() for q in queries):
                        chosen.append(RephraseFact(f"{rel_id}:{idx}", rel_id, subj, obj, written, queries))
                        break
    return chosen


def _evaluator(facts: Sequence[RephraseFact], writes_per_fact: int, lengths: Sequence[int], *, eval_max: int | None, seed: int):
    def evaluate(system: StreamSystem, k: int) -> dict[str, Any]:
        from larimar.eval.metrics import token_f1

        done = list(range(k // writes_per_fact))
        if eval_max is not None and len(done) > eval_max:
            done = sorted(random.Random(seed * 7919 + k).sample(done, eval_max))
        prompts = [q for i in done for q in facts[i].queries]
        answers = [facts[i].object for i in done for _ in facts[i].queries]
        t0 = time.perf_counter()
        gens = answer_by_length(system, prompts, [lengths[i] for i in done for _ in facts[i].queries])
        f1 = [token_f1(first_answer(g), a) for g, a in zip(gens, answers)]
        return {
            "writes": k,
            "mean_f1": sum(f1) / len(f1) if f1 else math.nan,
            "n_facts_eval": len(done),
            "n_queries": len(prompts),
            "eval_seconds": time.perf_counter() - t0,
            "examples": [{"prompt": p, "target": a, "generation": g} for p, a, g in list(zip(prompts, answers, gens))[:5]],
        }

    return evaluate


def rephrase_markdown(summary: Mapping[str, Any]) -> str:
    """Markdown table: mean F1 on unseen phrasings vs writes, one column per addressing mode."""
    from larimar.eval.report import fmt

    modes = list(summary.get("modes", {}))
    curves = {m: {int(w): f for w, f in summary["modes"][m]["curve"]} for m in modes}
    writes = sorted({w for c in curves.values() for w in c})
    rows = [[str(w)] + [fmt(curves[m].get(w), 3) for m in modes] for w in writes]
    return (
        f"# Unseen phrasings (PARAREL): {summary.get('n_facts')} facts, {summary.get('writes_per_fact')} phrasings "
        f"written and {summary.get('queries_per_fact')} queried per fact, K = {summary.get('K')}\n\n"
        "Mean token F1 of greedy answers to unseen phrasings of the facts written so far.\n\n"
        + markdown_table(["writes"] + [f"{m} F1" for m in modes], rows)
    )


def run_rephrase(
    model: "Larimar",
    facts: Sequence[RephraseFact],
    out_dir: str | os.PathLike[str],
    *,
    config: Mapping[str, Any],
    reference_texts: Sequence[str] | None = None,
    modes: Sequence[str] = ADDRESSING,
    memory_size: int = 1000,
    eval_every: int = 250,
    eval_max: int | None = 100,
    max_new_tokens: int | None = None,
    gaussian_alpha: float | None = None,
    ridge: float | None = None,
    batch_size: int = 16,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    plot: bool = True,
) -> dict[str, Any]:
    """Write the phrasings of ``facts`` one at a time under each addressing mode; return the summary.

    ``reference_texts`` (default: the first written phrasing of every fact) are encoded and their
    first ``K`` rows form the reference memory of each mode (rescaled for pseudo-inverse addressing,
    raw for Gaussian addressing; see :class:`larimar.eval.sequential.MemoryOptions`, which also gives
    the defaults of ``gaussian_alpha`` (0.1) and ``ridge``).
    """
    from larimar.eval.runner import atomic_write_json, atomic_write_text, prepare_out_dir, seed_everything

    facts = list(facts)
    if not facts:
        raise ValueError("no facts")
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes must be a non-empty subset of {MODES}, got {list(modes)}")
    wpf = len(facts[0].written)
    if any(len(f.written) != wpf for f in facts):
        raise ValueError("every fact needs the same number of written phrasings")
    out = prepare_out_dir(
        out_dir,
        config,
        identity_keys=tuple(k for k in config if k != "batch_size"),
        force=force,
        results_glob=tuple(f"{m}/progress.json" for m in MODES) + ("summary.json", "summary.md", "curve.png"),
    )
    texts = [w for f in facts for w in f.written]
    n_writes = len(texts)
    step = max(wpf, (max(1, eval_every) // wpf) * wpf)
    marks = stream_checkpoints(n_writes, step)
    ref_texts = list(reference_texts) if reference_texts is not None else [f.written[0] for f in facts]
    K = min(int(memory_size), len(ref_texts))
    if K < memory_size:
        log.warning("only %d reference texts: using K = %d instead of %d", len(ref_texts), K, memory_size)
    if max_new_tokens is None:
        lengths = target_token_counts(model.tokenizer, [f.object for f in facts])
    else:
        lengths = [int(max_new_tokens)] * len(facts)
    evaluate = _evaluator(facts, wpf, lengths, eval_max=eval_max, seed=seed)
    summary: dict[str, Any] = {
        "n_facts": len(facts),
        "max_writes": config.get("max_writes"),
        "writes_per_fact": wpf,
        "queries_per_fact": len(facts[0].queries),
        "K": K,
        "modes": {},
    }
    for mode in modes:
        seed_everything(seed)
        stream: StreamSystem
        if mode == "unedited":
            stream = UneditedStream(model, batch_size=batch_size)
        else:
            memory = MemoryOptions(addressing=mode, ridge=ridge, **({} if gaussian_alpha is None else {"gaussian_alpha": gaussian_alpha}))
            stream = LarimarStream(
                model, texts, memory.reference(model, ref_texts[:K], K), addressing=mode,
                gaussian_alpha=memory.gaussian_alpha, ridge=memory.ridge_for(model), batch_size=batch_size,
                name=f"larimar-{mode}",
            )
        result = run_stream(stream, n_writes, marks, evaluate, out / mode, progress=progress, desc=f"rephrase {mode}")
        pts = result["points"]
        summary["modes"][mode] = {
            "curve": [[p["writes"], p["mean_f1"]] for p in pts],
            "final_f1": pts[-1]["mean_f1"] if pts else None,
            "seconds_per_write": result["write_seconds"] / n_writes,
        }
    model.reset_memory()
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", rephrase_markdown(summary))
    if plot:
        names = {"reference": "pseudo-inverse (reference)", "gaussian": "Gaussian", "unedited": "unedited (no memory)"}
        plot_curves(
            {names[m]: v["curve"] for m, v in summary["modes"].items()},
            out / "curve.png",
            xlabel="phrasings written",
            ylabel="mean F1 on unseen phrasings",
            title="Rephrase generalisation (PARAREL)",
        )
    return summary


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``larimar eval rephrase``."""
    add_common_arguments(
        p,
        data_help="PARAREL directory (graphs_json/ + trex_lms_vocab/; default: the shared data's pararel)",
        n_default=None,
        n_help="facts (default: max-writes // writes-per-fact)",
    )
    p.add_argument("--max-writes", type=int, default=3000, help="cap on the number of writes (default 3000)")
    p.add_argument("--writes-per-fact", type=int, default=2, help="phrasings written per fact (default 2)")
    p.add_argument("--queries-per-fact", type=int, default=2, help="unseen phrasings queried per fact (default 2)")
    p.add_argument("--memory-size", type=int, default=1000, help="K (default 1000)")
    p.add_argument("--modes", default="reference,gaussian",
                   help="addressing modes, and 'unedited' for the decoder without memory (default reference,gaussian)")
    p.add_argument("--gaussian-alpha", type=float, default=None, help="Gaussian addressing bandwidth (default 0.1)")
    p.add_argument("--ridge", type=float, default=None,
                   help="ridge lambda of the writes (default: 0.01 for gaussian, the model's for reference)")
    p.add_argument("--eval-every", type=int, default=250, help="checkpoint interval in writes (default 250)")
    p.add_argument("--eval-max", type=int, default=100, help="facts evaluated per checkpoint, sampled (default 100)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="greedy tokens per answer (default: the object's token count)")
    p.add_argument("--no-plot", action="store_true", help="do not draw curve.png")


def run(args: argparse.Namespace) -> int:
    """``larimar eval rephrase``."""
    from larimar.eval.cli import describe_model, load_model
    from larimar.eval.data import data_path, load_pararel
    from larimar.eval.runner import seed_everything

    if args.max_writes < 1:
        raise ValueError(f"--max-writes must be >= 1, got {args.max_writes}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    root = Path(args.data).expanduser() if args.data else data_path("pararel")
    relations = load_pararel(root)
    n = args.n if args.n is not None else args.max_writes // args.writes_per_fact
    n = min(n, args.max_writes // args.writes_per_fact)
    if n < 1:
        raise ValueError("--max-writes is smaller than --writes-per-fact: no fact fits")
    pool = select_pararel_facts(
        relations, max(n, args.memory_size), writes_per_fact=args.writes_per_fact,
        queries_per_fact=args.queries_per_fact, seed=args.seed,
    )
    facts = pool[:n]
    config = {
        "task": "rephrase",
        "data": str(root.resolve()),
        "n": len(facts),
        "max_writes": args.max_writes,
        "writes_per_fact": args.writes_per_fact,
        "queries_per_fact": args.queries_per_fact,
        "memory_size": args.memory_size,
        "modes": modes,
        "gaussian_alpha": args.gaussian_alpha,
        "ridge": args.ridge,
        "gaussian_reference": "raw",
        "eval_every": args.eval_every,
        "eval_max": args.eval_max,
        "max_new_tokens": args.max_new_tokens,
        "model": describe_model(args.model),
        "seed": args.seed,
        "batch_size": args.batch_size,
    }
    seed_everything(args.seed)
    model = load_model(args.model)
    run_rephrase(
        model, facts, args.out, config=config, reference_texts=[f.written[0] for f in pool], modes=modes,
        memory_size=args.memory_size, eval_every=args.eval_every, eval_max=args.eval_max,
        max_new_tokens=args.max_new_tokens, gaussian_alpha=args.gaussian_alpha, ridge=args.ridge,
        batch_size=args.batch_size,
        seed=args.seed, force=args.force, progress=not args.no_progress, plot=not args.no_plot,
    )
    print((Path(args.out) / "summary.md").read_text(encoding="utf-8"))
    print(f"results in {args.out}")
    return 0
