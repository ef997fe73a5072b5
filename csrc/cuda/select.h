// Histogram of |a - b| bit patterns on CUDA, one pass of an exact radix select: plain C++
// launcher (no torch headers), wrapped for torch by select_binding.cpp. Contract:
// sparseft/ops/select.py (and csrc/cpu/select.cpp).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace sparseft {
namespace cuda {

// Storage dtypes of a and b.
enum SelectDtype : int32_t { kSelectFloat32 = 0, kSelectBFloat16 = 1, kSelectFloat16 = 2 };

// Which entries count and where: pattern = bits(|a - b|); counted iff
// (pattern >> high_shift) == prefix, in bin (pattern >> shift) & (2^bits - 1).
struct SelectDigits {
  uint32_t prefix;
  int32_t high_shift;  // in [bits, 31]
  int32_t shift;       // in [0, high_shift - bits]
  int32_t bits;        // in [1, 16]
};

// counts[bin] += the entries of the numel elements of a and b (contiguous, on the stream's
// device) whose digit is bin; counts holds 2^bits int64 on the device. Returns the launch status.
cudaError_t launch_abs_diff_histogram(const void* a, int32_t a_dtype, const void* b, int32_t b_dtype, int64_t numel,
                                      const SelectDigits& digits, int64_t* counts, cudaStream_t stream);

}  // namespace cuda
}  // namespace sparseft
