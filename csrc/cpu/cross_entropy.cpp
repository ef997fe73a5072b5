// Masked-loss cross-entropy on the CPU: the fused linear + cross-entropy loop and the plain
// cross-entropy forward/backward. The contract is the one of sparseft/ops/_ce_torch.py.
//
// The linear loop works on chunks of active rows: one GEMM writes a [chunk, V] float32
// logits buffer, one parallel pass per row turns it into the loss and (in place) the
// gradient of the logits, and two more GEMMs turn that into the gradients of hidden and
// weight. Rows with a zero scale never reach a GEMM.

#include "vec_capability.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace sparseft {
namespace {

using at::Tensor;
using Vec = at::vec::Vectorized<float>;

struct LossOptions {
  float smoothing;  // label smoothing epsilon
  float z_loss;     // coefficient of lse^2
  float softcap;    // 0: none; else x = softcap * tanh(logit / softcap)
};

// Applies the softcap in place (when set); returns (max, sum) of the row.
std::pair<float, float> cap_max_sum(float* x, int64_t n, float softcap) {
  Vec vmax(-std::numeric_limits<float>::infinity()), vsum(0.f);
  const Vec cap(softcap), inv_cap(softcap == 0.f ? 0.f : 1.f / softcap);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec v = Vec::loadu(x + j);
    if (softcap != 0.f) {
      v = cap * (v * inv_cap).tanh();
      v.store(x + j);
    }
    vmax = at::vec::maximum(vmax, v);
    vsum = vsum + v;
  }
  float m = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  float s = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum);
  for (; j < n; ++j) {
    if (softcap != 0.f) x[j] = softcap * std::tanh(x[j] / softcap);
    m = std::max(m, x[j]);
    s += x[j];
  }
  return {m, s};
}

float sum_exp_shifted(const float* x, int64_t n, float shift) {
  Vec vsum(0.f);
  const Vec vshift(shift);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) vsum = vsum + (Vec::loadu(x + j) - vshift).exp();
  float s = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum);
  for (; j < n; ++j) s += std::exp(x[j] - shift);
  return s;
}

// Overwrites the (capped) row x with d(scale * loss)/d(logits), given its lse.
void write_row_grad(float* x, int64_t n, int64_t label, float lse, float scale, const LossOptions& o) {
  const float target = x[label];
  const Vec vlse(lse), vmul(scale * (1.f + 2.f * o.z_loss * lse)), voff(scale * o.smoothing / n);
  const bool capped = o.softcap != 0.f;
  const Vec one(1.f), inv_cap(capped ? 1.f / o.softcap : 0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec v = Vec::loadu(x + j);
    Vec g = (v - vlse).exp() * vmul - voff;
    if (capped) {
      Vec t = v * inv_cap;
      g = g * (one - t * t);
    }
    g.store(x + j);
  }
  for (; j < n; ++j) {
    float g = std::exp(x[j] - lse) * scale * (1.f + 2.f * o.z_loss * lse) - scale * o.smoothing / n;
    if (capped) g *= 1.f - (x[j] / o.softcap) * (x[j] / o.softcap);
    x[j] = g;
  }
  const float t = capped ? target / o.softcap : 0.f;
  x[label] -= scale * (1.f - o.smoothing) * (capped ? 1.f - t * t : 1.f);
}

struct RowResult {
  float loss, lse;
};

// Loss and lse of one float32 row of logits; the row is left softcapped.
RowResult row_loss(float* x, int64_t n, int64_t label, const LossOptions& o) {
  auto [m, sum_x] = cap_max_sum(x, n, o.softcap);
  const float lse = m + std::log(sum_exp_shifted(x, n, m));
  float loss = lse - (1.f - o.smoothing) * x[label] + o.z_loss * lse * lse;
  if (o.smoothing != 0.f) loss -= o.smoothing * sum_x / n;
  return {loss, lse};
}

void check_rows(const Tensor& labels, const Tensor& scale, int64_t rows) {
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == rows,
              "labels must be an int64 vector of length ", rows);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == rows,
              "scale must be a float32 vector of length ", rows);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_cross_entropy(
    const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& labels,
    const Tensor& scale, double smoothing, double z_loss, double softcap, bool need_grad_hidden,
    bool need_grad_weight, bool need_grad_bias, int64_t chunk_rows) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "hidden [N, D] and weight [V, D] expected");
  const int64_t n = hidden.size(0), vocab = weight.size(0), dim = hidden.size(1);
  check_rows(labels, scale, n);
  TORCH_CHECK(chunk_rows > 0, "chunk_rows must be positive");
  const LossOptions opts{float(smoothing), float(z_loss), float(softcap)};
  const auto f32 = hidden.options().dtype(at::kFloat);

  // GEMMs run in float32: low-precision inputs are widened (the weight once per call).
  const Tensor w = weight.to(at::kFloat).contiguous();
  const std::optional<Tensor> b = bias.has_value() ? std::optional<Tensor>(bias->to(at::kFloat)) : std::nullopt;
  const Tensor labels_c = labels.contiguous(), scale_c = scale.contiguous();
  const int64_t* label_ptr = labels_c.data_ptr<int64_t>();
  const float* scale_ptr = scale_c.data_ptr<float>();

  Tensor loss = at::zeros({n}, f32);
  Tensor grad_hidden = need_grad_hidden ? at::zeros_like(hidden) : at::empty({0}, hidden.options());
  Tensor grad_weight = need_grad_weight ? at::zeros({vocab, dim}, f32) : Tensor();
  Tensor grad_bias = need_grad_bias ? at::zeros({vocab}, f32) : Tensor();
  const bool need_grad = need_grad_hidden || need_grad_weight || need_grad_bias;

  const Tensor active = scale_c.nonzero().squeeze(1);
  const int64_t n_active = active.size(0);
  const int64_t chunk = std::min(chunk_rows, std::max<int64_t>(n_active, 1));
  Tensor logits_buf = at::empty({chunk, vocab}, f32);
  Tensor grad_hidden_buf = need_grad_hidden ? at::empty({chunk, dim}, f32) : Tensor();
  Tensor chunk_loss = at::empty({chunk}, f32);
  float* loss_buf = chunk_loss.data_ptr<float>();

  for (int64_t start = 0; start < n_active; start += chunk) {
    const int64_t rows = std::min(chunk, n_active - start);
    const Tensor idx = active.narrow(0, start, rows);
    const int64_t* idx_ptr = idx.data_ptr<int64_t>();
    const Tensor x = hidden.index_select(0, idx).to(at::kFloat);
    Tensor logits = logits_buf.narrow(0, 0, rows);
    if (b.has_value()) {
      at::addmm_out(logits, *b, x, w.t());
    } else {
      at::mm_out(logits, x, w.t());
    }
    float* logits_ptr = logits.data_ptr<float>();
    at::parallel_for(0, rows, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t row = idx_ptr[r];
        float* x_row = logits_ptr + r * vocab;
        const RowResult res = row_loss(x_row, vocab, label_ptr[row], opts);
        loss_buf[r] = res.loss;
        if (need_grad) write_row_grad(x_row, vocab, label_ptr[row], res.lse, scale_ptr[row], opts);
      }
    });
    loss.index_copy_(0, idx, chunk_loss.narrow(0, 0, rows));
    if (need_grad_hidden) {
      Tensor dx = grad_hidden_buf.narrow(0, 0, rows);
      at::mm_out(dx, logits, w);
      grad_hidden.index_copy_(0, idx, dx.to(hidden.scalar_type()));
    }
    if (need_grad_weight) grad_weight.addmm_(logits.t(), x);
    if (need_grad_bias) grad_bias.add_(logits.sum(0));
  }
  return {loss, grad_hidden,
          need_grad_weight ? grad_weight.to(weight.scalar_type()) : at::empty({0}, hidden.options()),
          need_grad_bias ? grad_bias.to(bias->scalar_type()) : at::empty({0}, hidden.options())};
}

// Runs fn(row index, float32 copy of the row) over active rows in parallel; each thread
// widens one row at a time into its own scratch buffer, so no [N, V] float32 copy exists.
template <typename Fn>
void for_active_rows(const Tensor& logits, const float* scale, Fn fn) {
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "sparseft_ce_rows", [&] {
    const scalar_t* src = logits.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> scratch(vocab);
      for (int64_t r = lo; r < hi; ++r) {
        if (scale[r] == 0.f) continue;
        at::vec::convert(src + r * vocab, scratch.data(), vocab);
        fn(r, scratch.data());
      }
    });
  });
}

std::tuple<Tensor, Tensor> cross_entropy_forward(const Tensor& logits, const Tensor& labels, const Tensor& scale,
                                                 double smoothing, double z_loss, double softcap) {
  TORCH_CHECK(logits.dim() == 2, "logits [N, V] expected");
  check_rows(labels, scale, logits.size(0));
  const LossOptions opts{float(smoothing), float(z_loss), float(softcap)};
  const Tensor x = logits.contiguous(), labels_c = labels.contiguous(), scale_c = scale.contiguous();
  Tensor loss = at::zeros({x.size(0)}, x.options().dtype(at::kFloat));
  Tensor lse = at::zeros_like(loss);
  const int64_t* label_ptr = labels_c.data_ptr<int64_t>();
  float *loss_ptr = loss.data_ptr<float>(), *lse_ptr = lse.data_ptr<float>();
  for_active_rows(x, scale_c.data_ptr<float>(), [&](int64_t r, float* row) {
    const RowResult res = row_loss(row, x.size(1), label_ptr[r], opts);
    loss_ptr[r] = res.loss;
    lse_ptr[r] = res.lse;
  });
  return {loss, lse};
}

Tensor cross_entropy_backward(const Tensor& logits, const Tensor& lse, const Tensor& labels, const Tensor& scale,
                              double smoothing, double z_loss, double softcap) {
  TORCH_CHECK(logits.dim() == 2, "logits [N, V] expected");
  check_rows(labels, scale, logits.size(0));
  const LossOptions opts{float(smoothing), float(z_loss), float(softcap)};
  const Tensor x = logits.contiguous(), labels_c = labels.contiguous(), scale_c = scale.contiguous();
  const Tensor lse_c = lse.to(at::kFloat).contiguous();
  Tensor grad = at::zeros_like(x);
  const int64_t vocab = x.size(1);
  const int64_t* label_ptr = labels_c.data_ptr<int64_t>();
  const float *lse_ptr = lse_c.data_ptr<float>(), *scale_ptr = scale_c.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "sparseft_ce_backward", [&] {
    scalar_t* dst = grad.data_ptr<scalar_t>();
    for_active_rows(x, scale_ptr, [&](int64_t r, float* row) {
      if (opts.softcap != 0.f) cap_max_sum(row, vocab, opts.softcap);
      write_row_grad(row, vocab, label_ptr[r], lse_ptr[r], scale_ptr[r], opts);
      at::vec::convert(row, dst + r * vocab, vocab);
    });
  });
  return grad;
}

}  // namespace
}  // namespace sparseft

TORCH_LIBRARY_FRAGMENT(sparseft_C, m) {
  m.def("linear_cross_entropy(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor scale, "
        "float label_smoothing, float z_loss, float softcap, bool need_grad_hidden, bool need_grad_weight, "
        "bool need_grad_bias, int chunk_rows) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cross_entropy_forward(Tensor logits, Tensor labels, Tensor scale, float label_smoothing, "
        "float z_loss, float softcap) -> (Tensor, Tensor)");
  m.def("cross_entropy_backward(Tensor logits, Tensor lse, Tensor labels, Tensor scale, "
        "float label_smoothing, float z_loss, float softcap) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparseft_C, CPU, m) {
  m.impl("linear_cross_entropy", &sparseft::linear_cross_entropy);
  m.impl("cross_entropy_forward", &sparseft::cross_entropy_forward);
  m.impl("cross_entropy_backward", &sparseft::cross_entropy_backward);
}
