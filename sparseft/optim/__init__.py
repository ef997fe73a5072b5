"""Optimizers for sparse and memory-efficient fine-tuning."""

from sparseft.optim.lowrank_adamw import LowRankAdamW, lowrank_param_groups
from sparseft.optim.owlore import OwLoreSampler, outlier_ratios
from sparseft.optim.sara import NuclearNormPenalty, sara_reselect
from sparseft.optim.sparse_adamw import SparseAdamW

__all__ = ["LowRankAdamW", "NuclearNormPenalty", "OwLoreSampler", "SparseAdamW", "lowrank_param_groups",
           "outlier_ratios", "sara_reselect"]
