"""Optimizers for sparse and memory-efficient fine-tuning."""

from sparseft.optim.sparse_adamw import SparseAdamW

__all__ = ["SparseAdamW"]
