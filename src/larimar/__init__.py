"""Larimar: editable episodic memory for language models (Das et al., ICML 2024).

Importing this package has no side effects: heavy modules (transformers, Lightning) are imported
only by the parts that need them.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "Larimar", "LarimarConfig"]


def __getattr__(name):  # lazy: `from larimar import Larimar` without importing transformers eagerly
    if name in ("Larimar", "LarimarConfig"):
        from larimar.modeling import model as _model

        return getattr(_model, name)
    raise AttributeError(f"module 'larimar' has no attribute {name!r}")
