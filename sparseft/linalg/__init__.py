"""Shared low-rank machinery: one truncated SVD (randomized range finder, seeded and
warm-startable, with the exact SVD as its reference mode) for LowRankAdamW, SaRA and the
approximate modes of the mask selectors."""

from sparseft.linalg.range_finder import subspace_overlap, truncated_svd

__all__ = ["subspace_overlap", "truncated_svd"]
