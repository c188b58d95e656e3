"""Wall-clock seconds per edit of every method on the same edits, in one run (the paper's speed table).

Every method edits the same requests one at a time (``reset`` before each, untimed); the time of each
``edit`` call is taken with ``clock`` (``time.perf_counter`` by default). One untimed warm-up edit
per method comes first (first-call costs: lazy imports, caches, covariance statistics that some
methods compute once). Methods are built one after the other from factories and released before the
next one is built, so weight editors sharing one decoder never see each other's edits.

Output: ``DIR/summary.json`` = ``{"methods": {NAME: {"median_s_per_edit", "ratio_to_larimar"}}}``
(``ratio_to_larimar`` = the method's median / Larimar's median; ``None`` when Larimar was not timed
or a method failed, in which case its entry also has ``"error"``), ``DIR/summary.md`` and
``DIR/times.json`` (every measured time).
"""

from __future__ import annotations

import gc
import logging
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from larimar.eval.editors import EditRequest
from larimar.eval.runner import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["REFERENCE", "run_timing", "time_edits", "timing_summary"]

REFERENCE = "larimar"
Clock = Callable[[], float]


def time_edits(editor: Any, requests: Sequence[EditRequest], *, clock: Clock = time.perf_counter, warmup: int = 1) -> list[float]:
    """Seconds of each single-request ``edit`` call (reset before each, untimed); editor reset at the end.

    The first ``warmup`` requests are also edited once, untimed, before the measured edits.
    """
    if not requests:
        raise ValueError("time_edits needs at least one request")
    for r in list(requests)[: max(int(warmup), 0)]:
        editor.reset()
        editor.edit([r])
    times = []
    for r in requests:
        editor.reset()
        t0 = clock()
        editor.edit([r])
        times.append(float(clock() - t0))
    editor.reset()
    return times


def timing_summary(
    times: Mapping[str, Sequence[float]],
    errors: Mapping[str, str] | None = None,
    *,
    reference: str = REFERENCE,
) -> dict[str, Any]:
    """``{"methods": {name: {"median_s_per_edit", "ratio_to_larimar"}}}`` from measured times.

    Methods listed in ``errors`` get ``None`` values and an ``"error"`` entry. The ratio is
    ``median(method) / median(reference)``; ``None`` if the reference is missing or took 0 s.
    """
    errors = dict(errors or {})
    medians = {name: float(statistics.median(ts)) for name, ts in times.items() if ts}
    ref = medians.get(reference)
    methods: dict[str, dict[str, Any]] = {}
    for name in list(times) + [n for n in errors if n not in times]:
        if name in errors or name not in medians:
            methods[name] = {"median_s_per_edit": None, "ratio_to_larimar": None, "error": errors.get(name, "no times")}
            continue
        ratio = medians[name] / ref if ref else None
        methods[name] = {"median_s_per_edit": medians[name], "ratio_to_larimar": ratio}
    return {"methods": methods}


def run_timing(
    factories: Mapping[str, Callable[[], Any]],
    requests: Sequence[EditRequest],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    clock: Clock = time.perf_counter,
    warmup: int = 1,
    reference: str = REFERENCE,
    progress: bool = True,
) -> dict[str, Any]:
    """Time every method (``factories[name]() -> Editor``) on ``requests``; write results to ``out_dir``.

    A method whose construction or edits raise is reported with its error; the others still run.
    The output files are rewritten after every method (partial results survive an interruption).
    """
    from tqdm.auto import tqdm

    from larimar.eval.report import timing_markdown

    times: dict[str, list[float]] = {}
    errors: dict[str, str] = {}

    def save() -> dict[str, Any]:
        summary = timing_summary(times, errors, reference=reference)
        if out_dir is not None:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out / "summary.json", summary)
            atomic_write_json(out / "times.json", {"n_edits": len(requests), "times": times, "errors": errors})
            atomic_write_text(out / "summary.md", timing_markdown(summary))
        return summary

    for name in tqdm(list(factories), desc="timing", unit="method", disable=not progress):
        log.info("timing %s ...", name)
        editor = None
        try:
            editor = factories[name]()
            times[name] = time_edits(editor, requests, clock=clock, warmup=warmup)
            log.info("timing %s: median %.4f s per edit over %d edits", name, statistics.median(times[name]), len(requests))
        except Exception as exc:  # noqa: BLE001 - report and go on with the other methods
            log.warning("timing %s failed: %s", name, exc, exc_info=True)
            errors[name] = f"{type(exc).__name__}: {exc}"
            if editor is not None:
                try:
                    editor.reset()
                except Exception:  # noqa: BLE001
                    log.warning("reset of %s failed", name, exc_info=True)
        finally:
            del editor
            gc.collect()
        save()  # after every method, so that an interrupted run keeps what it measured
    return save()
