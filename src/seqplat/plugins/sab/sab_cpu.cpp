// Sparse Attentive Backtracking with an LSTM inner cell and the MLP scorer, the whole loop on CPU (the
// C++ fast path of cell.py; fused.py is its autograd Function and says when it applies).
//
// One step t of cell.py's module docstring, with the inner LSTM of baselines/cells.py (gate order i, f, g, o):
//
//     (2) a = xp_t + W_hh h_{t-1};  c_t = f c_{t-1} + i g;  h^_t = o tanh(c_t)      (xp_t = W_ih x_t + b_ih + b_hh)
//     (3) q_t = W_q h^_t + b_q;  a_{t,i} = v^T tanh(q_t + k_i),  k_i = W_m m_i       (MLP scorer)
//     (4) w = the sparse weights of the top slots (paper or release sparsifier; softmax or raw scores while
//         the memory holds at most k_top slots)
//     (5) s_t = sum_j w_j m_{idx_j}
//     (6) h_t = h^_t + s_t
//     (7) m_pos <- h_t (and k_pos <- W_m h_t) at the steps the schedule names
//     (8) y_t = [h_t; s_t] or h_t
//
// The caller (fused.py) turns the schedule of cell.py into three arrays over the steps of this call:
// cut[t] (the local path is cut before step t: (1)), nread[t] (slots in use at step t) and wpos[t] (the
// slot written after step t, or -1).
//
// Memory by occupant. A slot's value changes when it is overwritten, so the loop keeps every value the
// memory ever held ("occupants": the S slots of the carried memory, then one per write) in vals[S + W, B, H]
// and their keys in keys[S + W, B, d], and owner[slot] names the current occupant of each slot. A read
// saves the occupants it used (occ[t]), so the backward reads the same values and recomputes the scores
// of the few slots that get a gradient (the k_top + 1 of the sparse selection, or all of a small memory),
// never a [B, n, d] tensor per step. Backward gradients are collected per occupant (dvals, dkeys); a
// write's occupant hands its gradient to h_t when the reverse loop reaches that write, after all the
// reads of that occupant (they come later in time) have been processed.
//
// Products per step go through seqplat_gemm.h; weight gradients are one product over all steps after
// the loop (seqplat::outer; with the projection's input given, W_ih's and the bias's from the same d a).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "seqplat_cpu.h"
#include "seqplat_gemm.h"
#include "seqplat_lstm.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace {

using seqplat::for_rows;
using seqplat::lstm_backward_cell;
using seqplat::lstm_forward_cell;
using seqplat::row_grain;

// (3) one score v^T tanh(q + k) over d units
template <typename scalar_t>
inline scalar_t score(const scalar_t* q, const scalar_t* k, const scalar_t* v, int64_t d) {
  scalar_t acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < d; ++j) acc += v[j] * std::tanh(q[j] + k[j]);
  return acc;
}

// the per-step tensors the backward reads
struct Saved {
  at::Tensor gates, hs, cs, tcs;  // LSTM: [T, B, 4H], [T+1, B, H] (h_t after the summary), [T+1, B, H], [T, B, H]
  at::Tensor hhat, qs;            // h^_t [T, B, H], q_t [T, B, d]
  at::Tensor vals, keys;          // occupants' values [S+W, B, H] and keys [S+W, B, d]
  at::Tensor occ, w, z;           // per read: occupants [T, B, k+1], weights [T, B, k+1], normaliser [T, B]
  at::Tensor owner;               // final occupant of every slot [S]
  at::Tensor read0;               // the carried slots some step reads before they are overwritten [R]
};

// the carried slots (occupants 0..S-1) that some step of the schedule reads while they still hold them: only
// their keys are computed, and only they get a key gradient
at::Tensor initial_slots_read(const int64_t* nread, const int64_t* wpos, int64_t T, int64_t S) {
  std::vector<int64_t> own(S);
  std::vector<char> read(S, 0);
  for (int64_t i = 0; i < S; ++i) own[i] = i;
  int64_t next = S;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < nread[t]; ++i) {
      if (own[i] < S) read[own[i]] = 1;
    }
    if (wpos[t] >= 0) own[wpos[t]] = next++;
  }
  std::vector<int64_t> ids;
  for (int64_t i = 0; i < S; ++i) {
    if (read[i]) ids.push_back(i);
  }
  return at::tensor(ids, at::kLong);
}

// rows `ids` of an occupant-major tensor [occupants, B, k] followed by the written occupants (from S on), as
// [rows * B, k]: the occupants that have a key (a view when no carried slot is among them)
at::Tensor keyed_rows(const at::Tensor& t, const at::Tensor& ids, int64_t S) {
  const int64_t written = t.size(0) - S;
  at::Tensor rows = ids.numel() == 0 ? t.narrow(0, S, written)
                                     : at::cat({t.index_select(0, ids), t.narrow(0, S, written)}, 0);
  return rows.reshape({-1, t.size(2)});
}

std::vector<at::Tensor> sab_forward(const at::Tensor& xp_in, const at::Tensor& w_hh_in, const at::Tensor& h0,
                                    const at::Tensor& c0, const at::Tensor& memory, const at::Tensor& w_q_in,
                                    const at::Tensor& b_q_in, const at::Tensor& w_m_in, const at::Tensor& v_in,
                                    const at::Tensor& cut_in, const at::Tensor& nread_in, const at::Tensor& wpos_in,
                                    int64_t k_top, bool official, bool raw_small, double eps, bool summary_out) {
  TORCH_CHECK(xp_in.dim() == 3 && xp_in.size(2) % 4 == 0, "sab: xp must be [time, batch, 4*hidden], got ",
              xp_in.sizes());
  TORCH_CHECK(xp_in.device().is_cpu(), "sab: the C++ loop runs on CPU tensors only");
  const at::Tensor xp = xp_in.contiguous(), w_hh = w_hh_in.contiguous(), w_q = w_q_in.contiguous(),
                   b_q = b_q_in.contiguous(), w_m = w_m_in.contiguous(), v = v_in.contiguous();
  const at::Tensor cut = cut_in.to(at::kLong).contiguous(), nread = nread_in.to(at::kLong).contiguous(),
                   wpos = wpos_in.to(at::kLong).contiguous();
  const int64_t T = xp.size(0), B = xp.size(1), H = xp.size(2) / 4, S = memory.size(1), d = w_q.size(0);
  TORCH_CHECK(memory.dim() == 3 && memory.size(0) == B && memory.size(2) == H, "sab: memory must be [", B, ", S, ",
              H, "], got ", memory.sizes());
  TORCH_CHECK(w_hh.sizes() == at::IntArrayRef({4 * H, H}) && w_m.sizes() == at::IntArrayRef({d, H}) &&
                  w_q.size(1) == H && b_q.numel() == d && v.numel() == d,
              "sab: weight shapes do not match hidden size ", H, " and score size ", d);
  TORCH_CHECK(cut.numel() == T && nread.numel() == T && wpos.numel() == T, "sab: the schedule must have ", T,
              " steps");
  for (const auto* t : {&w_hh, &h0, &c0, &memory, &w_q, &b_q, &w_m, &v}) {
    TORCH_CHECK(t->scalar_type() == xp.scalar_type(), "sab: all inputs must share xp's dtype");
  }
  const int64_t* nread_p = nread.const_data_ptr<int64_t>();
  const int64_t* wpos_p = wpos.const_data_ptr<int64_t>();
  int64_t W = 0;
  bool reads = false;
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(nread_p[t] >= 0 && nread_p[t] <= S && wpos_p[t] < S, "sab: schedule out of range at step ", t);
    W += wpos_p[t] >= 0;
    reads = reads || nread_p[t] > 0;
  }
  const int64_t K1 = k_top + 1;
  const auto opts = xp.options();
  Saved s;
  s.gates = at::empty_like(xp);
  s.hs = at::empty({T + 1, B, H}, opts);
  s.cs = at::empty({T + 1, B, H}, opts);
  s.tcs = at::empty({T, B, H}, opts);
  s.hhat = at::empty({T, B, H}, opts);
  // queries and keys are written before anything reads them (only steps that read, only occupants a step
  // reads: see initial_slots_read), so they start uninitialised
  s.qs = at::empty({T, B, d}, opts);
  s.vals = at::empty({S + W, B, H}, opts);
  s.keys = at::empty({S + W, B, d}, opts);
  s.occ = at::zeros({T, B, K1}, opts.dtype(at::kLong));
  s.w = at::zeros({T, B, K1}, opts);
  s.z = at::ones({T, B}, opts);
  s.owner = at::arange(S, opts.dtype(at::kLong));
  at::Tensor y = at::empty({B, T, summary_out ? 2 * H : H}, opts);
  s.hs[0].copy_(h0);
  s.cs[0].copy_(c0);
  s.vals.narrow(0, 0, S).copy_(memory.transpose(0, 1));
  s.read0 = initial_slots_read(nread_p, wpos_p, T, S);
  const int64_t R = s.read0.numel();
  if (R > 0) {  // (3) k_i = W_m m_i of the carried slots that are read
    const at::Tensor m0 = s.vals.index_select(0, s.read0).view({R * B, H});
    s.keys.index_copy_(0, s.read0, at::mm(m0, w_m.t()).view({R, B, d}));
  }
  const seqplat::StepMatrix whh = seqplat::prepare(w_hh.t(), T);
  const seqplat::StepMatrix wq = seqplat::prepare(w_q.t(), T);
  const seqplat::StepMatrix wm = seqplat::prepare(w_m.t(), W);
  int64_t* owner = s.owner.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "sab_forward", [&] {
    const scalar_t tiny = std::numeric_limits<scalar_t>::min();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    scalar_t* vals = s.vals.data_ptr<scalar_t>();
    const scalar_t* keys = s.keys.const_data_ptr<scalar_t>();
    int64_t written = S;
    for (int64_t t = 0; t < T; ++t) {
      at::Tensor a = s.gates[t];
      const at::Tensor p = seqplat::mm_result(a, s.hs[t], whh);  // (2) W_hh h_{t-1}
      scalar_t* hhat = s.hhat[t].data_ptr<scalar_t>();
      lstm_forward_cell<scalar_t>(p.const_data_ptr<scalar_t>(), a.data_ptr<scalar_t>(),
                                  xp[t].const_data_ptr<scalar_t>(), s.cs[t].const_data_ptr<scalar_t>(),
                                  s.cs[t + 1].data_ptr<scalar_t>(), s.tcs[t].data_ptr<scalar_t>(), hhat, B, H);
      const int64_t n = nread_p[t];
      if (n > 0) {
        at::Tensor q = s.qs[t];
        seqplat::affine_into(q, b_q, s.hhat[t], wq);  // (3) q_t = W_q h^_t + b_q
      }
      const scalar_t* qp = s.qs[t].const_data_ptr<scalar_t>();
      scalar_t* h = s.hs[t + 1].data_ptr<scalar_t>();
      int64_t* occ = s.occ[t].data_ptr<int64_t>();
      scalar_t* wt = s.w[t].data_ptr<scalar_t>();
      scalar_t* zt = s.z[t].data_ptr<scalar_t>();
      scalar_t* yp = y.data_ptr<scalar_t>();
      const int64_t ystride = y.size(2), yrow = T * ystride;
      for_rows(B, row_grain(n * d + 4 * H, 8192), [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> sc(std::max<int64_t>(n, 1));
        std::vector<scalar_t> top_v(K1);
        std::vector<int64_t> top_i(K1);
        for (int64_t r = begin; r < end; ++r) {
          const scalar_t* hh = hhat + r * H;
          scalar_t* hr = h + r * H;
          scalar_t* yr = yp + r * yrow + t * ystride;
          scalar_t* wr = wt + r * K1;
          int64_t* oc = occ + r * K1;
          int64_t m = 0;  // slots read
          if (n > 0) {
            for (int64_t i = 0; i < n; ++i) {  // (3) scores of every slot in use
              sc[i] = score<scalar_t>(qp + r * d, keys + (owner[i] * B + r) * d, vp, d);
            }
            if (n <= k_top) {  // (4) small memory: every slot, softmax or raw scores
              m = n;
              if (raw_small) {
                for (int64_t i = 0; i < n; ++i) wr[i] = sc[i];
              } else {
                scalar_t mx = sc[0];
                for (int64_t i = 1; i < n; ++i) mx = std::max(mx, sc[i]);
                scalar_t sum = 0;
                for (int64_t i = 0; i < n; ++i) sum += (wr[i] = std::exp(sc[i] - mx));
                for (int64_t i = 0; i < n; ++i) wr[i] /= sum;
              }
              for (int64_t i = 0; i < n; ++i) oc[i] = owner[i];
            } else {  // (4) the k_top + 1 best slots in order (ties: the lower slot first, as a stable sort)
              int64_t filled = 0;
              for (int64_t i = 0; i < n; ++i) {
                if (filled == K1 && !(sc[i] > top_v[K1 - 1])) continue;
                int64_t j = std::min(filled, K1 - 1);
                while (j > 0 && sc[i] > top_v[j - 1]) {
                  top_v[j] = top_v[j - 1];
                  top_i[j] = top_i[j - 1];
                  --j;
                }
                top_v[j] = sc[i];
                top_i[j] = i;
                filled = std::min(filled + 1, K1);
              }
              // paper: delta = the (k_top+1)-th score; release: the k_top-th + eps, and sum + eps below
              const scalar_t delta = official ? top_v[k_top - 1] + scalar_t(eps) : top_v[k_top];
              scalar_t sum = 0;
              for (int64_t j = 0; j < k_top; ++j) sum += (wr[j] = std::max(top_v[j] - delta, scalar_t(0)));
              const scalar_t zden = official ? sum + scalar_t(eps) : std::max(sum, tiny);
              for (int64_t j = 0; j < k_top; ++j) wr[j] /= zden;
              zt[r] = zden;
              for (int64_t j = 0; j < K1; ++j) oc[j] = owner[top_i[j]];
              m = k_top;
            }
          }
          // (5) s_t = sum_j w_j m_{idx_j};  (6) h_t = h^_t + s_t;  (8) y_t
          scalar_t* ys = summary_out ? yr + H : nullptr;
          _Pragma("omp simd")
          for (int64_t k = 0; k < H; ++k) hr[k] = hh[k];
          if (ys != nullptr) std::fill(ys, ys + H, scalar_t(0));
          for (int64_t j = 0; j < m; ++j) {
            const scalar_t wj = wr[j];
            if (wj == scalar_t(0)) continue;
            const scalar_t* mv = vals + (oc[j] * B + r) * H;
            if (ys != nullptr) {
              _Pragma("omp simd")
              for (int64_t k = 0; k < H; ++k) ys[k] += wj * mv[k];
            }
            _Pragma("omp simd")
            for (int64_t k = 0; k < H; ++k) hr[k] += wj * mv[k];
          }
          std::copy(hr, hr + H, yr);
        }
      });
      if (wpos_p[t] >= 0) {  // (7) the slot's new occupant is h_t, with its key
        s.vals[written].copy_(s.hs[t + 1]);
        at::Tensor kt = s.keys[written];
        if (reads) seqplat::mm_into(kt, s.hs[t + 1], wm);
        owner[wpos_p[t]] = written++;
      }
    }
  });
  at::Tensor mem_out = s.vals.transpose(0, 1).index_select(1, s.owner);  // [B, S, H], one copy
  return {y,      s.hs[T].clone(), s.cs[T].clone(), mem_out, s.gates, s.hs,  s.cs,   s.tcs,
          s.hhat, s.qs,            s.vals,          s.keys,  s.occ,   s.w,   s.z,    s.owner, s.read0};
}

std::vector<at::Tensor> sab_backward(const std::vector<at::Tensor>& saved, const at::Tensor& w_hh_in,
                                     const at::Tensor& w_q_in, const at::Tensor& w_m_in, const at::Tensor& v_in,
                                     const std::optional<at::Tensor>& g_y_in,
                                     const std::optional<at::Tensor>& g_hT, const std::optional<at::Tensor>& g_cT,
                                     const std::optional<at::Tensor>& g_mem, bool memory_grad,
                                     const at::Tensor& cut_in, const at::Tensor& nread_in,
                                     const at::Tensor& wpos_in, int64_t k_top, bool official, bool raw_small,
                                     bool detach_threshold, bool summary_out, const std::optional<at::Tensor>& x) {
  TORCH_CHECK(saved.size() == 13, "sab: backward needs the 13 saved tensors of forward");
  Saved s{saved[0], saved[1], saved[2],  saved[3],  saved[4],  saved[5], saved[6],
          saved[7], saved[8], saved[9], saved[10], saved[11], saved[12]};
  const int64_t T = s.gates.size(0), B = s.gates.size(1), H = s.gates.size(2) / 4, S = s.owner.size(0);
  const int64_t d = s.qs.size(2), K1 = k_top + 1, occupants = s.vals.size(0);
  const at::Tensor w_hh = w_hh_in.contiguous(), w_q = w_q_in.contiguous(), w_m = w_m_in.contiguous(),
                   v = v_in.contiguous();
  const at::Tensor cut = cut_in.to(at::kLong).contiguous(), nread = nread_in.to(at::kLong).contiguous(),
                   wpos = wpos_in.to(at::kLong).contiguous();
  const auto opts = s.gates.options();
  // an output nobody used has no gradient (undefined): zero for y, h_T and c_T, nothing to add for the memory
  const at::Tensor g_y = g_y_in.has_value() && g_y_in->defined()
                             ? g_y_in->to(opts.dtype()).contiguous()
                             : at::zeros({B, T, summary_out ? 2 * H : H}, opts);
  // d a of every step, also as oneDNN's tensor type over the same memory for the weight gradients
  const seqplat::OuterFactor da_rows = seqplat::outer_factor(T * B, 4 * H, opts);
  at::Tensor da_all = da_rows.dense.view({T, B, 4 * H});
  at::Tensor dq_all = at::zeros({T, B, d}, opts);
  at::Tensor dvals = at::zeros({occupants, B, H}, opts);
  at::Tensor dkeys = at::zeros({occupants, B, d}, opts);
  at::Tensor dv_rows = at::zeros({B, d}, opts);
  // the carried memory's gradient goes to the final occupants
  if (g_mem.has_value() && g_mem->defined()) dvals.index_add_(0, s.owner, g_mem->to(opts.dtype()).transpose(0, 1));
  auto state_grad = [&](const std::optional<at::Tensor>& g) {
    return g.has_value() && g->defined() ? g->to(opts.dtype()).clone().contiguous() : at::zeros({B, H}, opts);
  };
  at::Tensor dh_rec = state_grad(g_hT);  // gradient of h_t from later steps
  at::Tensor dc = state_grad(g_cT);
  at::Tensor dh = at::empty({B, H}, opts);
  at::Tensor dh_buf = at::empty({B, H}, opts);
  const at::Tensor zeros = at::zeros({B, H}, opts);
  const int64_t* cut_p = cut.const_data_ptr<int64_t>();
  const int64_t* nread_p = nread.const_data_ptr<int64_t>();
  const int64_t* wpos_p = wpos.const_data_ptr<int64_t>();
  int64_t written = occupants;
  bool reads = false;
  for (int64_t t = 0; t < T; ++t) reads = reads || nread_p[t] > 0;
  const seqplat::StepMatrix whh = seqplat::prepare(w_hh, T);
  const seqplat::StepMatrix wq = seqplat::prepare(w_q, T);
  const seqplat::StepMatrix wm = seqplat::prepare(w_m, occupants - S);
  AT_DISPATCH_FLOATING_TYPES(s.gates.scalar_type(), "sab_backward", [&] {
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    const scalar_t* vals = s.vals.const_data_ptr<scalar_t>();
    const scalar_t* keys = s.keys.const_data_ptr<scalar_t>();
    scalar_t* dvals_p = dvals.data_ptr<scalar_t>();
    scalar_t* dkeys_p = dkeys.data_ptr<scalar_t>();
    scalar_t* dv_p = dv_rows.data_ptr<scalar_t>();
    const scalar_t* gy = g_y.const_data_ptr<scalar_t>();
    const int64_t ystride = g_y.size(2), yrow = T * ystride;
    for (int64_t t = T - 1; t >= 0; --t) {
      // dh = gradient of h_t: later steps + the output y_t (+ the memory, if h_t was written)
      dh.copy_(dh_rec);
      dh.add_(g_y.select(1, t).narrow(1, 0, H));
      if (wpos_p[t] >= 0) {  // (7) the occupant written after step t is h_t
        --written;
        dh.add_(dvals[written]);
        if (reads) seqplat::addmm_into(dh, dkeys[written], wm);  // k = W_m h_t
      }
      const int64_t n = nread_p[t];
      scalar_t* dhp = dh.data_ptr<scalar_t>();
      if (n > 0) {
        const scalar_t* qp = s.qs[t].const_data_ptr<scalar_t>();
        const int64_t* occ = s.occ[t].const_data_ptr<int64_t>();
        const scalar_t* wt = s.w[t].const_data_ptr<scalar_t>();
        const scalar_t* zt = s.z[t].const_data_ptr<scalar_t>();
        scalar_t* dq = dq_all[t].data_ptr<scalar_t>();
        for_rows(B, row_grain(K1 * (d + H), 8192), [&](int64_t begin, int64_t end) {
          std::vector<scalar_t> ds(H), dw(K1), da(K1);
          for (int64_t r = begin; r < end; ++r) {
            const int64_t* oc = occ + r * K1;
            const scalar_t* wr = wt + r * K1;
            // (6) h_t = h^_t + s_t and (8) y_t = [h_t; s_t]: ds = dh (+ the summary's output gradient)
            const scalar_t* dhr = dhp + r * H;
            const scalar_t* gs = summary_out ? gy + r * yrow + t * ystride + H : nullptr;
            for (int64_t k = 0; k < H; ++k) ds[k] = dhr[k] + (gs != nullptr ? gs[k] : scalar_t(0));
            const bool small = n <= k_top;
            const int64_t m = small ? n : k_top;  // slots read
            // (5) s = sum_j w_j m_j: dm_j += w_j ds, dw_j = <m_j, ds>
            scalar_t dot = 0;
            for (int64_t j = 0; j < m; ++j) {
              const scalar_t* mv = vals + (oc[j] * B + r) * H;
              scalar_t* dm = dvals_p + (oc[j] * B + r) * H;
              const scalar_t wj = wr[j];
              scalar_t acc = 0;
              _Pragma("omp simd reduction(+ : acc)")
              for (int64_t k = 0; k < H; ++k) {
                acc += mv[k] * ds[k];
                dm[k] += wj * ds[k];
              }
              dw[j] = acc;
              dot += acc * wj;
            }
            // (4) the scores' gradient da over the slots that have one (count)
            int64_t count = m;
            if (small) {
              for (int64_t j = 0; j < m; ++j) da[j] = raw_small ? dw[j] : wr[j] * (dw[j] - dot);  // softmax
            } else {
              // w_j = kept_j / Z, kept_j = relu(top_j - delta): d top_j = (dw_j - sum_l dw_l w_l) / Z where kept_j > 0
              const scalar_t zden = zt[r];
              scalar_t total = 0;
              for (int64_t j = 0; j < k_top; ++j) {
                da[j] = wr[j] > scalar_t(0) ? (dw[j] - dot) / zden : scalar_t(0);
                total += da[j];
              }
              const int64_t thr = official ? k_top - 1 : k_top;  // the slot that sets delta
              if (!official) da[k_top] = 0;
              count = official ? k_top : K1;
              if (!detach_threshold) da[thr] -= total;
            }
            // (3) a_i = v^T tanh(q + k_i), recomputed for these slots only
            const scalar_t* qr = qp + r * d;
            scalar_t* dqr = dq + r * d;
            scalar_t* dvr = dv_p + r * d;
            for (int64_t j = 0; j < count; ++j) {
              const scalar_t g = da[j];
              if (g == scalar_t(0)) continue;
              const scalar_t* kr = keys + (oc[j] * B + r) * d;
              scalar_t* dk = dkeys_p + (oc[j] * B + r) * d;
              _Pragma("omp simd")
              for (int64_t k = 0; k < d; ++k) {
                const scalar_t zz = std::tanh(qr[k] + kr[k]);
                const scalar_t gp = g * vp[k] * (scalar_t(1) - zz * zz);
                dqr[k] += gp;
                dk[k] += gp;
                dvr[k] += g * zz;
              }
            }
          }
        });
        // (3) q = W_q h^ + b_q: dh^ = dh + dq W_q
        seqplat::addmm_into(dh, dq_all[t], wq);
      }
      // (2) LSTM step backward with dh^; dh_{t-1} = da W_hh unless the path is cut before step t (1)
      at::Tensor da = da_all[t];
      lstm_backward_cell<scalar_t>(s.gates[t].const_data_ptr<scalar_t>(), s.cs[t].const_data_ptr<scalar_t>(),
                                   s.tcs[t].const_data_ptr<scalar_t>(), dh.const_data_ptr<scalar_t>(),
                                   zeros.const_data_ptr<scalar_t>(), dc.data_ptr<scalar_t>(), da.data_ptr<scalar_t>(),
                                   B, H);  // dh is all of h^_t's gradient: nothing to add
      if (cut_p[t] != 0) {
        dh_rec.zero_();
        dc.zero_();
      } else {
        dh_rec = seqplat::mm_result(dh_buf, da, whh);  // read (copied into dh) at the start of step t-1
      }
    }
  });
  // weight gradients over all steps: (2) W_hh, (3) W_q, b_q, W_m, v
  // with x (the input of the inner LSTM's hoisted projection, [T*B, D] time major) also W_ih and the bias, from
  // the same oneDNN tensor of d a
  const at::Tensor h_prev = s.hs.narrow(0, 0, T).reshape({T * B, H});
  at::Tensor g_whh, g_wih, g_b;
  if (x.has_value()) {
    TORCH_CHECK(x->dim() == 2 && x->size(0) == T * B, "sab: x must be [T*B, D], got ", x->sizes());
    std::tie(g_whh, g_wih, g_b) = seqplat::outer_pair(da_rows, h_prev, x->to(opts.dtype()), true);
  } else {
    g_whh = seqplat::outer(da_rows, h_prev);
  }
  const at::Tensor g_wq = seqplat::outer(dq_all.view({T * B, d}), s.hhat.view({T * B, H}));
  const at::Tensor g_bq = dq_all.sum({0, 1});
  const at::Tensor g_wm = seqplat::outer(keyed_rows(dkeys, s.read0, S), keyed_rows(s.vals, s.read0, S));
  const at::Tensor g_v = dv_rows.sum(0);
  // the carried memory: its values and (k = W_m m) the keys of the slots read
  at::Tensor g_mem0;  // undefined unless the carried memory needs a gradient
  if (memory_grad) {
    g_mem0 = dvals.narrow(0, 0, S).clone();
    const int64_t R = s.read0.numel();
    if (R > 0) {
      g_mem0.index_add_(0, s.read0, at::mm(dkeys.index_select(0, s.read0).view({R * B, d}), w_m).view({R, B, H}));
    }
    g_mem0 = g_mem0.transpose(0, 1).contiguous();
  }
  std::vector<at::Tensor> out{da_all, g_whh, dh_rec.clone(), dc, g_mem0, g_wq, g_bq, g_wm, g_v};
  if (x.has_value()) {
    out.push_back(g_wih);
    out.push_back(g_b);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(seqplat_sab, m) {
  m.def(
      "forward(Tensor xp, Tensor w_hh, Tensor h0, Tensor c0, Tensor memory, Tensor w_q, Tensor b_q, Tensor w_m, "
      "Tensor v, Tensor cut, Tensor nread, Tensor wpos, int k_top, bool official, bool raw_small, float eps, "
      "bool summary_out) -> Tensor[]");
  m.def(
      "backward(Tensor[] saved, Tensor w_hh, Tensor w_q, Tensor w_m, Tensor v, Tensor? grad_y, Tensor? grad_hT, "
      "Tensor? grad_cT, Tensor? grad_memory, bool memory_grad, Tensor cut, Tensor nread, Tensor wpos, int k_top, "
      "bool official, bool raw_small, bool detach_threshold, bool summary_out, Tensor? x=None) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(seqplat_sab, CPU, m) {
  m.impl("forward", &sab_forward);
  m.impl("backward", &sab_backward);
}

