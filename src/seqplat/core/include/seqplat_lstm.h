// The elementwise passes of an LSTM step on CPU (torch's gate order i, f, g, o), shared by the own LSTM's
// loop (baselines/own_lstm_cpu.cpp) and sab's (sab/sab_cpu.cpp). The equations, as numbered there:
//
//     (1) a = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh = [a_i, a_f, a_g, a_o]
//         i = sigmoid(a_i), f = sigmoid(a_f), g = tanh(a_g), o = sigmoid(a_o)
//     (2) c_t = f * c_{t-1} + i * g
//     (3) h_t = o * tanh(c_t)
//
// Rows run in parallel when a step is large enough (seqplat_cpu.h). seqplat.core.cpp_ext hashes this file
// into every kernel's build name.

#pragma once

#include "seqplat_cpu.h"

#include <cmath>
#include <cstdint>

namespace seqplat {

// `p` holds W_hh h_{t-1} (it may be `a` itself), `xp` the hoisted input part of (1); the activated gates go to `a`
template <typename scalar_t>
void lstm_forward_cell(const scalar_t* p, scalar_t* a, const scalar_t* xp, const scalar_t* c_prev, scalar_t* c,
                       scalar_t* tc, scalar_t* h, int64_t B, int64_t H) {
  for_rows(B, row_grain(4 * H, 16384), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* pr = p + r * 4 * H;
      scalar_t* ar = a + r * 4 * H;
      const scalar_t* xr = xp + r * 4 * H;
      const int64_t o_ = r * H;
#pragma omp simd
      for (int64_t k = 0; k < H; ++k) {
        // (1) a = xp_t + W_hh h_{t-1}, then the gate nonlinearities
        const scalar_t i = sigmoid(pr[k] + xr[k]);                  // (1) i = sigmoid(a_i)
        const scalar_t f = sigmoid(pr[H + k] + xr[H + k]);          // (1) f = sigmoid(a_f)
        const scalar_t g = std::tanh(pr[2 * H + k] + xr[2 * H + k]);  // (1) g = tanh(a_g)
        const scalar_t o = sigmoid(pr[3 * H + k] + xr[3 * H + k]);  // (1) o = sigmoid(a_o)
        const scalar_t cn = f * c_prev[o_ + k] + i * g;    // (2) c_t = f * c_{t-1} + i * g
        const scalar_t t = std::tanh(cn);                  // (3) tanh(c_t)
        ar[k] = i;
        ar[H + k] = f;
        ar[2 * H + k] = g;
        ar[3 * H + k] = o;
        c[o_ + k] = cn;
        tc[o_ + k] = t;
        h[o_ + k] = o * t;                                 // (3) h_t = o * tanh(c_t)
      }
    }
  });
}

// dh_t = dh_rec (from step t+1, or grad h_T) + g_y (the output gradient of step t)
template <typename scalar_t>
void lstm_backward_cell(const scalar_t* a, const scalar_t* c_prev, const scalar_t* tc, const scalar_t* dh_rec,
                        const scalar_t* g_y, scalar_t* dc, scalar_t* da, int64_t B, int64_t H) {
  for_rows(B, row_grain(4 * H, 16384), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* ar = a + r * 4 * H;
      scalar_t* dar = da + r * 4 * H;
      const int64_t o_ = r * H;
#pragma omp simd
      for (int64_t k = 0; k < H; ++k) {
        const scalar_t i = ar[k], f = ar[H + k], g = ar[2 * H + k], o = ar[3 * H + k];
        const scalar_t t = tc[o_ + k], dht = dh_rec[o_ + k] + g_y[o_ + k];
        // (3) h_t = o * tanh(c_t): d a_o = dh * tanh(c_t) * o (1 - o);  dc += dh * o * (1 - tanh(c_t)^2)
        const scalar_t dct = dc[o_ + k] + dht * o * (scalar_t(1) - t * t);
        dar[3 * H + k] = dht * t * o * (scalar_t(1) - o);
        // (2) c_t = f * c_{t-1} + i * g: d a_i = dc * g * i (1 - i), d a_f = dc * c_{t-1} * f (1 - f),
        //     d a_g = dc * i * (1 - g^2), dc_{t-1} = dc * f
        dar[k] = dct * g * i * (scalar_t(1) - i);
        dar[H + k] = dct * c_prev[o_ + k] * f * (scalar_t(1) - f);
        dar[2 * H + k] = dct * i * (scalar_t(1) - g * g);
        dc[o_ + k] = dct * f;
      }
    }
  });
}

}  // namespace seqplat
