"""Loss terms of the Larimar objective (paper Eq. 1). Pure functions of tensors."""

from __future__ import annotations

import math

import torch


def cyclical_beta(step: int, total_steps: int, *, n_cycles: int = 10, beta_max: float = 0.5, zero_fraction: float = 0.5) -> float:
    """Cyclical KL weight (as the official code): each of `n_cycles` cycles holds 0 for its first
    `zero_fraction`, then ramps linearly to `beta_max` by the cycle's end."""
    if total_steps <= 0 or n_cycles <= 0:
        return beta_max
    period = total_steps / n_cycles
    pos = (step % period) / period  # in [0, 1)
    if pos < zero_fraction:
        return 0.0
    return beta_max * min(1.0, (pos - zero_fraction) / max(1e-8, 1.0 - zero_fraction))


def kl_to_standard_normal(mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, σ²I) || N(0, I)) per row, averaged over the K dimensions and the rows.

    mu: (..., K); log_sigma: scalar or broadcastable to mu. Per dimension:
    0.5·(σ² + μ² − 1) − log σ.
    """
    sigma2 = torch.exp(2 * log_sigma)
    kl = 0.5 * (sigma2 + mu.pow(2) - 1.0) - log_sigma
    return kl.mean()


def weighted_token_ce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean next-token cross-entropy.

    logits: (B, T, V) at positions 0..T-1; labels: (B, T) token ids (position t predicted from t-1);
    weights: (B, T) >= 0, 0 where ignored. Returns sum(w·CE) / sum(w).
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    target = labels[:, 1:].clamp(min=0)  # (B, T-1)
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    w = weights[:, 1:].to(nll.dtype)
    return (nll * w).sum() / w.sum().clamp(min=1e-8)


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Teacher-forced argmax accuracy over tokens with weight > 0."""
    pred = logits[:, :-1].argmax(-1)
    mask = weights[:, 1:] > 0
    correct = (pred == labels[:, 1:]) & mask
    return correct.sum().float() / mask.sum().clamp(min=1).float()


def perplexity(mean_nll: float) -> float:
    return math.exp(min(mean_nll, 50.0))
