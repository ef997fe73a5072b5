// The low-rank Adam direction on CUDA: a grid-stride pass over the projected gradient, four
// entries per float4 load where all four arrays are 16-byte aligned. Contract:
// sparseft/ops/lowrank_adam.py.

#include "lowrank_adam.h"

#include <algorithm>
#include <cstdint>

namespace sparseft {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;

// Computed in double on the host and rounded to float once, as the other backends do.
struct Hyper {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, c1, c2, eps;
};

// One entry: updates the moments in place and returns the direction.
__device__ __forceinline__ float step(float g, float& m, float& v, const Hyper& h) {
  m = h.beta1 * m + h.one_minus_beta1 * g;
  v = h.beta2 * v + h.one_minus_beta2 * (g * g);
  return (m * h.c1) / (sqrtf(v) * h.c2 + h.eps);
}

// kVector: entries [0, numel / 4 * 4) as float4, the rest one by one.
template <bool kVector>
__global__ void lowrank_adam_direction_kernel(const float* __restrict__ grad, float* __restrict__ exp_avg,
                                              float* __restrict__ exp_avg_sq, float* __restrict__ out,
                                              int64_t numel, Hyper h) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t tail = 0;
  if (kVector) {
    const int64_t quads = numel / 4;
    for (int64_t q = first; q < quads; q += stride) {
      const float4 g = reinterpret_cast<const float4*>(grad)[q];
      float4 m = reinterpret_cast<const float4*>(exp_avg)[q];
      float4 v = reinterpret_cast<const float4*>(exp_avg_sq)[q];
      const float4 d = {step(g.x, m.x, v.x, h), step(g.y, m.y, v.y, h), step(g.z, m.z, v.z, h),
                        step(g.w, m.w, v.w, h)};
      reinterpret_cast<float4*>(exp_avg)[q] = m;
      reinterpret_cast<float4*>(exp_avg_sq)[q] = v;
      reinterpret_cast<float4*>(out)[q] = d;
    }
    tail = quads * 4;
  }
  for (int64_t i = tail + first; i < numel; i += stride) {
    float m = exp_avg[i], v = exp_avg_sq[i];
    out[i] = step(grad[i], m, v, h);
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

cudaError_t launch_lowrank_adam_direction(const float* grad, float* exp_avg, float* exp_avg_sq, float* out,
                                          int64_t numel, double beta1, double beta2, double c1, double c2,
                                          double eps, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  const Hyper h{static_cast<float>(beta1), static_cast<float>(1.0 - beta1), static_cast<float>(beta2),
                static_cast<float>(1.0 - beta2), static_cast<float>(c1), static_cast<float>(c2),
                static_cast<float>(eps)};
  const bool vector = aligned16(grad) && aligned16(exp_avg) && aligned16(exp_avg_sq) && aligned16(out);
  const int64_t work = vector ? std::max<int64_t>(numel / 4, 1) : numel;
  const int blocks = static_cast<int>(std::min<int64_t>((work + kThreads - 1) / kThreads, kMaxBlocks));
  if (vector) {
    lowrank_adam_direction_kernel<true><<<blocks, kThreads, 0, stream>>>(grad, exp_avg, exp_avg_sq, out, numel, h);
  } else {
    lowrank_adam_direction_kernel<false><<<blocks, kThreads, 0, stream>>>(grad, exp_avg, exp_avg_sq, out, numel, h);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace sparseft
