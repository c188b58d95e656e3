"""The knowledge-editor protocol of the evaluation harness, its registry and the baselines.

Every method -- the baselines here and the Larimar adapter registered elsewhere -- implements
:class:`Editor`::

    editor = make_editor("rome", model, tokenizer, **load_hparams("rome"))
    editor.edit([EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux",
                             "English", "French")])
    nll = editor.score(["The mother tongue of Danielle Darrieux is"], [["English", "French"]])
    # nll: (1, 2) mean NLL of " English" and " French"; edit success iff nll[0, 0] < nll[0, 1]
    editor.generate(["Danielle Darrieux was born in"], max_new_tokens=20)
    editor.reset()   # bit-exact unedited model again

Built-in methods (hyper-parameters in ``configs/baselines/<name>.yaml``, see :func:`load_hparams`):

========== ===============================================================================
``unedited`` no change (reference numbers).
``prompt``   PROMPT: every edit made so far is written as ``"{prompt} {target_new}."`` before the
             query (newest last).
``ike``      IKE (Zheng et al., 2023): in-context editing with k retrieved copy / update / retain
             demonstrations (:mod:`larimar.eval.baselines.ike`).
``ft_l``     FT-L (ROME paper): L-infinity-constrained fine-tuning of one MLP output projection
             (:mod:`larimar.eval.baselines.ft_l`).
``rome``     ROME (Meng et al., 2022): rank-one update of one MLP output projection
             (:mod:`larimar.eval.baselines.rome`).
``grace``    GRACE (Hartvigsen et al., 2023): key-value codebook adaptor around one layer
             (:mod:`larimar.eval.baselines.grace`).
========== ===============================================================================

Conventions
-----------
* Prompts have no trailing space; targets / candidates are given *without* a leading space and the
  editor adds one (``" " + candidate``) unless the candidate already starts with white space.
* ``score`` returns the mean per-token NLL (:func:`larimar.eval.scoring.continuation_nll`), so
  ``exp(-nll)`` is ROME's target probability.
* ``edit`` is cumulative: several calls (or one call with a list) accumulate edits; ``reset`` goes
  back to the unedited model (weight editors restore the saved original tensors bit-exactly).
* ``generate`` is greedy and returns only the new text.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = [
    "BaseEditor",
    "EditRequest",
    "Editor",
    "EditorFactory",
    "PromptEditor",
    "UneditedEditor",
    "available_editors",
    "config_dirs",
    "load_hparams",
    "make_editor",
    "register_editor",
    "smoke",
]


@dataclass(frozen=True)
class EditRequest:
    """One requested fact rewrite.

    Attributes:
        prompt: rewrite prompt with the subject filled in, no trailing space, e.g.
            ``"The mother tongue of Danielle Darrieux is"``.
        subject: the subject as it occurs in ``prompt``, e.g. ``"Danielle Darrieux"``.
        target_new: the new object, no leading space, e.g. ``"English"``.
        target_true: the current object if known (used by evaluation only), e.g. ``"French"``.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"EditRequest.prompt must be a non-empty string, got {self.prompt!r}")
        if not isinstance(self.subject, str):
            raise ValueError(f"EditRequest.subject must be a string, got {self.subject!r}")
        if not isinstance(self.target_new, str) or not self.target_new.strip():
            raise ValueError(f"EditRequest.target_new must be a non-empty string, got {self.target_new!r}")

    @classmethod
    def from_case(cls, case: Any) -> EditRequest:
        """Build a request from a :class:`larimar.eval.data.EditCase` (or any object with the same
        ``prompt``, ``subject``, ``target_new``, ``target_true`` attributes)."""
        return cls(case.prompt, case.subject, case.target_new, getattr(case, "target_true", None))


@runtime_checkable
class Editor(Protocol):
    """What the evaluation harness needs from a knowledge-editing method."""

    name: str

    def edit(self, requests: list[EditRequest]) -> None:
        """Apply one or a batch of edits (cumulative with earlier calls)."""
        ...

    def score(self, prompts: list[str], candidates: list[list[str]]) -> torch.Tensor:
        """``(Q, n_cand)`` mean NLL of each candidate (leading space added) after each prompt."""
        ...

    def generate(self, prompts: list[str], max_new_tokens: int = 20) -> list[str]:
        """Greedy continuation of each prompt (new text only)."""
        ...

    def reset(self) -> None:
        """Return to the unedited model (bit-exact weights)."""
        ...


#: ``factory(model, tokenizer, **hparams) -> Editor``
EditorFactory = Callable[..., Editor]


def _with_space(candidate: str) -> str:
    return candidate if candidate[:1].isspace() else " " + candidate


class BaseEditor:
    """Common part of the editors: scoring, generation and edit bookkeeping.

    Subclasses implement :meth:`_apply` (the edit itself) and :meth:`_restore` (undo everything),
    and may override :meth:`_stats` (how ``(prompt, continuation)`` pairs are scored under the
    edited model; :meth:`score` and :meth:`token_stats` both use it) and :meth:`_generate`.

    Args:
        model: a Hugging Face causal LM (any device; the editor uses the model's device).
        tokenizer: its tokenizer.
        score_batch_size: sequences per forward pass when scoring.
    """

    name = "base"

    def __init__(self, model: Any, tokenizer: Any, *, score_batch_size: int = 16) -> None:
        if score_batch_size < 1:
            raise ValueError(f"score_batch_size must be >= 1, got {score_batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.score_batch_size = int(score_batch_size)
        self.requests: list[EditRequest] = []
        #: seconds spent in each ``edit`` call (for reporting)
        self.edit_seconds: list[float] = []

    # -- protocol ---------------------------------------------------------------------------
    def edit(self, requests: Sequence[EditRequest] | EditRequest) -> None:
        """Apply edits (a single request or a list), cumulatively."""
        if isinstance(requests, EditRequest):
            requests = [requests]
        reqs = list(requests)
        for r in reqs:
            if not isinstance(r, EditRequest):
                raise TypeError(f"edit() takes EditRequest objects, got {type(r).__name__}")
        if not reqs:
            return
        t0 = time.perf_counter()
        self._apply(reqs)
        self.requests.extend(reqs)
        self.edit_seconds.append(time.perf_counter() - t0)

    def score(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> torch.Tensor:
        """Mean NLL of each candidate after its prompt: float32 ``(Q, n_cand)``."""
        prompts = list(prompts)
        if len(prompts) != len(candidates):
            raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
        if not prompts:
            return torch.zeros((0, 0), dtype=torch.float32)
        n_cand = len(candidates[0])
        if any(len(c) != n_cand for c in candidates):
            raise ValueError("every prompt needs the same number of candidates")
        if n_cand == 0:
            return torch.zeros((len(prompts), 0), dtype=torch.float32)
        flat_p = [p for p, cands in zip(prompts, candidates) for _ in cands]
        flat_c = [_with_space(c) for cands in candidates for c in cands]
        nll = self._nll(flat_p, flat_c)
        return nll.reshape(len(prompts), n_cand).to(torch.float32)

    def token_stats(self, prompts: Sequence[str], targets: Sequence[str]) -> list[Any]:
        """Teacher-forced per-token statistics of each target after its prompt under the edited model.

        Targets are given without their leading space (as to :meth:`score`). Returns one
        :class:`larimar.eval.scoring.ContinuationStats` per pair (``.nll`` equals ``score``'s value,
        ``.accuracy`` is ZsRE's token accuracy).
        """
        prompts, targets = list(prompts), list(targets)
        if len(prompts) != len(targets):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
        if not prompts:
            return []
        return self._stats(prompts, [_with_space(t) for t in targets])

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 20) -> list[str]:
        """Greedy continuation of each prompt under the edited model (new text only)."""
        return self._generate(list(prompts), max_new_tokens)

    def reset(self) -> None:
        """Undo all edits."""
        self._restore()
        self.requests = []

    # -- for subclasses ---------------------------------------------------------------------
    def _apply(self, requests: list[EditRequest]) -> None:
        raise NotImplementedError

    def _restore(self) -> None:
        raise NotImplementedError

    def _stats(self, prompts: list[str], continuations: list[str]) -> list[Any]:
        """Per-token statistics of ``continuations`` (leading space included) after ``prompts``."""
        from larimar.eval.scoring import continuation_token_stats

        return continuation_token_stats(
            self.model, self.tokenizer, prompts, continuations, batch_size=self.score_batch_size
        )

    def _nll(self, prompts: list[str], continuations: list[str]) -> torch.Tensor:
        """``(N,)`` mean NLL of each continuation (as :func:`larimar.eval.scoring.continuation_nll`)."""
        stats = self._stats(prompts, continuations)
        return torch.stack([-st.logprobs.mean() for st in stats]).to(torch.float32)

    def _generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        from larimar.eval.baselines.common import greedy_generate

        return greedy_generate(self.model, self.tokenizer, prompts, max_new_tokens)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, edits={len(self.requests)})"


class UneditedEditor(BaseEditor):
    """The unedited model: ``edit`` records the requests and changes nothing."""

    name = "unedited"

    def __init__(self, model: Any, tokenizer: Any, *, score_batch_size: int = 16) -> None:
        super().__init__(model, tokenizer, score_batch_size=score_batch_size)

    def _apply(self, requests: list[EditRequest]) -> None:
        return None

    def _restore(self) -> None:
        return None


class PromptEditor(BaseEditor):
    """PROMPT baseline: the edited facts are written in front of every query.

    The context is ``separator.join(fact_template.format(prompt=..., target_new=...) for each
    edit, oldest first) + separator`` followed by the query; with the defaults a query after one
    edit reads ``"The mother tongue of Danielle Darrieux is English.\\nDanielle Darrieux was born in"``.

    Hyper-parameters:
        fact_template: format string with ``{prompt}``, ``{target_new}`` (and optionally
            ``{subject}``), default ``"{prompt} {target_new}."``.
        separator: between facts and before the query, default ``"\\n"``.
        max_facts: keep only the newest ``max_facts`` edits in the context (None = all).
    """

    name = "prompt"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        fact_template: str = "{prompt} {target_new}.",
        separator: str = "\n",
        max_facts: int | None = None,
        score_batch_size: int = 16,
    ) -> None:
        super().__init__(model, tokenizer, score_batch_size=score_batch_size)
        if not isinstance(fact_template, str) or "{target_new}" not in fact_template:
            raise ValueError(f"prompt: fact_template must contain '{{target_new}}', got {fact_template!r}")
        try:
            fact_template.format(prompt="p", target_new="t", subject="s")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"prompt: bad fact_template {fact_template!r}: {exc}") from None
        if not isinstance(separator, str):
            raise ValueError(f"prompt: separator must be a string, got {separator!r}")
        if max_facts is not None and (not isinstance(max_facts, int) or max_facts < 1):
            raise ValueError(f"prompt: max_facts must be a positive int or None, got {max_facts!r}")
        self.fact_template = fact_template
        self.separator = separator
        self.max_facts = max_facts

    def _apply(self, requests: list[EditRequest]) -> None:
        return None  # the context is built from self.requests at query time

    def _restore(self) -> None:
        return None

    def context(self, pending: Sequence[EditRequest] = ()) -> str:
        """The text put before every query (empty before any edit)."""
        reqs = list(self.requests) + list(pending)
        if self.max_facts is not None:
            reqs = reqs[-self.max_facts :]
        if not reqs:
            return ""
        facts = [self.fact_template.format(prompt=r.prompt, target_new=r.target_new, subject=r.subject) for r in reqs]
        return self.separator.join(facts) + self.separator

    def _stats(self, prompts: list[str], continuations: list[str]) -> list[Any]:
        ctx = self.context()
        return super()._stats([ctx + p for p in prompts], continuations)

    def _generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        ctx = self.context()
        return super()._generate([ctx + p for p in prompts], max_new_tokens)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

_REGISTRY: dict[str, EditorFactory] = {}


def register_editor(name: str, factory: EditorFactory, *, overwrite: bool = False) -> None:
    """Register ``factory(model, tokenizer, **hparams) -> Editor`` under ``name``.

    Raises:
        ValueError: ``name`` is empty or already registered (unless ``overwrite``).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"editor name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory for {name!r} is not callable")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"an editor named {name!r} is already registered (pass overwrite=True)")
    _REGISTRY[name] = factory


def available_editors() -> list[str]:
    """Names of the registered editors, sorted."""
    return sorted(_REGISTRY)


def make_editor(name: str, model: Any, tokenizer: Any, **hparams: Any) -> Editor:
    """Build the editor registered as ``name`` around ``model`` / ``tokenizer``.

    ``hparams`` override the method's defaults (the defaults equal ``configs/baselines/<name>.yaml``
    for SmolLM2-135M); unknown or invalid hyper-parameters raise ``ValueError``.

    Raises:
        KeyError: no editor of that name (the message lists the registered ones).
    """
    if name not in _REGISTRY:
        raise KeyError(f"unknown editor {name!r}; registered: {available_editors()}")
    return _REGISTRY[name](model, tokenizer, **hparams)


def _lazy_factory(module: str, attr: str) -> EditorFactory:
    def factory(model: Any, tokenizer: Any, **hparams: Any) -> Editor:
        cls = getattr(importlib.import_module(module), attr)
        return cls(model, tokenizer, **hparams)

    factory.__name__ = f"make_{attr}"
    factory.__doc__ = f"Build :class:`{module}.{attr}` (imported on first use)."
    return factory


register_editor("unedited", UneditedEditor)
register_editor("prompt", PromptEditor)
register_editor("ike", _lazy_factory("larimar.eval.baselines.ike", "IKEEditor"))
register_editor("ft_l", _lazy_factory("larimar.eval.baselines.ft_l", "FTLEditor"))
register_editor("rome", _lazy_factory("larimar.eval.baselines.rome", "ROMEEditor"))
register_editor("grace", _lazy_factory("larimar.eval.baselines.grace", "GRACEEditor"))
register_editor("larimar", _lazy_factory("larimar.eval.larimar_editor", "make_larimar_editor"))


# --------------------------------------------------------------------------------------------
# Hyper-parameter files
# --------------------------------------------------------------------------------------------


def config_dirs() -> list[Path]:
    """Where :func:`load_hparams` looks for ``<name>.yaml``, in order: ``$LARIMAR_CONFIGS/baselines``
    (if set), the repository's ``configs/baselines`` (next to ``src/``), ``./configs/baselines``."""
    dirs: list[Path] = []
    env = os.environ.get("LARIMAR_CONFIGS")
    if env:
        dirs.append(Path(env).expanduser() / "baselines")
    here = Path(__file__).resolve()
    if len(here.parents) > 3:
        dirs.append(here.parents[3] / "configs" / "baselines")
    dirs.append(Path.cwd() / "configs" / "baselines")
    out: list[Path] = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def load_hparams(name: str, path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Read the hyper-parameters of method ``name`` from YAML.

    Args:
        name: method name (``"rome"``, ...).
        path: an explicit YAML file, or a directory holding ``<name>.yaml``; default: the first
            ``<name>.yaml`` found in :func:`config_dirs`.

    Returns:
        A dict of hyper-parameters (empty for an empty file), to pass as ``make_editor(name,
        model, tok, **hparams)``.

    Raises:
        FileNotFoundError: no file found (the message lists the places searched).
        ValueError: the file does not hold a YAML mapping with string keys.
    """
    import yaml

    if path is not None:
        p = Path(path).expanduser()
        candidates = [p / f"{name}.yaml", p / f"{name}.yml"] if p.is_dir() else [p]
    else:
        candidates = [d / f"{name}{ext}" for d in config_dirs() for ext in (".yaml", ".yml")]
    for cand in candidates:
        if cand.is_file():
            with cand.open(encoding="utf-8") as fh:
                data = yaml.safe_load(fh)
            if data is None:
                return {}
            if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
                raise ValueError(f"{cand}: expected a YAML mapping of hyper-parameters, got {type(data).__name__}")
            return dict(data)
    raise FileNotFoundError(
        f"no hyper-parameter file for {name!r}; looked for {[str(c) for c in candidates]}"
    )


# --------------------------------------------------------------------------------------------
# Smoke run on the real model
# --------------------------------------------------------------------------------------------


def smoke(
    name: str,
    n: int = 5,
    *,
    data: str | os.PathLike[str] | None = None,
    model: Any = None,
    tokenizer: Any = None,
    hparams: Mapping[str, Any] | None = None,
    start: int = 0,
    verbose: bool = True,
) -> dict[str, Any]:
    """Edit ``n`` CounterFact cases one at a time (reset between cases) and report edit success.

    Reads ROME-format ``counterfact-rome.json`` directly (default: the shared data directory),
    loads SmolLM2-135M-Instruct unless ``model`` / ``tokenizer`` are given and uses
    ``configs/baselines/<name>.yaml`` unless ``hparams`` are given. Edit success of a case:
    ``NLL(" " + target_new) < NLL(" " + target_true)`` on the rewrite prompt after the edit
    (ROME's efficacy); also reported before the edit, on the first paraphrase prompt, and as the
    fraction of neighbourhood prompts that keep ``NLL(target_true) < NLL(target_new)``.

    Run by hand, e.g. ``python -c "from larimar.eval.editors import smoke; smoke('rome')"``.

    Returns:
        ``{"name", "n", "success", "success_before", "paraphrase_success", "neighborhood_success",
        "seconds_per_edit", "cases": [...]}``, rates in [0, 1].
    """
    if model is None or tokenizer is None:
        from larimar.modeling.loading import load_decoder

        model, tokenizer = load_decoder()
    if data is None:
        from larimar.eval.data import data_path

        data = data_path("counterfact-rome")
    with open(data, encoding="utf-8") as fh:
        records = json.load(fh)[start : start + n]
    if hparams is None:
        try:
            hparams = load_hparams(name)
        except FileNotFoundError:
            hparams = {}
    editor = make_editor(name, model, tokenizer, **dict(hparams))
    rows = []
    for rec in records:
        rw = rec["requested_rewrite"]
        prompt = rw["prompt"].format(rw["subject"])
        req = EditRequest(prompt, rw["subject"], rw["target_new"]["str"], rw["target_true"]["str"])
        para = (rec.get("paraphrase_prompts") or [None])[0]
        editor.reset()
        pre = editor.score([prompt], [[req.target_new, req.target_true]])[0]
        t0 = time.perf_counter()
        editor.edit([req])
        dt = time.perf_counter() - t0
        qs = [prompt] + ([para] if para else [])
        post = editor.score(qs, [[req.target_new, req.target_true]] * len(qs))
        neigh = list(rec.get("neighborhood_prompts") or [])
        neigh_ok = None
        if neigh:
            nn_ = editor.score(neigh, [[req.target_new, req.target_true]] * len(neigh))
            neigh_ok = float((nn_[:, 1] < nn_[:, 0]).float().mean())
        row = {
            "case_id": rec.get("case_id"),
            "prompt": prompt,
            "target_new": req.target_new,
            "target_true": req.target_true,
            "nll_before": [float(x) for x in pre],
            "nll_after": [float(x) for x in post[0]],
            "success_before": bool(pre[0] < pre[1]),
            "success": bool(post[0, 0] < post[0, 1]),
            "paraphrase_success": bool(post[1, 0] < post[1, 1]) if para else None,
            "neighborhood_success": neigh_ok,
            "seconds": dt,
        }
        rows.append(row)
        if verbose:
            print(
                f"[{name}] case {row['case_id']}: {prompt!r} -> {req.target_new!r} (was {req.target_true!r}) "
                f"NLL new/true {row['nll_before'][0]:.2f}/{row['nll_before'][1]:.2f} -> "
                f"{row['nll_after'][0]:.2f}/{row['nll_after'][1]:.2f} success={row['success']} "
                f"para={row['paraphrase_success']} neigh={neigh_ok if neigh_ok is None else round(neigh_ok, 2)} {dt:.1f}s",
                flush=True,
            )
    editor.reset()
    paras = [r["paraphrase_success"] for r in rows if r["paraphrase_success"] is not None]
    neighs = [r["neighborhood_success"] for r in rows if r["neighborhood_success"] is not None]
    summary = {
        "name": name,
        "n": len(rows),
        "success": sum(r["success"] for r in rows) / max(len(rows), 1),
        "success_before": sum(r["success_before"] for r in rows) / max(len(rows), 1),
        "paraphrase_success": sum(paras) / len(paras) if paras else float("nan"),
        "neighborhood_success": sum(neighs) / len(neighs) if neighs else float("nan"),
        "seconds_per_edit": sum(r["seconds"] for r in rows) / max(len(rows), 1),
        "cases": rows,
    }
    if verbose:
        print(
            f"[{name}] edit success {summary['success']:.0%} (before {summary['success_before']:.0%}), "
            f"paraphrase {summary['paraphrase_success']:.0%}, neighbourhood {summary['neighborhood_success']:.0%}, "
            f"{summary['seconds_per_edit']:.1f} s/edit",
            flush=True,
        )
    return summary
