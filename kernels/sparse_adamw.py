"""Triton kernel of the fused SparseAdamW step (contract: sparseft/optim/_sparse_adamw_backends.py).

One program per block of mask entries: gather the gradient (dense, at the indices, or
compact), update the float32 moments and per-entry step counts, and scatter the new weight
into the target (and the compact values, when given).
"""

import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _neg_expm1(x):
    """-expm1(x) for x <= 0 in float32 without the cancellation of 1 - exp(x) near 0.

    A degree-8 Taylor polynomial where |x| < 0.5 (truncation below 2e-8 relative), exp
    beyond. Written out because libdevice.expm1 does not run under TRITON_INTERPRET=1.
    """
    xs = tl.maximum(x, -0.5)  # keeps the unused branch finite (x = -inf when beta = 0)
    p = 1.0 / 40320.0
    p = p * xs + 1.0 / 5040.0
    p = p * xs + 1.0 / 720.0
    p = p * xs + 1.0 / 120.0
    p = p * xs + 1.0 / 24.0
    p = p * xs + 1.0 / 6.0
    p = p * xs + 0.5
    p = p * xs + 1.0
    return tl.where(x > -0.5, -(p * xs), 1.0 - tl.exp(x))


@triton.jit
def _round_to(w, dtype: tl.constexpr):
    """float32 -> dtype, round to nearest even. bfloat16 is rounded by hand: the interpreter
    truncates; on GPUs this is the rounding the hardware does, for a few integer ops."""
    if dtype == tl.bfloat16:
        bits = w.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return w.to(dtype)


@triton.jit
def _sparse_adamw_kernel(target_ptr, idx_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, step_ptr, values_ptr, nnz,
                         lr, beta1, one_minus_beta1, beta2, one_minus_beta2, log_beta1, log_beta2, eps, decay,
                         COMPACT_GRAD: tl.constexpr, HAS_VALUES: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < nnz
    idx = tl.load(idx_ptr + offs, mask=live, other=0).to(tl.int64)
    if COMPACT_GRAD:
        g = tl.load(grad_ptr + offs, mask=live, other=0.0).to(tl.float32)
    else:
        g = tl.load(grad_ptr + idx, mask=live, other=0.0).to(tl.float32)
    if HAS_VALUES:  # the values mirror the target at the mask: a contiguous read, no gather
        w = tl.load(values_ptr + offs, mask=live, other=0.0).to(tl.float32)
    else:
        w = tl.load(target_ptr + idx, mask=live, other=0.0).to(tl.float32)
    m = tl.load(exp_avg_ptr + offs, mask=live, other=0.0)
    v = tl.load(exp_avg_sq_ptr + offs, mask=live, other=0.0)
    s = tl.load(step_ptr + offs, mask=live, other=0) + 1

    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * (g * g)
    t = s.to(tl.float32)
    bc1 = _neg_expm1(t * log_beta1)
    bc2 = _neg_expm1(t * log_beta2)
    w = w * decay - lr * (m / bc1) / (tl.sqrt(v / bc2) + eps)

    out = _round_to(w, target_ptr.dtype.element_ty)
    tl.store(target_ptr + idx, out, mask=live)
    if HAS_VALUES:
        tl.store(values_ptr + offs, out, mask=live)
    tl.store(exp_avg_ptr + offs, m, mask=live)
    tl.store(exp_avg_sq_ptr + offs, v, mask=live)
    tl.store(step_ptr + offs, s, mask=live)


def sparse_adamw_step(target, indices, grad, exp_avg, exp_avg_sq, step, values, *, lr, beta1, one_minus_beta1,
                      beta2, one_minus_beta2, log_beta1, log_beta2, eps, decay):
    """Launches the kernel; arguments are checked by the caller, constants computed on the host."""
    nnz = indices.numel()
    compact = grad.dim() == 1 and grad.numel() == nnz
    _sparse_adamw_kernel[(triton.cdiv(nnz, BLOCK),)](
        target, indices, grad, exp_avg, exp_avg_sq, step, values if values is not None else exp_avg, nnz,
        *(float(x) for x in (lr, beta1, one_minus_beta1, beta2, one_minus_beta2, log_beta1, log_beta2, eps, decay)),
        COMPACT_GRAD=compact, HAS_VALUES=values is not None, BLOCK=BLOCK)
