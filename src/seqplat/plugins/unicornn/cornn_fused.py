"""coRNN's time loop in C++ (``cornn_cpu.cpp``): the fast path of :class:`~.cell.CoRNNCell`.

The cell's Python loop ran one ``cat``, one ``addmm`` and six elementwise ops per step, each recorded by autograd
(0.3x the fused LSTM's FLOP rate at H=256). Here the input half ``xp = V u + b`` stays one product over all
steps done by autograd, and :class:`CoRNNRecurrence` runs the recurrence (C1)-(C2) forward and backward in one
call each: per step one product of the states with ``W = [W_z, W_y]`` and one fused pass over the rows. ``W``'s
gradient is one product over all steps after the backward loop. Where the kernel cannot be built (no compiler),
the cell keeps its Python loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from seqplat.core.cpp_ext import CppKernel

CPP_SOURCE = Path(__file__).with_name("cornn_cpu.cpp")
KERNEL = CppKernel(CPP_SOURCE, "seqplat_cornn_cpu", "cornn",
                   fallback="using coRNN's Python loop",
                   fix="install a C++ compiler and ninja (the Python loop gives the same results, slower)")
load_cpp_extension = KERNEL.load  # compile at first use (cached); True when usable, strict=True raises
cpp_error = KERNEL.error  # why the kernel is unavailable, or None


def usable(x: Tensor) -> bool:
    """Whether the C++ loop can run ``x``: float32/float64 on CPU, with the kernel built (``KERNEL.resolve``'s
    ``auto`` choice)."""
    return KERNEL.resolve("auto", x) == "cpp"


class CoRNNRecurrence(torch.autograd.Function):
    """``(xp [b, t, h], W [h, 2h], y0, z0) -> (y [b, t, h], y_T, z_T)`` with an explicit backward; ``W`` multiplies
    ``[z; y]`` (the authors' concat order) and ``xp = V u + b`` is given."""

    @staticmethod
    def forward(ctx: Any, xp: Tensor, w: Tensor, y0: Tensor, z0: Tensor, dt: float, gamma: float, epsilon: float,
                implicit: bool) -> tuple[Tensor, Tensor, Tensor]:
        y, th, zy, y_t, z_t = torch.ops.seqplat_cornn.forward(xp.contiguous(), w, y0.contiguous(), z0.contiguous(),
                                                              dt, gamma, epsilon, implicit)
        ctx.save_for_backward(th, zy, w)
        ctx.coeffs = (dt, gamma, epsilon, implicit)
        return y, y_t, z_t

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_y: Tensor | None, g_yT: Tensor | None,
                 g_zT: Tensor | None) -> tuple[Tensor | None, ...]:
        th, zy, w = ctx.saved_tensors
        b, t, h = th.shape
        zeros = th.new_zeros(b, h)
        g_y = torch.zeros_like(th) if g_y is None else g_y.contiguous()
        dpre, dz0, dy0 = torch.ops.seqplat_cornn.backward(
            th, zy, w, g_y, zeros if g_yT is None else g_yT, zeros if g_zT is None else g_zT, *ctx.coeffs
        )
        d_w = torch.ops.seqplat_cornn.outer(dpre.view(b * t, h), zy.view(b * t, 2 * h))  # all steps at once
        return dpre, d_w, dy0, dz0, None, None, None, None


def cornn_loop(xp: Tensor, w: Tensor, y0: Tensor, z0: Tensor, dt: float, gamma: float, epsilon: float,
               implicit: bool) -> tuple[Tensor, Tensor, Tensor]:
    """:class:`CoRNNRecurrence` (``usable(xp)`` must hold, at least one step): ``(y [b, t, h], y_T, z_T)``."""
    return CoRNNRecurrence.apply(xp, w, y0, z0, float(dt), float(gamma), float(epsilon), bool(implicit))
