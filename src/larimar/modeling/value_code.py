"""Token value code (our extension): a stored value's decoder tokens bound into one latent, and read back.

A MiniLM sentence latent keeps a value's meaning but not its spelling, so the decoder cannot recover a
rare answer ("Shmavon Shmavonyan") from it (README, "Value writes"). With `value_code: tokens` a value
write stores a *holographic* code of the value's decoder tokens instead:

    u(t)  = normalize((E[t] - mu) @ G)                      (C,)   a token's unit vector
    z     = normalize(sum_k R_k u(t_k))                     (C,)   t_0..t_{L-1}, then the end token
    R_k   = a fixed signed permutation of the C coordinates  (orthogonal: R_kᵀ R_k = I)

E (V, H) is the decoder's own (frozen) input embedding and G (H, C) a learned projection. The code is
decoded one token at a time from the tokens the decoder has just read (`prev` = x_0, and x_1, x_2, ...
before it), so generation and teacher forcing need no answer positions:

    M_d,k = <R_k u(x_d), z>                                  match of the token read d steps ago with slot k
    s_k   = M_0,k + sum_{d=1..min(k, D)} lam^d (M_d,k-d - mu) + [k <= D] beta lam^k M_k,0 + b_k   (k < S - 1)
    a     = softmax(tau_pos * [threshold, s_0, ..., s_{S-2}])   (S,)  where prev sits (none: before t_0)
    r     = sum_j a_j R_jᵀ z                                 (C,)   the unit of the token after prev
    bias  = tau_vocab * normalize(r) @ u(all tokens)ᵀ        (V,)   added to the decoder's logits

s_k scores "the answer started k tokens ago": the last k + 1 tokens read are t_0..t_k, each matched
against its own slot with weight lam^d (`w_prev2`) for the token d steps back. Each earlier token is
evidence for the chain by how much its match exceeds `mismatch` mu (a match gives about 1/sqrt(L), a
wrong token about 0): so answer tokens that a prompt happens to hold ("What company is Vueling part
of?" before " Vueling Holdings") do not outweigh the recent tokens that fail to match. Where the chain
reaches slot 0, the token before it is a prompt token, which is what a code's start looks like;
`start_credit` beta adds that much again of its match. The `depth` D (`config.value_code_depth`)
bounds how far back the chain looks.

Unbinding R_jᵀ z returns u(t_j) plus crosstalk from the other L tokens (norm about sqrt(L/C) per
coordinate), so the nearest token unit is t_j with high probability for L up to S = 10. With D = 1 (the
adapters shipped before session 17, beta = mu = 0) a pair (x_1, x_0) is matched, which tells repeated
tokens apart: in " 1991" (" ", "1", "9", "9", "1") the token after "9" is "9" after "1" and "1" after
"9". A pair can recur too: in " 19 March 1882" (" ", "1", "9", " March", " ", "1", "8", ...) the pair
(" ", "1") sits at slots 0-1 and 4-5, and so does the triple (" ", "1", "9") in " 19 March 1982"; the
chain back to the start tells them apart: the token before slot 0 is a prompt token, the one before
slot 4 is " March".

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
    end token included (a value keeps its first S - 1 tokens); `depth` D: how many tokens read before
    the last one the decoding matches (module docstring). The decoder's embedding matrix E (V, H) is
    passed to every call and never stored here.
    """

    def __init__(self, embed_dim: int, latent_size: int, slots: int = 8, seed: int = 0, depth: int = 1):
        super().__init__()
        if slots < 2:
            raise ValueError(f"TokenValueCode: slots must be >= 2 (a token and the end), got {slots}")
        if not 0 <= depth <= slots - 2:
            raise ValueError(f"TokenValueCode: depth must be in 0..slots - 2 = {slots - 2}, got {depth}")
        C = latent_size
        self.slots = slots
        self.depth = depth  # D: tokens read before prev that the position scores match
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("perm", torch.stack([torch.randperm(C, generator=g) for _ in range(slots)]))  # (S, C)
        self.register_buffer("sign", (torch.randint(0, 2, (slots, C), generator=g) * 2 - 1).float())  # (S, C)
        self.register_buffer("mu", torch.zeros(embed_dim))  # (H,) mean embedding, set by init_from_embeddings
        self.G = nn.Parameter(torch.randn(embed_dim, C, generator=g) / embed_dim**0.5)  # (H, C)
        self.log_tau = nn.Parameter(torch.tensor([3.0, 3.0]))  # log temperatures: vocabulary, position
        self.threshold = nn.Parameter(torch.tensor(0.4))
        self.w_prev2 = nn.Parameter(torch.tensor(1.0))  # lam: weight of the match of the token before prev (lam^d: d back)
        # beta: credit of a chain that reaches the code's start (0 with depth 1, the pair match of older adapters)
        self.start_credit = nn.Parameter(torch.tensor(0.5 if depth > 1 else 0.0))
        # mu: what each earlier token of a chain must match by to count for it (0 with depth 1, as older adapters)
        self.mismatch = nn.Parameter(torch.tensor(0.15 if depth > 1 else 0.0))
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

    # parameters added after adapters were shipped, with the value that reads such an adapter as it was
    # trained (`Larimar.load_adapter_state` fills them in when a file lacks them)
    OPTIONAL_PARAMETERS = {"start_credit": 0.0, "mismatch": 0.0}

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
    def position_scores(self, z: torch.Tensor, history_units: torch.Tensor) -> torch.Tensor:
        """z (N, C) unit read-outs, history_units (N, D', C): units of the tokens read, most recent
        first (x_0 = prev, x_1, ...; zeros where unknown; D' <= D + 1 are used) -> (N, S - 1) scores
        s_k of "prev sits at slot k" (module docstring, without b_k)."""
        S1 = self.slots - 1
        n_back = min(history_units.shape[1], self.depth + 1)
        # M[:, d, k] = <R_k u(x_d), z>: (N, D', S-1)
        M = torch.stack([(self.bind(history_units[:, :n_back], k) * z.unsqueeze(1)).sum(-1) for k in range(S1)], dim=-1)
        s = M[:, 0].clone()  # d = 0: prev itself at slot k
        for d in range(1, n_back):  # the token d back sits d slots earlier: slots k >= d; a mismatch costs mu
            s[:, d:] = s[:, d:] + self.w_prev2**d * (M[:, d, : S1 - d] - self.mismatch)
        # chains that reach slot 0 (k <= D): the token before it is a prompt token; beta lam^k M_k,0
        reach = torch.stack([M[:, k, 0] * self.w_prev2**k for k in range(min(n_back, S1))], dim=-1)  # (N, min(D', S-1))
        return s + F.pad(self.start_credit * reach, (0, S1 - reach.shape[1]))

    def next_unit(self, z: torch.Tensor, history_units: torch.Tensor, restart: torch.Tensor | None = None) -> torch.Tensor:
        """z (N, C) read-outs, history_units (N, D', C) units of the tokens just read, most recent first
        (zeros: unknown) -> (N, C) unit of the next token. `restart` (N,) bool: rows that read the end
        token, whose next token is the code's first again."""
        z = F.normalize(z.to(self.G.dtype), dim=-1)
        scale = self.G.shape[1] ** 0.5 / self.slots  # keeps the position softmax's sharpness independent of C
        s = self.position_scores(z, history_units) + self.pos_bias
        scores = torch.cat([self.threshold.expand(z.shape[0], 1), s], dim=-1) * scale * self.log_tau[1].exp()  # (N, S)
        if restart is not None:
            scores = scores.masked_fill(restart.unsqueeze(-1) & (torch.arange(self.slots, device=z.device) > 0), float("-inf"))
        a = scores.softmax(-1)  # a_0: prev is not in the code -> next is t_0; a_{k+1}: prev is t_k -> next is t_{k+1}
        r = sum(a[:, j : j + 1] * self.unbind(z, j) for j in range(self.slots))
        return F.normalize(r, dim=-1)

    def history_units(self, E: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """(N, D') token ids, most recent first, -1 where unknown -> (N, D', C) units, zeros where unknown
        (only the first D + 1 columns are looked up)."""
        history = history[:, : self.depth + 1]
        known = (history >= 0).to(self.G.dtype).unsqueeze(-1)
        return self.units(E, history.clamp(min=0)) * known

    def logit_bias(self, z: torch.Tensor, history: torch.Tensor, E: torch.Tensor, vocab_units: torch.Tensor | None = None) -> torch.Tensor:
        """z (N, C), history (N, D') token ids just read, most recent first (column 0: prev; -1: none),
        E (V, H) -> (N, V) bias on the next token's logits. A (N,) `history` is prev alone.

        `vocab_units` (V, C): `units(E)`, if already computed (default: `vocab_units(E)`, cached
        outside training).
        """
        if history.dim() == 1:
            history = history.unsqueeze(-1)
        U = self.vocab_units(E) if vocab_units is None else vocab_units
        r = self.next_unit(z, self.history_units(E, history), history[:, 0] == self.end_id)
        return self.log_tau[0].exp() * (r @ U.T)  # (N, V)

    @staticmethod
    def tokens_before(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, shift: int = 1) -> torch.Tensor:
        """input_ids (B, T) -> (B, T): the token `shift` positions before each position, -1 where there is
        none (t < shift, or a padded position, where `attention_mask` is 0)."""
        before = F.pad(input_ids, (shift, 0), value=-1)[:, : input_ids.shape[1]]
        if attention_mask is not None:
            before = torch.where(F.pad(attention_mask, (shift, 0), value=0)[:, : input_ids.shape[1]] > 0, before, -1)
        return before

    def history(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> (B, T, D + 1): at each position the token there and the D before it, most
        recent first (-1 where there is none: see `tokens_before`)."""
        if attention_mask is not None:
            input_ids = torch.where(attention_mask > 0, input_ids, -1)
        return torch.stack([self.tokens_before(input_ids, None, d) if d else input_ids for d in range(self.depth + 1)], dim=-1)

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
        hist = self.history(input_ids, attention_mask).reshape(B * T, -1)  # (B*T, D+1)
        return self.logit_bias(zz, hist, E, U).view(B, T, -1)
