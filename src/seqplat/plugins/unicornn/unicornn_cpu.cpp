// UnICORNN recurrence on CPU: the forward pass and the reverse-recompute backward pass.
//
// Rusch & Mishra, "UnICORNN: A recurrent model for learning very long time dependencies",
// ICML 2021 (arXiv:2103.05487). Spec: shared/papers/unicornn.md, sections 2 and 4.
//
// Per column (b, h), with delta = dt * sigmoid(c) computed by the caller:
//
//     a_t = w * y_{t-1} + x_t
//     z_t = z_{t-1} - delta * (tanh(a_t) + alpha * y_{t-1})     (z first, with the old y)
//     y_t = y_{t-1} + delta * z_t                               (then y, with the new z)
//
// With a dropout mask m [B, H] (one per (batch, unit), shared by all steps), the layer's output is
// m * y_t: the forward pass writes it directly and the backward pass reads the gradient of y_t as
// m * grad_out, so the mask costs no pass of its own over [B, T, H].
//
// The forward pass writes y_1..y_T and the final (y_T, z_T) and keeps nothing else. The backward
// pass starts from (y_T, z_T), inverts the step to rebuild (y_{t-1}, z_{t-1}) from (y_t, z_t) and
// x_t, and accumulates the adjoints on the way back, so the recurrence needs O(B*H) memory
// instead of O(T*B*H).
//
// Layout: x, out, grad_out are [B, T, H] contiguous (batch first), so the inner loop over h is
// contiguous. Batch rows run in parallel (at::parallel_for); per-row partial sums of grad_w and
// grad_delta are returned as [B, H] and reduced by the caller, which keeps the result
// deterministic (no atomics).
//
// Speed: the loops over h carry `#pragma omp simd` and the file is compiled with
// `-O3 -ffast-math -fopenmp-simd` (plus `-march=native` and `-fopenmp` where accepted, see
// seqplat.core.cpp_ext; compile flags only, not link flags, so loading it does not switch
// the process to flush-denormals mode). With glibc >= 2.35 this turns std::tanh into libmvec's
// vector tanh; without it the tanh calls stay scalar and the kernel is several times slower.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "seqplat_gemm.h"

#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

void check_inputs(const at::Tensor& x, const at::Tensor& w, const at::Tensor& delta, const at::Tensor& y0,
                  const at::Tensor& z0, const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(x.dim() == 3, "unicornn: x must be [batch, time, hidden], got ", x.sizes());
  const int64_t B = x.size(0), H = x.size(2);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == H, "unicornn: w must be [", H, "], got ", w.sizes());
  TORCH_CHECK(delta.dim() == 1 && delta.size(0) == H, "unicornn: delta must be [", H, "], got ", delta.sizes());
  TORCH_CHECK(y0.dim() == 2 && y0.size(0) == B && y0.size(1) == H, "unicornn: y0 must be [", B, ", ", H, "]");
  TORCH_CHECK(z0.dim() == 2 && z0.size(0) == B && z0.size(1) == H, "unicornn: z0 must be [", B, ", ", H, "]");
  TORCH_CHECK(x.device().is_cpu(), "unicornn: the C++ kernel runs on CPU tensors only");
  if (mask.has_value()) {
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == B && mask->size(1) == H, "unicornn: mask must be [", B, ", ",
                H, "], got ", mask->sizes());
    TORCH_CHECK(mask->scalar_type() == x.scalar_type(), "unicornn: the mask must share x's dtype");
  }
  for (const auto* t : {&w, &delta, &y0, &z0}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "unicornn: all inputs must share x's dtype");
  }
}

template <typename scalar_t>
void forward_impl(const scalar_t* x, const scalar_t* w, const scalar_t* delta, const scalar_t* y0,
                  const scalar_t* z0, const scalar_t* mask, scalar_t* out, scalar_t* yT, scalar_t* zT, int64_t B,
                  int64_t T, int64_t H, scalar_t alpha) {
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> y(H), z(H), m(H, scalar_t(1));
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t h = 0; h < H; ++h) {
        y[h] = y0[b * H + h];
        z[h] = z0[b * H + h];
        if (mask != nullptr) m[h] = mask[b * H + h];
      }
      const scalar_t* xb = x + b * T * H;
      scalar_t* ob = out + b * T * H;
      for (int64_t t = 0; t < T; ++t) {
        const scalar_t* xt = xb + t * H;
        scalar_t* ot = ob + t * H;
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) {
          const scalar_t y_old = y[h];
          const scalar_t a = w[h] * y_old + xt[h];
          const scalar_t z_new = z[h] - delta[h] * (std::tanh(a) + alpha * y_old);  // eq. (z update)
          const scalar_t y_new = y_old + delta[h] * z_new;                           // eq. (y update)
          z[h] = z_new;
          y[h] = y_new;
          ot[h] = y_new * m[h];  // the layer's output, dropout applied
        }
      }
      for (int64_t h = 0; h < H; ++h) {
        yT[b * H + h] = y[h];
        zT[b * H + h] = z[h];
      }
    }
  });
}

// The backward pass walks each row's steps from the last to the first. The hardware prefetchers follow
// ascending streams, not this descending walk of 1-4 KB rows, so without help every step waited on memory
// (measured at B=128, T=100, H=256 on one Zen 5 core: 5.6 ms per call against 1.3 ms for the forward).
// Each step asks for the rows it will read and write kPrefetchSteps steps later: with 1, 2, 4 and 8 steps
// ahead the same call took 1.63, 1.43, 1.64 and 2.00 ms on two cores (2.74 ms without), 3.1 ms on one.
constexpr int64_t kPrefetchSteps = 2;

template <typename scalar_t>
inline void prefetch_row(const scalar_t* x, const scalar_t* g, scalar_t* gx, int64_t H) {
  constexpr int64_t line = 64 / sizeof(scalar_t);
  for (int64_t h = 0; h < H; h += line) {
    __builtin_prefetch(x + h, 0, 3);
    __builtin_prefetch(g + h, 0, 3);
    __builtin_prefetch(gx + h, 1, 3);
  }
}

// The projection's weight gradient inside the backward: where the layer's input u [B*T, D] comes along (float32 on
// a build with the packed products), each batch row's grad x_b [T, H], just written and still in cache, goes into
// grad V += grad x_b^T u_b at once (seqplat::outer_accumulate) instead of one product over all of grad x after
// the loop, which read the [B*T, H] rows back from memory (H=256, B=128: about 3 ms of a 10.5 ms training step on
// two cores). The rows run in kSlabs fixed slabs, each summing into its own [H, D] partial, which the caller
// adds in slab order: the result does not depend on the number of threads.
constexpr int64_t kSlabs = 8;

// g_v_part: [slabs, H, D] zeros (or null: no projection), g_b_part: [B, H] (per-row sums of grad x, or null)
template <typename scalar_t>
void backward_impl(const scalar_t* x, const scalar_t* w, const scalar_t* delta, const scalar_t* yT,
                   const scalar_t* zT, const scalar_t* g_out, const scalar_t* g_yT, const scalar_t* g_zT,
                   const scalar_t* mask, scalar_t* g_x, scalar_t* g_w_part, scalar_t* g_delta_part, scalar_t* g_y0,
                   scalar_t* g_z0, int64_t B, int64_t T, int64_t H, scalar_t alpha, const scalar_t* u = nullptr,
                   int64_t D = 0, scalar_t* g_v_part = nullptr, scalar_t* g_b_part = nullptr, int64_t slabs = 0) {
  // rows [begin, end); with a projection, slab s's rows sum into partial s
  const auto rows = [&](int64_t begin, int64_t end, scalar_t* v_part) {
    std::vector<scalar_t> y(H), z(H), ybar(H), zbar(H), gw(H), gd(H), gbias(H), zeros(H, scalar_t(0)),
        m(H, scalar_t(1));
#if SEQPLAT_PACKED_GEMM
    std::vector<seqplat::detail::f32x16> scratch;
#endif
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* xb = x + b * T * H;
      const scalar_t* gb = g_out + b * T * H;
      scalar_t* gxb = g_x + b * T * H;
      for (int64_t h = 0; h < H; ++h) {
        if (mask != nullptr) m[h] = mask[b * H + h];
        y[h] = yT[b * H + h];
        z[h] = zT[b * H + h];
        // the gradient of y_t is m * grad_out[t] (the output is m * y_t)
        ybar[h] = g_yT[b * H + h] + (T > 0 ? m[h] * gb[(T - 1) * H + h] : scalar_t(0));
        zbar[h] = g_zT[b * H + h];
        gw[h] = 0;
        gd[h] = 0;
        gbias[h] = 0;
      }
      for (int64_t t = T - 1; t >= 0; --t) {
        const scalar_t* xt = xb + t * H;
        scalar_t* gxt = gxb + t * H;
        const scalar_t* g_prev = t > 0 ? gb + (t - 1) * H : zeros.data();  // no branch in the loop
        if (t >= kPrefetchSteps + 1) prefetch_row(xb + (t - kPrefetchSteps) * H, gb + (t - 1 - kPrefetchSteps) * H,
                                                  gxb + (t - kPrefetchSteps) * H, H);
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) {
          const scalar_t d = delta[h];
          const scalar_t z_t = z[h];
          // y_t = y_{t-1} + d * z_t
          gd[h] += ybar[h] * z_t;
          const scalar_t zb = zbar[h] + d * ybar[h];
          // rebuild the state before this step (the inverse of the symplectic Euler step)
          const scalar_t y_prev = y[h] - d * z_t;
          const scalar_t th = std::tanh(w[h] * y_prev + xt[h]);
          const scalar_t z_prev = z_t + d * (th + alpha * y_prev);
          // z_t = z_{t-1} - d * (tanh(w y_{t-1} + x_t) + alpha y_{t-1})
          const scalar_t s = scalar_t(1) - th * th;
          const scalar_t ga = -zb * d * s;  // adjoint of the pre-activation a_t
          gxt[h] = ga;
          gbias[h] += ga;
          gw[h] += ga * y_prev;
          gd[h] -= zb * (th + alpha * y_prev);
          ybar[h] = ybar[h] + ga * w[h] - zb * d * alpha + m[h] * g_prev[h];
          zbar[h] = zb;
          y[h] = y_prev;
          z[h] = z_prev;
        }
      }
      for (int64_t h = 0; h < H; ++h) {
        g_y0[b * H + h] = ybar[h];
        g_z0[b * H + h] = zbar[h];
        g_w_part[b * H + h] = gw[h];
        g_delta_part[b * H + h] = gd[h];
        if (g_b_part != nullptr) g_b_part[b * H + h] = gbias[h];
      }
      if constexpr (std::is_same_v<scalar_t, float>) {
#if SEQPLAT_PACKED_GEMM
        if (v_part != nullptr) seqplat::detail::outer_accumulate(gxb, H, u + b * T * D, D, T, H, D, v_part, scratch);
#endif
      }
    }
  };
  if (g_v_part == nullptr) {
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) { rows(begin, end, nullptr); });
    return;
  }
  at::parallel_for(0, slabs, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) rows(B * s / slabs, B * (s + 1) / slabs, g_v_part + s * H * D);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unicornn_forward(const at::Tensor& x_in, const at::Tensor& w_in,
                                                                 const at::Tensor& delta_in, const at::Tensor& y0_in,
                                                                 const at::Tensor& z0_in, double alpha,
                                                                 const std::optional<at::Tensor>& mask_in) {
  check_inputs(x_in, w_in, delta_in, y0_in, z0_in, mask_in);
  const std::optional<at::Tensor> mask =
      mask_in.has_value() ? std::optional<at::Tensor>(mask_in->contiguous()) : std::nullopt;
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous(), delta = delta_in.contiguous();
  const at::Tensor y0 = y0_in.contiguous(), z0 = z0_in.contiguous();
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2);
  at::Tensor out = at::empty_like(x);
  at::Tensor yT = at::empty_like(y0);
  at::Tensor zT = at::empty_like(z0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "unicornn_forward", [&] {
    forward_impl<scalar_t>(x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                           delta.const_data_ptr<scalar_t>(), y0.const_data_ptr<scalar_t>(),
                           z0.const_data_ptr<scalar_t>(), mask ? mask->const_data_ptr<scalar_t>() : nullptr,
                           out.mutable_data_ptr<scalar_t>(),
                           yT.mutable_data_ptr<scalar_t>(), zT.mutable_data_ptr<scalar_t>(), B, T, H,
                           static_cast<scalar_t>(alpha));
  });
  return {out, yT, zT};
}

// u, when given, is the input of the layer's projection x = u V^T + b ([B*T, D], batch first like x): the
// backward then also returns grad V = sum g_x^T u and grad b = sum g_x (else two empty tensors). On float32 with
// the packed products both are summed inside the loop (see kSlabs); otherwise g_x is written into a buffer that
// seqplat::outer_with_sum reads in place (oneDNN's backward-weights primitive, one call for both, where it runs).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> unicornn_backward(
    const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& delta_in, const at::Tensor& yT_in,
    const at::Tensor& zT_in, const at::Tensor& g_out_in, const at::Tensor& g_yT_in, const at::Tensor& g_zT_in,
    double alpha, const std::optional<at::Tensor>& mask_in, const std::optional<at::Tensor>& u) {
  check_inputs(x_in, w_in, delta_in, yT_in, zT_in, mask_in);
  const std::optional<at::Tensor> mask =
      mask_in.has_value() ? std::optional<at::Tensor>(mask_in->contiguous()) : std::nullopt;
  TORCH_CHECK(g_out_in.sizes() == x_in.sizes(), "unicornn: grad_out must have x's shape");
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous(), delta = delta_in.contiguous();
  const at::Tensor yT = yT_in.contiguous(), zT = zT_in.contiguous();
  const at::Tensor g_out = g_out_in.to(x.scalar_type()).contiguous();
  const at::Tensor g_yT = g_yT_in.to(x.scalar_type()).contiguous();
  const at::Tensor g_zT = g_zT_in.to(x.scalar_type()).contiguous();
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2);
  const seqplat::OuterFactor g_rows = seqplat::outer_factor(B * T, H, x.options());
  at::Tensor g_x = g_rows.dense.view({B, T, H});
  at::Tensor g_w_part = at::empty({B, H}, x.options());
  at::Tensor g_delta_part = at::empty({B, H}, x.options());
  at::Tensor g_y0 = at::empty_like(yT);
  at::Tensor g_z0 = at::empty_like(zT);
  // the projection's gradients inside the loop (float32 on a packed build), else one product after it
  at::Tensor u_rows;
  if (u.has_value()) {
    TORCH_CHECK(u->dim() == 2 && u->size(0) == B * T, "unicornn: u must be [B*T, D], got ", u->sizes());
    u_rows = u->to(x.scalar_type()).contiguous();
  }
  const bool fuse = u_rows.defined() && SEQPLAT_PACKED_GEMM && x.scalar_type() == at::kFloat &&
                    seqplat::detail::packed_outer_applies(g_rows.dense, u_rows) && B > 0;
  const int64_t slabs = std::min(B, kSlabs), D = u_rows.defined() ? u_rows.size(1) : 0;
  at::Tensor g_v_part = fuse ? at::zeros({slabs, H, D}, x.options()) : at::Tensor();
  at::Tensor g_b_part = fuse ? at::empty({B, H}, x.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "unicornn_backward", [&] {
    backward_impl<scalar_t>(x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                            delta.const_data_ptr<scalar_t>(), yT.const_data_ptr<scalar_t>(),
                            zT.const_data_ptr<scalar_t>(), g_out.const_data_ptr<scalar_t>(),
                            g_yT.const_data_ptr<scalar_t>(), g_zT.const_data_ptr<scalar_t>(),
                            mask ? mask->const_data_ptr<scalar_t>() : nullptr, g_x.mutable_data_ptr<scalar_t>(),
                            g_w_part.mutable_data_ptr<scalar_t>(), g_delta_part.mutable_data_ptr<scalar_t>(),
                            g_y0.mutable_data_ptr<scalar_t>(), g_z0.mutable_data_ptr<scalar_t>(), B, T, H,
                            static_cast<scalar_t>(alpha), fuse ? u_rows.const_data_ptr<scalar_t>() : nullptr, D,
                            fuse ? g_v_part.mutable_data_ptr<scalar_t>() : nullptr,
                            fuse ? g_b_part.mutable_data_ptr<scalar_t>() : nullptr, slabs);
  });
  at::Tensor g_v, g_b;
  if (fuse) {  // the slabs' partials, added in slab order
    g_v = g_v_part[0].clone();
    float* gv = g_v.mutable_data_ptr<float>();
    const float* part = g_v_part.const_data_ptr<float>();
    at::parallel_for(0, H * D, 1 << 14, [&](int64_t i0, int64_t i1) {
      for (int64_t s = 1; s < slabs; ++s) {
        const float* ps = part + s * H * D;
#pragma omp simd
        for (int64_t i = i0; i < i1; ++i) gv[i] += ps[i];
      }
    });
    g_b = g_b_part.sum(0);
  } else if (u_rows.defined()) {
    std::tie(g_v, g_b) = seqplat::outer_with_sum(g_rows, u_rows);
  }
  return {g_x, g_w_part.sum(0), g_delta_part.sum(0), g_y0, g_z0, g_v, g_b};
}

}  // namespace

TORCH_LIBRARY(seqplat_unicornn, m) {
  m.def(
      "forward(Tensor x, Tensor w, Tensor delta, Tensor y0, Tensor z0, float alpha, Tensor? mask=None) -> "
      "(Tensor, Tensor, Tensor)");
  m.def(
      "backward(Tensor x, Tensor w, Tensor delta, Tensor yT, Tensor zT, Tensor grad_out, Tensor grad_yT, "
      "Tensor grad_zT, float alpha, Tensor? mask=None, Tensor? u=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(seqplat_unicornn, CPU, m) {
  m.impl("forward", &unicornn_forward);
  m.impl("backward", &unicornn_backward);
}
