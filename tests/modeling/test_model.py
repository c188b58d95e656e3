"""Larimar model on tiny random GPT-2 / Llama (grouped KV heads) / BERT: wiring, exactness, persistence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from larimar.editing.store import FactNotFoundError, MemoryFileError
from larimar.modeling.conditioning import Conditioning, ConditionedDecoder, KVShape
from larimar.modeling.config import LarimarConfig
from larimar.modeling.encoder import TextInputError
from larimar.modeling.model import EmptyMemoryError, Larimar
from larimar.testing import tiny_bert, tiny_bert_tokenizer, tiny_gpt2, tiny_llama, tiny_tokenizer

FACTS = [
    "The mother tongue of Danielle Darrieux is English.",
    "The capital of France is Rome.",
    "Apple was founded by Bill Gates.",
]


def make(decoder: str = "llama", **cfg) -> Larimar:
    tok = tiny_tokenizer(pad_token=True)
    dec = tiny_llama(kv_heads=1) if decoder == "llama" else tiny_gpt2()
    config = LarimarConfig(latent_size=16, memory_size=12, prefix_len=3, prefix_hidden=8, **cfg)
    model = Larimar(config, tiny_bert(), tiny_bert_tokenizer(), dec, tok)
    with torch.no_grad():  # untrained maps start at zero; give them weights so the prefix matters
        torch.manual_seed(0)
        model.kv_prefix.out.weight.normal_(0, 0.5)
        if model.emb_offset is not None:
            model.emb_offset.proj.weight.normal_(0, 0.5)
        if model.out_offset is not None:
            model.out_offset.proj.weight.normal_(0, 0.5)
            model.out_offset.gate.weight.normal_(0, 2.0)
    return model


@pytest.fixture(params=["llama", "gpt2", "llama+output"])
def model(request) -> Larimar:
    name, _, extra = request.param.partition("+")
    return make(name, output_offset=extra == "output")


def test_kv_shape_handles_grouped_heads():
    s = KVShape.from_config(tiny_llama(kv_heads=1).config)
    assert (s.n_kv_heads, s.head_dim) == (1, tiny_llama(kv_heads=1).config.hidden_size // tiny_llama(kv_heads=1).config.num_attention_heads)
    g = KVShape.from_config(tiny_gpt2().config)
    assert g.n_kv_heads == tiny_gpt2().config.n_head


def test_prefix_shapes(model):
    z = torch.randn(2, 16)
    prefix = model.kv_prefix(z)
    s = model.kv_shape
    assert len(prefix) == s.n_layers
    for k, v in prefix:
        assert k.shape == v.shape == (2, s.n_kv_heads, 3, s.head_dim)


def test_no_conditioning_equals_base_model_exactly(model):
    ids, att = model._tokenize_prompts(["The capital of France is", "Apple was"], "right")
    base = model.decoder(input_ids=ids, attention_mask=att).logits
    ours = model.runner.forward(ids, att, None).logits
    assert torch.equal(base, ours)
    ours2 = model.runner.forward(ids, att, Conditioning()).logits
    assert torch.equal(base, ours2)


def test_conditioning_changes_logits(model):
    ids, att = model._tokenize_prompts(["The capital of France is"], "right")
    base = model.decoder(input_ids=ids, attention_mask=att).logits
    cond = model.conditioning(torch.randn(1, 16))
    assert not torch.allclose(base, model.runner.forward(ids, att, cond).logits)


def test_empty_prefix_base_matches_decoder_own_cache():
    """The untrained prefix is the decoder's own K/V of `prefix_init_text`: conditioning on z=0 with a
    zero delta equals running the decoder on that text followed by the prompt."""
    m = make("llama", embedding_offset=False, prefix_init_text="Paris")
    with torch.no_grad():
        m.kv_prefix.out.weight.zero_()
    ids_text = m.tokenizer("Paris", add_special_tokens=False)["input_ids"]
    ids_text = (ids_text * 3)[:3]
    prompt = m.tokenizer(" is big", add_special_tokens=False)["input_ids"]
    full = torch.tensor([ids_text + prompt])
    ref = m.decoder(input_ids=full).logits[:, 3:]
    cond = m.conditioning(torch.zeros(1, 16))
    got = m.runner.forward(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long), cond).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_generate_with_cache_matches_full_forward_greedy(model):
    """KV-cached greedy decoding == argmax of full forwards re-run on the growing sequence."""
    prompt = ["The capital of France is"]
    cond = model.conditioning(torch.randn(1, 16))
    ids, att = model._tokenize_prompts(prompt, "left")
    new = model.runner.generate(ids, att, cond, max_new_tokens=5, pad_token_id=model.tokenizer.pad_token_id)
    seq = ids
    for t in range(5):
        logits = model.runner.forward(seq, torch.ones_like(seq), cond).logits
        nxt = logits[:, -1].argmax(-1)
        assert int(nxt) == int(new[0, t])
        seq = torch.cat([seq, nxt[:, None]], 1)


def test_batched_generation_equals_single(model):
    prompts = ["The capital of France is", "Apple was founded by Steve"]
    z = torch.randn(2, 16)
    cond = model.conditioning(z)
    ids, att = model._tokenize_prompts(prompts, "left")
    batched = model.runner.generate(ids, att, cond, max_new_tokens=4, pad_token_id=0)
    for i, p in enumerate(prompts):
        ids1, att1 = model._tokenize_prompts([p], "left")
        single = model.runner.generate(ids1, att1, cond.select([i]), max_new_tokens=4, pad_token_id=0)
        assert torch.equal(single[0], batched[i])


def test_write_read_forget_cycle(model):
    model.write(FACTS)
    assert len(model) == 3
    z = model.read(["The mother tongue of Danielle Darrieux is"])
    assert z.shape == (1, 16)
    M_before = model.facts.state.M.clone()
    model.write(["Toko Yasuda plays the piano."])
    model.forget(["Toko Yasuda plays the piano."])
    torch.testing.assert_close(model.facts.state.M, M_before, atol=1e-9, rtol=1e-7)
    assert len(model) == 3


def test_forget_unknown_text_leaves_memory_unchanged(model):
    model.write(FACTS)
    M = model.facts.state.M.clone()
    with pytest.raises(FactNotFoundError, match="never written"):
        model.forget([FACTS[0], "Something never written."])
    assert torch.equal(model.facts.state.M, M) and len(model) == 3


def test_bad_text_inputs(model):
    with pytest.raises(TextInputError, match="empty"):
        model.write(["ok fact.", "   "])
    with pytest.raises(TextInputError):
        model.write([])
    assert len(model) == 0
    with pytest.raises(EmptyMemoryError):
        model.read(["anything"])


def test_overlong_text_warns_and_truncates(model):
    long = "Paris is big. " * 200
    with pytest.warns(UserWarning, match="truncated"):
        model.write([long])
    assert len(model) == 1


def test_scope_routing(model):
    model.config.scope_threshold = 0.99
    model.scope.threshold = 0.99
    model.write(FACTS)
    out = model.generate([FACTS[1], "Completely unrelated words here"], max_new_tokens=3, return_details=True)
    assert out[0].used_memory and out[0].scope_score > 0.99
    assert not out[1].used_memory


def test_generate_out_of_scope_equals_plain(model):
    plain = model.generate(["Apple was founded by"], max_new_tokens=4, use_memory="never")
    model.write(FACTS)
    routed = model.generate(["Apple was founded by"], max_new_tokens=4, use_memory="never")
    assert plain == routed
    with pytest.raises(ValueError):
        model.generate(["x"], use_memory="sometimes")


def test_always_memory_on_empty_raises(model):
    with pytest.raises(EmptyMemoryError):
        model.generate(["Apple was founded by"], use_memory="always")


def test_score_uses_memory_and_matches_manual(model):
    model.write(FACTS)
    nll = model.score(["The capital of France is"], [" Rome", " Paris"], use_memory="always")
    assert nll.shape == (1, 2)
    # manual: conditioned forward over prompt + candidate, mean NLL of the candidate tokens
    cond = model.condition_prompts(["The capital of France is"])
    p = model.tokenizer("The capital of France is")["input_ids"]
    for j, cand in enumerate([" Rome", " Paris"]):
        full = model.tokenizer("The capital of France is" + cand)["input_ids"]
        ids = torch.tensor([full])
        logits = model.runner.forward(ids, torch.ones_like(ids), cond).logits[0]
        logp = logits.log_softmax(-1)
        targets = full[len(p):]
        manual = -torch.stack([logp[len(p) - 1 + i, t] for i, t in enumerate(targets)]).mean()
        torch.testing.assert_close(nll[0, j], manual, atol=1e-4, rtol=1e-4)
    plain = model.score(["The capital of France is"], [" Rome", " Paris"], use_memory="never")
    assert not torch.allclose(plain, nll)


PROMPTS = [f.rsplit(" ", 1)[0] for f in FACTS]  # "The capital of France is" ...


def test_keyed_write_reads_fact_with_its_prompt_and_forgets_exactly():
    model = make("llama", ridge=1e-9)
    model.write(FACTS, keys=PROMPTS)
    q, z_facts = model.facts.keys, model.facts.Z  # the latents written (float64)
    torch.testing.assert_close(model.facts.state.read(q), z_facts, atol=1e-4, rtol=1e-4)  # the key returns its fact
    torch.testing.assert_close(q, model.encoder(PROMPTS).double(), atol=1e-5, rtol=1e-4)  # keys = the prompts' latents
    torch.testing.assert_close(z_facts, model.encoder(FACTS).double(), atol=1e-5, rtol=1e-4)
    auto = make("llama", ridge=1e-9)
    auto.write(FACTS)
    assert (auto.facts.state.read(q) - z_facts).abs().max() > 1e-3  # auto-associative: the prompt reads itself
    model = make("llama")  # default ridge: forgetting is well conditioned
    model.write(FACTS, keys=PROMPTS)
    M_before = model.facts.state.M.clone()
    model.write(["Toko Yasuda plays the piano."], keys=["Toko Yasuda plays the"])
    model.forget(["Toko Yasuda plays the piano."])  # removed with the addresses it was written with
    torch.testing.assert_close(model.facts.state.M, M_before, atol=1e-9, rtol=1e-7)
    assert len(model) == 3 and model.facts.keys.shape == (3, 16)


def test_keyed_write_bad_keys_change_nothing():
    model = make("llama")
    model.write(FACTS[:1])
    M = model.facts.state.M.clone()
    with pytest.raises(ValueError, match="2 texts but 1 keys"):
        model.write(FACTS[1:], keys=PROMPTS[1:2])
    with pytest.raises(TextInputError):
        model.write(FACTS[1:], keys=["ok", "  "])
    assert len(model) == 1 and torch.equal(model.facts.state.M, M)


def test_fact_value_is_the_text_after_the_prompt():
    from larimar.modeling.model import fact_value

    assert fact_value("The Eiffel Tower is in London.", "The Eiffel Tower is in") == "London"
    assert fact_value("What is the capital of France? Rome.", "What is the capital of France?") == "Rome"
    assert fact_value("Apple was founded by Steve Jobs", "Apple was founded by ") == "Steve Jobs"
    assert fact_value("Rome is nice.", "The capital of France is") == "Rome is nice."  # prompt not a prefix
    assert fact_value("The capital is.", "The capital is") == "The capital is."  # nothing after the prompt


def test_value_write_stores_the_value_latent_and_forgets_exactly():
    """write(texts, keys, values): Z = latents of the values, W from the keys, ledger and scope from the texts."""
    model = make("llama")
    values = [f.removeprefix(p).strip(" .") for f, p in zip(FACTS, PROMPTS)]
    model.write(FACTS, keys=PROMPTS, values=values)
    torch.testing.assert_close(model.facts.Z, model.encoder(values).double(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.facts.keys, model.encoder(PROMPTS).double(), atol=1e-5, rtol=1e-4)
    assert model.facts.texts == FACTS
    torch.testing.assert_close(model.scope.keys, model.scope.normalise(model._embed_for_scope(FACTS)), atol=1e-5, rtol=1e-4)
    M_before = model.facts.state.M.clone()
    model.write(["Toko Yasuda plays the piano."], keys=["Toko Yasuda plays the"], values=["piano"])
    model.forget(["Toko Yasuda plays the piano."])
    torch.testing.assert_close(model.facts.state.M, M_before, atol=1e-9, rtol=1e-7)
    M_before = model.facts.state.M.clone()
    with pytest.raises(ValueError, match="values need keys"):
        model.write(FACTS[:1], values=values[:1])
    with pytest.raises(ValueError, match="1 texts but 2 values"):
        model.write(FACTS[:1], keys=PROMPTS[:1], values=values[:2])
    assert len(model) == 3 and torch.equal(model.facts.state.M, M_before)  # failed writes changed nothing


def test_write_facts_follows_the_config():
    """write_facts: auto-associative, keyed, or keyed value writes, as config.keyed_writes / value_writes say."""
    values = [f.removeprefix(p).strip(" .") for f, p in zip(FACTS, PROMPTS)]
    for keyed, value, z_of, k_of in ((False, True, FACTS, FACTS), (True, False, FACTS, PROMPTS), (True, True, values, PROMPTS)):
        model = make("llama", keyed_writes=keyed, value_writes=value)
        model.write_facts(FACTS, PROMPTS)
        torch.testing.assert_close(model.facts.Z, model.encoder(z_of).double(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.facts.keys, model.encoder(k_of).double(), atol=1e-5, rtol=1e-4)


def test_keyed_memory_save_load_keeps_keys(tmp_path):
    model = make("llama")
    model.write(FACTS[:2], keys=PROMPTS[:2])
    model.write(FACTS[2:])  # mixed: one auto-associative write
    keys = model.facts.keys.clone()
    model.save_memory(tmp_path / "mem")
    model.reset_memory()
    model.load_memory(tmp_path / "mem")
    torch.testing.assert_close(model.facts.keys, keys)
    M_before = model.facts.state.M.clone()
    model.forget([FACTS[0]])
    model.write([FACTS[0]], keys=[PROMPTS[0]])  # same rows in another order: equal up to rounding
    torch.testing.assert_close(model.facts.state.M, M_before, atol=1e-5, rtol=1e-4)


def test_key_texts_follow_writes_forgets_and_files(tmp_path):
    """The ledger keeps the text each fact was keyed by (the text itself when unkeyed) through forget, save and load."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = make("llama")
    model.write(FACTS[:2], keys=PROMPTS[:2])
    model.write(FACTS[2:])
    assert model.facts.key_texts == PROMPTS[:2] + FACTS[2:]
    model.forget([FACTS[0]])
    assert model.facts.key_texts == PROMPTS[1:2] + FACTS[2:]
    model.save_memory(tmp_path / "mem")
    model.reset_memory()
    model.load_memory(tmp_path / "mem")
    assert model.facts.key_texts == PROMPTS[1:2] + FACTS[2:] and model.facts.texts == FACTS[1:]
    path = tmp_path / "mem" / "facts.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata={k: v for k, v in meta.items() if k != "key_texts"})  # a file from before key texts
    model.load_memory(tmp_path / "mem")
    assert model.facts.key_texts == model.facts.texts
    save_file(tensors, str(path), metadata={**meta, "key_texts": json.dumps(["only one"])})
    with pytest.raises(MemoryFileError, match="key texts"):
        model.load_memory(tmp_path / "mem")
    assert model.facts.key_texts == model.facts.texts  # the failed load changed nothing


def test_scope_lexical_text_key_counts_the_prompt_not_the_answer():
    """With scope_lexical_text "key" lexical recall counts the tokens of each fact's prompt, which a
    paraphrase can repeat in full; "text" also counts the answer's, which no query holds."""
    fact, prompt = "Ramalinaceae belongs to the family Lamiinae.", "Ramalinaceae belongs to the family"
    scores = {}
    for mode in ("text", "key"):
        model = make("llama", scope_lexical_weight=0.5, scope_lexical_text=mode)
        model.write([fact], keys=[prompt])
        assert model.scope._key_texts == [prompt if mode == "key" else fact]
        scores[mode] = float(model.scope.lexical_recall([prompt])[0, 0])
    assert scores["key"] == pytest.approx(1.0) and scores["text"] < 0.99
    with pytest.raises(ValueError, match="scope_lexical_text"):
        LarimarConfig(scope_lexical_text="answer")


def test_save_and_load_memory(model, tmp_path):
    model.write(FACTS)
    model.save_memory(tmp_path / "mem")
    z = model.read(["The capital of France is"])
    model.reset_memory()
    assert len(model) == 0
    model.load_memory(tmp_path / "mem")
    assert len(model) == 3
    torch.testing.assert_close(model.read(["The capital of France is"]), z)
    (tmp_path / "mem" / "facts.safetensors").write_bytes(b"garbage")
    with pytest.raises(MemoryFileError):
        model.load_memory(tmp_path / "mem")
    assert len(model) == 3  # failed load changes nothing


def test_adapter_round_trip(tmp_path):
    m = make("gpt2")
    m.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file()
    weights = m.adapter_state()
    assert not any(k.startswith("decoder.") or k.startswith("encoder.model.") for k in weights)
    m2 = make("gpt2")
    with torch.no_grad():
        m2.kv_prefix.out.weight.zero_()
    from safetensors.torch import load_file

    m2.load_adapter_state(load_file(str(tmp_path / "adapter.safetensors")))
    for k, v in m.adapter_state().items():
        assert torch.equal(v, m2.adapter_state()[k]), k
    assert LarimarConfig.load(tmp_path / "config.json") == m.config


def test_scope_idf_round_trip_and_lexical_scope(tmp_path):
    """The IDF table travels with save_pretrained / from_pretrained; the lexical weight reaches the detector."""
    m = make("gpt2")
    m.config = m.config.replace(scope_lexical_weight=0.4)
    idf = {"paris": 3.0, "": 5.0}
    m.set_scope_idf(idf)
    assert m.scope.lexical_weight == 0.4 and m.scope.idf == idf
    m.write(FACTS)  # keys reach the detector with their texts
    assert len(m.scope.key_tokens) == len(FACTS)
    m.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "scope_idf.json").read_text()) == idf
    m2 = make("gpt2")  # (from_pretrained needs the named base models; it installs the same file the same way)
    m2.config = m2.config.replace(scope_lexical_weight=0.4)
    m2.set_scope_idf(json.loads((tmp_path / "scope_idf.json").read_text()))
    m2.write(FACTS)
    q = ["Paris is the capital of", "Completely unrelated words here"]
    torch.testing.assert_close(m2.scope.score(q).score, m.scope.score(q).score)
    # the score is the documented mix of cosine and lexical recall
    cos_only = make("gpt2")
    cos_only.write(FACTS)
    lex = m.scope.lexical_recall(q)
    torch.testing.assert_close(m.scope.score(q).score, (0.6 * cos_only_per_fact(cos_only, q) + 0.4 * lex).max(1).values)
    with pytest.raises(ValueError, match="scope_lexical_weight"):
        LarimarConfig(scope_lexical_weight=1.0)
    with pytest.raises(ValueError, match="token: idf"):
        m.set_scope_idf({"a": "high"})


def cos_only_per_fact(model, queries):
    """(Q, N) cosine of each whole query to each stored fact (single-sentence queries)."""
    e = model.scope.normalise(model._embed_for_scope(queries))
    return e @ model.scope.keys.T


def test_assigning_facts_points_the_scope_detector_at_them(model):
    model.write(FACTS)
    saved = model.facts
    model.reset_memory()
    assert len(model.scope) == 0
    model.facts = saved
    assert len(model.scope) == len(FACTS)
    torch.testing.assert_close(model.scope.keys, model.scope.normalise(saved.E))


def test_adapter_mismatch_is_a_clear_error():
    m = make("gpt2")
    bad = dict(m.adapter_state())
    bad["M0"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="M0"):
        m.load_adapter_state(bad)


def test_config_validation():
    with pytest.raises(ValueError, match="addressing"):
        LarimarConfig(addressing="psychic")
    with pytest.raises(ValueError, match="unknown"):
        LarimarConfig.from_dict({"nonsense": 1})


def test_decoder_stays_frozen(model):
    assert all(not p.requires_grad for p in model.decoder.parameters())
    z = torch.randn(2, 16, requires_grad=True)
    ids, att = model._tokenize_prompts(["a b c", "d e"], "right")
    loss = model.conditioned_lm_loss(ids, att, ids.masked_fill(att == 0, -100), z)
    loss.backward()
    assert model.kv_prefix.out.weight.grad is not None and z.grad is not None


def test_read_noise_sigma_w(model):
    model.write(FACTS)
    q = model.encoder(["The capital of France is"])
    clean = model.read_latents(q)
    torch.testing.assert_close(model.read_latents(q, sigma_w=0.0), clean)
    g = torch.Generator().manual_seed(0)
    noisy = model.read_latents(q, sigma_w=0.5, generator=g)
    W = model.facts.state.address(q.double())
    noise = 0.5 * torch.randn(W.shape, generator=torch.Generator().manual_seed(0), dtype=W.dtype)
    torch.testing.assert_close(noisy, ((W + noise) @ model.facts.state.M).float())
    assert not torch.allclose(noisy, clean)


@pytest.mark.parametrize("heads", [1, 3])
def test_output_offset_matches_independent_formula(heads):
    """logits = base-conditioned logits + sum_k sigmoid(gate_k(h/|h|)) * W_out (g_k(z, q) - g_k(0, q)), per position."""
    m = make("llama", output_offset=True, output_heads=heads)
    z = torch.randn(2, 16)
    ids, att = m._tokenize_prompts(["The capital of France is", "Apple was founded by"], "right")
    q = torch.randn(2, 16)  # the queries' own latents
    cond = m.conditioning(z, q)
    got = m.runner.forward(ids, att, cond).logits
    no_out = Conditioning(cond.prefix, cond.offset)
    ref_out = m.runner.forward(ids, att, no_out, output_hidden_states=True)
    h = ref_out.hidden_states[-1]
    head = m.out_offset

    H = m.kv_shape.hidden_size
    W = m.decoder.get_output_embeddings().weight
    expected = ref_out.logits.clone()
    for k in range(heads):  # head k: rows k*H..(k+1)*H of proj, row k of gate
        def g_of(a, b, k=k):
            inner = torch.nn.functional.gelu(head.inner(torch.cat([a, b], -1)))
            return inner @ head.proj.weight[k * H : (k + 1) * H].T + head.proj.bias[k * H : (k + 1) * H]

        g = g_of(z, q) - g_of(torch.zeros_like(z), q)  # (B, H)
        gate = torch.sigmoid(h / h.norm(dim=-1, keepdim=True) @ head.gate.weight[k] + head.gate.bias[k])  # (B, T)
        expected = expected + gate[..., None] * (g @ W.T)[:, None, :]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, ref_out.logits, atol=1e-3)  # the offset reaches the logits


def test_output_offset_expand_state_keeps_the_one_head_function():
    """A 1-head offset's weights loaded into a 3-head module give the same logits (heads 2..3 start at zero)."""
    one = make("llama", output_offset=True)
    three = make("llama", output_offset=True, output_heads=3)
    state = {k: v for k, v in one.adapter_state().items()}
    three.load_adapter_state(three.out_offset.expand_state(state, prefix="out_offset."))
    z, q = torch.randn(2, 16), torch.randn(2, 16)
    ids, att = one._tokenize_prompts(["The capital of France is", "Apple was founded by"], "right")
    a = one.runner.forward(ids, att, one.conditioning(z, q)).logits
    b = three.runner.forward(ids, att, three.conditioning(z, q)).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    gates = three.out_offset.gate.weight
    assert not torch.equal(gates[1], gates[2])  # new heads differ, or they would train as clones
    torch.testing.assert_close(gates[0], one.out_offset.gate.weight[0])
    with pytest.raises(ValueError, match="rows"):
        three.out_offset.expand_state({"proj.weight": torch.zeros(5, 4), "proj.bias": torch.zeros(5)})


def test_output_offset_is_zero_for_empty_readout_and_untrained():
    m = make("llama", output_offset=True)
    assert torch.equal(m.out_offset(torch.zeros(3, 16)), torch.zeros(3, 1, m.kv_shape.hidden_size))
    assert torch.equal(m.out_offset(torch.zeros(3, 16), torch.randn(3, 16)), torch.zeros(3, 1, m.kv_shape.hidden_size))
    fresh = Larimar(LarimarConfig(latent_size=16, memory_size=12, prefix_len=3, prefix_hidden=8, output_offset=True),
                    tiny_bert(), tiny_bert_tokenizer(), tiny_llama(kv_heads=1), tiny_tokenizer(pad_token=True))
    assert torch.equal(fresh.out_offset(torch.randn(2, 16)), torch.zeros(2, 1, fresh.kv_shape.hidden_size))


def test_release_mask_stops_the_output_offset_after_a_release_token():
    """With every token releasing, step 1 is conditioned and steps 2.. equal decoding without the output offset."""
    m = make("llama", output_offset=True)
    with torch.no_grad():
        m.out_offset.proj.weight.normal_(0, 5.0)  # the last layer starts at zero: make the offset visible
    ids, att = m._tokenize_prompts(["The capital of France is"], "left")
    cond = m.conditioning(torch.randn(1, 16), torch.randn(1, 16))
    V = m.decoder.get_output_embeddings().weight.shape[0]
    kept = m.runner.generate(ids, att, cond, max_new_tokens=6)
    never = m.runner.generate(ids, att, cond, max_new_tokens=6, release_mask=torch.zeros(V, dtype=torch.bool))
    assert torch.equal(kept, never)
    released = m.runner.generate(ids, att, cond, max_new_tokens=6, release_mask=torch.ones(V, dtype=torch.bool))
    assert released[0, 0] == kept[0, 0]
    no_out = Conditioning(cond.prefix, cond.offset)
    rest = m.runner.generate(torch.cat([ids, kept[:, :1]], 1), torch.ones(1, ids.shape[1] + 1, dtype=att.dtype), no_out, max_new_tokens=5)
    assert torch.equal(released[:, 1:], rest)
    assert not torch.equal(released, kept)  # the offset did change the continuation
    end = m.sentence_end_mask()
    assert end.shape == (V,) and end.any() and not end.all()


def test_adapter_dir_resolves_shipped_names_after_local_paths(tmp_path, monkeypatch):
    from larimar.modeling import model as model_module
    from larimar.modeling.model import CONFIG_FILE, adapter_dir, default_adapter_dir

    shipped = tmp_path / "assets"
    (shipped / "tokens").mkdir(parents=True)
    (shipped / "tokens" / CONFIG_FILE).write_text("{}")
    monkeypatch.setattr(model_module, "packaged_adapter_dir", lambda name: shipped / name)
    assert adapter_dir(None) == default_adapter_dir()
    monkeypatch.chdir(tmp_path)
    assert adapter_dir("tokens") == shipped / "tokens"  # a shipped name
    assert adapter_dir("nothing") == Path("nothing")  # neither: the path as given (loading then fails clearly)
    assert adapter_dir("runs/tokens") == Path("runs/tokens")  # a path with folders is never a name
    (tmp_path / "tokens").mkdir()
    assert adapter_dir("tokens") == Path("tokens")  # a local directory wins
    with pytest.raises(FileNotFoundError, match="not a saved Larimar model"):
        Larimar.from_pretrained("nothing")
