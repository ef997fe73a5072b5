// Argument checks shared by the CPU and CUDA abs_diff_histogram: which digit of the 31-bit
// |a - b| pattern to count (bits wide at shift) among the entries whose bits above high_shift
// equal prefix.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>

namespace sparseft {

inline void check_digit_args(int64_t prefix, int64_t high_shift, int64_t shift, int64_t bits) {
  TORCH_CHECK(bits >= 1 && bits <= 16, "abs_diff_histogram: bits must be in [1, 16], got ", bits);
  TORCH_CHECK(high_shift >= bits && high_shift <= 31, "abs_diff_histogram: high_shift must be in [bits, 31], got ",
              high_shift);
  TORCH_CHECK(shift >= 0 && shift + bits <= high_shift,
              "abs_diff_histogram: shift must be in [0, high_shift - bits], got ", shift);
  TORCH_CHECK(prefix >= 0 && prefix < (int64_t{1} << (31 - high_shift)),
              "abs_diff_histogram: prefix must be in [0, 2**(31 - high_shift)), got ", prefix);
}

}  // namespace sparseft
