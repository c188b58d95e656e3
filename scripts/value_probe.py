"""How much of an answer's spelling can any map read back from its frozen MiniLM latent?

    .venv/bin/python scripts/value_probe.py --out reports/value_probe.json [--epochs 6]

A value write stores the encoder's latent of the answer alone ("Wyndham Lewis"), and with key slots
the read-out returns that latent unchanged. The shipped adapter must then turn it into the answer's
decoder tokens. This script asks whether the *latent* is the bottleneck, independently of the adapter:
it trains a probe, with no decoder forward at all, from the pooled MiniLM embedding of a name to the
first four SmolLM2 tokens of " " + name:

    token_k = argmax W_out (MLP_k(e))      (W_out: the decoder's frozen output embedding, full vocabulary)

on PARAREL's open object pool (every T-REx subject and object label plus the years 1000-2029, the
names stage 1b draws from; CounterFact/ZsRE subjects and the tested answers removed), and scores
it on the first N ZsRE edit answers, split by kind as `scripts/zsre_answer_types.py` does. Prints a
Markdown table and writes the figures as JSON.

`--train-encoder` fine-tunes MiniLM itself together with the probe (the held-out names are re-encoded
after every epoch): the ceiling of a *value encoder* trained to keep spelling, against the frozen one.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zsre_answer_types import answer_kind, object_labels  # noqa: E402

from larimar.eval.data import load_counterfact_rome, load_zsre_mend  # noqa: E402
from larimar.modeling.model import Larimar  # noqa: E402
from larimar.training.data import _eval_subjects, corpus_spans, load_relations  # noqa: E402

POSITIONS = 4


def targets(tok, names: list[str]) -> torch.Tensor:
    """(N, POSITIONS) token ids of " " + name, -100 past its end."""
    out = torch.full((len(names), POSITIONS), -100, dtype=torch.long)
    for i, name in enumerate(names):
        ids = tok(" " + name, add_special_tokens=False)["input_ids"][:POSITIONS]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


class Probe(nn.Module):
    """(N, H_enc) embeddings -> (N, POSITIONS, H_dec) vectors scored against the decoder's output embedding."""

    def __init__(self, h_enc: int, h_dec: int, hidden: int = 1024):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(h_enc, hidden), nn.GELU(), nn.Linear(hidden, POSITIONS * h_dec))
        self.h_dec = h_dec

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.net(e).view(e.shape[0], POSITIONS, self.h_dec)  # (N, P, H_dec)


def logits(probe: Probe, e: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """(N, P, V) logits over the whole vocabulary (bf16 product, fp32 result)."""
    v = probe(e)
    return (v.to(W.dtype) @ W.T).float()


@torch.no_grad()
def accuracy(probe: Probe, e: torch.Tensor, y: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per name: first token right (N,), share of its (up to P) tokens right (N,)."""
    pred = torch.cat([logits(probe, e[i : i + 512], W).argmax(-1) for i in range(0, len(e), 512)])  # (N, P)
    valid = y != -100
    right = (pred == y) & valid
    return right[:, 0].float(), right.sum(1).float() / valid.sum(1).clamp(min=1).float()


@torch.no_grad()
def scope_auc(encoder, cases) -> dict[str, float]:
    """Does the encoder still tell a fact's paraphrases from its neighbours (what addressing and the scope detector need)?

    Pooled over `cases`: AUC of cos(embed(rewrite prompt), embed(x)) for x a paraphrase prompt (positive)
    against x a neighbourhood prompt (negative), and the mean cosines of each.
    """
    def unit(texts: list[str]) -> torch.Tensor:
        return nn.functional.normalize(encoder.embed(texts).float(), dim=-1)  # (N, H)

    anchor = unit([c.prompt for c in cases])  # (Ncase, H)
    pos, neg = [], []
    for i, c in enumerate(cases):
        pos.append(unit(c.paraphrase_prompts) @ anchor[i])
        neg.append(unit(c.neighborhood_prompts) @ anchor[i])
    pos, neg = torch.cat(pos), torch.cat(neg)  # (P,), (Q,)
    wins = (pos[:, None] > neg[None, :]).float().mean() + 0.5 * (pos[:, None] == neg[None, :]).float().mean()
    return {"auc": float(wins), "cos_paraphrase": float(pos.mean()), "cos_neighbour": float(neg.mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--zsre", type=Path, default=None, help="default: DATA/zsre/zsre_mend_eval-600.json (the `larimar eval zsre` default)")
    ap.add_argument("--n", type=int, default=200, help="ZsRE answers tested (the first N cases)")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--max-train", type=int, default=40000, help="names sampled from the pool for training")
    ap.add_argument("--text-spans", type=int, default=0, help="also train on N word spans of the generic text corpus")
    ap.add_argument("--train-encoder", action="store_true", help="fine-tune the MiniLM encoder with the probe (a value encoder's ceiling)")
    ap.add_argument("--encoder-lr", type=float, default=5e-5)
    ap.add_argument("--scope-cases", type=int, default=0,
                    help="also measure paraphrase-vs-neighbour AUC of the encoder on the first N CounterFact cases, before and after training")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("reports/value_probe.json"))
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    model = Larimar.from_pretrained().eval()
    tok = model.tokenizer
    W = model.decoder.get_output_embeddings().weight.detach().to(torch.bfloat16)  # (V, H_dec), frozen
    cases = load_zsre_mend(args.zsre or args.data / "zsre" / "zsre_mend_eval-600.json", n=args.n)
    test_names = [c.target_new.strip() for c in cases]
    banned = {t.lower() for t in test_names} | _eval_subjects(args.data)
    relations = load_relations(args.data / "pararel", object_pool="open")
    pool = next(iter(relations.values())).objects
    train_names = [x for x in pool if x.strip() and x.strip().lower() not in banned]
    rng.shuffle(train_names)
    train_names = train_names[: args.max_train]
    if args.text_spans:
        skip = banned | {x.lower() for x in train_names}  # (corpus_spans also drops every evaluation answer)
        spans = corpus_spans(args.data / "text", args.text_spans, args.seed, exclude_eval_from=args.data, exclude=skip)
        train_names = train_names + spans
        rng.shuffle(train_names)
    print(f"pool {len(pool)} names, {len(train_names)} for training, {len(test_names)} ZsRE answers tested", flush=True)

    encoder = model.encoder
    scope_cases = load_counterfact_rome(args.data / "counterfact" / "counterfact-rome.json", n=args.scope_cases) if args.scope_cases else []
    scope_before = scope_auc(encoder, scope_cases) if scope_cases else None
    if scope_before:
        print(f"scope AUC before: {scope_before}", flush=True)

    def encode(names: list[str]) -> torch.Tensor:
        return encoder.embed(names).float()  # (N,) -> (N, H)

    y_train, y_test = targets(tok, train_names), targets(tok, test_names)
    n_val = min(2000, len(train_names) // 10)
    val_names, tr_names = train_names[:n_val], train_names[n_val:]
    y_val, y_tr = y_train[:n_val], y_train[n_val:]
    if not args.train_encoder:  # (a trained encoder encodes each name where it is used: batches, and every epoch's eval)
        t0 = time.perf_counter()
        with torch.no_grad():
            e_train = encode(train_names)
            e_test = encode(test_names)
        print(f"encoded in {time.perf_counter() - t0:.0f} s", flush=True)
        e_val, e_tr = e_train[:n_val], e_train[n_val:]

    probe = Probe(encoder.model.config.hidden_size, W.shape[1])
    groups = [{"params": list(probe.parameters()), "lr": 1e-3}]
    if args.train_encoder:
        encoder.model.train().requires_grad_(True)
        groups.append({"params": list(encoder.model.parameters()), "lr": args.encoder_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    steps = args.epochs * ((len(tr_names) + 255) // 256)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=steps, pct_start=0.05)
    history = []
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(tr_names))
        total = 0.0
        for i in range(0, len(perm), 256):
            b = perm[i : i + 256]
            e_b = encode([tr_names[j] for j in b.tolist()]) if args.train_encoder else e_tr[b]  # (B, H)
            lg = logits(probe, e_b, W)  # (B, P, V)
            loss = nn.functional.cross_entropy(lg.flatten(0, 1), y_tr[b].flatten(), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(b)
        if args.train_encoder:  # re-encode the held-out names with the updated encoder
            with torch.no_grad():
                encoder.model.eval()
                e_val, e_test = encode(val_names), encode(test_names)
                encoder.model.train()
        first_val, acc_val = accuracy(probe, e_val, y_val, W)
        first_test, acc_test = accuracy(probe, e_test, y_test, W)
        rec = {
            "epoch": epoch + 1,
            "minutes": round((time.perf_counter() - t0) / 60, 2),
            "train_ce": total / len(tr_names),
            "heldout_pool_first": float(first_val.mean()),
            "heldout_pool_token_acc": float(acc_val.mean()),
            "zsre_first": float(first_test.mean()),
            "zsre_token_acc": float(acc_test.mean()),
        }
        history.append(rec)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()), flush=True)

    encoder.model.eval()
    scope_after = scope_auc(encoder, scope_cases) if scope_cases else None
    if scope_after:
        print(f"scope AUC after: {scope_after}", flush=True)
    labels = object_labels(args.data / "pararel")
    kinds: dict[str, list[int]] = {}
    for i, name in enumerate(test_names):
        kinds.setdefault(answer_kind(name, labels), []).append(i)
    by_kind = {
        k: {"cases": len(ix), "first_token": float(first_test[ix].mean()), "token_acc": float(acc_test[ix].mean())}
        for k, ix in kinds.items()
    }
    result = {
        "what": f"probe from the {'fine-tuned' if args.train_encoder else 'frozen'} MiniLM embedding of an answer to its first 4 SmolLM2 tokens (no decoder forward)",
        "train_names": len(tr_names),
        "encoder_trained": args.train_encoder,
        "text_spans": args.text_spans,
        "heldout_pool_names": n_val,
        "zsre_answers": len(test_names),
        "history": history,
        "zsre_by_kind": by_kind,
    }
    if scope_cases:
        result["scope_counterfact"] = {"cases": len(scope_cases), "before": scope_before, "after": scope_after}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("| answer | cases | first token right | token accuracy (first 4 tokens) |\n| --- | --- | --- | --- |")
    for k in ("T-REx object", "number", "other"):
        if k in by_kind:
            r = by_kind[k]
            print(f"| {k} | {r['cases']} | {100 * r['first_token']:.1f} % | {100 * r['token_acc']:.1f} % |")


if __name__ == "__main__":
    main()
