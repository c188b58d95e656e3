"""`larimar bench model`'s measurements (larimar.modeling.bench.measure_model) on a tiny model."""

from __future__ import annotations

import pytest

from larimar.modeling.bench import _facts, _prompt, measure_model
from larimar.testing import tiny_larimar

pytestmark = pytest.mark.usefixtures("one_thread")


def test_prompt_is_the_fact_without_its_object():
    fact = _facts(1)[0]
    assert fact == "Alice Moreau 0 was born in Paris."
    assert _prompt(fact) == "Alice Moreau 0 was born in"


def test_both_write_paths_are_timed_each_with_its_own_write(monkeypatch):
    model = tiny_larimar(latent_size=16, keyed_writes=True, value_writes=True, value_code="both", value_code_slots=4)
    calls = {"write": [], "write_facts": []}
    write, write_facts = model.write, model.write_facts

    def spy_write(texts, *a, **k):
        calls["write"].append((list(texts), k.get("keys")))
        return write(texts, *a, **k)

    def spy_write_facts(texts, prompts, *a, **k):
        calls["write_facts"].append((list(texts), list(prompts)))
        return write_facts(texts, prompts, *a, **k)

    monkeypatch.setattr(model, "write", spy_write)
    monkeypatch.setattr(model, "write_facts", spy_write_facts)
    r = measure_model(model, repeats=3, n_facts=20, batch=5)

    assert set(r) == {
        "write_ms_per_fact", "batch_write_facts_per_s", "query_ms", "plain_query_ms", "routed",
        "fact_write_ms", "fact_batch_write_per_s", "fact_query_ms", "fact_plain_query_ms", "fact_routed",
    }  # fmt: skip
    assert all(r[k] > 0 for k in r if not k.endswith("routed"))
    # the fact path went through write_facts with each fact's own prompt: 3 single writes, then 20 in 4 batches
    fact_calls = calls["write_facts"]
    assert [len(t) for t, _ in fact_calls] == [1, 1, 1, 5, 5, 5, 5]
    assert all(p == [_prompt(t) for t in ts] for ts, p in fact_calls)
    # the text path wrote plain texts (no keys): warm-up 4, 3 single writes, 4 batches (write_facts' own
    # keyed calls into write are the others)
    plain = [len(t) for t, keys in calls["write"] if keys is None]
    assert plain == [4, 1, 1, 1, 5, 5, 5, 5]
    assert len(model.facts) == 0  # the memory is left empty


@pytest.mark.parametrize("kw", [{"repeats": 0}, {"n_facts": 3}, {"batch": 0}, {"repeats": 30, "n_facts": 20}])
def test_bad_sizes_are_refused(kw):
    with pytest.raises(ValueError):
        measure_model(None, **{"repeats": 2, "n_facts": 20, "batch": 5, **kw})
