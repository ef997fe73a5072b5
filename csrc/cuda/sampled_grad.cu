// Sampled weight gradient on CUDA: one block per 64x64 tile of the [out, in] weight that holds
// at least one mask entry. The block computes the dense tile of dy^T @ x in float32 (shared
// memory B-slices, a 4x4 register micro-tile per thread), parks it in shared memory and writes
// out only the tile's entries. Entries of (row, column tile) are a contiguous range of the
// sorted mask, found by binary search, so no workspace is needed and every entry is written by
// exactly one block: deterministic, no atomics, no dense gradient in global memory.
#include "sampled_grad.h"
#include "convert.cuh"

namespace sparseft {
namespace cuda_sampled_grad {
namespace {

constexpr int kTileRows = 64;
constexpr int kTileCols = 64;
constexpr int kSliceB = 16;
constexpr int kThreads = 256;
constexpr int kMicro = 4;  // each thread owns rows ty + 16m, cols tx + 16n, m, n < 4
constexpr int kLanesPerDim = kTileRows / kMicro;


// First position in the sorted idx[0, n) whose value is >= target.
template <typename I>
__device__ int64_t lower_bound(const I* idx, int64_t n, int64_t target) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (static_cast<int64_t>(idx[mid]) < target) lo = mid + 1; else hi = mid;
  }
  return lo;
}

template <typename T, typename I>
__global__ void __launch_bounds__(kThreads)
sampled_grad_tile_kernel(const T* __restrict__ dy, int64_t dy_stride, const T* __restrict__ x, int64_t x_stride,
                         int64_t batch, int64_t out, int64_t in, const I* __restrict__ idx, int64_t nnz,
                         float* __restrict__ g) {
  __shared__ float dy_slice[kSliceB][kTileRows];  // dy_slice[b][i] = dy[b0 + b, r0 + i]
  __shared__ float x_slice[kSliceB][kTileCols];   // x_slice[b][j] = x[b0 + b, c0 + j]
  __shared__ float tile[kTileRows][kTileCols + 1];
  __shared__ int64_t first[kTileRows], last[kTileRows];

  const int tid = threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTileRows;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTileCols;
  const int64_t c_end = c0 + kTileCols < in ? c0 + kTileCols : in;

  bool has_entries = false;
  if (tid < kTileRows) {
    const int64_t r = r0 + tid;
    int64_t lo = 0, hi = 0;
    if (r < out) {
      lo = lower_bound(idx, nnz, r * in + c0);
      hi = lower_bound(idx, nnz, r * in + c_end);
    }
    first[tid] = lo;
    last[tid] = hi;
    has_entries = hi > lo;
  }
  if (!__syncthreads_or(has_entries)) return;

  const int ty = tid / kLanesPerDim, tx = tid % kLanesPerDim;
  float acc[kMicro][kMicro] = {};
  for (int64_t b0 = 0; b0 < batch; b0 += kSliceB) {
    for (int e = tid; e < kSliceB * kTileRows; e += kThreads) {
      const int bb = e / kTileRows, i = e % kTileRows;
      const int64_t b = b0 + bb;
      const bool b_ok = b < batch;
      dy_slice[bb][i] = b_ok && r0 + i < out ? to_float(dy[b * dy_stride + r0 + i]) : 0.f;
      x_slice[bb][i] = b_ok && c0 + i < in ? to_float(x[b * x_stride + c0 + i]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int bb = 0; bb < kSliceB; ++bb) {
      float a[kMicro], v[kMicro];
#pragma unroll
      for (int m = 0; m < kMicro; ++m) a[m] = dy_slice[bb][ty + kLanesPerDim * m];
#pragma unroll
      for (int n = 0; n < kMicro; ++n) v[n] = x_slice[bb][tx + kLanesPerDim * n];
#pragma unroll
      for (int m = 0; m < kMicro; ++m)
#pragma unroll
        for (int n = 0; n < kMicro; ++n) acc[m][n] = fmaf(a[m], v[n], acc[m][n]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int m = 0; m < kMicro; ++m)
#pragma unroll
    for (int n = 0; n < kMicro; ++n) tile[ty + kLanesPerDim * m][tx + kLanesPerDim * n] = acc[m][n];
  __syncthreads();

  // Warp w writes the entries of rows w, w + 8, ...; lanes take consecutive entries.
  const int warp = tid / 32, lane = tid % 32;
  for (int i = warp; i < kTileRows; i += kThreads / 32) {
    const int64_t row_start = (r0 + i) * in + c0;
    for (int64_t k = first[i] + lane; k < last[i]; k += 32)
      g[k] = tile[i][static_cast<int64_t>(idx[k]) - row_start];
  }
}

}  // namespace

template <typename T, typename I>
cudaError_t launch_sampled_weight_grad(const T* dy, int64_t dy_stride, const T* x, int64_t x_stride,
                                       int64_t batch, int64_t out, int64_t in, const I* idx, int64_t nnz,
                                       float* g, cudaStream_t stream) {
  if (nnz == 0) return cudaSuccess;
  const int64_t row_tiles = (out + kTileRows - 1) / kTileRows;
  const int64_t col_tiles = (in + kTileCols - 1) / kTileCols;
  if (row_tiles > 65535 || col_tiles > 2147483647) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(row_tiles));
  sampled_grad_tile_kernel<T, I><<<grid, kThreads, 0, stream>>>(dy, dy_stride, x, x_stride, batch, out, in, idx,
                                                                nnz, g);
  return cudaGetLastError();
}

#define SPARSEFT_INSTANTIATE(T, I)                                                                              \
  template cudaError_t launch_sampled_weight_grad<T, I>(const T*, int64_t, const T*, int64_t, int64_t, int64_t, \
                                                        int64_t, const I*, int64_t, float*, cudaStream_t);
SPARSEFT_INSTANTIATE(float, int32_t)
SPARSEFT_INSTANTIATE(float, int64_t)
SPARSEFT_INSTANTIATE(__nv_bfloat16, int32_t)
SPARSEFT_INSTANTIATE(__nv_bfloat16, int64_t)
SPARSEFT_INSTANTIATE(__half, int32_t)
SPARSEFT_INSTANTIATE(__half, int64_t)
#undef SPARSEFT_INSTANTIATE

}  // namespace cuda_sampled_grad
}  // namespace sparseft
