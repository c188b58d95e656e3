"""Robustness to noise in the memory read (paper Fig. 6): edit success and generation perplexity vs
the standard deviation ``sigma_W`` of Gaussian noise added to the addressing weights at read time.

Read with noise. :class:`larimar.memory.MemoryState` reads ``Z_read = W M`` with ``W = address(z)``
and has no noise option, and :func:`larimar.memory.functional.read` (which has ``sigma_w``) addresses
with the *current* memory's pseudo-inverse rather than the state's addressing mode. So the noisy read
is done here, on the state's own addressing (:func:`noisy_read`)::

    W = state.address(z)            # (Q, K): reference / Gaussian / current, as configured
    W = W + sigma_W * eps,  eps ~ N(0, I)
    Z_read = W @ state.M            # (Q, C)

and the read-outs are handed to the decoder with
:func:`larimar.eval.sequential.score_from_latents` / :func:`~larimar.eval.sequential.generate_from_latents`
(``Larimar.read_latents`` adds the same noise when ``LarimarConfig.sigma_w`` > 0; this evaluation
draws its own, so that every noise level sees the same draw).

Protocol (``larimar eval robustness``)
--------------------------------------
For each CounterFact case (``--data``, default ``counterfact-rome``, first ``--n`` usable cases) and
each ``sigma_W`` of ``--sigmas``: the memory is emptied, ``"{prompt} {target_new}."`` is written,
and every query reads memory with noise. With ``--memory-facts N`` (default 1) the case's fact is
written in one batch with the N - 1 facts that follow it in the file (wrapping round the first
``max(n, N)`` usable cases), so that noise on ``W`` mixes the read-out with other facts' rows; with
one fact in memory ``M`` has a single direction and noise can only rescale the read-out. The same ``eps`` (drawn from a generator seeded by the seed
and the case id) is used for every ``sigma_W``, so the curves are paired across noise levels.

* edit success: ``NLL(" " + target_new) < NLL(" " + target_true)`` after the rewrite prompt (ROME's
  efficacy), both candidates scored with the same noisy read-out;
* perplexity: the decoder, conditioned on the noisy read-out of the case's first generation prompt
  (the rewrite prompt when there is none), generates ``--gen-tokens`` greedy tokens; their NLL given
  the prompt is measured with the *base* decoder (no memory), and ``perplexity = exp(mean over cases
  of the per-token mean NLL)``. It measures how fluent the memory-conditioned generation stays.

``w_rms`` in the summary is the root-mean-square of the noise-free addressing weights of the queries,
to put ``sigma_W`` in scale.

Output: ``DIR/cases/sigma_<s>/<case id>.json`` (resumable), ``DIR/summary.json``::

    {"n", "memory_facts", "sigmas", "w_rms", "results": [{"sigma_w", "edit_success", "perplexity", "mean_nll", "n",
      "n_generated"}, ...]}

``DIR/summary.md`` and ``DIR/robustness.png`` (edit success and perplexity vs ``sigma_W``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from larimar.eval.sequential import (
    add_common_arguments,
    encode_latents,
    fact_sentence,
    generate_from_latents,
    markdown_table,
    save_figure,
    score_from_latents,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from larimar.eval.data import EditCase
    from larimar.memory import MemoryState
    from larimar.modeling.model import Larimar

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_SIGMAS", "add_arguments", "companions", "noisy_read", "robustness_case", "run", "run_robustness"]

DEFAULT_SIGMAS: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def noisy_read(
    state: "MemoryState", z: "torch.Tensor", sigma_w: float, *, eps: "torch.Tensor | None" = None,
    generator: "torch.Generator | None" = None,
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Read ``z (Q, C)`` from ``state`` with ``W = address(z) + sigma_w * eps``.

    ``eps (Q, K)`` is drawn from ``generator`` unless given (pass the same ``eps`` to compare noise
    levels on equal terms). Returns ``(Z_read (Q, C), W (Q, K))``.
    """
    import torch

    if sigma_w < 0 or not math.isfinite(sigma_w):
        raise ValueError(f"sigma_w must be a finite number >= 0, got {sigma_w}")
    W = state.address(z.to(state.dtype))
    if sigma_w > 0:
        if eps is None:
            eps = torch.randn(W.shape, generator=generator, dtype=W.dtype, device=W.device)
        elif eps.shape != W.shape:
            raise ValueError(f"eps must have shape {tuple(W.shape)}, got {tuple(eps.shape)}")
        W = W + sigma_w * eps.to(W.dtype)
    return W @ state.M, W


def _case_seed(seed: int, case_id: Any) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(str(case_id).encode("utf-8"))) % (2**31)


def companions(pool: Sequence["EditCase"], case: "EditCase", count: int) -> list["EditCase"]:
    """The ``count`` cases of ``pool`` that follow ``case`` in it (from the start when ``case`` is not
    in it), wrapping round and never ``case`` itself: the other facts in memory with ``case``."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    ids = [c.case_id for c in pool]
    start = ids.index(case.case_id) + 1 if case.case_id in ids else 0
    ring = [pool[(start + i) % len(pool)] for i in range(len(pool))]
    ring = [c for c in ring if c.case_id != case.case_id]
    if count > len(ring):
        raise ValueError(f"{count} other facts asked for, but the pool holds only {len(ring)} besides case {case.case_id!r}")
    return ring[:count]


def robustness_case(
    model: "Larimar", case: "EditCase", sigmas: Sequence[float], *, gen_tokens: int = 20, seed: int = 0,
    batch_size: int = 16, others: Sequence["EditCase"] = (),
) -> list[dict[str, Any]]:
    """Write the case's fact (with the facts of ``others`` in the same batch), then score and generate
    at every ``sigma`` (paired noise); one record each."""
    import torch

    from larimar.eval.scoring import continuation_nll

    if case.target_true is None:
        raise ValueError(f"case {case.case_id!r} has no target_true")
    gen_prompt = case.generation_prompts[0] if case.generation_prompts else case.prompt
    model.reset_memory()
    written = [case, *others]
    model.write_facts([fact_sentence(c) for c in written], [c.prompt for c in written])
    state = model.facts.state
    q = model.memory_rows(encode_latents(model, [case.prompt, gen_prompt]))  # (2, memory width)
    g = torch.Generator().manual_seed(_case_seed(seed, case.case_id))
    eps = torch.randn((2, state.K), generator=g, dtype=state.dtype)
    _, W0 = noisy_read(state, q, 0.0)
    w_rms = float(W0.pow(2).mean().sqrt())
    out = []
    for sigma in sigmas:
        z, _ = noisy_read(state, q, float(sigma), eps=eps)
        nll = score_from_latents(
            model, [case.prompt, case.prompt], [" " + case.target_new, " " + case.target_true], z[[0, 0]],
            batch_size=batch_size,
        )
        text = generate_from_latents(model, [gen_prompt], z[1:2], max_new_tokens=gen_tokens)[0]
        gen_nll = None
        if text.strip():
            gen_nll = float(continuation_nll(model.decoder, model.tokenizer, [gen_prompt], [text])[0])
        out.append({
            "case_id": case.case_id,
            "sigma_w": float(sigma),
            "nll_new": float(nll[0]),
            "nll_true": float(nll[1]),
            "success": bool(nll[0] < nll[1]),
            "generation_prompt": gen_prompt,
            "generation": text,
            "generation_nll": gen_nll,
            "w_rms": w_rms,
            "memory_facts": len(written),
        })
    model.reset_memory()
    return out


def _sigma_dir(out: Path, sigma: float) -> Path:
    return out / "cases" / f"sigma_{sigma:g}"


def _load(path: Path, case_id: Any, sigma: float, memory_facts: int = 1) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = (isinstance(rec, dict) and str(rec.get("case_id")) == str(case_id) and rec.get("sigma_w") == float(sigma)
          and rec.get("memory_facts", 1) == memory_facts)
    return rec if ok and isinstance(rec.get("success"), bool) else None


def robustness_markdown(summary: Mapping[str, Any]) -> str:
    """Markdown table: edit success and perplexity per sigma_W."""
    from larimar.eval.report import fmt

    rows = [[fmt(r["sigma_w"], 3), str(r["n"]), fmt(r["edit_success"]), fmt(r["perplexity"], 2), str(r["n_generated"])]
            for r in summary.get("results", [])]
    return (
        f"# Robustness to read noise (n = {summary.get('n')} CounterFact facts, "
        f"{summary.get('memory_facts', 1)} in memory per query, noise-free W rms = {fmt(summary.get('w_rms'), 4)})\n\n"
        "Edit success = % of facts with NLL(new) < NLL(true) after the rewrite prompt; perplexity of the "
        "memory-conditioned generation under the base decoder.\n\n"
        + markdown_table(["sigma_W", "facts", "Edit success %", "Generation perplexity", "generations scored"], rows)
    )


def plot_robustness(summary: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Edit success and perplexity vs sigma_W (symlog x axis, so that 0 is shown)."""
    from larimar.eval.sequential import _pyplot

    plt = _pyplot()
    res = summary.get("results", [])
    xs = [r["sigma_w"] for r in res]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((axes[0], "edit_success", "edit success (%)"), (axes[1], "perplexity", "generation perplexity")):
        ys = [math.nan if r[key] is None else float(r[key]) for r in res]
        ax.plot(xs, ys, marker="o")
        ax.set_xscale("symlog", linthresh=min([x for x in xs if x > 0], default=0.01))
        ax.set_xlabel("sigma_W (noise std on the read weights)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylim(-2, 102)
    fig.suptitle("Robustness to read noise")
    return save_figure(fig, path)


def run_robustness(
    model: "Larimar",
    cases: Sequence["EditCase"],
    out_dir: str | os.PathLike[str],
    *,
    config: Mapping[str, Any],
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    gen_tokens: int = 20,
    batch_size: int = 16,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    plot: bool = True,
    memory_facts: int = 1,
    pool: Sequence["EditCase"] | None = None,
) -> dict[str, Any]:
    """Evaluate every case at every sigma into ``out_dir``; return the summary.

    Each case is written with ``memory_facts - 1`` others from ``pool`` (default: ``cases``), see
    :func:`companions`.
    """
    from tqdm.auto import tqdm

    from larimar.eval.runner import atomic_write_json, atomic_write_text, case_file, prepare_out_dir, seed_everything

    sigmas = sorted({float(s) for s in sigmas})
    if not sigmas or sigmas[0] < 0:
        raise ValueError(f"sigmas must be >= 0, got {sigmas}")
    if memory_facts < 1:
        raise ValueError(f"memory_facts must be >= 1, got {memory_facts}")
    cases = [c for c in cases if c.target_true]
    pool = list(cases if pool is None else pool)
    pool_ids = {c.case_id for c in pool}
    for case in cases:  # checked before anything is written: every case needs memory_facts - 1 others
        if len(pool_ids) - (case.case_id in pool_ids) < memory_facts - 1:
            raise ValueError(f"memory_facts={memory_facts} needs {memory_facts - 1} other facts for case "
                             f"{case.case_id!r}; the pool has {len(pool_ids)} distinct cases")
    out = prepare_out_dir(
        out_dir, config, identity_keys=tuple(k for k in config if k not in ("batch_size", "sigmas")), force=force,
        results_glob=("cases/*/*.json", "summary.json", "summary.md", "robustness.png"),
    )
    by_sigma: dict[float, list[dict[str, Any]]] = {s: [] for s in sigmas}
    for case in tqdm(cases, desc="robustness", unit="fact", disable=not progress):
        paths = {s: _sigma_dir(out, s) / case_file(out, case.case_id).name for s in sigmas}
        done = {s: _load(paths[s], case.case_id, s, memory_facts) for s in sigmas}
        missing = [s for s in sigmas if done[s] is None]
        if missing:
            seed_everything(_case_seed(seed, case.case_id))
            others = companions(pool, case, memory_facts - 1)
            for rec in robustness_case(
                model, case, missing, gen_tokens=gen_tokens, seed=seed, batch_size=batch_size, others=others,
            ):
                atomic_write_json(paths[rec["sigma_w"]], rec)
                done[rec["sigma_w"]] = json.loads(json.dumps(rec))
        for s in sigmas:
            by_sigma[s].append(done[s])  # type: ignore[arg-type]
    results = []
    for s in sigmas:
        recs = by_sigma[s]
        nlls = [r["generation_nll"] for r in recs if r.get("generation_nll") is not None]
        mean_nll = sum(nlls) / len(nlls) if nlls else None
        results.append({
            "sigma_w": s,
            "edit_success": 100.0 * sum(r["success"] for r in recs) / len(recs) if recs else None,
            "perplexity": math.exp(mean_nll) if mean_nll is not None else None,
            "mean_nll": mean_nll,
            "n": len(recs),
            "n_generated": len(nlls),
        })
    w = [r["w_rms"] for r in by_sigma[sigmas[0]]]
    summary = {"n": len(cases), "memory_facts": memory_facts, "sigmas": sigmas, "w_rms": sum(w) / len(w) if w else None, "results": results}
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", robustness_markdown(summary))
    if plot and results:
        plot_robustness(summary, out / "robustness.png")
    return summary


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or any(v < 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected non-negative numbers, got {text!r}")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``larimar eval robustness``."""
    add_common_arguments(
        p,
        data_help="CounterFact file (default counterfact-rome)",
        n_default=100,
        n_help="facts (default 100)",
    )
    p.add_argument("--sigmas", type=_floats, default=list(DEFAULT_SIGMAS),
                   help="noise levels sigma_W (default 0,0.01,0.02,0.05,0.1,0.2,0.5,1)")
    p.add_argument("--gen-tokens", type=int, default=20, help="greedy tokens generated for the perplexity (default 20)")
    p.add_argument("--memory-facts", type=int, default=1,
                   help="facts in memory per query: the case's and the next N-1 in the file (default 1)")
    p.add_argument("--no-plot", action="store_true", help="do not draw robustness.png")


def run(args: argparse.Namespace) -> int:
    """``larimar eval robustness``."""
    from larimar.eval.cli import describe_model, load_model, resolve_data
    from larimar.eval.data import load_cases
    from larimar.eval.runner import seed_everything, usable_cases

    if args.memory_facts < 1:
        raise SystemExit(f"--memory-facts must be >= 1, got {args.memory_facts}")
    path = resolve_data("counterfact", args.data)
    pool = usable_cases("counterfact", load_cases(path, n=None if args.n is None else max(args.n, args.memory_facts)))
    cases = pool[: args.n] if args.n is not None else pool
    config = {
        "task": "robustness",
        "data": str(path),
        "n": args.n,
        "sigmas": list(args.sigmas),
        "gen_tokens": args.gen_tokens,
        **({"memory_facts": args.memory_facts} if args.memory_facts > 1 else {}),
        "model": describe_model(args.model),
        "seed": args.seed,
        "batch_size": args.batch_size,
    }
    seed_everything(args.seed)
    model = load_model(args.model)
    run_robustness(
        model, cases, args.out, config=config, sigmas=args.sigmas, gen_tokens=args.gen_tokens,
        batch_size=args.batch_size, seed=args.seed, force=args.force, progress=not args.no_progress,
        plot=not args.no_plot, memory_facts=args.memory_facts, pool=pool,
    )
    print((Path(args.out) / "summary.md").read_text(encoding="utf-8"))
    print(f"results in {args.out}")
    return 0
