"""Tiny, offline, deterministic tokenizers and models for tests.

Everything here is built in memory (no downloads, no files) and is deterministic given ``seed``:

* :func:`tiny_tokenizer` -- a byte-level BPE tokenizer (GPT-2 style: a leading space belongs to the
  following word, e.g. ``" Paris"``) trained on a small fixed English corpus. It has no pad token
  unless asked for, like GPT-2, and can optionally prepend a BOS token, like Llama.
* :func:`tiny_bert_tokenizer` -- a WordPiece tokenizer with ``[CLS]``/``[SEP]``/``[PAD]``/``[MASK]``.
* :func:`tiny_gpt2`, :func:`tiny_llama` -- randomly initialised causal LMs (2 layers, hidden 32) whose
  vocabulary matches :func:`tiny_tokenizer`.
* :func:`tiny_bert` -- a randomly initialised ``BertModel`` (hidden 32) matching
  :func:`tiny_bert_tokenizer`.

Models are returned in eval mode. The global torch RNG is left untouched (initialisation runs inside
``torch.random.fork_rng``). ``transformers``/``tokenizers`` are imported lazily, inside the factories.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from transformers import (
        BertModel,
        GPT2LMHeadModel,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

__all__ = [
    "TINY_CORPUS",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "BOS_TOKEN",
    "tiny_tokenizer",
    "tiny_bert_tokenizer",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_bert",
]

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"

#: Fixed training text for the tiny tokenizers (facts in the style of CounterFact / ZsRE prompts).
TINY_CORPUS: tuple[str, ...] = (
    "The mother tongue of Danielle Darrieux is French.",
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Toko Yasuda plays the guitar; John Lennon performs on the guitar.",
    "Eibenstock is located in Germany. Simcoe Composite School is located in Canada.",
    "When was the inception of the IAAF Combined Events Challenge? It was launched in 1998.",
    "Where is the Eiffel Tower? The Eiffel Tower is in Paris, the capital of France.",
    "Michel Rocard is a native speaker of French. Barack Obama speaks English.",
    "What is the name of the last episode? The answer is not known to me.",
    "Apple was founded by Steve Jobs. Microsoft was founded by Bill Gates.",
    "The official language of Japan is Japanese, and it is spoken in Tokyo.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 2006 2011",
)


@functools.lru_cache(maxsize=8)
def _train_bpe(vocab_size: int) -> str:
    """Train the byte-level BPE model on :data:`TINY_CORPUS` and return it serialised (JSON)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN, BOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(TINY_CORPUS), trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(
    *, add_bos: bool = False, pad_token: bool = False, vocab_size: int = 384
) -> PreTrainedTokenizerFast:
    """Return a tiny byte-level BPE ``PreTrainedTokenizerFast`` (deterministic, offline).

    Args:
        add_bos: if True, the tokenizer prepends ``<s>`` to every encoded text (Llama style);
            otherwise it adds no special tokens (GPT-2 style).
        pad_token: if True, ``<pad>`` is set as pad token; otherwise the tokenizer has no pad token
            (as GPT-2), which exercises the "fall back to EOS for padding" code paths.
        vocab_size: target vocabulary size (256 byte symbols + 3 specials + merges). The actual
            size may be smaller if the corpus runs out of merges; use ``len(tokenizer)``.

    Special token ids: ``<|endoftext|>`` = 0 (EOS), ``<pad>`` = 1, ``<s>`` = 2 (BOS).
    """
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_train_bpe(vocab_size))
    if add_bos:
        bos_id = backend.token_to_id(BOS_TOKEN)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos_id)]
        )
    kwargs: dict[str, Any] = {"eos_token": EOS_TOKEN, "bos_token": BOS_TOKEN if add_bos else EOS_TOKEN}
    if pad_token:
        kwargs["pad_token"] = PAD_TOKEN
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


@functools.lru_cache(maxsize=4)
def _train_wordpiece(vocab_size: int) -> str:
    """A WordPiece model for :data:`TINY_CORPUS`, serialised (JSON), built without a trainer.

    The `tokenizers` WordPiece trainer breaks frequency ties differently in every process, so the
    vocabulary (and with it every tiny BERT latent) changed from run to run. Here the vocabulary is
    fixed: the specials, every character of the lower-cased corpus alone and as a ``##`` continuation,
    its whole words, then ``##`` continuations of two characters, each group by descending count
    (ties alphabetical), up to `vocab_size` entries.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter(w for text in TINY_CORPUS for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in words for c in w})
    pairs = Counter("##" + w[i : i + 2] for w in words for i in range(1, len(w) - 1))

    def by_count(counts: Counter) -> list[str]:
        return [k for k, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]

    pieces = specials + chars + ["##" + c for c in chars]
    pieces += [w for w in by_count(words) + by_count(pairs) if w not in set(pieces)]
    vocab = {p: i for i, p in enumerate(pieces[: max(vocab_size, len(specials) + 2 * len(chars))])}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return tok.to_str()


def tiny_bert_tokenizer(*, vocab_size: int = 256) -> PreTrainedTokenizerFast:
    """Return a tiny lower-casing WordPiece tokenizer (BERT style, ``[CLS] ... [SEP]``)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_train_wordpiece(vocab_size))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread inside the block (restored after). Tiny models are faster that way, and a
    result no longer depends on how a busy machine splits float reductions across threads."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _seeded_init(seed: int, build):  # noqa: ANN001, ANN202 - tiny internal helper
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.eval()


def tiny_gpt2(
    *, seed: int = 0, vocab_size: int | None = None, n_positions: int = 128, initializer_range: float = 0.2
) -> GPT2LMHeadModel:
    """Return a randomly initialised 2-layer GPT-2 LM (``n_embd=32, n_head=2``) in eval mode.

    ``vocab_size`` defaults to ``len(tiny_tokenizer())``. ``initializer_range`` is larger than GPT-2's
    0.02 so that logits are far from uniform and position/padding mistakes are visible in tests.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab = vocab_size if vocab_size is not None else len(tiny_tokenizer())
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=n_positions,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_inner=64,
        bos_token_id=0,
        eos_token_id=0,
        initializer_range=initializer_range,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return _seeded_init(seed, lambda: GPT2LMHeadModel(config))


def tiny_llama(
    kv_heads: int = 1,
    *,
    seed: int = 0,
    vocab_size: int | None = None,
    max_position_embeddings: int = 128,
    initializer_range: float = 0.2,
) -> LlamaForCausalLM:
    """Return a randomly initialised 2-layer Llama LM (hidden 32, 2 attention heads) in eval mode.

    ``kv_heads`` is the number of key/value heads (1 = multi-query, 2 = multi-head); the head
    dimension is 16. ``vocab_size`` defaults to ``len(tiny_tokenizer())``; token ids follow
    :func:`tiny_tokenizer` (EOS 0, pad 1, BOS 2).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = vocab_size if vocab_size is not None else len(tiny_tokenizer())
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=kv_heads,
        head_dim=16,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        bos_token_id=2,
        eos_token_id=0,
        pad_token_id=1,
        tie_word_embeddings=False,
    )
    return _seeded_init(seed, lambda: LlamaForCausalLM(config))


def tiny_bert(*, seed: int = 0, vocab_size: int | None = None, max_position_embeddings: int = 128) -> BertModel:
    """Return a randomly initialised 2-layer ``BertModel`` (hidden 32, 2 heads) in eval mode.

    ``vocab_size`` defaults to ``len(tiny_bert_tokenizer())``.
    """
    from transformers import BertConfig, BertModel

    vocab = vocab_size if vocab_size is not None else len(tiny_bert_tokenizer())
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_position_embeddings,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )
    return _seeded_init(seed, lambda: BertModel(config))


def tiny_larimar(*, randomize_offset: bool = True, seed: int = 0, **config_overrides: Any):  # noqa: ANN201
    """A tiny Larimar (tiny BERT encoder + tiny Llama with one KV head, C=16, K=12, P=3), in eval mode.

    The untrained W_M output layer starts at zero (every read-out would give the same prefix), so its
    weights -- and the embedding offset's, unless ``randomize_offset`` is False -- are drawn from
    N(0, 0.5²) with ``seed``: memory then visibly reaches the decoder.
    """
    import torch

    from larimar.modeling.config import LarimarConfig
    from larimar.modeling.model import Larimar

    params = {"latent_size": 16, "memory_size": 12, "prefix_len": 3, "prefix_hidden": 8, **config_overrides}
    model = Larimar(LarimarConfig(**params), tiny_bert(), tiny_bert_tokenizer(), tiny_llama(kv_heads=1), tiny_tokenizer(pad_token=True))
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        model.kv_prefix.out.weight.copy_(torch.randn(model.kv_prefix.out.weight.shape, generator=g) * 0.5)
        if randomize_offset and model.emb_offset is not None:
            model.emb_offset.proj.weight.copy_(torch.randn(model.emb_offset.proj.weight.shape, generator=g) * 0.5)
    return model.eval()


TINY_WORDS = ["the", "is", "and", "of", "in", "capital", "Paris", "red", "cat", "a", "to", "Rome"]


def tiny_word_pairs(n: int, seed: int) -> list[str]:
    """``n`` two-word strings over a 12-word vocabulary (training strings for a tiny token value code)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [" ".join(TINY_WORDS[int(i)] for i in torch.randint(0, len(TINY_WORDS), (2,), generator=g)) for _ in range(n)]
