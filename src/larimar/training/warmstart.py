"""Stage 1 of `larimar train`: a decoder-free warm start of the memory -> answer path.

Back-propagating through a frozen 135M decoder costs ~1-2 s per episode on a 2-core CPU, and the KV
prefix learns to carry an exact object word only after thousands of such steps. The output offset
(`larimar.modeling.conditioning.OutputOffset`) acts after the decoder's last layer, so its loss can be
computed from *cached* final hidden states: the decoder runs once per training item, forward only, and
every later step costs a few matrix products. This stage trains, on the same generic data and the same
memory algebra as Eq. 1 (never on edits):

    the encoder head, the reference memory M0 and the output offset (gate + MLP),

so that after a one-shot write of an episode of E fact sentences and a read with each fact's query (or
another phrasing of it), the gated offset makes the decoder emit the stored object:

    logits_t = W_out h_t + gate(h_t) * W_out (g(z_r, q) - g(0, q))    (h_t: final hidden state, cached;
                                                                       q: the query's own latent)
    loss     = CE on the object tokens (+ a small weight on query tokens and on the token after the
               object, which teaches the gate to stay shut where no object is due) + KL(base ||
               conditioned) on *distractor* queries, whose fact is not in memory (they must keep the
               base model's answer).

Stage 2 (the Lightning loop, `larimar.training.module`) then trains everything end to end through the
decoder, starting from here.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from larimar.memory import pinv
from larimar.modeling.conditioning import Conditioning
from larimar.training.data import EpisodeSampler
from larimar.training.module import memory_readout, right_pad


@dataclass
class WarmstartSet:
    """Cached inputs for stage 1. N items, R loss rows (positions)."""

    emb_text: torch.Tensor  # (N, H_enc) encoder embeddings of "query + object"
    emb_query: torch.Tensor  # (N, H_enc) of the query
    emb_rephrase: torch.Tensor  # (N, H_enc) of the same fact asked with another pattern (maybe after a distractor sentence)
    hidden: torch.Tensor  # (R, H) decoder's final hidden state at each loss position (empty-memory prefix)
    target: torch.Tensor  # (R,) the next token at that position
    is_object: torch.Tensor  # (R,) bool: the position predicts an object token (else a query token)
    row_item: torch.Tensor  # (R,) item index of each row
    row_variant: torch.Tensor  # (R,) 0: the row comes from "query + object", 1: from "rephrased query + object"
    emb_value: torch.Tensor | None = None  # (N, H_enc) of the object alone (value writes); None in older caches

    def __len__(self) -> int:
        return self.emb_text.shape[0]


def _report(msg: str, progress: bool) -> None:
    if progress:
        print(msg, flush=True)


@torch.no_grad()
def build_set(
    model,
    sampler: EpisodeSampler,
    n_items: int,
    *,
    max_tokens: int = 32,
    context_positions: int = 2,
    batch_size: int = 64,
    seed: int = 0,
    distractor_sentences: list[str] | None = None,
    distractor_prob: float = 0.5,
    question_prob: float = 0.0,
    progress: bool = True,
) -> WarmstartSet:
    """Draw `n_items` fact items from `sampler`, encode them and cache the decoder's final hidden states.

    Each item is cached twice: as "query + object" and as "rephrased query + object", where the
    rephrased query is another pattern for the same subject, preceded with probability
    `distractor_prob` by an unrelated sentence from `distractor_sentences` (users -- and CounterFact's
    paraphrase prompts -- often ask after some other text).

    `question_prob` > 0: items are drawn from the relations with a question template only, and asked
    as questions with that probability (`Relation.sample_with_rephrase`).
    """
    relations = sampler.relations
    if question_prob > 0:
        relations = [r for r in relations if r.question is not None]
    if not relations:
        raise ValueError("warm start needs fact relations (train.data.pararel_root; question_templates for question items)")
    rng = random.Random(seed)
    pairs = [rng.choice(relations).sample_with_rephrase(rng, question_prob) for _ in range(n_items)]
    items = [p[0] for p in pairs]
    rephrased = []
    for _, alt in pairs:
        if distractor_sentences and rng.random() < distractor_prob:
            alt = rng.choice(distractor_sentences) + " " + alt
        rephrased.append(alt)
    t0 = time.perf_counter()
    emb_text = model.encoder.embed([it.text for it in items]).float()
    emb_query = model.encoder.embed([it.query for it in items]).float()
    emb_reph = model.encoder.embed(rephrased).float()
    emb_value = model.encoder.embed([it.continuation.strip() for it in items]).float()
    _report(f"warm start: encoded {n_items} items in {time.perf_counter() - t0:.0f} s", progress)
    tok = model.tokenizer
    hidden, target, is_obj, row_item, row_variant = [], [], [], [], []
    device = model.device
    t0 = time.perf_counter()
    texts = [(it.query, it.continuation, i, 0) for i, it in enumerate(items)]
    texts += [(alt, it.continuation, i, 1) for i, (it, alt) in enumerate(zip(items, rephrased))]
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        rows, n_qs = [], []
        for query, cont, _, _ in chunk:
            q = tok(query, add_special_tokens=False)["input_ids"]
            whole = tok(query + cont + ".", add_special_tokens=False)["input_ids"]
            full = whole[-max_tokens:]  # cut from the left: the object must stay
            rows.append(full)
            n_q = len(q) - (len(whole) - len(full))  # query tokens left in `full`
            n_qs.append(max(1, min(n_q, len(full) - 1)))
        ids, att = right_pad(rows, tok.pad_token_id)  # (B, T) each
        cond = Conditioning(prefix=model.kv_prefix(None, batch_size=len(rows)))
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cpu"):
            out = model.runner.forward(ids.to(device), att.to(device), cond, output_hidden_states=True)
        h = out.hidden_states[-1].float()  # (B, T, H), after the final norm
        for i, ((_, _, item, variant), r, n_q) in enumerate(zip(chunk, rows, n_qs)):
            ctx = list(range(0, max(0, n_q - 1)))
            picks = [(t, True) for t in range(max(0, n_q - 1), len(r) - 2)]  # positions predicting object tokens
            picks.append((len(r) - 2, False))  # the position after the object (predicts "."): the gate must close
            picks += [(t, False) for t in rng.sample(ctx, min(context_positions, len(ctx)))]
            for t, obj in picks:
                hidden.append(h[i, t].to(torch.bfloat16).cpu())
                target.append(r[t + 1])
                is_obj.append(obj)
                row_item.append(item)
                row_variant.append(variant)
        if progress and (start // batch_size) % 50 == 0:
            done = min(start + batch_size, len(texts))
            _report(f"warm start: decoder states {done}/{len(texts)} ({time.perf_counter() - t0:.0f} s)", progress)
    return WarmstartSet(
        emb_text.cpu(),
        emb_query.cpu(),
        emb_reph.cpu(),
        torch.stack(hidden),
        torch.tensor(target),
        torch.tensor(is_obj),
        torch.tensor(row_item),
        torch.tensor(row_variant),
        emb_value.cpu(),
    )


def concat_sets(sets: list[WarmstartSet]) -> WarmstartSet:
    """One WarmstartSet holding the items of `sets` in order (row item indices shifted)."""
    if not sets:
        raise ValueError("concat_sets: no sets")
    shifts, n = [], 0
    for ws in sets:
        shifts.append(n)
        n += len(ws)
    return WarmstartSet(
        torch.cat([ws.emb_text for ws in sets]),
        torch.cat([ws.emb_query for ws in sets]),
        torch.cat([ws.emb_rephrase for ws in sets]),
        torch.cat([ws.hidden for ws in sets]),
        torch.cat([ws.target for ws in sets]),
        torch.cat([ws.is_object for ws in sets]),
        torch.cat([ws.row_item + k for ws, k in zip(sets, shifts)]),
        torch.cat([ws.row_variant for ws in sets]),
        None if any(ws.emb_value is None for ws in sets) else torch.cat([ws.emb_value for ws in sets]),
    )


@torch.no_grad()
def spelling_set(model, host: WarmstartSet, objects: list[str], *, seed: int = 0, batch_size: int = 256) -> WarmstartSet:
    """Decoder-free items that teach the output path to spell many objects (stage 1c).

    Each of `objects` (e.g. `word_spans` of the text corpus) becomes an item that borrows a random
    *host* item of `host`: its query and rephrased query latents, and the cached decoder state at the
    position where the host's object begins (for both phrasings). The item's value latent is the
    object's own encoding, and the target at that borrowed position is the object's first decoder
    token. This is exactly the first answer token of a counterfactual edit "host query -> object",
    for the price of one encoder pass per object: no decoder forward, so many more objects than the
    cached fact items can be seen. Only the first token is taught (later positions would need the
    decoder to have read the new object's earlier tokens). Spelling items hold no whole-fact latent
    (`emb_text` is the value's), so they belong in keyed episodes only (`train_warmstart(spelling=)`).
    """
    if not objects:
        raise ValueError("spelling_set: no objects")
    rng = random.Random(seed)
    rows_of = _rows_by_item(host)
    first_row = torch.full((2 * len(host),), -1, dtype=torch.long)
    for key, r in enumerate(rows_of):
        obj = r[host.is_object[r]]
        if obj.numel():
            first_row[key] = obj[0]
    hosts = [i for i in range(len(host)) if first_row[2 * i] >= 0 and first_row[2 * i + 1] >= 0]
    if not hosts:
        raise ValueError("spelling_set: the host set has no object rows")
    pick = torch.tensor([rng.choice(hosts) for _ in objects])  # (N,)
    tok = model.tokenizer
    first_tok = torch.tensor([tok(" " + o.strip(), add_special_tokens=False)["input_ids"][0] for o in objects])  # (N,)
    emb_value = model.encoder.embed([o.strip() for o in objects], batch_size=batch_size).float().cpu()  # (N, H_enc)
    rows = torch.stack([first_row[2 * pick], first_row[2 * pick + 1]], dim=1).reshape(-1)  # (2N,) variant 0, 1
    n = len(objects)
    return WarmstartSet(
        emb_value,  # no fact sentence: never written whole (keyed episodes only)
        host.emb_query[pick],
        host.emb_rephrase[pick],
        host.hidden[rows],
        first_tok.repeat_interleave(2),
        torch.ones(2 * n, dtype=torch.bool),
        torch.arange(n).repeat_interleave(2),
        torch.tensor([0, 1]).repeat(n),
        emb_value,
    )


def _rows_by_item(ws: WarmstartSet) -> list[torch.Tensor]:
    """Row indices of item i's variant v at position 2 i + v."""
    key = ws.row_item * 2 + ws.row_variant
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=2 * len(ws))
    return list(torch.split(order, counts.tolist()))


@dataclass
class Episode:
    """One memory episode of stage 1: facts written in one shot, and the queries read against it."""

    items: list[int]  # item indices written
    queried: list[int]  # item indices (a subset of `items`) queried with their own fact's answer as target
    rephrase: list[bool]  # per queried item: ask with its other phrasing
    distractors: list[int] = field(default_factory=list)  # items *not* written, queried too (keep the base answer)
    keyed: bool = False  # keyed write: addresses from the facts' query latents instead of the facts' own


def warmstart_loss(
    model,
    ws: WarmstartSet,
    rows_of: list[torch.Tensor],
    episodes: list[Episode],
    *,
    context_weight: float = 0.1,
    noise: bool = True,
) -> dict[str, torch.Tensor]:
    """Loss of the output path for a list of episodes.

    Queried facts must produce their object; distractors (items not written) keep the base model's
    prediction (KL). Keyed episodes address each written fact by its query's latent, and with
    `model.config.value_writes` store the object's latent instead of the fact's (value writes).
    """
    head, M0, lam = model.encoder.head, model.M0, model.config.ridge
    values = model.config.value_writes
    if values and ws.emb_value is None:
        raise ValueError("value_writes: this warm-start set has no value embeddings (rebuild its cache)")
    W = model.decoder.get_output_embeddings().weight  # (V, H), frozen
    dev = M0.device
    z_parts, q_parts, q_rows, q_is_distractor = [], [], [], []  # q_rows: key 2 * item + variant of each query
    with torch.autocast(device_type=dev.type, enabled=False):
        M0_pinv = pinv(M0.float())  # (C, K), once for all episodes
    for ep in episodes:
        idx = torch.tensor(ep.items)
        Z = head((ws.emb_value if values and ep.keyed else ws.emb_text)[idx].to(dev))  # (E, C)
        keys = head(ws.emb_query[idx].to(dev)) if ep.keyed else None  # (E, C)
        qe = [ws.emb_rephrase[i] if r else ws.emb_query[i] for i, r in zip(ep.queried, ep.rephrase)]
        Q = head(torch.stack(qe + [ws.emb_query[i] for i in ep.distractors]).to(dev))  # (Eq + D, C)
        Wq, M = memory_readout(Z, Q, M0, lam, M0_pinv, keys)
        if noise:
            Wq = Wq + torch.exp(model.log_sigma_w) * torch.randn_like(Wq)
        z_parts.append(Wq @ M)  # (Eq + D, C)
        q_parts.append(Q)
        q_rows += [2 * i + int(r) for i, r in zip(ep.queried, ep.rephrase)] + [2 * i for i in ep.distractors]
        q_is_distractor += [False] * len(ep.queried) + [True] * len(ep.distractors)
    z_r = torch.cat(z_parts)  # (Nq, C)
    offset = model.out_offset(z_r, torch.cat(q_parts))  # (Nq, H)
    # loss rows: every cached position of every queried item
    row_idx, row_q = [], []
    for qi, key in enumerate(q_rows):
        r = rows_of[key]
        row_idx.append(r)
        row_q.append(torch.full((len(r),), qi, dtype=torch.long))
    row_idx, row_q = torch.cat(row_idx), torch.cat(row_q)
    h = ws.hidden[row_idx].to(dev).float()  # (R, H)
    tgt = ws.target[row_idx].to(dev)
    obj = ws.is_object[row_idx].to(dev)
    dis = torch.tensor(q_is_distractor, device=dev)[row_q]
    fast = dev.type == "cpu"  # bf16 matmuls (AMX) for the two vocabulary-sized products; softmax in fp32
    Wl = W.to(torch.bfloat16) if fast else W.float()
    with torch.no_grad():
        base = (h.to(Wl.dtype) @ Wl.T).float()  # (R, V)
    gates = model.out_offset.gate_values(h).float()  # (R, m)
    # sum_k gate_k * (offset_k @ W_outᵀ) == (sum_k gate_k * offset_k) @ W_outᵀ: mix the heads in hidden space
    mixed = torch.bmm(gates[:, None, :], offset.float()[row_q]).squeeze(1)  # (R, 1, m) @ (R, m, H) -> (R, H)
    logits = base + (mixed.to(Wl.dtype) @ Wl.T).float()  # (R, V)
    logp = logits.log_softmax(-1)
    ce = -logp.gather(1, tgt[:, None]).squeeze(1)  # (R,)
    w = torch.where(obj, torch.ones_like(ce), torch.full_like(ce, context_weight)) * (~dis).float()
    out = {"ce_object": (ce * w).sum() / w.sum().clamp(min=1e-8)}
    d_rows = dis & obj
    if bool(d_rows.any()):
        base_logp = base[d_rows].log_softmax(-1)
        kl = (base_logp.exp() * (base_logp - logp[d_rows])).sum(-1)
        out["kl_distractor"] = kl.mean()
    else:
        out["kl_distractor"] = torch.zeros((), device=dev)
    first = obj & ~dis
    first_rows = first & torch.cat([torch.tensor([True], device=dev), row_q[1:] != row_q[:-1]])  # first row of each query
    if bool(first_rows.any()):
        out["acc_object"] = (logits[first_rows].argmax(-1) == tgt[first_rows]).float().mean()
        later = first & ~first_rows  # object tokens after the first (teacher forced)
        if bool(later.any()):
            out["acc_later"] = (logits[later].argmax(-1) == tgt[later]).float().mean()
    out["loss"] = out["ce_object"] + out["kl_distractor"]
    return out


def sample_episodes(
    rng: random.Random,
    n_items: int,
    items_per_step: int,
    episode_sizes: tuple[int, ...],
    rephrase_prob: float,
    distractor_prob: float,
    *,
    keyed_prob: float = 0.0,
    large_prob: float = 0.0,
    large_max: int = 512,
    large_query_items: int = 32,
) -> list[Episode]:
    """Episodes whose queried facts add up to about `items_per_step`.

    With probability `large_prob` the step also holds one *large* keyed episode of 64..`large_max`
    facts (log-uniform) of which `large_query_items` are queried: memory near its capacity K must
    still answer. (Auto-associative reads of a memory holding about C or more facts return the
    query itself, so large episodes are always keyed.)
    """

    def draw(E: int, n_query: int, keyed: bool) -> Episode:
        items = rng.sample(range(n_items), E)
        queried = items[:n_query]
        n_d = sum(rng.random() < distractor_prob for _ in queried)
        return Episode(items, queried, [rng.random() < rephrase_prob for _ in queried], rng.sample(range(n_items), n_d), keyed)

    episodes, total = [], 0
    if large_prob > 0 and rng.random() < large_prob:
        hi = min(large_max, n_items)
        lo = min(64, hi)
        E = min(hi, int(round(math.exp(rng.uniform(math.log(lo), math.log(hi))))))
        episodes.append(draw(E, min(large_query_items, E), True))
        total += len(episodes[0].queried)
    while total < items_per_step:
        E = min(rng.choice(episode_sizes), n_items)
        episodes.append(draw(E, E, rng.random() < keyed_prob))
        total += E
    return episodes


def train_warmstart(
    model,
    ws: WarmstartSet,
    *,
    steps: int = 2000,
    lr: float = 1e-3,
    items_per_step: int = 64,
    episode_sizes: tuple[int, ...] = (1, 2, 4, 8, 16),
    rephrase_prob: float = 0.5,
    distractor_prob: float = 0.25,
    context_weight: float = 0.1,
    keyed_prob: float = 0.0,
    large_episode_prob: float = 0.0,
    large_query_items: int = 32,
    val: WarmstartSet | None = None,
    extra_val: dict[str, WarmstartSet] | None = None,
    spelling: WarmstartSet | None = None,
    spelling_per_step: int = 32,
    train_latents: bool = True,
    seed: int = 0,
    log_every: int = 100,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train encoder head, M0 and the output offset on cached states. Returns the logged history.

    `extra_val`: further validation sets (name -> set), evaluated with keyed episodes of 16 facts.
    `spelling`: a `spelling_set`; each step also writes `spelling_per_step` of its items in keyed
    episodes (sizes from `episode_sizes`) and asks for their first tokens.
    `train_latents=False`: train the output offset only, keeping the encoder head and M0 (and so every
    latent, address and scope-detector score of a trained model) as they are.
    """
    if model.out_offset is None:
        raise ValueError("warm start trains the output offset: set output_offset: true in the model config")
    rng = random.Random(seed)
    n_main = len(ws)
    if spelling is not None:
        if not model.config.value_writes:
            raise ValueError("spelling items store value latents: they need value_writes: true")
        ws = concat_sets([ws, spelling])  # spelling items are indices n_main.. and only drawn below
    rows_of = _rows_by_item(ws)
    params = list(model.out_offset.parameters())
    if train_latents:
        params += list(model.encoder.head.parameters()) + [model.M0]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    running: dict[str, float] = {}
    counts: dict[str, int] = {}
    for step in range(1, steps + 1):
        eps = sample_episodes(
            rng, n_main, items_per_step, episode_sizes, rephrase_prob, distractor_prob,
            keyed_prob=keyed_prob, large_prob=large_episode_prob, large_max=model.config.memory_size,
            large_query_items=large_query_items,
        )
        if spelling is not None:
            for ep in sample_episodes(rng, len(spelling), spelling_per_step, episode_sizes, rephrase_prob, 0.0, keyed_prob=1.0):
                eps.append(Episode([n_main + i for i in ep.items], [n_main + i for i in ep.queried], ep.rephrase, keyed=True))
        out = warmstart_loss(model, ws, rows_of, eps, context_weight=context_weight)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        for k, v in out.items():
            running[k] = running.get(k, 0.0) + float(v.detach())
            counts[k] = counts.get(k, 0) + 1
        if step % log_every == 0 or step == steps:
            rec = {"step": step, "minutes": (time.perf_counter() - t0) / 60, **{k: v / counts[k] for k, v in running.items()}}
            running, counts = {}, {}
            if val is not None:
                rec.update({f"val_{k}": v for k, v in evaluate_warmstart(model, val).items()})
                if keyed_prob > 0 or large_episode_prob > 0:
                    rec.update({f"val_keyed_{k}": v for k, v in evaluate_warmstart(model, val, keyed=True).items()})
                if large_episode_prob > 0:
                    big = min(len(val), model.config.memory_size // 2)
                    res = evaluate_warmstart(model, val, keyed=True, episode_size=big, max_queried=64)
                    rec.update({f"val_keyed{big}_{k}": v for k, v in res.items()})
            for name, extra in (extra_val or {}).items():  # e.g. question-form facts: keyed, 16 in memory
                rec.update({f"val_{name}_{k}": v for k, v in evaluate_warmstart(model, extra, keyed=True).items()})
            history.append(rec)
            _report("warm start " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()), progress)
    return history


@torch.no_grad()
def evaluate_warmstart(
    model, ws: WarmstartSet, *, episode_size: int = 16, seed: int = 1234, keyed: bool = False, max_queried: int | None = None
) -> dict[str, float]:
    """Object accuracy after writing fixed episodes of `episode_size` held-out facts (query and rephrase).

    `keyed`: keyed writes; `max_queried`: query only the first facts of each episode (large episodes).
    """
    rng = random.Random(seed)
    rows_of = _rows_by_item(ws)
    episode_size = min(episode_size, len(ws))
    idx = list(range(len(ws)))
    rng.shuffle(idx)
    eps = [idx[i : i + episode_size] for i in range(0, len(idx) - episode_size + 1, episode_size)]
    nq = episode_size if max_queried is None else min(max_queried, episode_size)
    res = {}
    for name, r in (("acc_query", False), ("acc_rephrase", True)):
        batch = [Episode(e, e[:nq], [r] * nq, keyed=keyed) for e in eps]
        out = warmstart_loss(model, ws, rows_of, batch, noise=False)
        res[name] = float(out["acc_object"])
        if "acc_later" in out:
            res[name.replace("acc_", "acc_later_")] = float(out["acc_later"])
    in_episode = [set(e) for e in eps]
    others = [[j for j in idx if j not in s] for s in in_episode]
    if all(others):  # a held-out fact queried against each episode's memory
        batch = [Episode(e, e[:nq], [False] * nq, [rng.choice(o)], keyed=keyed) for e, o in zip(eps, others)]
        res["kl_distractor"] = float(warmstart_loss(model, ws, rows_of, batch, noise=False)["kl_distractor"])
    return res
