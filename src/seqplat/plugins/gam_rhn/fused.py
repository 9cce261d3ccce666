"""GAM-RHN recurrence with a hand-written backward (the training fast path).

Autograd on the step loop records some 70 small nodes per time step at depth 5 and does one small
weight-gradient GEMM per node and step. :class:`GAMRHNRecurrence` runs the same loop forward without
autograd, writing the per-step values the backward needs into preallocated ``[T, b, ...]`` buffers,
and its backward walks the steps in reverse computing only the gradients that flow along the
recurrence (state, memory and the per-step pre-activations). The weight gradients are then one GEMM
per matrix over all steps at once (``inputs[T*b, k]^T @ grads[T*b, n]``), the strategy of oneDNN's and
cuDNN's RNN kernels.

Speed (CPU, one thread): matrices that read the same vector are merged (the write address and layer
1's read address both read ``h_w``; ``W_g^l`` and ``W_s^l`` both read ``xr^l``, forward and
backward); every factor of the backward that does not depend on the incoming gradient is computed
for all steps at once before the reverse loop, which then does about one op per gradient; the
candidate ``tanh(v)`` is computed as ``2 sigmoid(2 v) - 1`` with the candidate rows of the weights
and bias doubled once per call (torch's CPU ``tanh`` costs about three sigmoids); and the buffers come
from a :class:`~seqplat.core.workspace.Workspace` the cell keeps, so a training loop does not
page-fault in fresh memory for its saved activations every step.

C++ backend (``cell.backend``, default ``auto``): the same forward and reverse loops in
``gam_rhn_cpu.cpp``, one op call per direction (``torch.ops.seqplat_gam_rhn``), built at first use by
:class:`~seqplat.core.cpp_ext.CppKernel`. Per step the GEMMs stay ATen (MKL) calls and everything between
two GEMMs is one fused pass over the batch rows (both address softmaxes, ``m_bar``, the memory write and
layer 1's read in one; a read address and its read; the gates; the candidate and the highway update), writing
the same Workspace buffers; the weight gradients are the same GEMMs over all steps (:func:`_weight_grads`).
The torch loop below stays the reference and the fallback (``python``, or ``auto`` without a compiler or
off CPU), and tests pin the two to each other in float64 on outputs and every gradient.

The math is steps (1)-(6) of :mod:`seqplat.plugins.gam_rhn.cell` in the merged form of
``GAMRHNCell.fast_forward``; every line of :meth:`GAMRHNRecurrence.backward` is the derivative of the
forward line named beside it. Tests compare it with the reference path on outputs and on every
gradient, and ``gradcheck`` it in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from seqplat.core.cpp_ext import CppKernel
from seqplat.core.gemm import outer, projection
from seqplat.core.workspace import Workspace

_aten = torch.ops.aten

CPP_SOURCE = Path(__file__).with_name("gam_rhn_cpu.cpp")
Backend = Literal["auto", "cpp", "python"]
KERNEL = CppKernel(CPP_SOURCE, "seqplat_gam_rhn_cpu", "gam_rhn")  # default messages (LOOP_FALLBACK, LOOP_FIX)
load_cpp_extension = KERNEL.load  # compile at first use (cached); True when usable, strict=True raises
cpp_error = KERNEL.error  # why the kernel is unavailable, or None
resolve_backend = KERNEL.resolve  # "cpp" or "python" for a cell's backend option and an input


def _carve(flat: Tensor, shapes: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """Contiguous views of ``flat``, one per named shape, in order."""
    out, k = {}, 0
    for name, shape in shapes.items():
        size = 1
        for v in shape:
            size *= v
        out[name] = flat[k : k + size].view(shape)
        k += size
    return out


def _numel(shapes: dict[str, tuple[int, ...]]) -> int:
    total = 0
    for shape in shapes.values():
        size = 1
        for v in shape:
            size *= v
        total += size
    return total


def _take(workspace: Workspace | None, shapes: dict[str, tuple[int, ...]], like: Tensor) -> tuple[Tensor, dict]:
    n = _numel(shapes)
    flat = workspace.take(((n,),), like)[0] if workspace is not None else like.new_empty(n)
    return flat, _carve(flat, shapes)


def _contiguous(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _forward_shapes(steps: int, b: int, dims: tuple, masked_g: bool,
                    cpp: bool = False) -> dict[str, tuple[int, ...]]:
    """The saved per-step buffers of both loops (one Workspace block). The C++ loop keeps, of ``pre``, only the
    ``h_w`` columns the backward reads (``"hw"``), and no ``shat`` (its backward recomputes it from ``y`` and the
    mask): at B=128, H=256 the forward writes about 1,000 fewer floats per row and step."""
    h, d, n, slots, depth = dims[:5]
    shapes = {
        "pre": (steps, b, 2 * d + h + d),  # s_{t-1} W_s0 (+ x parts): [z^1 pre | h_w | r pre]
        "r": (steps, b, d), "u": (steps, b, d),  # (3) r and r * s
        "mbar": (steps, b, n),  # (3) m_bar, before dropout
        "mem": (steps + 1, b, slots, n),  # (4) m_0 .. m_T
        "a0": (steps, b, 2, slots, n),  # (2) write address, layer 1's read address
        "s_in": (depth, steps, b, d),  # the state entering layer l
        "xr": (depth, steps, b, n), "g": (depth, steps, b, 2 * d), "rs": (depth, steps, b, d),
        "y": (depth, steps, b, d),  # python: sigmoid(2 v), the candidate is 2 y - 1; cpp: tanh(v)
        "shat": (depth, steps, b, d),  # the candidate after dropout
    }
    if depth > 1:
        shapes["hs"] = (depth - 1, steps, b, 2 * d + h)  # s^{l-1} W_hs (+ b_hs): [gates pre | h_l]
        shapes["a"] = (depth - 1, steps, b, slots, n)  # read addresses of layers >= 2
    if masked_g:
        shapes["mb"] = (steps, b, n)
    if cpp:
        del shapes["pre"], shapes["shat"]
        shapes["hw"] = (steps, b, h)  # (1) h_w, for w_ad0's gradient
    return shapes


def _cpp_buffers(buf: dict[str, Tensor], ys: Tensor) -> list[Tensor]:
    """The buffers in the order of ``gam_rhn_cpu.cpp``'s ``Buf`` (absent ones as empty tensors)."""
    empty = ys.new_empty(0)
    return [buf["hw"], buf["r"], buf["u"], buf["mbar"], buf.get("mb", buf["mbar"]), buf["mem"], buf["a0"],
            buf["s_in"], buf["xr"], buf["g"], buf["rs"], buf["y"], empty, buf.get("hs", empty),
            buf.get("a", empty), ys]


def gam_rhn_loop_cpp(xp: Tensor, m0: Tensor, s0: Tensor, mask_g: Tensor | None, mask_r: Tensor | None,
                     dims: tuple, weights: tuple[Tensor, ...] | list[Tensor],
                     workspace: Workspace | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, dict]:
    """The forward loop in ``gam_rhn_cpu.cpp`` (no autograd): ``(ys, m_T, s_T, flat, buffers)``.

    Arguments as in :class:`GAMRHNRecurrence`; the buffers (the python loop's, except ``y`` = ``tanh(v)``)
    are carved from one block taken from ``workspace`` when given.
    """
    load_cpp_extension(strict=True)  # built and loaded at first use; a no-op after
    steps, b, d = xp.shape[0], xp.shape[1], dims[1]
    flat, buf = _take(workspace, _forward_shapes(steps, b, dims, mask_g is not None, cpp=True), xp)
    ys = xp.new_empty(steps, b, d)
    torch.ops.seqplat_gam_rhn.forward(xp.contiguous(), m0.contiguous(), s0.contiguous(), _contiguous(mask_g),
                                      _contiguous(mask_r), list(weights), _cpp_buffers(buf, ys))
    return ys, buf["mem"][-1].clone(), ys[-1].clone(), flat, buf


def _layer_weights(weights: tuple[Tensor, ...], depth: int) -> list[dict[str, Tensor]]:
    """Split the flat weight tuple of :class:`GAMRHNRecurrence` into one mapping per layer."""
    out, k = [], 5
    for i in range(depth):
        lw = dict(zip(("w_xr", "b_c", "w_cs"), weights[k : k + 3], strict=True))
        k += 3
        if i >= 1:
            lw.update(zip(("w_hs", "b_hs", "w_a", "b_a"), weights[k : k + 4], strict=True))
            k += 4
        out.append(lw)
    return out


class GAMRHNRecurrence(torch.autograd.Function):
    """``(ys [T, b, D], m_T [b, S, N], s_T [b, D])`` from the hoisted input projections ``xp [T, b, H+D+N]``.

    ``xp`` holds the ``x_t`` parts (and biases) of the write head, the reset gate and the written value,
    in that column order. With ``w_x [H+D+N, in]`` and ``b_x`` given, the first argument is instead the
    inputs as time-major rows ``[T*b, in]`` and the Function computes ``xp = x w_x^T + b_x`` itself: its
    backward then reads ``dL/dxp`` where the reverse loop left it (a column block of its gradient buffer)
    for the gradients of ``x``, ``w_x`` and ``b_x``, with no copy of it (``seqplat::outer`` on the C++
    path). Without them the gradient of ``xp`` is returned as a tensor of its own.

    The memory is held slot-major, ``[b, S, N]``, and the address matrices'
    columns are ordered to match (slot k of group g at column ``k*N + g``): the grouped softmax then
    runs over dim 1 with the groups contiguous, which torch computes some 10x faster than a softmax
    over a last dim of size S.

    ``weights``, all ``[in, out]``: ``w_s0 [D, 2D+H+D]`` (``s_{t-1}`` to layer 1's gates ``r^1, z^1``, the
    write head and the reset gate, in that column order), ``b_g0 [2D]`` (layer 1's gate bias),
    ``w_ms [N, D]`` (the ``r * s`` part of ``W_m``, ``[out, in]``), ``w_ad0 [H, 2SN]`` and ``b_ad0 [2SN]``
    (write address, then layer 1's read address), then for each layer ``i``: ``w_xr [N, 3D]`` (``xr^l``
    to the candidate, ``r^l`` and ``z^l``), ``b_c [D]``, ``w_cs [D, D]``, and for ``i >= 1`` also
    ``w_hs [D, 2D+H]`` (``s^{l-1}`` to the gates and the read head), ``b_hs [2D]``, ``w_a [H, SN]``,
    ``b_a [SN]``. ``mask_g [T, b, N]`` and ``mask_r [T, L, b, D]`` are the (already scaled) dropout
    masks, or None. With a ``workspace`` the saved buffers are reused across calls (see
    :class:`Workspace`). ``dims`` is ``(H, D, N, S, L)``, optionally with a sixth entry, the loop's backend:
    ``"python"`` (the default, the torch ops below) or ``"cpp"`` (both loops in ``gam_rhn_cpu.cpp``, one
    call per direction; resolve it with :func:`resolve_backend`).
    """

    @staticmethod
    def forward(ctx: Any, xp: Tensor, w_x: Tensor | None, b_x: Tensor | None, m0: Tensor, s0: Tensor,
                mask_g: Tensor | None, mask_r: Tensor | None,
                dims: tuple[int, int, int, int, int] | tuple[int, int, int, int, int, str],
                workspace: Workspace | None, *weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ctx.cpp = len(dims) > 5 and dims[5] == "cpp"
        dims = tuple(dims[:5])
        h, d, n, slots, depth = dims
        ctx.workspace, ctx.mark = workspace, None
        ctx.dims, ctx.masks = dims, (mask_g, mask_r)
        ctx.projected = w_x is not None
        if ctx.projected:  # xp = x w_x^T + b_x here; the backward reads dL/dxp in place
            if b_x is None:
                raise ValueError("gam_rhn: w_x needs b_x")
            x_rows = xp
            xp = projection(x_rows, w_x, b_x).view(-1, s0.shape[0], w_x.shape[0])  # no autograd in forward
            ctx.save_for_backward(*weights, x_rows, w_x)
        else:
            ctx.save_for_backward(*weights)
        if ctx.cpp:
            ys, m_T, s_T, ctx.flat, ctx.buf = gam_rhn_loop_cpp(xp, m0, s0, mask_g, mask_r, dims, weights, workspace)
            return ys, m_T, s_T
        w_s0, b_g0, w_ms, w_ad0, b_ad0 = weights[:5]
        layer_w = _layer_weights(weights, depth)
        steps, b = xp.shape[0], xp.shape[1]
        sn = slots * n
        flat, buf = _take(workspace, _forward_shapes(steps, b, dims, mask_g is not None), xp)
        # the candidate rows (and bias) doubled: one sigmoid gives tanh(v) = 2 sigmoid(2 v) - 1
        two = xp.new_ones(3 * d)
        two[:d] = 2.0
        w_xr2 = [lw["w_xr"] * two for lw in layer_w]
        b_xr2 = [torch.cat([lw["b_c"] * 2.0, xp.new_zeros(2 * d)]) for lw in layer_w]
        w_cs2 = [lw["w_cs"] * 2.0 for lw in layer_w]
        b_s0 = torch.cat([b_g0, xp.new_zeros(h + d)])
        b_hs = [None] + [torch.cat([lw["b_hs"], xp.new_zeros(h)]) for lw in layer_w[1:]]
        m1, c2 = xp.new_full((), -1.0), xp.new_full((), 2.0)
        ws_t = w_ms.t()
        ys = xp.new_empty(steps, b, d)
        mem = buf["mem"]
        mem[0].copy_(m0)
        mb_all = buf.get("mb", buf["mbar"])
        xg = xp.new_empty(b, 3 * d)  # scratch: xr^l [W_s | W_g] (+ b)
        cp = xp.new_empty(b, d)  # scratch: candidate pre-activation
        am = xp.new_empty(b, slots, n)  # scratch: a^l * m_t
        logits = xp.new_empty(b, 2 * sn)  # scratch: address logits
        logits1 = xp.new_empty(b, sn)
        # per-step views made once (indexing inside the loop costs a Python call each)
        pre_v, r_v, u_v = buf["pre"].unbind(0), buf["r"].unbind(0), buf["u"].unbind(0)
        mbar_v, mb_v = buf["mbar"].unbind(0), mb_all.unbind(0)
        mem_v, a0_v, xp_v, ys_v = mem.unbind(0), buf["a0"].unbind(0), xp.unbind(0), ys.unbind(0)
        per_layer = {k: [v.unbind(0) for v in buf[k].unbind(0)] for k in ("s_in", "xr", "g", "rs", "y", "shat")}
        hs_v = [None] + [v.unbind(0) for v in buf["hs"].unbind(0)] if depth > 1 else [None]
        a_v = [None] + [v.unbind(0) for v in buf["a"].unbind(0)] if depth > 1 else [None]
        s = s0
        for t in range(steps):
            pre = torch.addmm(b_s0, s, w_s0, out=pre_v[t])
            pre[:, 2 * d :].add_(xp_v[t][:, : h + d])
            h_w = pre[:, 2 * d : 2 * d + h]  # (1)
            torch.addmm(b_ad0, h_w, w_ad0, out=logits)
            a0 = _aten._softmax.out(logits.view(b, 2, slots, n), 2, False, out=a0_v[t])  # (2) and layer 1's
            r = torch.sigmoid(pre[:, 2 * d + h :], out=r_v[t])  # (3)
            u = torch.mul(r, s, out=u_v[t])
            m_bar = torch.addmm(xp_v[t][:, h + d :], u, ws_t, out=mbar_v[t]).tanh_()
            mb = m_bar if mask_g is None else torch.mul(m_bar, mask_g[t], out=mb_v[t])
            m = torch.lerp(mem_v[t], mb.unsqueeze(1), a0[:, 0], out=mem_v[t + 1])  # (4)
            for i in range(depth):  # (5)
                if i >= 1:
                    hs = torch.addmm(b_hs[i], s, layer_w[i]["w_hs"], out=hs_v[i][t])
                    torch.addmm(layer_w[i]["b_a"], hs[:, 2 * d :], layer_w[i]["w_a"], out=logits1)
                    a = _aten._softmax.out(logits1.view(b, slots, n), 1, False, out=a_v[i][t])
                    gate_pre = hs[:, : 2 * d]
                else:
                    a, gate_pre = a0[:, 1], pre[:, : 2 * d]
                xr = torch.sum(torch.mul(a, m, out=am), 1, out=per_layer["xr"][i][t])
                torch.addmm(b_xr2[i], xr, w_xr2[i], out=xg)  # [2 v_x | g_x]
                g = torch.add(gate_pre, xg[:, d:], out=per_layer["g"][i][t]).sigmoid_()
                rs = torch.mul(g[:, :d], s, out=per_layer["rs"][i][t])
                torch.addmm(xg[:, :d], rs, w_cs2[i], out=cp)  # 2 v
                y = torch.sigmoid(cp, out=per_layer["y"][i][t])
                s_hat = torch.addcmul(m1, y, c2, out=per_layer["shat"][i][t])  # tanh(v) = 2 y - 1
                if mask_r is not None:
                    s_hat.mul_(mask_r[t, i])
                s_next = ys_v[t] if i == depth - 1 else per_layer["s_in"][i + 1][t]
                s = torch.lerp(s_hat, s, g[:, d:], out=s_next)  # z s + (1 - z) s_hat
        s_in0 = buf["s_in"][0]
        s_in0[0].copy_(s0)
        s_in0[1:].copy_(ys[:-1])
        ctx.flat, ctx.buf = flat, buf
        return ys, mem[-1].clone(), ys[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dys: Tensor, dm_out: Tensor, ds_out: Tensor) -> tuple[Tensor | None, ...]:
        workspace: Workspace | None = ctx.workspace
        if ctx.mark is not None and not workspace.reclaim((ctx.flat,), ctx.mark):
            raise RuntimeError(
                "gam_rhn: a second backward through a graph whose saved buffers a later forward reused; set "
                "cell.explicit_backward = False for this (retain_graph) use"
            )
        h, d, n, slots, depth = ctx.dims
        weights = ctx.saved_tensors[:-2] if ctx.projected else ctx.saved_tensors
        w_s0, _, w_ms, w_ad0, _ = weights[:5]
        layer_w = _layer_weights(weights, depth)
        mask_g, mask_r = ctx.masks
        buf = ctx.buf
        steps, b = dys.shape[0], dys.shape[1]
        sn = slots * n
        if ctx.cpp:
            return GAMRHNRecurrence._cpp_backward(ctx, dys, dm_out, ds_out, weights)
        like = dys
        # Gradients of every step's pre-activations, per layer [dv | d r^l | d z^l | (layer >= 2) d h_l];
        # layer 1's continues [d h_w | d r | d m_bar pre], whose last H+D+N columns are dL/dxp
        scratch = {
            "dg0": (steps, b, 3 * d + h + d + n),
            "da0": (steps, b, 2, slots, n),  # write address and layer 1's read address logits
            "q": (depth, steps, b, d), "pz": (depth, steps, b, d), "pr": (depth, steps, b, d),
            "wd": (steps, b, slots, n), "oma": (steps, b, slots, n), "qm": (steps, b, n), "prr": (steps, b, d),
        }
        if depth > 1:
            scratch["dgl"] = (depth - 1, steps, b, 3 * d + h)
            scratch["da"] = (depth - 1, steps, b, slots, n)
        sflat, sb = _take(workspace, scratch, like)
        dg0 = sb["dg0"]
        # Everything that does not depend on the incoming gradient, for all steps at once.
        g_all = buf["g"].view(depth, steps, b, 2, d)
        rl, z = g_all[..., 0, :], g_all[..., 1, :]
        y, s_in = buf["y"], buf["s_in"]
        # (in place, without temporaries: fresh memory costs page faults)
        q = torch.addcmul(y, y, y, value=-1.0, out=sb["q"]).mul_(4.0)  # dv = ds (1 - z) 4 y (1 - y) mask
        q.addcmul_(q, z, value=-1.0)
        if mask_r is not None:
            q.mul_(mask_r.transpose(0, 1))
        pz = torch.sub(s_in, buf["shat"], out=sb["pz"]).mul_(z)  # dz pre = ds (s_prev - s_hat) z (1 - z)
        pz.addcmul_(pz, z, value=-1.0)
        pr = torch.addcmul(rl, rl, rl, value=-1.0, out=sb["pr"]).mul_(s_in)  # d r^l pre = d_rs s_prev r^l (1 - r^l)
        mem, a0 = buf["mem"], buf["a0"]
        mb = buf.get("mb", buf["mbar"])
        wd = torch.sub(mb.unsqueeze(2), mem[:-1], out=sb["wd"])  # (4) d a_w = dm (mb - m_old)
        oma = torch.sub(1.0, a0[:, :, 0], out=sb["oma"])  # (4) dm_old = dm (1 - a_w)
        m_bar = buf["mbar"]
        qm = torch.mul(m_bar, m_bar, out=sb["qm"]).neg_().add_(1.0)  # m_bar = tanh(...)
        if mask_g is not None:
            qm.mul_(mask_g)
        r = buf["r"]
        prr = torch.addcmul(r, r, r, value=-1.0, out=sb["prr"]).mul_(s_in[0])  # d r pre = du s_{t-1} r (1 - r)
        # per-step views made once
        lay: list[dict[str, Any]] = [{} for _ in range(depth)]
        for i in range(depth):
            L = lay[i]
            dgi = dg0 if i == 0 else sb["dgl"][i - 1]
            for k, sl in (("dv", slice(0, d)), ("dgr", slice(d, 2 * d)), ("dgz", slice(2 * d, 3 * d)),
                          ("dxr_in", slice(0, 3 * d)), ("dhs", slice(d, None)), ("dhl", slice(3 * d, None))):
                L[k] = dgi[..., sl].unbind(0)
            if i >= 1:
                L["da"] = sb["da"][i - 1].unbind(0)
                L["a"] = buf["a"][i - 1].unbind(0)
                L["w_a_t"] = layer_w[i]["w_a"].t()
                L["w_hs_t"] = layer_w[i]["w_hs"].t()
            for k, src in (("q", q), ("pz", pz), ("pr", pr), ("s_in", s_in), ("rl", rl), ("z", z)):
                L[k] = src[i].unbind(0)
            L["w_cs_t"], L["w_xr_t"] = layer_w[i]["w_cs"].t(), layer_w[i]["w_xr"].t()
        da0_v, a0_v, mem_v = sb["da0"].unbind(0), a0.unbind(0), mem.unbind(0)
        wd_v, oma_v, qm_v, prr_v, r_v = wd.unbind(0), oma.unbind(0), qm.unbind(0), prr.unbind(0), r.unbind(0)
        w_ad0_t, w_s0_t = w_ad0.t(), w_s0.t()
        dzm_v, dr_v = dg0[..., -n:].unbind(0), dg0[..., 3 * d + h : 3 * d + h + d].unbind(0)
        dhw_v, dpre_v = dg0[..., 3 * d : 3 * d + h].unbind(0), dg0[..., d : 3 * d + h + d].unbind(0)
        gm = like.new_empty(b, slots, n)  # scratch
        gm2 = like.new_empty(b, 2, slots, n)  # scratch: gradients of the write and layer 1's read address
        dmb = like.new_empty(b, n)
        dys_v, a_w_v, gm2_v = dys.unbind(0), a0[:, :, 0].unbind(0), (gm2[:, 0], gm2[:, 1])
        ds = ds_out.clone()
        dm = dm_out.clone()
        for t in range(steps - 1, -1, -1):
            ds = ds + dys_v[t]
            m_new = mem_v[t + 1]
            for i in range(depth - 1, -1, -1):
                L = lay[i]
                dv = torch.mul(ds, L["q"][t], out=L["dv"][t])  # s_hat = tanh(v) (* mask), s = lerp(s_hat, s, z)
                torch.mul(ds, L["pz"][t], out=L["dgz"][t])  # z = sigmoid(.)
                d_rs = torch.mm(dv, L["w_cs_t"])  # v = xr W_cx + rs W_cs + b_c
                torch.mul(d_rs, L["pr"][t], out=L["dgr"][t])  # rs = r^l s_prev, r^l = sigmoid(.)
                ds = torch.mul(ds, L["z"][t]).addcmul_(d_rs, L["rl"][t])  # d s_prev so far
                dxr = torch.mm(L["dxr_in"][t], L["w_xr_t"])  # xr feeds v, r^l and z^l
                # xr = sum_S(a * m_t)
                dxr3 = dxr.unsqueeze(1)
                a = a0_v[t][:, 1] if i == 0 else L["a"][t]
                dm.addcmul_(dxr3, a)
                if i == 0:  # its address logits' gradient comes with the write address's, below
                    torch.mul(dxr3, m_new, out=gm2_v[1])
                else:
                    torch.mul(dxr3, m_new, out=gm)
                    da = L["da"][t]
                    _aten._softmax_backward_data.out(gm, a, 1, a.dtype, grad_input=da)  # a = SoG(h_l W_a + b_a)
                    torch.mm(da.view(b, sn), L["w_a_t"], out=L["dhl"][t])
                    ds = torch.addmm(ds, L["dhs"][t], L["w_hs_t"])  # [gates | h_l] = s_prev W_hs + b_hs
            # (4) m_t = m + a_w (mb - m)
            torch.sum(torch.mul(dm, a_w_v[t], out=gm), 1, out=dmb)
            torch.mul(dm, wd_v[t], out=gm2_v[0])
            dm.mul_(oma_v[t])
            dzm = torch.mul(dmb, qm_v[t], out=dzm_v[t])  # (3) m_bar = tanh(...) (* mask)
            du = torch.mm(dzm, w_ms)  # u = r * s_{t-1}
            torch.mul(du, prr_v[t], out=dr_v[t])  # r = sigmoid(.)
            ds.addcmul_(du, r_v[t])
            # (2) a_w and layer 1's read address: SoG over the slots of [b, 2, S, N]
            _aten._softmax_backward_data.out(gm2, a0_v[t], 2, gm2.dtype, grad_input=da0_v[t])
            torch.mm(da0_v[t].view(b, 2 * sn), w_ad0_t, out=dhw_v[t])  # (1) d h_w
            ds = torch.addmm(ds, dpre_v[t], w_s0_t)  # pre = s_{t-1} W_s0 + ...
        grads = _weight_grads(buf, sb, ctx.dims, steps, b)
        dx = GAMRHNRecurrence._input_grads(ctx, dg0[..., 3 * d :], outer)
        if workspace is not None:
            workspace.give((sflat,))
            ctx.mark = workspace.give((ctx.flat,))
        return (*dx, dm, ds, None, None, None, None, *grads)

    @staticmethod
    def _input_grads(ctx: Any, dxp: Tensor, outer_fn: Callable[[Tensor, Tensor], Tensor]) -> tuple[Tensor | None, ...]:
        """The gradients of the first three inputs from ``dxp [T, b, H+D+N]``, a view of the gradient buffer:
        ``(dx, dw_x, db_x)`` when the Function projected, else ``(dxp, None, None)`` with ``dxp`` copied (the
        buffer goes back to the workspace)."""
        if not ctx.projected:
            return dxp.clone(), None, None
        x_rows, w_x = ctx.saved_tensors[-2:]
        rows = dxp.view(-1, dxp.shape[-1])  # [T*b, H+D+N], rows 3D+H+D+N apart
        dx = torch.mm(rows, w_x) if ctx.needs_input_grad[0] else None
        dw = outer_fn(rows, x_rows) if ctx.needs_input_grad[1] else None
        db = rows.sum(0) if ctx.needs_input_grad[2] else None
        return dx, dw, db

    @staticmethod
    def _cpp_backward(ctx: Any, dys: Tensor, dm_out: Tensor, ds_out: Tensor,
                      weights: tuple[Tensor, ...]) -> tuple[Tensor | None, ...]:
        """The reverse loop in ``gam_rhn_cpu.cpp``; the weight gradients as in the python backward."""
        workspace: Workspace | None = ctx.workspace
        h, d, n, slots, depth = ctx.dims
        steps, b = dys.shape[0], dys.shape[1]
        scratch = {"dg0": (steps, b, 3 * d + h + d + n), "da0": (steps, b, 2, slots, n)}
        if depth > 1:
            scratch["dgl"] = (depth - 1, steps, b, 3 * d + h)
            scratch["da"] = (depth - 1, steps, b, slots, n)
        sflat, sb = _take(workspace, scratch, dys)
        empty = dys.new_empty(0)
        mask_g, mask_r = ctx.masks
        dm, ds = torch.ops.seqplat_gam_rhn.backward(
            dys, dm_out, ds_out, _contiguous(mask_g), _contiguous(mask_r), list(weights),
            _cpp_buffers(ctx.buf, empty), [sb["dg0"], sb["da0"], sb.get("dgl", empty), sb.get("da", empty)])
        grads = _weight_grads(ctx.buf, sb, ctx.dims, steps, b, torch.ops.seqplat_gam_rhn.outer)
        dx = GAMRHNRecurrence._input_grads(ctx, sb["dg0"][..., 3 * d :], torch.ops.seqplat_gam_rhn.outer)
        if workspace is not None:
            workspace.give((sflat,))
            ctx.mark = workspace.give((ctx.flat,))
        return (*dx, dm, ds, None, None, None, None, *grads)


def _weight_grads(buf: dict[str, Tensor], sb: dict[str, Tensor], dims: tuple, steps: int, b: int,
                  outer: Callable[[Tensor, Tensor], Tensor] = outer) -> list[Tensor | None]:
    """The weight gradients from the saved buffers and the per-step gradients: one GEMM per matrix over
    all steps (``inputs[T*b, k]^T @ grads[T*b, n]``). The C++ backward passes its kernel's ``outer``
    (``seqplat::outer``: on AVX-512 builds it reads the column blocks of ``dg0`` in place, where
    :func:`seqplat.core.gemm.outer` copies both factors into oneDNN's tensor type)."""
    h, d, n, slots, depth = dims
    sn = slots * n
    s_in = buf["s_in"]
    dg0 = sb["dg0"]
    tb = steps * b
    g0 = dg0.view(tb, -1)
    da0 = sb["da0"].view(tb, 2 * sn)
    grads: list[Tensor | None] = [
        outer(s_in[0].view(tb, d), g0[:, d : 4 * d + h]),  # w_s0
        g0[:, d : 3 * d].sum(0),  # b_g0
        outer(g0[:, -n:], buf["u"].view(tb, d)),  # w_ms
        outer(buf["hw"].view(tb, h) if "hw" in buf else buf["pre"].view(tb, -1)[:, 2 * d : 2 * d + h], da0),  # w_ad0
        da0.sum(0),  # b_ad0
    ]
    for i in range(depth):
        gi = g0 if i == 0 else sb["dgl"][i - 1].view(tb, -1)
        dv = gi[:, :d]
        grads += [outer(buf["xr"][i].view(tb, n), gi[:, : 3 * d]), dv.sum(0), outer(buf["rs"][i].view(tb, d), dv)]
        if i >= 1:
            da = sb["da"][i - 1].view(tb, sn)
            grads += [outer(s_in[i].view(tb, d), gi[:, d:]), gi[:, d : 3 * d].sum(0),
                      outer(buf["hs"][i - 1].view(tb, -1)[:, 2 * d :], da), da.sum(0)]
    return grads
