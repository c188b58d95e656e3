"""larimar: editable episodic memory for language models (command-line interface).

Every sub-command lives in its own module and registers itself here; imports are lazy so that
`larimar --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command name -> module exposing `add_arguments(parser)` and `run(args) -> int | None`
_COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("larimar.demo", "edit a real model's facts, then forget one, with timings"),
    "chat": ("larimar.chat", "interactive loop: add, forget and ask"),
    "bench": ("larimar.bench", "speed benchmarks (memory engine, model)"),
    "train": ("larimar.training.cli", "train the memory-decoder adapter (Lightning)"),
    "scope": ("larimar.eval.scope_eval", "scope detector EER / F1 on CounterFact"),
    "scope-idf": ("larimar.editing.scope_idf", "build the scope detector's IDF table from generic text"),
    "eval": ("larimar.eval.cli", "evaluation: CounterFact, ZsRE, batch editing, timing and the paper's other tables"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only `command`'s module is imported (all of them when None)."""
    parser = argparse.ArgumentParser(prog="larimar", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if command in (None, name):
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in _COMMANDS else "")
    args = parser.parse_args(argv)
    try:
        code = args._run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
