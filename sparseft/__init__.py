"""sparseft: fused kernels for sparse and memory-efficient LLM fine-tuning."""

from sparseft import masks
from sparseft.delta import SparseDelta
from sparseft.ops import cross_entropy, linear_cross_entropy

__version__ = "0.1.0"
__all__ = ["SparseDelta", "cross_entropy", "linear_cross_entropy", "masks", "__version__"]
