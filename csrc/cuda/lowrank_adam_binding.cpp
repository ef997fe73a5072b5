// Registers the CUDA implementation of sparseft_C::lowrank_adam_direction (schema declared in
// csrc/cpu/lowrank_adam.cpp). Compiled only against a CUDA build of torch.

#include "lowrank_adam.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace sparseft {
namespace {

using at::Tensor;

void check_stream(const Tensor& t, const char* name, const Tensor& grad) {
  TORCH_CHECK(t.is_cuda() && t.device() == grad.device(), "lowrank_adam_direction: ", name,
              " must be a CUDA tensor on grad's device (", grad.device(), "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "lowrank_adam_direction: ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "lowrank_adam_direction: ", name, " must be contiguous");
  TORCH_CHECK(t.numel() == grad.numel(), "lowrank_adam_direction: ", name, " must have grad's ", grad.numel(),
              " elements, got ", t.numel());
}

void lowrank_adam_direction_cuda(const Tensor& grad, const Tensor& exp_avg, const Tensor& exp_avg_sq,
                                 const Tensor& out, double beta1, double beta2, double c1, double c2, double eps) {
  check_stream(grad, "grad", grad);
  check_stream(exp_avg, "exp_avg", grad);
  check_stream(exp_avg_sq, "exp_avg_sq", grad);
  check_stream(out, "out", grad);
  const c10::cuda::CUDAGuard guard(grad.device());
  const cudaError_t err = cuda::launch_lowrank_adam_direction(
      grad.data_ptr<float>(), exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(), out.data_ptr<float>(),
      grad.numel(), beta1, beta2, c1, c2, eps, c10::cuda::getCurrentCUDAStream(grad.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "lowrank_adam_direction: CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace sparseft

TORCH_LIBRARY_IMPL(sparseft_C, CUDA, m) { m.impl("lowrank_adam_direction", &sparseft::lowrank_adam_direction_cuda); }
