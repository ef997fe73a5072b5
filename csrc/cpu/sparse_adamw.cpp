// Fused SparseAdamW step on the CPU. The contract is the one of
// sparseft/optim/_sparse_adamw_backends.py: per mask entry, gather the gradient (dense, at
// the index, or compact), update the float32 moments and the per-entry step count, and
// scatter the new weight into the target (and the compact values, when given).
//
// Entries are processed in tiles: a scalar pass gathers gradients and weights into small
// float buffers (gathers do not vectorise), one Vectorized<float> pass does the moment and
// weight math, a scalar pass scatters the rounded weights back. Masks are sorted and unique,
// so threads never write the same weight entry.
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
#include <cmath>
#include <limits>
#include <optional>

namespace sparseft {
namespace {

using at::Tensor;
using Vec = at::vec::Vectorized<float>;

constexpr int64_t kTile = 256;

using Hyper = AdamWHyper;

// AdamW on a tile: w (weights in, new weights out), g (gradients), t (step counts after the
// increment) are tile buffers; m and v are the entries' moments, updated in place.
// Bias correction 1 - beta^t is -expm1(t * log(beta)): exact where 1 - exp would cancel.
void update_tile(float* w, const float* g, const float* t, float* m, float* v, int64_t n, const Hyper& h) {
  const Vec b1(h.beta1), omb1(h.one_minus_beta1), b2(h.beta2), omb2(h.one_minus_beta2);
  const Vec lb1(h.log_beta1), lb2(h.log_beta2), eps(h.eps), decay(h.decay), lr(h.lr), zero(0.f);
  // Step counts differ only for entries that joined at a mask refresh: a tile whose counts
  // are all equal computes its bias corrections once.
  const bool same_step = std::all_of(t, t + n, [&](float s) { return s == t[0]; });
  const Vec same_bc1 = zero - (Vec(t[0]) * lb1).expm1(), same_bc2 = zero - (Vec(t[0]) * lb2).expm1();
  int64_t k = 0;
  for (; k + Vec::size() <= n; k += Vec::size()) {
    const Vec gk = Vec::loadu(g + k);
    const Vec tk = Vec::loadu(t + k);
    const Vec mk = b1 * Vec::loadu(m + k) + omb1 * gk;
    const Vec vk = b2 * Vec::loadu(v + k) + omb2 * (gk * gk);
    const Vec bc1 = same_step ? same_bc1 : zero - (tk * lb1).expm1();
    const Vec bc2 = same_step ? same_bc2 : zero - (tk * lb2).expm1();
    const Vec wk = Vec::loadu(w + k) * decay - lr * (mk / bc1) / ((vk / bc2).sqrt() + eps);
    mk.store(m + k);
    vk.store(v + k);
    wk.store(w + k);
  }
  for (; k < n; ++k) {
    const float mk = h.beta1 * m[k] + h.one_minus_beta1 * g[k];
    const float vk = h.beta2 * v[k] + h.one_minus_beta2 * (g[k] * g[k]);
    const float bc1 = -std::expm1(t[k] * h.log_beta1);
    const float bc2 = -std::expm1(t[k] * h.log_beta2);
    m[k] = mk;
    v[k] = vk;
    w[k] = w[k] * h.decay - h.lr * (mk / bc1) / (std::sqrt(vk / bc2) + h.eps);
  }
}

template <typename scalar_t, typename index_t, bool kCompactGrad>
void step_entries(scalar_t* target, const index_t* idx, const scalar_t* grad, float* exp_avg, float* exp_avg_sq,
                  int32_t* step, scalar_t* values, int64_t nnz, const Hyper& h) {
  at::parallel_for(0, nnz, 16 * kTile, [&](int64_t begin, int64_t end) {
    float w[kTile], g[kTile], t[kTile];
    for (int64_t b = begin; b < end; b += kTile) {
      const int64_t n = std::min(kTile, end - b);
      for (int64_t k = 0; k < n; ++k) {
        const int64_t i = idx[b + k];
        g[k] = static_cast<float>(kCompactGrad ? grad[b + k] : grad[i]);
        // The values mirror the target at the mask: read them contiguously instead of gathering.
        w[k] = static_cast<float>(values != nullptr ? values[b + k] : target[i]);
        t[k] = static_cast<float>(++step[b + k]);
      }
      update_tile(w, g, t, exp_avg + b, exp_avg_sq + b, n, h);
      for (int64_t k = 0; k < n; ++k) {
        const scalar_t out = static_cast<scalar_t>(w[k]);
        target[idx[b + k]] = out;
        if (values != nullptr) values[b + k] = out;
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
    scalar_t* values_ptr = has_values ? values->data_ptr<scalar_t>() : nullptr;
    auto run = [&](auto index_tag) {
      using index_t = decltype(index_tag);
      const index_t* idx = indices.data_ptr<index_t>();
      auto fn = compact ? step_entries<scalar_t, index_t, true> : step_entries<scalar_t, index_t, false>;
      fn(target.data_ptr<scalar_t>(), idx, grad.data_ptr<scalar_t>(), exp_avg.data_ptr<float>(),
         exp_avg_sq.data_ptr<float>(), step.data_ptr<int32_t>(), values_ptr, nnz, h);
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
