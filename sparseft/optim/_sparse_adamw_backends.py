"""The fused SparseAdamW step: contract, torch reference, dispatch to cpu / triton / cuda.

One call updates one parameter's masked entries:

    step[k]      += 1
    g             = grad[k]                          (compact grad, shape [nnz])
                  | grad.view(-1)[indices[k]]        (dense grad, shape of target)
    exp_avg[k]    = beta1 * exp_avg[k] + (1 - beta1) * g
    exp_avg_sq[k] = beta2 * exp_avg_sq[k] + (1 - beta2) * g * g
    bc1, bc2      = 1 - beta1**step[k], 1 - beta2**step[k]
    w             = (values[k] if values is given else target.view(-1)[indices[k]]) * (1 - lr * weight_decay)
    w            -= lr * (exp_avg[k] / bc1) / (sqrt(exp_avg_sq[k] / bc2) + eps)
    target.view(-1)[indices[k]] = w        (and values[k] = w when values is given)

``values`` (kind (b), a sparsified layer's ``weight_values``) mirrors the target at the
indices, so when given it is read instead of gathering the target: the only scattered access
left is the store.

Math is float32 whatever the target dtype; w is rounded once to the target dtype. Bias
correction uses each entry's own step count, so entries that join at a mask refresh start
from zero moments with the bias correction of a fresh AdamW. It is computed as
-expm1(step * log(beta)), which keeps float32 precision where 1 - beta**step would cancel
(beta2 = 0.999 at step 1). Entries outside the mask are never read or written.
"""

import math

import torch

from sparseft import _backends, _ext

IMPLEMENTED = ("torch", "cpu", "triton", "cuda")
_TARGET_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)


def hyper(lr, beta1, beta2, eps, weight_decay):
    """The per-call constants every backend uses, computed once in float64 on the host."""
    return dict(
        lr=lr, beta1=beta1, one_minus_beta1=1.0 - beta1, beta2=beta2, one_minus_beta2=1.0 - beta2,
        log_beta1=math.log(beta1) if beta1 > 0 else -math.inf,
        log_beta2=math.log(beta2) if beta2 > 0 else -math.inf,
        eps=eps, decay=1.0 - lr * weight_decay)


def check_step_args(target, indices, grad, exp_avg, exp_avg_sq, step, values):
    """Shape/dtype/device checks (no data reads); True when grad is compact ([nnz])."""
    if target.dtype not in _TARGET_DTYPES:
        raise TypeError(f"target: expected one of {_TARGET_DTYPES}, got {target.dtype}")
    if not target.is_contiguous():
        raise ValueError("target: the masked weight must be contiguous (mask indices address target.view(-1))")
    if indices.dtype not in _INDEX_DTYPES or indices.dim() != 1:
        raise TypeError(f"indices: expected a 1-D int32/int64 tensor, got {indices.dtype} of shape {tuple(indices.shape)}")
    nnz = indices.numel()
    for name, t, dtype in (("exp_avg", exp_avg, torch.float32), ("exp_avg_sq", exp_avg_sq, torch.float32),
                           ("step", step, torch.int32)):
        if t.dtype != dtype or t.shape != (nnz,) or not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous {dtype} tensor of shape ({nnz},), "
                             f"got {t.dtype} of shape {tuple(t.shape)}")
    if grad.dtype != target.dtype:
        raise TypeError(f"grad: expected dtype {target.dtype} (the weight's), got {grad.dtype}")
    if grad.is_sparse:
        raise TypeError("grad: sparse COO gradients are not supported; SparseAdamW gathers dense or compact gradients")
    compact = grad.dim() == 1 and grad.numel() == nnz
    if not compact and grad.shape != target.shape:
        raise ValueError(f"grad: expected the compact shape ({nnz},) or the weight's shape {tuple(target.shape)}, "
                         f"got {tuple(grad.shape)}")
    if values is not None and (values.dtype != target.dtype or values.shape != (nnz,) or not values.is_contiguous()):
        raise ValueError(f"values: expected a contiguous {target.dtype} tensor of shape ({nnz},), "
                         f"got {values.dtype} of shape {tuple(values.shape)}")
    tensors = [target, indices, grad, exp_avg, exp_avg_sq, step] + ([values] if values is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"all tensors of a step must be on one device, got {sorted({str(t.device) for t in tensors})}")
    return compact


def torch_step(target, indices, grad, exp_avg, exp_avg_sq, step, values, lr, beta1, beta2, eps, weight_decay):
    """The readable specification (and the fallback on any device)."""
    h = hyper(lr, beta1, beta2, eps, weight_decay)
    flat = target.view(-1)
    idx = indices.long()
    compact = grad.dim() == 1 and grad.numel() == idx.numel()
    g = grad.float() if compact else grad.reshape(-1)[idx].float()
    step.add_(1)
    t = step.float()
    exp_avg.mul_(h["beta1"]).add_(g * h["one_minus_beta1"])
    exp_avg_sq.mul_(h["beta2"]).add_(g * g * h["one_minus_beta2"])
    bc1 = torch.expm1(t * h["log_beta1"]).neg_()
    bc2 = torch.expm1(t * h["log_beta2"]).neg_()
    denom = (exp_avg_sq / bc2).sqrt_().add_(h["eps"])
    current = values if values is not None else flat[idx]
    w = current.float() * h["decay"] - h["lr"] * (exp_avg / bc1) / denom
    w = w.to(target.dtype)
    flat[idx] = w
    if values is not None:
        values.copy_(w)


def _native_step(target, indices, grad, exp_avg, exp_avg_sq, step, values, lr, beta1, beta2, eps, weight_decay):
    _ext.load()
    torch.ops.sparseft_C.sparse_adamw_step(target, indices, grad.contiguous(), exp_avg, exp_avg_sq, step, values,
                                           lr, beta1, beta2, eps, weight_decay)


def _triton_step(target, indices, grad, exp_avg, exp_avg_sq, step, values, lr, beta1, beta2, eps, weight_decay):
    from sparseft.kernels.sparse_adamw import sparse_adamw_step as launch

    launch(target, indices, grad.contiguous(), exp_avg, exp_avg_sq, step, values,
           **hyper(lr, beta1, beta2, eps, weight_decay))


_STEPS = {"torch": torch_step, "cpu": _native_step, "cuda": _native_step, "triton": _triton_step}


def sparse_adamw_step(target, indices, grad, exp_avg, exp_avg_sq, step, values=None, *, lr, beta1, beta2, eps,
                      weight_decay, backend=None):
    """One fused SparseAdamW update of ``target`` at ``indices`` (see the module docstring)."""
    check_step_args(target, indices, grad, exp_avg, exp_avg_sq, step, values)
    name = _backends.resolve(target.device, IMPLEMENTED, backend)
    if indices.numel() == 0:
        return
    _STEPS[name](target, indices, grad, exp_avg, exp_avg_sq, step, values, lr, beta1, beta2, eps, weight_decay)
