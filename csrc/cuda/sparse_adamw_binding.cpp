// Registers the CUDA implementation of sparseft_C::sparse_adamw_step (schema declared in
// csrc/cpu/sparse_adamw.cpp). Compiled only against a CUDA build of torch.

#include "sparse_adamw.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

namespace sparseft {
namespace {

using at::Tensor;

void check_entries(const Tensor& t, const char* name, at::ScalarType dtype, int64_t nnz, const Tensor& target) {
  TORCH_CHECK(t.scalar_type() == dtype && t.dim() == 1 && t.numel() == nnz && t.is_contiguous(),
              "sparse_adamw_step: ", name, " must be a contiguous ", dtype, " tensor of shape (", nnz, ")");
  TORCH_CHECK(t.device() == target.device(), "sparse_adamw_step: ", name, " is on ", t.device(), ", target on ",
              target.device());
}

cuda::WeightDtype weight_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::WeightDtype::kFloat32;
    case at::kHalf:
      return cuda::WeightDtype::kFloat16;
    case at::kBFloat16:
      return cuda::WeightDtype::kBFloat16;
    default:
      TORCH_CHECK(false, "sparse_adamw_step: target must be float32, float16 or bfloat16, got ", t);
  }
}

void sparse_adamw_step_cuda(const Tensor& target, const Tensor& indices, const Tensor& grad, const Tensor& exp_avg,
                            const Tensor& exp_avg_sq, const Tensor& step, const std::optional<Tensor>& values,
                            double lr, double beta1, double beta2, double eps, double weight_decay) {
  TORCH_CHECK(target.is_cuda() && target.is_contiguous(), "sparse_adamw_step: target must be a contiguous CUDA tensor");
  const int64_t nnz = indices.numel();
  const bool int64_indices = indices.scalar_type() == at::kLong;
  TORCH_CHECK(int64_indices || indices.scalar_type() == at::kInt,
              "sparse_adamw_step: indices must be int32 or int64, got ", indices.scalar_type());
  check_entries(indices, "indices", indices.scalar_type(), nnz, target);
  TORCH_CHECK(grad.scalar_type() == target.scalar_type() && grad.is_contiguous() && grad.device() == target.device(),
              "sparse_adamw_step: grad must be contiguous, on the target's device, with its dtype");
  const bool compact = grad.dim() == 1 && grad.numel() == nnz;
  TORCH_CHECK(compact || grad.sizes() == target.sizes(),
              "sparse_adamw_step: grad must have shape (nnz) or the target's shape");
  check_entries(exp_avg, "exp_avg", at::kFloat, nnz, target);
  check_entries(exp_avg_sq, "exp_avg_sq", at::kFloat, nnz, target);
  check_entries(step, "step", at::kInt, nnz, target);
  const bool has_values = values.has_value() && values->defined();
  if (has_values) check_entries(*values, "values", target.scalar_type(), nnz, target);

  const c10::cuda::CUDAGuard guard(target.device());
  const cudaError_t err = cuda::launch_sparse_adamw_step(
      weight_dtype(target.scalar_type()), target.data_ptr(), indices.data_ptr(), int64_indices, grad.data_ptr(),
      compact, exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(), step.data_ptr<int32_t>(),
      has_values ? values->data_ptr() : nullptr, nnz, lr, beta1, beta2, eps, weight_decay,
      c10::cuda::getCurrentCUDAStream(target.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "sparse_adamw_step: CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace sparseft

TORCH_LIBRARY_IMPL(sparseft_C, CUDA, m) { m.impl("sparse_adamw_step", &sparseft::sparse_adamw_step_cuda); }
