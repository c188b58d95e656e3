"""ZsRE results split by the kind of answer: first-token and token accuracy of the edit prompts.

    .venv/bin/python scripts/zsre_answer_types.py results/zsre_larimar [--pararel ../shared/data/pararel]

Answer kinds: "T-REx object" (the answer is an object label of a PARAREL/T-REx relation, the objects
stage 1 of training draws from), "number" (the answer starts with a digit: years, dates) and "other".
Reads the per-case files of a finished `larimar eval zsre` run (their token flags) and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def object_labels(pararel_root: Path) -> set[str]:
    labels: set[str] = set()
    for path in sorted((pararel_root / "trex_lms_vocab").glob("P*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                labels.add(json.loads(line)["obj_label"].strip().lower())
    return labels


def answer_kind(answer: str, labels: set[str]) -> str:
    a = answer.strip()
    if re.match(r"\d", a):
        return "number"
    return "T-REx object" if a.lower() in labels else "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a `larimar eval zsre` output directory")
    ap.add_argument("--pararel", type=Path, default=Path("../shared/data/pararel"))
    args = ap.parse_args()
    cases = sorted((args.run / "cases").glob("*.json"))
    if not cases:
        raise SystemExit(f"{args.run}/cases holds no case files")
    labels = object_labels(args.pararel)
    stats: dict[str, list[float]] = {}
    for path in cases:
        record = json.loads(path.read_text())
        kind = answer_kind(record["target_new"], labels)
        s = stats.setdefault(kind, [0, 0.0, 0.0])
        for flags in record["correct"]["rewrite"]:
            s[0] += 1
            s[1] += bool(flags[0])
            s[2] += sum(map(bool, flags)) / len(flags)
    print("| answer | cases | first token right | token accuracy |\n| --- | --- | --- | --- |")
    for kind in ("T-REx object", "other", "number"):
        n, first, acc = stats.get(kind, [0, 0.0, 0.0])
        if n:
            print(f"| {kind} | {n} | {100 * first / n:.1f} % | {100 * acc / n:.1f} % |")


if __name__ == "__main__":
    main()
