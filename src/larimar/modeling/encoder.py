"""Sentence encoder: any HF encoder -> pooled sentence embedding -> linear head -> latent z (size C)."""

from __future__ import annotations

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


class LatentEncoder(nn.Module):
    """HF encoder + pooling + linear head.

    `embed(texts)` -> (N, H) pooled sentence embeddings (used by the scope detector);
    `forward(texts)` / `encode(texts)` -> (N, C) latents z written to / read from memory.
    """

    def __init__(self, model: nn.Module, tokenizer, latent_size: int, *, pooling: str = "mean", max_tokens: int = 128):
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

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def tokenize(self, texts: list[str]):
        enc = tokenize_truncating(self.tokenizer, texts, self.max_tokens, "encoder")
        return {k: v.to(self.device) for k, v in enc.items()}

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra) -> torch.Tensor:
        """(N, T) token ids -> (N, H) pooled hidden states."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state  # (N, T, H)
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (N, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def embed(self, texts: list[str], batch_size: int = 128) -> torch.Tensor:
        """(N,) texts -> (N, H) pooled sentence embeddings, no head.

        Texts are batched in order of length (less padding), results returned in input order.
        """
        texts = check_texts(texts)
        if len(texts) <= batch_size:
            return self.pool(**self.tokenize(texts))
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenize([texts[j] for j in order[i : i + batch_size]])
            out.append(self.pool(**enc))
        pooled = torch.cat(out)  # (N, H) in length order
        return pooled[torch.argsort(torch.tensor(order, device=pooled.device))]

    def forward(self, texts: list[str], batch_size: int = 128) -> torch.Tensor:
        """(N,) texts -> (N, C) latents z."""
        return self.head(self.embed(texts, batch_size=batch_size))

    def encode_with_embedding(self, texts: list[str], batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        """One encoder pass giving both (N, C) latents and (N, H) pooled embeddings."""
        e = self.embed(texts, batch_size=batch_size)
        return self.head(e), e
