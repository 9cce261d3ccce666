// The per-step matrix products of seqplat's C++ loops: x @ m for a fixed m (a recurrent weight) and a
// thin x (one step's batch rows). seqplat.core.cpp_ext hashes this file into every kernel's build name.
//
// ATen's mm (MKL's sgemm) streams a large m from memory at every step: at H=1024 the LSTM's recurrent
// product [32, 1024] x [1024, 4096] ran at about 40 GFLOP/s on 2 cores. oneDNN's inner-product kernel
// (torch's mkldnn::_linear_pointwise, what inductor calls for CPU linears) ran the same product
// 1.2-2x faster there, and slower for matrices that fit in cache (H=256: 1 MB). So float32 products
// with an m over kOnednnMinElements go through oneDNN and the rest through at::mm.
// SEQPLAT_STEP_GEMM=mm or onednn forces one route (for measuring); "auto" or unset picks by size.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>

namespace seqplat {

// oneDNN from this many elements of m on (4 MB of float32: an LSTM's W_hh above H=512)
constexpr int64_t kOnednnMinElements = int64_t(1) << 20;

namespace detail {

using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            c10::string_view, c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>);

// the typed handle of mkldnn::_linear_pointwise, or nullopt where torch was built without it
inline const std::optional<c10::TypedOperatorHandle<LinearFn>>& linear_op() {
  static const std::optional<c10::TypedOperatorHandle<LinearFn>> op =
      []() -> std::optional<c10::TypedOperatorHandle<LinearFn>> {
    if (!at::hasMKLDNN()) return std::nullopt;
    auto handle = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!handle.has_value()) return std::nullopt;
    return handle->typed<LinearFn>();
  }();
  return op;
}

// 0 auto, 1 always at::mm, 2 always oneDNN (where available); read at every prepare(), once per sequence
inline int forced_route() {
  const char* v = std::getenv("SEQPLAT_STEP_GEMM");
  if (v == nullptr) return 0;
  if (std::strcmp(v, "mm") == 0) return 1;
  if (std::strcmp(v, "onednn") == 0) return 2;
  return 0;
}

}  // namespace detail

// m prepared once per call for many products x @ m
struct StepMatrix {
  at::Tensor m;       // the right factor, any strides
  at::Tensor w;       // m^T as a contiguous [out, in] weight, when oneDNN runs the product
  bool onednn = false;
};

inline StepMatrix prepare(const at::Tensor& m) {
  StepMatrix s;
  s.m = m;
  const int route = detail::forced_route();
  const bool eligible = m.scalar_type() == at::kFloat && m.device().is_cpu() && detail::linear_op().has_value();
  s.onednn = eligible && (route == 2 || (route == 0 && m.numel() >= kOnednnMinElements));
  if (s.onednn) s.w = m.t().contiguous();  // free when m is the transpose of a contiguous weight
  return s;
}

inline at::Tensor product(const at::Tensor& x, const StepMatrix& s) {
  return (*detail::linear_op())
      .call(x.contiguous(), s.w, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
}

// out = x @ m
inline void mm_into(at::Tensor& out, const at::Tensor& x, const StepMatrix& s) {
  if (s.onednn) {
    out.copy_(product(x, s));
  } else {
    at::mm_out(out, x, s.m);
  }
}

// out = c + x @ m (c broadcast to out's shape: a bias row or another [rows, out] block)
inline void affine_into(at::Tensor& out, const at::Tensor& c, const at::Tensor& x, const StepMatrix& s) {
  if (s.onednn) {
    at::add_out(out, c, product(x, s));
  } else {
    at::addmm_out(out, c, x, s.m);
  }
}

// out += x @ m
inline void addmm_into(at::Tensor& out, const at::Tensor& x, const StepMatrix& s) {
  if (s.onednn) {
    out.add_(product(x, s));
  } else {
    out.addmm_(x, s.m);
  }
}

}  // namespace seqplat
