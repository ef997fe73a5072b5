"""Triton kernels of the masked-loss cross-entropy, and their launchers.

Fused linear + cross-entropy (in the spirit of Cut Cross-Entropy): logits exist only as
[BM, BV] tiles in registers, never as an [N, V] or [chunk, V] tensor.

* Active rows (scale != 0) are compacted to the front by a device-side stable argsort; their
  number stays on the device as a one-element tensor that every kernel reads, and row blocks
  at or past it return at once. Compute falls with the masked fraction, with no host sync.
* ``_linear_lse_kernel`` (grid: row blocks x vocab blocks) writes one log-sum-exp per row and
  vocab block (plus the row sum for label smoothing, and the target logit from the block
  holding the label) to small float32 buffers; ``_linear_merge_kernel`` merges them per row.
* ``_linear_grad_kernel`` (same grid) recomputes the tile, forms d(loss)/d(logits) in float32
  and accumulates dX += G W and dW += G^T X (and db) with float32 atomics. Atomics keep the
  whole gradient one pass over the tiles (8NDV FLOPs in all); an atomic-free dW would need
  either the tile of G kept per (vocab, D) block, i.e. D/BK recomputations of every logit
  tile, or a [chunk, V] buffer, which is what this design exists to avoid.

Plain cross-entropy on given logits: one program per row, looping over the vocabulary with
an online max / sum; the backward writes a fresh gradient (the caller's logits are only read).

Block sizes are launcher arguments. Left unset they are autotuned on a GPU and small fixed
values under TRITON_INTERPRET=1 (the interpreter is slow, and autotuning must not run there).
tanh is written with exp because libdevice calls break the interpreter.
"""

import os

import torch
import triton
import triton.language as tl

_INTERPRET_LINEAR = dict(BM=16, BV=32, BK=16)
_INTERPRET_ROWWISE = dict(BLOCK_V=32)
_GROUP_M = 8
_MERGE_BLOCK = 128


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------- device helpers

@triton.jit
def _tanh(x):
    # Saturates cleanly to +-1 for large |x| (exp overflows to inf, 2/inf == 0).
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # the interpreter multiplies bf16 bit patterns as integers; bf16 products are exact in fp32
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc=acc, input_precision=DOT_PRECISION)


@triton.jit
def _tile_coords(N, V, BM: tl.constexpr, BV: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ordering of a 1-D grid: GROUP_M row blocks sweep the vocabulary together, so
    their hidden rows and each weight block stay in L2 while they are reused."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(N, BM)
    num_v = tl.cdiv(V, BV)
    width = GROUP_M * num_v
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_v = (pid % width) // size_m
    return pid_m, pid_v


@triton.jit
def _tile_rows_and_cols(order_ptr, count, pid_m, pid_v, V, BM: tl.constexpr, BV: tl.constexpr):
    """Tile (pid_m, pid_v): positions m in the compacted order, the original rows they hold,
    and the vocabulary columns, with their validity masks."""
    m = pid_m * BM + tl.arange(0, BM)
    row_ok = m < count
    rows = tl.load(order_ptr + m, mask=row_ok, other=0)
    cols = pid_v * BV + tl.arange(0, BV)
    return m, row_ok, rows, cols, cols < V


@triton.jit
def _logit_tile(x_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, D, softcap,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                UPCAST: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr):
    """float32 [BM, BV] tile of (X[rows] W[cols]^T + b), softcapped when asked."""
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * D
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * D
    acc = tl.zeros((BM, BV), dtype=tl.float32)
    for k0 in range(0, D, BK):
        k = k0 + tl.arange(0, BK)
        k_ok = k < D
        x = tl.load(x_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_cols + k[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _dot(x, w, acc, DOT_PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = softcap * _tanh(acc / softcap)
    return acc


# ----------------------------------------------------------------------------- fused linear CE

@triton.jit
def _linear_lse_kernel(x_ptr, w_ptr, b_ptr, labels_ptr, order_ptr, count_ptr,
                       part_lse_ptr, part_sum_ptr, target_ptr, N, V, D, softcap,
                       HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr,
                       BV: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_v = _tile_coords(N, V, BM, BV, GROUP_M)
    count = tl.load(count_ptr)
    if pid_m * BM >= count:
        return
    m, row_ok, rows, cols, col_ok = _tile_rows_and_cols(order_ptr, count, pid_m, pid_v, V, BM, BV)
    logits = _logit_tile(x_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, D, softcap,
                         HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, UPCAST, BM, BV, BK)

    masked = tl.where(col_ok[None, :], logits, float("-inf"))
    row_max = tl.max(masked, axis=1)
    lse = row_max + tl.log(tl.sum(tl.exp(masked - row_max[:, None]), axis=1))
    part = pid_v.to(tl.int64) * N + m
    tl.store(part_lse_ptr + part, lse, mask=row_ok)
    if HAS_SMOOTHING:
        row_sum = tl.sum(tl.where(col_ok[None, :], logits, 0.0), axis=1)
        tl.store(part_sum_ptr + part, row_sum, mask=row_ok)
    # Exactly one vocab block holds each label: it writes the target logit, no race.
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    target = tl.sum(tl.where(cols[None, :] == labels[:, None], logits, 0.0), axis=1)
    tl.store(target_ptr + m, target, mask=row_ok & (labels >= pid_v * BV) & (labels < (pid_v + 1) * BV))


@triton.jit
def _linear_merge_kernel(part_lse_ptr, part_sum_ptr, target_ptr, order_ptr, count_ptr,
                         loss_ptr, lse_ptr, N, V, num_vblocks, label_smoothing, z_loss,
                         HAS_SMOOTHING: tl.constexpr, BLOCK: tl.constexpr):
    count = tl.load(count_ptr)
    start = tl.program_id(0) * BLOCK
    if start >= count:
        return
    m = start + tl.arange(0, BLOCK)
    ok = m < count
    run_max = tl.full((BLOCK,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK,), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK,), dtype=tl.float32)
    for t in range(0, num_vblocks):
        part = tl.cast(t, tl.int64) * N + m  # t * N passes 2**31 from ~1M tokens; t is an int when interpreted
        block_lse = tl.load(part_lse_ptr + part, mask=ok, other=0.0)
        new_max = tl.maximum(run_max, block_lse)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(block_lse - new_max)
        run_max = new_max
        if HAS_SMOOTHING:
            row_sum += tl.load(part_sum_ptr + part, mask=ok, other=0.0)
    lse = run_max + tl.log(run_sum)
    target = tl.load(target_ptr + m, mask=ok, other=0.0)
    loss = lse - (1.0 - label_smoothing) * target + z_loss * lse * lse
    if HAS_SMOOTHING:
        loss -= (label_smoothing / V) * row_sum
    rows = tl.load(order_ptr + m, mask=ok, other=0)
    tl.store(loss_ptr + rows, loss, mask=ok)
    tl.store(lse_ptr + m, lse, mask=ok)


@triton.jit
def _linear_grad_kernel(x_ptr, w_ptr, b_ptr, labels_ptr, scale_ptr, order_ptr, count_ptr, lse_ptr,
                        dx_ptr, dw_ptr, db_ptr, N, V, D, softcap, label_smoothing, z_loss,
                        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NEED_DX: tl.constexpr,
                        NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        UPCAST: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
                        GROUP_M: tl.constexpr):
    pid_m, pid_v = _tile_coords(N, V, BM, BV, GROUP_M)
    count = tl.load(count_ptr)
    if pid_m * BM >= count:
        return
    m, row_ok, rows, cols, col_ok = _tile_rows_and_cols(order_ptr, count, pid_m, pid_v, V, BM, BV)
    logits = _logit_tile(x_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, D, softcap,
                         HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, UPCAST, BM, BV, BK)

    lse = tl.load(lse_ptr + m, mask=row_ok, other=0.0)
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    g = tl.exp(logits - lse[:, None]) * (1.0 + 2.0 * z_loss * lse)[:, None] - label_smoothing / V
    g = tl.where(cols[None, :] == labels[:, None], g - (1.0 - label_smoothing), g)
    if HAS_SOFTCAP:
        capped = logits / softcap
        g = g * (1.0 - capped * capped)
    g = tl.where(row_ok[:, None] & col_ok[None, :], g * scale[:, None], 0.0)

    if NEED_DB:
        tl.atomic_add(db_ptr + cols, tl.sum(g, axis=0), mask=col_ok, sem="relaxed")
    if NEED_DX or NEED_DW:
        g_in = g.to(x_ptr.dtype.element_ty)
        rows64 = rows.to(tl.int64)
        cols64 = cols.to(tl.int64)
        for k0 in range(0, D, BK):
            k = k0 + tl.arange(0, BK)
            k_ok = k < D
            if NEED_DX:
                w = tl.load(w_ptr + cols64[:, None] * D + k[None, :],
                            mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                dx = _dot(g_in, w, None, DOT_PRECISION, UPCAST)
                tl.atomic_add(dx_ptr + rows64[:, None] * D + k[None, :], dx,
                              mask=row_ok[:, None] & k_ok[None, :], sem="relaxed")
            if NEED_DW:
                x = tl.load(x_ptr + rows64[:, None] * D + k[None, :],
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                dw = _dot(tl.trans(g_in), x, None, DOT_PRECISION, UPCAST)
                tl.atomic_add(dw_ptr + cols64[:, None] * D + k[None, :], dw,
                              mask=col_ok[:, None] & k_ok[None, :], sem="relaxed")


def _linear_configs(specs):
    return [triton.Config(dict(BM=bm, BV=bv, BK=bk), num_warps=w, num_stages=s) for bm, bv, bk, w, s in specs]


_linear_lse_tuned = triton.autotune(
    # Checked with ptxas for sm_90 (bf16, D % 16 == 0): none of these spills; BM=128 x BV=256 does.
    configs=_linear_configs([(128, 128, 64, 8, 3), (128, 128, 32, 8, 3), (64, 256, 64, 8, 3),
                             (64, 128, 64, 8, 3), (128, 64, 64, 8, 2), (64, 64, 32, 4, 2)]),
    key=["V", "D"])(_linear_lse_kernel)

_linear_grad_tuned = triton.autotune(
    configs=_linear_configs([(128, 128, 64, 8, 2), (128, 128, 32, 8, 3), (64, 128, 64, 8, 3),
                             (128, 64, 64, 8, 2), (64, 64, 64, 4, 2), (32, 64, 32, 4, 2)]),
    key=["V", "D"], reset_to_zero=["dx_ptr", "dw_ptr", "db_ptr"])(_linear_grad_kernel)

_MIN_TUNED_BV = min(c.kwargs["BV"] for c in _linear_lse_tuned.configs)


def _kernel_and_blocks(tuned, plain, blocks, interpret_blocks, num_warps, num_stages):
    """(kernel, extra launch kwargs): explicit blocks, the interpreter's small ones, or autotune."""
    if blocks is None and _interpreting():
        blocks = interpret_blocks
    if blocks is None:
        return tuned, {}
    launch = dict(blocks)
    if num_warps is not None:
        launch["num_warps"] = num_warps
    if num_stages is not None:
        launch["num_stages"] = num_stages
    return plain, launch


def linear_ce(hidden, weight, bias, labels, scale, label_smoothing, z_loss, softcap,
              need_grad_hidden, need_grad_weight, need_grad_bias,
              block_m=None, block_v=None, block_k=None, num_warps=None, num_stages=None):
    """Fused linear cross-entropy on contiguous hidden [N, D], weight [V, D], bias [V] or None,
    labels [N] int64 and scale [N] float32. Returns (loss [N] float32, grad_hidden,
    grad_weight, grad_bias), the gradients of sum_i scale_i loss_i in the input dtypes, None
    where not asked. Block sizes: all three or none (None: autotune, small under the
    interpreter)."""
    n, d = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    given = (block_m, block_v, block_k)
    if any(b is not None for b in given) and not all(b is not None for b in given):
        raise ValueError("block_m, block_v and block_k must be given together or not at all")
    blocks = None if block_m is None else dict(BM=block_m, BV=block_v, BK=block_k)

    loss = torch.zeros(n, dtype=torch.float32, device=device)
    need_grad = need_grad_hidden or need_grad_weight or need_grad_bias
    if n == 0:
        return (loss, torch.zeros_like(hidden) if need_grad_hidden else None,
                torch.zeros_like(weight) if need_grad_weight else None,
                torch.zeros_like(bias) if need_grad_bias else None)

    # Active rows first, their number kept on the device.
    active = scale != 0
    order = torch.argsort((~active).to(torch.int8), stable=True)
    count = active.sum(dtype=torch.int32).reshape(1)

    has_bias = bias is not None
    bias_arg = bias if has_bias else hidden  # never read without HAS_BIAS
    precision = "ieee" if hidden.dtype == torch.float32 else "tf32"
    has_smoothing = label_smoothing != 0.0
    common = dict(HAS_BIAS=has_bias, HAS_SOFTCAP=softcap != 0.0, DOT_PRECISION=precision,
                  UPCAST=_interpreting() and hidden.dtype != torch.float32, GROUP_M=_GROUP_M)

    def grid(meta):
        return (triton.cdiv(n, meta["BM"]) * triton.cdiv(vocab, meta["BV"]),)

    kernel, launch = _kernel_and_blocks(_linear_lse_tuned, _linear_lse_kernel, blocks,
                                        _INTERPRET_LINEAR, num_warps, num_stages)
    max_vblocks = triton.cdiv(vocab, launch["BV"] if launch else _MIN_TUNED_BV)
    part_lse = torch.empty((max_vblocks, n), dtype=torch.float32, device=device)
    part_sum = torch.empty((max_vblocks, n), dtype=torch.float32, device=device) if has_smoothing else part_lse
    target = torch.empty(n, dtype=torch.float32, device=device)
    kernel[grid](hidden, weight, bias_arg, labels, order, count, part_lse, part_sum, target,
                 n, vocab, d, softcap, HAS_SMOOTHING=has_smoothing, **common, **launch)
    used_bv = launch["BV"] if launch else kernel.best_config.kwargs["BV"]

    lse = torch.empty(n, dtype=torch.float32, device=device)
    _linear_merge_kernel[(triton.cdiv(n, _MERGE_BLOCK),)](
        part_lse, part_sum, target, order, count, loss, lse, n, vocab, triton.cdiv(vocab, used_bv),
        label_smoothing, z_loss, HAS_SMOOTHING=has_smoothing, BLOCK=_MERGE_BLOCK)
    del part_lse, part_sum, target
    if not need_grad:
        return loss, None, None, None

    f32 = torch.float32
    dummy = torch.zeros(1, dtype=f32, device=device)
    dx = torch.zeros((n, d), dtype=f32, device=device) if need_grad_hidden else dummy
    dw = torch.zeros((vocab, d), dtype=f32, device=device) if need_grad_weight else dummy
    db = torch.zeros(vocab, dtype=f32, device=device) if need_grad_bias else dummy
    kernel, launch = _kernel_and_blocks(_linear_grad_tuned, _linear_grad_kernel, blocks,
                                        _INTERPRET_LINEAR, num_warps, num_stages)
    kernel[grid](hidden, weight, bias_arg, labels, scale, order, count, lse, dx, dw, db,
                 n, vocab, d, softcap, label_smoothing, z_loss, NEED_DX=need_grad_hidden,
                 NEED_DW=need_grad_weight, NEED_DB=need_grad_bias, **common, **launch)
    return (loss,
            dx.to(hidden.dtype) if need_grad_hidden else None,
            dw.to(weight.dtype) if need_grad_weight else None,
            db.to(bias.dtype) if need_grad_bias else None)


# ----------------------------------------------------------------------------- CE on logits

@triton.jit
def _ce_forward_kernel(logits_ptr, labels_ptr, scale_ptr, loss_ptr, lse_ptr, V, softcap,
                       label_smoothing, z_loss, HAS_SOFTCAP: tl.constexpr,
                       HAS_SMOOTHING: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    if tl.load(scale_ptr + row) == 0.0:
        return  # outputs are zero-initialised
    base = logits_ptr + row.to(tl.int64) * V
    run_max = float("-inf")
    run_sum = 0.0
    row_sum = 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = cols < V
        x = tl.load(base + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            x = softcap * _tanh(x / softcap)
        if HAS_SMOOTHING:
            row_sum += tl.sum(tl.where(ok, x, 0.0), axis=0)
        x = tl.where(ok, x, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(x, axis=0))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        run_max = new_max
    lse = run_max + tl.log(run_sum)
    target = tl.load(base + tl.load(labels_ptr + row)).to(tl.float32)
    if HAS_SOFTCAP:
        target = softcap * _tanh(target / softcap)
    loss = lse - (1.0 - label_smoothing) * target + z_loss * lse * lse
    if HAS_SMOOTHING:
        loss -= (label_smoothing / V) * row_sum
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _ce_backward_kernel(logits_ptr, grad_ptr, lse_ptr, labels_ptr, scale_ptr, V, softcap,
                        label_smoothing, z_loss, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    scale = tl.load(scale_ptr + row)
    # Inactive rows read nothing and write zeros.
    read_end = tl.where(scale != 0.0, V, 0)
    lse = tl.load(lse_ptr + row)
    label = tl.load(labels_ptr + row)
    offset = row.to(tl.int64) * V
    prob_factor = 1.0 + 2.0 * z_loss * lse
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = cols < V
        read = cols < read_end
        x = tl.load(logits_ptr + offset + cols, mask=read, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            x = softcap * _tanh(x / softcap)
        g = tl.exp(x - lse) * prob_factor - label_smoothing / V
        g = tl.where(cols == label, g - (1.0 - label_smoothing), g)
        if HAS_SOFTCAP:
            capped = x / softcap
            g = g * (1.0 - capped * capped)
        g = tl.where(read, g * scale, 0.0)
        tl.store(grad_ptr + offset + cols, g.to(grad_ptr.dtype.element_ty), mask=ok)


def _rowwise_configs():
    return [triton.Config(dict(BLOCK_V=b), num_warps=w) for b, w in ((1024, 4), (2048, 8), (4096, 8), (8192, 16))]


_ce_forward_tuned = triton.autotune(configs=_rowwise_configs(), key=["V"])(_ce_forward_kernel)
_ce_backward_tuned = triton.autotune(configs=_rowwise_configs(), key=["V"])(_ce_backward_kernel)


def ce_forward(logits, labels, scale, label_smoothing, z_loss, softcap, block_v=None, num_warps=None):
    """Per-row (loss, lse), float32, 0 on inactive rows, of contiguous [N, V] logits."""
    n, vocab = logits.shape
    loss = torch.zeros(n, dtype=torch.float32, device=logits.device)
    lse = torch.zeros_like(loss)
    if n == 0:
        return loss, lse
    blocks = None if block_v is None else dict(BLOCK_V=block_v)
    kernel, launch = _kernel_and_blocks(_ce_forward_tuned, _ce_forward_kernel, blocks,
                                        _INTERPRET_ROWWISE, num_warps, None)
    kernel[(n,)](logits, labels, scale, loss, lse, vocab, softcap, label_smoothing, z_loss,
                 HAS_SOFTCAP=softcap != 0.0, HAS_SMOOTHING=label_smoothing != 0.0, **launch)
    return loss, lse


def ce_backward(logits, lse, labels, scale, label_smoothing, z_loss, softcap, block_v=None, num_warps=None):
    """Fresh [N, V] gradient (logits dtype) of sum_i scale_i loss_i; logits are only read."""
    n, vocab = logits.shape
    grad = torch.empty_like(logits)
    if n == 0:
        return grad
    blocks = None if block_v is None else dict(BLOCK_V=block_v)
    kernel, launch = _kernel_and_blocks(_ce_backward_tuned, _ce_backward_kernel, blocks,
                                        _INTERPRET_ROWWISE, num_warps, None)
    kernel[(n,)](logits, grad, lse, labels, scale, vocab, softcap, label_smoothing, z_loss,
                 HAS_SOFTCAP=softcap != 0.0, **launch)
    return grad
