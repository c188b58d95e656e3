"""``larimar eval``: knowledge-editing evaluation of Larimar and the baselines.

Sub-commands::

    larimar eval counterfact --method M --out DIR [--data PATH] [--n N] [--start S] [--hparams YAML]
                             [--model PATH] [--seed 0] [--batch-size B] [--set key=value ...] [--force]
    larimar eval zsre        (same options)
    larimar eval batch       --out DIR [--sizes 1,16,...] [--memory-sizes 256,512,1024] [--eval-n 200] ...
    larimar eval timing      --out DIR [--methods larimar rome ...] [--n 10]
    larimar eval report      DIR [DIR ...]          (one table over several runs)

The paper's other experiments (each: ``--data PATH --n N --out DIR``, resumable, summary.json +
summary.md, a PNG where there is a curve; see the modules for the protocols and options)::

    larimar eval sequential  Table 3: ZsRE facts written one by one, edit retention vs writes (+ GRACE)
    larimar eval rephrase    Figs. 2b/5, Table 14: PARAREL phrasings, pseudo-inverse vs Gaussian addressing
    larimar eval forget      Table 4: write N facts, forget one, recall of the forgotten / retained facts
    larimar eval leakage     Table 5: paraphrase + sampling attacks after "unknown" edits (+ ROME)
    larimar eval longctx     Table 6: facts in a hierarchy of chunk memories vs the whole context in the prompt
    larimar eval robustness  Fig. 6: edit success and generation perplexity vs read-time noise sigma_W
    larimar eval modelcard   reconstruction from memory (1, 16, K items) and empty-memory perplexity

Every method runs on the same base model: the decoder of the Larimar model loaded from ``--model``
(default: the adapter shipped with the package, else an untrained one). Larimar variants are chosen
with ``--set``: ``scope_detector=false``, ``n_rephrases=2`` (one paraphrase and one PARAREL
rephrasing written, the other paraphrase queried), ``addressing=gaussian``,
``scope_threshold=0.5``, ``memory_size=1024``, ``keyed_writes=false`` (the paper's write),
``value_writes=false`` (keyed writes of whole facts). Values of ``--set`` are parsed as YAML scalars.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

from larimar.modeling.config import MODEL_HELP

__all__ = ["add_arguments", "run"]

log = logging.getLogger(__name__)

#: experiment sub-commands living in their own modules: name -> (module, help). Each module has
#: ``add_arguments(parser)`` and ``run(args) -> int`` and imports nothing heavy at import time.
_EXPERIMENTS: dict[str, tuple[str, str]] = {
    "sequential": ("larimar.eval.sequential", "Table 3: sequential ZsRE edits, edit retention vs writes (+ GRACE)"),
    "rephrase": ("larimar.eval.rephrase", "Figs. 2b/5: PARAREL phrasings, pseudo-inverse vs Gaussian addressing"),
    "forget": ("larimar.eval.forget", "Table 4: selective forgetting of one of N written facts"),
    "leakage": ("larimar.eval.leakage", "Table 5: information leakage after 'unknown' edits (+ ROME)"),
    "longctx": ("larimar.eval.longctx", "Table 6: long input context through hierarchical memory read"),
    "robustness": ("larimar.eval.robustness", "Fig. 6: edit success and perplexity vs read noise sigma_W"),
    "modelcard": ("larimar.eval.modelcard", "model card: reconstruction from memory with 1/16/K items, empty-memory perplexity"),
}

_DEFAULT_DATA = {"counterfact": "counterfact-rome", "zsre": "zsre-eval", "batch": "counterfact-edit", "timing": "counterfact-rome"}


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _common(p: argparse.ArgumentParser, *, method_default: str | None = "larimar") -> None:
    p.add_argument("--out", required=True, help="output directory (resumable)")
    p.add_argument("--data", default=None, help="data file, or a short name such as counterfact-rome (default per task)")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per forward pass when scoring")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    if method_default is not None:
        p.add_argument("--method", default=method_default, help=f"editing method (default {method_default})")
        p.add_argument("--hparams", default=None, help="YAML file (or directory) of the method's hyper-parameters")
        p.add_argument(
            "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="override a hyper-parameter (repeatable)"
        )
        p.add_argument("--force", action="store_true", help="discard results in --out made with another configuration")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``counterfact``, ``zsre``, ``batch``, ``timing``, ``report`` and experiment sub-commands."""
    sub = parser.add_subparsers(dest="eval_command", metavar="TASK")
    sub.required = True
    for task, help_text in (
        ("counterfact", "single-edit CounterFact evaluation (ROME metrics: edit success, paraphrase, neighbourhood)"),
        ("zsre", "single-edit ZsRE evaluation (teacher-forced token accuracy)"),
    ):
        p = sub.add_parser(task, help=help_text, description=help_text)
        _common(p)
        p.add_argument("--n", type=int, default=None, help="number of cases (default: all)")
        p.add_argument("--start", type=int, default=0, help="index of the first case")
    p = sub.add_parser("batch", help="write N facts at once; accuracy vs N per memory size K (Figs. 2a, 3, 4)")
    _common(p)
    p.add_argument("--sizes", type=_int_list, default=None, help="numbers of facts N (default 1,16,64,...,4096)")
    p.add_argument("--memory-sizes", type=_int_list, default=None, help="memory sizes K for Larimar (default 256,512,1024)")
    p.add_argument("--eval-n", type=int, default=200, help="evaluate the first min(eval_n, N) written facts (default 200)")
    p.add_argument("--no-plot", action="store_true", help="do not draw batch.png")
    p = sub.add_parser("timing", help="median seconds per edit of every method on the same edits")
    _common(p, method_default=None)
    p.add_argument("--methods", nargs="+", default=None, help="methods to time (default: all registered)")
    p.add_argument("--n", type=int, default=10, help="number of edits (default 10)")
    p.add_argument("--hparams-dir", default=None, help="directory with <method>.yaml hyper-parameter files")
    for name, (module, help_text) in _EXPERIMENTS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            importlib.import_module(module).add_arguments(p)
        except ImportError as exc:  # one missing experiment must not break the other sub-commands
            p.set_defaults(_unavailable=f"{module} cannot be imported ({exc})")
    p = sub.add_parser("report", help="one Markdown table over several runs' summary.json")
    p.add_argument("runs", nargs="+", help="run directories or summary.json files")
    p.add_argument("--out", default=None, help="write the table to this file as well")


# --------------------------------------------------------------------------------------------
# Helpers (importable, used by the tests)
# --------------------------------------------------------------------------------------------


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["a=1", "b=false", "c=gaussian"]`` -> ``{"a": 1, "b": False, "c": "gaussian"}`` (YAML scalars)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        try:
            out[key] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as exc:
            raise ValueError(f"--set {item!r}: cannot parse the value ({exc})") from None
    return out


def resolve_hparams(method: str, path: str | None, sets: list[str]) -> dict[str, Any]:
    """The method's hyper-parameters: ``path`` (or ``configs/baselines/<method>.yaml`` when it exists,
    else none), updated with ``--set`` overrides."""
    from larimar.eval.editors import load_hparams

    if path is not None:
        hp = load_hparams(method, path)
    else:
        try:
            hp = load_hparams(method)
        except FileNotFoundError:
            hp = {}
    hp.update(parse_sets(sets))
    return hp


def resolve_data(task: str, data: str | None) -> Path:
    """An existing file path, a short name of :data:`larimar.eval.data.DATASET_FILES`, or the task's default."""
    from larimar.eval.data import DATASET_FILES, data_path

    name = data or _DEFAULT_DATA[task]
    p = Path(name).expanduser()
    if p.is_file():
        return p.resolve()
    if name in DATASET_FILES:
        return data_path(name).resolve()
    raise FileNotFoundError(f"data file not found: {name} (give a path or one of {sorted(DATASET_FILES)})")


def describe_model(path: str | None) -> dict[str, Any]:
    """What identifies the model of a run, without loading it: directory and its LarimarConfig."""
    from larimar.modeling.config import LarimarConfig
    from larimar.modeling.model import CONFIG_FILE, adapter_dir

    directory = adapter_dir(path)
    cfg_file = directory / CONFIG_FILE
    if cfg_file.is_file():
        return {"path": str(directory.resolve()), "config": json.loads(cfg_file.read_text(encoding="utf-8"))}
    if path is not None:
        raise FileNotFoundError(f"{directory}: no {CONFIG_FILE} (not a saved Larimar model)")
    return {"path": None, "untrained": True, "config": LarimarConfig().to_dict()}


def load_model(path: str | None) -> Any:
    """``Larimar.from_pretrained(path)`` in eval mode."""
    from larimar.modeling.model import Larimar

    model = Larimar.from_pretrained(path)
    model.eval()
    return model


def build_editor(method: str, larimar: Any, hparams: dict[str, Any], batch_size: int | None = None) -> Any:
    """The editor ``method`` on the Larimar model (``larimar``) or on its decoder (every baseline)."""
    from larimar.eval import larimar_editor  # noqa: F401 - registers "larimar"
    from larimar.eval.editors import make_editor

    hp = dict(hparams)
    if batch_size is not None:
        hp.setdefault("score_batch_size", int(batch_size))
    if method == "larimar":
        return make_editor("larimar", larimar, larimar.tokenizer, **hp)
    return make_editor(method, larimar.decoder, larimar.tokenizer, **hp)


def _config(args: argparse.Namespace, task: str, data: Path, hparams: dict[str, Any], **extra: Any) -> dict[str, Any]:
    cfg = {
        "task": task,
        "method": args.method,
        "data": str(data),
        "hparams": hparams,
        "model": describe_model(args.model),
        "seed": int(args.seed),
        "batch_size": args.batch_size,
    }
    cfg.update(extra)
    return cfg


def with_synthetic_rephrases(cases: list[Any], hparams: dict[str, Any], seed: int) -> tuple[list[Any], dict[str, Any]]:
    """For ``n_rephrases >= 2`` (the paper's "+2" rows): the cases with PARAREL rephrasings attached
    (:func:`larimar.eval.data.with_pararel_rephrases`), and the config entry that records it.
    Otherwise the cases unchanged and no entry."""
    from larimar.eval.data import load_pararel, with_pararel_rephrases

    if int(hparams.get("n_rephrases", 0) or 0) < 2:
        return cases, {}
    relations = load_pararel()
    with_synth = with_pararel_rephrases(cases, relations, seed=seed)
    covered = sum(1 for c in with_synth if c.extra["synthetic_rephrases"])
    log.info("synthetic PARAREL rephrasings for %d of %d cases (the others: no pattern of their relation left)",
             covered, len(cases))
    return with_synth, {"synthetic_rephrases": "pararel"}


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def _run_single(args: argparse.Namespace, task: str) -> int:
    from larimar.eval.data import load_cases
    from larimar.eval.report import summary_markdown
    from larimar.eval.runner import run_cases, seed_everything

    data = resolve_data(task, args.data)
    hparams = resolve_hparams(args.method, args.hparams, args.sets)
    cases, synth = with_synthetic_rephrases(load_cases(data, n=args.n, start=args.start), hparams, args.seed)
    config = _config(args, task, data, hparams, n=args.n, start=args.start, **synth)
    seed_everything(args.seed)
    larimar = load_model(args.model)
    editor = build_editor(args.method, larimar, hparams, args.batch_size)
    summary = run_cases(
        task, editor, cases, args.out, config=config, method=args.method, seed=args.seed, force=args.force,
        progress=not args.no_progress,
    )
    print(summary_markdown(task, summary))
    print(f"results in {args.out}")
    return 0


def _run_batch(args: argparse.Namespace) -> int:
    from larimar.eval.batch import DEFAULT_MEMORY_SIZES, DEFAULT_SIZES, run_batch
    from larimar.eval.data import load_cases
    from larimar.eval.report import batch_markdown
    from larimar.eval.runner import seed_everything

    data = resolve_data("batch", args.data)
    hparams = resolve_hparams(args.method, args.hparams, args.sets)
    sizes = args.sizes or list(DEFAULT_SIZES)
    if args.method == "larimar":
        memory_sizes: list[int | None] = list(args.memory_sizes or DEFAULT_MEMORY_SIZES)
    else:
        if args.memory_sizes:
            raise ValueError(f"--memory-sizes applies to Larimar only, not {args.method!r}")
        memory_sizes = [None]
    cases, synth = with_synthetic_rephrases(load_cases(data, n=max(sizes)), hparams, args.seed)
    config = _config(args, "batch", data, hparams, eval_n=int(args.eval_n), sizes=sizes, memory_sizes=memory_sizes,
                     **synth)
    seed_everything(args.seed)
    larimar = load_model(args.model)
    editor = build_editor(args.method, larimar, hparams, args.batch_size)
    summary = run_batch(
        editor, cases, args.out, config=config, sizes=sizes, memory_sizes=memory_sizes, eval_n=args.eval_n,
        seed=args.seed, force=args.force, progress=not args.no_progress, plot=not args.no_plot,
    )
    print(batch_markdown(summary))
    print(f"results in {args.out}")
    return 0


def _run_timing(args: argparse.Namespace) -> int:
    from larimar.eval import larimar_editor  # noqa: F401 - registers "larimar"
    from larimar.eval.data import load_cases
    from larimar.eval.editors import EditRequest, available_editors, load_hparams
    from larimar.eval.report import timing_markdown
    from larimar.eval.runner import seed_everything
    from larimar.eval.timing import run_timing

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.n < 10:
        log.warning("timing on %d edits only (the comparison asks for at least 10)", args.n)
    methods = args.methods or (["larimar"] + [m for m in available_editors() if m != "larimar"])
    unknown = [m for m in methods if m not in available_editors()]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; registered: {available_editors()}")
    data = resolve_data("timing", args.data)
    cases = [c for c in load_cases(data, n=args.n) if c.target_new.strip()]
    requests = [EditRequest(c.prompt, c.subject, c.target_new, c.target_true) for c in cases]
    seed_everything(args.seed)
    larimar = load_model(args.model)

    def factory(name: str):  # noqa: ANN202
        def build():  # noqa: ANN202
            try:
                hp = load_hparams(name, args.hparams_dir) if args.hparams_dir else load_hparams(name)
            except FileNotFoundError:
                hp = {}
            seed_everything(args.seed)
            return build_editor(name, larimar, hp, args.batch_size)

        return build

    summary = run_timing({m: factory(m) for m in methods}, requests, args.out, progress=not args.no_progress)
    print(timing_markdown(summary))
    print(f"{len(requests)} edits per method; results in {args.out}")
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from larimar.eval.report import compare_markdown, load_summaries

    text = compare_markdown(load_summaries(args.runs))
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


def run(args: argparse.Namespace) -> int:
    """Entry point of ``larimar eval``."""
    _setup_logging()
    command = args.eval_command
    if getattr(args, "_unavailable", None):
        print(f"larimar eval {command}: error: {args._unavailable}", file=sys.stderr)
        return 2
    try:
        if command in ("counterfact", "zsre"):
            return _run_single(args, command)
        if command == "batch":
            return _run_batch(args)
        if command == "timing":
            return _run_timing(args)
        if command == "report":
            return _run_report(args)
        if command in _EXPERIMENTS:
            return int(importlib.import_module(_EXPERIMENTS[command][0]).run(args) or 0)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        # ConfigMismatchError is a RuntimeError: caught below with the same treatment
        print(f"larimar eval {command}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from larimar.eval.runner import ConfigMismatchError

        if isinstance(exc, ConfigMismatchError):
            print(f"larimar eval {command}: error: {exc}", file=sys.stderr)
            return 2
        raise
    raise ValueError(f"unknown eval command {command!r}")
