// Histogram of |a - b| bit patterns on CUDA. Contract: sparseft/ops/select.py; per element
//   d = f32(a[i]) - f32(b[i]);  pattern = bits(d) & 0x7FFFFFFF
//   if ((pattern >> high_shift) == prefix) counts[(pattern >> shift) & (2^bits - 1)] += 1
//
// A grid-stride loop, one element per thread and step, 64-bit indices. Bit patterns of model
// deltas crowd into few bins, so the lanes of a warp that share a bin are merged first
// (__match_any_sync) and one of them adds their number: one atomic per distinct bin and warp.
// Up to kSharedBits bits the histogram lives in shared memory, one per block, added to counts
// at the end; a 2^16-bin histogram does not fit there, so wider digits go straight to global
// atomics on counts.

#include "convert.cuh"
#include "select.h"

#include <algorithm>
#include <cstdint>

namespace sparseft {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 2048;  // each block clears and flushes its shared histogram once
constexpr int kSharedBits = 13;       // 2^13 uint32 bins: 32 KiB of shared memory

template <int kDtype>
__device__ __forceinline__ float load_float(const void* ptr, int64_t i) {
  if (kDtype == kSelectBFloat16) return to_float(static_cast<const __nv_bfloat16*>(ptr)[i]);
  if (kDtype == kSelectFloat16) return to_float(static_cast<const __half*>(ptr)[i]);
  return static_cast<const float*>(ptr)[i];
}

template <int kA, int kB, bool kShared>
__global__ void __launch_bounds__(kThreads)
    abs_diff_histogram_kernel(const void* a, const void* b, int64_t numel, SelectDigits s,
                              unsigned long long* counts) {
  extern __shared__ unsigned int shared_bins[];
  const uint32_t bins = 1u << s.bits;
  if (kShared) {
    for (uint32_t i = threadIdx.x; i < bins; i += blockDim.x) shared_bins[i] = 0;
    __syncthreads();
  }
  const unsigned lane = threadIdx.x % 32;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // Every lane of a warp runs the same steps (blockDim is a multiple of 32), as the warp
  // intrinsics need; lanes past numel take part unselected.
  for (int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x; start < numel; start += stride) {
    const int64_t i = start + threadIdx.x;
    bool selected = false;
    uint32_t digit = 0;
    if (i < numel) {
      const float d = __fsub_rn(load_float<kA>(a, i), load_float<kB>(b, i));
      const uint32_t pattern = __float_as_uint(d) & 0x7FFFFFFFu;
      selected = (pattern >> s.high_shift) == s.prefix;
      digit = (pattern >> s.shift) & (bins - 1);
    }
    const unsigned voters = __ballot_sync(0xFFFFFFFFu, selected);
    if (selected) {
      const unsigned peers = __match_any_sync(voters, digit);
      if (static_cast<unsigned>(__ffs(peers) - 1) == lane) {
        if (kShared) {
          atomicAdd(&shared_bins[digit], static_cast<unsigned>(__popc(peers)));
        } else {
          atomicAdd(&counts[digit], static_cast<unsigned long long>(__popc(peers)));
        }
      }
    }
  }
  if (kShared) {
    __syncthreads();
    for (uint32_t i = threadIdx.x; i < bins; i += blockDim.x) {
      if (shared_bins[i] != 0) atomicAdd(&counts[i], static_cast<unsigned long long>(shared_bins[i]));
    }
  }
}

template <int kA, int kB>
void launch(const void* a, const void* b, int64_t numel, const SelectDigits& s, int64_t* counts, int blocks,
            cudaStream_t stream) {
  // int64 counts add as their two's-complement uint64 bits.
  auto* bins = reinterpret_cast<unsigned long long*>(counts);
  if (s.bits <= kSharedBits) {
    const size_t shared = sizeof(unsigned int) << s.bits;
    abs_diff_histogram_kernel<kA, kB, true><<<blocks, kThreads, shared, stream>>>(a, b, numel, s, bins);
  } else {
    abs_diff_histogram_kernel<kA, kB, false><<<blocks, kThreads, 0, stream>>>(a, b, numel, s, bins);
  }
}

template <int kA>
void launch_b(int32_t b_dtype, const void* a, const void* b, int64_t numel, const SelectDigits& s, int64_t* counts,
              int blocks, cudaStream_t stream) {
  switch (b_dtype) {
    case kSelectBFloat16: launch<kA, kSelectBFloat16>(a, b, numel, s, counts, blocks, stream); break;
    case kSelectFloat16: launch<kA, kSelectFloat16>(a, b, numel, s, counts, blocks, stream); break;
    default: launch<kA, kSelectFloat32>(a, b, numel, s, counts, blocks, stream); break;
  }
}

}  // namespace

cudaError_t launch_abs_diff_histogram(const void* a, int32_t a_dtype, const void* b, int32_t b_dtype, int64_t numel,
                                      const SelectDigits& digits, int64_t* counts, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  if (digits.bits < 1 || digits.bits > 16 || digits.high_shift < digits.bits || digits.high_shift > 31 ||
      digits.shift < 0 || digits.shift + digits.bits > digits.high_shift) {
    return cudaErrorInvalidValue;
  }
  const int blocks = static_cast<int>(std::min<int64_t>((numel + kThreads - 1) / kThreads, kMaxBlocks));
  switch (a_dtype) {
    case kSelectBFloat16: launch_b<kSelectBFloat16>(b_dtype, a, b, numel, digits, counts, blocks, stream); break;
    case kSelectFloat16: launch_b<kSelectFloat16>(b_dtype, a, b, numel, digits, counts, blocks, stream); break;
    default: launch_b<kSelectFloat32>(b_dtype, a, b, numel, digits, counts, blocks, stream); break;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace sparseft
