"""Data collators producing per-token loss weights for sparseft's masked-loss cross-entropy, and
generated task data (multi-step arithmetic word problems) in the form they consume."""

from sparseft.data._examples import ANSWER, PAD, PROMPT, THOUGHT
from sparseft.data.arithmetic import ArithmeticProblem, arithmetic_problems, parse_answer, tokenize_problems
from sparseft.data.collators import MaskedThoughtCollator, MEAPCollator, ThoughtMaskCollator, masked_count

__all__ = ["ThoughtMaskCollator", "MaskedThoughtCollator", "MEAPCollator", "masked_count",
           "PAD", "PROMPT", "THOUGHT", "ANSWER",
           "ArithmeticProblem", "arithmetic_problems", "tokenize_problems", "parse_answer"]
