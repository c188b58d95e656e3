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


def test_loss_falls_on_tiny_overfit_set(corpus):
    text, pr = corpus
    cfg = {"data": {"text_root": str(text), "pararel_root": str(pr), "exclude_eval_from": None}, "optim": {"lr": 1e-2, "warmup_steps": 1}}
    module = LarimarLightning(MODEL_CFG, cfg, model=tiny_model())
    module.train()
    sampler = EpisodeSampler(text, pr, val_fraction=0.0, seed=0)
    batch = {"items": sampler.episode(4), "lm": [sampler.text_chunk()]}
    opt = module.configure_optimizers()["optimizer"]
    torch.manual_seed(0)
    losses = []
    for _ in range(30):
        out = module.episode_losses(batch, 0)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["nll_mem"]))
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
