"""Integrations with training frameworks. Each submodule imports its framework on first
use, so ``import sparseft.integrations`` costs nothing when the framework is absent."""

__all__ = ["FusedLossTrainer", "OwLoreCallback", "fused_causal_lm_loss"]


def __getattr__(name):
    if name in __all__:
        from sparseft.integrations import transformers as _hf
        return getattr(_hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
