"""Key slots on the shipped adapter: N CounterFact facts written one at a time into
``Larimar.key_slot_memory()`` against the default memory (pseudo-inverse addressing, facts written at
once). Recall = the greedy answer contains the new object (as in ``larimar eval forget``), on a fixed
sample of the facts. Prints a table and writes a JSON summary.

    python scripts/key_slots_demo.py --n 512 --sample 100 --out reports/key_slots_demo.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=512, help="facts written (default 512 = K)")
    p.add_argument("--sample", type=int, default=100, help="facts whose recall is checked (default 100)")
    p.add_argument("--data", default=None, help="CounterFact file (default counterfact-edit)")
    p.add_argument("--model", default=None, help="Larimar model directory (default: the shipped adapter)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the summary JSON here")
    args = p.parse_args()

    from tqdm.auto import tqdm

    from larimar.eval.cli import load_model, resolve_data
    from larimar.eval.data import load_cases
    from larimar.eval.runner import seed_everything, usable_cases
    from larimar.eval.sequential import batched_generate, contains_answer, fact_sentence

    seed_everything(args.seed)
    model = load_model(args.model)
    cases = usable_cases("counterfact", load_cases(resolve_data("batch", args.data), n=args.n))[: args.n]
    if len(cases) < args.n:
        raise SystemExit(f"only {len(cases)} usable cases, asked for {args.n}")
    texts = [fact_sentence(c) for c in cases]
    prompts = [c.prompt for c in cases]
    sample = random.Random(args.seed).sample(range(args.n), min(args.sample, args.n))

    def recall() -> float:
        gens = batched_generate(model, [prompts[i] for i in sample], max_new_tokens=12)
        return sum(contains_answer(g, cases[i].target_new) for g, i in zip(gens, sample)) / len(sample)

    model.facts = model.key_slot_memory()
    times = []
    for t, q in tqdm(list(zip(texts, prompts)), desc="key slots, one at a time", unit="fact"):
        t0 = time.perf_counter()
        model.write_facts([t], [q])
        times.append(time.perf_counter() - t0)
    slots = {"recall": recall(), "median_write_ms": 1000 * statistics.median(times), "slots_used": int(model.facts.slot_assigned.sum())}

    model.reset_memory()
    t0 = time.perf_counter()
    model.write_facts(texts, prompts)
    default = {"recall": recall(), "write_s": time.perf_counter() - t0}
    model.reset_memory()

    summary = {"n": args.n, "K": int(model.config.memory_size), "sample": len(sample), "key_slots_one_by_one": slots, "default_at_once": default}
    print(f"| memory | N | K | recall | write |\n| --- | --- | --- | --- | --- |")
    print(f"| key slots, one at a time | {args.n} | {summary['K']} | {100 * slots['recall']:.1f} % | {slots['median_write_ms']:.1f} ms median per fact |")
    print(f"| default (pseudo-inverse), at once | {args.n} | {summary['K']} | {100 * default['recall']:.1f} % | {default['write_s']:.1f} s in all |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
