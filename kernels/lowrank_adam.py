"""Triton kernels of the low-rank Adam step (contract: sparseft/ops/lowrank_adam.py).

* ``adam_direction``: one pass over the r-sized projected gradient R that updates the float32
  moments in place and writes the normalised direction N = m̂ / (√v̂ + ε).
* ``lowrank_update``: the back-projection and the weight update as one matmul whose epilogue
  reads the weight tile, applies the decay and the scale and rounds once to the weight's
  dtype: W ← decay·W + alpha·(N Pᵀ) (right projector) or decay·W + alpha·(P N) (left).
  Both sides are one kernel computing W ← decay·W + alpha·(A B), A [m, r] row-major (N on the
  right, P on the left), B [r, n] either Pᵀ read in place from P [n, r] or N [r, n] itself.

Every W tile is read and written once and the factors A and B (M·R and R·N floats) stay in
L2, so tiles go in row-major order without the grouping of a large-K matmul. Block sizes are
autotuned on a GPU, small and fixed under TRITON_INTERPRET=1 (the interpreter is slow, and
autotuning must not run there).
"""

import os

import torch
import triton
import triton.language as tl

from .sparse_adamw import _round_to

DIRECTION_BLOCK = 1024
_INTERPRET_UPDATE = dict(BM=16, BN=16, BK=16)


@triton.jit
def _adam_direction_kernel(grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, out_ptr, numel, beta1, one_minus_beta1, beta2,
                           one_minus_beta2, c1, c2, eps, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < numel
    g = tl.load(grad_ptr + offs, mask=live, other=0.0)
    m = beta1 * tl.load(exp_avg_ptr + offs, mask=live, other=0.0) + one_minus_beta1 * g
    v = beta2 * tl.load(exp_avg_sq_ptr + offs, mask=live, other=0.0) + one_minus_beta2 * (g * g)
    tl.store(exp_avg_ptr + offs, m, mask=live)
    tl.store(exp_avg_sq_ptr + offs, v, mask=live)
    tl.store(out_ptr + offs, (m * c1) / (tl.sqrt(v) * c2 + eps), mask=live)


def adam_direction(grad, exp_avg, exp_avg_sq, out, *, beta1, beta2, c1, c2, eps):
    """Moments in place and out = (exp_avg·c1) / (√exp_avg_sq·c2 + eps), for four contiguous
    float32 tensors of one numel (checked by the caller). c1 = 1/(1-β1^t), c2 = 1/√(1-β2^t)."""
    numel = grad.numel()
    if numel == 0:
        return
    # 1 - beta in double, rounded to float32 once (as the kernel's other constants are).
    _adam_direction_kernel[(triton.cdiv(numel, DIRECTION_BLOCK),)](
        grad, exp_avg, exp_avg_sq, out, numel,
        *(float(x) for x in (beta1, 1.0 - beta1, beta2, 1.0 - beta2, c1, c2, eps)), BLOCK=DIRECTION_BLOCK)


@triton.jit
def _lowrank_update_kernel(w_ptr, a_ptr, b_ptr, M, N, R, decay, alpha, B_FROM_P: tl.constexpr,
                           PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # A 1-D grid (a second dimension would stop at 65535 row tiles), column tiles fastest.
    n_col_tiles = tl.cdiv(N, BN)
    row0 = (tl.program_id(0) // n_col_tiles) * BM
    col0 = (tl.program_id(0) % n_col_tiles) * BN
    # int64 only in each tile's base pointer: int32 offsets inside a tile (BM·N, BN·R and BK·N
    # stay far below 2^31) save registers that per-element int64 offsets would hold.
    i = tl.arange(0, BM)
    j = tl.arange(0, BN)
    kk = tl.arange(0, BK)
    row_ok = row0 + i < M
    col_ok = col0 + j < N
    a_tile = a_ptr + row0.to(tl.int64) * R
    b_tile = b_ptr + (col0.to(tl.int64) * R if B_FROM_P else col0)

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, R, BK):
        k_ok = k0 + kk < R
        a = tl.load(a_tile + (i[:, None] * R + (k0 + kk)[None, :]), mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if B_FROM_P:  # B[k, j] = P[j, k], P of shape [n, r]
            b_ptrs = b_tile + (j[None, :] * R + (k0 + kk)[:, None])
        else:  # B[k, j] = N[k, j], N of shape [r, n]
            b_ptrs = b_tile + tl.cast(k0, tl.int64) * N + (kk[:, None] * N + j[None, :])
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    w_ptrs = w_ptr + row0.to(tl.int64) * N + col0 + (i[:, None] * N + j[None, :])
    tile_ok = row_ok[:, None] & col_ok[None, :]
    w = tl.load(w_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
    tl.store(w_ptrs, _round_to(decay * w + alpha * acc, w_ptr.dtype.element_ty), mask=tile_ok)


def _update_configs():
    # (BM, BN, BK, warps, stages); R is a rank (tens to a few hundred), so BK stays small.
    # sm_90, by .ci/compile_triton: 64 accumulators a thread take ~250 of the 255 registers with
    # sizes that are multiples of 16 and spill up to 240 B with other sizes; the 32-a-thread
    # configs (at most 128 registers, or 254 with ragged sizes) never spill.
    specs = ((128, 128, 32, 8, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 64, 32, 8, 3),
             (64, 64, 32, 4, 3), (64, 64, 16, 4, 2))
    return [triton.Config(dict(BM=bm, BN=bn, BK=bk), num_warps=w, num_stages=s) for bm, bn, bk, w, s in specs]


# The kernel updates W in place: every trial launch of the autotuner starts from the saved W.
_lowrank_update_tuned = triton.autotune(configs=_update_configs(), key=["M", "N", "R", "B_FROM_P", "PRECISION"],
                                        restore_value=["w_ptr"])(_lowrank_update_kernel)


def lowrank_update(weight, direction, projector, *, side, decay, alpha):
    """In place on a contiguous float32/bfloat16/float16 weight [m, n], float32 math and one
    rounding to its dtype; direction and projector are float32 (shapes checked by the caller):

      side "right": W ← decay·W + alpha·(N @ Pᵀ), N [m, r], P [n, r]
      side "left":  W ← decay·W + alpha·(P @ N),  P [m, r], N [r, n]
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if not weight.is_contiguous():  # the kernel indexes W as row-major
        raise ValueError(f"weight must be contiguous (it is updated in place), got strides {weight.stride()}")
    m, n = weight.shape
    if weight.numel() == 0:
        return
    # The factors are r-sized: a copy of a strided view costs little beside the update.
    a, b = (t.contiguous() for t in ((direction, projector) if side == "right" else (projector, direction)))
    # float32 products follow torch's matmul setting, as the cuda backend's addmm does: exact by
    # default; with TF32 allowed, the ~1e-3 relative error on the delta stays below a bf16 ulp of
    # W (2^-8 relative) unless the step outgrows the weight, and near fp32's own rounding for
    # float32 weights whose steps are ~1e-4 of them.
    precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    args = (weight, a, b, m, n, a.shape[1], float(decay), float(alpha))
    flags = dict(B_FROM_P=side == "right", PRECISION=precision)

    def grid(meta):
        return (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)

    if os.environ.get("TRITON_INTERPRET") == "1":
        _lowrank_update_kernel[grid](*args, **flags, **_INTERPRET_UPDATE)
    else:
        _lowrank_update_tuned[grid](*args, **flags)
