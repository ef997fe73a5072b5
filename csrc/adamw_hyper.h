// Per-call AdamW constants for the SparseAdamW kernels (CPU and CUDA alike): computed in
// double on the host and rounded to float once, so every backend uses the same numbers.
#pragma once

#include <cmath>
#include <limits>

namespace sparseft {

struct AdamWHyper {
  float lr, beta1, one_minus_beta1, beta2, one_minus_beta2, log_beta1, log_beta2, eps, decay;
};

inline AdamWHyper make_adamw_hyper(double lr, double beta1, double beta2, double eps, double weight_decay) {
  auto log_or_neg_inf = [](double b) { return b > 0 ? std::log(b) : -std::numeric_limits<double>::infinity(); };
  return {static_cast<float>(lr),
          static_cast<float>(beta1),
          static_cast<float>(1.0 - beta1),
          static_cast<float>(beta2),
          static_cast<float>(1.0 - beta2),
          static_cast<float>(log_or_neg_inf(beta1)),
          static_cast<float>(log_or_neg_inf(beta2)),
          static_cast<float>(eps),
          static_cast<float>(1.0 - lr * weight_decay)};
}

}  // namespace sparseft
