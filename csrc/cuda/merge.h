// The fused per-tensor model merge on CUDA: plain C++ launcher (no torch headers), wrapped for
// torch by merge_binding.cpp. Contract: sparseft/ops/merge.py (and csrc/cpu/merge.cpp).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace sparseft {
namespace cuda {

// Storage dtypes of the merge's tensors.
enum MergeDtype : int32_t { kMergeFloat32 = 0, kMergeBFloat16 = 1, kMergeFloat16 = 2 };

// One tuned tensor and its per-task constants (absent options: threshold unused, keep_prob 1,
// seed and cutoff unused).
struct MergeTask {
  const void* ptr;   // numel elements of dtype
  uint64_t seed;     // DARE: the task's seed (an int64 < 2**63, as its uint64 bits)
  int64_t cutoff;    // DARE: keep element i iff (hash(seed, i) >> 40) < cutoff, cutoff <= 2**24
  float weight;      // w_t
  float threshold;   // theta_t
  float keep_prob;   // p_t (the delta is divided by it unless it is 1)
  int32_t dtype;     // MergeDtype
};

struct MergeOptions {
  bool thresholds;      // k_t includes [|tau_t| >= theta_t]
  bool dare;            // k_t includes keep_t(i)
  bool elect_sign;      // TIES sign election
  bool normalize;       // M / sum of the (agreeing) weights
  float consensus_lam;
  int64_t consensus_k;  // 0: no consensus gate
  float scale;
  int64_t index_offset;  // element i of these tensors is flat index index_offset + i of the DARE hash
};

// Tasks held in the kernel's parameters (no copy to the device) up to this many; more go to a
// device array, allocated and freed on the stream.
constexpr int64_t kMergeInlineTasks = 16;

// out[i] = round(b + scale * M) over numel elements, for num_tasks >= 1 tuned tensors described
// by tasks (a host array); base and out contiguous, out may be base. Returns the launch status.
cudaError_t launch_merge_tensor(const void* base, int32_t base_dtype, const MergeTask* tasks, int64_t num_tasks,
                                void* out, int32_t out_dtype, int64_t numel, const MergeOptions& options,
                                cudaStream_t stream);

}  // namespace cuda
}  // namespace sparseft
