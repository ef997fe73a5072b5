// Registers the CUDA implementation of sparseft_C::merge_tensor (schema declared in
// csrc/cpu/merge.cpp). Compiled only against a CUDA build of torch.

#include "merge.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

namespace sparseft {
namespace {

using at::Tensor;

int32_t merge_dtype(const Tensor& t, const char* name, int64_t index = -1) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::kMergeFloat32;
    case at::kBFloat16: return cuda::kMergeBFloat16;
    case at::kHalf: return cuda::kMergeFloat16;
    default:
      TORCH_CHECK(false, "merge_tensor: ", name, index >= 0 ? "[" + std::to_string(index) + "]" : std::string(),
                  " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return cuda::kMergeFloat32;
}

void check_tensor(const Tensor& t, const char* name, const Tensor& base, int64_t index = -1) {
  const std::string what = std::string(name) + (index >= 0 ? "[" + std::to_string(index) + "]" : "");
  TORCH_CHECK(t.is_cuda() && t.device() == base.device(), "merge_tensor: ", what,
              " must be a CUDA tensor on base's device (", base.device(), "), got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "merge_tensor: ", what, " must be contiguous");
  TORCH_CHECK(t.numel() == base.numel(), "merge_tensor: ", what, " must have base's ", base.numel(),
              " elements, got ", t.numel());
}

void merge_tensor_cuda(const Tensor& base, at::TensorList tuned, at::ArrayRef<double> weights,
                       at::ArrayRef<double> thresholds, at::ArrayRef<double> keep_probs, at::IntArrayRef cutoffs,
                       at::IntArrayRef seeds, bool elect_sign, bool normalize, double consensus_lam,
                       int64_t consensus_k, double scale, int64_t index_offset, const Tensor& out) {
  const int64_t T = static_cast<int64_t>(tuned.size());
  TORCH_CHECK(T >= 1, "merge_tensor: tuned must hold at least one tensor");
  TORCH_CHECK(base.is_cuda(), "merge_tensor: base must be a CUDA tensor, got ", base.device());
  check_tensor(base, "base", base);
  check_tensor(out, "out", base);
  for (int64_t t = 0; t < T; ++t) check_tensor(tuned[t], "tuned", base, t);
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == T, "merge_tensor: weights must have ", T, " entries, got ",
              weights.size());
  TORCH_CHECK(thresholds.empty() || static_cast<int64_t>(thresholds.size()) == T,
              "merge_tensor: thresholds must be empty or have ", T, " entries, got ", thresholds.size());
  TORCH_CHECK(keep_probs.empty() || static_cast<int64_t>(keep_probs.size()) == T,
              "merge_tensor: keep_probs must be empty or have ", T, " entries, got ", keep_probs.size());
  const bool dare = !cutoffs.empty();
  TORCH_CHECK(!dare || (static_cast<int64_t>(cutoffs.size()) == T && static_cast<int64_t>(seeds.size()) == T),
              "merge_tensor: cutoffs and seeds must both have ", T, " entries when cutoffs is not empty");
  TORCH_CHECK(consensus_k >= 0, "merge_tensor: consensus_k must be >= 0 (0: no consensus)");
  TORCH_CHECK(index_offset >= 0, "merge_tensor: index_offset must be >= 0, got ", index_offset);

  std::vector<cuda::MergeTask> tasks(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) {
    cuda::MergeTask& task = tasks[static_cast<size_t>(t)];
    task.ptr = tuned[t].data_ptr();
    task.dtype = merge_dtype(tuned[t], "tuned", t);
    task.weight = static_cast<float>(weights[t]);
    task.threshold = thresholds.empty() ? 0.f : static_cast<float>(thresholds[t]);
    task.keep_prob = keep_probs.empty() ? 1.f : static_cast<float>(keep_probs[t]);
    task.seed = 0;
    task.cutoff = 0;
    if (dare) {
      TORCH_CHECK(cutoffs[t] >= 0 && cutoffs[t] <= (int64_t{1} << 24), "merge_tensor: cutoffs[", t,
                  "] must be in [0, 2**24], got ", cutoffs[t]);
      task.seed = static_cast<uint64_t>(seeds[t]);  // the int64's bits, as on the CPU
      task.cutoff = cutoffs[t];
    }
  }
  const cuda::MergeOptions options{!thresholds.empty(), dare, elect_sign, normalize,
                                   static_cast<float>(consensus_lam), consensus_k, static_cast<float>(scale),
                                   index_offset};
  const int32_t base_dtype = merge_dtype(base, "base");
  const int32_t out_dtype = merge_dtype(out, "out");
  const c10::cuda::CUDAGuard guard(base.device());
  const cudaError_t err = cuda::launch_merge_tensor(
      base.data_ptr(), base_dtype, tasks.data(), T, out.data_ptr(), out_dtype, base.numel(), options,
      c10::cuda::getCurrentCUDAStream(base.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "merge_tensor: CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace sparseft

TORCH_LIBRARY_IMPL(sparseft_C, CUDA, m) { m.impl("merge_tensor", &sparseft::merge_tensor_cuda); }
