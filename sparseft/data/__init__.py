"""Data collators producing per-token loss weights for sparseft's masked-loss cross-entropy."""

from sparseft.data._examples import ANSWER, PAD, PROMPT, THOUGHT
from sparseft.data.collators import MaskedThoughtCollator, MEAPCollator, ThoughtMaskCollator, masked_count

__all__ = ["ThoughtMaskCollator", "MaskedThoughtCollator", "MEAPCollator", "masked_count",
           "PAD", "PROMPT", "THOUGHT", "ANSWER"]
