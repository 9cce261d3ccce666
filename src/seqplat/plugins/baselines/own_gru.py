"""seqplat's own GRU: the ``impl="own"`` path of the ``gru`` cell, over the parameters of its ``nn.GRU``.

The equations are those of ``cells.py`` (torch's gate order r, z, n)::

    (1) r = sigmoid(W_ir x + b_ir + W_hr h + b_hr),  z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    (2) n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    (3) h_t = (1 - z) * n + z * h_{t-1}

The strategy is the own LSTM's (``own_lstm.py``): the input half ``xp_t = W_ih x_t + b_ih`` is one GEMM
over all steps done by autograd; :class:`GRURecurrence` runs the recurrence in ``own_gru_cpu.cpp``
(one GEMM and one fused elementwise pass per step, forward and backward) and computes ``grad W_hh``
as one GEMM over all steps after the backward loop. There is no python loop: where the kernel cannot
be built, the cell uses torch's fused ``nn.GRU`` (logged once), which has the same parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from seqplat.core.cpp_ext import CppKernel
from seqplat.core.gemm import project_steps

CPP_SOURCE = Path(__file__).with_name("own_gru_cpu.cpp")
KERNEL = CppKernel(CPP_SOURCE, "seqplat_own_gru_cpu", "gru (impl='own')",
                   fallback="using torch's fused nn.GRU",
                   fix="install a C++ compiler and ninja, or use cell.impl='fused'")
load_cpp_extension = KERNEL.load  # compile at first use (cached); True when usable, strict=True raises
cpp_error = KERNEL.error  # why the kernel is unavailable, or None


def usable(x: Tensor) -> bool:
    """Whether the own path can run ``x``: float32/float64 on CPU, with the kernel built."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and load_cpp_extension()


class GRURecurrence(torch.autograd.Function):
    """``(xp[t,b,3h], W_hh[3h,h], b_hh[3h], h_0[b,h]) -> (y[t,b,h], h_T)`` with an explicit backward."""

    @staticmethod
    def forward(ctx: Any, xp: Tensor, w_hh: Tensor, b_hh: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
        act, hs, hn = torch.ops.seqplat_own_gru.forward(xp.contiguous(), w_hh.contiguous(), b_hh.contiguous(),
                                                        h0.contiguous())
        ctx.save_for_backward(act, hs, hn, w_hh)
        return hs[1:], hs[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_y: Tensor, g_hT: Tensor) -> tuple[Tensor | None, ...]:
        act, hs, hn, w_hh = ctx.saved_tensors
        T, b, three_h = act.shape
        dxp, dgh, dh0 = torch.ops.seqplat_own_gru.backward(act, hs, hn, w_hh, g_y.contiguous(), g_hT.contiguous())
        flat = dgh.view(T * b, three_h)
        d_w = torch.ops.seqplat_own_gru.outer(flat, hs[:T].reshape(T * b, three_h // 3))  # one GEMM, all steps
        return dxp, d_w, flat.sum(0), dh0


def own_gru(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
            b_hh: Tensor | None) -> tuple[Tensor, Tensor]:
    """One GRU layer, batch first: ``x[b,t,d] -> (y[b,t,h], h_T)``, the same as ``nn.GRU``."""
    if x.shape[1] == 0:
        raise ValueError(f"own gru: x must have at least one time step, got shape {tuple(x.shape)}")
    xp = project_steps(x, w_ih, b_ih)
    bias = b_hh if b_hh is not None else w_hh.new_zeros(w_hh.shape[0])
    y, h_n = GRURecurrence.apply(xp, w_hh, bias, h0)
    return y.transpose(0, 1), h_n
