"""Markdown tables and plots of evaluation results (no model code; matplotlib is imported lazily).

* :func:`summary_markdown` -- one single-edit run (``summary.json`` of :mod:`larimar.eval.runner`);
* :func:`compare_markdown` -- several runs side by side (a Table-1 style comparison);
* :func:`batch_markdown` / :func:`plot_batch` -- batch-editing results vs the number of facts N;
* :func:`timing_markdown` -- seconds per edit of every method and the ratio to Larimar.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "batch_markdown",
    "compare_markdown",
    "fmt",
    "load_summaries",
    "plot_batch",
    "summary_markdown",
    "timing_markdown",
]

_CF_FAMILIES = (("edit_success", "Edit success"), ("paraphrase", "Paraphrase"), ("neighborhood", "Neighborhood"))
_ZSRE_FAMILIES = (("edit", "Edit"), ("paraphrase", "Paraphrase"), ("neighborhood", "Neighborhood"))


def fmt(value: Any, digits: int = 1) -> str:
    """A number with ``digits`` decimals; ``-`` for None / NaN."""
    if value is None:
        return "-"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(v):
        return "-"
    return f"{v:.{digits}f}"


def _seconds(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    v = float(value)
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def task_of(summary: Mapping[str, Any]) -> str:
    """``"counterfact"`` or ``"zsre"`` from a summary's keys."""
    return "counterfact" if "edit_success" in summary else "zsre"


def _row(task: str, summary: Mapping[str, Any]) -> list[str]:
    cells = [str(summary.get("method", "?")), str(summary.get("n", "?"))]
    if task == "counterfact":
        for key, _ in _CF_FAMILIES:
            fam = summary.get(key) or {}
            cells += [fmt(fam.get("S")), fmt(fam.get("M"))]
    else:
        cells += [fmt(summary.get(key)) for key, _ in _ZSRE_FAMILIES]
        first = summary.get("first_token") or {}
        cells += [fmt(first.get("edit")), fmt(first.get("paraphrase"))]
    cells.append(_seconds(summary.get("seconds_per_edit")))
    return cells


def _header(task: str) -> list[str]:
    head = ["Method", "n"]
    if task == "counterfact":
        for _, title in _CF_FAMILIES:
            head += [f"{title} S", f"{title} M"]
    else:
        head += [f"{title} acc" for _, title in _ZSRE_FAMILIES]
        head += ["Edit 1st token", "Paraphrase 1st token"]
    return head + ["s / edit"]


def summary_markdown(task: str, summary: Mapping[str, Any], notes: Sequence[str] = ()) -> str:
    """A Markdown table of one run's summary, with a one-line legend and optional note lines."""
    legend = (
        "CounterFact (ROME metrics, percent): S = % of prompts where the desired answer is more likely, "
        "M = mean probability difference."
        if task == "counterfact"
        else "ZsRE: teacher-forced token accuracy (percent); 1st token: % of prompts whose first answer token is right."
    )
    text = f"# {summary.get('method', '?')} on {task}\n\n{legend}\n\n" + _table(_header(task), [_row(task, summary)])
    return text + "".join(f"\n{line}\n" for line in notes)


def compare_markdown(summaries: Sequence[Mapping[str, Any]]) -> str:
    """One Markdown table per task over several runs' summaries (in the given order)."""
    parts = []
    for task in ("counterfact", "zsre"):
        rows = [_row(task, s) for s in summaries if task_of(s) == task]
        if rows:
            parts.append(f"## {task}\n\n" + _table(_header(task), rows))
    return "\n".join(parts)


def load_summaries(paths: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """Read ``summary.json`` from run directories (or the files themselves)."""
    out = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            path = path / "summary.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no summary.json (has the run finished?)")
        out.append(json.loads(path.read_text(encoding="utf-8")))
    return out


# --------------------------------------------------------------------------------------------
# Batch editing
# --------------------------------------------------------------------------------------------


def batch_markdown(summary: Mapping[str, Any]) -> str:
    """Markdown table of a batch-editing summary (:mod:`larimar.eval.batch`)."""
    rows = []
    for r in summary.get("results", []):
        rows.append(
            [
                "-" if r.get("K") is None else str(r["K"]),
                str(r["N"]),
                str(r.get("eval_n", "?")),
                fmt((r.get("edit_success") or {}).get("S")),
                fmt((r.get("paraphrase") or {}).get("S")),
                fmt((r.get("neighborhood") or {}).get("S")),
                _seconds(r.get("write_seconds")),
            ]
        )
    head = ["K", "N facts", "eval n", "Edit success S", "Paraphrase S", "Neighborhood S", "write s"]
    title = f"# Batch editing: {summary.get('method', '?')} on {summary.get('data_name', 'CounterFact')}\n\n"
    return title + _table(head, rows)


def plot_batch(summary: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Plot edit success / paraphrase / neighbourhood S vs N (log x), one line per K, to a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    results = list(summary.get("results", []))
    by_k: dict[Any, list[Mapping[str, Any]]] = {}
    for r in results:
        by_k.setdefault(r.get("K"), []).append(r)
    families = (("edit_success", "Edit success (rewrite)"), ("paraphrase", "Paraphrase"), ("neighborhood", "Neighborhood"))
    from matplotlib.ticker import NullFormatter, NullLocator

    ticks = sorted({int(r["N"]) for r in results})
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharex=True)
    for ax, (key, title) in zip(axes, families):
        for k, rows in sorted(by_k.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
            rows = sorted(rows, key=lambda r: r["N"])
            xs = [r["N"] for r in rows]
            ys = [math.nan if (r.get(key) or {}).get("S") is None else float(r[key]["S"]) for r in rows]
            ax.plot(xs, ys, marker="o", label="no K" if k is None else f"K={k}")
        ax.set_xscale("log", base=2)
        if ticks:
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(-2, 102)
        ax.set_title(title)
        ax.set_xlabel("facts written at once (N)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("S (%)")
    axes[-1].legend(loc="best")
    fig.suptitle(f"Batch editing: {summary.get('method', '?')}")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def timing_markdown(summary: Mapping[str, Any]) -> str:
    """Markdown table of a timing summary (:mod:`larimar.eval.timing`)."""
    rows = []
    for name, m in summary.get("methods", {}).items():
        ratio = m.get("ratio_to_larimar")
        rows.append(
            [
                name,
                _seconds(m.get("median_s_per_edit")),
                "-" if ratio is None else f"{float(ratio):.3g}x",
                str(m.get("error", "")),
            ]
        )
    return "# Seconds per edit (median)\n\n" + _table(["Method", "median s / edit", "ratio to Larimar", "error"], rows)
