"""`larimar demo`: edit a real model's facts in milliseconds, then forget one, with timings."""

from __future__ import annotations

import argparse
import time

from larimar.modeling.config import MODEL_HELP

# (query, counterfactual fact written to memory)
EDITS = [
    ("The capital of France is", "The capital of France is Rome."),
    ("Vladimir Putin speaks the language", "Vladimir Putin speaks the language Japanese."),
    ("The Eiffel Tower is located in the city of", "The Eiffel Tower is located in the city of London."),
]
UNRELATED = "The largest planet in the solar system is"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--whole", action="store_true",
                   help="show whole continuations; by default each ends at its first sentence end (generate(stop_after_answer=True))")


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _show(model, prompts: list[str], max_new_tokens: int, stop: bool) -> float:
    t0 = time.perf_counter()
    outs = model.generate(prompts, max_new_tokens=max_new_tokens, return_details=True, stop_after_answer=stop)
    dt = time.perf_counter() - t0
    for p, g in zip(prompts, outs):
        route = f"memory (scope {g.scope_score:.2f})" if g.used_memory else "plain  "
        print(f"  [{route}] {p} -> {g.text.strip()!r}")
    return dt


def run(args: argparse.Namespace) -> int:
    import torch

    from larimar.modeling.model import Larimar

    _quiet_transformers()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    model = Larimar.from_pretrained(args.model)
    print(f"loaded Larimar ({model.config.encoder or 'MiniLM-L6'} + {model.config.decoder or 'SmolLM2-135M'}) in {time.perf_counter() - t0:.1f} s")
    if not model.config.trained:
        print("NOTE: this adapter is UNTRAINED: memory-conditioned answers will not follow the facts yet.")
    prompts = [q for q, _ in EDITS] + [UNRELATED]
    n = args.max_new_tokens

    print("\n1. Base model (empty memory):")
    _show(model, prompts, n, not args.whole)

    print("\n2. Writing counterfactual facts (one shot, no gradient step):")
    for query, fact in EDITS:
        t = time.perf_counter()
        model.write_facts([fact], [query])  # keyed by the question if the config says so
        print(f"  + {fact!r}  ({(time.perf_counter() - t) * 1000:.1f} ms)")

    print("\n3. Edited model:")
    dt = _show(model, prompts, n, not args.whole)
    print(f"  ({dt:.2f} s for {len(prompts)} prompts, up to {n} tokens each)")

    forgotten = EDITS[0][1]
    t = time.perf_counter()
    model.forget([forgotten])
    print(f"\n4. Forgetting {forgotten!r} ({(time.perf_counter() - t) * 1000:.1f} ms):")
    _show(model, prompts, n, not args.whole)
    print(f"\nmemory holds {len(model)} fact(s); total demo time {time.perf_counter() - t0:.1f} s")
    return 0
