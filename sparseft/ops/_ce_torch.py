"""Plain-PyTorch cross-entropy backend: the readable specification of the contract
every backend implements, and the fallback on any device.

The contract (shared by the cpu, triton and cuda backends):

* ``scale[i]`` is the weight of row i in the objective ``sum_i scale[i] * loss[i]``; rows
  with ``scale[i] == 0`` (ignored labels, zero loss weights) are inactive: their loss is 0,
  their gradients are 0, and they are dropped before any matmul. Active rows carry a label
  in ``[0, V)``.
* ``loss[i] = lse_i - (1-eps)·x[i, y_i] - (eps/V)·sum_j x[i, j] + z·lse_i²`` in float32, where
  ``x = softcap·tanh(z/softcap)`` (or the raw logits when softcap is 0).
* gradients are those of ``sum_i scale[i] * loss[i]``, returned in the input dtypes.
"""

import torch

from sparseft.ops._chunking import chunk_rows


def _wide(t):
    """Float32 for low-precision inputs; float64 stays float64 so references can use it."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _capped(logits, softcap):
    x = _wide(logits)
    return softcap * torch.tanh(x / softcap) if softcap else x


def _row_loss(x, labels, lse, label_smoothing, z_loss):
    target = x.gather(1, labels[:, None]).squeeze(1)
    loss = lse - (1.0 - label_smoothing) * target
    if label_smoothing:
        loss = loss - label_smoothing * x.mean(dim=1)
    if z_loss:
        loss = loss + z_loss * lse * lse
    return loss


def _row_grad(x, labels, lse, scale, label_smoothing, z_loss, softcap):
    """d(sum_i scale_i loss_i)/d(logits) for the rows of x (float32)."""
    grad = torch.exp(x - lse[:, None])
    if z_loss:
        grad.mul_(1.0 + 2.0 * z_loss * lse[:, None])
    if label_smoothing:
        grad.sub_(label_smoothing / x.shape[1])
    grad.scatter_add_(1, labels[:, None], torch.full_like(lse[:, None], label_smoothing - 1.0))
    if softcap:
        grad.mul_(1.0 - (x / softcap) ** 2)
    return grad.mul_(scale[:, None])


def ce_forward(logits, labels, scale, label_smoothing, z_loss, softcap):
    """Per-row loss and log-sum-exp of [N, V] logits (both float32, 0 on inactive rows)."""
    loss = logits.new_zeros(logits.shape[0], dtype=_wide(scale).dtype)
    lse = torch.zeros_like(loss)
    rows = scale.nonzero().squeeze(1)
    step = chunk_rows(logits.shape[1])
    for start in range(0, rows.numel(), step):
        idx = rows[start:start + step]
        x = _capped(logits.index_select(0, idx), softcap)
        row_lse = torch.logsumexp(x, dim=1)
        lse[idx] = row_lse
        loss[idx] = _row_loss(x, labels[idx], row_lse, label_smoothing, z_loss)
    return loss, lse


def ce_backward(logits, lse, labels, scale, label_smoothing, z_loss, softcap):
    """Gradient of sum_i scale_i loss_i with respect to [N, V] logits, in the logits dtype."""
    grad = torch.zeros_like(logits)
    rows = scale.nonzero().squeeze(1)
    step = chunk_rows(logits.shape[1])
    for start in range(0, rows.numel(), step):
        idx = rows[start:start + step]
        x = _capped(logits.index_select(0, idx), softcap)
        grad[idx] = _row_grad(x, labels[idx], lse[idx], scale[idx], label_smoothing, z_loss,
                              softcap).to(grad.dtype)
    return grad


def linear_ce(hidden, weight, bias, labels, scale, label_smoothing, z_loss, softcap,
              need_grad_hidden, need_grad_weight, need_grad_bias):
    """Fused linear + cross-entropy over [N, D] hidden and [V, D] weight, chunked over
    active rows so no [N, V] tensor exists. Gradients (None where not needed) are computed
    in the same pass."""
    n, vocab = hidden.shape[0], weight.shape[0]
    acc = _wide(scale).dtype
    loss = hidden.new_zeros(n, dtype=acc)
    grad_hidden = torch.zeros_like(hidden) if need_grad_hidden else None
    grad_weight = torch.zeros_like(weight, dtype=acc) if need_grad_weight else None
    grad_bias = torch.zeros(vocab, dtype=acc, device=hidden.device) if need_grad_bias else None
    need_grad = need_grad_hidden or need_grad_weight or need_grad_bias
    weight32 = weight.to(acc)
    bias32 = None if bias is None else bias.to(acc)
    rows = scale.nonzero().squeeze(1)
    step = chunk_rows(vocab, hidden.shape[1])
    for start in range(0, rows.numel(), step):
        idx = rows[start:start + step]
        h = hidden.index_select(0, idx).to(acc)
        x = _capped(torch.nn.functional.linear(h, weight32, bias32), softcap)
        lse = torch.logsumexp(x, dim=1)
        loss[idx] = _row_loss(x, labels[idx], lse, label_smoothing, z_loss)
        if not need_grad:
            continue
        g = _row_grad(x, labels[idx], lse, scale[idx], label_smoothing, z_loss, softcap)
        if need_grad_hidden:
            grad_hidden[idx] = (g @ weight32).to(hidden.dtype)
        if need_grad_weight:
            grad_weight.addmm_(g.t(), h)
        if need_grad_bias:
            grad_bias += g.sum(dim=0)
    return (loss, grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype))
