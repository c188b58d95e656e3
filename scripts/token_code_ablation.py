"""Decoder-free accuracy of token codes: which of depth and dates lifts the reading of recurring tokens.

Each run takes the default adapter's weights, gives it a token code of `--depth` (fresh from the
decoder's embeddings with `--fresh`, else the adapter's own code), trains it for `--steps` on the
token-code strings (word spans of the training text and the years 1000-2029, as `larimar train`
draws them) plus `--dates` generic dates, and reports the share of strings whose every token is the
bias argmax (`code_accuracy`, random prompt tokens before each string) on three sets, with and
without read noise 0.3: held-out spans (the token-code validation strings), 500 generic dates (its own
seed), and the ZsRE evaluation answers that fit the code (for information: nothing is chosen on them);
also the held-out spans after prompts that hold some of their tokens (`copy_prob` 1), and the ZsRE
answers after their own questions (teacher-forced), which often hold the answer's tokens.
No decoder, no memory: this is the code alone. `--steps 0` without `--fresh` measures an adapter as
it is (`--model`).

The session-17 table in the README ran these settings (train dates: day 1-31, `--date-seed 7`):

    python scripts/token_code_ablation.py --model runs/default_s14 --steps 0        # the session-14 code
    python scripts/token_code_ablation.py --depth 1 --dates 5000 --steps 400 --fresh
    python scripts/token_code_ablation.py --depth 8 --dates 0    --steps 400 --fresh
    python scripts/token_code_ablation.py --depth 8 --dates 5000 --steps 400 --fresh
    python scripts/token_code_ablation.py --depth 8 --dates 2000 --steps 600 --fresh
    python scripts/token_code_ablation.py --steps 0                                 # the shipped code

Each prints one JSON line and appends it to `--out` (default reports/token_code_ablation.jsonl).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"]


@torch.no_grad()
def after_prompts(m, cases) -> float:
    """Share of cases whose answer the code alone spells right after the case's own prompt (teacher-forced)."""
    code, E, tok = m.token_code, m.decoder.get_input_embeddings().weight, m.tokenizer
    right = 0
    for case in cases:
        ids = m.value_code_ids([case.target_new])[0]
        p = tok(case.prompt, add_special_tokens=False)["input_ids"]
        bias = code.sequence_bias(code.encode(E, [ids]), torch.tensor([p + ids[:-1]]), E)[0]  # (T, V)
        right += bias[len(p) - 1 :].argmax(-1).tolist() == ids
    return right / max(len(cases), 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="adapter directory or shipped name (default: the default adapter)")
    p.add_argument("--depth", type=int, default=None, help="value_code_depth (default: the adapter's)")
    p.add_argument("--dates", type=int, default=0, help="generic dates added to the training strings")
    p.add_argument("--date-seed", type=int, default=7)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--fresh", action="store_true", help="train a new code from the decoder's embeddings")
    p.add_argument("--copy-prob", type=float, default=0.0, help="share of training prompts holding some of their answer's tokens")
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--out", default="reports/token_code_ablation.jsonl")
    args = p.parse_args()

    from larimar.demo import _quiet_transformers
    from larimar.eval.data import load_zsre_mend
    from larimar.modeling.model import Larimar
    from larimar.modeling.value_code import TokenValueCode
    from larimar.training.data import corpus_spans
    from larimar.training.token_code import code_accuracy, train_token_code

    _quiet_transformers()
    over = {} if args.depth is None else {"value_code_depth": args.depth}
    m = Larimar.from_pretrained(args.model, **over)
    if m.token_code is None:
        raise SystemExit("this adapter has no token code")
    E = m.decoder.get_input_embeddings().weight
    if args.fresh:
        torch.manual_seed(0)
        code = TokenValueCode(E.shape[1], m.config.latent_size, m.config.value_code_slots, depth=m.config.value_code_depth)
        code.init_from_embeddings(E)
        code.end_id = m.token_code.end_id
        m.token_code = code
    strings = corpus_spans(f"{args.data}/text", 60000, 0, exclude_eval_from=args.data)
    strings += [str(y) for y in range(1000, 2030)]
    random.Random(0).shuffle(strings)
    val, train = strings[:1000], strings[1300:]  # as `larimar train`: 1000 validation, 300 calibration strings
    r = random.Random(args.date_seed)
    train += [f"{r.randint(1, 31)} {r.choice(MONTHS)} {r.randint(1000, 2029)}" for _ in range(args.dates)]
    r = random.Random(123)
    dates = [f"{r.randint(1, 28)} {r.choice(MONTHS)} {r.randint(1000, 2029)}" for _ in range(500)]
    cases = load_zsre_mend(f"{args.data}/zsre/zsre_mend_eval-600.json")
    fit_cases = [c for c in cases if len(m._value_token_ids([c.target_new])[0]) <= m.config.value_code_slots - 1]
    fits = [c.target_new for c in fit_cases]
    sets = {name: m.value_code_ids(v) for name, v in {"held_out_spans": val, "dates": dates, "zsre_answers": fits}.items()}
    if args.steps > 0:
        train_token_code(m, train, val_strings=val, steps=args.steps, log_every=100, copy_prob=args.copy_prob)
    acc = {
        f"{name}@noise{noise}": round(100 * code_accuracy(m, ids, noise=noise)["sequence"], 1)
        for name, ids in sets.items()
        for noise in (0.0, 0.3)
    }
    acc["held_out_spans_copied@noise0.0"] = round(100 * code_accuracy(m, sets["held_out_spans"], copy_prob=1.0)["sequence"], 1)
    acc["zsre_after_their_prompts@noise0.0"] = round(100 * after_prompts(m, fit_cases), 1)
    row = {
        "model": args.model or "default",
        "depth": m.config.value_code_depth,
        "fresh": args.fresh,
        "dates": args.dates,
        "steps": args.steps,
        "start_credit": round(m.token_code.start_credit.item(), 3),
        "copy_prob": args.copy_prob,
        "sequence_accuracy": acc,
    }
    print(json.dumps(row))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
