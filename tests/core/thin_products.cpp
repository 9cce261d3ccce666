// Test hooks for the thin-product and packed-panel loops of core/include/seqplat_gemm.h (tests/core/test_thin_products.py).

#include <ATen/ATen.h>
#include <torch/library.h>

#include "seqplat_gemm.h"

namespace {

// out = x @ m (or out += x @ m with `accumulate`) through seqplat's step-product helpers, m prepared for a
// 20-step call; returns which route prepare() chose: 0 library, 1 thin inner dimension, 2 thin output width,
// 3 packed panels
int64_t step_product(at::Tensor out, const at::Tensor& x, const at::Tensor& m, bool accumulate) {
  const seqplat::StepMatrix s = seqplat::prepare(m, 20);
  if (accumulate) {
    seqplat::addmm_into(out, x, s);
  } else {
    seqplat::mm_into(out, x, s);
  }
  return s.p.defined() ? 3 : static_cast<int64_t>(s.thin);
}

// out = c + x @ m through affine_into (m prepared as above)
void step_affine(at::Tensor out, const at::Tensor& c, const at::Tensor& x, const at::Tensor& m) {
  const seqplat::StepMatrix s = seqplat::prepare(m, 20);
  seqplat::affine_into(out, c, x, s);
}

// x @ m through mm_result, which may hand back another tensor than `out`
at::Tensor step_result(at::Tensor out, const at::Tensor& x, const at::Tensor& m) {
  const seqplat::StepMatrix s = seqplat::prepare(m, 20);
  return seqplat::mm_result(out, x, s).clone();
}

}  // namespace

TORCH_LIBRARY(seqplat_test_gemm, m) {
  m.def("step_product(Tensor(a!) out, Tensor x, Tensor m, bool accumulate) -> int");
  m.def("step_affine(Tensor(a!) out, Tensor c, Tensor x, Tensor m) -> ()");
  m.def("step_result(Tensor(a!) out, Tensor x, Tensor m) -> Tensor");
}

TORCH_LIBRARY_IMPL(seqplat_test_gemm, CPU, m) { 
  m.impl("step_product", &step_product);
  m.impl("step_affine", &step_affine);
  m.impl("step_result", &step_result);
}
