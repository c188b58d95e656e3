"""The Larimar model: encoder -> episodic memory -> memory-conditioned decoder (paper §2-§5).

    texts --encoder--> Z (N, C) --write--> M (K, C)            (one shot, no gradient step)
    query --encoder--> q (1, C) --read--> z_r = W·M, W = q·M_ref^†  (addressing per config)
    z_r --W_M--> per-layer K/V prefix (+ embedding offset) --> frozen decoder answers with the fact

A scope detector sends queries that touch no stored fact to plain decoding.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from larimar.editing.scope import ScopeDetector
from larimar.editing.store import FactMemory
from larimar.memory import MemoryState
from larimar.modeling.conditioning import Conditioning, ConditionedDecoder, EmbeddingOffset, KVPrefix, KVShape, OutputOffset
from larimar.modeling.config import LarimarConfig
from larimar.modeling.encoder import LatentEncoder, check_texts, tokenize_truncating
from larimar.modeling.value_code import TokenValueCode

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "config.json"
SCOPE_IDF_FILE = "scope_idf.json"  # {token: idf} of the encoder's tokens, for the scope detector's lexical recall
UseMemory = Literal["auto", "always", "never"]


class EmptyMemoryError(RuntimeError):
    """Reading from a memory that holds no facts."""


@dataclass
class Generation:
    text: str
    used_memory: bool
    scope_score: float


def default_adapter_dir() -> Path:
    """The trained adapter shipped inside the package (may be absent in a development checkout)."""
    return packaged_adapter_dir("default")


def packaged_adapter_dir(name: str) -> Path:
    """A trained adapter shipped inside the package, one of `SHIPPED_ADAPTERS`: "default", "latent" (the
    default's latents alone, the default of sessions 6-13), "pair" (the default of sessions 14-17) or
    "tokens" (the token value code alone)."""
    return Path(__file__).resolve().parent.parent / "assets" / name


def adapter_dir(path: str | Path | None) -> Path:
    """Where an adapter lives: None -> the default; a directory that exists -> itself; otherwise the
    name of an adapter shipped in the package ("tokens"), if there is one; else the path as given."""
    if path is None:
        return default_adapter_dir()
    p = Path(path).expanduser()
    if p.exists() or len(p.parts) != 1:
        return p
    shipped = packaged_adapter_dir(str(path))
    return shipped if (shipped / CONFIG_FILE).is_file() else p


def shared_weights_dir(directory: Path, config: LarimarConfig) -> Path:
    """Where the shared adapter weights of `directory` are: the directory its config's `extra.weights_from`
    names (a path relative to it), or `directory` itself when there is none. The shipped "latent"
    adapter is a config alone that reads the default adapter's weights without its token code; "pair"
    reads them too, with its own (older) token code on top (`adapter_weights`)."""
    shared = config.extra.get("weights_from")
    if not shared:
        return directory
    target = (directory / str(shared)).resolve()
    if not (target / ADAPTER_FILE).is_file():
        raise FileNotFoundError(f"{directory}: its weights_from {shared!r} has no {ADAPTER_FILE}")
    return target


def adapter_weights(directory: Path, config: LarimarConfig) -> dict[str, torch.Tensor]:
    """The adapter weights a saved model directory stands for: its own `adapter.safetensors`; with
    `extra.weights_from`, the shared directory's weights, updated by the directory's own file where it
    has one (a file holding part of the weights: those it holds replace the shared ones)."""
    from safetensors.torch import load_file

    shared = shared_weights_dir(directory, config)
    own = directory / ADAPTER_FILE
    weights = load_file(str(shared / ADAPTER_FILE)) if shared != directory else {}
    if own.is_file():
        weights.update(load_file(str(own)))
    elif not weights:
        raise FileNotFoundError(f"{directory}: no {ADAPTER_FILE} (and no extra.weights_from in its config)")
    if config.value_code == "encoder":  # a config storing latents alone stands for the shared latents, not their code
        weights = without_token_code(weights)
    return weights


def without_token_code(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter weights without the token code's (what a model storing latents alone reads of them)."""
    return {k: v for k, v in weights.items() if not k.startswith("token_code.")}


def adapter_scope_idf(directory: Path, config: LarimarConfig) -> dict[str, float] | None:
    """The scope detector's IDF table of a saved model directory: its own, else its shared weights' (`weights_from`)."""
    return load_scope_idf(directory) or load_scope_idf(shared_weights_dir(directory, config))


def fact_value(text: str, prompt: str) -> str:
    """The part of a fact after its prompt, without the closing full stop ("London" for "The Eiffel Tower
    is in London." and "The Eiffel Tower is in"); the whole text if it does not start with the prompt
    or nothing is left."""
    t, p = text.strip(), prompt.strip()
    if not t.startswith(p):
        return t
    value = t[len(p) :].strip()
    value = value[:-1].rstrip() if value.endswith(".") else value
    return value or t


def save_scope_idf(directory: str | Path, idf: dict[str, float]) -> Path:
    """Write the scope detector's IDF table as `directory`/scope_idf.json (atomically); returns the path."""
    path = Path(directory) / SCOPE_IDF_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({t: round(v, 4) for t, v in sorted(idf.items())}, ensure_ascii=False, separators=(",", ":")))
    tmp.replace(path)
    return path


def load_scope_idf(directory: str | Path) -> dict[str, float] | None:
    """The IDF table `save_scope_idf` wrote into `directory`, or None where there is none."""
    path = Path(directory) / SCOPE_IDF_FILE
    return json.loads(path.read_text()) if path.is_file() else None


class Larimar(nn.Module):
    """Editable episodic memory around any HF encoder and causal LM."""

    def __init__(self, config: LarimarConfig, encoder, encoder_tokenizer, decoder, tokenizer, *, init_prefix: bool = True):
        super().__init__()
        self.config = config
        C, K = config.latent_size, config.memory_size
        self.encoder = LatentEncoder(
            encoder, encoder_tokenizer, C, pooling=config.pooling, max_tokens=config.max_encoder_tokens,
            value_layers=config.value_encoder_layers,
        )
        self.decoder = decoder
        for p in self.decoder.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.kv_shape = KVShape.from_config(decoder.config)
        self.kv_prefix = KVPrefix(C, self.kv_shape, config.prefix_len, config.prefix_hidden)
        self.emb_offset = EmbeddingOffset(C, self.kv_shape.hidden_size) if config.embedding_offset else None
        self.out_offset = OutputOffset(C, self.kv_shape.hidden_size, config.output_hidden, config.output_heads) if config.output_offset else None
        self.token_code: TokenValueCode | None = None
        if config.value_code != "encoder":  # values stored as codes of their decoder tokens (our extension)
            self.token_code = TokenValueCode(self.kv_shape.hidden_size, C, config.value_code_slots, depth=config.value_code_depth)
            if init_prefix:  # a fresh model (a loaded one gets its trained code from the adapter)
                self.token_code.init_from_embeddings(decoder.get_input_embeddings().weight)
            self.token_code.end_id = self.value_code_end_id()
        # M0: learned prior / reference memory (K, C); rows ~ N(0, 1/C) so that ||M0 row|| ~ 1
        g = torch.Generator().manual_seed(0)
        self.M0 = nn.Parameter(torch.randn(K, C, generator=g) / math.sqrt(C))
        self.log_sigma_w = nn.Parameter(torch.tensor(math.log(max(config.sigma_w, 1e-3))))
        self.runner = ConditionedDecoder(self.decoder)
        self.scope_idf: dict[str, float] | None = None
        self.scope = self.new_scope_detector()
        if init_prefix:
            ids = tokenizer(config.prefix_init_text, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
            self.kv_prefix.init_base_from_decoder(self.decoder, ids)
        self.memory_dtype = torch.float64
        self.facts = self.empty_memory()

    # ------------------------------------------------------------------ construction / persistence
    @classmethod
    def from_config(cls, config: LarimarConfig | None = None, *, dtype: torch.dtype = torch.float32) -> "Larimar":
        """A fresh (untrained) model around the configured base models."""
        from larimar.modeling.loading import load_decoder, load_encoder

        config = config or LarimarConfig()
        enc, enc_tok = load_encoder(config.encoder, dtype=dtype)
        dec, dec_tok = load_decoder(config.decoder, dtype=dtype)
        return cls(config, enc, enc_tok, dec, dec_tok)

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, *, dtype: torch.dtype = torch.float32, **overrides) -> "Larimar":
        """Load config + adapter weights from `path` (None: the adapter shipped with the package; a
        bare name such as "tokens": another adapter shipped with it, see `adapter_dir`).

        If no shipped adapter exists, returns an untrained model with the default config and warns.
        `overrides` replace config fields (e.g. scope_threshold=0.5; value_code="encoder" loads an
        adapter that stores latent and token code, "both", as one that stores latents alone).
        """
        from larimar.modeling.loading import load_decoder, load_encoder

        directory = adapter_dir(path)
        if not (directory / CONFIG_FILE).is_file():
            if path is not None:
                raise FileNotFoundError(f"{directory}: no {CONFIG_FILE} (not a saved Larimar model)")
            log.warning("no trained adapter is shipped in this install: using an UNTRAINED adapter")
            return cls.from_config(LarimarConfig(**overrides), dtype=dtype)
        config = LarimarConfig.load(directory / CONFIG_FILE)
        if overrides:
            config = config.replace(**overrides)
        enc, enc_tok = load_encoder(config.encoder, dtype=dtype)
        dec, dec_tok = load_decoder(config.decoder, dtype=dtype)
        model = cls(config, enc, enc_tok, dec, dec_tok, init_prefix=False)
        model.load_adapter_state(adapter_weights(directory, config))  # value_code="encoder" over a "both" adapter: its latents alone
        idf = adapter_scope_idf(directory, config)
        if idf is not None:
            model.set_scope_idf(idf)
        elif config.scope_lexical_weight > 0:
            log.warning("%s: no %s, the scope detector weighs every token alike", directory, SCOPE_IDF_FILE)
        return model

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Trained weights only: everything except the frozen base models (encoder weights only if trainable)."""
        state = self.state_dict()
        train_encoder = bool(self.config.extra.get("train_encoder", False))
        keep = {}
        for name, tensor in state.items():
            if name.startswith("decoder."):
                continue
            if name.startswith("encoder.model.") and not train_encoder:
                continue
            if name.startswith("encoder.value_model.") and not self.encoder.is_value_weight(name[len("encoder.") :]):
                continue  # the value encoder's frozen blocks are the base encoder's
            keep[name] = tensor
        return keep

    def load_adapter_state(self, weights: dict[str, torch.Tensor]) -> None:
        expected = self.adapter_state()
        if self.token_code is not None:  # adapters saved before a code parameter existed read as they were trained
            from larimar.modeling.value_code import TokenValueCode

            weights = dict(weights)
            for name, value in TokenValueCode.OPTIONAL_PARAMETERS.items():
                key = f"token_code.{name}"
                if key in expected and key not in weights and any(k.startswith("token_code.") for k in weights):
                    weights[key] = torch.tensor(value)
        missing = sorted(set(expected) - set(weights))
        unexpected = sorted(set(weights) - set(expected))
        if missing or unexpected:
            raise ValueError(f"adapter weights do not fit this config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, tensor in weights.items():
            if tensor.shape != expected[name].shape:
                raise ValueError(f"adapter weight {name}: shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}")
        own = dict(self.named_parameters())
        own.update(dict(self.named_buffers()))
        with torch.no_grad():
            for name, tensor in weights.items():
                own[name].copy_(tensor.to(own[name].dtype))
        self.facts = self.empty_memory()

    def save_pretrained(self, directory: str | Path, *, half: bool = False) -> None:
        """Write config.json + adapter.safetensors (base weights are referenced by name, not copied)."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        weights = {k: (v.half() if half and v.is_floating_point() else v).contiguous().cpu() for k, v in self.adapter_state().items()}
        tmp = d / (ADAPTER_FILE + ".tmp")
        save_file(weights, str(tmp), metadata={"format": "larimar-adapter"})
        tmp.replace(d / ADAPTER_FILE)
        if self.scope_idf is not None:
            save_scope_idf(d, self.scope_idf)
        extra = {k: v for k, v in self.config.extra.items() if k != "weights_from"}  # the weights are written here
        self.config.replace(extra=extra).save(d / CONFIG_FILE)

    # ------------------------------------------------------------------ scope detector
    def new_scope_detector(self) -> ScopeDetector:
        """An empty scope detector with this model's settings (config threshold and lexical weight, IDF table)."""
        return ScopeDetector(
            self._embed_for_scope,
            threshold=self.config.scope_threshold,
            lexical_weight=self.config.scope_lexical_weight,
            tokenize=self.encoder.tokenizer.tokenize,
            idf=self.scope_idf,
        )

    def configure_scope(self) -> None:
        """Rebuild the scope detector from the config (threshold, lexical weight) and the IDF table, keeping the facts."""
        self.scope = self.new_scope_detector()
        self._sync_scope()

    def set_scope_idf(self, idf: dict[str, float] | None) -> None:
        """Install the IDF table ({encoder token: idf}, `larimar.editing.scope.build_idf`) of the scope detector."""
        if idf is not None and (not isinstance(idf, dict) or not all(isinstance(v, (int, float)) for v in idf.values())):
            raise ValueError("set_scope_idf: expected a {token: idf} dict of numbers")
        self.scope_idf = idf
        self.configure_scope()

    def _sync_scope(self) -> None:
        facts = self.__dict__.get("_facts")
        if facts is None or len(facts) == 0:
            self.scope.set_keys(None)
        else:
            self.scope.set_keys(facts.E, facts.key_texts if self.config.scope_lexical_text == "key" else facts.texts)

    # ------------------------------------------------------------------ memory
    @property
    def device(self) -> torch.device:
        return self.M0.device

    @property
    def facts(self) -> FactMemory:
        """The memory with its fact ledger. Assigning it also points the scope detector at its facts."""
        return self.__dict__["_facts"]

    @facts.setter
    def facts(self, value: FactMemory) -> None:
        self.__dict__["_facts"] = value
        self._sync_scope()

    def memory_rows(self, X: torch.Tensor) -> torch.Tensor:
        """(..., C) latents -> (..., memory width) memory rows with an empty token-code half.

        With `value_code` "both" a memory row is a value's latent (C), then its token code (C); keys and
        reference rows live in the latent half, so addressing sees exactly what it would in a memory of
        latents alone. Otherwise X itself.
        """
        if self.config.value_code != "both":
            return X
        return torch.cat([X, torch.zeros_like(X)], dim=-1)

    def empty_memory(self) -> FactMemory:
        M_ref = self.memory_rows(self.M0.detach().to(self.memory_dtype))
        M_prior = None if self.config.memory_prior == "zero" else M_ref
        state = MemoryState.init(
            M_ref,
            lam=self.config.ridge,
            M_prior=M_prior,
            addressing=self.config.addressing,
            gaussian_alpha=self.config.gaussian_alpha,
        )
        return FactMemory(state)

    def reset_memory(self) -> None:
        self.facts = self.empty_memory()

    @torch.no_grad()
    def key_slot_reference(
        self, prompts: list[str] | None = None, *, memory_size: int | None = None, batch_size: int = 128
    ) -> torch.Tensor:
        """The reference rows ``(K, C)`` of a key-slot memory, in the memory dtype.

        Row ``i`` is the latent of ``prompts[i]`` (the first ``K`` prompts). Any remaining rows are
        far sentinels (:func:`larimar.memory.key_slot_reference`) that no query reaches. The
        sentinel radius is 10·√C, far beyond any latent (the encoder's latents have norm about √C
        or less). `memory_size` is ``K``, by default the config's.
        """
        from larimar.memory import key_slot_reference

        K = self.config.memory_size if memory_size is None else int(memory_size)
        if K < 1:
            raise ValueError(f"memory_size must be >= 1, got {memory_size}")
        if prompts:
            prompts = check_texts(prompts, "key_slot_reference")
            keys = self.encoder(prompts[:K], batch_size=batch_size).detach().to(self.memory_dtype)  # (min(N, K), C)
        else:
            keys = torch.zeros(0, self.config.latent_size, dtype=self.memory_dtype, device=self.M0.device)
        return key_slot_reference(keys, K, scale=math.sqrt(self.config.latent_size) * 10.0)

    @torch.no_grad()
    def key_slot_memory(
        self,
        prompts: list[str] | None = None,
        *,
        memory_size: int | None = None,
        gaussian_alpha: float = 0.1,
        ridge: float = 0.01,
        batch_size: int = 128,
    ) -> FactMemory:
        """An empty memory of *key slots*: each fact written keyed by a prompt gets a slot of its own.

        Addressing is Gaussian (paper Eq. 7–8, bandwidth `gaussian_alpha`) against reference rows
        that are the keys' latents (:meth:`key_slot_reference`), so a fact is read back whole when
        asked with its own prompt, for up to K facts. Pseudo-inverse addressing (the default memory)
        separates at most C keys; past that, facts overlap. Queries near a key (paraphrases) read a
        mix of the nearest slots.
        - `prompts` (optional): keys known in advance take the first slots now.
        - `memory_size`: ``K`` (default: the config's).
        - Every later keyed write gives each new key an unused slot first
          (:func:`larimar.memory.allocate_key_slots`). Once the K slots are taken, new keys land
          between the nearest slots.
        - The weights are near one-hot, so a write stores ``z / (1 + ridge)``: the ridge is small by
          default. The prior is zero. Forgetting stays exact; a forgotten fact's slot serves its prompt again.

        Use: ``model.facts = model.key_slot_memory(); model.write_facts(texts, prompts)``.
        """
        prompts = check_texts(prompts, "key_slot_memory") if prompts else []  # one string -> [string]
        ref = self.memory_rows(self.key_slot_reference(prompts, memory_size=memory_size, batch_size=batch_size))  # (K, memory width)
        state = MemoryState.init(ref, lam=ridge, addressing="gaussian", gaussian_alpha=gaussian_alpha)
        assigned = torch.zeros(ref.shape[0], dtype=torch.bool)
        assigned[: min(len(prompts), ref.shape[0])] = True  # rows reserved for the known prompts
        return FactMemory(state, allocate_slots=True, slot_assigned=assigned)

    def __len__(self) -> int:
        return len(self.facts)

    @torch.no_grad()
    def write(
        self,
        texts: list[str] | str,
        batch_size: int = 128,
        *,
        keys: list[str] | str | None = None,
        values: list[str] | str | None = None,
    ) -> None:
        """Write facts to memory in one shot (no gradient step). On any error memory is unchanged.

        `keys`: one text per fact (e.g. the prompt that should recall it, "The capital of France is"
        for "The capital of France is London."): a keyed write stores each fact's latent at the
        address of its key's latent, so that reading with the key returns the fact even when the
        memory holds about C or more facts (where an auto-associative read returns the query
        itself). Default: the paper's auto-associative write, each fact addressed by itself.

        `values` (keyed writes only): one text per fact whose latent is stored instead of the fact's
        (a *value write*, e.g. the object " London" under the key "The Eiffel Tower is in"); the fact
        texts still name the ledger entries (forget) and feed the scope detector.

        With `config.value_code` "tokens" what is stored is the token code of each value (of the text
        itself when no values are given), and a write without keys addresses each text by its own latent.
        With "both" a row holds the latent as above and, beside it, the token code of the value
        (`value_rows`); texts written without values store their latent alone.
        """
        texts = check_texts(texts, "write")
        n, Zk = len(texts), None
        if keys is not None:
            keys = check_texts(keys, "write keys")
            if len(keys) != n:
                raise ValueError(f"write: {n} texts but {len(keys)} keys")
        if values is not None:
            if keys is None:
                raise ValueError("write: values need keys (a value write is a keyed write)")
            values = check_texts(values, "write values")
            if len(values) != n:
                raise ValueError(f"write: {n} texts but {len(values)} values")
        if self.config.value_code == "tokens":  # token value code: keys (or the texts themselves) through the encoder
            Z, E = self.encoder.encode_with_embedding(texts + (keys or []), batch_size=batch_size)
            Zk = Z[n:] if keys is not None else Z  # (N, C): without keys a text is addressed by its own latent
            self.facts = self.facts.write(texts, self.encode_token_values(values if values is not None else texts), E[:n], Zk, keys)
            return
        # one encoder pass for texts, keys and values (values through the value encoder, if there is one)
        own_values = values is not None and self.encoder.value_model is not None
        Z, E = self.encoder.encode_with_embedding(texts + (keys or []) + ([] if own_values else values or []), batch_size=batch_size)
        if keys is not None:
            Z, E, Zk, Zv = Z[:n], E[:n], Z[n : 2 * n], Z[2 * n :]  # (N, C), (N, H), (N, C), (N, C) or (0, C)
            if values is not None:
                Z = self.encoder.encode_values(values, batch_size=batch_size) if own_values else Zv
        if self.config.value_code == "both":  # rows [latent, token code of the value]; keys in the latent half
            Z, Zk = self.value_rows(Z, values), None if Zk is None else self.memory_rows(Zk)
        facts = self.facts.write(texts, Z, E, Zk, keys)
        self.facts = facts

    def value_code_end_id(self) -> int:
        """The decoder token a token code ends with (`config.value_code_end`, one token)."""
        end = self.tokenizer(self.config.value_code_end, add_special_tokens=False)["input_ids"]
        if len(end) != 1:
            raise ValueError(f"value_code_end {self.config.value_code_end!r} must be one decoder token, got {len(end)}")
        return int(end[0])

    def _value_token_ids(self, values: list[str]) -> list[list[int]]:
        """Value texts -> all their decoder token ids as a token code spells them (" " + value)."""
        return self.tokenizer([" " + v.strip() for v in values], add_special_tokens=False)["input_ids"]

    def value_code_ids(self, values: list[str]) -> list[list[int]]:
        """Value texts -> decoder token ids for the token code: " " + value, its first S - 1 tokens, then the end token."""
        if self.token_code is None:
            raise ValueError("value_code_ids: this model stores encoder latents (config.value_code is 'encoder')")
        end = self.value_code_end_id()
        S = self.config.value_code_slots
        return [list(row[: S - 1]) + [end] for row in self._value_token_ids(values)]

    def value_rows(self, Z: torch.Tensor, values: list[str] | None) -> torch.Tensor:
        """(N, C) latents of what is stored, with `value_code` "both" -> (N, 2C) memory rows.

        Row i is ``[z_i, ||z_i|| · code(values[i])]``: the token code is scaled to the latent's norm,
        so any linear read-out keeps the ratio of its two halves' norms near 1 for a stored value and
        near 0 for a text stored without one (`conditioning` gates the code by that ratio). A value
        longer than the code holds (S - 1 tokens), or no value at all, gets a zero code: its latent
        alone is stored, and it is read back as with `value_code` "encoder".
        """
        if self.config.value_code != "both":
            raise ValueError("value_rows: only value_code 'both' stores latent and token code side by side")
        if values is None:
            return self.memory_rows(Z)
        S = self.config.value_code_slots
        fits = torch.tensor([len(ids) <= S - 1 for ids in self._value_token_ids(values)], dtype=Z.dtype, device=Z.device)
        codes = self.encode_token_values(values).to(device=Z.device, dtype=Z.dtype)  # (N, C) unit codes
        return torch.cat([Z, codes * (Z.norm(dim=-1) * fits).unsqueeze(-1)], dim=-1)

    def encode_token_values(self, values: list[str]) -> torch.Tensor:
        """(N,) value texts -> (N, C) token codes (`TokenValueCode.encode`), no gradient."""
        if self.token_code is None:
            raise ValueError("encode_token_values: this model stores encoder latents (config.value_code is 'encoder')")
        with torch.no_grad():
            return self.token_code.encode(self.decoder.get_input_embeddings().weight, self.value_code_ids(values))

    @torch.no_grad()
    def stored_values(self, values: list[str], batch_size: int = 128) -> torch.Tensor:
        """(N,) value texts -> (N, memory width): the rows a value write stores for them (in the model's
        dtype): their latents (through the value encoder, if there is one), their token codes, or both."""
        values = check_texts(values, "stored_values")
        if self.config.value_code == "tokens":
            return self.encode_token_values(values).to(self.M0.dtype)
        Z = self.encoder.encode_values(values, batch_size=batch_size)  # (N, C)
        return Z if self.config.value_code == "encoder" else self.value_rows(Z, values)

    def write_facts(self, texts: list[str], prompts: list[str], batch_size: int = 128) -> None:
        """Write facts whose prompts are known: keyed by the prompts when `config.keyed_writes` (each fact
        stored at its prompt's address), else the paper's auto-associative write.

        With `config.value_writes` (and keyed writes) what is stored is each fact's *value*: its text
        after the prompt ("The Eiffel Tower is in London." under "The Eiffel Tower is in" stores
        "London"); a fact that does not start with its prompt stores its whole text.
        """
        texts, prompts = list(texts), list(prompts)
        if not self.config.keyed_writes:
            self.write(texts, batch_size)
            return
        values = [fact_value(t, p) for t, p in zip(texts, prompts)] if self.config.value_writes else None
        self.write(texts, batch_size, keys=prompts, values=values)

    @torch.no_grad()
    def forget(self, texts: list[str] | str) -> None:
        """Remove facts exactly (alpha = -1). Texts never written raise FactNotFoundError; memory unchanged."""
        texts = check_texts(texts, "forget")
        facts = self.facts.forget(texts)
        self.facts = facts

    def save_memory(self, directory: str | Path) -> None:
        self.facts.save(directory)

    def load_memory(self, directory: str | Path) -> None:
        facts = FactMemory.load(directory, expect_C=self.config.memory_width, expect_K=self.config.memory_size)
        self.facts = facts

    def read_latents(self, q: torch.Tensor, *, sigma_w: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """(Q, C) query latents -> (Q, memory width) read-outs z_r = W·M from the current memory.

        W comes from the configured addressing; with sigma_w > 0 (default: config.sigma_w) Gaussian noise
        N(0, sigma_w²) is added to W before the read (the paper's robustness experiment, Fig. 6).
        """
        state = self.facts.state
        q = self.memory_rows(q.detach().to(self.memory_dtype))  # the query addresses by the latent half
        sigma = self.config.sigma_w if sigma_w is None else sigma_w
        if sigma > 0:
            W = state.address(q)  # (Q, K)
            W = W + sigma * torch.randn(W.shape, generator=generator, dtype=W.dtype, device=W.device)
            z = W @ state.M
        else:
            z = state.read(q)
        return z.to(self.M0.dtype)

    @torch.no_grad()
    def read(self, queries: list[str] | str) -> torch.Tensor:
        """Queries -> (Q, memory width) read-outs. Raises EmptyMemoryError when nothing has been written."""
        queries = check_texts(queries, "read")
        if len(self.facts) == 0:
            raise EmptyMemoryError("memory is empty: write facts before reading")
        return self.read_latents(self.encoder(queries))

    # ------------------------------------------------------------------ conditioning
    def conditioning(self, z: torch.Tensor, q: torch.Tensor | None = None) -> Conditioning:
        """(B, C) or (B, memory width) read-outs -> KV prefix (+ embedding offset, + gated output offset,
        + the token code's logit bias).

        `q` (B, C): the queries' own latents, read by the output offset (pass them whenever the
        prompts are known; None stands for zeros). With `value_code` "both" the latent half of `z`
        conditions as a latent does and the code half is decoded, gated per row by the ratio of the
        halves' norms (1 for a stored value, 0 for a text: `value_rows`); a read-out of width C
        (e.g. the long-context hierarchy's) has no code.
        """
        code, gate = None, None
        if self.config.value_code == "tokens":
            code = z
        elif self.config.value_code == "both":
            C = self.config.latent_size
            if z.shape[-1] == 2 * C:
                z, code = z[..., :C], z[..., C:]  # (B, C) each
                gate = (code.norm(dim=-1) / z.norm(dim=-1).clamp_min(1e-12)).clamp(max=1.0)  # (B,)
                gate = torch.where(gate >= self.config.code_gate_floor, gate, torch.zeros_like(gate))  # weak codes: none
                if not bool((gate > 0).any()):  # no row holds a code (texts only): skip decoding it
                    code, gate = None, None
            elif z.shape[-1] != C:
                raise ValueError(f"conditioning: read-outs of width {z.shape[-1]}, expected {C} or {2 * C}")
        offset = self.emb_offset(z) if self.emb_offset is not None else None
        output = self.out_offset(z, q) if self.out_offset is not None else None
        head = None if code is None else self.token_code
        return Conditioning(self.kv_prefix(z), offset, output, self.out_offset, code, head, gate)

    def _embed_for_scope(self, texts: list[str]) -> torch.Tensor:
        return self.encoder.embed(texts)

    def route(self, prompts: list[str], use_memory: UseMemory) -> tuple[torch.Tensor, torch.Tensor]:
        """Which prompts take the memory path -> (mask (Q,) bool, scope scores (Q,))."""
        mask, scores, _ = self.route_with_embeddings(prompts, use_memory)
        return mask, scores

    def route_with_embeddings(self, prompts: list[str], use_memory: UseMemory) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`route` plus the prompts' pooled embeddings (Q, H) when the scope check computed them (else None):
        the memory path reuses them instead of running the encoder a second time."""
        n = len(prompts)
        if use_memory not in ("auto", "always", "never"):
            raise ValueError(f"use_memory={use_memory!r}: expected 'auto', 'always' or 'never'")
        if use_memory == "never":
            return torch.zeros(n, dtype=torch.bool), torch.full((n,), float("nan")), None
        if len(self.facts) == 0:
            if use_memory == "always":
                raise EmptyMemoryError("use_memory='always' but memory is empty: write facts first")
            return torch.zeros(n, dtype=torch.bool), torch.full((n,), -1.0), None
        if use_memory == "always" or not self.config.use_scope_detector:
            return torch.ones(n, dtype=torch.bool), torch.full((n,), float("nan")), None
        res = self.scope.score(prompts)
        return res.in_scope, res.score, res.query_embedding

    @torch.no_grad()
    def condition_prompts(self, prompts: list[str], embeddings: torch.Tensor | None = None) -> Conditioning:
        """Read memory with each prompt's encoding and map the read-outs to the decoder's conditioning.

        `embeddings` (Q, H): the prompts' pooled encoder embeddings if already computed (scope check).
        """
        e = self.encoder.embed(prompts) if embeddings is None else embeddings
        q = self.encoder.head(e)
        return self.conditioning(self.read_latents(q), q)

    # ------------------------------------------------------------------ decoding
    def _tokenize_prompts(self, prompts: list[str], padding_side: str):
        tok = self.tokenizer
        old = tok.padding_side
        tok.padding_side = padding_side
        try:
            enc = tokenize_truncating(tok, prompts, self.config.max_decoder_tokens, "decoder")
        finally:
            tok.padding_side = old
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str] | str,
        max_new_tokens: int = 20,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        use_memory: UseMemory = "auto",
        return_details: bool = False,
        release_after_answer: bool = False,
        stop_after_answer: bool = False,
    ) -> list[str] | list[Generation]:
        """Continue each prompt. Greedy by default; sampling with temperature / top-k / top-p and a seed.

        `use_memory`: "auto" (scope detector decides), "always", or "never" (plain decoding).
        `release_after_answer`: memory conditions a continuation only up to its first sentence end
        (a token with ".", "!", "?" or a newline); the rest is plain decoding of the text so far.
        `stop_after_answer`: every continuation ends with its answer: " Rome\n" instead of
        " Rome\n Rome\n Rome". A row read from a stored token code (`value_code` "tokens", or "both" with
        the code's gate at 0.5 or more) ends at the code's end token, so a value may hold "." ("St. Louis");
        any other row, plain or from a latent, at its first sentence end after some text.
        """
        if release_after_answer and stop_after_answer:
            raise ValueError("generate: release_after_answer and stop_after_answer exclude each other (stopping leaves nothing to release)")
        prompts = check_texts(prompts, "generate")
        mask, scores, q_emb = self.route_with_embeddings(prompts, use_memory)
        gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        outputs: list[str | None] = [None] * len(prompts)
        for use in (True, False):
            idx = [i for i in range(len(prompts)) if bool(mask[i]) == use]
            if not idx:
                continue
            sub = [prompts[i] for i in idx]
            ids, att = self._tokenize_prompts(sub, "left")
            cond = self.condition_prompts(sub, None if q_emb is None else q_emb[idx]) if use else None
            new = self.runner.generate(
                ids,
                att,
                cond,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                generator=gen,
                release_mask=self.sentence_end_mask() if release_after_answer else None,
                stop_mask=self.answer_end_mask(cond) if stop_after_answer else None,
                blank_mask=self.blank_token_mask() if stop_after_answer else None,
            )
            for j, i in enumerate(idx):
                outputs[i] = self.tokenizer.decode(new[j], skip_special_tokens=True)
        if return_details:
            return [Generation(outputs[i], bool(mask[i]), float(scores[i])) for i in range(len(prompts))]
        return outputs  # type: ignore[return-value]

    def sentence_end_mask(self) -> torch.Tensor:
        """(V,) bool: decoder tokens whose text holds ".", "!", "?" or a newline (cached)."""
        return self._token_text_mask("_sentence_end_mask", lambda text: any(ch in text for ch in ".!?\n"))

    def answer_end_mask(self, cond: Conditioning | None) -> torch.Tensor:
        """Where each row's answer ends -> (V,) bool, the sentence ends, or (B, V) bool when `cond` reads
        token codes: the code's end token alone for a row whose code gate is at least 0.5."""
        ends = self.sentence_end_mask()
        if cond is None or cond.code is None:
            return ends
        B = cond.code.shape[0]
        gate = torch.ones(B) if cond.code_gate is None else cond.code_gate.detach().float().cpu().reshape(B)
        code_end = torch.zeros_like(ends)
        code_end[self.value_code_end_id()] = True
        return torch.where((gate >= 0.5)[:, None], code_end[None], ends[None])  # (B, V)

    def blank_token_mask(self) -> torch.Tensor:
        """(V,) bool: decoder tokens whose text is empty or whitespace only (cached)."""
        return self._token_text_mask("_blank_token_mask", lambda text: not text.strip())

    def _token_text_mask(self, key: str, predicate) -> torch.Tensor:
        """(V,) bool: `predicate(text)` of each decoder token's text, cached under `key` (ids past the
        tokenizer's vocabulary, e.g. padding rows of the embedding, are False)."""
        mask = self.__dict__.get(key)
        if mask is None:
            V = self.decoder.get_output_embeddings().weight.shape[0]
            texts = self.tokenizer.convert_ids_to_tokens(list(range(min(V, len(self.tokenizer)))))
            flags = [predicate(self.tokenizer.convert_tokens_to_string([t])) if t is not None else False for t in texts]
            mask = torch.zeros(V, dtype=torch.bool)
            mask[: len(flags)] = torch.tensor(flags, dtype=torch.bool)
            self.__dict__[key] = mask
        return mask

    @torch.no_grad()
    def score(
        self,
        prompts: list[str] | str,
        candidates: list[str] | list[list[str]],
        *,
        use_memory: UseMemory = "auto",
        batch_size: int = 16,
    ) -> torch.Tensor:
        """Mean target-token NLL of each candidate continuation of each prompt -> (Q, n_candidates).

        `candidates` is one list shared by all prompts or one list per prompt (same length each).
        Continuations are appended verbatim: pass them with their leading space (" Paris").
        """
        prompts = check_texts(prompts, "score")
        if candidates and isinstance(candidates[0], str):
            candidates = [list(candidates)] * len(prompts)  # type: ignore[list-item]
        if len(candidates) != len(prompts):
            raise ValueError(f"score: {len(prompts)} prompts but {len(candidates)} candidate lists")
        n_cand = len(candidates[0])
        if n_cand == 0 or any(len(c) != n_cand for c in candidates):
            raise ValueError("score: every prompt needs the same, non-zero number of candidates")
        flat_p = [p for p in prompts for _ in range(n_cand)]
        flat_c = [c for cs in candidates for c in cs]
        stats = self.token_stats(flat_p, flat_c, use_memory=use_memory, batch_size=batch_size)
        nll = torch.stack([-s.logprobs.float().mean() for s in stats])
        return nll.cpu().view(len(prompts), n_cand)

    @torch.no_grad()
    def token_stats(
        self,
        prompts: list[str],
        continuations: list[str],
        *,
        use_memory: UseMemory = "auto",
        batch_size: int = 16,
    ) -> list:
        """Teacher-forced per-token statistics (`larimar.eval.scoring.ContinuationStats`) of each
        continuation after its prompt (pairs), routed and conditioned as `generate` does.

        Each distinct prompt is routed and encoded once, however many continuations it has.
        """
        from larimar.eval.scoring import continuation_token_stats

        prompts = check_texts(prompts, "token_stats")
        if len(continuations) != len(prompts):
            raise ValueError(f"token_stats: {len(prompts)} prompts but {len(continuations)} continuations")
        unique = list(dict.fromkeys(prompts))
        row = {p: i for i, p in enumerate(unique)}
        mask, _, q_emb = self.route_with_embeddings(unique, use_memory)
        out: list = [None] * len(prompts)
        for use in (True, False):
            idx = [i for i, p in enumerate(prompts) if bool(mask[row[p]]) == use]
            if not idx:
                continue
            sub_p = [prompts[i] for i in idx]
            forward = None
            if use:
                rows = [row[p] for p in sub_p]
                cond = self.condition_prompts(sub_p, None if q_emb is None else q_emb[rows])

                def forward(input_ids, attention_mask, batch_index, _cond=cond):
                    return self.runner.forward(input_ids, attention_mask, _cond.select(batch_index)).logits

            stats = continuation_token_stats(
                self.decoder, self.tokenizer, sub_p, [continuations[i] for i in idx], batch_size=batch_size, forward_fn=forward
            )
            for i, st in zip(idx, stats):
                out[i] = st
        return out

    # ------------------------------------------------------------------ training-time forward
    def conditioned_lm_loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        z: torch.Tensor | None,
    ) -> torch.Tensor:
        """Mean token cross-entropy of `labels` (B, T; -100 ignored) under conditioning from z (B, C) or none."""
        cond = None if z is None else self.conditioning(z)
        logits = self.runner.forward(input_ids, attention_mask, cond).logits  # (B, T, V)
        shift_logits = logits[:, :-1].float()
        shift_labels = labels[:, 1:]
        return nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100
        )
