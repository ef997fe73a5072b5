"""Triton cross-entropy backend: the ``_ce_torch`` contract on the kernels of
``sparseft.kernels.cross_entropy`` (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).

The kernels take contiguous operands, int64 labels and a float32 scale; this module makes
sure they get them (a no-op for the usual inputs) and never synchronises with the host.
"""

import torch

from sparseft.kernels import cross_entropy as _kernels


def _rows(labels, scale):
    return labels.contiguous().to(torch.int64), scale.contiguous().to(torch.float32)


def linear_ce(hidden, weight, bias, labels, scale, label_smoothing, z_loss, softcap,
              need_grad_hidden, need_grad_weight, need_grad_bias):
    labels, scale = _rows(labels, scale)
    return _kernels.linear_ce(hidden.contiguous(), weight.contiguous(),
                              None if bias is None else bias.contiguous(), labels, scale,
                              float(label_smoothing), float(z_loss), float(softcap),
                              need_grad_hidden, need_grad_weight, need_grad_bias)


def ce_forward(logits, labels, scale, label_smoothing, z_loss, softcap):
    labels, scale = _rows(labels, scale)
    return _kernels.ce_forward(logits.contiguous(), labels, scale, float(label_smoothing),
                               float(z_loss), float(softcap))


def ce_backward(logits, lse, labels, scale, label_smoothing, z_loss, softcap):
    labels, scale = _rows(labels, scale)
    return _kernels.ce_backward(logits.contiguous(), lse.contiguous().to(torch.float32), labels, scale,
                                float(label_smoothing), float(z_loss), float(softcap))
