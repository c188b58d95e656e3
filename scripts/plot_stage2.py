"""Learning curve of a stage-2 run from its log (`larimar train` prints "validation at step N: k=v ...").

    python scripts/plot_stage2.py reports/train_log_small_stage2.txt --out reports/train_curve_small_stage2.png \
        --history reports/train_history_small_stage2.json
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

VAL = re.compile(r"^validation at step (\d+): (.*)$")
TRAIN = re.compile(r"^step (\d+)/\d+ [\d.]+ min (.*)$")


def parse(lines: list[str]) -> dict[str, list[dict[str, float]]]:
    """Log lines -> {"val": [{step, metric: value}], "train": [...]}, in order; a resumed run's repeated steps keep the last."""
    out: dict[str, dict[int, dict[str, float]]] = {"val": {}, "train": {}}
    for line in lines:
        for kind, pattern in (("val", VAL), ("train", TRAIN)):
            m = pattern.match(line.strip())
            if m:
                values = dict(kv.split("=") for kv in m.group(2).split())
                out[kind][int(m.group(1))] = {"step": int(m.group(1)), **{k: float(v) for k, v in values.items()}}
    return {k: [v[s] for s in sorted(v)] for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("log")
    p.add_argument("--out", required=True, help="PNG")
    p.add_argument("--history", help="also write the parsed curve as JSON")
    args = p.parse_args()
    hist = parse(Path(args.log).read_text().splitlines())
    if not hist["val"]:
        raise SystemExit(f"{args.log}: no validation lines")
    if args.history:
        Path(args.history).write_text(json.dumps(hist, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("acc_mem_fact_object", "fact objects, from memory"), ("acc_mem", "all items, from memory"),
                       ("acc_ae", "autoencoder (own latent)"), ("acc_lm", "empty memory (LM rows)")):
        a1.plot([r["step"] for r in hist["val"]], [r[key] for r in hist["val"]], marker="o", label=label)
    a1.set(xlabel="step", ylabel="teacher-forced token accuracy", title="validation (held-out relations and documents)")
    a1.legend(fontsize=8)
    for key in ("nll_mem", "nll_ae", "nll_lm"):
        a2.plot([r["step"] for r in hist["val"]], [r[key] for r in hist["val"]], marker="o", label=key)
    a2.set(xlabel="step", ylabel="NLL", title="validation loss terms")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
