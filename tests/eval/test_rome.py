"""ROME: the rank-one closed form against an independent constrained least-squares solve, the key
statistics cache, and edits on tiny GPT-2 (Conv1D) and Llama (Linear) models."""

from __future__ import annotations

import pytest
import torch

from larimar.eval.baselines import rome as rome_mod
from larimar.eval.baselines.rome import ROMEEditor, compute_key_stats, rome_update
from larimar.eval.editors import EditRequest, make_editor
from larimar.testing import TINY_CORPUS, tiny_gpt2, tiny_llama, tiny_tokenizer

# Tiny random models route little information between positions, so the edit is tested with the
# subject at the end of the prompt and a single-token target (the real-model check is smoke()).
REQ = EditRequest("The mother tongue of Danielle Darrieux", "Danielle Darrieux", "Paris", "French")
REQ2 = EditRequest("The official language of Japan", "Japan", "French", "Japanese")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: faster on one thread, immune to a busy machine


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("\n".join(list(TINY_CORPUS) * 12), encoding="utf-8")
    return path


def tiny_hparams(tmp_path, text_file, **extra):
    hp = dict(
        layer=0,
        mom2_text=str(text_file),
        mom2_n_tokens=2500,
        mom2_seq_len=64,
        stats_dir=str(tmp_path / "stats"),
        context_template_length_params=[[3, 2]],
        v_num_grad_steps=25,
    )
    hp.update(extra)
    return hp


# --------------------------------------------------------------------------------------------
# closed form
# --------------------------------------------------------------------------------------------


def _kkt_solution(W, C, k, v, b):  # noqa: N803
    """argmin_W' sum_j ||(W' - W) x_j||^2 (keys with E[x x^T] = C) s.t. W' k + b = v, via the KKT
    system [[2C, k], [k^T, 0]] [w'_i; mu_i] = [2C w_i; v_i - b_i], one row i of W' at a time."""
    d_in = C.shape[0]
    A = torch.zeros(d_in + 1, d_in + 1, dtype=torch.float64)  # noqa: N806
    A[:d_in, :d_in] = 2 * C
    A[:d_in, d_in] = k
    A[d_in, :d_in] = k
    rhs = torch.cat([2 * C @ W.T, (v - b)[None, :]], dim=0)  # (d_in + 1, out)
    sol = torch.linalg.solve(A, rhs)
    return sol[:d_in].T  # (out, in)


def test_rank_one_update_matches_constrained_least_squares():
    g = torch.Generator().manual_seed(0)
    d_out, d_in = 5, 7
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)  # noqa: N806
    X = torch.randn(d_in, 50, generator=g, dtype=torch.float64)  # noqa: N806
    C = X @ X.T / 50  # noqa: N806
    k = torch.randn(d_in, generator=g, dtype=torch.float64)
    v = torch.randn(d_out, generator=g, dtype=torch.float64)
    b = torch.randn(d_out, generator=g, dtype=torch.float64)
    delta = rome_update(W, C, k, v, b)
    W_new = W + delta  # noqa: N806
    assert torch.allclose(W_new @ k + b, v, atol=1e-10)  # W' k* = v*
    assert torch.allclose(W_new, _kkt_solution(W, C, k, v, b), atol=1e-8)
    assert torch.linalg.matrix_rank(delta) == 1
    # keys C-orthogonal to k* (x^T C^-1 k* = 0) keep their outputs
    u = torch.linalg.solve(C, k)
    x = torch.randn(d_in, generator=g, dtype=torch.float64)
    x = x - (x @ u) / (u @ u) * u
    assert torch.allclose(W_new @ x, W @ x, atol=1e-10)
    # the scale lambda of C cancels
    assert torch.allclose(rome_update(W, 15000.0 * C, k, v, b), delta, atol=1e-10)
    # identity C gives the plain least-norm rank-one update
    eye = torch.eye(d_in, dtype=torch.float64)
    assert torch.allclose(rome_update(W, eye, k, v, b), torch.outer(v - b - W @ k, k) / (k @ k), atol=1e-10)


def test_key_stats_second_moment(text_file):
    model, tok = tiny_gpt2(), tiny_tokenizer()
    from larimar.eval.baselines.common import locate_mlp_out

    proj = locate_mlp_out(model, 1)
    C, n = compute_key_stats(model, tok, proj, text_file, n_tokens=300, seq_len=100, batch_size=2, progress=False)
    assert n == 300 and C.shape == (64, 64)
    assert torch.allclose(C, C.T, atol=1e-6)
    # independent: collect the keys with a hook over the same chunks, average k k^T
    keys = []
    h = proj.module.register_forward_pre_hook(lambda m, a: keys.append(a[0].detach()[0]))
    ids = tok("".join(l for l in text_file.read_text().splitlines(keepends=True) if l.strip()))["input_ids"][:300]
    with torch.no_grad():
        for s in range(0, 300, 100):
            model(input_ids=torch.tensor([ids[s : s + 100]]))
    h.remove()
    K = torch.cat(keys).double()  # noqa: N806
    assert torch.allclose(C.double(), K.T @ K / K.shape[0], atol=1e-4)


# --------------------------------------------------------------------------------------------
# editor
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fam", ["gpt2", "llama"])
def test_rome_edit_flips_and_resets(fam, tmp_path, text_file):
    if fam == "gpt2":
        model, tok = tiny_gpt2(), tiny_tokenizer()
    else:
        model, tok = tiny_llama(kv_heads=1), tiny_tokenizer(add_bos=True)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    ed = make_editor("rome", model, tok, **tiny_hparams(tmp_path, text_file))
    assert isinstance(ed, ROMEEditor)
    before = ed.score([REQ.prompt], [["Paris", "French"]])
    assert before[0, 0] > before[0, 1]
    ed.edit([REQ])
    after = ed.score([REQ.prompt], [["Paris", "French"]])
    assert after[0, 0] < after[0, 1]
    # the update satisfies W' k* + b = v* and is rank one on the located projection only
    up = ed.last_update
    out = ed.proj.apply(up["k_star"][None])[0]
    assert torch.allclose(out, up["v_star"], atol=1e-4 * max(1.0, float(up["v_star"].abs().max())))
    assert torch.linalg.matrix_rank(up["delta_w"].double(), rtol=1e-6) == 1
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, saved[k])]
    assert changed == [ed.proj.name + ".weight"]
    # statistics cached at <stats_dir>/<model-id>_<layer>_<n>.pt
    assert ed.stats_path().is_file() and ed.stats_path().name.endswith("_0_2500.pt")
    # sequential edits accumulate; reset restores the weights bit-exactly
    ed.edit([REQ2])
    assert len(ed.requests) == 2
    ed.reset()
    now = model.state_dict()
    assert all(torch.equal(now[k], saved[k]) for k in saved)
    assert torch.equal(ed.score([REQ.prompt], [["Paris", "French"]]), before)
    assert len(ed.generate([REQ.prompt], max_new_tokens=2)) == 1


def test_stats_cache_is_reused(tmp_path, text_file, monkeypatch):
    model, tok = tiny_gpt2(), tiny_tokenizer()
    hp = tiny_hparams(tmp_path, text_file, v_num_grad_steps=2)
    first = ROMEEditor(model, tok, **hp)
    C = first.key_second_moment()
    assert first.stats_path().is_file()

    def boom(*a, **k):
        raise AssertionError("statistics recomputed although cached")

    monkeypatch.setattr(rome_mod, "compute_key_stats", boom)
    second = ROMEEditor(model, tok, **hp)
    assert torch.equal(second.key_second_moment(), C)
    # a different model with the same id is detected (fingerprint) and recomputed
    other = tiny_gpt2(seed=1)
    third = ROMEEditor(other, tok, **hp)
    assert third.stats_path() == first.stats_path()
    with pytest.raises(AssertionError, match="recomputed"):
        third.key_second_moment()


def test_context_prefixes_deterministic(tmp_path, text_file):
    model, tok = tiny_llama(), tiny_tokenizer(add_bos=True)
    hp = tiny_hparams(tmp_path, text_file, context_template_length_params=[[3, 2], [4, 1]])
    a = ROMEEditor(model, tok, **hp).context_prefixes()
    b = ROMEEditor(model, tok, **hp).context_prefixes()
    assert a == b and len(a) == 4 and a[0] == ""
    assert all(p.endswith(". ") and "{" not in p for p in a[1:])


def test_missing_text_is_a_clear_error(tmp_path):
    model, tok = tiny_gpt2(), tiny_tokenizer()
    ed = ROMEEditor(model, tok, layer=0, mom2_text=str(tmp_path / "none.txt"), stats_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="mom2_text"):
        ed.key_second_moment()


def test_update_key_prompt_variant(tmp_path, text_file):
    """ROME-code variant: the residual is taken at the bare prompt's key, so W' k_prompt + b = v*."""
    model, tok = tiny_gpt2(), tiny_tokenizer()
    ed = ROMEEditor(model, tok, **tiny_hparams(tmp_path, text_file, update_key="prompt", v_num_grad_steps=5))
    ed.edit([REQ])
    up = ed.last_update
    k_prompt = ed._keys_at_subject([REQ.prompt], REQ.subject, [0])[0]
    assert torch.allclose(up["k_star"], k_prompt, atol=1e-6)
    assert torch.allclose(ed.proj.apply(k_prompt[None])[0], up["v_star"], atol=1e-4)
