"""Kernels of the fused per-tensor merge (kernels/merge.py, csrc/cuda/merge.cu) against a float64
computation of the contract written out here, and the DARE keep mask against a pure-Python
uint64 implementation: the Triton kernel on CPU tensors under the interpreter, and on a GPU
beside the CUDA kernel of sparseft_C::merge_tensor."""

import os

import pytest
import torch

pytest.importorskip("triton")

from sparseft import _backends
from sparseft.kernels import merge as kernels

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
U64 = (1 << 64) - 1
NUMEL = 1037  # two programs of the kernel (one block of 1024 and a ragged one) under the interpreter


# ----------------------------------------------------------------------------- references

def keep_python(seed, index, cutoff):
    """keep_t(i) of the contract on Python integers (wrapping products masked to 64 bits)."""
    x = (seed & U64) ^ ((index * 0x9E3779B97F4A7C15) & U64)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & U64
    x ^= x >> 31
    return (x >> 40) < cutoff


def keep_mask(seed, cutoff, numel, index_offset):
    return torch.tensor([keep_python(seed, index_offset + j, cutoff) for j in range(numel)])


def reference(base, tuned, weights, thresholds, keep_probs, cutoffs, seeds, elect_sign, normalize, consensus_lam,
              consensus_k, scale, index_offset):
    """The contract in float64 after the float32 differences τ_t (which it defines in float32, so
    that the threshold decisions are the kernel's). Returns the exact result and, per element,
    the margins of its discrete decisions (sign election, consensus votes): float64 and the
    kernels' float32 may decide differently where a margin is within rounding of zero."""
    T, n = len(tuned), base.numel()
    b32 = base.reshape(-1).float()
    f32 = [float(torch.tensor(v, dtype=F32)) for v in weights]  # the scalars enter as float32
    ds = []
    for t in range(T):
        tau = (tuned[t].reshape(-1).float() - b32).double()
        keep = torch.ones(n, dtype=torch.bool)
        if thresholds:
            keep &= tau.abs() >= float(torch.tensor(thresholds[t], dtype=F32))
        if cutoffs:
            keep &= keep_mask(seeds[t], cutoffs[t], n, index_offset)
        d = f32[t] * tau
        if keep_probs:
            d = d / float(torch.tensor(keep_probs[t], dtype=F32))
        ds.append(torch.where(keep, d, torch.zeros_like(d)))
    d = torch.stack(ds)
    margin = torch.full((n,), float("inf"), dtype=torch.float64)
    magnitude = d.abs().sum(0)
    if elect_sign:
        s = d.sum(0)
        # all d_t = 0: M = 0 whatever the sign
        margin = torch.where(magnitude > 0, s.abs() / magnitude.clamp_min(1e-300), margin)
        m = torch.where(s >= 0, d > 0, d < 0)
    else:
        m = torch.ones_like(d, dtype=torch.bool)
    merged = torch.where(m, d, torch.zeros_like(d)).sum(0)
    den = torch.where(m, torch.tensor(f32, dtype=torch.float64).view(T, 1), torch.zeros_like(d)).sum(0)
    if normalize:
        den = torch.where(den.abs() < 1e-8, torch.ones_like(den), den)
        merged = merged / den
        magnitude = magnitude / den.abs()
    if consensus_k > 0:
        lam = float(torch.tensor(consensus_lam, dtype=F32))
        gap = d.abs() - lam * (merged - d).abs()
        exact_tie = (d == 0) & (merged == 0)  # 0 >= lam·0 in any precision
        closeness = torch.where(exact_tie, float("inf"), gap.abs() / (magnitude + d.abs()).clamp_min(1e-300))
        margin = torch.minimum(margin, closeness.min(0).values)
        merged = torch.where((gap >= 0).sum(0) >= consensus_k, merged, torch.zeros_like(merged))
    scale32 = float(torch.tensor(scale, dtype=F32))
    return b32.double() + scale32 * merged, b32.double().abs() + abs(scale32) * magnitude, margin


def _ulp(x, dtype):
    info = torch.finfo(dtype)
    return torch.ldexp(torch.full_like(x, info.eps / 2), torch.frexp(x)[1]).clamp_min(info.tiny * info.eps)


def assert_matches_reference(got, exact, size, margin, T):
    """got is exact up to float32 rounding (a few ulps of the terms' size per task) and one
    rounding to got's dtype; elements whose discrete decisions are within 1e-5 of a tie are
    left out (there must be few)."""
    clear = margin > 1e-5
    assert clear.double().mean() > 0.98, f"{int((~clear).sum())} near-ties of {clear.numel()}"
    err = (got.double().reshape(-1) - exact).abs()
    bound = 4 * (T + 4) * 2.0 ** -24 * size + (0 if got.dtype == F32 else _ulp(exact, got.dtype))
    bad = clear & (err > bound)
    assert not bad.any(), (f"{int(bad.sum())} of {got.numel()} elements off, worst error {err[bad].max():.3g} "
                           f"beside bound {bound[bad].min() if torch.is_tensor(bound) else bound:.3g}")


# ----------------------------------------------------------------------------- inputs

def make_inputs(T, base_dtype=F32, tuned_dtypes=None, numel=NUMEL, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=gen)
    tuned_dtypes = tuned_dtypes or [base_dtype] * T
    # Task deltas of different sizes and signs, sparse-ish, so that the options decide something.
    tuned = [(base + torch.randn(numel, generator=gen) * (0.02 * (t + 1)) + 0.01 * (-1) ** t).to(dtype)
             for t, dtype in enumerate(tuned_dtypes)]
    return base.to(base_dtype), tuned


def options(T, *, thresholds=False, dare=False, elect_sign=False, normalize=False, consensus=False, scale=1.0,
            index_offset=0, weights=None):
    keep_probs = [0.9, 0.5, 0.7, 0.3, 0.8, 0.6][:T] + [0.75] * max(T - 6, 0)
    return dict(weights=weights or [1.0, 0.5, -0.25, 0.75, 2.0][:T] + [0.3] * max(T - 5, 0),
                thresholds=[0.01 * (t % 4) for t in range(T)] if thresholds else [],
                keep_probs=keep_probs if dare else [],
                cutoffs=[int(round(p * 2 ** 24)) for p in keep_probs] if dare else [],
                seeds=[(2 ** 63 - 1 - 977 * t) if t % 2 else 12345 + t for t in range(T)] if dare else [],
                elect_sign=elect_sign, normalize=normalize, consensus_lam=0.6 if consensus else 0.0,
                consensus_k=2 if consensus else 0, scale=scale, index_offset=index_offset)


def run_triton(base, tuned, opts, out_dtype=None, out=None):
    out = torch.full(base.shape, float("nan"), dtype=out_dtype or base.dtype) if out is None else out
    kernels.merge_tensor_triton(base, tuned, *opts.values(), out)
    return out


try:
    from sparseft.ops import merge as merge_op
    _op_reason = "" if hasattr(merge_op, "merge_tensor_torch") else "sparseft.ops.merge has no merge_tensor_torch"
except Exception as exc:  # the op's module is written beside this one
    merge_op, _op_reason = None, f"sparseft.ops.merge does not import ({type(exc).__name__}: {exc})"


def check_against_torch_backend(base, tuned, opts, got):
    """Under the interpreter the kernel does the torch reference's float32 ops in its order (no
    FMA, correctly rounded division): equal bit for bit."""
    if merge_op is None or _op_reason:
        return
    expected = torch.empty_like(got)
    merge_op.merge_tensor_torch(base, tuned, *opts.values(), expected)
    assert torch.equal(got, expected) or (torch.isnan(got) == torch.isnan(expected)).all() and \
        torch.equal(got.nan_to_num(), expected.nan_to_num()), \
        f"triton differs from the torch reference at {int((got != expected).sum())} elements"


# ----------------------------------------------------------------------------- the DARE mask

@pytest.mark.parametrize("seed, index_offset",
                         [(0, 0), (12345, 7), (2 ** 63 - 25, 2 ** 40 + 3), (2 ** 62 + 1, 2 ** 33)])
@pytest.mark.parametrize("keep_prob", (0.1, 0.5, 1.0))
def test_dare_mask_bit_exact(seed, index_offset, keep_prob):
    """Merging ones into zeros with weight 1 writes keep_t(i) itself."""
    cutoff = int(round(keep_prob * 2 ** 24))
    base, ones = torch.zeros(NUMEL), torch.ones(NUMEL)
    opts = dict(weights=[1.0], thresholds=[], keep_probs=[], cutoffs=[cutoff], seeds=[seed], elect_sign=False,
                normalize=False, consensus_lam=0.0, consensus_k=0, scale=1.0, index_offset=index_offset)
    got = run_triton(base, [ones], opts)
    expected = keep_mask(seed, cutoff, NUMEL, index_offset)
    assert torch.equal(got, expected.float())
    assert abs(expected.double().mean().item() - keep_prob) < 0.06
    if merge_op is not None and hasattr(merge_op, "dare_keep_mask") and keep_prob < 1.0:
        assert torch.equal(merge_op.dare_keep_mask(seed, NUMEL, keep_prob, index_offset), expected)


def test_python_keep_matches_splitmix64():
    """The test's own hash is splitmix64's finaliser of seed ^ i·golden: known values."""
    def splitmix64_next(state):  # the reference generator's first output for a state
        z = (state + 0x9E3779B97F4A7C15) & U64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & U64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & U64
        return z ^ (z >> 31)
    assert splitmix64_next(0) == 0xE220A8397B1DCDAF  # splitmix64 seeded with 0
    # With seed 0 and i = 1 the contract hashes the golden ratio itself, splitmix64's first step.
    assert keep_python(0, 1, 1 << 24) and (splitmix64_next(0) >> 40) == 0xE220A8
    assert keep_python(0, 1, 0xE220A8 + 1) and not keep_python(0, 1, 0xE220A8)


# ----------------------------------------------------------------------------- the formula

CASES = {
    "task arithmetic": dict(),
    "thresholds": dict(thresholds=True),
    "dare": dict(dare=True),
    "ties": dict(thresholds=True, elect_sign=True, normalize=True),
    "dare ties": dict(dare=True, thresholds=True, elect_sign=True, normalize=True, scale=0.8),
    "normalize": dict(normalize=True),
    "consensus": dict(consensus=True, scale=1.5),
    "everything": dict(thresholds=True, dare=True, elect_sign=True, normalize=True, consensus=True, scale=-0.7,
                       index_offset=2 ** 35 + 11),
}


@pytest.mark.parametrize("T", (1, 2, 3, 5))
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64(case, T):
    base, tuned = make_inputs(T)
    opts = options(T, **CASES[case])
    got = run_triton(base, tuned, opts)
    exact, size, margin = reference(base, tuned, *opts.values())
    assert_matches_reference(got, exact, size, margin, T)
    check_against_torch_backend(base, tuned, opts, got)


@pytest.mark.parametrize("base_dtype", (F32, BF16, F16))
@pytest.mark.parametrize("out_dtype", (F32, BF16, F16))
@pytest.mark.parametrize("tuned_dtype", (F32, BF16, F16))
def test_dtypes(base_dtype, tuned_dtype, out_dtype):
    T = 3
    base, tuned = make_inputs(T, base_dtype, [tuned_dtype] * T, seed=1)
    opts = options(T, dare=True, elect_sign=True, normalize=True, thresholds=True)
    got = run_triton(base, tuned, opts, out_dtype)
    assert got.dtype == out_dtype
    exact, size, margin = reference(base, tuned, *opts.values())
    assert_matches_reference(got, exact, size, margin, T)
    check_against_torch_backend(base, tuned, opts, got)


@pytest.mark.parametrize("dtypes", [(BF16, F32, F16), (F32, F16, F16, BF16, F32), (F16, BF16)])
@pytest.mark.parametrize("case", ("task arithmetic", "everything"))
def test_mixed_tuned_dtypes(dtypes, case):
    T = len(dtypes)
    base, tuned = make_inputs(T, BF16, list(dtypes), seed=2)
    opts = options(T, **CASES[case])
    got = run_triton(base, tuned, opts, F32)
    exact, size, margin = reference(base, tuned, *opts.values())
    assert_matches_reference(got, exact, size, margin, T)
    check_against_torch_backend(base, tuned, opts, got)


def test_many_tasks_beyond_the_cached_keep_bits():
    """T = 70: tasks past the 64 cached DARE bits are hashed again in every pass."""
    T, numel = 70, 77
    base, tuned = make_inputs(T, numel=numel, seed=3)
    opts = options(T, dare=True, elect_sign=True, normalize=True, consensus=True)
    got = run_triton(base, tuned, opts)
    exact, size, margin = reference(base, tuned, *opts.values())
    assert_matches_reference(got, exact, size, margin, T)
    check_against_torch_backend(base, tuned, opts, got)


@pytest.mark.parametrize("case", ("dare ties", "everything"))
def test_chunks_equal_whole(case):
    """Chunks merged with their index_offset give the whole tensor's result bit for bit."""
    T = 3
    base, tuned = make_inputs(T, BF16, seed=4)
    opts = options(T, **CASES[case])
    whole = run_triton(base, tuned, opts)
    start = opts["index_offset"]
    pieces = []
    for lo, hi in ((0, 300), (300, 301), (301, NUMEL)):
        chunk_opts = dict(opts, index_offset=start + lo)
        pieces.append(run_triton(base[lo:hi].clone(), [x[lo:hi].clone() for x in tuned], chunk_opts))
    assert torch.equal(torch.cat(pieces), whole)


@pytest.mark.parametrize("dtype", (F32, BF16))
def test_out_is_base(dtype):
    T = 3
    base, tuned = make_inputs(T, dtype, seed=5)
    opts = options(T, dare=True, elect_sign=True, normalize=True, consensus=True)
    expected = run_triton(base, tuned, opts)
    in_place = base.clone()
    returned = kernels.merge_tensor_triton(in_place, tuned, *opts.values(), in_place)
    assert returned is in_place
    assert torch.equal(in_place, expected)


def test_unaligned_tuned_and_inside_a_buffer():
    """Tuned views that are not 16-byte aligned take the unhinted loads; stores stay in out."""
    T = 2
    base, tuned = make_inputs(T, BF16, seed=6)
    shifted = [torch.cat([torch.zeros(1, dtype=BF16), x])[1:] for x in tuned]
    assert all(x.data_ptr() % 16 for x in shifted)
    opts = options(T, thresholds=True, dare=True)
    expected = run_triton(base, tuned, opts)
    buffer = torch.full((NUMEL + 40,), 7.0, dtype=BF16)
    run_triton(base, shifted, opts, out=buffer[:NUMEL])
    assert torch.equal(buffer[:NUMEL], expected)
    assert torch.equal(buffer[NUMEL:], torch.full((40,), 7.0, dtype=BF16))


def test_empty_tensor_and_degenerate_weights():
    T = 2
    empty = torch.empty(0)
    assert kernels.merge_tensor_triton(empty, [empty, empty], *options(T).values(), empty) is empty
    # Weights summing to zero: normalize leaves M as it is (D = 1).
    base, tuned = make_inputs(T, seed=7)
    opts = options(T, normalize=True, weights=[0.5, -0.5])
    got = run_triton(base, tuned, opts)
    exact, size, margin = reference(base, tuned, *opts.values())
    assert_matches_reference(got, exact, size, margin, T)


@pytest.mark.skipif(merge_op is None or bool(_op_reason), reason=f"the op is not there: {_op_reason}")
@pytest.mark.parametrize("case", ("dare ties", "everything"))
def test_backend_through_the_op(case):
    """sparseft.ops.merge.merge_tensor(backend="triton") equals backend="torch"."""
    T = 3
    base, tuned = make_inputs(T, BF16, [BF16, F32, BF16], seed=8)
    o = options(T, **CASES[case])
    kwargs = dict(weights=o["weights"], thresholds=o["thresholds"] or None, keep_probs=o["keep_probs"] or None,
                  seeds=o["seeds"] or None, elect_sign=o["elect_sign"], normalize=o["normalize"],
                  consensus=(o["consensus_lam"], o["consensus_k"]) if o["consensus_k"] else None, scale=o["scale"],
                  index_offset=o["index_offset"])
    got = merge_op.merge_tensor(base, tuned, backend="triton", **kwargs)
    expected = merge_op.merge_tensor(base, tuned, backend="torch", **kwargs)
    assert torch.equal(got, expected)


# ----------------------------------------------------------------------------- the CUDA code on the host
# csrc/cuda/merge.cu compiled as host C++ against stand-in CUDA headers (-DSPARSEFT_MERGE_HOST_TEST
# leaves its launches out) and run thread by thread: the kernel's logic (passes, cached keep
# bits, vector and scalar paths, the task table in parameters or in an array) checked without a
# GPU. Its explicitly rounded float32 ops (no FMA) equal the torch reference's bit for bit.

_STANDINS = {
    "cuda_runtime.h": r"""
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __grid_constant__
typedef int cudaError_t;
typedef void* cudaStream_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
struct Dim { unsigned x; };
extern Dim gridDim, blockDim, blockIdx, threadIdx;
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
""",
    "cuda_bf16.h": r"""
#pragma once
#include "cuda_runtime.h"
struct __nv_bfloat16 { uint16_t x; };
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float(uint32_t(h.x) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u; std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return {uint16_t((u >> 16) | 0x40)};
  u += 0x7FFF + ((u >> 16) & 1); return {uint16_t(u >> 16)};
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }
""",
    "cuda_fp16.h": r"""
#pragma once
#include "cuda_runtime.h"
struct __half { uint16_t x; };
inline float __half2float(__half h) { _Float16 v; std::memcpy(&v, &h.x, 2); return float(v); }
inline __half __float2half_rn(float f) { _Float16 v = (_Float16)f; __half h; std::memcpy(&h.x, &v, 2); return h; }
inline __half __ushort_as_half(unsigned short s) { return {s}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
""",
    "harness.cpp": r"""
#include "cuda_runtime.h"
Dim gridDim, blockDim, blockIdx, threadIdx;
#include "merge.cu"
namespace sparseft { namespace cuda {
void emulate(const void* base, int32_t base_dtype, const MergeTask* tasks, int64_t T, void* out, int32_t out_dtype,
             int64_t numel, MergeOptions o, int grid, int threads) {
  InlineTasks inline_tasks{};
  Params a{base, out, nullptr, numel, static_cast<int32_t>(T), o};
  if (T <= kMergeInlineTasks) std::copy(tasks, tasks + T, inline_tasks.task); else a.tasks = tasks;
  bool vector = aligned16(base) && aligned16(out);
  for (int64_t t = 0; t < T; ++t) vector = vector && aligned16(tasks[t].ptr);
  gridDim.x = grid, blockDim.x = threads;
  for (int block = 0; block < grid; ++block) {
    for (int thread = 0; thread < threads; ++thread) {
      blockIdx.x = block, threadIdx.x = thread;
#define TYPED(B, O) if (base_dtype == B && out_dtype == O) { \
  if (vector) merge_tensor_kernel<B, O, true>(inline_tasks, a); \
  else merge_tensor_kernel<B, O, false>(inline_tasks, a); }
      TYPED(0, 0) TYPED(0, 1) TYPED(0, 2) TYPED(1, 0) TYPED(1, 1) TYPED(1, 2) TYPED(2, 0) TYPED(2, 1) TYPED(2, 2)
    }
  }
}
}}
extern "C" int64_t merge_sizes() {
  return sizeof(sparseft::cuda::MergeTask) * 1000 + sizeof(sparseft::cuda::MergeOptions);
}
extern "C" void merge_emulate(const void* base, int32_t base_dtype, const sparseft::cuda::MergeTask* tasks, int64_t T,
                              void* out, int32_t out_dtype, int64_t numel, sparseft::cuda::MergeOptions o, int grid,
                              int threads) {
  sparseft::cuda::emulate(base, base_dtype, tasks, T, out, out_dtype, numel, o, grid, threads);
}
""",
}


@pytest.fixture(scope="module")
def cuda_code_on_host(tmp_path_factory):
    import ctypes
    import shutil
    import subprocess
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("no g++ to compile csrc/cuda/merge.cu's code for the host")
    folder = tmp_path_factory.mktemp("merge_cu_host")
    for name, text in _STANDINS.items():
        (folder / name).write_text(text)
    source_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "cuda")
    library = folder / "libmerge_host.so"
    built = subprocess.run([compiler, "-std=c++17", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-Wall",
                            "-Wno-unknown-pragmas", "-Werror", "-DSPARSEFT_MERGE_HOST_TEST", f"-I{folder}",
                            f"-I{source_dir}", str(folder / "harness.cpp"), "-o", str(library)],
                           capture_output=True, text=True)
    if built.returncode != 0:
        pytest.fail(f"csrc/cuda/merge.cu does not compile for the host:\n{built.stderr[-4000:]}")
    lib = ctypes.CDLL(str(library))

    class Task(ctypes.Structure):  # sparseft::cuda::MergeTask
        _fields_ = [("ptr", ctypes.c_void_p), ("seed", ctypes.c_uint64), ("cutoff", ctypes.c_int64),
                    ("weight", ctypes.c_float), ("threshold", ctypes.c_float), ("keep_prob", ctypes.c_float),
                    ("dtype", ctypes.c_int32)]

    class Options(ctypes.Structure):  # sparseft::cuda::MergeOptions
        _fields_ = [("thresholds", ctypes.c_bool), ("dare", ctypes.c_bool), ("elect_sign", ctypes.c_bool),
                    ("normalize", ctypes.c_bool), ("consensus_lam", ctypes.c_float), ("consensus_k", ctypes.c_int64),
                    ("scale", ctypes.c_float), ("index_offset", ctypes.c_int64)]

    lib.merge_sizes.restype = ctypes.c_int64
    assert lib.merge_sizes() == ctypes.sizeof(Task) * 1000 + ctypes.sizeof(Options)
    lib.merge_emulate.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.POINTER(Task), ctypes.c_int64,
                                  ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, Options, ctypes.c_int, ctypes.c_int]

    def run(base, tuned, o, out, grid=3, threads=32):
        """The binding's conversion of the op's arguments, then a launch of grid × threads."""
        T = len(tuned)
        tasks = (Task * T)(*[
            Task(x.data_ptr(), o["seeds"][t] % 2 ** 64 if o["cutoffs"] else 0, o["cutoffs"][t] if o["cutoffs"] else 0,
                 o["weights"][t], o["thresholds"][t] if o["thresholds"] else 0.0,
                 o["keep_probs"][t] if o["keep_probs"] else 1.0, kernels.DTYPE_CODES[x.dtype])
            for t, x in enumerate(tuned)])
        options_ = Options(bool(o["thresholds"]), bool(o["cutoffs"]), o["elect_sign"], o["normalize"],
                           o["consensus_lam"], o["consensus_k"], o["scale"], o["index_offset"])
        lib.merge_emulate(base.data_ptr(), kernels.DTYPE_CODES[base.dtype], tasks, T, out.data_ptr(),
                          kernels.DTYPE_CODES[out.dtype], base.numel(), options_, grid, threads)
        return out
    return run


@pytest.mark.parametrize("T", (1, 3, 5, 17, 70))  # 17: the task table in an array; 70: beyond 64 cached bits
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_code_on_host_matches_float64(cuda_code_on_host, case, T):
    numel = NUMEL if T < 70 else 101  # NUMEL: 259 groups of four and a ragged element
    base, tuned = make_inputs(T, BF16, [(F32, BF16, F16)[t % 3] for t in range(T)], numel=numel, seed=10)
    opts = options(T, **CASES[case])
    got = cuda_code_on_host(base, tuned, opts, torch.full((numel,), float("nan")))
    exact, size, margin = reference(base, tuned, *opts.values())
    assert_matches_reference(got, exact, size, margin, T)
    check_against_torch_backend(base, tuned, opts, got)


@pytest.mark.parametrize("base_dtype, tuned_dtype, out_dtype",
                         [(F32, F32, F32), (BF16, BF16, BF16), (F16, F16, F16), (F32, BF16, F16), (F16, F32, BF16),
                          (BF16, F16, F32)])
def test_cuda_code_on_host_dtypes_and_paths(cuda_code_on_host, base_dtype, tuned_dtype, out_dtype):
    T = 3
    base, tuned = make_inputs(T, base_dtype, [tuned_dtype] * T, seed=11)
    opts = options(T, **CASES["everything"])
    vector = cuda_code_on_host(base, tuned, opts, torch.empty(NUMEL, dtype=out_dtype))
    exact, size, margin = reference(base, tuned, *opts.values())
    assert_matches_reference(vector, exact, size, margin, T)
    check_against_torch_backend(base, tuned, opts, vector)
    # Views one element off alignment take the scalar path; out inside a guarded buffer.
    shifted = [torch.cat([torch.zeros(1, dtype=x.dtype), x])[1:] for x in tuned]
    buffer = torch.full((NUMEL + 9,), 7.0, dtype=out_dtype)
    cuda_code_on_host(base, shifted, opts, buffer[:NUMEL], grid=1, threads=64)
    assert torch.equal(buffer[:NUMEL], vector)
    assert torch.equal(buffer[NUMEL:], torch.full((9,), 7.0, dtype=out_dtype))
    # In place: out is base.
    in_place = base.clone()
    if out_dtype == base_dtype:
        cuda_code_on_host(in_place, tuned, opts, in_place)
        assert torch.equal(in_place, vector)


# ----------------------------------------------------------------------------- on a GPU

_cuda_ok, _cuda_reason = (_backends.availability("cuda", "cuda") if torch.cuda.is_available()
                          else (False, "no CUDA device"))
if _cuda_ok:
    from sparseft import _ext
    _ext.load()
    if not hasattr(torch.ops.sparseft_C, "merge_tensor"):
        _cuda_ok, _cuda_reason = False, "sparseft._C predates merge_tensor"
_triton_ok = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


@pytest.mark.skipif(not _cuda_ok, reason=f"cuda backend unavailable: {_cuda_reason}")
@pytest.mark.parametrize("numel, offset", [(1 << 20, 0), (1000003, 0), (4099, 1)])  # offset 1: not aligned
@pytest.mark.parametrize("T", (3, 20))  # 20: the task table in device memory
@pytest.mark.parametrize("case", ("task arithmetic", "everything"))
def test_cuda_matches_float64_and_triton(numel, offset, T, case):
    base, tuned = make_inputs(T, BF16, [(BF16, F32, F16)[t % 3] for t in range(T)], numel=numel + offset, seed=9)
    base, tuned = base.cuda()[offset:], [x.cuda()[offset:] for x in tuned]
    opts = options(T, **CASES[case])
    got = torch.full(base.shape, float("nan"), dtype=F32, device="cuda")
    torch.ops.sparseft_C.merge_tensor(base, tuned, *opts.values(), got)
    n = 4099  # the pure-Python DARE mask of the reference: a prefix
    exact, size, margin = reference(base[:n].cpu(), [x[:n].cpu() for x in tuned], *opts.values())
    assert_matches_reference(got[:n].cpu(), exact, size, margin, T)
    if _triton_ok:
        triton_out = torch.empty_like(got)
        kernels.merge_tensor_triton(base, tuned, *opts.values(), triton_out)
        torch.testing.assert_close(triton_out, got, rtol=2e-6, atol=1e-6)
