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

// a^T @ b through seqplat::outer, and an empty tensor; with `sum` through outer_with_sum: (a^T @ b, a's column sums)
std::tuple<at::Tensor, at::Tensor> step_outer(const at::Tensor& a, const at::Tensor& b, bool sum) {
  if (!sum) return {seqplat::outer(a, b), at::empty({0}, a.options())};
  seqplat::OuterFactor f = seqplat::outer_factor(a.size(0), a.size(1), a.options());
  f.dense.copy_(a);
  return seqplat::outer_with_sum(f, b);
}

}  // namespace

TORCH_LIBRARY(seqplat_test_gemm, m) {
  m.def("step_product(Tensor(a!) out, Tensor x, Tensor m, bool accumulate) -> int");
  m.def("step_affine(Tensor(a!) out, Tensor c, Tensor x, Tensor m) -> ()");
  m.def("step_result(Tensor(a!) out, Tensor x, Tensor m) -> Tensor");
  m.def("step_outer(Tensor a, Tensor b, bool sum) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(seqplat_test_gemm, CPU, m) { 
  m.impl("step_product", &step_product);
  m.impl("step_affine", &step_affine);
  m.impl("step_result", &step_result);
  m.impl("step_outer", &step_outer);
}
