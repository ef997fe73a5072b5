// Fused Adam direction of LowRankAdamW on the CPU. The contract is the one of
// sparseft/ops/lowrank_adam.py: over the projected gradient R (float32, r-sized), in one pass,
//
//   exp_avg    = beta1 * exp_avg    + (1 - beta1) * grad
//   exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
//   out        = (exp_avg * c1) / (sqrt(exp_avg_sq) * c2 + eps)
//
// with the bias corrections c1 = 1 / (1 - beta1^t), c2 = 1 / sqrt(1 - beta2^t) computed by the
// caller in double. Every stream is contiguous, so each vector is loaded once, updated in
// registers and stored: the pass is bound by memory traffic (20 bytes per element).
//
// This file also declares the op's schema once for every backend (the CUDA binding only
// registers an implementation).

#include "vec_capability.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>

namespace sparseft {
namespace {

using at::Tensor;
using Vec = at::vec::Vectorized<float>;

// Elements per parallel task: projected gradients are small (r × n), most run on one thread.
constexpr int64_t kGrain = 1 << 15;

void check_stream(const Tensor& t, const char* name, const Tensor& grad) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.sizes() == grad.sizes() &&
                  t.device() == grad.device(),
              "lowrank_adam_direction: ", name, " must be a contiguous float32 tensor of grad's shape ",
              grad.sizes(), " on its device");
}

void lowrank_adam_direction(const Tensor& grad, const Tensor& exp_avg, const Tensor& exp_avg_sq, const Tensor& out,
                            double beta1, double beta2, double c1, double c2, double eps) {
  check_stream(grad, "grad", grad);
  check_stream(exp_avg, "exp_avg", grad);
  check_stream(exp_avg_sq, "exp_avg_sq", grad);
  check_stream(out, "out", grad);
  const int64_t numel = grad.numel();
  const float* g_ptr = grad.data_ptr<float>();
  float* m_ptr = exp_avg.data_ptr<float>();
  float* v_ptr = exp_avg_sq.data_ptr<float>();
  float* out_ptr = out.data_ptr<float>();
  // Rounded to float once, as the torch reference's scalar arguments are.
  const Vec b1(static_cast<float>(beta1)), omb1(static_cast<float>(1.0 - beta1));
  const Vec b2(static_cast<float>(beta2)), omb2(static_cast<float>(1.0 - beta2));
  const Vec vc1(static_cast<float>(c1)), vc2(static_cast<float>(c2)), veps(static_cast<float>(eps));
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; k += Vec::size()) {
      const int64_t n = std::min<int64_t>(Vec::size(), end - k);
      const Vec g = Vec::loadu(g_ptr + k, n);
      const Vec m = b1 * Vec::loadu(m_ptr + k, n) + omb1 * g;
      const Vec v = b2 * Vec::loadu(v_ptr + k, n) + omb2 * (g * g);
      m.store(m_ptr + k, n);
      v.store(v_ptr + k, n);
      ((m * vc1) / (v.sqrt() * vc2 + veps)).store(out_ptr + k, n);
    }
  });
}

}  // namespace
}  // namespace sparseft

TORCH_LIBRARY_FRAGMENT(sparseft_C, m) {
  m.def("lowrank_adam_direction(Tensor grad, Tensor(a!) exp_avg, Tensor(b!) exp_avg_sq, Tensor(c!) out, "
        "float beta1, float beta2, float c1, float c2, float eps) -> ()");
}

TORCH_LIBRARY_IMPL(sparseft_C, CPU, m) { m.impl("lowrank_adam_direction", &sparseft::lowrank_adam_direction); }
