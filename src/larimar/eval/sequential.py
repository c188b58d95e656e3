"""Sequential editing (paper Table 3): ZsRE facts written one at a time, edit retention vs writes.

Protocol (``larimar eval sequential``)
--------------------------------------
* Facts: the first ``n`` usable ZsRE cases (non-empty ``alt``) of ``--data`` (default
  ``zsre_mend_eval-600.json``), topped up from ``--extra-data`` (default ``zsre_mend_train-1k.json``)
  when ``n`` exceeds what the first file holds: the paper's N = 1000 is 600 evaluation + the first
  400 usable training questions. Case ids are prefixed with the file stem (``zsre_mend_eval-600:17``).
* Fact ``i`` is written as ``"{src} {alt}."`` and queried with ``src``; its answer is ``alt``.
* Larimar: memory of ``K = --memory-size`` slots (default 1000) with a *fixed reference memory* made of
  the encodings of the first ``K`` question prompts of the fact pool
  (:func:`reference_memory`: :func:`larimar.memory.reference_from_encodings`, rescaled to the trained
  M0's row norm; the pool continues past the ``n`` written facts when
  ``n < K``; when the pool is smaller than ``K``, ``K`` shrinks to it, with a warning) and
  pseudo-inverse addressing ``w = z M_ref^†``. With ``--addressing gaussian`` the reference rows are
  the raw prompt encodings (:func:`key_slot_reference`) and addressing is Gaussian (Eq. 7–8), so a
  fact queried with its own prompt reads its own slot (*key slots*; see :class:`MemoryOptions`). Facts are written
  one by one with the exact sequential update of Eq. 4 (:meth:`larimar.memory.MemoryState.write`), and
  every query reads memory (``use_memory="always"``: the scope detector is not involved).
* GRACE (``make_editor("grace", ...)`` on the same decoder) edits the same sequence one fact at a time.
* Checkpoints every ``--eval-every`` writes and after the last one: every written fact so far (or a
  fixed-seed sample of ``--eval-max`` of them) is queried with greedy generation of as many tokens
  as its target has (``" " + target``; ``--max-new-tokens`` fixes one number for all), so that
  what a method generates *after* a correct answer is not scored; the score of a fact is the SQuAD
  token F1
  (:func:`larimar.eval.metrics.token_f1`) between :func:`first_answer` of the generation (first
  non-empty line, cut at the first sentence end) and the target. ERR (edit retention rate) is the mean
  F1 over all facts after the last write (a fraction in [0, 1], as in the paper's Table 3).

Output directory::

    DIR/config.yaml                       run configuration (a different one refuses to resume)
    DIR/<method>/progress.json            writes done, curve points so far, write seconds
    DIR/<method>/snapshot-<writes>/       memory (Larimar: model.save_memory) or codebook (GRACE)
    DIR/summary.json                      {"n", "K", "err", "curve": [[writes, mean_f1], ...],
                                           "seconds_per_write", "grace": {"n", "err", "curve", ...}}
    DIR/summary.md, DIR/curve.png

Interrupting a run loses at most the writes since the last snapshot (every checkpoint, and every
``--save-every`` writes between them); the next run with the same
options continues from the snapshot (its fact texts are checked against the expected sequence).

The second half of this module holds helpers shared by the other experiment modules (forget,
leakage, rephrase, long context, robustness): answer extraction, generation from given read-outs,
fresh memories with a chosen reference, the resumable write stream and figure saving.

Heavy packages (torch, transformers) are imported inside the functions, so that building the
command-line parser stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import re
import shutil
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from larimar.modeling.config import MODEL_HELP

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from larimar.eval.data import EditCase
    from larimar.modeling.model import Larimar

log = logging.getLogger(__name__)

__all__ = [
    "LarimarStream",
    "GraceStream",
    "StreamSystem",
    "add_arguments",
    "answer_by_length",
    "batched_generate",
    "contains_answer",
    "encode_latents",
    "reference_memory",
    "key_slot_reference",
    "MemoryOptions",
    "add_memory_arguments",
    "memory_options",
    "first_answer",
    "fresh_memory",
    "generate_from_latents",
    "load_sequential_cases",
    "markdown_table",
    "run",
    "run_sequential",
    "run_stream",
    "save_figure",
    "score_from_latents",
    "stream_checkpoints",
    "target_token_counts",
]

METHODS: tuple[str, ...] = ("larimar", "grace")
PROGRESS_FILE = "progress.json"
SNAPSHOT_PREFIX = "snapshot-"


# ============================================================================================
# Helpers shared by the experiment modules
# ============================================================================================


def first_answer(text: str) -> str:
    """The answer part of a generated continuation: its first non-empty line, cut before the first
    sentence end (``.``, ``!`` or ``?`` followed by white space or the end of the line).

    ``" Paris.\\n\\nThe answer is:"`` -> ``"Paris"``; ``"  \\n1998 and 2000"`` -> ``"1998 and 2000"``.
    """
    for line in text.splitlines():
        line = line.strip()
        if line:
            m = re.search(r"[.!?](?=\s|$)", line)
            return line[: m.start()].strip() if m else line
    return ""


def contains_answer(text: str, target: str) -> bool:
    """Whether ``target`` occurs in ``text`` as whole words after SQuAD normalisation
    (lower case, no punctuation or articles): ``contains_answer("It is in Paris, France", "paris")``."""
    from larimar.eval.metrics import normalize_answer

    t = normalize_answer(target)
    return bool(t) and f" {t} " in f" {normalize_answer(text)} "


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (the report module's table writer)."""
    from larimar.eval.report import _table

    return _table(list(header), [list(r) for r in rows])


def save_figure(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Save a matplotlib figure as PNG atomically (temporary file + ``os.replace``) and close it."""
    import matplotlib.pyplot as plt

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def batched_generate(
    model: "Larimar",
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    use_memory: str = "always",
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    release_after_answer: bool = False,
    stop_after_answer: bool = False,
) -> list[str]:
    """``model.generate`` over ``prompts`` in batches of ``batch_size`` (left-padded, new text only).

    With sampling, batch ``b`` uses the seed ``seed + b`` so the result does not depend on what ran
    before.
    """
    prompts = list(prompts)
    out: list[str] = []
    for b, i in enumerate(range(0, len(prompts), batch_size)):
        out += model.generate(
            prompts[i : i + batch_size],
            max_new_tokens=max_new_tokens,
            use_memory=use_memory,  # type: ignore[arg-type]
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            seed=None if seed is None else int(seed) + b,
            release_after_answer=release_after_answer,
            stop_after_answer=stop_after_answer,
        )
    return out


def encode_latents(model: "Larimar", texts: Sequence[str], batch_size: int = 64) -> "torch.Tensor":
    """``(N, C)`` encoder latents of ``texts`` in the memory dtype (float64), no gradient."""
    import torch

    with torch.no_grad():
        return model.encoder(list(texts), batch_size=batch_size).detach().to(model.memory_dtype)


def reference_memory(model: "Larimar", texts: Sequence[str], K: int) -> "torch.Tensor":
    """A fixed reference memory (K, C) from the encodings of ``texts``
    (:func:`larimar.memory.reference_from_encodings`), its rows rescaled to the mean row norm of the
    model's trained M0.

    The ridge λ of a write is absolute, so it acts relative to the scale of the addressing weights,
    and those scale inversely with the reference rows. Raw MiniLM encodings have rows about 6x longer
    than the shipped M0's, which shrinks every read-out towards zero (measured: plain "\\n\\n" answers
    for 1000 ZsRE facts). The rescaling keeps the scale the adapter was trained with.
    """
    from larimar.memory import reference_from_encodings

    ref = reference_from_encodings(encode_latents(model, texts), K)
    target = model.M0.detach().float().norm(dim=-1).mean()
    return ref * (target / ref.float().norm(dim=-1).mean().clamp_min(1e-12)).to(ref.dtype)


def key_slot_reference(model: "Larimar", prompts: Sequence[str], K: int) -> "torch.Tensor":
    """A reference memory ``(K, C)`` whose rows are the *raw* encodings of the first ``K`` prompts
    (:meth:`Larimar.key_slot_reference`: far sentinel rows when there are fewer), for Gaussian
    addressing: a query equal to one of these prompts is at distance ~0 from its row, so its
    weights are one-hot on that slot (its own *key slot*), and each of up to ``K`` facts keyed by
    these prompts is stored in a slot of its own. Not rescaled (unlike :func:`reference_memory`):
    Gaussian weights sum to one whatever the scale, and rescaling would move the rows off the queries.
    """
    return model.key_slot_reference(list(prompts[:K]), memory_size=K, batch_size=64)


@dataclass(frozen=True)
class MemoryOptions:
    """How an experiment builds Larimar's memory.

    ``addressing="reference"`` (the default, the paper's): pseudo-inverse addressing against a fixed
    reference memory (the trained M0, or the rescaled prompt encodings of :func:`reference_memory`),
    ridge ``λ`` = the config's. Keys then live in a C-dimensional space, so a linear memory separates
    at most ``C`` keys (C = 384 for the shipped model): past that, facts overlap.

    ``addressing="gaussian"``: *key slots*. The reference rows are the raw encodings of the prompts
    of the fact pool (:func:`key_slot_reference`) and addressing is Gaussian (paper Eq. 7–8) with
    bandwidth ``gaussian_alpha``. A fact queried with its own prompt reads its own slot, so up to
    ``K`` facts are stored without overlap. The weights are then (close to) one-hot, and a write with
    ridge ``λ`` stores ``z / (1 + λ)`` in the slot, so the ridge defaults to ``0.01`` (the config's
    ``λ = 1`` would halve every read-out).
    """

    addressing: str = "reference"
    gaussian_alpha: float = 0.1
    ridge: float | None = None

    def __post_init__(self) -> None:
        if self.addressing not in ("reference", "gaussian"):
            raise ValueError(f"addressing must be 'reference' or 'gaussian', got {self.addressing!r}")
        if not (self.gaussian_alpha > 0):
            raise ValueError(f"gaussian_alpha must be > 0, got {self.gaussian_alpha}")
        if self.ridge is not None and not (self.ridge > 0):
            raise ValueError(f"ridge must be > 0, got {self.ridge}")

    @property
    def key_slots(self) -> bool:
        return self.addressing == "gaussian"

    def ridge_for(self, model: "Larimar") -> float:
        """``λ`` of the writes: the given one, else 0.01 with key slots, else the model config's."""
        if self.ridge is not None:
            return float(self.ridge)
        return 0.01 if self.key_slots else float(model.config.ridge)

    def reference(self, model: "Larimar", prompts: Sequence[str], K: int) -> "torch.Tensor":
        """The fixed reference memory ``(K, C)`` built from ``prompts`` (see the class docstring)."""
        if self.key_slots:
            return key_slot_reference(model, prompts, K)
        return reference_memory(model, prompts, K)

    def describe(self, model: "Larimar") -> dict[str, Any]:
        """The options as they enter a run's configuration (so a changed option refuses to resume)."""
        out: dict[str, Any] = {"addressing": self.addressing, "ridge": self.ridge_for(model)}
        if self.key_slots:
            out["gaussian_alpha"] = float(self.gaussian_alpha)
        return out


def add_memory_arguments(p: argparse.ArgumentParser) -> None:
    """``--addressing``, ``--gaussian-alpha``, ``--ridge`` (see :class:`MemoryOptions`)."""
    p.add_argument("--addressing", choices=("reference", "gaussian"), default="reference",
                   help="reference: pseudo-inverse addressing, the paper's (default); gaussian: key slots, "
                        "reference rows = the prompts' encodings, Gaussian addressing (Eq. 7-8)")
    p.add_argument("--gaussian-alpha", type=float, default=0.1, help="bandwidth of Gaussian addressing (default 0.1)")
    p.add_argument("--ridge", type=float, default=None,
                   help="ridge lambda of the writes (default: 0.01 with --addressing gaussian, else the model's)")


def memory_options(args: argparse.Namespace) -> MemoryOptions:
    return MemoryOptions(addressing=args.addressing, gaussian_alpha=args.gaussian_alpha, ridge=args.ridge)


def fresh_memory(
    model: "Larimar",
    M_ref: "torch.Tensor | None" = None,
    *,
    addressing: str | None = None,
    gaussian_alpha: float | None = None,
    ridge: float | None = None,
    zero_prior: bool = False,
) -> None:
    """Give ``model`` an empty memory with reference ``M_ref (K, C)`` (default: the model's M0; its
    rows are widened to the model's memory rows by :meth:`Larimar.memory_rows`),
    addressing mode ``addressing`` (default: the config's) and ridge ``ridge`` (default: the
    config's); the prior follows ``config.memory_prior`` as in :meth:`Larimar.empty_memory`, or is
    zero with ``zero_prior`` (key slots, whose reference rows are encodings, not a prior memory). The
    scope detector's keys are cleared.
    """
    from larimar.editing.store import FactMemory
    from larimar.memory import MemoryState

    cfg = model.config
    ref = model.memory_rows((model.M0.detach() if M_ref is None else M_ref).to(model.memory_dtype))  # (K, memory width)
    state = MemoryState.init(
        ref,
        lam=cfg.ridge if ridge is None else float(ridge),
        M_prior=None if zero_prior or cfg.memory_prior == "zero" else ref,
        addressing=addressing or cfg.addressing,
        gaussian_alpha=cfg.gaussian_alpha if gaussian_alpha is None else float(gaussian_alpha),
    )
    model.facts = FactMemory(state)


def generate_from_latents(
    model: "Larimar",
    prompts: Sequence[str],
    z: "torch.Tensor",
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> list[str]:
    """Decode ``prompts`` conditioned on given memory read-outs ``z (Q, C)`` (one per prompt), as
    :meth:`Larimar.generate` does after its own read — for read-outs computed elsewhere (noisy reads,
    hierarchical reads). Returns the new text of each prompt."""
    import torch

    prompts = list(prompts)
    if z.shape[0] != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {z.shape[0]} read-outs")
    tok = model.tokenizer
    with torch.no_grad():
        ids, att = model._tokenize_prompts(prompts, "left")
        q = model.encoder(prompts).to(dtype=model.M0.dtype)  # the prompts' own latents (read by the output offset)
        cond = model.conditioning(z.to(device=model.device, dtype=model.M0.dtype), q)
        gen = torch.Generator(device=model.device).manual_seed(int(seed)) if seed is not None else None
        new = model.runner.generate(
            ids,
            att,
            cond,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            generator=gen,
        )
    return [tok.decode(row, skip_special_tokens=True) for row in new]


def score_from_latents(
    model: "Larimar",
    prompts: Sequence[str],
    continuations: Sequence[str],
    z: "torch.Tensor",
    *,
    batch_size: int = 16,
) -> "torch.Tensor":
    """``(N,)`` mean NLL of each continuation (leading space included) after its prompt, with the
    decoder conditioned on the read-out ``z[i]`` (``z: (N, C)``)."""
    import torch

    from larimar.eval.scoring import continuation_nll

    prompts = list(prompts)
    if z.shape[0] != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {z.shape[0]} read-outs")
    with torch.no_grad():
        q = model.encoder(prompts).to(dtype=model.M0.dtype)  # the prompts' own latents (read by the output offset)
        cond = model.conditioning(z.to(device=model.device, dtype=model.M0.dtype), q)

        def forward(input_ids, attention_mask, batch_index):  # noqa: ANN001, ANN202
            return model.runner.forward(input_ids, attention_mask, cond.select(batch_index)).logits

        return continuation_nll(
            model.decoder, model.tokenizer, prompts, list(continuations), batch_size=batch_size, forward_fn=forward
        )


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


# --------------------------------------------------------------------------------------------
# The resumable write stream
# --------------------------------------------------------------------------------------------


class StreamSystem(Protocol):
    """An editable system that receives a fixed sequence of edits one at a time.

    ``write(i)`` applies edit ``i`` of the sequence; ``save`` / ``load`` persist the state after the
    first ``count`` edits (``load`` raises ``ValueError`` when the saved state holds anything else).
    """

    name: str

    def reset(self) -> None: ...

    def write(self, index: int) -> None: ...

    def answer(self, prompts: list[str], max_new_tokens: int) -> list[str]: ...

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path, count: int) -> None: ...


class LarimarStream:
    """Larimar memory receiving ``texts[i]`` one at a time (sequential update, Eq. 4).

    Args:
        model: the Larimar model (its memory is replaced).
        texts: the sentences to write, in order.
        prompts: each sentence's prompt, the key of a keyed write when ``model.config.keyed_writes``
            (default: none, auto-associative writes).
        M_ref: fixed reference memory ``(K, C)`` (default: the model's M0).
        addressing: addressing mode of the memory (default: the model config's).
        gaussian_alpha: bandwidth of Gaussian addressing (default: the config's).
        ridge: ridge λ of the writes (default: the config's); Gaussian addressing gets a zero prior.
        batch_size: prompts per generation batch when answering.
    """

    def __init__(
        self,
        model: "Larimar",
        texts: Sequence[str],
        M_ref: "torch.Tensor | None" = None,
        *,
        prompts: Sequence[str] | None = None,
        addressing: str | None = None,
        gaussian_alpha: float | None = None,
        ridge: float | None = None,
        batch_size: int = 16,
        name: str = "larimar",
    ) -> None:
        self.model = model
        self.texts = list(texts)
        self.prompts = None if prompts is None else list(prompts)
        if self.prompts is not None and len(self.prompts) != len(self.texts):
            raise ValueError(f"{len(self.texts)} texts but {len(self.prompts)} prompts")
        self.M_ref = M_ref
        self.addressing = addressing
        self.gaussian_alpha = gaussian_alpha
        self.ridge = ridge
        self.batch_size = int(batch_size)
        self.name = name

    def reset(self) -> None:
        fresh_memory(
            self.model, self.M_ref, addressing=self.addressing, gaussian_alpha=self.gaussian_alpha,
            ridge=self.ridge, zero_prior=self.addressing == "gaussian",
        )

    def write(self, index: int) -> None:
        if self.prompts is None:
            self.model.write([self.texts[index]])
        else:
            self.model.write_facts([self.texts[index]], [self.prompts[index]])

    def answer(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        return batched_generate(self.model, prompts, max_new_tokens=max_new_tokens, batch_size=self.batch_size)

    def save(self, directory: Path) -> None:
        self.model.save_memory(directory)

    def load(self, directory: Path, count: int) -> None:
        from larimar.editing.store import FactMemory

        facts = FactMemory.load(directory, expect_C=self.model.config.memory_width)
        if facts.texts != self.texts[:count]:
            raise ValueError(f"{directory}: the saved memory does not hold the first {count} facts of this run")
        want = self.addressing or self.model.config.addressing
        if facts.state.addressing != want:
            raise ValueError(f"{directory}: saved memory uses {facts.state.addressing!r} addressing, expected {want!r}")
        if self.M_ref is not None:
            import torch

            ref = self.model.memory_rows(self.M_ref.to(facts.state.M_ref.dtype))
            if facts.state.M_ref.shape != ref.shape or not torch.allclose(facts.state.M_ref, ref, rtol=1e-6, atol=1e-9):
                raise ValueError(f"{directory}: the saved reference memory differs from this run's")
        self.model.facts = facts


def _crc(items: Sequence[str]) -> int:
    return zlib.crc32("\x1e".join(items).encode("utf-8"))


class GraceStream:
    """A GRACE editor receiving ``requests[i]`` one at a time; snapshots hold its codebook."""

    name = "grace"

    def __init__(self, editor: Any, requests: Sequence[Any]) -> None:
        self.editor = editor
        self.requests = list(requests)

    def reset(self) -> None:
        self.editor.reset()

    def write(self, index: int) -> None:
        self.editor.edit([self.requests[index]])

    def answer(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        return list(self.editor.generate(prompts, max_new_tokens=max_new_tokens))

    def save(self, directory: Path) -> None:
        import torch

        cb = self.editor.codebook
        directory.mkdir(parents=True, exist_ok=True)
        blob = {
            "keys": cb.keys.cpu(),
            "values": cb.values.cpu(),
            "eps": cb.eps.cpu(),
            "labels": list(cb.labels),
            "count": len(self.editor.requests),
            "crc": _crc([r.prompt for r in self.editor.requests]),
        }
        tmp = directory / "codebook.pt.tmp"
        torch.save(blob, tmp)
        os.replace(tmp, directory / "codebook.pt")

    def load(self, directory: Path, count: int) -> None:
        import torch

        path = directory / "codebook.pt"
        if not path.is_file():
            raise ValueError(f"{path} is missing")
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("count") != count or blob.get("crc") != _crc([r.prompt for r in self.requests[:count]]):
            raise ValueError(f"{path}: the saved codebook does not hold the first {count} edits of this run")
        self.editor.reset()
        cb = self.editor.codebook
        cb.keys = blob["keys"].to(cb.device)
        cb.values = blob["values"].to(cb.device)
        cb.eps = blob["eps"].to(cb.device)
        cb.labels = list(blob["labels"])
        self.editor.requests = list(self.requests[:count])


def stream_checkpoints(n: int, every: int) -> list[int]:
    """``every, 2 every, ...`` up to ``n``, always ending with ``n``."""
    if n < 1 or every < 1:
        raise ValueError(f"need n >= 1 and every >= 1, got n={n}, every={every}")
    points = list(range(every, n + 1, every))
    if not points or points[-1] != n:
        points.append(n)
    return points


def target_token_counts(tokenizer: Any, targets: Sequence[str]) -> list[int]:
    """Number of tokens of each answer as it follows a prompt (``" " + target``, no special tokens)."""
    return [max(1, len(tokenizer(" " + t.strip(), add_special_tokens=False)["input_ids"])) for t in targets]


def answer_by_length(system: StreamSystem, prompts: Sequence[str], lengths: Sequence[int]) -> list[str]:
    """``system.answer`` with ``lengths[i]`` new tokens for prompt ``i`` (prompts grouped by length)."""
    out: list[str] = [""] * len(prompts)
    for length in sorted(set(lengths)):
        idx = [i for i, n in enumerate(lengths) if n == length]
        for i, g in zip(idx, system.answer([prompts[i] for i in idx], int(length))):
            out[i] = g
    return out


def _read_progress(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        prog = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("%s is corrupt (%s): starting this stream over", path, exc)
        return None
    ok = (
        isinstance(prog, dict)
        and isinstance(prog.get("written"), int)
        and isinstance(prog.get("snapshot"), str)
        and isinstance(prog.get("points"), list)
    )
    return prog if ok else None


def run_stream(
    system: StreamSystem,
    n: int,
    checkpoints: Sequence[int],
    evaluate: Callable[[StreamSystem, int], dict[str, Any]],
    state_dir: str | os.PathLike[str],
    *,
    progress: bool = True,
    desc: str | None = None,
    save_every: int | None = None,
) -> dict[str, Any]:
    """Apply edits ``0 .. n-1`` to ``system`` one at a time; at every checkpoint ``k`` (edits done)
    call ``evaluate(system, k)`` and persist a snapshot plus ``progress.json`` in ``state_dir``.
    With ``save_every`` a snapshot is also persisted every ``save_every`` edits between checkpoints
    (no evaluation), so that a slow stream (GRACE: seconds per edit) loses little when stopped.

    A valid earlier ``progress.json`` (its snapshot loads and holds exactly the first ``written``
    edits) is resumed from; otherwise the stream starts from ``system.reset()``.

    Returns:
        ``{"written": n, "points": [evaluate(...) per checkpoint], "write_seconds": total seconds in
        write calls (summed over resumed runs)}``.
    """
    from tqdm.auto import tqdm

    from larimar.eval.runner import atomic_write_json, json_safe

    if save_every is not None and save_every < 1:
        raise ValueError(f"save_every must be >= 1, got {save_every}")
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    marks = sorted({int(c) for c in checkpoints if 1 <= int(c) <= n} | {n})
    prog_path = state / PROGRESS_FILE
    prog = _read_progress(prog_path)
    written, points, write_seconds = 0, [], 0.0
    if prog is not None and 0 < prog["written"] <= n:
        try:
            system.load(state / prog["snapshot"], prog["written"])
            written, points = prog["written"], list(prog["points"])
            write_seconds = float(prog.get("write_seconds", 0.0))
            log.info("%s: resuming after %d of %d writes", state, written, n)
        except Exception as exc:  # noqa: BLE001 - any unusable snapshot means: start over
            log.warning("%s: cannot resume (%s); starting over", state, exc)
            written, points, write_seconds = 0, [], 0.0
    if written == 0:
        system.reset()

    def persist(k: int) -> None:
        snap = f"{SNAPSHOT_PREFIX}{k:07d}"
        system.save(state / snap)
        atomic_write_json(prog_path, {"written": k, "snapshot": snap, "points": points, "write_seconds": write_seconds})
        for old in state.glob(f"{SNAPSHOT_PREFIX}*"):
            if old.name != snap and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)

    bar = tqdm(total=n, initial=written, desc=desc or system.name, unit="write", disable=not progress)
    try:
        for i in range(written, n):
            t0 = time.perf_counter()
            system.write(i)
            write_seconds += time.perf_counter() - t0
            bar.update(1)
            k = i + 1
            if k in marks:
                point = json.loads(json.dumps(json_safe(evaluate(system, k))))
                points.append(point)
                bar.set_postfix({kk: v for kk, v in point.items() if isinstance(v, (int, float))})
                persist(k)
            elif save_every is not None and k % save_every == 0:
                persist(k)
    finally:
        bar.close()
    return {"written": n, "points": points, "write_seconds": write_seconds}


# ============================================================================================
# Sequential editing
# ============================================================================================


def load_sequential_cases(
    data: str | os.PathLike[str], extra: str | os.PathLike[str] | None, n: int | None
) -> list["EditCase"]:
    """The first ``n`` usable ZsRE cases of ``data``, topped up from ``extra`` when needed.

    Usable: non-empty ``target_new``. Ids become ``"<file stem>:<id>"`` so the two files cannot
    collide. ``n=None`` takes every usable case of ``data`` only.
    """
    import dataclasses

    from larimar.eval.data import load_cases

    def usable(path: str | os.PathLike[str]) -> list["EditCase"]:
        stem = Path(path).stem
        return [
            dataclasses.replace(c, case_id=f"{stem}:{c.case_id}")
            for c in load_cases(path)
            if c.target_new.strip() and c.prompt.strip()
        ]

    cases = usable(data)
    if n is None:
        return cases
    if len(cases) < n and extra is not None:
        cases += usable(extra)[: n - len(cases)]
    if len(cases) < n:
        log.warning("only %d usable cases available (asked for %d)", len(cases), n)
    return cases[:n]


def fact_sentence(case: "EditCase") -> str:
    """The sentence written for a case: ``"{prompt} {target_new}."``."""
    return f"{case.prompt} {case.target_new}."


def _evaluator(
    queries: Sequence[str], targets: Sequence[str], lengths: Sequence[int], *, n: int, eval_max: int | None, seed: int
) -> Callable[[StreamSystem, int], dict[str, Any]]:
    def evaluate(system: StreamSystem, k: int) -> dict[str, Any]:
        from larimar.eval.metrics import token_f1

        idx = list(range(k))
        if eval_max is not None and k > eval_max:
            idx = sorted(random.Random(seed * 7919 + k).sample(idx, eval_max))
        t0 = time.perf_counter()
        gens = answer_by_length(system, [queries[j] for j in idx], [lengths[j] for j in idx])
        f1 = [token_f1(first_answer(g), targets[j]) for g, j in zip(gens, idx)]
        point: dict[str, Any] = {
            "writes": k,
            "mean_f1": _mean(f1),
            "n_eval": len(idx),
            "eval_seconds": time.perf_counter() - t0,
        }
        if k == n:
            point["predictions"] = [
                {"index": j, "prompt": queries[j], "target": targets[j], "generation": g, "f1": s}
                for j, g, s in zip(idx, gens, f1)
            ]
        return point

    return evaluate


def _stream_summary(n: int, result: Mapping[str, Any]) -> dict[str, Any]:
    points = result["points"]
    final = points[-1] if points else {}
    return {
        "n": n,
        "err": final.get("mean_f1"),
        "curve": [[p["writes"], p["mean_f1"]] for p in points],
        "seconds_per_write": result["write_seconds"] / n if n else math.nan,
    }


def sequential_markdown(summary: Mapping[str, Any]) -> str:
    """Markdown table: mean F1 of the facts written so far vs the number of writes, per method."""
    from larimar.eval.report import fmt

    methods = [("Larimar", summary)] + ([("GRACE", summary["grace"])] if summary.get("grace") else [])
    curves = {name: {int(w): f for w, f in s.get("curve", [])} for name, s in methods}
    writes = sorted({w for c in curves.values() for w in c})
    rows = [[str(w)] + [fmt(curves[name].get(w), 3) for name, _ in methods] for w in writes]
    head = ["writes"] + [f"{name} mean F1" for name, _ in methods]
    errs = ", ".join(f"{name} {fmt(s.get('err'), 3)} ({fmt(s.get('seconds_per_write'), 3)} s/write)" for name, s in methods)
    return (
        f"# Sequential editing on ZsRE (n = {summary.get('n')}, K = {summary.get('K')})\n\n"
        "Mean token F1 of greedy answers over the facts written so far (ERR after the last write).\n\n"
        + markdown_table(head, rows)
        + f"\nERR: {errs}.\n"
    )


def plot_curves(
    curves: Mapping[str, Sequence[Sequence[float]]], path: str | os.PathLike[str], *, xlabel: str, ylabel: str, title: str
) -> Path:
    """One line per named curve ``[[x, y], ...]`` to a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
        if pts:
            xs, ys = zip(*[(float(x), math.nan if y is None else float(y)) for x, y in pts])
            ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    return save_figure(fig, path)


def run_sequential(
    model: "Larimar",
    cases: Sequence["EditCase"],
    out_dir: str | os.PathLike[str],
    *,
    config: Mapping[str, Any],
    reference_prompts: Sequence[str] | None = None,
    memory_size: int = 1000,
    memory: MemoryOptions | None = None,
    eval_every: int = 100,
    save_every: int | None = 50,
    eval_max: int | None = None,
    max_new_tokens: int | None = None,
    methods: Sequence[str] = METHODS,
    grace_hparams: Mapping[str, Any] | None = None,
    batch_size: int = 16,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    plot: bool = True,
) -> dict[str, Any]:
    """Run the sequential-editing experiment into ``out_dir`` and return the summary.

    Args:
        model: the Larimar model (its memory is replaced; GRACE hooks its decoder, removed at the end).
        cases: the facts, in writing order.
        reference_prompts: prompts whose encodings form the reference memory (first ``K``); default
            the prompts of ``cases``.
        memory_size: ``K``; reduced to the number of reference prompts when there are fewer.
        memory: addressing, bandwidth and ridge of Larimar's memory (default: :class:`MemoryOptions()`,
            the paper's pseudo-inverse addressing).
        max_new_tokens: tokens generated per answer; ``None``: the target's token count per fact.
        save_every: also snapshot each stream every this many writes between evaluations (resume
            points; ``None``: only at evaluations).
        methods: subset of ``("larimar", "grace")``.
        grace_hparams: GRACE hyper-parameters (default: ``configs/baselines/grace.yaml`` if found).
    """
    from larimar.eval.editors import EditRequest, load_hparams, make_editor
    from larimar.eval.runner import atomic_write_json, atomic_write_text, prepare_out_dir, seed_everything

    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {list(methods)}")
    cases = list(cases)
    n = len(cases)
    if n < 1:
        raise ValueError("no cases to write")
    out = prepare_out_dir(
        out_dir,
        config,
        identity_keys=tuple(k for k in config if k not in ("batch_size",)),
        force=force,
        results_glob=tuple(f"{m}/{PROGRESS_FILE}" for m in METHODS) + ("summary.json", "summary.md", "curve.png"),
    )
    queries = [c.prompt for c in cases]
    targets = [c.target_new for c in cases]
    if max_new_tokens is None:
        lengths = target_token_counts(model.tokenizer, targets)
    else:
        lengths = [int(max_new_tokens)] * n
    evaluate = _evaluator(queries, targets, lengths, n=n, eval_max=eval_max, seed=seed)
    marks = stream_checkpoints(n, eval_every)
    summary: dict[str, Any] = {}

    if "larimar" in methods:
        ref_prompts = list(reference_prompts) if reference_prompts is not None else queries
        K = min(int(memory_size), len(ref_prompts))
        if K < memory_size:
            log.warning("only %d reference prompts: using K = %d instead of %d", len(ref_prompts), K, memory_size)
        seed_everything(seed)
        memory = memory or MemoryOptions()
        M_ref = memory.reference(model, ref_prompts[:K], K)
        stream = LarimarStream(
            model, [fact_sentence(c) for c in cases], M_ref, prompts=[c.prompt for c in cases],
            addressing=memory.addressing, gaussian_alpha=memory.gaussian_alpha, ridge=memory.ridge_for(model),
            batch_size=batch_size,
        )
        result = run_stream(stream, n, marks, evaluate, out / "larimar", progress=progress, desc="larimar sequential",
                            save_every=save_every)
        summary.update(_stream_summary(n, result))
        summary["K"] = K
        model.reset_memory()
    else:
        summary.update({"n": n, "err": None, "curve": [], "K": None})

    if "grace" in methods:
        hp: dict[str, Any]
        if grace_hparams is None:
            try:
                hp = load_hparams("grace")
            except FileNotFoundError:
                hp = {}
        else:
            hp = dict(grace_hparams)
        hp.setdefault("score_batch_size", batch_size)
        seed_everything(seed)
        editor = make_editor("grace", model.decoder, model.tokenizer, **hp)
        try:
            requests = [EditRequest(c.prompt, c.subject, c.target_new, c.target_true) for c in cases]
            result = run_stream(GraceStream(editor, requests), n, marks, evaluate, out / "grace", progress=progress,
                                desc="grace sequential", save_every=save_every)
            summary["grace"] = _stream_summary(n, result)
        finally:
            editor.reset()
            editor.close()

    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", sequential_markdown(summary))
    if plot:
        curves = {"Larimar": summary.get("curve") or []}
        if summary.get("grace"):
            curves["GRACE"] = summary["grace"]["curve"]
        plot_curves(curves, out / "curve.png", xlabel="facts written", ylabel="mean token F1 of written facts",
                    title="Sequential editing (ZsRE)")
    return summary


# --------------------------------------------------------------------------------------------
# Command line (registered by larimar.eval.cli)
# --------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _methods(text: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in METHODS]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {METHODS}, got {text!r}")
    return items


def add_common_arguments(p: argparse.ArgumentParser, *, data_help: str, n_default: int | None, n_help: str) -> None:
    """Options every experiment command has: --data, --n, --out, --model, --seed, --batch-size,
    --no-progress, --force."""
    p.add_argument("--out", required=True, help="output directory (resumable)")
    p.add_argument("--data", default=None, help=data_help)
    p.add_argument("--n", type=int, default=n_default, help=n_help)
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation / scoring batch (default 16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true", help="discard results in --out made with another configuration")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``larimar eval sequential``."""
    add_common_arguments(
        p,
        data_help="ZsRE file (default zsre-eval = zsre_mend_eval-600.json)",
        n_default=1000,
        n_help="facts written one by one (default 1000 = 600 eval + 400 train questions)",
    )
    p.add_argument("--extra-data", default="zsre-train", help="ZsRE file used to top up to --n facts (default zsre-train)")
    p.add_argument("--memory-size", type=int, default=1000, help="K, slots of the memory (default 1000)")
    add_memory_arguments(p)
    p.add_argument("--eval-every", type=int, default=100, help="checkpoint interval in writes (default 100)")
    p.add_argument("--save-every", type=_positive_int, default=50,
                   help="snapshot interval in writes between checkpoints, to resume from (default 50)")
    p.add_argument("--eval-max", type=int, default=None, help="evaluate at most this many written facts per checkpoint")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="greedy tokens generated per answer (default: as many as the target has)")
    p.add_argument("--methods", type=_methods, default=list(METHODS), help="comma-separated: larimar,grace (default both)")
    p.add_argument("--grace-hparams", default=None, help="GRACE hyper-parameter YAML (default configs/baselines/grace.yaml)")
    p.add_argument("--grace-set", action="append", default=[], metavar="KEY=VALUE", help="override a GRACE hyper-parameter")
    p.add_argument("--no-plot", action="store_true", help="do not draw curve.png")


def run(args: argparse.Namespace) -> int:
    """``larimar eval sequential``."""
    from larimar.eval.cli import describe_model, load_model, resolve_data, resolve_hparams
    from larimar.eval.runner import seed_everything

    if args.n is None or args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    data = resolve_data("zsre", args.data)
    extra = resolve_data("zsre", args.extra_data) if args.extra_data else None
    grace_hp = resolve_hparams("grace", args.grace_hparams, args.grace_set) if "grace" in args.methods else None
    cases = load_sequential_cases(data, extra, args.n)
    pool = load_sequential_cases(data, extra, max(args.n, args.memory_size))
    memory = memory_options(args)
    seed_everything(args.seed)
    model = load_model(args.model)
    config = {
        "task": "sequential",
        "data": str(data),
        "extra_data": str(extra) if extra else None,
        "n": len(cases),
        "memory_size": args.memory_size,
        **memory.describe(model),
        "eval_every": args.eval_every,
        "eval_max": args.eval_max,
        "max_new_tokens": args.max_new_tokens,
        "methods": list(args.methods),
        "grace_hparams": grace_hp,
        "model": describe_model(args.model),
        "seed": args.seed,
        "batch_size": args.batch_size,
    }
    seed_everything(args.seed)
    summary = run_sequential(
        model, cases, args.out, config=config, reference_prompts=[c.prompt for c in pool],
        memory_size=args.memory_size, memory=memory, eval_every=args.eval_every, save_every=args.save_every,
        eval_max=args.eval_max,
        max_new_tokens=args.max_new_tokens, methods=args.methods, grace_hparams=grace_hp,
        batch_size=args.batch_size, seed=args.seed, force=args.force, progress=not args.no_progress,
        plot=not args.no_plot,
    )
    print((Path(args.out) / "summary.md").read_text(encoding="utf-8"))
    print(f"results in {args.out}")
    return 0 if summary else 1
