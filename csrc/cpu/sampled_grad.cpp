// Sampled weight gradient on CPU: g[k] = sum_b dY[b, row_k] * X[b, col_k] for the sorted flat
// indices idx[k] = row_k * in + col_k, without forming the dense [out, in] gradient.
//
// The batch is processed in blocks of `block` rows. Each block of dY and X is transposed once
// into float32 [out, block] / [in, block] workspaces, so every entry becomes a contiguous dot
// product and the X slice in use stays cache-resident; the workspaces are the only memory beyond
// the result. Entries are split between threads by count (balanced by nnz), and consecutive
// entries of one row (the indices are sorted) share each load of the dY row.
#include "vec_capability.h"  // first: it selects the at::vec specialisation

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace {

using Vec = at::vec::Vectorized<float>;

// Bytes of X^T workspace kept per batch block: about half of a per-core L2.
constexpr int64_t kXBlockBytes = 512 * 1024;
constexpr int64_t kMinBlock = 64;
constexpr int64_t kMaxBlock = 1024;
// Entries per parallel task: enough work to amortise scheduling, small enough to balance.
constexpr int64_t kEntryGrain = 256;

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// dst[c * ld + b] = float(src[(b0 + b) * src_stride + c]) for c in [c0, c1), b in [0, rows); zero
// pads the columns [rows, padded) so every dot product runs over whole vectors.
template <typename T>
void transpose_block(const T* src, int64_t src_stride, int64_t b0, int64_t rows, int64_t padded,
                     int64_t c0, int64_t c1, float* dst, int64_t ld) {
  constexpr int64_t kTile = 16;
  for (int64_t ct = c0; ct < c1; ct += kTile) {
    const int64_t ce = std::min(ct + kTile, c1);
    for (int64_t b = 0; b < rows; ++b) {
      const T* row = src + (b0 + b) * src_stride;
      for (int64_t c = ct; c < ce; ++c) dst[c * ld + b] = static_cast<float>(row[c]);
    }
    for (int64_t c = ct; c < ce; ++c)
      for (int64_t b = rows; b < padded; ++b) dst[c * ld + b] = 0.f;
  }
}

float horizontal_sum(const Vec& v) {
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  float sum = 0.f;
  for (int64_t i = 0; i < Vec::size(); ++i) sum += lanes[i];
  return sum;
}

float dot1(const float* a, const float* x, int64_t len) {
  Vec acc0(0.f), acc1(0.f);
  int64_t b = 0;
  for (; b + 2 * Vec::size() <= len; b += 2 * Vec::size()) {
    acc0 = at::vec::fmadd(Vec::loadu(a + b), Vec::loadu(x + b), acc0);
    acc1 = at::vec::fmadd(Vec::loadu(a + b + Vec::size()), Vec::loadu(x + b + Vec::size()), acc1);
  }
  for (; b < len; b += Vec::size()) acc0 = at::vec::fmadd(Vec::loadu(a + b), Vec::loadu(x + b), acc0);
  return horizontal_sum(acc0 + acc1);
}

// Four entries of one dY row: the row is loaded once per step for four X rows.
void dot4(const float* a, const float* x0, const float* x1, const float* x2, const float* x3, int64_t len,
          float* out) {
  Vec acc0(0.f), acc1(0.f), acc2(0.f), acc3(0.f);
  for (int64_t b = 0; b < len; b += Vec::size()) {
    const Vec av = Vec::loadu(a + b);
    acc0 = at::vec::fmadd(av, Vec::loadu(x0 + b), acc0);
    acc1 = at::vec::fmadd(av, Vec::loadu(x1 + b), acc1);
    acc2 = at::vec::fmadd(av, Vec::loadu(x2 + b), acc2);
    acc3 = at::vec::fmadd(av, Vec::loadu(x3 + b), acc3);
  }
  out[0] += horizontal_sum(acc0);
  out[1] += horizontal_sum(acc1);
  out[2] += horizontal_sum(acc2);
  out[3] += horizontal_sum(acc3);
}

// Adds the block's contribution to g[k0, k1). dyt is [out, ld], xt is [in, ld], both float32.
template <typename I>
void accumulate_entries(const I* idx, int64_t k0, int64_t k1, int64_t in, const float* dyt, const float* xt,
                        int64_t ld, int64_t len, float* g) {
  int64_t row = static_cast<int64_t>(idx[k0]) / in;
  int64_t row_start = row * in;
  int64_t k = k0;
  while (k < k1) {
    const int64_t flat = idx[k];
    if (flat >= row_start + in) {  // sorted indices: the row changes rarely, divide only then
      row = flat / in;
      row_start = row * in;
    }
    const int64_t row_end = row_start + in;
    const float* a = dyt + row * ld;
    if (k + 4 <= k1 && static_cast<int64_t>(idx[k + 3]) < row_end) {
      dot4(a, xt + (flat - row_start) * ld, xt + (idx[k + 1] - row_start) * ld,
           xt + (idx[k + 2] - row_start) * ld, xt + (idx[k + 3] - row_start) * ld, len, g + k);
      k += 4;
    } else {
      g[k] += dot1(a, xt + (flat - row_start) * ld, len);
      k += 1;
    }
  }
}

template <typename T, typename I>
void sampled_grad_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& indices, at::Tensor& g) {
  const int64_t batch = dy.size(0), out = dy.size(1), in = x.size(1), nnz = indices.numel();
  const T* dy_ptr = dy.data_ptr<T>();
  const T* x_ptr = x.data_ptr<T>();
  const int64_t dy_stride = dy.stride(0), x_stride = x.stride(0);
  const I* idx = indices.data_ptr<I>();
  float* g_ptr = g.data_ptr<float>();

  const int64_t vec = Vec::size();
  int64_t block = round_up(kXBlockBytes / (4 * in), vec);
  block = std::clamp(block, round_up(kMinBlock, vec), kMaxBlock);
  block = std::min(block, round_up(batch, vec));
  at::Tensor dyt = at::empty({out, block}, dy.options().dtype(at::kFloat));
  at::Tensor xt = at::empty({in, block}, dy.options().dtype(at::kFloat));
  float* dyt_ptr = dyt.data_ptr<float>();
  float* xt_ptr = xt.data_ptr<float>();

  for (int64_t b0 = 0; b0 < batch; b0 += block) {
    const int64_t rows = std::min(block, batch - b0);
    const int64_t len = round_up(rows, vec);
    at::parallel_for(0, out + in, 64, [&](int64_t c0, int64_t c1) {
      if (c0 < out) transpose_block(dy_ptr, dy_stride, b0, rows, len, c0, std::min(c1, out), dyt_ptr, block);
      if (c1 > out)
        transpose_block(x_ptr, x_stride, b0, rows, len, std::max(c0, out) - out, c1 - out, xt_ptr, block);
    });
    at::parallel_for(0, nnz, kEntryGrain, [&](int64_t k0, int64_t k1) {
      accumulate_entries(idx, k0, k1, in, dyt_ptr, xt_ptr, block, len, g_ptr);
    });
  }
}

at::Tensor sampled_weight_grad_cpu(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& indices) {
  TORCH_CHECK(grad_output.dim() == 2 && input.dim() == 2, "sampled_weight_grad: grad_output and input must be 2-D");
  TORCH_CHECK(grad_output.size(0) == input.size(0), "sampled_weight_grad: grad_output and input need the same rows");
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), "sampled_weight_grad: dtype mismatch");
  TORCH_CHECK(indices.dim() == 1 && (indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong),
              "sampled_weight_grad: indices must be 1-D int32 or int64");
  // Rows must be unit-stride inside; the batch stride may be anything.
  const at::Tensor dy = grad_output.stride(1) == 1 ? grad_output : grad_output.contiguous();
  const at::Tensor x = input.stride(1) == 1 ? input : input.contiguous();
  const at::Tensor idx = indices.contiguous();
  at::Tensor g = at::zeros({idx.numel()}, grad_output.options().dtype(at::kFloat));
  if (idx.numel() == 0 || dy.size(0) == 0) return g;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dy.scalar_type(), "sampled_weight_grad", [&] {
    if (idx.scalar_type() == at::kInt)
      sampled_grad_impl<scalar_t, int32_t>(dy, x, idx, g);
    else
      sampled_grad_impl<scalar_t, int64_t>(dy, x, idx, g);
  });
  return g;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparseft_C, m) {
  m.def("sampled_weight_grad(Tensor grad_output, Tensor input, Tensor indices) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparseft_C, CPU, m) { m.impl("sampled_weight_grad", &sampled_weight_grad_cpu); }
