// Row kernels of the masked-loss cross-entropy on CUDA (contract: sparseft/ops/_ce_torch.py).
// Plain C++ launchers over raw pointers; no torch types, so the .cu builds without torch.
//
// Every launcher takes row-major [rows, vocab] data with a row stride in elements (the last
// dimension is contiguous), runs on `stream` and returns the launch error.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace sparseft {
namespace cuda_ce {

struct LossOptions {
  float smoothing;  // label smoothing epsilon
  float z_loss;     // coefficient of lse^2
  float softcap;    // 0: none; else x = softcap * tanh(logit / softcap)
};

// loss[i] and lse[i] (float32) of every row of logits; rows with scale[i] == 0 get 0.
// T is float, __nv_bfloat16 or __half.
template <typename T>
cudaError_t launch_row_forward(const T* logits, int64_t rows, int64_t vocab, int64_t row_stride,
                               const int64_t* labels, const float* scale, LossOptions opts,
                               float* loss, float* lse, cudaStream_t stream);

// grad = d(sum_i scale_i loss_i)/d(logits) given lse, written in T with its own row stride;
// rows with scale[i] == 0 get zeros. grad may alias logits (same pointer and stride).
template <typename T>
cudaError_t launch_row_gradient(const T* logits, int64_t rows, int64_t vocab, int64_t row_stride,
                                const float* lse, const int64_t* labels, const float* scale,
                                LossOptions opts, T* grad, int64_t grad_stride, cudaStream_t stream);

// The fused linear path's chunk step. `logits` is a float32 [rows, ld] buffer (ld a multiple
// of 4, the pointer 16-byte aligned) holding hidden @ weight^T for `rows` active rows;
// row_index[r] is the global row of chunk row r (for labels, scale and loss). Adds `bias`
// (T [vocab], may be null), writes loss[row_index[r]], and when `write_grad` overwrites
// the buffer in place with the gradient of the logits in T: row r starts at element
// r * ld * (4 / sizeof(T)) of the buffer viewed as T (inside the row's own float32 bytes).
template <typename T>
cudaError_t launch_fused_rows(float* logits, int64_t rows, int64_t vocab, int64_t ld, const T* bias,
                              const int64_t* row_index, const int64_t* labels, const float* scale,
                              LossOptions opts, float* loss, bool write_grad, cudaStream_t stream);

}  // namespace cuda_ce
}  // namespace sparseft
