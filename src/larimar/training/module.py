"""LightningModule and DataModule training the Larimar adapter end to end (paper Eq. 1).

Per step, one episode of E items (see `larimar.training.data`) is encoded, written to memory in one
shot, and read back with the encoding of each item's *query* (the part a user would ask with). One
decoder pass then scores three kinds of rows:

    memory rows  (E):     item | prefix from the read-out z_r          -> reconstruction from memory
    autoencoder  (n_ae):  item | prefix from its own encoding z       -> autoencoder term
    LM rows      (n_lm):  text | prefix from an empty memory (z = 0)  -> keeps empty-memory decoding
                                                                           close to the base model
plus β_t·KL(q(W) || N(0, I)) with a cyclical β. The decoder stays frozen.

With value writes and `value_code` "both", memory rows hold each value's latent and its token code, as
`Larimar.write_facts` stores them, and the memory and autoencoder rows are decoded with the code's logit
bias: the prefix learns what the (frozen) code leaves to it.

Memory write (differentiable): W = Z·M0^†, M = argmin ||Z − W·M||² + λ||M||² = Wᵀ(λI + W·Wᵀ)⁻¹·Z;
read: w = Q·M0^† + σ_W·ε, z_r = w·M. This is the same algebra the editing API runs with
`addressing="reference"` and a zero prior, so training matches inference.
"""

from __future__ import annotations

import math
import random
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from larimar.memory import pinv
from larimar.modeling.config import LarimarConfig
from larimar.training.data import EpisodeSampler, Item
from larimar.training.losses import cyclical_beta, kl_to_standard_normal, token_accuracy, weighted_token_ce

TRAIN_DEFAULTS: dict[str, Any] = {
    "data": {
        "text_root": "../shared/data/text",
        "pararel_root": "../shared/data/pararel",
        "exclude_eval_from": "../shared/data",
        "question_templates": None,  # JSON relation id -> question template (stage 1 question items)
        "object_pool": "relation",  # stage 1 fact objects: "relation" (each relation's own), "open" (any entity or year) or "mixed" (half each)
        "unknown_object_prob": 0.0,  # chance a fact's object is "unknown" (what forgetting and leakage prevention write)
        "open_text_spans": 0,  # word spans of the training text joining the open object pool ("open"/"mixed")
        "fact_fraction": 0.5,
        "episode_size": 16,
        "n_ae": 4,
        "n_lm": 4,
        "max_tokens": 64,
        "context_weight": 0.3,
        "val_episodes": 16,
        "val_fraction": 0.05,
        "seed": 0,
        # stage 2 as the editors write (all off: the paper's auto-associative episodes)
        "keyed": False,  # write each item at the address of its query's latent (keyed writes)
        "value_writes": False,  # keyed episodes store the latent of the item's continuation (its value)
        "rephrase_prob": 0.0,  # fact items read back with another pattern of their relation
        "question_prob": 0.0,  # fact items written as their relation's question (data.question_templates)
        "distractor_prob": 0.0,  # fact items asked after an unrelated corpus sentence (CounterFact's paraphrase prompts)
        "fact_period": False,  # value episodes: fact rows end in "." (taught, so that generation stops)
    },
    "optim": {"lr": 1e-3, "base_lr": 1e-4, "encoder_lr": 2e-5, "weight_decay": 0.0, "warmup_steps": 50},
    "loss": {"beta_max": 0.5, "n_cycles": 10, "kl_weight": 1.0, "ae_weight": 1.0, "lm_weight": 1.0},
    "trainer": {
        "max_steps": 2000,
        "accelerator": "cpu",
        "devices": 1,
        "strategy": "auto",
        "precision": "bf16-mixed",
        "val_check_interval": 200,
        "log_every_n_steps": 10,
        "checkpoint_every_n_steps": 100,
        "gradient_clip_val": 1.0,
        "stop_after_minutes": None,  # stop (checkpoint, export) after this much wall time; rerun to resume
    },
    "warmstart": {  # stage 1, decoder-free (larimar.training.warmstart); steps: 0 skips it
        "steps": 0,
        "items": 10000,
        "val_items": 512,
        "lr": 1e-3,
        "items_per_step": 64,
        "rephrase_prob": 0.5,
        "distractor_prob": 0.25,
        "context_weight": 0.1,
        "distractor_sentence_prob": 0.5,  # rephrased queries preceded by an unrelated text sentence
        "keyed_prob": 0.0,  # share of episodes written with keyed writes (W from the query latents)
        "large_episode_prob": 0.0,  # share of steps with one large episode (64..K facts written)
        "large_query_items": 32,  # facts queried (loss) in a large episode
        "question_items": 0,  # extra items asked as questions (data.question_templates), cached separately
        "question_val_items": 256,  # question items held out for validation (fresh draws: objects are random)
        "spelling_items": 0,  # stage 1c: text spans taught as first answer tokens on borrowed decoder states (0: off)
        "spelling_val_items": 256,  # held-out spans for validation ("val_spelling_*")
        "spelling_per_step": 32,  # spelling items written (keyed) and asked per step
        "train_latents": True,  # False: train the output offset only (encoder head and M0 kept: latents, addresses and scope scores unchanged)
        "init_adapter": None,  # start from this adapter (directory or .safetensors); a 1-head output offset is expanded
        "log_every": 100,
    },
    "train_encoder": False,
    # stage 2: what trains (None: prefix, emb_offset, out_offset, latents, value_encoder where present);
    # a list picks among those ("latents" = encoder head, M0, sigma_W)
    "trainable": None,
    "init_adapter": None,  # stage 2 without stage 1: start from this adapter (directory or .safetensors)
    "output_dir": "runs/small",
}

TRAINABLE_PARTS = ("prefix", "emb_offset", "out_offset", "latents", "value_encoder")


def merge(defaults: dict, overrides: dict) -> dict:
    out = dict(defaults)
    for k, v in (overrides or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


class EpisodeStream(IterableDataset):
    """Infinite stream of episodes (lists of Items), each paired with LM regulariser chunks."""

    def __init__(self, sampler: EpisodeSampler, episode_size: int, n_lm: int, n_episodes: int | None = None, seed: int = 0):
        self.sampler, self.episode_size, self.n_lm, self.n_episodes, self.seed = sampler, episode_size, n_lm, n_episodes, seed

    def __iter__(self):
        if self.n_episodes is not None:  # fixed validation set: same episodes every time
            self.sampler.rng = random.Random(self.seed)
        i = 0
        while self.n_episodes is None or i < self.n_episodes:
            yield {"items": self.sampler.episode(self.episode_size), "lm": [self.sampler.text_chunk() for _ in range(self.n_lm)]}
            i += 1


def _identity(batch):
    return batch[0]


class LarimarDataModule(L.LightningDataModule):
    def __init__(self, data: dict[str, Any]):
        super().__init__()
        self.cfg = data

    def setup(self, stage: str | None = None) -> None:
        c = self.cfg
        kw = dict(
            pararel_root=c.get("pararel_root"),
            fact_fraction=c["fact_fraction"],
            seed=c["seed"],
            exclude_eval_from=c.get("exclude_eval_from"),
            val_fraction=c["val_fraction"],
            object_pool=c.get("object_pool", "relation"),
            unknown_prob=c.get("unknown_object_prob", 0.0),
            open_text_spans=c.get("open_text_spans", 0),
            question_templates=c.get("question_templates"),
            rephrase_prob=c.get("rephrase_prob", 0.0),
            question_prob=c.get("question_prob", 0.0),
            distractor_prob=c.get("distractor_prob", 0.0),
        )
        self.train_sampler = EpisodeSampler(c["text_root"], split="train", **kw)
        try:
            self.val_sampler = EpisodeSampler(c["text_root"], split="val", **kw)
        except ValueError:
            warnings.warn("no validation documents in this corpus: validation is skipped", stacklevel=2)
            self.val_sampler = None

    def train_dataloader(self):
        ds = EpisodeStream(self.train_sampler, self.cfg["episode_size"], self.cfg["n_lm"])
        return DataLoader(ds, batch_size=1, collate_fn=_identity)

    def val_dataloader(self):
        if self.val_sampler is None:
            return []
        ds = EpisodeStream(self.val_sampler, self.cfg["episode_size"], self.cfg["n_lm"], n_episodes=self.cfg["val_episodes"], seed=1234)
        return DataLoader(ds, batch_size=1, collate_fn=_identity)


def tokenize_items(tokenizer, items: list[Item], max_tokens: int, context_weight: float, device) -> dict[str, torch.Tensor]:
    """Items -> right-padded input_ids, attention_mask and per-token loss weights (B, T).

    A row is `item.asked + item.continuation`. Continuation tokens weigh 1, query tokens
    `context_weight`, padding 0. A row longer than `max_tokens` loses the start of its query first
    (a long distractor sentence must not push the answer out), then the end of its continuation.
    """
    rows, weights = [], []
    for it in items:  # each row is the item as asked: its reading query + continuation
        q = tokenizer(it.asked, add_special_tokens=False)["input_ids"]
        whole = tokenizer(it.asked + it.continuation, add_special_tokens=False)["input_ids"]
        cut = min(max(0, len(whole) - max_tokens), max(0, len(q) - 1))  # from the left, keeping >= 1 query token
        full = whole[cut:][:max_tokens]
        n_q = min(len(q) - cut, len(full))
        rows.append(full)
        weights.append([context_weight] * n_q + [1.0] * (len(full) - n_q))
    ids, att = right_pad(rows, tokenizer.pad_token_id)
    w = torch.zeros(ids.shape)
    for i, wt in enumerate(weights):
        w[i, : len(wt)] = torch.tensor(wt)
    return {"input_ids": ids.to(device), "attention_mask": att.to(device), "weights": w.to(device)}


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> right-padded input_ids and attention_mask, each (B, T) with T the longest row."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        att[i, : len(r)] = 1
    return ids, att


def memory_readout(
    Z: torch.Tensor,
    Q: torch.Tensor,
    M0: torch.Tensor,
    lam: float,
    M0_pinv: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable one-shot write of Z (E, C') with reference M0 (K, C), and read addresses for Q (E', C).

    C' = C, or 2C for keyed rows holding a value's latent and its token code (`Larimar.value_rows`).

    The write addresses W come from `keys` (E, C) when given (a keyed write: each fact addressed by
    its query's latent), else from Z itself (the paper's auto-associative write).

    Returns (w_q (E, K), M (K, C)); the read-out is z_r = (w_q + noise)·M. Runs in at least float32
    with autocast off: in bf16 the ridge λ (1e-3) vanishes next to O(1) Gram entries and repeated items
    make the system singular. `M0_pinv` (C, K): pass it to reuse one pseudo-inverse across episodes.
    """
    dtype = torch.promote_types(Z.dtype, torch.float32)
    with torch.autocast(device_type=Z.device.type, enabled=False):
        Z, Q = Z.to(dtype), Q.to(dtype)
        M0_pinv = pinv(M0.to(dtype)) if M0_pinv is None else M0_pinv.to(dtype)  # (C, K)
        W = (Z if keys is None else keys.to(dtype)) @ M0_pinv  # (E, K)
        Wq = Q @ M0_pinv  # (E', K)
        E = W.shape[0]
        eye = torch.eye(E, dtype=dtype, device=W.device)
        gram = W @ W.T + lam * eye  # (E, E), SPD in exact arithmetic
        L, info = torch.linalg.cholesky_ex(gram)
        if int(info) != 0:  # repeated keys with a ridge tiny next to the Gram's scale fail in float32: add growing jitter
            jitter = 1e-6 * float(gram.diagonal().mean().detach())
            for _ in range(6):
                L, info = torch.linalg.cholesky_ex(gram + jitter * eye)
                if int(info) == 0:
                    break
                jitter *= 10
            else:
                raise torch.linalg.LinAlgError(f"memory_readout: the {E}x{E} write Gram matrix is not positive definite (non-finite latents?)")
        M = W.T @ torch.cholesky_solve(Z, L)  # (K, C): ridge solution via the E x E dual
    return Wq, M


class LarimarLightning(L.LightningModule):
    def __init__(self, model_config: dict[str, Any], train_config: dict[str, Any], model=None):
        """`model`: an already built Larimar (tests, notebooks); default: built from `model_config`."""
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model_config = LarimarConfig.from_dict(model_config)
        self.train_cfg = merge(TRAIN_DEFAULTS, train_config)
        self.model = model
        trainable = self.train_cfg.get("trainable")
        if trainable is not None:
            bad = sorted(set(trainable) - set(TRAINABLE_PARTS))
            if bad:
                raise ValueError(f"train.trainable: unknown parts {bad} (expected some of {TRAINABLE_PARTS})")
        if model is not None:
            self._freeze_encoder_if_needed()
        self.strict_loading = False  # checkpoints hold the adapter only, not the frozen base models

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from larimar.modeling.model import Larimar

        cfg = self.model_config.replace(extra={**self.model_config.extra, "train_encoder": self.train_cfg["train_encoder"]})
        self.model = Larimar.from_config(cfg)
        self._freeze_encoder_if_needed()

    def _freeze_encoder_if_needed(self) -> None:
        if not self.train_cfg["train_encoder"]:
            for p in self.model.encoder.model.parameters():
                p.requires_grad_(False)
        for part, params in self._parts().items():  # parts left out of train.trainable get no gradient
            for p in params:
                p.requires_grad_(self.trains(part))
        if self.model.token_code is not None:  # the token code trains decoder-free (training.token_code), never here
            for p in self.model.token_code.parameters():
                p.requires_grad_(False)

    def trains(self, part: str) -> bool:
        trainable = self.train_cfg.get("trainable")
        return trainable is None or part in trainable

    def _parts(self) -> dict[str, list[torch.nn.Parameter]]:
        """The adapter's trainable parts (TRAINABLE_PARTS) -> their parameters."""
        m = self.model
        enc = m.encoder
        value = [p for n, p in enc.value_model.named_parameters() if enc.is_value_weight("value_model." + n)] if enc.value_model is not None else []
        return {
            "prefix": list(m.kv_prefix.parameters()),
            "emb_offset": list(m.emb_offset.parameters()) if m.emb_offset is not None else [],
            "out_offset": list(m.out_offset.parameters()) if m.out_offset is not None else [],
            "latents": list(enc.head.parameters()) + [m.M0, m.log_sigma_w],
            "value_encoder": value,
        }

    def train(self, mode: bool = True):
        """Train mode for the adapter only: the frozen base models (and the value encoder) stay in eval
        mode, so that no dropout perturbs latents that inference computes without it."""
        super().train(mode)
        if self.model is not None:
            self.model.decoder.eval()
            self.model.encoder.model.eval()
            if self.model.encoder.value_model is not None:
                self.model.encoder.value_model.eval()
        return self

    # ------------------------------------------------------------------ the objective
    def episode_losses(self, batch: dict[str, list[Item]], step: int | None = None) -> dict[str, torch.Tensor]:
        m = self.model
        d, lc = self.train_cfg["data"], self.train_cfg["loss"]
        items, lm_items = batch["items"], batch["lm"]
        n_ae = min(d["n_ae"], len(items))
        E = len(items)
        train_enc = self.train_cfg["train_encoder"]
        keyed, values = bool(d.get("keyed")), bool(d.get("value_writes"))
        if values and not keyed:
            raise ValueError("train.data.value_writes needs train.data.keyed (a value write is a keyed write)")
        if self.model_config.value_code == "tokens":
            raise ValueError("stage 2 trains what reads latents; value_code 'tokens' stores none (use 'both' or 'encoder')")
        code_rows = values and self.model_config.value_code == "both"  # values stored with their token code, as at inference
        if code_rows and d.get("fact_period"):
            raise ValueError("train.data.fact_period: with value_code 'both' the token code ends each value with its own end token; set fact_period: false")
        # one encoder pass for what this episode needs: the items (unless values are stored), the
        # written queries (keyed writes' addresses) and the asked queries (reads)
        texts = [] if values else [it.text for it in items]
        written = [it.query for it in items] if keyed else []
        with torch.set_grad_enabled(train_enc and torch.is_grad_enabled()):
            emb = m.encoder.embed(texts + written + [it.asked for it in items])  # (N, H)
        lat = m.encoder.head(emb.float())
        n_t, n_w = len(texts), len(written)
        Z, Qw, Q = lat[:n_t], lat[n_t : n_t + n_w], lat[n_t + n_w :]  # (E or 0, C): items, written queries, asked queries
        if values:  # the stored latent is the continuation's (its value), through the value encoder if any
            vals = [it.continuation.strip() or it.text for it in items]
            Z = m.encoder.encode_values(vals).float()  # (E, C)
            if code_rows:  # [latent, ||latent||·code] as write_facts stores them; a value too long for the code gets none
                Z = m.value_rows(Z, vals)  # (E, 2C)
        Wq, M = memory_readout(Z, Q, m.M0, self.model_config.ridge, keys=Qw if keyed else None)
        log_sigma = m.log_sigma_w
        w = Wq + torch.exp(log_sigma) * torch.randn_like(Wq) if self.training else Wq
        z_r = w @ M  # (E, C) or (E, 2C) with code rows, float32
        zeros = torch.zeros(len(lm_items), Z.shape[1], device=Z.device)  # empty memory (no code either)
        z_all = torch.cat([z_r, Z[:n_ae], zeros])
        q_all = torch.cat([Q, Q[:n_ae], zeros[:, : Q.shape[1]]])  # the asked queries' own latents (output offset)
        if values and d.get("fact_period"):
            items = [Item(it.query, it.continuation + ".", it.kind, it.ask) if it.kind == "fact" else it for it in items]
        rows = list(items) + list(items[:n_ae]) + list(lm_items)
        tok = tokenize_items(m.tokenizer, rows, d["max_tokens"], d["context_weight"], Z.device)
        cond = m.conditioning(z_all, q_all)
        logits = m.runner.forward(tok["input_ids"], tok["attention_mask"], cond).logits  # (B, T, V)
        ids, wts = tok["input_ids"], tok["weights"]
        parts = {"mem": slice(0, E), "ae": slice(E, E + n_ae), "lm": slice(E + n_ae, len(rows))}
        out: dict[str, torch.Tensor] = {}
        for name, sl in parts.items():
            if sl.stop > sl.start:
                out[f"nll_{name}"] = weighted_token_ce(logits[sl], ids[sl], wts[sl])
                out[f"acc_{name}"] = token_accuracy(logits[sl], ids[sl], (wts[sl] >= 1.0).float())
        kinds = [it.kind for it in items]
        fact_rows = [i for i, k in enumerate(kinds) if k == "fact"]
        if fact_rows:
            sl = torch.tensor(fact_rows, device=ids.device)
            out["acc_mem_fact_object"] = token_accuracy(logits[sl], ids[sl], (wts[sl] >= 1.0).float())
        out["kl"] = kl_to_standard_normal(Wq, log_sigma)
        total_steps = self.train_cfg["trainer"]["max_steps"]
        beta = cyclical_beta(step or 0, total_steps, n_cycles=lc["n_cycles"], beta_max=lc["beta_max"])
        out["beta"] = torch.tensor(beta)
        loss = out["nll_mem"] + lc["ae_weight"] * out.get("nll_ae", 0.0) + lc["lm_weight"] * out.get("nll_lm", 0.0)
        out["loss"] = loss + lc["kl_weight"] * beta * out["kl"]
        return out

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # episodes are text; tokenisation happens on the model's device in episode_losses

    def training_step(self, batch, batch_idx):
        out = self.episode_losses(batch, self.global_step)
        self.log_dict({f"train/{k}": v.detach().float() for k, v in out.items()}, prog_bar=False, batch_size=1)
        self.log("loss", out["loss"].detach(), prog_bar=True, batch_size=1)
        self.log("mem", out["nll_mem"].detach(), prog_bar=True, batch_size=1)
        return out["loss"]

    def validation_step(self, batch, batch_idx):
        out = self.episode_losses(batch, self.global_step)
        self.log_dict({f"val/{k}": v.detach().float() for k, v in out.items()}, batch_size=1)

    def configure_optimizers(self):
        o = self.train_cfg["optim"]
        m = self.model
        parts = self._parts()
        groups = []
        if self.trains("prefix"):
            groups += [
                {"params": [m.kv_prefix.base], "lr": o["base_lr"]},
                {"params": list(m.kv_prefix.slots.parameters()) + list(m.kv_prefix.out.parameters()), "lr": o["lr"]},
            ]
        for part, lr in (("latents", o["lr"]), ("emb_offset", o["lr"]), ("out_offset", o.get("output_lr", o["lr"])),
                         ("value_encoder", o.get("value_lr", o["encoder_lr"]))):
            if self.trains(part) and parts[part]:
                groups.append({"params": parts[part], "lr": lr})
        if self.train_cfg["train_encoder"]:
            groups.append({"params": list(m.encoder.model.parameters()), "lr": o["encoder_lr"]})
        if not groups:
            raise ValueError("train.trainable: nothing to train")
        opt = torch.optim.AdamW(groups, weight_decay=o["weight_decay"])
        warm = max(1, int(o["warmup_steps"]))
        total = max(warm + 1, int(self.train_cfg["trainer"]["max_steps"]))

        def schedule(step: int) -> float:  # linear warm-up, cosine decay to 10 %
            if step < warm:
                return (step + 1) / warm
            progress = (step - warm) / (total - warm)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints hold the adapter only
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = {"model." + k for k in self.model.adapter_state()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}


def export_adapter(module: LarimarLightning, directory: str | Path, *, half: bool = True) -> None:
    module.model.config = module.model.config.replace(trained=True)
    module.model.save_pretrained(directory, half=half)
