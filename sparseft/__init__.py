"""sparseft: fused kernels for sparse and memory-efficient LLM fine-tuning."""

from sparseft import masks
from sparseft.delta import SparseDelta
from sparseft.ops import cross_entropy, linear_cross_entropy, sampled_weight_grad
from sparseft.sparse_linear import SparseLinear, sparsify, unsparsify

__version__ = "0.1.0"
__all__ = ["SparseDelta", "SparseLinear", "cross_entropy", "linear_cross_entropy", "masks", "sampled_weight_grad",
           "sparsify", "unsparsify", "__version__"]
