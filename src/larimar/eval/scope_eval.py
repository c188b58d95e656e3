"""`larimar scope`: equal-error rate and F1 of the scope detector on CounterFact.

For each case the memory holds that case's fact ("{prompt} {target_new}."); its paraphrase prompts are
positives (in scope) and its neighbourhood prompts negatives (about other subjects). With `--shared`
all n facts are stored at once and every query is scored against all of them.
Writes DIR/summary.json and a histogram PNG of the two score distributions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="CounterFact file (default: counterfact-rome.json in the data dir)")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--out", default="results/scope")
    p.add_argument("--model", default=None, help="saved Larimar directory, or a shipped adapter's name: default, latent, tokens (default: default)")
    p.add_argument("--shared", action="store_true", help="store all n facts together instead of one per case")
    p.add_argument("--threshold", type=float, default=None, help="threshold for F1 (default: the model's)")


def scope_scores(model, cases, shared: bool) -> tuple[list[float], list[float]]:
    """(positive scores, negative scores) from the model's scope detector."""
    import torch
    from tqdm import tqdm

    facts = [f"{c.prompt} {c.target_new}." for c in cases]
    fact_emb = model.encoder.embed(facts)  # (n, H)
    det = model.new_scope_detector()
    pos, neg = [], []
    if shared:
        det.set_keys(fact_emb, facts)
    for i, c in enumerate(tqdm(cases, desc="scope", unit="case")):
        if not shared:
            det.set_keys(fact_emb[i : i + 1], facts[i : i + 1])
        if c.paraphrase_prompts:
            pos += det.score(c.paraphrase_prompts).score.tolist()
        if c.neighborhood_prompts:
            neg += det.score(c.neighborhood_prompts).score.tolist()
    return pos, neg


def run(args: argparse.Namespace) -> int:
    import torch

    from larimar.demo import _quiet_transformers
    from larimar.editing.scope import equal_error_rate, f1_at
    from larimar.eval.data import data_path, load_cases
    from larimar.modeling.model import Larimar

    _quiet_transformers()
    model = Larimar.from_pretrained(args.model)
    path = args.data or data_path("counterfact-rome")
    cases = load_cases(path, n=args.n)
    with torch.inference_mode():
        pos, neg = scope_scores(model, cases, args.shared)
    pos_t, neg_t = torch.tensor(pos), torch.tensor(neg)
    eer, t_eer = equal_error_rate(pos_t, neg_t)
    thr = args.threshold if args.threshold is not None else model.config.scope_threshold
    summary = {
        "data": str(path),
        "n_cases": len(cases),
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
    ax.set_xlabel("max cosine to a stored fact")
    ax.set_ylabel("prompts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
