"""The sparseft._C backends of the masked-loss cross-entropy: the same torch ops serve the
cpu backend (csrc/cpu/cross_entropy.cpp) and the cuda backend (csrc/cuda/cross_entropy.cu,
bound by csrc/cuda/cross_entropy_binding.cpp); the device of the tensors picks the kernel.
Same signatures as _ce_torch.

The cuda linear path synchronises once per call (to size the cuBLAS GEMMs by the number of
active rows); the Triton backend is the sync-free default on GPUs."""

import torch

from sparseft import _ext
from sparseft.ops._chunking import chunk_rows


def _ops():
    _ext.load()
    return torch.ops.sparseft_C


def linear_ce(hidden, weight, bias, labels, scale, label_smoothing, z_loss, softcap,
              need_grad_hidden, need_grad_weight, need_grad_bias):
    loss, gh, gw, gb = _ops().linear_cross_entropy(
        hidden.contiguous(), weight.contiguous(), bias, labels, scale, label_smoothing, z_loss, softcap,
        need_grad_hidden, need_grad_weight, need_grad_bias, chunk_rows(*weight.shape))
    return (loss, gh if need_grad_hidden else None, gw if need_grad_weight else None,
            gb if need_grad_bias else None)


def ce_forward(logits, labels, scale, label_smoothing, z_loss, softcap):
    return _ops().cross_entropy_forward(logits, labels, scale, label_smoothing, z_loss, softcap)


def ce_backward(logits, lse, labels, scale, label_smoothing, z_loss, softcap):
    return _ops().cross_entropy_backward(logits, lse, labels, scale, label_smoothing, z_loss, softcap)
