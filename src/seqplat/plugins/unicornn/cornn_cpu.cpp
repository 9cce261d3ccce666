// coRNN on CPU: the time loop of CoRNNRecurrence (cornn_fused.py), forward and backward, one call each.
//
// Rusch & Mishra, "Coupled Oscillatory Recurrent Neural Network (coRNN)", ICLR 2021 (arXiv:2010.00951);
// spec: shared/papers/unicornn.md, section 6 (equations C1-C2 as numbered in cell.py). With xp_t = V u_t + b hoisted by the caller into one
// product over all steps and W = [W_z, W_y] ([H, 2H], the recurrent columns of the cell's i2h weight, in the
// authors' concat order (u, z, y)):
//
//     pre_t = xp_t + W [z_{t-1}; y_{t-1}],   th_t = tanh(pre_t)
//     (C1)  z_t = z_{t-1} + dt (th_t - gamma y_{t-1} - eps z_{t-1})          (explicit damping, the authors' code)
//           z_t = (z_{t-1} + dt (th_t - gamma y_{t-1})) / (1 + dt eps)       (implicit damping)
//     (C2)  y_t = y_{t-1} + dt z_t
//
// Both cases are z_t = a z_{t-1} + c (th_t - gamma y_{t-1}) with (a, c) = (1 - dt eps, dt) or
// (1 / (1 + dt eps), dt / (1 + dt eps)). Each forward step is one product (the [B, 2H] states against W^T, the
// packed register blocks on AVX-512 builds) and one fused pass over the rows; each backward step one fused pass
// and one product (dL/dpre against W). The caller takes W's gradient as one product over all steps after the
// loop (seqplat::outer) and V's and b's from autograd through xp.
//
// Layout: batch first like the cell's input, rows b*T + t: xp, th, dpre and y are [B, T, H], zy is [B, T, 2H]
// and holds the state entering each step, [z_{t-1}, y_{t-1}], so that zy's and dpre's rows line up for W's
// gradient. A step's rows are T*H apart; seqplat::product_rows takes that stride.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "seqplat_cpu.h"
#include "seqplat_gemm.h"

#include <cmath>
#include <tuple>

namespace {

using seqplat::for_rows;
using seqplat::row_grain;

// elements per parallel chunk of a row pass, at least (the passes are a tanh and a few multiply-adds per unit)
constexpr int64_t kGrain = 8192;

struct Coeffs {
  double a, c, gamma, dt;  // z_t = a z_{t-1} + c (th_t - gamma y_{t-1}); y_t = y_{t-1} + dt z_t
};

Coeffs coeffs_of(double dt, double gamma, double epsilon, bool implicit) {
  if (implicit) return {1.0 / (1.0 + dt * epsilon), dt / (1.0 + dt * epsilon), gamma, dt};
  return {1.0 - dt * epsilon, dt, gamma, dt};
}

void check_forward(const at::Tensor& xp, const at::Tensor& w, const at::Tensor& y0, const at::Tensor& z0) {
  TORCH_CHECK(xp.dim() == 3, "cornn: xp must be [batch, time, hidden], got ", xp.sizes());
  const int64_t B = xp.size(0), H = xp.size(2);
  TORCH_CHECK(w.dim() == 2 && w.size(0) == H && w.size(1) == 2 * H, "cornn: w must be [", H, ", ", 2 * H, "], got ",
              w.sizes());
  TORCH_CHECK(y0.dim() == 2 && y0.size(0) == B && y0.size(1) == H, "cornn: y0 must be [", B, ", ", H, "]");
  TORCH_CHECK(z0.dim() == 2 && z0.size(0) == B && z0.size(1) == H, "cornn: z0 must be [", B, ", ", H, "]");
  TORCH_CHECK(xp.device().is_cpu(), "cornn: the C++ loop runs on CPU tensors only");
  for (const auto* t : {&w, &y0, &z0}) {
    TORCH_CHECK(t->scalar_type() == xp.scalar_type(), "cornn: all inputs must share xp's dtype");
  }
}

// -> (y [B, T, H], th [B, T, H], zy [B, T, 2H] (the state entering each step), y_T, z_T)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cornn_forward(
    const at::Tensor& xp_in, const at::Tensor& w_in, const at::Tensor& y0_in, const at::Tensor& z0_in, double dt,
    double gamma, double epsilon, bool implicit) {
  check_forward(xp_in, w_in, y0_in, z0_in);
  const at::Tensor xp = xp_in.contiguous(), y0 = y0_in.contiguous(), z0 = z0_in.contiguous();
  const int64_t B = xp.size(0), T = xp.size(1), H = xp.size(2);
  at::Tensor y = at::empty_like(xp), th = at::empty_like(xp);
  at::Tensor zy = at::empty({B, T, 2 * H}, xp.options());
  at::Tensor yT = at::empty_like(y0), zT = at::empty_like(z0);
  at::Tensor gh = at::empty({B, H}, xp.options());
  const seqplat::StepMatrix wm = seqplat::prepare(w_in.t(), T);  // [z; y] -> W [z; y]
  const Coeffs k = coeffs_of(dt, gamma, epsilon, implicit);
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "cornn_forward", [&] {
    const scalar_t a = static_cast<scalar_t>(k.a), c = static_cast<scalar_t>(k.c);
    const scalar_t g = static_cast<scalar_t>(k.gamma), d = static_cast<scalar_t>(k.dt);
    const scalar_t* xp_p = xp.const_data_ptr<scalar_t>();
    scalar_t* y_p = y.mutable_data_ptr<scalar_t>();
    scalar_t* th_p = th.mutable_data_ptr<scalar_t>();
    scalar_t* zy_p = zy.mutable_data_ptr<scalar_t>();
    scalar_t* gh_p = gh.mutable_data_ptr<scalar_t>();
    const scalar_t* y0_p = y0.const_data_ptr<scalar_t>();
    const scalar_t* z0_p = z0.const_data_ptr<scalar_t>();
    scalar_t* yT_p = yT.mutable_data_ptr<scalar_t>();
    scalar_t* zT_p = zT.mutable_data_ptr<scalar_t>();
    const int64_t rs = T * H, zs = T * 2 * H;  // a step's row strides
    if (T > 0) {
      for (int64_t b = 0; b < B; ++b) {
        std::copy(z0_p + b * H, z0_p + (b + 1) * H, zy_p + b * zs);
        std::copy(y0_p + b * H, y0_p + (b + 1) * H, zy_p + b * zs + H);
      }
    } else {
      yT.copy_(y0);
      zT.copy_(z0);
    }
    for (int64_t t = 0; t < T; ++t) {
      const scalar_t* zy_t = zy_p + t * 2 * H;
      seqplat::product_rows<scalar_t, false>(gh_p, H, zy_t, zs, B, wm);  // W [z_{t-1}; y_{t-1}]
      for_rows(B, row_grain(H, kGrain), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const scalar_t* zp = zy_t + b * zs;
          const scalar_t* yp = zp + H;
          const scalar_t* xr = xp_p + b * rs + t * H;
          const scalar_t* gr = gh_p + b * H;
          scalar_t* thr = th_p + b * rs + t * H;
          scalar_t* yr = y_p + b * rs + t * H;
          scalar_t* zn = t + 1 < T ? zy_p + b * zs + (t + 1) * 2 * H : zT_p + b * H;
          scalar_t* yn = t + 1 < T ? zn + H : yT_p + b * H;
_Pragma("omp simd")
          for (int64_t h = 0; h < H; ++h) {
            const scalar_t v = std::tanh(xr[h] + gr[h]);
            const scalar_t z = a * zp[h] + c * (v - g * yp[h]);  // (C1)
            const scalar_t yv = yp[h] + d * z;                  // (C2)
            thr[h] = v;
            yr[h] = yv;
            zn[h] = z;
            yn[h] = yv;
          }
        }
      });
    }
  });
  return {y, th, zy, yT, zT};
}

// -> (dpre [B, T, H] (the gradient of xp and of W [z; y]), dz_0, dy_0). grad_y [B, T, H]; grad_yT, grad_zT [B, H].
std::tuple<at::Tensor, at::Tensor, at::Tensor> cornn_backward(const at::Tensor& th, const at::Tensor& zy,
                                                              const at::Tensor& w_in, const at::Tensor& g_y_in,
                                                              const at::Tensor& g_yT_in, const at::Tensor& g_zT_in,
                                                              double dt, double gamma, double epsilon, bool implicit) {
  TORCH_CHECK(th.dim() == 3 && zy.dim() == 3 && zy.size(2) == 2 * th.size(2), "cornn: th [B, T, H] and zy [B, T, 2H]");
  const int64_t B = th.size(0), T = th.size(1), H = th.size(2);
  TORCH_CHECK(g_y_in.sizes() == th.sizes(), "cornn: grad_y must be [", B, ", ", T, ", ", H, "]");
  const auto dtype = th.scalar_type();
  const at::Tensor g_y = g_y_in.to(dtype).contiguous();
  const at::Tensor w = w_in.to(dtype).contiguous();
  const seqplat::StepMatrix wm = seqplat::prepare(w, T);  // dL/dpre -> dL/d[z; y]
  at::Tensor dpre = at::empty_like(th);
  at::Tensor dzy = at::cat({g_zT_in.to(dtype), g_yT_in.to(dtype)}, 1).contiguous();  // [dL/dz_t | dL/dy_t]
  const Coeffs k = coeffs_of(dt, gamma, epsilon, implicit);
  AT_DISPATCH_FLOATING_TYPES(dtype, "cornn_backward", [&] {
    const scalar_t a = static_cast<scalar_t>(k.a), c = static_cast<scalar_t>(k.c);
    const scalar_t g = static_cast<scalar_t>(k.gamma), d = static_cast<scalar_t>(k.dt);
    const scalar_t* th_p = th.const_data_ptr<scalar_t>();
    const scalar_t* gy_p = g_y.const_data_ptr<scalar_t>();
    scalar_t* dp_p = dpre.mutable_data_ptr<scalar_t>();
    scalar_t* dzy_p = dzy.mutable_data_ptr<scalar_t>();
    const int64_t rs = T * H;
    for (int64_t t = T - 1; t >= 0; --t) {
      for_rows(B, row_grain(H, kGrain), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          scalar_t* dz = dzy_p + b * 2 * H;
          scalar_t* dy = dz + H;
          const scalar_t* thr = th_p + b * rs + t * H;
          const scalar_t* gyr = gy_p + b * rs + t * H;
          scalar_t* dpr = dp_p + b * rs + t * H;
_Pragma("omp simd")
          for (int64_t h = 0; h < H; ++h) {
            const scalar_t gy = dy[h] + gyr[h];      // y_t is the output at t and feeds step t + 1
            const scalar_t gz = dz[h] + d * gy;      // (C2)
            const scalar_t v = thr[h];
            dpr[h] = gz * c * (scalar_t(1) - v * v);  // (C1), tanh'
            dz[h] = gz * a;                          // (C1): z_{t-1}
            dy[h] = gy - gz * c * g;                 // (C2), (C1): y_{t-1}
          }
        }
      });
      // pre_t = xp_t + W [z_{t-1}; y_{t-1}]
      seqplat::product_rows<scalar_t, true>(dzy_p, 2 * H, dp_p + t * H, rs, B, wm);
    }
  });
  return {dpre, dzy.narrow(1, 0, H).clone(), dzy.narrow(1, H, H).clone()};
}

// a^T @ b summed over the rows (W's gradient over all steps) through seqplat::outer
at::Tensor cornn_outer(const at::Tensor& a, const at::Tensor& b) { return seqplat::outer(a, b); }

}  // namespace

TORCH_LIBRARY(seqplat_cornn, m) {
  m.def(
      "forward(Tensor xp, Tensor w, Tensor y0, Tensor z0, float dt, float gamma, float epsilon, bool implicit) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "backward(Tensor th, Tensor zy, Tensor w, Tensor grad_y, Tensor grad_yT, Tensor grad_zT, float dt, float gamma, "
      "float epsilon, bool implicit) -> (Tensor, Tensor, Tensor)");
  m.def("outer(Tensor a, Tensor b) -> Tensor");
}

TORCH_LIBRARY_IMPL(seqplat_cornn, CPU, m) {
  m.impl("forward", &cornn_forward);
  m.impl("backward", &cornn_backward);
  m.impl("outer", &cornn_outer);
}
