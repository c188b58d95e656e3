"""``larimar eval modelcard``: the model-card figures of a trained adapter.

1. Reconstruction from memory: write n items (n = 1, 16 and K) into an empty memory in one shot, read
   each back with its *query* (the part a user asks with) and score its continuation teacher-forced
   under the read-out's conditioning: token accuracy (argmax) and NLL per continuation token. Two
   sources: held-out text sentences (split at a random 50-90 % word boundary, validation documents of
   the training corpus) and CounterFact dev facts (query = rewrite prompt, continuation = new object).
   The base decoder's own figures on the same tokens (no memory) are given for reference. With
   ``keyed_writes`` in the model config each item is written keyed by its query.
2. Perplexity on held-out text: the base decoder vs Larimar decoding with an empty memory read-out
   (z_r = 0: the KV prefix's base, zero offsets), on the same tokens.

Writes ``DIR/summary.json`` and ``DIR/summary.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path
from typing import Any

import torch

from larimar.training.data import Item


@torch.no_grad()
def continuation_stats(
    model, items: list[Item], z: torch.Tensor | None, batch_size: int = 32, q: torch.Tensor | None = None
) -> tuple[float, float, int]:
    """Teacher-forced stats of each item's continuation given its query, conditioned on z (N, C) or plain.

    `q` (N, C): the queries' latents for the output offset (None: zeros). The text is tokenised as a
    whole and its first len(tokens(query)) tokens (at least one) are the prompt; the rest is scored
    with `larimar.eval.scoring.score_token_ids`.

    Returns (sum of NLL, number of correct argmax tokens, number of tokens).
    """
    from larimar.eval.scoring import score_token_ids

    tok = model.tokenizer
    sequences = []
    for it in items:
        n_q = len(tok(it.query, add_special_tokens=False)["input_ids"])
        full = tok(it.text, add_special_tokens=False)["input_ids"][: model.config.max_decoder_tokens]
        n_q = max(1, min(n_q, len(full) - 1))
        sequences.append((full[:n_q], full[n_q:]))
    forward = None
    if z is not None:
        cond = model.conditioning(z.to(model.device), None if q is None else q.to(model.device))

        def forward(input_ids, attention_mask, batch_index):
            return model.runner.forward(input_ids, attention_mask, cond.select(batch_index)).logits

    stats = score_token_ids(model.decoder, sequences, pad_token_id=tok.pad_token_id, batch_size=batch_size, forward_fn=forward)
    nll = sum(float(-s.logprobs.sum()) for s in stats)
    correct = sum(int(s.correct.sum()) for s in stats)
    return nll, correct, sum(len(s.target_ids) for s in stats)


@torch.no_grad()
def reconstruction(model, items: list[Item], n_in_memory: int, *, max_scored: int = 128, batch_size: int = 32, seed: int = 0) -> dict[str, float]:
    """Write groups of `n_in_memory` items, read each with its query, score the continuations.

    Scores up to `max_scored` items (spread over as many groups as needed). Memory is reset per group.
    """
    if n_in_memory > len(items):
        raise ValueError(f"need {n_in_memory} items to fill memory, have {len(items)}")
    rng = random.Random(seed)
    per_group = min(n_in_memory, max_scored)
    groups = max(1, math.ceil(max_scored / per_group))
    mem = [0.0, 0, 0]
    base = [0.0, 0, 0]
    for _ in range(groups):
        group = rng.sample(items, n_in_memory)
        model.reset_memory()
        model.write_facts([it.text for it in group], [it.query for it in group])  # keyed by the queries if configured
        scored = group[:per_group]
        q = model.encoder([it.query for it in scored])
        z_r = model.read_latents(q)
        for acc, stats in ((mem, continuation_stats(model, scored, z_r, batch_size, q)), (base, continuation_stats(model, scored, None, batch_size))):
            for j in range(3):
                acc[j] += stats[j]
    model.reset_memory()
    return {
        "n_in_memory": n_in_memory,
        "scored": per_group * groups,
        "tokens": mem[2],
        "memory_acc": mem[1] / max(mem[2], 1),
        "memory_nll": mem[0] / max(mem[2], 1),
        "base_acc": base[1] / max(base[2], 1),
        "base_nll": base[0] / max(base[2], 1),
    }


@torch.no_grad()
def perplexity(model, texts: list[str], batch_size: int = 16) -> dict[str, float]:
    """Perplexity of whole sentences: base decoder vs conditioning on an empty memory read-out (z = 0)."""
    items = [Item("", t, "text") for t in texts]  # empty query: every token after the first is scored
    zeros = torch.zeros(len(items), model.config.latent_size)
    base = continuation_stats(model, items, None, batch_size)
    empty = continuation_stats(model, items, zeros, batch_size)
    return {
        "sentences": len(texts),
        "tokens": base[2],
        "base_ppl": math.exp(base[0] / max(base[2], 1)),
        "empty_memory_ppl": math.exp(empty[0] / max(empty[2], 1)),
    }


def heldout_text(text_root: str | Path, n: int, seed: int = 0, max_words: int = 30) -> list[Item]:
    """`n` held-out sentences (validation documents) split into query / continuation as in training."""
    from larimar.training.data import EpisodeSampler, split_item

    sampler = EpisodeSampler(text_root, None, split="val", fact_fraction=0.0, seed=seed)
    rng = random.Random(seed)
    pool = [s for s in sampler.texts if len(s.split()) <= max_words]
    if len(pool) < n:
        raise ValueError(f"{text_root}: only {len(pool)} held-out sentences, need {n}")
    return [split_item(s, rng) for s in rng.sample(pool, n)]


def counterfact_items(path: str | Path, n: int) -> list[Item]:
    records = json.loads(Path(path).read_text(encoding="utf-8"))[:n]
    out = []
    for r in records:
        rr = r["requested_rewrite"]
        out.append(Item(rr["prompt"].format(rr["subject"]), " " + rr["target_new"]["str"].strip(), "fact"))
    return out


def markdown(summary: dict[str, Any]) -> str:
    lines = ["| source | facts in memory | items scored | token acc (memory) | NLL (memory) | token acc (no memory) | NLL (no memory) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for src, rows in summary["reconstruction"].items():
        for r in rows:
            lines.append(f"| {src} | {r['n_in_memory']} | {r['scored']} | {100 * r['memory_acc']:.1f} % | {r['memory_nll']:.2f} | "
                         f"{100 * r['base_acc']:.1f} % | {r['base_nll']:.2f} |")
    p = summary["perplexity"]
    lines += ["", f"Perplexity on {p['sentences']} held-out sentences ({p['tokens']} tokens): base decoder {p['base_ppl']:.2f}, "
              f"Larimar with an empty memory {p['empty_memory_ppl']:.2f}."]
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from larimar.eval.sequential import add_common_arguments

    add_common_arguments(p, data_help="CounterFact dev file (default counterfact-rome)", n_default=128,
                         n_help="items scored per setting (default 128)")
    p.add_argument("--text-root", default="../shared/data/text", help="training text corpus (its validation documents are used)")
    p.add_argument("--sizes", default=None, help="numbers of items in memory (default 1,16,K)")
    p.add_argument("--ppl-sentences", type=int, default=200, help="held-out sentences for the perplexity (default 200)")


def run(args: argparse.Namespace) -> int:
    from larimar.eval.cli import describe_model, load_model, resolve_data
    from larimar.eval.runner import atomic_write_json, atomic_write_text, seed_everything

    seed_everything(args.seed)
    model = load_model(args.model)
    K = model.config.memory_size
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [1, 16, K]
    path = resolve_data("counterfact", args.data)
    need = max(max(sizes), args.n)
    sources = {"held-out text": heldout_text(args.text_root, need, seed=args.seed), "CounterFact facts": counterfact_items(path, need)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"model": describe_model(args.model), "data": str(path), "reconstruction": {}}
    for name, items in sources.items():
        rows = []
        for n in sizes:
            rows.append(reconstruction(model, items, n, max_scored=args.n, batch_size=args.batch_size, seed=args.seed))
            if not args.no_progress:
                print(f"{name}: {n} in memory: {rows[-1]}", flush=True)
        summary["reconstruction"][name] = rows
    texts = [it.text for it in heldout_text(args.text_root, args.ppl_sentences, seed=args.seed + 1)]
    summary["perplexity"] = perplexity(model, texts, batch_size=args.batch_size)
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", markdown(summary))
    print(markdown(summary))
    return 0
