// Fused SparseAdamW step on CUDA: one thread per mask entry (grid-stride), float32 math,
// one rounding to the weight dtype. Contract: sparseft/optim/_sparse_adamw_backends.py.

#include "sparse_adamw.h"

#include "../adamw_hyper.h"
#include "convert.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace sparseft {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;

using Hyper = AdamWHyper;

template <typename T, typename index_t, bool kCompactGrad, bool kHasValues>
__global__ void sparse_adamw_kernel(T* __restrict__ target, const index_t* __restrict__ indices,
                                    const T* __restrict__ grad, float* __restrict__ exp_avg,
                                    float* __restrict__ exp_avg_sq, int32_t* __restrict__ step,
                                    T* __restrict__ values, int64_t nnz, Hyper h) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < nnz; k += stride) {
    const int64_t i = static_cast<int64_t>(indices[k]);
    const float g = to_float(kCompactGrad ? grad[k] : grad[i]);
    const float m = h.beta1 * exp_avg[k] + h.one_minus_beta1 * g;
    const float v = h.beta2 * exp_avg_sq[k] + h.one_minus_beta2 * (g * g);
    const int32_t s = step[k] + 1;
    const float t = static_cast<float>(s);
    // 1 - beta^t as -expm1(t log beta): no cancellation for beta2 close to 1
    const float bc1 = -expm1f(t * h.log_beta1);
    const float bc2 = -expm1f(t * h.log_beta2);
    // The values mirror the target at the mask: read them contiguously instead of gathering.
    const float current = to_float(kHasValues ? values[k] : target[i]);
    const float w = current * h.decay - h.lr * (m / bc1) / (sqrtf(v / bc2) + h.eps);
    const T out = from_float<T>(w);
    target[i] = out;
    if (kHasValues) values[k] = out;
    exp_avg[k] = m;
    exp_avg_sq[k] = v;
    step[k] = s;
  }
}

template <typename T, typename index_t>
cudaError_t launch_typed(void* target, const void* indices, const void* grad, bool compact_grad, float* exp_avg,
                         float* exp_avg_sq, int32_t* step, void* values, int64_t nnz, const Hyper& h,
                         cudaStream_t stream) {
  const int blocks = static_cast<int>(std::min<int64_t>((nnz + kThreads - 1) / kThreads, kMaxBlocks));
  auto* t = static_cast<T*>(target);
  auto* idx = static_cast<const index_t*>(indices);
  auto* g = static_cast<const T*>(grad);
  auto* vals = static_cast<T*>(values);
  if (compact_grad) {
    if (vals != nullptr) {
      sparse_adamw_kernel<T, index_t, true, true><<<blocks, kThreads, 0, stream>>>(t, idx, g, exp_avg, exp_avg_sq,
                                                                                   step, vals, nnz, h);
    } else {
      sparse_adamw_kernel<T, index_t, true, false><<<blocks, kThreads, 0, stream>>>(t, idx, g, exp_avg, exp_avg_sq,
                                                                                    step, vals, nnz, h);
    }
  } else if (vals != nullptr) {
    sparse_adamw_kernel<T, index_t, false, true><<<blocks, kThreads, 0, stream>>>(t, idx, g, exp_avg, exp_avg_sq,
                                                                                  step, vals, nnz, h);
  } else {
    sparse_adamw_kernel<T, index_t, false, false><<<blocks, kThreads, 0, stream>>>(t, idx, g, exp_avg, exp_avg_sq,
                                                                                   step, vals, nnz, h);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_for_index(bool indices_int64, void* target, const void* indices, const void* grad,
                             bool compact_grad, float* exp_avg, float* exp_avg_sq, int32_t* step, void* values,
                             int64_t nnz, const Hyper& h, cudaStream_t stream) {
  return indices_int64 ? launch_typed<T, int64_t>(target, indices, grad, compact_grad, exp_avg, exp_avg_sq, step,
                                                  values, nnz, h, stream)
                       : launch_typed<T, int32_t>(target, indices, grad, compact_grad, exp_avg, exp_avg_sq, step,
                                                  values, nnz, h, stream);
}

}  // namespace

cudaError_t launch_sparse_adamw_step(WeightDtype dtype, void* target, const void* indices, bool indices_int64,
                                     const void* grad, bool compact_grad, float* exp_avg, float* exp_avg_sq,
                                     int32_t* step, void* values, int64_t nnz, double lr, double beta1, double beta2,
                                     double eps, double weight_decay, cudaStream_t stream) {
  if (nnz == 0) return cudaSuccess;
  const Hyper h = make_adamw_hyper(lr, beta1, beta2, eps, weight_decay);
  switch (dtype) {
    case WeightDtype::kFloat32:
      return launch_for_index<float>(indices_int64, target, indices, grad, compact_grad, exp_avg, exp_avg_sq, step,
                                     values, nnz, h, stream);
    case WeightDtype::kFloat16:
      return launch_for_index<__half>(indices_int64, target, indices, grad, compact_grad, exp_avg, exp_avg_sq, step,
                                      values, nnz, h, stream);
    case WeightDtype::kBFloat16:
      return launch_for_index<__nv_bfloat16>(indices_int64, target, indices, grad, compact_grad, exp_avg, exp_avg_sq,
                                             step, values, nnz, h, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace sparseft
