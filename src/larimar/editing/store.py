"""Fact-level memory: the episodic memory state plus a ledger of what was written, saved safely to disk.

The ledger keeps, for every written fact, its text, the exact latent z that went into memory (so
forgetting subtracts exactly what was added, Eq. 6, whatever the encoder's batching did), the latent
its addresses came from (z itself, or its key for a keyed write), and for the scope detector its
sentence embedding and the text of its key (the prompt of a keyed write, else the text itself).
Every operation returns a new `FactMemory`; a failed call changes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from larimar.memory import MemoryState, allocate_key_slots

FORMAT = "larimar-fact-memory"
FORMAT_VERSION = 1


class FactNotFoundError(KeyError):
    """Forgetting a text that is not in memory."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "fact not found"


class MemoryFileError(ValueError):
    """A saved memory directory is missing, corrupt, or does not fit this model."""


@dataclass
class FactMemory:
    state: MemoryState
    texts: list[str] = field(default_factory=list)
    Z: torch.Tensor | None = None  # (N, C) latents written, in state dtype
    E: torch.Tensor | None = None  # (N, H) sentence embeddings for the scope detector
    keys: torch.Tensor | None = None  # (N, C) latents the write addresses came from (rows equal Z unless keyed)
    allocate_slots: bool = False  # key slots: each new key of a keyed write claims a free slot first
    slot_assigned: torch.Tensor | None = None  # (K,) bool, with allocate_slots: rows that are keys (not sentinels)
    key_texts: list[str] | None = None  # per fact, the text it is keyed by (its prompt); None: the texts themselves

    def __post_init__(self) -> None:
        if self.keys is None and self.Z is not None:  # built without keys: every fact addressed itself
            self.keys = self.Z
        if self.key_texts is None:
            self.key_texts = list(self.texts)
        elif len(self.key_texts) != len(self.texts):
            raise ValueError(f"FactMemory: {len(self.texts)} texts but {len(self.key_texts)} key texts")
        if self.allocate_slots and self.slot_assigned is None:
            self.slot_assigned = torch.zeros(self.state.K, dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.texts)

    def write(
        self, texts: list[str], Z: torch.Tensor, E: torch.Tensor, keys: torch.Tensor | None = None, key_texts: list[str] | None = None
    ) -> "FactMemory":
        """Write N facts (Z: (N, C), E: (N, H)) as one episode; returns the new FactMemory.

        `keys` (N, C): a keyed write, W = address(keys) instead of address(Z): each fact is stored
        under its key's address (e.g. the latent of the prompt that should recall it), and
        `key_texts` (N texts, default `texts`) are the keys' texts. With
        `allocate_slots` (key slots, Gaussian addressing) each new key first claims an unused slot
        (:func:`larimar.memory.allocate_key_slots`).
        """
        if Z.shape[0] != len(texts) or E.shape[0] != len(texts):
            raise ValueError(f"write: {len(texts)} texts but Z has {Z.shape[0]} rows and E {E.shape[0]}")
        key_texts = list(texts) if key_texts is None else list(key_texts)
        if len(key_texts) != len(texts):
            raise ValueError(f"write: {len(texts)} texts but {len(key_texts)} key texts")
        if keys is not None and keys.shape != Z.shape:
            raise ValueError(f"write: keys must have the shape of Z {tuple(Z.shape)}, got {tuple(keys.shape)}")
        Z = Z.detach().to(self.state.dtype)
        K = Z if keys is None else keys.detach().to(self.state.dtype)
        state, assigned = self.state, self.slot_assigned
        if self.allocate_slots and keys is not None:
            state, slots = allocate_key_slots(state, K, self.keys, free=~assigned)
            if slots.numel():
                assigned = assigned.clone()
                assigned[slots] = True
        new_state = state.write(Z, None if keys is None else state.address(K))
        E = E.detach().float()
        return FactMemory(
            new_state,
            self.texts + list(texts),
            Z if self.Z is None else torch.cat([self.Z, Z]),
            E if self.E is None else torch.cat([self.E, E]),
            K if self.keys is None else torch.cat([self.keys, K]),
            self.allocate_slots,
            assigned,
            self.key_texts + key_texts,
        )

    def find(self, texts: list[str]) -> list[int]:
        """Ledger rows for `texts` (one row per occurrence asked for); raises FactNotFoundError naming what is missing."""
        available = Counter(self.texts)
        wanted = Counter(texts)
        missing = [t for t, n in wanted.items() if available[t] < n]
        if missing:
            shown = ", ".join(repr(t) for t in missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise FactNotFoundError(f"cannot forget {len(missing)} text(s) never written (or already forgotten): {shown}")
        rows, used = [], Counter()
        for t in texts:  # the latest occurrences are removed first
            occurrences = [i for i, s in enumerate(self.texts) if s == t]
            rows.append(occurrences[-1 - used[t]])
            used[t] += 1
        return rows

    def forget(self, texts: list[str]) -> "FactMemory":
        """Remove facts exactly (alpha = -1 with the latents they were written with)."""
        rows = self.find(texts)
        new_state = self.state.forget(self.Z[rows], self.state.address(self.keys[rows]))
        removed = set(rows)
        keep = [i for i in range(len(self.texts)) if i not in removed]
        return FactMemory(
            new_state,
            [self.texts[i] for i in keep],
            self.Z[keep] if keep else None,
            self.E[keep] if keep else None,
            self.keys[keep] if keep else None,
            self.allocate_slots,
            self.slot_assigned,
            [self.key_texts[i] for i in keep],
        )

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> None:
        """Save to a directory atomically: a failed save leaves any existing directory untouched."""
        from safetensors.torch import save_file

        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            self.state.save(tmp / "memory.safetensors")
            tensors = {}
            if self.Z is not None:
                tensors = {"Z": self.Z.contiguous().cpu(), "E": self.E.contiguous().cpu()}
                if not torch.equal(self.keys, self.Z):
                    tensors["keys"] = self.keys.contiguous().cpu()
            meta = {"format": FORMAT, "version": str(FORMAT_VERSION), "texts": json.dumps(self.texts)}
            if self.key_texts != self.texts:
                meta["key_texts"] = json.dumps(self.key_texts)
            if self.allocate_slots:
                meta["allocate_slots"] = "true"
                tensors["slot_assigned"] = self.slot_assigned.to(torch.uint8).contiguous().cpu()
            save_file(tensors, str(tmp / "facts.safetensors"), metadata=meta)
            backup = None
            if target.exists():
                backup = target.with_name(f".{target.name}.old")
                shutil.rmtree(backup, ignore_errors=True)
                os.replace(target, backup)
            os.replace(tmp, target)
            if backup is not None:
                shutil.rmtree(backup, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, directory: str | Path, *, expect_C: int | None = None, expect_K: int | None = None) -> "FactMemory":
        from safetensors import safe_open

        d = Path(directory)
        if not d.is_dir():
            raise MemoryFileError(f"{d}: no saved memory directory there")
        for name in ("memory.safetensors", "facts.safetensors"):
            if not (d / name).is_file():
                raise MemoryFileError(f"{d}: {name} is missing")
        state = MemoryState.load(d / "memory.safetensors")
        K, C = state.M.shape[-2:]
        if expect_C is not None and C != expect_C:
            raise MemoryFileError(f"{d}: memory rows have width C={C}, this model needs C={expect_C}")
        if expect_K is not None and K != expect_K:
            raise MemoryFileError(f"{d}: memory has K={K} rows, this model needs K={expect_K}")
        try:
            with safe_open(str(d / "facts.safetensors"), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises several types for corrupt files
            raise MemoryFileError(f"{d / 'facts.safetensors'}: unreadable ({exc})") from exc
        if meta.get("format") != FORMAT:
            raise MemoryFileError(f"{d / 'facts.safetensors'}: not a larimar fact file (format={meta.get('format')!r})")
        try:
            texts = json.loads(meta["texts"])
        except (KeyError, json.JSONDecodeError) as exc:
            raise MemoryFileError(f"{d / 'facts.safetensors'}: fact texts are missing or corrupt") from exc
        try:  # files written before key texts were kept, or with none differing from the texts: the texts
            key_texts = json.loads(meta["key_texts"]) if "key_texts" in meta else list(texts)
        except json.JSONDecodeError as exc:
            raise MemoryFileError(f"{d / 'facts.safetensors'}: key texts are corrupt") from exc
        if not isinstance(key_texts, list) or len(key_texts) != len(texts) or not all(isinstance(t, str) for t in key_texts):
            raise MemoryFileError(f"{d / 'facts.safetensors'}: {len(texts)} texts but key texts do not match them")
        Z, E = tensors.get("Z"), tensors.get("E")
        n = 0 if Z is None else Z.shape[0]
        if n != len(texts) or (E is not None and E.shape[0] != n):
            raise MemoryFileError(f"{d}: {len(texts)} texts but {n} stored latents")
        if Z is not None and Z.shape[1] != C:
            raise MemoryFileError(f"{d}: stored latents have width {Z.shape[1]}, memory has C={C}")
        keys = tensors.get("keys", Z)  # files without keys (or with only auto-associative writes): keys are Z
        if keys is not None and (Z is None or keys.shape != Z.shape):
            raise MemoryFileError(f"{d}: stored keys do not match the stored latents")
        allocate = meta.get("allocate_slots", "false")
        if allocate not in ("true", "false"):
            raise MemoryFileError(f"{d / 'facts.safetensors'}: allocate_slots must be true or false, got {allocate!r}")
        if allocate == "true" and state.addressing != "gaussian":
            raise MemoryFileError(f"{d}: key slots need 'gaussian' addressing, the memory uses {state.addressing!r}")
        assigned = tensors.get("slot_assigned")
        if allocate == "true":
            if assigned is None or tuple(assigned.shape) != (K,):
                raise MemoryFileError(f"{d}: key slots need a slot_assigned mask of K={K} entries")
            assigned = assigned.bool()
        return cls(state, texts, Z, E, keys, allocate == "true", assigned if allocate == "true" else None, key_texts)
