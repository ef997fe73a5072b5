"""CUDA backend of the masked-loss cross-entropy (csrc/cuda/cross_entropy.cu, bound to the
sparseft_C ops by csrc/cuda/cross_entropy_binding.cpp). Same signatures as _ce_torch.

Its linear path synchronises once per call (to size the cuBLAS GEMMs by the number of
active rows); the Triton backend is the sync-free default on GPUs."""

import torch

from sparseft import _ext
from sparseft.ops._chunking import chunk_rows


def _ops():
    _ext.load()
    return torch.ops.sparseft_C


def _none_if_not(t, needed):
    return t if needed else None


def linear_ce(hidden, weight, bias, labels, scale, label_smoothing, z_loss, softcap,
              need_grad_hidden, need_grad_weight, need_grad_bias):
    loss, gh, gw, gb = _ops().linear_cross_entropy(
        hidden.contiguous(), weight.contiguous(), bias, labels, scale, label_smoothing, z_loss, softcap,
        need_grad_hidden, need_grad_weight, need_grad_bias, chunk_rows(weight.shape[0]))
    return (loss, _none_if_not(gh, need_grad_hidden), _none_if_not(gw, need_grad_weight),
            _none_if_not(gb, need_grad_bias))


def ce_forward(logits, labels, scale, label_smoothing, z_loss, softcap):
    return _ops().cross_entropy_forward(logits, labels, scale, label_smoothing, z_loss, softcap)


def ce_backward(logits, lse, labels, scale, label_smoothing, z_loss, softcap):
    return _ops().cross_entropy_backward(logits, lse, labels, scale, label_smoothing, z_loss, softcap)
