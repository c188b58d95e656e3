"""Token value code training: pairs, loss falling, calibration against the decoder, run_token_code."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from larimar.testing import tiny_larimar
from larimar.training.data import question_items
from larimar.training.token_code import calibrate_token_code, code_accuracy, code_pairs, train_token_code


def tiny(**over):
    torch.manual_seed(0)
    return tiny_larimar(latent_size=32, keyed_writes=True, value_writes=True, value_code="tokens", value_code_slots=4, **over)


def test_code_pairs_walk_each_sequence_from_a_start_token():
    rows, hist, tgt = code_pairs([[5, 6, 9], [7, 9]], random.Random(0), starts=[1], vocab_size=10, start_prob=1.0)
    assert rows.tolist() == [0, 0, 0, 1, 1]
    assert hist.tolist() == [[1, 1], [5, 1], [6, 5], [1, 1], [7, 1]]  # (prev, the token before it)
    assert tgt.tolist() == [5, 6, 9, 7, 9]
    _, deep, _ = code_pairs([[5, 6, 9]], random.Random(0), starts=[1], vocab_size=10, start_prob=1.0, depth=3)
    assert deep.tolist() == [[1, 1, 1, 1], [5, 1, 1, 1], [6, 5, 1, 1]]  # the whole answer read so far, then prompt tokens
    seq = [5, 6, 8, 9]
    _, copied, _ = code_pairs([seq], random.Random(0), starts=[1], vocab_size=10, start_prob=1.0, depth=5, copy_prob=1.0)
    first = copied[0].tolist()  # before t_0, most recent first: 1-3 prompt tokens (1), then a copied run of the value
    lead = next(i for i, t in enumerate(first) if t != 1)
    n = next((i for i, t in enumerate(first[lead:]) if t == 1), len(first) - lead)
    run = first[lead : lead + n][::-1]
    assert 1 <= lead <= 3 and 1 <= n <= 3
    assert any(run == seq[a : a + n] for a in range(len(seq) - n))  # a run of the value's own tokens, never the end
    assert copied[1:, 0].tolist() == seq[:-1]  # prev is still the answer read so far
    plain = code_pairs([seq], random.Random(0), starts=[1], vocab_size=10, depth=5)
    again = code_pairs([seq], random.Random(0), starts=[1], vocab_size=10, depth=5, copy_prob=0.0)
    assert all(torch.equal(a, b) for a, b in zip(plain, again))  # copy_prob 0 draws exactly as before


def test_training_lowers_the_loss_and_raises_accuracy():
    m = tiny()
    strings = [f"{a} {b}" for a in ("the", "is", "and", "of") for b in ("capital", "Paris", "in", "to")]
    before = code_accuracy(m, m.value_code_ids(strings))["sequence"]
    hist = train_token_code(m, strings, val_strings=strings, steps=60, lr=1e-2, batch=16, noise=0.0, log_every=20, log=lambda _: None)
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert hist[-1]["val_sequence"] > before
    with pytest.raises(ValueError, match="no training strings"):
        train_token_code(m, [], steps=1)


def test_calibration_picks_the_smallest_best_factor_and_scales_the_temperature():
    m = tiny()
    tau = float(m.token_code.log_tau.detach()[0])
    out = calibrate_token_code(m, [("the sky is", "capital Paris"), ("grass is", "and the")], factors=(1.0, 4.0), log=lambda _: None)
    acc = {float(k): v for k, v in out["factors"].items()}
    best = max(acc.values())
    assert out["chosen"] == min(f for f, a in acc.items() if a >= best - 0.005)
    assert float(m.token_code.log_tau.detach()[0]) == pytest.approx(tau + math.log(out["chosen"]))


def test_encoder_models_refuse_token_code_training():
    m = tiny_larimar()
    with pytest.raises(ValueError, match="token value code"):
        train_token_code(m, ["a"], steps=1)


def write_pararel(tmp_path):
    """A one-relation PARAREL tree and its question template file -> (pararel root, templates path)."""
    pr = tmp_path / "pararel"
    (pr / "graphs_json").mkdir(parents=True)
    (pr / "trex_lms_vocab").mkdir()
    (pr / "graphs_json" / "P1.jsonl").write_text(json.dumps({"pattern": "[X] was born in [Y]."}) + "\n")
    facts = [{"sub_label": f"Person {i}", "obj_label": c} for i, c in enumerate(["Paris", "Rome"])]
    (pr / "trex_lms_vocab" / "P1.jsonl").write_text("\n".join(json.dumps(f) for f in facts) + "\n")
    q = tmp_path / "q.json"
    q.write_text(json.dumps({"P1": "Which city was [X] born in?"}))
    return pr, q


def test_question_items_ask_relation_questions(tmp_path):
    pr, q = write_pararel(tmp_path)
    items = question_items(pr, q, ["Oslo", "Lima"], seed=0)
    assert [v for _, v in items] == ["Oslo", "Lima"]
    assert all(p.startswith("Which city was Person ") and p.endswith(" born in?") for p, _ in items)
    q.write_text(json.dumps({"P9": "Where is [X]?"}))
    with pytest.raises(ValueError, match="question template"):
        question_items(pr, q, ["Oslo"])


def test_run_token_code_trains_calibrates_and_keeps_the_initial_adapter(tmp_path):
    from larimar.training.cli import run_token_code
    from larimar.training.module import TRAIN_DEFAULTS, merge

    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_text(" ".join(f"The capital of France is Paris and line {i} goes on." for i in range(40)))
    pr, q = write_pararel(tmp_path)
    init = tiny_larimar(latent_size=32, output_offset=True, output_hidden=8)  # an encoder-code adapter with an output offset
    with torch.no_grad():
        init.M0.mul_(2.0)
    init.save_pretrained(tmp_path / "init")
    m = tiny()
    cfg = merge(TRAIN_DEFAULTS, {
        "data": {"text_root": str(text), "pararel_root": str(pr), "exclude_eval_from": None, "question_templates": str(q)},
        "token_code": {"init_adapter": str(tmp_path / "init"), "strings": 30, "val_strings": 5, "calibration_items": 4,
                       "steps": 3, "batch": 4},
    })
    run_token_code(m, cfg, tmp_path)
    torch.testing.assert_close(m.M0, init.M0)  # the initial adapter's weights, its output offset dropped
    rec = json.loads((tmp_path / "token_code_history.json").read_text())
    assert rec["history"][-1]["step"] == 3 and "chosen" in rec["calibration"]
    run_token_code(m, merge(cfg, {"token_code": {"calibration_factors": [2.0]}}), tmp_path)
    assert json.loads((tmp_path / "token_code_history.json").read_text())["calibration"]["chosen"] == 2.0
    with pytest.raises(ValueError, match="calibration_factors"):
        run_token_code(m, merge(cfg, {"token_code": {"calibration_factors": [0]}}), tmp_path)
    with pytest.raises(ValueError, match="value_code: tokens"):
        run_token_code(tiny_larimar(), cfg, tmp_path)
    with pytest.raises(ValueError, match="unknown keys"):
        run_token_code(m, merge(cfg, {"token_code": {"stpes": 3}}), tmp_path)
    with pytest.raises(ValueError, match="question_templates"):
        run_token_code(m, merge(cfg, {"data": {"question_templates": None}}), tmp_path)


def test_run_token_code_fresh_drops_the_initial_adapters_code(tmp_path):
    """`fresh: true` trains from the model's own initial code, not the init adapter's; `dates` adds
    generic dates to the training strings."""
    from larimar.training.cli import run_token_code
    from larimar.training.module import TRAIN_DEFAULTS, merge

    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_text(" ".join(f"The capital of France is Paris and line {i} goes on." for i in range(40)))
    pr, q = write_pararel(tmp_path)
    init = tiny()
    with torch.no_grad():
        init.token_code.G.mul_(3.0)  # a code the fresh run must not start from
        init.M0.mul_(2.0)
    init.save_pretrained(tmp_path / "init")
    m = tiny()
    G0 = m.token_code.G.detach().clone()
    cfg = merge(TRAIN_DEFAULTS, {
        "data": {"text_root": str(text), "pararel_root": str(pr), "exclude_eval_from": None, "question_templates": str(q)},
        "token_code": {"init_adapter": str(tmp_path / "init"), "fresh": True, "dates": 20, "strings": 30, "val_strings": 5,
                       "calibration_items": 4, "steps": 1, "batch": 4, "lr": 1e-6},
    })
    run_token_code(m, cfg, tmp_path)
    torch.testing.assert_close(m.M0, init.M0)  # the rest is the initial adapter's
    assert (m.token_code.G - G0).abs().max() < 1e-3  # one tiny step from the model's own initial code
    kept = tiny()
    run_token_code(kept, merge(cfg, {"token_code": {"fresh": False}}), tmp_path)
    assert (kept.token_code.G - init.token_code.G).abs().max() < 1e-3  # without it: the file's code, continued


def test_synthetic_dates_are_seeded_and_well_formed():
    from larimar.training.data import MONTHS, synthetic_dates

    dates = synthetic_dates(50, seed=3)
    assert dates == synthetic_dates(50, seed=3) and dates != synthetic_dates(50, seed=4)
    for d in dates:
        day, month, year = d.split(" ")
        assert 1 <= int(day) <= 28 and month in MONTHS and 1000 <= int(year) <= 2029
    assert synthetic_dates(0) == []
    with pytest.raises(ValueError):
        synthetic_dates(-1)


@pytest.mark.parametrize("name", ["small-tokens.yaml", "small-both.yaml", "small-both-d8.yaml"])
def test_token_code_configs_are_valid(name):
    """The shipped token-code recipes parse, build a valid model config and name only known token_code keys."""
    from pathlib import Path

    from larimar.modeling.config import LarimarConfig
    from larimar.training.cli import TOKEN_CODE_KEYS, load_config

    root = Path(__file__).resolve().parents[2]
    model_cfg, train_cfg = load_config(root / "configs" / name)
    cfg = LarimarConfig(**model_cfg)
    tc = train_cfg["token_code"]
    assert cfg.value_code in ("tokens", "both") and set(tc) <= TOKEN_CODE_KEYS
    # the initial adapter is shipped; a recipe that trains on from it starts from no code (the shipped
    # default has one, of another depth since session 18), a fresh one replaces whatever code it has
    init = root / tc["init_adapter"]
    assert (init / "config.json").is_file()
    assert tc.get("fresh", False) or LarimarConfig.load(init / "config.json").value_code == "encoder"
