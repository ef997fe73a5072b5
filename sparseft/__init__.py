"""sparseft: fused kernels for sparse and memory-efficient LLM fine-tuning."""

from sparseft.ops import cross_entropy, linear_cross_entropy

__version__ = "0.1.0"
__all__ = ["cross_entropy", "linear_cross_entropy", "__version__"]
