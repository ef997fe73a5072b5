// Histogram of |a - b| bit patterns on the CPU, one pass of an exact radix select. The contract
// is the one of sparseft/ops/select.py; for every element i:
//
//   d = f32(a[i]) - f32(b[i]);  pattern = bits(d) & 0x7FFFFFFF   (the bit pattern of |d|)
//   if ((pattern >> high_shift) == prefix) counts[(pattern >> shift) & (2^bits - 1)] += 1
//
// a and b are read once, a block of kBlock elements at a time (converted to float32 in small
// stack buffers, never a float32 copy of the tensor). Each thread counts its range into its own
// uint32 histogram (2^16 bins: 256 KiB) and adds it to counts under a lock at the end; ranges of
// at most 2^31 elements so that no local bin can wrap. Small tensors (the norms and biases of a
// model) are counted by one thread straight into counts: a per-thread histogram would cost more
// to clear and merge than the counting itself.
//
// This file also declares the op's schema once for every backend (the CUDA binding only
// registers an implementation).

#include "vec_capability.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

namespace sparseft {
namespace {

using at::Tensor;

constexpr int64_t kBlock = 1024;                       // elements converted per step
constexpr int64_t kSerialNumel = int64_t{1} << 17;     // up to this many: one thread, no local histogram
constexpr int64_t kMaxLocalRange = int64_t{1} << 31;   // elements per uint32 local histogram
constexpr int kCopies = 4;                             // interleaved local histograms per thread

struct Digits {
  uint32_t prefix;
  int high_shift;
  int shift;
  uint32_t mask;  // 2^bits - 1
};

// Elements [k, k + n) as float32: the tensor's own memory when it is float32, else buf.
template <typename T>
inline const float* float_block(const T* p, int64_t k, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return p + k;
  } else {
    at::vec::convert(p + k, buf, n);
    return buf;
  }
}

// Counts the digits of elements [begin, end) into hist (uint32 or int64 bins): kCopies
// interleaved histograms of bins entries each, so that runs of equal digits (common: model
// deltas crowd into few bins) do not wait on one another's increments. The selection and the
// digits are computed in a vectorised loop; only the increments are scalar.
template <int kCopies, typename TA, typename TB, typename Count>
void count_range(const TA* a, const TB* b, int64_t begin, int64_t end, const Digits& s, Count* hist, int64_t bins) {
  constexpr uint32_t kUnselected = 0xFFFFFFFFu;  // above every digit (bits <= 16)
  uint32_t digit[kBlock];
  for (int64_t k = begin; k < end; k += kBlock) {
    const int64_t n = std::min(kBlock, end - k);
    for (int64_t j = 0; j < n; ++j) {
      const float d = static_cast<float>(a[k + j]) - static_cast<float>(b[k + j]);
      uint32_t bits;
      std::memcpy(&bits, &d, sizeof bits);
      const uint32_t pattern = bits & 0x7FFFFFFFu;
      digit[j] = (pattern >> s.high_shift) == s.prefix ? (pattern >> s.shift) & s.mask : kUnselected;
    }
    for (int64_t j = 0; j < n; ++j) {
      if (digit[j] != kUnselected) ++hist[(j % kCopies) * bins + digit[j]];
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
    std::vector<uint32_t> local(kCopies * bins);
    for (int64_t start = begin; start < end; start += kMaxLocalRange) {
      std::fill(local.begin(), local.end(), 0u);
      count_range<kCopies>(a, b, start, std::min(end, start + kMaxLocalRange), s, local.data(), bins);
      const std::lock_guard<std::mutex> lock(merge);
      for (int64_t c = 0; c < kCopies; ++c) {
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
  TORCH_CHECK(bits >= 1 && bits <= 16, "abs_diff_histogram: bits must be in [1, 16], got ", bits);
  TORCH_CHECK(high_shift >= bits && high_shift <= 31, "abs_diff_histogram: high_shift must be in [bits, 31], got ",
              high_shift);
  TORCH_CHECK(shift >= 0 && shift + bits <= high_shift, "abs_diff_histogram: shift must be in [0, high_shift - bits], got ",
              shift);
  TORCH_CHECK(prefix >= 0 && prefix < (int64_t{1} << (31 - high_shift)),
              "abs_diff_histogram: prefix must be in [0, 2**(31 - high_shift)), got ", prefix);
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
