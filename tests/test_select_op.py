"""sparseft.ops.select.abs_diff_histogram on every available backend (the Triton kernel on small
CPU tensors under the interpreter) against a numpy histogram written out here, and
masks._kth_largest.kth_largest_abs_diff, which runs on it, against a float64 sort."""

import numpy as np
import pytest
import torch

from conftest import available_backends
from sparseft.masks._kth_largest import kth_largest_abs_diff
from sparseft.ops.select import abs_diff_histogram

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
BACKENDS = available_backends("cpu")
SMALL = 1037  # two programs of the Triton kernel (a block of 1024 and a ragged one)
LARGE = 300_007  # past the cpu kernel's one-thread size: per-thread histograms, merged


def delta_pair(n, a_dtype=F32, b_dtype=F32, seed=0):
    """(tuned, base) with the awkward |tuned - base|: zeros, ties, subnormals, a spread of scales."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    delta = torch.randn(n, generator=g) * 10.0 ** torch.randint(-6, 2, (n,), generator=g)
    tuned = base + delta
    tuned[::7] = base[::7]  # zero deltas
    tuned[1::11] = base[1::11] + 0.25  # ties (exact in every dtype where base is)
    base[2::13] = 0.0
    tuned[2::13] = torch.tensor([1e-40, -3e-42, 1e-45, -2e-39]).repeat(n)[:base[2::13].numel()]  # subnormals
    return tuned.to(a_dtype), base.to(b_dtype)


def numpy_histogram(a, b, prefix, high_shift, shift, bits):
    """The contract in numpy: float32 difference, bit pattern of its absolute value, digit counts."""
    d = a.reshape(-1).float().numpy() - b.reshape(-1).float().numpy()
    pattern = d.view(np.uint32) & np.uint32(0x7FFFFFFF)
    selected = pattern[(pattern >> np.uint32(high_shift)) == prefix]
    digits = (selected >> np.uint32(shift)) & np.uint32((1 << bits) - 1)
    return torch.from_numpy(np.bincount(digits.astype(np.int64), minlength=1 << bits))


def sorted_reference(pairs, k):
    """The k-th largest float32 |a - b| and how many are strictly greater, from a float64 sort
    (a float64 difference of two float32 values rounds to the float32 difference)."""
    d = np.concatenate([np.abs(a.reshape(-1).double().numpy() - b.reshape(-1).double().numpy()).astype(np.float32)
                        for a, b in pairs])
    value = np.sort(d)[::-1][k - 1]
    return float(value), int((d > value).sum())


def top_prefix(a, b):
    """A 16-bit prefix that many entries share (the top digit of the median |a - b|)."""
    d = (a.float() - b.float()).abs().median()
    return int(d.view(torch.int32)) >> 15


def histogram(a, b, prefix, high_shift, shift, bits, backend):
    counts = torch.zeros(1 << bits, dtype=torch.int64)
    return abs_diff_histogram(a, b, prefix, high_shift, shift, bits, counts, backend=backend)


# ----------------------------------------------------------------------------- the histogram
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("a_dtype,b_dtype", [(F32, F32), (BF16, BF16), (F16, F32), (BF16, F16)])
def test_histogram_matches_numpy(backend, a_dtype, b_dtype):
    n = SMALL if backend == "triton" else LARGE
    a, b = delta_pair(n, a_dtype, b_dtype)
    for prefix, high_shift, shift, bits in ((0, 31, 15, 16), (top_prefix(a, b), 15, 0, 15), (0, 31, 23, 8),
                                            (top_prefix(a, b) >> 3, 18, 5, 13)):
        got = histogram(a, b, prefix, high_shift, shift, bits, backend)
        assert torch.equal(got, numpy_histogram(a, b, prefix, high_shift, shift, bits)), (prefix, high_shift, shift)


@pytest.mark.parametrize("backend", BACKENDS)
def test_histogram_adds_into_counts_and_reads_any_layout(backend):
    a, b = delta_pair(32 * 40, BF16, F32, seed=1)
    a, b = a.view(32, 40).t(), b.view(32, 40).t()  # non-contiguous
    counts = torch.ones(1 << 16, dtype=torch.int64)
    for _ in range(2):
        abs_diff_histogram(a, b, 0, 31, 15, 16, counts, backend=backend)
    assert torch.equal(counts, 1 + 2 * numpy_histogram(a.contiguous(), b.contiguous(), 0, 31, 15, 16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_histogram_of_nothing_is_zero(backend):
    empty = torch.empty(0, 3, dtype=BF16)
    assert histogram(empty, empty, 0, 31, 15, 16, backend).sum() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_cpu_and_torch_agree_on_a_large_bfloat16_pair(backend):
    if backend == "triton":
        pytest.skip("too large for the interpreter")
    a, b = delta_pair(1 << 20, BF16, BF16, seed=2)
    assert torch.equal(histogram(a, b, 0, 31, 15, 16, backend), histogram(a, b, 0, 31, 15, 16, "torch"))


# ----------------------------------------------------------------------------- the k-th largest
def check_kth(pairs, k):
    value, greater = kth_largest_abs_diff(pairs, k)
    assert value.dtype == F32 and value.dim() == 0
    assert (float(value), greater) == sorted_reference(pairs, k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("a_dtype,b_dtype", [(F32, F32), (BF16, BF16), (F16, BF16)])
def test_kth_largest_matches_a_sort(backend, a_dtype, b_dtype, monkeypatch):
    monkeypatch.setenv("SPARSEFT_BACKEND", backend)
    n = SMALL if backend == "triton" else 20_000
    pair = delta_pair(n, a_dtype, b_dtype, seed=3)
    for k in (1, 2, n // 3, n // 2, n - 1, n):  # ties at zero reach up to k = n
        check_kth([pair], k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kth_largest_global_over_several_tensors(backend, monkeypatch):
    monkeypatch.setenv("SPARSEFT_BACKEND", backend)
    scale = 1 if backend == "triton" else 8
    pairs = [delta_pair(n * scale, dtype, dtype, seed=n) for n, dtype in ((300, F32), (17, BF16), (700, F16), (1, F32))]
    pairs[1] = (pairs[1][0].view(1, -1), pairs[1][1].view(1, -1))  # shapes need not be flat
    total = sum(a.numel() for a, _ in pairs)
    for k in (1, 5, total // 4, total // 2, total):
        check_kth(pairs, k)


def test_kth_largest_of_identical_tensors_is_zero():
    a = torch.randn(100, dtype=BF16)
    assert kth_largest_abs_diff([(a, a.clone())], 1) == (0.0, 0)
    assert kth_largest_abs_diff([(a, a.clone())], 100) == (0.0, 0)


def test_kth_largest_separates_the_smallest_subnormals():
    a = torch.tensor([0.0, 1e-45, 3e-45, 3e-45, 1.0])
    zero = torch.zeros(5)
    assert [tuple(map(float, kth_largest_abs_diff([(a, zero)], k))) for k in (1, 2, 3, 4, 5)] == [
        (1.0, 0), (float(a[2]), 1), (float(a[2]), 1), (float(a[1]), 3), (0.0, 4)]


# ----------------------------------------------------------------------------- bad arguments
def _args(**override):
    args = dict(a=torch.zeros(8), b=torch.zeros(8), prefix=0, high_shift=31, shift=15, bits=16,
                counts=torch.zeros(1 << 16, dtype=torch.int64))
    args.update(override)
    return args


@pytest.mark.parametrize("override,error,match", [
    (dict(a=[0.0] * 8), TypeError, "^a: expected a torch.Tensor"),
    (dict(a=torch.zeros(8, dtype=torch.float64)), TypeError, "^a: expected one of"),
    (dict(b=torch.zeros(8, dtype=torch.int32)), TypeError, "^b: expected one of"),
    (dict(b=torch.zeros(2, 4)), ValueError, "^b: expected a's shape"),
    (dict(bits=0), ValueError, r"^bits: expected an int in \[1, 16\]"),
    (dict(bits=17), ValueError, "^bits"),
    (dict(bits=True), TypeError, "^bits: .*got a bool"),
    (dict(bits=15.0), TypeError, "^bits: .*got float"),
    (dict(high_shift=32), ValueError, "^high_shift"),
    (dict(high_shift=15), ValueError, r"^high_shift: expected an int in \[16, 31\]"),
    (dict(shift=16), ValueError, r"^shift: expected an int in \[0, 15\]"),
    (dict(shift=-1), ValueError, "^shift"),
    (dict(prefix=1), ValueError, r"^prefix: expected an int in \[0, 0\]"),
    (dict(high_shift=16, shift=0, prefix=1 << 15), ValueError, r"^prefix: expected an int in \[0, 32767\]"),
    (dict(counts=[0] * 65536), TypeError, "^counts: expected a torch.Tensor"),
    (dict(counts=torch.zeros(1 << 16, dtype=torch.int32)), TypeError, "^counts: expected dtype torch.int64"),
    (dict(counts=torch.zeros(1 << 15, dtype=torch.int64)), ValueError, r"^counts: expected shape \(65536,\)"),
    (dict(counts=torch.zeros(2, 1 << 16, dtype=torch.int64)[:, 0]), ValueError, "^counts: expected shape"),
    (dict(counts=torch.zeros(1 << 17, dtype=torch.int64)[::2]), ValueError, "^counts: expected a contiguous"),
])
def test_bad_arguments_are_named(override, error, match):
    args = _args(**override)
    before = args["counts"].clone() if isinstance(args["counts"], torch.Tensor) else None
    with pytest.raises(error, match=match):
        abs_diff_histogram(**args)
    if before is not None:
        assert torch.equal(args["counts"], before)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        abs_diff_histogram(**_args(), backend="numpy")
