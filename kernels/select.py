"""Triton kernel of the |a − b| bit-pattern histogram (contract: sparseft/ops/select.py).

One program per BLOCK elements loads its block of a and b once (any mix of float32, bfloat16
and float16), forms the bit patterns of |a − b| in registers and adds one to the digit's bin of
the int64 counts with an atomic, masked to the entries sharing the prefix. A 2**16-bin histogram
is too large for one program's registers or shared memory, hence the global atomics.

bfloat16 arrives as its int16 bits and is widened by a shift: exact for subnormals too, which
the interpreter's own bfloat16 conversion flushes to zero.
"""

import torch
import triton
import triton.language as tl

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _load_float32(ptr, pos, live, BF16_BITS: tl.constexpr):
    if BF16_BITS:
        bits = tl.load(ptr + pos, mask=live, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
        return (bits << 16).to(tl.float32, bitcast=True)
    return tl.load(ptr + pos, mask=live, other=0.0).to(tl.float32)


@triton.jit
def _abs_diff_histogram_kernel(a_ptr, b_ptr, counts_ptr, numel, prefix, high_shift, shift, digit_mask,
                               A_BF16: tl.constexpr, B_BF16: tl.constexpr, BLOCK: tl.constexpr):
    pos = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = pos < numel
    d = _load_float32(a_ptr, pos, live, A_BF16) - _load_float32(b_ptr, pos, live, B_BF16)
    pattern = d.to(tl.int32, bitcast=True) & 0x7FFFFFFF  # non-negative: >> is the logical shift
    selected = live & ((pattern >> high_shift) == prefix)
    digit = (pattern >> shift) & digit_mask
    tl.atomic_add(counts_ptr + digit, tl.full([BLOCK], 1, tl.int64), mask=selected, sem="relaxed")


def _bfloat16_as_bits(t):
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def abs_diff_histogram_triton(a, b, prefix, high_shift, shift, bits, counts):
    """Adds the digit histogram of |a − b| into counts; arguments are checked by the caller: flat
    contiguous a and b of one numel and device, int64 counts of 2**bits bins on that device."""
    numel = a.numel()
    if numel == 0:
        return counts
    _abs_diff_histogram_kernel[(triton.cdiv(numel, BLOCK),)](
        _bfloat16_as_bits(a), _bfloat16_as_bits(b), counts, numel, prefix, high_shift, shift, (1 << bits) - 1,
        A_BF16=a.dtype == torch.bfloat16, B_BF16=b.dtype == torch.bfloat16, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return counts
