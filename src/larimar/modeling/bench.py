"""`larimar bench model`: editing and query speed of a model, measured in one run.

Two write paths are timed, each on an empty memory:
- texts (`model.write(texts)`, the paper's auto-associative write): `write_ms_per_fact` (one text,
  encode + sequential memory update, median), `batch_write_facts_per_s` (1000 texts in batches of 100);
- facts (`model.write_facts(texts, prompts)`, what the editors and `larimar chat` do: keyed by the
  prompt, the value stored as the config says, token code included): `fact_write_ms`,
  `fact_batch_write_per_s`.
Queries: one prompt generating 10 tokens through the memory path (scope check, memory read, KV prefix,
output offset, token code where the read-out holds one) against plain decoding of the same prompt,
interleaved, medians: `query_ms` / `plain_query_ms` after the text writes, `fact_query_ms` /
`fact_plain_query_ms` after the fact writes. `routed` / `fact_routed` say whether the scope detector
sent the prompt to memory.
"""

from __future__ import annotations

import json
import statistics
import time


def _facts(n: int) -> list[str]:
    subjects = ["Alice Moreau", "Bruno Keller", "Chen Wei", "Dara Okafor", "Emil Novak", "Farah Haddad", "Goran Ilic", "Hana Sato"]
    objects = ["Paris", "Lagos", "Oslo", "Lima", "Hanoi", "Quito", "Riga", "Tunis", "Perth", "Kyoto"]
    relations = ["was born in", "works in", "lives in", "studied in", "died in"]
    return [f"{subjects[i % 8]} {i} {relations[i % 5]} {objects[(i * 7) % 10]}." for i in range(n)]


def _prompt(fact: str) -> str:
    """The fact without its object: "Alice Moreau 0 was born in Paris." -> "Alice Moreau 0 was born in"."""
    return fact.rsplit(" ", 1)[0]


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def _path(model, write_one, write_batch, facts: list[str], repeats: int, batch: int) -> dict:
    """Time one write path: single writes, batched writes of all `facts`, then a query of a stored
    fact's prompt through memory vs plain decoding (interleaved)."""
    model.reset_memory()
    it = iter(facts)
    write_ms = _median_ms(lambda: write_one(next(it)), repeats)
    model.reset_memory()
    t = time.perf_counter()
    for i in range(0, len(facts), batch):
        write_batch(facts[i : i + batch])
    per_s = len(facts) / (time.perf_counter() - t)
    prompt = [_prompt(facts[3])]
    model.generate(prompt, max_new_tokens=10, use_memory="always")  # warm-up
    model.generate(prompt, max_new_tokens=10, use_memory="never")
    mem, plain = [], []
    for _ in range(max(5, repeats // 2)):
        mem.append(_median_ms(lambda: model.generate(prompt, max_new_tokens=10, use_memory="auto"), 1))
        plain.append(_median_ms(lambda: model.generate(prompt, max_new_tokens=10, use_memory="never"), 1))
    routed = model.generate(prompt, max_new_tokens=1, return_details=True)[0].used_memory
    return {
        "write_ms": round(write_ms, 3),
        "batch_per_s": round(per_s, 1),
        "query_ms": round(statistics.median(mem), 2),
        "plain_query_ms": round(statistics.median(plain), 2),
        "routed": bool(routed),
    }


def measure_model(model, *, repeats: int = 20, n_facts: int = 1000, batch: int = 100) -> dict:
    """Both write paths of `model` (module docstring); returns the JSON `larimar bench model` prints."""
    import torch

    if repeats < 1 or n_facts < max(4, repeats) or batch < 1:
        raise ValueError(f"need repeats >= 1, n_facts >= max(4, repeats), batch >= 1; got {repeats}, {n_facts}, {batch}")
    facts = _facts(n_facts)
    with torch.inference_mode():
        model.write(facts[:4])  # warm-up
        texts = _path(model, lambda f: model.write([f]), model.write, facts, repeats, batch)
        keyed = _path(
            model,
            lambda f: model.write_facts([f], [_prompt(f)]),
            lambda fs: model.write_facts(fs, [_prompt(f) for f in fs]),
            facts,
            repeats,
            batch,
        )
        model.reset_memory()
    return {
        "write_ms_per_fact": texts["write_ms"],
        "batch_write_facts_per_s": texts["batch_per_s"],
        "query_ms": texts["query_ms"],
        "plain_query_ms": texts["plain_query_ms"],
        "routed": texts["routed"],
        "fact_write_ms": keyed["write_ms"],
        "fact_batch_write_per_s": keyed["batch_per_s"],
        "fact_query_ms": keyed["query_ms"],
        "fact_plain_query_ms": keyed["plain_query_ms"],
        "fact_routed": keyed["routed"],
    }


def run_model_bench(args) -> int:
    from larimar.demo import _quiet_transformers
    from larimar.modeling.model import Larimar

    _quiet_transformers()
    model = Larimar.from_pretrained(getattr(args, "model", None))
    r = measure_model(model, repeats=getattr(args, "repeats", None) or 20)
    if getattr(args, "json", False):
        print(json.dumps(r))
        return 0
    rows = [
        ("texts: one written (ms)", f"{r['write_ms_per_fact']:.2f}", "<= 30"),
        ("texts: 1000 in batches of 100 (/s)", f"{r['batch_write_facts_per_s']:.0f}", ">= 300"),
        ("texts: query, memory path (ms)", f"{r['query_ms']:.1f} (routed: {r['routed']})", ""),
        ("texts: query, plain (ms)", f"{r['plain_query_ms']:.1f}", ""),
        ("texts: ratio", f"{r['query_ms'] / r['plain_query_ms']:.3f}", "<= 1.10"),
        ("facts: one written (ms)", f"{r['fact_write_ms']:.2f}", "<= 30"),
        ("facts: 1000 in batches of 100 (/s)", f"{r['fact_batch_write_per_s']:.0f}", ">= 300"),
        ("facts: query, memory path (ms)", f"{r['fact_query_ms']:.1f} (routed: {r['fact_routed']})", ""),
        ("facts: query, plain (ms)", f"{r['fact_plain_query_ms']:.1f}", ""),
        ("facts: ratio", f"{r['fact_query_ms'] / r['fact_plain_query_ms']:.3f}", "<= 1.10"),
    ]
    for name, value, target in rows:
        print(f"{name:>36}: {value}" + (f" (target {target})" if target else ""))
    return 0
