// Fused SparseAdamW step on the CPU. The contract is the one of
// sparseft/optim/_sparse_adamw_backends.py: per mask entry, gather the gradient (dense, at
// the index, or compact), update the float32 moments and the per-entry step count, and
// scatter the new weight into the target (and the compact values, when given).
//
// The step is bound by memory traffic, not arithmetic: per entry about 40 bytes of compact
// streams (index, gradient, values, moments and step count, the last four updated in place),
// plus the stores into the dense weight, each of which moves a whole 64-byte line (read for
// ownership, written back). One pass over the entries in index order visits every weight line
// once, in address order, which the hardware prefetcher follows; each vector of entries is
// loaded from the contiguous streams, updated in registers and stored straight to the target,
// with no second pass over tile buffers. Only a dense gradient (kind (a)) and a target without
// values are gathered. Measured and dropped on Zen 3: software prefetch of the target lines
// (no measurable gain), non-temporal scalar stores (slower: partial lines) and whole-line
// read-blend-streaming-store updates (slower: the line loads sit on the critical path).
// Masks are sorted and unique, so threads never write the same entry.
//
// This file also declares the op's schema once for every backend (the CUDA binding only
// registers an implementation).

#include "vec_capability.h"
#include "../adamw_hyper.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>

namespace sparseft {
namespace {

using at::Tensor;
using Vec = at::vec::Vectorized<float>;
using IVec = at::vec::Vectorized<int32_t>;
static_assert(Vec::size() == IVec::size(), "one step count per float lane");

using Hyper = AdamWHyper;

// Entries per parallel task: small masks run on one thread, large ones split evenly.
constexpr int64_t kGrain = 1 << 14;

// n <= Vec::size() contiguous elements as floats; lanes past n are zero.
template <typename T>
Vec load_float(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p, n);
  } else {
    float f[Vec::size()] = {};
    for (int64_t j = 0; j < n; ++j) f[j] = static_cast<float>(p[j]);
    return Vec::loadu(f);
  }
}

// base[idx[j]] for j < n as floats; lanes past n are zero.
template <typename T, typename index_t>
Vec gather_float(const T* base, const index_t* idx, int64_t n) {
  float f[Vec::size()] = {};
  for (int64_t j = 0; j < n; ++j) f[j] = static_cast<float>(base[idx[j]]);
  return Vec::loadu(f);
}

template <typename scalar_t, typename index_t, bool kCompactGrad, bool kHasValues>
void step_entries(scalar_t* target, const index_t* idx, const scalar_t* grad, float* exp_avg, float* exp_avg_sq,
                  int32_t* step, scalar_t* values, int64_t nnz, const Hyper& h) {
  const Vec b1(h.beta1), omb1(h.one_minus_beta1), b2(h.beta2), omb2(h.one_minus_beta2);
  const Vec lb1(h.log_beta1), lb2(h.log_beta2), eps(h.eps), decay(h.decay), lr(h.lr), zero(0.f);
  at::parallel_for(0, nnz, kGrain, [&](int64_t begin, int64_t end) {
    // Bias corrections 1 - beta^t = -expm1(t * log(beta)) (exact where 1 - exp would cancel),
    // kept for the last uniform step count: counts differ only for entries that joined at a
    // mask refresh, so the two expm1 run once per run of equal counts, not per vector.
    int32_t bc_step = -1;
    Vec bc1, bc2;
    for (int64_t k = begin; k < end; k += Vec::size()) {
      const int64_t n = std::min<int64_t>(Vec::size(), end - k);
      const IVec t = IVec::loadu(step + k, n) + IVec(1);
      t.store(step + k, n);
      const int32_t first = step[k];
      const bool uniform = std::all_of(step + k + 1, step + k + n, [&](int32_t s) { return s == first; });
      if (!uniform || first != bc_step) {
        const Vec tf = uniform ? Vec(static_cast<float>(first)) : at::vec::convert<float>(t);
        bc1 = zero - (tf * lb1).expm1();
        bc2 = zero - (tf * lb2).expm1();
        bc_step = uniform ? first : -1;
      }
      const Vec g = kCompactGrad ? load_float(grad + k, n) : gather_float(grad, idx + k, n);
      const Vec m = b1 * Vec::loadu(exp_avg + k, n) + omb1 * g;
      const Vec v = b2 * Vec::loadu(exp_avg_sq + k, n) + omb2 * (g * g);
      // The values mirror the target at the mask: read them contiguously instead of gathering.
      const Vec current = kHasValues ? load_float(values + k, n) : gather_float(target, idx + k, n);
      const Vec w = current * decay - lr * (m / bc1) / ((v / bc2).sqrt() + eps);
      m.store(exp_avg + k, n);
      v.store(exp_avg_sq + k, n);
      float out[Vec::size()];
      w.store(out, n);
      // float values take one vector store: fewer stores queued beside the scattered ones
      constexpr bool kVectorValues = kHasValues && std::is_same_v<scalar_t, float>;
      if constexpr (kVectorValues) w.store(values + k, n);
      for (int64_t j = 0; j < n; ++j) {
        const scalar_t rounded = static_cast<scalar_t>(out[j]);
        target[idx[k + j]] = rounded;
        if constexpr (kHasValues && !kVectorValues) values[k + j] = rounded;
      }
    }
  });
}

void check_state(const Tensor& t, const char* name, at::ScalarType dtype, int64_t nnz) {
  TORCH_CHECK(t.scalar_type() == dtype && t.dim() == 1 && t.numel() == nnz && t.is_contiguous(),
              "sparse_adamw_step: ", name, " must be a contiguous ", dtype, " tensor of shape (", nnz, ")");
}

void sparse_adamw_step(const Tensor& target, const Tensor& indices, const Tensor& grad, const Tensor& exp_avg,
                       const Tensor& exp_avg_sq, const Tensor& step, const std::optional<Tensor>& values, double lr,
                       double beta1, double beta2, double eps, double weight_decay) {
  const int64_t nnz = indices.numel();
  TORCH_CHECK(target.is_contiguous(), "sparse_adamw_step: target must be contiguous");
  TORCH_CHECK(indices.dim() == 1 && indices.is_contiguous() &&
                  (indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong),
              "sparse_adamw_step: indices must be a contiguous 1-D int32/int64 tensor");
  TORCH_CHECK(grad.scalar_type() == target.scalar_type() && grad.is_contiguous(),
              "sparse_adamw_step: grad must be contiguous with the target's dtype");
  const bool compact = grad.dim() == 1 && grad.numel() == nnz;
  TORCH_CHECK(compact || grad.sizes() == target.sizes(),
              "sparse_adamw_step: grad must have shape (nnz) or the target's shape");
  check_state(exp_avg, "exp_avg", at::kFloat, nnz);
  check_state(exp_avg_sq, "exp_avg_sq", at::kFloat, nnz);
  check_state(step, "step", at::kInt, nnz);
  const bool has_values = values.has_value() && values->defined();
  if (has_values) check_state(*values, "values", target.scalar_type(), nnz);
  if (nnz == 0) return;

  const Hyper h = make_adamw_hyper(lr, beta1, beta2, eps, weight_decay);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, target.scalar_type(), "sparse_adamw_step", [&] {
    auto run = [&](auto index_tag) {
      using index_t = decltype(index_tag);
      auto fn = compact ? (has_values ? step_entries<scalar_t, index_t, true, true>
                                      : step_entries<scalar_t, index_t, true, false>)
                        : (has_values ? step_entries<scalar_t, index_t, false, true>
                                      : step_entries<scalar_t, index_t, false, false>);
      fn(target.data_ptr<scalar_t>(), indices.data_ptr<index_t>(), grad.data_ptr<scalar_t>(),
         exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(), step.data_ptr<int32_t>(),
         has_values ? values->data_ptr<scalar_t>() : nullptr, nnz, h);
    };
    if (indices.scalar_type() == at::kInt) {
      run(int32_t{});
    } else {
      run(int64_t{});
    }
  });
}

}  // namespace
}  // namespace sparseft

TORCH_LIBRARY_FRAGMENT(sparseft_C, m) {
  m.def("sparse_adamw_step(Tensor(a!) target, Tensor indices, Tensor grad, Tensor(b!) exp_avg, "
        "Tensor(c!) exp_avg_sq, Tensor(d!) step, Tensor(e!)? values, float lr, float beta1, float beta2, "
        "float eps, float weight_decay) -> ()");
}

TORCH_LIBRARY_IMPL(sparseft_C, CPU, m) { m.impl("sparse_adamw_step", &sparseft::sparse_adamw_step); }
