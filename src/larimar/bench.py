"""`larimar bench {memory,model}`: speed benchmarks.

Only argparse/json are imported at module level (the CLI imports this module at start-up); torch
and the memory engine are imported inside :func:`run`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from larimar.modeling.config import MODEL_HELP

_EPILOG = """\
memory target — ops timed (float32, reference addressing, λ = 1, a 64-row episode and 32 single
facts already written), median over --repeats after one warm-up call, and what "naive" means per op:
  write_oneshot  Algorithm 1 write of N = K rows with the cached M0^† and the factored SVD
                 pseudo-inverse of W0;  naive: torch.linalg.pinv(M0) and torch.linalg.pinv(W0)
                 recomputed, no caching.
  write_seq      one fact (N = 1) written with the O(K^2) rank-1 update (MemoryState.write reads
                 the K x K bases and appends to its low-rank log; the fold every 64 rows is
                 amortised, so it shows in write_seq_xN, not in this median);  naive:
                 A = λI + ΣWᵀW updated, then Cov = torch.linalg.inv(A) and M = Cov·B
                 recomputed from scratch (O(K^3)).
  forget         one previously written fact removed (α = -1), same update;  naive: as write_seq
                 with A - wᵀw.
  read           one query, W = z·M_ref^† with the cached pseudo-inverse, z_r = W·M;  naive:
                 torch.linalg.pinv(M_ref) recomputed for the query.
  write_slot     one fact written into key slots (Gaussian addressing, λ = 0.01, min(96, K-1) held):
                 its new key claims a free slot (larimar.memory.allocate_key_slots checks the
                 slot is unused and that no held key's address moves), then the rank-1 write;
                 no naive measurement (null).
  write_seq_xN   N (--seq-writes, default 1000) sequential single-fact writes at --seq-size
                 (default K=1000, C=768); median_ms is the total; no naive measurement (null).
Slow measurements get fewer samples: at most --budget seconds each after the first call (the
K=4096 naive write_oneshot, ~10 s a call on 2 cores, is timed once). Timings on a machine busy
with other work are unreliable; a warning is printed to stderr when the load average exceeds the
CPU count.

model target — a model (--model; default: the shipped adapter) on an empty memory, two write paths:
  texts  model.write(texts): the paper's auto-associative write; one text (median ms) and 1000 in
         batches of 100 (texts/s); then one stored fact's prompt, 10 tokens, through memory vs plain.
  facts  model.write_facts(texts, prompts): keyed by the prompt, the value (and its token code)
         stored as the model's config says, as the editors and `larimar chat` write; same timings.
  Targets: one write <= 30 ms, >= 300 per s in batches, memory path <= 1.10x plain decoding.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `bench` sub-command's arguments on ``parser``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = "Speed benchmarks of the memory engine or the model."
    parser.epilog = _EPILOG
    parser.add_argument("target", choices=["memory", "model"], help="what to benchmark")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument(
        "--repeats", type=int, default=20, help="timed calls per measurement, median reported (default 20)"
    )
    parser.add_argument(
        "--ks", default="512,1000,4096", help="memory sizes K, comma separated (default 512,1000,4096)"
    )
    parser.add_argument("--cs", default="384,768", help="code sizes C, comma separated (default 384,768)")
    parser.add_argument(
        "--seq-writes", type=int, default=1000, help="writes in the write_seq_xN row (0 to skip; default 1000)"
    )
    parser.add_argument("--seq-size", default="1000,768", help="K,C of the write_seq_xN row (default 1000,768)")
    parser.add_argument(
        "--budget",
        type=float,
        default=5.0,
        help="seconds allowed per measurement after its first call; caps the repeats (default 5)",
    )
    parser.add_argument(
        "--model", default=None, help=MODEL_HELP
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all usable CPUs)")


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"larimar bench: {name} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise SystemExit(f"larimar bench: {name} must list positive integers, got {text!r}")
    return values


def run(args: argparse.Namespace) -> int:
    """Run the benchmark selected by ``args.target``; returns the exit code."""
    if args.target == "model":
        import importlib

        try:
            model_bench = importlib.import_module("larimar.modeling.bench")  # written by the modeling side
        except ModuleNotFoundError as e:
            if e.name in ("larimar.modeling.bench", "larimar.modeling"):
                print("larimar bench model: larimar.modeling.bench is not available in this install", file=sys.stderr)
                return 2
            raise
        return int(model_bench.run_model_bench(args) or 0)
    if args.repeats < 1:
        raise SystemExit("larimar bench: --repeats must be >= 1")
    seq_size = _ints(args.seq_size, "--seq-size")
    if len(seq_size) != 2:
        raise SystemExit(f"larimar bench: --seq-size must be K,C, got {args.seq_size!r}")
    rows = run_memory_bench(
        ks=_ints(args.ks, "--ks"),
        cs=_ints(args.cs, "--cs"),
        repeats=args.repeats,
        seq_writes=max(0, args.seq_writes),
        seq_size=(seq_size[0], seq_size[1]),
        budget=args.budget,
        threads=args.threads,
        progress=None if args.json else sys.stderr,
    )
    if args.json:
        print(json.dumps({"rows": rows}))
    else:
        print(format_table(rows))
    return 0


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _time_ms(fn: Callable[[], Any], repeats: int, budget_s: float | None = None) -> float:
    """Median wall time (ms) of ``fn`` over up to ``repeats`` calls after one warm-up call.

    With ``budget_s`` the number of timed calls is capped at ``budget_s / t_first``; a first call
    slower than 1 s (or one that exhausts the budget) is itself used as a sample.
    """
    import time

    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    samples: list[float] = []
    n = repeats
    if budget_s is not None:
        n = min(repeats, int(budget_s / max(first, 1e-9)))
        if first > 1.0 or n < 1:
            samples.append(first)
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return 1e3 * _median(samples)


def run_memory_bench(
    *,
    ks: list[int],
    cs: list[int],
    repeats: int = 20,
    seq_writes: int = 1000,
    seq_size: tuple[int, int] = (1000, 768),
    budget: float = 5.0,
    threads: int | None = None,
    progress: Any = None,
) -> list[dict[str, Any]]:
    """Time the memory operations (see the sub-command epilog); returns the result rows."""
    import os

    import torch

    from larimar.memory import MemoryState, allocate_key_slots, key_slot_reference, random_reference
    from larimar.memory import write as oneshot_write

    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, threads))
    if hasattr(os, "getloadavg"):
        load = os.getloadavg()[0]
        cpus = os.cpu_count() or 1
        if load > cpus:
            print(
                f"larimar bench: warning: machine busy (load average {load:.1f} on {cpus} CPUs); "
                "timings will be inflated (multi-threaded kernels stall when a core is taken; "
                "--threads 1 is more robust then)",
                file=sys.stderr,
            )
    dtype = torch.float32
    lam = 1.0
    rows: list[dict[str, Any]] = []

    def log(msg: str) -> None:
        if progress is not None:
            print(msg, file=progress, flush=True)

    def setup(K: int, C: int, gen: torch.Generator) -> MemoryState:
        # a 64-row episode (folded into the bases) plus 32 single facts still in the low-rank log,
        # i.e. a state in the middle of its fold cycle
        M_ref = random_reference(K, C, generator=gen, dtype=dtype)
        state = MemoryState.init(M_ref, lam=lam).write(torch.randn(64, C, generator=gen, dtype=dtype))
        for z in torch.randn(32, 1, C, generator=gen, dtype=dtype):
            state = state.write(z)
        return state

    with torch.inference_mode():
        for K in ks:
            for C in cs:
                log(f"bench memory: K={K} C={C}")
                gen = torch.Generator().manual_seed(0)
                state0 = setup(K, C, gen)
                M_ref, P = state0.M_ref, state0.M_ref_pinv
                Z = torch.randn(K, C, generator=gen, dtype=dtype)
                z = torch.randn(1, C, generator=gen, dtype=dtype)
                q = torch.randn(1, C, generator=gen, dtype=dtype)
                state1 = state0.write(z)
                A0, B0, A1, B1 = state0.precision, state0.moment, state1.precision, state1.moment

                def naive_oneshot() -> torch.Tensor:
                    W0 = Z @ torch.linalg.pinv(M_ref)
                    return torch.linalg.pinv(W0) @ Z

                def naive_seq(A_old: torch.Tensor, B_old: torch.Tensor, sign: float) -> tuple[torch.Tensor, ...]:
                    w_ = z @ P  # same addressing as the fast path
                    A = torch.addmm(A_old, w_.mT, w_, alpha=sign)
                    B = torch.addmm(B_old, w_.mT, z, alpha=sign)
                    cov = torch.linalg.inv(A)
                    return cov @ B, cov

                def naive_read() -> torch.Tensor:
                    return (q @ torch.linalg.pinv(M_ref)) @ state1.M

                ops = [
                    (
                        "write_oneshot",
                        K,
                        lambda: oneshot_write(Z, M_ref, M0_pinv=P),
                        naive_oneshot,
                    ),
                    ("write_seq", 1, lambda: state0.write(z), lambda: naive_seq(A0, B0, 1.0)),
                    ("forget", 1, lambda: state1.forget(z), lambda: naive_seq(A1, B1, -1.0)),
                    ("read", 1, lambda: state1.read(q), naive_read),
                ]
                for op, N, fast, naive in ops:
                    fast_ms = _time_ms(fast, repeats, budget_s=budget)
                    naive_ms = _time_ms(naive, repeats, budget_s=budget)
                    rows.append(
                        {"op": op, "K": K, "C": C, "N": N, "median_ms": round(fast_ms, 4), "naive_median_ms": round(naive_ms, 4)}
                    )
                    log(f"  {op:14s} {fast_ms:10.3f} ms   naive {naive_ms:10.3f} ms")

                # key slots: one new key claims a free slot (allocate_key_slots: unused-slot check,
                # held keys re-addressed) and its fact is written there
                held = min(96, K - 1)  # facts already in memory; one slot stays free
                first = min(64, held)
                keys = torch.randn(held + 1, C, generator=gen, dtype=dtype)
                values = torch.randn(held + 1, C, generator=gen, dtype=dtype)
                slots = MemoryState.init(
                    key_slot_reference(keys[:0], K, scale=10.0 * C**0.5), lam=0.01, addressing="gaussian", gaussian_alpha=0.1
                )
                slots, _ = allocate_key_slots(slots, keys[:first])
                slots = slots.write(values[:first], slots.address(keys[:first]))
                for i in range(first, held):
                    slots, _ = allocate_key_slots(slots, keys[i : i + 1], keys[:i])
                    slots = slots.write(values[i : i + 1], slots.address(keys[i : i + 1]))

                def slot_write(st: MemoryState = slots) -> MemoryState:
                    st, _ = allocate_key_slots(st, keys[held:], keys[:held])
                    return st.write(values[held:], st.address(keys[held:]))

                slot_ms = _time_ms(slot_write, repeats, budget_s=budget)
                rows.append({"op": "write_slot", "K": K, "C": C, "N": 1, "median_ms": round(slot_ms, 4), "naive_median_ms": None})
                log(f"  {'write_slot':14s} {slot_ms:10.3f} ms")

        if seq_writes > 0:
            K, C = seq_size
            log(f"bench memory: {seq_writes} sequential writes, K={K} C={C}")
            gen = torch.Generator().manual_seed(1)
            start = MemoryState.init(random_reference(K, C, generator=gen, dtype=dtype), lam=lam)
            Zs = torch.randn(seq_writes, 1, C, generator=gen, dtype=dtype)

            def many() -> MemoryState:
                st = start
                for i in range(seq_writes):
                    st = st.write(Zs[i])
                return st

            total_ms = _time_ms(many, max(1, min(repeats, 3)), budget_s=budget)
            rows.append(
                {"op": f"write_seq_x{seq_writes}", "K": K, "C": C, "N": seq_writes, "median_ms": round(total_ms, 3), "naive_median_ms": None}
            )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Aligned text table of benchmark rows, with a naive/fast speed-up column."""
    header = ("op", "K", "C", "N", "median_ms", "naive_ms", "speedup")
    lines = []
    for r in rows:
        naive = r.get("naive_median_ms")
        speed = f"{naive / r['median_ms']:.1f}x" if naive is not None and r["median_ms"] > 0 else "-"
        lines.append(
            (
                r["op"],
                str(r["K"]),
                str(r["C"]),
                str(r["N"]),
                f"{r['median_ms']:.3f}",
                "-" if naive is None else f"{naive:.3f}",
                speed,
            )
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    out.append("  ".join("-" * w for w in widths))
    for line in lines:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
    return "\n".join(out)
