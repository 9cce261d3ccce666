"""seqplat's own LSTM: the ``impl="own"`` path of the ``lstm`` cell, over the parameters of its ``nn.LSTM``.

The equations are those of ``cells.py`` (torch's gate order i, f, g, o), numbered here as there::

    (1) a = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh = [a_i, a_f, a_g, a_o]
        i = sigmoid(a_i), f = sigmoid(a_f), g = tanh(a_g), o = sigmoid(a_o)
    (2) c_t = f * c_{t-1} + i * g
    (3) h_t = o * tanh(c_t)

The execution strategy is the one PERF_NOTES.md attributes to oneDNN, cuDNN and haste:

* the input half of (1), ``xp_t = W_ih x_t + b_ih + b_hh``, is one GEMM over all steps, done by autograd
  (:func:`input_projection`), so autograd also computes ``grad W_ih`` as one GEMM and the bias
  gradients as one sum;
* :class:`LSTMRecurrence` runs the recurrence ``(xp, W_hh, h_0, c_0) -> (h_1..h_T, h_T, c_T)`` without
  autograd: one GEMM per step into a preallocated gate buffer, gates activated in place, the
  activated gates, states and ``tanh(c_t)`` kept for the backward pass;
* its backward pass walks the steps in reverse, writes each step's ``d a`` into a ``[t, b, 4h]``
  buffer, propagates ``dh_{t-1} = da_t W_hh`` and ``dc_{t-1}``, and after the loop computes
  ``grad W_hh`` as **one** GEMM over all steps.

Two backends run the same algorithm: ``cpp`` (``own_lstm_cpu.cpp``, the whole loop in C++ with one
fused elementwise pass per step, compiled at first use and cached by :mod:`seqplat.core.cpp_ext`) and
``python`` (the loop below with in-place torch ops, any device and dtype; the fallback when no
compiler is present). Tensors inside the recurrence are time major (``[t, b, ...]``) so each step's
slice is contiguous.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from seqplat.core.cpp_ext import CppKernel
from seqplat.core.gemm import onednn_linear, project_steps, projection_uses_onednn, time_major_rows

log = logging.getLogger(__name__)

CPP_SOURCE = Path(__file__).with_name("own_lstm_cpu.cpp")
Backend = Literal["auto", "cpp", "python"]


# -- the recurrence in PyTorch --------------------------------------------------------------------

def python_forward(xp: Tensor, w_hh: Tensor, h0: Tensor, c0: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward loop without a graph: ``xp[t,b,4h] -> (gates[t,b,4h], hs[t+1,b,h], cs[t+1,b,h], tcs[t,b,h])``.

    ``gates`` holds the activated ``i, f, g, o``; ``hs[0] = h_0``, ``hs[t+1] = h_t`` (same for ``cs``);
    ``tcs[t] = tanh(c_t)``.
    """
    T, b, four_h = xp.shape
    n = four_h // 4
    gates = torch.empty_like(xp)
    hs = xp.new_empty(T + 1, b, n)
    cs = xp.new_empty(T + 1, b, n)
    tcs = xp.new_empty(T, b, n)
    hs[0] = h0
    cs[0] = c0
    w = w_hh.t()  # [h, 4h]
    h_l, c_l, tc_l = hs.unbind(0), cs.unbind(0), tcs.unbind(0)
    for t, (xp_t, a) in enumerate(zip(xp.unbind(0), gates.unbind(0), strict=True)):
        torch.addmm(xp_t, h_l[t], w, out=a)                      # (1) a = xp_t + W_hh h_{t-1}
        a[:, : 2 * n].sigmoid_()                                 # (1) i, f
        a[:, 2 * n : 3 * n].tanh_()                              # (1) g
        a[:, 3 * n :].sigmoid_()                                 # (1) o
        i, f, g, o = a.chunk(4, dim=1)
        c = c_l[t + 1]
        torch.mul(f, c_l[t], out=c)                              # (2) f * c_{t-1}
        c.addcmul_(i, g)                                         # (2) + i * g
        torch.tanh(c, out=tc_l[t])                               # (3) tanh(c_t)
        torch.mul(o, tc_l[t], out=h_l[t + 1])                    # (3) h_t = o * tanh(c_t)
    return gates, hs, cs, tcs


def python_backward(gates: Tensor, hs: Tensor, cs: Tensor, tcs: Tensor, w_hh: Tensor, g_y: Tensor, g_hT: Tensor,
                    g_cT: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reverse loop: ``(grad_xp[t,b,4h], grad_w_hh[4h,h], grad_h0, grad_c0)``.

    ``dh``/``dc`` are the adjoints of ``h_t``/``c_t`` with everything downstream of step ``t`` included.
    """
    T, b, four_h = gates.shape
    n = four_h // 4
    da_all = torch.empty_like(gates)
    dh = g_hT + g_y[T - 1]
    dc = g_cT.clone()
    s = gates.new_empty(b, n)        # scratch for the derivatives of tanh and sigmoid
    s2 = gates.new_empty(b, 2 * n)
    ones = gates.new_ones(b, n)
    c_l, tc_l, gy_l = cs.unbind(0), tcs.unbind(0), g_y.unbind(0)
    for t in range(T - 1, -1, -1):
        a = gates[t]
        da = da_all[t]
        i, f, g, o = a.chunk(4, dim=1)
        di_f, dg, do = da[:, : 2 * n], da[:, 2 * n : 3 * n], da[:, 3 * n :]
        di, df = di_f.chunk(2, dim=1)
        tc = tc_l[t]
        # (3) h_t = o * tanh(c_t):  d a_o = dh * tanh(c_t) * o (1 - o)
        torch.mul(dh, tc, out=do)
        torch.addcmul(o, o, o, value=-1.0, out=s)
        do.mul_(s)
        # (3) h_t = o * tanh(c_t):  dc += dh * o * (1 - tanh(c_t)^2)
        torch.addcmul(ones, tc, tc, value=-1.0, out=s)
        s.mul_(o)
        dc.addcmul_(s, dh)
        # (2) c_t = f * c_{t-1} + i * g:  d a_i = dc * g * i (1 - i),  d a_f = dc * c_{t-1} * f (1 - f)
        torch.mul(dc, g, out=di)
        torch.mul(dc, c_l[t], out=df)
        if_ = a[:, : 2 * n]
        torch.addcmul(if_, if_, if_, value=-1.0, out=s2)
        di_f.mul_(s2)
        # (2) c_t = f * c_{t-1} + i * g:  d a_g = dc * i * (1 - g^2)
        torch.addcmul(ones, g, g, value=-1.0, out=dg)
        dg.mul_(i)
        dg.mul_(dc)
        # (2) c_t = f * c_{t-1} + ...:  dc_{t-1} = dc * f
        dc.mul_(f)
        # (1) a = xp_t + W_hh h_{t-1}:  dh_{t-1} = da W_hh (+ the output gradient of step t-1)
        if t > 0:
            torch.addmm(gy_l[t - 1], da, w_hh, out=dh)
        else:
            torch.mm(da, w_hh, out=dh)
    # (1) a = xp_t + W_hh h_{t-1}:  grad W_hh = sum_t da_t^T h_{t-1}, one GEMM over [t*b] rows
    grad_w_hh = torch.mm(da_all.view(T * b, four_h).t(), hs[:T].reshape(T * b, n))
    return da_all, grad_w_hh, dh, dc


# -- the C++ loop --------------------------------------------------------------------------------

KERNEL = CppKernel(CPP_SOURCE, "seqplat_own_lstm_cpu", "lstm (impl='own')",
                   fallback="using the PyTorch loop",
                   fix="backend 'cpp' needs it: install a C++ compiler and ninja, or use backend 'auto' or 'python'")
load_cpp_extension = KERNEL.load  # compile at first use (cached); True when usable, strict=True raises
cpp_error = KERNEL.error  # why the kernel is unavailable, or None


def cpp_ops() -> Any:
    """``torch.ops.seqplat_own_lstm``: ``forward`` and ``backward`` of ``own_lstm_cpu.cpp``."""
    return torch.ops.seqplat_own_lstm


# -- the autograd function -----------------------------------------------------------------------

class LSTMRecurrence(torch.autograd.Function):
    """``(xp[t,b,4h], W_hh[4h,h], h_0[b,h], c_0[b,h]) -> (y[t,b,h], h_T, c_T)`` with an explicit backward.

    ``xp`` is the hoisted input projection ``W_ih x_t + b_ih + b_hh`` (time major, contiguous);
    ``backend`` is ``"cpp"`` or ``"python"`` (see :func:`resolve_backend`).
    """

    @staticmethod
    def forward(ctx: Any, xp: Tensor, w_hh: Tensor, h0: Tensor, c0: Tensor,
                backend: str) -> tuple[Tensor, Tensor, Tensor]:
        xp, w_hh, h0, c0 = xp.contiguous(), w_hh.contiguous(), h0.contiguous(), c0.contiguous()
        if backend == "cpp":
            gates, hs, cs, tcs = cpp_ops().forward(xp, w_hh, h0, c0)
        else:
            gates, hs, cs, tcs = python_forward(xp, w_hh, h0, c0)
        ctx.save_for_backward(gates, hs, cs, tcs, w_hh)
        ctx.backend = backend
        y = hs[1:]
        return y, hs[-1].clone(), cs[-1].clone()

    @staticmethod
    def backward(ctx: Any, g_y: Tensor, g_hT: Tensor, g_cT: Tensor) -> tuple[Tensor | None, ...]:
        gates, hs, cs, tcs, w_hh = ctx.saved_tensors
        g_y, g_hT, g_cT = g_y.contiguous(), g_hT.contiguous(), g_cT.contiguous()
        if ctx.backend == "cpp":
            gxp, gw, gh0, gc0, _, _ = cpp_ops().backward(gates, hs, cs, tcs, w_hh, g_y, g_hT, g_cT)
        else:
            gxp, gw, gh0, gc0 = python_backward(gates, hs, cs, tcs, w_hh, g_y, g_hT, g_cT)
        needs = ctx.needs_input_grad
        return (gxp if needs[0] else None, gw if needs[1] else None, gh0 if needs[2] else None,
                gc0 if needs[3] else None, None)


class LSTMLayer(torch.autograd.Function):
    """The C++ loop with the input projection inside: ``(x[t*b,d], W_ih, b, W_hh, h_0, c_0) -> (y, h_T, c_T)``.

    ``x`` is time major and flat. The forward computes ``xp = x W_ih^T + b`` on oneDNN and runs the loop;
    the backward gets ``grad W_ih`` from the C++ backward together with ``grad W_hh`` (the pre-activation
    gradient is copied into oneDNN's tensor type once for both, not once per matrix as when autograd runs
    the projection's backward) and ``grad b`` from the same oneDNN call, and ``grad x`` as one oneDNN product.
    Used where :func:`~seqplat.core.gemm.projection` would take oneDNN (float32 on an AVX-512 CPU).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, w_ih: Tensor, bias: Tensor | None, w_hh: Tensor, h0: Tensor,
                c0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch = h0.shape[0]
        steps = x.shape[0] // batch
        xp = onednn_linear(x, w_ih.contiguous(), None if bias is None else bias.contiguous())
        w_hh, h0, c0 = w_hh.contiguous(), h0.contiguous(), c0.contiguous()
        gates, hs, cs, tcs = cpp_ops().forward(xp.view(steps, batch, -1), w_hh, h0, c0)
        ctx.save_for_backward(gates, hs, cs, tcs, w_hh, x, w_ih)
        ctx.has_bias = bias is not None
        return hs[1:], hs[-1].clone(), cs[-1].clone()

    @staticmethod
    def backward(ctx: Any, g_y: Tensor, g_hT: Tensor, g_cT: Tensor) -> tuple[Tensor | None, ...]:
        gates, hs, cs, tcs, w_hh, x, w_ih = ctx.saved_tensors
        needs = ctx.needs_input_grad
        weights = needs[1] or (ctx.has_bias and needs[2])
        gxp, gw_hh, gh0, gc0, gw_ih, gb = cpp_ops().backward(gates, hs, cs, tcs, w_hh, g_y.contiguous(),
                                                             g_hT.contiguous(), g_cT.contiguous(),
                                                             x if weights else None)
        gxp = gxp.view(x.shape[0], -1)
        gx = onednn_linear(gxp, w_ih.t().contiguous()) if needs[0] else None
        # gb comes with gw_ih from the C++ op whenever the bias needs a gradient (x is passed then)
        return (gx, gw_ih if needs[1] else None, gb if ctx.has_bias and needs[2] else None,
                gw_hh if needs[3] else None, gh0 if needs[4] else None, gc0 if needs[5] else None)


resolve_backend = KERNEL.resolve  # "cpp" or "python" for a cell's backend option and an input


def input_projection(x: Tensor, w_ih: Tensor, b_ih: Tensor | None, b_hh: Tensor | None) -> Tensor:
    """The input half of (1) for every step in one GEMM: ``x[b,t,d] -> xp[t,b,4h]`` (time major)."""
    return project_steps(x, w_ih, None if b_ih is None or b_hh is None else b_ih + b_hh)


def own_lstm(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
             b_hh: Tensor | None, backend: Backend = "auto") -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One LSTM layer, batch first: ``x[b,t,d] -> (y[b,t,h], (h_T, c_T))``, the same as ``nn.LSTM``."""
    if x.shape[1] == 0:
        raise ValueError(f"own lstm: x must have at least one time step, got shape {tuple(x.shape)}")
    chosen = resolve_backend(backend, x)
    if chosen == "cpp" and projection_uses_onednn(x, w_ih):
        bias = None if b_ih is None or b_hh is None else b_ih + b_hh
        y, h_n, c_n = LSTMLayer.apply(time_major_rows(x), w_ih, bias, w_hh, h0, c0)
        return y.transpose(0, 1), (h_n, c_n)
    xp = input_projection(x, w_ih, b_ih, b_hh)
    y, h_n, c_n = LSTMRecurrence.apply(xp, w_hh, h0, c0, chosen)
    return y.transpose(0, 1), (h_n, c_n)
