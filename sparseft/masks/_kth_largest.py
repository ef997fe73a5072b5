"""The k-th largest |a - b| over many tensors, exactly, without concatenating them.

Radix select on float32 bit patterns: for non-negative floats the int32 bit pattern is
ordered like the value, so two histogram passes (bits 30..15, then 14..0 among the entries
sharing the chosen top digit) pin down the k-th largest value exactly. Each pass is one
fused op (sparseft.ops.select.abs_diff_histogram) per tensor pair: a and b are read once
and |a - b| is never stored. A pair on two devices is moved over in chunks of CHUNK
elements, so extra memory stays O(CHUNK) whatever the model size.
"""

import torch

from sparseft.ops.select import abs_diff_histogram

CHUNK = 1 << 24
_PASSES = ((15, 16), (0, 15))  # (shift, bits) over bits 30..0; bit 31 (sign) is 0


def abs_diff_float32(a, b):
    return (a.detach().float() - b.detach().float()).abs()


def _same_device_pieces(a, b):
    """(a, b) flat, whole when they share a device, else in chunks with b's moved to a's."""
    a, b = a.detach().reshape(-1), b.detach().reshape(-1)
    if b.device == a.device:
        yield a, b
        return
    for start in range(0, a.numel(), CHUNK):
        yield a[start:start + CHUNK], b[start:start + CHUNK].to(a.device)


def _histogram(pairs, prefix, high_shift, shift, bits):
    """One pass over every pair: the digit counts, summed over devices, on the CPU."""
    per_device = {}
    for a, b in pairs:
        for a_piece, b_piece in _same_device_pieces(a, b):
            if a_piece.device not in per_device:
                per_device[a_piece.device] = torch.zeros(1 << bits, dtype=torch.int64, device=a_piece.device)
            abs_diff_histogram(a_piece, b_piece, prefix, high_shift, shift, bits, per_device[a_piece.device])
    return sum((counts.cpu() for counts in per_device.values()), torch.zeros(1 << bits, dtype=torch.int64))


def kth_largest_abs_diff(pairs, k):
    """The k-th largest float32 |a - b| over all (a, b) in `pairs` (1 <= k <= total entries),
    and how many entries are strictly greater than it. `pairs` is re-iterated per pass."""
    prefix, high_shift, remaining = 0, 31, k
    for shift, bits in _PASSES:
        counts = _histogram(pairs, prefix, high_shift, shift, bits)
        # Walk digits from the largest down until `remaining` entries are covered.
        above = torch.flip(counts, [0]).cumsum(0)
        position = int(torch.searchsorted(above, torch.tensor([remaining]))[0])
        digit_value = (1 << bits) - 1 - position
        remaining -= int(above[position - 1]) if position > 0 else 0
        prefix = (prefix << bits) | digit_value
        high_shift = shift
    value = torch.tensor([prefix], dtype=torch.int32).view(torch.float32)[0]
    return value, k - remaining
