// seqplat's own GRU on CPU: the recurrence loop of the `gru` cell's impl="own" (own_gru.py).
//
// The equations of cells.py (Cho et al. 2014, torch's gate order r, z, n), numbered here:
//
//     (1) r = sigmoid(xp_r + W_hr h_{t-1} + b_hr),  z = sigmoid(xp_z + W_hz h_{t-1} + b_hz)
//     (2) n = tanh(xp_n + r * (W_hn h_{t-1} + b_hn))
//     (3) h_t = (1 - z) * n + z * h_{t-1}
//
// with xp_t = W_ih x_t + b_ih hoisted by the caller into one GEMM over all steps. Each forward step is
// one GEMM (h_{t-1} W_hh^T into a [B, 3H] scratch) and one fused elementwise pass that writes r, z, n,
// hn = W_hn h_{t-1} + b_hn (the backward needs it) and h_t. Each backward step is one fused pass that
// writes the gradients of the pre-activations (for xp, and for the recurrent products, where n's differs
// by the factor r) and z * dh, then one GEMM adds dgh W_hh. After the loop the caller computes grad W_hh
// as one GEMM over all T*B rows and grad b_hh as one sum.
//
// Layout: time major and contiguous; hs [T+1, B, H] holds h_0 first. Rows run in parallel
// (at::parallel_for, compiled with -fopenmp by seqplat.core.cpp_ext) when a step has two chunks' worth.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "seqplat_cpu.h"
#include "seqplat_gemm.h"

#include <algorithm>
#include <cmath>
#include <tuple>

namespace {

using seqplat::for_rows;
using seqplat::row_grain;
using seqplat::sigmoid;

template <typename scalar_t>
void forward_cell(const scalar_t* gh, const scalar_t* xp, const scalar_t* b_hh, const scalar_t* h_prev, scalar_t* act,
                  scalar_t* hn_out, scalar_t* h, int64_t B, int64_t H) {
  for_rows(B, row_grain(3 * H, 12288), [&](int64_t begin, int64_t end) {
    for (int64_t r_ = begin; r_ < end; ++r_) {
      const scalar_t* gr = gh + r_ * 3 * H;
      const scalar_t* xr = xp + r_ * 3 * H;
      scalar_t* ar = act + r_ * 3 * H;
      const int64_t o_ = r_ * H;
#pragma omp simd
      for (int64_t k = 0; k < H; ++k) {
        const scalar_t r = sigmoid(xr[k] + gr[k] + b_hh[k]);                  // (1)
        const scalar_t z = sigmoid(xr[H + k] + gr[H + k] + b_hh[H + k]);      // (1)
        const scalar_t hn = gr[2 * H + k] + b_hh[2 * H + k];
        const scalar_t n = std::tanh(xr[2 * H + k] + r * hn);                 // (2)
        const scalar_t hp = h_prev[o_ + k];
        ar[k] = r;
        ar[H + k] = z;
        ar[2 * H + k] = n;
        hn_out[o_ + k] = hn;
        h[o_ + k] = n + z * (hp - n);                                         // (3)
      }
    }
  });
}

// h_t's gradient is dh + dh_mm + g_y: dh holds z dh_{t+1}'s share on entry and z * dh_t on exit, dh_mm the
// product dgh_{t+1} W_hh (zeros at the last step)
template <typename scalar_t>
void backward_cell(const scalar_t* act, const scalar_t* hn_in, const scalar_t* h_prev, const scalar_t* g_y,
                   const scalar_t* dh_mm, scalar_t* dh, scalar_t* dxp, scalar_t* dgh, int64_t B, int64_t H) {
  for_rows(B, row_grain(3 * H, 12288), [&](int64_t begin, int64_t end) {
    for (int64_t r_ = begin; r_ < end; ++r_) {
      const scalar_t* ar = act + r_ * 3 * H;
      scalar_t* dxr = dxp + r_ * 3 * H;
      scalar_t* dgr = dgh + r_ * 3 * H;
      const int64_t o_ = r_ * H;
#pragma omp simd
      for (int64_t k = 0; k < H; ++k) {
        const scalar_t r = ar[k], z = ar[H + k], n = ar[2 * H + k];
        const scalar_t dht = dh[o_ + k] + dh_mm[o_ + k] + g_y[o_ + k];
        const scalar_t dz = dht * (h_prev[o_ + k] - n) * z * (scalar_t(1) - z);  // (3), (1)
        const scalar_t dn = dht * (scalar_t(1) - z) * (scalar_t(1) - n * n);     // (3), (2)
        const scalar_t dr = dn * hn_in[o_ + k] * r * (scalar_t(1) - r);           // (2), (1)
        dxr[k] = dr;
        dxr[H + k] = dz;
        dxr[2 * H + k] = dn;
        dgr[k] = dr;
        dgr[H + k] = dz;
        dgr[2 * H + k] = dn * r;  // (2): n's recurrent product is scaled by r
        dh[o_ + k] = dht * z;     // (3)
      }
    }
  });
}

// -> (act [T,B,3H] = r, z, n; hs [T+1,B,H]; hn [T,B,H])
std::tuple<at::Tensor, at::Tensor, at::Tensor> own_gru_forward(const at::Tensor& xp_in, const at::Tensor& w_hh_in,
                                                               const at::Tensor& b_hh_in, const at::Tensor& h0) {
  TORCH_CHECK(xp_in.dim() == 3 && xp_in.size(2) % 3 == 0, "own gru: xp must be [time, batch, 3*hidden], got ",
              xp_in.sizes());
  const int64_t T = xp_in.size(0), B = xp_in.size(1), H = xp_in.size(2) / 3;
  TORCH_CHECK(w_hh_in.dim() == 2 && w_hh_in.size(0) == 3 * H && w_hh_in.size(1) == H, "own gru: w_hh must be [",
              3 * H, ", ", H, "], got ", w_hh_in.sizes());
  TORCH_CHECK(b_hh_in.numel() == 3 * H, "own gru: b_hh must have ", 3 * H, " elements");
  TORCH_CHECK(h0.dim() == 2 && h0.size(0) == B && h0.size(1) == H, "own gru: h0 must be [", B, ", ", H, "]");
  TORCH_CHECK(xp_in.device().is_cpu(), "own gru: the C++ loop runs on CPU tensors only");
  for (const auto* t : {&w_hh_in, &b_hh_in, &h0}) {
    TORCH_CHECK(t->scalar_type() == xp_in.scalar_type(), "own gru: all inputs must share xp's dtype");
  }
  const at::Tensor xp = xp_in.contiguous(), w_hh = w_hh_in.contiguous(), b_hh = b_hh_in.contiguous();
  at::Tensor act = at::empty_like(xp);
  at::Tensor hs = at::empty({T + 1, B, H}, xp.options());
  at::Tensor hn = at::empty({T, B, H}, xp.options());
  at::Tensor gh = at::empty({B, 3 * H}, xp.options());
  hs[0].copy_(h0);
  const at::Tensor w_t = w_hh.t();
  const seqplat::StepMatrix wm = seqplat::prepare(w_t, T);
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "own_gru_forward", [&] {
    scalar_t* hs_p = hs.mutable_data_ptr<scalar_t>();
    const int64_t s1 = B * H, s3 = B * 3 * H;
    for (int64_t t = 0; t < T; ++t) {
      const at::Tensor p = seqplat::mm_result(gh, hs[t], wm);  // W_hh h_{t-1}
      forward_cell<scalar_t>(p.const_data_ptr<scalar_t>(), xp.const_data_ptr<scalar_t>() + t * s3,
                             b_hh.const_data_ptr<scalar_t>(), hs_p + t * s1, act.mutable_data_ptr<scalar_t>() + t * s3,
                             hn.mutable_data_ptr<scalar_t>() + t * s1, hs_p + (t + 1) * s1, B, H);
    }
  });
  return {act, hs, hn};
}

// -> (dxp [T,B,3H], dgh [T,B,3H] (the gradient of W_hh h_{t-1} + b_hh), dh_0)
std::tuple<at::Tensor, at::Tensor, at::Tensor> own_gru_backward(const at::Tensor& act, const at::Tensor& hs,
                                                                const at::Tensor& hn, const at::Tensor& w_hh_in,
                                                                const at::Tensor& g_y_in, const at::Tensor& g_hT) {
  const int64_t T = act.size(0), B = act.size(1), H = act.size(2) / 3;
  TORCH_CHECK(T >= 1, "own gru: the backward pass needs at least one step");
  const at::Tensor w_hh = w_hh_in.contiguous();
  const seqplat::StepMatrix wb = seqplat::prepare(w_hh, T);
  const at::Tensor g_y = g_y_in.to(act.scalar_type()).contiguous();
  at::Tensor dxp = at::empty_like(act);
  at::Tensor dgh = at::empty_like(act);
  at::Tensor dh = g_hT.to(act.scalar_type()).clone().contiguous();
  at::Tensor mm_buf = at::zeros_like(dh);
  at::Tensor dh_mm = mm_buf;  // dgh_{t+1} W_hh: in mm_buf (MKL) or a new tensor (oneDNN), read without a copy
  AT_DISPATCH_FLOATING_TYPES(act.scalar_type(), "own_gru_backward", [&] {
    const int64_t s1 = B * H, s3 = B * 3 * H;
    for (int64_t t = T - 1; t >= 0; --t) {
      backward_cell<scalar_t>(act.const_data_ptr<scalar_t>() + t * s3, hn.const_data_ptr<scalar_t>() + t * s1,
                              hs.const_data_ptr<scalar_t>() + t * s1, g_y.const_data_ptr<scalar_t>() + t * s1,
                              dh_mm.const_data_ptr<scalar_t>(), dh.mutable_data_ptr<scalar_t>(),
                              dxp.mutable_data_ptr<scalar_t>() + t * s3,
                              dgh.mutable_data_ptr<scalar_t>() + t * s3, B, H);
      dh_mm = seqplat::mm_result(mm_buf, dgh[t], wb);  // dh_{t-1} = z dh_t + dgh W_hh (its second term)
    }
  });
  dh.add_(dh_mm);
  return {dxp, dgh, dh};
}

// a^T @ b summed over the rows (W_hh's gradient over all steps) via seqplat::outer
at::Tensor own_gru_outer(const at::Tensor& a, const at::Tensor& b) { return seqplat::outer(a, b); }

}  // namespace

TORCH_LIBRARY(seqplat_own_gru, m) {
  m.def("forward(Tensor xp, Tensor w_hh, Tensor b_hh, Tensor h0) -> (Tensor, Tensor, Tensor)");
  m.def(
      "backward(Tensor act, Tensor hs, Tensor hn, Tensor w_hh, Tensor grad_y, Tensor grad_hT) -> "
      "(Tensor, Tensor, Tensor)");
  m.def("outer(Tensor a, Tensor b) -> Tensor");
}

TORCH_LIBRARY_IMPL(seqplat_own_gru, CPU, m) {
  m.impl("forward", &own_gru_forward);
  m.impl("backward", &own_gru_backward);
  m.impl("outer", &own_gru_outer);
}
