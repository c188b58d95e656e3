"""Plot a stage-1 learning curve from its history.json: python scripts/plot_warmstart.py HISTORY.json OUT.png [CONFIG]"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(history: str, out: str, config: str = "configs/small.yaml") -> None:
    h = json.loads(open(history).read())
    steps = [r["step"] for r in h]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(steps, [r["ce_object"] for r in h], label="train CE (object)")
    a.plot(steps, [r["kl_distractor"] for r in h], label="train KL (distractors)")
    a.set_xlabel("step")
    a.legend()
    for key, label in [
        ("val_acc_query", "auto-assoc., 16 facts, query"),
        ("val_acc_rephrase", "auto-assoc., 16 facts, rephrased"),
        ("val_keyed_acc_query", "keyed, 16 facts, query"),
        ("val_keyed_acc_rephrase", "keyed, 16 facts, rephrased"),
        ("val_keyed256_acc_query", "keyed, 256 facts, query"),
        ("val_keyed256_acc_rephrase", "keyed, 256 facts, rephrased"),
        ("val_question_acc_query", "keyed, 16 questions, query"),
        ("val_question_acc_rephrase", "keyed, 16 questions, rephrased"),
        ("val_spelling_acc_query", "keyed, 16 held-out text spans, query (stage 1c)"),
        ("val_spelling_acc_rephrase", "keyed, 16 held-out text spans, rephrased (stage 1c)"),
    ]:
        if key in h[0]:
            b.plot(steps, [100 * r[key] for r in h], label=label)
    b.set_xlabel("step")
    b.set_ylabel("val top-1 first object token (%)")
    b.legend(fontsize=8)
    fig.suptitle(f"stage 1 (decoder-free warm start), {config}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:4])
