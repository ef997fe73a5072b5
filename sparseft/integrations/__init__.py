"""Integrations with training frameworks. Each submodule imports its framework on first
use, so ``import sparseft.integrations`` costs nothing when the framework is absent."""

_HF = ("FusedLossTrainer", "OwLoreCallback", "apply_fused_cross_entropy", "fused_causal_lm_loss")
_RECIPES = ("HalfFineTuningCallback", "MaskRefreshCallback", "NuclearNormCallback", "RAMTObjective", "RAMTTrainer",
            "create_optimizer")
__all__ = [*_HF, *_RECIPES]


def __getattr__(name):
    if name in _HF:
        from sparseft.integrations import transformers as _hf
        return getattr(_hf, name)
    if name in _RECIPES:
        from sparseft.integrations import recipes
        return getattr(recipes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
