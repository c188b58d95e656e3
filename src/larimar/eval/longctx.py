"""Generalisation to long input contexts (paper §5.5, Table 6): facts stored in a hierarchy of
small memories and read recursively, vs the base model reading the whole context in its prompt.

Protocol (``larimar eval longctx``)
-----------------------------------
* Facts: counterfactual CounterFact statements ``"{prompt} {target_new}."`` (novel to the base
  model). A context of size ``s`` (``--sizes``, default ``64,96,128,256``) is the first ``s`` usable
  cases of ``--data`` (default ``counterfact-rome``); ``--n`` of them (default 50, evenly spaced over
  the context) are queried with their prompt, and a query is *recalled* when the greedy answer
  contains ``target_new`` as whole words (:func:`larimar.eval.sequential.contains_answer`).
* Larimar (no context in the prompt): the context is split into chunks of ``--chunk-size`` facts
  (default 8); each chunk is written into its own empty memory (the model's reference M0, ridge and
  addressing). A query is answered by :func:`hierarchical_read`: every chunk memory is read with the
  query's encoding, the read-outs are grouped into chunks again and each group is written into a new
  memory, which is read with the query — repeated until one read-out remains. The decoder then
  answers the query prompt conditioned on that read-out.
* Base model: the whole context in the prompt, then three of the context's facts as demonstrations
  (the three facts after the queried one, cyclically) and the query prompt (3-shot style)::

      Facts:
      {fact 1}
      ...
      {fact s}

      Answer from the facts above.
      {demo 1}
      {demo 2}
      {demo 3}
      {query prompt}

* Cost: ``decoder_tokens_per_query`` (prompt tokens + Larimar's prefix slots + generated tokens),
  ``encoder_tokens`` (Larimar: tokens of the context facts and queries, encoded once) and wall-clock
  seconds (``context_seconds`` for encoding + writing the context once, ``seconds_per_query``).

Output: ``DIR/cases/<method>_n<s>/<query>.json`` (resumable), ``DIR/summary.json``::

    {"sizes", "chunk_size", "n_queries", "results": [{"method", "context_facts", "recall", "n",
      "decoder_tokens_per_query", "encoder_tokens", "context_seconds", "seconds_per_query", "levels"}, ...]}

``DIR/summary.md`` and ``DIR/recall.png`` (recall vs context size).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from larimar.eval.sequential import (
    add_common_arguments,
    contains_answer,
    encode_latents,
    fact_sentence,
    generate_from_latents,
    markdown_table,
    plot_curves,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from larimar.eval.data import EditCase
    from larimar.memory import MemoryState
    from larimar.modeling.model import Larimar

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SIZES",
    "METHODS",
    "add_arguments",
    "context_prompt",
    "hierarchical_read",
    "query_indices",
    "run",
    "run_longctx",
]

DEFAULT_SIZES: tuple[int, ...] = (64, 96, 128, 256)
METHODS: tuple[str, ...] = ("larimar", "base")


def hierarchical_read(
    Z: "torch.Tensor", q: "torch.Tensor", empty: "MemoryState", chunk_size: int
) -> tuple["torch.Tensor", list[int]]:
    """Recursive read through a hierarchy of memories (paper §5.5).

    Args:
        Z: context encodings ``(n, C)``; consecutive chunks of ``chunk_size`` rows go to separate
            memories (level 0, shared by all queries).
        q: query encodings ``(Q, C)``.
        empty: the empty memory every memory of the hierarchy starts from (immutable, reused).
        chunk_size: rows per memory (>= 2).

    Returns:
        ``(z, sizes)``: the final read-out per query ``(Q, C)`` and the number of items per level
        (``[n, ceil(n / chunk), ..., 1]``).
    """
    import torch

    if chunk_size < 2:
        raise ValueError(f"chunk_size must be >= 2, got {chunk_size}")
    if Z.ndim != 2 or q.ndim != 2 or Z.shape[0] < 1:
        raise ValueError(f"expected Z (n, C) with n >= 1 and q (Q, C), got {tuple(Z.shape)} and {tuple(q.shape)}")
    level0 = [empty.write(Z[i : i + chunk_size]) for i in range(0, Z.shape[0], chunk_size)]
    R = torch.stack([m.read(q) for m in level0], dim=1)  # (Q, G, C)
    sizes = [int(Z.shape[0]), int(R.shape[1])]
    while R.shape[1] > 1:
        nxt = []
        for i in range(q.shape[0]):
            qi = q[i : i + 1]
            reads = [empty.write(R[i, g : g + chunk_size]).read(qi)[0] for g in range(0, R.shape[1], chunk_size)]
            nxt.append(torch.stack(reads))
        R = torch.stack(nxt)
        sizes.append(int(R.shape[1]))
    return R[:, 0], sizes


def query_indices(size: int, n: int) -> list[int]:
    """``min(n, size)`` indices evenly spaced over ``range(size)`` (first and last included)."""
    k = min(n, size)
    if k <= 0:
        return []
    if k == 1:
        return [0]
    return sorted({round(i * (size - 1) / (k - 1)) for i in range(k)})


def context_prompt(facts: Sequence[str], demos: Sequence[str], question: str) -> str:
    """The base model's prompt: all facts, then the demonstrations, then the question."""
    return "Facts:\n" + "\n".join(facts) + "\n\nAnswer from the facts above.\n" + "".join(d + "\n" for d in demos) + question


def _demos(texts: Sequence[str], qi: int, k: int = 3) -> list[str]:
    s = len(texts)
    return [texts[(qi + j) % s] for j in range(1, min(k, s - 1) + 1)]


def _n_tokens(tokenizer: Any, texts: Sequence[str], special: bool = True) -> list[int]:
    return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=special)["input_ids"]]


def _load_records(directory: Path, indices: Sequence[int]) -> dict[int, dict[str, Any]]:
    done = {}
    for qi in indices:
        path = directory / f"{qi}.json"
        if path.is_file():
            try:
                rec = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(rec, dict) and rec.get("index") == qi and isinstance(rec.get("recalled"), bool):
                done[qi] = rec
    return done


class _LarimarContext:
    """A context written into level-0 chunk memories once; answers queries by hierarchical read."""

    def __init__(self, model: "Larimar", cases: Sequence["EditCase"], *, chunk_size: int, max_new_tokens: int) -> None:
        self.model, self.cases = model, list(cases)
        self.chunk_size, self.max_new_tokens = chunk_size, max_new_tokens
        texts = [fact_sentence(c) for c in self.cases]
        t0 = time.perf_counter()
        self.Z = model.memory_rows(encode_latents(model, texts))  # (n, memory width): latents alone, no token code
        self.empty = model.empty_memory().state
        self.info = {
            "encoder_tokens": sum(_n_tokens(model.encoder.tokenizer, texts)),
            "context_seconds": time.perf_counter() - t0,
        }

    def answer(self, idx: Sequence[int]) -> list[dict[str, Any]]:
        model, cases = self.model, self.cases
        prompts = [cases[i].prompt for i in idx]
        t0 = time.perf_counter()
        q = model.memory_rows(encode_latents(model, prompts))
        z, sizes = hierarchical_read(self.Z, q, self.empty, self.chunk_size)
        gens = generate_from_latents(model, prompts, z, max_new_tokens=self.max_new_tokens)
        per = (time.perf_counter() - t0) / len(idx)
        q_tok = _n_tokens(model.encoder.tokenizer, prompts)
        d_tok = _n_tokens(model.tokenizer, prompts)
        P = int(model.config.prefix_len)
        out = []
        for i, g, qt, dt in zip(idx, gens, q_tok, d_tok):
            n_new = len(model.tokenizer(g, add_special_tokens=False)["input_ids"])
            out.append({
                "index": i, "prompt": cases[i].prompt, "target": cases[i].target_new, "generation": g,
                "recalled": contains_answer(g, cases[i].target_new), "seconds": per,
                "decoder_tokens": dt + P + n_new, "encoder_tokens": qt, "levels": sizes,
            })
        return out


class _BaseContext:
    """The base decoder with the whole context in its prompt (no truncation)."""

    def __init__(self, model: "Larimar", cases: Sequence["EditCase"], *, max_new_tokens: int) -> None:
        from larimar.eval.editors import make_editor

        self.model, self.cases, self.max_new_tokens = model, list(cases), max_new_tokens
        self.editor = make_editor("unedited", model.decoder, model.tokenizer)
        self.texts = [fact_sentence(c) for c in self.cases]
        self.info = {"encoder_tokens": 0, "context_seconds": 0.0}

    def answer(self, idx: Sequence[int]) -> list[dict[str, Any]]:
        tok, cases = self.model.tokenizer, self.cases
        out = []
        for i in idx:
            prompt = context_prompt(self.texts, _demos(self.texts, i), cases[i].prompt)
            t0 = time.perf_counter()
            g = self.editor.generate([prompt], max_new_tokens=self.max_new_tokens)[0]
            sec = time.perf_counter() - t0
            n_new = len(tok(g, add_special_tokens=False)["input_ids"])
            out.append({
                "index": i, "prompt": cases[i].prompt, "target": cases[i].target_new, "generation": g,
                "recalled": contains_answer(g, cases[i].target_new), "seconds": sec,
                "decoder_tokens": _n_tokens(tok, [prompt])[0] + n_new, "encoder_tokens": 0,
            })
        return out


def longctx_markdown(summary: Mapping[str, Any]) -> str:
    """Markdown table: recall, tokens and time per method and context size."""
    from larimar.eval.report import fmt

    rows = [
        [r["method"], str(r["context_facts"]), str(r["n"]), fmt(100.0 * r["recall"]) if r["recall"] is not None else "-",
         fmt(r["decoder_tokens_per_query"], 0), str(r["encoder_tokens"]), fmt(r["context_seconds"], 2),
         fmt(r["seconds_per_query"], 2), "-" if not r.get("levels") else "→".join(map(str, r["levels"]))]
        for r in summary.get("results", [])
    ]
    head = ["Method", "context facts", "queries", "Recall %", "decoder tokens / query", "encoder tokens",
            "context s", "s / query", "memory levels"]
    return (
        f"# Long input context (chunk size {summary.get('chunk_size')})\n\n"
        "Recall = the greedy answer contains the context's (counterfactual) target.\n\n" + markdown_table(head, rows)
    )


def run_longctx(
    model: "Larimar",
    cases: Sequence["EditCase"],
    out_dir: str | os.PathLike[str],
    *,
    config: Mapping[str, Any],
    sizes: Sequence[int] = DEFAULT_SIZES,
    n: int = 50,
    chunk_size: int = 8,
    methods: Sequence[str] = METHODS,
    max_new_tokens: int = 8,
    batch_size: int = 16,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    plot: bool = True,
) -> dict[str, Any]:
    """Run every (method, context size) point into ``out_dir``; return the summary."""
    from tqdm.auto import tqdm

    from larimar.eval.runner import atomic_write_json, atomic_write_text, prepare_out_dir, seed_everything

    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {list(methods)}")
    out = prepare_out_dir(
        out_dir, config, identity_keys=tuple(k for k in config if k != "batch_size"), force=force,
        results_glob=("cases/*/*.json", "summary.json", "summary.md", "recall.png"),
    )
    results = []
    for size in sorted(set(int(s) for s in sizes)):
        if size > len(cases):
            log.warning("skipping context size %d: only %d usable cases", size, len(cases))
            continue
        ctx = list(cases[:size])
        indices = query_indices(size, n)
        for method in methods:
            directory = out / "cases" / f"{method}_n{size}"
            done = _load_records(directory, indices)
            todo = [i for i in indices if i not in done]
            ctx_file = directory / "context.json"
            if todo:
                seed_everything(seed)
                if method == "larimar":
                    answerer: Any = _LarimarContext(model, ctx, chunk_size=chunk_size, max_new_tokens=max_new_tokens)
                else:
                    answerer = _BaseContext(model, ctx, max_new_tokens=max_new_tokens)
                info = dict(answerer.info)
                if ctx_file.is_file():  # an interrupted earlier run: keep its (first) context cost
                    info = json.loads(ctx_file.read_text(encoding="utf-8"))
                atomic_write_json(ctx_file, info)
                bar = tqdm(total=len(indices), initial=len(done), desc=f"longctx {method} n={size}", unit="query",
                           disable=not progress)
                for b in range(0, len(todo), batch_size):
                    for rec in answerer.answer(todo[b : b + batch_size]):
                        atomic_write_json(directory / f"{rec['index']}.json", rec)
                        done[rec["index"]] = json.loads(json.dumps(rec))
                        bar.update(1)
                bar.close()
            else:
                info = json.loads(ctx_file.read_text(encoding="utf-8")) if ctx_file.is_file() else {}
            recs = [done[i] for i in indices]
            results.append({
                "method": method,
                "context_facts": size,
                "n": len(recs),
                "recall": sum(r["recalled"] for r in recs) / len(recs) if recs else None,
                "decoder_tokens_per_query": sum(r["decoder_tokens"] for r in recs) / len(recs) if recs else None,
                "encoder_tokens": int(info.get("encoder_tokens", 0)) + sum(r["encoder_tokens"] for r in recs),
                "context_seconds": info.get("context_seconds"),
                "seconds_per_query": sum(r["seconds"] for r in recs) / len(recs) if recs else None,
                "levels": recs[0].get("levels") if recs else None,
            })
    summary = {"sizes": sorted(set(int(s) for s in sizes)), "chunk_size": chunk_size, "n_queries": n, "results": results}
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", longctx_markdown(summary))
    if plot and results:
        names = {"larimar": "Larimar (hierarchical memory)", "base": "base model, context in prompt"}
        curves = {names[m]: [[r["context_facts"], 100.0 * r["recall"]] for r in results if r["method"] == m and r["recall"] is not None]
                  for m in methods}
        plot_curves(curves, out / "recall.png", xlabel="facts in the context", ylabel="recall (%)",
                    title="Long input context (CounterFact facts)")
    return summary


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``larimar eval longctx``."""
    add_common_arguments(
        p,
        data_help="CounterFact file (default counterfact-rome)",
        n_default=50,
        n_help="queried facts per context size, evenly spaced (default 50)",
    )
    p.add_argument("--sizes", default="64,96,128,256", help="numbers of facts in the context (default 64,96,128,256)")
    p.add_argument("--chunk-size", type=int, default=8, help="facts (or read-outs) per memory (default 8)")
    p.add_argument("--methods", default="larimar,base", help="comma-separated subset of larimar,base")
    p.add_argument("--max-new-tokens", type=int, default=8, help="greedy tokens per answer (default 8)")
    p.add_argument("--no-plot", action="store_true", help="do not draw recall.png")


def run(args: argparse.Namespace) -> int:
    """``larimar eval longctx``."""
    from larimar.eval.cli import _int_list, describe_model, load_model, resolve_data
    from larimar.eval.data import load_cases
    from larimar.eval.runner import seed_everything, usable_cases

    sizes = _int_list(args.sizes)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    path = resolve_data("counterfact", args.data)
    cases = usable_cases("counterfact", load_cases(path, n=max(sizes)))
    config = {
        "task": "longctx",
        "data": str(path),
        "n": args.n,
        "sizes": sizes,
        "chunk_size": args.chunk_size,
        "methods": methods,
        "max_new_tokens": args.max_new_tokens,
        "model": describe_model(args.model),
        "seed": args.seed,
        "batch_size": args.batch_size,
    }
    seed_everything(args.seed)
    model = load_model(args.model)
    run_longctx(
        model, cases, args.out, config=config, sizes=sizes, n=args.n, chunk_size=args.chunk_size, methods=methods,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed, force=args.force,
        progress=not args.no_progress, plot=not args.no_plot,
    )
    print((Path(args.out) / "summary.md").read_text(encoding="utf-8"))
    print(f"results in {args.out}")
    return 0
