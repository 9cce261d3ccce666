// Recurrent Highway Network on CPU: the time loop of RHNRecurrence (fused.py), forward and backward.
//
// Zilly, Srivastava, Koutnik & Schmidhuber, "Recurrent Highway Networks", ICML 2017. Spec:
// shared/papers/rhn.md. Eqs. R1-R4 of cell.py in the form of fused.py (carry c = 1 - t, Zilly's
// form), for micro-layer l = 1..L of step j, with s^0_j = s^L_{j-1}:
//
//     s_in = s^{l-1} * m_h                        (variational hidden mask, optional)
//     u    = [u_H | u_T] = [z; z] * (s_in R_l^T (+ xp_j for l = 1: W x_j, hoisted)) + b_l
//                                                 (z = z^l_j: hyper_rhn's scales, eq. H3; 1 for rhn)
//     h    = tanh(u_H)                            (R1)
//     t    = sigmoid(u_T)                         (R2)
//     e    = h * g - s^{l-1}                      (g: gate dropout mask, optional)
//     s^l  = s^{l-1} + t * e                      (R3-R4: h t g + s (1 - t))
//
// Each (step, micro-layer) is one GEMM into the [B, 2n] slice of the `a` buffer and one fused
// elementwise pass that adds xp/b, writes a = [h | t], e and s^l (and s^l * m_h, the next s_in). The
// backward walks the steps and micro-layers in reverse: one fused pass gives du = [du_H | du_T] and
// ds through R4 itself, then one GEMM adds du R_l (times m_h). The weight gradients are one GEMM per
// micro-layer over all steps (du^T s_in), the bias gradients sums: both computed here by backward_grads (rhn).
//
// hyper_rhn (Suarez 2017; eqs. H2-H3 of hyper.py): the loop is given the hyper RHN's micro-layer outputs
// s_hyper [L, T, B, m] and P_l, p_l, and each micro-layer first computes its scales z = P_l s_hyper + p_l
// (eq. H2, a [B, m] x [m, n] product) into the z buffer. The reverse pass writes drs = du * [z; z] (what the
// weight gradients, which the caller computes, and dL/ds read), dL/dz = du_H * v_H + du_T * v_T (v = s_in R_l^T
// (+ xp), kept in rs) and dL/ds_hyper = dz P_l while dz is in cache, and sums du and dz into the gradients of
// b_l and p_l while they are in registers: du itself is never stored.
//
// Buffers (caller-owned, so a Workspace can reuse them): s_in [L, K, B, n], a [L, K, B, 2n],
// e [L, K, B, n] (and for hyper_rhn rs [L, K, B, 2n] = v and z [L, K, B, n]) with K = T (training) or 1
// (inference: one step's scratch, reused). Time major, contiguous. Every per-step product reads and writes
// raw rows (seqplat::product_rows; tensor views only for oneDNN's output in rhn's forward). Rows run in
// parallel (at::parallel_for, compiled with -fopenmp by seqplat.core.cpp_ext) when a micro-layer has two
// chunks' worth of them.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "seqplat_cpu.h"
#include "seqplat_gemm.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace {

using seqplat::for_rows;
using seqplat::row_grain;
using seqplat::sigmoid;

// `rs` holds s_in R^T (it is `a` itself without scales); `a` gets [h | t]. Every pointer is valid (the
// caller passes ones for absent scales and masks, zeros for xp above layer 1 and a scratch row block for
// an unused s_in_next), so the loop has no branches and vectorizes, with the vector tanh/exp. With
// keep_sum (scales, micro-layer 1) rs gets v = s_in R^T + xp, the factor of z whose product the backward
// needs for dL/dz.
template <typename scalar_t, bool keep_sum>
void forward_cell(scalar_t* rs, scalar_t* a, const scalar_t* z, const scalar_t* xp, const scalar_t* bias,
                  const scalar_t* s, const scalar_t* g, const scalar_t* mask_h, scalar_t* e, scalar_t* s_out,
                  scalar_t* s_in_next, int64_t B, int64_t n) {
  for_rows(B, row_grain(2 * n, 8192), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* rr = rs + r * 2 * n;
      scalar_t* ar = a + r * 2 * n;
      const scalar_t* xr = xp + r * 2 * n;
      const int64_t o_ = r * n;
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) {
        const scalar_t vh = rr[k] + xr[k], vt = rr[n + k] + xr[n + k];  // R s_in (+ W x for l = 1)
        if constexpr (keep_sum) {
          rr[k] = vh;
          rr[n + k] = vt;
        }
        const scalar_t uh = vh * z[o_ + k] + bias[k];                    // H3: [z; z] * v + b
        const scalar_t ut = vt * z[o_ + k] + bias[n + k];
        const scalar_t h = std::tanh(uh);                                // R1
        const scalar_t t = sigmoid(ut);                                  // R2
        const scalar_t sp = s[o_ + k];
        const scalar_t ev = h * g[o_ + k] - sp;                          // e = h (* g) - s
        const scalar_t sn = sp + t * ev;                                 // R4: s' = s + t e
        ar[k] = h;
        ar[n + k] = t;
        e[o_ + k] = ev;
        s_out[o_ + k] = sn;
        s_in_next[o_ + k] = sn * mask_h[o_ + k];
      }
    }
  });
}

// ds holds dL/ds^l on entry (d_out already added) and dL/ds^{l-1} through R4 alone on exit (the caller
// adds du R_l (drs R_l with scales), times m_h). Without scales the pass writes du. With scales it writes
// drs = du * [z; z] and, from v (the rs buffer: s_in R^T (+ xp)), dz = du_H v_H + du_T v_T, and adds [du | dz]
// into db, one [3n] row per thread (the gradients of b and of z's bias p summed over rows and steps; du itself
// is not kept).
template <typename scalar_t, bool scaled>
void backward_cell(const scalar_t* a, const scalar_t* e, const scalar_t* g, const scalar_t* z, const scalar_t* v,
                   scalar_t* ds, scalar_t* du, scalar_t* drs, scalar_t* dz, scalar_t* db, int64_t B, int64_t n) {
  for_rows(B, row_grain(2 * n, 8192), [&](int64_t begin, int64_t end) {
    scalar_t* dbt = scaled ? db + at::get_thread_num() * 3 * n : nullptr;  // this thread's row: no other writes it
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* ar = a + r * 2 * n;
      const int64_t o_ = r * n;
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) {
        const scalar_t h = ar[k], t = ar[n + k];
        const scalar_t dsv = ds[o_ + k];
        const scalar_t dte = dsv * t;                                     // R4: dL/de
        const scalar_t dh = dte * g[o_ + k];                             // e = h (* g) - s
        const scalar_t duh = dh * (scalar_t(1) - h * h);                 // R1: tanh'
        const scalar_t dut = dsv * e[o_ + k] * t * (scalar_t(1) - t);    // R4 then R2: sigmoid'
        if constexpr (scaled) {                                          // H3: u = [z; z] * v + b
          drs[r * 2 * n + k] = duh * z[o_ + k];
          drs[r * 2 * n + n + k] = dut * z[o_ + k];
          const scalar_t dzv = duh * v[r * 2 * n + k] + dut * v[r * 2 * n + n + k];
          dz[o_ + k] = dzv;
          dbt[k] += duh;
          dbt[n + k] += dut;
          dbt[2 * n + k] += dzv;                                         // H2: z = P s_hyper + p
        } else {
          du[r * 2 * n + k] = duh;
          du[r * 2 * n + n + k] = dut;
        }
        ds[o_ + k] = dsv - dte;                                          // ds'/ds = 1 - t
      }
    }
  });
}

void check_forward(const at::Tensor& xp, const at::Tensor& s0, const at::Tensor& w, const at::Tensor& b,
                   const std::optional<at::Tensor>& mask_h, const std::optional<at::Tensor>& mask_g,
                   const std::optional<at::Tensor>& hyper_states, const std::optional<at::Tensor>& proj_w,
                   const std::optional<at::Tensor>& proj_b, const std::optional<at::Tensor>& rs,
                   const std::optional<at::Tensor>& z, const at::Tensor& s_in, const at::Tensor& a, const at::Tensor& e,
                   const at::Tensor& ys) {
  TORCH_CHECK(xp.dim() == 3 && xp.size(2) % 2 == 0, "rhn: xp must be [time, batch, 2n], got ", xp.sizes());
  const int64_t T = xp.size(0), B = xp.size(1), n = xp.size(2) / 2;
  TORCH_CHECK(w.dim() == 3 && w.size(1) == 2 * n && w.size(2) == n, "rhn: weight_hh must be [L, ", 2 * n, ", ", n,
              "], got ", w.sizes());
  const int64_t L = w.size(0);
  TORCH_CHECK(b.dim() == 2 && b.size(0) == L && b.size(1) == 2 * n, "rhn: bias_hh must be [", L, ", ", 2 * n, "]");
  TORCH_CHECK(s0.dim() == 2 && s0.size(0) == B && s0.size(1) == n, "rhn: s0 must be [", B, ", ", n, "]");
  TORCH_CHECK(!mask_h || (mask_h->dim() == 2 && mask_h->size(0) == B && mask_h->size(1) == n),
              "rhn: mask_h must be [", B, ", ", n, "]");
  TORCH_CHECK(!mask_g || (mask_g->dim() == 4 && mask_g->size(0) == T && mask_g->size(1) == L &&
                          mask_g->size(2) == B && mask_g->size(3) == n),
              "rhn: mask_g must be [", T, ", ", L, ", ", B, ", ", n, "]");
  const int64_t K = s_in.size(1);
  TORCH_CHECK(K == T || K == 1, "rhn: the buffers keep every step or one");
  TORCH_CHECK(s_in.sizes() == at::IntArrayRef({L, K, B, n}) && e.sizes() == s_in.sizes() &&
                  a.sizes() == at::IntArrayRef({L, K, B, 2 * n}) && ys.sizes() == at::IntArrayRef({T, B, n}),
              "rhn: buffer shapes do not match");
  const bool hyper = hyper_states.has_value();
  TORCH_CHECK(proj_w.has_value() == hyper && proj_b.has_value() == hyper && rs.has_value() == hyper &&
                  z.has_value() == hyper,
              "rhn: hyper_states, proj_weight, proj_bias, rs and z go together");
  if (hyper) {
    const int64_t m = hyper_states->size(-1);
    TORCH_CHECK(K == T, "rhn: the scaled loop keeps every step");
    TORCH_CHECK(hyper_states->sizes() == at::IntArrayRef({L, T, B, m}) &&
                    proj_w->sizes() == at::IntArrayRef({L, n, m}) && proj_b->sizes() == at::IntArrayRef({L, n}),
                "rhn: hyper_states must be [", L, ", ", T, ", ", B, ", m], proj_weight [", L, ", ", n,
                ", m], proj_bias [", L, ", ", n, "]");
    TORCH_CHECK(rs->sizes() == a.sizes() && z->sizes() == at::IntArrayRef({L, T, B, n}),
                "rhn: rs must be shaped like a, z [", L, ", ", T, ", ", B, ", ", n, "]");
    for (const at::Tensor* t : {&*hyper_states, &*proj_w, &*proj_b, &*rs, &*z}) {
      TORCH_CHECK(t->scalar_type() == xp.scalar_type() && t->is_contiguous(),
                  "rhn: the hyper inputs and buffers must be contiguous and share xp's dtype");
    }
  }
  TORCH_CHECK(xp.device().is_cpu(), "rhn: the C++ loop runs on CPU tensors only");
  for (const at::Tensor* t : {&s0, &w, &b, &s_in, &a, &e, &ys}) {
    TORCH_CHECK(t->scalar_type() == xp.scalar_type(), "rhn: all inputs must share xp's dtype");
    TORCH_CHECK(t->is_contiguous(), "rhn: inputs and buffers must be contiguous");
  }
  TORCH_CHECK(xp.is_contiguous(), "rhn: xp must be contiguous");
  for (const auto* m : {&mask_h, &mask_g}) {
    TORCH_CHECK(!*m || ((*m)->scalar_type() == xp.scalar_type() && (*m)->is_contiguous()),
                "rhn: masks must be contiguous and share xp's dtype");
  }
}

// writes s_in, a, e (every step when K == T) and ys; returns s^L_T. With hyper_states (hyper_rhn: the hyper RHN's
// micro-layer outputs [L, T, B, m]) each micro-layer first computes its scales z = P_l s_hyper + p_l (eq. H2) into
// z [L, T, B, n], and keeps v in rs.
at::Tensor rhn_forward(const at::Tensor& xp, const at::Tensor& s0, const at::Tensor& w, const at::Tensor& b,
                       const std::optional<at::Tensor>& mask_h, const std::optional<at::Tensor>& mask_g,
                       const std::optional<at::Tensor>& hyper_states, const std::optional<at::Tensor>& proj_w,
                       const std::optional<at::Tensor>& proj_b, at::Tensor s_in, at::Tensor a, at::Tensor e,
                       at::Tensor ys, const std::optional<at::Tensor>& rs, const std::optional<at::Tensor>& z) {
  check_forward(xp, s0, w, b, mask_h, mask_g, hyper_states, proj_w, proj_b, rs, z, s_in, a, e, ys);
  const int64_t m = hyper_states ? hyper_states->size(-1) : 0;
  std::vector<seqplat::StepMatrix> pf;  // P_l^T [m, n]: z = s_hyper P_l^T + p_l
  for (int64_t l = 0; hyper_states && l < w.size(0); ++l) {
    pf.push_back(seqplat::prepare((*proj_w)[l].t(), xp.size(0), /*thin_ok=*/false));
  }
  const int64_t T = xp.size(0), B = xp.size(1), n = xp.size(2) / 2, L = w.size(0), K = s_in.size(1);
  at::Tensor scratch = at::empty({3, B, n}, xp.options());  // s^l of inner layers nothing keeps; a dump row block
  at::Tensor ones = at::ones({B, n}, xp.options());         // the mask that is absent
  at::Tensor zeros = at::zeros({B, 2 * n}, xp.options());   // xp above micro-layer 1
  std::vector<seqplat::StepMatrix> wf;
  for (int64_t l = 0; l < L; ++l) wf.push_back(seqplat::prepare(w[l].t(), T));
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "rhn_forward", [&] {
    const scalar_t* mh = mask_h ? mask_h->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* mg = mask_g ? mask_g->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* one_p = ones.const_data_ptr<scalar_t>();
    scalar_t* z_p = z ? z->mutable_data_ptr<scalar_t>() : nullptr;
    const scalar_t* hs_p = hyper_states ? hyper_states->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* pb_p = proj_b ? proj_b->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* zero_p = zeros.const_data_ptr<scalar_t>();
    scalar_t* si_p = s_in.mutable_data_ptr<scalar_t>();
    scalar_t* a_p = a.mutable_data_ptr<scalar_t>();
    scalar_t* e_p = e.mutable_data_ptr<scalar_t>();
    scalar_t* ys_p = ys.mutable_data_ptr<scalar_t>();
    scalar_t* sc_p = scratch.mutable_data_ptr<scalar_t>();
    scalar_t* rs_p = rs ? rs->mutable_data_ptr<scalar_t>() : nullptr;
    const scalar_t* xp_p = xp.const_data_ptr<scalar_t>();
    const scalar_t* b_p = b.const_data_ptr<scalar_t>();
    const int64_t s1 = B * n, s2 = 2 * B * n;
    // s_in of micro-layer 1, step 1: s0 (* m_h)
    {
      const scalar_t* s0p = s0.const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < s1; ++i) si_p[i] = mh != nullptr ? s0p[i] * mh[i] : s0p[i];
    }
    const scalar_t* s = s0.const_data_ptr<scalar_t>();
    for (int64_t j = 0; j < T; ++j) {
      const int64_t k = K == T ? j : 0;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t buf = l * K + k;  // [l, k] of the [L, K, ...] buffers
        if (z_p != nullptr) {  // H2: z = P_l s_hyper + p_l (K == T: buf is [l, j])
          scalar_t* zr = z_p + buf * s1;
          for (int64_t r = 0; r < B; ++r) std::copy(pb_p + l * n, pb_p + (l + 1) * n, zr + r * n);
          seqplat::product_rows<scalar_t, true>(zr, n, hs_p + buf * B * m, m, B, pf[l]);
        }
        // s_in R_l^T: kept in rs for the backward (hyper scales), else read where it lands (a, or oneDNN's output).
        // From raw rows (seqplat::product_rows): tensor views cost about 1 us each, ~6 per micro-layer
        scalar_t* prod_p = (rs_p != nullptr ? rs_p : a_p) + buf * s2;
        at::Tensor prod;  // oneDNN's output, alive until forward_cell has read it
        if (rs_p != nullptr) {
          seqplat::product_rows<scalar_t, false>(prod_p, 2 * n, si_p + buf * s1, n, B, wf[l]);
        } else if (!seqplat::rows_product<scalar_t, false>(prod_p, 2 * n, si_p + buf * s1, n, B, wf[l])) {
          at::Tensor a_lk = a[l][k];
          prod = seqplat::mm_result(a_lk, s_in[l][k], wf[l]);
          prod_p = prod.mutable_data_ptr<scalar_t>();
        }
        scalar_t* s_out;
        scalar_t* s_in_next = nullptr;
        if (l == L - 1) {
          s_out = ys_p + j * s1;
          if (j + 1 < T) s_in_next = si_p + (K == T ? k + 1 : 0) * s1;  // micro-layer 1 of the next step
        } else {
          s_in_next = si_p + ((l + 1) * K + k) * s1;
          s_out = mh == nullptr ? s_in_next : sc_p + (l % 2) * s1;
          if (mh == nullptr) s_in_next = nullptr;  // s_out is the next s_in already
        }
        auto cell = rs && l == 0 ? forward_cell<scalar_t, true> : forward_cell<scalar_t, false>;
        cell(prod_p, a_p + buf * s2, z_p != nullptr ? z_p + buf * s1 : one_p,
             l == 0 ? xp_p + j * s2 : zero_p, b_p + l * 2 * n, s, mg != nullptr ? mg + (j * L + l) * s1 : one_p,
             mh != nullptr ? mh : one_p, e_p + buf * s1, s_out, s_in_next != nullptr ? s_in_next : sc_p + 2 * s1, B,
             n);
        s = s_out;
      }
    }
  });
  return ys[T - 1].clone();
}

// The scaled form of the reverse loop (hyper_rhn): z [L, T, B, n] and v [L, T, B, 2n] (the forward's buffers),
// P_l [n, m] prepared; the loop writes dz [L, T, B, n] and d_hyper = dz P_l [L, T, B, m] (the gradient at the hyper
// RHN's outputs), and adds [du | dz] into db [L, threads, 3n] (zeros on entry)
struct ScaledGrads {
  at::Tensor z, v, dz, db, d_hyper;
  std::vector<seqplat::StepMatrix> p;
};

// The reverse loop: fills grads[l] [T, B, 2n] for every micro-layer l (du without scales; drs = du * [z; z] with
// them, and `scaled`'s dz and db) and returns dL/ds0; d_out [L, T, B, n] (gradients at every micro-layer's output)
// or dys [T, B, n] (at the last micro-layer's only)
at::Tensor backward_loop(const at::Tensor& w, const std::optional<at::Tensor>& mask_h,
                         const std::optional<at::Tensor>& mask_g, const at::Tensor& a, const at::Tensor& e,
                         const at::Tensor& d_out_in, const at::Tensor& ds_in, const std::vector<at::Tensor>& grads,
                         const ScaledGrads* scaled = nullptr) {
  const int64_t L = a.size(0), T = a.size(1), B = a.size(2), n = a.size(3) / 2;
  // read in place when its rows are contiguous (a batch-first caller's gradient is a transposed view)
  const at::Tensor d_out = d_out_in.scalar_type() == a.scalar_type() && d_out_in.dim() > 0 && d_out_in.stride(-1) == 1
                               ? d_out_in
                               : d_out_in.to(a.scalar_type()).contiguous();
  const bool all_layers = d_out.dim() == 4;
  TORCH_CHECK((all_layers ? d_out.size(0) == L && d_out.size(1) == T : d_out.dim() == 3 && d_out.size(0) == T) &&
                  d_out.size(-2) == B && d_out.size(-1) == n,
              "rhn: the output gradient must be [L, T, B, n] or [T, B, n]");
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == L, "rhn: one gradient buffer per micro-layer");
  for (const at::Tensor& d : grads) {
    TORCH_CHECK(d.sizes() == at::IntArrayRef({T, B, 2 * n}) && d.is_contiguous() && d.scalar_type() == a.scalar_type(),
                "rhn: every du / drs buffer must be a contiguous [", T, ", ", B, ", ", 2 * n, "]");
  }
  at::Tensor ds = ds_in.to(a.scalar_type()).clone().contiguous();
  at::Tensor tmp = mask_h ? at::empty({B, n}, a.options()) : at::Tensor();
  at::Tensor ones = at::ones({B, n}, a.options());  // the gate mask that is absent (a branch-free loop)
  std::vector<seqplat::StepMatrix> wb;
  for (int64_t l = 0; l < L; ++l) wb.push_back(seqplat::prepare(w[l], T));
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "rhn_backward", [&] {
    const scalar_t* mh = mask_h ? mask_h->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* mg = mask_g ? mask_g->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* a_p = a.const_data_ptr<scalar_t>();
    const scalar_t* e_p = e.const_data_ptr<scalar_t>();
    const scalar_t* do_p = d_out.const_data_ptr<scalar_t>();
    const scalar_t* one_p = ones.const_data_ptr<scalar_t>();
    scalar_t* ds_p = ds.mutable_data_ptr<scalar_t>();
    const int64_t s1 = B * n, s2 = 2 * B * n;
    const int64_t db_rows = scaled != nullptr ? scaled->db.size(1) : 0;
    for (int64_t j = T - 1; j >= 0; --j) {
      for (int64_t l = L - 1; l >= 0; --l) {
        const int64_t buf = l * T + j;
        if (all_layers || l == L - 1) {  // this micro-layer's output is an output of the loop
          const scalar_t* dop = do_p + (all_layers ? l * d_out.stride(0) + j * d_out.stride(1) : j * d_out.stride(0));
          const int64_t row_stride = d_out.stride(all_layers ? 2 : 1);
          for (int64_t r = 0; r < B; ++r) {
            for (int64_t i = 0; i < n; ++i) ds_p[r * n + i] += dop[r * row_stride + i];
          }
        }
        scalar_t* g_out = grads[l].mutable_data_ptr<scalar_t>() + j * s2;  // du, or drs with scales
        const scalar_t* g_lj = mg != nullptr ? mg + (j * L + l) * s1 : one_p;
        if (scaled != nullptr) {
          backward_cell<scalar_t, true>(a_p + buf * s2, e_p + buf * s1, g_lj,
                                        scaled->z.const_data_ptr<scalar_t>() + buf * s1,
                                        scaled->v.const_data_ptr<scalar_t>() + buf * s2, ds_p, nullptr, g_out,
                                        scaled->dz.mutable_data_ptr<scalar_t>() + buf * s1,
                                        scaled->db.mutable_data_ptr<scalar_t>() + l * db_rows * 3 * n, B, n);
          const int64_t m = scaled->d_hyper.size(3);  // H2: dL/ds_hyper = dz P_l, while dz is in cache
          seqplat::product_rows<scalar_t, false>(scaled->d_hyper.mutable_data_ptr<scalar_t>() + buf * B * m, m,
                                                 scaled->dz.const_data_ptr<scalar_t>() + buf * s1, n, B, scaled->p[l]);
        } else {
          backward_cell<scalar_t, false>(a_p + buf * s2, e_p + buf * s1, g_lj, nullptr, nullptr, ds_p, g_out, nullptr,
                                         nullptr, nullptr, B, n);
        }
        if (mh == nullptr) {  // s_in = s: dL/ds += du R_l
          seqplat::product_rows<scalar_t, true>(ds_p, n, g_out, 2 * n, B, wb[l]);
        } else {  // s_in = s m_h: dL/ds += (du R_l) m_h
          scalar_t* tp = tmp.mutable_data_ptr<scalar_t>();
          seqplat::product_rows<scalar_t, false>(tp, n, g_out, 2 * n, B, wb[l]);
          for (int64_t i = 0; i < s1; ++i) ds_p[i] += tp[i] * mh[i];
        }
      }
    }
  });
  return ds;
}

// With scales (hyper_rhn): the reverse loop filling the caller's drs (one [T, B, 2n] tensor per micro-layer:
// du * [z; z]; micro-layer 1's is dL/dxp), dz [L, T, B, n] and d_hyper [L, T, B, m] (dL/ds_hyper = dz P_l), reading
// z and v (the forward's buffers). Returns dL/ds0, the gradient of bias_hh [L, 2n] and of proj_bias [L, n] (du and dz
// summed over rows and steps in the loop; du itself is never stored). The weight gradients are the caller's
// (drs^T s_in and dz^T s_hyper per micro-layer, the outer op).
std::tuple<at::Tensor, at::Tensor, at::Tensor> rhn_backward(
    const at::Tensor& w, const std::optional<at::Tensor>& mask_h, const std::optional<at::Tensor>& mask_g,
    const at::Tensor& z, const at::Tensor& proj_w, const at::Tensor& a, const at::Tensor& e, const at::Tensor& v,
    const at::Tensor& d_out_in, const at::Tensor& ds_in, at::TensorList drs, at::Tensor dz, at::Tensor d_hyper) {
  const int64_t L = a.size(0), T = a.size(1), B = a.size(2), n = a.size(3) / 2;
  TORCH_CHECK(z.sizes() == at::IntArrayRef({L, T, B, n}) && z.is_contiguous() && z.scalar_type() == a.scalar_type(),
              "rhn: z must be a contiguous [", L, ", ", T, ", ", B, ", ", n, "]");
  TORCH_CHECK(v.sizes() == a.sizes() && v.is_contiguous() && v.scalar_type() == a.scalar_type(),
              "rhn: v (the forward's rs buffer) must be shaped like a");
  TORCH_CHECK(dz.sizes() == z.sizes() && dz.is_contiguous() && dz.scalar_type() == a.scalar_type(),
              "rhn: dz must be a contiguous buffer shaped like z");
  const int64_t m = proj_w.size(-1);
  TORCH_CHECK(proj_w.sizes() == at::IntArrayRef({L, n, m}) && proj_w.scalar_type() == a.scalar_type(),
              "rhn: proj_weight must be [", L, ", ", n, ", m]");
  TORCH_CHECK(d_hyper.sizes() == at::IntArrayRef({L, T, B, m}) && d_hyper.is_contiguous() &&
                  d_hyper.scalar_type() == a.scalar_type(),
              "rhn: d_hyper must be a contiguous [", L, ", ", T, ", ", B, ", ", m, "]");
  // per-thread rows of the bias gradients: backward_cell's rows may run on any thread of a parallel region
  ScaledGrads scaled{z, v, dz, at::zeros({L, std::max<int64_t>(at::get_num_threads(), 1), 3 * n}, a.options()),
                     d_hyper, {}};
  for (int64_t l = 0; l < L; ++l) scaled.p.push_back(seqplat::prepare(proj_w[l], T, /*thin_ok=*/false));
  at::Tensor ds = backward_loop(w, mask_h, mask_g, a, e, d_out_in, ds_in, drs.vec(), &scaled);
  const at::Tensor sums = scaled.db.sum(1);
  return {ds, sums.narrow(1, 0, 2 * n).contiguous(), sums.narrow(1, 2 * n, n).contiguous()};
}

// Without scales: the reverse loop, then the weight gradients. Each micro-layer's du is written into a oneDNN
// tensor's memory (seqplat::outer_factor), so dR_l = du_l^T s_in_l and db_l = sum du_l come from one oneDNN
// backward-weights call with no copy of du_l (seqplat::outer_with_sum). Returns (dL/ds0, du of micro-layer 1
// [T, B, 2n] (dL/dxp), dR [L, 2n, n], db [L, 2n]).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rhn_backward_grads(
    const at::Tensor& w, const std::optional<at::Tensor>& mask_h, const std::optional<at::Tensor>& mask_g,
    const at::Tensor& a, const at::Tensor& e, const at::Tensor& d_out_in, const at::Tensor& ds_in,
    const at::Tensor& s_in) {
  const int64_t L = a.size(0), T = a.size(1), B = a.size(2), n = a.size(3) / 2;
  TORCH_CHECK(s_in.dim() == 4 && s_in.size(0) == L && s_in.size(1) == T && s_in.size(3) == n,
              "rhn: s_in must be [L, T, B, n], got ", s_in.sizes());
  std::vector<seqplat::OuterFactor> factors;
  std::vector<at::Tensor> du_l;
  for (int64_t l = 0; l < L; ++l) {
    factors.push_back(seqplat::outer_factor(T * B, 2 * n, a.options()));
    du_l.push_back(factors.back().dense.view({T, B, 2 * n}));
  }
  at::Tensor ds = backward_loop(w, mask_h, mask_g, a, e, d_out_in, ds_in, du_l);
  at::Tensor d_w = at::empty({L, 2 * n, n}, a.options());
  at::Tensor d_b = at::empty({L, 2 * n}, a.options());
  const at::Tensor s_rows = s_in.contiguous();
  for (int64_t l = 0; l < L; ++l) {  // rs = s_in R^T  =>  dR = du^T s_in; b^l enters every step's u^l
    auto [gw, gb] = seqplat::outer_with_sum(factors[l], s_rows[l].view({T * B, n}));
    d_w[l].copy_(gw);
    d_b[l].copy_(gb);
  }
  return {ds, du_l[0], d_w, d_b};
}

// a^T @ b summed over the rows (hyper_rhn's weight gradient of one micro-layer over all steps), via seqplat::outer
at::Tensor rhn_outer(const at::Tensor& a, const at::Tensor& b) { return seqplat::outer(a, b); }

}  // namespace

TORCH_LIBRARY(seqplat_rhn, m) {
  m.def(
      "forward(Tensor xp, Tensor s0, Tensor weight_hh, Tensor bias_hh, Tensor? mask_h, Tensor? mask_g, "
      "Tensor? hyper_states, Tensor? proj_weight, Tensor? proj_bias, Tensor(a!) s_in, Tensor(b!) a, Tensor(c!) e, "
      "Tensor(d!) ys, Tensor(e!)? rs, Tensor(f!)? z) -> Tensor");
  m.def(
      "backward(Tensor weight_hh, Tensor? mask_h, Tensor? mask_g, Tensor z, Tensor proj_weight, Tensor a, Tensor e, "
      "Tensor v, Tensor grad_out, Tensor grad_sT, Tensor(a!)[] drs, Tensor(b!) dz, Tensor(c!) d_hyper) -> "
      "(Tensor, Tensor, Tensor)");
  m.def(
      "backward_grads(Tensor weight_hh, Tensor? mask_h, Tensor? mask_g, Tensor a, Tensor e, Tensor grad_out, "
      "Tensor grad_sT, Tensor s_in) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("outer(Tensor a, Tensor b) -> Tensor");
}

TORCH_LIBRARY_IMPL(seqplat_rhn, CPU, m) {
  m.impl("forward", &rhn_forward);
  m.impl("backward", &rhn_backward);
  m.impl("backward_grads", &rhn_backward_grads);
  m.impl("outer", &rhn_outer);
}
