// The fused per-tensor model merge on CUDA. Contract: sparseft/ops/merge.py; the arithmetic is
// the CPU kernel's (csrc/cpu/merge.cpp) op for op, without FMA contraction (explicit _rn
// intrinsics where nvcc would contract), so the two agree bit for bit.
//
// A grid-stride loop over groups of four elements (one float4 / 8-byte load per tensor where
// every pointer is 16-byte aligned, element by element otherwise), 64-bit indices. A thread
// reads its group of base once and loops over the T tasks (T a runtime value, the tuned dtypes
// a uniform switch per task):
//   pass 1 (elect_sign only): S = sum_t d_t;
//   pass 2: M = sum_t m_t d_t and D = sum_t w_t m_t, then the normalisation;
//   pass 3 (consensus_k > 0 only): the votes c_t and the gate.
// Later passes re-read the tuned group (from L1/L2: DRAM traffic stays one read of every input
// and one write of out). The DARE keep decisions of the first 64 tasks are hashed once and kept
// as bits. The task table is a __grid_constant__ kernel parameter for T <= 16, else a device
// array.

#include "convert.cuh"
#include "merge.h"

#include <algorithm>
#include <cstdint>

namespace sparseft {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;
constexpr int kCachedTasks = 64;  // DARE keep bits kept between passes

struct InlineTasks {
  MergeTask task[kMergeInlineTasks];
};

struct Params {
  const void* base;
  void* out;
  const MergeTask* tasks;  // device array when num_tasks > kMergeInlineTasks, else null
  int64_t numel;
  int32_t num_tasks;
  MergeOptions o;
};

__device__ __forceinline__ uint64_t dare_hash(uint64_t seed, uint64_t i) {
  uint64_t x = seed ^ (i * 0x9E3779B97F4A7C15ull);
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

__device__ __forceinline__ float bf16_bits(uint32_t h) { return __uint_as_float((h & 0xFFFFu) << 16); }
__device__ __forceinline__ float half_bits(uint32_t h) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(h & 0xFFFFu)));
}

// Elements [i, i + kVec) of a tensor of dtype kDtype as float32; kVec 4 needs 4-element alignment.
template <int kDtype, int kVec>
__device__ __forceinline__ void load(const void* ptr, int64_t i, float (&x)[kVec]) {
  if (kDtype == kMergeFloat32) {
    const float* p = static_cast<const float*>(ptr) + i;
    if (kVec == 4) {
      const float4 q = *reinterpret_cast<const float4*>(p);
      x[0] = q.x, x[1] = q.y, x[2] = q.z, x[3] = q.w;
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) x[j] = p[j];
    }
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(ptr) + i;
    uint32_t h[kVec];
    if (kVec == 4) {
      const uint2 q = *reinterpret_cast<const uint2*>(p);
      h[0] = q.x, h[1] = q.x >> 16, h[2] = q.y, h[3] = q.y >> 16;
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) h[j] = p[j];
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) x[j] = kDtype == kMergeBFloat16 ? bf16_bits(h[j]) : half_bits(h[j]);
  }
}

template <int kVec>
__device__ __forceinline__ void load_tuned(const MergeTask& task, int64_t i, float (&x)[kVec]) {
  switch (task.dtype) {  // the same for every thread: no divergence
    case kMergeBFloat16: load<kMergeBFloat16, kVec>(task.ptr, i, x); break;
    case kMergeFloat16: load<kMergeFloat16, kVec>(task.ptr, i, x); break;
    default: load<kMergeFloat32, kVec>(task.ptr, i, x); break;
  }
}

template <int kDtype>
__device__ __forceinline__ uint32_t to_bits16(float v) {
  if (kDtype == kMergeBFloat16) return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  return __half_as_ushort(__float2half_rn(v));
}

template <int kDtype, int kVec>
__device__ __forceinline__ void store(void* ptr, int64_t i, const float (&y)[kVec]) {
  if (kDtype == kMergeFloat32) {
    float* p = static_cast<float*>(ptr) + i;
    if (kVec == 4) {
      *reinterpret_cast<float4*>(p) = make_float4(y[0], y[1], y[2], y[3]);
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) p[j] = y[j];
    }
  } else {
    uint16_t* p = static_cast<uint16_t*>(ptr) + i;
    if (kVec == 4) {
      *reinterpret_cast<uint2*>(p) = make_uint2(to_bits16<kDtype>(y[0]) | (to_bits16<kDtype>(y[1]) << 16),
                                                to_bits16<kDtype>(y[2]) | (to_bits16<kDtype>(y[3]) << 16));
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) p[j] = static_cast<uint16_t>(to_bits16<kDtype>(y[j]));
    }
  }
}

// d_t of task t for the group at i; the DARE keep bits are hashed (and kept, t < 64) when hash.
template <int kVec>
__device__ __forceinline__ void task_delta(const MergeTask& task, int t, const MergeOptions& o, int64_t i,
                                           const float (&b)[kVec], uint64_t (&bits)[kVec], bool hash,
                                           float (&d)[kVec]) {
  float x[kVec];
  load_tuned<kVec>(task, i, x);
  const uint64_t first = static_cast<uint64_t>(o.index_offset) + static_cast<uint64_t>(i);
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const float tau = x[j] - b[j];
    bool keep = !o.thresholds || fabsf(tau) >= task.threshold;
    if (o.dare) {
      bool kept;
      if (hash || t >= kCachedTasks) {
        kept = (dare_hash(task.seed, first + j) >> 40) < static_cast<uint64_t>(task.cutoff);
        if (hash && t < kCachedTasks) bits[j] |= static_cast<uint64_t>(kept) << t;
      } else {
        kept = (bits[j] >> t) & 1u;
      }
      keep = keep && kept;
    }
    float v = __fmul_rn(task.weight, tau);
    if (task.keep_prob != 1.f) v = __fdiv_rn(v, task.keep_prob);
    d[j] = keep ? v : 0.f;
  }
}

template <int kBase, int kOut, int kVec>
__device__ __forceinline__ void merge_group(const Params& a, const MergeTask* tasks, int64_t i) {
  const MergeOptions& o = a.o;
  const int T = a.num_tasks;
  float b[kVec], d[kVec], m[kVec], w[kVec];
  uint64_t bits[kVec];
  bool positive[kVec];
  load<kBase, kVec>(a.base, i, b);
#pragma unroll
  for (int j = 0; j < kVec; ++j) bits[j] = 0, m[j] = 0.f, w[j] = 0.f, positive[j] = true;

  if (o.elect_sign) {  // pass 1: the elected sign
    float s[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) s[j] = 0.f;
    for (int t = 0; t < T; ++t) {
      task_delta<kVec>(tasks[t], t, o, i, b, bits, true, d);
#pragma unroll
      for (int j = 0; j < kVec; ++j) s[j] += d[j];
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) positive[j] = s[j] >= 0.f;
  }

  for (int t = 0; t < T; ++t) {  // pass 2: the (sign-masked) sum and its weight
    const MergeTask& task = tasks[t];
    task_delta<kVec>(task, t, o, i, b, bits, !o.elect_sign, d);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const bool agree = !o.elect_sign || (positive[j] ? d[j] > 0.f : d[j] < 0.f);
      m[j] += agree ? d[j] : 0.f;
      w[j] += agree ? task.weight : 0.f;
    }
  }
  if (o.normalize) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) m[j] = __fdiv_rn(m[j], fabsf(w[j]) < 1e-8f ? 1.f : w[j]);
  }

  if (o.consensus_k > 0) {  // pass 3: the tasks that agree with the merged delta
    int votes[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) votes[j] = 0;
    for (int t = 0; t < T; ++t) {
      task_delta<kVec>(tasks[t], t, o, i, b, bits, false, d);
#pragma unroll
      for (int j = 0; j < kVec; ++j) votes[j] += fabsf(d[j]) >= __fmul_rn(o.consensus_lam, fabsf(m[j] - d[j]));
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) m[j] = votes[j] >= o.consensus_k ? m[j] : 0.f;
  }

#pragma unroll
  for (int j = 0; j < kVec; ++j) m[j] = __fadd_rn(b[j], __fmul_rn(o.scale, m[j]));
  store<kOut, kVec>(a.out, i, m);
}

// kVector: groups of four over [0, numel / 4 * 4), the rest one by one.
template <int kBase, int kOut, bool kVector>
__global__ void __launch_bounds__(kThreads) merge_tensor_kernel(const __grid_constant__ InlineTasks inline_tasks,
                                                                const Params a) {
  const MergeTask* tasks = a.tasks != nullptr ? a.tasks : inline_tasks.task;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t tail = 0;
  if (kVector) {
    const int64_t quads = a.numel / 4;
    for (int64_t q = first; q < quads; q += stride) merge_group<kBase, kOut, 4>(a, tasks, q * 4);
    tail = quads * 4;
  }
  for (int64_t i = tail + first; i < a.numel; i += stride) merge_group<kBase, kOut, 1>(a, tasks, i);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// SPARSEFT_MERGE_HOST_TEST: tests/test_merge_kernels.py compiles the code above as host C++ (with
// stand-in CUDA headers) and runs the kernel's threads one by one, without a GPU; the launches
// below need nvcc.
#ifndef SPARSEFT_MERGE_HOST_TEST

template <int kBase, int kOut>
void launch_typed(const InlineTasks& inline_tasks, const Params& a, bool vector, int blocks, cudaStream_t stream) {
  if (vector) {
    merge_tensor_kernel<kBase, kOut, true><<<blocks, kThreads, 0, stream>>>(inline_tasks, a);
  } else {
    merge_tensor_kernel<kBase, kOut, false><<<blocks, kThreads, 0, stream>>>(inline_tasks, a);
  }
}

template <int kBase>
void launch_out(int32_t out_dtype, const InlineTasks& inline_tasks, const Params& a, bool vector, int blocks,
                cudaStream_t stream) {
  switch (out_dtype) {
    case kMergeBFloat16: launch_typed<kBase, kMergeBFloat16>(inline_tasks, a, vector, blocks, stream); break;
    case kMergeFloat16: launch_typed<kBase, kMergeFloat16>(inline_tasks, a, vector, blocks, stream); break;
    default: launch_typed<kBase, kMergeFloat32>(inline_tasks, a, vector, blocks, stream); break;
  }
}

#endif  // SPARSEFT_MERGE_HOST_TEST

}  // namespace

#ifndef SPARSEFT_MERGE_HOST_TEST
cudaError_t launch_merge_tensor(const void* base, int32_t base_dtype, const MergeTask* tasks, int64_t num_tasks,
                                void* out, int32_t out_dtype, int64_t numel, const MergeOptions& options,
                                cudaStream_t stream) {
  if (numel == 0 || num_tasks == 0) return cudaSuccess;
  if (num_tasks > INT32_MAX) return cudaErrorInvalidValue;
  InlineTasks inline_tasks{};
  Params a{base, out, nullptr, numel, static_cast<int32_t>(num_tasks), options};
  MergeTask* device_tasks = nullptr;
  if (num_tasks <= kMergeInlineTasks) {
    std::copy(tasks, tasks + num_tasks, inline_tasks.task);
  } else {  // stream-ordered: allocated, filled, used and freed in the stream's order
    const size_t bytes = sizeof(MergeTask) * static_cast<size_t>(num_tasks);
    cudaError_t err = cudaMallocAsync(reinterpret_cast<void**>(&device_tasks), bytes, stream);
    if (err != cudaSuccess) return err;
    err = cudaMemcpyAsync(device_tasks, tasks, bytes, cudaMemcpyHostToDevice, stream);
    if (err != cudaSuccess) {
      cudaFreeAsync(device_tasks, stream);
      return err;
    }
    a.tasks = device_tasks;
  }

  bool vector = aligned16(base) && aligned16(out);
  for (int64_t t = 0; t < num_tasks; ++t) vector = vector && aligned16(tasks[t].ptr);
  const int64_t work = vector ? std::max<int64_t>(numel / 4, 1) : numel;
  const int blocks = static_cast<int>(std::min<int64_t>((work + kThreads - 1) / kThreads, kMaxBlocks));
  switch (base_dtype) {
    case kMergeBFloat16: launch_out<kMergeBFloat16>(out_dtype, inline_tasks, a, vector, blocks, stream); break;
    case kMergeFloat16: launch_out<kMergeFloat16>(out_dtype, inline_tasks, a, vector, blocks, stream); break;
    default: launch_out<kMergeFloat32>(out_dtype, inline_tasks, a, vector, blocks, stream); break;
  }
  const cudaError_t launched = cudaGetLastError();
  if (device_tasks != nullptr) {
    const cudaError_t freed = cudaFreeAsync(device_tasks, stream);
    if (launched == cudaSuccess) return freed;
  }
  return launched;
}
#endif  // SPARSEFT_MERGE_HOST_TEST

}  // namespace cuda
}  // namespace sparseft
