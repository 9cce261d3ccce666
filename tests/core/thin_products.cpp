// Test hooks for the thin-product loops of core/include/seqplat_gemm.h (tests/core/test_thin_products.py).

#include <ATen/ATen.h>
#include <torch/library.h>

#include "seqplat_gemm.h"

namespace {

// out = x @ m (or out += x @ m with `accumulate`) through seqplat's step-product helpers, m prepared for a
// 20-step call; returns which route prepare() chose: 0 library, 1 thin inner dimension, 2 thin output width
int64_t step_product(at::Tensor out, const at::Tensor& x, const at::Tensor& m, bool accumulate) {
  const seqplat::StepMatrix s = seqplat::prepare(m, 20);
  if (accumulate) {
    seqplat::addmm_into(out, x, s);
  } else {
    seqplat::mm_into(out, x, s);
  }
  return static_cast<int64_t>(s.thin);
}

}  // namespace

TORCH_LIBRARY(seqplat_test_gemm, m) {
  m.def("step_product(Tensor(a!) out, Tensor x, Tensor m, bool accumulate) -> int");
}

TORCH_LIBRARY_IMPL(seqplat_test_gemm, CPU, m) { m.impl("step_product", &step_product); }
