// Histogram of |a - b| bit patterns on the CPU, one pass of an exact radix select. The contract
// is the one of sparseft/ops/select.py; for every element i:
//
//   d = f32(a[i]) - f32(b[i]);  pattern = bits(d) & 0x7FFFFFFF   (the bit pattern of |d|)
//   if ((pattern >> high_shift) == prefix) counts[(pattern >> shift) & (2^bits - 1)] += 1
//
// a and b are read once, a block of kBlock elements at a time: a vectorised loop turns the block
// into digits (or "unselected"), a scalar loop adds them up; no float32 copy of the tensor is
// made. Each thread counts its range into its own uint32 histograms (kLocalCopies interleaved
// ones of 2^bits bins: 1 MiB for 16 bits, of which model deltas touch a few thousand lines) and
// adds them to counts under a lock at the end; ranges of at most 2^31 elements so that no local
// bin can wrap. Small tensors (the norms and biases of a model) are counted by one thread
// straight into counts: local histograms would cost more to clear and merge than the counting.
//
// This file also declares the op's schema once for every backend (the CUDA binding only
// registers an implementation).

#include "../select_args.h"
#include "vec_capability.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

namespace sparseft {
namespace {

using at::Tensor;

constexpr int64_t kBlock = 1024;                       // elements converted per step
constexpr int64_t kSerialNumel = int64_t{1} << 17;     // up to this many: one thread, no local histogram
constexpr int64_t kMaxLocalRange = int64_t{1} << 31;   // elements per uint32 local histogram
constexpr int kLocalCopies = 4;                        // interleaved local histograms per thread

struct Digits {
  uint32_t prefix;
  int high_shift;
  int shift;
  uint32_t mask;  // 2^bits - 1
};

// Elements [k, k + n) of p in a form the counting loop reads as float32 with vector
// instructions: float32 and bfloat16 (a shift) in place, float16 converted into buf by at::vec
// (its scalar conversion does not vectorise).
template <typename T>
inline const T* vector_readable(const T* p, int64_t k, int64_t, float*) {
  return p + k;
}
inline const float* vector_readable(const at::Half* p, int64_t k, int64_t n, float* buf) {
  at::vec::convert(p + k, buf, n);
  return buf;
}

// Counts the digits of elements [begin, end) into hist (uint32 or int64 bins): kInterleave
// histograms of bins entries each, so that runs of equal digits (common: model
// deltas crowd into few bins) do not wait on one another's increments. The selection and the
// digits are computed in a vectorised loop; only the increments are scalar.
template <int kInterleave, typename TA, typename TB, typename Count>
void count_range(const TA* a, const TB* b, int64_t begin, int64_t end, const Digits& s, Count* hist, int64_t bins) {
  constexpr uint32_t kUnselected = 0xFFFFFFFFu;  // above every digit (bits <= 16)
  const uint32_t prefix = s.prefix, mask = s.mask;
  const int high_shift = s.high_shift, shift = s.shift;
  uint32_t digit[kBlock];
  float abuf[kBlock], bbuf[kBlock];
  for (int64_t k = begin; k < end; k += kBlock) {
    const int64_t n = std::min(kBlock, end - k);
    const auto* x = vector_readable(a, k, n, abuf);
    const auto* y = vector_readable(b, k, n, bbuf);
    int64_t selected = 0;
    for (int64_t j = 0; j < n; ++j) {  // vectorised by the compiler: no branch in it
      const float d = static_cast<float>(x[j]) - static_cast<float>(y[j]);
      uint32_t bits;
      std::memcpy(&bits, &d, sizeof bits);
      const uint32_t pattern = bits & 0x7FFFFFFFu;
      const uint32_t unselected = 0u - static_cast<uint32_t>((pattern >> high_shift) != prefix);  // all ones or 0
      digit[j] = ((pattern >> shift) & mask) | unselected;
      selected += unselected == 0;
    }
    if (selected == n) {  // every entry (the first pass): no test
      for (int64_t j = 0; j < n; ++j) ++hist[(j % kInterleave) * bins + digit[j]];
    } else if (selected > 0) {  // compacted without branches: a few percent selected, at random
      int64_t count = 0;
      for (int64_t j = 0; j < n; ++j) {
        digit[count] = digit[j];
        count += digit[j] != kUnselected;
      }
      for (int64_t j = 0; j < count; ++j) ++hist[(j % kInterleave) * bins + digit[j]];
    }
  }
}

template <typename TA, typename TB>
void histogram(const TA* a, const TB* b, int64_t numel, const Digits& s, int64_t* counts) {
  if (numel <= kSerialNumel) {
    count_range<1>(a, b, 0, numel, s, counts, 0);
    return;
  }
  const int64_t bins = int64_t{s.mask} + 1;
  const int64_t threads = std::max(1, at::get_num_threads());
  std::mutex merge;
  // One range per thread: each local histogram is cleared and merged once.
  at::parallel_for(0, numel, std::max(kSerialNumel, (numel + threads - 1) / threads), [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> local(kLocalCopies * bins);
    for (int64_t start = begin; start < end; start += kMaxLocalRange) {
      std::fill(local.begin(), local.end(), 0u);
      count_range<kLocalCopies>(a, b, start, std::min(end, start + kMaxLocalRange), s, local.data(), bins);
      const std::lock_guard<std::mutex> lock(merge);
      for (int64_t c = 0; c < kLocalCopies; ++c) {
        for (int64_t i = 0; i < bins; ++i) counts[i] += local[c * bins + i];
      }
    }
  });
}

// Calls fn with t's data as a typed pointer (float32, bfloat16 or float16, checked by the caller).
template <typename Fn>
void with_float_data(const Tensor& t, Fn&& fn) {
  switch (t.scalar_type()) {
    case at::kFloat: fn(t.const_data_ptr<float>()); break;
    case at::kBFloat16: fn(t.const_data_ptr<at::BFloat16>()); break;
    default: fn(t.const_data_ptr<at::Half>()); break;
  }
}

bool is_select_float(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

void abs_diff_histogram(const Tensor& a, const Tensor& b, int64_t prefix, int64_t high_shift, int64_t shift,
                        int64_t bits, const Tensor& counts) {
  TORCH_CHECK(a.device().is_cpu() && a.is_contiguous() && is_select_float(a.scalar_type()),
              "abs_diff_histogram: a must be a contiguous float32/bfloat16/float16 CPU tensor");
  TORCH_CHECK(b.device().is_cpu() && b.is_contiguous() && is_select_float(b.scalar_type()) &&
                  b.numel() == a.numel(),
              "abs_diff_histogram: b must be a contiguous float32/bfloat16/float16 CPU tensor of a's ", a.numel(),
              " elements");
  check_digit_args(prefix, high_shift, shift, bits);
  TORCH_CHECK(counts.device().is_cpu() && counts.is_contiguous() && counts.scalar_type() == at::kLong &&
                  counts.numel() == (int64_t{1} << bits),
              "abs_diff_histogram: counts must be a contiguous int64 CPU tensor of 2**bits elements");

  const Digits s{static_cast<uint32_t>(prefix), static_cast<int>(high_shift), static_cast<int>(shift),
                 static_cast<uint32_t>((int64_t{1} << bits) - 1)};
  int64_t* out = counts.data_ptr<int64_t>();
  with_float_data(a, [&](auto pa) {
    with_float_data(b, [&](auto pb) { histogram(pa, pb, a.numel(), s, out); });
  });
}

}  // namespace
}  // namespace sparseft

TORCH_LIBRARY_FRAGMENT(sparseft_C, m) {
  m.def("abs_diff_histogram(Tensor a, Tensor b, int prefix, int high_shift, int shift, int bits, "
        "Tensor(a!) counts) -> ()");
}

TORCH_LIBRARY_IMPL(sparseft_C, CPU, m) { m.impl("abs_diff_histogram", &sparseft::abs_diff_histogram); }
