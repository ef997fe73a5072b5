"""Mask selection for sparse fine-tuning: which weight entries to train.

A mask is a sorted, unique, 1-D int32 (int64 from 2**31 elements) tensor of flat indices
into ``param.view(-1)``; a MaskSet maps parameter names to masks.
"""

from sparseft.masks._validate import mask_dtype, validate_mask
from sparseft.masks.maskset import DensityReport, MaskSet
from sparseft.masks.selectors import gradient, half, half_matrices, lift, lottery, random, sara
from sparseft.masks.targets import select_targets

__all__ = [
    "DensityReport",
    "MaskSet",
    "gradient",
    "half",
    "half_matrices",
    "lift",
    "lottery",
    "mask_dtype",
    "random",
    "sara",
    "select_targets",
    "validate_mask",
]
