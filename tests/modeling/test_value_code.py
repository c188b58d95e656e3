"""Token value code: binding algebra, decoding, the decoder paths, and the model's writes."""

from __future__ import annotations

import pytest
import torch

from larimar.modeling.conditioning import ConditionedDecoder
from larimar.modeling.config import LarimarConfig
from larimar.modeling.model import Larimar
from larimar.modeling.value_code import TokenValueCode
from larimar.testing import tiny_larimar, tiny_word_pairs


def code_and_embeddings(V: int = 400, H: int = 96, C: int = 64, slots: int = 5, depth: int = 1) -> tuple[TokenValueCode, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    E = torch.randn(V, H, generator=g)
    code = TokenValueCode(H, C, slots, depth=depth)
    code.init_from_embeddings(E)
    return code, E


def decode_chain(code: TokenValueCode, E: torch.Tensor, z: torch.Tensor, start: int, n: int, before: tuple[int, ...] = ()) -> list[int]:
    """Greedy decoding of `z` from the bias alone after the prompt tokens (*before, start)."""
    read, out = list(before) + [start], []
    for _ in range(n):
        history = torch.tensor([read[::-1][: code.depth + 1]])
        history = torch.nn.functional.pad(history, (0, code.depth + 1 - history.shape[1]), value=-1)
        read.append(int(code.logit_bias(z, history, E).argmax(-1)))
        out.append(read[-1])
    return out


def test_unbind_inverts_bind_and_is_orthogonal():
    code, _ = code_and_embeddings()
    u = torch.randn(3, 64)
    for k in range(code.slots):
        b = code.bind(u, k)
        torch.testing.assert_close(code.unbind(b, k), u)
        torch.testing.assert_close(b.norm(dim=-1), u.norm(dim=-1))


def test_encode_is_the_normalised_sum_of_bound_units():
    code, E = code_and_embeddings()
    ids = [5, 17, 3]
    u = code.units(E, torch.tensor(ids))
    manual = sum(code.bind(u[k], k) for k in range(3))
    torch.testing.assert_close(code.encode(E, [ids])[0], manual / manual.norm())


def test_codes_decode_token_by_token_from_any_start_token():
    """Untrained (PCA-initialised) code, C = H = 96: three distinct tokens come back in order."""
    code, E = code_and_embeddings(C=96)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randperm(399, generator=g)[:3].add(1).tolist() for _ in range(20)]  # 0 is the "prompt" token
    z = code.encode(E, seqs)
    for i, ids in enumerate(seqs):
        assert decode_chain(code, E, z[i : i + 1], 0, 3) == ids


def test_the_token_before_tells_repeated_tokens_apart():
    """[a, b, b, c]: after "b" comes "b" (read after "a") or "c" (read after "b"); prev alone cannot tell."""
    code, E = code_and_embeddings(C=96)
    seq = [11, 42, 42, 7]
    z = code.encode(E, [seq])
    assert decode_chain(code, E, z, 0, 4) == seq
    with torch.no_grad():
        code.w_prev2.zero_()
    assert decode_chain(code, E, z, 0, 4) != seq


def test_position_scores_match_a_hand_computed_formula():
    """next_unit against the module docstring's formula, written out slot by slot with plain dot products:
    s_k = M_{0, k} + sum_{1 <= d <= min(k, D)} lam^d (M_{d, k-d} - mu) + [k <= D] beta lam^k M_{k, 0} + b_k,
    D = 2 of S - 2 = 3."""
    code, E = code_and_embeddings(C=64, slots=5, depth=2)
    lam, beta, mu = 0.8, 0.5, 0.2
    with torch.no_grad():
        code.w_prev2.fill_(lam)
        code.start_credit.fill_(beta)
        code.mismatch.fill_(mu)
        code.pos_bias.copy_(torch.tensor([0.1, -0.2, 0.05, 0.0]))
    g = torch.Generator().manual_seed(3)
    z = torch.nn.functional.normalize(torch.randn(2, 64, generator=g), dim=-1)
    hist = torch.nn.functional.normalize(torch.randn(2, 4, 64, generator=g), dim=-1)  # 4 tokens read: only D + 1 = 3 count
    S, D = code.slots, 2
    R = [torch.eye(64)[:, code.perm[k]] * code.sign[k] for k in range(S)]  # R_k as matrices: R_k u = u @ R_k
    with torch.no_grad():
        got = code.next_unit(z, hist)
        for n in range(2):
            M = [[float(hist[n, d] @ R[k] @ z[n]) for k in range(S - 1)] for d in range(D + 1)]
            s = []
            for k in range(S - 1):
                total = M[0][k] + sum(lam**d * (M[d][k - d] - mu) for d in range(1, min(k, D) + 1))
                if k <= D:
                    total += beta * lam**k * M[k][0]
                s.append(total + float(code.pos_bias[k]))
            scores = torch.tensor([float(code.threshold)] + s) * (64**0.5 / S) * code.log_tau[1].exp()
            a = scores.softmax(-1)
            r = sum(a[j] * (z[n] @ R[j].T) for j in range(S))  # R_jᵀ z
            torch.testing.assert_close(got[n], r / r.norm(), atol=1e-5, rtol=1e-5)


def test_depth_one_without_start_credit_is_the_pair_match():
    """D = 1, beta = mu = 0 (adapters before session 17): s_k = M_{0,k} + lam M_{1,k-1}, whatever else was read."""
    code, E = code_and_embeddings(C=64, slots=5)
    g = torch.Generator().manual_seed(4)
    z = torch.nn.functional.normalize(torch.randn(3, 64, generator=g), dim=-1)
    hist = torch.nn.functional.normalize(torch.randn(3, 3, 64, generator=g), dim=-1)
    with torch.no_grad():
        m = torch.stack([(code.bind(hist[:, 0], k) * z).sum(-1) for k in range(4)], -1)
        m2 = torch.stack([(code.bind(hist[:, 1], k) * z).sum(-1) for k in range(3)], -1)
        expected = m + code.w_prev2 * torch.nn.functional.pad(m2, (1, 0))
        torch.testing.assert_close(code.position_scores(z, hist), expected)
        torch.testing.assert_close(code.position_scores(z, hist[:, :2]), expected)


def test_the_chain_back_to_the_start_tells_a_recurring_pair_apart():
    """[a, b, c, a, b, d] (as " 19 March 1882": the pair (" ", "1") at slots 0-1 and 4-5): read after a
    prompt, "a b" is followed by "c" or by "d"; the pair alone cannot tell. The chain back to the start
    can: before slot 0 sits a prompt token, before slot 3 sits "c"."""
    code, E = code_and_embeddings(C=96, slots=7)
    seq = [11, 42, 7, 11, 42, 99]
    z = code.encode(E, [seq])
    with torch.no_grad():
        code.pos_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.1, 0.0]))  # a prior as the trained one, for the later slot
    assert decode_chain(code, E, z, 0, 6, before=(1, 2, 3, 4)) != seq  # pairs alone: "a b" read at slots 3-4
    code.depth = 5
    with torch.no_grad():
        code.start_credit.fill_(0.5)
    assert decode_chain(code, E, z, 0, 6, before=(1, 2, 3, 4)) == seq
    again = code.encode(E, [[5, 11, 42, 7, 11, 42]])  # a genuine mid-code "a b" is still read as such
    assert decode_chain(code, E, again, 0, 6, before=(1, 2, 3, 4)) == [5, 11, 42, 7, 11, 42]
    triple = [11, 42, 7, 5, 11, 42, 7, 99]  # a recurring triple, as (" ", "1", "9") in " 19 March 1982"
    code8, E8 = code_and_embeddings(H=256, C=256, slots=9, depth=7)  # 8 tokens: a wider code, less crosstalk
    with torch.no_grad():
        code8.start_credit.fill_(0.5)
    assert decode_chain(code8, E8, code8.encode(E8, [triple]), 0, 8, before=(1, 2)) == triple


def test_answer_tokens_in_the_prompt_do_not_outweigh_the_recent_tokens():
    """A prompt that holds the answer's first tokens and then others ("What company is Vueling part of?"
    before " Vueling Holdings"): with the chain summed as plain evidence (mu = 0) the two stale matches
    put prev at a later slot; the mismatch cost mu makes the recent misses count against it, so the
    first answer token is read."""
    code, E = code_and_embeddings(H=256, C=256, slots=9, depth=7)
    seq = [11, 42, 7, 5, 99]
    z = code.encode(E, [seq])
    prompt = (1, 2, 11, 42, 3, 4)  # ... " V" "ueling" " part" " of", then "?"
    with torch.no_grad():
        code.start_credit.fill_(0.5)
        code.mismatch.zero_()
        code.threshold.fill_(0.45)
    assert decode_chain(code, E, z, 6, 5, before=prompt)[0] != 11
    with torch.no_grad():
        code.mismatch.fill_(0.2)
    assert decode_chain(code, E, z, 6, 5, before=prompt) == seq


def test_after_the_end_token_the_code_starts_over():
    code, E = code_and_embeddings(C=96)
    seq = [11, 42, 399]  # 399 plays the end token
    z = code.encode(E, [seq])
    after_end = code.logit_bias(z, torch.tensor([[399, 42]]), E).argmax(-1)
    assert int(after_end) != 11  # without an end id the empty slot after it is read: noise
    code.end_id = 399
    assert int(code.logit_bias(z, torch.tensor([[399, 42]]), E).argmax(-1)) == 11


def test_sequence_bias_is_the_per_position_bias():
    code, E = code_and_embeddings(depth=2)
    z = code.encode(E, [[1, 2, 3], [4, 5]])
    ids = torch.tensor([[7, 1, 2], [9, 4, 6]])
    with torch.no_grad():  # the chain back to the start counts too
        code.start_credit.fill_(0.4)
    full = code.sequence_bias(z, ids, E)  # (2, 3, V)
    for b in range(2):
        for t in range(3):
            hist = [int(ids[b, t - d]) if t - d >= 0 else -1 for d in range(3)]
            torch.testing.assert_close(full[b, t], code.logit_bias(z[b : b + 1], torch.tensor([hist]), E)[0])
    assert not torch.allclose(full[0, 2], code.logit_bias(z[:1], ids[0, 1:3].flip(0)[None], E)[0])  # the third token back matters
    # a padded position counts as no token
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    padded = code.sequence_bias(z, ids, E, mask)
    torch.testing.assert_close(padded[0, 1], code.logit_bias(z[:1], torch.tensor([[1, -1, -1]]), E)[0])
    torch.testing.assert_close(padded[0, 2], code.logit_bias(z[:1], torch.tensor([[2, 1, -1]]), E)[0])
    torch.testing.assert_close(padded[1], full[1])


def test_vocab_units_are_cached_and_follow_in_place_changes():
    """The cached (V, C) units equal a fresh `units(E)`; an in-place change to G or E recomputes them;
    training (gradients on G) bypasses the cache; a copy of the module leaves the cache behind."""
    import copy

    code, E = code_and_embeddings()
    with torch.no_grad():
        U = code.vocab_units(E)
        torch.testing.assert_close(U, code.units(E))
        assert code.vocab_units(E).data_ptr() == U.data_ptr()  # the same tensor, not recomputed
        code.G.mul_(-1.0)
        torch.testing.assert_close(code.vocab_units(E), -U)
        E.add_(1.0)
        torch.testing.assert_close(code.vocab_units(E), code.units(E))
        torch.testing.assert_close(code.vocab_units(E + 0), code.units(E + 0))  # another matrix: its own units
    assert copy.deepcopy(code)._vocab_cache is None
    fresh = code.vocab_units(E)  # grad enabled, G trainable: a differentiable product
    assert fresh.requires_grad
    fresh.sum().backward()
    assert code.G.grad is not None
    with torch.inference_mode():
        U_inf = code.vocab_units(E)
    x = torch.randn(2, U_inf.shape[1], requires_grad=True)
    (x @ U_inf.T).sum().backward()  # made under inference_mode, still usable where autograd records
    assert x.grad is not None


def test_encode_rejects_bad_lengths():
    code, E = code_and_embeddings(slots=3)
    with pytest.raises(ValueError, match="1..3"):
        code.encode(E, [[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="1..3"):
        code.encode(E, [[]])


def test_config_validates_the_value_code():
    with pytest.raises(ValueError, match="value_code"):
        LarimarConfig(value_code="bytes")
    with pytest.raises(ValueError, match="value_code_slots"):
        LarimarConfig(value_code="tokens", value_code_slots=1)
    with pytest.raises(ValueError, match="value_encoder_layers"):
        LarimarConfig(value_code="tokens", value_encoder_layers=2)


@pytest.fixture(scope="module")
def model() -> Larimar:
    """A tiny model whose code (C = 32) is trained for a few steps on two-word strings of a tiny vocabulary."""
    from larimar.training.token_code import train_token_code

    torch.manual_seed(0)
    m = tiny_larimar(latent_size=32, keyed_writes=True, value_writes=True, value_code="tokens", value_code_slots=4)
    train_token_code(m, tiny_word_pairs(300, 0), steps=150, lr=1e-2, batch=32, noise=0.1, log=lambda _: None)
    return m


def test_model_writes_token_codes_keyed_by_the_prompts(model):
    model.reset_memory()
    texts, prompts = ["the sky is blue.", "grass is green."], ["the sky is", "grass is"]
    model.write_facts(texts, prompts)
    torch.testing.assert_close(model.facts.Z.float(), model.encode_token_values(["blue", "green"]), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model.facts.keys.float(), model.encoder(prompts).detach(), atol=1e-6, rtol=1e-6)
    model.reset_memory()
    model.write(["plain text"])  # no key: addressed by the text's own latent, storing the text's code
    torch.testing.assert_close(model.facts.keys.float(), model.encoder(["plain text"]).detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model.facts.Z.float(), model.encode_token_values(["plain text"]), atol=1e-6, rtol=1e-6)
    model.reset_memory()


def test_value_code_ids_end_with_the_end_token_and_truncate(model):
    end = model.tokenizer("\n", add_special_tokens=False)["input_ids"]  # the default end token
    assert [model.value_code_end_id()] == end
    ids = model.value_code_ids(["ab", "a much longer value than four tokens can hold"])
    assert ids[0] == model.tokenizer(" ab", add_special_tokens=False)["input_ids"] + end
    assert len(ids[1]) == 4 and ids[1][-1] == end[0]


def test_generation_spells_the_stored_value(model):
    """The tiny random decoder's own logits are small, so the code's bias decides every token (values of
    two tokens each in the tiny vocabulary, plus the end token)."""
    model.reset_memory()
    prompts = ["the sky is", "grass is"]
    model.write_facts(["the sky is capital Paris.", "grass is and the."], prompts)
    for p, value in zip(prompts, ["capital Paris", "and the"]):
        want = model.value_code_ids([value])[0]
        out = model.generate([p], max_new_tokens=len(want), use_memory="always")[0]
        assert model.tokenizer(out, add_special_tokens=False)["input_ids"] == want
    model.reset_memory()


def one_fact(model: Larimar):
    """Memory holding "the sky is capital Paris." -> (its prompt's conditioning, prompt ids (1, T), a runner)."""
    model.reset_memory()
    model.write_facts(["the sky is capital Paris."], ["the sky is"])
    cond = model.condition_prompts(["the sky is"])
    ids = torch.tensor([model.tokenizer("the sky is", add_special_tokens=False)["input_ids"]])
    return cond, ids, ConditionedDecoder(model.decoder)


def test_generate_matches_teacher_forced_forward(model):
    cond, ids, runner = one_fact(model)
    new = runner.generate(ids, torch.ones_like(ids), cond, max_new_tokens=3)  # the value's two tokens and the end
    assert new[0].tolist() == model.value_code_ids(["capital Paris"])[0]
    full = torch.cat([ids, new], dim=1)
    logits = runner.forward(full, torch.ones_like(full), cond).logits
    assert logits[0, ids.shape[1] - 1 : -1].argmax(-1).tolist() == new[0].tolist()
    model.reset_memory()


def test_generation_reads_the_same_history_as_teacher_forcing(model, monkeypatch):
    """With a deeper history and the start credit on, the bias generation adds at each step equals the
    teacher-forced bias at that position (the decoding loop rolls the history as `sequence_bias` shifts it)."""
    cond, ids, runner = one_fact(model)
    code = model.token_code
    saved = (code.depth, code.start_credit.item(), code.log_tau.detach().clone())
    seen = []
    original = TokenValueCode.logit_bias

    def recording(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        seen.append(out.detach().clone())
        return out

    try:
        with torch.no_grad():
            code.start_credit.fill_(0.5)
            code.log_tau[1] = 0.0  # a soft position softmax: every term of every score shows in the bias
        code.depth = 2  # of S - 2 = 2
        monkeypatch.setattr(TokenValueCode, "logit_bias", recording)
        new = runner.generate(ids, torch.ones_like(ids), cond, max_new_tokens=6)  # past the end token: a restart
        monkeypatch.undo()
        full = torch.cat([ids, new], dim=1)
        with torch.no_grad():
            teacher = code.sequence_bias(cond.code, full, model.decoder.get_input_embeddings().weight)[0]  # (T, V)
        T0 = ids.shape[1]
        assert len(seen) == new.shape[1]
        for step, bias in enumerate(seen):
            torch.testing.assert_close(bias[0], teacher[T0 - 1 + step], atol=1e-4, rtol=1e-4)
    finally:
        with torch.no_grad():
            code.depth = saved[0]
            code.start_credit.fill_(saved[1])
            code.log_tau.copy_(saved[2])
        model.reset_memory()


def test_the_code_starts_over_after_its_end_token(model):
    """After the end token the code spells the value again (memory keeps control of the generation)."""
    cond, ids, runner = one_fact(model)
    new = runner.generate(ids, torch.ones_like(ids), cond, max_new_tokens=6)
    want = model.value_code_ids(["capital Paris"])[0]
    assert new[0].tolist() == want + want
    model.reset_memory()


def test_stop_after_answer_ends_at_the_code_end_token(model):
    """Held, the code spells the value again after its end; stopped, the answer is the value and its end."""
    model.reset_memory()
    model.write_facts(["the sky is capital Paris."], ["the sky is"])
    want = model.value_code_ids(["capital Paris"])[0]
    pad = model.tokenizer.pad_token_id
    held = model.generate(["the sky is"], max_new_tokens=2 * len(want), use_memory="always")[0]
    stopped = model.generate(["the sky is"], max_new_tokens=2 * len(want), use_memory="always", stop_after_answer=True)[0]
    assert model.tokenizer(held, add_special_tokens=False)["input_ids"] == want + want
    assert model.tokenizer(stopped, add_special_tokens=False)["input_ids"] == want
    cond, ids, runner = one_fact(model)
    new = runner.generate(ids, torch.ones_like(ids), cond, max_new_tokens=2 * len(want),
                          stop_mask=model.sentence_end_mask(), blank_mask=model.blank_token_mask(), pad_token_id=pad)
    assert new[0].tolist() == want + [pad] * len(want)  # padded after the end, like EOS
    with pytest.raises(ValueError, match="exclude each other"):
        model.generate(["the sky is"], release_after_answer=True, stop_after_answer=True)
    model.reset_memory()


def test_answers_read_from_a_code_end_at_its_end_token_not_at_a_full_stop(model):
    """A value may hold "." ("St. Louis"): a row read from a code stops at the code's end token; a row
    whose code gate is below 0.5 (a text stored without a value) stops at any sentence end."""
    from larimar.modeling.conditioning import Conditioning

    ends, end_id = model.sentence_end_mask(), model.value_code_end_id()
    cond = Conditioning(None, code=torch.zeros(2, 32), code_head=model.token_code, code_gate=torch.tensor([0.9, 0.2]))
    mask = model.answer_end_mask(cond)
    assert mask.shape == (2, ends.shape[0])
    assert mask[0].nonzero().flatten().tolist() == [end_id] and torch.equal(mask[1], ends)
    assert torch.equal(model.answer_end_mask(None), ends)
    assert model.answer_end_mask(Conditioning(None, code=torch.zeros(1, 32), code_head=model.token_code))[0].sum() == 1  # no gate: 1
    # the decoding loop reads a per-row mask: row 0 ends at its second token, row 1 at its first
    cond1, ids, runner = one_fact(model)
    full = runner.generate(ids, torch.ones_like(ids), cond1, max_new_tokens=3)
    V = ends.shape[0]
    rows = torch.zeros(2, V, dtype=torch.bool)
    rows[0, full[0, 1]] = True
    rows[1] = True
    two = Conditioning(None, code=cond1.code.expand(2, -1), code_head=cond1.code_head)
    out = runner.generate(ids.expand(2, -1), torch.ones(2, ids.shape[1], dtype=torch.long), two, max_new_tokens=3, stop_mask=rows, pad_token_id=-7)
    assert out[0].tolist() == full[0, :2].tolist() + [-7] and out[1].tolist() == [int(full[0, 0]), -7, -7]
    model.reset_memory()


def test_stop_mask_waits_for_text_before_a_blank_token_can_end_a_row(model):
    """A row ends at its first stop token after a non-blank one; a blank stop token before any text does not end it."""
    cond, ids, runner = one_fact(model)
    V = model.decoder.config.vocab_size
    full = runner.generate(ids, torch.ones_like(ids), cond, max_new_tokens=4)
    every = torch.ones(V, dtype=torch.bool)
    first = runner.generate(ids, torch.ones_like(ids), cond, max_new_tokens=4, stop_mask=every, pad_token_id=-7)
    assert first[0, 0] == full[0, 0] and first[0, 1:].tolist() == [-7] * 3
    blank_first = torch.zeros(V, dtype=torch.bool)
    blank_first[full[0, 0]] = True  # the first token counts as whitespace: the row ends after the second
    second = runner.generate(ids, torch.ones_like(ids), cond, max_new_tokens=4, stop_mask=every, blank_mask=blank_first, pad_token_id=-7)
    assert second[0, :2].tolist() == full[0, :2].tolist() and second[0, 2:].tolist() == [-7] * 2
    plain = runner.generate(ids, torch.ones_like(ids), None, max_new_tokens=3, stop_mask=every, pad_token_id=-7)
    assert plain[0, 1:].tolist() == [-7, -7]  # plain decoding (no memory) stops too
    assert not torch.equal(model.blank_token_mask(), model.sentence_end_mask())
    assert bool(model.blank_token_mask()[model.tokenizer(" ", add_special_tokens=False)["input_ids"][0]])
    model.reset_memory()


def test_release_mask_stops_the_code(model):
    cond, ids, runner = one_fact(model)
    first = runner.generate(ids, torch.ones_like(ids), cond, max_new_tokens=1)
    every = torch.ones(model.decoder.config.vocab_size, dtype=torch.bool)  # any token releases
    released = runner.generate(ids, torch.ones_like(ids), cond, max_new_tokens=3, release_mask=every)
    plain = runner.generate(torch.cat([ids, first], 1), torch.ones(1, ids.shape[1] + 1, dtype=torch.long), cond.__class__(cond.prefix, cond.offset), max_new_tokens=2)
    assert released[0, 0] == first[0, 0] and released[0, 1:].tolist() == plain[0].tolist()
    model.reset_memory()


def test_adapter_round_trip_keeps_the_code(model):
    with torch.no_grad():
        model.token_code.log_tau[0] += 0.5
    state = model.adapter_state()
    assert {"token_code.G", "token_code.log_tau", "token_code.perm", "token_code.sign", "token_code.mu"} <= set(state)
    again = tiny_larimar(latent_size=32, keyed_writes=True, value_writes=True, value_code="tokens", value_code_slots=4)
    assert not torch.equal(again.token_code.log_tau, model.token_code.log_tau)
    again.load_adapter_state(state)
    torch.testing.assert_close(again.token_code.log_tau, model.token_code.log_tau)
    torch.testing.assert_close(again.encode_token_values(["blue"]), model.encode_token_values(["blue"]))


def test_an_adapter_saved_before_the_start_credit_loads_without_it(model):
    """Files written before start_credit and mismatch existed load with both at 0 (and their config with
    depth 1): read as they were trained."""
    with torch.no_grad():
        model.token_code.start_credit.fill_(0.5)
        model.token_code.mismatch.fill_(0.2)
    state = {k: v for k, v in model.adapter_state().items() if k not in ("token_code.start_credit", "token_code.mismatch")}
    model.load_adapter_state(state)
    assert model.token_code.start_credit.item() == 0.0 and model.token_code.mismatch.item() == 0.0
    assert LarimarConfig.from_dict({"value_code": "tokens"}).value_code_depth == 1
    with pytest.raises(ValueError, match="missing"):  # any other missing weight is still an error
        model.load_adapter_state({k: v for k, v in state.items() if k != "token_code.G"})
