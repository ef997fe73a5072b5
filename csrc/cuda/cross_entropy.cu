// Row kernels of the masked-loss cross-entropy (contract: sparseft/ops/_ce_torch.py).
//
// A group of TPR threads owns one row: a warp for small vocabularies (eight rows per
// block), a whole block of 256 or 1024 threads for large ones, so that even the linear
// path's chunk of ~100 rows keeps every SM busy. The forward reads a row once, keeping an
// online max / sum-exp / sum in float32 per thread with 16-byte loads, and merges them
// across the group. Inactive rows (scale == 0) write zeros and leave.

#include "cross_entropy.h"
#include "convert.cuh"

#include <cstdint>
#include <type_traits>

namespace sparseft {
namespace cuda_ce {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// K consecutive elements moved as one access (K * sizeof(T) bytes, aligned to that).
template <typename T, int K>
struct alignas(sizeof(T) * K) Pack {
  T v[K];
};

template <int K, typename T>
__device__ __forceinline__ void load_floats(const T* p, float (&x)[K]) {
  const Pack<T, K> pack = *reinterpret_cast<const Pack<T, K>*>(p);
#pragma unroll
  for (int i = 0; i < K; ++i) x[i] = to_float(pack.v[i]);
}

template <int K, typename T>
__device__ __forceinline__ void store_floats(T* p, const float (&x)[K]) {
  Pack<T, K> pack;
#pragma unroll
  for (int i = 0; i < K; ++i) pack.v[i] = from_float<T>(x[i]);
  *reinterpret_cast<Pack<T, K>*>(p) = pack;
}

template <typename T>
constexpr int kVecWidth = 16 / sizeof(T);

// Elements of a row of n that precede its first 16-byte boundary.
template <typename T>
__device__ __forceinline__ int64_t aligned_head(const T* p, int64_t n) {
  const unsigned misalign = static_cast<unsigned>(reinterpret_cast<uintptr_t>(p) % 16);
  const int64_t head = misalign == 0 ? 0 : (16 - misalign) / sizeof(T);
  return head < n ? head : n;
}

// Calls fn(j, integral_constant<K>) so that the group's lanes cover elements [0, n) of a row:
// `head` single elements, then aligned vectors of W, then the single-element tail.
template <int TPR, int W, typename Fn>
__device__ __forceinline__ void visit_row(int64_t n, int64_t head, int lane, Fn&& fn) {
  for (int64_t j = lane; j < head; j += TPR) fn(j, std::integral_constant<int, 1>());
  const int64_t body_end = head + (n - head) / W * W;
  for (int64_t j = head + int64_t(lane) * W; j < body_end; j += int64_t(TPR) * W)
    fn(j, std::integral_constant<int, W>());
  for (int64_t j = body_end + lane; j < n; j += TPR) fn(j, std::integral_constant<int, 1>());
}

struct Softcap {
  float cap, inv_cap;  // cap == 0: identity
  __device__ __forceinline__ float operator()(float x) const { return cap == 0.f ? x : cap * tanhf(x * inv_cap); }
  // d cap(z) / dz expressed through the capped value c: 1 - (c / cap)^2.
  __device__ __forceinline__ float slope(float capped) const {
    const float t = capped * inv_cap;
    return cap == 0.f ? 1.f : 1.f - t * t;
  }
};

__host__ __device__ inline Softcap make_softcap(float cap) { return {cap, cap == 0.f ? 0.f : 1.f / cap}; }

// Online statistics of a row: running max, sum of exp(x - max), sum of x.
struct Stats {
  float m, s, sx;
};

// exp shift that keeps an all -inf partial from producing (-inf) - (-inf).
__device__ __forceinline__ float finite_shift(float m) { return m == neg_inf() ? 0.f : m; }

__device__ __forceinline__ Stats merge(const Stats& a, const Stats& b) {
  const float m = fmaxf(a.m, b.m);
  const float shift = finite_shift(m);
  return {m, a.s * expf(a.m - shift) + b.s * expf(b.m - shift), a.sx + b.sx};
}

template <int K>
__device__ __forceinline__ void accumulate(Stats& st, const float (&x)[K]) {
  float m = x[0];
#pragma unroll
  for (int i = 1; i < K; ++i) m = fmaxf(m, x[i]);
  if (m > st.m) {  // rescale once per vector, not per element
    st.s *= expf(st.m - m);
    st.m = m;
  }
  const float shift = finite_shift(st.m);
#pragma unroll
  for (int i = 0; i < K; ++i) {
    st.s += expf(x[i] - shift);
    st.sx += x[i];
  }
}

__device__ __forceinline__ Stats warp_reduce(Stats st) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const Stats other{__shfl_xor_sync(kFullMask, st.m, offset), __shfl_xor_sync(kFullMask, st.s, offset),
                      __shfl_xor_sync(kFullMask, st.sx, offset)};
    st = merge(st, other);
  }
  return st;
}

// Threads per block for TPR threads per row: groups wider than a warp own the block.
template <int TPR>
constexpr int kBlockThreads = TPR > 32 ? TPR : 256;

// The row's merged statistics, in every thread of the group.
template <int TPR>
__device__ __forceinline__ Stats reduce_row(Stats st, Stats* scratch) {
  st = warp_reduce(st);
  if constexpr (TPR > 32) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) scratch[warp] = st;
    __syncthreads();
    if (warp == 0) {
      st = lane < TPR / 32 ? scratch[lane] : Stats{neg_inf(), 0.f, 0.f};
      st = warp_reduce(st);
      if (lane == 0) scratch[0] = st;
    }
    __syncthreads();
    st = scratch[0];
  }
  return st;
}

// Makes the group's earlier global accesses visible to the whole group.
template <int TPR>
__device__ __forceinline__ void group_barrier() {
  if constexpr (TPR > 32) {
    __syncthreads();
  } else {
    __syncwarp();
  }
}

__device__ __forceinline__ float row_loss(float lse, float target, float sum_x, int64_t vocab, const LossOptions& o) {
  return lse - (1.f - o.smoothing) * target - o.smoothing * sum_x / float(vocab) + o.z_loss * lse * lse;
}

// Coefficients of g_j = a·exp(x_j - lse) - b - [j == label]·c, times the softcap slope.
struct GradCoefficients {
  float a, b, c;
};

__device__ __forceinline__ GradCoefficients grad_coefficients(float scale, float lse, int64_t vocab,
                                                              const LossOptions& o) {
  return {scale * (1.f + 2.f * o.z_loss * lse), scale * o.smoothing / float(vocab), scale * (1.f - o.smoothing)};
}

__device__ __forceinline__ float grad_at(float capped, int64_t j, int64_t label, float lse,
                                         const GradCoefficients& k, const Softcap& cap) {
  float g = k.a * expf(capped - lse) - k.b;
  if (j == label) g -= k.c;
  return g * cap.slope(capped);
}

template <typename T, int TPR>
__global__ void __launch_bounds__(kBlockThreads<TPR>)
    row_forward_kernel(const T* __restrict__ logits, int64_t rows, int64_t vocab, int64_t row_stride,
                       const int64_t* __restrict__ labels, const float* __restrict__ scale, LossOptions o,
                       float* __restrict__ loss, float* __restrict__ lse) {
  __shared__ Stats scratch[32];
  constexpr int kRowsPerBlock = kBlockThreads<TPR> / TPR;
  const int lane = threadIdx.x % TPR;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / TPR;
  if (row >= rows) return;  // uniform over the group
  if (scale[row] == 0.f) {
    if (lane == 0) loss[row] = lse[row] = 0.f;
    return;
  }
  const T* x = logits + row * row_stride;
  const Softcap cap = make_softcap(o.softcap);
  Stats st{neg_inf(), 0.f, 0.f};
  visit_row<TPR, kVecWidth<T>>(vocab, aligned_head(x, vocab), lane, [&](int64_t j, auto width) {
    constexpr int K = decltype(width)::value;
    float v[K];
    load_floats<K>(x + j, v);
#pragma unroll
    for (int i = 0; i < K; ++i) v[i] = cap(v[i]);
    accumulate<K>(st, v);
  });
  st = reduce_row<TPR>(st, scratch);
  if (lane == 0) {
    const float row_lse = st.m + logf(st.s);
    const int64_t label = labels[row];
    // A label outside [0, V) (unchecked input) poisons the loss instead of reading out of bounds.
    loss[row] = (label < 0 || label >= vocab) ? __int_as_float(0x7fc00000)
                                              : row_loss(row_lse, cap(to_float(x[label])), st.sx, vocab, o);
    lse[row] = row_lse;
  }
}

template <typename T, int TPR>
__global__ void __launch_bounds__(kBlockThreads<TPR>)
    row_gradient_kernel(const T* logits, int64_t rows, int64_t vocab, int64_t row_stride,
                        const float* __restrict__ lse, const int64_t* __restrict__ labels,
                        const float* __restrict__ scale, LossOptions o, T* grad, int64_t grad_stride) {
  constexpr int kRowsPerBlock = kBlockThreads<TPR> / TPR;
  constexpr int W = kVecWidth<T>;
  const int lane = threadIdx.x % TPR;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / TPR;
  if (row >= rows) return;
  const T* x = logits + row * row_stride;
  T* g = grad + row * grad_stride;
  // Vectorise only when input and output rows sit at the same offset from a 16-byte boundary.
  const bool same_phase = reinterpret_cast<uintptr_t>(x) % 16 == reinterpret_cast<uintptr_t>(g) % 16;
  const int64_t head = same_phase ? aligned_head(x, vocab) : vocab;
  const float s = scale[row];
  if (s == 0.f) {
    visit_row<TPR, W>(vocab, head, lane, [&](int64_t j, auto width) {
      constexpr int K = decltype(width)::value;
      float zeros[K] = {};
      store_floats<K>(g + j, zeros);
    });
    return;
  }
  const float row_lse = lse[row];
  const int64_t label = labels[row];
  const Softcap cap = make_softcap(o.softcap);
  const GradCoefficients k = grad_coefficients(s, row_lse, vocab, o);
  visit_row<TPR, W>(vocab, head, lane, [&](int64_t j, auto width) {
    constexpr int K = decltype(width)::value;
    float v[K];
    load_floats<K>(x + j, v);
#pragma unroll
    for (int i = 0; i < K; ++i) v[i] = grad_at(cap(v[i]), j + i, label, row_lse, k, cap);
    store_floats<K>(g + j, v);
  });
}

// One pass reads the float32 row for the statistics; a second turns it into the gradient in
// T, written into the row's own bytes. Tile t's stores land on float32 elements of tiles
// <= t (the first half of them for a 2-byte T), so a group barrier between each tile's loads
// and stores keeps every load ahead of the stores over it (lane 0's target read included).
template <typename T, int TPR>
__global__ void __launch_bounds__(kBlockThreads<TPR>)
    fused_rows_kernel(float* logits, int64_t rows, int64_t vocab, int64_t ld, const T* __restrict__ bias,
                      const int64_t* __restrict__ row_index, const int64_t* __restrict__ labels,
                      const float* __restrict__ scale, LossOptions o, float* __restrict__ loss, bool write_grad) {
  __shared__ Stats scratch[32];
  constexpr int kRowsPerBlock = kBlockThreads<TPR> / TPR;
  constexpr int W = 4;  // float32 elements per 16-byte load; ld is a multiple of it
  const int lane = threadIdx.x % TPR;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / TPR;
  if (row >= rows) return;
  const int64_t global_row = row_index[row];
  float* x = logits + row * ld;
  const Softcap cap = make_softcap(o.softcap);
  auto logit = [&](float raw, int64_t j) { return cap(bias == nullptr ? raw : raw + to_float(bias[j])); };

  Stats st{neg_inf(), 0.f, 0.f};
  visit_row<TPR, W>(vocab, 0, lane, [&](int64_t j, auto width) {
    constexpr int K = decltype(width)::value;
    float v[K];
    load_floats<K>(x + j, v);
#pragma unroll
    for (int i = 0; i < K; ++i) v[i] = logit(v[i], j + i);
    accumulate<K>(st, v);
  });
  st = reduce_row<TPR>(st, scratch);
  const float row_lse = st.m + logf(st.s);
  const int64_t label = labels[global_row];
  const bool label_ok = label >= 0 && label < vocab;
  if (lane == 0) {  // reads the target before any thread of the group reaches a store
    loss[global_row] = label_ok ? row_loss(row_lse, logit(x[label], label), st.sx, vocab, o)
                                : __int_as_float(0x7fc00000);
  }
  if (!write_grad) return;

  T* g = reinterpret_cast<T*>(x);
  const GradCoefficients k = grad_coefficients(scale[global_row], row_lse, vocab, o);
  for (int64_t base = 0; base < vocab; base += int64_t(TPR) * W) {  // same trip count in every lane
    const int64_t j = base + int64_t(lane) * W;
    float v[W];
    if (j < vocab) load_floats<W>(x + j, v);  // j + W <= ld
    group_barrier<TPR>();
    if (j < vocab) {
#pragma unroll
      for (int i = 0; i < W; ++i) v[i] = grad_at(logit(v[i], j + i), j + i, label, row_lse, k, cap);
      if (j + W <= vocab) {
        store_floats<W>(g + j, v);
      } else {
        for (int i = 0; j + i < vocab; ++i) g[j + i] = from_float<T>(v[i]);
      }
    }
  }
}

// Runs launch(integral_constant<TPR>) with the group width for this vocabulary.
template <typename Launch>
cudaError_t with_group_width(int64_t vocab, Launch&& launch) {
  if (vocab <= 2048) return launch(std::integral_constant<int, 32>());
  if (vocab <= 16384) return launch(std::integral_constant<int, 256>());
  return launch(std::integral_constant<int, 1024>());
}

template <int TPR>
unsigned grid_for(int64_t rows) {
  constexpr int kRowsPerBlock = kBlockThreads<TPR> / TPR;
  return static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock);
}

}  // namespace

template <typename T>
cudaError_t launch_row_forward(const T* logits, int64_t rows, int64_t vocab, int64_t row_stride,
                               const int64_t* labels, const float* scale, LossOptions opts,
                               float* loss, float* lse, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return with_group_width(vocab, [&](auto width) {
    constexpr int TPR = decltype(width)::value;
    row_forward_kernel<T, TPR><<<grid_for<TPR>(rows), kBlockThreads<TPR>, 0, stream>>>(
        logits, rows, vocab, row_stride, labels, scale, opts, loss, lse);
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t launch_row_gradient(const T* logits, int64_t rows, int64_t vocab, int64_t row_stride,
                                const float* lse, const int64_t* labels, const float* scale,
                                LossOptions opts, T* grad, int64_t grad_stride, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return with_group_width(vocab, [&](auto width) {
    constexpr int TPR = decltype(width)::value;
    row_gradient_kernel<T, TPR><<<grid_for<TPR>(rows), kBlockThreads<TPR>, 0, stream>>>(
        logits, rows, vocab, row_stride, lse, labels, scale, opts, grad, grad_stride);
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t launch_fused_rows(float* logits, int64_t rows, int64_t vocab, int64_t ld, const T* bias,
                              const int64_t* row_index, const int64_t* labels, const float* scale,
                              LossOptions opts, float* loss, bool write_grad, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (ld % 4 != 0 || ld < vocab || reinterpret_cast<uintptr_t>(logits) % 16 != 0) return cudaErrorInvalidValue;
  return with_group_width(vocab, [&](auto width) {
    constexpr int TPR = decltype(width)::value;
    fused_rows_kernel<T, TPR><<<grid_for<TPR>(rows), kBlockThreads<TPR>, 0, stream>>>(
        logits, rows, vocab, ld, bias, row_index, labels, scale, opts, loss, write_grad);
    return cudaGetLastError();
  });
}

#define SPARSEFT_INSTANTIATE(T)                                                                               \
  template cudaError_t launch_row_forward<T>(const T*, int64_t, int64_t, int64_t, const int64_t*,             \
                                             const float*, LossOptions, float*, float*, cudaStream_t);       \
  template cudaError_t launch_row_gradient<T>(const T*, int64_t, int64_t, int64_t, const float*,              \
                                              const int64_t*, const float*, LossOptions, T*, int64_t,         \
                                              cudaStream_t);                                                  \
  template cudaError_t launch_fused_rows<T>(float*, int64_t, int64_t, int64_t, const T*, const int64_t*,      \
                                            const int64_t*, const float*, LossOptions, float*, bool,          \
                                            cudaStream_t);

SPARSEFT_INSTANTIATE(float)
SPARSEFT_INSTANTIATE(__nv_bfloat16)
SPARSEFT_INSTANTIATE(__half)

#undef SPARSEFT_INSTANTIATE

}  // namespace cuda_ce
}  // namespace sparseft
