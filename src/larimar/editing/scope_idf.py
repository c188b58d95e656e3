"""`larimar scope-idf`: build the scope detector's IDF table from generic text and store it with a model.

Documents are the paragraphs (blocks separated by blank lines, at least 40 characters) of every .txt
file under --text; tokens are the model's encoder tokens. The table is written as
`scope_idf.json` into the model directory (loaded by `Larimar.from_pretrained`).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

MIN_PARAGRAPH_CHARS = 40


def paragraphs(root: str | Path) -> Iterator[str]:
    """Paragraphs of every .txt file under `root` (sorted by path). Raises FileNotFoundError if none."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*.txt") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{root}: no .txt files found")
    for path in files:
        for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace")):
            block = re.sub(r"\s+", " ", block).strip()
            if len(block) >= MIN_PARAGRAPH_CHARS:
                yield block


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", default=None, help="directory of .txt files (default: the shared data's text/)")
    p.add_argument("--model", default=None, help="saved Larimar directory to write scope_idf.json into (default: the shipped adapter's)")


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from larimar.demo import _quiet_transformers
    from larimar.editing.scope import build_idf
    from larimar.eval.data import default_data_dir
    from larimar.modeling.config import LarimarConfig
    from larimar.modeling.loading import resolve_encoder
    from larimar.modeling.model import CONFIG_FILE, adapter_dir, save_scope_idf

    _quiet_transformers()
    directory = adapter_dir(args.model or None)
    if not (directory / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_FILE} (not a saved Larimar model)")
    # only the encoder's tokenizer is needed, not the models
    tokenizer = AutoTokenizer.from_pretrained(resolve_encoder(LarimarConfig.load(directory / CONFIG_FILE).encoder))
    text = Path(args.text) if args.text else default_data_dir() / "text"
    docs = list(paragraphs(text))
    idf = build_idf(docs, tokenizer.tokenize)
    path = save_scope_idf(directory, idf)
    print(f"{path}: {len(idf) - 1} tokens from {len(docs)} paragraphs of {text}")
    return 0
