// GAM-RHN on CPU: the time loop of GAMRHNRecurrence (fused.py), forward and backward, one call each.
//
// Luo & Yu, "Recurrent Highway Networks With Grouped Auxiliary Memory", IEEE Access 7, 2019. The math is
// steps (1)-(6) of cell.py in the merged, slot-major form of GAMRHNCell.fast_forward (memory [b, S, N],
// slot k of group g at k*N + g; the grouped softmax runs over k for every g):
//
//     pre   = s_{t-1} W_s0 + [b_g0 | 0] + [0 | xp_t[:H+D]]     [b, 2D+H+D]: [layer 1 gates | h_w | r pre]
//     a0    = SoG(h_w W_ad0 + b_ad0)                            [b, 2, S, N]: write, layer 1's read address
//     r     = sigmoid(r pre);  u = r * s_{t-1}
//     mbar  = tanh(u W_ms^T + xp_t[H+D:]);  mb = mbar (* mask_g)
//     m_t   = m_{t-1} + a_w (mb - m_{t-1})
//     per layer l (s = s^{l-1}, s^0 = s_{t-1}):
//       l >= 2: hs = s W_hs (+ [b_hs | 0] in the gate pass), a^l = SoG(hs[2D:] W_a + b_a)
//       xr    = sum_k a^l * m_t
//       xg    = xr W_xr                                         [b, 3D]: [candidate | r^l | z^l]
//       g     = sigmoid(gate pre + xg[D:]),  rs = r^l * s
//       v     = rs W_cs + xg[:D] + b_c;  th = tanh(v);  shat = th (* mask_r)
//       s^l   = shat + z (s - shat)
//
// The per-step products go through seqplat::product_rows (seqplat_gemm.h: the packed register blocks on AVX-512
// builds, else MKL or oneDNN); everything between two products is one fused pass over the batch rows
// (seqplat::for_rows: parallel when there are enough rows). The values the backward needs go into the caller's
// buffers (carved from one Workspace block, see fused.py): the python loop's buffers and layouts, except that
// `y` holds th = tanh(v) here (the python loop keeps sigmoid(2v)), that of `pre` only the h_w columns are kept
// (`hw`; a step's pre is scratch), and that there is no `shat` (the backward takes th * mask_r).
// The backward walks the steps in reverse and fills the pre-activation gradients dg0/dgl and the address
// logit gradients da0/da; the caller then does the weight gradients as one GEMM per matrix over all steps.

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

// elements per parallel chunk, at least. Measured at B=32, H=256 on two idle threads (seqplat bench, train):
// 4096 gave 32k tokens/s, 8192 26k, 32768 (ATen's grain: every pass on one thread) 22k. On an oversubscribed
// machine every parallel region costs far more and one thread wins; torch.set_num_threads(1) then.
constexpr int64_t kGrain = 4096;
// the passes over the memory slots (address softmaxes, the write and the reads) do about twice the work per element
// of the passes over the state (exps, sums over the slots): their grains count 8 per memory element, so that at
// B = 32 they run on both threads (counted as 4, they ran on one: the step took 3% longer at H = 256)
constexpr int64_t kSlotWork = 8;

struct Dims {
  int64_t T, B, D, H, N, S, L;
  int64_t SN() const { return S * N; }
  int64_t P() const { return 3 * D + H; }       // pre width: [2D gates | H | D]
  int64_t W0() const { return 4 * D + H + N; }  // dg0 width: [dv | dr^1 | dz^1 | dh_w | dr | dmbar]
  int64_t WL() const { return 3 * D + H; }      // dgl width: [dv | dr^l | dz^l | dh_l]
};

// weights in the order of GAMRHNRecurrence: 5 shared, then 3 for layer 1 and 7 for each further layer
struct LayerW {
  at::Tensor w_xr, b_c, w_cs, w_hs, b_hs, w_a, b_a;
};

// T steps, B rows, state width D, memory S x N; H and the depth L from the weights
Dims dims_of(int64_t T, int64_t B, int64_t D, int64_t S, int64_t N, at::TensorList w) {
  TORCH_CHECK(w.size() >= 8 && (w.size() - 8) % 7 == 0, "gam_rhn: bad number of weights (", w.size(), ")");
  Dims d{};
  d.T = T;
  d.B = B;
  d.D = D;
  d.S = S;
  d.N = N;
  d.H = w[3].size(0);
  d.L = 1 + static_cast<int64_t>((w.size() - 8) / 7);
  return d;
}

// `dense`: row-major copies ([in, out] contiguous), for the backward's products with W^T. MKL's GEMM with
// M = B = 32 rows ran up to 1.25x faster (H = 1024) with B given transposed (stored [out, in]) than as is:
// the forward takes the cell's [out, in] parameters as they come (transposed views), the backward takes W^T
// as the transposed view of a row-major copy.
std::vector<LayerW> layers_of(at::TensorList w, int64_t L, bool dense) {
  auto mat = [dense](const at::Tensor& t) { return dense ? t.contiguous() : t; };
  std::vector<LayerW> out(L);
  size_t k = 5;
  for (int64_t i = 0; i < L; ++i) {
    out[i].w_xr = mat(w[k]);
    out[i].b_c = w[k + 1].contiguous();
    out[i].w_cs = mat(w[k + 2]);
    k += 3;
    if (i >= 1) {
      out[i].w_hs = mat(w[k]);
      out[i].b_hs = w[k + 1].contiguous();
      out[i].w_a = mat(w[k + 2]);
      out[i].b_a = w[k + 3].contiguous();
      k += 4;
    }
  }
  return out;
}

void check_inputs(const Dims& d, const at::Tensor& xp, const at::Tensor& m0, const at::Tensor& s0,
                  const std::optional<at::Tensor>& mask_g, const std::optional<at::Tensor>& mask_r,
                  at::TensorList w, at::TensorList bufs) {
  TORCH_CHECK(xp.device().is_cpu(), "gam_rhn: the C++ loop runs on CPU tensors only");
  TORCH_CHECK(xp.dim() == 3 && xp.size(2) == d.H + d.D + d.N, "gam_rhn: xp must be [T, b, H+D+N], got ",
              xp.sizes());
  TORCH_CHECK(m0.dim() == 3 && m0.size(0) == d.B, "gam_rhn: m0 must be [b, S, N]");
  TORCH_CHECK(s0.dim() == 2 && s0.size(0) == d.B, "gam_rhn: s0 must be [b, D]");
  TORCH_CHECK(w[0].sizes() == at::IntArrayRef({d.D, d.P()}) && w[2].sizes() == at::IntArrayRef({d.N, d.D}) &&
                  w[3].sizes() == at::IntArrayRef({d.H, 2 * d.SN()}),
              "gam_rhn: shared weight shapes do not match");
  TORCH_CHECK(!mask_g || mask_g->sizes() == at::IntArrayRef({d.T, d.B, d.N}), "gam_rhn: mask_g must be [T, b, N]");
  TORCH_CHECK(!mask_r || mask_r->sizes() == at::IntArrayRef({d.T, d.L, d.B, d.D}),
              "gam_rhn: mask_r must be [T, L, b, D]");
  for (const auto& t : w) TORCH_CHECK(t.scalar_type() == xp.scalar_type(), "gam_rhn: weights must share xp's dtype");
  for (const auto& t : bufs) {
    TORCH_CHECK(t.scalar_type() == xp.scalar_type() && t.is_contiguous(),
                "gam_rhn: buffers must be contiguous and share xp's dtype");
  }
}

// softmax over the S slots of every group: out[k*N+g] = softmax_k(logit[k*N+g] + bias[k*N+g]); tmp is 2N.
// The group max is subtracted (exp's argument is <= 0, clamped at -80); one slot gives exactly 1.
template <typename scalar_t>
inline void grouped_softmax(const scalar_t* logit, const scalar_t* bias, scalar_t* out, scalar_t* tmp, int64_t S,
                            int64_t N) {
  if (S == 1) {
    for (int64_t g = 0; g < N; ++g) out[g] = scalar_t(1);
    return;
  }
  scalar_t* mx = tmp;
  scalar_t* sm = tmp + N;
  _Pragma("omp simd")
  for (int64_t g = 0; g < N; ++g) {
    out[g] = logit[g] + bias[g];
    mx[g] = out[g];
    sm[g] = scalar_t(0);
  }
  for (int64_t k = 1; k < S; ++k) {
    _Pragma("omp simd")
    for (int64_t g = 0; g < N; ++g) {
      out[k * N + g] = logit[k * N + g] + bias[k * N + g];
      mx[g] = std::max(mx[g], out[k * N + g]);
    }
  }
  for (int64_t k = 0; k < S; ++k) {
    _Pragma("omp simd")
    for (int64_t g = 0; g < N; ++g) {
      const scalar_t e = std::exp(std::max(out[k * N + g] - mx[g], scalar_t(-80)));
      out[k * N + g] = e;
      sm[g] += e;
    }
  }
  _Pragma("omp simd")
  for (int64_t g = 0; g < N; ++g) sm[g] = scalar_t(1) / sm[g];
  for (int64_t k = 0; k < S; ++k) {
    _Pragma("omp simd")
    for (int64_t g = 0; g < N; ++g) out[k * N + g] *= sm[g];
  }
}

// xr[g] = sum_k a[k*N+g] m[k*N+g]
template <typename scalar_t>
inline void read_memory(const scalar_t* a, const scalar_t* m, scalar_t* xr, int64_t S, int64_t N) {
_Pragma("omp simd")
  for (int64_t g = 0; g < N; ++g) xr[g] = a[g] * m[g];
  for (int64_t k = 1; k < S; ++k) {
_Pragma("omp simd")
    for (int64_t g = 0; g < N; ++g) xr[g] += a[k * N + g] * m[k * N + g];
  }
}

// forward buffers, in the order the op takes them
// HW holds h_w [T, b, H] (the only columns of pre the backward reads); SHAT is not used (the backward recomputes
// shat = th * mask_r): the op takes an empty tensor there
enum Buf { HW, R, U, MBAR, MB, MEM, A0, S_IN, XR, G, RS, Y, SHAT, HS, A, YS, NBUF };

void gam_rhn_forward(const at::Tensor& xp_in, const at::Tensor& m0_in, const at::Tensor& s0_in,
                     const std::optional<at::Tensor>& mask_g, const std::optional<at::Tensor>& mask_r,
                     at::TensorList w, at::TensorList bufs) {
  TORCH_CHECK(bufs.size() == NBUF, "gam_rhn: the forward takes ", int(NBUF), " buffers");
  const at::Tensor xp = xp_in.contiguous(), m0 = m0_in.contiguous(), s0 = s0_in.contiguous();
  const Dims d = dims_of(xp.size(0), xp.size(1), s0.size(1), m0.size(1), m0.size(2), w);
  check_inputs(d, xp, m0, s0, mask_g, mask_r, w, bufs);
  const int64_t T = d.T, B = d.B, D = d.D, H = d.H, N = d.N, S = d.S, L = d.L, SN = d.SN(), P = d.P();
  const at::Tensor w_s0 = w[0], b_g0 = w[1].contiguous(), w_ms_t = w[2].t();
  const at::Tensor w_ad0 = w[3], b_ad0 = w[4].contiguous();
  const std::vector<LayerW> lw = layers_of(w, L, false);
  // the per-step products (oneDNN for large float32 matrices, see seqplat_gemm.h)
  const seqplat::StepMatrix m_s0 = seqplat::prepare(w_s0, T), m_ad0 = seqplat::prepare(w_ad0, T),
                            m_ms = seqplat::prepare(w_ms_t, T);
  std::vector<seqplat::StepMatrix> m_xr(L), m_cs(L), m_hs(L), m_a(L);
  for (int64_t i = 0; i < L; ++i) {
    m_xr[i] = seqplat::prepare(lw[i].w_xr, T);
    m_cs[i] = seqplat::prepare(lw[i].w_cs, T);
    if (i >= 1) {
      m_hs[i] = seqplat::prepare(lw[i].w_hs, T);
      m_a[i] = seqplat::prepare(lw[i].w_a, T);
    }
  }
  const at::Tensor mg = mask_g ? mask_g->contiguous() : at::ones({B, N}, xp.options());
  const at::Tensor mr = mask_r ? mask_r->contiguous() : at::ones({B, D}, xp.options());
  const at::Tensor &hw = bufs[HW], &r = bufs[R], &u = bufs[U], &mbar = bufs[MBAR], &mb = bufs[MB];
  const at::Tensor &mem = bufs[MEM], &a0 = bufs[A0], &s_in = bufs[S_IN], &xr = bufs[XR], &g = bufs[G];
  const at::Tensor &rs = bufs[RS], &y = bufs[Y], &hs = bufs[HS], &a = bufs[A], &ys = bufs[YS];
  TORCH_CHECK(hw.numel() == d.T * d.B * H, "gam_rhn: the h_w buffer must be [T, b, H]");
  at::Tensor pre = at::empty({B, P}, xp.options());  // one step's s_{t-1} W_s0 (+ x parts)
  at::Tensor logits = at::empty({B, 2 * SN}, xp.options());
  at::Tensor xg = at::empty({B, 3 * D}, xp.options());
  at::Tensor cp = at::empty({B, D}, xp.options());
  at::Tensor tmp = at::empty({B, 2 * N}, xp.options());
  mem[0].copy_(m0);
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "gam_rhn_forward", [&] {
    const scalar_t* xp_p = xp.const_data_ptr<scalar_t>();
    const scalar_t* bg0_p = b_g0.const_data_ptr<scalar_t>();
    const scalar_t* bad0_p = b_ad0.const_data_ptr<scalar_t>();
    const scalar_t* mg_p = mg.const_data_ptr<scalar_t>();
    const scalar_t* mr_p = mr.const_data_ptr<scalar_t>();
    const int64_t mg_step = mask_g ? B * N : 0, mr_step = mask_r ? B * D : 0;  // a ones row block when absent
    scalar_t* pre_tp = pre.mutable_data_ptr<scalar_t>();
    scalar_t* hw_p = hw.mutable_data_ptr<scalar_t>();
    scalar_t* r_p = r.mutable_data_ptr<scalar_t>();
    scalar_t* u_p = u.mutable_data_ptr<scalar_t>();
    scalar_t* mbar_p = mbar.mutable_data_ptr<scalar_t>();
    scalar_t* mb_p = mb.mutable_data_ptr<scalar_t>();
    scalar_t* mem_p = mem.mutable_data_ptr<scalar_t>();
    scalar_t* a0_p = a0.mutable_data_ptr<scalar_t>();
    scalar_t* si_p = s_in.mutable_data_ptr<scalar_t>();
    scalar_t* xr_p = xr.mutable_data_ptr<scalar_t>();
    scalar_t* g_p = g.mutable_data_ptr<scalar_t>();
    scalar_t* rs_p = rs.mutable_data_ptr<scalar_t>();
    scalar_t* y_p = y.mutable_data_ptr<scalar_t>();
    scalar_t* hs_p = L > 1 ? hs.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* a_p = L > 1 ? a.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* ys_p = ys.mutable_data_ptr<scalar_t>();
    scalar_t* lg_p = logits.mutable_data_ptr<scalar_t>();
    scalar_t* xg_p = xg.mutable_data_ptr<scalar_t>();
    scalar_t* cp_p = cp.mutable_data_ptr<scalar_t>();
    scalar_t* tmp_p = tmp.mutable_data_ptr<scalar_t>();
    const int64_t BD = B * D, BN = B * N, BSN = B * SN;
    const int64_t HSW = 2 * D + H;  // hs width
    for (int64_t t = 0; t < T; ++t) {
      // the products read and write raw rows (seqplat::product_rows): no tensor views per step
      const scalar_t* sp = t == 0 ? s0.const_data_ptr<scalar_t>() : ys_p + (t - 1) * BD;
      seqplat::product_rows<scalar_t, false>(pre_tp, P, sp, D, B, m_s0);  // s_{t-1} W_s0
      const scalar_t* xp_t = xp_p + t * B * (H + D + N);
      scalar_t* r_t = r_p + t * BD;
      scalar_t* u_t = u_p + t * BD;
      scalar_t* si0 = si_p + t * BD;  // s_in[0][t]
      // (1), (3): biases and x parts, r = sigmoid(.), u = r * s
      for_rows(B, row_grain(P, kGrain), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          scalar_t* pr = pre_tp + b * P;
          const scalar_t* xr_row = xp_t + b * (H + D + N);
          const scalar_t* s = sp + b * D;
_Pragma("omp simd")
          for (int64_t j = 0; j < 2 * D; ++j) pr[j] += bg0_p[j];
          scalar_t* hw_row = hw_p + (t * B + b) * H;
_Pragma("omp simd")
          for (int64_t j = 0; j < H; ++j) {
            pr[2 * D + j] += xr_row[j];
            hw_row[j] = pr[2 * D + j];
          }
_Pragma("omp simd")
          for (int64_t k = 0; k < D; ++k) {
            const scalar_t rv = sigmoid(pr[2 * D + H + k] + xr_row[H + k]);
            pr[2 * D + H + k] += xr_row[H + k];
            r_t[b * D + k] = rv;
            u_t[b * D + k] = rv * s[k];
            si0[b * D + k] = s[k];
          }
        }
      });
      seqplat::product_rows<scalar_t, false>(lg_p, 2 * SN, pre_tp + 2 * D, P, B, m_ad0);  // (2) h_w W_ad0
      scalar_t* mbar_tp = mbar_p + t * BN;
      seqplat::product_rows<scalar_t, false>(mbar_tp, N, u_t, D, B, m_ms);  // (3) u W_ms^T
      // (2)-(4) and layer 1's read: both address softmaxes, m_bar, the write, xr^1
      scalar_t* mb_tp = mb_p + t * BN;
      const scalar_t* mg_t = mg_p + t * mg_step;
      const scalar_t* m_old = mem_p + t * BSN;
      scalar_t* m_new = mem_p + (t + 1) * BSN;
      scalar_t* a0_t = a0_p + t * 2 * BSN;
      scalar_t* xr0 = xr_p + t * BN;
      for_rows(B, row_grain(kSlotWork * SN, kGrain), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          scalar_t* mv = mbar_tp + b * N;
          scalar_t* mbv = mb_tp + b * N;
          const scalar_t* xr_row = xp_t + b * (H + D + N) + H + D;
_Pragma("omp simd")
          for (int64_t j = 0; j < N; ++j) {
            const scalar_t v = std::tanh(mv[j] + xr_row[j]);
            mv[j] = v;
            mbv[j] = v * mg_t[b * N + j];
          }
          scalar_t* aw = a0_t + b * 2 * SN;
          grouped_softmax(lg_p + b * 2 * SN, bad0_p, aw, tmp_p + b * 2 * N, S, N);
          grouped_softmax(lg_p + b * 2 * SN + SN, bad0_p + SN, aw + SN, tmp_p + b * 2 * N, S, N);
          const scalar_t* mo = m_old + b * SN;
          scalar_t* mn = m_new + b * SN;
          for (int64_t k = 0; k < S; ++k) {
_Pragma("omp simd")
            for (int64_t j = 0; j < N; ++j) {
              const scalar_t o = mo[k * N + j];
              mn[k * N + j] = o + aw[k * N + j] * (mbv[j] - o);
            }
          }
          read_memory(aw + SN, mn, xr0 + b * N, S, N);
        }
      });
      // (5) the highway layers
      for (int64_t i = 0; i < L; ++i) {
        const LayerW& W = lw[i];
        scalar_t* s_i = si_p + (i * T + t) * BD;  // s^{l-1}
        const int64_t lt = i * T + t;
        const scalar_t* gate_src;  // gate pre-activations from s (bias included for layer 1)
        int64_t gate_stride;
        const scalar_t* bhs_p = nullptr;
        if (i >= 1) {
          scalar_t* hs_tp = hs_p + ((i - 1) * T + t) * B * HSW;
          seqplat::product_rows<scalar_t, false>(hs_tp, HSW, s_i, D, B, m_hs[i]);  // [gates | h_l] (gate bias below)
          seqplat::product_rows<scalar_t, false>(lg_p, 2 * SN, hs_tp + 2 * D, HSW, B, m_a[i]);
          scalar_t* a_t = a_p + ((i - 1) * T + t) * BSN;
          const scalar_t* ba = W.b_a.const_data_ptr<scalar_t>();
          scalar_t* xr_t = xr_p + lt * BN;
          for_rows(B, row_grain(kSlotWork * SN, kGrain), [&](int64_t b0, int64_t b1) {
            for (int64_t b = b0; b < b1; ++b) {
              grouped_softmax(lg_p + b * 2 * SN, ba, a_t + b * SN, tmp_p + b * 2 * N, S, N);
              read_memory(a_t + b * SN, m_new + b * SN, xr_t + b * N, S, N);
            }
          });
          gate_src = hs_p + ((i - 1) * T + t) * B * HSW;
          gate_stride = HSW;
          bhs_p = W.b_hs.const_data_ptr<scalar_t>();
        } else {
          gate_src = pre_tp;
          gate_stride = P;
        }
        seqplat::product_rows<scalar_t, false>(xg_p, 3 * D, xr_p + lt * BN, N, B, m_xr[i]);  // xr [W_s | W_g]
        scalar_t* g_t = g_p + lt * B * 2 * D;
        scalar_t* rs_t = rs_p + lt * BD;
        for_rows(B, row_grain(4 * D, kGrain), [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b) {
            const scalar_t* gs = gate_src + b * gate_stride;
            const scalar_t* xgr = xg_p + b * 3 * D;
            scalar_t* gr = g_t + b * 2 * D;
            if (bhs_p != nullptr) {
_Pragma("omp simd")
              for (int64_t j = 0; j < 2 * D; ++j) gr[j] = sigmoid(gs[j] + bhs_p[j] + xgr[D + j]);
            } else {
_Pragma("omp simd")
              for (int64_t j = 0; j < 2 * D; ++j) gr[j] = sigmoid(gs[j] + xgr[D + j]);
            }
            const scalar_t* s = s_i + b * D;
_Pragma("omp simd")
            for (int64_t k = 0; k < D; ++k) rs_t[b * D + k] = gr[k] * s[k];
          }
        });
        seqplat::product_rows<scalar_t, false>(cp_p, D, rs_t, D, B, m_cs[i]);  // rs W_cs
        const scalar_t* bc = W.b_c.const_data_ptr<scalar_t>();
        const scalar_t* mr_t = mr_p + (t * L + i) * mr_step;
        scalar_t* y_t = y_p + lt * BD;
        scalar_t* s_out = i == L - 1 ? ys_p + t * BD : si_p + ((i + 1) * T + t) * BD;
        for_rows(B, row_grain(6 * D, kGrain), [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b) {
            const scalar_t* xgr = xg_p + b * 3 * D;
            const scalar_t* cr = cp_p + b * D;
            const scalar_t* z = g_t + b * 2 * D + D;
            const scalar_t* s = s_i + b * D;
            const int64_t o = b * D;
_Pragma("omp simd")
            for (int64_t k = 0; k < D; ++k) {
              const scalar_t th = std::tanh(cr[k] + xgr[k] + bc[k]);
              const scalar_t sh = th * mr_t[o + k];
              y_t[o + k] = th;
              s_out[o + k] = sh + z[k] * (s[k] - sh);  // z s + (1 - z) s_hat
            }
          }
        });
      }
    }
  });
}

// gradient buffers, in the order the op takes them
enum GBuf { DG0, DA0, DGL, DA, NGBUF };

std::tuple<at::Tensor, at::Tensor> gam_rhn_backward(const at::Tensor& dys_in, const at::Tensor& dm_in,
                                                    const at::Tensor& ds_in, const std::optional<at::Tensor>& mask_g,
                                                    const std::optional<at::Tensor>& mask_r, at::TensorList w,
                                                    at::TensorList bufs, at::TensorList gbufs) {
  TORCH_CHECK(bufs.size() == NBUF && gbufs.size() == NGBUF, "gam_rhn: the backward takes ", int(NBUF), " and ",
              int(NGBUF), " buffers");
  const at::Tensor& mem = bufs[MEM];
  const auto dtype = mem.scalar_type();
  const at::Tensor dys = dys_in.to(dtype).contiguous();
  at::Tensor dm = dm_in.to(dtype).clone().contiguous();
  at::Tensor ds = ds_in.to(dtype).clone().contiguous();
  const Dims d = dims_of(dys.size(0), dys.size(1), dys.size(2), mem.size(2), mem.size(3), w);
  const int64_t T = d.T, B = d.B, D = d.D, H = d.H, N = d.N, S = d.S, L = d.L, SN = d.SN(), P = d.P();
  const int64_t W0 = d.W0(), WL = d.WL();
  TORCH_CHECK(gbufs[DG0].sizes() == at::IntArrayRef({T, B, W0}) && gbufs[DA0].sizes() == at::IntArrayRef({T, B, 2, S, N}),
              "gam_rhn: gradient buffer shapes do not match");
  for (const auto& t : gbufs) {
    TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous(), "gam_rhn: buffers must be contiguous, one dtype");
  }
  const at::Tensor w_s0 = w[0].contiguous(), w_ms = w[2], w_ad0 = w[3].contiguous();
  const std::vector<LayerW> lw = layers_of(w, L, true);
  const seqplat::StepMatrix d_s0 = seqplat::prepare(w_s0.t(), T), d_ad0 = seqplat::prepare(w_ad0.t(), T),
                            d_ms = seqplat::prepare(w_ms, T);
  std::vector<seqplat::StepMatrix> d_xr(L), d_cs(L), d_hs(L), d_a(L);
  for (int64_t i = 0; i < L; ++i) {
    d_xr[i] = seqplat::prepare(lw[i].w_xr.t(), T);
    d_cs[i] = seqplat::prepare(lw[i].w_cs.t(), T);
    if (i >= 1) {
      d_hs[i] = seqplat::prepare(lw[i].w_hs.t(), T);
      d_a[i] = seqplat::prepare(lw[i].w_a.t(), T);
    }
  }
  const at::Tensor mg = mask_g ? mask_g->to(dtype).contiguous() : at::ones({B, N}, mem.options());
  const at::Tensor mr = mask_r ? mask_r->to(dtype).contiguous() : at::ones({B, D}, mem.options());
  const at::Tensor &dg0 = gbufs[DG0], &da0 = gbufs[DA0], &dgl = gbufs[DGL], &da = gbufs[DA];
  at::Tensor drs = at::empty({B, D}, mem.options());
  at::Tensor dxr = at::empty({B, N}, mem.options());
  at::Tensor du = at::empty({B, D}, mem.options());
  at::Tensor tmp = at::empty({B, N}, mem.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "gam_rhn_backward", [&] {
    const scalar_t* dys_p = dys.const_data_ptr<scalar_t>();
    scalar_t* dm_p = dm.mutable_data_ptr<scalar_t>();
    scalar_t* ds_p = ds.mutable_data_ptr<scalar_t>();
    const scalar_t* mg_p = mg.const_data_ptr<scalar_t>();
    const scalar_t* mr_p = mr.const_data_ptr<scalar_t>();
    const int64_t mg_step = mask_g ? B * N : 0, mr_step = mask_r ? B * D : 0;
    const scalar_t* r_p = bufs[R].const_data_ptr<scalar_t>();
    const scalar_t* mbar_p = bufs[MBAR].const_data_ptr<scalar_t>();
    const scalar_t* mb_p = bufs[MB].const_data_ptr<scalar_t>();
    const scalar_t* mem_p = mem.const_data_ptr<scalar_t>();
    const scalar_t* a0_p = bufs[A0].const_data_ptr<scalar_t>();
    const scalar_t* si_p = bufs[S_IN].const_data_ptr<scalar_t>();
    const scalar_t* g_p = bufs[G].const_data_ptr<scalar_t>();
    const scalar_t* y_p = bufs[Y].const_data_ptr<scalar_t>();
    const scalar_t* a_p = L > 1 ? bufs[A].const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dg0_p = dg0.mutable_data_ptr<scalar_t>();
    scalar_t* da0_p = da0.mutable_data_ptr<scalar_t>();
    scalar_t* dgl_p = L > 1 ? dgl.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* da_p = L > 1 ? da.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* drs_p = drs.mutable_data_ptr<scalar_t>();
    scalar_t* dxr_p = dxr.mutable_data_ptr<scalar_t>();
    scalar_t* du_p = du.mutable_data_ptr<scalar_t>();
    scalar_t* tmp_p = tmp.mutable_data_ptr<scalar_t>();
    const int64_t BD = B * D, BN = B * N, BSN = B * SN;
    for (int64_t t = T - 1; t >= 0; --t) {
      const scalar_t* m_new = mem_p + (t + 1) * BSN;
      scalar_t* da0_t = da0_p + t * 2 * BSN;
      scalar_t* dg0_t = dg0_p + t * B * W0;
      for (int64_t i = L - 1; i >= 0; --i) {
        const int64_t lt = i * T + t;
        scalar_t* dg_t = i == 0 ? dg0_t : dgl_p + ((i - 1) * T + t) * B * WL;
        const int64_t wd = i == 0 ? W0 : WL;
        const scalar_t* g_t = g_p + lt * B * 2 * D;
        const scalar_t* y_t = y_p + lt * BD;
        const scalar_t* s_t = si_p + lt * BD;
        const scalar_t* mr_t = mr_p + (t * L + i) * mr_step;
        // s = shat + z (s_prev - shat), shat = tanh(v) (* mask), z = sigmoid(.); the last layer's s is y_t as well
        const scalar_t* dy = i == L - 1 ? dys_p + t * BD : nullptr;
        for_rows(B, row_grain(6 * D, kGrain), [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b) {
            const int64_t o = b * D;
            const scalar_t* z = g_t + b * 2 * D + D;
            scalar_t* dgr = dg_t + b * wd;
            if (dy != nullptr) {
_Pragma("omp simd")
              for (int64_t k = 0; k < D; ++k) ds_p[o + k] += dy[o + k];
            }
_Pragma("omp simd")
            for (int64_t k = 0; k < D; ++k) {
              const scalar_t dsv = ds_p[o + k], zk = z[k], th = y_t[o + k], mk = mr_t[o + k];
              dgr[k] = dsv * (scalar_t(1) - zk) * mk * (scalar_t(1) - th * th);              // dv
              dgr[2 * D + k] = dsv * (s_t[o + k] - th * mk) * zk * (scalar_t(1) - zk);  // dz pre, shat = th mk
              ds_p[o + k] = dsv * zk;
            }
          }
        });
        seqplat::product_rows<scalar_t, false>(drs_p, D, dg_t, wd, B, d_cs[i]);  // v = rs W_cs + ...
        // rs = r^l s_prev, r^l = sigmoid(.)
        for_rows(B, row_grain(4 * D, kGrain), [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b) {
            const int64_t o = b * D;
            const scalar_t* rl = g_t + b * 2 * D;
            scalar_t* dgr = dg_t + b * wd;
_Pragma("omp simd")
            for (int64_t k = 0; k < D; ++k) {
              const scalar_t dr = drs_p[o + k], rv = rl[k];
              dgr[D + k] = dr * s_t[o + k] * rv * (scalar_t(1) - rv);
              ds_p[o + k] += dr * rv;
            }
          }
        });
        seqplat::product_rows<scalar_t, false>(dxr_p, N, dg_t, wd, B, d_xr[i]);  // xr feeds v, r^l and z^l
        // xr = sum_k a m_t: dm += dxr a; the address a = SoG(logits) gets dxr m_t
        const scalar_t* a_t = i == 0 ? a0_p + t * 2 * BSN + SN : a_p + ((i - 1) * T + t) * BSN;
        scalar_t* da_t = i == 0 ? da0_t + SN : da_p + ((i - 1) * T + t) * BSN;
        const int64_t a_stride = i == 0 ? 2 * SN : SN;
        for_rows(B, row_grain(kSlotWork * SN, kGrain), [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b) {
            const scalar_t* ar = a_t + b * a_stride;
            scalar_t* dar = da_t + b * a_stride;
            const scalar_t* mn = m_new + b * SN;
            scalar_t* dmr = dm_p + b * SN;
            const scalar_t* dx = dxr_p + b * N;
            scalar_t* sum = tmp_p + b * N;
_Pragma("omp simd")
            for (int64_t g = 0; g < N; ++g) sum[g] = scalar_t(0);
            for (int64_t k = 0; k < S; ++k) {
_Pragma("omp simd")
              for (int64_t g = 0; g < N; ++g) {
                const scalar_t av = ar[k * N + g], gm = dx[g] * mn[k * N + g];
                dmr[k * N + g] += dx[g] * av;
                dar[k * N + g] = gm;
                sum[g] += av * gm;
              }
            }
            for (int64_t k = 0; k < S; ++k) {
_Pragma("omp simd")
              for (int64_t g = 0; g < N; ++g) dar[k * N + g] = ar[k * N + g] * (dar[k * N + g] - sum[g]);
            }
          }
        });
        if (i >= 1) {
          const scalar_t* da_v = da_p + ((i - 1) * T + t) * BSN;
          seqplat::product_rows<scalar_t, false>(dg_t + 3 * D, wd, da_v, SN, B, d_a[i]);  // a = SoG(h_l W_a + b_a)
          // [gates | h_l] = s_prev W_hs + b_hs
          seqplat::product_rows<scalar_t, true>(ds_p, D, dg_t + D, wd, B, d_hs[i]);
        }
      }
      // (4) m_t = m + a_w (mb - m); (3) mb = tanh(.) (* mask); the write address's softmax
      const scalar_t* m_old = mem_p + t * BSN;
      const scalar_t* mb_t = mb_p + t * BN;
      const scalar_t* mbar_t = mbar_p + t * BN;
      const scalar_t* mg_t = mg_p + t * mg_step;
      const scalar_t* a0_t = a0_p + t * 2 * BSN;
      for_rows(B, row_grain(kSlotWork * SN, kGrain), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const scalar_t* aw = a0_t + b * 2 * SN;
          scalar_t* daw = da0_t + b * 2 * SN;
          const scalar_t* mo = m_old + b * SN;
          scalar_t* dmr = dm_p + b * SN;
          const scalar_t* mbv = mb_t + b * N;
          scalar_t* sum = tmp_p + b * N;
          scalar_t* dzm = dg0_t + b * W0 + 4 * D + H;
_Pragma("omp simd")
          for (int64_t g = 0; g < N; ++g) {
            sum[g] = scalar_t(0);
            dzm[g] = scalar_t(0);
          }
          for (int64_t k = 0; k < S; ++k) {
_Pragma("omp simd")
            for (int64_t g = 0; g < N; ++g) {
              const int64_t j = k * N + g;
              const scalar_t dmv = dmr[j], av = aw[j];
              const scalar_t gw = dmv * (mbv[g] - mo[j]);
              dzm[g] += dmv * av;
              daw[j] = gw;
              sum[g] += av * gw;
              dmr[j] = dmv * (scalar_t(1) - av);
            }
          }
          for (int64_t k = 0; k < S; ++k) {
_Pragma("omp simd")
            for (int64_t g = 0; g < N; ++g) daw[k * N + g] = aw[k * N + g] * (daw[k * N + g] - sum[g]);
          }
          const scalar_t* mv = mbar_t + b * N;
          const scalar_t* mgr = mg_t + b * N;
_Pragma("omp simd")
          for (int64_t g = 0; g < N; ++g) dzm[g] *= (scalar_t(1) - mv[g] * mv[g]) * mgr[g];
        }
      });
      seqplat::product_rows<scalar_t, false>(du_p, D, dg0_t + 4 * D + H, W0, B, d_ms);  // u = r * s_{t-1}
      const scalar_t* r_t = r_p + t * BD;
      const scalar_t* s_t = si_p + t * BD;  // s_in[0][t] = s_{t-1}
      for_rows(B, row_grain(4 * D, kGrain), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t o = b * D;
          scalar_t* dr = dg0_t + b * W0 + 3 * D + H;
_Pragma("omp simd")
          for (int64_t k = 0; k < D; ++k) {
            const scalar_t duv = du_p[o + k], rv = r_t[o + k];
            dr[k] = duv * s_t[o + k] * rv * (scalar_t(1) - rv);  // r = sigmoid(.)
            ds_p[o + k] += duv * rv;
          }
        }
      });
      // (1)-(2): logits = h_w W_ad0 + b_ad0; pre = s_{t-1} W_s0 + ...
      seqplat::product_rows<scalar_t, false>(dg0_t + 3 * D, W0, da0_t, 2 * SN, B, d_ad0);
      seqplat::product_rows<scalar_t, true>(ds_p, D, dg0_t + D, W0, B, d_s0);
    }
  });
  return {dm, ds};
}

// a^T @ b summed over the rows (a weight gradient over all steps), through seqplat::outer: the packed route reads
// column blocks of the saved buffers in place
at::Tensor gam_rhn_outer(const at::Tensor& a, const at::Tensor& b) { return seqplat::outer(a, b); }

}  // namespace

TORCH_LIBRARY(seqplat_gam_rhn, m) {
  m.def(
      "forward(Tensor xp, Tensor m0, Tensor s0, Tensor? mask_g, Tensor? mask_r, Tensor[] weights, "
      "Tensor(a!)[] bufs) -> ()");
  m.def(
      "backward(Tensor grad_ys, Tensor grad_mT, Tensor grad_sT, Tensor? mask_g, Tensor? mask_r, Tensor[] weights, "
      "Tensor[] bufs, Tensor(a!)[] grad_bufs) -> (Tensor, Tensor)");
  m.def("outer(Tensor a, Tensor b) -> Tensor");
}

TORCH_LIBRARY_IMPL(seqplat_gam_rhn, CPU, m) {
  m.impl("forward", &gam_rhn_forward);
  m.impl("backward", &gam_rhn_backward);
  m.impl("outer", &gam_rhn_outer);
}
