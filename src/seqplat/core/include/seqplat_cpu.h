// Helpers shared by seqplat's C++ CPU kernels (own LSTM and GRU, phased_lstm, rhn). seqplat.core.cpp_ext
// puts this folder on the include path and hashes this file into every kernel's build name, so an edit
// here rebuilds them all.

#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace seqplat {

// Rows per parallel chunk when one step's work is `width` elements per row: at least `elements` in a
// chunk (measured: at B=32, H=256 two threads on 16 rows each beat one thread on 32 for the LSTM's
// [B, 4H] gates at 16k).
inline int64_t row_grain(int64_t width, int64_t elements) { return std::max<int64_t>(1, elements / width); }

// f(begin, end) over the rows [0, B): in parallel chunks of at least `grain` rows when there are two
// chunks' worth and more than one thread, else called directly (no parallel-region set-up)
template <typename F>
inline void for_rows(int64_t B, int64_t grain, const F& f) {
  if (B < 2 * grain || at::get_num_threads() == 1 || at::in_parallel_region()) {
    f(int64_t(0), B);
    return;
  }
  at::parallel_for(0, B, grain, f);
}

// 1 / (1 + exp(-v)) with v clamped to [-80, 80]: under -ffast-math an exp that overflows to inf turned
// the vectorised form into NaN. Near saturation the vector form is within an ulp of 0 or 1 (it gave
// 1 - 2^-24 at v = 80 where torch gives 1); the tanh form (1 + tanh(v/2))/2 is exact there but made rhn's
// training step 20% slower.
template <typename scalar_t>
inline scalar_t sigmoid(scalar_t v) {
  const scalar_t c = std::min(std::max(v, scalar_t(-80)), scalar_t(80));
  return scalar_t(1) / (scalar_t(1) + std::exp(-c));
}

}  // namespace seqplat
