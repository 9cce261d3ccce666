// seqplat's own LSTM on CPU: the recurrence loop of the `lstm` cell's impl="own" (own_lstm.py).
//
// The equations of cells.py (torch's gate order i, f, g, o):
//
//     (1) a = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh = [a_i, a_f, a_g, a_o]
//         i = sigmoid(a_i), f = sigmoid(a_f), g = tanh(a_g), o = sigmoid(a_o)
//     (2) c_t = f * c_{t-1} + i * g
//     (3) h_t = o * tanh(c_t)
//
// The caller hoists the input half of (1), xp_t = W_ih x_t + b_ih + b_hh, into one GEMM over all steps.
// Each forward step here is one product h_{t-1} W_hh^T (seqplat_gemm.h: MKL or oneDNN, read where it lands,
// no copy) and one fused elementwise pass over the batch rows that adds xp_t, activates the gates into
// the gate buffer and writes c_t, tanh(c_t) and h_t. Each backward step is one fused elementwise pass
// that adds the output gradient to dh, writes d a_t into a [T, B, 4H] buffer and updates dc, then one
// product for dh_{t-1} = d a_t W_hh. After the loop grad W_hh is a single GEMM over all T*B rows
// (seqplat::outer; this is what makes the backward cheaper than accumulating dW step by step).
//
// Layout: everything is time major and contiguous: xp, gates [T, B, 4H]; hs, cs [T+1, B, H] with
// hs[0] = h_0 and hs[t+1] = h_t; tcs [T, B, H] = tanh(c_t). Rows run in parallel (at::parallel_for)
// only when a step is large enough to pay for it.
//
// Speed: the row loops carry `#pragma omp simd` and seqplat.core.cpp_ext compiles the file with
// `-O3 -ffast-math -fopenmp-simd` (and `-march=native` and `-fopenmp` where accepted; compile flags only,
// not link flags), so std::exp / std::tanh become libmvec's vector functions with glibc >= 2.35 and
// at::parallel_for runs on torch's OpenMP threads.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "seqplat_cpu.h"
#include "seqplat_gemm.h"
#include "seqplat_lstm.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

namespace {

using seqplat::lstm_backward_cell;
using seqplat::lstm_forward_cell;

void check_inputs(const at::Tensor& xp, const at::Tensor& w_hh, const at::Tensor& h0, const at::Tensor& c0) {
  TORCH_CHECK(xp.dim() == 3 && xp.size(2) % 4 == 0, "own lstm: xp must be [time, batch, 4*hidden], got ", xp.sizes());
  const int64_t B = xp.size(1), H = xp.size(2) / 4;
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == 4 * H && w_hh.size(1) == H, "own lstm: w_hh must be [", 4 * H,
              ", ", H, "], got ", w_hh.sizes());
  TORCH_CHECK(h0.sizes() == c0.sizes() && h0.dim() == 2 && h0.size(0) == B && h0.size(1) == H,
              "own lstm: h0 and c0 must be [", B, ", ", H, "]");
  TORCH_CHECK(xp.device().is_cpu(), "own lstm: the C++ loop runs on CPU tensors only");
  for (const auto* t : {&w_hh, &h0, &c0}) {
    TORCH_CHECK(t->scalar_type() == xp.scalar_type(), "own lstm: all inputs must share xp's dtype");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> own_lstm_forward(const at::Tensor& xp_in,
                                                                            const at::Tensor& w_hh_in,
                                                                            const at::Tensor& h0,
                                                                            const at::Tensor& c0) {
  check_inputs(xp_in, w_hh_in, h0, c0);
  const at::Tensor xp = xp_in.contiguous(), w_hh = w_hh_in.contiguous();
  const int64_t T = xp.size(0), B = xp.size(1), H = xp.size(2) / 4;
  at::Tensor gates = at::empty_like(xp);
  at::Tensor hs = at::empty({T + 1, B, H}, xp.options());
  at::Tensor cs = at::empty({T + 1, B, H}, xp.options());
  at::Tensor tcs = at::empty({T, B, H}, xp.options());
  hs[0].copy_(h0);
  cs[0].copy_(c0);
  const at::Tensor w_t = w_hh.t();  // [H, 4H]
  const seqplat::StepMatrix wm = seqplat::prepare(w_t, T);
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "own_lstm_forward", [&] {
    for (int64_t t = 0; t < T; ++t) {
      at::Tensor a = gates[t];
      const at::Tensor p = seqplat::mm_result(a, hs[t], wm);  // (1) W_hh h_{t-1} (xp_t is added in forward_cell)
      lstm_forward_cell<scalar_t>(p.const_data_ptr<scalar_t>(), a.mutable_data_ptr<scalar_t>(),
                             xp[t].const_data_ptr<scalar_t>(), cs[t].const_data_ptr<scalar_t>(),
                             cs[t + 1].mutable_data_ptr<scalar_t>(), tcs[t].mutable_data_ptr<scalar_t>(),
                             hs[t + 1].mutable_data_ptr<scalar_t>(), B, H);
    }
  });
  return {gates, hs, cs, tcs};
}

// x, when given, is the input of the hoisted projection ([T*B, D], time major): grad W_ih = sum_t d a_t^T x_t and
// the bias gradient sum_t d a_t are then returned as the fifth and sixth outputs (else empty tensors), computed
// beside grad W_hh from d a written straight into oneDNN's tensor memory (seqplat::outer_factor, outer_pair).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> own_lstm_backward(
    const at::Tensor& gates, const at::Tensor& hs, const at::Tensor& cs, const at::Tensor& tcs,
    const at::Tensor& w_hh_in, const at::Tensor& g_y_in, const at::Tensor& g_hT, const at::Tensor& g_cT,
    const std::optional<at::Tensor>& x) {
  const int64_t T = gates.size(0), B = gates.size(1), H = gates.size(2) / 4;
  TORCH_CHECK(T >= 1, "own lstm: the backward pass needs at least one step");
  const at::Tensor w_hh = w_hh_in.contiguous();
  const at::Tensor g_y = g_y_in.to(gates.scalar_type()).contiguous();
  // d a of every step, [T*B, 4H]: also oneDNN's tensor type over the same memory for the weight gradients
  const seqplat::OuterFactor da_rows = seqplat::outer_factor(T * B, 4 * H, gates.options());
  at::Tensor da_all = da_rows.dense.view({T, B, 4 * H});
  at::Tensor dh = g_hT.to(gates.scalar_type()).clone().contiguous();  // dh_T without g_y[T-1]
  at::Tensor dh_buf = at::empty_like(dh);
  at::Tensor dc = g_cT.to(gates.scalar_type()).clone().contiguous();
  const seqplat::StepMatrix wb = seqplat::prepare(w_hh, T);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "own_lstm_backward", [&] {
    for (int64_t t = T - 1; t >= 0; --t) {
      at::Tensor da = da_all[t];
      lstm_backward_cell<scalar_t>(gates[t].const_data_ptr<scalar_t>(), cs[t].const_data_ptr<scalar_t>(),
                              tcs[t].const_data_ptr<scalar_t>(), dh.const_data_ptr<scalar_t>(),
                              g_y[t].const_data_ptr<scalar_t>(), dc.mutable_data_ptr<scalar_t>(),
                              da.mutable_data_ptr<scalar_t>(), B, H);
      // (1) a = xp_t + W_hh h_{t-1}: dh_{t-1} = d a_t W_hh (g_y[t-1] is added in the next backward_cell)
      dh = seqplat::mm_result(dh_buf, da, wb);  // backward_cell has read dh_t: dh_buf may take dh_{t-1}
    }
  });
  // (1) a = xp_t + W_hh h_{t-1}: grad W_hh = sum_t d a_t^T h_{t-1}, one GEMM over all T*B rows
  const at::Tensor h_prev = hs.narrow(0, 0, T).reshape({T * B, H});
  if (x.has_value()) {
    TORCH_CHECK(x->dim() == 2 && x->size(0) == T * B, "own lstm: x must be [T*B, D], got ", x->sizes());
    auto [grad_w, grad_w_ih, grad_b] = seqplat::outer_pair(da_rows, h_prev, x->to(gates.scalar_type()), true);
    return {da_all, grad_w, dh, dc, grad_w_ih, grad_b};
  }
  return {da_all, seqplat::outer(da_rows, h_prev), dh, dc, at::Tensor(), at::Tensor()};
}

}  // namespace

TORCH_LIBRARY(seqplat_own_lstm, m) {
  m.def("forward(Tensor xp, Tensor w_hh, Tensor h0, Tensor c0) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "backward(Tensor gates, Tensor hs, Tensor cs, Tensor tcs, Tensor w_hh, Tensor grad_y, Tensor grad_hT, "
      "Tensor grad_cT, Tensor? x=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(seqplat_own_lstm, CPU, m) {
  m.impl("forward", &own_lstm_forward);
  m.impl("backward", &own_lstm_backward);
}
