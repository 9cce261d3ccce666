// The per-step matrix products of seqplat's C++ loops: x @ m for a fixed m (a recurrent weight) and a
// thin x (one step's batch rows). seqplat.core.cpp_ext hashes this file into every kernel's build name.
//
// Two routes compute them: ATen's mm (MKL's sgemm) and oneDNN's inner product (torch's
// mkldnn::_linear_pointwise, what inductor calls for CPU linears). Which is faster depends on the CPU:
//
// * On a 2-core AVX2 AMD EPYC, mm streamed a large m from memory at every step ([32, 1024] x [1024, 4096]
//   at about 40 GFLOP/s) and oneDNN ran it 1.2-2x faster, but was slower for matrices that fit in
//   cache (H=256: 1 MB).
// * On a 2-core AVX-512 AMD EPYC (Zen 5), oneDNN was faster at every step shape measured, 1.1x at
//   [32, 256] x [256, 256] up to 2.5x at [32, 1024] x [1024, 4096]; MKL's sgemm does not use AVX-512 on
//   AMD CPUs.
//
// So float32 products go through oneDNN when the CPU has AVX-512 and the product has at least
// kOnednnMinMacsAvx512 multiply-adds (rows x elements of m: oneDNN's call costs about 11 us more than
// mm's, so [32, 256] x [256, 256] and [128, 128] x [128, 128] are where it starts to win), and otherwise
// when m has at least kOnednnMinElements elements; the rest go through at::mm. On the oneDNN route, a
// call of a kernel that runs at least kPackMinSteps steps first reorders m into oneDNN's blocked layout
// (mkldnn::_reorder_linear_weight, about the cost of two products) so that the products skip that
// reorder: 1.1-1.3x faster, the same results bit for bit. mm_result hands back oneDNN's output
// instead of copying it into the caller's buffer.
// SEQPLAT_STEP_GEMM=mm or onednn forces one route (for measuring); "auto" or unset picks as above.

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
// ... and on CPUs with AVX-512 from this many multiply-adds per product (rows x elements of m)
constexpr int64_t kOnednnMinMacsAvx512 = int64_t(1) << 21;
// pack m for oneDNN when a call runs at least this many steps (the reorder costs about two products)
constexpr int64_t kPackMinSteps = 16;

namespace detail {

using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            c10::string_view, c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>);

// the typed handle of a oneDNN op of torch, or nullopt where torch was built without oneDNN
template <typename Fn>
std::optional<c10::TypedOperatorHandle<Fn>> find_op(const char* name) {
  if (!at::hasMKLDNN()) return std::nullopt;
  auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
  if (!handle.has_value()) return std::nullopt;
  return handle->template typed<Fn>();
}

// mkldnn::_linear_pointwise (x @ w^T through oneDNN's inner product)
inline const std::optional<c10::TypedOperatorHandle<LinearFn>>& linear_op() {
  static const auto op = find_op<LinearFn>("mkldnn::_linear_pointwise");
  return op;
}

using ReorderFn = at::Tensor(const at::Tensor&, std::optional<int64_t>);

// mkldnn::_reorder_linear_weight (a weight in oneDNN's blocked layout)
inline const std::optional<c10::TypedOperatorHandle<ReorderFn>>& reorder_op() {
  static const auto op = find_op<ReorderFn>("mkldnn::_reorder_linear_weight");
  return op;
}

// whether the CPU runs AVX-512 (x86 only; read once)
inline bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return has;
#else
  return false;
#endif
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
  at::Tensor w;       // m^T as an [out, in] weight (oneDNN's blocked layout when packed), on the oneDNN route
  bool onednn = false;  // oneDNN runs products of at least min_rows rows
  int64_t min_rows = 0;
};

namespace detail {
// oneDNN is there, the route is not forced to at::mm, and t is float32 on the CPU
inline bool onednn_can_run(const at::Tensor& t) {
  return forced_route() != 1 && t.scalar_type() == at::kFloat && t.device().is_cpu() && linear_op().has_value();
}
}  // namespace detail

// whether x @ m goes through oneDNN (float32 CPU m; see the top of this file)
inline bool use_onednn(const at::Tensor& m) {
  const int route = detail::forced_route();
  if (!detail::onednn_can_run(m)) return false;
  if (route == 2) return true;
  return detail::cpu_has_avx512() ? m.numel() * 512 >= kOnednnMinMacsAvx512 : m.numel() >= kOnednnMinElements;
}

// the fewest rows of x for which x @ m goes through oneDNN (given use_onednn(m))
inline int64_t onednn_min_rows(const at::Tensor& m) {
  if (detail::forced_route() == 2 || !detail::cpu_has_avx512()) return 0;
  return (kOnednnMinMacsAvx512 + m.numel() - 1) / m.numel();
}

// m prepared for the products of one call that runs `steps` steps
inline StepMatrix prepare(const at::Tensor& m, int64_t steps) {
  StepMatrix s;
  s.m = m;
  s.onednn = use_onednn(m);
  if (!s.onednn) return s;
  s.min_rows = onednn_min_rows(m);
  s.w = m.t().contiguous();  // free when m is the transpose of a contiguous weight
  if (steps >= kPackMinSteps && detail::reorder_op().has_value()) {
    s.w = detail::reorder_op()->call(s.w, std::nullopt);
  }
  return s;
}

// whether this product goes through oneDNN
inline bool via_onednn(const at::Tensor& x, const StepMatrix& s) { return s.onednn && x.size(0) >= s.min_rows; }

inline at::Tensor product(const at::Tensor& x, const StepMatrix& s) {
  return (*detail::linear_op())
      .call(x.contiguous(), s.w, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
}

// out = x @ m
inline void mm_into(at::Tensor& out, const at::Tensor& x, const StepMatrix& s) {
  if (via_onednn(x, s)) {
    out.copy_(product(x, s));
  } else {
    at::mm_out(out, x, s.m);
  }
}

// x @ m without a copy: computed into `out` on the at::mm route (and `out` returned), into a new tensor on the
// oneDNN route (`out` untouched). The caller reads the product from the returned tensor.
inline at::Tensor mm_result(at::Tensor& out, const at::Tensor& x, const StepMatrix& s) {
  if (via_onednn(x, s)) return product(x, s);
  at::mm_out(out, x, s.m);
  return out;
}

// out = c + x @ m (c broadcast to out's shape: a bias row or another [rows, out] block)
inline void affine_into(at::Tensor& out, const at::Tensor& c, const at::Tensor& x, const StepMatrix& s) {
  if (via_onednn(x, s)) {
    at::add_out(out, c, product(x, s));
  } else {
    at::addmm_out(out, c, x, s.m);
  }
}

// out += x @ m
inline void addmm_into(at::Tensor& out, const at::Tensor& x, const StepMatrix& s) {
  if (via_onednn(x, s)) {
    out.add_(product(x, s));
  } else {
    out.addmm_(x, s.m);
  }
}

// a^T @ b for a [rows, m] and b [rows, n] (a weight gradient summed over all steps' rows): [m, n]. On CPUs
// with AVX-512, float32 results of at least kOnednnMinOuter elements go through oneDNN's inner-product
// backward-weights primitive, which reads both factors in their row layout (MKL's sgemm runs AVX2 on AMD
// CPUs; seqplat/core/gemm.py has the measurements and the same rule for the Python backwards);
// SEQPLAT_STEP_GEMM forces a route as for the step products.
constexpr int64_t kOnednnMinOuter = int64_t(1) << 14;

inline at::Tensor outer(const at::Tensor& a, const at::Tensor& b) {
  const bool onednn = detail::onednn_can_run(a) && detail::onednn_can_run(b) &&
                      (detail::forced_route() == 2 ||
                       (detail::cpu_has_avx512() && a.size(1) * b.size(1) >= kOnednnMinOuter));
  if (!onednn) return at::mm(a.t(), b);
  const at::Tensor shape = at::empty({a.size(1), b.size(1)}, a.options()).to_mkldnn();
  const auto grads = at::mkldnn_linear_backward_weights(a.contiguous().to_mkldnn(), b.contiguous().to_mkldnn(),
                                                        shape, false);
  return std::get<0>(grads).to_dense();
}

}  // namespace seqplat
