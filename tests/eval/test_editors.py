"""Editor protocol, registry, YAML hyper-parameters, MLP locator, and the PROMPT / IKE / FT-L baselines
on tiny GPT-2 and Llama models (ROME and GRACE have their own test files)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from larimar.eval.baselines.common import (
    WeightSnapshot,
    encode_targets,
    find_subject,
    hparams_from_dict,
    locate_mlp_out,
    subject_last_token,
    target_nll,
)
from larimar.eval.editors import (
    BaseEditor,
    EditRequest,
    Editor,
    PromptEditor,
    available_editors,
    config_dirs,
    load_hparams,
    make_editor,
    register_editor,
)
from larimar.eval.scoring import continuation_nll
from larimar.testing import tiny_bert, tiny_gpt2, tiny_llama, tiny_tokenizer

REQ = EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "Japan", "French")
REQ2 = EditRequest("The capital of Japan is", "Japan", "France", "Tokyo")
BUILTINS = ("unedited", "prompt", "ike", "ft_l", "rome", "grace")
REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: faster on one thread, immune to a busy machine


@pytest.fixture(params=["gpt2", "llama"])
def family(request):
    if request.param == "gpt2":
        return tiny_gpt2(), tiny_tokenizer()
    return tiny_llama(kv_heads=1), tiny_tokenizer(add_bos=True)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model, saved) -> bool:
    now = model.state_dict()
    return set(now) == set(saved) and all(torch.equal(now[k], saved[k]) for k in saved)


def success(editor, req=REQ) -> bool:
    nll = editor.score([req.prompt], [[req.target_new, req.target_true]])
    return bool(nll[0, 0] < nll[0, 1])


# --------------------------------------------------------------------------------------------
# protocol, registry, hparams
# --------------------------------------------------------------------------------------------


def test_edit_request_validation():
    with pytest.raises(ValueError, match="prompt"):
        EditRequest("  ", "s", "x")
    with pytest.raises(ValueError, match="target_new"):
        EditRequest("p", "s", "")
    assert EditRequest("p", "s", "x").target_true is None


def test_registry_builtins_and_custom(family):
    model, tok = family
    assert set(BUILTINS) <= set(available_editors())
    ed = make_editor("unedited", model, tok)
    assert isinstance(ed, Editor) and ed.name == "unedited"
    with pytest.raises(KeyError, match="registered"):
        make_editor("nope", model, tok)
    with pytest.raises(ValueError, match="already registered"):
        register_editor("rome", lambda m, t, **h: None)

    class Custom(BaseEditor):
        name = "custom-test"

        def _apply(self, requests):
            self.applied = list(requests)

        def _restore(self):
            pass

    register_editor("custom-test", Custom, overwrite=True)
    ed = make_editor("custom-test", model, tok, score_batch_size=2)
    ed.edit(REQ)
    assert ed.applied == [REQ] and ed.requests == [REQ] and len(ed.edit_seconds) == 1


@pytest.mark.parametrize("name", BUILTINS)
def test_yaml_configs_load_and_match_defaults(name):
    hp = load_hparams(name)
    assert isinstance(hp, dict)
    assert (REPO / "configs" / "baselines" / f"{name}.yaml").is_file()
    assert REPO / "configs" / "baselines" in config_dirs()
    cls = {
        "ft_l": ("larimar.eval.baselines.ft_l", "FTLHparams"),
        "rome": ("larimar.eval.baselines.rome", "ROMEHparams"),
        "grace": ("larimar.eval.baselines.grace", "GRACEHparams"),
        "ike": ("larimar.eval.baselines.ike", "IKEHparams"),
    }.get(name)
    if cls is None:
        return
    import importlib

    hcls = getattr(importlib.import_module(cls[0]), cls[1])
    parsed = hparams_from_dict(hcls, name, hp)  # every key known and valid
    # the dataclass defaults are the YAML values (make_editor without hparams = the YAML setting)
    assert dataclasses.asdict(parsed) == dataclasses.asdict(hcls())


def test_load_hparams_paths_and_errors(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("layer: 3\nlr: 0.1\n")
    assert load_hparams("ft_l", f) == {"layer": 3, "lr": 0.1}
    (tmp_path / "ft_l.yaml").write_text("num_steps: 7\n")
    assert load_hparams("ft_l", tmp_path) == {"num_steps": 7}
    (tmp_path / "empty.yaml").write_text("")
    assert load_hparams("x", tmp_path / "empty.yaml") == {}
    (tmp_path / "bad.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_hparams("x", tmp_path / "bad.yaml")
    with pytest.raises(FileNotFoundError, match="no_such_method"):
        load_hparams("no_such_method")


@pytest.mark.parametrize(
    ("name", "hp", "match"),
    [
        ("ft_l", {"learning_rate": 1.0}, "unknown hyper-parameter"),
        ("ft_l", {"lr": -1.0}, "lr must be > 0"),
        ("ft_l", {"norm_constraint": 0}, "norm_constraint"),
        ("ft_l", {"layer": 7}, r"layer must be an int in \[0, 2\)"),
        ("rome", {"v_num_grad_steps": 0}, "v_num_grad_steps"),
        ("rome", {"context_template_length_params": [[5]]}, "context_template_length_params"),
        ("rome", {"update_key": "last"}, "update_key"),
        ("grace", {"replacement": "first"}, "replacement"),
        ("grace", {"eps_init": 0.0}, "eps_init"),
        ("ike", {"k": 0}, "k must be"),
        ("ike", {"type_ratio": [1, 2]}, "type_ratio"),
        ("prompt", {"fact_template": "{prompt}"}, "target_new"),
        ("prompt", {"max_facts": 0}, "max_facts"),
    ],
)
def test_bad_hparams_raise_clear_errors(name, hp, match):
    model, tok = tiny_gpt2(), tiny_tokenizer()
    with pytest.raises(ValueError, match=match):
        make_editor(name, model, tok, **hp)


# --------------------------------------------------------------------------------------------
# helpers: locator, subject token, batches
# --------------------------------------------------------------------------------------------


def test_locator_gpt2_conv1d_and_llama_linear():
    g = tiny_gpt2()
    p = locate_mlp_out(g, 1)
    assert p.name == "transformer.h.1.mlp.c_proj" and p.transposed
    assert p.module is g.transformer.h[1].mlp.c_proj
    assert (p.in_features, p.out_features) == (64, 32) and tuple(p.weight.shape) == (64, 32)
    ll = tiny_llama()
    q = locate_mlp_out(ll, 0)
    assert q.name == "model.layers.0.mlp.down_proj" and not q.transposed
    assert (q.in_features, q.out_features) == (64, 32) and tuple(q.weight.shape) == (32, 64)
    # orientation: W k + b computed from matrix() equals the module; add_ changes it by delta @ k
    torch.manual_seed(0)
    for proj in (p, q):
        k = torch.randn(3, proj.in_features)
        with torch.no_grad():
            before = proj.module(k)
        assert torch.allclose(proj.apply(k), before, atol=1e-5)
        delta = torch.randn(proj.out_features, proj.in_features) * 0.1
        proj.add_(delta)
        with torch.no_grad():
            after = proj.module(k)
        assert torch.allclose(after - before, k @ delta.T, atol=1e-5)
        with pytest.raises(ValueError, match="shape"):
            proj.add_(delta.T)


def test_locator_errors():
    with pytest.raises(ValueError, match="'bert'"):
        locate_mlp_out(tiny_bert(), 0)
    with pytest.raises(ValueError, match="layer"):
        locate_mlp_out(tiny_gpt2(), -1)


@pytest.mark.parametrize("add_bos", [False, True])
def test_subject_last_token(add_bos):
    tok = tiny_tokenizer(add_bos=add_bos)
    text = "The mother tongue of Danielle Darrieux is"
    i = subject_last_token(tok, text, "Danielle Darrieux")
    ids = tok(text)["input_ids"]
    # the tokens up to i decode to text ending with the subject, and token i+1 starts " is"
    assert tok.decode(ids[: i + 1], skip_special_tokens=True).endswith("Danielle Darrieux")
    assert tok.decode(ids[i + 1 :]).startswith(" is")
    # leading-space variant, and a later occurrence selected with start_char
    assert subject_last_token(tok, " Danielle Darrieux is", " Danielle Darrieux") == subject_last_token(
        tok, " Danielle Darrieux is", "Danielle Darrieux"
    )
    two = "Paris. Paris is"
    j = subject_last_token(tok, two, "Paris", start_char=len("Paris. "))
    assert tok.decode(tok(two)["input_ids"][: j + 1], skip_special_tokens=True) == "Paris. Paris"
    assert subject_last_token(tok, two, "Paris") < j
    assert find_subject("a Bc d", "bc") == (2, 4)  # case-insensitive fallback
    with pytest.raises(ValueError, match="does not occur"):
        subject_last_token(tok, text, "Obama")


def test_encode_targets_and_target_nll_match_scoring(family):
    model, tok = family
    prompts = [REQ.prompt, "Paris is"]
    targets = ["Paris", "the capital"]
    batch = encode_targets(tok, prompts, targets)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    ours = target_nll(logits, batch)
    ref = continuation_nll(model, tok, prompts, [" " + t for t in targets])
    assert torch.allclose(ours, ref, atol=1e-5)


def test_weight_snapshot_restores_bit_exactly():
    model = tiny_gpt2()
    p = model.transformer.h[0].mlp.c_proj.weight
    snap = WeightSnapshot({"w": p})
    saved = p.detach().clone()
    with torch.no_grad():
        p.add_(0.1234567)
    snap.restore()
    assert torch.equal(p, saved)


# --------------------------------------------------------------------------------------------
# baselines
# --------------------------------------------------------------------------------------------


def test_score_shape_spaces_and_unedited(family):
    model, tok = family
    saved = state(model)
    ed = make_editor("unedited", model, tok)
    nll = ed.score([REQ.prompt, REQ2.prompt], [["Paris", "French", "x"], [" France", "Tokyo", "y"]])
    assert nll.shape == (2, 3) and nll.dtype == torch.float32
    ref = continuation_nll(model, tok, [REQ.prompt, REQ2.prompt], [" Paris", " France"])
    assert torch.allclose(nll[:, 0], ref, atol=1e-6)
    with pytest.raises(ValueError, match="same number"):
        ed.score([REQ.prompt, REQ2.prompt], [["a"], ["b", "c"]])
    ed.edit([REQ])
    assert torch.equal(ed.score([REQ.prompt, REQ2.prompt], [["Paris", "French", "x"], [" France", "Tokyo", "y"]]), nll)
    assert same_state(model, saved)
    out = ed.generate([REQ.prompt, "Paris"], max_new_tokens=3)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    stats = ed.token_stats([REQ.prompt], ["Paris"])
    assert abs(stats[0].nll - float(nll[0, 0])) < 1e-5


def test_prompt_editor_prepends_facts_newest_last(family):
    model, tok = family
    ed = make_editor("prompt", model, tok)
    assert isinstance(ed, PromptEditor) and ed.context() == ""
    ed.edit([REQ])
    ed.edit([REQ2])
    ctx = ed.context()
    assert ctx == (
        "The mother tongue of Danielle Darrieux is Japan.\nThe capital of Japan is France.\n"
    )
    q = "Danielle Darrieux speaks"
    nll = ed.score([q], [["Paris"]])
    ref = continuation_nll(model, tok, [ctx + q], [" Paris"])
    assert torch.allclose(nll[:, 0], ref, atol=1e-6)
    ed2 = make_editor("prompt", model, tok, max_facts=1, separator=" ")
    ed2.edit([REQ, REQ2])
    assert ed2.context() == "The capital of Japan is France. "
    ed.reset()
    assert ed.context() == "" and ed.requests == []


def _demo(prompt, subject, new, para, n_prompt, n_ans):
    return {"prompt": prompt, "subject": subject, "target_new": new, "paraphrase": para,
            "neighbor_prompt": n_prompt, "neighbor_answer": n_ans}


DEMOS = [
    _demo("The capital of Italy is", "Italy", "Berlin", "What is the capital of Italy?",
          "The capital of Spain is", "Madrid"),
    _demo("The mother tongue of Victor Hugo is", "Victor Hugo", "Dutch", "Victor Hugo is a native speaker of",
          "The mother tongue of Albert Camus is", "French"),
    _demo("Danielle Darrieux plays", "Danielle Darrieux", "piano", "The instrument of Danielle Darrieux is",
          "Elton John plays", "piano"),
    _demo("Apple was founded by", "Apple", "Bill Gates", "Who founded Apple?", "Microsoft was founded by", "Bill Gates"),
    _demo("The mother tongue of Jean Gabin is", "Jean Gabin", "Swedish", "Jean Gabin speaks",
          "The mother tongue of Edith Piaf is", "French"),
    _demo("Tokyo is located in", "Tokyo", "Peru", "Which country is Tokyo in?", "Osaka is located in", "Japan"),
]


def test_ike_type_schedule():
    from larimar.eval.baselines.ike import type_schedule

    sched = type_schedule(8, [1, 3, 4])
    assert (sched.count("copy"), sched.count("update"), sched.count("retain")) == (1, 3, 4)
    assert type_schedule(3, [1, 1, 1]) == ["copy", "update", "retain"]
    assert type_schedule(4, [0, 0, 1]) == ["retain"] * 4


@pytest.fixture(params=["gpt2", "llama"])
def long_family(request):
    """Tiny models with room for IKE's long contexts."""
    if request.param == "gpt2":
        return tiny_gpt2(n_positions=512), tiny_tokenizer()
    return tiny_llama(kv_heads=1, max_position_embeddings=512), tiny_tokenizer(add_bos=True)


def test_ike_context_selection_and_scoring(long_family):
    model, tok = long_family
    ed = make_editor("ike", model, tok, demonstrations=DEMOS, k=4, type_ratio=[1, 1, 2])
    ed.edit([REQ])
    demos = ed.selected[0]
    assert len(demos) == 4
    # never a demonstration built from the edited subject; one fact per demonstration, mixed types
    assert all("Danielle Darrieux" not in d for d in demos)
    assert len({d.split("\n")[0] for d in demos}) == 4
    assert all(d.startswith("New Fact: ") and "\nPrompt: " in d and d.endswith("\n\n") for d in demos)
    by_fact = {f"New Fact: {r['prompt']} {r['target_new']}": r for r in DEMOS}
    kinds = []
    for d in demos:
        head, query = d.split("\nPrompt: ")
        rec = by_fact[head]
        kinds.append(
            "copy" if query.startswith(rec["prompt"] + " ")
            else "update" if query.startswith(rec["paraphrase"] + " ")
            else "retain" if query == f"{rec['neighbor_prompt']} {rec['neighbor_answer']}\n\n"
            else "?"
        )
    assert sorted(kinds) == ["copy", "retain", "retain", "update"]
    # the two "mother tongue" facts are the most similar and sit next to the query
    assert all("mother tongue" in d.split("\n")[0] for d in demos[-2:])
    ctx = ed.context_for(REQ.prompt)
    assert ctx == "".join(demos) + f"New Fact: {REQ.prompt} Japan\nPrompt: "
    nll = ed.score([REQ.prompt], [["Japan", "French"]])
    ref = continuation_nll(model, tok, [ctx + REQ.prompt, ctx + REQ.prompt], [" Japan", " French"])
    assert torch.allclose(nll[0], ref, atol=1e-6)
    stats = ed.token_stats([REQ.prompt], ["Japan"])
    assert abs(stats[0].nll - float(nll[0, 0])) < 1e-5
    # deterministic, and an embedding function can replace token overlap
    ed_b = make_editor("ike", model, tok, demonstrations=DEMOS, k=4, type_ratio=[1, 1, 2])
    ed_b.edit([REQ])
    assert ed_b.selected == ed.selected
    emb = make_editor("ike", model, tok, demonstrations=DEMOS, k=2, embed_fn=lambda xs: torch.tensor([[len(x), 1.0] for x in xs]))
    emb.edit([REQ])
    assert len(emb.selected[0]) == 2
    # several edits: the New Fact is the edit most similar to the query
    ed.edit([REQ2])
    assert "New Fact: The capital of Japan is France\nPrompt: " in ed.context_for("The capital of Japan is")
    ed.reset()
    assert ed.context_for("x") == "" and ed.selected == []
    assert len(ed.generate(["Paris"], max_new_tokens=2)) == 1


def test_ike_builtin_template_pool():
    from larimar.eval.baselines.ike import build_template_pool
    from larimar.eval.data import default_data_dir

    if not (default_data_dir() / "templates" / "cloze_templates.json").is_file():
        pytest.skip("shared data not available")
    pool = build_template_pool(facts_per_relation=2, seed=0)
    assert pool == build_template_pool(facts_per_relation=2, seed=0)
    assert len(pool) >= 20
    for f in pool:
        assert f.subject in f.prompt and f.subject in f.paraphrase and f.subject not in f.neighbor_prompt
        assert "__" not in f.prompt and "[X]" not in f.prompt


def test_ike_pool_file(tmp_path, long_family):
    model, tok = long_family
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(DEMOS))
    ed = make_editor("ike", model, tok, pool=str(path), k=3)
    ed.edit([REQ2])
    assert len(ed.selected[0]) == 3
    path.write_text(json.dumps([{"prompt": "x"}]))
    with pytest.raises(ValueError, match="string fields"):
        make_editor("ike", model, tok, pool=str(path)).edit([REQ2])


def test_ft_l_flips_respects_linf_and_resets(family):
    model, tok = family
    saved = state(model)
    eps = 0.05
    ed = make_editor("ft_l", model, tok, layer=1, lr=5e-3, num_steps=60, norm_constraint=eps, early_stop_loss=0.05)
    assert not success(ed)
    w0 = ed.proj.weight.detach().clone()
    ed.edit([REQ])
    assert success(ed)
    change = (ed.proj.weight.detach() - w0).abs()
    assert float(change.max()) <= eps + 1e-6 and float(change.max()) > 0
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, saved[k])]
    assert changed == [ed.proj.name + ".weight"]
    assert ed.losses[0][-1] < ed.losses[0][0]
    ed.reset()
    assert same_state(model, saved)
    assert not success(ed)


def test_smoke_runs_on_rome_format_file(tmp_path, family):
    from larimar.eval.editors import smoke

    model, tok = family
    rec = {
        "case_id": 7,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "subject": "Danielle Darrieux",
            "target_new": {"str": "Japan"},
            "target_true": {"str": "French"},
        },
        "paraphrase_prompts": ["Danielle Darrieux speaks"],
        "neighborhood_prompts": ["The mother tongue of Victor Hugo is", "Albert Camus speaks"],
    }
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([rec, rec]))
    out = smoke("ft_l", n=1, data=path, model=model, tokenizer=tok, verbose=False,
                hparams={"layer": 1, "lr": 5e-3, "num_steps": 40, "norm_constraint": 0.05})
    assert out["n"] == 1 and out["success"] == 1.0 and out["success_before"] == 0.0
    assert out["cases"][0]["case_id"] == 7 and out["seconds_per_edit"] > 0
    assert 0.0 <= out["neighborhood_success"] <= 1.0
    base = smoke("unedited", n=2, data=path, model=model, tokenizer=tok, verbose=False)
    assert base["n"] == 2 and base["success"] == 0.0


def test_larimar_is_registered_without_importing_its_module():
    import subprocess
    import sys

    code = "import sys; from larimar.eval.editors import available_editors; assert 'larimar' in available_editors(); assert 'larimar.eval.larimar_editor' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
