"""Memory conditioning of a frozen causal LM (paper §5): z_r --W_M--> per-layer key/value prefix.

Works with any HF causal LM whose forward accepts `past_key_values` as a `transformers.Cache`
(GPT-2, Llama with grouped KV heads, Mistral, Qwen, ...), through public APIs only.

Design:
- `KVPrefix` maps a read-out z_r (B, C) to P key/value slots for every layer, shaped like the
  decoder's own cache entries (B, n_kv_heads, P, head_dim). The map is
  `prefix(z) = base + delta(z)`, where `base` is initialised from the decoder's *own* keys/values
  for a short neutral text (so an untrained or empty-memory prefix looks like ordinary context to the
  model instead of disturbing it: zero keys still draw attention) and `delta` is a bottlenecked MLP
  started at zero.
- `EmbeddingOffset` (optional, as the official code's "latent as embedding"): a per-token offset
  added to every input embedding; with tied embeddings it is a direct path to the output.
- `OutputOffset` (optional, our addition): a gated offset on the decoder's final hidden state,
  i.e. logits += gate(h_t) * W_out (g(z_r, q) - g(0, q)), q the query's own latent. It is the shortest path from memory to the answer and can be
  trained without backpropagating through the decoder (see `larimar.training.warmstart`); the gate, read
  from each position's own final hidden state, opens where the memory's content is due. With m > 1
  heads (`output_heads`) each head has its own gate and offset, so successive answer positions can
  take different tokens: logits += sum_k gate_k(h_t) * W_out (g_k(z_r, q) - g_k(0, q)).
- `ConditionedDecoder` runs forward passes and a KV-cached generation loop with or without the
  conditioning; with no conditioning it calls the base model unchanged (logits identical).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from larimar.modeling.value_code import TokenValueCode


@dataclass(frozen=True)
class KVShape:
    n_layers: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int

    @classmethod
    def from_config(cls, config) -> "KVShape":
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        n_heads = text.num_attention_heads
        n_kv = getattr(text, "num_key_value_heads", None) or n_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // n_heads
        return cls(text.num_hidden_layers, n_kv, head_dim, text.hidden_size)

    @property
    def per_slot(self) -> int:
        """Numbers in one prefix slot across all layers: layers x (k, v) x heads x head_dim."""
        return self.n_layers * 2 * self.n_kv_heads * self.head_dim


class KVPrefix(nn.Module):
    """z (B, C) -> per-layer (k, v), each (B, n_kv_heads, P, head_dim)."""

    def __init__(self, latent_size: int, shape: KVShape, prefix_len: int = 8, hidden: int = 256):
        super().__init__()
        self.shape = shape
        self.prefix_len = prefix_len
        self.hidden = hidden
        # base: (L, 2, H_kv, P, D) -- replaced by the decoder's own K/V in `init_base_from_decoder`
        self.base = nn.Parameter(torch.zeros(shape.n_layers, 2, shape.n_kv_heads, prefix_len, shape.head_dim))
        # delta(z): C -> P x hidden (slot-specific) -> GELU -> per-slot numbers for all layers (shared)
        self.slots = nn.Linear(latent_size, prefix_len * hidden)
        self.out = nn.Linear(hidden, shape.per_slot)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @torch.no_grad()
    def init_base_from_decoder(self, decoder: nn.Module, token_ids: list[int]) -> None:
        """Set `base` to the decoder's own cached K/V for `token_ids` (repeated/cut to P tokens)."""
        P = self.prefix_len
        if not token_ids:
            raise ValueError("init_base_from_decoder: need at least one token id")
        ids = (token_ids * P)[:P]
        dev = self.base.device
        out = decoder(input_ids=torch.tensor([ids], device=dev), use_cache=True)
        layers = cache_to_tensors(out.past_key_values)
        if len(layers) != self.shape.n_layers:
            raise ValueError(f"decoder returned {len(layers)} cache layers, expected {self.shape.n_layers}")
        for i, (k, v) in enumerate(layers):  # each (1, H_kv, P, D)
            self.base[i, 0].copy_(k[0].to(self.base.dtype))
            self.base[i, 1].copy_(v[0].to(self.base.dtype))

    def forward(self, z: torch.Tensor | None, batch_size: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """z: (B, C) or None (the empty-memory prefix `base`). Returns L pairs of (B, H_kv, P, D)."""
        L, H, P, D = self.shape.n_layers, self.shape.n_kv_heads, self.prefix_len, self.shape.head_dim
        if z is None:
            if batch_size is None:
                raise ValueError("KVPrefix: pass z or batch_size")
            kv = self.base.unsqueeze(0).expand(batch_size, -1, -1, -1, -1, -1)  # (B, L, 2, H, P, D)
        else:
            B = z.shape[0]
            h = nn.functional.gelu(self.slots(z.to(self.slots.weight.dtype)).view(B, P, self.hidden))  # (B, P, hidden)
            delta = self.out(h)  # (B, P, L*2*H*D)
            delta = delta.view(B, P, L, 2, H, D).permute(0, 2, 3, 4, 1, 5)  # (B, L, 2, H, P, D)
            kv = self.base.unsqueeze(0) + delta
        return [(kv[:, i, 0], kv[:, i, 1]) for i in range(L)]


class EmbeddingOffset(nn.Module):
    """z (B, C) -> (B, 1, hidden) offset added to every input token embedding; starts at zero."""

    def __init__(self, latent_size: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(latent_size, hidden_size)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.proj(z.to(self.proj.weight.dtype)).unsqueeze(1)


class OutputOffset(nn.Module):
    """(z_r, q) (B, C) each -> (B, m, hidden): m offsets on the final hidden state, each applied through its own per-position gate.

    The offset sees the read-out z_r *and* the query's own latent q: a sentence encoding is dominated by
    what the query already says (subject, relation), and the memory's news (the object) is what z_r adds
    to it. `forward(z, q)` returns g(z, q) - g(0, q), so an all-zero read-out (empty memory) changes nothing.
    `apply(logits, hidden, bias)`: logits (B, T, V) + sum_k sigmoid(gate_k(norm(h_t))) * bias_k, with
    bias = `logit_bias(offset, W_out)` = offset @ W_outᵀ (B, m, V), computed once per forward or generation.

    With m = 1 head (the default) the same vocabulary bias is added at every position, so the tokens of a
    multi-token answer cannot be put in order; with m > 1 the gates, which see h_t, can open one head per
    answer position (head k carrying the k-th answer token). The last layer starts at zero: an untrained
    offset leaves the logits unchanged.
    """

    def __init__(self, latent_size: int, hidden_size: int, inner: int = 1024, heads: int = 1):
        super().__init__()
        if heads < 1:
            raise ValueError(f"OutputOffset: heads must be >= 1, got {heads}")
        self.heads, self.hidden_size = heads, hidden_size
        self.inner = nn.Linear(2 * latent_size, inner)
        self.proj = nn.Linear(inner, heads * hidden_size)
        self.gate = nn.Linear(hidden_size, heads)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def _g(self, z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        out = self.proj(nn.functional.gelu(self.inner(torch.cat([z, q], dim=-1))))  # (B, m * hidden)
        return out.view(*out.shape[:-1], self.heads, self.hidden_size)  # (B, m, hidden)

    def forward(self, z: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
        """z: (B, C) read-outs; q: (B, C) the queries' latents (None: zeros). Returns (B, m, hidden)."""
        z = z.to(self.inner.weight.dtype)
        q = torch.zeros_like(z) if q is None else q.to(z.dtype).expand_as(z)
        return self._g(z, q) - self._g(torch.zeros_like(z), q)

    def gate_values(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., H) -> gates in (0, 1), shape (..., m)."""
        h = nn.functional.normalize(hidden.float(), dim=-1).to(self.gate.weight.dtype)
        return torch.sigmoid(self.gate(h))

    @staticmethod
    def logit_bias(offset: torch.Tensor, out_weight: torch.Tensor) -> torch.Tensor:
        """offset (B, m, H), out_weight (V, H) -> (B, m, V): each head's offset as logits (constant over positions)."""
        return offset.to(out_weight.dtype) @ out_weight.T

    def apply(self, logits: torch.Tensor, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """logits (B, T, V), hidden (B, T, H) final hidden states, bias (B, m, V) from `logit_bias`."""
        gates = self.gate_values(hidden).to(logits.dtype)  # (B, T, m)
        return logits + torch.bmm(gates, bias.to(logits.dtype))  # (B, T, m) @ (B, m, V) -> (B, T, V)

    def expand_state(self, state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
        """A state dict of a 1-head offset -> this module's m heads: head 1 keeps it, heads 2..m start with
        zero offsets (so the expanded module computes exactly what the 1-head one did) and head 1's gate
        plus a little noise: identical new heads would get identical gradients and stay clones forever."""
        out = dict(state)
        w, b = state[prefix + "proj.weight"], state[prefix + "proj.bias"]
        if w.shape[0] == self.heads * self.hidden_size:
            return out
        if w.shape[0] != self.hidden_size:
            raise ValueError(f"OutputOffset.expand_state: proj has {w.shape[0]} rows, expected {self.hidden_size}")
        m = self.heads
        out[prefix + "proj.weight"] = torch.cat([w, w.new_zeros((m - 1) * w.shape[0], w.shape[1])])
        out[prefix + "proj.bias"] = torch.cat([b, b.new_zeros((m - 1) * b.shape[0])])
        gw = state[prefix + "gate.weight"].repeat(m, 1)  # (m, H)
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(gw.shape, generator=g, dtype=torch.float32) * 0.5 * gw.float().std()
        noise[0] = 0  # head 1 unchanged
        out[prefix + "gate.weight"] = gw + noise.to(gw.dtype)
        out[prefix + "gate.bias"] = state[prefix + "gate.bias"].repeat(m)
        return out


def cache_to_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A transformers Cache (or legacy tuple) -> list of (k, v) per layer."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "to_legacy_cache"):
        return [tuple(x[:2]) for x in cache.to_legacy_cache()]
    return [tuple(x[:2]) for x in cache]


def make_cache(prefix: list[tuple[torch.Tensor, torch.Tensor]], config):
    """A fresh DynamicCache holding the prefix (a cache grows in place: build one per forward)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(k, v) for k, v in prefix], config=config)


@dataclass
class Conditioning:
    """What conditions one forward/generation: a KV prefix, an embedding offset and/or an output offset (any may be None)."""

    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    offset: torch.Tensor | None = None  # (B, 1, hidden)
    output: torch.Tensor | None = None  # (B, m, hidden), applied by `output_head`
    output_head: OutputOffset | None = None
    code: torch.Tensor | None = None  # (B, C) read-outs decoded by `code_head` (token value code)
    code_head: "TokenValueCode | None" = None
    code_gate: torch.Tensor | None = None  # (B,) in [0, 1]: scales each row's code bias (None: 1)

    @property
    def is_empty(self) -> bool:
        return self.prefix is None and self.offset is None and self.output is None and self.code is None

    @property
    def prefix_len(self) -> int:
        return 0 if self.prefix is None else self.prefix[0][0].shape[2]

    def select(self, index: torch.Tensor | list[int]) -> "Conditioning":
        idx = torch.as_tensor(index, dtype=torch.long)
        prefix = None if self.prefix is None else [(k[idx], v[idx]) for k, v in self.prefix]
        offset = None if self.offset is None else self.offset[idx]
        output = None if self.output is None else self.output[idx]
        code = None if self.code is None else self.code[idx]
        gate = None if self.code_gate is None else self.code_gate[idx]
        return Conditioning(prefix, offset, output, self.output_head, code, self.code_head, gate)


class ConditionedDecoder:
    """Forward and KV-cached decoding of a causal LM under a `Conditioning` (or none)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cond: Conditioning | None = None,
        *,
        use_cache: bool = False,
        **kwargs,
    ):
        """input_ids, attention_mask: (B, T). With `cond` None this is exactly `model(input_ids, attention_mask)`."""
        if cond is None or cond.is_empty:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache, **kwargs)
        P = cond.prefix_len
        B = input_ids.shape[0]
        embeds = self.model.get_input_embeddings()(input_ids)  # (B, T, hidden)
        if cond.offset is not None:
            embeds = embeds + cond.offset.to(embeds.dtype)
        full_mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)  # (B, P+T)
        # positions continue after the prefix and skip left padding
        position_ids = (full_mask.long().cumsum(-1) - 1).clamp(min=0)[:, P:]  # (B, T)
        cache = make_cache(cond.prefix, self.model.config) if cond.prefix is not None else None
        want_hidden = bool(kwargs.pop("output_hidden_states", False))
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=full_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=use_cache or cache is not None,
            output_hidden_states=want_hidden or cond.output is not None,
            **kwargs,
        )
        out = self._apply_output(out, cond, self._output_bias(cond))
        if cond.code is not None:
            code_bias = self._code_head(cond).sequence_bias(cond.code, input_ids, self._embeddings(), attention_mask)  # (B, T, V)
            if cond.code_gate is not None:
                code_bias = code_bias * cond.code_gate.to(code_bias.dtype)[:, None, None]
            out.logits = out.logits + code_bias.to(out.logits.dtype)
        return out

    def _embeddings(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    @staticmethod
    def _code_head(cond: Conditioning) -> "TokenValueCode":
        if cond.code_head is None:
            raise ValueError("Conditioning.code is set but code_head is None")
        return cond.code_head

    def _output_bias(self, cond: Conditioning | None) -> torch.Tensor | None:
        """(B, m, V) logit bias of the conditioning's output offset (None without one)."""
        if cond is None or cond.output is None:
            return None
        if cond.output_head is None:
            raise ValueError("Conditioning.output is set but output_head is None")
        return cond.output_head.logit_bias(cond.output, self.model.get_output_embeddings().weight)

    def _apply_output(self, out, cond: Conditioning | None, bias: torch.Tensor | None):
        """Add the gated output offset (`bias` from `_output_bias`) to `out.logits`, in place on the output object."""
        if bias is not None:
            out.logits = cond.output_head.apply(out.logits, out.hidden_states[-1], bias)
        return out

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cond: Conditioning | None = None,
        *,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
        generator: torch.Generator | None = None,
        release_mask: torch.Tensor | None = None,
        stop_mask: torch.Tensor | None = None,
        blank_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Left-padded prompts (B, T) -> new tokens (B, max_new_tokens), padded with `pad_token_id` after EOS.

        `release_mask` (V,) bool: once a row generates one of these tokens (e.g. those ending a sentence),
        the output offset stops acting on that row, which then decodes on from its text alone.
        `stop_mask` (V,) or per row (B, V) bool: a row ends, as at EOS, with the first of these tokens it
        generates after a token outside `blank_mask` (V,) bool (whitespace: a leading newline does not end
        an empty answer).
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        B = input_ids.shape[0]
        P = cond.prefix_len if cond is not None else 0
        embed = self.model.get_input_embeddings()
        offset = cond.offset if cond is not None else None
        full_mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)
        position_ids = (full_mask.long().cumsum(-1) - 1).clamp(min=0)[:, P:]
        cache = make_cache(cond.prefix, self.model.config) if cond is not None and cond.prefix is not None else None
        embeds = embed(input_ids)
        if offset is not None:
            embeds = embeds + offset.to(embeds.dtype)
        kwargs = {"past_key_values": cache} if cache is not None else {}
        want_hidden = cond is not None and cond.output is not None
        bias = self._output_bias(cond)  # (B, V) once per call: constant over the generated positions
        out = self.model(
            inputs_embeds=embeds, attention_mask=full_mask, position_ids=position_ids, use_cache=True,
            output_hidden_states=want_hidden, **kwargs,
        )
        out = self._apply_output(out, cond, bias)
        cache = out.past_key_values
        next_pos = position_ids[:, -1:] + 1  # (B, 1)
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        released = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        stop = stop_mask.to(input_ids.device) if stop_mask is not None else None
        blank = blank_mask.to(input_ids.device) if blank_mask is not None and stop is not None else None
        started = torch.zeros(B, dtype=torch.bool, device=input_ids.device)  # a row has generated some text
        has_code = cond is not None and cond.code is not None
        conditioned_out = bias is not None or has_code
        release = release_mask.to(input_ids.device) if release_mask is not None and conditioned_out else None
        if has_code:  # the token value code: a bias from the read-out and the token just read (left padding: last column)
            head, E = self._code_head(cond), self._embeddings()
            U = head.vocab_units(E)  # (V, C), cached across calls
            gate = torch.ones(B, dtype=U.dtype, device=U.device) if cond.code_gate is None else cond.code_gate.to(U.dtype)  # (B,)

            def code_bias(history: torch.Tensor) -> torch.Tensor:  # (B, D+1) tokens read, most recent first
                return head.logit_bias(cond.code, history, E, U) * (gate * (~released).to(U.dtype))[:, None]  # (B, V)

        new_tokens = []
        logits = out.logits[:, -1, :]
        if has_code:
            history = head.history(input_ids, attention_mask)[:, -1]  # (B, D+1) at the last prompt token, -1 where none
            logits = logits + code_bias(history).to(logits.dtype)
        for step in range(max_new_tokens):
            token = _pick(logits.float(), do_sample, temperature, top_k, top_p, generator)  # (B,)
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            new_tokens.append(token)
            if eos_token_id is not None:
                finished = finished | (token == eos_token_id)
            if stop is not None:
                started = started | (~blank[token] if blank is not None else torch.ones_like(started))
                hit = stop[token] if stop.dim() == 1 else stop.gather(1, token.clamp(min=0)[:, None])[:, 0]  # (B,)
                finished = finished | (hit & started)
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            if release is not None:
                released = released | release[token]
                step_bias = None if bias is None else bias * (~released).to(bias.dtype)[:, None, None]  # (B, m, V): released rows get none
            else:
                step_bias = bias
            full_mask = torch.cat([full_mask, full_mask.new_ones(B, 1)], dim=1)
            e = embed(token[:, None])
            if offset is not None:
                e = e + offset.to(e.dtype)
            out = self.model(
                inputs_embeds=e, attention_mask=full_mask, position_ids=next_pos, past_key_values=cache, use_cache=True,
                output_hidden_states=want_hidden,
            )
            out = self._apply_output(out, cond, step_bias)
            cache = out.past_key_values
            next_pos = next_pos + 1
            logits = out.logits[:, -1, :]
            if has_code:
                history = torch.cat([token[:, None], history[:, :-1]], dim=1)  # the new token first
                logits = logits + code_bias(history).to(logits.dtype)
        result = torch.stack(new_tokens, dim=1)
        if result.shape[1] < max_new_tokens:  # everyone hit EOS early
            pad = result.new_full((B, max_new_tokens - result.shape[1]), pad_token_id)
            result = torch.cat([result, pad], dim=1)
        return result


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
    """(B, V) logits -> (B,) next tokens: greedy, or temperature / top-k / nucleus sampling."""
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    logits = logits / temperature
    if top_k and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest set whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
