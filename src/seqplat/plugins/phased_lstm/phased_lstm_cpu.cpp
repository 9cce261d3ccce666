// Phased LSTM on CPU: the time loop of the cell's fast path (scan.py), forward and backward.
//
// Neil, Pfeiffer & Liu, "Phased LSTM: Accelerating Recurrent Network Training for Long or Event-based
// Sequences", NIPS 2016. Spec: shared/papers/phased_lstm.md. Equations as numbered in cell.py, gate
// order i, f, g, o, with xp_j = x_j W_x + b hoisted out of the loop and the openness k_j (T1)-(T2)
// computed for all steps beforehand (neither depends on the state):
//
//     (L1) z = xp_j + h_{j-1} W_h
//     (L2) i = sigmoid(z_i + w_ci c_{j-1}),  f = sigmoid(z_f + w_cf c_{j-1}),  g = tanh(z_g)
//     (L3) c~ = f c_{j-1} + i g
//     (L4) o = sigmoid(z_o + w_co c~),  h~ = o tanh(c~)
//     (P1) c_j = k c~ + (1 - k) c_{j-1}
//     (P2) h_j = k h~ + (1 - k) h_{j-1}
//
// Each forward step is one GEMM (h_{j-1} W_h into the step's slice of the [T, B, 4H] gate buffer) and one
// fused elementwise pass that adds xp_j, activates the gates in place and writes c~, tanh(c~), c_j, h_j. Each backward
// step is one fused elementwise pass (the adjoints of (P2) back to (L1), and of k) and one GEMM for
// h_{j-1}'s share of dz W_h^T. After the loop the caller computes grad W_h as one GEMM over all T*B
// rows, and the peephole gradients as sums over the saved dz.
//
// `clip` (>= 0) reproduces Lasagne's grad_clipping as scan.py does: dz is clamped before it flows to
// h_{j-1}, W_h and xp; the peephole terms read the unclipped dz. Without peepholes the caller passes
// zeros. Layout: time major and contiguous; hs [T+1, B, H] and cs [T+1, B, H] hold h_0/c_0 first.
// Rows run in parallel (at::parallel_for, compiled with -fopenmp by seqplat.core.cpp_ext) when a step
// has two chunks' worth of them.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "seqplat_cpu.h"
#include "seqplat_gemm.h"

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace {

using seqplat::for_rows;
using seqplat::row_grain;
using seqplat::sigmoid;

// `p` holds h_{j-1} W_h (it may be `z` itself; xp_j is added here); the activated i, f, g, o go to `z`
template <typename scalar_t>
void forward_cell(const scalar_t* p, scalar_t* z, const scalar_t* xp, const scalar_t* k, const scalar_t* c_prev,
                  const scalar_t* h_prev, const scalar_t* peep, scalar_t* c_new, scalar_t* ct, scalar_t* tc,
                  scalar_t* h_new, int64_t B, int64_t H) {
  const scalar_t* w_ci = peep;
  const scalar_t* w_cf = peep + H;
  const scalar_t* w_co = peep + 2 * H;
  for_rows(B, row_grain(4 * H, 16384), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* pr = p + r * 4 * H;
      scalar_t* zr = z + r * 4 * H;
      const scalar_t* xr = xp + r * 4 * H;
      const int64_t o_ = r * H;
#pragma omp simd
      for (int64_t u = 0; u < H; ++u) {
        const scalar_t cp = c_prev[o_ + u];
        // (L1) z = xp_j + h_{j-1} W_h, then (L2)
        const scalar_t i = sigmoid(pr[u] + xr[u] + w_ci[u] * cp);
        const scalar_t f = sigmoid(pr[H + u] + xr[H + u] + w_cf[u] * cp);
        const scalar_t g = std::tanh(pr[2 * H + u] + xr[2 * H + u]);
        const scalar_t cn = f * cp + i * g;                                    // (L3) c~
        const scalar_t o = sigmoid(pr[3 * H + u] + xr[3 * H + u] + w_co[u] * cn);  // (L4)
        const scalar_t t = std::tanh(cn);
        const scalar_t kv = k[o_ + u];
        const scalar_t hp = h_prev[o_ + u];
        zr[u] = i;
        zr[H + u] = f;
        zr[2 * H + u] = g;
        zr[3 * H + u] = o;
        ct[o_ + u] = cn;
        tc[o_ + u] = t;
        c_new[o_ + u] = cp + kv * (cn - cp);                           // (P1)
        h_new[o_ + u] = hp + kv * (o * t - hp);                        // (P2), h~ = o tanh(c~)
      }
    }
  });
}

// h_j's gradient is dh + dh_mm + gy: dh holds (1 - k) dh_{j+1} on entry and (1 - k) dh_j on exit, dh_mm the
// product dz_{j+1} W_h^T (zeros at the last step); dc holds dc_j on entry and dc_{j-1} on exit.
template <typename scalar_t>
void backward_cell(const scalar_t* act, const scalar_t* ct, const scalar_t* tc, const scalar_t* c_prev,
                   const scalar_t* h_prev, const scalar_t* k, const scalar_t* gy, const scalar_t* peep,
                   const scalar_t* dh_mm, scalar_t* dh,
                   scalar_t* dc, scalar_t* dz, scalar_t* dzc, scalar_t* dk, scalar_t clip, int64_t B, int64_t H) {
  const scalar_t* w_ci = peep;
  const scalar_t* w_cf = peep + H;
  const scalar_t* w_co = peep + 2 * H;
  const bool clipping = clip >= scalar_t(0);
  for_rows(B, row_grain(4 * H, 16384), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* ar = act + r * 4 * H;
      scalar_t* dzr = dz + r * 4 * H;
      scalar_t* dzcr = dzc + r * 4 * H;
      const int64_t o_ = r * H;
#pragma omp simd
      for (int64_t u = 0; u < H; ++u) {
        const scalar_t i = ar[u], f = ar[H + u], g = ar[2 * H + u], o = ar[3 * H + u];
        const scalar_t cn = ct[o_ + u], t = tc[o_ + u], cp = c_prev[o_ + u], hp = h_prev[o_ + u];
        const scalar_t kv = k[o_ + u];
        const scalar_t dhv = dh[o_ + u] + dh_mm[o_ + u] + gy[o_ + u];
        const scalar_t dcv = dc[o_ + u];
        dk[o_ + u] = dhv * (o * t - hp) + dcv * (cn - cp);                       // (P1), (P2)
        const scalar_t dht = dhv * kv;                                           // (P2): grad of h~
        const scalar_t dzo = dht * t * o * (scalar_t(1) - o);                    // (L4)
        const scalar_t dct = dcv * kv + dht * o * (scalar_t(1) - t * t) + dzo * w_co[u];  // (P1), (L4)
        const scalar_t dzi = dct * g * i * (scalar_t(1) - i);                    // (L3), (L2)
        const scalar_t dzf = dct * cp * f * (scalar_t(1) - f);
        const scalar_t dzg = dct * i * (scalar_t(1) - g * g);
        dc[o_ + u] = dcv * (scalar_t(1) - kv) + dct * f + dzi * w_ci[u] + dzf * w_cf[u];
        dh[o_ + u] = dhv * (scalar_t(1) - kv);
        dzr[u] = dzi;
        dzr[H + u] = dzf;
        dzr[2 * H + u] = dzg;
        dzr[3 * H + u] = dzo;
        if (clipping) {
          dzcr[u] = std::min(std::max(dzi, -clip), clip);
          dzcr[H + u] = std::min(std::max(dzf, -clip), clip);
          dzcr[2 * H + u] = std::min(std::max(dzg, -clip), clip);
          dzcr[3 * H + u] = std::min(std::max(dzo, -clip), clip);
        }
      }
    }
  });
}

void check_inputs(const at::Tensor& xp, const at::Tensor& k, const at::Tensor& h0, const at::Tensor& c0,
                  const at::Tensor& w_hh, const at::Tensor& peep) {
  TORCH_CHECK(xp.dim() == 3 && xp.size(2) % 4 == 0, "phased lstm: xp must be [time, batch, 4*hidden], got ",
              xp.sizes());
  const int64_t T = xp.size(0), B = xp.size(1), H = xp.size(2) / 4;
  TORCH_CHECK(k.dim() == 3 && k.size(0) == T && k.size(1) == B && k.size(2) == H, "phased lstm: k must be [", T,
              ", ", B, ", ", H, "], got ", k.sizes());
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == H && w_hh.size(1) == 4 * H, "phased lstm: w_hh must be [", H, ", ",
              4 * H, "], got ", w_hh.sizes());
  TORCH_CHECK(h0.sizes() == c0.sizes() && h0.dim() == 2 && h0.size(0) == B && h0.size(1) == H,
              "phased lstm: h0 and c0 must be [", B, ", ", H, "]");
  TORCH_CHECK(peep.dim() == 2 && peep.size(0) == 3 && peep.size(1) == H, "phased lstm: peephole must be [3, ", H,
              "], got ", peep.sizes());
  TORCH_CHECK(xp.device().is_cpu(), "phased lstm: the C++ loop runs on CPU tensors only");
  for (const auto* t : {&k, &h0, &c0, &w_hh, &peep}) {
    TORCH_CHECK(t->scalar_type() == xp.scalar_type(), "phased lstm: all inputs must share xp's dtype");
  }
}

// -> (acts [T,B,4H] = i,f,g,o; hs [T+1,B,H]; cs [T+1,B,H]; ct [T,B,H] = c~; tc [T,B,H] = tanh(c~))
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> phased_forward(
    const at::Tensor& xp_in, const at::Tensor& k_in, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& w_hh_in, const at::Tensor& peep_in) {
  check_inputs(xp_in, k_in, h0, c0, w_hh_in, peep_in);
  const at::Tensor xp = xp_in.contiguous(), k = k_in.contiguous(), w_hh = w_hh_in.contiguous();
  const at::Tensor peep = peep_in.contiguous();
  const int64_t T = xp.size(0), B = xp.size(1), H = xp.size(2) / 4;
  at::Tensor acts = at::empty_like(xp);
  at::Tensor hs = at::empty({T + 1, B, H}, xp.options());
  const seqplat::StepMatrix wf = seqplat::prepare(w_hh, T);
  at::Tensor cs = at::empty({T + 1, B, H}, xp.options());
  at::Tensor ct = at::empty({T, B, H}, xp.options());
  at::Tensor tc = at::empty({T, B, H}, xp.options());
  hs[0].copy_(h0);
  cs[0].copy_(c0);
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "phased_forward", [&] {
    // per-step slices by pointer arithmetic (a tensor view per slice costs microseconds per step)
    scalar_t* a_p = acts.mutable_data_ptr<scalar_t>();
    scalar_t* hs_p = hs.mutable_data_ptr<scalar_t>();
    scalar_t* cs_p = cs.mutable_data_ptr<scalar_t>();
    scalar_t* ct_p = ct.mutable_data_ptr<scalar_t>();
    scalar_t* tc_p = tc.mutable_data_ptr<scalar_t>();
    const scalar_t* xp_p = xp.const_data_ptr<scalar_t>();
    const scalar_t* k_p = k.const_data_ptr<scalar_t>();
    const int64_t s4 = B * 4 * H, s1 = B * H;
    for (int64_t j = 0; j < T; ++j) {
      at::Tensor z = acts[j];
      const at::Tensor p = seqplat::mm_result(z, hs[j], wf);  // h_{j-1} W_h of (L1)
      forward_cell<scalar_t>(p.const_data_ptr<scalar_t>(), a_p + j * s4, xp_p + j * s4, k_p + j * s1, cs_p + j * s1,
                             hs_p + j * s1,
                             peep.const_data_ptr<scalar_t>(), cs_p + (j + 1) * s1, ct_p + j * s1, tc_p + j * s1,
                             hs_p + (j + 1) * s1, B, H);
    }
  });
  return {acts, hs, cs, ct, tc};
}

// -> (dz [T,B,4H] unclipped, dz clipped (the same tensor without clip), dk [T,B,H], dh_0, dc_0, dW_h [H, 4H], and
// with x (the input of the hoisted projection xp = x W_x + b, [T*B, D] time major) dW_x [D, 4H] and db [4H], else
// two empty tensors). (L1): dW_h = sum_j h_{j-1}^T dz_j and dW_x = sum_j x_j^T dz_j with the clipped dz, as it
// reaches the weights: computed as (dz^T h)^T (0.8x the time of h^T dz through oneDNN at H=256) from the clipped dz
// written straight into oneDNN's tensor memory (seqplat::outer_factor), one oneDNN copy for both, db from the
// same call.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
phased_backward(const at::Tensor& acts, const at::Tensor& hs, const at::Tensor& cs, const at::Tensor& ct,
                const at::Tensor& tc, const at::Tensor& k_in, const at::Tensor& w_hh_in, const at::Tensor& peep_in,
                const at::Tensor& gy_in, const at::Tensor& gc_in, double clip, const std::optional<at::Tensor>& x) {
  const int64_t T = acts.size(0), B = acts.size(1), H = acts.size(2) / 4;
  TORCH_CHECK(T >= 1, "phased lstm: the backward pass needs at least one step");
  const auto dtype = acts.scalar_type();
  const at::Tensor k = k_in.contiguous(), w_t = w_hh_in.t(), peep = peep_in.contiguous();
  const at::Tensor gy = gy_in.to(dtype).contiguous();
  const seqplat::OuterFactor dz_rows = seqplat::outer_factor(T * B, 4 * H, acts.options());  // the clipped dz
  at::Tensor dzc = dz_rows.dense.view({T, B, 4 * H});
  at::Tensor dz = clip >= 0 ? at::empty_like(acts) : dzc;
  at::Tensor dk = at::empty_like(k);
  at::Tensor dh = at::zeros({B, H}, acts.options());
  at::Tensor mm_buf = at::zeros({B, H}, acts.options());
  at::Tensor dh_mm = mm_buf;  // dz_{j+1} W_h^T: in mm_buf (MKL) or a new tensor (oneDNN), read without a copy
  at::Tensor dc = gc_in.to(dtype).clone().contiguous();
  const seqplat::StepMatrix wb = seqplat::prepare(w_t, T);
  AT_DISPATCH_FLOATING_TYPES(dtype, "phased_backward", [&] {
    const scalar_t* a_p = acts.const_data_ptr<scalar_t>();
    const scalar_t* hs_p = hs.const_data_ptr<scalar_t>();
    const scalar_t* cs_p = cs.const_data_ptr<scalar_t>();
    const scalar_t* ct_p = ct.const_data_ptr<scalar_t>();
    const scalar_t* tc_p = tc.const_data_ptr<scalar_t>();
    const scalar_t* k_p = k.const_data_ptr<scalar_t>();
    const scalar_t* gy_p = gy.const_data_ptr<scalar_t>();
    scalar_t* dz_p = dz.mutable_data_ptr<scalar_t>();
    scalar_t* dzc_p = dzc.mutable_data_ptr<scalar_t>();
    scalar_t* dk_p = dk.mutable_data_ptr<scalar_t>();
    const int64_t s4 = B * 4 * H, s1 = B * H;
    for (int64_t j = T - 1; j >= 0; --j) {
      backward_cell<scalar_t>(a_p + j * s4, ct_p + j * s1, tc_p + j * s1, cs_p + j * s1, hs_p + j * s1,
                              k_p + j * s1, gy_p + j * s1, peep.const_data_ptr<scalar_t>(),
                              dh_mm.const_data_ptr<scalar_t>(), dh.mutable_data_ptr<scalar_t>(),
                              dc.mutable_data_ptr<scalar_t>(), dz_p + j * s4,
                              dzc_p + j * s4, dk_p + j * s1, static_cast<scalar_t>(clip), B, H);
      dh_mm = seqplat::mm_result(mm_buf, dzc[j], wb);  // (L1): dh_{j-1} = (1 - k) dh_j + dz W_h^T
    }
  });
  dh.add_(dh_mm);
  const at::Tensor h_prev = hs.narrow(0, 0, T).reshape({T * B, H});
  if (x.has_value()) {
    TORCH_CHECK(x->dim() == 2 && x->size(0) == T * B, "phased lstm: x must be [T*B, D], got ", x->sizes());
    auto [dw_h, dw_x, db] = seqplat::outer_pair(dz_rows, h_prev, x->to(dtype), true);
    return {dz, dzc, dk, dh, dc, dw_h.t(), dw_x.t(), db};
  }
  return {dz, dzc, dk, dh, dc, seqplat::outer(dz_rows, h_prev).t(), at::Tensor(), at::Tensor()};
}

// -- the time gate (T1)-(T2) for all steps, and its parameter gradients --------------------------------
//
//     u = (t + s) / tau,  phi = u - floor(u)                                   (T1)
//     k = 1 - |2 phi / r_on - 1|   if phi <= r_on,   alpha * phi otherwise      (T2)
//
// in float64 whatever the output dtype (large timestamps need it); a row with valid[r] == 0 (a NaN
// timestamp: padding; the caller passes 0 as its time, since -ffast-math compiles NaN tests away) gives
// k = 0 and no gradient. Both passes are one sweep over [rows = T*B, H]. The backward sums, per unit,
// dL/dtau = sum g dk/dphi (-u / tau), dL/ds = sum g dk/dphi / tau and dL/dr_on = sum g dk/dr_on
// (phi's floor has zero derivative; dk/dphi = -sign(v) 2 / r_on on the open branch, alpha on the closed
// one, and dk/dr_on = sign(v) 2 phi / r_on^2 on the open branch, with v = 2 phi / r_on - 1 and
// sign(0) = 0 as torch's abs has it).

template <typename out_t>
void gate_forward_impl(const double* t, const double* valid, const double* period, const double* shift,
                       const double* r_on, double alpha, out_t* k, int64_t R, int64_t H) {
  at::parallel_for(0, R, std::max<int64_t>(1, 16384 / H), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const double tr = t[r];
      out_t* kr = k + r * H;
      if (valid[r] == 0.0) {
        for (int64_t h = 0; h < H; ++h) kr[h] = out_t(0);
        continue;
      }
#pragma omp simd
      for (int64_t h = 0; h < H; ++h) {
        const double inv = 1.0 / period[h];
        const double u = shift[h] * inv + tr * inv;
        const double phi = u - std::floor(u);
        const double open = 1.0 - std::abs(phi * (2.0 / r_on[h]) - 1.0);
        kr[h] = static_cast<out_t>(phi <= r_on[h] ? open : phi * alpha);
      }
    }
  });
}

template <typename grad_t>
void gate_backward_impl(const grad_t* g, const double* t, const double* valid, const double* period,
                        const double* shift, const double* r_on, double alpha, double* part, int64_t chunks, int64_t R,
                        int64_t H) {
  // part: [chunks, 3, H] partial sums (tau, s, r_on), one row block per chunk of rows: deterministic
  const int64_t per = (R + chunks - 1) / chunks;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double* gp = part + c * 3 * H;
      double* gs = gp + H;
      double* gr = gp + 2 * H;
      for (int64_t h = 0; h < 3 * H; ++h) gp[h] = 0.0;
      const int64_t r1 = std::min(R, (c + 1) * per);
      for (int64_t r = c * per; r < r1; ++r) {
        const double tr = t[r];
        if (valid[r] == 0.0) continue;
        const grad_t* gr_row = g + r * H;
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) {
          const double inv = 1.0 / period[h];
          const double u = shift[h] * inv + tr * inv;
          const double phi = u - std::floor(u);
          const double two_r = 2.0 / r_on[h];
          const double v = phi * two_r - 1.0;
          const double sg = (v > 0.0) - (v < 0.0);
          const bool open = phi <= r_on[h];
          const double gk = static_cast<double>(gr_row[h]);
          const double dphi = gk * (open ? -sg * two_r : alpha);
          gp[h] += dphi * (-u * inv);
          gs[h] += dphi * inv;
          gr[h] += open ? gk * sg * phi * two_r / r_on[h] : 0.0;
        }
      }
    }
  });
}

at::Tensor time_gate_forward(const at::Tensor& t_in, const at::Tensor& valid_in, const at::Tensor& period_in,
                             const at::Tensor& shift_in, const at::Tensor& r_on_in, double alpha,
                             at::ScalarType out_dtype) {
  TORCH_CHECK(t_in.scalar_type() == at::kDouble && valid_in.scalar_type() == at::kDouble &&
                  valid_in.numel() == t_in.numel() && period_in.scalar_type() == at::kDouble &&
                  shift_in.scalar_type() == at::kDouble && r_on_in.scalar_type() == at::kDouble,
              "phased lstm time gate: timestamps and gate parameters must be float64");
  const at::Tensor t = t_in.contiguous(), period = period_in.contiguous(), shift = shift_in.contiguous();
  const at::Tensor r_on = r_on_in.contiguous(), valid = valid_in.contiguous();
  const int64_t R = t.numel(), H = period.numel();
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
  shape.push_back(H);
  at::Tensor k = at::empty(shape, t.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES(out_dtype, "time_gate_forward", [&] {
    gate_forward_impl<scalar_t>(t.const_data_ptr<double>(), valid.const_data_ptr<double>(),
                                period.const_data_ptr<double>(),
                                shift.const_data_ptr<double>(), r_on.const_data_ptr<double>(), alpha,
                                k.mutable_data_ptr<scalar_t>(), R, H);
  });
  return k;
}

at::Tensor time_gate_backward(const at::Tensor& g_in, const at::Tensor& t_in, const at::Tensor& valid_in,
                              const at::Tensor& period_in, const at::Tensor& shift_in, const at::Tensor& r_on_in,
                              double alpha) {
  const at::Tensor g = g_in.contiguous(), t = t_in.contiguous(), period = period_in.contiguous();
  const at::Tensor valid = valid_in.contiguous();
  const at::Tensor shift = shift_in.contiguous(), r_on = r_on_in.contiguous();
  const int64_t R = t.numel(), H = period.numel();
  TORCH_CHECK(g.numel() == R * H, "phased lstm time gate: the gradient must be [", R, ", ", H, "]");
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), R));
  at::Tensor part = at::empty({chunks, 3, H}, t.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "time_gate_backward", [&] {
    gate_backward_impl<scalar_t>(g.const_data_ptr<scalar_t>(), t.const_data_ptr<double>(),
                                 valid.const_data_ptr<double>(),
                                 period.const_data_ptr<double>(), shift.const_data_ptr<double>(),
                                 r_on.const_data_ptr<double>(), alpha, part.mutable_data_ptr<double>(), chunks, R, H);
  });
  return part.sum(0);  // [3, H]: d tau, d s, d r_on
}

}  // namespace

TORCH_LIBRARY(seqplat_phased_lstm, m) {
  m.def(
      "time_gate(Tensor t, Tensor valid, Tensor period, Tensor shift, Tensor r_on, float alpha, ScalarType dtype) "
      "-> Tensor");
  m.def(
      "time_gate_backward(Tensor grad_k, Tensor t, Tensor valid, Tensor period, Tensor shift, Tensor r_on, "
      "float alpha) -> Tensor");
  m.def(
      "forward(Tensor xp, Tensor k, Tensor h0, Tensor c0, Tensor w_hh, Tensor peephole) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "backward(Tensor acts, Tensor hs, Tensor cs, Tensor ct, Tensor tc, Tensor k, Tensor w_hh, Tensor peephole, "
      "Tensor grad_y, Tensor grad_cT, float clip, Tensor? x=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(seqplat_phased_lstm, CPU, m) {
  m.impl("forward", &phased_forward);
  m.impl("backward", &phased_backward);
  m.impl("time_gate", &time_gate_forward);
  m.impl("time_gate_backward", &time_gate_backward);
}
