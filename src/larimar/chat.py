"""`larimar chat`: an interactive loop to add, forget and ask.

    + TEXT        write a fact           - TEXT      forget a fact (exact text)
    + PROMPT | ANSWER   write a fact keyed by its prompt, storing its answer (the shipped
                        adapter spells rare answers this way); - PROMPT | ANSWER forgets it
    ? TEXT / TEXT ask (generate)         :list       show stored facts
    :save DIR     save the memory        :load DIR   load a saved memory
    :reset        empty the memory       :quit       leave
"""

from __future__ import annotations

import argparse
import sys
import time

from larimar.modeling.config import MODEL_HELP

HELP = __doc__.split("\n", 2)[2]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--memory", default=None, help="load this saved memory directory at start")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--whole", action="store_true",
                   help="show whole continuations; by default each answer ends at its first sentence end")


def parse_fact(text: str) -> tuple[str, str | None]:
    """"PROMPT | ANSWER" -> ("PROMPT ANSWER", "PROMPT"); a text without "|" -> (text, None)."""
    if "|" not in text:
        return text.strip(), None
    prompt, _, answer = text.partition("|")
    prompt, answer = prompt.strip(), answer.strip()
    if not prompt or not answer:
        raise ValueError(f"expected 'PROMPT | ANSWER' with both parts non-empty, got {text.strip()!r}")
    return f"{prompt} {answer}", prompt


def handle(model, line: str, max_new_tokens: int, out=print, stop_after_answer: bool = True) -> bool:
    """Execute one chat line; returns False when the user asked to quit."""
    from larimar.editing.store import FactNotFoundError, MemoryFileError
    from larimar.modeling.encoder import TextInputError

    line = line.strip()
    if not line:
        return True
    try:
        if line in (":quit", ":q", ":exit"):
            return False
        if line == ":help":
            out(HELP)
        elif line == ":list":
            out("\n".join(f"  {i}. {t}" for i, t in enumerate(model.facts.texts)) or "  (memory is empty)")
        elif line == ":reset":
            model.reset_memory()
            out("  memory emptied")
        elif line.startswith(":save "):
            model.save_memory(line[6:].strip())
            out(f"  saved {len(model)} fact(s)")
        elif line.startswith(":load "):
            model.load_memory(line[6:].strip())
            out(f"  loaded {len(model)} fact(s)")
        elif line.startswith("+"):
            text, prompt = parse_fact(line[1:])
            t = time.perf_counter()
            if prompt is None:
                model.write([text])
            else:
                model.write_facts([text], [prompt])
            out(f"  written ({(time.perf_counter() - t) * 1000:.1f} ms); {len(model)} fact(s) in memory")
            if prompt is None and model.config.keyed_writes:
                out("  (stored by its own meaning; '+ PROMPT | ANSWER' keys a fact by the question you will ask and stores its answer)")
        elif line.startswith("-"):
            text, _ = parse_fact(line[1:])
            t = time.perf_counter()
            model.forget([text])
            out(f"  forgotten ({(time.perf_counter() - t) * 1000:.1f} ms); {len(model)} fact(s) in memory")
        elif line.startswith(":"):
            out(f"  unknown command {line.split()[0]!r}; :help lists them")
        else:
            query = line[1:].strip() if line.startswith("?") else line
            g = model.generate([query], max_new_tokens=max_new_tokens, return_details=True, stop_after_answer=stop_after_answer)[0]
            route = f"memory, scope {g.scope_score:.2f}" if g.used_memory else "plain"
            out(f"  {query} {g.text.strip()}   [{route}]")
    except (TextInputError, FactNotFoundError, MemoryFileError, ValueError, OSError) as exc:
        out(f"  error: {exc}")
    return True


def run(args: argparse.Namespace) -> int:
    from larimar.demo import _quiet_transformers
    from larimar.modeling.model import Larimar

    _quiet_transformers()
    model = Larimar.from_pretrained(args.model)
    if args.memory:
        model.load_memory(args.memory)
    if not model.config.trained:
        print("NOTE: untrained adapter: memory-conditioned answers will not follow the facts yet.")
    print("Larimar chat. :help for commands.")
    for line in sys.stdin if not sys.stdin.isatty() else iter(lambda: input("> "), None):
        if not handle(model, line, args.max_new_tokens, stop_after_answer=not args.whole):
            break
    return 0
