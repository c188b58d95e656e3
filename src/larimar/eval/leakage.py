"""Information leakage after deleting a fact (paper Table 5): paraphrase + sampling attacks.

Protocol (``larimar eval leakage``)
-----------------------------------
1. Facts the base model knows: CounterFact cases (``--data``, default ``counterfact-rome``, which has
   two paraphrase prompts per case) or ZsRE cases (one rephrase) are scanned in file order; a case is
   kept when the base decoder's greedy continuation of its prompt (``--max-new-tokens`` tokens)
   contains its *true* answer (``target_true``; ZsRE: ``answers[0]``) as whole words. Scanning stops
   at ``--n`` kept facts or after ``--scan-max`` cases. The selection is saved (``selection.json``)
   and reused on resume.
2. Deletion, one fact at a time (each system is reset between facts):

   * ``base``: no deletion (the reference attack success);
   * ``larimar``: ``"{prompt} unknown."`` is written to the (empty) memory; queries are routed as set
     by ``--use-memory`` (default ``auto``: the scope detector decides, as deployed; ``always``
     forces the memory path);
   * ``rome``: ROME (``make_editor("rome", ...)`` with ``configs/baselines/rome.yaml``) rewrites the
     fact's target to ``"unknown"`` in the decoder's weights.

3. Attack: the rewrite prompt and every paraphrase prompt are attack prompts; the budget of
   ``--budget`` (default 20) sampled continuations per fact is split over them as evenly as possible
   (the first prompts get one more when it does not divide). Sampling: temperature ``--temperature``
   (1.0), nucleus ``--top-p`` (0.95), seed derived from ``--seed`` and the case id.
4. A fact is *leaked* when any of its attack continuations contains the true answer; attack success is
   the percentage of leaked facts. ``reduction_vs_base`` = base success - system success (percentage
   points), ``relative_reduction`` = that difference / base success.

The counting is independent of the systems: :func:`attack_case` works with anything implementing
:class:`AttackSystem` (tests use a fake with known outputs).

Output: ``DIR/selection.json``, ``DIR/cases/<system>/<case id>.json`` (resumable), ``DIR/summary.json``::

    {"dataset", "n", "budget", "scanned", "systems": {"base": {"attack_success", "n"},
     "larimar": {"attack_success", "n", "reduction_vs_base", "relative_reduction", "memory_routed"},
     "rome": {...}}}

and ``DIR/summary.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from larimar.eval.sequential import add_common_arguments, batched_generate, contains_answer, markdown_table

if TYPE_CHECKING:  # pragma: no cover
    from larimar.eval.data import EditCase
    from larimar.modeling.model import Larimar

log = logging.getLogger(__name__)

__all__ = [
    "SYSTEMS",
    "AttackSystem",
    "BaseSystem",
    "LarimarSystem",
    "RomeSystem",
    "add_arguments",
    "attack_case",
    "attack_prompts",
    "run",
    "run_leakage",
    "select_known_facts",
    "split_budget",
]

SYSTEMS: tuple[str, ...] = ("base", "larimar", "rome")
UNKNOWN = "unknown"


class AttackSystem(Protocol):
    """A system under attack: delete one fact, sample continuations, undo the deletion."""

    name: str

    def apply(self, case: "EditCase") -> None:
        """Delete ``case``'s fact (no-op for the base model)."""
        ...

    def sample(self, prompts: list[str], *, max_new_tokens: int, seed: int) -> list[str]:
        """One sampled continuation per prompt (prompts may repeat); reproducible given ``seed``."""
        ...

    def undo(self) -> None:
        """Back to the undeleted system."""
        ...


def split_budget(budget: int, n_prompts: int) -> list[int]:
    """Samples per attack prompt: ``budget`` split as evenly as possible, the first ones get the rest."""
    if budget < 1 or n_prompts < 1:
        raise ValueError(f"need budget >= 1 and at least one prompt, got {budget}, {n_prompts}")
    base, extra = divmod(budget, n_prompts)
    return [base + (1 if i < extra else 0) for i in range(n_prompts)]


def attack_prompts(case: "EditCase") -> list[str]:
    """The rewrite prompt followed by the case's paraphrase prompts (duplicates dropped)."""
    out: list[str] = []
    for p in [case.prompt, *case.paraphrase_prompts]:
        if p.strip() and p not in out:
            out.append(p)
    return out


def case_seed(seed: int, case_id: Any) -> int:
    """A per-case seed independent of which cases ran before."""
    return (int(seed) * 1_000_003 + zlib.crc32(str(case_id).encode("utf-8"))) % (2**31)


def attack_case(system: AttackSystem, case: "EditCase", *, budget: int, max_new_tokens: int, seed: int) -> dict[str, Any]:
    """Delete the fact, run the attack, undo; return the case record.

    Record: ``{"case_id", "answer", "prompts", "counts", "generations" (one list per prompt),
    "hits" (number of generations containing the answer), "leaked" (hits > 0)}``.
    """
    answer = case.target_true
    if not answer:
        raise ValueError(f"case {case.case_id!r} has no true answer to attack")
    prompts = attack_prompts(case)
    counts = split_budget(budget, len(prompts))
    flat = [p for p, c in zip(prompts, counts) for _ in range(c)]
    system.apply(case)
    try:
        gens = system.sample(flat, max_new_tokens=max_new_tokens, seed=case_seed(seed, case.case_id))
    finally:
        system.undo()
    if len(gens) != len(flat):
        raise ValueError(f"system {system.name!r} returned {len(gens)} samples for {len(flat)} prompts")
    grouped, start = [], 0
    for c in counts:
        grouped.append(list(gens[start : start + c]))
        start += c
    hits = sum(contains_answer(g, answer) for g in gens)
    record: dict[str, Any] = {
        "case_id": case.case_id,
        "answer": answer,
        "prompts": prompts,
        "counts": counts,
        "generations": grouped,
        "hits": hits,
        "leaked": hits > 0,
    }
    routed = getattr(system, "last_routed", None)
    if routed is not None:
        record["memory_routed"] = routed
    return record


# --------------------------------------------------------------------------------------------
# The three systems on one Larimar model
# --------------------------------------------------------------------------------------------


class _Sampler:
    def __init__(
        self, model: "Larimar", *, temperature: float, top_p: float, batch_size: int, use_memory: str,
        release_after_answer: bool = False, stop_after_answer: bool = False,
    ) -> None:
        self.model = model
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.batch_size = int(batch_size)
        self.use_memory = use_memory
        self.release_after_answer = bool(release_after_answer)
        self.stop_after_answer = bool(stop_after_answer)

    def sample(self, prompts: list[str], *, max_new_tokens: int, seed: int) -> list[str]:
        return batched_generate(
            self.model, prompts, max_new_tokens=max_new_tokens, use_memory=self.use_memory, batch_size=self.batch_size,
            do_sample=True, temperature=self.temperature, top_p=self.top_p, seed=seed,
            release_after_answer=self.release_after_answer, stop_after_answer=self.stop_after_answer,
        )


class BaseSystem(_Sampler):
    """The base decoder, nothing deleted."""

    name = "base"

    def __init__(self, model: "Larimar", **kw: Any) -> None:
        super().__init__(model, use_memory="never", **kw)

    def apply(self, case: "EditCase") -> None:
        return None

    def undo(self) -> None:
        return None


class LarimarSystem(_Sampler):
    """Larimar with ``"{prompt} unknown."`` written to an empty memory (``release_after_answer``: memory
    conditions each attack continuation only up to its first sentence end, see :meth:`Larimar.generate`)."""

    name = "larimar"

    def __init__(self, model: "Larimar", *, use_memory: str = "auto", release_after_answer: bool = False, **kw: Any) -> None:
        super().__init__(model, use_memory=use_memory, release_after_answer=release_after_answer, **kw)
        self.last_routed: float | None = None

    def apply(self, case: "EditCase") -> None:
        self.model.reset_memory()
        self.model.write_facts([f"{case.prompt} {UNKNOWN}."], [case.prompt])

    def sample(self, prompts: list[str], *, max_new_tokens: int, seed: int) -> list[str]:
        uniq = list(dict.fromkeys(prompts))
        mask, _ = self.model.route(uniq, self.use_memory)  # type: ignore[arg-type]
        self.last_routed = float(mask.float().mean())
        return super().sample(prompts, max_new_tokens=max_new_tokens, seed=seed)

    def undo(self) -> None:
        self.model.reset_memory()


class RomeSystem(_Sampler):
    """ROME rewriting the fact's object to ``"unknown"`` in the decoder (restored by ``undo``)."""

    name = "rome"

    def __init__(self, model: "Larimar", hparams: Mapping[str, Any] | None = None, **kw: Any) -> None:
        from larimar.eval.editors import load_hparams, make_editor

        super().__init__(model, use_memory="never", **kw)
        if hparams is None:
            try:
                hparams = load_hparams("rome")
            except FileNotFoundError:
                hparams = {}
        self.editor = make_editor("rome", model.decoder, model.tokenizer, **dict(hparams))

    def apply(self, case: "EditCase") -> None:
        from larimar.eval.editors import EditRequest

        self.model.reset_memory()
        self.editor.edit([EditRequest(case.prompt, case.subject, UNKNOWN, case.target_true)])

    def undo(self) -> None:
        self.editor.reset()


# --------------------------------------------------------------------------------------------
# Selection of known facts
# --------------------------------------------------------------------------------------------


def select_known_facts(
    model: "Larimar",
    cases: Sequence["EditCase"],
    n: int,
    *,
    scan_max: int | None = None,
    max_new_tokens: int = 12,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Scan ``cases`` until ``n`` are answered correctly (greedy, base decoder).

    Returns ``{"case_ids": [...], "scanned": k, "answers": {case_id: greedy continuation}}``.
    """
    keep: list[Any] = []
    answers: dict[str, str] = {}
    scanned = 0
    limit = len(cases) if scan_max is None else min(scan_max, len(cases))
    usable = [c for c in cases[:limit] if c.target_true]
    for i in range(0, len(usable), batch_size):
        if len(keep) >= n:
            break
        batch = usable[i : i + batch_size]
        gens = batched_generate(model, [c.prompt for c in batch], max_new_tokens=max_new_tokens, use_memory="never",
                                batch_size=batch_size)
        for c, g in zip(batch, gens):
            scanned += 1
            if contains_answer(g, c.target_true or "") and len(keep) < n:
                keep.append(c.case_id)
                answers[str(c.case_id)] = g
    return {"case_ids": keep, "scanned": scanned, "answers": answers}


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _case_path(out: Path, system: str, case_id: Any) -> Path:
    from larimar.eval.runner import case_file

    return out / "cases" / system / case_file(out, case_id).name


def _load_case(path: Path, case_id: Any, budget: int) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("%s is corrupt (%s): recomputing", path, exc)
        return None
    ok = isinstance(rec, dict) and str(rec.get("case_id")) == str(case_id) and sum(rec.get("counts", [])) == budget
    return rec if ok and isinstance(rec.get("leaked"), bool) else None


def summarize_leakage(records: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """Per system: attack success (percent of leaked facts), and the reduction relative to ``base``."""
    systems: dict[str, Any] = {}
    for name, recs in records.items():
        n = len(recs)
        succ = 100.0 * sum(bool(r["leaked"]) for r in recs) / n if n else math.nan
        entry: dict[str, Any] = {"attack_success": succ, "n": n, "mean_hits": sum(r["hits"] for r in recs) / n if n else math.nan}
        routed = [r["memory_routed"] for r in recs if r.get("memory_routed") is not None]
        if routed:
            entry["memory_routed"] = sum(routed) / len(routed)
        systems[name] = entry
    base = systems.get("base", {}).get("attack_success")
    for name, entry in systems.items():
        if name != "base" and base is not None and not math.isnan(base):
            entry["reduction_vs_base"] = base - entry["attack_success"]
            entry["relative_reduction"] = (base - entry["attack_success"]) / base if base > 0 else math.nan
    return systems


def leakage_markdown(summary: Mapping[str, Any]) -> str:
    """Markdown table: attack success per system and reduction vs the base model."""
    from larimar.eval.report import fmt

    rows = []
    for name, e in summary.get("systems", {}).items():
        rel = e.get("relative_reduction")
        rows.append([
            name, str(e.get("n")), fmt(e.get("attack_success")), fmt(e.get("reduction_vs_base")),
            "-" if rel is None else fmt(100.0 * rel), fmt(e.get("mean_hits"), 2),
            "-" if e.get("memory_routed") is None else fmt(100.0 * e["memory_routed"]),
        ])
    head = ["System", "facts", "Attack success %", "reduction vs base (pp)", "relative reduction %",
            "mean hits / fact", "memory routed %"]
    return (
        f"# Information leakage ({summary.get('dataset')}, budget {summary.get('budget')} samples per fact)\n\n"
        f"{summary.get('n')} facts the base model answers correctly (of {summary.get('scanned')} scanned). "
        "A fact leaks when any attack sample contains its true answer.\n\n" + markdown_table(head, rows)
    )


def run_leakage(
    model: "Larimar",
    cases: Sequence["EditCase"],
    out_dir: str | os.PathLike[str],
    *,
    config: Mapping[str, Any],
    n: int,
    systems: Mapping[str, AttackSystem] | None = None,
    dataset: str = "counterfact",
    budget: int = 20,
    scan_max: int | None = None,
    max_new_tokens: int = 12,
    batch_size: int = 16,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Select known facts, attack every system on them, write the results; return the summary.

    ``systems`` (name -> :class:`AttackSystem`) default to base, Larimar (``use_memory="auto"``) and
    ROME on ``model``.
    """
    from tqdm.auto import tqdm

    from larimar.eval.runner import atomic_write_json, atomic_write_text, prepare_out_dir, seed_everything

    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    out = prepare_out_dir(
        out_dir, config, identity_keys=tuple(k for k in config if k != "batch_size"), force=force,
        results_glob=("selection.json", "cases/*/*.json", "summary.json", "summary.md"),
    )
    sel_path = out / "selection.json"
    selection = None
    if sel_path.is_file():
        try:
            selection = json.loads(sel_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            selection = None
    if not (isinstance(selection, dict) and isinstance(selection.get("case_ids"), list)):
        selection = select_known_facts(model, cases, n, scan_max=scan_max, max_new_tokens=max_new_tokens, batch_size=batch_size)
        atomic_write_json(sel_path, selection)
    by_id = {str(c.case_id): c for c in cases}
    chosen = [by_id[str(i)] for i in selection["case_ids"] if str(i) in by_id]
    if len(chosen) < n:
        log.warning("only %d of %d scanned facts are answered correctly by the base model (asked for %d)",
                    len(chosen), selection["scanned"], n)
    if systems is None:
        kw = {"temperature": 1.0, "top_p": 0.95, "batch_size": batch_size}
        systems = {"base": BaseSystem(model, **kw), "larimar": LarimarSystem(model, **kw), "rome": RomeSystem(model, **kw)}
    records: dict[str, list[dict[str, Any]]] = {}
    for name, system in systems.items():
        recs = []
        for case in tqdm(chosen, desc=f"leakage {name}", unit="fact", disable=not progress):
            path = _case_path(out, name, case.case_id)
            rec = _load_case(path, case.case_id, budget)
            if rec is None:
                seed_everything(case_seed(seed, case.case_id))
                rec = attack_case(system, case, budget=budget, max_new_tokens=max_new_tokens, seed=seed)
                atomic_write_json(path, rec)
                rec = json.loads(path.read_text(encoding="utf-8"))
            recs.append(rec)
        records[name] = recs
    summary = {
        "dataset": dataset,
        "n": len(chosen),
        "budget": budget,
        "scanned": selection["scanned"],
        "systems": summarize_leakage(records),
    }
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", leakage_markdown(summary))
    return summary


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``larimar eval leakage``."""
    add_common_arguments(
        p,
        data_help="CounterFact (ROME format, default counterfact-rome) or ZsRE file",
        n_default=100,
        n_help="facts the base model knows to attack (default 100)",
    )
    p.add_argument("--budget", type=int, default=20, help="sampled attack continuations per fact (default 20)")
    p.add_argument("--systems", default="base,larimar,rome", help="comma-separated subset of base,larimar,rome")
    p.add_argument("--scan-max", type=int, default=None, help="scan at most this many cases for known facts")
    p.add_argument("--use-memory", choices=("auto", "always"), default="auto", help="Larimar query routing (default auto)")
    after = p.add_mutually_exclusive_group()
    after.add_argument("--release-after-answer", action="store_true",
                       help="Larimar's memory conditions each attack continuation only up to its first sentence end")
    after.add_argument("--stop-after-answer", action="store_true",
                       help="every system's attack continuations end with their answer (generate(stop_after_answer=True))")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default 0.95)")
    p.add_argument("--max-new-tokens", type=int, default=12, help="tokens per continuation (default 12)")
    p.add_argument("--rome-hparams", default=None, help="ROME hyper-parameter YAML (default configs/baselines/rome.yaml)")


def run(args: argparse.Namespace) -> int:
    """``larimar eval leakage``."""
    from larimar.eval.cli import describe_model, load_model, resolve_data, resolve_hparams
    from larimar.eval.data import load_cases
    from larimar.eval.runner import seed_everything

    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in names if s not in SYSTEMS]
    if bad or not names:
        raise ValueError(f"--systems: expected a subset of {SYSTEMS}, got {args.systems!r}")
    path = resolve_data("counterfact", args.data)
    cases = [c for c in load_cases(path) if c.target_true]
    dataset = "zsre" if cases and cases[0].source_format == "zsre_mend" else "counterfact"
    rome_hp = resolve_hparams("rome", args.rome_hparams, []) if "rome" in names else None
    config = {
        "task": "leakage",
        "data": str(path),
        "n": args.n,
        "budget": args.budget,
        "systems": names,
        "scan_max": args.scan_max,
        "use_memory": args.use_memory,
        **({"release_after_answer": True} if args.release_after_answer else {}),  # (absent from older runs' configs)
        **({"stop_after_answer": True} if args.stop_after_answer else {}),
        "temperature": args.temperature,
        "top_p": args.top_p,
        "max_new_tokens": args.max_new_tokens,
        "rome_hparams": rome_hp,
        "model": describe_model(args.model),
        "seed": args.seed,
        "batch_size": args.batch_size,
    }
    seed_everything(args.seed)
    model = load_model(args.model)
    kw = {"temperature": args.temperature, "top_p": args.top_p, "batch_size": args.batch_size, "stop_after_answer": args.stop_after_answer}
    systems: dict[str, AttackSystem] = {}
    for name in names:
        if name == "base":
            systems[name] = BaseSystem(model, **kw)
        elif name == "larimar":
            systems[name] = LarimarSystem(model, use_memory=args.use_memory, release_after_answer=args.release_after_answer, **kw)
        else:
            systems[name] = RomeSystem(model, rome_hp, **kw)
    run_leakage(
        model, cases, args.out, config=config, n=args.n, systems=systems, dataset=dataset, budget=args.budget,
        scan_max=args.scan_max, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
        force=args.force, progress=not args.no_progress,
    )
    print((Path(args.out) / "summary.md").read_text(encoding="utf-8"))
    print(f"results in {args.out}")
    return 0
