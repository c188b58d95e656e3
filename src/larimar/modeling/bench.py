"""`larimar bench model`: editing and query speed of the default model, measured in one run.

- write_ms_per_fact: one fact written (encode + sequential memory update), median over repeats;
- batch_write_facts_per_s: 1000 facts written in batches of 100 (encode + update);
- query_ms / plain_query_ms: one prompt generating 10 tokens through the memory path (scope check, memory
  read, KV prefix) vs plain decoding of the same prompt, interleaved, medians.
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


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def run_model_bench(args) -> int:
    import torch

    from larimar.demo import _quiet_transformers
    from larimar.modeling.model import Larimar

    _quiet_transformers()
    repeats = getattr(args, "repeats", None) or 20
    model = Larimar.from_pretrained(getattr(args, "model", None))
    facts = _facts(1000)
    with torch.inference_mode():
        model.write(facts[:4])  # warm-up
        model.reset_memory()
        it = iter(facts)
        write_ms = _median_ms(lambda: model.write([next(it)]), repeats)
        model.reset_memory()
        t = time.perf_counter()
        for i in range(0, 1000, 100):
            model.write(facts[i : i + 100])
        per_s = 1000 / (time.perf_counter() - t)
        prompt = [facts[3].rsplit(" ", 1)[0]]  # in scope: a stored fact without its object
        model.generate(prompt, max_new_tokens=10, use_memory="always")
        model.generate(prompt, max_new_tokens=10, use_memory="never")
        mem, plain = [], []
        for _ in range(max(5, repeats // 2)):
            mem.append(_median_ms(lambda: model.generate(prompt, max_new_tokens=10, use_memory="auto"), 1))
            plain.append(_median_ms(lambda: model.generate(prompt, max_new_tokens=10, use_memory="never"), 1))
    routed = model.generate(prompt, max_new_tokens=1, return_details=True)[0].used_memory
    result = {
        "write_ms_per_fact": round(write_ms, 3),
        "batch_write_facts_per_s": round(per_s, 1),
        "query_ms": round(statistics.median(mem), 2),
        "plain_query_ms": round(statistics.median(plain), 2),
    }
    if getattr(args, "json", False):
        print(json.dumps(result))
    else:
        print(f"{'write_ms_per_fact':>26}: {result['write_ms_per_fact']:.2f} ms (target <= 30)")
        print(f"{'batch_write_facts_per_s':>26}: {result['batch_write_facts_per_s']:.0f} facts/s (target >= 300)")
        print(f"{'query_ms (memory path)':>26}: {result['query_ms']:.1f} ms (10 tokens; routed to memory: {routed})")
        print(f"{'plain_query_ms':>26}: {result['plain_query_ms']:.1f} ms")
        print(f"{'ratio':>26}: {result['query_ms'] / result['plain_query_ms']:.3f} (target <= 1.10)")
    return 0
