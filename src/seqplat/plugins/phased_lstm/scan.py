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

Two backends run the same algorithm: ``cpp`` (``phased_lstm_cpu.cpp``: per step one GEMM and one
fused elementwise pass, forward and backward; built at first use and cached by
:mod:`seqplat.core.cpp_ext`) and ``python`` (the loops below: about ten torch ops per step, any device
and dtype, and the fallback when no compiler is present). ``backend="auto"`` takes ``cpp`` for
float32/float64 CPU tensors when it builds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from seqplat.core.cpp_ext import CppKernel
from seqplat.core.gemm import onednn_linear, projection_uses_onednn, time_major_rows

CPP_SOURCE = Path(__file__).with_name("phased_lstm_cpu.cpp")
Backend = Literal["auto", "cpp", "python"]
KERNEL = CppKernel(CPP_SOURCE, "seqplat_phased_lstm_cpu", "phased_lstm")  # default messages (LOOP_FALLBACK, LOOP_FIX)
load_cpp_extension = KERNEL.load  # compile at first use (cached); True when usable, strict=True raises
cpp_error = KERNEL.error  # why the kernel is unavailable, or None


resolve_backend = KERNEL.resolve  # "cpp" or "python" for a cell's backend option and an input


class PhasedLSTMScanCpp(torch.autograd.Function):
    """The same function as :class:`PhasedLSTMScan`, with the loops in ``phased_lstm_cpu.cpp``."""

    @staticmethod
    def forward(ctx: Any, xp: Tensor, k: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor,
                peephole: Tensor | None, clip: float | None) -> tuple[Tensor, Tensor]:
        return _cpp_forward(ctx, xp, k, h0, c0, w_hh, peephole, clip)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gy: Tensor, gc: Tensor) -> tuple[Tensor | None, ...]:
        k, w_hh, peep, acts, hs, cs, ct, tc = ctx.saved_tensors
        hid = ct.shape[2]
        clip = -1.0 if ctx.clip is None else float(ctx.clip)
        # (L1): dW_h = sum_j h_{j-1}^T dz_j, one GEMM over all steps (clipped dz, as it reaches W_h), in the C++ op
        dz, dzc, dk, dh0, dc0, d_w_hh, _, _ = torch.ops.seqplat_phased_lstm.backward(acts, hs, cs, ct, tc, k, w_hh,
                                                                                     peep, gy, gc, clip)
        d_peep = _peephole_grad(dz, cs, ct, hid) if ctx.has_peephole and ctx.needs_input_grad[5] else None
        return dzc, dk, dh0, dc0, d_w_hh, d_peep, None


def _cpp_forward(ctx: Any, xp: Tensor, k: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, peephole: Tensor | None,
                 clip: float | None, *keep: Tensor) -> tuple[Tensor, Tensor]:
    """The C++ forward of the C++ functions: ``(y, c_T)``; saves ``keep``, then what the C++ backward reads."""
    hid = h0.shape[1]
    peep = peephole if peephole is not None else xp.new_zeros(3, hid)
    acts, hs, cs, ct, tc = torch.ops.seqplat_phased_lstm.forward(xp, k, h0, c0, w_hh.contiguous(), peep)
    ctx.save_for_backward(*keep, k, w_hh, peep, acts, hs, cs, ct, tc)
    ctx.clip = clip
    ctx.has_peephole = peephole is not None
    return hs[1:], cs[-1].clone()


def _peephole_grad(dz: Tensor, cs: Tensor, ct: Tensor, hid: int) -> Tensor:
    """(L2): the peepholes' gradients from the unclipped ``dz`` (i and f see ``c_{j-1}``, o sees ``c~_j``)."""
    c_prev = cs[:-1]
    return torch.stack([
        (dz[..., :hid] * c_prev).sum((0, 1)),
        (dz[..., hid : 2 * hid] * c_prev).sum((0, 1)),
        (dz[..., 3 * hid :] * ct).sum((0, 1)),
    ])


class PhasedLayerCpp(torch.autograd.Function):
    """:class:`PhasedLSTMScanCpp` with the input projection ``xp = x W_x + b`` inside: ``x [t*b, d]`` time major.

    The C++ backward returns ``dW_x`` and ``db`` beside ``dW_h``, all from the clipped ``dz`` written where oneDNN
    reads it in place, so autograd's projection backward (a oneDNN copy of ``dz``, the product, a bias sum) is
    skipped; ``dx`` is one oneDNN product. Used where :func:`~seqplat.core.gemm.projection` takes oneDNN
    (float32 on an AVX-512 CPU).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, w_x: Tensor, bias: Tensor, k: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor,
                peephole: Tensor | None, clip: float | None) -> tuple[Tensor, Tensor]:
        n, b, hid = k.shape
        xp = onednn_linear(x, w_x.t().contiguous(), bias.contiguous()).view(n, b, 4 * hid)
        return _cpp_forward(ctx, xp, k, h0, c0, w_hh, peephole, clip, x, w_x)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gy: Tensor, gc: Tensor) -> tuple[Tensor | None, ...]:
        x, w_x, k, w_hh, peep, acts, hs, cs, ct, tc = ctx.saved_tensors
        hid = ct.shape[2]
        needs = ctx.needs_input_grad
        clip = -1.0 if ctx.clip is None else float(ctx.clip)
        dz, dzc, dk, dh0, dc0, d_w_hh, d_w_x, d_b = torch.ops.seqplat_phased_lstm.backward(
            acts, hs, cs, ct, tc, k, w_hh, peep, gy, gc, clip, x)
        dx = onednn_linear(dzc.view(x.shape[0], -1), w_x) if needs[0] else None
        d_peep = _peephole_grad(dz, cs, ct, hid) if ctx.has_peephole and needs[7] else None
        return (dx, d_w_x if needs[1] else None, d_b if needs[2] else None, dk if needs[3] else None,
                dh0 if needs[4] else None, dc0 if needs[5] else None, d_w_hh if needs[6] else None, d_peep, None)


class PhasedLSTMScan(torch.autograd.Function):
    """``(xp, k, h0, c0, w_hh, peephole, clip) -> (y [t,b,h], c_T [b,h])``; ``peephole`` may be None."""

    @staticmethod
    def forward(ctx: Any, xp: Tensor, k: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor,
                peephole: Tensor | None, clip: float | None) -> tuple[Tensor, Tensor]:
        n, b, four_h = xp.shape
        hid = four_h // 4
        y = xp.new_empty(n, b, hid)
        cs = xp.new_empty(n + 1, b, hid)  # c_0 .. c_n (so c_{j-1} is cs[j], no concatenation later)
        ct = xp.new_empty(n, b, hid)  # c~_j
        tc = xp.new_empty(n, b, hid)  # tanh(c~_j)
        # i, f, g, o, sigmoid(2 c~): the last two are one sigmoid call, tanh(c~) = 2 sigmoid(2 c~) - 1, and
        # g = tanh(z_g) = 2 sigmoid(2 z_g) - 1 shares the sigmoid call of i and f (torch's CPU tanh costs
        # about three sigmoids)
        acts = xp.new_empty(n, b, 5 * hid)
        z = xp.new_empty(b, four_h)  # scratch
        m1, two = xp.new_full((), -1.0), xp.new_full((), 2.0)
        cs[0].copy_(c0)
        h, c = h0, c0
        for j in range(n):
            torch.addmm(xp[j], h, w_hh, out=z)  # (L1)
            if peephole is not None:  # (L2) peepholes of i and f in one op
                z[:, : 2 * hid].view(b, 2, hid).addcmul_(c.unsqueeze(1), peephole[:2])
            z[:, 2 * hid : 3 * hid].mul_(2.0)
            a = acts[j]
            torch.sigmoid(z[:, : 3 * hid], out=a[:, : 3 * hid])  # (L2) i, f, sigmoid(2 z_g)
            g = torch.addcmul(m1, a[:, 2 * hid : 3 * hid], two, out=a[:, 2 * hid : 3 * hid])  # g = tanh(z_g)
            i, f = a[:, :hid], a[:, hid : 2 * hid]
            c_tilde = torch.mul(f, c, out=ct[j]).addcmul_(i, g)  # (L3)
            zo = a[:, 3 * hid : 4 * hid]
            if peephole is not None:
                torch.addcmul(z[:, 3 * hid :], c_tilde, peephole[2], out=zo)
            else:
                zo.copy_(z[:, 3 * hid :])
            torch.mul(c_tilde, two, out=a[:, 4 * hid :])
            a[:, 3 * hid :].sigmoid_()  # (L4) o, sigmoid(2 c~)
            t = torch.addcmul(m1, a[:, 4 * hid :], two, out=tc[j])  # tanh(c~)
            c = torch.lerp(c, c_tilde, k[j], out=cs[j + 1])  # (P1)
            h = torch.lerp(h, zo * t, k[j], out=y[j])  # (P2)
        ctx.save_for_backward(k, h0, w_hh, peephole, y, cs, ct, tc, acts)
        ctx.clip = clip
        return y, cs[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gy: Tensor, gc: Tensor) -> tuple[Tensor | None, ...]:
        k, h0, w_hh, peephole, y, cs, ct, tc, acts = ctx.saved_tensors
        n, b, hid = y.shape
        clip = ctx.clip
        # Everything that does not depend on the incoming gradient, for all steps at once (written into
        # its buffer in place: no temporaries).
        c_prev = cs[:-1]
        i, f, g, o = (acts[..., j * hid : (j + 1) * hid] for j in range(4))
        # dz = [dc~ p_i | dc~ p_f | dc~ p_g | dh p_o]                          (L2), (L4)
        p = acts.new_empty(n, b, 4, hid)
        p_i, p_f, p_g, p_o = p.unbind(2)
        torch.addcmul(i, i, i, value=-1.0, out=p_i).mul_(g)  # g sigma'(z_i)
        torch.addcmul(f, f, f, value=-1.0, out=p_f).mul_(c_prev)  # c_{j-1} sigma'(z_f)
        torch.mul(i, g, out=p_g)
        torch.addcmul(i, p_g, g, value=-1.0, out=p_g)  # i (1 - g^2)
        torch.addcmul(o, o, o, value=-1.0, out=p_o).mul_(tc).mul_(k)  # k tanh(c~) sigma'(z_o)
        q = torch.mul(tc, tc, out=acts.new_empty(n, b, hid)).mul_(o)  # dc~ = dc * k + dh * q    (L4)
        torch.sub(o, q, out=q).mul_(k)  # k o (1 - tanh(c~)^2)
        r = f.clone()  # dc_{j-1} = dc * (1 - k) + dc~ * r                 (L3), (L2)
        if peephole is not None:
            q.addcmul_(p_o, peephole[2])
            r.addcmul_(p_i, peephole[0]).addcmul_(p_f, peephole[1])
        a_h = torch.mul(o, tc, out=acts.new_empty(n, b, hid))  # h~ - h_{j-1}: dk = dh * a_h + dc * a_c   (P2)
        a_h[1:].sub_(y[:-1])
        a_h[0].sub_(h0)
        a_c = torch.sub(ct, c_prev)  # (P1)
        # The reverse loop: a dozen small ops per step (per-step views made once).
        dz_all = acts.new_empty(n, b, 4 * hid)  # unclipped dz (peephole gradients)
        dz_clipped = dz_all if clip is None else acts.new_empty(n, b, 4 * hid)
        dk = k.new_empty(n, b, hid)
        dh = torch.zeros_like(h0)
        dc = gc.clone()
        w_hh_t = w_hh.t()
        gy_v, k_v, q_v, r_v, ah_v, ac_v, dk_v = (v.unbind(0) for v in (gy, k, q, r, a_h, a_c, dk))
        pifg_v, po_v = p[:, :, :3].unbind(0), p_o.unbind(0)
        dz_v, dzifg_v = dz_all.unbind(0), dz_all.view(n, b, 4, hid)[:, :, :3].unbind(0)
        dzo_v, dzc_v = dz_all[..., 3 * hid :].unbind(0), dz_clipped.unbind(0)
        for j in range(n - 1, -1, -1):
            dh = dh + gy_v[j]
            torch.mul(dh, ah_v[j], out=dk_v[j]).addcmul_(dc, ac_v[j])
            dct = torch.mul(dc, k_v[j]).addcmul_(dh, q_v[j])
            torch.mul(dct.unsqueeze(1), pifg_v[j], out=dzifg_v[j])
            torch.mul(dh, po_v[j], out=dzo_v[j])
            dc = torch.addcmul(dc, dc, k_v[j], value=-1.0).addcmul_(dct, r_v[j])  # dc (1 - k) + dc~ r
            dzc = dz_v[j] if clip is None else torch.clamp(dz_v[j], -clip, clip, out=dzc_v[j])
            dh = torch.addmm(torch.addcmul(dh, dh, k_v[j], value=-1.0), dzc, w_hh_t)  # (L1)
        # h_{j-1} is h0, then the outputs: dW_h = h0^T dz_0 + y[:-1]^T dz[1:]
        flat = dz_clipped.view(n * b, 4 * hid)
        d_w_hh = torch.addmm(h0.t() @ dz_clipped[0], y[:-1].reshape((n - 1) * b, hid).t(), flat[b:])
        d_peep = None
        if peephole is not None and ctx.needs_input_grad[5]:
            d_peep = torch.stack([
                (dz_all[..., :hid] * c_prev).sum((0, 1)),
                (dz_all[..., hid : 2 * hid] * c_prev).sum((0, 1)),
                (dz_all[..., 3 * hid :] * ct).sum((0, 1)),
            ])
        return dz_clipped, dk, dh, dc, d_w_hh, d_peep, None


class TimeGateCpp(torch.autograd.Function):
    """Openness ``k [..., h]`` (T1)-(T2) of float64 timestamps ``t [...]`` in one C++ pass, and its backward.

    The same values as :func:`~.cell.time_gate` in float64, written in ``dtype``; rows where ``valid``
    is 0 (NaN timestamps, passed as 0) give 0, as ``openness`` does. The backward returns the gradients
    of ``period``, ``shift`` and ``r_on`` (autograd carries them on through ``gate_parameters``' abs,
    clamp and sign).
    """

    @staticmethod
    def forward(ctx: Any, t: Tensor, valid: Tensor, period: Tensor, shift: Tensor, r_on: Tensor, alpha: float,
                dtype: torch.dtype) -> Tensor:
        p, s, r = (v.detach().double().contiguous() for v in (period, shift, r_on))
        ctx.save_for_backward(t, valid, p, s, r)
        ctx.alpha = float(alpha)
        ctx.dtypes = (period.dtype, shift.dtype, r_on.dtype)
        return torch.ops.seqplat_phased_lstm.time_gate(t, valid, p, s, r, float(alpha), dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        t, valid, p, s, r = ctx.saved_tensors
        grads = torch.ops.seqplat_phased_lstm.time_gate_backward(g, t, valid, p, s, r, ctx.alpha).unbind(0)
        needs = ctx.needs_input_grad[2:5]
        return (None, None, *(d.to(dt) if need else None for d, dt, need in zip(grads, ctx.dtypes, needs, strict=True)),
                None, None)


def time_gate_cpp(t: Tensor, period: Tensor, shift: Tensor, r_on: Tensor, alpha: float,
                  dtype: torch.dtype) -> Tensor:
    """:class:`TimeGateCpp` on timestamps of any float dtype (the phase is computed in float64; NaN: padding)."""
    t = t.double()
    valid = ~torch.isnan(t)
    return TimeGateCpp.apply(torch.where(valid, t, 0.0).contiguous(), valid.double().contiguous(), period, shift,
                             r_on, alpha, dtype)


def projected_phased_applies(x: Tensor, w_x: Tensor, backend: Backend) -> bool:
    """Whether :func:`projected_phased_lstm_scan` runs: float32 on the oneDNN route and the C++ loop chosen."""
    return projection_uses_onednn(x, w_x) and resolve_backend(backend, x) == "cpp"


def projected_phased_lstm_scan(x: Tensor, w_x: Tensor, bias: Tensor, k: Tensor, h0: Tensor, c0: Tensor,
                               w_hh: Tensor, peephole: Tensor | None, clip: float | None) -> tuple[Tensor, Tensor]:
    """:class:`PhasedLayerCpp` on batch-first ``x [b,t,d]`` (``projected_phased_applies`` must hold); ``w_x [d, 4h]``
    and ``bias`` are the projection, the rest as :func:`phased_lstm_scan`."""
    return PhasedLayerCpp.apply(time_major_rows(x), w_x, bias, k.contiguous(), h0.contiguous(), c0.contiguous(),
                                w_hh, peephole, clip)


def phased_lstm_scan(xp: Tensor, k: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor,
                     peephole: Tensor | None, clip: float | None,
                     backend: Backend = "auto") -> tuple[Tensor, Tensor]:
    """Run the loop on time-major ``xp [t,b,4h]`` and ``k [t,b,h]``; returns ``y [t,b,h]`` and ``c_T``."""
    scan = PhasedLSTMScanCpp if resolve_backend(backend, xp) == "cpp" else PhasedLSTMScan
    return scan.apply(xp.contiguous(), k.contiguous(), h0.contiguous(), c0.contiguous(), w_hh, peephole, clip)
