"""SAB's C++ loop: the whole unroll of an LSTM inner cell with the MLP scorer in one kernel (``sab_cpu.cpp``).

The Python fast path (``memory.ChainMemory``, ``attention.BlockedKeys``) runs some thirty torch calls
per step forward and more backward, each a few microseconds of dispatch on tensors of a few thousand
values, and scores every slot twice (forward and recomputed in the backward). :class:`SABLoop` runs the
same steps in ``sab_cpu.cpp``: per step one product for the LSTM, one for the query, one fused pass that
scores the slots, selects, reads and joins, and per write one product for the new key. Its backward
recomputes the scores of the slots that receive a gradient only (``k_top + 1`` per row, not all of them)
and computes the weight gradients as one product each over all steps.

It applies when the inner cell is the baselines' ``lstm`` (no activation quantizer, no zoneout), the
scorer is ``mlp``, the summary joins ``h`` (``hidden_state_index`` unset or 0), the tensors are float32 or
float64 on the CPU and the kernel builds; otherwise the cell runs its Python fast path. Every option of
the schedule (``k_att``, ``k_trunc``, ``truncation``, ``memory_size``, ``zero_slot``), both sparsifiers,
both small-memory rules, ``detach_threshold`` and both outputs are supported. Tests compare it with the
reference path on outputs and every gradient, and gradcheck it in float64.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from seqplat.core.cpp_ext import CppKernel
from seqplat.core.gemm import onednn_linear, project_steps, projection_uses_onednn, time_major_rows

if TYPE_CHECKING:
    from .cell import SABCell

CPP_SOURCE = Path(__file__).with_name("sab_cpu.cpp")
KERNEL = CppKernel(CPP_SOURCE, "seqplat_sab_cpu", "sab", fallback="using the Python fast path")
load_cpp_extension = KERNEL.load  # compile at first use (cached); True when usable
cpp_error = KERNEL.error  # why the kernel is unavailable, or None


def applies(cell: SABCell, x: Tensor, times: Tensor | None) -> bool:
    """Whether :func:`sab_loop` runs this call (see the module docstring; the cell's ``backend`` option):
    builds the kernel at first use. With ``backend = "cpp"``, a call it cannot run raises ``ValueError``."""
    backend = cell.config.backend
    if backend == "python":
        return False
    why = _cannot_run(cell, times)
    if why is not None:
        if backend == "cpp":
            raise ValueError(f"sab: backend 'cpp' cannot run this call: {why}; use backend 'auto' or 'python'")
        return False
    return x.shape[1] > 0 and KERNEL.resolve(backend, x) == "cpp"


def _cannot_run(cell: SABCell, times: Tensor | None) -> str | None:
    """Why the C++ loop cannot run this cell (None: it can)."""
    from seqplat.registry import get_registry

    from .attention import MLPScorer

    inner = cell.inner
    lstm = cell.config.inner.get("name") == "lstm" and type(inner) is get_registry().get("cell", "lstm").obj
    reasons = [
        (not lstm, "the inner cell is not the registered lstm"),
        (bool(inner.activation_quantizers), "the inner cell has activation quantizers"),
        (inner.zoneout_prob != 0, "the inner cell has zoneout"),
        (not isinstance(cell.scorer, MLPScorer), "the scorer is not 'mlp'"),
        (cell.config.hidden_state_index not in (None, 0), "hidden_state_index names c"),
        (times is not None, "the call passes times"),
        (cell.record_trace, "record_trace is on"),
    ]
    return next((why for bad, why in reasons if bad), None)


def schedule(cell: SABCell, t0: int, steps: int, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(cut[t], nread[t], wpos[t])`` for the steps ``t0 .. t0+steps-1`` (int64): the local path is cut
    before step t, the slots read at step t, and the slot written after step t (-1: none)."""
    cfg = cell.config
    written = cell.writes_before(t0)
    cut, nread, wpos = [], [], []
    for t in range(t0, t0 + steps):
        cut.append(int(cell.cuts_before(t)))
        if cfg.k_top > 0:
            nread.append(min(written, size))
            if cell.writes_after(t):
                wpos.append(written % size)
                written += 1
            else:
                wpos.append(-1)
        else:
            nread.append(0)
            wpos.append(-1)
    as_tensor = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return as_tensor(cut), as_tensor(nread), as_tensor(wpos)


def ops() -> Any:
    """``torch.ops.seqplat_sab``: ``forward`` and ``backward`` of ``sab_cpu.cpp``."""
    return torch.ops.seqplat_sab


class SABLoop(torch.autograd.Function):
    """``(x, W_ih, b, W_hh, h_0, c_0, memory, W_q, b_q, W_m, v) -> (y[b,t,out], h_T, c_T, memory_T)``.

    ``x`` is the inner LSTM's hoisted input projection ``xp[t, b, 4h]`` (``W_ih`` and ``b`` None), or, where
    that projection takes oneDNN, its input ``x[t*b, d]`` (time major) with ``W_ih`` and the summed bias ``b``
    (or None): the projection then runs here and the C++ backward returns ``W_ih``'s and ``b``'s gradients from
    the same oneDNN tensor of the gate gradients as ``W_hh``'s, where autograd's projection backward would copy
    them once more. ``W_q, b_q`` are the query, ``W_m`` the key and ``v`` the output weights of the MLP scorer;
    ``sched`` is :func:`schedule`'s triple and ``opts`` the cell's
    ``(k_top, official, raw_small, eps, summary_out, detach_threshold)``.
    """

    @staticmethod
    def forward(ctx: Any, sched: tuple[Tensor, Tensor, Tensor], opts: tuple, x: Tensor, w_ih: Tensor | None,
                bias: Tensor | None, w_hh: Tensor, h0: Tensor, c0: Tensor, memory: Tensor, w_q: Tensor, b_q: Tensor,
                w_m: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        k_top, official, raw_small, eps, summary_out, _ = opts
        projected = w_ih is not None
        if projected:
            b = h0.shape[0]
            xp = onednn_linear(x, w_ih.contiguous(), None if bias is None else bias.contiguous())
            xp = xp.view(x.shape[0] // b, b, -1)
        else:
            xp = x
        out = ops().forward(xp, w_hh, h0, c0, memory, w_q, b_q, w_m, v.reshape(-1), *sched, k_top, official,
                            raw_small, eps, summary_out)
        y, h_n, c_n, mem, *saved = out
        ctx.save_for_backward(x if projected else None, w_ih, w_hh, w_q, w_m, v, *saved)
        ctx.set_materialize_grads(False)  # unused outputs (the carried memory, mostly) get no zero tensors
        ctx.sched, ctx.opts, ctx.projected, ctx.has_bias = sched, opts, projected, bias is not None
        return y, h_n, c_n, mem

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_y: Tensor | None, g_h: Tensor | None, g_c: Tensor | None,
                 g_mem: Tensor | None) -> tuple[Tensor | None, ...]:
        x, w_ih, w_hh, w_q, w_m, v, *saved = ctx.saved_tensors
        k_top, official, raw_small, _, summary_out, detach_threshold = ctx.opts
        needs = ctx.needs_input_grad
        grads = ops().backward(saved, w_hh, w_q, w_m, v.reshape(-1), g_y, g_h, g_c, g_mem, needs[8],
                               *ctx.sched, k_top, official, raw_small, detach_threshold, summary_out,
                               x if ctx.projected else None)
        g_xp, g_whh, g_h0, g_c0, g_mem0, g_wq, g_bq, g_wm, g_v, *g_proj = grads
        if ctx.projected:
            g_wih, g_b = g_proj
            g_x = onednn_linear(g_xp.view(x.shape[0], -1), w_ih.t().contiguous()) if needs[2] else None
            if not ctx.has_bias:
                g_b = None
        else:
            g_x, g_wih, g_b = g_xp, None, None
        out = (g_x, g_wih, g_b, g_whh, g_h0, g_c0, g_mem0, g_wq, g_bq, g_wm, g_v.reshape(v.shape))
        return (None, None, *(g if need else None for g, need in zip(out, needs[2:], strict=True)))


def sab_loop(cell: SABCell, x: Tensor, inner_state: tuple[Tensor, Tensor], memory: Tensor,
             t0: int) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor]:
    """The unroll of ``cell`` over ``x[b, t, d]`` from global step ``t0``: ``(y, (h_T, c_T), memory_T)``."""
    cfg = cell.config
    inner = cell.inner
    rnn = inner.rnn  # the lstm cell's nn.LSTM: its weights are the step's (baselines/cells.py, eq. 1)
    w_ih, w_hh = rnn.weight_ih_l0, rnn.weight_hh_l0
    b_ih, b_hh = getattr(rnn, "bias_ih_l0", None), getattr(rnn, "bias_hh_l0", None)
    bias = None if b_ih is None or b_hh is None else b_ih + b_hh
    if projection_uses_onednn(x, w_ih):  # the projection inside SABLoop (see there)
        xin, proj_w, proj_b = time_major_rows(x), w_ih, bias
    else:
        xin, proj_w, proj_b = project_steps(x, w_ih, bias), None, None
    scorer = cell.scorer
    b_q = scorer.query_proj.bias
    if b_q is None:
        b_q = x.new_zeros(scorer.query_proj.out_features)
    h0, c0 = inner_state
    sched = schedule(cell, t0, x.shape[1], memory.shape[1])
    opts = (cfg.k_top, cfg.sparsifier == "official", cfg.small_memory == "raw", float(cfg.epsilon),
            cfg.output == "state_and_summary", bool(cfg.detach_threshold))
    y, h_n, c_n, mem = SABLoop.apply(sched, opts, xin, proj_w, proj_b, w_hh, h0, c0, memory, scorer.query_proj.weight,
                                     b_q, scorer.key_proj.weight, scorer.out.weight)
    return y, (h_n, c_n), mem
