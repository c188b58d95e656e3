"""GRACE: codebook rules (add / expand / split), epsilon-ball retrieval, and the hooked editor on
tiny GPT-2 and Llama models."""

from __future__ import annotations

import pytest
import torch

from larimar.eval.baselines.grace import GRACECodebook, GRACEEditor
from larimar.eval.editors import EditRequest, make_editor
from larimar.eval.scoring import continuation_nll
from larimar.testing import tiny_gpt2, tiny_llama, tiny_tokenizer

REQ = EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "Japan", "French")
REQ2 = EditRequest("The capital of Japan is", "Japan", "France", "Tokyo")
FAR = "0 1 2 3 4 5 6 7 8 9 10 100"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: faster on one thread, immune to a busy machine


def test_codebook_rules():
    cb = GRACECodebook(2, 3, eps_init=1.0)
    v = torch.zeros(3)
    assert cb.insert(torch.tensor([0.0, 0.0]), "a", v) == (0, "add")
    # far from every key (d > eps_init + eps_nearest): new entry
    assert cb.insert(torch.tensor([5.0, 0.0]), "b", v) == (1, "add")
    # same label, within reach but outside the ball: the ball expands to cover the query
    assert cb.insert(torch.tensor([0.0, 1.5]), "a", v) == (0, "expand")
    assert float(cb.eps[0]) == pytest.approx(1.5) and len(cb) == 2
    # same label already covered: nothing changes
    assert cb.insert(torch.tensor([0.0, 1.0]), "a", v) == (0, "expand")
    assert float(cb.eps[0]) == pytest.approx(1.5)
    # conflicting label within reach: new key, both balls split at half the distance
    idx, action = cb.insert(torch.tensor([5.0, 1.2]), "c", v)
    assert (idx, action) == (2, "split")
    assert float(cb.eps[2]) == pytest.approx(0.6) and float(cb.eps[1]) < 0.6
    # retrieval: inside a ball -> hit on that entry; between balls -> miss
    hit, which = cb.lookup(torch.tensor([[0.1, 0.1], [5.0, 1.1], [5.0, 0.3], [2.5, 0.0], [5.7, 0.6]]))
    assert hit.tolist() == [True, True, True, False, False]
    assert which[:3].tolist() == [0, 2, 1]
    ma = GRACECodebook(2, 1, eps_init=1.0, eps_expand="moving_average")
    ma.insert(torch.tensor([0.0, 0.0]), "a", torch.zeros(1))
    ma.insert(torch.tensor([0.0, 1.5]), "a", torch.zeros(1))
    assert torch.allclose(ma.keys[0], torch.tensor([0.0, 0.75]))
    cb.clear()
    assert len(cb) == 0 and not cb.lookup(torch.zeros(1, 2))[0].any()


@pytest.mark.parametrize("fam", ["gpt2", "llama"])
@pytest.mark.parametrize("replacement", ["last", "from_key", "all"])
def test_grace_edit_inside_and_outside_ball(fam, replacement):
    if fam == "gpt2":
        model, tok = tiny_gpt2(), tiny_tokenizer()
    else:
        model, tok = tiny_llama(kv_heads=1), tiny_tokenizer(add_bos=True)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    ed = make_editor("grace", model, tok, layer=1, eps_init=1.0, n_iter=60, edit_lr=0.5, replacement=replacement)
    assert isinstance(ed, GRACEEditor)
    far_before = continuation_nll(model, tok, [FAR, FAR], [" Japan", " French"])
    before = ed.score([REQ.prompt], [["Japan", "French"]])
    assert before[0, 0] > before[0, 1]
    ed.edit([REQ])
    assert ed.log[-1]["action"] == "add" and len(ed.codebook) == 1
    after = ed.score([REQ.prompt], [["Japan", "French"]])
    assert after[0, 0] < after[0, 1]
    assert ed._hook.last_hits.all()  # the edit prompt's key is inside its ball
    # a prompt whose key lies outside every ball is untouched (bit-exact)
    keys = ed.key_of([FAR, REQ.prompt])
    dist = torch.cdist(keys, ed.codebook.keys)[:, 0]
    assert float(dist[0]) > float(ed.codebook.eps[0]) and float(dist[1]) <= float(ed.codebook.eps[0]) + 1e-4
    far_after = ed.score([FAR], [["Japan", "French"]])[0]
    assert torch.allclose(far_after, far_before, atol=1e-6)
    assert not ed._hook.last_hits.any()
    # the model's weights are never changed; reset empties the codebook
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    gen = ed.generate([REQ.prompt], max_new_tokens=2)
    assert len(gen) == 1
    ed.reset()
    assert len(ed.codebook) == 0
    assert torch.equal(ed.score([REQ.prompt], [["Japan", "French"]]), before)
    ed.close()


def test_grace_sequential_edits_and_token_stats():
    model, tok = tiny_gpt2(), tiny_tokenizer()
    ed = make_editor("grace", model, tok, layer=1, eps_init=0.5, n_iter=40, edit_lr=0.5)
    reqs = [
        REQ,
        REQ2,
        EditRequest("Apple was founded by", "Apple", "Paris", "Steve Jobs"),
        EditRequest("Michel Rocard is a native speaker of", "Michel Rocard", "Japan", "French"),
    ]
    for r in reqs:
        ed.edit([r])
    assert len(ed.codebook) == len(ed.log) == 4
    nll = ed.score([r.prompt for r in reqs], [[r.target_new, r.target_true] for r in reqs])
    assert bool((nll[:, 0] < nll[:, 1]).all())
    # token_stats agree with score (key positions handled per row across batches)
    stats = ed.token_stats([r.prompt for r in reqs], [r.target_new for r in reqs])
    assert torch.allclose(torch.tensor([s.nll for s in stats]), nll[:, 0], atol=1e-5)
    small = make_editor("grace", model, tok, layer=1, eps_init=0.5, n_iter=1, score_batch_size=1)
    small.codebook = ed.codebook
    small._hook.codebook = ed.codebook
    assert torch.allclose(small.score([r.prompt for r in reqs], [[r.target_new, r.target_true] for r in reqs]), nll, atol=1e-5)
    small.close()
    ed.close()


@pytest.mark.parametrize("fam", ["gpt2", "llama"])
@pytest.mark.parametrize("replacement", ["last", "from_key"])
def test_cached_prefix_loss_equals_full_forward(fam, replacement):
    """Value training runs the prompt before the key once into a KV cache; its loss and gradient
    must equal those of the full teacher-forced forward with the value forced in (the reference)."""
    from larimar.eval.baselines.common import encode_targets, forward_logits, target_nll

    if fam == "gpt2":
        model, tok = tiny_gpt2(), tiny_tokenizer()
    else:
        model, tok = tiny_llama(kv_heads=1), tiny_tokenizer(add_bos=True)
    model.eval()
    ed = make_editor("grace", model, tok, layer=1, eps_init=1.0, n_iter=1, replacement=replacement)
    batch = encode_targets(tok, [REQ.prompt], ["Japan Tokyo"])
    key = batch.prompt_lens[0] - 1
    assert key > 0 and batch.input_ids.shape[1] - key >= 3  # a real prefix and a multi-token target
    torch.manual_seed(0)
    v = torch.randn(ed.proj.out_features)
    grads, losses = [], []
    for cached in (True, False):
        value = v.clone().requires_grad_(True)
        if cached:
            loss_fn = ed._value_loss_fn(batch)
            assert ed._hook.key_pos == [0]  # the key is the first token the steps run
        else:
            ed._hook.key_pos = [key]
            loss_fn = lambda: target_nll(forward_logits(model, batch), batch).mean()  # noqa: E731
        ed._hook.forced = (0, value)
        try:
            for _ in range(2):  # the cache must come back unchanged after a step
                value.grad = None
                loss = loss_fn()
                loss.backward()
        finally:
            ed._hook.forced = None
            ed._hook.key_pos = None
        losses.append(float(loss.detach()))
        grads.append(value.grad.clone())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert grads[0].abs().sum() > 0
    ed.close()
