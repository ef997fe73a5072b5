// CUDA implementation of sparseft_C::sampled_weight_grad (schema declared in
// csrc/cpu/sampled_grad.cpp): argument checks, the current stream and dtype dispatch onto the
// tile kernel of sampled_grad.cu.
#include "sampled_grad.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace sparseft {
namespace {

using at::Tensor;

template <typename T>
void launch_for_index(const Tensor& dy, const Tensor& x, const Tensor& idx, Tensor& g, cudaStream_t stream) {
  const T* dy_ptr = reinterpret_cast<const T*>(dy.data_ptr());
  const T* x_ptr = reinterpret_cast<const T*>(x.data_ptr());
  cudaError_t err;
  if (idx.scalar_type() == at::kInt)
    err = cuda_sampled_grad::launch_sampled_weight_grad<T, int32_t>(
        dy_ptr, dy.stride(0), x_ptr, x.stride(0), dy.size(0), dy.size(1), x.size(1), idx.data_ptr<int32_t>(),
        idx.numel(), g.data_ptr<float>(), stream);
  else
    err = cuda_sampled_grad::launch_sampled_weight_grad<T, int64_t>(
        dy_ptr, dy.stride(0), x_ptr, x.stride(0), dy.size(0), dy.size(1), x.size(1), idx.data_ptr<int64_t>(),
        idx.numel(), g.data_ptr<float>(), stream);
  TORCH_CHECK(err == cudaSuccess, "sparseft sampled_weight_grad kernel failed: ", cudaGetErrorString(err));
}

Tensor sampled_weight_grad_cuda(const Tensor& grad_output, const Tensor& input, const Tensor& indices) {
  TORCH_CHECK(grad_output.dim() == 2 && input.dim() == 2, "sampled_weight_grad: grad_output and input must be 2-D");
  TORCH_CHECK(grad_output.size(0) == input.size(0), "sampled_weight_grad: grad_output and input need the same rows");
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), "sampled_weight_grad: dtype mismatch");
  TORCH_CHECK(indices.dim() == 1 && (indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong),
              "sampled_weight_grad: indices must be 1-D int32 or int64");
  TORCH_CHECK(input.device() == grad_output.device() && indices.device() == grad_output.device(),
              "sampled_weight_grad: all tensors must be on ", grad_output.device());
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const Tensor dy = grad_output.stride(1) == 1 ? grad_output : grad_output.contiguous();
  const Tensor x = input.stride(1) == 1 ? input : input.contiguous();
  const Tensor idx = indices.contiguous();
  Tensor g = at::empty({idx.numel()}, grad_output.options().dtype(at::kFloat));
  if (idx.numel() == 0) return g;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (dy.scalar_type()) {
    case at::kFloat:
      launch_for_index<float>(dy, x, idx, g, stream);
      break;
    case at::kBFloat16:
      launch_for_index<__nv_bfloat16>(dy, x, idx, g, stream);
      break;
    case at::kHalf:
      launch_for_index<__half>(dy, x, idx, g, stream);
      break;
    default:
      TORCH_CHECK(false, "sampled_weight_grad: expected float32, bfloat16 or float16, got ", dy.scalar_type());
  }
  return g;
}

}  // namespace
}  // namespace sparseft

TORCH_LIBRARY_IMPL(sparseft_C, CUDA, m) { m.impl("sampled_weight_grad", &sparseft::sampled_weight_grad_cuda); }
