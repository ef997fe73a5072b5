"""Histogram of |a − b| bit patterns, the pass of an exact radix select: contract, torch reference,
argument checks, dispatch.

``abs_diff_histogram(a, b, prefix, high_shift, shift, bits, counts)`` adds to the int64 tensor
``counts`` (2**bits bins), for every flat position i of a and b (same shape):

    d       = f32(a[i]) − f32(b[i])                      (float32 subtraction, round to nearest)
    pattern = bits(d) AND 0x7FFFFFFF                      (the int32 bit pattern of |d|)
    if (pattern >> high_shift) == prefix:
        counts[(pattern >> shift) AND (2**bits − 1)] += 1

For non-negative floats the bit pattern orders like the value, so a histogram of the top digit,
then of the next digit among the entries sharing the chosen top digit (``prefix``), pins down
the k-th largest |a − b| exactly (see sparseft.masks._kth_largest). ``high_shift`` 31 selects
every entry (prefix 0). Ranges: 1 ≤ bits ≤ 16, 0 ≤ shift, shift + bits ≤ high_shift ≤ 31,
0 ≤ prefix < 2**(31 − high_shift).

Each backend reads a and b once and forms no float32 copy of them: ``torch`` (this module's
reference, in chunks of CHUNK elements), ``cpu`` (sparseft._C, csrc/cpu/select.cpp), ``triton``
(kernels/select.py), ``cuda`` (csrc/cuda/select.cu). Counts are exact integers, so every
backend gives the same counts.
"""

import operator

import torch

from sparseft import _backends

IMPLEMENTED = ("torch", "cpu", "triton", "cuda")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_BITS = 16
CHUNK = 1 << 22  # elements per step of the torch reference (its float32 temporaries)
_ABS_MASK = 0x7FFFFFFF


# ----------------------------------------------------------------------------- torch reference
def abs_diff_histogram_torch(a, b, prefix, high_shift, shift, bits, counts):
    """The readable specification on flat contiguous a, b; adds into ``counts``."""
    digit_mask = (1 << bits) - 1
    for start in range(0, a.numel(), CHUNK):
        d = a[start:start + CHUNK].float() - b[start:start + CHUNK].float()
        pattern = d.view(torch.int32) & _ABS_MASK
        selected = pattern[(pattern >> high_shift) == prefix]
        digits = ((selected >> shift) & digit_mask).long()
        counts += torch.bincount(digits, minlength=1 << bits)
    return counts


# ----------------------------------------------------------------------------- dispatch
KERNELS = _backends.OpKernels(abs_diff_histogram_torch, native_op="abs_diff_histogram",
                              triton_module="sparseft.kernels.select", triton_function="abs_diff_histogram_triton",
                              implemented=IMPLEMENTED)


# ----------------------------------------------------------------------------- checks
def _int_arg(value, name, low, high):
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected an int in [{low}, {high}], got a bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an int in [{low}, {high}], got {type(value).__name__}") from None
    if not low <= value <= high:
        raise ValueError(f"{name}: expected an int in [{low}, {high}], got {value}")
    return value


def _check_tensor(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected one of {FLOAT_DTYPES}, got {t.dtype}")


def _check_args(a, b, prefix, high_shift, shift, bits, counts):
    """Checks every argument; returns the digit parameters as ints."""
    _check_tensor(a, "a")
    _check_tensor(b, "b")
    if b.shape != a.shape:
        raise ValueError(f"b: expected a's shape {tuple(a.shape)}, got {tuple(b.shape)}")
    if b.device != a.device:
        raise ValueError(f"b is on {b.device} but a is on {a.device}")
    bits = _int_arg(bits, "bits", 1, MAX_BITS)
    high_shift = _int_arg(high_shift, "high_shift", bits, 31)
    shift = _int_arg(shift, "shift", 0, high_shift - bits)
    prefix = _int_arg(prefix, "prefix", 0, (1 << (31 - high_shift)) - 1)
    if not isinstance(counts, torch.Tensor):
        raise TypeError(f"counts: expected a torch.Tensor, got {type(counts).__name__}")
    if counts.dtype != torch.int64:
        raise TypeError(f"counts: expected dtype torch.int64, got {counts.dtype}")
    if counts.shape != (1 << bits,):
        raise ValueError(f"counts: expected shape ({1 << bits},) (2**bits bins), got {tuple(counts.shape)}")
    if counts.device != a.device:
        raise ValueError(f"counts is on {counts.device} but a is on {a.device}")
    if not counts.is_contiguous():
        raise ValueError("counts: expected a contiguous tensor")
    return prefix, high_shift, shift, bits


def abs_diff_histogram(a, b, prefix, high_shift, shift, bits, counts, backend=None):
    """Adds the histogram of the digits of |a − b| (see the module docstring) into ``counts`` and
    returns it. backend: "torch" | "cpu" | "triton" | "cuda" | None (automatic; SPARSEFT_BACKEND
    forces one). Bad arguments raise TypeError/ValueError naming the argument before any kernel
    runs."""
    prefix, high_shift, shift, bits = _check_args(a, b, prefix, high_shift, shift, bits, counts)
    name = KERNELS.resolve(a.device, backend)
    if a.numel() == 0:
        return counts
    a_flat, b_flat = a.detach().reshape(-1).contiguous(), b.detach().reshape(-1).contiguous()
    KERNELS[name](a_flat, b_flat, prefix, high_shift, shift, bits, counts)
    return counts
