"""LarimarConfig: everything needed to rebuild a Larimar model around its (referenced) base models."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ADDRESSING_MODES = ("reference", "current", "gaussian")
POOLING_MODES = ("mean", "cls")
VALUE_CODES = ("encoder", "tokens", "both")
SCOPE_LEXICAL_TEXTS = ("text", "key")
M_PRIOR_MODES = ("zero", "reference")
# adapters shipped in the package (src/larimar/assets/NAME), loadable by name: the default (latent + token
# code), "latent" (its latents alone), "pair" (the default of sessions 14-17, whose code matches token pairs),
# "tokens" (a token code alone)
SHIPPED_ADAPTERS = ("default", "latent", "pair", "tokens")
MODEL_HELP = "Larimar model directory, or a shipped adapter's name: " + ", ".join(SHIPPED_ADAPTERS) + " (default: default)"


@dataclass
class LarimarConfig:
    """Hyper-parameters of a Larimar model.

    Names follow the paper: K memory rows, C latent size (row width), P prefix slots per layer.
    `encoder` / `decoder` are HF names or paths; `None` means the offline defaults
    (MiniLM-L6 and SmolLM2-135M-Instruct from their wheels).
    """

    encoder: str | None = None
    decoder: str | None = None
    latent_size: int = 384  # C
    memory_size: int = 512  # K
    pooling: str = "mean"
    # conditioning (paper §5: z_r -> W_M -> per-layer key/value prefix)
    prefix_len: int = 8  # P
    prefix_hidden: int = 256  # bottleneck of W_M (per slot)
    prefix_init_text: str = "\n"  # prefix starts as the decoder's own K/V of this text (see KVPrefix)
    embedding_offset: bool = True  # the official code's extra per-token embedding offset from z_r
    output_offset: bool = False  # gated offset on the final hidden state (OutputOffset; our addition)
    output_hidden: int = 1024  # inner width of the output offset's MLP
    output_heads: int = 1  # gated heads of the output offset (> 1: one per answer position, see OutputOffset)
    # memory
    addressing: str = "reference"
    memory_prior: str = "zero"
    ridge: float = 1e-3  # λ: prior precision of the sequential memory (C_0 = λI)
    gaussian_alpha: float = 1.0
    pinv_method: str = "svd"
    sigma_w: float = 0.0  # read-time noise on W (robustness experiments)
    keyed_writes: bool = False  # editors that know each fact's prompt address the fact by the prompt's latent
    value_writes: bool = False  # keyed writes store the fact's value (text after the prompt), not the whole fact
    value_encoder_layers: int = 0  # > 0: values are encoded by a copy of the encoder whose top N blocks are trained (LatentEncoder)
    # how a value is stored (our extensions): "encoder" its latent (its meaning); "tokens" a code of its decoder
    # tokens (its spelling, TokenValueCode); "both" a memory row of width 2C holding the two side by side
    value_code: str = "encoder"
    value_code_slots: int = 8  # tokens per token code, the end token included
    value_code_end: str = "\n"  # the token a token code ends with (after it the code starts over)
    # tokens read before the last one that decoding a code matches (TokenValueCode: 1, a pair, as before
    # session 17; up to value_code_slots - 2, the whole answer read so far)
    value_code_depth: int = 1
    code_gate_floor: float = 0.0  # "both": a read-out whose code gate is below this reads no code (0: every gate counts)
    # scope detector (paper §4)
    scope_threshold: float = 0.65  # near the equal-error point on CounterFact dev (larimar scope)
    use_scope_detector: bool = True
    scope_lexical_weight: float = 0.0  # λ: score = (1-λ)·cosine + λ·IDF-weighted token recall (ScopeDetector)
    # whose tokens the recall counts: "text" the fact's text; "key" the text the fact was keyed by (the prompt of a
    # keyed write, which a query can repeat; the answer after it never is), the fact's text when written without a key
    scope_lexical_text: str = "text"
    # text limits
    max_encoder_tokens: int = 128
    max_decoder_tokens: int = 512
    # bookkeeping
    trained: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name, value, allowed in (
            ("addressing", self.addressing, ADDRESSING_MODES),
            ("pooling", self.pooling, POOLING_MODES),
            ("memory_prior", self.memory_prior, M_PRIOR_MODES),
        ):
            if value not in allowed:
                raise ValueError(f"LarimarConfig.{name}={value!r}: expected one of {allowed}")
        for name in ("latent_size", "memory_size", "prefix_len", "prefix_hidden", "output_hidden", "output_heads", "max_encoder_tokens"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"LarimarConfig.{name} must be positive, got {getattr(self, name)}")
        if self.value_code not in VALUE_CODES:
            raise ValueError(f"LarimarConfig.value_code={self.value_code!r}: expected one of {VALUE_CODES}")
        if self.value_code != "encoder" and int(self.value_code_slots) < 2:
            raise ValueError(f"LarimarConfig.value_code_slots must be >= 2, got {self.value_code_slots}")
        if self.value_code != "encoder" and not 0 <= int(self.value_code_depth) <= int(self.value_code_slots) - 2:
            raise ValueError(
                f"LarimarConfig.value_code_depth must be in 0..value_code_slots - 2 = {int(self.value_code_slots) - 2}, got {self.value_code_depth}"
            )
        if not 0.0 <= self.code_gate_floor <= 1.0:
            raise ValueError(f"LarimarConfig.code_gate_floor must be in [0, 1], got {self.code_gate_floor}")
        if self.value_code == "both" and self.addressing == "current":
            raise ValueError(
                "LarimarConfig: value_code 'both' addresses by the latent half of a row, which 'current' addressing "
                "(the pseudo-inverse of the whole memory) cannot do; use 'reference' or 'gaussian'"
            )
        if self.value_code == "tokens" and int(self.value_encoder_layers) > 0:
            raise ValueError("LarimarConfig: value_code 'tokens' replaces the value encoder; set value_encoder_layers to 0")
        if int(self.value_encoder_layers) < 0:
            raise ValueError(f"LarimarConfig.value_encoder_layers must be >= 0, got {self.value_encoder_layers}")
        if self.ridge <= 0:
            raise ValueError(f"LarimarConfig.ridge must be positive, got {self.ridge}")
        if not 0.0 <= self.scope_threshold <= 1.0:
            raise ValueError(f"LarimarConfig.scope_threshold must be in [0, 1], got {self.scope_threshold}")
        if not 0.0 <= self.scope_lexical_weight < 1.0:
            raise ValueError(f"LarimarConfig.scope_lexical_weight must be in [0, 1), got {self.scope_lexical_weight}")
        if self.scope_lexical_text not in SCOPE_LEXICAL_TEXTS:
            raise ValueError(f"LarimarConfig.scope_lexical_text={self.scope_lexical_text!r}: expected one of {SCOPE_LEXICAL_TEXTS}")

    @property
    def memory_width(self) -> int:
        """Width of a memory row: C, or 2C with value_code "both" (the value's latent, then its token code)."""
        return int(self.latent_size) * (2 if self.value_code == "both" else 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LarimarConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LarimarConfig keys: {unknown}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "LarimarConfig":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "LarimarConfig":
        return dataclasses.replace(self, **changes)
