"""Sentence encoder: any HF encoder -> pooled sentence embedding -> linear head -> latent z (size C)."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn


class TextInputError(ValueError):
    """Empty, whitespace-only or otherwise unusable text."""


def check_texts(texts: list[str] | tuple[str, ...] | str, what: str = "texts") -> list[str]:
    """Normalise one text or a list of texts; reject empty/whitespace-only entries with a clear error."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise TextInputError(f"{what}: got an empty list")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TextInputError(f"{what}[{i}]: expected str, got {type(t).__name__}")
        if not t.strip():
            raise TextInputError(f"{what}[{i}]: empty or whitespace-only text")
    return texts


def tokenize_truncating(tokenizer, texts: list[str], max_tokens: int, who: str, **kwargs):
    """Tokenise with truncation at `max_tokens`, warning (naming the limit) when anything is cut."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt", **kwargs)
    if enc["input_ids"].shape[1] >= max_tokens:
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
        cut = [i for i, n in enumerate(lengths) if n > max_tokens]
        if cut:
            warnings.warn(
                f"{who}: {len(cut)} text(s) longer than {max_tokens} tokens were truncated "
                f"(first: index {cut[0]}, {lengths[cut[0]]} tokens)",
                stacklevel=3,
            )
    return enc


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted name, ModuleList) of the transformer blocks of an HF encoder: the first ModuleList
    holding `config.num_hidden_layers` blocks (BERT: `encoder.layer`)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and n:
            return name, module
    raise ValueError(f"{type(model).__name__}: no list of {n} transformer blocks found (value encoder layers need one)")


class LatentEncoder(nn.Module):
    """HF encoder + pooling + linear head.

    `embed(texts)` -> (N, H) pooled sentence embeddings (used by the scope detector);
    `forward(texts)` / `encode(texts)` -> (N, C) latents z written to / read from memory.

    `value_layers` > 0 adds a *value encoder*: a copy of the encoder whose top `value_layers`
    blocks are trainable (the rest stay the frozen base weights), used only for the values of value
    writes (`encode_values`). Keys, queries and the scope detector keep the frozen geometry, which
    fine-tuning the shared encoder for spelling destroys (README, stage 1c).
    """

    def __init__(
        self, model: nn.Module, tokenizer, latent_size: int, *, pooling: str = "mean", max_tokens: int = 128, value_layers: int = 0
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_tokens = max_tokens
        hidden = model.config.hidden_size
        self.head = nn.Linear(hidden, latent_size)
        # start as (close to) the identity when sizes agree, so an untrained head keeps the encoder geometry
        with torch.no_grad():
            if hidden == latent_size:
                self.head.weight.copy_(torch.eye(hidden))
            else:
                nn.init.orthogonal_(self.head.weight)
            self.head.bias.zero_()
        self.value_model: nn.Module | None = None
        self.value_prefixes: tuple[str, ...] = ()
        if value_layers > 0:
            name, blocks = layer_stack(model)
            if value_layers > len(blocks):
                raise ValueError(f"value_layers={value_layers}, but the encoder has {len(blocks)} blocks")
            self.value_model = copy.deepcopy(model)
            self.value_prefixes = tuple(f"{name}.{i}." for i in range(len(blocks) - value_layers, len(blocks)))
            for pname, p in self.value_model.named_parameters():
                p.requires_grad_(pname.startswith(self.value_prefixes))

    def is_value_weight(self, name: str) -> bool:
        """Whether `name` (relative to this module) is a trainable value-encoder weight (saved in adapters)."""
        return name.startswith("value_model.") and name[len("value_model.") :].startswith(self.value_prefixes)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def tokenize(self, texts: list[str]):
        enc = tokenize_truncating(self.tokenizer, texts, self.max_tokens, "encoder")
        return {k: v.to(self.device) for k, v in enc.items()}

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, model: nn.Module | None = None, **extra) -> torch.Tensor:
        """(N, T) token ids -> (N, H) pooled hidden states (of `model`, default the frozen encoder)."""
        model = self.model if model is None else model
        hidden = model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state  # (N, T, H)
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (N, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def embed(self, texts: list[str], batch_size: int = 128, *, model: nn.Module | None = None) -> torch.Tensor:
        """(N,) texts -> (N, H) pooled sentence embeddings, no head (`model`: default the frozen encoder).

        Texts are batched in order of length (less padding), results returned in input order.
        """
        texts = check_texts(texts)
        if len(texts) <= batch_size:
            return self.pool(**self.tokenize(texts), model=model)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenize([texts[j] for j in order[i : i + batch_size]])
            out.append(self.pool(**enc, model=model))
        pooled = torch.cat(out)  # (N, H) in length order
        return pooled[torch.argsort(torch.tensor(order, device=pooled.device))]

    def forward(self, texts: list[str], batch_size: int = 128) -> torch.Tensor:
        """(N,) texts -> (N, C) latents z."""
        return self.head(self.embed(texts, batch_size=batch_size))

    def encode_with_embedding(self, texts: list[str], batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        """One encoder pass giving both (N, C) latents and (N, H) pooled embeddings."""
        e = self.embed(texts, batch_size=batch_size)
        return self.head(e), e

    def encode_values(self, texts: list[str], batch_size: int = 128) -> torch.Tensor:
        """(N,) value texts -> (N, C) latents through the value encoder (the frozen encoder when there is none)."""
        return self.head(self.embed(texts, batch_size=batch_size, model=self.value_model))
