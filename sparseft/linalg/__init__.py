"""Shared low-rank machinery: one truncated SVD (randomized range finder, seeded and
warm-startable, with the exact SVD as its reference mode) for LowRankAdamW, SaRA and the
approximate modes of the mask selectors."""

from sparseft.linalg.range_finder import right_singular_vectors, subspace_overlap, truncated_svd

__all__ = ["right_singular_vectors", "subspace_overlap", "truncated_svd"]
