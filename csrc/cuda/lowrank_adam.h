// The low-rank Adam direction on CUDA: plain C++ launcher (no torch headers), wrapped for torch
// by lowrank_adam_binding.cpp. Contract: sparseft/ops/lowrank_adam.py.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace sparseft {
namespace cuda {

// Over numel float32 entries, in one pass: exp_avg = beta1·exp_avg + (1 − beta1)·grad,
// exp_avg_sq = beta2·exp_avg_sq + (1 − beta2)·grad², out = (exp_avg·c1) / (√exp_avg_sq·c2 + eps),
// the moments in place. Returns the launch status.
cudaError_t launch_lowrank_adam_direction(const float* grad, float* exp_avg, float* exp_avg_sq, float* out,
                                          int64_t numel, double beta1, double beta2, double c1, double c2,
                                          double eps, cudaStream_t stream);

}  // namespace cuda
}  // namespace sparseft
