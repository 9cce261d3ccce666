// Fast-Slow RNN over LN-LSTM cells on CPU: the time loop of FSLNLSTMRecurrence (fused.py), forward and backward.
//
// Mujika, Meier & Steger, "Fast-Slow Recurrent Neural Networks", NIPS 2017. Spec: shared/papers/fs_rnn.md.
// Cells in compute order F1, S, F2, F3..Fk (cell.py, eqs. 1-5); every cell is the LN-LSTM of ln_lstm.py
// (eqs. 1-4) from its raw pre-activation a = [u | h_prev] W^T + b (F1: xp_t + h_prev W_h^T, xp hoisted):
//
//     (1) xh = (a - mean_q) * rstd_q per n-wide block q;  [i j f o] = act(xh * g4 + s4)   (s4: shift + forget bias)
//     (2) c' = i j + f c
//     (3) h' = o tanh(xc * gc + sc),  xc = LN_c(c') normalised
//     (4) h_t = m_h h' + (1 - m_h) h,  c_t = m_c c' + (1 - m_c) c      (m: 0/1 mask, or the eval constant keep)
//
// Forward, per step and cell: one GEMM (ATen) into the cell's xh buffer, then one fused pass per batch row
// (rows in parallel) that normalises in place, activates the gates, updates c, normalises c', writes h_t and
// c_t straight into the buffers of the cells that read them next (with the site 2 / site 3 dropout masks
// applied to the copies that are inputs). Kept per step: xh [T, B, 4n], 1/std [T, B, 4], the gates
// [T, B, 4n] (i, j, f, o), xc [T, B, n], 1/std_c [T, B], tanh(LN_c) [T, B, n]; the GEMM inputs [u | h_prev]
// and the c chains are kept by construction.
//
// Backward, per step and cell in reverse: one fused pass per row gives da, the gradient of the raw
// pre-activation (both layer-norm backwards by hand: dx = rstd (dy - mean(dy) - xhat mean(dy xhat)) with
// dy the gradient of the normalised value times its gain), the gradient of c_prev (in place), and the
// zoneout share of the h_prev gradient; then one GEMM adds da W to it (the [u | h_prev] gradient). The LN
// gains/shifts and the bias gradients are accumulated per batch row over the steps (each row belongs to
// one thread in a step, so no races) and summed over rows at the end; the weight gradient of each cell
// is one GEMM over all T*B rows after the loop.
//
// Absent masks (no zoneout, eval keep, no dropout) are constant rows with a step stride of 0, so every
// inner loop is branch-free and vectorizes (with glibc's vector exp/tanh under -ffast-math).

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

// rows per chunk: a cell's row is 4n wide (LN4) plus the n-wide passes
constexpr int64_t kGrainElements = 8192;

template <typename scalar_t>
inline scalar_t tanh_c(scalar_t v) {  // clamped: tanh is +-1 to the last bit well before 20
  return std::tanh(std::min(std::max(v, scalar_t(-20)), scalar_t(20)));
}

// mean and 1/std of one n-wide block (two passes: the variance about the mean)
template <typename scalar_t>
inline void block_stats(const scalar_t* x, int64_t n, scalar_t eps, scalar_t& mean, scalar_t& rstd) {
  scalar_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += x[k];
  const scalar_t m = s / scalar_t(n);
  scalar_t v = 0;
#pragma omp simd reduction(+ : v)
  for (int64_t k = 0; k < n; ++k) v += (x[k] - m) * (x[k] - m);
  mean = m;
  rstd = scalar_t(1) / std::sqrt(v / scalar_t(n) + eps);
}

// a row view: base pointer and the distance between rows
template <typename scalar_t>
struct Rows {
  scalar_t* p;
  int64_t stride;
  scalar_t* row(int64_t r) const { return p + r * stride; }
};

// one cell, one step, forward
template <typename scalar_t>
struct FwdArgs {
  int64_t n;
  scalar_t eps;
  const scalar_t *g4, *s4, *gc, *sc;  // LN4 gain and shift [4n], LN_c gain and shift [n]
  scalar_t* xh;                        // [B, 4n]: a on entry, xhat on exit
  scalar_t* r4;                        // [B, 4]
  scalar_t* gates;                     // [B, 4n]
  scalar_t* xc;                        // [B, n]
  scalar_t* rc;                        // [B]
  scalar_t* tc;                        // [B, n]
  Rows<const scalar_t> h_prev, c_prev, mh, mc;
  Rows<scalar_t> h_out, c_out;
  Rows<scalar_t> h2;                  // optional second copy of h_t times d2 (dropout site 2 or 3)
  Rows<const scalar_t> d2;
};

template <typename scalar_t>
void forward_cell(const FwdArgs<scalar_t>& A, int64_t B) {
  const int64_t n = A.n;
  for_rows(B, row_grain(4 * n, kGrainElements), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* xh = A.xh + r * 4 * n;
      for (int64_t q = 0; q < 4; ++q) {  // eq. 1: LN4, in place
        scalar_t mean, rstd;
        scalar_t* x = xh + q * n;
        block_stats(x, n, A.eps, mean, rstd);
        A.r4[r * 4 + q] = rstd;
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) x[k] = (x[k] - mean) * rstd;
      }
      scalar_t* g = A.gates + r * 4 * n;
      const scalar_t* cp = A.c_prev.row(r);
      scalar_t* cn = A.c_out.row(r);  // c' first; zoneout below, once LN_c has read it
      const scalar_t *g4 = A.g4, *s4 = A.s4;
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) {
        const scalar_t i = sigmoid(xh[k] * g4[k] + s4[k]);
        const scalar_t j = tanh_c(xh[n + k] * g4[n + k] + s4[n + k]);
        const scalar_t f = sigmoid(xh[2 * n + k] * g4[2 * n + k] + s4[2 * n + k]);
        const scalar_t o = sigmoid(xh[3 * n + k] * g4[3 * n + k] + s4[3 * n + k]);
        g[k] = i;
        g[n + k] = j;
        g[2 * n + k] = f;
        g[3 * n + k] = o;
        cn[k] = i * j + f * cp[k];  // eq. 2
      }
      scalar_t mean, rstd;
      block_stats<scalar_t>(cn, n, A.eps, mean, rstd);
      A.rc[r] = rstd;
      scalar_t* xc = A.xc + r * n;
      scalar_t* tc = A.tc + r * n;
      const scalar_t* hp = A.h_prev.row(r);
      const scalar_t* mh = A.mh.row(r);
      const scalar_t* mc = A.mc.row(r);
      scalar_t* ho = A.h_out.row(r);
      const scalar_t *gc = A.gc, *sc = A.sc;
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) {
        const scalar_t c_new = cn[k];
        const scalar_t x = (c_new - mean) * rstd;
        const scalar_t t = tanh_c(x * gc[k] + sc[k]);
        xc[k] = x;
        tc[k] = t;
        const scalar_t h_new = g[3 * n + k] * t;                      // eq. 3
        ho[k] = mh[k] * h_new + (scalar_t(1) - mh[k]) * hp[k];       // eq. 4
        cn[k] = mc[k] * c_new + (scalar_t(1) - mc[k]) * cp[k];
      }
      if (A.h2.p != nullptr) {
        scalar_t* h2 = A.h2.row(r);
        const scalar_t* d2 = A.d2.row(r);
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) h2[k] = ho[k] * d2[k];
      }
    }
  });
}

// one cell, one step, backward
template <typename scalar_t>
struct BwdArgs {
  int64_t n, du;                              // width, and the width of the input part of the GEMM input
  const scalar_t *g4, *gc;
  const scalar_t *xh, *r4, *gates, *xc, *rc, *tc;  // the step's saved values (layouts as in FwdArgs)
  Rows<const scalar_t> c_prev, mh, mc;
  Rows<const scalar_t> dh_a, dh_b, mb;        // dL/dh_t = dh_a + dh_b * mb
  scalar_t* dc;                               // [B, n]: dL/dc_t in, dL/dc_prev out
  scalar_t* da;                               // [B, 4n]: dL/da out
  scalar_t* d_in;                             // [B, du + n]: 0 | zoneout share of dL/dh_prev (the GEMM adds da W)
  scalar_t* tmp;                              // [B, n] scratch
  scalar_t *acc_g4, *acc_s4, *acc_gc, *acc_sc, *acc_b;  // per-row accumulators [B, 4n], [B, n], [B, 4n]
};

template <typename scalar_t>
void backward_cell(const BwdArgs<scalar_t>& A, int64_t B) {
  const int64_t n = A.n, du = A.du;
  const scalar_t inv_n = scalar_t(1) / scalar_t(n);
  for_rows(B, row_grain(4 * n, kGrainElements), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* g = A.gates + r * 4 * n;
      const scalar_t* xh = A.xh + r * 4 * n;
      const scalar_t* xc = A.xc + r * n;
      const scalar_t* tc = A.tc + r * n;
      const scalar_t* cp = A.c_prev.row(r);
      const scalar_t* mh = A.mh.row(r);
      const scalar_t* mc = A.mc.row(r);
      const scalar_t* dha = A.dh_a.row(r);
      const scalar_t* dhb = A.dh_b.row(r);
      const scalar_t* mb = A.mb.row(r);
      scalar_t* dc = A.dc + r * n;
      scalar_t* da = A.da + r * 4 * n;
      scalar_t* din = A.d_in + r * (du + n);
      scalar_t* dhk = din + du;
      scalar_t* dxc = A.tmp + r * n;
      scalar_t* agc = A.acc_gc + r * n;
      scalar_t* asc = A.acc_sc + r * n;
      const scalar_t* gc = A.gc;
      for (int64_t k = 0; k < du; ++k) din[k] = scalar_t(0);
      scalar_t s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
      for (int64_t k = 0; k < n; ++k) {
        const scalar_t dh = dha[k] + dhb[k] * mb[k];
        const scalar_t dhn = dh * mh[k];  // eq. 4: the share of the new value
        dhk[k] = dh - dhn;                // ... and of h_prev (dha may be dhk itself: read above)
        const scalar_t o = g[3 * n + k], t = tc[k];
        const scalar_t dcn = dhn * o * (scalar_t(1) - t * t);  // eq. 3 through tanh
        da[3 * n + k] = dhn * t * o * (scalar_t(1) - o);      // eq. 3: dL/d pre_o (kept here until below)
        agc[k] += dcn * xc[k];
        asc[k] += dcn;
        const scalar_t dy = dcn * gc[k];
        dxc[k] = dy;
        s1 += dy;
        s2 += dy * xc[k];
      }
      const scalar_t m1 = s1 * inv_n, m2 = s2 * inv_n, rc = A.rc[r];
      scalar_t* ag4 = A.acc_g4 + r * 4 * n;
      scalar_t* as4 = A.acc_s4 + r * 4 * n;
      const scalar_t* g4 = A.g4;
      scalar_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)
      for (int64_t k = 0; k < n; ++k) {
        // LN_c backward, then the zoneout share of dL/dc_t
        const scalar_t dcv = dc[k];
        const scalar_t dcp = rc * (dxc[k] - m1 - xc[k] * m2) + dcv * mc[k];
        const scalar_t i = g[k], j = g[n + k], f = g[2 * n + k];
        dc[k] = dcp * f + dcv * (scalar_t(1) - mc[k]);  // eq. 2 and 4: dL/dc_prev
        const scalar_t pi = dcp * j * i * (scalar_t(1) - i);
        const scalar_t pj = dcp * i * (scalar_t(1) - j * j);
        const scalar_t pf = dcp * cp[k] * f * (scalar_t(1) - f);
        const scalar_t po = da[3 * n + k];
        ag4[k] += pi * xh[k];
        ag4[n + k] += pj * xh[n + k];
        ag4[2 * n + k] += pf * xh[2 * n + k];
        ag4[3 * n + k] += po * xh[3 * n + k];
        as4[k] += pi;
        as4[n + k] += pj;
        as4[2 * n + k] += pf;
        as4[3 * n + k] += po;
        const scalar_t y0 = pi * g4[k], y1 = pj * g4[n + k], y2 = pf * g4[2 * n + k], y3 = po * g4[3 * n + k];
        da[k] = y0;
        da[n + k] = y1;
        da[2 * n + k] = y2;
        da[3 * n + k] = y3;
        a0 += y0;
        a1 += y1;
        a2 += y2;
        a3 += y3;
        b0 += y0 * xh[k];
        b1 += y1 * xh[n + k];
        b2 += y2 * xh[2 * n + k];
        b3 += y3 * xh[3 * n + k];
      }
      const scalar_t t1[4] = {a0, a1, a2, a3}, t2[4] = {b0, b1, b2, b3};  // per block: sum dy, sum dy xhat
      scalar_t* ab = A.acc_b + r * 4 * n;
      for (int64_t q = 0; q < 4; ++q) {  // eq. 1: LN4 backward per block
        const scalar_t rs = A.r4[r * 4 + q], mq1 = t1[q] * inv_n, mq2 = t2[q] * inv_n;
        scalar_t* d = da + q * n;
        const scalar_t* x = xh + q * n;
        scalar_t* bq = ab + q * n;
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) {
          const scalar_t v = rs * (d[k] - mq1 - x[k] * mq2);
          d[k] = v;
          bq[k] += v;
        }
      }
    }
  });
}

struct Cells {
  int64_t k;                    // fast cells
  int64_t count;                // k + 1
  std::vector<int64_t> width;   // n of each cell, compute order F1, S, F2, F3..Fk
  std::vector<int64_t> in_u;    // width of the input part of the GEMM input (S: n_F, F2: n_S, else 0)
};

Cells describe(const at::Tensor& xp, const at::Tensor& h_f, const at::Tensor& h_s, at::TensorList weights) {
  Cells c;
  c.count = static_cast<int64_t>(weights.size());
  c.k = c.count - 1;
  TORCH_CHECK(c.k >= 2, "fs_rnn: needs the weights of F1, S and at least F2");
  const int64_t nf = h_f.size(1), ns = h_s.size(1);
  for (int64_t i = 0; i < c.count; ++i) {
    c.width.push_back(i == 1 ? ns : nf);
    c.in_u.push_back(i == 1 ? nf : (i == 2 ? ns : 0));
    const int64_t n = c.width[i];
    TORCH_CHECK(weights[i].dim() == 2 && weights[i].size(0) == 4 * n && weights[i].size(1) == c.in_u[i] + n,
                "fs_rnn: weight of cell ", i, " must be [", 4 * n, ", ", c.in_u[i] + n, "], got ", weights[i].sizes());
  }
  TORCH_CHECK(xp.dim() == 3 && xp.size(2) == 4 * nf, "fs_rnn: xp must be [T, B, 4 n_F]");
  return c;
}

// zoneout or dropout mask rows of one step: the [T, B, n] mask, or a [B, n] constant with step stride 0
struct MaskSet {
  std::vector<at::Tensor> held;
  std::vector<int64_t> step;  // step stride
};

MaskSet masks_of(const c10::List<std::optional<at::Tensor>>& masks, at::ArrayRef<double> keeps,
                 const std::vector<int64_t>& widths, int64_t T, int64_t B, const at::TensorOptions& opts) {
  MaskSet m;
  for (size_t s = 0; s < masks.size(); ++s) {
    const std::optional<at::Tensor> mask = masks.get(s);
    const int64_t n = widths[s];
    if (mask.has_value() && mask->defined()) {
      TORCH_CHECK(mask->sizes() == at::IntArrayRef({T, B, n}), "fs_rnn: mask ", s, " must be [", T, ", ", B, ", ",
                  n, "], got ", mask->sizes());
      m.held.push_back(mask->to(opts.dtype()).contiguous());
      m.step.push_back(B * n);
    } else {
      m.held.push_back(at::full({B, n}, s < keeps.size() ? keeps[s] : 1.0, opts));
      m.step.push_back(0);
    }
  }
  return m;
}

// saved layout: 0 hf [T+1, B, nF], 1 ins [T+1, B, nF+nS], 2 in2 [T, B, nS+nF], 3 cf [T+1, k, B, nF],
// 4 cs [T+1, B, nS], then rest_0..rest_{k-3} [T, B, nF] (the inputs of F3..Fk), then per cell six:
// xh [T, B, 4n], r4 [T, B, 4], gates [T, B, 4n], xc [T, B, n], rc [T, B], tc [T, B, n]. Without `keep`
// (inference) every T is 1 and every T+1 is 2 (step t in slot t % 2), except hf's (it holds the outputs).
constexpr int64_t kSavedHead = 5;
constexpr int64_t kPerCell = 6;

std::vector<at::Tensor> fs_forward(const at::Tensor& xp_in, const at::Tensor& h_f, const at::Tensor& c_f,
                                   const at::Tensor& h_s, const at::Tensor& c_s, at::TensorList weights,
                                   const c10::List<std::optional<at::Tensor>>& biases, at::TensorList gains,
                                   at::TensorList shifts, at::TensorList c_gains, at::TensorList c_shifts,
                                   at::ArrayRef<double> eps, const c10::List<std::optional<at::Tensor>>& zone_masks,
                                   at::ArrayRef<double> zone_keeps, const std::optional<at::Tensor>& drop2,
                                   const std::optional<at::Tensor>& drop3, bool keep) {
  TORCH_CHECK(xp_in.device().is_cpu(), "fs_rnn: the C++ loop runs on CPU tensors only");
  const Cells cells = describe(xp_in, h_f, h_s, weights);
  const at::Tensor xp = xp_in.contiguous();
  const int64_t T = xp.size(0), B = xp.size(1), k = cells.k, nc = cells.count;
  const int64_t nf = h_f.size(1), ns = h_s.size(1);
  TORCH_CHECK(T >= 1, "fs_rnn: needs at least one step");
  TORCH_CHECK(h_f.sizes() == at::IntArrayRef({B, nf}) && c_f.sizes() == h_f.sizes() &&
                  h_s.dim() == 2 && h_s.size(0) == B && c_s.sizes() == h_s.sizes(),
              "fs_rnn: the states must be [B, n_F] (fast) and [B, n_S] (slow) with xp's B = ", B);
  TORCH_CHECK(static_cast<int64_t>(eps.size()) == nc && static_cast<int64_t>(biases.size()) == nc &&
                  static_cast<int64_t>(gains.size()) == nc && static_cast<int64_t>(shifts.size()) == nc &&
                  static_cast<int64_t>(c_gains.size()) == nc && static_cast<int64_t>(c_shifts.size()) == nc &&
                  static_cast<int64_t>(zone_masks.size()) == 2 * nc && static_cast<int64_t>(zone_keeps.size()) == 2 * nc,
              "fs_rnn: one entry per cell (two zoneouts per cell)");
  const auto opts = xp.options();
  std::vector<int64_t> zone_w;
  for (int64_t i = 0; i < nc; ++i) zone_w.insert(zone_w.end(), {cells.width[i], cells.width[i]});
  const MaskSet zone = masks_of(zone_masks, zone_keeps, zone_w, T, B, opts);
  c10::List<std::optional<at::Tensor>> drops;
  drops.push_back(drop2);
  drops.push_back(drop3);
  const MaskSet drop = masks_of(drops, {}, {nf, ns}, T, B, opts);

  // keep: every step's values for the backward; else (inference) one step's, and two slots of the
  // buffers a step reads at t and writes at t + 1 (hf, the output, always has every step)
  const int64_t K = keep ? T : 1, K1 = keep ? T + 1 : 2;
  std::vector<at::Tensor> saved;
  at::Tensor hf = at::empty({T + 1, B, nf}, opts), ins = at::empty({K1, B, nf + ns}, opts);
  at::Tensor in2 = at::empty({K, B, ns + nf}, opts), cf = at::empty({K1, k, B, nf}, opts);
  at::Tensor cs = at::empty({K1, B, ns}, opts);
  hf[0].copy_(h_f);
  cf[0][0].copy_(c_f);
  ins[0].narrow(1, nf, ns).copy_(h_s);
  cs[0].copy_(c_s);
  saved.insert(saved.end(), {hf, ins, in2, cf, cs});
  for (int64_t i = 0; i < k - 2; ++i) saved.push_back(at::empty({K, B, nf}, opts));
  const int64_t cell0 = static_cast<int64_t>(saved.size());
  for (int64_t i = 0; i < nc; ++i) {
    const int64_t n = cells.width[i];
    saved.insert(saved.end(), {at::empty({K, B, 4 * n}, opts), at::empty({K, B, 4}, opts),
                               at::empty({K, B, 4 * n}, opts), at::empty({K, B, n}, opts), at::empty({K, B}, opts),
                               at::empty({K, B, n}, opts)});
  }
  std::vector<seqplat::StepMatrix> w_t;  // the products [u | h_prev] W^T
  std::vector<at::Tensor> bias, g4, s4, gc, sc;
  for (int64_t i = 0; i < nc; ++i) {
    const auto dt = xp.scalar_type();
    TORCH_CHECK(weights[i].scalar_type() == dt && gains[i].scalar_type() == dt && shifts[i].scalar_type() == dt &&
                    c_gains[i].scalar_type() == dt && c_shifts[i].scalar_type() == dt,
                "fs_rnn: all parameters must share xp's dtype");
    const int64_t n = cells.width[i];
    TORCH_CHECK(gains[i].numel() == 4 * n && shifts[i].numel() == 4 * n && c_gains[i].numel() == n &&
                    c_shifts[i].numel() == n,
                "fs_rnn: LN gains and shifts of cell ", i, " must have ", 4 * n, " (LN4) and ", n, " (LN_c) entries");
    w_t.push_back(seqplat::prepare(weights[i].t(), T));
    const std::optional<at::Tensor> b = biases.get(i);
    TORCH_CHECK(!b.has_value() || !b->defined() || b->numel() == 4 * n, "fs_rnn: bias of cell ", i, " must have ",
                4 * n, " entries");
    bias.push_back(b.has_value() && b->defined() ? b->contiguous() : at::Tensor());
    g4.push_back(gains[i].contiguous());
    s4.push_back(shifts[i].contiguous());
    gc.push_back(c_gains[i].contiguous());
    sc.push_back(c_shifts[i].contiguous());
  }
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "fs_rnn_forward", [&] {
    using R = Rows<scalar_t>;
    using CR = Rows<const scalar_t>;
    scalar_t* hf_p = hf.mutable_data_ptr<scalar_t>();
    scalar_t* ins_p = ins.mutable_data_ptr<scalar_t>();
    scalar_t* in2_p = in2.mutable_data_ptr<scalar_t>();
    scalar_t* cf_p = cf.mutable_data_ptr<scalar_t>();
    scalar_t* cs_p = cs.mutable_data_ptr<scalar_t>();
    const int64_t wi = nf + ns;
    auto rest_p = [&](int64_t j, int64_t t) { return saved[kSavedHead + j].mutable_data_ptr<scalar_t>() + t * B * nf; };
    auto cf_at = [&](int64_t t, int64_t i) { return cf_p + (t * k + i) * B * nf; };
    for (int64_t t = 0; t < T; ++t) {
      const int64_t p = keep ? t : 0;             // slot of the per-step buffers
      const int64_t r0 = keep ? t : t % 2;        // slot of step t in the buffers with a slot for t + 1
      const int64_t r1 = keep ? t + 1 : 1 - r0;  // ... and of step t + 1
      for (int64_t i = 0; i < nc; ++i) {
        const int64_t n = cells.width[i];
        at::Tensor* cs_ = &saved[cell0 + i * kPerCell];
        at::Tensor xh_t = cs_[0][p];
        // the GEMM: a = [u | h_prev] W^T (+ b); F1's input product and bias come in xp
        if (i == 0) {
          seqplat::affine_into(xh_t, xp[t], hf[t], w_t[0]);
        } else {
          const at::Tensor in = i == 1 ? ins[r0] : (i == 2 ? in2[p] : saved[kSavedHead + i - 3][p]);
          if (bias[i].defined()) {
            seqplat::affine_into(xh_t, bias[i], in, w_t[i]);
          } else {
            seqplat::mm_into(xh_t, in, w_t[i]);
          }
        }
        FwdArgs<scalar_t> A;
        A.n = n;
        A.eps = static_cast<scalar_t>(eps[i]);
        A.g4 = g4[i].const_data_ptr<scalar_t>();
        A.s4 = s4[i].const_data_ptr<scalar_t>();
        A.gc = gc[i].const_data_ptr<scalar_t>();
        A.sc = sc[i].const_data_ptr<scalar_t>();
        A.xh = xh_t.mutable_data_ptr<scalar_t>();
        A.r4 = cs_[1].mutable_data_ptr<scalar_t>() + p * B * 4;
        A.gates = cs_[2].mutable_data_ptr<scalar_t>() + p * B * 4 * n;
        A.xc = cs_[3].mutable_data_ptr<scalar_t>() + p * B * n;
        A.rc = cs_[4].mutable_data_ptr<scalar_t>() + p * B;
        A.tc = cs_[5].mutable_data_ptr<scalar_t>() + p * B * n;
        const at::Tensor& zh = zone.held[2 * i];
        const at::Tensor& zc = zone.held[2 * i + 1];
        A.mh = CR{zh.const_data_ptr<scalar_t>() + t * zone.step[2 * i], n};
        A.mc = CR{zc.const_data_ptr<scalar_t>() + t * zone.step[2 * i + 1], n};
        A.h2 = R{nullptr, 0};
        A.d2 = CR{nullptr, 0};
        const bool last = i == nc - 1;
        // where h_t and c_t go: the next cell's GEMM input and c chain (Fk's: F1's of step t + 1)
        scalar_t* fast_h_out = last ? hf_p + (t + 1) * B * nf : nullptr;
        scalar_t* fast_c_out = last ? cf_at(r1, 0) : nullptr;
        if (i == 0) {  // F1: h_prev = hf[t] (Fk's of t - 1); h_t -> F2's h_prev and, dropped, S's input
          A.h_prev = CR{hf_p + t * B * nf, nf};
          A.c_prev = CR{cf_at(r0, 0), nf};
          A.h_out = R{in2_p + p * B * wi + ns, wi};
          A.c_out = R{cf_at(r0, 1), nf};
          A.h2 = R{ins_p + r0 * B * wi, wi};
          A.d2 = CR{drop.held[0].const_data_ptr<scalar_t>() + t * drop.step[0], nf};
        } else if (i == 1) {  // S: h_t -> its own h_prev of t + 1 and, dropped, F2's input
          A.h_prev = CR{ins_p + r0 * B * wi + nf, wi};
          A.c_prev = CR{cs_p + r0 * B * ns, ns};
          A.h_out = R{ins_p + r1 * B * wi + nf, wi};
          A.c_out = R{cs_p + r1 * B * ns, ns};
          A.h2 = R{in2_p + p * B * wi, wi};
          A.d2 = CR{drop.held[1].const_data_ptr<scalar_t>() + t * drop.step[1], ns};
        } else {  // F2..Fk: h_t -> the next fast cell's input (h_prev), Fk's -> hf[t + 1]
          if (i == 2) {
            A.h_prev = CR{in2_p + p * B * wi + ns, wi};
          } else {
            A.h_prev = CR{rest_p(i - 3, p), nf};
          }
          A.c_prev = CR{cf_at(r0, i - 1), nf};
          A.h_out = last ? R{fast_h_out, nf} : R{rest_p(i - 2, p), nf};
          A.c_out = last ? R{fast_c_out, nf} : R{cf_at(r0, i), nf};
        }
        forward_cell<scalar_t>(A, B);
      }
    }
  });
  return saved;
}

// returns dL/d h_f, c_f, h_s, c_s, then per cell: da [T, B, 4n], dW, db, d gain4, d shift4, d gain_c, d shift_c
std::vector<at::Tensor> fs_backward(at::TensorList saved, at::TensorList weights, at::TensorList gains,
                                    at::TensorList c_gains, const c10::List<std::optional<at::Tensor>>& zone_masks,
                                    at::ArrayRef<double> zone_keeps, const std::optional<at::Tensor>& drop2,
                                    const std::optional<at::Tensor>& drop3, const at::Tensor& dys_in,
                                    const at::Tensor& dh_f, const at::Tensor& dc_f, const at::Tensor& dh_s,
                                    const at::Tensor& dc_s) {
  const int64_t nc = static_cast<int64_t>(weights.size()), k = nc - 1;
  TORCH_CHECK(k >= 2 && static_cast<int64_t>(saved.size()) == kSavedHead + (k - 2) + kPerCell * nc,
              "fs_rnn: the saved buffers do not match the weights");
  const at::Tensor& hf = saved[0];
  const at::Tensor& ins = saved[1];
  const at::Tensor& in2 = saved[2];
  const at::Tensor& cf = saved[3];
  const at::Tensor& cs = saved[4];
  const int64_t T = in2.size(0), B = in2.size(1), nf = hf.size(2), ns = cs.size(2), wi = nf + ns;
  const int64_t cell0 = kSavedHead + (k - 2);
  const auto opts = hf.options();
  std::vector<int64_t> width, in_u;
  for (int64_t i = 0; i < nc; ++i) {
    width.push_back(i == 1 ? ns : nf);
    in_u.push_back(i == 1 ? nf : (i == 2 ? ns : 0));
  }
  std::vector<int64_t> zone_w;
  for (int64_t i = 0; i < nc; ++i) zone_w.insert(zone_w.end(), {width[i], width[i]});
  const MaskSet zone = masks_of(zone_masks, zone_keeps, zone_w, T, B, opts);
  c10::List<std::optional<at::Tensor>> drops;
  drops.push_back(drop2);
  drops.push_back(drop3);
  const MaskSet drop = masks_of(drops, {}, {nf, ns}, T, B, opts);
  const at::Tensor dys = dys_in.to(hf.scalar_type()).contiguous();
  TORCH_CHECK(dys.sizes() == at::IntArrayRef({T, B, nf}), "fs_rnn: the output gradient must be [T, B, n_F]");

  // carried gradients: d_in of each cell [B, in_u + n] (F1's is dL/dh_f of the step after, S's h part dL/dh_s),
  // the fast and slow c gradients
  std::vector<at::Tensor> d_in, da, acc_g4, acc_s4, acc_gc, acc_sc, acc_b, w, g4, gc;
  std::vector<seqplat::StepMatrix> wb;  // the products da W
  for (int64_t i = 0; i < nc; ++i) {
    const int64_t n = width[i];
    d_in.push_back(at::zeros({B, in_u[i] + n}, opts));
    da.push_back(at::empty({T, B, 4 * n}, opts));
    acc_g4.push_back(at::zeros({B, 4 * n}, opts));
    acc_s4.push_back(at::zeros({B, 4 * n}, opts));
    acc_b.push_back(at::zeros({B, 4 * n}, opts));
    acc_gc.push_back(at::zeros({B, n}, opts));
    acc_sc.push_back(at::zeros({B, n}, opts));
    w.push_back(weights[i].contiguous());
    g4.push_back(gains[i].contiguous());
    gc.push_back(c_gains[i].contiguous());
    TORCH_CHECK(w[i].scalar_type() == hf.scalar_type() && g4[i].scalar_type() == hf.scalar_type() &&
                    gc[i].scalar_type() == hf.scalar_type(),
                "fs_rnn: all parameters must share the saved buffers' dtype");
    wb.push_back(seqplat::prepare(w[i], T));
  }
  d_in[0].copy_(dh_f);
  d_in[1].narrow(1, nf, ns).copy_(dh_s);
  at::Tensor dcf = dc_f.to(hf.scalar_type()).contiguous().clone();
  at::Tensor dcs = dc_s.to(hf.scalar_type()).contiguous().clone();
  at::Tensor tmp = at::empty({B, std::max(nf, ns)}, opts);
  const int64_t nmax = std::max(nf, ns);
  at::Tensor zeros = at::zeros({nmax}, opts), ones = at::ones({nmax}, opts);

  AT_DISPATCH_FLOATING_TYPES(hf.scalar_type(), "fs_rnn_backward", [&] {
    using CR = Rows<const scalar_t>;
    const scalar_t* cf_p = cf.const_data_ptr<scalar_t>();
    const scalar_t* cs_p = cs.const_data_ptr<scalar_t>();
    const scalar_t* dys_p = dys.const_data_ptr<scalar_t>();
    const CR zero_rows{zeros.const_data_ptr<scalar_t>(), 0}, one_rows{ones.const_data_ptr<scalar_t>(), 0};
    std::vector<int64_t> rev;
    for (int64_t i = nc - 1; i >= 2; --i) rev.push_back(i);
    rev.insert(rev.end(), {1, 0});
    for (int64_t t = T - 1; t >= 0; --t) {
      for (int64_t i : rev) {  // compute order reversed: Fk, ..., F3, F2, S, F1
        const int64_t n = width[i];
        const at::Tensor* sv = &saved[cell0 + i * kPerCell];
        BwdArgs<scalar_t> A;
        A.n = n;
        A.du = in_u[i];
        A.g4 = g4[i].const_data_ptr<scalar_t>();
        A.gc = gc[i].const_data_ptr<scalar_t>();
        A.xh = sv[0].const_data_ptr<scalar_t>() + t * B * 4 * n;
        A.r4 = sv[1].const_data_ptr<scalar_t>() + t * B * 4;
        A.gates = sv[2].const_data_ptr<scalar_t>() + t * B * 4 * n;
        A.xc = sv[3].const_data_ptr<scalar_t>() + t * B * n;
        A.rc = sv[4].const_data_ptr<scalar_t>() + t * B;
        A.tc = sv[5].const_data_ptr<scalar_t>() + t * B * n;
        A.mh = CR{zone.held[2 * i].const_data_ptr<scalar_t>() + t * zone.step[2 * i], n};
        A.mc = CR{zone.held[2 * i + 1].const_data_ptr<scalar_t>() + t * zone.step[2 * i + 1], n};
        A.da = da[i].mutable_data_ptr<scalar_t>() + t * B * 4 * n;
        A.d_in = d_in[i].mutable_data_ptr<scalar_t>();
        A.tmp = tmp.mutable_data_ptr<scalar_t>();
        A.acc_g4 = acc_g4[i].mutable_data_ptr<scalar_t>();
        A.acc_s4 = acc_s4[i].mutable_data_ptr<scalar_t>();
        A.acc_gc = acc_gc[i].mutable_data_ptr<scalar_t>();
        A.acc_sc = acc_sc[i].mutable_data_ptr<scalar_t>();
        A.acc_b = acc_b[i].mutable_data_ptr<scalar_t>();
        A.mb = one_rows;
        if (i == 0) {  // F1: dL/dh = F2's h_prev gradient + S's input gradient * site 2 mask
          A.c_prev = CR{cf_p + (t * k + 0) * B * nf, nf};
          A.dc = dcf.mutable_data_ptr<scalar_t>();
          A.dh_a = CR{d_in[2].const_data_ptr<scalar_t>() + ns, wi};
          A.dh_b = CR{d_in[1].const_data_ptr<scalar_t>(), wi};
          A.mb = CR{drop.held[0].const_data_ptr<scalar_t>() + t * drop.step[0], nf};
        } else if (i == 1) {  // S: its own h_prev gradient of step t + 1 + F2's input gradient * site 3 mask
          A.c_prev = CR{cs_p + t * B * ns, ns};
          A.dc = dcs.mutable_data_ptr<scalar_t>();
          A.dh_a = CR{d_in[1].const_data_ptr<scalar_t>() + nf, wi};
          A.dh_b = CR{d_in[2].const_data_ptr<scalar_t>(), wi};
          A.mb = CR{drop.held[1].const_data_ptr<scalar_t>() + t * drop.step[1], ns};
        } else {
          A.c_prev = CR{cf_p + (t * k + i - 1) * B * nf, nf};
          A.dc = dcf.mutable_data_ptr<scalar_t>();
          if (i == nc - 1) {  // Fk: y_t and F1's h_prev of step t + 1
            A.dh_a = CR{d_in[0].const_data_ptr<scalar_t>(), nf};
            A.dh_b = CR{dys_p + t * B * nf, nf};
          } else {  // the next fast cell's h_prev gradient
            A.dh_a = CR{d_in[i + 1].const_data_ptr<scalar_t>(), nf};
            A.dh_b = zero_rows;
          }
        }
        backward_cell<scalar_t>(A, B);
        seqplat::addmm_into(d_in[i], da[i][t], wb[i]);  // dL/d[u | h_prev] += da W
      }
    }
  });
  std::vector<at::Tensor> out;
  out.push_back(d_in[0]);
  out.push_back(dcf);
  out.push_back(d_in[1].narrow(1, nf, ns).contiguous());
  out.push_back(dcs);
  for (int64_t i = 0; i < nc; ++i) {
    const int64_t n = width[i];
    const at::Tensor in = i == 0 ? hf.narrow(0, 0, T) : (i == 1 ? ins.narrow(0, 0, T) : (i == 2 ? in2 : saved[kSavedHead + i - 3]));
    const at::Tensor dw = seqplat::outer(da[i].view({T * B, 4 * n}), in.reshape({T * B, in_u[i] + n}));
    out.insert(out.end(), {da[i], dw, acc_b[i].sum(0), acc_g4[i].sum(0), acc_s4[i].sum(0), acc_gc[i].sum(0),
                           acc_sc[i].sum(0)});
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(seqplat_fs_rnn, m) {
  m.def(
      "forward(Tensor xp, Tensor h_f, Tensor c_f, Tensor h_s, Tensor c_s, Tensor[] weights, Tensor?[] biases, "
      "Tensor[] gains, Tensor[] shifts, Tensor[] c_gains, Tensor[] c_shifts, float[] eps, Tensor?[] zone_masks, "
      "float[] zone_keeps, Tensor? drop2, Tensor? drop3, bool keep=True) -> Tensor[]");
  m.def(
      "backward(Tensor[] saved, Tensor[] weights, Tensor[] gains, Tensor[] c_gains, Tensor?[] zone_masks, "
      "float[] zone_keeps, Tensor? drop2, Tensor? drop3, Tensor grad_ys, Tensor grad_h_f, Tensor grad_c_f, "
      "Tensor grad_h_s, Tensor grad_c_s) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(seqplat_fs_rnn, CPU, m) {
  m.impl("forward", &fs_forward);
  m.impl("backward", &fs_backward);
}
