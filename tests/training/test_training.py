"""Training on tiny configs: data episodes, loss terms, a Lightning fast_dev_run, and loss falling on an overfit set."""

from __future__ import annotations

import json
import random

import pytest
import torch

from larimar.modeling.config import LarimarConfig
from larimar.modeling.model import Larimar
from larimar.testing import tiny_bert, tiny_bert_tokenizer, tiny_llama, tiny_tokenizer
from larimar.training.data import EpisodeSampler, Item, detokenise_wikitext, is_validation, read_documents, split_item
from larimar.training.losses import cyclical_beta, kl_to_standard_normal, weighted_token_ce
from larimar.training.module import LarimarDataModule, LarimarLightning, memory_readout, tokenize_items

MODEL_CFG = dict(latent_size=16, memory_size=12, prefix_len=2, prefix_hidden=8)


def tiny_model() -> Larimar:
    return Larimar(LarimarConfig(**MODEL_CFG), tiny_bert(), tiny_bert_tokenizer(), tiny_llama(kv_heads=1), tiny_tokenizer(pad_token=True))


@pytest.fixture
def corpus(tmp_path):
    text = tmp_path / "text"
    text.mkdir()
    sents = [f"The capital of France is Paris and sentence number {i} is long enough." for i in range(30)]
    (text / "a.txt").write_text(" ".join(sents[:15]) + "\nCHAPTER II\n" + " ".join(sents[15:]))
    pr = tmp_path / "pararel"
    (pr / "graphs_json").mkdir(parents=True)
    (pr / "trex_lms_vocab").mkdir()
    (pr / "graphs_json" / "P1.jsonl").write_text(json.dumps({"pattern": "[X] was born in [Y]."}) + "\n" + json.dumps({"pattern": "[Y] is where [X] lives."}) + "\n")
    facts = [{"sub_label": f"Person {i}", "obj_label": c} for i, c in enumerate(["Paris", "Rome", "Oslo", "Lima"])]
    (pr / "trex_lms_vocab" / "P1.jsonl").write_text("\n".join(json.dumps(f) for f in facts) + "\n")
    return text, pr


def test_cyclical_beta_schedule():
    # 100 steps, 10 cycles of 10: first half of each cycle is 0, then ramps to beta_max
    assert cyclical_beta(0, 100) == 0.0 and cyclical_beta(4, 100) == 0.0
    assert 0 < cyclical_beta(7, 100) < cyclical_beta(9, 100) <= 0.5
    assert cyclical_beta(10, 100) == 0.0


def test_kl_matches_closed_form():
    mu = torch.tensor([[0.5, -1.0]])
    ls = torch.tensor(0.3)
    s2 = torch.exp(2 * ls)
    manual = (0.5 * (s2 + mu**2 - 1) - ls).mean()
    torch.testing.assert_close(kl_to_standard_normal(mu, ls), manual)
    assert float(kl_to_standard_normal(torch.zeros(3, 4), torch.tensor(0.0))) == 0.0


def test_weighted_ce_against_manual():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 5)
    labels = torch.tensor([[1, 2, 3]])
    w = torch.tensor([[0.0, 0.5, 1.0]])
    lp = logits.log_softmax(-1)
    manual = (0.5 * -lp[0, 0, 2] + 1.0 * -lp[0, 1, 3]) / 1.5
    torch.testing.assert_close(weighted_token_ce(logits, labels, w), manual)


def test_memory_readout_is_ridge_solution():
    torch.manual_seed(0)
    Z, M0 = torch.randn(4, 6, dtype=torch.float64), torch.randn(10, 6, dtype=torch.float64)
    Wq, M = memory_readout(Z, Z, M0, 1e-3)
    W = Z @ torch.linalg.pinv(M0)
    direct = torch.linalg.solve(W.T @ W + 1e-3 * torch.eye(10, dtype=torch.float64), W.T @ Z)
    torch.testing.assert_close(M, direct, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(Wq @ M, Z, atol=1e-2, rtol=1e-2)  # reading the written keys gives them back


def test_documents_split_and_items(corpus):
    text, _ = corpus
    docs = read_documents(text)
    assert len(docs) == 2  # split at the CHAPTER line
    assert detokenise_wikitext("a @-@ b , c .") == "a-b, c."
    it = split_item("one two three four five six", random.Random(0))
    assert (it.query + it.continuation) == "one two three four five six" and it.continuation.startswith(" ")
    assert is_validation("x", 1.0) and not is_validation("x", 0.0)


def test_sampler_mixes_text_and_counterfactual_facts(corpus):
    text, pr = corpus
    s = EpisodeSampler(text, pr, val_fraction=0.0, fact_fraction=0.5, seed=0)
    items = s.episode(40)
    kinds = {it.kind for it in items}
    assert kinds == {"text", "fact"}
    facts = [it for it in items if it.kind == "fact"]
    assert all(it.continuation.strip() in {"Paris", "Rome", "Oslo", "Lima"} for it in facts)
    assert all(it.query.startswith("Person") for it in facts)  # only the pattern with [Y] at the end


def test_tokenize_items_weights():
    tok = tiny_tokenizer(pad_token=True)
    out = tokenize_items(tok, [Item("The capital of France is", " Paris", "fact"), Item("Apple", " was founded", "text")], 64, 0.25, "cpu")
    w = out["weights"]
    n_q = len(tok("The capital of France is")["input_ids"])
    assert torch.all(w[0, :n_q] == 0.25) and torch.all(w[0, n_q : out["attention_mask"][0].sum()] == 1.0)
    assert torch.all(w[out["attention_mask"] == 0] == 0)


def test_fast_dev_run(corpus, tmp_path):
    import lightning as L

    text, pr = corpus
    train_cfg = {
        "data": {"text_root": str(text), "pararel_root": str(pr), "exclude_eval_from": None, "episode_size": 4, "n_ae": 1, "n_lm": 1, "val_episodes": 1},
        "trainer": {"max_steps": 1, "precision": "32-true"},
    }
    module = LarimarLightning(MODEL_CFG, train_cfg, model=tiny_model())
    data = LarimarDataModule(module.train_cfg["data"])
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    before = module.model.kv_prefix.out.weight.clone()
    trainer.fit(module, datamodule=data)
    assert not torch.equal(before, module.model.kv_prefix.out.weight)  # a real optimiser step happened


def overfit(module: LarimarLightning, batch: dict, steps: int) -> list[float]:
    """`steps` optimiser steps on one batch -> the memory NLL before each."""
    opt = module.configure_optimizers()["optimizer"]
    losses = []
    for _ in range(steps):
        out = module.episode_losses(batch, 0)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["nll_mem"].detach()))
    return losses


def test_loss_falls_on_tiny_overfit_set(corpus):
    text, pr = corpus
    cfg = {"data": {"text_root": str(text), "pararel_root": str(pr), "exclude_eval_from": None}, "optim": {"lr": 1e-2, "warmup_steps": 1}}
    module = LarimarLightning(MODEL_CFG, cfg, model=tiny_model())
    module.train()
    sampler = EpisodeSampler(text, pr, val_fraction=0.0, seed=0)
    batch = {"items": sampler.episode(4), "lm": [sampler.text_chunk()]}
    torch.manual_seed(0)
    losses = overfit(module, batch, 30)
    assert losses[-1] < 0.8 * losses[0], losses


def test_checkpoint_holds_adapter_only():
    module = LarimarLightning(MODEL_CFG, {}, model=tiny_model())
    ckpt = {"state_dict": {("model." + k): v for k, v in module.model.state_dict().items()}}
    module.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and not any(k.startswith("model.decoder.") for k in ckpt["state_dict"])


def test_memory_readout_survives_bf16_autocast_and_repeated_items():
    torch.manual_seed(0)
    z = torch.randn(1, 6)
    Z = torch.cat([z, z, torch.randn(2, 6)])  # an item drawn twice in one episode
    with torch.autocast("cpu", dtype=torch.bfloat16):
        Wq, M = memory_readout(Z, Z, torch.randn(10, 6), 1e-3)
    assert M.dtype == torch.float32 and torch.isfinite(M).all()
    torch.testing.assert_close(Wq @ M, Z, atol=2e-2, rtol=2e-2)


def test_memory_readout_repeated_large_keys_fall_back_to_jitter():
    """Four identical keys: the float32 Gram (1e5 scale, ridge 1e-3) fails a plain Cholesky."""
    torch.manual_seed(0)
    M0 = torch.randn(10, 6)
    key = 500 * torch.randn(1, 6)
    keys = key.repeat(4, 1)
    gram = (keys @ torch.linalg.pinv(M0)) @ (keys @ torch.linalg.pinv(M0)).T + 1e-3 * torch.eye(4)
    assert torch.linalg.cholesky_ex(gram).info != 0  # the case this guards against
    Z = torch.randn(4, 6)
    Wq, M = memory_readout(Z, keys[:1], M0, 1e-3, keys=keys)
    assert torch.isfinite(M).all()
    # one key, four values: about their mean (float32; the jittered solve's round-off depends on the BLAS,
    # 0.15 off seen on an AMD EPYC), and nearer to it than to any single value
    r = Wq @ M
    torch.testing.assert_close(r, Z.mean(0, keepdim=True), atol=0.25, rtol=0)
    assert (r - Z.mean(0)).norm() < (r - Z).norm(dim=-1).min()


# ---------------------------------------------------------------------------------------------- stage 1
def tiny_output_model() -> Larimar:
    cfg = LarimarConfig(**MODEL_CFG, output_offset=True, output_hidden=32)
    return Larimar(cfg, tiny_bert(), tiny_bert_tokenizer(), tiny_llama(kv_heads=1), tiny_tokenizer(pad_token=True))


def test_warmstart_set_caches_object_positions(corpus):
    from larimar.training.warmstart import build_set

    _, pr = corpus
    m = tiny_output_model()
    sampler = EpisodeSampler(None, pr, fact_fraction=1.0, val_fraction=0.0)
    ws = build_set(m, sampler, 6, max_tokens=32, batch_size=4, progress=False)
    assert len(ws) == 6 and ws.emb_text.shape[0] == 6  # encoder embeddings, before the head
    assert ws.hidden.shape == (len(ws.target), m.kv_shape.hidden_size)
    for i in range(6):  # every item has object rows; their targets spell the last tokens of the fact
        for v in (0, 1):  # as asked, and as asked with another pattern
            rows = ((ws.row_item == i) & (ws.row_variant == v)).nonzero().squeeze(1)
            assert bool(ws.is_object[rows].any())
    objects = {"Paris", "Rome", "Oslo", "Lima"}
    tok = m.tokenizer
    obj_ids = {t for o in objects for t in tok(" " + o, add_special_tokens=False)["input_ids"]}
    assert set(ws.target[ws.is_object].tolist()) <= obj_ids


def test_warmstart_loss_falls_and_reaches_decoder(corpus):
    from larimar.training.warmstart import build_set, evaluate_warmstart, train_warmstart

    _, pr = corpus
    torch.manual_seed(0)
    m = tiny_output_model()
    sampler = EpisodeSampler(None, pr, fact_fraction=1.0, val_fraction=0.0)
    ws = build_set(m, sampler, 4, max_tokens=32, progress=False)  # one episode of 4 facts, seen every step
    hist = train_warmstart(m, ws, steps=100, lr=1e-2, items_per_step=4, episode_sizes=(4,), rephrase_prob=0.0,
                           distractor_prob=0.0, log_every=20, progress=False)
    assert hist[-1]["ce_object"] < 0.5 * hist[0]["ce_object"], [h["ce_object"] for h in hist]
    res = evaluate_warmstart(m, ws, episode_size=4)
    assert {"acc_query", "acc_rephrase"} <= set(res) and 0 <= res["acc_query"] <= 1
    assert "kl_distractor" not in res  # no other facts: no distractor figure
    assert m.out_offset.proj.weight.abs().sum() > 0  # the trained offset is non-zero and used by `conditioning`
    assert m.conditioning(torch.randn(1, 16)).output is not None


def test_run_warmstart_saves_and_resumes(corpus, tmp_path):
    from safetensors.torch import load_file

    from larimar.training.cli import run_warmstart
    from larimar.training.module import TRAIN_DEFAULTS, merge

    _, pr = corpus
    cfg = merge(TRAIN_DEFAULTS, {"data": {"pararel_root": str(pr), "exclude_eval_from": None, "val_fraction": 0.0},
                                 "warmstart": {"steps": 3, "items": 8, "val_items": 4, "log_every": 3}})
    m = tiny_output_model()
    run_warmstart(m, cfg, tmp_path / "ws")
    saved = load_file(str(tmp_path / "ws" / "adapter.safetensors"))
    assert (tmp_path / "ws" / "history.json").is_file()
    m2 = tiny_output_model()
    run_warmstart(m2, cfg, tmp_path / "ws")  # reuses the saved result instead of training again
    for k, v in saved.items():
        assert torch.equal(m2.adapter_state()[k], v), k


def write_questions(pr) -> Path:
    path = pr / "questions.json"
    path.write_text(json.dumps({"P1": "Which city was [X] born in?", "P2": "no placeholder", "P3": 7}))
    return path


def test_question_items_ask_the_template_and_rephrase_with_a_pattern(corpus):
    import random

    from larimar.training.data import load_question_templates, load_relations

    _, pr = corpus
    qpath = write_questions(pr)
    assert load_question_templates(qpath) == {"P1": "Which city was [X] born in?"}  # malformed entries dropped
    rel = load_relations(pr, question_templates=qpath)["P1"]
    item, alt = rel.sample_with_rephrase(random.Random(0), question_prob=1.0)
    assert item.query.startswith("Which city was Person ") and item.query.endswith(" born in?")
    assert item.continuation in {" Paris", " Rome", " Oslo", " Lima"}
    assert "born in" in alt or "lives" in alt  # a cloze pattern for the same subject
    assert alt.split(" was ")[0] in item.query or alt.split(" is where ")[-1].removesuffix(" lives") in item.query
    plain = load_relations(pr)["P1"]  # without templates (or question_prob 0) the draws are the cloze ones
    assert plain.question is None
    assert plain.sample_with_rephrase(random.Random(3)) == rel.sample_with_rephrase(random.Random(3), question_prob=0.0)
    (pr / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_question_templates(pr / "bad.json")


def test_open_object_pool_draws_any_entity_or_year(corpus):
    from larimar.training.data import load_relations

    _, pr = corpus
    (pr / "graphs_json" / "P2.jsonl").write_text(json.dumps({"pattern": "[X] works for [Y]."}) + "\n")
    (pr / "trex_lms_vocab" / "P2.jsonl").write_text("\n".join(json.dumps({"sub_label": f"Worker {i}", "obj_label": c}) for i, c in enumerate(["Acme", "Initech"])) + "\n")
    closed = load_relations(pr)
    assert set(closed["P1"].objects) == {"Paris", "Rome", "Oslo", "Lima"}
    opened = load_relations(pr, object_pool="open")
    pool = set(opened["P1"].objects)
    assert {"Paris", "Acme", "Person 0", "Worker 1", "1000", "2029"} <= pool and pool == set(opened["P2"].objects)
    mixed = load_relations(pr, object_pool="mixed")["P1"]
    rng = random.Random(0)
    drawn = [mixed.sample(rng).continuation.strip() for _ in range(2000)]
    own = sum(o in closed["P1"].objects for o in drawn) / len(drawn)
    assert set(drawn) <= pool and 0.45 < own < 0.6  # half own objects (plus the open pool's share of them)
    with pytest.raises(ValueError, match="object_pool"):
        load_relations(pr, object_pool="global")


def test_unknown_object_prob_replaces_objects_and_keeps_draws_when_zero(corpus):
    import random

    from larimar.training.data import UNKNOWN_OBJECT, load_relations

    _, pr = corpus
    plain = load_relations(pr)["P1"]
    none = load_relations(pr, unknown_prob=0.0)["P1"]
    assert [plain.sample(random.Random(s)) for s in range(20)] == [none.sample(random.Random(s)) for s in range(20)]
    rel = load_relations(pr, unknown_prob=0.3)["P1"]
    rng = random.Random(0)
    objects = [rel.sample(rng).continuation.strip() for _ in range(2000)]
    share = objects.count(UNKNOWN_OBJECT) / len(objects)
    assert 0.25 < share < 0.35 and set(objects) - {UNKNOWN_OBJECT} <= set(plain.objects)
    item, _ = rel.sample_with_rephrase(random.Random(1))
    assert item.continuation.startswith(" ")
    with pytest.raises(ValueError, match="unknown_prob"):
        load_relations(pr, unknown_prob=1.0)


def test_concat_sets_keeps_every_item_rows(corpus):
    from larimar.training.warmstart import _rows_by_item, build_set, concat_sets

    _, pr = corpus
    m = tiny_output_model()
    sampler = EpisodeSampler(None, pr, fact_fraction=1.0, val_fraction=0.0)
    a = build_set(m, sampler, 3, max_tokens=32, progress=False, seed=0)
    b = build_set(m, sampler, 2, max_tokens=32, progress=False, seed=1)
    ab = concat_sets([a, b])
    assert len(ab) == 5 and ab.hidden.shape[0] == a.hidden.shape[0] + b.hidden.shape[0]
    rows_ab, rows_b = _rows_by_item(ab), _rows_by_item(b)
    for i in range(2):  # item i of b is item 3 + i of the concatenation, with the same cached rows
        for v in (0, 1):
            torch.testing.assert_close(ab.hidden[rows_ab[2 * (3 + i) + v]], b.hidden[rows_b[2 * i + v]])
            assert torch.equal(ab.target[rows_ab[2 * (3 + i) + v]], b.target[rows_b[2 * i + v]])


def test_run_warmstart_question_items_and_init_adapter(corpus, tmp_path):
    """Question items are cached beside the fact items and validated apart; init_adapter expands a 1-head offset."""
    from larimar.training.cli import run_warmstart
    from larimar.training.module import TRAIN_DEFAULTS, merge

    _, pr = corpus
    one = tiny_output_model()
    with torch.no_grad():
        one.out_offset.proj.weight.normal_(0, 0.1)
    one.save_pretrained(tmp_path / "init")
    cfg = merge(TRAIN_DEFAULTS, {
        "data": {"pararel_root": str(pr), "exclude_eval_from": None, "val_fraction": 0.0, "question_templates": str(write_questions(pr))},
        "warmstart": {"steps": 2, "items": 6, "val_items": 4, "log_every": 2, "question_items": 5, "question_val_items": 4,
                      "init_adapter": str(tmp_path / "init"), "lr": 0.0},
    })
    cfg_model = LarimarConfig(**MODEL_CFG, output_offset=True, output_hidden=32, output_heads=2)
    m = Larimar(cfg_model, tiny_bert(), tiny_bert_tokenizer(), tiny_llama(kv_heads=1), tiny_tokenizer(pad_token=True))
    run_warmstart(m, cfg, tmp_path / "ws")
    assert (tmp_path / "ws" / "sets_questions.pt").is_file()
    hist = json.loads((tmp_path / "ws" / "history.json").read_text())
    assert "val_question_acc_query" in hist[-1]
    H = m.kv_shape.hidden_size  # lr 0: head 1 is the initial adapter's offset, head 2 starts at zero
    torch.testing.assert_close(m.out_offset.proj.weight[:H], one.out_offset.proj.weight)
    assert m.out_offset.proj.weight[H:].abs().sum() == 0
    cfg["data"]["question_templates"] = None
    with pytest.raises(ValueError, match="question_templates"):
        run_warmstart(m, cfg, tmp_path / "ws2")


def test_multi_head_output_offset_trains(corpus):
    """A 2-head offset trains on the cached states like the 1-head one (loss falls)."""
    from larimar.training.warmstart import build_set, train_warmstart

    _, pr = corpus
    torch.manual_seed(0)
    cfg = LarimarConfig(**MODEL_CFG, output_offset=True, output_hidden=32, output_heads=2)
    m = Larimar(cfg, tiny_bert(), tiny_bert_tokenizer(), tiny_llama(kv_heads=1), tiny_tokenizer(pad_token=True))
    ws = build_set(m, EpisodeSampler(None, pr, fact_fraction=1.0, val_fraction=0.0), 4, max_tokens=32, progress=False)
    hist = train_warmstart(m, ws, steps=100, lr=1e-2, items_per_step=4, episode_sizes=(4,), rephrase_prob=0.0,
                           distractor_prob=0.0, log_every=20, progress=False)
    assert hist[-1]["ce_object"] < 0.5 * hist[0]["ce_object"], [h["ce_object"] for h in hist]
    assert m.out_offset.proj.weight[m.kv_shape.hidden_size :].abs().sum() > 0  # the second head learned too


def test_warmstart_value_writes_store_object_latents(corpus):
    """With value_writes, keyed episodes write the objects' embeddings: the loss changes with emb_value only then."""
    import dataclasses

    from larimar.training.warmstart import Episode, _rows_by_item, build_set, warmstart_loss

    _, pr = corpus
    m = tiny_output_model()
    with torch.no_grad():
        m.out_offset.proj.weight.normal_(0, 0.5)
    ws = build_set(m, EpisodeSampler(None, pr, fact_fraction=1.0, val_fraction=0.0), 4, max_tokens=32, progress=False)
    assert ws.emb_value is not None and ws.emb_value.shape == ws.emb_text.shape
    other = dataclasses.replace(ws, emb_value=torch.randn_like(ws.emb_value))
    rows = _rows_by_item(ws)
    eps = [Episode([0, 1, 2, 3], [0, 1], [False, False], keyed=True)]

    def loss(model, s):
        return float(warmstart_loss(model, s, rows, eps, noise=False)["loss"])

    assert loss(m, ws) == loss(m, other)  # fact writes ignore the value embeddings
    m.config = m.config.replace(keyed_writes=True, value_writes=True)
    assert loss(m, ws) != loss(m, other)
    with pytest.raises(ValueError, match="no value embeddings"):
        loss(m, dataclasses.replace(ws, emb_value=None))


def test_memory_readout_keyed_write_answers_exact_keys():
    """Keyed write: W from the keys; reading with a key returns (about) its own Z row, not the key."""
    g = torch.Generator().manual_seed(0)
    M0 = torch.randn(32, 12, generator=g, dtype=torch.float64)
    Z, keys = torch.randn(5, 12, generator=g, dtype=torch.float64), torch.randn(5, 12, generator=g, dtype=torch.float64)
    Wq, M = memory_readout(Z, keys, M0, 1e-9, keys=keys)
    torch.testing.assert_close(Wq @ M, Z, atol=1e-5, rtol=1e-5)
    W = keys @ torch.linalg.pinv(M0)  # independent formula: ridge solution M = W^T (W W^T + lam I)^-1 Z
    torch.testing.assert_close(M, W.T @ torch.linalg.solve(W @ W.T + 1e-9 * torch.eye(5, dtype=torch.float64), Z))
    _, M_auto = memory_readout(Z, keys, M0, 1e-9)  # without keys the rows address themselves
    assert not torch.allclose(M_auto, M)


def test_sample_episodes_large_keyed_episode():
    import random

    from larimar.training.warmstart import sample_episodes

    rng = random.Random(0)
    for _ in range(20):
        eps = sample_episodes(rng, 1000, 64, (4, 8), 0.5, 0.25, keyed_prob=0.0, large_prob=1.0, large_max=300, large_query_items=16)
        big = eps[0]
        assert big.keyed and 64 <= len(big.items) <= 300 and big.queried == big.items[:16]
        assert len(set(big.items)) == len(big.items)
        assert not any(e.keyed for e in eps[1:])  # keyed_prob 0: the small episodes stay auto-associative
        assert sum(len(e.queried) for e in eps) >= 64
        assert all(len(e.rephrase) == len(e.queried) for e in eps)
    small = sample_episodes(rng, 3, 8, (16,), 0.0, 0.0, large_prob=1.0, large_query_items=2)  # fewer items than 64
    assert len(small[0].items) == 3 and small[0].keyed


def test_warmstart_keyed_loss_falls(corpus):
    from larimar.training.warmstart import build_set, evaluate_warmstart, train_warmstart

    _, pr = corpus
    torch.manual_seed(0)
    m = tiny_output_model()
    sampler = EpisodeSampler(None, pr, fact_fraction=1.0, val_fraction=0.0)
    ws = build_set(m, sampler, 4, max_tokens=32, progress=False)
    hist = train_warmstart(m, ws, steps=100, lr=1e-2, items_per_step=4, episode_sizes=(4,), rephrase_prob=0.0,
                           distractor_prob=0.0, keyed_prob=1.0, large_episode_prob=0.5, large_query_items=2,
                           log_every=20, progress=False)
    assert hist[-1]["ce_object"] < 0.5 * hist[0]["ce_object"], [h["ce_object"] for h in hist]
    assert {"val_keyed_acc_query"} <= set(train_warmstart(m, ws, steps=1, val=ws, keyed_prob=1.0, log_every=1, progress=False)[0])
    assert 0 <= evaluate_warmstart(m, ws, episode_size=4, keyed=True, max_queried=2)["acc_query"] <= 1


def test_word_spans_names_and_phrases_excluded_and_seeded():
    from larimar.training.data import word_spans

    texts = [
        "Yesterday the Battle of Hastings was fought near Pevensey Bay by King Harold -- and lost. It rained.",
        "Ada Lovelace wrote notes on the Analytical Engine in <unk> London.",
    ]
    spans = word_spans(texts, 1000, seed=0, exclude={"london"})
    names = {"Yesterday", "Battle", "Hastings", "Pevensey Bay", "King Harold", "It", "Ada Lovelace", "Analytical Engine"}
    assert names <= set(spans)  # capitalised runs, cut at lower-case words
    assert "London" not in spans and not any("unk" in s.split() or "--" in s for s in spans)
    assert len(spans) == len(set(spans))
    flat = [" ".join(t.replace("--", " ").replace(".", "").replace("<unk>", "|").split()) for t in texts]
    for s in spans:  # every span is a run of 1-4 consecutive words of a text, never across <unk>
        assert 1 <= len(s.split()) <= 4 and any(s in t for t in flat), s
    assert word_spans(texts, 1000, seed=0, exclude={"london"}) == spans  # deterministic
    few = word_spans(texts, 4, seed=1)
    assert len(few) == 4 and sum(s in names | {"London"} for s in few) == 2  # half names, half phrases
    assert word_spans(texts, 0) == []


def test_open_text_spans_join_the_open_pool_without_eval_strings(corpus, tmp_path):
    from larimar.training.data import EpisodeSampler, load_relations

    text, pr = corpus
    (text / "b.txt").write_text("Grace Hopper met Alan Turing in Bletchley Park. " * 3)
    data = tmp_path / "data"
    (data / "zsre").mkdir(parents=True)
    (data / "zsre" / "z.json").write_text(json.dumps([{"subject": "Someone", "src": "q?", "alt": "Alan Turing", "answers": ["x"]}]))
    base = load_relations(pr, object_pool="mixed")["P1"].open_objects
    kw = dict(fact_fraction=1.0, object_pool="mixed", open_text_spans=50, exclude_eval_from=data, val_fraction=0.0)
    sampler = EpisodeSampler(text, pr, **kw)
    pool = set(sampler.relations[0].open_objects)
    assert set(base) < pool and {"Grace Hopper", "Bletchley Park"} <= pool
    assert "Alan Turing" not in pool  # an evaluation answer never becomes a training object
    with pytest.raises(ValueError, match="text_root"):
        EpisodeSampler(None, pr, **kw)
    with pytest.raises(ValueError, match="extra_open"):
        load_relations(pr, extra_open=["x"])


def test_spelling_set_borrows_host_first_object_rows_and_trains(corpus):
    """Spelling items: the host's query latents and first-object decoder state, the span's value and first token."""
    from larimar.training.warmstart import Episode, _rows_by_item, build_set, spelling_set, train_warmstart, warmstart_loss

    _, pr = corpus
    torch.manual_seed(0)
    m = tiny_output_model()
    m.config = m.config.replace(keyed_writes=True, value_writes=True)
    host = build_set(m, EpisodeSampler(None, pr, fact_fraction=1.0, val_fraction=0.0), 5, max_tokens=32, progress=False)
    spans = ["Grace Hopper", "Bletchley Park", "the mantelpiece", "Turing"]
    sp = spelling_set(m, host, spans, seed=0)
    assert len(sp) == 4 and sp.hidden.shape == (8, host.hidden.shape[1])
    firsts = [m.tokenizer(" " + s, add_special_tokens=False)["input_ids"][0] for s in spans]
    assert sp.target.tolist() == [t for t in firsts for _ in (0, 1)] and bool(sp.is_object.all())
    torch.testing.assert_close(sp.emb_value, m.encoder.embed(spans).float())
    host_rows = _rows_by_item(host)
    for i in range(4):
        h = int((host.emb_query == sp.emb_query[i]).all(-1).nonzero()[0])  # the borrowed host item
        torch.testing.assert_close(sp.emb_rephrase[i], host.emb_rephrase[h])
        for v in (0, 1):
            r = host_rows[2 * h + v]
            first = r[host.is_object[r]][0]  # the host's first object position, as asked / rephrased
            torch.testing.assert_close(sp.hidden[2 * i + v], host.hidden[first])
    with pytest.raises(ValueError, match="no objects"):
        spelling_set(m, host, [])

    n = len(host)  # training on host + spelling items lowers the spelling items' loss
    both = __import__("larimar.training.warmstart", fromlist=["concat_sets"]).concat_sets([host, sp])
    eps = [Episode([n, n + 1, n + 2, n + 3], [n, n + 1, n + 2, n + 3], [False, True, False, True], keyed=True)]

    def spell_loss():
        with torch.no_grad():
            return float(warmstart_loss(m, both, _rows_by_item(both), eps, noise=False)["ce_object"])

    before = spell_loss()
    train_warmstart(m, host, steps=60, lr=1e-2, items_per_step=2, episode_sizes=(2,), spelling=sp, spelling_per_step=4,
                    log_every=60, progress=False)
    assert spell_loss() < 0.5 * before
    m.config = m.config.replace(value_writes=False)
    with pytest.raises(ValueError, match="value_writes"):
        train_warmstart(m, host, steps=1, spelling=sp, progress=False)


def test_run_warmstart_spelling_items_cached_and_validated(corpus, tmp_path):
    from larimar.training.cli import run_warmstart
    from larimar.training.module import TRAIN_DEFAULTS, merge

    text, pr = corpus
    (text / "b.txt").write_text("Grace Hopper met Alan Turing near Bletchley Park in the war. " * 4)
    cfg = merge(TRAIN_DEFAULTS, {
        "data": {"text_root": str(text), "pararel_root": str(pr), "exclude_eval_from": None, "val_fraction": 0.0},
        "warmstart": {"steps": 2, "items": 6, "val_items": 4, "log_every": 2, "spelling_items": 6, "spelling_val_items": 3,
                      "spelling_per_step": 4, "keyed_prob": 1.0},
    })
    m = Larimar(LarimarConfig(**MODEL_CFG, output_offset=True, output_hidden=32, keyed_writes=True, value_writes=True),
                tiny_bert(), tiny_bert_tokenizer(), tiny_llama(kv_heads=1), tiny_tokenizer(pad_token=True))
    run_warmstart(m, cfg, tmp_path / "ws")
    sets = torch.load(tmp_path / "ws" / "sets_spelling.pt", weights_only=False)
    assert len(sets["train"]) == 6 and len(sets["val"]) == 3
    assert "val_spelling_acc_query" in json.loads((tmp_path / "ws" / "history.json").read_text())[-1]
    cfg["data"]["text_root"] = None
    with pytest.raises(ValueError, match="text_root"):
        run_warmstart(m, cfg, tmp_path / "ws2")


def test_warmstart_train_latents_false_keeps_head_and_M0(corpus):
    from larimar.training.warmstart import build_set, train_warmstart

    _, pr = corpus
    torch.manual_seed(0)
    m = tiny_output_model()
    ws = build_set(m, EpisodeSampler(None, pr, fact_fraction=1.0, val_fraction=0.0), 4, max_tokens=32, progress=False)
    head = {k: v.clone() for k, v in m.encoder.head.state_dict().items()}
    M0, offset = m.M0.detach().clone(), m.out_offset.proj.weight.detach().clone()
    train_warmstart(m, ws, steps=3, lr=1e-2, items_per_step=4, episode_sizes=(4,), train_latents=False, progress=False)
    assert all(torch.equal(v, m.encoder.head.state_dict()[k]) for k, v in head.items()) and torch.equal(M0, m.M0)
    assert not torch.equal(offset, m.out_offset.proj.weight)
    train_warmstart(m, ws, steps=3, lr=1e-2, items_per_step=4, episode_sizes=(4,), progress=False)
    assert not torch.equal(M0, m.M0)  # the default trains them


@pytest.mark.parametrize("train_latents", [False, True])
def test_run_warmstart_inherits_the_initial_scope_detector(corpus, tmp_path, capsys, train_latents):
    from larimar.modeling.model import SCOPE_IDF_FILE
    from larimar.training.cli import run_warmstart
    from larimar.training.module import TRAIN_DEFAULTS, merge

    _, pr = corpus
    init = tiny_output_model()
    init.config = init.config.replace(scope_threshold=0.42, scope_lexical_weight=0.3)
    init.set_scope_idf({"paris": 2.5})
    init.save_pretrained(tmp_path / "init")
    cfg = merge(TRAIN_DEFAULTS, {
        "data": {"pararel_root": str(pr), "exclude_eval_from": None, "val_fraction": 0.0},
        "warmstart": {"steps": 1, "items": 4, "val_items": 4, "log_every": 1, "init_adapter": str(tmp_path / "init"),
                      "train_latents": train_latents},
    })
    m = tiny_output_model()
    assert m.config.scope_threshold != 0.42
    run_warmstart(m, cfg, tmp_path / "ws")
    saved = json.loads((tmp_path / "ws" / "config.json").read_text())
    assert (saved["scope_threshold"], saved["scope_lexical_weight"]) == (0.42, 0.3)
    assert json.loads((tmp_path / "ws" / SCOPE_IDF_FILE).read_text()) == {"paris": 2.5}
    assert ("recalibrate" in capsys.readouterr().out) == train_latents


# ------------------------------------------------------------------ stage 2 as the editors write (value encoder)
def value_model(**over) -> Larimar:
    cfg = LarimarConfig(**{**MODEL_CFG, "keyed_writes": True, "value_writes": True, "value_encoder_layers": 1, **over})
    return Larimar(cfg, tiny_bert(), tiny_bert_tokenizer(), tiny_llama(kv_heads=1), tiny_tokenizer(pad_token=True))


def test_sampler_rephrase_and_questions_set_ask(corpus, tmp_path):
    text, pr = corpus
    with open(pr / "graphs_json" / "P1.jsonl", "a") as f:  # a second cloze pattern to rephrase with
        f.write(json.dumps({"pattern": "The birthplace of [X] is [Y]."}) + "\n")
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps({"P1": "Where was [X] born?"}))
    s = EpisodeSampler(text, pr, fact_fraction=1.0, val_fraction=0.0, seed=0, question_templates=questions, rephrase_prob=1.0, question_prob=0.5)
    items = s.episode(40)
    assert all(it.ask is not None and it.ask != it.query and it.asked == it.ask for it in items)
    assert any(it.query.startswith("Where was") for it in items) and any(not it.query.startswith("Where was") for it in items)
    for it in items:  # the same subject in the written and the asked query
        subject = next(w for w in ("Person 0", "Person 1", "Person 2", "Person 3") if w in it.query)
        assert subject in it.ask
    d = EpisodeSampler(text, pr, fact_fraction=1.0, val_fraction=0.0, seed=0, distractor_prob=1.0).episode(20)
    for it in d:  # asked after a corpus sentence; the written query stays plain
        sentence, _, rest = it.ask.partition(". ")
        assert sentence + "." in s.texts and rest == it.query and "sentence number" not in it.query
    plain = EpisodeSampler(text, pr, fact_fraction=1.0, val_fraction=0.0, seed=0).episode(10)
    again = EpisodeSampler(text, pr, fact_fraction=1.0, val_fraction=0.0, seed=0, rephrase_prob=0.0).episode(10)
    assert plain == again and all(it.ask is None for it in plain)  # off: the draws of earlier versions


def test_tokenize_items_uses_the_asked_query():
    tok = tiny_tokenizer(pad_token=True)
    out = tokenize_items(tok, [Item("Alpha beta is", " Paris", "fact", ask="Where is alpha beta?")], 64, 0.25, "cpu")
    want = tok("Where is alpha beta? Paris", add_special_tokens=False)["input_ids"]
    assert out["input_ids"][0, : len(want)].tolist() == want


def test_tokenize_items_keeps_the_answer_of_a_long_ask():
    tok = tiny_tokenizer(pad_token=True)
    long_ask = "one two three four five six seven eight nine ten. Alpha beta is"
    it = Item("Alpha beta is", " Paris", "fact", ask=long_ask)
    whole = tok(long_ask + " Paris", add_special_tokens=False)["input_ids"]
    answer = whole[len(tok(long_ask, add_special_tokens=False)["input_ids"]) :]
    out = tokenize_items(tok, [it], len(whole) - 3, 0.25, "cpu")
    ids, w = out["input_ids"][0], out["weights"][0]
    assert ids.tolist() == whole[3:]  # the start of the ask is cut, the answer stays
    assert ids[-len(answer) :].tolist() == answer and torch.all(w[-len(answer) :] == 1.0) and torch.all(w[: -len(answer)] == 0.25)
    short = tokenize_items(tok, [Item("Alpha beta is", " Paris", "fact")], 64, 0.25, "cpu")["input_ids"][0]
    assert short.tolist() == tok("Alpha beta is Paris", add_special_tokens=False)["input_ids"]  # short rows unchanged


def test_value_encoder_trains_top_blocks_only_and_round_trips(tmp_path):
    m = value_model()
    enc = m.encoder
    trainable = {n for n, p in enc.value_model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("encoder.layer.1.") for n in trainable)  # tiny BERT: 2 blocks, the top one trains
    state = m.adapter_state()
    saved = {k for k in state if k.startswith("encoder.value_model.")}
    assert saved == {"encoder.value_model." + n for n in trainable}
    # before training, values encode exactly as through the frozen encoder
    texts = ["Paris", "the Battle of Hastings"]
    assert torch.allclose(enc.encode_values(texts), enc(texts), atol=1e-6)
    with torch.no_grad():
        for n, p in enc.value_model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    moved = enc.encode_values(texts)
    assert not torch.allclose(moved, enc(texts), atol=1e-3)
    m.save_pretrained(tmp_path / "a")
    again = Larimar(m.config, tiny_bert(), tiny_bert_tokenizer(), tiny_llama(kv_heads=1), tiny_tokenizer(pad_token=True), init_prefix=False)
    from safetensors.torch import load_file

    again.load_adapter_state(load_file(str(tmp_path / "a" / "adapter.safetensors")))
    assert torch.allclose(again.encoder.encode_values(texts), moved, atol=1e-6)
    assert torch.allclose(again.encoder(texts), enc(texts), atol=1e-6)  # keys and queries untouched


def test_value_writes_store_value_encoder_latents():
    m = value_model()
    with torch.no_grad():
        for p in m.encoder.value_model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    m.write_facts(["Alpha beta is Paris."], ["Alpha beta is"])
    stored = m.facts.state.M  # one keyed fact: M = w^T (w w^T + λ)^-1 z  ->  z = read(key) up to the ridge
    assert stored.abs().sum() > 0
    z = m.read_latents(m.encoder(["Alpha beta is"]))
    zv, zf = m.encoder.encode_values(["Paris"]).double(), m.encoder(["Paris"]).double()
    cos = torch.nn.functional.cosine_similarity
    assert cos(z.double(), zv).item() > 0.99 and cos(z.double(), zv).item() > cos(z.double(), zf).item() + 1e-3


def test_stage2_keyed_value_step_trains_chosen_parts_only(corpus):
    text, pr = corpus
    cfg = {
        "data": {"text_root": str(text), "pararel_root": str(pr), "exclude_eval_from": None, "keyed": True, "value_writes": True,
                 "rephrase_prob": 0.5, "fact_period": True, "n_ae": 1, "n_lm": 1},
        "trainable": ["prefix", "value_encoder"],
        "optim": {"lr": 3e-2, "encoder_lr": 1e-3, "warmup_steps": 1},
    }
    m = value_model()
    module = LarimarLightning(m.config.to_dict(), cfg, model=m)
    module.train()
    assert not m.encoder.value_model.training and not m.decoder.training  # base models never in train mode
    head, M0 = m.encoder.head.weight.clone(), m.M0.detach().clone()
    value_before = {n: p.detach().clone() for n, p in m.encoder.value_model.named_parameters()}
    sampler = EpisodeSampler(text, pr, val_fraction=0.0, seed=0, rephrase_prob=0.5)
    batch = {"items": sampler.episode(4), "lm": [sampler.text_chunk()]}
    losses = overfit(module, batch, 40)
    assert losses[-1] < 0.8 * losses[0], losses
    assert torch.equal(head, m.encoder.head.weight) and torch.equal(M0, m.M0)  # latents not in `trainable`
    changed = {n for n, p in m.encoder.value_model.named_parameters() if not torch.equal(p, value_before[n])}
    assert changed and all(n.startswith("encoder.layer.1.") for n in changed)
    with pytest.raises(ValueError, match="unknown parts"):
        LarimarLightning(m.config.to_dict(), {"trainable": ["decoder"]}, model=m)


def test_stage2_init_adapter_keeps_the_start_exact(corpus, tmp_path):
    """A stage-2 run from a saved adapter without value blocks starts from exactly that adapter."""
    from larimar.training.cli import init_stage2

    plain = value_model(value_encoder_layers=0)
    with torch.no_grad():
        plain.M0.add_(0.3)
    plain.save_pretrained(tmp_path / "init")
    m = value_model()
    module = LarimarLightning(m.config.to_dict(), {"trainable": ["prefix"]}, model=m)
    init_stage2(module, tmp_path / "init")
    assert torch.equal(m.M0, plain.M0)
    texts = ["Paris"]
    assert torch.allclose(m.encoder.encode_values(texts), plain.encoder(texts), atol=1e-6)


# ------------------------------------------------------------------ stage 2 with the token code in the loop
def code_model() -> Larimar:
    from larimar.testing import tiny_larimar, tiny_word_pairs
    from larimar.training.token_code import train_token_code

    torch.manual_seed(0)
    m = tiny_larimar(latent_size=16, keyed_writes=True, value_writes=True, value_code="both", value_code_slots=4, output_offset=True, output_hidden=16)
    train_token_code(m, tiny_word_pairs(200, 0), steps=60, lr=1e-2, batch=32, noise=0.1, log=lambda _: None)
    m.token_code.zero_grad(set_to_none=True)
    return m


CODE_ITEMS = [Item("the sky is", " red", "fact"), Item("a cat is", " and the", "fact"), Item("grass is", " capital Paris", "fact")]
CODE_CFG = {"data": {"keyed": True, "value_writes": True, "n_ae": 1, "n_lm": 1, "context_weight": 0.0}, "trainable": ["prefix", "emb_offset"],
            "optim": {"lr": 3e-2, "warmup_steps": 1}}


def test_stage2_memory_rows_read_values_with_their_token_code_as_inference_does():
    """With value_code "both" a stage-2 episode stores [latent, ||latent||·code] rows: its memory NLL equals the one
    of write_facts + read + conditioning (the editors' path), and differs from the same weights storing latents alone."""
    m = code_model()
    module = LarimarLightning(m.config.to_dict(), CODE_CFG, model=m)
    module.eval()
    batch = {"items": CODE_ITEMS, "lm": [Item("", " the sky is red", "text")]}
    with torch.no_grad():
        nll = module.episode_losses(batch, 0)["nll_mem"]
        m.reset_memory()
        m.write_facts([it.text for it in CODE_ITEMS], [it.query for it in CODE_ITEMS])
        q = m.encoder([it.asked for it in CODE_ITEMS])
        z = m.read_latents(q)  # (E, 2C)
        assert z.shape[1] == 2 * m.config.latent_size
        tok = tokenize_items(m.tokenizer, CODE_ITEMS, 64, 0.0, m.device)
        logits = m.runner.forward(tok["input_ids"], tok["attention_mask"], m.conditioning(z, q)).logits
        expected = weighted_token_ce(logits, tok["input_ids"], tok["weights"])
        latent_only = m.runner.forward(tok["input_ids"], tok["attention_mask"], m.conditioning(z[:, : m.config.latent_size], q)).logits
    assert torch.allclose(nll, expected, atol=1e-4), (float(nll), float(expected))
    assert abs(float(weighted_token_ce(latent_only, tok["input_ids"], tok["weights"])) - float(nll)) > 1e-2  # the code took part


def test_stage2_with_token_code_trains_the_prefix_and_leaves_the_code():
    m = code_model()
    module = LarimarLightning(m.config.to_dict(), CODE_CFG, model=m)
    module.train()
    code = {k: v.detach().clone() for k, v in m.token_code.state_dict().items()}
    prefix = m.kv_prefix.out.weight.detach().clone()
    batch = {"items": CODE_ITEMS, "lm": [Item("", " the sky is red", "text")]}
    losses = overfit(module, batch, 30)
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(torch.equal(v, m.token_code.state_dict()[k]) for k, v in code.items())
    assert all(p.grad is None and not p.requires_grad for p in m.token_code.parameters())
    assert not torch.equal(prefix, m.kv_prefix.out.weight)
    with pytest.raises(ValueError, match="fact_period"):
        LarimarLightning(m.config.to_dict(), {**CODE_CFG, "data": {**CODE_CFG["data"], "fact_period": True}}, model=m).episode_losses(batch, 0)
    tokens = tiny_larimar_tokens()
    with pytest.raises(ValueError, match="tokens"):
        LarimarLightning(tokens.config.to_dict(), CODE_CFG, model=tokens).episode_losses(batch, 0)


def tiny_larimar_tokens() -> Larimar:
    from larimar.testing import tiny_larimar

    return tiny_larimar(latent_size=16, keyed_writes=True, value_writes=True, value_code="tokens", value_code_slots=4)
