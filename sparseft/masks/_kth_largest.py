"""The k-th largest |a - b| over many tensors, exactly, without concatenating them.

Radix select on float32 bit patterns: for non-negative floats the int32 bit pattern is
ordered like the value, so four histogram passes (8, 8, 8, 7 bits, most significant
first) pin down the k-th largest value exactly. Each pass streams every tensor in chunks
of CHUNK elements, so extra memory is O(CHUNK) whatever the model size; |a - b| is
recomputed per pass instead of stored.
"""

import torch

CHUNK = 1 << 24
_PASSES = ((23, 8), (15, 8), (7, 8), (0, 7))  # (shift, bits) over bits 30..0; bit 31 (sign) is 0


def abs_diff_float32(a, b):
    return (a.detach().float() - b.detach().float()).abs()


def _chunks(pairs):
    for a, b in pairs:
        a, b = a.reshape(-1), b.reshape(-1)
        for start in range(0, a.numel(), CHUNK):
            yield abs_diff_float32(a[start:start + CHUNK], b[start:start + CHUNK].to(a.device))


def kth_largest_abs_diff(pairs, k):
    """The k-th largest float32 |a - b| over all (a, b) in `pairs` (1 <= k <= total entries),
    and how many entries are strictly greater than it. `pairs` is re-iterated per pass."""
    prefix, high_shift, remaining = 0, 31, k
    for shift, bits in _PASSES:
        counts = torch.zeros(1 << bits, dtype=torch.int64)
        for d in _chunks(pairs):
            pattern = d.view(torch.int32)
            in_prefix = (pattern >> high_shift) == prefix
            digit = ((pattern[in_prefix] >> shift) & ((1 << bits) - 1)).long()
            counts += torch.bincount(digit, minlength=1 << bits).cpu()
        # Walk digits from the largest down until `remaining` entries are covered.
        above = torch.flip(counts, [0]).cumsum(0)
        position = int(torch.searchsorted(above, torch.tensor([remaining]))[0])
        digit_value = (1 << bits) - 1 - position
        remaining -= int(above[position - 1]) if position > 0 else 0
        prefix = (prefix << bits) | digit_value
        high_shift = shift
    value = torch.tensor([prefix], dtype=torch.int32).view(torch.float32)[0]
    return value, k - remaining
