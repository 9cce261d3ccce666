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
//
// Packed panels: where the kernels are built with AVX-512 (-march=native on a CPU that has it), float32 products
// that are not thin skip both libraries as well. prepare() copies m once per call into column panels of 64
// (packed_block below: 6 rows x 64 columns in 24 registers). On the 2-core Zen 5, two threads, m prepared once,
// mean of 2000 products (best of five), against oneDNN with m in its blocked layout: [1, 256] x [256, 1024] 2.8
// against 13.2 us, [32, 256] x [256, 256] 8.7 against 17.3 us (480 against 242 GFLOP/s), [32, 256] x [256, 778]
// 29.2 against 39.4 us, [128, 1024] x [1024, 4096] 514 against 506 GFLOP/s (about the two cores' peak): oneDNN's
// call overhead is what the small products lost. The weight gradients over all steps (outer() below) run the same
// blocks. SEQPLAT_STEP_GEMM=packed sends every float32 product there, thin ones included; mm or onednn turn the
// panels off.
//
// Thin products, where m has at most kThinMax rows or columns (GAM-RHN's memory reads and writes: N = 10
// groups, an address width of 10), skip both libraries and run the loops below: at::mm spent 6-20 us on
// [32, 10] x [10, 768] or [32, 768] x [768, 10] (measured through the profiler, six of them per step),
// mostly call and packing overhead for 0.25 M multiply-adds. SEQPLAT_STEP_GEMM=mm or onednn turns the
// loops off as well.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/Dispatch.h>

#include "seqplat_cpu.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

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

// 0 auto, 1 always at::mm, 2 always oneDNN (where available), 3 the packed loops (where built) or else auto;
// read at every prepare(), once per sequence
inline int forced_route() {
  const char* v = std::getenv("SEQPLAT_STEP_GEMM");
  if (v == nullptr) return 0;
  if (std::strcmp(v, "mm") == 0) return 1;
  if (std::strcmp(v, "onednn") == 0) return 2;
  if (std::strcmp(v, "packed") == 0) return 3;
  return 0;
}

}  // namespace detail

// the hand loops take m with at most this many rows (inner dimension) or columns (output width)
constexpr int64_t kThinMax = 32;

// The packed route: m's columns in panels of kPanel (four 512-bit registers of float32), each panel [K, kPanel]
// contiguous, so a block of kBlockRows output rows by kPanel columns accumulates in 24 registers while the K rows
// of the panel stream past (one broadcast of x per row and step of K, four loads of the panel, 24 FMAs).
constexpr int64_t kPanel = 64;
constexpr int64_t kBlockRows = 6;
// below this many multiply-adds (a few microseconds of work) a product runs on the calling thread, without a
// parallel region
constexpr int64_t kPackedSerialMacs = int64_t(1) << 17;

#if (defined(__GNUC__) || defined(__clang__)) && defined(__AVX512F__)
#define SEQPLAT_PACKED_GEMM 1
#else
#define SEQPLAT_PACKED_GEMM 0
#endif

namespace detail {

// float32 m on a CPU, built with AVX-512 (-march=native on such a CPU) and running on one, route auto or packed
inline bool packed_can_run(const at::Tensor& m) {
  const int route = forced_route();
  return SEQPLAT_PACKED_GEMM && (route == 0 || route == 3) && m.scalar_type() == at::kFloat && m.device().is_cpu() &&
         m.dim() == 2 && m.numel() > 0 && cpu_has_avx512();
}

// m [K, N] (any strides) as [P, K, kPanel] panels, the last one zero-padded
inline at::Tensor pack_panels(const at::Tensor& m) {
  const int64_t K = m.size(0), N = m.size(1), P = (N + kPanel - 1) / kPanel;
  at::Tensor padded = at::zeros({K, P * kPanel}, m.options());
  padded.narrow(1, 0, N).copy_(m);
  return padded.view({K, P, kPanel}).permute({1, 0, 2}).contiguous();
}

// registers of 16 float32 lanes that a panel of width w fills: 1 .. kPanel / 16
inline int64_t panel_vectors(int64_t w) { return (w + 15) / 16; }

#if SEQPLAT_PACKED_GEMM
typedef float f32x16 __attribute__((vector_size(64)));

// out[R, w] (+)= x[R, K] @ panel[K, :w] for R <= kBlockRows rows and w <= 16 V: x[r, k] at x[r * xs + k * xk] (xk = 1
// for the step products, xs = 1 for outer products, where x is the transpose of a row-major factor), out's rows os
// apart. V < 4 serves a narrow last panel (GAM-RHN's [256, 778] has 10 columns in its 13th): only the registers that
// hold columns are loaded and multiplied, a quarter of the work at w <= 16.
template <int R, bool accumulate, bool unit_k, int V = kPanel / 16>
inline void packed_block(const float* x, int64_t xs, int64_t xk, const float* panel, int64_t K, float* out,
                         int64_t os, int64_t w) {
  static_assert(V >= 1 && V <= kPanel / 16, "a panel holds kPanel / 16 registers");
  f32x16 acc[R][V];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) acc[r][v] = f32x16{};
  }
  for (int64_t k = 0; k < K; ++k) {
    f32x16 b[V];
    for (int v = 0; v < V; ++v) b[v] = *reinterpret_cast<const f32x16*>(panel + k * kPanel + 16 * v);
    const float* xcol = x + (unit_k ? k : k * xk);
    for (int r = 0; r < R; ++r) {
      const float a = xcol[r * xs];
      for (int v = 0; v < V; ++v) acc[r][v] += a * b[v];
    }
  }
  // out's rows need not be 64-byte aligned: memcpy to and from them (unaligned vector moves)
  if (w == 16 * V) {
    for (int r = 0; r < R; ++r) {
      for (int v = 0; v < V; ++v) {
        float* o = out + r * os + 16 * v;
        f32x16 sum = acc[r][v];
        if (accumulate) {
          f32x16 old;
          std::memcpy(&old, o, sizeof old);
          sum += old;
        }
        std::memcpy(o, &sum, sizeof sum);
      }
    }
    return;
  }
  for (int r = 0; r < R; ++r) {
    float row[16 * V];
    std::memcpy(row, acc[r], sizeof row);
    float* o = out + r * os;
    for (int64_t j = 0; j < w; ++j) o[j] = accumulate ? o[j] + row[j] : row[j];
  }
}

// rows [0, rows) of one panel of width w <= 16 V: blocks of kBlockRows, then the remainder
template <bool accumulate, bool unit_k, int V>
inline void packed_rows_v(const float* x, int64_t xs, int64_t xk, const float* panel, int64_t K, float* out,
                          int64_t os, int64_t rows, int64_t w) {
  int64_t r = 0;
  for (; r + kBlockRows <= rows; r += kBlockRows) {
    packed_block<kBlockRows, accumulate, unit_k, V>(x + r * xs, xs, xk, panel, K, out + r * os, os, w);
  }
  const float* xr = x + r * xs;
  float* o = out + r * os;
  static_assert(kBlockRows == 6, "the remainder cases below cover 1 .. kBlockRows - 1 rows");
  switch (rows - r) {
    case 1: packed_block<1, accumulate, unit_k, V>(xr, xs, xk, panel, K, o, os, w); break;
    case 2: packed_block<2, accumulate, unit_k, V>(xr, xs, xk, panel, K, o, os, w); break;
    case 3: packed_block<3, accumulate, unit_k, V>(xr, xs, xk, panel, K, o, os, w); break;
    case 4: packed_block<4, accumulate, unit_k, V>(xr, xs, xk, panel, K, o, os, w); break;
    case 5: packed_block<5, accumulate, unit_k, V>(xr, xs, xk, panel, K, o, os, w); break;
    default: break;
  }
}

// rows [0, rows) of one panel of width w, through as many registers per row as its columns need
template <bool accumulate, bool unit_k>
inline void packed_rows(const float* x, int64_t xs, int64_t xk, const float* panel, int64_t K, float* out, int64_t os,
                        int64_t rows, int64_t w) {
  static_assert(kPanel == 64, "the cases below cover 1 .. 4 registers");
  switch (panel_vectors(w)) {
    case 1: packed_rows_v<accumulate, unit_k, 1>(x, xs, xk, panel, K, out, os, rows, w); break;
    case 2: packed_rows_v<accumulate, unit_k, 2>(x, xs, xk, panel, K, out, os, rows, w); break;
    case 3: packed_rows_v<accumulate, unit_k, 3>(x, xs, xk, panel, K, out, os, rows, w); break;
    default: packed_rows_v<accumulate, unit_k, 4>(x, xs, xk, panel, K, out, os, rows, w); break;
  }
}
#endif

// threads for a product of `macs` multiply-adds: 1 below kPackedSerialMacs, with one thread, or inside a parallel
// region
inline int64_t packed_threads(int64_t macs) {
  const bool serial = at::get_num_threads() == 1 || at::in_parallel_region() || macs < kPackedSerialMacs;
  return serial ? 1 : at::get_num_threads();
}

// chunks of output rows (`blocks` blocks of kBlockRows) per column unit: one where there are at least two units per
// thread, else as many as give every thread two tasks
inline int64_t packed_row_chunks(int64_t units, int64_t blocks, int64_t threads) {
  return units >= 2 * threads ? 1 : std::min(blocks, (2 * threads + units - 1) / units);
}

// run(t0, t1) over tasks [0, tasks): on the calling thread, or split evenly over `threads`
template <typename F>
inline void run_packed_tasks(int64_t tasks, int64_t threads, const F& run) {
  if (threads == 1) {
    run(int64_t(0), tasks);
  } else {
    at::parallel_for(0, tasks, (tasks + threads - 1) / threads, run);
  }
}

}  // namespace detail

enum class Thin { kNone, kInner, kOuter };

// m prepared once per call for many products x @ m
struct StepMatrix {
  at::Tensor m;       // the right factor, any strides
  at::Tensor p;       // m in column panels [P, K, kPanel] (zero-padded), on the packed route
  at::Tensor w;       // m^T as an [out, in] weight (oneDNN's blocked layout when packed), on the oneDNN route
  bool onednn = false;  // oneDNN runs products of at least min_rows rows
  int64_t min_rows = 0;
  Thin thin = Thin::kNone;  // kInner: t = m, [K, N] row major; kOuter: t = m^T, [N, K] row major
  at::Tensor t;
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

// m prepared for the products of one call that runs `steps` steps. thin_ok = false keeps a thin m off the hand
// loops where the packed route can take it: they are built for GAM-RHN's widths of about 10; at a K or N of 32 with
// hundreds of columns on the other side the register blocks were several times faster (hyper_rhn's scales)
inline StepMatrix prepare(const at::Tensor& m, int64_t steps, bool thin_ok = true) {
  StepMatrix s;
  s.m = m;
  const bool floating = m.scalar_type() == at::kFloat || m.scalar_type() == at::kDouble;
  if (!thin_ok && detail::packed_can_run(m)) {
    s.p = detail::pack_panels(m);
    return s;
  }
  if (detail::forced_route() == 0 && floating && m.device().is_cpu() && m.dim() == 2 && m.numel() > 0) {
    if (m.size(0) <= kThinMax) {
      s.thin = Thin::kInner;
      s.t = m.contiguous();
      return s;
    }
    if (m.size(1) <= kThinMax) {
      s.thin = Thin::kOuter;
      s.t = m.t().contiguous();
      return s;
    }
  }
  if (detail::packed_can_run(m)) {
    s.p = detail::pack_panels(m);
    return s;
  }
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

namespace detail {

// out (+)= x @ m for rows [r0, r1) with K = m.size(0) small: each output row is built in chunks of kChunk
// columns held in registers while the K rows of m stream past
template <typename scalar_t, bool accumulate>
void thin_inner_rows(const scalar_t* x, int64_t xs, const scalar_t* m, int64_t K, int64_t N, scalar_t* out,
                     int64_t os, int64_t r0, int64_t r1) {
  constexpr int64_t kChunk = 64 / sizeof(scalar_t) * 4;  // four 512-bit registers
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* xr = x + r * xs;
    scalar_t* o = out + r * os;
    for (int64_t n0 = 0; n0 < N; n0 += kChunk) {
      // w: kChunk as a compile-time constant (the accumulators stay in registers) or the last chunk's width
      const auto chunk = [&](auto w) {
        scalar_t acc[kChunk];
        _Pragma("omp simd")
        for (int64_t j = 0; j < w; ++j) acc[j] = accumulate ? o[n0 + j] : scalar_t(0);
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t a = xr[k];
          const scalar_t* mk = m + k * N + n0;
          _Pragma("omp simd")
          for (int64_t j = 0; j < w; ++j) acc[j] += a * mk[j];
        }
        _Pragma("omp simd")
        for (int64_t j = 0; j < w; ++j) o[n0 + j] = acc[j];
      };
      if (N - n0 >= kChunk) {
        chunk(std::integral_constant<int64_t, kChunk>());
      } else {
        chunk(N - n0);
      }
    }
  }
}

// out (+)= x @ m for rows [r0, r1) with N = m.size(1) small, from mt = m^T [N, K]: all N dot products of a row at
// once, each loaded chunk of the row feeding N of them
template <typename scalar_t, bool accumulate>
void thin_outer_rows(const scalar_t* x, int64_t xs, const scalar_t* mt, int64_t K, int64_t N, scalar_t* out,
                     int64_t os, int64_t r0, int64_t r1) {
  constexpr int64_t kLanes = 64 / sizeof(scalar_t);  // one 512-bit register
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* xr = x + r * xs;
    scalar_t* o = out + r * os;
    scalar_t acc[kThinMax][kLanes];
    for (int64_t n = 0; n < N; ++n) {
      _Pragma("omp simd")
      for (int64_t j = 0; j < kLanes; ++j) acc[n][j] = scalar_t(0);
    }
    int64_t k0 = 0;
    for (; k0 + kLanes <= K; k0 += kLanes) {
      for (int64_t n = 0; n < N; ++n) {
        const scalar_t* mn = mt + n * K + k0;
        _Pragma("omp simd")
        for (int64_t j = 0; j < kLanes; ++j) acc[n][j] += xr[k0 + j] * mn[j];
      }
    }
    for (int64_t n = 0; n < N; ++n) {
      scalar_t sum = scalar_t(0);
      for (int64_t j = 0; j < kLanes; ++j) sum += acc[n][j];
      const scalar_t* mn = mt + n * K;
      for (int64_t k = k0; k < K; ++k) sum += xr[k] * mn[k];
      o[n] = accumulate ? o[n] + sum : sum;
    }
  }
}

// whether the hand loops can run this product: a thin m, x and out with unit column stride, one dtype
inline bool thin_applies(const at::Tensor& out, const at::Tensor& x, const StepMatrix& s) {
  return s.thin != Thin::kNone && x.dim() == 2 && out.dim() == 2 && x.stride(1) == 1 && out.stride(1) == 1 &&
         x.scalar_type() == s.t.scalar_type() && out.scalar_type() == s.t.scalar_type() && x.size(0) == out.size(0);
}

// out (+)= x @ m through the hand loops on raw rows (x [rows, K] rows xs apart, out [rows, N] rows os apart, unit
// column strides; s.t of scalar_t); rows in parallel chunks of at least 2^15 multiply-adds
template <typename scalar_t, bool accumulate>
void thin_rows_product(scalar_t* op, int64_t os, const scalar_t* xp, int64_t xs, int64_t rows, const StepMatrix& s) {
  const int64_t K = s.thin == Thin::kInner ? s.t.size(0) : s.t.size(1);
  const int64_t N = s.thin == Thin::kInner ? s.t.size(1) : s.t.size(0);
  const scalar_t* mp = s.t.const_data_ptr<scalar_t>();
  for_rows(rows, row_grain(K * N, int64_t(1) << 15), [&](int64_t r0, int64_t r1) {
    if (s.thin == Thin::kInner) {
      thin_inner_rows<scalar_t, accumulate>(xp, xs, mp, K, N, op, os, r0, r1);
    } else {
      thin_outer_rows<scalar_t, accumulate>(xp, xs, mp, K, N, op, os, r0, r1);
    }
  });
}

// out (+)= x @ m through the hand loops (thin_applies holds)
template <bool accumulate>
void thin_product(at::Tensor& out, const at::Tensor& x, const StepMatrix& s) {
  const int64_t rows = x.size(0);
  const int64_t K = s.thin == Thin::kInner ? s.t.size(0) : s.t.size(1);
  const int64_t N = s.thin == Thin::kInner ? s.t.size(1) : s.t.size(0);
  TORCH_CHECK(x.size(1) == K && out.size(1) == N, "seqplat: product shapes do not match: [", rows, ", ", x.size(1),
              "] x [", K, ", ", N, "] into ", out.sizes());
  AT_DISPATCH_FLOATING_TYPES(s.t.scalar_type(), "seqplat_thin_product", [&] {
    thin_rows_product<scalar_t, accumulate>(out.mutable_data_ptr<scalar_t>(), out.stride(0),
                                            x.const_data_ptr<scalar_t>(), x.stride(0), rows, s);
  });
}

// whether the packed loops run this product: m packed, float32 x and out with unit column stride
inline bool packed_applies(const at::Tensor& out, const at::Tensor& x, const StepMatrix& s) {
  return s.p.defined() && x.dim() == 2 && out.dim() == 2 && x.stride(1) == 1 && out.stride(1) == 1 &&
         x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat && x.size(0) == out.size(0);
}

// out (+)= x @ m through the packed loops on raw rows (as thin_rows_product; m packed). Each thread takes an equal
// share of the work, counted in registers x rows (a narrow last panel costs less), as one run of the panels in order:
// whole panels, cut at a block of rows where a share ends inside one. A thread thus reads about 1 / threads of m,
// the same part at every step (it stays in that core's cache), and no thread waits for another's extra panel: with
// whole panels as tasks, [32, 256] x [256, 778]'s 13 panels split 7 : 6 (the 13th, 10 columns wide, at full cost), one
// thread waiting for a seventh of the product's time.
template <bool accumulate>
void packed_rows_product(float* op, int64_t os, const float* xp, int64_t xs, int64_t rows, const StepMatrix& s) {
#if SEQPLAT_PACKED_GEMM
  const int64_t K = s.p.size(1), N = s.m.size(1), P = s.p.size(0);
  if (rows == 0) return;
  const float* pp = s.p.const_data_ptr<float>();
  const int64_t threads = packed_threads(rows * K * N);
  const int64_t full = N / kPanel;
  const int64_t total = (full * (kPanel / 16) + panel_vectors(N - full * kPanel)) * rows;
  // the row where work `c` into a panel of v registers falls, rounded to a block of rows, within [0, rows]
  const auto cut = [rows](int64_t c, int64_t v) {
    if (c <= 0) return int64_t(0);
    if (c >= v * rows) return rows;
    return std::min(rows, (c + v * kBlockRows / 2) / (v * kBlockRows) * kBlockRows);
  };
  const auto share = [&](int64_t i) {
    const int64_t begin = total * i / threads, end = total * (i + 1) / threads;
    int64_t done = 0;  // work of the panels before p
    for (int64_t p = 0; p < P && done < end; ++p) {
      const int64_t w = std::min(kPanel, N - p * kPanel), v = panel_vectors(w);
      const int64_t r0 = cut(begin - done, v), r1 = cut(end - done, v);
      if (r1 > r0) {
        packed_rows<accumulate, true>(xp + r0 * xs, xs, 1, pp + p * K * kPanel, K, op + r0 * os + p * kPanel, os,
                                      r1 - r0, w);
      }
      done += v * rows;
    }
  };
  run_packed_tasks(threads, threads, [&](int64_t i0, int64_t i1) {  // one share per thread
    for (int64_t i = i0; i < i1; ++i) share(i);
  });
#else
  TORCH_CHECK(false, "seqplat: the packed step products were not built (no AVX-512 at compile time)");
#endif
}

// out (+)= x @ m through the packed loops (packed_applies holds)
template <bool accumulate>
void packed_product(at::Tensor& out, const at::Tensor& x, const StepMatrix& s) {
  const int64_t rows = x.size(0), K = s.m.size(0), N = s.m.size(1);
  TORCH_CHECK(x.size(1) == K && out.size(1) == N, "seqplat: product shapes do not match: [", rows, ", ", x.size(1),
              "] x [", K, ", ", N, "] into ", out.sizes());
  packed_rows_product<accumulate>(out.mutable_data_ptr<float>(), out.stride(0), x.const_data_ptr<float>(), x.stride(0),
                                  rows, s);
}

}  // namespace detail

// out (+)= x @ m on raw rows, without tensor views: x [rows, K] with rows xs apart, out [rows, N] with rows os apart,
// unit column strides, m.size(0) == K. Runs where m takes the packed or the thin route (the loops' per-step
// products at float32 on AVX-512 builds; GAM-RHN's thin ones) and returns true; returns false, computing nothing,
// where the product needs a library route (at::mm, oneDNN), which takes tensors: the caller then makes the views.
template <typename scalar_t, bool accumulate>
inline bool rows_product(scalar_t* out, int64_t os, const scalar_t* x, int64_t xs, int64_t rows, const StepMatrix& s) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (s.p.defined()) {
      detail::packed_rows_product<accumulate>(out, os, x, xs, rows, s);
      return true;
    }
  }
  if (s.thin != Thin::kNone && s.t.scalar_type() == c10::CppTypeToScalarType<scalar_t>::value) {
    detail::thin_rows_product<scalar_t, accumulate>(out, os, x, xs, rows, s);
    return true;
  }
  return false;
}

inline at::Tensor product(const at::Tensor& x, const StepMatrix& s) {
  return (*detail::linear_op())
      .call(x.contiguous(), s.w, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
}

// out = x @ m
inline void mm_into(at::Tensor& out, const at::Tensor& x, const StepMatrix& s) {
  if (detail::packed_applies(out, x, s)) {
    detail::packed_product<false>(out, x, s);
  } else if (detail::thin_applies(out, x, s)) {
    detail::thin_product<false>(out, x, s);
  } else if (via_onednn(x, s)) {
    out.copy_(product(x, s));
  } else {
    at::mm_out(out, x, s.m);
  }
}

// x @ m without a copy: computed into `out` on the at::mm route (and `out` returned), into a new tensor on the
// oneDNN route (`out` untouched). The caller reads the product from the returned tensor.
inline at::Tensor mm_result(at::Tensor& out, const at::Tensor& x, const StepMatrix& s) {
  if (detail::packed_applies(out, x, s)) {
    detail::packed_product<false>(out, x, s);
    return out;
  }
  if (detail::thin_applies(out, x, s)) {
    detail::thin_product<false>(out, x, s);
    return out;
  }
  if (via_onednn(x, s)) return product(x, s);
  at::mm_out(out, x, s.m);
  return out;
}

// out = c + x @ m (c broadcast to out's shape: a bias row or another [rows, out] block)
inline void affine_into(at::Tensor& out, const at::Tensor& c, const at::Tensor& x, const StepMatrix& s) {
  if (detail::packed_applies(out, x, s)) {
    out.copy_(c);
    detail::packed_product<true>(out, x, s);
  } else if (via_onednn(x, s)) {
    at::add_out(out, c, product(x, s));
  } else {
    at::addmm_out(out, c, x, s.m);
  }
}

// out += x @ m
inline void addmm_into(at::Tensor& out, const at::Tensor& x, const StepMatrix& s) {
  if (detail::packed_applies(out, x, s)) {
    detail::packed_product<true>(out, x, s);
  } else if (detail::thin_applies(out, x, s)) {
    detail::thin_product<true>(out, x, s);
  } else if (via_onednn(x, s)) {
    out.add_(product(x, s));
  } else {
    out.addmm_(x, s.m);
  }
}

// out (+)= x @ m for a loop that works on raw rows (as rows_product): on the library routes the rows are wrapped as
// tensors here (at::from_blob, no copy) and go through mm_into / addmm_into, so callers make no views of their own
template <typename scalar_t, bool accumulate>
void product_rows(scalar_t* out, int64_t os, const scalar_t* x, int64_t xs, int64_t rows, const StepMatrix& s) {
  if (rows_product<scalar_t, accumulate>(out, os, x, xs, rows, s)) return;
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value).device(at::kCPU);
  const at::Tensor xt = at::from_blob(const_cast<scalar_t*>(x), {rows, s.m.size(0)}, {xs, 1}, options);
  at::Tensor ot = at::from_blob(out, {rows, s.m.size(1)}, {os, 1}, options);
  if constexpr (accumulate) {
    addmm_into(ot, xt, s);
  } else {
    mm_into(ot, xt, s);
  }
}

// a^T @ b for a [rows, m] and b [rows, n] (a weight gradient summed over all steps' rows): [m, n]. On CPUs
// with AVX-512, float32 results of at least kOnednnMinOuter elements go through oneDNN's inner-product
// backward-weights primitive, which reads both factors in their row layout (MKL's sgemm runs AVX2 on AMD
// CPUs; seqplat/core/gemm.py has the measurements and the same rule for the Python backwards);
// SEQPLAT_STEP_GEMM forces a route as for the step products.
constexpr int64_t kOnednnMinOuter = int64_t(1) << 14;

// On the packed route (AVX-512 builds, float32, route auto or packed) outer products run the step products' register
// blocks as well: c = a^T @ b reads a [rows, m] as the left factor transposed (6 of its columns per block, a
// broadcast each) and b [rows, n] in chunks of kOuterChunk rows, copied as 64-column panels into a buffer (up to
// kOuterPanels panels: 256 KB, in L2). For each chunk, each 6-column block of a (in L1) meets every panel of the
// buffer, so a is read once per chunk and task whatever n is (an LSTM's [3200, 4096] gate gradients against its
// [3200, 1024] states at H=1024: read once per panel instead, 16 times, the product ran at half speed). Neither
// factor is copied whole, and both may be column blocks of wider buffers. Measured against oneDNN's
// backward-weights primitive (which needs both in its tensor type, a copy each) in docs/performance.md (seventh
// 2026-12-07 session).
constexpr int64_t kOuterChunk = 128;
constexpr int64_t kOuterPanels = 8;

namespace detail {

// whether outer products of this dtype and device take the packed route
inline bool packed_outer_route(const at::TensorOptions& options) {
  const int route = forced_route();
  return SEQPLAT_PACKED_GEMM && (route == 0 || route == 3) && options.dtype() == at::kFloat &&
         options.device().is_cpu() && cpu_has_avx512();
}

inline bool packed_outer_applies(const at::Tensor& a, const at::Tensor& b) {
  return packed_outer_route(a.options()) && b.scalar_type() == at::kFloat && a.dim() == 2 && b.dim() == 2 &&
         a.size(0) == b.size(0) && a.size(0) > 0 && a.size(1) > 0 && b.size(1) > 0 && a.stride(1) == 1 &&
         b.stride(1) == 1;
}

#if SEQPLAT_PACKED_GEMM
// One block of an outer product c = a^T @ b on the calling thread: c[i0 : i0 + ni, the columns of panels
// p0 .. p0 + np) (+)= (a^T @ b) over rows [0, rows), for a [rows, *] and b [rows, n] with rows as and bs apart and
// c [*, n] row major. The rows go in chunks of kOuterChunk: the chunk's panels of b are copied into `panels`
// (np * kOuterChunk * kPanel floats, 64-byte aligned), then each block of 6 columns of a (in L1) meets every panel.
// accumulate = false writes c's block, true adds to it.
inline void outer_block(const float* ap, int64_t as, const float* bp, int64_t bs, int64_t rows, int64_t n, float* cp,
                        int64_t i0, int64_t ni, int64_t p0, int64_t np, bool accumulate, float* panels) {
  for (int64_t k0 = 0; k0 < rows; k0 += kOuterChunk) {
    const int64_t kc = std::min(kOuterChunk, rows - k0);
    for (int64_t q = 0; q < np; ++q) {  // panel q of the group: b[k0 : k0 + kc, j0 : j0 + w], zero-padded
      const int64_t j0 = (p0 + q) * kPanel, w = std::min(kPanel, n - j0);
      float* dst = panels + q * kOuterChunk * kPanel;
      for (int64_t k = 0; k < kc; ++k) {
        std::memcpy(dst + k * kPanel, bp + (k0 + k) * bs + j0, sizeof(float) * w);
        if (w < kPanel) std::memset(dst + k * kPanel + w, 0, sizeof(float) * (kPanel - w));
      }
    }
    for (int64_t r = 0; r < ni; r += kBlockRows) {  // 6 columns of a against every panel of the group
      const int64_t nr = std::min(kBlockRows, ni - r);
      const float* x = ap + k0 * as + i0 + r;  // x[r', k] = a[k0 + k, i0 + r + r']
      for (int64_t q = 0; q < np; ++q) {
        const int64_t j0 = (p0 + q) * kPanel, w = std::min(kPanel, n - j0);
        float* out = cp + (i0 + r) * n + j0;
        const float* panel = panels + q * kOuterChunk * kPanel;
        if (k0 == 0 && !accumulate) {
          packed_rows<false, false>(x, 1, as, panel, kc, out, n, nr, w);
        } else {
          packed_rows<true, false>(x, 1, as, panel, kc, out, n, nr, w);
        }
      }
    }
  }
}

// c [m, n] += a^T @ b on the calling thread (outer_block over all of c), for a [rows, m] and b [rows, n] with rows as
// and bs apart: a sequence kernel's weight gradient summed block by block while the block is in cache.
// `scratch` holds the panels (reused between calls; sized here).
inline void outer_accumulate(const float* ap, int64_t as, const float* bp, int64_t bs, int64_t rows, int64_t m,
                             int64_t n, float* cp, std::vector<f32x16>& scratch) {
  const int64_t P = (n + kPanel - 1) / kPanel, group = std::min(P, kOuterPanels);
  scratch.resize(static_cast<size_t>(group * kOuterChunk * kPanel / 16));
  for (int64_t p0 = 0; p0 < P; p0 += group) {
    outer_block(ap, as, bp, bs, rows, n, cp, 0, m, p0, std::min(group, P - p0), true,
                reinterpret_cast<float*>(scratch.data()));
  }
}
#endif

// a^T @ b on the packed route (packed_outer_applies holds): [m, n], a new tensor. Tasks are groups of up to
// kOuterPanels panels of c's columns, split further into chunks of c's rows where there are fewer groups than two
// per thread; each task walks the rows of a and b in chunks, the first chunk writing c's blocks and the others adding
// to them.
inline at::Tensor packed_outer(const at::Tensor& a, const at::Tensor& b) {
  const int64_t rows = a.size(0), m = a.size(1), n = b.size(1);
  if (n < kPanel && m > n) {  // the panels would be mostly padding: c^T = b^T a has m columns
    return packed_outer(b, a).t().contiguous();
  }
  at::Tensor c = at::empty({m, n}, a.options());
#if SEQPLAT_PACKED_GEMM
  const float* ap = a.const_data_ptr<float>();
  const float* bp = b.const_data_ptr<float>();
  float* cp = c.mutable_data_ptr<float>();
  const int64_t as = a.stride(0), bs = b.stride(0);
  const int64_t P = (n + kPanel - 1) / kPanel;
  const int64_t threads = packed_threads(rows * m * n);
  // panel groups: as even as kOuterPanels allows, and at least one per thread where there are enough panels
  const int64_t groups = std::max((P + kOuterPanels - 1) / kOuterPanels, std::min(P, threads));
  const int64_t group_panels = (P + groups - 1) / groups;
  const int64_t blocks = (m + kBlockRows - 1) / kBlockRows;
  const int64_t chunks = packed_row_chunks(groups, blocks, threads);
  const int64_t chunk_rows = (blocks + chunks - 1) / chunks * kBlockRows;
  const auto run = [&](int64_t t0, int64_t t1) {
    std::vector<f32x16> buffer(static_cast<size_t>(group_panels * kOuterChunk * kPanel / 16));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p0 = (t % groups) * group_panels, i0 = (t / groups) * chunk_rows;
      const int64_t np = std::min(group_panels, P - p0), ni = std::min(chunk_rows, m - i0);
      if (np <= 0 || ni <= 0) continue;
      outer_block(ap, as, bp, bs, rows, n, cp, i0, ni, p0, np, false, reinterpret_cast<float*>(buffer.data()));
    }
  };
  run_packed_tasks(groups * chunks, threads, run);
#else
  TORCH_CHECK(false, "seqplat: the packed outer products were not built (no AVX-512 at compile time)");
#endif
  return c;
}

}  // namespace detail

}  // namespace seqplat

namespace at::native {
// exported by libtorch_cpu (ATen/native/mkldnn/MKLDNNCommon.h, a header torch does not install): the memory of a
// oneDNN tensor. Declared weak, so a torch without it (built without oneDNN, or another version) still loads the
// kernels: the address is then null and outer_factor() hands out plain tensors.
__attribute__((weak)) TORCH_API void* data_ptr_from_mkldnn(const at::Tensor& mkldnn_tensor);
}  // namespace at::native

namespace seqplat {

// A [rows, cols] buffer for the left factor of outer(): `dense` to write, and on the oneDNN route `onednn`, the same
// memory as oneDNN's tensor type (plain row-major layout), so outer() reads it without the copy that
// Tensor::to_mkldnn makes (1.9 ms for [3200, 1024] within an LSTM's training step, a third of the product).
// Off that route (another dtype, a CPU without AVX-512, SEQPLAT_STEP_GEMM=mm) `onednn` is undefined.
struct OuterFactor {
  at::Tensor dense;
  at::Tensor onednn;
};

inline OuterFactor outer_factor(int64_t rows, int64_t cols, const at::TensorOptions& options) {
  const bool onednn = !detail::packed_outer_route(options) && options.dtype() == at::kFloat &&
                      options.device().is_cpu() && detail::forced_route() != 1 &&
                      at::hasMKLDNN() && &at::native::data_ptr_from_mkldnn != nullptr &&
                      (detail::forced_route() == 2 || detail::cpu_has_avx512());
  if (!onednn || rows == 0 || cols == 0) return {at::empty({rows, cols}, options), at::Tensor()};
  at::Tensor twin = at::empty({rows, cols}, options.layout(at::kMkldnn));
  void* data = at::native::data_ptr_from_mkldnn(twin);
  at::Tensor dense = at::from_blob(data, {rows, cols}, [twin](void*) {}, options);  // keeps the memory's owner alive
  return {dense, twin};
}

namespace detail {
inline bool outer_via_onednn(const at::Tensor& a, const at::Tensor& b) {
  return onednn_can_run(a) && onednn_can_run(b) &&
         (forced_route() == 2 || (cpu_has_avx512() && a.size(1) * b.size(1) >= kOnednnMinOuter));
}

// (a^T @ b, with `sum` the column sums of a, else undefined) through oneDNN's backward-weights primitive, a already
// in oneDNN's tensor type
inline std::pair<at::Tensor, at::Tensor> backward_weights(const at::Tensor& a_mkldnn, const at::Tensor& b, bool sum) {
  const at::Tensor shape = at::empty({a_mkldnn.size(1), b.size(1)}, b.options()).to_mkldnn();
  auto grads = at::mkldnn_linear_backward_weights(a_mkldnn, b.contiguous().to_mkldnn(), shape, sum);
  return {std::get<0>(grads).to_dense(), sum ? std::get<1>(grads).to_dense() : at::Tensor()};
}

// a's oneDNN twin, or a copy of a.dense into oneDNN's tensor type where it has none
inline at::Tensor onednn_of(const OuterFactor& a) {
  return a.onednn.defined() ? a.onednn : a.dense.contiguous().to_mkldnn();
}
}  // namespace detail

inline at::Tensor outer(const at::Tensor& a, const at::Tensor& b) {
  if (detail::packed_outer_applies(a, b)) return detail::packed_outer(a, b);
  if (!detail::outer_via_onednn(a, b)) return at::mm(a.t(), b);
  return detail::backward_weights(a.contiguous().to_mkldnn(), b, false).first;
}

// outer(a.dense, b) reading a's oneDNN twin where there is one
inline at::Tensor outer(const OuterFactor& a, const at::Tensor& b) {
  if (detail::packed_outer_applies(a.dense, b)) return detail::packed_outer(a.dense, b);
  if (!detail::outer_via_onednn(a.dense, b)) return at::mm(a.dense.t(), b);
  return detail::backward_weights(detail::onednn_of(a), b, false).first;
}

// (a^T @ b, the column sums of a): the weight and bias gradients of a linear layer b -> a; on the oneDNN route one
// backward-weights call computes both
inline std::pair<at::Tensor, at::Tensor> outer_with_sum(const OuterFactor& a, const at::Tensor& b) {
  if (detail::packed_outer_applies(a.dense, b)) return {detail::packed_outer(a.dense, b), a.dense.sum(0)};
  if (!detail::outer_via_onednn(a.dense, b)) return {at::mm(a.dense.t(), b), a.dense.sum(0)};
  return detail::backward_weights(detail::onednn_of(a), b, true);
}

// (a^T @ b1, a^T @ b2, and with `sum` the column sums of a, else undefined): the weight gradients of two matrices
// fed by the same pre-activation gradient a (an LSTM's W_hh and W_ih) and of its bias; on the oneDNN route a is in
// oneDNN's tensor type once for both, and the second call computes the bias gradient too
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> outer_pair(const OuterFactor& a, const at::Tensor& b1,
                                                                 const at::Tensor& b2, bool sum = false) {
  if (detail::packed_outer_applies(a.dense, b1) && detail::packed_outer_applies(a.dense, b2)) {
    return {detail::packed_outer(a.dense, b1), detail::packed_outer(a.dense, b2), sum ? a.dense.sum(0) : at::Tensor()};
  }
  const bool o1 = detail::outer_via_onednn(a.dense, b1), o2 = detail::outer_via_onednn(a.dense, b2);
  at::Tensor am;
  if (o1 || o2) am = detail::onednn_of(a);
  at::Tensor g1 = o1 ? detail::backward_weights(am, b1, false).first : at::mm(a.dense.t(), b1);
  if (!o2) return {g1, at::mm(a.dense.t(), b2), sum ? a.dense.sum(0) : at::Tensor()};
  auto [g2, gsum] = detail::backward_weights(am, b2, sum);
  return {g1, g2, gsum};
}

}  // namespace seqplat
