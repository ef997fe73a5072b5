"""C++ CPU backend of the masked-loss cross-entropy (csrc/cpu/cross_entropy.cpp)."""

import torch

from sparseft import _ext
from sparseft.ops._chunking import chunk_rows


def _ops():
    _ext.load()
    return torch.ops.sparseft_C


def _none_if_empty(t, needed):
    return t if needed else None


def linear_ce(hidden, weight, bias, labels, scale, label_smoothing, z_loss, softcap,
              need_grad_hidden, need_grad_weight, need_grad_bias):
    loss, gh, gw, gb = _ops().linear_cross_entropy(
        hidden.contiguous(), weight.contiguous(), bias, labels, scale, label_smoothing, z_loss, softcap,
        need_grad_hidden, need_grad_weight, need_grad_bias, chunk_rows(weight.shape[0]))
    return (loss, _none_if_empty(gh, need_grad_hidden), _none_if_empty(gw, need_grad_weight),
            _none_if_empty(gb, need_grad_bias))


def ce_forward(logits, labels, scale, label_smoothing, z_loss, softcap):
    return _ops().cross_entropy_forward(logits, labels, scale, label_smoothing, z_loss, softcap)


def ce_backward(logits, lse, labels, scale, label_smoothing, z_loss, softcap):
    return _ops().cross_entropy_backward(logits, lse, labels, scale, label_smoothing, z_loss, softcap)
