// Registers the CUDA implementation of sparseft_C::abs_diff_histogram (schema declared in
// csrc/cpu/select.cpp). Compiled only against a CUDA build of torch.

#include "select.h"
#include "../select_args.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

namespace sparseft {
namespace {

using at::Tensor;

int32_t select_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::kSelectFloat32;
    case at::kBFloat16: return cuda::kSelectBFloat16;
    case at::kHalf: return cuda::kSelectFloat16;
    default:
      TORCH_CHECK(false, "abs_diff_histogram: ", name, " must be float32, bfloat16 or float16, got ",
                  t.scalar_type());
  }
  return cuda::kSelectFloat32;
}

void abs_diff_histogram_cuda(const Tensor& a, const Tensor& b, int64_t prefix, int64_t high_shift, int64_t shift,
                             int64_t bits, const Tensor& counts) {
  TORCH_CHECK(a.is_cuda() && a.is_contiguous(), "abs_diff_histogram: a must be a contiguous CUDA tensor");
  TORCH_CHECK(b.device() == a.device() && b.is_contiguous() && b.numel() == a.numel(),
              "abs_diff_histogram: b must be a contiguous tensor of a's ", a.numel(), " elements on ", a.device());
  check_digit_args(prefix, high_shift, shift, bits);
  TORCH_CHECK(counts.device() == a.device() && counts.is_contiguous() && counts.scalar_type() == at::kLong &&
                  counts.numel() == (int64_t{1} << bits),
              "abs_diff_histogram: counts must be a contiguous int64 tensor of 2**bits elements on ", a.device());
  const cuda::SelectDigits digits{static_cast<uint32_t>(prefix), static_cast<int32_t>(high_shift),
                                  static_cast<int32_t>(shift), static_cast<int32_t>(bits)};
  const c10::cuda::CUDAGuard guard(a.device());
  const cudaError_t err = cuda::launch_abs_diff_histogram(
      a.data_ptr(), select_dtype(a, "a"), b.data_ptr(), select_dtype(b, "b"), a.numel(), digits,
      counts.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream(a.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "abs_diff_histogram: CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace sparseft

TORCH_LIBRARY_IMPL(sparseft_C, CUDA, m) { m.impl("abs_diff_histogram", &sparseft::abs_diff_histogram_cuda); }
