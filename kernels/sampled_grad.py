"""Triton sampled weight gradient: g[k] = sum_b dY[b, row_k] * X[b, col_k] at sorted flat
indices k, without the dense [out, in] gradient in memory.

One program per [BLOCK_M rows x BLOCK_N cols] tile of the weight that holds at least one
entry: it computes the tile of dY^T @ X with tensor-core dots over B-blocks, keeps it in
registers and writes out only the entries of the mask that fall in it. On a GPU a dense tile
on tensor cores costs less than per-entry dot products on CUDA cores at any density where
tiles are non-empty, and empty tiles are skipped. The entry range of each (row, column tile)
comes from one searchsorted over the sorted mask: [out, in / BLOCK_N + 1] offsets, small
beside the mask itself.
"""

import os

import torch
import triton
import triton.language as tl

BLOCK_M = 64
BLOCK_N = 64
BLOCK_B = 32


@triton.jit
def _sampled_grad_tile_kernel(dy_ptr, x_ptr, idx_ptr, starts_ptr, g_ptr, batch, out_features, in_features,
                              stride_dy, stride_x, n_col_tiles, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_B: tl.constexpr, PRECISION: tl.constexpr,
                              UPCAST: tl.constexpr):
    # One grid dimension, column tiles fastest: dimension 1 would stop at 65535 row tiles.
    tile_n = tl.program_id(0) % n_col_tiles
    tile_m = tl.program_id(0) // n_col_tiles
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < out_features
    offsets = starts_ptr + rows.to(tl.int64) * (n_col_tiles + 1) + tile_n
    start = tl.load(offsets, mask=row_ok, other=0)
    count = tl.load(offsets + 1, mask=row_ok, other=0) - start
    if tl.max(count, axis=0) == 0:
        return

    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < in_features
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b0 in range(0, batch, BLOCK_B):
        b = (b0 + tl.arange(0, BLOCK_B)).to(tl.int64)
        b_ok = b < batch
        dy_t = tl.load(dy_ptr + b[None, :] * stride_dy + rows[:, None], mask=row_ok[:, None] & b_ok[None, :],
                       other=0.0)
        x = tl.load(x_ptr + b[:, None] * stride_x + cols[None, :], mask=b_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:  # exact: bf16 products are representable in float32
            dy_t = dy_t.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(dy_t, x, acc, input_precision=PRECISION)

    # Row i of the tile owns the entries start[i] .. start[i] + count[i] - 1 (at most BLOCK_N).
    slot = tl.arange(0, BLOCK_N)
    valid = slot[None, :] < count[:, None]
    k = start[:, None].to(tl.int64) + slot[None, :]
    flat = tl.load(idx_ptr + k, mask=valid, other=0).to(tl.int64)
    local = flat - rows[:, None].to(tl.int64) * in_features - tile_n * BLOCK_N
    local = tl.where(valid, local, 0).to(tl.int32)
    tl.store(g_ptr + k, tl.gather(acc, local, axis=1), mask=valid)


def sampled_weight_grad_triton(grad_output, input, indices):
    """grad_output [B, out], input [B, in] (same float dtype), indices a validated mask of the
    [out, in] weight. Returns float32 [nnz]."""
    batch, out_features = grad_output.shape
    in_features = input.shape[1]
    nnz = indices.numel()
    grad = torch.zeros(nnz, dtype=torch.float32, device=input.device)
    if nnz == 0 or batch == 0:
        return grad
    dy = grad_output if grad_output.stride(1) == 1 else grad_output.contiguous()
    x = input if input.stride(1) == 1 else input.contiguous()
    indices = indices.contiguous()

    n_col_tiles = triton.cdiv(in_features, BLOCK_N)
    tile_bounds = torch.clamp(torch.arange(n_col_tiles + 1, device=x.device) * BLOCK_N, max=in_features)
    row_base = torch.arange(out_features, device=x.device)[:, None] * in_features
    starts = torch.searchsorted(indices, (row_base + tile_bounds[None, :]).to(indices.dtype),
                                out_int32=indices.dtype == torch.int32)

    # float32 follows torch's matmul setting: exact products unless TF32 is allowed.
    precision = "tf32" if x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    # The Triton interpreter (3.9) returns garbage from bf16 dots; it runs them in float32.
    upcast = x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    grid = (n_col_tiles * triton.cdiv(out_features, BLOCK_M),)
    _sampled_grad_tile_kernel[grid](dy, x, indices, starts, grad, batch, out_features, in_features,
                                    dy.stride(0), x.stride(0), n_col_tiles, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                                    BLOCK_B=BLOCK_B, PRECISION=precision,
                                    UPCAST=upcast)
    return grad
