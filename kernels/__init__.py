"""Triton kernels of sparseft (installed as sparseft.kernels). Kernels and launchers only:
autograd and argument checks live in sparseft.ops."""
