"""Tests for larimar.eval.scoring (teacher-forced continuation scoring) and larimar.testing."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

from larimar.eval.scoring import (
    ContinuationStats,
    continuation_nll,
    continuation_token_stats,
    encode_continuations,
    pad_token_id_for,
    score_token_ids,
)
from larimar.testing import tiny_bert, tiny_bert_tokenizer, tiny_gpt2, tiny_llama, tiny_tokenizer

PROMPTS = [
    "The capital of France is",
    "Toko Yasuda plays the",
    "Where is the Eiffel Tower? The Eiffel Tower is in",
    "A",
    "Michel Rocard is a native speaker of",
]
CONTS = [" Paris", " guitar and the piano", " Paris, the capital of France.", " b", " French"]


@pytest.fixture(scope="module")
def gpt2_setup():
    return tiny_gpt2(), tiny_tokenizer()


@pytest.fixture(scope="module")
def llama_setup():
    return tiny_llama(kv_heads=1), tiny_tokenizer(add_bos=True)


@pytest.fixture(scope="module")
def llama2_setup():
    return tiny_llama(kv_heads=2, seed=1), tiny_tokenizer(add_bos=True, pad_token=True)


SETUPS = ["gpt2_setup", "llama_setup", "llama2_setup"]


def manual_logprobs(model, tok, prompt: str, cont: str, cache=None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Independent unbatched reference: one sequence, no padding, no explicit positions."""
    p_ids = tok(prompt)["input_ids"]
    f_ids = tok(prompt + cont)["input_ids"]
    assert f_ids[: len(p_ids)] == p_ids
    with torch.no_grad():
        out = model(torch.tensor([f_ids]), past_key_values=cache) if cache is not None else model(torch.tensor([f_ids]))
    logp = out.logits[0].float().log_softmax(-1)
    targets = f_ids[len(p_ids) :]
    lp = torch.stack([logp[len(p_ids) + j - 1, t] for j, t in enumerate(targets)])
    pred = torch.stack([logp[len(p_ids) + j - 1].argmax() for j in range(len(targets))])
    return lp, pred, targets


@pytest.mark.parametrize("setup", SETUPS)
def test_batched_equals_unbatched(setup: str, request: pytest.FixtureRequest) -> None:
    model, tok = request.getfixturevalue(setup)
    nll = continuation_nll(model, tok, PROMPTS, CONTS, batch_size=16)
    ref = torch.stack([-manual_logprobs(model, tok, p, c)[0].mean() for p, c in zip(PROMPTS, CONTS)])
    assert nll.shape == (len(PROMPTS),) and nll.dtype == torch.float32
    torch.testing.assert_close(nll, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("setup", SETUPS)
def test_batch_size_and_padding_invariance(setup: str, request: pytest.FixtureRequest) -> None:
    model, tok = request.getfixturevalue(setup)
    full = continuation_nll(model, tok, PROMPTS, CONTS, batch_size=len(PROMPTS))
    for bs in (1, 2, 3):
        torch.testing.assert_close(continuation_nll(model, tok, PROMPTS, CONTS, batch_size=bs), full, atol=1e-5, rtol=0)
    # A short example next to a much longer one (lots of right padding) scores the same as alone.
    long_p = " ".join(["The capital of Italy is Rome."] * 6)
    alone = continuation_nll(model, tok, PROMPTS[3:4], CONTS[3:4])
    padded = continuation_nll(model, tok, [PROMPTS[3], long_p], [CONTS[3], " Paris"])
    torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=0)


def test_token_stats_match_manual(llama_setup) -> None:
    model, tok = llama_setup
    stats = continuation_token_stats(model, tok, PROMPTS, CONTS, batch_size=2)
    assert len(stats) == len(PROMPTS) and all(isinstance(s, ContinuationStats) for s in stats)
    for s, p, c in zip(stats, PROMPTS, CONTS):
        lp, pred, targets = manual_logprobs(model, tok, p, c)
        assert s.target_ids.tolist() == targets
        torch.testing.assert_close(s.logprobs, lp, atol=1e-5, rtol=0)
        assert s.predicted_ids.tolist() == pred.tolist()
        assert s.correct.tolist() == [a == b for a, b in zip(pred.tolist(), targets)]
        assert s.accuracy == pytest.approx(s.correct.float().mean().item())
        assert s.nll == pytest.approx(float(-lp.mean()), abs=1e-5)


def test_accuracy_can_be_one() -> None:
    """A continuation equal to the model's own greedy tokens has accuracy 1."""
    model, tok = tiny_gpt2(), tiny_tokenizer()
    prompt = "The capital of France is"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        greedy = []
        for _ in range(3):
            nxt = model(ids).logits[0, -1].argmax()
            greedy.append(int(nxt))
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    stats = score_token_ids(model, [(tok(prompt)["input_ids"], greedy)])
    assert stats[0].accuracy == 1.0 and stats[0].correct.all()


def test_positions_matter(gpt2_setup) -> None:
    """Sanity check that the tiny models are sensitive to positions (so the tests above mean something)."""
    model, tok = gpt2_setup
    ids = torch.tensor([tok(PROMPTS[0] + CONTS[0])["input_ids"]])
    with torch.no_grad():
        a = model(ids).logits.log_softmax(-1)
        b = model(ids, position_ids=torch.arange(ids.shape[1])[None] + 5).logits.log_softmax(-1)
    assert (a - b).abs().max() > 1e-3


def test_pad_token_handling() -> None:
    tok_nopad, tok_pad = tiny_tokenizer(), tiny_tokenizer(pad_token=True)
    assert tok_nopad.pad_token is None
    assert pad_token_id_for(tok_nopad) == tok_nopad.eos_token_id
    assert pad_token_id_for(tok_pad) == tok_pad.pad_token_id != tok_pad.eos_token_id
    model = tiny_gpt2()
    a = continuation_nll(model, tok_nopad, PROMPTS, CONTS, batch_size=3)
    b = continuation_nll(model, tok_pad, PROMPTS, CONTS, batch_size=3)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert tok_nopad.pad_token is None  # the tokenizer is not modified


def test_encode_continuations_boundaries() -> None:
    tok = tiny_tokenizer()
    # Normal case: joint tokenisation, the prompt's tokens are a prefix.
    [(p_ids, c_ids)] = encode_continuations(tok, ["The capital of France is"], [" Paris"])
    assert p_ids + c_ids == tok("The capital of France is Paris")["input_ids"]
    # "Fr" + "ance" merges across the boundary in the joint text: fall back to separate tokenisation.
    assert tok("The capital of France")["input_ids"][:4] != tok("The capital of Fr")["input_ids"]
    [(p_ids, c_ids)] = encode_continuations(tok, ["The capital of Fr"], ["ance"])
    assert p_ids == tok("The capital of Fr")["input_ids"]
    assert c_ids == tok("ance", add_special_tokens=False)["input_ids"]
    # A BOS-adding tokenizer keeps BOS in the prompt only.
    tok_bos = tiny_tokenizer(add_bos=True)
    [(p_ids, c_ids)] = encode_continuations(tok_bos, ["The capital of France is"], [" Paris"])
    assert p_ids[0] == tok_bos.bos_token_id and tok_bos.bos_token_id not in c_ids
    # An empty prompt is fine when the tokenizer adds a BOS.
    [(p_ids, c_ids)] = encode_continuations(tok_bos, [""], [" Paris"])
    assert p_ids == [tok_bos.bos_token_id] and len(c_ids) >= 1


def test_input_errors(gpt2_setup) -> None:
    model, tok = gpt2_setup
    with pytest.raises(ValueError, match="no tokens"):
        continuation_nll(model, tok, [""], [" Paris"])
    with pytest.raises(ValueError, match="no tokens"):
        continuation_nll(model, tok, ["The capital"], [""])
    with pytest.raises(ValueError, match="prompts"):
        continuation_nll(model, tok, ["a", "b"], [" c"])
    with pytest.raises(ValueError, match="batch_size"):
        continuation_nll(model, tok, ["a"], [" c"], batch_size=0)
    assert continuation_nll(model, tok, [], []).shape == (0,)


def test_restores_train_mode() -> None:
    model, tok = tiny_gpt2(), tiny_tokenizer()
    model.train()
    continuation_nll(model, tok, PROMPTS[:1], CONTS[:1])
    assert model.training
    model.eval()
    continuation_nll(model, tok, PROMPTS[:1], CONTS[:1])
    assert not model.training


# ---------------------------------------------------------------------------------------------
# Prefix hook
# ---------------------------------------------------------------------------------------------


def _random_prefix(model, n: int, prefix_len: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cfg = model.config
    n_layers = cfg.num_hidden_layers
    n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(seed)
    shape = (n, n_kv, prefix_len, head_dim)
    return [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(n_layers)]


def _cache(model, kv, idx) -> DynamicCache:
    return DynamicCache(ddp_cache_data=[(k[idx], v[idx]) for k, v in kv], config=model.config)


@pytest.mark.parametrize("setup", ["gpt2_setup", "llama_setup"])
def test_prefix_cache_matches_manual(setup: str, request: pytest.FixtureRequest) -> None:
    model, tok = request.getfixturevalue(setup)
    prefix_len = 3
    kv = _random_prefix(model, len(PROMPTS), prefix_len)
    calls: list[tuple[list[int], int]] = []

    def prefix_fn(batch_index: list[int], batch_size: int) -> dict:
        calls.append((list(batch_index), batch_size))
        return {"past_key_values": _cache(model, kv, batch_index), "prefix_len": prefix_len}

    nll = continuation_nll(model, tok, PROMPTS, CONTS, batch_size=2, prefix_fn=prefix_fn)
    assert calls == [([0, 1], 2), ([2, 3], 2), ([4], 1)]
    ref = torch.stack(
        [
            -manual_logprobs(model, tok, p, c, cache=_cache(model, kv, [i]))[0].mean()
            for i, (p, c) in enumerate(zip(PROMPTS, CONTS))
        ]
    )
    torch.testing.assert_close(nll, ref, atol=1e-5, rtol=0)
    # The prefix really changes the scores, and prefix_len can be inferred from the cache.
    assert (nll - continuation_nll(model, tok, PROMPTS, CONTS)).abs().max() > 1e-3
    inferred = continuation_nll(
        model, tok, PROMPTS, CONTS, batch_size=5, prefix_fn=lambda idx, bs: {"past_key_values": _cache(model, kv, idx)}
    )
    torch.testing.assert_close(inferred, nll, atol=1e-5, rtol=0)


def test_prefix_attention_mask(llama_setup) -> None:
    """A masked-out prefix position is equivalent to a shorter prefix without it (positions shift too)."""
    model, tok = llama_setup
    kv = _random_prefix(model, len(PROMPTS), 3, seed=1)
    kv_short = [(k[:, :, 1:], v[:, :, 1:]) for k, v in kv]

    def masked(idx: list[int], bs: int) -> dict:
        mask = torch.ones(bs, 3, dtype=torch.long)
        mask[:, 0] = 0
        return {"past_key_values": _cache(model, kv, idx), "prefix_attention_mask": mask}

    def short(idx: list[int], bs: int) -> dict:
        return {"past_key_values": _cache(model, kv_short, idx), "prefix_len": 2}

    a = continuation_nll(model, tok, PROMPTS, CONTS, batch_size=3, prefix_fn=masked)
    b = continuation_nll(model, tok, PROMPTS, CONTS, batch_size=3, prefix_fn=short)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_prefix_none_and_errors(llama_setup) -> None:
    model, tok = llama_setup
    plain = continuation_nll(model, tok, PROMPTS, CONTS)
    torch.testing.assert_close(continuation_nll(model, tok, PROMPTS, CONTS, prefix_fn=lambda i, b: None), plain)
    kv = _random_prefix(model, len(PROMPTS), 2)
    shared = _cache(model, kv, [0, 1])

    def reuse(i: list[int], b: int) -> dict:
        return {"past_key_values": shared}

    def reuse_explicit(i: list[int], b: int) -> dict:
        return {"past_key_values": shared, "prefix_len": 2}

    def wrong_len(i: list[int], b: int) -> dict:
        return {"past_key_values": _cache(model, kv, i), "prefix_len": 5}

    with pytest.raises(ValueError, match="fresh cache"):  # the same cache object for two batches
        continuation_nll(model, tok, PROMPTS[:4], CONTS[:4], batch_size=2, prefix_fn=reuse)
    # A cache that was extended by an earlier call is caught when prefix_len is explicit.
    with pytest.raises(ValueError, match="prefix_len"):
        continuation_nll(model, tok, PROMPTS[:2], CONTS[:2], prefix_fn=reuse_explicit)
    with pytest.raises(ValueError, match="prefix_len"):
        continuation_nll(model, tok, PROMPTS[:2], CONTS[:2], prefix_fn=wrong_len)
    with pytest.raises(ValueError, match="prefix_attention_mask"):
        continuation_nll(
            model,
            tok,
            PROMPTS[:2],
            CONTS[:2],
            prefix_fn=lambda i, b: {"past_key_values": _cache(model, kv, i), "prefix_attention_mask": torch.ones(b, 7)},
        )


def test_forward_fn_hook(gpt2_setup) -> None:
    model, tok = gpt2_setup
    seen: list[list[int]] = []

    def forward_fn(input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_index: list[int]) -> torch.Tensor:
        seen.append(batch_index)
        assert input_ids.shape == attention_mask.shape and input_ids.shape[0] == len(batch_index)
        return model(input_ids=input_ids, attention_mask=attention_mask).logits

    a = continuation_nll(model, tok, PROMPTS, CONTS, batch_size=2, forward_fn=forward_fn)
    torch.testing.assert_close(a, continuation_nll(model, tok, PROMPTS, CONTS), atol=1e-5, rtol=0)
    assert seen == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="not both"):
        continuation_nll(model, tok, PROMPTS, CONTS, forward_fn=forward_fn, prefix_fn=lambda i, b: None)


# ---------------------------------------------------------------------------------------------
# larimar.testing factories
# ---------------------------------------------------------------------------------------------


def test_tiny_factories_deterministic() -> None:
    state = torch.random.get_rng_state()
    a, b, c = tiny_gpt2(seed=3), tiny_gpt2(seed=3), tiny_gpt2(seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))
    assert tiny_tokenizer().get_vocab() == tiny_tokenizer().get_vocab()
    llama = tiny_llama(kv_heads=1)
    assert llama.config.num_key_value_heads == 1 and llama.config.num_attention_heads == 2
    assert llama.config.vocab_size == len(tiny_tokenizer()) == a.config.vocab_size
    assert not llama.training and not a.training


def test_tiny_bert() -> None:
    tok = tiny_bert_tokenizer()
    model = tiny_bert()
    enc = tok(["The capital of France is Paris", "hi"], padding=True, return_tensors="pt")
    assert enc["input_ids"][0, 0].item() == tok.cls_token_id
    with torch.no_grad():
        out = model(**enc).last_hidden_state
    assert out.shape == (2, enc["input_ids"].shape[1], 32)
    assert model.config.hidden_size == 32 and model.config.vocab_size == len(tok)


def test_end_to_end_with_metrics(gpt2_setup) -> None:
    """Loader-shaped case -> scoring -> metrics, with the leading-space convention for targets."""
    from larimar.eval.data import EditCase
    from larimar.eval.metrics import aggregate_counterfact, counterfact_case_metrics, zsre_case_metrics

    model, tok = gpt2_setup
    case = EditCase(
        case_id=0,
        subject="Danielle Darrieux",
        prompt="The mother tongue of Danielle Darrieux is",
        target_new="English",
        target_true="French",
        paraphrase_prompts=["Danielle Darrieux is a native speaker of"],
        neighborhood_prompts=["Michel Rocard is a native speaker of", "The mother tongue of Michel Rocard is"],
        neighborhood_targets=["French", "French"],
    )
    prompts = [case.prompt, *case.paraphrase_prompts, *case.neighborhood_prompts]
    new = continuation_nll(model, tok, prompts, [" " + case.target_new] * len(prompts))
    true = continuation_nll(model, tok, prompts, [" " + case.target_true] * len(prompts))
    m = counterfact_case_metrics(new[0], true[0], new[1:2], true[1:2], new[2:], true[2:])
    assert m["edit_success"]["S"] == float(new[0] < true[0])
    assert m["neighborhood"]["M"] == pytest.approx(float((torch.exp(-true[2:]) - torch.exp(-new[2:])).mean()))
    agg = aggregate_counterfact([m])
    assert agg["edit_success"]["S"] in (0.0, 100.0)

    stats = continuation_token_stats(model, tok, prompts[:2], [" " + case.target_new] * 2)
    z = zsre_case_metrics(stats[0].correct, [stats[1].correct], [])
    assert z["edit"] == stats[0].accuracy and math.isnan(z["neighborhood"])
