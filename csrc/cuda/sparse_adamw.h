// Fused SparseAdamW step on CUDA: plain C++ launcher (no torch headers), wrapped for torch by
// sparse_adamw_binding.cpp. Contract: sparseft/optim/_sparse_adamw_backends.py.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace sparseft {
namespace cuda {

enum class WeightDtype { kFloat32, kFloat16, kBFloat16 };

// Updates target[indices[k]] (and values[k] when values is not null) for k < nnz, in place,
// with exp_avg/exp_avg_sq (float32) and step (int32) of length nnz. grad is compact ([nnz])
// when compact_grad, else dense with the target's layout; grad, target and values share the
// weight dtype. indices are int64 when indices_int64, else int32; sorted and unique (the
// kernel scatters without atomics). Returns the launch status.
cudaError_t launch_sparse_adamw_step(WeightDtype dtype, void* target, const void* indices, bool indices_int64,
                                     const void* grad, bool compact_grad, float* exp_avg, float* exp_avg_sq,
                                     int32_t* step, void* values, int64_t nnz, double lr, double beta1, double beta2,
                                     double eps, double weight_decay, cudaStream_t stream);

}  // namespace cuda
}  // namespace sparseft
