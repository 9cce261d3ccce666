// The weight-gradient product of seqplat.core.gemm.outer (a^T @ b over all steps' rows) through
// seqplat::outer, for the Python backwards and the hoisted input projections' backward: on AVX-512 builds the
// packed register blocks read both factors in their row layout, where oneDNN's backward-weights primitive
// first converts both into its tensor type (measured in docs/performance.md, eighth 2026-12-07 session).

#include <ATen/ATen.h>
#include <torch/library.h>

#include "seqplat_gemm.h"

namespace {

at::Tensor core_outer(const at::Tensor& a, const at::Tensor& b) { return seqplat::outer(a, b); }

// whether outer() takes the packed route for float32 CPU factors here (built with AVX-512, running on it, route
// auto or packed): seqplat.core.gemm only calls it then
bool core_packed_outer() { return seqplat::detail::packed_outer_route(at::TensorOptions().dtype(at::kFloat)); }

}  // namespace

TORCH_LIBRARY(seqplat_core_gemm, m) {
  m.def("outer(Tensor a, Tensor b) -> Tensor");
  m.def("packed_outer() -> bool", &core_packed_outer);
}

TORCH_LIBRARY_IMPL(seqplat_core_gemm, CPU, m) { m.impl("outer", &core_outer); }
