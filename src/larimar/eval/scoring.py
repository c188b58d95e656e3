"""Teacher-forced scoring of continuations with any Hugging Face causal LM.

The main entry points are :func:`continuation_nll` (mean NLL of each continuation's tokens, the
quantity behind ROME's CounterFact probabilities) and :func:`continuation_token_stats` (per-token log
probabilities and argmax-correct flags, for ZsRE token accuracy). Both are model-agnostic: the model is
called as ``model(input_ids=..., attention_mask=..., position_ids=..., **extra)`` and must return
logits (``.logits``, the first element of a tuple, or a tensor) of shape ``(B, T, V)`` (or
``(B, P + T, V)`` when a prefix is used, see below).

Tokenisation
------------
Callers pass continuations *with* their leading space, e.g. prompt ``"The capital of France is"``
and continuation ``" Paris"``; nothing is inserted between prompt and continuation. The prompt is tokenised on its own (with the tokenizer's special
tokens, e.g. a BOS) and ``prompt + continuation`` jointly; when the joint token sequence starts with
the prompt's tokens, the remaining tokens are the continuation tokens (so boundary-sensitive
tokenizers such as SentencePiece see the text as it would appear in running text). When the joint
tokenisation merges tokens across the boundary, the continuation is tokenised on its own (no special
tokens) and appended to the prompt tokens instead. Special tokens that the tokenizer appends at the
end (e.g. an EOS) are dropped. A prompt must yield at least one token (there is no position to
predict the first continuation token from otherwise) and a continuation at least one.

Batching
--------
Sequences are right-padded (pad id = ``tokenizer.pad_token_id``, else the EOS id, else 0; pad
positions are masked, so the value is irrelevant) with an attention mask, and explicit
``position_ids`` that count only real tokens. Results do not depend on ``batch_size`` or on the other
sequences of a batch (up to floating-point noise). The model is put in eval mode for the call and its
previous mode restored; gradients are disabled.

Prefix hook (memory-conditioned models)
---------------------------------------
``prefix_fn(batch_index: list[int], batch_size: int) -> dict | None`` is called once per batch with
the indices (into ``prompts``) of the batch's examples, in order, and ``batch_size ==
len(batch_index)``. It returns ``None`` (no prefix) or a dict of extra forward kwargs. Two keys are
consumed here and not forwarded:

* ``"prefix_len"`` (int P >= 0): number of prefix positions that precede the batch's tokens. If
  omitted, it is taken from ``past_key_values.get_seq_length()`` when ``past_key_values`` is given,
  else 0.
* ``"prefix_attention_mask"`` (optional ``(B, P)`` 0/1 tensor): which prefix positions are visible;
  defaults to all ones.

Everything else (typically ``"past_key_values"``: a ``transformers`` ``Cache`` holding P positions
for each of the B examples, e.g. ``DynamicCache(ddp_cache_data=[(k_l, v_l), ...], config=cfg)`` with
``k_l, v_l`` of shape ``(B, n_kv_heads, P, head_dim)``) is passed to the model. When P > 0 the
attention mask becomes ``cat([prefix_attention_mask, token_mask], dim=1)`` (length P + T) and the
position ids of each row start at the number of visible prefix positions (P for an all-ones mask).
Note that HF models *append* the batch's keys/values to a cache in place, so ``prefix_fn`` must
return a fresh cache on every call: returning the same cache object for two batches of one call raises
``ValueError``, and so does a cache whose length differs from an explicit ``prefix_len`` (pass
``prefix_len`` explicitly to also catch a cache reused from an earlier call). If the model
returns logits for P + T positions (e.g. a model that prepends prefix embeddings itself) the first P
are dropped. ``use_cache=False`` is passed unless ``prefix_fn`` supplies ``past_key_values`` or
``use_cache`` itself.

Forward hook
------------
Alternatively, ``forward_fn(input_ids, attention_mask, batch_index) -> logits`` replaces the model
call altogether (``model`` is then only used for its device and train/eval mode). It receives the
right-padded ``(B, T)`` ``input_ids`` and ``attention_mask`` on the model's device (no prefix, no
position ids: with right padding the default positions ``0..T-1`` are right for every real token)
and the batch's indices, and returns ``(B, T, V)`` logits (a tensor or an output with ``.logits``).
``forward_fn`` and ``prefix_fn`` are mutually exclusive.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "ContinuationStats",
    "ForwardFn",
    "PrefixFn",
    "continuation_nll",
    "continuation_token_stats",
    "encode_continuations",
    "pad_token_id_for",
    "score_token_ids",
]

#: ``prefix_fn(batch_index, batch_size) -> extra forward kwargs or None`` (see module docstring).
PrefixFn = Callable[[list[int], int], Mapping[str, Any] | None]
#: ``forward_fn(input_ids, attention_mask, batch_index) -> logits`` (see module docstring).
ForwardFn = Callable[[torch.Tensor, torch.Tensor, list[int]], Any]


@dataclass(frozen=True)
class ContinuationStats:
    """Teacher-forced statistics of one continuation.

    Attributes:
        target_ids: ``(L,)`` long, the continuation's token ids.
        logprobs: ``(L,)`` float32, ``log p(target_i | prompt, target_<i)``.
        predicted_ids: ``(L,)`` long, argmax of the logits at the position before each target token.
    """

    target_ids: torch.Tensor
    logprobs: torch.Tensor
    predicted_ids: torch.Tensor

    @property
    def correct(self) -> torch.Tensor:
        """``(L,)`` bool: teacher-forced argmax equals the target token."""
        return self.predicted_ids == self.target_ids

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood of the continuation tokens."""
        return float(-self.logprobs.mean())

    @property
    def accuracy(self) -> float:
        """Fraction of continuation tokens predicted correctly (teacher-forced argmax)."""
        return float(self.correct.float().mean())


def pad_token_id_for(tokenizer: Any) -> int:
    """The id used for padding: the pad token, else the EOS token, else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, list):  # some configs hold several EOS ids
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def _strip_trailing_specials(a: list[int], b: list[int], specials: set[int]) -> tuple[list[int], list[int]]:
    """Drop special tokens that the tokenizer appends to both encodings (e.g. a trailing EOS)."""
    while a and b and a[-1] == b[-1] and a[-1] in specials:
        a, b = a[:-1], b[:-1]
    return a, b


def encode_continuations(
    tokenizer: Any, prompts: Sequence[str], continuations: Sequence[str]
) -> list[tuple[list[int], list[int]]]:
    """Tokenise ``(prompt, continuation)`` pairs into ``(prompt_ids, continuation_ids)``.

    See the module docstring for the boundary rule (joint tokenisation when the prompt's tokens are
    a prefix of the joint tokens; separate tokenisation otherwise).

    Raises:
        ValueError: lengths differ, a prompt yields no tokens, or a continuation yields none.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    if not prompts:
        return []
    prompts, continuations = list(prompts), list(continuations)
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    p_enc = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    f_enc = tokenizer([p + c for p, c in zip(prompts, continuations)], add_special_tokens=True)["input_ids"]
    out: list[tuple[list[int], list[int]]] = []
    for i, (p_ids, f_ids) in enumerate(zip(p_enc, f_enc)):
        p_ids, f_ids = _strip_trailing_specials(list(p_ids), list(f_ids), specials)
        if not p_ids:
            raise ValueError(
                f"prompt {i} ({prompts[i]!r}) has no tokens; a causal LM needs at least one token "
                "(e.g. a BOS) before the continuation"
            )
        if len(f_ids) > len(p_ids) and f_ids[: len(p_ids)] == p_ids:
            c_ids = f_ids[len(p_ids) :]
        else:
            c_ids = list(tokenizer(continuations[i], add_special_tokens=False)["input_ids"])
        if not c_ids:
            raise ValueError(f"continuation {i} ({continuations[i]!r}) has no tokens")
        out.append((p_ids, c_ids))
    return out


def _model_device(model: Any) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return torch.device("cpu")


def _extract_logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"model output {type(out).__name__} has no logits tensor")
    return logits


def _score_batch(
    model: Any,
    batch: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_index: list[int],
    *,
    pad_id: int,
    device: torch.device,
    prefix_fn: PrefixFn | None,
    forward_fn: ForwardFn | None,
    pass_position_ids: bool,
    seen_caches: list[Any],
) -> list[ContinuationStats]:
    bsz = len(batch)
    lengths = [len(p) + len(c) for p, c in batch]
    seq_len = max(lengths)
    input_ids = torch.full((bsz, seq_len), pad_id, dtype=torch.long)
    token_mask = torch.zeros((bsz, seq_len), dtype=torch.long)
    target_mask = torch.zeros((bsz, seq_len), dtype=torch.bool)
    for row, (p_ids, c_ids) in enumerate(batch):
        ids = list(p_ids) + list(c_ids)
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        token_mask[row, : len(ids)] = 1
        target_mask[row, len(p_ids) : len(ids)] = True

    extra: dict[str, Any] = dict(prefix_fn(batch_index, bsz) or {}) if prefix_fn is not None else {}
    prefix_len = extra.pop("prefix_len", None)
    prefix_mask = extra.pop("prefix_attention_mask", None)
    cache = extra.get("past_key_values")
    cache_len = None
    if cache is not None:
        if any(cache is c for c in seen_caches):
            raise ValueError(
                "prefix_fn returned the same past_key_values object for two batches; HF models extend "
                "caches in place, so prefix_fn must return a fresh cache for every call"
            )
        seen_caches.append(cache)
    if cache is not None and hasattr(cache, "get_seq_length"):
        cache_len = int(cache.get_seq_length())
    if prefix_len is None:
        prefix_len = cache_len if cache_len is not None else 0
    prefix_len = int(prefix_len)
    if prefix_len < 0:
        raise ValueError(f"prefix_len must be >= 0, got {prefix_len}")
    if cache_len is not None and cache_len != prefix_len:
        raise ValueError(
            f"past_key_values holds {cache_len} positions but prefix_len is {prefix_len}; HF models "
            "extend caches in place, so prefix_fn must return a fresh cache for every call"
        )
    if prefix_mask is None:
        prefix_mask = torch.ones((bsz, prefix_len), dtype=torch.long)
    else:
        prefix_mask = torch.as_tensor(prefix_mask).to(dtype=torch.long, device="cpu")
        if tuple(prefix_mask.shape) != (bsz, prefix_len):
            raise ValueError(
                f"prefix_attention_mask has shape {tuple(prefix_mask.shape)}, expected {(bsz, prefix_len)}"
            )
    attention_mask = torch.cat([prefix_mask, token_mask], dim=1)
    position_ids = (token_mask.cumsum(dim=1) - 1).clamp(min=0) + prefix_mask.sum(dim=1, keepdim=True)
    if "past_key_values" not in extra:
        extra.setdefault("use_cache", False)

    if forward_fn is not None:
        logits = _extract_logits(forward_fn(input_ids.to(device), token_mask.to(device), list(batch_index)))
    else:
        kwargs: dict[str, Any] = {
            "input_ids": input_ids.to(device),
            "attention_mask": attention_mask.to(device),
        }
        if pass_position_ids:
            kwargs["position_ids"] = position_ids.to(device)
        kwargs.update(extra)
        logits = _extract_logits(model(**kwargs))
    if logits.shape[1] == prefix_len + seq_len and prefix_len > 0:
        logits = logits[:, prefix_len:]
    if logits.shape[:2] != (bsz, seq_len):
        raise ValueError(f"model returned logits of shape {tuple(logits.shape)}, expected ({bsz}, {seq_len}, V)")

    # Position t predicts token t + 1.
    pred_mask = target_mask[:, 1:].to(logits.device)
    sel_logits = logits[:, :-1][pred_mask].float()  # (N, V), rows in (example, position) order
    sel_targets = input_ids[:, 1:].to(logits.device)[pred_mask]
    logprobs = torch.log_softmax(sel_logits, dim=-1).gather(1, sel_targets[:, None]).squeeze(1)
    predicted = sel_logits.argmax(dim=-1)
    counts = [len(c) for _, c in batch]
    results = []
    for tgt, lp, pr in zip(
        sel_targets.cpu().split(counts), logprobs.cpu().split(counts), predicted.cpu().split(counts)
    ):
        results.append(ContinuationStats(target_ids=tgt, logprobs=lp, predicted_ids=pr))
    return results


def score_token_ids(
    model: Any,
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    pad_token_id: int = 0,
    batch_size: int = 16,
    prefix_fn: PrefixFn | None = None,
    forward_fn: ForwardFn | None = None,
    pass_position_ids: bool = True,
) -> list[ContinuationStats]:
    """Teacher-forced statistics for pre-tokenised ``(prompt_ids, continuation_ids)`` pairs.

    The lower-level form of :func:`continuation_token_stats` (same batching, ``prefix_fn`` and
    ``forward_fn`` contracts); the hooks receive indices into ``sequences``. Set ``pass_position_ids=False``
    for models whose forward does not accept ``position_ids`` (they then see positions from 0 /
    from the cache length, which is only correct without a masked prefix).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if prefix_fn is not None and forward_fn is not None:
        raise ValueError("pass either prefix_fn or forward_fn, not both")
    for i, (p_ids, c_ids) in enumerate(sequences):
        if len(p_ids) == 0 or len(c_ids) == 0:
            raise ValueError(f"sequence {i}: prompt and continuation need at least one token each")
    device = _model_device(model)
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    results: list[ContinuationStats] = []
    seen_caches: list[Any] = []  # prefix caches already used in this call (reuse is an error)
    try:
        with torch.no_grad():
            for start in range(0, len(sequences), batch_size):
                idx = list(range(start, min(start + batch_size, len(sequences))))
                results.extend(
                    _score_batch(
                        model,
                        [sequences[i] for i in idx],
                        idx,
                        pad_id=pad_token_id,
                        device=device,
                        prefix_fn=prefix_fn,
                        forward_fn=forward_fn,
                        pass_position_ids=pass_position_ids,
                        seen_caches=seen_caches,
                    )
                )
    finally:
        if was_training and hasattr(model, "train"):
            model.train(True)
    return results


def continuation_token_stats(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    continuations: Sequence[str],
    *,
    batch_size: int = 16,
    prefix_fn: PrefixFn | None = None,
    forward_fn: ForwardFn | None = None,
) -> list[ContinuationStats]:
    """Per-token log-probabilities and teacher-forced argmax flags of each continuation.

    Args:
        model: a causal LM (``transformers`` ``*ForCausalLM`` or compatible).
        tokenizer: its tokenizer (a pad token is not required).
        prompts: prompt texts, without trailing space.
        continuations: continuation texts, with their leading space (``" Paris"``).
        batch_size: number of sequences per forward call.
        prefix_fn: optional prefix hook (see the module docstring).
        forward_fn: optional replacement of the model call (see the module docstring).

    Returns:
        One :class:`ContinuationStats` per pair, in input order (tensors on CPU). ``.accuracy`` is
        the ZsRE token accuracy, ``.nll`` the CounterFact mean NLL.
    """
    encoded = encode_continuations(tokenizer, prompts, continuations)
    return score_token_ids(
        model,
        encoded,
        pad_token_id=pad_token_id_for(tokenizer),
        batch_size=batch_size,
        prefix_fn=prefix_fn,
        forward_fn=forward_fn,
    )


def continuation_nll(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    continuations: Sequence[str],
    *,
    batch_size: int = 16,
    prefix_fn: PrefixFn | None = None,
    forward_fn: ForwardFn | None = None,
) -> torch.Tensor:
    """Mean NLL of each continuation's tokens given its prompt: a float32 tensor of shape ``(N,)``.

    ``exp(-nll)`` is the target probability used by ROME's CounterFact metrics. Arguments as in
    :func:`continuation_token_stats`.
    """
    stats = continuation_token_stats(
        model, tokenizer, prompts, continuations, batch_size=batch_size, prefix_fn=prefix_fn, forward_fn=forward_fn
    )
    if not stats:
        return torch.zeros(0, dtype=torch.float32)
    return torch.stack([-s.logprobs.mean() for s in stats]).to(torch.float32)
