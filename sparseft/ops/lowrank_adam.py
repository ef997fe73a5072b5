"""The two fused ops of a LowRankAdamW step: contract, torch reference, dispatch.

A step of an m×n weight W with gradient G and an orthonormal projector P (r columns) is

    R = G·P                  (side "right": P [n, r], R [m, r])  |  R = Pᵀ·G  (side "left": P [m, r], R [r, n])
    lowrank_adam_direction:  one pass over R (all float32):
        exp_avg    = beta1·exp_avg    + (1 − beta1)·R
        exp_avg_sq = beta2·exp_avg_sq + (1 − beta2)·R·R
        out        = (exp_avg·c1) / (√exp_avg_sq·c2 + eps)          = m̂ / (√v̂ + eps)
      with c1 = 1/(1 − beta1^t), c2 = 1/√(1 − beta2^t) from ``bias_corrections`` (float64, host).
    lowrank_weight_update:   one GEMM with the decay and the scale folded in:
        side "right": W ← W·(1 − lr·wd) − lr·scale·N·Pᵀ      (N [m, r], P [n, r])
        side "left":  W ← W·(1 − lr·wd) − lr·scale·P·N       (P [m, r], N [r, n])
      float32 math, rounded once to W's dtype (float32, bfloat16, float16).

The projection R = G·P itself is a plain matmul, left to the caller. galore-torch's eps
placement (eps added to √v before the bias correction) is ``eps=eps·c2``.

Backends: the direction has the usual four (torch reference, sparseft._C on CPU and CUDA,
Triton); the weight update is ``addmm`` with beta/alpha on torch/cpu/cuda (a float32
temporary of W for bfloat16/float16 weights) and, on triton, a Triton matmul whose epilogue
applies the decay, the scale and the rounding.
"""

import math

import torch

from sparseft import _backends

IMPLEMENTED = ("torch", "cpu", "triton", "cuda")
SIDES = ("left", "right")
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def bias_corrections(beta1, beta2, step):
    """(c1, c2) = (1/(1 − beta1^step), 1/√(1 − beta2^step)) in float64; 1 − beta^t is
    −expm1(t·log beta), exact where it would cancel (beta2 = 0.999 at step 1)."""
    def one_minus_pow(beta):
        return 1.0 if beta == 0 else -math.expm1(step * math.log(beta))
    return 1.0 / one_minus_pow(beta1), 1.0 / math.sqrt(one_minus_pow(beta2))


# ----------------------------------------------------------------------------- dispatch
def _kernel_status(name, op):
    native = "lowrank_adam_direction" if op == "direction" else None  # the update is addmm on cpu/cuda
    return _backends.kernel_status(name, native_op=native, triton_module="sparseft.kernels.lowrank_adam")


def _resolve(device, requested, op):
    return _backends.resolve_checked(device, IMPLEMENTED, requested, lambda name: _kernel_status(name, op))


# ----------------------------------------------------------------------------- direction
def adam_direction_torch(grad, exp_avg, exp_avg_sq, out, beta1, beta2, c1, c2, eps):
    """The readable specification, in the op order of the C++ and Triton kernels."""
    exp_avg.mul_(beta1).add_(grad * (1.0 - beta1))
    exp_avg_sq.mul_(beta2).add_(grad * grad * (1.0 - beta2))
    torch.div(exp_avg * c1, exp_avg_sq.sqrt() * c2 + eps, out=out)


def _direction_native(grad, exp_avg, exp_avg_sq, out, beta1, beta2, c1, c2, eps):
    torch.ops.sparseft_C.lowrank_adam_direction(grad, exp_avg, exp_avg_sq, out, beta1, beta2, c1, c2, eps)


def _direction_triton(grad, exp_avg, exp_avg_sq, out, beta1, beta2, c1, c2, eps):
    from sparseft.kernels.lowrank_adam import adam_direction
    adam_direction(grad, exp_avg, exp_avg_sq, out, beta1=beta1, beta2=beta2, c1=c1, c2=c2, eps=eps)


_DIRECTIONS = {"torch": adam_direction_torch, "cpu": _direction_native, "cuda": _direction_native,
               "triton": _direction_triton}


def _check_direction_args(grad, exp_avg, exp_avg_sq, out, beta1, beta2, c1, c2, eps):
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("out", out)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise TypeError(f"{name}: expected a contiguous float32 tensor, got {t.dtype}"
                            f"{'' if t.is_contiguous() else ' (not contiguous)'}")
        if t.shape != grad.shape:
            raise ValueError(f"{name}: expected grad's shape {tuple(grad.shape)}, got {tuple(t.shape)}")
        if t.device != grad.device:
            raise ValueError(f"{name} is on {t.device} but grad is on {grad.device}")
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{name}: expected a float in [0, 1), got {beta}")
    for name, value in (("c1", c1), ("c2", c2)):
        if not value >= 1.0:
            raise ValueError(f"{name}: a bias correction 1/(1 - beta^t) or 1/sqrt(1 - beta^t) is >= 1, got {value}")
    if not eps >= 0.0:
        raise ValueError(f"eps: expected >= 0, got {eps}")


def lowrank_adam_direction(grad, exp_avg, exp_avg_sq, out, *, beta1, beta2, c1, c2, eps, backend=None):
    """The Adam moments of the projected gradient (in place) and the normalised direction
    ``out`` = m̂/(√v̂ + eps), in one pass (see the module docstring). ``out`` may be ``grad``
    itself: every backend reads grad[i] before it writes out[i]."""
    _check_direction_args(grad, exp_avg, exp_avg_sq, out, beta1, beta2, c1, c2, eps)
    name = _resolve(grad.device, backend, "direction")
    if grad.numel():
        _DIRECTIONS[name](grad, exp_avg, exp_avg_sq, out, beta1, beta2, c1, c2, eps)


# ----------------------------------------------------------------------------- weight update
def _update_addmm(weight, direction, projector, side, decay, alpha):
    """torch/cpu/cuda: W ← decay·W + alpha·(N·Pᵀ | P·N) as one addmm, float32 accumulation."""
    a, b = (direction, projector.T) if side == "right" else (projector, direction)
    if weight.dtype == torch.float32:
        weight.addmm_(a, b, beta=decay, alpha=alpha)
    else:  # no mixed-dtype GEMM: update a float32 copy, round once
        weight.copy_(torch.addmm(weight.float(), a, b, beta=decay, alpha=alpha))


def _update_triton(weight, direction, projector, side, decay, alpha):
    from sparseft.kernels.lowrank_adam import lowrank_update
    lowrank_update(weight, direction, projector, side=side, decay=decay, alpha=alpha)


_UPDATES = {"torch": _update_addmm, "cpu": _update_addmm, "cuda": _update_addmm, "triton": _update_triton}


def _check_update_args(weight, direction, projector, side):
    if side not in SIDES:
        raise ValueError(f"side: expected one of {SIDES}, got {side!r}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D tensor, got {getattr(weight, 'shape', type(weight).__name__)}")
    if weight.dtype not in _WEIGHT_DTYPES:
        raise TypeError(f"weight: expected one of {_WEIGHT_DTYPES}, got {weight.dtype}")
    m, n = weight.shape
    if not isinstance(projector, torch.Tensor) or projector.dim() != 2:
        raise ValueError("projector: expected a 2-D tensor [n, r] (side 'right') or [m, r] (side 'left')")
    r = projector.shape[1]
    want_p, want_n = ((n, r), (m, r)) if side == "right" else ((m, r), (r, n))
    for name, t, want in (("projector", projector, want_p), ("direction", direction, want_n)):
        if t.dtype != torch.float32:
            raise TypeError(f"{name}: expected float32, got {t.dtype}")
        if tuple(t.shape) != want:
            raise ValueError(f"{name}: expected shape {want} for a {m}×{n} weight on side {side!r}, "
                             f"got {tuple(t.shape)}")
        if t.device != weight.device:
            raise ValueError(f"{name} is on {t.device} but weight is on {weight.device}")


def lowrank_weight_update(weight, direction, projector, *, side, lr, scale, weight_decay, backend=None):
    """W ← W·(1 − lr·weight_decay) − lr·scale·(N·Pᵀ | P·N), in place (see the module docstring)."""
    _check_update_args(weight, direction, projector, side)
    name = _resolve(weight.device, backend, "update")
    _UPDATES[name](weight, direction, projector, side, 1.0 - lr * weight_decay, -lr * scale)
