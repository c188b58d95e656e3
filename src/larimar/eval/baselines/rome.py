"""ROME: Rank-One Model Editing (Meng et al., "Locating and Editing Factual Associations in GPT",
NeurIPS 2022), re-implemented for GPT-2 style (``Conv1D``) and Llama style (``nn.Linear``) MLPs.

The MLP output projection of layer ``l`` is treated as a linear associative memory ``v = W k``
(``k``: the projection's input, the MLP hidden activation, ``(in,)``; ``v``: its output, ``(out,)``).
One edit ``(prompt, subject, target_new)``:

(a) **key** ``k*``: the mean, over ``N + 1`` contexts (the bare prompt and ``N`` short texts sampled
    from the model itself and prepended as ``"{prefix}. {prompt}"``), of the projection's input at
    the subject's last token;
(b) **value** ``v* = v0 + delta``: ``v0`` is the projection's output at the subject's last token of
    the bare prompt; ``delta`` (``(out,)``) is added to the projection's output at the subject's last
    token of every context and optimised with Adam to minimise

        mean_contexts NLL(target_new | context + prompt)
        + kl_factor * KL(P_edited || P_orig)            # "essence drift" on "{subject} is a", at the
                                                        #  subject's last token (as ROME's code)
        + v_weight_decay * ||delta|| / ||v0||^2         # ROME's weight-decay form

    with ``||delta|| <= clamp_norm_factor * ||v0||`` enforced after every step and early stopping
    when the loss falls below ``early_stop_loss``;
(c) **rank-one update** ``W <- W + (v* - W k* - b) (C^-1 k*)^T / ((C^-1 k*)^T k*)``, where
    ``C = lambda * E[k k^T]`` is the (scaled) uncentred second moment of keys at that layer,
    estimated from generic text (WikiText-2 by default) and cached on disk. The update is the
    solution of ``min ||W' K - W K||`` subject to ``W' k* = v*`` for keys ``K`` with ``K K^T ~ C``
    (ROME eq. 2); it changes ``W x`` only for keys ``x`` with ``x^T C^-1 k* != 0``.

Notes on fidelity
-----------------
* The scale ``lambda`` (``mom2_update_weight``) cancels exactly in the single rank-one update above
  (numerator and denominator both scale by ``1/lambda``); it is kept for fidelity with ROME's
  hyper-parameter set and matters only when ``mom2_ridge > 0`` (the ridge is added after scaling).
* ROME's code uses the bare prompt's key in the denominator and residual (guaranteeing
  ``W' k_prompt = v*``); the paper's formula, used here, uses the averaged ``k*`` in both places
  (guaranteeing ``W' k* = v*``). Set ``update_key: prompt`` for the code's variant.
* ROME's context prefixes are sampled from the model (top-k 5) from the seeds "The", "Therefore",
  "Because", "I", "You"; here sampling uses a seeded ``torch.Generator``, so prefixes (and hence
  edits) are deterministic, and a document-start token is put before the seed word when the
  tokenizer adds none (see ``ROMEEditor._seed_ids``).
* Edits of a batch are applied one after the other (as ROME does); sequential ``edit`` calls
  accumulate. The key statistics are those of the *unedited* lower layers (ROME edits do not change
  the keys of their own layer).

Statistics cache: ``<cache_dir>/rome_stats/<model-id>_<layer>_<n_tokens>.pt`` where ``cache_dir`` is
:func:`larimar.modeling.loading.cache_dir` (``$LARIMAR_CACHE``, else ``~/.cache/larimar``), or
``stats_dir`` when given. Never committed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from larimar.eval.baselines.common import (
    MLPOutProj,
    WeightSnapshot,
    check,
    encode_targets,
    hparams_from_dict,
    locate_mlp_out,
    max_positions,
    model_device,
    model_id,
    subject_last_token,
    target_nll,
)
from larimar.eval.editors import BaseEditor, EditRequest

__all__ = [
    "ROMEEditor",
    "ROMEHparams",
    "compute_key_stats",
    "default_stats_text",
    "rome_update",
]

log = logging.getLogger(__name__)

_CONTEXT_SEEDS = ("The", "Therefore", "Because", "I", "You")


@dataclass
class ROMEHparams:
    """ROME hyper-parameters (defaults = ``configs/baselines/rome.yaml``, tuned for SmolLM2-135M).

    Attributes:
        layer: decoder layer whose MLP output projection is edited.
        v_num_grad_steps: max Adam steps for ``delta``.
        v_lr: Adam learning rate for ``delta``.
        v_weight_decay: weight of ``||delta|| / ||v0||^2``.
        clamp_norm_factor: ``||delta|| <= clamp_norm_factor * ||v0||``.
        kl_factor: weight of the essence-drift KL term.
        early_stop_loss: stop optimising when the total loss is below this.
        context_template_length_params: ``[[n_tokens, n_prefixes], ...]`` of sampled prefixes.
        context_top_k: top-k of the prefix sampler.
        context_seed: seed of the prefix sampler.
        mom2_adjustment: use ``C^-1 k*`` (True) or ``k*`` (False, i.e. ``C = I``) as the update's
            left vector.
        mom2_n_tokens: tokens of generic text used to estimate ``C``.
        mom2_seq_len: tokens per text chunk when estimating ``C``.
        mom2_batch_size: chunks per forward pass when estimating ``C``.
        mom2_text: text file for ``C`` (default: WikiText-2 raw test split of the shared data).
        mom2_update_weight: ``lambda`` in ``C = lambda * E[k k^T]`` (see module notes).
        mom2_ridge: ``C + mom2_ridge * mean(diag C) * I`` (numerical safety; 0 = none).
        update_key: ``"mean"`` (paper: averaged ``k*``) or ``"prompt"`` (ROME code: bare prompt key).
        stats_dir: directory of the statistics cache (default ``<cache_dir>/rome_stats``).
        score_batch_size: sequences per forward pass when scoring.
    """

    layer: int = 5
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    context_template_length_params: list[list[int]] = field(default_factory=lambda: [[5, 5]])
    context_top_k: int = 5
    context_seed: int = 0
    mom2_adjustment: bool = True
    mom2_n_tokens: int = 100_000
    mom2_seq_len: int = 256
    mom2_batch_size: int = 8
    mom2_text: str | None = None
    mom2_update_weight: float = 15000.0
    mom2_ridge: float = 0.0
    update_key: str = "mean"
    stats_dir: str | None = None
    score_batch_size: int = 16

    def __post_init__(self) -> None:
        m = "rome"
        check(isinstance(self.layer, int) and not isinstance(self.layer, bool) and self.layer >= 0, m,
              f"layer must be a non-negative int, got {self.layer!r}")
        check(isinstance(self.v_num_grad_steps, int) and self.v_num_grad_steps >= 1, m,
              f"v_num_grad_steps must be >= 1, got {self.v_num_grad_steps!r}")
        for name in ("v_lr", "clamp_norm_factor", "mom2_update_weight"):
            val = getattr(self, name)
            check(isinstance(val, (int, float)) and val > 0, m, f"{name} must be > 0, got {val!r}")
        for name in ("v_weight_decay", "kl_factor", "early_stop_loss", "mom2_ridge"):
            val = getattr(self, name)
            check(isinstance(val, (int, float)) and val >= 0, m, f"{name} must be >= 0, got {val!r}")
        ctx = self.context_template_length_params
        check(
            isinstance(ctx, (list, tuple))
            and all(isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, int) and x >= 1 for x in p)
                    for p in ctx),
            m, f"context_template_length_params must be a list of [n_tokens >= 1, n_prefixes >= 1] pairs, got {ctx!r}",
        )
        self.context_template_length_params = [list(p) for p in ctx]
        check(isinstance(self.context_top_k, int) and self.context_top_k >= 1, m,
              f"context_top_k must be >= 1, got {self.context_top_k!r}")
        for name in ("mom2_n_tokens", "mom2_seq_len", "mom2_batch_size", "score_batch_size"):
            val = getattr(self, name)
            check(isinstance(val, int) and not isinstance(val, bool) and val >= 1, m, f"{name} must be an int >= 1, got {val!r}")
        check(self.update_key in ("mean", "prompt"), m, f"update_key must be 'mean' or 'prompt', got {self.update_key!r}")


# --------------------------------------------------------------------------------------------
# The closed form
# --------------------------------------------------------------------------------------------


def rome_update(
    W: torch.Tensor,  # noqa: N803
    C: torch.Tensor,  # noqa: N803
    k_star: torch.Tensor,
    v_star: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """ROME's rank-one update ``Delta = (v* - W k* - b) (C^-1 k*)^T / ((C^-1 k*)^T k*)``.

    Args:
        W: ``(out, in)`` current weight.
        C: ``(in, in)`` symmetric positive-definite key second moment (any positive scale).
        k_star: ``(in,)`` key.
        v_star: ``(out,)`` desired output ``W' k* + b``.
        bias: optional ``(out,)`` bias of the projection.

    Returns:
        ``(out, in)`` update (float64 computation, returned in ``W``'s dtype), so that
        ``(W + Delta) k* + b == v*``.
    """
    w = W.detach().double()
    k = k_star.detach().double().to(w.device)
    v = v_star.detach().double().to(w.device)
    u = torch.linalg.solve(C.detach().double().to(w.device), k)  # C^-1 k*
    residual = v - w @ k
    if bias is not None:
        residual = residual - bias.detach().double().to(w.device)
    denom = torch.dot(u, k)
    if not torch.isfinite(denom) or denom.abs() < 1e-30:
        raise FloatingPointError(f"degenerate ROME update: (C^-1 k*)^T k* = {float(denom)}")
    return (torch.outer(residual, u) / denom).to(W.dtype)


# --------------------------------------------------------------------------------------------
# Key statistics
# --------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by a hook to abort a forward pass once the needed activation is captured."""


def default_stats_text() -> Path:
    """The default generic text for ``C``: the shared WikiText-2 raw test split."""
    from larimar.eval.data import default_data_dir

    return default_data_dir() / "text" / "wikitext-2-raw" / "wiki.test.raw"


def _text_chunks(tokenizer: Any, path: Path, n_tokens: int, seq_len: int) -> list[list[int]]:
    """Token chunks of at most ``seq_len`` tokens covering about ``n_tokens`` tokens of ``path``."""
    ids: list[int] = []
    with path.open(encoding="utf-8") as fh:
        buf: list[str] = []
        size = 0
        for line in fh:
            if not line.strip():
                continue
            buf.append(line)
            size += len(line)
            if size >= 200_000:
                ids.extend(tokenizer("".join(buf), add_special_tokens=False)["input_ids"])
                buf, size = [], 0
                if len(ids) >= n_tokens:
                    break
        if buf and len(ids) < n_tokens:
            ids.extend(tokenizer("".join(buf), add_special_tokens=False)["input_ids"])
    ids = ids[:n_tokens]
    if not ids:
        raise ValueError(f"{path} holds no text to estimate key statistics from")
    return [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]


def compute_key_stats(
    model: Any,
    tokenizer: Any,
    proj: MLPOutProj,
    text_path: str | os.PathLike[str],
    *,
    n_tokens: int,
    seq_len: int = 256,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[torch.Tensor, int]:
    """Uncentred second moment ``E[k k^T]`` of the inputs ``k`` of ``proj`` over generic text.

    The text is tokenised (no special tokens) and cut into chunks of ``seq_len`` tokens; each chunk
    is run through the model up to ``proj`` (the forward pass is aborted there).

    Returns:
        ``(C, count)``: ``C`` float32 ``(in, in)`` on CPU, ``count`` the number of tokens used.
    """
    from tqdm.auto import tqdm

    seq_len = min(seq_len, max_positions(model))
    chunks = _text_chunks(tokenizer, Path(text_path), n_tokens, seq_len)
    device = model_device(model)
    d = proj.in_features
    acc = torch.zeros((d, d), dtype=torch.float64, device=device)
    count = 0
    captured: dict[str, torch.Tensor] = {}

    def pre_hook(_mod: Any, args: tuple[Any, ...]) -> None:
        captured["k"] = args[0].detach()
        raise _StopForward

    from larimar.eval.scoring import pad_token_id_for

    pad = pad_token_id_for(tokenizer)
    handle = proj.module.register_forward_pre_hook(pre_hook)
    was_training = model.training
    model.eval()
    total = sum(len(c) for c in chunks)
    bar = tqdm(total=total, desc=f"ROME key stats ({proj.name})", unit="tok", disable=not progress)
    try:
        with torch.no_grad():
            for start in range(0, len(chunks), batch_size):
                batch = chunks[start : start + batch_size]
                t_max = max(len(c) for c in batch)
                ids = torch.full((len(batch), t_max), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), t_max), dtype=torch.long)
                for r, c in enumerate(batch):
                    ids[r, : len(c)] = torch.tensor(c)
                    mask[r, : len(c)] = 1
                try:
                    model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                except _StopForward:
                    pass
                k = captured.pop("k")  # (B, T, in)
                sel = k[mask.to(k.device).bool()].double()  # (n, in)
                acc += sel.T @ sel
                count += sel.shape[0]
                bar.update(int(mask.sum()))
    finally:
        handle.remove()
        bar.close()
        model.train(was_training)
    return (acc / max(count, 1)).float().cpu(), count


# --------------------------------------------------------------------------------------------
# The editor
# --------------------------------------------------------------------------------------------


def _pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    t_max = max(len(r) for r in rows)
    ids = torch.full((len(rows), t_max), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), t_max), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


class ROMEEditor(BaseEditor):
    """ROME editor (see the module docstring). Hyper-parameters: :class:`ROMEHparams`.

    Attributes:
        proj: the edited :class:`MLPOutProj`.
        last_update: after each edit, a dict with ``k_star`` ``(in,)``, ``v_star`` ``(out,)``,
            ``u`` (``C^-1 k*``, ``(in,)``), ``delta_w`` ``(out, in)``, ``v_loss`` (final NLL) and
            ``steps``.
    """

    name = "rome"

    def __init__(self, model: Any, tokenizer: Any, **hparams: Any) -> None:
        self.hparams = hparams_from_dict(ROMEHparams, "rome", hparams)
        super().__init__(model, tokenizer, score_batch_size=self.hparams.score_batch_size)
        self.proj = locate_mlp_out(model, self.hparams.layer)
        self._snapshot = WeightSnapshot({self.proj.name + ".weight": self.proj.weight})
        self._prefixes: list[str] | None = None
        self._C: torch.Tensor | None = None
        self.last_update: dict[str, Any] = {}

    # -- public helpers -----------------------------------------------------------------------
    def stats_path(self) -> Path:
        """Where the key statistics of this model/layer/n are cached."""
        if self.hparams.stats_dir is not None:
            base = Path(self.hparams.stats_dir).expanduser()
        else:
            from larimar.modeling.loading import cache_dir

            base = cache_dir() / "rome_stats"
        return base / f"{model_id(self.model)}_{self.hparams.layer}_{self.hparams.mom2_n_tokens}.pt"

    def key_second_moment(self) -> torch.Tensor:
        """``E[k k^T]`` ``(in, in)`` float32 (CPU), loaded from the cache or computed (and cached)."""
        if self._C is not None:
            return self._C
        hp = self.hparams
        text = Path(hp.mom2_text).expanduser() if hp.mom2_text else default_stats_text()
        fingerprint = self._fingerprint()
        path = self.stats_path()
        if path.is_file():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                meta = blob.get("meta", {})
                if (
                    meta.get("in_features") == self.proj.in_features
                    and meta.get("seq_len") == hp.mom2_seq_len
                    and meta.get("text") == text.name
                    and abs(float(meta.get("fingerprint", float("nan"))) - fingerprint) <= 1e-6 * max(1.0, abs(fingerprint))
                ):
                    self._C = blob["mom2"].float()
                    return self._C
                log.warning("ROME statistics in %s do not match this model/settings; recomputing", path)
            except Exception as exc:  # noqa: BLE001 - a corrupt cache file is recomputed
                log.warning("could not read %s (%s); recomputing", path, exc)
        if not text.is_file():
            raise FileNotFoundError(
                f"ROME needs generic text to estimate key statistics; {text} does not exist "
                "(set mom2_text, or $LARIMAR_DATA to the shared data directory)"
            )
        C, count = compute_key_stats(
            self.model, self.tokenizer, self.proj, text,
            n_tokens=hp.mom2_n_tokens, seq_len=hp.mom2_seq_len, batch_size=hp.mom2_batch_size,
        )
        meta = {
            "model_id": model_id(self.model), "layer": hp.layer, "n_tokens": count,
            "n_tokens_requested": hp.mom2_n_tokens, "seq_len": hp.mom2_seq_len, "text": text.name,
            "in_features": self.proj.in_features, "module": self.proj.name, "fingerprint": fingerprint,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"mom2": C, "meta": meta}, tmp)
        os.replace(tmp, path)
        self._C = C
        return C

    def context_prefixes(self) -> list[str]:
        """The context prefixes: ``""`` (bare prompt) followed by the sampled ``"{text}. "``."""
        if self._prefixes is None:
            self._prefixes = [""] + self._sample_prefixes()
        return self._prefixes

    # -- BaseEditor -----------------------------------------------------------------------------
    def _apply(self, requests: list[EditRequest]) -> None:
        for req in requests:
            self._apply_one(req)

    def _restore(self) -> None:
        self._snapshot.restore()
        self.last_update = {}

    # -- internals --------------------------------------------------------------------------------
    def _fingerprint(self) -> float:
        emb = self.model.get_input_embeddings().weight
        return float(emb.detach().double().sum())

    def _seed_ids(self, word: str) -> list[int]:
        """Token ids to start sampling a prefix from: the seed word at the start of a document.

        When the tokenizer adds no BOS of its own, a document-separator token is put first
        (``<|endoftext|>`` if the vocabulary has it, else the BOS, else the EOS token): without it
        models such as SmolLM2 read a lone ``"The"`` as the middle of a text (their most likely
        continuation is ``"-"``).
        """
        tok = self.tokenizer
        with_special = list(tok(word, add_special_tokens=True)["input_ids"])
        plain = list(tok(word, add_special_tokens=False)["input_ids"])
        if with_special != plain:
            return with_special
        sep = None
        vocab = tok.get_vocab() if hasattr(tok, "get_vocab") else {}
        if "<|endoftext|>" in vocab:
            sep = vocab["<|endoftext|>"]
        for attr in ("bos_token_id", "eos_token_id"):
            if sep is None and isinstance(getattr(tok, attr, None), int):
                sep = getattr(tok, attr)
        return ([sep] if sep is not None else []) + plain

    def _sample_prefixes(self) -> list[str]:
        hp = self.hparams
        model, tok = self.model, self.tokenizer
        device = model_device(model)
        gen = torch.Generator(device="cpu").manual_seed(hp.context_seed)
        eos = getattr(tok, "eos_token_id", None)
        prefixes: list[str] = []
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for length, n in hp.context_template_length_params:
                    for i in range(n):
                        ids = self._seed_ids(_CONTEXT_SEEDS[i % len(_CONTEXT_SEEDS)])
                        n0 = len(ids)
                        for _ in range(length):
                            logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, -1]
                            logits = logits.float().cpu()
                            if eos is not None:
                                logits[eos] = -float("inf")
                            top = torch.topk(logits, min(hp.context_top_k, logits.numel()))
                            probs = torch.softmax(top.values, dim=-1)
                            ids.append(int(top.indices[torch.multinomial(probs, 1, generator=gen)]))
                        special = set(getattr(tok, "all_special_ids", []) or [])
                        head = [t for t in ids[:n0] if t not in special]
                        text = tok.decode(head + ids[n0:], skip_special_tokens=True)
                        text = " ".join(text.replace("{", " ").replace("}", " ").split())
                        prefixes.append(text + ". ")
        finally:
            model.train(was_training)
        return prefixes

    def _keys_at_subject(self, texts: list[str], subject: str, starts: list[int]) -> torch.Tensor:
        """Inputs of the projection at the subject's last token of each text: ``(n, in)`` float32."""
        from larimar.eval.scoring import pad_token_id_for

        idxs = [subject_last_token(self.tokenizer, t, subject, start_char=s) for t, s in zip(texts, starts)]
        rows = [list(self.tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts]
        ids, mask = _pad(rows, pad_token_id_for(self.tokenizer))
        device = model_device(self.model)
        captured: dict[str, torch.Tensor] = {}

        def pre_hook(_mod: Any, args: tuple[Any, ...]) -> None:
            captured["k"] = args[0].detach()
            raise _StopForward

        handle = self.proj.module.register_forward_pre_hook(pre_hook)
        try:
            with torch.no_grad():
                try:
                    self.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                except _StopForward:
                    pass
        finally:
            handle.remove()
        k = captured["k"]
        return k[torch.arange(len(texts), device=k.device), torch.tensor(idxs, device=k.device)].float()

    def _optimise_delta(self, req: EditRequest, prefixes: list[str], v0: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        """Optimise ``delta`` (``(out,)``); returns ``(delta, final_nll, steps)``."""
        from larimar.eval.scoring import pad_token_id_for

        hp = self.hparams
        tok, model = self.tokenizer, self.model
        device = model_device(model)
        texts = [p + req.prompt for p in prefixes]
        rw = encode_targets(tok, texts, [req.target_new] * len(texts))
        rw_idx = [subject_last_token(tok, t, req.subject, start_char=len(p)) for t, p in zip(texts, prefixes)]
        kl_text = f"{req.subject} is a"
        kl_ids = list(tok(kl_text, add_special_tokens=True)["input_ids"])
        kl_idx = subject_last_token(tok, kl_text, req.subject)
        rows = [rw.input_ids[r, : int(rw.attention_mask[r].sum())].tolist() for r in range(len(texts))] + [kl_ids]
        ids, mask = _pad(rows, pad_token_id_for(tok))
        n_rw = len(texts)
        t_all = ids.shape[1]
        lookup = torch.zeros((len(rows), t_all, 1), dtype=torch.float32)
        for r, i in enumerate(rw_idx + [kl_idx]):
            lookup[r, i, 0] = 1.0
        lookup = lookup.to(device)
        ids, mask = ids.to(device), mask.to(device)
        # rewriting batch padded to the joint width for target_nll
        t_rw = rw.input_ids.shape[1]

        delta = torch.zeros(self.proj.out_features, dtype=torch.float32, device=device, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=hp.v_lr)

        def hook(_mod: Any, _args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            return out + (lookup * delta).to(out.dtype)

        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        was_training = model.training
        model.eval()
        handle = self.proj.module.register_forward_hook(hook)
        kl_init: torch.Tensor | None = None
        max_norm = hp.clamp_norm_factor * float(v0.norm())
        v0_sq = float(v0.norm()) ** 2
        nll_value = float("nan")
        steps = 0
        try:
            for it in range(hp.v_num_grad_steps):
                opt.zero_grad()
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                nll = target_nll(logits[:n_rw, :t_rw], rw).mean()
                kl_logp = torch.log_softmax(logits[n_rw, kl_idx].float(), dim=-1)
                if kl_init is None:
                    kl_init = kl_logp.detach().clone()
                # KL(P_current || P_init), as ROME's F.kl_div(init, current, log_target=True)
                kl = hp.kl_factor * F.kl_div(kl_init[None], kl_logp[None], log_target=True, reduction="batchmean")
                wd = hp.v_weight_decay * delta.norm() / max(v0_sq, 1e-12)
                loss = nll + kl + wd
                nll_value = float(nll.detach())
                log.debug("ROME step %d: nll %.4f kl %.4f wd %.4f |delta| %.3f (max %.3f)",
                          it, nll_value, float(kl.detach()), float(wd.detach()), float(delta.detach().norm()), max_norm)
                steps = it + 1
                if float(loss.detach()) < hp.early_stop_loss or it == hp.v_num_grad_steps - 1:
                    break
                loss.backward()
                opt.step()
                with torch.no_grad():
                    norm = delta.norm()
                    if norm > max_norm:
                        delta.mul_(max_norm / norm)
        finally:
            handle.remove()
            for n, p in model.named_parameters():
                p.requires_grad_(flags[n])
            model.train(was_training)
        return delta.detach(), nll_value, steps

    def _apply_one(self, req: EditRequest) -> None:
        hp = self.hparams
        prefixes = self.context_prefixes()
        texts = [p + req.prompt for p in prefixes]
        keys = self._keys_at_subject(texts, req.subject, [len(p) for p in prefixes])  # (N+1, in)
        k_mean = keys.mean(dim=0)
        k_prompt = keys[0]
        v0 = self.proj.apply(k_prompt)  # output at the bare prompt's subject token
        delta, nll, steps = self._optimise_delta(req, prefixes, v0)
        v_star = v0 + delta.to(v0.device)
        if hp.mom2_adjustment:
            C = self.key_second_moment().double() * hp.mom2_update_weight  # noqa: N806
            if hp.mom2_ridge > 0:
                C = C + hp.mom2_ridge * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype)  # noqa: N806
        else:
            C = torch.eye(self.proj.in_features, dtype=torch.float64)  # noqa: N806
        k_star = k_mean
        W = self.proj.matrix()  # noqa: N806
        if hp.update_key == "mean":
            delta_w = rome_update(W, C, k_star, v_star, self.proj.bias)
        else:
            # ROME code variant: left vector from the averaged key, residual/denominator from the prompt key
            u = torch.linalg.solve(C.to(W.device), k_mean.double().to(W.device))
            residual = v_star.double().to(W.device) - self.proj.apply(k_prompt).double().to(W.device)
            delta_w = (torch.outer(residual, u) / torch.dot(u, k_prompt.double().to(W.device))).to(W.dtype)
            k_star = k_prompt
        self.proj.add_(delta_w)
        u = torch.linalg.solve(C.to(W.device), k_mean.double().to(W.device)).float()
        self.last_update = {
            "k_star": k_star.detach().cpu(),
            "v_star": v_star.detach().cpu(),
            "u": u.cpu(),
            "delta_w": delta_w.detach().cpu(),
            "v_loss": nll,
            "steps": steps,
        }
