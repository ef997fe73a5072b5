"""sparseft: fused kernels for sparse and memory-efficient LLM fine-tuning."""

import os as _os

# Installed, setuptools maps the top-level kernels/ and bench/ folders to sparseft.kernels and
# sparseft.bench. A source checkout on PYTHONPATH (the GPU script, a dry run) has no mapping:
# there the checkout root joins the package path so the same imports resolve to those folders.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "setup.py")) and _os.path.isfile(_os.path.join(_root, "kernels", "__init__.py")):
    __path__.append(_root)
del _root

from sparseft import masks
from sparseft.delta import SparseDelta
from sparseft.ops import cross_entropy, linear_cross_entropy, sampled_weight_grad
from sparseft.sparse_linear import SparseLinear, sparsify, unsparsify

__version__ = "0.1.0"
__all__ = ["SparseDelta", "SparseLinear", "cross_entropy", "linear_cross_entropy", "masks", "sampled_weight_grad",
           "sparsify", "unsparsify", "__version__"]
