"""Shared machinery of the weight- and activation-editing baselines.

* :func:`locate_mlp_out` finds the MLP *output projection* of decoder layer ``i`` (the matrix ROME
  and FT-L edit and GRACE wraps) for GPT-2 / GPT-J (``transformer.h[i].mlp.c_proj`` / ``fc_out``),
  Llama-style models (``model.layers[i].mlp.down_proj``: Llama, Mistral, Qwen2, SmolLM2, ...),
  GPT-NeoX (``gpt_neox.layers[i].mlp.dense_4h_to_h``) and OPT (``model.decoder.layers[i].fc2``),
  and hides the weight orientation: GPT-2's ``Conv1D`` stores ``(in, out)`` while ``nn.Linear``
  stores ``(out, in)``. :class:`MLPOutProj` always exposes the ``(out, in)`` matrix ``W`` of
  ``y = W k + b``.
* :func:`subject_last_token` finds the subject's last token in a tokenised prompt (character offsets
  when the tokenizer is a fast one, prefix tokenisation otherwise), robust to leading-space token
  variants (``"ĠDan"`` vs ``"Dan"``).
* :class:`WeightSnapshot` keeps bit-exact copies of parameters for ``reset()``.
* :func:`encode_targets` / :func:`target_nll` build right-padded teacher-forced batches and their
  per-row mean target NLL for training objectives (same tokenisation rule as
  :func:`larimar.eval.scoring.encode_continuations`).
* :func:`greedy_generate` is a small greedy decoder (optionally without KV cache, for hooks that need
  to see the whole sequence).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "LMBatch",
    "MLPOutProj",
    "WeightSnapshot",
    "encode_targets",
    "find_subject",
    "forward_logits",
    "greedy_generate",
    "hparams_from_dict",
    "layer_list",
    "locate_mlp_out",
    "max_positions",
    "model_device",
    "model_id",
    "subject_last_token",
    "target_nll",
]

# (path of the decoder-layer list, candidate paths of the MLP output projection inside a layer)
_FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("transformer.h", ("mlp.c_proj", "mlp.fc_out")),  # GPT-2 (Conv1D), GPT-J (Linear)
    ("model.layers", ("mlp.down_proj",)),  # Llama, Mistral, Qwen2, Gemma, Phi-3, SmolLM2
    ("gpt_neox.layers", ("mlp.dense_4h_to_h",)),  # GPT-NeoX / Pythia
    ("model.decoder.layers", ("fc2",)),  # OPT
)


def _get_attr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", None) or type(model).__name__)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless module)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def model_id(model: nn.Module) -> str:
    """A file-name-safe identifier of a model: the last component of ``config._name_or_path``
    (e.g. ``"smollm2-135m-instruct-f32"``), else the model type plus a shape signature."""
    config = getattr(model, "config", None)
    name = str(getattr(config, "_name_or_path", "") or "").rstrip("/\\")
    base = name.replace("\\", "/").split("/")[-1] if name else ""
    if not base:
        n_params = sum(p.numel() for p in model.parameters())
        base = f"{_model_type(model)}-{n_params}p"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in base)


def max_positions(model: nn.Module, default: int = 1 << 30) -> int:
    """The model's maximum sequence length (``n_positions`` / ``max_position_embeddings``)."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        val = getattr(config, attr, None)
        if isinstance(val, int) and val > 0:
            return val
    return default


def layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(path, layers)``: the decoder-layer ``ModuleList`` of a supported causal LM.

    Raises:
        ValueError: the model is not of a supported family (message names the model type).
    """
    for path, _ in _FAMILIES:
        layers = _get_attr_path(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return path, layers
    raise ValueError(
        f"cannot locate the decoder layers of model type {_model_type(model)!r} "
        f"({type(model).__name__}); supported: GPT-2/GPT-J (transformer.h), Llama-style "
        "(model.layers), GPT-NeoX (gpt_neox.layers), OPT (model.decoder.layers)"
    )


@dataclass(frozen=True)
class MLPOutProj:
    """The MLP output projection of one decoder layer, ``y = W k + b``.

    Attributes:
        module: the ``nn.Linear`` or GPT-2 ``Conv1D`` module.
        name: its dotted path in the model (e.g. ``"model.layers.6.mlp.down_proj"``).
        layer: the decoder-layer index.
        transposed: True when the stored weight is ``(in, out)`` (GPT-2 ``Conv1D``).
    """

    module: nn.Module
    name: str
    layer: int
    transposed: bool

    @property
    def weight(self) -> nn.Parameter:
        """The stored weight parameter: ``(out, in)`` for Linear, ``(in, out)`` for Conv1D."""
        return self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """``(out,)`` bias or None."""
        return getattr(self.module, "bias", None)

    @property
    def in_features(self) -> int:
        """Key dimension (MLP hidden size, e.g. 1536 for SmolLM2-135M)."""
        return int(self.weight.shape[0] if self.transposed else self.weight.shape[1])

    @property
    def out_features(self) -> int:
        """Value dimension (model width, e.g. 576 for SmolLM2-135M)."""
        return int(self.weight.shape[1] if self.transposed else self.weight.shape[0])

    def matrix(self) -> torch.Tensor:
        """``W`` as an ``(out, in)`` view of the weight (no copy)."""
        return self.weight.T if self.transposed else self.weight

    def add_(self, delta: torch.Tensor) -> None:
        """In place ``W += delta`` for an ``(out, in)`` ``delta`` (orientation handled)."""
        if tuple(delta.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"update has shape {tuple(delta.shape)}, expected (out, in) = "
                f"({self.out_features}, {self.in_features})"
            )
        with torch.no_grad():
            w = self.weight
            w.add_((delta.T if self.transposed else delta).to(device=w.device, dtype=w.dtype))

    def apply(self, keys: torch.Tensor) -> torch.Tensor:
        """``W k + b`` for keys ``(..., in)`` -> ``(..., out)`` in float32 (no autograd)."""
        with torch.no_grad():
            w = self.matrix().float()
            out = keys.float().to(w.device) @ w.T
            if self.bias is not None:
                out = out + self.bias.float()
        return out


def _is_projection(module: Any) -> tuple[bool, bool]:
    """``(is_supported, transposed)`` for a candidate projection module."""
    if isinstance(module, nn.Linear):
        return True, False
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        Conv1D = ()  # type: ignore[assignment]  # noqa: N806
    if Conv1D and isinstance(module, Conv1D):
        return True, True
    return False, False


def locate_mlp_out(model: nn.Module, layer: int) -> MLPOutProj:
    """Find the MLP output projection of decoder layer ``layer``.

    Args:
        model: a GPT-2 / GPT-J / Llama-style / GPT-NeoX / OPT causal LM (``*ForCausalLM``).
        layer: the layer index, ``0 <= layer < n_layers``.

    Raises:
        ValueError: unsupported model family (the message names the model type), or ``layer`` out
            of range.
    """
    path, layers = layer_list(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(layers):
        raise ValueError(f"layer must be an int in [0, {len(layers)}), got {layer!r}")
    family_candidates = dict(_FAMILIES)[path]
    block = layers[layer]
    for cand in family_candidates:
        module = _get_attr_path(block, cand)
        if module is None:
            continue
        ok, transposed = _is_projection(module)
        if ok:
            return MLPOutProj(module=module, name=f"{path}.{layer}.{cand}", layer=layer, transposed=transposed)
    raise ValueError(
        f"model type {_model_type(model)!r} ({type(model).__name__}): layer {layer} has none of "
        f"{list(family_candidates)} as an nn.Linear/Conv1D MLP output projection"
    )


# --------------------------------------------------------------------------------------------
# Subject token
# --------------------------------------------------------------------------------------------


def find_subject(text: str, subject: str, start: int = 0) -> tuple[int, int]:
    """Character span ``[a, b)`` of the first occurrence of ``subject`` in ``text[start:]``.

    Tries the exact subject, then its stripped form, then a case-insensitive match.

    Raises:
        ValueError: the subject does not occur.
    """
    for cand in dict.fromkeys((subject, subject.strip())):
        if not cand:
            continue
        pos = text.find(cand, start)
        if pos >= 0:
            return pos, pos + len(cand)
    stripped = subject.strip()
    if stripped:
        pos = text.lower().find(stripped.lower(), start)
        if pos >= 0:
            return pos, pos + len(stripped)
    raise ValueError(f"subject {subject!r} does not occur in {text[start:]!r}")


def subject_last_token(tokenizer: Any, text: str, subject: str, *, start_char: int = 0) -> int:
    """Index (into ``tokenizer(text)["input_ids"]``, special tokens included) of the last token
    that overlaps the subject's first occurrence at or after ``start_char``.

    Fast tokenizers: character offsets (a token ``"ĠDarrieux"`` whose span includes the leading
    space still overlaps the subject). Slow tokenizers: the number of tokens of the text up to the
    subject's end, minus one (ROME's rule), adjusted for trailing special tokens.

    Raises:
        ValueError: the subject does not occur in ``text``, or no token overlaps it.
    """
    a, b = find_subject(text, subject, start_char)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        last = -1
        for i, (s, e) in enumerate(enc["offset_mapping"]):
            if e > s and s < b and e > a:
                last = i
        if last < 0:
            raise ValueError(f"no token of {text!r} overlaps the subject {subject!r}")
        return last
    ids_full = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    ids_pre = list(tokenizer(text[:b], add_special_tokens=True)["input_ids"])
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    while ids_pre and ids_pre[-1] in specials and len(ids_pre) > 1:
        ids_pre = ids_pre[:-1]
    return min(len(ids_pre), len(ids_full)) - 1


# --------------------------------------------------------------------------------------------
# Weight snapshots
# --------------------------------------------------------------------------------------------


class WeightSnapshot:
    """Bit-exact copies of some parameters, restorable in place.

    Args:
        params: ``{name: parameter}``; each is cloned (same dtype and device).
    """

    def __init__(self, params: Mapping[str, torch.Tensor]) -> None:
        self._params = dict(params)
        self._copies = {k: p.detach().clone() for k, p in self._params.items()}

    def restore(self) -> None:
        """Copy the saved values back into the parameters (in place, no autograd)."""
        with torch.no_grad():
            for k, p in self._params.items():
                p.copy_(self._copies[k])

    def names(self) -> list[str]:
        """Names of the saved parameters."""
        return list(self._params)


# --------------------------------------------------------------------------------------------
# Training batches
# --------------------------------------------------------------------------------------------


@dataclass
class LMBatch:
    """A right-padded teacher-forced batch of ``prompt + target`` sequences.

    With ``T`` the padded input length:

    Attributes:
        input_ids: ``(B, T)`` long, the model input (``prompt + target``, possibly without the last
            target token, which is only predicted).
        attention_mask: ``(B, T)`` long (1 = real token).
        full_ids: ``(B, T + 1)`` long, the complete ``prompt + target`` sequences (right-padded).
        target_mask: ``(B, T + 1)`` bool, True at the positions of target tokens in ``full_ids``.
        prompt_lens: number of prompt tokens of each row (special tokens included).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    full_ids: torch.Tensor
    target_mask: torch.Tensor
    prompt_lens: list[int]

    def to(self, device: torch.device) -> LMBatch:
        """Move the tensors to ``device``."""
        return LMBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.full_ids.to(device),
            self.target_mask.to(device),
            self.prompt_lens,
        )


def encode_targets(
    tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], *, drop_last_target: bool = True
) -> LMBatch:
    """Tokenise ``(prompt, " " + target)`` pairs into a right-padded batch.

    ``targets`` are given *without* a leading space (one is added unless present). Tokenisation
    follows :func:`larimar.eval.scoring.encode_continuations`. With ``drop_last_target`` the last
    target token is not fed as input (it is only predicted), saving one position.
    """
    from larimar.eval.scoring import encode_continuations, pad_token_id_for

    conts = [t if t[:1].isspace() else " " + t for t in targets]
    pairs = encode_continuations(tokenizer, list(prompts), conts)
    seqs = [list(p) + list(c) for p, c in pairs]
    inputs = [s[:-1] if drop_last_target else s for s in seqs]
    t_max = max(len(x) for x in inputs)
    pad = pad_token_id_for(tokenizer)
    bsz = len(seqs)
    input_ids = torch.full((bsz, t_max), pad, dtype=torch.long)
    attention = torch.zeros((bsz, t_max), dtype=torch.long)
    full_ids = torch.full((bsz, t_max + 1), pad, dtype=torch.long)
    target_mask = torch.zeros((bsz, t_max + 1), dtype=torch.bool)
    for r, ((p_ids, _), seq, inp) in enumerate(zip(pairs, seqs, inputs)):
        input_ids[r, : len(inp)] = torch.tensor(inp, dtype=torch.long)
        attention[r, : len(inp)] = 1
        full_ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        target_mask[r, len(p_ids) : len(seq)] = True
    return LMBatch(input_ids, attention, full_ids, target_mask, [len(p) for p, _ in pairs])


def target_nll(logits: torch.Tensor, batch: LMBatch) -> torch.Tensor:
    """Mean NLL of each row's target tokens: ``(B,)`` float32, differentiable.

    ``logits`` is ``(B, T, V)`` for ``batch.input_ids``; position ``t`` predicts token ``t + 1``.
    """
    t_in = batch.input_ids.shape[1]
    mask = batch.target_mask[:, 1 : t_in + 1].to(logits.device)
    targets = batch.full_ids[:, 1 : t_in + 1].to(logits.device)
    logp = torch.log_softmax(logits[:, :t_in].float(), dim=-1)
    tok_lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    tok_lp = torch.where(mask, tok_lp, torch.zeros_like(tok_lp))
    counts = mask.sum(dim=1).clamp(min=1)
    return -(tok_lp.sum(dim=1) / counts)


def forward_logits(model: nn.Module, batch: LMBatch) -> torch.Tensor:
    """Run ``model`` on a right-padded batch (no cache) and return ``(B, T, V)`` logits."""
    device = model_device(model)
    out = model(
        input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False
    )
    return out.logits if hasattr(out, "logits") else out[0]


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def greedy_generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 20,
    *,
    use_cache: bool = True,
    before_forward: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Greedy decoding, one prompt at a time; returns only the generated text of each prompt.

    Args:
        use_cache: reuse the KV cache between steps; with False the whole sequence is re-run at
            every step (needed by hooks that look at a fixed position of the sequence).
        before_forward: optional ``f(prompt_index, n_prompt_tokens)`` called before every forward
            pass (lets an editor set per-sequence hook state).

    Stops at ``max_new_tokens`` or at the tokenizer's EOS token.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    device = model_device(model)
    eos = getattr(tokenizer, "eos_token_id", None)
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    was_training = model.training
    model.eval()
    results: list[str] = []
    try:
        with torch.no_grad():
            for qi, prompt in enumerate(prompts):
                ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
                n_prompt = len(ids)
                if n_prompt == 0:
                    raise ValueError(f"prompt {qi} ({prompt!r}) has no tokens")
                new: list[int] = []
                past = None
                for _ in range(max_new_tokens):
                    if before_forward is not None:
                        before_forward(qi, n_prompt)
                    if use_cache and past is not None:
                        inp = torch.tensor([[ids[-1]]], device=device)
                        out = model(input_ids=inp, past_key_values=past, use_cache=True)
                    else:
                        inp = torch.tensor([ids], device=device)
                        out = model(input_ids=inp, use_cache=use_cache)
                    past = getattr(out, "past_key_values", None) if use_cache else None
                    nxt = int(out.logits[0, -1].argmax())
                    if nxt in eos_ids:
                        break
                    ids.append(nxt)
                    new.append(nxt)
                results.append(tokenizer.decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return results


# --------------------------------------------------------------------------------------------
# Hyper-parameters
# --------------------------------------------------------------------------------------------


def hparams_from_dict(cls: type, method: str, values: Mapping[str, Any] | None) -> Any:
    """Build the hyper-parameter dataclass ``cls`` from ``values`` (unknown keys are an error).

    Raises:
        ValueError: an unknown key (the message lists the valid ones), or a value rejected by the
            dataclass's ``__post_init__``.
    """
    values = dict(values or {})
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{method}: unknown hyper-parameter(s) {unknown}; valid: {sorted(fields)}")
    return cls(**values)


def check(cond: bool, method: str, message: str) -> None:
    """Raise ``ValueError(f"{method}: {message}")`` unless ``cond``."""
    if not cond:
        raise ValueError(f"{method}: {message}")


def as_list(values: Iterable[Any]) -> list[Any]:
    """``list(values)`` (helper for YAML sequences that may arrive as tuples)."""
    return list(values)
