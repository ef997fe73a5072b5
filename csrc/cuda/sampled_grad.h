// Sampled weight gradient on CUDA (contract: sparseft/ops/sampled_grad.py):
//   g[k] = sum_b dy[b, row_k] * x[b, col_k],   idx[k] = row_k * in + col_k (sorted, unique).
// Plain C++ launcher over raw pointers; no torch types, so the .cu builds without torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace sparseft {
namespace cuda_sampled_grad {

// dy is row-major [batch, out], x row-major [batch, in], each with its own row stride in
// elements (the last dimension contiguous); T is float, __nv_bfloat16 or __half, I is int32_t or
// int64_t. Writes every g[k] (float32 [nnz], accumulated in float32; no need to zero it), runs on
// `stream` and returns the launch error (cudaErrorInvalidValue when out needs more than 65535
// row tiles).
template <typename T, typename I>
cudaError_t launch_sampled_weight_grad(const T* dy, int64_t dy_stride, const T* x, int64_t x_stride,
                                       int64_t batch, int64_t out, int64_t in, const I* idx, int64_t nnz,
                                       float* g, cudaStream_t stream);

}  // namespace cuda_sampled_grad
}  // namespace sparseft
