"""Ablation adapters: the weights of adapter A, with some parts taken from adapter B instead.

    python scripts/mix_adapters.py runs/stage2/s6 src/larimar/assets/default runs/stage2/h1_offset1b --from-b out_offset
    python scripts/mix_adapters.py runs/stage2/s6 src/larimar/assets/default runs/stage2/h3_noprefix --from-b kv_prefix emb_offset

A part is a top-level name of the adapter state (kv_prefix, emb_offset, out_offset, encoder, M0, ...).
The result keeps A's config.json and scope_idf.json.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file


def mix(a: dict, b: dict, parts: list[str]) -> dict:
    """A's tensors, with those whose name starts with one of `parts` (+ ".") taken from B (which must hold them)."""
    out = {}
    for name, tensor in a.items():
        if name.split(".")[0] in parts:
            if name not in b:
                raise KeyError(f"{name}: not in adapter B")
            if b[name].shape != tensor.shape:
                raise ValueError(f"{name}: shape {tuple(b[name].shape)} in B, {tuple(tensor.shape)} in A")
            out[name] = b[name]
        else:
            out[name] = tensor
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("out")
    p.add_argument("--from-b", nargs="+", required=True, help="top-level parts taken from B")
    args = p.parse_args()
    a, b, out = Path(args.a), Path(args.b), Path(args.out)
    mixed = mix(load_file(str(a / "adapter.safetensors")), load_file(str(b / "adapter.safetensors")), args.from_b)
    out.mkdir(parents=True, exist_ok=True)
    save_file(mixed, str(out / "adapter.safetensors"), metadata={"format": "larimar-adapter"})
    for f in ("config.json", "scope_idf.json"):
        if (a / f).is_file():
            shutil.copy(a / f, out / f)
    print(f"wrote {out}: {', '.join(args.from_b)} from {b}, the rest from {a}")


if __name__ == "__main__":
    main()
