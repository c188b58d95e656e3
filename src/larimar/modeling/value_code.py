"""Token value code (our extension): a stored value's decoder tokens bound into one latent, and read back.

A MiniLM sentence latent keeps a value's meaning but not its spelling, so the decoder cannot recover a
rare answer ("Shmavon Shmavonyan") from it (README, "Value writes"). With `value_code: tokens` a value
write stores a *holographic* code of the value's decoder tokens instead:

    u(t)  = normalize((E[t] - mu) @ G)                      (C,)   a token's unit vector
    z     = normalize(sum_k R_k u(t_k))                     (C,)   t_0..t_{L-1}, then the end token
    R_k   = a fixed signed permutation of the C coordinates  (orthogonal: R_kᵀ R_k = I)

E (V, H) is the decoder's own (frozen) input embedding and G (H, C) a learned projection. The code is
decoded one token at a time from the two tokens the decoder has just read (`prev`, and `prev2` before
it), so generation and teacher forcing need no answer positions:

    s_k   = <R_k u(prev), z> + w2 <R_{k-1} u(prev2), z> + b_k    (k < S - 1; the second term for k >= 1)
    a     = softmax(tau_pos * [threshold, s_0, ..., s_{S-2}])   (S,)  where prev sits (none: before t_0)
    r     = sum_j a_j R_jᵀ z                                 (C,)   the unit of the token after prev
    bias  = tau_vocab * normalize(r) @ u(all tokens)ᵀ        (V,)   added to the decoder's logits

Unbinding R_jᵀ z returns u(t_j) plus crosstalk from the other L tokens (norm about sqrt(L/C) per
coordinate), so the nearest token unit is t_j with high probability for L up to S = 10. Matching the
pair (prev2, prev) rather than prev alone tells repeated tokens apart: in " 1991" (" 1", "9", "9", "1")
the token after "9" is "9" after " 1" and "1" after "9".

After the end token (a newline by default, which no value contains) the code starts over with t_0, so
memory keeps the answer in control of a long generation, as the paper's prefix does;
`generate(..., release_after_answer=True)` hands the continuation back to the decoder instead.

With `value_code: both` a memory row is 2C wide: the value's latent, then ``||latent|| · z``
(`Larimar.value_rows`). The latent half conditions the decoder as before (prefix, offsets), and the
code half's bias is scaled by the ratio of the two halves' norms in the read-out: about 1 for a
stored value, 0 for a text written without one (`Larimar.conditioning`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class TokenValueCode(nn.Module):
    """Bind token ids into (C,) codes and decode a code into next-token logit biases.

    `embed_dim` H: the decoder's embedding width; `latent_size` C; `slots` S: tokens per code, the
    end token included (a value keeps its first S - 1 tokens). The decoder's embedding matrix E (V, H)
    is passed to every call and never stored here.
    """

    def __init__(self, embed_dim: int, latent_size: int, slots: int = 8, seed: int = 0):
        super().__init__()
        if slots < 2:
            raise ValueError(f"TokenValueCode: slots must be >= 2 (a token and the end), got {slots}")
        C = latent_size
        self.slots = slots
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("perm", torch.stack([torch.randperm(C, generator=g) for _ in range(slots)]))  # (S, C)
        self.register_buffer("sign", (torch.randint(0, 2, (slots, C), generator=g) * 2 - 1).float())  # (S, C)
        self.register_buffer("mu", torch.zeros(embed_dim))  # (H,) mean embedding, set by init_from_embeddings
        self.G = nn.Parameter(torch.randn(embed_dim, C, generator=g) / embed_dim**0.5)  # (H, C)
        self.log_tau = nn.Parameter(torch.tensor([3.0, 3.0]))  # log temperatures: vocabulary, position
        self.threshold = nn.Parameter(torch.tensor(0.4))
        self.w_prev2 = nn.Parameter(torch.tensor(1.0))  # weight of the match of the token before prev
        self.pos_bias = nn.Parameter(torch.zeros(slots - 1))  # b_k: a prior over where prev sits
        self.end_id = -1  # the end token's id (set by the model from its tokenizer): after it the code starts over
        self._vocab_cache: tuple | None = None  # (sources, their versions, (C, V) units) for `vocab_units`

    @torch.no_grad()
    def init_from_embeddings(self, E: torch.Tensor, sample: int = 20000, seed: int = 0) -> None:
        """G <- the top-C principal directions of E (V, H), whitened: distinct tokens start well apart."""
        E = E.detach().float()
        g = torch.Generator().manual_seed(seed)
        rows = E[torch.randperm(E.shape[0], generator=g)[:sample]]
        mu = E.mean(0)
        _, s, vh = torch.linalg.svd(rows - mu, full_matrices=False)  # s (H,), vh (H, H)
        C = self.G.shape[1]
        if C > vh.shape[0]:
            raise ValueError(f"TokenValueCode: latent size {C} exceeds the embedding width {vh.shape[0]}")
        self.mu.copy_(mu)
        self.G.copy_(vh[:C].T / s[:C] * s[:C].mean())  # (H, C)

    # ------------------------------------------------------------------ binding
    def bind(self, u: torch.Tensor, k: int) -> torch.Tensor:
        """R_k u: (..., C) -> (..., C)."""
        return u[..., self.perm[k]] * self.sign[k].to(u.dtype)

    def unbind(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """R_kᵀ x: (..., C) -> (..., C)."""
        out = torch.empty_like(x)
        out[..., self.perm[k]] = x * self.sign[k].to(x.dtype)
        return out

    def units(self, E: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Unit vectors u(t) of `ids` (...,) -> (..., C); all V tokens when `ids` is None -> (V, C)."""
        x = E if ids is None else E[ids]
        x = x.to(self.G.dtype) - self.mu
        return F.normalize(x @ self.G, dim=-1)

    def vocab_units(self, E: torch.Tensor) -> torch.Tensor:
        """`units(E)` (V, C) for every token, cached while no gradient is recorded.

        Computing them is a (V, H) @ (H, C) product (49,152 x 576 x 384 for the default decoder, about a
        quarter of a second on 2 CPU cores), which every generation and scoring call would otherwise
        repeat. The cache is keyed by the tensors it reads (E, G, mu: identity, in-place version,
        dtype, device, shape), so an optimizer step or a new embedding matrix recomputes it; with gradients
        enabled it is bypassed, so training always sees a fresh, differentiable product.
        """
        if (torch.is_grad_enabled() and (self.G.requires_grad or E.requires_grad)) or any(t.is_inference() for t in (E, self.G, self.mu)):
            return self.units(E)  # training, or tensors made under inference_mode (no version counter to key by)
        srcs = (E, self.G, self.mu)
        versions = tuple((t._version, t.dtype, t.device, tuple(t.shape)) for t in srcs)
        cached = self._vocab_cache
        if cached is None or any(a is not b for a, b in zip(cached[0], srcs)) or cached[1] != versions:
            # the cache holds the source tensors themselves, so their storage cannot be reused under it
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable where autograd records
                U_T = self.units(E).T.contiguous()  # (C, V): `r @ U.T` then reads memory in order (~2x faster)
            self._vocab_cache = (srcs, versions, U_T)
        return self._vocab_cache[2].T

    def __getstate__(self):  # copies and pickles leave the cache (and the embedding it holds) behind
        state = self.__dict__.copy()
        state["_vocab_cache"] = None
        return state

    def encode(self, E: torch.Tensor, token_ids: list[list[int]]) -> torch.Tensor:
        """(N,) token-id lists (each 1..S ids, the last the end token) -> (N, C) unit codes."""
        if not token_ids:
            return self.G.new_zeros(0, self.G.shape[1])
        lengths = [len(ids) for ids in token_ids]
        if min(lengths) < 1 or max(lengths) > self.slots:
            raise ValueError(f"TokenValueCode.encode: sequences must hold 1..{self.slots} ids, got lengths {min(lengths)}..{max(lengths)}")
        N, C = len(token_ids), self.G.shape[1]
        padded = torch.zeros(N, self.slots, dtype=torch.long, device=self.G.device)
        present = torch.zeros(N, self.slots, dtype=self.G.dtype, device=self.G.device)
        for i, ids in enumerate(token_ids):
            padded[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            present[i, : len(ids)] = 1
        u = self.units(E, padded)  # (N, S, C)
        z = torch.zeros(N, C, dtype=u.dtype, device=u.device)
        for k in range(self.slots):
            z = z + present[:, k : k + 1] * self.bind(u[:, k], k)
        return F.normalize(z, dim=-1)

    # ------------------------------------------------------------------ decoding
    def next_unit(
        self, z: torch.Tensor, prev_units: torch.Tensor, prev2_units: torch.Tensor | None = None, restart: torch.Tensor | None = None
    ) -> torch.Tensor:
        """z (N, C) read-outs, prev_units / prev2_units (N, C) units of the last two tokens read (zeros or
        None: unknown) -> (N, C) unit of the next token. `restart` (N,) bool: rows that read the end
        token, whose next token is the code's first again."""
        z = F.normalize(z.to(self.G.dtype), dim=-1)
        scale = self.G.shape[1] ** 0.5 / self.slots  # keeps the position softmax's sharpness independent of C
        s = torch.stack([(self.bind(prev_units, k) * z).sum(-1) for k in range(self.slots - 1)], dim=-1)  # (N, S-1)
        if prev2_units is not None:  # the token before prev sits one slot earlier
            s2 = torch.stack([(self.bind(prev2_units, k) * z).sum(-1) for k in range(self.slots - 2)], dim=-1)  # (N, S-2)
            s = s + self.w_prev2 * F.pad(s2, (1, 0))
        s = s + self.pos_bias
        scores = torch.cat([self.threshold.expand(z.shape[0], 1), s], dim=-1) * scale * self.log_tau[1].exp()  # (N, S)
        if restart is not None:
            scores = scores.masked_fill(restart.unsqueeze(-1) & (torch.arange(self.slots, device=z.device) > 0), float("-inf"))
        a = scores.softmax(-1)  # a_0: prev is not in the code -> next is t_0; a_{k+1}: prev is t_k -> next is t_{k+1}
        r = sum(a[:, j : j + 1] * self.unbind(z, j) for j in range(self.slots))
        return F.normalize(r, dim=-1)

    def logit_bias(
        self,
        z: torch.Tensor,
        prev: torch.Tensor,
        E: torch.Tensor,
        vocab_units: torch.Tensor | None = None,
        prev2: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """z (N, C), prev (N,) token ids just read, E (V, H) -> (N, V) bias on the next token's logits.

        `prev2` (N,): the ids read before `prev` (-1 or None: none). `vocab_units` (V, C): `units(E)`,
        if already computed (default: `vocab_units(E)`, cached outside training).
        """
        U = self.vocab_units(E) if vocab_units is None else vocab_units
        u2 = None
        if prev2 is not None:
            known = (prev2 >= 0).to(self.G.dtype).unsqueeze(-1)
            u2 = self.units(E, prev2.clamp(min=0)) * known
        r = self.next_unit(z, self.units(E, prev), u2, prev == self.end_id)
        return self.log_tau[0].exp() * (r @ U.T)  # (N, V)

    @staticmethod
    def tokens_before(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> (B, T): the token before each position, -1 where there is none (t = 0, or a
        padded position before it, where `attention_mask` is 0)."""
        before = F.pad(input_ids, (1, 0), value=-1)[:, :-1]
        if attention_mask is not None:
            before = torch.where(F.pad(attention_mask, (1, 0), value=0)[:, :-1] > 0, before, -1)
        return before

    def sequence_bias(
        self,
        z: torch.Tensor,
        input_ids: torch.Tensor,
        E: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        vocab_units: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """z (B, C), input_ids (B, T) -> (B, T, V): the bias on the logits at every position (see
        `tokens_before` for padding; `vocab_units` as in `logit_bias`)."""
        B, T = input_ids.shape
        U = self.vocab_units(E) if vocab_units is None else vocab_units
        zz = z.unsqueeze(1).expand(B, T, z.shape[-1]).reshape(B * T, -1)  # (B*T, C)
        before = self.tokens_before(input_ids, attention_mask)  # (B, T)
        return self.logit_bias(zz, input_ids.reshape(-1), E, U, before.reshape(-1)).view(B, T, -1)
