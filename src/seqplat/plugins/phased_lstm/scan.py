"""The Phased LSTM time loop with a hand-written backward (the cell's fast path).

The forward runs equations (L1)-(P2) of ``cell.py`` over precomputed input projections
``xp = x W_x + b`` and gate openness ``k`` (neither depends on the state), writing every step's
activations into preallocated buffers without building an autograd graph. The backward walks the
steps in reverse with about a dozen small ops per step (every factor that does not depend on the
incoming gradient is computed for all steps at once beforehand), collects the gate-pre-activation
gradients ``dz`` of all steps, and computes the recurrent weight gradient with **one** GEMM after the
loop (PERF_NOTES: per-step weight-gradient
GEMMs are the slow part of autograd's version). Gradients w.r.t. ``xp`` and ``k`` are returned to
autograd, which carries them on to ``W_x``, ``b``, ``tau``, ``s`` and ``r_on``.

``clip`` reproduces Lasagne's ``grad_clipping``: the gradient reaching ``z`` (after the peephole
terms took theirs) is clamped to ``[-clip, clip]`` before it flows to ``h_{j-1}``, ``W_h`` and ``xp``.
Shapes are time-major inside: ``xp [t,b,4h]``, ``k [t,b,h]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


class PhasedLSTMScan(torch.autograd.Function):
    """``(xp, k, h0, c0, w_hh, peephole, clip) -> (y [t,b,h], c_T [b,h])``; ``peephole`` may be None."""

    @staticmethod
    def forward(ctx: Any, xp: Tensor, k: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor,
                peephole: Tensor | None, clip: float | None) -> tuple[Tensor, Tensor]:
        n, b, four_h = xp.shape
        hid = four_h // 4
        y = xp.new_empty(n, b, hid)
        cs = xp.new_empty(n, b, hid)  # c_j
        ct = xp.new_empty(n, b, hid)  # c~_j
        tc = xp.new_empty(n, b, hid)  # tanh(c~_j)
        acts = xp.new_empty(n, b, four_h)  # i, f, g, o
        h, c = h0, c0
        for j in range(n):
            z = torch.addmm(xp[j], h, w_hh)  # (L1)
            if peephole is not None:  # (L2) peepholes of i and f in one op
                z[:, : 2 * hid].view(b, 2, hid).addcmul_(c.unsqueeze(1), peephole[:2])
            a = acts[j]
            torch.sigmoid(z[:, : 2 * hid], out=a[:, : 2 * hid])  # (L2) i, f
            torch.tanh(z[:, 2 * hid : 3 * hid], out=a[:, 2 * hid : 3 * hid])  # g
            i, f, g = a[:, :hid], a[:, hid : 2 * hid], a[:, 2 * hid : 3 * hid]
            c_tilde = torch.mul(f, c, out=ct[j]).addcmul_(i, g)  # (L3)
            zo = z[:, 3 * hid :]
            if peephole is not None:
                zo.addcmul_(c_tilde, peephole[2])
            o = torch.sigmoid(zo, out=a[:, 3 * hid :])  # (L4)
            t = torch.tanh(c_tilde, out=tc[j])
            c = torch.lerp(c, c_tilde, k[j], out=cs[j])  # (P1)
            h = torch.lerp(h, o * t, k[j], out=y[j])  # (P2)
        ctx.save_for_backward(k, h0, c0, w_hh, peephole, y, cs, ct, tc, acts)
        ctx.clip = clip
        return y, cs[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gy: Tensor, gc: Tensor) -> tuple[Tensor | None, ...]:
        k, h0, c0, w_hh, peephole, y, cs, ct, tc, acts = ctx.saved_tensors
        n, b, hid = y.shape
        clip = ctx.clip
        # Everything that does not depend on the incoming gradient, for all steps at once.
        h_prev = torch.cat([h0.unsqueeze(0), y[:-1]], 0)
        c_prev = torch.cat([c0.unsqueeze(0), cs[:-1]], 0)
        i, f, g, o = acts.split(hid, dim=-1)
        dsig = acts * (1 - acts)  # sigma' for i, f, o (the g slice is unused)
        dtanh_c = 1 - tc * tc
        a_h = o * tc - h_prev  # h~ - h_{j-1}: dk = dh * a_h + dc * a_c    (P2), (P1)
        a_c = ct - c_prev
        p_o = k * tc * dsig[..., 3 * hid :]  # dz_o = dh * p_o             (L4)
        q = k * o * dtanh_c  # dc~ = dc * k + dh * q                        (L4)
        p_ifg = torch.stack([g * dsig[..., :hid], c_prev * dsig[..., hid : 2 * hid], i * (1 - g * g)], dim=2)
        r = f.clone()  # dc_{j-1} = dc * (1 - k) + dc~ * r                 (L3), (L2)
        if peephole is not None:
            q.addcmul_(p_o, peephole[2])
            r.addcmul_(p_ifg[:, :, 0], peephole[0]).addcmul_(p_ifg[:, :, 1], peephole[1])
        omk = 1 - k
        # The reverse loop: a dozen small ops per step.
        dz_all = acts.new_empty(n, b, 4 * hid)  # unclipped dz (peephole gradients)
        dz_clipped = dz_all if clip is None else acts.new_empty(n, b, 4 * hid)
        dk = k.new_empty(n, b, hid)
        dh = torch.zeros_like(h0)
        dc = gc.clone()
        w_hh_t = w_hh.t()
        for j in range(n - 1, -1, -1):
            dh = dh + gy[j]
            torch.mul(dh, a_h[j], out=dk[j]).addcmul_(dc, a_c[j])
            dct = torch.mul(dc, k[j]).addcmul_(dh, q[j])
            dz = dz_all[j]
            torch.mul(dct.unsqueeze(1), p_ifg[j], out=dz[:, : 3 * hid].view(b, 3, hid))
            torch.mul(dh, p_o[j], out=dz[:, 3 * hid :])
            dc = torch.mul(dc, omk[j]).addcmul_(dct, r[j])
            dzc = dz if clip is None else torch.clamp(dz, -clip, clip, out=dz_clipped[j])
            dh = torch.addmm(dh * omk[j], dzc, w_hh_t)  # (L1)
        d_w_hh = h_prev.reshape(n * b, hid).t() @ dz_clipped.reshape(n * b, 4 * hid)
        d_peep = None
        if peephole is not None and ctx.needs_input_grad[5]:
            d_peep = torch.stack([
                (dz_all[..., :hid] * c_prev).sum((0, 1)),
                (dz_all[..., hid : 2 * hid] * c_prev).sum((0, 1)),
                (dz_all[..., 3 * hid :] * ct).sum((0, 1)),
            ])
        return dz_clipped, dk, dh, dc, d_w_hh, d_peep, None


def phased_lstm_scan(xp: Tensor, k: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor,
                     peephole: Tensor | None, clip: float | None) -> tuple[Tensor, Tensor]:
    """Run the loop on time-major ``xp [t,b,4h]`` and ``k [t,b,h]``; returns ``y [t,b,h]`` and ``c_T``."""
    return PhasedLSTMScan.apply(xp.contiguous(), k.contiguous(), h0.contiguous(), c0.contiguous(),
                                w_hh, peephole, clip)
