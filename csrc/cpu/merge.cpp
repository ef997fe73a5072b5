// One fused pass of a per-tensor model merge on the CPU. The contract is the one of
// sparseft/ops/merge.py; per element i (= index_offset + flat position), all float32, the
// tasks summed in order t = 0..T-1 starting from +0:
//
//   b = f32(base[i]);  tau_t = f32(tuned_t[i]) - b
//   k_t = [|tau_t| >= theta_t] (no thresholds: 1) * [keep_t(i)] (no cutoffs: 1)
//   d_t = k_t ? (w_t * tau_t) / p_t : 0                   (no cutoffs: p_t = 1, no division)
//   elect_sign: S = sum_t d_t; sigma = S >= 0 ? +1 : -1; m_t = [sign(d_t) == sigma] (d_t == 0: 0)
//   otherwise m_t = 1
//   M = sum_t (m_t ? d_t : 0)
//   normalize: D = sum_t (m_t ? w_t : 0); if |D| < 1e-8: D = 1; M = M / D
//   consensus (lam, k > 0): c_t = [|d_t| >= lam * |M - d_t|]; M = (sum_t c_t >= k) ? M : 0
//   out[i] = round_to_out_dtype(b + scale * M)            (round-to-nearest-even, once)
//
// DARE keep decision, a counter-based hash (splitmix64's finaliser) of the element index:
//   x = seed_t ^ (i * 0x9E3779B97F4A7C15); x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9;
//   x = (x ^ (x >> 27)) * 0x94D049BB133111EB; x ^= x >> 31;  keep = (x >> 40) < cutoff_t
//
// The pass is bound by memory traffic: every input element is read once and every output
// element written once. Each parallel task walks blocks of kBlock elements; a block's inputs
// are converted to float32 in small per-task buffers (T * kBlock floats for the task deltas,
// a few kBlock-sized rows besides), never a T * numel temporary. The loops are written with
// at::vec vectors over the elements of a block (selections as bit masks, no branches); the
// arithmetic is the reference's op for op, with FMA contraction switched off for this file
// (GCC contracts b + scale * M into one fma under -march=native otherwise), which keeps the
// CPU backend bit-identical to the torch reference.
//
// out may be base itself (an in-place merge): a block of base is read before the same block
// of out is written, and the last loop reads b[j] before writing out[j].
//
// This file also declares the op's schema once for every backend (the CUDA binding only
// registers an implementation).

// Before any header: every function of this file, inlined ones included, rounds each product.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "vec_capability.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace sparseft {
namespace {

using at::Tensor;
using Vec = at::vec::Vectorized<float>;

constexpr int64_t kBlock = 1024;      // elements per block (the per-task buffers' length)
constexpr int64_t kGrain = 1 << 15;   // elements per parallel task

struct Stream {
  void* ptr;
  at::ScalarType dtype;
};

// Elements [k, k + n) of s as float32: s's own memory when it is float32, else buf.
inline const float* float_block(const Stream& s, int64_t k, int64_t n, float* buf) {
  switch (s.dtype) {
    case at::kFloat:
      return static_cast<const float*>(s.ptr) + k;
    case at::kBFloat16:
      at::vec::convert(static_cast<const at::BFloat16*>(s.ptr) + k, buf, n);
      return buf;
    default:  // at::kHalf (checked by the caller)
      at::vec::convert(static_cast<const at::Half*>(s.ptr) + k, buf, n);
      return buf;
  }
}

inline uint64_t dare_hash(uint64_t seed, uint64_t i) {
  uint64_t x = seed ^ (i * 0x9E3779B97F4A7C15ull);
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// keep[j] = all ones where (hash(seed, first + j) >> 40) < cutoff, else 0. GCC vectorises this
// loop under -march=native (AVX2: 64-bit products from vpmuludq); a hand-written AVX2 version
// measured no faster.
void dare_keep(uint64_t seed, uint64_t first, uint64_t cutoff, int64_t n, uint32_t* keep) {
  for (int64_t j = 0; j < n; ++j) keep[j] = (dare_hash(seed, first + j) >> 40) < cutoff ? ~0u : 0u;
}

struct Options {
  int64_t tasks;
  std::vector<float> weights, thresholds, keep_probs;
  std::vector<uint64_t> cutoffs, seeds;
  bool trim, dare, elect_sign, normalize;
  float consensus_lam;
  int64_t consensus_k;
  float scale;
  uint64_t index_offset;
  float weight_sum;  // sum_t w_t in float32, in order: D when m_t = 1 for every task
};

// One block of n elements starting at flat position k. Every loop runs over whole vectors of
// the block (a partial last vector: lanes past n load as zero and are never stored); selections
// are bit masks, so "keep ? v : 0" is v & mask, which adds +0 where a scalar loop would skip.
void merge_block(const Stream& base, const std::vector<Stream>& tuned, const Options& o, int64_t k, int64_t n,
                 float* dbuf, float* bbuf, float* xbuf, float* mbuf, float* cbuf,
                 uint32_t* keepbuf, const Stream& out) {
  constexpr int64_t V = Vec::size();
  const float* b = float_block(base, k, n, bbuf);
  const int64_t T = o.tasks;
  const Vec zero(0.f), one(1.f);
  for (int64_t t = 0; t < T; ++t) {
    const float* x = float_block(tuned[t], k, n, xbuf);
    float* d = dbuf + t * kBlock;
    const Vec w(o.weights[t]);
    const Vec theta(o.trim ? o.thresholds[t] : 0.f);
    if (o.dare) {
      const uint64_t seed = o.seeds[t], cutoff = o.cutoffs[t], first = o.index_offset + static_cast<uint64_t>(k);
      dare_keep(seed, first, cutoff, n, keepbuf);
    }
    const Vec p(o.dare ? o.keep_probs[t] : 1.f);
    for (int64_t j = 0; j < n; j += V) {
      const int64_t c = std::min(V, n - j);
      const Vec tau = Vec::loadu(x + j, c) - Vec::loadu(b + j, c);
      Vec v = w * tau;
      if (o.dare) v = (v / p) & Vec::loadu(keepbuf + j, c);
      if (o.trim) v = v & (tau.abs() >= theta);
      v.store(d + j);  // whole vectors: the block rows hold kBlock floats
    }
  }

  float* M = mbuf;
  if (o.elect_sign) {
    for (int64_t j = 0; j < n; j += V) {
      Vec S = zero;
      for (int64_t t = 0; t < T; ++t) S = S + Vec::loadu(dbuf + t * kBlock + j);
      const Vec positive = S >= zero;
      Vec m_sum = zero, w_sum = zero;
      for (int64_t t = 0; t < T; ++t) {
        const Vec d = Vec::loadu(dbuf + t * kBlock + j);
        const Vec m = Vec::blendv(d < zero, d > zero, positive);
        m_sum = m_sum + (d & m);
        w_sum = w_sum + (Vec(o.weights[t]) & m);
      }
      if (o.normalize) m_sum = m_sum / Vec::blendv(w_sum, one, w_sum.abs() < Vec(1e-8f));
      m_sum.store(M + j);
    }
  } else {
    const float den = std::fabs(o.weight_sum) < 1e-8f ? 1.f : o.weight_sum;
    for (int64_t j = 0; j < n; j += V) {
      Vec m_sum = zero;
      for (int64_t t = 0; t < T; ++t) m_sum = m_sum + Vec::loadu(dbuf + t * kBlock + j);
      if (o.normalize) m_sum = m_sum / Vec(den);
      m_sum.store(M + j);
    }
  }

  if (o.consensus_k > 0) {
    const Vec lam(o.consensus_lam);
    const Vec need(static_cast<float>(o.consensus_k));  // vote counts <= T are exact in float32
    for (int64_t j = 0; j < n; j += V) {
      const Vec m = Vec::loadu(M + j);
      Vec votes = zero;
      for (int64_t t = 0; t < T; ++t) {
        const Vec d = Vec::loadu(dbuf + t * kBlock + j);
        votes = votes + (one & (d.abs() >= lam * (m - d).abs()));
      }
      (m & (votes >= need)).store(M + j);
    }
  }

  const Vec scale(o.scale);
  if (out.dtype == at::kFloat) {
    float* y = static_cast<float*>(out.ptr) + k;
    for (int64_t j = 0; j < n; j += V) {
      const int64_t c = std::min(V, n - j);
      const Vec delta = scale * Vec::loadu(M + j);
      (Vec::loadu(b + j, c) + delta).store(y + j, c);
    }
  } else {
    float* result = cbuf;
    for (int64_t j = 0; j < n; j += V) {
      const int64_t c = std::min(V, n - j);
      const Vec delta = scale * Vec::loadu(M + j);
      (Vec::loadu(b + j, c) + delta).store(result + j);
    }
    if (out.dtype == at::kBFloat16) {
      at::vec::convert(result, static_cast<at::BFloat16*>(out.ptr) + k, n);
    } else {
      at::vec::convert(result, static_cast<at::Half*>(out.ptr) + k, n);
    }
  }
}

bool is_merge_float(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

void merge_tensor(const Tensor& base, at::TensorList tuned, at::ArrayRef<double> weights,
                  at::ArrayRef<double> thresholds, at::ArrayRef<double> keep_probs, at::IntArrayRef cutoffs,
                  at::IntArrayRef seeds, bool elect_sign, bool normalize, double consensus_lam, int64_t consensus_k,
                  double scale, int64_t index_offset, const Tensor& out) {
  const int64_t T = static_cast<int64_t>(tuned.size());
  TORCH_CHECK(T >= 1, "merge_tensor: tuned must hold at least one tensor");
  TORCH_CHECK(base.device().is_cpu() && base.is_contiguous() && is_merge_float(base.scalar_type()),
              "merge_tensor: base must be a contiguous float32/bfloat16/float16 CPU tensor");
  for (int64_t t = 0; t < T; ++t) {
    const Tensor& x = tuned[t];
    TORCH_CHECK(x.device() == base.device() && x.is_contiguous() && is_merge_float(x.scalar_type()) &&
                    x.sizes() == base.sizes(),
                "merge_tensor: tuned[", t, "] must be a contiguous float32/bfloat16/float16 tensor of base's shape ",
                base.sizes(), " on its device");
  }
  TORCH_CHECK(out.device() == base.device() && out.is_contiguous() && is_merge_float(out.scalar_type()) &&
                  out.sizes() == base.sizes(),
              "merge_tensor: out must be a contiguous float32/bfloat16/float16 tensor of base's shape ", base.sizes());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == T, "merge_tensor: weights must have ", T, " entries");
  TORCH_CHECK(thresholds.empty() || static_cast<int64_t>(thresholds.size()) == T,
              "merge_tensor: thresholds must be empty or have ", T, " entries");
  const bool dare = !cutoffs.empty();
  TORCH_CHECK(!dare || (static_cast<int64_t>(cutoffs.size()) == T && static_cast<int64_t>(seeds.size()) == T &&
                        static_cast<int64_t>(keep_probs.size()) == T),
              "merge_tensor: cutoffs, seeds and keep_probs must all have ", T, " entries when cutoffs is not empty");
  TORCH_CHECK(consensus_k >= 0, "merge_tensor: consensus_k must be >= 0 (0: no consensus)");
  TORCH_CHECK(index_offset >= 0, "merge_tensor: index_offset must be >= 0");

  Options o;
  o.tasks = T;
  o.trim = !thresholds.empty();
  o.dare = dare;
  o.elect_sign = elect_sign;
  o.normalize = normalize;
  o.consensus_lam = static_cast<float>(consensus_lam);
  o.consensus_k = consensus_k;
  o.scale = static_cast<float>(scale);
  o.index_offset = static_cast<uint64_t>(index_offset);
  o.weight_sum = 0.f;
  for (int64_t t = 0; t < T; ++t) {
    o.weights.push_back(static_cast<float>(weights[t]));
    o.weight_sum += o.weights.back();
    if (o.trim) o.thresholds.push_back(static_cast<float>(thresholds[t]));
    if (dare) {
      TORCH_CHECK(cutoffs[t] >= 0 && cutoffs[t] <= (int64_t{1} << 24), "merge_tensor: cutoffs[", t,
                  "] must be in [0, 2**24]");
      o.cutoffs.push_back(static_cast<uint64_t>(cutoffs[t]));
      o.seeds.push_back(static_cast<uint64_t>(seeds[t]));  // < 2**63: the same bits as the uint64
      o.keep_probs.push_back(static_cast<float>(keep_probs[t]));
    }
  }

  const int64_t numel = base.numel();
  if (numel == 0) return;
  const Stream base_s{const_cast<void*>(base.data_ptr()), base.scalar_type()};
  std::vector<Stream> tuned_s;
  for (int64_t t = 0; t < T; ++t) tuned_s.push_back({tuned[t].data_ptr(), tuned[t].scalar_type()});
  const Stream out_s{out.data_ptr(), out.scalar_type()};

  at::parallel_for(0, (numel + kBlock - 1) / kBlock, std::max<int64_t>(1, kGrain / kBlock),
                   [&](int64_t block_begin, int64_t block_end) {
                     // Per task: T rows of deltas, 4 rows of block-sized scratch, the DARE keep bits.
                     std::vector<float> scratch((T + 4) * kBlock);
                     std::vector<uint32_t> keep(o.dare ? kBlock : 0);
                     float* dbuf = scratch.data();
                     float* rows = dbuf + T * kBlock;
                     for (int64_t blk = block_begin; blk < block_end; ++blk) {
                       const int64_t k = blk * kBlock;
                       const int64_t n = std::min(kBlock, numel - k);
                       merge_block(base_s, tuned_s, o, k, n, dbuf, rows, rows + kBlock, rows + 2 * kBlock,
                                   rows + 3 * kBlock, keep.data(), out_s);
                     }
                   });
}

}  // namespace
}  // namespace sparseft

TORCH_LIBRARY_FRAGMENT(sparseft_C, m) {
  m.def("merge_tensor(Tensor base, Tensor[] tuned, float[] weights, float[] thresholds, float[] keep_probs, "
        "int[] cutoffs, int[] seeds, bool elect_sign, bool normalize, float consensus_lam, int consensus_k, "
        "float scale, int index_offset, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(sparseft_C, CPU, m) { m.impl("merge_tensor", &sparseft::merge_tensor); }
