"""FT-L: constrained fine-tuning of one MLP output projection (the "FT+L" baseline of ROME's paper,
Meng et al. 2022, after Zhu et al. 2020, "Modifying Memories in Transformer Models").

For a batch of edits, the weight ``W`` of layer ``l``'s MLP output projection (GPT-2 ``c_proj`` /
Llama ``down_proj``) is fine-tuned with Adam to minimise the mean teacher-forced NLL of
``" " + target_new`` after each rewrite prompt, and after every step projected back into the
L-infinity ball ``|W - W_0| <= norm_constraint`` (element-wise), ``W_0`` being the weight at the start
of the ``edit`` call (as in ROME's implementation: each call gets its own box; sequential calls
therefore accumulate). Training stops after ``num_steps`` steps or when the loss falls below
``early_stop_loss``. All other parameters are frozen.

Deviation from ROME's code: ROME's FT baseline scores every target token at the prompt's *last*
position (a bag-of-tokens objective); here the objective is the ordinary teacher-forced NLL of the
whole target, which is what the evaluation measures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from larimar.eval.baselines.common import (
    WeightSnapshot,
    check,
    encode_targets,
    forward_logits,
    hparams_from_dict,
    locate_mlp_out,
    model_device,
    target_nll,
)
from larimar.eval.editors import BaseEditor, EditRequest

__all__ = ["FTLEditor", "FTLHparams"]


@dataclass
class FTLHparams:
    """FT-L hyper-parameters (defaults = ``configs/baselines/ft_l.yaml``, tuned for SmolLM2-135M).

    Attributes:
        layer: decoder layer whose MLP output projection is fine-tuned.
        lr: Adam learning rate.
        num_steps: max optimisation steps per batch of edits.
        norm_constraint: L-infinity radius around the pre-edit weights (None = unconstrained FT).
        early_stop_loss: stop when the mean target NLL is below this.
        weight_decay: Adam weight decay.
        batch_size: edits per optimisation batch (a larger ``edit`` call is split).
        score_batch_size: sequences per forward pass when scoring.
    """

    layer: int = 0
    lr: float = 2e-3
    num_steps: int = 25
    norm_constraint: float | None = 2e-3
    early_stop_loss: float = 1e-2
    weight_decay: float = 0.0
    batch_size: int = 16
    score_batch_size: int = 16

    def __post_init__(self) -> None:
        m = "ft_l"
        check(isinstance(self.layer, int) and not isinstance(self.layer, bool) and self.layer >= 0, m,
              f"layer must be a non-negative int, got {self.layer!r}")
        check(isinstance(self.lr, (int, float)) and self.lr > 0, m, f"lr must be > 0, got {self.lr!r}")
        check(isinstance(self.num_steps, int) and self.num_steps >= 1, m, f"num_steps must be >= 1, got {self.num_steps!r}")
        check(self.norm_constraint is None or (isinstance(self.norm_constraint, (int, float)) and self.norm_constraint > 0),
              m, f"norm_constraint must be > 0 or null, got {self.norm_constraint!r}")
        check(isinstance(self.early_stop_loss, (int, float)) and self.early_stop_loss >= 0, m,
              f"early_stop_loss must be >= 0, got {self.early_stop_loss!r}")
        check(isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0, m,
              f"weight_decay must be >= 0, got {self.weight_decay!r}")
        for name in ("batch_size", "score_batch_size"):
            val = getattr(self, name)
            check(isinstance(val, int) and val >= 1, m, f"{name} must be an int >= 1, got {val!r}")


class FTLEditor(BaseEditor):
    """FT-L editor (see the module docstring). Hyper-parameters: :class:`FTLHparams`.

    Attributes:
        losses: the loss curve of the last ``edit`` call (one list per batch).
    """

    name = "ft_l"

    def __init__(self, model: Any, tokenizer: Any, **hparams: Any) -> None:
        self.hparams = hparams_from_dict(FTLHparams, "ft_l", hparams)
        super().__init__(model, tokenizer, score_batch_size=self.hparams.score_batch_size)
        self.proj = locate_mlp_out(model, self.hparams.layer)
        self._snapshot = WeightSnapshot({self.proj.name + ".weight": self.proj.weight})
        self.losses: list[list[float]] = []

    def _restore(self) -> None:
        self._snapshot.restore()

    def _apply(self, requests: list[EditRequest]) -> None:
        self.losses = []
        bs = self.hparams.batch_size
        for start in range(0, len(requests), bs):
            self.losses.append(self._train(requests[start : start + bs]))

    def _train(self, requests: list[EditRequest]) -> list[float]:
        hp = self.hparams
        model = self.model
        weight = self.proj.weight
        w0 = weight.detach().clone()
        batch = encode_targets(self.tokenizer, [r.prompt for r in requests], [r.target_new for r in requests])
        batch = batch.to(model_device(model))
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        weight.requires_grad_(True)
        was_training = model.training
        model.eval()  # no dropout: the edit is deterministic
        opt = torch.optim.Adam([weight], lr=hp.lr, weight_decay=hp.weight_decay)
        losses: list[float] = []
        try:
            for _ in range(hp.num_steps):
                opt.zero_grad()
                loss = target_nll(forward_logits(model, batch), batch).mean()
                losses.append(float(loss.detach()))
                if losses[-1] < hp.early_stop_loss:
                    break
                loss.backward()
                opt.step()
                if hp.norm_constraint is not None:
                    eps = float(hp.norm_constraint)
                    with torch.no_grad():
                        weight.copy_(torch.maximum(torch.minimum(weight, w0 + eps), w0 - eps))
        finally:
            weight.grad = None
            for n, p in model.named_parameters():
                p.requires_grad_(flags[n])
            model.train(was_training)
        return losses
