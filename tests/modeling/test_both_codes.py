"""value_code "both": memory rows holding a value's latent and its token code side by side."""

from __future__ import annotations

import pytest
import torch

from larimar.editing.store import MemoryFileError
from larimar.modeling.config import LarimarConfig
from larimar.modeling.model import Larimar
from larimar.testing import tiny_larimar, tiny_word_pairs

C = 32
FACTS = ["the sky is capital Paris.", "grass is and the.", "a cat is red."]
PROMPTS = ["the sky is", "grass is", "a cat is"]
VALUES = ["capital Paris", "and the", "red"]


def build(value_code: str, **over) -> Larimar:
    return tiny_larimar(latent_size=C, keyed_writes=True, value_writes=True, value_code=value_code, value_code_slots=4, **over)


@pytest.fixture(scope="module")
def pair() -> tuple[Larimar, Larimar]:
    """A "both" model whose code is trained for a few steps, and an "encoder" model with the same weights."""
    from larimar.training.token_code import train_token_code

    torch.manual_seed(0)
    both = build("both")
    train_token_code(both, tiny_word_pairs(300, 0), steps=150, lr=1e-2, batch=32, noise=0.1, log=lambda _: None)
    enc = build("encoder")
    shared = {k: v for k, v in both.state_dict().items() if not k.startswith("token_code.")}
    enc.load_state_dict(shared)
    both.reset_memory()
    enc.reset_memory()
    return both, enc


def test_config_memory_width_and_addressing():
    assert LarimarConfig(latent_size=8).memory_width == 8
    assert LarimarConfig(latent_size=8, value_code="tokens").memory_width == 8
    assert LarimarConfig(latent_size=8, value_code="both").memory_width == 16
    with pytest.raises(ValueError, match="'current' addressing"):
        LarimarConfig(value_code="both", addressing="current")
    with pytest.raises(ValueError, match="value_code_slots"):
        LarimarConfig(value_code="both", value_code_slots=1)


def test_rows_hold_the_latent_and_the_code_scaled_to_its_norm(pair):
    both, _ = pair
    both.reset_memory()
    long_value = "a much longer value than four tokens can hold"
    both.write_facts(FACTS + [f"x is {long_value}."], PROMPTS + ["x is"])
    Z, keys = both.facts.Z.float(), both.facts.keys.float()
    assert Z.shape == (4, 2 * C) and keys.shape == (4, 2 * C)
    latents = both.encoder(VALUES + [long_value]).detach()
    torch.testing.assert_close(Z[:, :C], latents, atol=1e-5, rtol=1e-5)
    codes = both.encode_token_values(VALUES)
    torch.testing.assert_close(Z[:3, C:], codes * latents[:3].norm(dim=-1, keepdim=True), atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(Z[3, C:]) == 0  # longer than the code holds: the latent alone
    torch.testing.assert_close(keys[:, :C], both.encoder(PROMPTS + ["x is"]).detach(), atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(keys[:, C:]) == 0  # keys live in the latent half
    torch.testing.assert_close(both.stored_values(VALUES).float(), Z[:3], atol=1e-5, rtol=1e-5)
    both.reset_memory()
    both.write(["plain text without a value"])  # no value: the latent alone, addressed by itself
    assert torch.count_nonzero(both.facts.Z[:, C:]) == 0
    both.reset_memory()


@pytest.mark.parametrize("slots", [False, True], ids=["pseudo-inverse", "key-slots"])
def test_the_latent_half_is_the_encoder_models_memory(pair, slots):
    """Addressing sees only the latent half, so the latent half of every read-out is exactly what a model
    storing latents alone reads, for pseudo-inverse addressing and for key slots."""
    both, enc = pair
    for m in (both, enc):
        m.facts = m.key_slot_memory() if slots else m.empty_memory()
        m.write_facts(FACTS, PROMPTS)
    queries = PROMPTS + ["an unrelated question"]
    torch.testing.assert_close(both.read(queries)[:, :C], enc.read(queries), atol=1e-9, rtol=1e-7)
    both.reset_memory()
    enc.reset_memory()


def test_forgetting_stays_exact_in_both_halves(pair):
    both, _ = pair
    both.reset_memory()
    both.write_facts(FACTS[:2], PROMPTS[:2])
    never = both.read(PROMPTS)
    both.write_facts(FACTS[2:], PROMPTS[2:])
    assert not torch.allclose(both.read(PROMPTS), never)
    both.forget([FACTS[2]])
    torch.testing.assert_close(both.read(PROMPTS), never, atol=1e-9, rtol=1e-7)
    both.reset_memory()


def test_the_code_is_gated_by_the_ratio_of_the_halves(pair):
    both, _ = pair
    both.facts = both.key_slot_memory()
    both.write_facts(FACTS, PROMPTS)
    cond = both.conditioning(both.read(PROMPTS).float())
    assert cond.code.shape == (3, C)
    torch.testing.assert_close(cond.code_gate, torch.ones(3), atol=1e-4, rtol=0)  # one slot each: the row itself
    both.reset_memory()
    both.write(["plain text without a value", "another text"])
    cond = both.conditioning(both.read(["plain text without a value"]).float())
    assert cond.code is None and cond.code_gate is None  # texts alone: no code to decode
    assert both.conditioning(torch.randn(2, C)).code is None  # a read-out of latents alone (long context)
    with pytest.raises(ValueError, match="width"):
        both.conditioning(torch.randn(2, C + 1))
    half = both.conditioning(torch.cat([torch.ones(1, C), 0.5 * torch.ones(1, C)], dim=-1))  # code half at half the norm
    torch.testing.assert_close(half.code_gate, torch.tensor([0.5]))
    both.reset_memory()


def test_a_code_gate_below_the_floor_reads_no_code(pair):
    both, _ = pair
    x = torch.cat([torch.ones(3, C), torch.tensor([[0.3], [0.5], [0.9]]) * torch.ones(3, C)], dim=-1)  # gates 0.3, 0.5, 0.9
    torch.testing.assert_close(both.conditioning(x).code_gate, torch.tensor([0.3, 0.5, 0.9]))  # floor 0: every gate counts
    old = both.config
    try:
        both.config = old.replace(code_gate_floor=0.5)
        torch.testing.assert_close(both.conditioning(x).code_gate, torch.tensor([0.0, 0.5, 0.9]))
        assert both.conditioning(x[:1]).code is None  # no row left with a code: none decoded
    finally:
        both.config = old
    with pytest.raises(ValueError, match="code_gate_floor"):
        LarimarConfig(code_gate_floor=1.5)


def test_generation_spells_the_stored_values(pair):
    both, _ = pair
    both.reset_memory()
    both.write_facts(FACTS[:2], PROMPTS[:2])
    for p, value in zip(PROMPTS[:2], VALUES[:2]):
        want = both.value_code_ids([value])[0]
        out = both.generate([p], max_new_tokens=len(want), use_memory="always")[0]
        assert both.tokenizer(out, add_special_tokens=False)["input_ids"] == want
    both.reset_memory()


def test_a_zero_gate_leaves_the_latent_conditioning_alone(pair):
    """With the gate at 0 a "both" read-out conditions the decoder exactly as its latent half alone."""
    both, _ = pair
    both.reset_memory()
    both.write_facts(FACTS[:1], PROMPTS[:1])
    z = both.read(PROMPTS[:1]).float()
    ids = torch.tensor([both.tokenizer("the sky is capital", add_special_tokens=False)["input_ids"]])
    cond = both.conditioning(z)
    cond.code_gate = torch.zeros(1)
    gated = both.runner.forward(ids, torch.ones_like(ids), cond).logits
    latent = both.runner.forward(ids, torch.ones_like(ids), both.conditioning(z[:, :C])).logits
    torch.testing.assert_close(gated, latent)
    with_code = both.runner.forward(ids, torch.ones_like(ids), both.conditioning(z)).logits
    assert not torch.allclose(with_code, latent)
    both.reset_memory()


def test_saved_memory_keeps_its_width(pair, tmp_path):
    both, enc = pair
    both.reset_memory()
    both.write_facts(FACTS, PROMPTS)
    before = both.read(PROMPTS)
    both.save_memory(tmp_path / "mem")
    both.reset_memory()
    both.load_memory(tmp_path / "mem")
    torch.testing.assert_close(both.read(PROMPTS), before)
    with pytest.raises(MemoryFileError, match="width"):
        enc.load_memory(tmp_path / "mem")
    both.reset_memory()


def test_calibration_scales_the_code_against_the_latent_conditioning(pair):
    from larimar.training.token_code import calibrate_token_code

    both, _ = pair
    before = both.token_code.log_tau.detach().clone()
    try:
        out = calibrate_token_code(both, list(zip(PROMPTS, VALUES)), log=lambda _: None)
        assert set(out["factors"]) == {"1.0", "1.25", "1.5", "2.0", "2.5", "3.0"}
        assert out["factors"][str(out["chosen"])] >= max(out["factors"].values()) - 0.005
        torch.testing.assert_close(both.token_code.log_tau[0] - before[0], torch.log(torch.tensor(out["chosen"])))
    finally:
        with torch.no_grad():
            both.token_code.log_tau.copy_(before)


def test_shipped_latent_adapter_is_the_default_without_its_code(tmp_path):
    """"latent" ships a config alone: the default's, storing latents only, reading the default's weights."""
    from larimar.modeling.model import packaged_adapter_dir, shared_weights_dir

    d, lat = packaged_adapter_dir("default"), packaged_adapter_dir("latent")
    if not (d / "config.json").is_file():
        pytest.skip("no adapter shipped in this checkout")
    cd, cl = (LarimarConfig.load(x / "config.json").to_dict() for x in (d, lat))
    assert cd["value_code"] == "both" and cl["value_code"] == "encoder" and not (lat / "adapter.safetensors").exists()
    code_keys = {"value_code", "value_code_end", "value_code_slots", "value_code_depth", "code_gate_floor", "extra"}
    scope_keys = {"scope_lexical_text", "scope_lexical_weight", "scope_threshold"}  # the default's were re-chosen in session 15
    other = code_keys | scope_keys
    assert {k: v for k, v in cd.items() if k not in other} == {k: v for k, v in cl.items() if k not in other}
    assert (cl["scope_lexical_text"], cl["scope_lexical_weight"], cl["scope_threshold"]) == ("text", 0.5, 0.555)  # as in sessions 6-14
    assert cd["scope_lexical_text"] == "key"
    assert shared_weights_dir(lat, LarimarConfig.load(lat / "config.json")) == d.resolve()
    assert shared_weights_dir(d, LarimarConfig.load(d / "config.json")) == d
    bad = LarimarConfig(extra={"weights_from": "../nowhere"})
    with pytest.raises(FileNotFoundError, match="weights_from"):
        shared_weights_dir(tmp_path, bad)


def test_shipped_pair_adapter_is_the_default_with_its_older_code():
    """"pair" (the default of sessions 14-17) ships its token code alone (depth 1, no start credit or
    mismatch cost: the pair match) and reads every other weight from the default; the shipped adapters
    fit the 40 MB budget together."""
    from safetensors.torch import load_file

    from larimar.modeling.config import SHIPPED_ADAPTERS
    from larimar.modeling.model import adapter_weights, packaged_adapter_dir

    d, p = packaged_adapter_dir("default"), packaged_adapter_dir("pair")
    if not (d / "config.json").is_file():
        pytest.skip("no adapter shipped in this checkout")
    cd, cp = (LarimarConfig.load(x / "config.json") for x in (d, p))
    assert cd.value_code_depth == 8 and cp.value_code_depth == 1 and cp.extra["weights_from"] == "../default"
    assert cp.replace(extra=cd.extra, value_code_depth=8) == cd
    own = load_file(str(p / "adapter.safetensors"))
    assert own and all(k.startswith("token_code.") for k in own)
    assert own["token_code.start_credit"].item() == 0 and own["token_code.mismatch"].item() == 0
    shared, merged = load_file(str(d / "adapter.safetensors")), adapter_weights(p, cp)
    assert set(merged) == set(shared)
    assert all(torch.equal(merged[k], shared[k]) for k in shared if not k.startswith("token_code."))
    assert not torch.equal(merged["token_code.G"], shared["token_code.G"])
    assert sum(f.stat().st_size for name in SHIPPED_ADAPTERS for f in packaged_adapter_dir(name).iterdir()) <= 40 * 2**20


def test_adapter_weights_overlay_a_partial_file_on_the_shared_weights(pair, tmp_path):
    """A directory with `extra.weights_from` and a file of its own holding part of the weights (as the
    shipped "pair": the default's weights with an older token code) stands for the shared weights with
    its own on top; from_pretrained's weights and training's initial adapter both read them so."""
    from safetensors.torch import load_file, save_file

    from larimar.modeling.model import adapter_weights
    from larimar.training.cli import load_initial_adapter

    both, _ = pair
    both.save_pretrained(tmp_path / "base")
    base = load_file(str(tmp_path / "base" / "adapter.safetensors"))
    over = tmp_path / "over"
    over.mkdir()
    G = torch.randn(both.token_code.G.shape, generator=torch.Generator().manual_seed(1))
    save_file({"token_code.G": G}, str(over / "adapter.safetensors"))
    both.config.replace(extra={"weights_from": "../base"}).save(over / "config.json")
    w = adapter_weights(over, LarimarConfig.load(over / "config.json"))
    assert set(w) == set(base) and torch.equal(w["token_code.G"], G)
    assert all(torch.equal(w[k], base[k]) for k in base if k != "token_code.G")
    assert set(adapter_weights(tmp_path / "base", both.config)) == set(base)  # no weights_from: the own file alone
    lat = tmp_path / "lat"  # as the shipped "latent": a config storing latents alone over shared weights with a code
    lat.mkdir()
    both.config.replace(value_code="encoder", extra={"weights_from": "../base"}).save(lat / "config.json")
    assert set(adapter_weights(lat, LarimarConfig.load(lat / "config.json"))) == {k for k in base if not k.startswith("token_code.")}
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no adapter.safetensors"):
        adapter_weights(tmp_path / "empty", LarimarConfig())
    m = build("both")
    load_initial_adapter(m, over)
    state = m.adapter_state()
    assert all(torch.equal(state[k], w[k].to(state[k].dtype)) for k in w)
    enc = build("encoder")  # a model storing latents alone takes the shared latents and leaves the code
    load_initial_adapter(enc, over)
    assert all(torch.equal(v, w[k].to(v.dtype)) for k, v in enc.adapter_state().items())


def test_save_pretrained_drops_weights_from(pair, tmp_path):
    both, _ = pair
    both.config = both.config.replace(extra={"weights_from": "../default"})
    try:
        both.save_pretrained(tmp_path)
        saved = LarimarConfig.load(tmp_path / "config.json")
        assert "weights_from" not in saved.extra and (tmp_path / "adapter.safetensors").is_file()
    finally:
        both.config = both.config.replace(extra={})
