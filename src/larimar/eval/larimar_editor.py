"""Larimar as a knowledge editor: the :class:`larimar.eval.editors.Editor` protocol around a model.

An edit writes the fact sentence ``"{prompt} {target_new}."`` to the episodic memory in one shot (no
gradient step); optionally ``n_rephrases`` paraphrases of the edit prompt are written as well, each
completed with the new target (the paper's "+1 / +2 rephrases" rows). Queries are answered by the
memory-conditioned decoder; with the scope detector on (default) queries that match no stored fact
take plain decoding (``use_memory="auto"``), without it every query reads memory
(``use_memory="always"``). Before the first edit every query uses plain decoding.

The editor configures the model it wraps in place: the options ``addressing``, ``scope_threshold``
and ``memory_size`` change ``model.config`` (and, for ``memory_size``, the reference memory M0, see
:func:`set_memory_size`) and empty the memory.

Importing this module registers the editor as ``"larimar"`` (idempotent), so that
``make_editor("larimar", larimar_model, larimar_model.tokenizer, scope_detector=False)`` works.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from larimar.eval.editors import EditRequest, available_editors, register_editor

if TYPE_CHECKING:  # pragma: no cover - typing only
    from larimar.eval.scoring import ContinuationStats
    from larimar.modeling.model import Larimar

__all__ = ["LarimarEditor", "make_larimar_editor", "register", "set_memory_size"]


def _with_space(text: str) -> str:
    return text if text[:1].isspace() else " " + text


def set_memory_size(model: "Larimar", memory_size: int, *, seed: int = 0) -> None:
    """Give ``model`` a reference memory of ``memory_size`` rows and empty its memory.

    The first rows of the current M0 are kept; missing rows are drawn like the model's own
    initialisation (``N(0, 1/C)``, from a generator seeded with ``seed``), so that a model trained
    with K rows can be evaluated with fewer or more. The original M0 is remembered on the model
    (``model._larimar_eval_m0``), so that resizing back returns exactly the trained rows.
    """
    if int(memory_size) <= 0:
        raise ValueError(f"memory_size must be positive, got {memory_size}")
    K = int(memory_size)
    original: torch.Tensor = getattr(model, "_larimar_eval_m0", None)  # type: ignore[assignment]
    if original is None:
        original = model.M0.detach().clone()
        model._larimar_eval_m0 = original  # type: ignore[attr-defined]
    K0, C = original.shape
    if K <= K0:
        rows = original[:K].clone()
    else:
        g = torch.Generator().manual_seed(int(seed))
        extra = torch.randn(K - K0, C, generator=g, dtype=torch.float32) / math.sqrt(C)
        rows = torch.cat([original, extra.to(original.dtype).to(original.device)])
    model.M0 = torch.nn.Parameter(rows, requires_grad=model.M0.requires_grad)
    model.config = model.config.replace(memory_size=K)
    model.reset_memory()


class LarimarEditor:
    """The :class:`~larimar.eval.editors.Editor` protocol for a :class:`~larimar.modeling.model.Larimar` model.

    Args:
        model: the Larimar model (its memory is emptied).
        tokenizer: ignored apart from a sanity check (the model's own tokenizer is used); accepted so
            that the editor fits ``make_editor(name, model, tokenizer, **hparams)``.
        scope_detector: route queries through the scope detector (``use_memory="auto"``); when
            False every query reads memory (``use_memory="always"``).
        n_rephrases: number of paraphrase prompts written to memory with each fact. They are passed
            to :meth:`edit` as ``rephrases``; the evaluation runner takes them from the case's
            paraphrase prompts and queries only paraphrases that were not written.
        fact_template: how a fact is written, with ``{prompt}``, ``{target_new}`` and optionally
            ``{subject}``.
        addressing: override ``LarimarConfig.addressing`` ("reference", "current", "gaussian").
        scope_threshold: override the scope detector's threshold.
        scope_lexical_weight: override the weight of lexical recall in the scope score (0: cosine only).
        memory_size: override K (see :func:`set_memory_size`).
        score_batch_size: sequences per decoder forward pass when scoring.
        keyed_writes: address each fact by its prompt's latent (see :meth:`Larimar.write`); default:
            the model config's ``keyed_writes``.
        value_writes: with keyed writes, store each fact's value (its text after the prompt) rather
            than the whole fact (see :meth:`Larimar.write_facts`); default: the model config's.
        write_batch_size: texts per encoder forward pass when writing.
        key_slots: the first write into an empty memory sets up *key slots*
            (:meth:`Larimar.key_slot_memory`): Gaussian addressing against the latents of that
            write's prompts, so each of up to K facts has a slot of its own. Later writes give new
            prompts the remaining free slots, then the nearest ones. Needs keyed writes.
        key_slot_alpha: bandwidth of the key slots' Gaussian addressing.
        key_slot_ridge: ridge λ of writes into key slots.
    """

    name = "larimar"

    def __init__(
        self,
        model: "Larimar",
        tokenizer: Any = None,
        *,
        scope_detector: bool = True,
        n_rephrases: int = 0,
        fact_template: str = "{prompt} {target_new}.",
        addressing: str | None = None,
        scope_threshold: float | None = None,
        scope_lexical_weight: float | None = None,
        memory_size: int | None = None,
        keyed_writes: bool | None = None,
        value_writes: bool | None = None,
        score_batch_size: int = 16,
        write_batch_size: int = 64,
        key_slots: bool = False,
        key_slot_alpha: float = 0.1,
        key_slot_ridge: float = 0.01,
    ) -> None:
        for attr in ("write", "score", "reset_memory", "route", "condition_prompts", "decoder", "tokenizer"):
            if not hasattr(model, attr):
                raise TypeError(f"larimar editor: model must be a Larimar model, got {type(model).__name__}")
        if tokenizer is not None and tokenizer is not model.tokenizer:
            raise ValueError("larimar editor: pass the Larimar model's own tokenizer (or None)")
        if not isinstance(scope_detector, bool):
            raise ValueError(f"larimar editor: scope_detector must be true or false, got {scope_detector!r}")
        if isinstance(n_rephrases, bool) or not isinstance(n_rephrases, int) or n_rephrases < 0:
            raise ValueError(f"larimar editor: n_rephrases must be an integer >= 0, got {n_rephrases!r}")
        if not isinstance(fact_template, str) or "{target_new}" not in fact_template:
            raise ValueError(f"larimar editor: fact_template must contain '{{target_new}}', got {fact_template!r}")
        try:
            fact_template.format(prompt="p", target_new="t", subject="s")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"larimar editor: bad fact_template {fact_template!r}: {exc}") from None
        for name, value in (("score_batch_size", score_batch_size), ("write_batch_size", write_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"larimar editor: {name} must be a positive integer, got {value!r}")
        self.model = model
        self.tokenizer = model.tokenizer
        self.scope_detector = scope_detector
        self.n_rephrases = n_rephrases
        self.fact_template = fact_template
        self.score_batch_size = score_batch_size
        self.write_batch_size = write_batch_size
        changes: dict[str, Any] = {}
        if addressing is not None:
            changes["addressing"] = addressing
        if scope_threshold is not None:
            changes["scope_threshold"] = float(scope_threshold)
        if scope_lexical_weight is not None:
            changes["scope_lexical_weight"] = float(scope_lexical_weight)
        for name, flag in (("keyed_writes", keyed_writes), ("value_writes", value_writes)):
            if flag is not None:
                if not isinstance(flag, bool):
                    raise ValueError(f"larimar editor: {name} must be true or false, got {flag!r}")
                changes[name] = flag
        if changes:
            model.config = model.config.replace(**changes)  # validates the values
            if "scope_threshold" in changes or "scope_lexical_weight" in changes:
                model.configure_scope()
        if memory_size is not None:
            set_memory_size(model, memory_size)
        if not isinstance(key_slots, bool):
            raise ValueError(f"larimar editor: key_slots must be true or false, got {key_slots!r}")
        if key_slots and not model.config.keyed_writes:
            raise ValueError("larimar editor: key_slots needs keyed writes (keyed_writes: true)")
        for name, value in (("key_slot_alpha", key_slot_alpha), ("key_slot_ridge", key_slot_ridge)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"larimar editor: {name} must be a positive number, got {value!r}")
        self.key_slots = key_slots
        self.key_slot_alpha = float(key_slot_alpha)
        self.key_slot_ridge = float(key_slot_ridge)
        self.requests: list[EditRequest] = []
        #: texts written to memory since the last reset, in order
        self.written: list[str] = []
        #: seconds spent in each ``edit`` call (for reporting)
        self.edit_seconds: list[float] = []
        model.reset_memory()

    # ------------------------------------------------------------------ helpers
    def fact_text(self, request: EditRequest, prompt: str | None = None) -> str:
        """The sentence written for ``request`` (with ``prompt`` replacing its rewrite prompt)."""
        return self.fact_template.format(
            prompt=request.prompt if prompt is None else prompt.rstrip(),
            target_new=request.target_new,
            subject=request.subject,
        )

    def use_memory(self) -> str:
        """The ``use_memory`` mode queries are scored with right now."""
        if len(self.model) == 0:
            return "never"
        return "auto" if self.scope_detector else "always"

    # ------------------------------------------------------------------ protocol
    def edit(
        self,
        requests: Sequence[EditRequest] | EditRequest,
        rephrases: Sequence[Sequence[str]] | None = None,
    ) -> None:
        """Write the facts of ``requests`` to memory (cumulative with earlier edits).

        Args:
            requests: one request or a list.
            rephrases: optional, one list of paraphrase prompts per request; the first
                ``n_rephrases`` of each are written as ``fact_template`` with the paraphrase in
                place of the prompt. Ignored when ``n_rephrases`` is 0.
        """
        if isinstance(requests, EditRequest):
            requests = [requests]
        reqs = list(requests)
        for r in reqs:
            if not isinstance(r, EditRequest):
                raise TypeError(f"edit() takes EditRequest objects, got {type(r).__name__}")
        if rephrases is not None and len(rephrases) != len(reqs):
            raise ValueError(f"edit(): {len(reqs)} requests but {len(rephrases)} rephrase lists")
        if not reqs:
            return
        t0 = time.perf_counter()
        texts = [self.fact_text(r) for r in reqs]
        prompts = [r.prompt for r in reqs]
        if rephrases is not None and self.n_rephrases > 0:
            for r, paras in zip(reqs, rephrases):
                for p in list(paras)[: self.n_rephrases]:
                    texts.append(self.fact_text(r, p))
                    prompts.append(p.rstrip())
        if self.key_slots and len(self.model) == 0:
            self.model.facts = self.model.key_slot_memory(
                prompts, gaussian_alpha=self.key_slot_alpha, ridge=self.key_slot_ridge, batch_size=self.write_batch_size
            )
        self.model.write_facts(texts, prompts, batch_size=self.write_batch_size)
        self.edit_seconds.append(time.perf_counter() - t0)
        self.requests.extend(reqs)
        self.written.extend(texts)

    def score(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> torch.Tensor:
        """``(Q, n_cand)`` mean NLL of each candidate (a leading space is added) after each prompt."""
        prompts = list(prompts)
        if len(prompts) != len(candidates):
            raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
        if not prompts:
            return torch.zeros((0, 0), dtype=torch.float32)
        cands = [[_with_space(c) for c in cs] for cs in candidates]
        nll = self.model.score(prompts, cands, use_memory=self.use_memory(), batch_size=self.score_batch_size)
        return nll.to(torch.float32)

    def token_stats(self, prompts: Sequence[str], targets: Sequence[str]) -> list["ContinuationStats"]:
        """Teacher-forced per-token statistics of each target (leading space added) after its prompt.

        Routing and conditioning are those of :meth:`score` (so ``stats[i].nll`` equals the
        corresponding score); ``stats[i].correct`` are the argmax flags behind ZsRE accuracy.
        """
        prompts = list(prompts)
        targets = [_with_space(t) for t in targets]
        if len(prompts) != len(targets):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
        if not prompts:
            return []
        return self.model.token_stats(prompts, targets, use_memory=self.use_memory(), batch_size=self.score_batch_size)

    def memory_routing(self, prompts: Sequence[str]) -> list[bool]:
        """Whether each prompt is answered from memory right now (scope detector / mode), for reports."""
        prompts = list(prompts)
        if not prompts:
            return []
        mask, _ = self.model.route(prompts, self.use_memory())
        return [bool(x) for x in mask.tolist()]

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 20) -> list[str]:
        """Greedy continuation of each prompt (new text only)."""
        prompts = list(prompts)
        if not prompts:
            return []
        return list(self.model.generate(prompts, max_new_tokens=max_new_tokens, use_memory=self.use_memory()))

    def reset(self) -> None:
        """Empty the memory (the decoder and adapter are never changed)."""
        self.model.reset_memory()
        self.requests = []
        self.written = []

    def set_memory_size(self, memory_size: int) -> None:
        """Change K (see :func:`set_memory_size`); empties the memory."""
        set_memory_size(self.model, memory_size)
        self.reset()

    def __repr__(self) -> str:
        return (
            f"LarimarEditor(scope_detector={self.scope_detector}, n_rephrases={self.n_rephrases}, "
            f"addressing={self.model.config.addressing!r}, key_slots={self.key_slots}, K={self.model.config.memory_size}, "
            f"facts={len(self.model)})"
        )


def make_larimar_editor(model: "Larimar", tokenizer: Any = None, **hparams: Any) -> LarimarEditor:
    """Factory for the editor registry (``make_editor("larimar", model, tokenizer, **hparams)``)."""
    import inspect

    allowed = set(inspect.signature(LarimarEditor.__init__).parameters) - {"self", "model", "tokenizer"}
    unknown = sorted(set(hparams) - allowed)
    if unknown:
        raise ValueError(f"larimar editor: unknown hyper-parameters {unknown}; known: {sorted(allowed)}")
    return LarimarEditor(model, tokenizer, **hparams)


def register() -> None:
    """Register the editor as ``"larimar"`` unless an editor of that name exists already."""
    if "larimar" not in available_editors():
        register_editor("larimar", make_larimar_editor)


register()
