"""LarimarEditor: the Editor protocol around a tiny Larimar model (writes, routing, token stats, options)."""

from __future__ import annotations

import pytest
import torch

from larimar.eval.editors import EditRequest, Editor, available_editors, make_editor
from larimar.eval.larimar_editor import LarimarEditor, set_memory_size
from larimar.modeling.config import LarimarConfig
from larimar.modeling.model import Larimar
from larimar.testing import tiny_bert, tiny_bert_tokenizer, tiny_llama, tiny_tokenizer

REQ = EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French")
REQ2 = EditRequest("The capital of France is", "France", "Rome", "Paris")


def tiny_larimar(**cfg) -> Larimar:
    config = LarimarConfig(latent_size=16, memory_size=12, prefix_len=3, prefix_hidden=8, **cfg)
    model = Larimar(config, tiny_bert(), tiny_bert_tokenizer(), tiny_llama(kv_heads=1), tiny_tokenizer(pad_token=True))
    with torch.no_grad():  # untrained maps start at zero: give them weights so that memory matters
        g = torch.Generator().manual_seed(0)
        model.kv_prefix.out.weight.copy_(torch.randn(model.kv_prefix.out.weight.shape, generator=g) * 0.5)
        if model.emb_offset is not None:
            model.emb_offset.proj.weight.copy_(torch.randn(model.emb_offset.proj.weight.shape, generator=g) * 0.5)
    model.eval()
    return model


@pytest.fixture(scope="module")
def model() -> Larimar:
    return tiny_larimar()


def test_protocol_and_registry(model):
    editor = make_editor("larimar", model, model.tokenizer)
    assert "larimar" in available_editors()
    assert isinstance(editor, Editor) and isinstance(editor, LarimarEditor)
    with pytest.raises(ValueError, match="unknown hyper-parameters"):
        make_editor("larimar", model, model.tokenizer, n_rephrase=1)
    with pytest.raises(ValueError, match="n_rephrases"):
        LarimarEditor(model, n_rephrases=-1)
    with pytest.raises(ValueError, match="scope_detector"):
        LarimarEditor(model, scope_detector="no")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Larimar"):
        LarimarEditor(model.decoder)


def test_edit_writes_fact_text_cumulatively_and_reset_empties(model):
    editor = LarimarEditor(model)
    editor.edit([REQ])
    editor.edit(REQ2)
    assert model.facts.texts == [
        "The mother tongue of Danielle Darrieux is English.",
        "The capital of France is Rome.",
    ]
    assert len(editor.edit_seconds) == 2 and all(s >= 0 for s in editor.edit_seconds)
    editor.reset()
    assert len(model) == 0 and editor.written == []


def test_rephrases_written_only_when_asked(model):
    para = ["Danielle Darrieux spoke", "Danielle Darrieux's mother tongue is"]
    plain = LarimarEditor(model)
    plain.edit([REQ], rephrases=[para])
    assert model.facts.texts == ["The mother tongue of Danielle Darrieux is English."]
    one = LarimarEditor(model, n_rephrases=1)
    one.edit([REQ], rephrases=[para])
    assert model.facts.texts == ["The mother tongue of Danielle Darrieux is English.", "Danielle Darrieux spoke English."]
    with pytest.raises(ValueError, match="rephrase lists"):
        one.edit([REQ, REQ2], rephrases=[para])


@pytest.mark.parametrize("scope", [True, False])
def test_score_delegates_with_routing(model, scope):
    editor = LarimarEditor(model, scope_detector=scope)
    prompts = [REQ.prompt, "Apple was founded by"]
    cands = [["English", "French"], ["Bill", " Steve"]]
    before = editor.score(prompts, cands)
    plain = model.score(prompts, [[" English", " French"], [" Bill", " Steve"]], use_memory="never")
    assert torch.allclose(before, plain)
    editor.edit([REQ])
    after = editor.score(prompts, cands)
    expected = model.score(
        prompts, [[" English", " French"], [" Bill", " Steve"]], use_memory="auto" if scope else "always"
    )
    assert after.shape == (2, 2)
    assert torch.allclose(after, expected)
    assert not torch.allclose(after[0], plain[0])  # the rewrite prompt reads memory either way


def test_scope_detector_off_reads_memory_for_unrelated_prompts():
    # the tiny random encoder gives every pair of texts a high cosine: use a threshold it separates
    model = tiny_larimar(scope_threshold=0.97)
    unrelated = ["Zebras are"]
    on, off = LarimarEditor(model, scope_detector=True), LarimarEditor(model, scope_detector=False)
    on.edit([REQ])
    s_on = on.score(unrelated, [["black"]])
    off.edit([REQ])
    s_off = off.score(unrelated, [["black"]])
    plain = model.score(unrelated, [" black"], use_memory="never")
    assert bool(model.route(unrelated, "auto")[0][0]) is False  # out of scope with the detector
    assert torch.allclose(s_on, plain)
    assert not torch.allclose(s_off, plain)


def test_token_stats_agree_with_score(model):
    editor = LarimarEditor(model)
    editor.edit([REQ])
    prompts = [REQ.prompt, "Apple was founded by", "Danielle Darrieux's mother tongue is"]
    targets = ["English", "Bill Gates", "English"]
    stats = editor.token_stats(prompts, targets)
    nll = editor.score(prompts, [[t] for t in targets])[:, 0]
    assert torch.allclose(torch.tensor([s.nll for s in stats]), nll, atol=1e-5)
    for s in stats:
        assert s.correct.dtype == torch.bool and s.correct.numel() == s.target_ids.numel() > 0
    assert editor.token_stats([], []) == []


def test_generate_uses_memory_after_edit(model):
    editor = LarimarEditor(model, scope_detector=False)
    base = editor.generate([REQ.prompt], max_new_tokens=4)
    assert base == model.generate([REQ.prompt], max_new_tokens=4, use_memory="never")
    editor.edit([REQ])
    assert editor.generate([REQ.prompt], max_new_tokens=4) == model.generate(
        [REQ.prompt], max_new_tokens=4, use_memory="always"
    )


def test_addressing_and_threshold_options_configure_model():
    m = tiny_larimar()
    editor = LarimarEditor(m, addressing="gaussian", scope_threshold=0.3, scope_lexical_weight=0.2)
    assert m.config.addressing == "gaussian" and m.scope.threshold == 0.3 and m.scope.lexical_weight == 0.2
    assert m.facts.state.addressing == "gaussian"
    editor.edit([REQ])
    assert editor.score([REQ.prompt], [["English"]]).shape == (1, 1)
    with pytest.raises(ValueError, match="addressing"):
        LarimarEditor(m, addressing="nearest")


def test_set_memory_size_shrinks_grows_and_restores():
    m = tiny_larimar()
    original = m.M0.detach().clone()
    editor = LarimarEditor(m, memory_size=5)
    assert m.M0.shape == (5, 16) and m.config.memory_size == 5
    assert torch.equal(m.M0.detach(), original[:5])
    editor.edit([REQ])
    assert editor.score([REQ.prompt], [["English"]]).shape == (1, 1)
    editor.set_memory_size(20)
    assert m.M0.shape == (20, 16) and len(m) == 0
    assert torch.equal(m.M0.detach()[:12], original)
    set_memory_size(m, 12)
    assert torch.equal(m.M0.detach(), original)
    with pytest.raises(ValueError):
        set_memory_size(m, 0)


def test_keyed_writes_address_facts_by_their_prompts():
    model = tiny_larimar()
    editor = make_editor("larimar", model, model.tokenizer, keyed_writes=True, n_rephrases=1)
    assert model.config.keyed_writes is True
    editor.edit([REQ, REQ2], rephrases=[["Danielle Darrieux speaks"], ["France's capital is"]])
    keys = ["The mother tongue of Danielle Darrieux is", "The capital of France is", "Danielle Darrieux speaks", "France's capital is"]
    # the write encodes keys in one batch with the fact texts (other padding): equal up to float rounding
    torch.testing.assert_close(model.facts.keys, model.encoder(keys).to(model.facts.keys.dtype), atol=1e-5, rtol=1e-5)
    assert editor.written[2] == "Danielle Darrieux speaks English."
    make_editor("larimar", model, model.tokenizer, keyed_writes=False).edit(REQ)
    torch.testing.assert_close(model.facts.keys, model.facts.Z)  # auto-associative: each fact is its own key
    with pytest.raises(ValueError, match="keyed_writes must be true or false"):
        make_editor("larimar", model, model.tokenizer, keyed_writes="yes")


def test_value_writes_store_the_new_objects():
    model = tiny_larimar()
    editor = make_editor("larimar", model, model.tokenizer, keyed_writes=True, value_writes=True)
    assert model.config.value_writes is True
    editor.edit([REQ, REQ2])
    objects = [REQ.target_new.strip(), REQ2.target_new.strip()]
    torch.testing.assert_close(model.facts.Z, model.encoder(objects).to(model.facts.Z.dtype), atol=1e-5, rtol=1e-4)
    assert model.facts.texts == editor.written  # the ledger keeps the whole facts (forget, scope detector)
    with pytest.raises(ValueError, match="value_writes must be true or false"):
        make_editor("larimar", model, model.tokenizer, value_writes=1)


def test_key_slots_set_up_by_the_first_write_into_an_empty_memory():
    model = tiny_larimar()
    editor = make_editor("larimar", model, model.tokenizer, keyed_writes=True, value_writes=True, key_slots=True)
    assert model.facts.state.addressing == "reference"  # nothing set up before the first write
    editor.edit([REQ, REQ2])
    state = model.facts.state
    assert state.addressing == "gaussian" and state.lam == pytest.approx(0.01) and state.M_ref.shape == (12, 16)
    keys = model.encoder([REQ.prompt, REQ2.prompt]).to(state.M_ref.dtype)
    torch.testing.assert_close(state.M_ref[:2], keys, atol=1e-5, rtol=1e-5)
    # each prompt reads its own slot: its object's latent / (1 + λ)
    objects = model.encoder([REQ.target_new, REQ2.target_new]).to(state.M.dtype)
    torch.testing.assert_close(model.read([REQ.prompt, REQ2.prompt]).to(state.M.dtype), objects / 1.01, atol=1e-4, rtol=1e-4)
    ref_before = state.M_ref.clone()
    editor.edit(EditRequest("Apple was founded by", "Apple", "Bill Gates", "Steve Jobs"))
    # a later write keeps the slots and gives its new prompt the next free one
    ref_after = model.facts.state.M_ref
    assert torch.equal(ref_after[:2], ref_before[:2]) and torch.equal(ref_after[3:], ref_before[3:])
    torch.testing.assert_close(ref_after[2], model.encoder(["Apple was founded by"])[0].to(ref_after.dtype), atol=1e-5, rtol=1e-5)
    editor.reset()
    assert model.facts.state.addressing == "reference"
    with pytest.raises(ValueError, match="needs keyed writes"):
        make_editor("larimar", tiny_larimar(), None, keyed_writes=False, key_slots=True)
    for bad in (dict(key_slots="yes"), dict(key_slot_alpha=0), dict(key_slot_ridge=-1.0)):
        with pytest.raises(ValueError):
            make_editor("larimar", model, model.tokenizer, keyed_writes=True, **bad)
