from sparseft.ops.cross_entropy import cross_entropy, linear_cross_entropy
from sparseft.ops.merge import merge_tensor
from sparseft.ops.sampled_grad import sampled_weight_grad

__all__ = ["cross_entropy", "linear_cross_entropy", "merge_tensor", "sampled_weight_grad"]
