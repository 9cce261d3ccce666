"""FS-RNN over LN-LSTM cells with a hand-written backward (the training fast path).

Autograd on the step loop records some 25 nodes per inner cell and step, each saving its own inputs,
and does one small weight-gradient GEMM per matrix and step. :class:`FSLNLSTMRecurrence` runs the
whole FS-RNN step (F1 -> S -> F2 -> ... -> Fk, eqs. 1-5 of :mod:`.cell`, every cell eqs. 1-4 of
:mod:`.ln_lstm`) forward without autograd, writing what the backward needs into buffers allocated
once per sequence, and its backward walks the steps in reverse computing only the gradients that
flow along the recurrence: per cell and step the gradient of the raw pre-activation ``a``. The
weight gradients are then one GEMM per matrix over all steps (``da[T*b, 4n]^T @ inputs[T*b, d+n]``),
and the LN gains and shifts one reduction each.

Layout: the GEMM inputs of a cell are stored side by side, ``[u | h_prev]``, with the merged matrix
``[W_x | W_h]`` [4n, d+n], so one ``addmm`` per cell and step forward, one ``mm`` backward. A cell's
zoned-out output is written straight into the input buffer of the cell that reads it next. Layer
norms keep their normalised values ``xhat`` and ``rstd``; the backward calls torch's own layer-norm
backward kernel on ``xhat`` (mean 0, rstd 1) and rescales by ``rstd``.

Random numbers: zoneout masks and dropout masks are drawn up front by :func:`draw_masks` in the order
of ``FSRNNCell.fast_forward`` (per step: F1 h, F1 c, site 2, S h, S c, site 3, F2 h, F2 c, F3 h, ...),
so with the same seed the fused path draws the same masks as the planned path (and, without dropout,
as the reference ``step``). Tests compare it with the reference on outputs and every gradient and
``gradcheck`` it in float64.

Backends: the loops above are the reference (``backend="python"``, any device). ``fs_rnn_cpu.cpp`` runs
the same two loops in C++ (``backend="cpp"``, CPU float32/float64, built at first use): per step and cell
one ATen GEMM and one fused pass per batch row (LN4, gates, cell update, LN_c, output, zoneout) forward,
and one fused pass (both layer-norm backwards by hand) plus one GEMM backward, the whole time loop in one
call per direction. Tests pin it to the python loop on outputs and every gradient
(``tests/plugins/test_fs_rnn_cpp.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from seqplat.core.cpp_ext import CppKernel

_aten = torch.ops.aten

CPP_SOURCE = Path(__file__).with_name("fs_rnn_cpu.cpp")
Backend = Literal["auto", "cpp", "python"]
KERNEL = CppKernel(CPP_SOURCE, "seqplat_fs_rnn_cpu", "fs_rnn")  # default messages (LOOP_FALLBACK, LOOP_FIX)
load_cpp_extension = KERNEL.load  # compile at first use (cached); True when usable, strict=True raises
cpp_error = KERNEL.error  # why the kernel is unavailable, or None
resolve_backend = KERNEL.resolve  # "cpp" or "python" for a cell's backend option and an input

#: zoneout of one state tensor: None (keep 1, no zoneout), a float ``keep`` (evaluation: the
#: expected mix) or a bool mask [T, b, n] (training: True takes the new value)
Zone = Tensor | float | None


@dataclass
class FusedPlan:
    """Non-tensor arguments of :class:`FSLNLSTMRecurrence`, cells in compute order F1, S, F2, F3..Fk."""

    num_fast: int
    eps: list[float]  #: layer-norm epsilon of each cell
    zone: list[tuple[Zone, Zone]]  #: (h, c) zoneout of each cell
    drop2: Tensor | None = None  #: scaled dropout mask [T, b, n_F] on h^F1 -> S (site 2)
    drop3: Tensor | None = None  #: scaled dropout mask [T, b, n_S] on h^S -> F2 (site 3)
    backend: str = "python"  #: "python" (the loops below) or "cpp" (``fs_rnn_cpu.cpp``; resolved by the caller)


def draw_masks(steps: int, batch: int, widths: list[int], keeps: list[tuple[float, float]], training: list[bool],
               dropout: float, like: Tensor) -> tuple[list[tuple[Zone, Zone]], Tensor | None, Tensor | None]:
    """Zoneout (and, with ``dropout > 0``, site 2 and 3 dropout) masks for every step, in the order the
    step-by-step paths draw them. ``widths``, ``keeps`` (probability of the new value, h and c) and
    ``training`` are per cell in compute order; the FS cell's dropout needs ``training[0]``-style mode
    folded in by the caller (pass ``dropout=0`` in evaluation)."""
    slots: list[tuple[int, int, int, float]] = []  # (cell, 0 h | 1 c, width, keep) of the drawn masks
    zone: list[list[Zone]] = []
    for i, (n, keep, train) in enumerate(zip(widths, keeps, training, strict=True)):
        zone.append([None if k >= 1.0 else (None if train else float(k)) for k in keep])
        slots += [(i, j, n, k) for j, k in enumerate(keep) if train and k < 1.0]
    opts = {"dtype": like.dtype, "device": like.device}
    drop2 = drop3 = None
    if dropout == 0.0:
        # one draw for all steps: torch's CPU generator fills a tensor serially, so this equals the
        # per-step draws of the same sizes in the same order
        sizes = [batch * n for _, _, n, _ in slots]
        r = torch.rand(steps, sum(sizes), **opts) if slots else like.new_empty(steps, 0)
        for (i, j, n, keep), part in zip(slots, r.split(sizes, dim=1), strict=True):
            zone[i][j] = part.unflatten(1, (batch, n)) < keep
    else:
        rand = {(i, j): torch.empty(steps, batch, n, **opts) for i, j, n, _ in slots}
        drop2 = torch.empty(steps, batch, widths[0], **opts)
        drop3 = torch.empty(steps, batch, widths[1], **opts)
        ones2, ones3 = like.new_ones(batch, widths[0]), like.new_ones(batch, widths[1])
        for t in range(steps):
            for i in range(len(widths)):
                for j in (0, 1):
                    if (i, j) in rand:
                        torch.rand(batch, widths[i], out=rand[i, j][t])
                if i == 0:
                    drop2[t] = F.dropout(ones2, dropout, True)
                elif i == 1:
                    drop3[t] = F.dropout(ones3, dropout, True)
        for (i, j, _, keep) in slots:
            zone[i][j] = rand[i, j] < keep
    return [(h, c) for h, c in zone], drop2, drop3


class _Saved:
    """One LN-LSTM cell over all steps: its parameters, the per-step values its backward needs and the
    forward and backward of one step. Per-step views of every buffer are made once (``unbind``), and
    the four gates are stored gate-major, ``[4, b, n]`` per step, so every gate is contiguous.

    ``tanh`` is computed as ``2 sigmoid(2x) - 1`` (torch's CPU tanh is several times slower than its
    sigmoid): the j block of LN4's gain and shift is doubled (exact), so one sigmoid covers all four
    gates, and LN_c's gain and shift likewise. The results agree with ``tanh`` to rounding.
    """

    def __init__(self, steps: int, b: int, n: int, eps: float, zone: tuple[Zone, Zone], params: tuple[Tensor, ...],
                 opts: dict[str, Any]):
        self.n, self.eps, (self.zh, self.zc) = n, eps, zone
        self.w, self.bias, self.g4, self.s4, self.gc, self.sc = params
        self.w_t = self.w.t()
        two = torch.ones(4, n, **opts)
        two[1] = 2.0
        self.g4x, self.s4x = (self.g4.view(4, n) * two).view(-1), (self.s4.view(4, n) * two).view(-1)
        self.gc2, self.sc2 = self.gc * 2.0, self.sc * 2.0
        self.m1, self.two = torch.tensor(-1.0, **opts), torch.tensor(2.0, **opts)
        self.gates = torch.empty(steps, 4, b, n, **opts)  # sigmoid(i), tanh(j), sigmoid(f), sigmoid(o)
        self.tc = torch.empty(steps, b, n, **opts)  # tanh(LN_c(c'))
        self.g_t, self.tc_t = self.gates.unbind(0), self.tc.unbind(0)
        self.xh4: list[Tensor] = []  # LN4's normalised a [b, 4, n] and 1/std [b, 4, 1], per step
        self.r4: list[Tensor] = []
        self.xhc: list[Tensor] = []  # LN_c's normalised c' [b, n] and 1/std [b, 1]
        self.rc: list[Tensor] = []
        self.zh_t = self.zh.unbind(0) if isinstance(self.zh, Tensor) else None
        self.zc_t = self.zc.unbind(0) if isinstance(self.zc, Tensor) else None

    def _tanh_from_sigmoid(self, s: Tensor) -> Tensor:
        return torch.addcmul(self.m1, s, self.two, out=s)  # 2 sigmoid(2x) - 1 = tanh(x), in place

    def forward(self, t: int, a: Tensor, h_prev: Tensor, c_prev: Tensor, h_out: Tensor, c_out: Tensor) -> None:
        """Eqs. 1-4 of :mod:`.ln_lstm` from the raw pre-activation ``a`` [b, 4n]; writes h_t into
        ``h_out`` and c_t into ``c_out``."""
        n, b = self.n, a.shape[0]
        xh4, _, r4 = torch.native_layer_norm(a.view(b, 4, n), [n], None, None, self.eps)  # eq. 1: LN4
        pre = torch.addcmul(self.s4x, xh4.view(b, 4 * n), self.g4x)  # gain and shift (+ forget bias)
        g = self.g_t[t]
        torch.sigmoid(pre.view(b, 4, n).transpose(0, 1), out=g)
        i, j, f, o = g.unbind(0)
        self._tanh_from_sigmoid(j)
        c_new = torch.addcmul(i * j, f, c_prev)  # eq. 2
        xhc, _, rc = torch.native_layer_norm(c_new, [n], None, None, self.eps)
        tc = torch.sigmoid(torch.addcmul(self.sc2, xhc, self.gc2), out=self.tc_t[t])
        self._tanh_from_sigmoid(tc)
        _zone_forward(self.zh, self.zh_t, t, o * tc, h_prev, h_out)  # eq. 3, 4
        _zone_forward(self.zc, self.zc_t, t, c_new, c_prev, c_out)
        self.xh4.append(xh4)
        self.r4.append(r4)
        self.xhc.append(xhc)
        self.rc.append(rc)

    def start_backward(self, steps: int, b: int, opts: dict[str, Any]) -> None:
        n = self.n
        self.dpre = torch.empty(steps, b, 4 * n, **opts)  # gradient after LN4's gain (before the gates)
        self.da = torch.empty(steps, b, 4 * n, **opts)  # gradient of the raw pre-activation a
        self.dcn = torch.empty(steps, b, n, **opts)  # gradient of LN_c's output
        self.dg = torch.empty(4, b, n, **opts)  # scratch: gradient of the activated gates
        self.dpre_t = [d.view(b, 4, n).transpose(0, 1) for d in self.dpre.unbind(0)]
        self.da_t, self.dcn_t = self.da.unbind(0), self.dcn.unbind(0)
        self.mh_t = self.zh.to(self.w.dtype).unbind(0) if isinstance(self.zh, Tensor) else None
        self.mc_t = self.zc.to(self.w.dtype).unbind(0) if isinstance(self.zc, Tensor) else None
        self.consts = {"z4": torch.zeros(b, 4, 1, **opts), "o4": torch.ones(b, 4, 1, **opts),
                       "zc": torch.zeros(b, 1, **opts), "oc": torch.ones(b, 1, **opts)}

    def backward(self, t: int, dh: Tensor, dc: Tensor, c_prev: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """Reverse of :meth:`forward` at step ``t`` given the gradients of h_t and c_t. Returns the gradient
        of the GEMM input row ``[u | h_prev]``, the extra gradient of h_prev through zoneout (or None)
        and the gradient of c_prev; stores the gradient of ``a`` in ``self.da[t]``."""
        n, b, k = self.n, dh.shape[0], self.consts
        dhn, dhk = _zone_backward(self.zh, self.mh_t, t, dh)  # eq. 4
        g, tc = self.g_t[t], self.tc_t[t]
        i, j, f, o = g.unbind(0)
        dg = self.dg
        di, dj, df, do = dg.unbind(0)
        torch.mul(dhn, tc, out=do)  # eq. 3: h' = o tanh(LN_c(c'))
        dcn = _aten.tanh_backward.grad_input(dhn * o, tc, grad_input=self.dcn_t[t])
        dc_new = _aten.native_layer_norm_backward(dcn, self.xhc[t], [n], k["zc"], k["oc"], self.gc, None,
                                                  [True, False, False])[0]
        dc_new.mul_(self.rc[t])
        dc_new, dck = _zone_backward_c(self.zc, self.mc_t, t, dc, dc_new)
        torch.mul(dc_new, j, out=di)  # eq. 2: c' = i j + f c
        torch.mul(dc_new, i, out=dj)
        torch.mul(dc_new, c_prev, out=df)
        dc_prev = dc_new * f if dck is None else torch.addcmul(dck, dc_new, f)
        dpre = _aten.sigmoid_backward.grad_input(dg, g, grad_input=self.dpre_t[t])
        _aten.tanh_backward.grad_input(dj, j, grad_input=dpre[1])
        dpre = self.dpre[t]
        da = _aten.native_layer_norm_backward((dpre * self.g4).view(b, 4, n), self.xh4[t], [n], k["z4"], k["o4"],
                                              None, None, [True, False, False])[0]
        da_t = self.da_t[t]
        torch.mul(da, self.r4[t], out=da_t.view(b, 4, n))  # eq. 1
        return da_t.mm(self.w), dhk, dc_prev

    def param_grads(self, inputs: Tensor) -> list[Tensor | None]:
        """``(dW, db, d gain4, d shift4, d gain_c, d shift_c)``: one GEMM and one reduction each over all steps."""
        da = self.da.flatten(0, 1)
        dw = da.t().mm(inputs.flatten(0, 1))
        db = da.sum(0) if self.bias is not None else None
        xh4 = torch.stack(self.xh4).flatten(2)
        xhc = torch.stack(self.xhc)
        return [dw, db, (self.dpre * xh4).sum((0, 1)), self.dpre.sum((0, 1)),
                (self.dcn * xhc).sum((0, 1)), self.dcn.sum((0, 1))]


def _zone_forward(zone: Zone, masks: Any, t: int, new: Tensor, old: Tensor, out: Tensor) -> None:
    if zone is None:
        out.copy_(new)
    elif isinstance(zone, float):
        torch.lerp(old, new, zone, out=out)  # keep new + (1 - keep) old
    else:
        torch.where(masks[t], new, old, out=out)


def _zone_backward(zone: Zone, masks: Any, t: int, d: Tensor) -> tuple[Tensor, Tensor | None]:
    """Gradients of the new and of the old value from the gradient ``d`` of the zoned-out one."""
    if zone is None:
        return d, None
    if isinstance(zone, float):
        return d * zone, d * (1.0 - zone)
    d_new = d * masks[t]
    return d_new, d - d_new


def _zone_backward_c(zone: Zone, masks: Any, t: int, dc: Tensor,
                     dc_new: Tensor) -> tuple[Tensor, Tensor | None]:
    """``dc_new`` (the gradient through LN_c) plus the zoneout share of ``dc``; the kept share separately."""
    if zone is None:
        return dc_new.add_(dc), None
    if isinstance(zone, float):
        return dc_new.add_(dc, alpha=zone), dc * (1.0 - zone)
    dz = dc * masks[t]
    return dc_new.add_(dz), dc - dz


class FSLNLSTMRecurrence(torch.autograd.Function):
    """``(ys [T, b, n_F], h_F, c_F, h_S, c_S)`` from F1's hoisted input products ``xp [T, b, 4n_F]``
    (``W_x x_t + b``) and the initial state.

    ``params``: six per cell, cells in compute order F1, S, F2, F3..Fk: ``w`` (F1 and F3..Fk: ``W_h``
    [4n, n]; S and F2: ``[W_x | W_h]`` [4n, d+n]), ``bias`` (None for F1, whose bias is in ``xp``),
    ``ln_gain``, LN4's shift with the forget bias added, ``ln_c_gain``, ``ln_c_shift``.
    """

    @staticmethod
    def forward(ctx: Any, xp: Tensor, h_f: Tensor, c_f: Tensor, h_s: Tensor, c_s: Tensor, plan: FusedPlan,
                *params: Tensor) -> tuple[Tensor, ...]:
        ctx.cpp = plan.backend == "cpp"
        if ctx.cpp:
            return FSLNLSTMRecurrence._cpp_forward(ctx, xp, h_f, c_f, h_s, c_s, plan, params)
        steps, b = xp.shape[0], xp.shape[1]
        k = plan.num_fast
        nf, ns = h_f.shape[1], h_s.shape[1]
        opts = {"dtype": xp.dtype, "device": xp.device}
        widths = [nf, ns] + [nf] * (k - 1)
        cells = [_Saved(steps, b, n, plan.eps[i], plan.zone[i], params[6 * i : 6 * i + 6], opts)
                 for i, n in enumerate(widths)]
        # GEMM inputs: F1 [h_prev] (row t + 1 is y_t), S [u | h_prev] (row t + 1 holds h^S_t), F2 [u | h_prev],
        # F3..Fk [h_prev]; c chains: fast [T+1, k, b, n_F] (c_prev of F_i at step t in [t, i-1]), slow [T+1, b, n_S]
        hf = torch.empty(steps + 1, b, nf, **opts)
        ins = torch.empty(steps + 1, b, nf + ns, **opts)
        in2 = torch.empty(steps, b, ns + nf, **opts)
        rest = [torch.empty(steps, b, nf, **opts) for _ in range(k - 2)]
        cf = torch.empty(steps + 1, k, b, nf, **opts)
        cs = torch.empty(steps + 1, b, ns, **opts)
        hf[0], cf[0, 0], ins[0, :, nf:], cs[0] = h_f, c_f, h_s, c_s
        # per-step views, made once
        xp_t, hf_t, ins_t, in2_t, cs_t = xp.unbind(0), hf.unbind(0), ins.unbind(0), in2.unbind(0), cs.unbind(0)
        ins_u, ins_h = ins[:, :, :nf].unbind(0), ins[:, :, nf:].unbind(0)
        in2_u, in2_h = in2[:, :, :ns].unbind(0), in2[:, :, ns:].unbind(0)
        rest_t = [r.unbind(0) for r in rest]
        cf_t = [c.unbind(0) for c in cf.unbind(0)]
        f1, sl, f2 = cells[0], cells[1], cells[2]
        for t in range(steps):
            # eq. 1: F1 reads x_t and Fk's state of step t - 1; its h goes to F2 (state) and S (input)
            f1.forward(t, torch.addmm(xp_t[t], hf_t[t], f1.w_t), hf_t[t], cf_t[t][0], in2_h[t], cf_t[t][1])
            if plan.drop2 is None:
                ins_u[t].copy_(in2_h[t])
            else:
                torch.mul(in2_h[t], plan.drop2[t], out=ins_u[t])
            # eq. 2: S reads F1's new output
            sl.forward(t, _affine(sl, ins_t[t]), ins_h[t], cs_t[t], ins_h[t + 1], cs_t[t + 1])
            if plan.drop3 is None:
                in2_u[t].copy_(ins_h[t + 1])
            else:
                torch.mul(ins_h[t + 1], plan.drop3[t], out=in2_u[t])
            # eq. 3: F2 reads the slow output, continues from F1's state
            last = k == 2
            f2.forward(t, _affine(f2, in2_t[t]), in2_h[t], cf_t[t][1], hf_t[t + 1] if last else rest_t[0][t],
                       cf_t[t + 1][0] if last else cf_t[t][2])
            for i in range(3, k + 1):  # eq. 4: F3..Fk, no input
                cell, inp = cells[i], rest_t[i - 3][t]
                last = i == k
                cell.forward(t, _affine(cell, inp), inp, cf_t[t][i - 1], hf_t[t + 1] if last else rest_t[i - 2][t],
                             cf_t[t + 1][0] if last else cf_t[t][i])
        ctx.cells, ctx.plan = cells, plan
        ctx.buffers = (hf, ins, in2, rest, cf, cs)
        # eq. 5: y_t = h^Fk_t; the final states are copies so no output is held by ctx
        return hf[1:], hf[steps].clone(), cf[steps, 0].clone(), ins[steps, :, nf:].clone(), cs[steps].clone()

    @staticmethod
    def backward(ctx: Any, dys: Tensor, dh_f: Tensor, dc_f: Tensor, dh_s: Tensor,
                 dc_s: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.cpp:
            return FSLNLSTMRecurrence._cpp_backward(ctx, dys, dh_f, dc_f, dh_s, dc_s)
        cells, plan = ctx.cells, ctx.plan
        hf, ins, in2, rest, cf, cs = ctx.buffers
        steps, b = dys.shape[0], dys.shape[1]
        k = plan.num_fast
        nf, ns = hf.shape[2], cs.shape[2]
        opts = {"dtype": dys.dtype, "device": dys.device}
        for cell in cells:
            cell.start_backward(steps, b, opts)
        cf_t = [c.unbind(0) for c in cf.unbind(0)]
        cs_t, dys_t = cs.unbind(0), dys.unbind(0)
        f1, sl, f2 = cells[0], cells[1], cells[2]
        for t in range(steps - 1, -1, -1):
            dh = dys_t[t] + dh_f  # Fk's output: y_t and F1's state at t + 1
            dc = dc_f
            for i in range(k, 2, -1):  # F3..Fk
                d_in, dhk, dc = cells[i].backward(t, dh, dc, cf_t[t][i - 1])
                dh = d_in if dhk is None else d_in + dhk
            d_in, dhk, dc1 = f2.backward(t, dh, dc, cf_t[t][1])
            du2, dh1 = d_in[:, :ns], d_in[:, ns:]
            if dhk is not None:
                dh1 = dh1 + dhk
            dh_s = dh_s + (du2 if plan.drop3 is None else du2 * plan.drop3[t])
            d_in, dhk, dc_s = sl.backward(t, dh_s, dc_s, cs_t[t])
            du_s, dh_s = d_in[:, :nf], d_in[:, nf:]
            if dhk is not None:
                dh_s = dh_s + dhk
            dh1 = dh1 + (du_s if plan.drop2 is None else du_s * plan.drop2[t])
            d_in, dhk, dc_f = f1.backward(t, dh1, dc1, cf_t[t][0])
            dh_f = d_in if dhk is None else d_in + dhk
        inputs = [hf[:steps], ins[:steps], in2, *rest]
        grads: list[Tensor | None] = []
        for cell, inp in zip(cells, inputs, strict=True):
            grads += cell.param_grads(inp)
        return (f1.da, dh_f, dc_f, dh_s, dc_s, None, *grads)

    @staticmethod
    def _cpp_forward(ctx: Any, xp: Tensor, h_f: Tensor, c_f: Tensor, h_s: Tensor, c_s: Tensor, plan: FusedPlan,
                     params: tuple[Tensor | None, ...]) -> tuple[Tensor, ...]:
        """The forward loop in ``fs_rnn_cpu.cpp``, keeping every buffer the C++ backward reads."""
        outs, ctx.saved_cpp, ctx.cpp_args = cpp_loop(xp, h_f, c_f, h_s, c_s, plan, params, keep=True)
        return outs

    @staticmethod
    def _cpp_backward(ctx: Any, dys: Tensor, dh_f: Tensor, dc_f: Tensor, dh_s: Tensor,
                      dc_s: Tensor) -> tuple[Tensor | None, ...]:
        """The reverse loop in ``fs_rnn_cpu.cpp`` (weight gradients as one GEMM per matrix over all steps)."""
        if torch.is_grad_enabled():
            raise RuntimeError("fs_rnn: the C++ backward is not differentiable (create_graph=True); set "
                               "cell.backend='python' for higher-order gradients")
        weights, gains, c_gains, masks, keeps, drops, has_bias = ctx.cpp_args
        out = torch.ops.seqplat_fs_rnn.backward(ctx.saved_cpp, weights, gains, c_gains, masks, keeps, *drops,
                                                dys.contiguous(), dh_f.contiguous(), dc_f.contiguous(),
                                                dh_s.contiguous(), dc_s.contiguous())
        grads: list[Tensor | None] = []
        for i, bias in enumerate(has_bias):
            dw, db, dg4, ds4, dgc, dsc = out[5 + 7 * i : 11 + 7 * i]  # (out[4 + 7 i] is the cell's da)
            grads += [dw, db if bias else None, dg4, ds4, dgc, dsc]
        return (out[4], out[0], out[1], out[2], out[3], None, *grads)


def cpp_loop(xp: Tensor, h_f: Tensor, c_f: Tensor, h_s: Tensor, c_s: Tensor, plan: FusedPlan,
             params: tuple[Tensor | None, ...] | list[Tensor | None], keep: bool = False
             ) -> tuple[tuple[Tensor, ...], list[Tensor], tuple[Any, ...]]:
    """The forward loop of :class:`FSLNLSTMRecurrence` in ``fs_rnn_cpu.cpp``, arguments as there, on plain
    tensors (no autograd). Returns ``(ys, h_F, c_F, h_S, c_S)``, the buffers (with ``keep`` every step's, for
    the C++ backward; without, one step's: memory independent of ``T``, for inference) and the converted
    arguments the backward takes again."""
    load_cpp_extension(strict=True)  # built by the caller's resolve_backend, unless called directly
    steps, nf = xp.shape[0], h_f.shape[1]
    dtype = xp.dtype
    masks: list[Tensor | None] = []
    keeps: list[float] = []
    for zone in plan.zone:  # (h, c) per cell: a 0/1 mask, or the constant keep (1: no zoneout)
        for z in zone:
            masks.append(z.to(dtype).contiguous() if isinstance(z, Tensor) else None)
            keeps.append(float(z) if isinstance(z, float) else 1.0)
    drops = [None if d is None else d.to(dtype).contiguous() for d in (plan.drop2, plan.drop3)]
    n = len(params) // 6
    cols = [[params[6 * i + j] for i in range(n)] for j in range(6)]  # w, bias, gain, shift, c gain, c shift
    weights = [w.contiguous() for w in cols[0]]  # type: ignore[union-attr]
    with torch.no_grad():  # plain tensors: the kernel's ATen calls must not record (nor refuse) autograd
        saved = torch.ops.seqplat_fs_rnn.forward(xp.contiguous(), h_f.contiguous(), c_f.contiguous(),
                                                 h_s.contiguous(), c_s.contiguous(), weights, cols[1], cols[2],
                                                 cols[3], cols[4], cols[5], [float(e) for e in plan.eps], masks,
                                                 keeps, *drops, keep)
    hf, ins, cf, cs = saved[0], saved[1], saved[3], saved[4]
    last = steps if keep else steps % 2  # the slot of the final states
    outs = (hf[1:], hf[steps].clone(), cf[last, 0].clone(), ins[last, :, nf:].clone(), cs[last].clone())
    args = (weights, cols[2], cols[4], masks, keeps, drops, [b is not None for b in cols[1]])
    return outs, saved, args


def _affine(cell: _Saved, inp: Tensor) -> Tensor:
    """``a = [u | h_prev] [W_x | W_h]^T + b`` for one step."""
    return torch.mm(inp, cell.w_t) if cell.bias is None else torch.addmm(cell.bias, inp, cell.w_t)
