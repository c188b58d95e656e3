"""Training of the token value code (`larimar.modeling.value_code`): decoder-free, on generic strings.

Two steps, neither of which sees an edit:

1. `train_token_code`: the code's projection G and temperatures learn, by cross-entropy over the whole
   vocabulary, to give back every token of a string from its code and the token before it (the first
   token after an arbitrary prompt token, the end token after the last). Strings are word spans of the
   training documents and the years 1000-2029 (`corpus_spans` removes the evaluation answers). Codes are
   perturbed with Gaussian noise during training, as a read from a full memory perturbs them.
2. `calibrate_token_code`: one scalar, the vocabulary temperature, against the decoder's own logits.
   PARAREL questions ("Which country is X located in?") with a held-out span as the answer are
   teacher-forced; the bias is scaled by each candidate factor and the smallest factor within
   `tolerance` of the best whole-answer accuracy is kept (a larger bias overrides the decoder more).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

if TYPE_CHECKING:
    from larimar.modeling.model import Larimar

PROMPT_END_WORDS = ("?", " is", " of", " was", " in", ":", " by", " the", " a", " to", " as", " on", " at", " from", " with", " for")


def code_pairs(
    seqs: list[list[int]],
    rng: random.Random,
    starts: list[int],
    vocab_size: int,
    start_prob: float = 0.7,
    depth: int = 1,
    copy_prob: float = 0.0,
):
    """Training pairs of a batch of token sequences (each ending with the end token).

    Returns rows (P,) the sequence of each pair, history (P, depth + 1) the tokens read before the
    target, most recent first, and target (P,) the token due: (a prompt token, t_0), (t_0, t_1), ...,
    (t_{L-2}, end). The depth + 1 prompt tokens read before t_0 are each one of `starts` with
    probability `start_prob`, else any token. With probability `copy_prob` a sequence's prompt also
    holds some of its own tokens, as a question holds its subject ("What company is Vueling part of?"
    before " Vueling Holdings"): a run of 1-3 of them, then 1-3 more prompt tokens.
    """
    rows, hist, tgt = [], [], []

    def prompt_tokens(n: int) -> list[int]:
        return [rng.choice(starts) if rng.random() < start_prob else rng.randrange(vocab_size) for _ in range(n)]

    for i, ids in enumerate(seqs):
        p = prompt_tokens(depth + 1)
        if copy_prob > 0 and len(ids) > 1 and rng.random() < copy_prob:
            n = rng.randint(1, min(3, len(ids) - 1))
            at = rng.randrange(len(ids) - n)  # a run of the value's own tokens (never the end token)
            p = p + ids[at : at + n] + prompt_tokens(rng.randint(1, 3))
        read = p + ids[:-1]  # everything read before each target
        for j, t in enumerate(ids):
            rows.append(i)
            end = len(p) + j  # read[end - 1] is prev
            hist.append(read[end - depth - 1 : end][::-1])
            tgt.append(t)
    return torch.tensor(rows), torch.tensor(hist).view(-1, depth + 1), torch.tensor(tgt)


@torch.no_grad()
def code_accuracy(
    model: "Larimar", seqs: list[list[int]], *, noise: float = 0.0, seed: int = 1, batch: int = 256, copy_prob: float = 0.0
) -> dict[str, float]:
    """Decoder-free accuracy of the token code on `seqs`: {"token": share of tokens whose bias argmax
    is right, "sequence": share of sequences with every token right}. `copy_prob`: as in `code_pairs`
    (1: every prompt holds some of its answer's tokens)."""
    code, E = model.token_code, model.decoder.get_input_embeddings().weight
    starts = _start_tokens(model)
    U = code.vocab_units(E)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    ok_tok = total = ok_seq = 0
    for b in range(0, len(seqs), batch):
        chunk = seqs[b : b + batch]
        z = code.encode(E, chunk)
        if noise:
            z = F.normalize(z + noise * torch.randn(z.shape, generator=gen) / math.sqrt(z.shape[1]), dim=-1)
        rows, hist, tgt = code_pairs(chunk, rng, starts, E.shape[0], depth=code.depth, copy_prob=copy_prob)
        good = code.logit_bias(z[rows], hist, E, U).argmax(-1) == tgt
        ok_tok += int(good.sum())
        total += len(tgt)
        wrong = torch.zeros(len(chunk)).index_add_(0, rows, (~good).float())
        ok_seq += int((wrong == 0).sum())
    return {"token": ok_tok / max(total, 1), "sequence": ok_seq / max(len(seqs), 1)}


def _start_tokens(model: "Larimar") -> list[int]:
    return [model.tokenizer(w, add_special_tokens=False)["input_ids"][-1] for w in PROMPT_END_WORDS]


def train_token_code(
    model: "Larimar",
    strings: list[str],
    *,
    val_strings: list[str] | None = None,
    steps: int = 400,
    lr: float = 3e-3,
    batch: int = 64,
    noise: float = 0.3,
    seed: int = 0,
    log_every: int = 50,
    log=print,
    copy_prob: float = 0.0,
) -> list[dict]:
    """Train `model.token_code` (G, temperatures, threshold) on `strings`; returns the history
    (one dict per `log_every` steps with the loss, and the validation accuracy when `val_strings`:
    with `copy_prob` > 0 also `val_copied_*`, every prompt holding some of its answer's tokens).
    `copy_prob`: the share of training prompts that hold some of their answer's tokens (`code_pairs`)."""
    if model.token_code is None:
        raise ValueError("train_token_code: the model has no token value code (config.value_code is 'encoder')")
    if not strings:
        raise ValueError("train_token_code: no training strings")
    code, E = model.token_code, model.decoder.get_input_embeddings().weight.detach()
    seqs = model.value_code_ids(strings)
    val = model.value_code_ids(val_strings) if val_strings else None
    starts = _start_tokens(model)
    params = list(code.parameters())
    for p in params:  # stage 2 (training.module) keeps the code frozen; here it is what trains
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    history, t0, run = [], time.time(), 0.0
    for step in range(1, steps + 1):
        chunk = [seqs[rng.randrange(len(seqs))] for _ in range(batch)]
        z = code.encode(E, chunk)  # (B, C)
        z = F.normalize(z + noise * torch.randn(z.shape, generator=gen) / math.sqrt(z.shape[1]), dim=-1)
        rows, hist, tgt = code_pairs(chunk, rng, starts, E.shape[0], depth=code.depth, copy_prob=copy_prob)
        loss = F.cross_entropy(code.logit_bias(z[rows], hist, E), tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        run = loss.item() if step == 1 else 0.9 * run + 0.1 * loss.item()
        if step % log_every == 0 or step == steps:
            rec = {"step": step, "loss": round(run, 4), "seconds": round(time.time() - t0, 1), "tau_vocab": round(code.log_tau[0].exp().item(), 2)}
            if val:
                rec.update({f"val_{k}": round(v, 4) for k, v in code_accuracy(model, val).items()})
                if copy_prob > 0:
                    rec.update({f"val_copied_{k}": round(v, 4) for k, v in code_accuracy(model, val, copy_prob=1.0).items()})
            history.append(rec)
            log(f"token code step {step}/{steps}: " + ", ".join(f"{k} {v}" for k, v in rec.items() if k != "step"))
    return history


@torch.no_grad()
def calibrate_token_code(
    model: "Larimar",
    items: list[tuple[str, str]],
    *,
    factors: tuple[float, ...] = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0),
    tolerance: float = 0.005,
    log=print,
) -> dict:
    """Scale the code's vocabulary temperature against the decoder's logits.

    `items`: (prompt, value) pairs. What a write stores for each value (`Larimar.stored_values`: its
    code, or with value_code "both" its latent and code) conditions the decoder, with no memory involved;
    the value is teacher-forced after its prompt, and an item counts when every value token is the argmax.
    Sets `log_tau[0] += log(factor)` for the chosen factor; returns {"factors": {factor: accuracy}, "chosen"}.
    """
    if model.token_code is None:
        raise ValueError("calibrate_token_code: the model has no token value code")
    if not items:
        raise ValueError("calibrate_token_code: no calibration items")
    code, E, tok = model.token_code, model.decoder.get_input_embeddings().weight, model.tokenizer
    U = code.vocab_units(E)  # (V, C) once: the code does not change while it is calibrated
    hits = {f: 0 for f in factors}
    for prompt, value in items:
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        v_ids = model.value_code_ids([value])[0][:-1]  # the value's tokens, without the end token
        ids = torch.tensor([p_ids + v_ids], device=model.device)
        cond = model.conditioning(model.stored_values([value]), model.encoder([prompt]).to(model.M0.dtype))
        base = model.runner.forward(ids, torch.ones_like(ids), replace(cond, code=None)).logits[0].float()  # (T, V) without the code
        bias = code.sequence_bias(cond.code, ids, E, vocab_units=U)[0].float()  # (T, V)
        if cond.code_gate is not None:
            bias = bias * cond.code_gate[0].float()
        L, target = len(p_ids), torch.tensor(v_ids, device=model.device)
        for f in factors:
            pred = (base + f * bias)[L - 1 : L - 1 + len(v_ids)].argmax(-1)
            hits[f] += int(bool((pred == target).all()))
    acc = {f: hits[f] / len(items) for f in factors}
    best = max(acc.values())
    chosen = min(f for f in factors if acc[f] >= best - tolerance)
    code.log_tau.data[0] += math.log(chosen)
    log("token code calibration (whole answers right): " + ", ".join(f"x{f}: {100 * a:.1f} %" for f, a in acc.items()) + f"; chosen x{chosen}")
    return {"factors": {str(f): a for f, a in acc.items()}, "chosen": chosen}
