"""Selective forgetting (paper Table 4): write N facts, forget one, check what is still recalled.

Protocol (``larimar eval forget``)
----------------------------------
For each data set (CounterFact, ZsRE) and each ``N`` of ``--sizes`` (default ``1,K,2K`` with ``K`` the
model's memory size, ``--memory-size`` to change it):

1. Larimar's memory is emptied and the first ``N`` usable cases are written in *one* episode as
   ``"{prompt} {target_new}."`` (one-shot batch write). The memory is the model's own (pseudo-inverse
   addressing against the trained M0), or with ``--addressing gaussian`` a memory of *key slots*:
   Gaussian addressing against the encodings of the first ``K`` prompts of the data
   (:class:`larimar.eval.sequential.MemoryOptions`), so that each of up to ``K`` facts has a slot of
   its own.
2. ``--n`` facts (default 5, at most ``N``) are chosen with a fixed seed as the facts to forget, and
   a fixed sample of at most ``--retained-max`` (default 100) of the other ``N - 1`` facts as the
   retained facts to check. Before anything is forgotten their recall is measured (``recall_before``,
   ``retained_recall_before``), so a low recall after forgetting can be told apart from a fact that
   was never recalled in the first place.
3. For each fact to forget, starting from the memory of step 1 each time: the fact is removed exactly
   (``alpha = -1`` with the latent it was written with, :meth:`Larimar.forget`) and
   ``"{prompt} unknown."`` is written in its place. Then the forgotten fact's prompt and the retained
   facts' prompts are answered.

Recall of a fact: the greedy generation (``--max-new-tokens``, default 12) *contains* its
``target_new`` as whole words after SQuAD normalisation
(:func:`larimar.eval.sequential.contains_answer`). ``forgotten_recall`` is the fraction of forgotten
facts still recalled (lower is better), ``retained_recall`` the mean recall of the retained sample
(higher is better; ``None`` when ``N = 1``), ``forgotten_says_unknown`` the fraction of forgotten facts
answered with "unknown". Queries read memory (``--use-memory always``, default) or go through the
scope detector (``auto``).

In-context baseline (``--icl``, on by default): the base decoder gets the facts in its prompt,
followed by an instruction to forget one of them, then the question::

    Facts:
    {fact 1}
    ...
    Forget this fact and answer "unknown" to any question about it: {forgotten fact}

    {question}

The context holds the forgotten fact and the retained sample first, then the other facts, in their
original order, up to ``--icl-max-tokens`` tokens (the facts that fit are counted in
``facts_in_context``); at most ``--icl-retained-max`` retained facts are queried (long prompts are
slow on a CPU). ``recall_before`` for this baseline uses the same context without the instruction.

Output: ``DIR/results/<method>_<dataset>_N<N>.json`` per point (resumable), ``DIR/summary.json``::

    {"runs": [{"method", "dataset", "N", "K", "forgotten_recall", "retained_recall",
               "recall_before", "retained_recall_before", "forgotten_says_unknown", "trials",
               "n_retained", ...}, ...]}

and ``DIR/summary.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from larimar.eval.sequential import (
    MemoryOptions,
    add_common_arguments,
    add_memory_arguments,
    batched_generate,
    contains_answer,
    fact_sentence,
    markdown_table,
    memory_options,
)

if TYPE_CHECKING:  # pragma: no cover
    from larimar.eval.data import EditCase
    from larimar.modeling.model import Larimar

log = logging.getLogger(__name__)

__all__ = [
    "ICL_INSTRUCTION",
    "add_arguments",
    "forget_sentence",
    "icl_prompt",
    "larimar_point",
    "icl_point",
    "parse_sizes",
    "run",
    "run_forget",
]

#: The in-context forgetting instruction ({fact} is the fact sentence to forget).
ICL_INSTRUCTION = 'Forget this fact and answer "unknown" to any question about it: {fact}'
UNKNOWN = "unknown"


def forget_sentence(case: "EditCase") -> str:
    """What replaces a forgotten fact: ``"{prompt} unknown."``."""
    return f"{case.prompt} {UNKNOWN}."


def parse_sizes(text: str, K: int) -> list[int]:
    """``"1,K,2K,100"`` -> ``[1, K, 2K, 100]`` (``K`` = the memory size); sorted, unique."""
    out = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        if item.upper().endswith("K"):
            factor = item[:-1]
            value = K * (int(factor) if factor else 1)
        else:
            value = int(item)
        if value < 1:
            raise ValueError(f"sizes must be positive, got {item!r}")
        out.append(value)
    if not out:
        raise ValueError(f"no sizes in {text!r}")
    return sorted(set(out))


def _choose(N: int, trials: int, retained_max: int, seed: int) -> tuple[list[int], list[int]]:
    rng = random.Random(seed * 1_000_003 + N)
    forgotten = sorted(rng.sample(range(N), min(trials, N)))
    chosen = set(forgotten)
    rest = [i for i in range(N) if i not in chosen]
    retained = sorted(rng.sample(rest, min(retained_max, len(rest))))
    return forgotten, retained


def _rate(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _mean_opt(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def larimar_point(
    model: "Larimar",
    cases: Sequence["EditCase"],
    N: int,
    *,
    trials: int,
    retained_max: int,
    max_new_tokens: int = 12,
    use_memory: str = "always",
    batch_size: int = 16,
    seed: int = 0,
    memory: "MemoryOptions | None" = None,
) -> dict[str, Any]:
    """Write ``cases[:N]`` at once, then for each of ``trials`` facts: forget it exactly, write
    ``"{prompt} unknown."`` and measure recall (see the module docstring). Returns the point record.

    ``memory``: the default (``None`` or pseudo-inverse addressing) is the model's own empty memory
    (reference M0). With key slots (``MemoryOptions(addressing="gaussian")``) it is
    :meth:`Larimar.key_slot_memory` over the prompts of the first ``K`` of *all* ``cases``, so the
    reference does not depend on ``N``.
    """
    slots = memory is not None and memory.key_slots
    all_prompts = [c.prompt for c in cases]
    cases = list(cases[:N])
    if len(cases) < N:
        raise ValueError(f"N={N} needs {N} cases, got {len(cases)}")
    texts = [fact_sentence(c) for c in cases]
    forgotten, retained = _choose(N, trials, retained_max, seed)

    def recall(prompts_idx: Sequence[int]) -> list[str]:
        return batched_generate(
            model, [cases[i].prompt for i in prompts_idx], max_new_tokens=max_new_tokens, use_memory=use_memory,
            batch_size=batch_size,
        )

    if slots:
        model.facts = model.key_slot_memory(all_prompts, gaussian_alpha=memory.gaussian_alpha, ridge=memory.ridge_for(model))
    else:
        model.reset_memory()
    t0 = time.perf_counter()
    model.write_facts(texts, [c.prompt for c in cases])
    write_seconds = time.perf_counter() - t0
    written = model.facts
    before = recall(forgotten + retained)
    f_before = [contains_answer(g, cases[i].target_new) for g, i in zip(before, forgotten)]
    r_before = [contains_answer(g, cases[i].target_new) for g, i in zip(before[len(forgotten) :], retained)]
    per_trial = []
    forget_seconds = []
    for j in forgotten:
        model.facts = written
        t0 = time.perf_counter()
        model.forget([texts[j]])
        model.write_facts([forget_sentence(cases[j])], [cases[j].prompt])
        forget_seconds.append(time.perf_counter() - t0)
        gens = recall([j] + retained)
        kept = [contains_answer(g, cases[i].target_new) for g, i in zip(gens[1:], retained)]
        per_trial.append(
            {
                "index": j,
                "case_id": cases[j].case_id,
                "prompt": cases[j].prompt,
                "target": cases[j].target_new,
                "generation": gens[0],
                "recalled": contains_answer(gens[0], cases[j].target_new),
                "says_unknown": contains_answer(gens[0], UNKNOWN),
                "retained_recall": _rate(kept),
                "retained_examples": [
                    {"prompt": cases[i].prompt, "target": cases[i].target_new, "generation": g}
                    for g, i in list(zip(gens[1:], retained))[:3]
                ],
            }
        )
    model.reset_memory()
    return {
        "method": "larimar",
        "N": N,
        "K": int(model.config.memory_size),
        "forgotten_recall": _rate([t["recalled"] for t in per_trial]),
        "retained_recall": _mean_opt([t["retained_recall"] for t in per_trial]),
        "recall_before": _rate(f_before),
        "retained_recall_before": _rate(r_before),
        "forgotten_says_unknown": _rate([t["says_unknown"] for t in per_trial]),
        "trials": len(per_trial),
        "n_retained": len(retained),
        "write_seconds": write_seconds,
        "forget_seconds": _mean_opt(forget_seconds),
        "per_trial": per_trial,
        # every retained fact missed before anything was forgotten: a miss of the full memory, not of forgetting
        "retained_misses_before": [
            {"prompt": cases[i].prompt, "target": cases[i].target_new, "generation": g}
            for g, i, ok in zip(before[len(forgotten) :], retained, r_before)
            if not ok
        ],
    }


def icl_prompt(facts: Sequence[str], question: str, forget: str | None = None) -> str:
    """The in-context prompt: the facts, optionally the forgetting instruction, then the question."""
    text = "Facts:\n" + "\n".join(facts) + "\n"
    if forget is not None:
        text += ICL_INSTRUCTION.format(fact=forget) + "\n"
    return text + "\n" + question


def icl_point(
    model: "Larimar",
    cases: Sequence["EditCase"],
    N: int,
    *,
    trials: int,
    retained_max: int,
    icl_retained_max: int = 20,
    icl_max_tokens: int = 2048,
    max_new_tokens: int = 12,
    seed: int = 0,
) -> dict[str, Any]:
    """The in-context forgetting baseline on the base decoder (see the module docstring)."""
    from larimar.eval.editors import make_editor

    cases = list(cases[:N])
    if len(cases) < N:
        raise ValueError(f"N={N} needs {N} cases, got {len(cases)}")
    texts = [fact_sentence(c) for c in cases]
    forgotten, retained = _choose(N, trials, retained_max, seed)
    base = make_editor("unedited", model.decoder, model.tokenizer)
    tok = model.tokenizer
    lengths = [len(tok(t + "\n", add_special_tokens=False)["input_ids"]) for t in texts]
    retained_set = set(retained)
    per_trial = []
    t_all = time.perf_counter()
    in_context_counts = []
    for j in forgotten:
        # the forgotten fact appears twice (context + instruction); 64 tokens for instruction + question
        used = 2 * lengths[j] + 64
        keep_set = {j}
        for i in [i for i in retained if i != j] + [i for i in range(N) if i != j and i not in retained_set]:
            if used + lengths[i] <= icl_max_tokens:
                keep_set.add(i)
                used += lengths[i]
        ctx = [texts[i] for i in sorted(keep_set)]
        queried = [i for i in retained if i in keep_set][:icl_retained_max]
        q_idx = [j] + queried
        before = base.generate([icl_prompt(ctx, cases[i].prompt) for i in q_idx], max_new_tokens=max_new_tokens)
        after = base.generate(
            [icl_prompt(ctx, cases[i].prompt, forget=texts[j]) for i in q_idx], max_new_tokens=max_new_tokens
        )
        in_context_counts.append(len(ctx))
        per_trial.append(
            {
                "index": j,
                "case_id": cases[j].case_id,
                "prompt": cases[j].prompt,
                "target": cases[j].target_new,
                "generation_before": before[0],
                "generation": after[0],
                "recalled_before": contains_answer(before[0], cases[j].target_new),
                "recalled": contains_answer(after[0], cases[j].target_new),
                "says_unknown": contains_answer(after[0], UNKNOWN),
                "retained_recall_before": _rate([contains_answer(g, cases[i].target_new) for g, i in zip(before[1:], queried)]),
                "retained_recall": _rate([contains_answer(g, cases[i].target_new) for g, i in zip(after[1:], queried)]),
                "n_retained": len(queried),
                "facts_in_context": len(ctx),
            }
        )
    return {
        "method": "icl",
        "N": N,
        "K": None,
        "forgotten_recall": _rate([t["recalled"] for t in per_trial]),
        "retained_recall": _mean_opt([t["retained_recall"] for t in per_trial]),
        "recall_before": _rate([t["recalled_before"] for t in per_trial]),
        "retained_recall_before": _mean_opt([t["retained_recall_before"] for t in per_trial]),
        "forgotten_says_unknown": _rate([t["says_unknown"] for t in per_trial]),
        "trials": len(per_trial),
        "n_retained": min((t["n_retained"] for t in per_trial), default=0),
        "facts_in_context": min(in_context_counts, default=0),
        "seconds": time.perf_counter() - t_all,
        "per_trial": per_trial,
    }


def _point_file(out: Path, method: str, dataset: str, N: int) -> Path:
    return out / "results" / f"{method}_{dataset}_N{N}.json"


def _load_point(path: Path, method: str, dataset: str, N: int) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("%s is corrupt (%s): recomputing", path, exc)
        return None
    if isinstance(rec, dict) and (rec.get("method"), rec.get("dataset"), rec.get("N")) == (method, dataset, N):
        return rec
    return None


RUN_KEYS = (
    "method", "dataset", "N", "K", "forgotten_recall", "retained_recall", "recall_before",
    "retained_recall_before", "forgotten_says_unknown", "trials", "n_retained",
)


def _run_entry(rec: Mapping[str, Any]) -> dict[str, Any]:
    entry = {k: rec.get(k) for k in RUN_KEYS}
    if "facts_in_context" in rec:
        entry["facts_in_context"] = rec["facts_in_context"]
    return entry


def forget_markdown(summary: Mapping[str, Any]) -> str:
    """Markdown table of the runs (recalls in percent)."""
    from larimar.eval.report import fmt

    def pct(v: Any) -> str:
        return "-" if v is None else fmt(100.0 * float(v))

    rows = [
        [
            r["method"], r["dataset"], str(r["N"]), "-" if r.get("K") is None else str(r["K"]),
            pct(r.get("recall_before")), pct(r.get("forgotten_recall")), pct(r.get("forgotten_says_unknown")),
            pct(r.get("retained_recall_before")), pct(r.get("retained_recall")), str(r.get("trials")),
            str(r.get("n_retained")),
        ]
        for r in summary.get("runs", [])
    ]
    head = ["Method", "Data", "N", "K", "Forgotten: recall before %", "recall after %", "says unknown %",
            "Retained: recall before %", "recall after %", "facts forgotten", "retained checked"]
    return (
        "# Selective forgetting\n\nRecall = greedy answer contains the written target. After forgetting, "
        "the forgotten fact should not be recalled and the retained ones should be.\n\n" + markdown_table(head, rows)
    )


def run_forget(
    model: "Larimar",
    datasets: Mapping[str, Sequence["EditCase"]],
    out_dir: str | os.PathLike[str],
    *,
    config: Mapping[str, Any],
    sizes: Sequence[int],
    trials: int = 5,
    retained_max: int = 100,
    icl: bool = True,
    icl_retained_max: int = 20,
    icl_max_tokens: int = 2048,
    max_new_tokens: int = 12,
    use_memory: str = "always",
    batch_size: int = 16,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    memory: MemoryOptions | None = None,
) -> dict[str, Any]:
    """Run every (method, data set, N) point into ``out_dir``; return ``{"runs": [...]}``.
    ``memory``: Larimar's addressing (see :func:`larimar_point`)."""
    from tqdm.auto import tqdm

    from larimar.eval.runner import atomic_write_json, atomic_write_text, prepare_out_dir, seed_everything

    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    out = prepare_out_dir(
        out_dir, config, identity_keys=tuple(k for k in config if k != "batch_size"), force=force,
        results_glob=("results/*.json", "summary.json", "summary.md"),
    )
    methods = ["larimar"] + (["icl"] if icl else [])
    grid = []
    for name, cases in datasets.items():
        for N in sorted(set(sizes)):
            if N > len(cases):
                log.warning("%s: skipping N=%d (only %d usable cases)", name, N, len(cases))
                continue
            grid += [(m, name, N) for m in methods]
    runs = []
    for method, name, N in tqdm(grid, desc="forget", unit="point", disable=not progress):
        path = _point_file(out, method, name, N)
        rec = _load_point(path, method, name, N)
        if rec is None:
            seed_everything(seed)
            if method == "larimar":
                rec = larimar_point(model, datasets[name], N, trials=trials, retained_max=retained_max,
                                    max_new_tokens=max_new_tokens, use_memory=use_memory, batch_size=batch_size, seed=seed,
                                    memory=memory)
            else:
                rec = icl_point(model, datasets[name], N, trials=trials, retained_max=retained_max,
                                icl_retained_max=icl_retained_max, icl_max_tokens=icl_max_tokens,
                                max_new_tokens=max_new_tokens, seed=seed)
            rec = {"dataset": name, **rec}
            atomic_write_json(path, rec)
        runs.append(rec)
    summary = {"runs": [_run_entry(r) for r in runs]}
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", forget_markdown(summary))
    return summary


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``larimar eval forget``."""
    add_common_arguments(
        p,
        data_help="CounterFact file (default counterfact-edit)",
        n_default=5,
        n_help="facts forgotten per (data set, N) point, each from a fresh copy of the N-fact memory (default 5)",
    )
    p.add_argument("--zsre-data", default="zsre-eval", help="ZsRE file (default zsre-eval, topped up from --zsre-extra)")
    p.add_argument("--zsre-extra", default="zsre-train", help="ZsRE file to top up to the largest N (default zsre-train)")
    p.add_argument("--datasets", default="counterfact,zsre", help="comma-separated: counterfact,zsre (default both)")
    p.add_argument("--sizes", default="1,K,2K", help="numbers of facts written, K = memory size (default 1,K,2K)")
    p.add_argument("--memory-size", type=int, default=None, help="K (default: the model's)")
    add_memory_arguments(p)
    p.add_argument("--retained-max", type=int, default=100, help="retained facts checked per point (default 100)")
    p.add_argument("--use-memory", choices=("always", "auto"), default="always", help="Larimar query routing (default always)")
    p.add_argument("--no-icl", action="store_true", help="skip the in-context forgetting baseline")
    p.add_argument("--icl-retained-max", type=int, default=20, help="retained facts queried by the ICL baseline (default 20)")
    p.add_argument("--icl-max-tokens", type=int, default=2048, help="token budget of the ICL context (default 2048)")
    p.add_argument("--max-new-tokens", type=int, default=12, help="greedy tokens per answer (default 12)")


def run(args: argparse.Namespace) -> int:
    """``larimar eval forget``."""
    from larimar.eval.cli import describe_model, load_model, resolve_data
    from larimar.eval.data import load_cases
    from larimar.eval.larimar_editor import set_memory_size
    from larimar.eval.runner import seed_everything, usable_cases
    from larimar.eval.sequential import load_sequential_cases

    names = [d.strip() for d in args.datasets.split(",") if d.strip()]
    bad = [d for d in names if d not in ("counterfact", "zsre")]
    if bad or not names:
        raise ValueError(f"--datasets: expected a subset of counterfact,zsre, got {args.datasets!r}")
    seed_everything(args.seed)
    model = load_model(args.model)
    if args.memory_size is not None:
        set_memory_size(model, args.memory_size)
    K = int(model.config.memory_size)
    memory = memory_options(args)
    sizes = parse_sizes(args.sizes, K)
    datasets: dict[str, list[Any]] = {}
    files: dict[str, Any] = {}
    if "counterfact" in names:
        path = resolve_data("batch", args.data)  # default counterfact-edit
        datasets["counterfact"] = usable_cases("counterfact", load_cases(path, n=max(sizes)))
        files["counterfact"] = str(path)
    if "zsre" in names:
        zpath = resolve_data("zsre", args.zsre_data)
        zextra = resolve_data("zsre", args.zsre_extra) if args.zsre_extra else None
        datasets["zsre"] = load_sequential_cases(zpath, zextra, max(sizes))
        files["zsre"] = [str(zpath), str(zextra) if zextra else None]
    config = {
        "task": "forget",
        "data": files,
        "sizes": sizes,
        "K": K,
        "trials": args.n,
        "retained_max": args.retained_max,
        "use_memory": args.use_memory,
        "icl": not args.no_icl,
        "icl_retained_max": args.icl_retained_max,
        "icl_max_tokens": args.icl_max_tokens,
        "max_new_tokens": args.max_new_tokens,
        **memory.describe(model),
        "model": describe_model(args.model),
        "seed": args.seed,
        "batch_size": args.batch_size,
    }
    run_forget(
        model, datasets, args.out, config=config, sizes=sizes, trials=args.n, retained_max=args.retained_max,
        icl=not args.no_icl, icl_retained_max=args.icl_retained_max, icl_max_tokens=args.icl_max_tokens,
        max_new_tokens=args.max_new_tokens, use_memory=args.use_memory, batch_size=args.batch_size,
        seed=args.seed, force=args.force, progress=not args.no_progress, memory=memory,
    )
    print((Path(args.out) / "summary.md").read_text(encoding="utf-8"))
    print(f"results in {args.out}")
    return 0
