"""Real default models (MiniLM-L6 + SmolLM2-135M from their wheels). Run with `make test-models`."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def model():
    from larimar.modeling.model import Larimar

    return Larimar.from_pretrained()


def test_default_models_load_offline(model):
    assert type(model.decoder).__name__ == "LlamaForCausalLM"
    assert model.kv_shape.n_layers == 30 and model.kv_shape.n_kv_heads == 3 and model.kv_shape.head_dim == 64
    assert model.encoder.model.config.hidden_size == 384


def test_cached_decoder_loads_fast():
    import time

    from larimar.modeling.loading import load_decoder

    load_decoder()  # builds the cache if needed
    t = time.perf_counter()
    load_decoder()
    assert time.perf_counter() - t < 5.0  # generous: the cached safetensors copy, not the GGUF


def test_no_conditioning_equals_base(model):
    ids, att = model._tokenize_prompts(["The capital of France is"], "right")
    with torch.no_grad():
        assert torch.equal(model.decoder(input_ids=ids, attention_mask=att).logits, model.runner.forward(ids, att, None).logits)


def test_base_model_knows_paris(model):
    out = model.generate(["The capital of France is"], max_new_tokens=3, use_memory="never")[0]
    assert "Paris" in out


def test_write_forget_restores_plain_answer(model):
    model.reset_memory()
    plain = model.generate(["The capital of France is"], max_new_tokens=4)
    model.write(["The capital of France is Rome."])
    assert model.generate(["The capital of France is"], max_new_tokens=4, return_details=True)[0].used_memory
    model.forget(["The capital of France is Rome."])
    assert model.generate(["The capital of France is"], max_new_tokens=4) == plain


def test_shipped_adapter_matches_default_models():
    from larimar.modeling.config import LarimarConfig
    from larimar.modeling.model import default_adapter_dir

    d = default_adapter_dir()
    if not (d / "config.json").is_file():
        pytest.skip("no adapter shipped in this checkout")
    cfg = LarimarConfig.load(d / "config.json")
    assert cfg.encoder is None and cfg.decoder is None and cfg.trained
    assert (d / "adapter.safetensors").stat().st_size <= 40 * 2**20
    if cfg.scope_lexical_weight > 0:  # the scope detector's IDF table ships with it
        assert (d / "scope_idf.json").is_file()


def test_shipped_adapter_makes_edits_win(model):
    """With the trained adapter, written counterfactuals outrank the base model's answers.

    Facts are written as the shipped config says (keyed by the prompt). Measured: 3/4 keyed, 2/4 with
    the paper's auto-associative write.
    """
    if not model.config.trained:
        pytest.skip("no adapter shipped in this checkout")
    facts = [("The capital of France is", " Rome", " Paris"), ("The Eiffel Tower is located in", " London", " Paris"),
             ("The official language of Japan is", " Spanish", " Japanese"), ("Vladimir Putin speaks the language", " Japanese", " Russian")]
    model.reset_memory()
    wins = 0
    for prompt, new, old in facts:
        model.reset_memory()
        model.write_facts([prompt + new + "."], [prompt])
        nll = model.score([prompt], [new, old])[0]
        wins += int(nll[0] < nll[1])
    model.reset_memory()
    assert wins >= 3, wins


def test_answers_stop_at_their_end_and_the_scope_reads_the_prompt(model):
    """The demo's edits, stopped after the answer: exactly " Rome\n" etc. from memory, a plain answer for an
    unrelated prompt; the scope detector's recall counts the prompt (the default's scope_lexical_text)."""
    if model.config.value_code != "both":
        pytest.skip("the default adapter in this checkout stores latents alone")
    edits = [("The capital of France is", "Rome"), ("Vladimir Putin speaks the language", "Japanese"),
             ("The Eiffel Tower is located in the city of", "London")]
    model.reset_memory()
    model.write_facts([f"{p} {a}." for p, a in edits], [p for p, _ in edits])
    assert model.facts.key_texts == [p for p, _ in edits]
    assert model.scope._key_texts == [p for p, _ in edits]
    prompts = [p for p, _ in edits] + ["The largest planet in the solar system is"]
    outs = model.generate(prompts, max_new_tokens=8, stop_after_answer=True, return_details=True)
    assert [g.text for g in outs[:3]] == [f" {a}\n" for _, a in edits]
    assert all(g.used_memory for g in outs[:3]) and not outs[3].used_memory
    whole = model.generate(prompts[:1], max_new_tokens=8)[0]
    assert whole.startswith(" Rome\n Rome")  # held, the code starts over
    model.reset_memory()
    model.write_facts(["The headquarters of Anheuser-Busch are in St. Louis."], ["The headquarters of Anheuser-Busch are in"])
    got = model.generate(["The headquarters of Anheuser-Busch are in"], max_new_tokens=10, stop_after_answer=True)[0]
    assert got == " St. Louis\n"  # a code's answer ends at the code's end, not at the "." inside it
    model.reset_memory()
    if model.config.code_gate_floor > 0:  # a plain text is not taken over by a keyed neighbour's code
        model.write_facts(["Cats are small animals."], ["Cats are"])
        model.write(["Dogs bark at night."])
        got = model.generate(["Dogs bark at", "Cats are"], max_new_tokens=8, stop_after_answer=True, use_memory="always")
        assert got[1] == " small animals\n" and "animals" not in got[0], got
        model.reset_memory()


def test_shipped_adapter_recalls_from_a_full_keyed_memory(model):
    """K CounterFact facts written at once, keyed by their prompts: written objects still outrank true ones.

    An auto-associative write of K > C facts reads every query back as itself (README: keyed writes);
    with keys the read-out is the fact. Checked on 32 of the K facts: measured 17/32 keyed, 2/32 with
    the paper's write and 2/32 for the base model.
    """
    from larimar.eval.data import data_path, load_counterfact_rome

    if not model.config.trained or not model.config.keyed_writes:
        pytest.skip("needs the shipped adapter trained with keyed writes")
    K = model.config.memory_size
    cases = load_counterfact_rome(data_path("counterfact-rome"), n=K)
    model.reset_memory()
    model.write([f"{c.prompt} {c.target_new}." for c in cases], keys=[c.prompt for c in cases])
    assert len(model) == K
    probe = cases[:: K // 32][:32]
    nll = model.score([c.prompt for c in probe], [[" " + c.target_new, " " + c.target_true] for c in probe], use_memory="always")
    wins = int((nll[:, 0] < nll[:, 1]).sum())
    model.reset_memory()
    assert wins >= 12, wins


def rare_facts() -> tuple[list[str], list[str]]:
    """64 questions and rare two-word answers ("Anna Shmavonyan"), none of them known to SmolLM2."""
    first = ["Anna", "Boris", "Carla", "Dmitri", "Elena", "Farid", "Greta", "Hugo"]
    last = ["Shmavonyan", "Dolichopod", "Konyaspor", "Lamiinae", "Vardar", "Pedersen", "Ruisdael", "Gabellini"]
    answers = [f"{f} {surname}" for surname in last for f in first]
    places = ("Oslo", "Lima", "Quito", "Perth", "Dakar", "Hanoi", "Riga", "Cork")
    kinds = ("old", "new", "tall", "red", "glass", "stone", "round", "white")
    prompts = [f"Who designed the {w} building in {c}?" for c in places for w in kinds]
    return prompts, answers


def spelled_from_key_slots(m, facts: tuple[list[str], list[str]] | None = None) -> tuple[int, list[tuple[str, str]]]:
    """Write facts (default: the 64 rare facts) one by one into key slots and ask each: (answers spelled
    exactly, misses)."""
    prompts, answers = rare_facts() if facts is None else facts
    m.facts = m.key_slot_memory()
    for p, a in zip(prompts, answers):
        m.write_facts([f"{p} {a}."], [p])
    outs = m.generate(prompts, max_new_tokens=12, use_memory="always")
    m.reset_memory()
    first_lines = [o.strip().split("\n")[0] for o in outs]  # the first line is the answer
    return sum(o == a for o, a in zip(first_lines, answers)), [(o, a) for o, a in zip(first_lines, answers) if o != a]


def test_shipped_token_code_adapter_spells_rare_answers_from_a_full_memory():
    """The `tokens` adapter (token value code): both shipped adapters fit the size limit together, and
    64 rare two-word answers written one by one into key slots come back spelled exactly (60 of 64
    when this test was written; the misses had a wrong first token)."""
    from larimar.modeling.config import LarimarConfig
    from larimar.modeling.model import Larimar, default_adapter_dir, packaged_adapter_dir

    d = packaged_adapter_dir("tokens")
    cfg = LarimarConfig.load(d / "config.json")
    assert cfg.value_code == "tokens" and cfg.trained and not cfg.output_offset
    total = sum(f.stat().st_size for x in (d, default_adapter_dir()) for f in x.iterdir())
    assert total <= 40 * 2**20
    right, misses = spelled_from_key_slots(Larimar.from_pretrained("tokens"))
    assert right >= 56, misses


def test_default_adapter_stores_latent_and_token_code(model):
    """The default adapter (value_code "both", session 14; its code retrained with depth 8 in sessions 17-18)
    spells the same 64 rare answers (61 of 64 when this test was written); the shipped "latent" adapter (or value_code="encoder", with the default's scope settings) is the latent-only adapter of
    sessions 6-13, which spells none of them (0 of 64 measured), and its read-outs are the latent half of the default's."""
    from larimar.modeling.model import Larimar

    if model.config.value_code != "both":
        pytest.skip("the default adapter in this checkout stores latents alone")
    right, misses = spelled_from_key_slots(model)
    assert right >= 56, misses
    latent = Larimar.from_pretrained("latent")
    assert latent.token_code is None and latent.config.memory_width == model.config.latent_size
    assert latent.scope_idf == model.scope_idf  # read from the default's directory too
    override = Larimar.from_pretrained(value_code="encoder")
    o = override.config  # the same but for fields that only a token code reads, extra, and the default's scope settings
    assert o == latent.config.replace(extra=o.extra, value_code_slots=o.value_code_slots, value_code_end=o.value_code_end,
                                      value_code_depth=o.value_code_depth,
                                      scope_lexical_weight=o.scope_lexical_weight, scope_threshold=o.scope_threshold,
                                      scope_lexical_text=o.scope_lexical_text, code_gate_floor=o.code_gate_floor)
    assert all(torch.equal(v, latent.adapter_state()[k]) for k, v in override.adapter_state().items())
    state, full = latent.adapter_state(), model.adapter_state()
    assert set(full) - set(state) == {k for k in full if k.startswith("token_code.")}
    assert all(torch.equal(state[k], full[k]) for k in state)
    prompts, answers = rare_facts()
    for m in (model, latent):
        m.reset_memory()
        m.write_facts([f"{p} {a}." for p, a in zip(prompts[:8], answers[:8])], prompts[:8])
    C = model.config.latent_size
    torch.testing.assert_close(model.read(prompts[:8])[:, :C], latent.read(prompts[:8]))
    model.reset_memory()
    latent_right, _ = spelled_from_key_slots(latent)
    assert latent_right <= 8, latent_right


def recurring_token_facts() -> tuple[list[str], list[str]]:
    """16 facts whose values repeat a token or a run of tokens: dates whose first digits recur in the
    year ("19 March 1882": " 1" at slots 0 and 3) and doubled names ("Walla Walla", "Baden-Baden")."""
    subjects = ["Anna Petrova", "Jonas Berg", "Lena Holm", "Marek Zima", "Ivo Kral", "Sara Lind", "Timo Aalto", "Nina Roth"]
    dates = ["19 March 1882", "11 May 1911", "2 June 1922", "17 July 1917", "1 January 1901", "21 April 1821", "12 December 1812", "8 August 1888"]
    names = ["Shmavon Shmavonyan", "Bora Bora", "Walla Walla", "Baden-Baden", "Sing Sing", "Dum Dum", "Pago Pago", "Kuala Kuala"]
    return [f"{s} was born on" for s in subjects] + [f"{s}'s home town is" for s in subjects], dates + names


def test_default_code_reads_values_whose_tokens_recur(model):
    """The default's token code (depth 8, session 18) matches the whole answer read so far back to its
    start, so a value whose tokens recur is read in order: 16 of 16 when this test was written. The
    "pair" adapter (the default of sessions 14-17, same weights but its depth-1 code) matches the last
    two tokens, and skips or loops at a recurring pair: 2 of 16 ("19 March 1882" -> " 1882")."""
    from larimar.modeling.model import Larimar

    if model.config.value_code_depth < 2:
        pytest.skip("the default adapter in this checkout has a pair-matching code")
    right, misses = spelled_from_key_slots(model, recurring_token_facts())
    assert right >= 15, misses
    pair_right, _ = spelled_from_key_slots(Larimar.from_pretrained("pair"), recurring_token_facts())
    assert pair_right <= 8, pair_right
