// CUDA implementations of the sparseft_C cross-entropy ops (schemas declared in
// csrc/cpu/cross_entropy.cpp): argument checks, the current stream, dtype dispatch onto the
// row kernels of cross_entropy.cu, and the chunk loop of the fused linear path.
//
// The linear path, per chunk of active rows:
//   logits (float32 [rows, ld]) = X_chunk · Wᵀ          cuBLAS, T inputs, float32 output
//   fused row kernel: + bias, loss, and in place the gradient G in T
//   grad_hidden rows = G · W                             T output, index_copy'd into place
//   grad_weight     += Gᵀ · X_chunk                      float32 accumulator (beta = 1)
//   grad_bias       += column sums of G                  float32
// The logits buffer is float32 so the loss sees unrounded GEMM outputs, and the gradient is
// rounded to T once, in the kernel, because the gradient GEMMs need T operands. cuBLAS is
// called directly (cublasGemmEx) since torch's matmuls cannot mix T inputs with a float32
// output/accumulator across the torch versions this builds against.

#include "cross_entropy.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <optional>
#include <tuple>
#include <type_traits>

namespace sparseft {
namespace {

using at::Tensor;
using cuda_ce::LossOptions;

// Calls fn(T*) with a null pointer of the kernels' element type for `type`.
template <typename Fn>
void dispatch_element(at::ScalarType type, Fn&& fn) {
  switch (type) {
    case at::kFloat:
      return fn(static_cast<float*>(nullptr));
    case at::kBFloat16:
      return fn(static_cast<__nv_bfloat16*>(nullptr));
    case at::kHalf:
      return fn(static_cast<__half*>(nullptr));
    default:
      TORCH_CHECK(false, "sparseft cross-entropy: expected float32, bfloat16 or float16, got ", type);
  }
}

template <typename T>
cudaDataType_t cuda_data_type() {
  if constexpr (std::is_same_v<T, float>) return CUDA_R_32F;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return CUDA_R_16BF;
  return CUDA_R_16F;
}

void check_launch(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "sparseft cross-entropy kernel failed: ", cudaGetErrorString(err));
}

void check_device(const Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.device() == device, name, " must be on ", device, ", got ", t.device());
}

void check_float(const Tensor& t, const char* name) {
  const auto type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kBFloat16 || type == at::kHalf, name,
              " must be float32, bfloat16 or float16, got ", type);
}

void check_rows(const Tensor& labels, const Tensor& scale, int64_t rows, const at::Device& device) {
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == rows,
              "labels must be an int64 vector of length ", rows);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == rows,
              "scale must be a float32 vector of length ", rows);
  check_device(labels, "labels", device);
  check_device(scale, "scale", device);
}

LossOptions loss_options(double smoothing, double z_loss, double softcap) {
  return {float(smoothing), float(z_loss), float(softcap)};
}

// A 2-D tensor whose rows are contiguous (any row stride), copying only when they are not.
Tensor with_contiguous_rows(const Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

// Column-major C[m, n] = op(A) · op(B) + beta · C with float32 accumulation (row-major
// callers swap operands). float32 inputs use TF32 when torch allows it for matmuls.
void gemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
          const void* b, int64_t ldb, cudaDataType_t input_type, float beta, void* c, int64_t ldc,
          cudaDataType_t output_type) {
  const cublasComputeType_t compute =
      input_type == CUDA_R_32F && at::globalContext().allowTF32CuBLAS() ? CUBLAS_COMPUTE_32F_FAST_TF32
                                                                         : CUBLAS_COMPUTE_32F;
  const float alpha = 1.f;
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // bound to the current stream
  TORCH_CUDABLAS_CHECK(cublasSetPointerMode(handle, CUBLAS_POINTER_MODE_HOST));
  TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                                    transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N, int(m), int(n), int(k), &alpha, a,
                                    input_type, int(lda), b, input_type, int(ldb), &beta, c, output_type, int(ldc),
                                    compute, CUBLAS_GEMM_DEFAULT));
}

std::tuple<Tensor, Tensor> cross_entropy_forward(const Tensor& logits, const Tensor& labels, const Tensor& scale,
                                                 double smoothing, double z_loss, double softcap) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "logits must have shape [N, V] with V > 0");
  check_float(logits, "logits");
  const at::Device device = logits.device();
  check_rows(labels, scale, logits.size(0), device);
  const c10::cuda::CUDAGuard guard(device);
  const Tensor x = with_contiguous_rows(logits);
  const Tensor labels_c = labels.contiguous(), scale_c = scale.contiguous();
  const int64_t rows = x.size(0), vocab = x.size(1);
  Tensor loss = at::empty({rows}, x.options().dtype(at::kFloat));  // every row written
  Tensor lse = at::empty_like(loss);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_element(x.scalar_type(), [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_launch(cuda_ce::launch_row_forward<T>(
        static_cast<const T*>(x.data_ptr()), rows, vocab, x.stride(0), labels_c.data_ptr<int64_t>(),
        scale_c.data_ptr<float>(), loss_options(smoothing, z_loss, softcap), loss.data_ptr<float>(),
        lse.data_ptr<float>(), stream));
  });
  return {loss, lse};
}

Tensor cross_entropy_backward(const Tensor& logits, const Tensor& lse, const Tensor& labels, const Tensor& scale,
                              double smoothing, double z_loss, double softcap) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "logits must have shape [N, V] with V > 0");
  check_float(logits, "logits");
  const at::Device device = logits.device();
  check_rows(labels, scale, logits.size(0), device);
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == logits.size(0), "lse must be a vector of length ", logits.size(0));
  check_device(lse, "lse", device);
  const c10::cuda::CUDAGuard guard(device);
  const Tensor x = with_contiguous_rows(logits);
  const Tensor labels_c = labels.contiguous(), scale_c = scale.contiguous();
  const Tensor lse_c = lse.to(at::kFloat).contiguous();
  const int64_t rows = x.size(0), vocab = x.size(1);
  // A fresh buffer: the caller's logits are never overwritten. Every element is written.
  Tensor grad = at::empty({rows, vocab}, x.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_element(x.scalar_type(), [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_launch(cuda_ce::launch_row_gradient<T>(
        static_cast<const T*>(x.data_ptr()), rows, vocab, x.stride(0), lse_c.data_ptr<float>(),
        labels_c.data_ptr<int64_t>(), scale_c.data_ptr<float>(), loss_options(smoothing, z_loss, softcap),
        static_cast<T*>(grad.data_ptr()), grad.stride(0), stream));
  });
  return grad;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_cross_entropy(
    const Tensor& hidden_in, const Tensor& weight_in, const std::optional<Tensor>& bias_in, const Tensor& labels,
    const Tensor& scale, double smoothing, double z_loss, double softcap, bool need_grad_hidden,
    bool need_grad_weight, bool need_grad_bias, int64_t chunk_rows) {
  TORCH_CHECK(hidden_in.dim() == 2 && weight_in.dim() == 2 && hidden_in.size(1) == weight_in.size(1),
              "hidden [N, D] and weight [V, D] expected");
  check_float(hidden_in, "hidden");
  TORCH_CHECK(weight_in.scalar_type() == hidden_in.scalar_type(), "weight must have the dtype of hidden");
  const at::Device device = hidden_in.device();
  check_device(weight_in, "weight", device);
  const int64_t n = hidden_in.size(0), vocab = weight_in.size(0), dim = hidden_in.size(1);
  TORCH_CHECK(vocab > 0, "weight must have at least one row");
  check_rows(labels, scale, n, device);
  TORCH_CHECK(chunk_rows > 0, "chunk_rows must be positive");
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  if (has_bias) {
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == vocab && bias_in->scalar_type() == hidden_in.scalar_type(),
                "bias must be a [", vocab, "] tensor of the dtype of hidden");
    check_device(*bias_in, "bias", device);
  }
  TORCH_CHECK(!need_grad_bias || has_bias, "need_grad_bias needs a bias");
  // Row padding keeps every float32 logits row 32-byte aligned (and its T view 8-aligned).
  const int64_t ld = (vocab + 7) / 8 * 8;
  TORCH_CHECK(2 * ld <= INT_MAX && dim <= INT_MAX, "vocabulary or hidden size too large for cuBLAS int sizes");

  const c10::cuda::CUDAGuard guard(device);
  const Tensor hidden = hidden_in.contiguous(), weight = weight_in.contiguous();
  const Tensor bias = has_bias ? bias_in->contiguous() : Tensor();
  const Tensor labels_c = labels.contiguous(), scale_c = scale.contiguous();
  const auto f32 = hidden.options().dtype(at::kFloat);
  const LossOptions opts = loss_options(smoothing, z_loss, softcap);
  const bool need_grad = need_grad_hidden || need_grad_weight || need_grad_bias;

  // The one host synchronisation of this backend: the number of active rows sizes the
  // cuBLAS GEMMs. (The Triton backend, the sync-free default on GPUs, avoids it.)
  const Tensor active = scale_c.nonzero().squeeze(1);
  const int64_t n_active = active.size(0);

  Tensor loss = at::zeros({n}, f32);  // inactive rows stay 0; the kernel scatters active ones
  Tensor grad_hidden = need_grad_hidden ? at::zeros_like(hidden) : at::empty({0}, hidden.options());
  // Written with beta = 0 by the first chunk when there is one.
  Tensor grad_weight = need_grad_weight ? (n_active > 0 ? at::empty({vocab, dim}, f32) : at::zeros({vocab, dim}, f32))
                                        : Tensor();
  Tensor grad_bias = need_grad_bias ? at::zeros({vocab}, f32) : Tensor();

  const int64_t chunk = std::min(chunk_rows, std::max<int64_t>(n_active, 1));
  Tensor logits_buf = at::empty({chunk, ld}, f32);
  Tensor x_buf = at::empty({chunk, dim}, hidden.options());
  Tensor grad_hidden_buf = need_grad_hidden ? at::empty({chunk, dim}, hidden.options()) : Tensor();
  // The gradient rows in T, inside the float32 rows (see launch_fused_rows).
  const Tensor grad_view = logits_buf.view(hidden.scalar_type());
  const int64_t grad_ld = grad_view.stride(0);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  dispatch_element(hidden.scalar_type(), [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const cudaDataType_t type = cuda_data_type<T>();
    for (int64_t start = 0; start < n_active; start += chunk) {
      const int64_t rows = std::min(chunk, n_active - start);
      const Tensor idx = active.narrow(0, start, rows);
      Tensor x = x_buf.narrow(0, 0, rows);
      at::index_select_out(x, hidden, 0, idx);
      gemm(true, false, vocab, rows, dim, weight.data_ptr(), dim, x.data_ptr(), dim, type, 0.f,
           logits_buf.data_ptr(), ld, CUDA_R_32F);
      check_launch(cuda_ce::launch_fused_rows<T>(
          logits_buf.data_ptr<float>(), rows, vocab, ld, has_bias ? static_cast<const T*>(bias.data_ptr()) : nullptr,
          idx.data_ptr<int64_t>(), labels_c.data_ptr<int64_t>(), scale_c.data_ptr<float>(), opts,
          loss.data_ptr<float>(), need_grad, stream));
      if (need_grad_hidden) {
        Tensor dx = grad_hidden_buf.narrow(0, 0, rows);
        gemm(false, false, dim, rows, vocab, weight.data_ptr(), dim, grad_view.data_ptr(), grad_ld, type, 0.f,
             dx.data_ptr(), dim, type);
        grad_hidden.index_copy_(0, idx, dx);
      }
      if (need_grad_weight) {
        gemm(false, true, dim, vocab, rows, x.data_ptr(), dim, grad_view.data_ptr(), grad_ld, type,
             start == 0 ? 0.f : 1.f, grad_weight.data_ptr(), dim, CUDA_R_32F);
      }
      if (need_grad_bias) {
        grad_bias.add_(at::sum(grad_view.narrow(0, 0, rows).narrow(1, 0, vocab), {0}, false, at::kFloat));
      }
    }
  });
  const Tensor none = at::empty({0}, hidden.options());
  return {loss, grad_hidden, need_grad_weight ? grad_weight.to(weight.scalar_type()) : none,
          need_grad_bias ? grad_bias.to(bias.scalar_type()) : none};
}

}  // namespace
}  // namespace sparseft

TORCH_LIBRARY_IMPL(sparseft_C, CUDA, m) {
  m.impl("linear_cross_entropy", &sparseft::linear_cross_entropy);
  m.impl("cross_entropy_forward", &sparseft::cross_entropy_forward);
  m.impl("cross_entropy_backward", &sparseft::cross_entropy_backward);
}
