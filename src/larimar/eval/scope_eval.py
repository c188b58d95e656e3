"""`larimar scope`: equal-error rate and F1 of the scope detector on CounterFact.

For each case the memory holds that case's fact ("{prompt} {target_new}."); its paraphrase prompts are
positives (in scope) and its neighbourhood prompts negatives (about other subjects). With `--shared`
all n facts are stored at once and every query is scored against all of them.
Writes DIR/summary.json and a histogram PNG of the two score distributions.

`--select RATE` also chooses the lexical weight λ: for each λ of a grid, the highest threshold that
keeps RATE of the paraphrases in scope, and its share of neighbours let through; the λ letting the
fewest through wins (ties: the smaller λ). Run it on cases the evaluations do not use
(`--start 500`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from larimar.modeling.config import MODEL_HELP

LAMBDA_GRID = tuple(round(0.05 * i, 2) for i in range(20))  # 0, 0.05, ..., 0.95


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="CounterFact or ZsRE file (default: counterfact-rome.json in the data dir)")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--start", type=int, default=0, help="first case (default 0); e.g. 500 for the cases the evaluations do not use")
    p.add_argument("--out", default="results/scope")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--shared", action="store_true", help="store all n facts together instead of one per case")
    p.add_argument("--threshold", type=float, default=None, help="threshold for F1 (default: the model's)")
    p.add_argument("--lexical-weight", type=float, default=None, help="lexical weight λ (default: the model's)")
    p.add_argument("--select", type=float, default=None, metavar="RATE",
                   help="choose λ: fewest neighbours in scope while RATE (e.g. 0.95) of the paraphrases stay in scope")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def scope_components(model, cases, shared: bool, progress: bool = True) -> dict[str, list]:
    """Cosine and lexical recall of every query against the stored facts -> {"pos": [(cos (1, N), recall
    (1, N)), ...], "neg": [...]}, one pair per paraphrase / neighbourhood prompt (N facts: 1 per case,
    or all with `shared`). Recall uses the model's tokenizer and IDF table whatever its λ, and counts the
    tokens of each fact's prompt when the model keys its writes and `scope_lexical_text` is "key"."""
    from tqdm import tqdm

    facts = [f"{c.prompt} {c.target_new}." for c in cases]
    fact_emb = model.encoder.embed(facts)  # (n, H)
    keyed = model.config.keyed_writes and model.config.scope_lexical_text == "key"
    lexical = [c.prompt for c in cases] if keyed else facts  # what the model's own writes would give the detector
    det = model.new_scope_detector()
    out: dict[str, list] = {"pos": [], "neg": []}
    if shared:
        det.set_keys(fact_emb, lexical)
    for i, c in enumerate(tqdm(cases, desc="scope", unit="case", disable=not progress)):
        if not shared:
            det.set_keys(fact_emb[i : i + 1], lexical[i : i + 1])
        for kind, queries in (("pos", c.paraphrase_prompts), ("neg", c.neighborhood_prompts)):
            if queries:
                cos, recall, _ = det.components(list(queries), recall=True)
                out[kind] += [(cos[j : j + 1], recall[j : j + 1]) for j in range(len(queries))]
    return out


def mixed_scores(parts: list, lexical_weight: float) -> "torch.Tensor":
    """(Q,) scores: per query, the best over the facts of (1 - λ) · cosine + λ · recall (`ScopeDetector.score`)."""
    import torch

    lam = float(lexical_weight)
    return torch.stack([((1 - lam) * cos + lam * rec).max() for cos, rec in parts]) if parts else torch.zeros(0)


def select_lexical_weight(pos_parts: list, neg_parts: list, rate: float, grid=LAMBDA_GRID) -> dict:
    """For each λ of `grid`: the highest threshold keeping at least `rate` of the positives in scope, and
    the share of negatives it lets through -> {"rate", "grid": [{"lexical_weight", "threshold",
    "paraphrase_in_scope", "neighbours_in_scope"}, ...], "best": the row letting the fewest through}."""
    import math

    if not 0 < rate <= 1:
        raise ValueError(f"--select: RATE must be in (0, 1], got {rate}")
    if not pos_parts or not neg_parts:
        raise ValueError("--select needs paraphrase and neighbourhood prompts")
    rows = []
    for lam in grid:
        sp, sn = mixed_scores(pos_parts, lam), mixed_scores(neg_parts, lam)
        keep = math.ceil(rate * len(sp) - 1e-9)  # positives that must stay in scope
        t = float(sp.sort(descending=True).values[keep - 1])
        rows.append({
            "lexical_weight": lam,
            "threshold": round(t, 4),
            "paraphrase_in_scope": round(float((sp >= t).float().mean()), 4),
            "neighbours_in_scope": round(float((sn >= t).float().mean()), 4),
        })
    best = min(rows, key=lambda r: (r["neighbours_in_scope"], r["lexical_weight"]))
    return {"rate": rate, "grid": rows, "best": best}


def run(args: argparse.Namespace) -> int:
    import torch

    from larimar.demo import _quiet_transformers
    from larimar.editing.scope import equal_error_rate, f1_at
    from larimar.eval.data import data_path, load_cases
    from larimar.modeling.model import Larimar

    if args.start < 0 or args.n < 1:
        raise ValueError(f"--start must be >= 0 and --n >= 1, got {args.start} and {args.n}")
    if args.select is not None and not 0 < args.select <= 1:
        raise ValueError(f"--select: RATE must be in (0, 1], got {args.select}")
    if args.lexical_weight is not None and not 0 <= args.lexical_weight < 1:
        raise ValueError(f"--lexical-weight must be in [0, 1), got {args.lexical_weight}")
    _quiet_transformers()
    model = Larimar.from_pretrained(args.model)
    path = args.data or data_path("counterfact-rome")
    cases = load_cases(path, n=args.start + args.n)[args.start :]
    if not cases:
        raise ValueError(f"{path}: no cases from --start {args.start}")
    lam = args.lexical_weight if args.lexical_weight is not None else model.config.scope_lexical_weight
    with torch.inference_mode():
        parts = scope_components(model, cases, args.shared, progress=not args.no_progress)
    pos_t, neg_t = mixed_scores(parts["pos"], lam), mixed_scores(parts["neg"], lam)
    pos, neg = pos_t.tolist(), neg_t.tolist()
    eer, t_eer = equal_error_rate(pos_t, neg_t)
    thr = args.threshold if args.threshold is not None else model.config.scope_threshold
    summary = {
        "data": str(path),
        "start": args.start,
        "n_cases": len(cases),
        "lexical_weight": lam,
        "lexical_text": model.config.scope_lexical_text if model.config.keyed_writes else "text",
        "shared_memory": args.shared,
        "n_positive": len(pos),
        "n_negative": len(neg),
        "eer": round(eer, 4),
        "eer_threshold": round(t_eer, 4),
        "f1_at_eer_threshold": round(f1_at(pos_t, neg_t, t_eer), 4),
        "threshold": thr,
        "f1_at_threshold": round(f1_at(pos_t, neg_t, thr), 4),
        "false_accept_at_threshold": round(float((neg_t >= thr).float().mean()), 4),
        "false_reject_at_threshold": round(float((pos_t < thr).float().mean()), 4),
    }
    if args.select is not None:
        summary["selection"] = select_lexical_weight(parts["pos"], parts["neg"], args.select)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot(pos, neg, thr, t_eer, out / "scope_scores.png")
    print(json.dumps(summary, indent=2))
    return 0


def _plot(pos, neg, thr, t_eer, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = [i / 50 for i in range(-10, 51)]
    ax.hist(pos, bins=bins, alpha=0.6, label="paraphrase (in scope)")
    ax.hist(neg, bins=bins, alpha=0.6, label="neighbourhood (out of scope)")
    ax.axvline(thr, color="k", ls="--", label=f"threshold {thr:.2f}")
    ax.axvline(t_eer, color="r", ls=":", label=f"EER threshold {t_eer:.2f}")
    ax.set_xlabel("scope score: best (1 - λ) · cosine + λ · lexical recall over the stored facts")
    ax.set_ylabel("prompts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
