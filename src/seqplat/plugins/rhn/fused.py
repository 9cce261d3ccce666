"""RHN recurrence with a hand-written backward (the training fast path of ``rhn`` and ``hyper_rhn``).

Autograd on the step loop records some six nodes per micro-layer and step and does one small
weight-gradient GEMM per micro-layer and step. :class:`RHNRecurrence` runs the same loop forward
without autograd, keeping the per-step values the backward needs in preallocated ``[L, T, b, ...]``
buffers (memory linear in ``T``), and its backward walks the steps in reverse computing only what
flows along the recurrence: the state gradient and the pre-activation gradients ``du^l_t``. The weight
gradients are then one GEMM per micro-layer over all steps at once (``du[T*b, 2n]^T @ s_in[T*b, n]``),
the strategy of oneDNN's and cuDNN's RNN kernels.

The per-step buffers are big (``[L, T, b, 2n]``), and a fresh large allocation costs a page fault per
4 KiB on first touch, which on some machines (VMs, sandboxes) is a large part of a training step. A
:class:`~seqplat.core.workspace.Workspace` (cuDNN's "reserve space") lets a cell hand the same
buffers to every call: the forward takes them, the backward gives them back once it has read them.

The math is eqs. R1-R4 of :mod:`seqplat.plugins.rhn.cell` in the form of ``RHNCell.fast_forward``
(``s' = s + t' * (h - s)``, Zilly's form). With gate dropout (mask ``g``, Suarez's code) the carry
gate ``c = 1 - t`` is taken before the mask, so ``s' = h * (t * g) + s * (1 - t) = s + t * (h g - s)``,
which is the same line with ``h - s`` replaced by ``h * g - s``. Every line of
:meth:`RHNRecurrence.backward` is the derivative of the forward line named beside it. ``hyper_rhn`` uses
the same Function twice: for its hyper RHN (keeping every micro-layer's output, eq. H1) and for its
main RHN, whose recurrent products and input term are scaled by ``z`` (eq. H3). Tests compare both cells with their
reference paths on outputs and on every gradient, and ``gradcheck`` the Function in float64.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from seqplat.core.cpp_ext import CppKernel
from seqplat.core.gemm import outer
from seqplat.core.workspace import Workspace

CPP_SOURCE = Path(__file__).with_name("rhn_cpu.cpp")
Backend = Literal["auto", "cpp", "python"]
KERNEL = CppKernel(CPP_SOURCE, "seqplat_rhn_cpu", "rhn")  # default messages (LOOP_FALLBACK, LOOP_FIX)
load_cpp_extension = KERNEL.load  # compile at first use (cached); True when usable, strict=True raises
cpp_error = KERNEL.error  # why the kernel is unavailable, or None


resolve_backend = KERNEL.resolve  # "cpp" or "python" for a cell's backend option and an input


def _contiguous(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


class HyperScales(NamedTuple):
    """What ``hyper_rhn``'s scales are made of (eq. H2, ``z^l_t = P_l ŝ^l_t + p_l``): the hyper RHN's micro-layer
    outputs ``states [L, T, b, m]``, ``weight [L, n, m]`` (``P_l``) and ``bias [L, n]`` (``p_l``)."""

    states: Tensor
    weight: Tensor
    bias: Tensor


def _loop_buffers(xp: Tensor, weight_hh: Tensor, keep: bool, workspace: Workspace | None,
                  scaled: bool) -> tuple[Tensor, ...]:
    """The per-step buffers of both loops: ``s_in [L, K, b, n]``, ``a [L, K, b, 2n]``, ``e [L, K, b, n]`` and,
    ``scaled``, ``rs [L, K, b, 2n]`` and ``z [L, K, b, n]``; ``K = T`` to keep every step (from ``workspace``
    when given), else 1 (inference: one step's scratch, reused)."""
    steps, b = xp.shape[0], xp.shape[1]
    depth, n = weight_hh.shape[0], weight_hh.shape[2]
    k_steps = steps if keep else 1
    shapes = ((depth, k_steps, b, n), (depth, k_steps, b, 2 * n), (depth, k_steps, b, n))
    if scaled:
        shapes += ((depth, k_steps, b, 2 * n), (depth, k_steps, b, n))
    if keep and workspace is not None:
        return workspace.take(shapes, xp)
    return tuple(xp.new_empty(shape) for shape in shapes)


def rhn_loop_cpp(xp: Tensor, s0: Tensor, weight_hh: Tensor, bias_hh: Tensor, mask_h: Tensor | None,
                 mask_g: Tensor | None, keep: bool, workspace: Workspace | None = None,
                 hyper: HyperScales | None = None) -> tuple[Tensor, Tensor, tuple[Tensor, ...] | None]:
    """:func:`rhn_loop` in ``rhn_cpu.cpp``: one GEMM and one fused pass per micro-layer and step (with
    ``hyper``, first the micro-layer's scales, one product ``[b, m] x [m, n]``).

    The kept buffers are ``s_in [L, T, b, n]`` (as in :func:`rhn_loop`), ``a [L, T, b, 2n]`` holding
    ``[h | t]`` (not ``sigmoid(2 u_H)``: the C++ loop calls tanh), ``e [L, T, b, n]`` and with
    ``hyper`` ``rs [L, T, b, 2n]`` (``v`` of :func:`rhn_loop`) and ``z [L, T, b, n]``; only
    :class:`RHNRecurrence`'s C++ backward reads them.
    """
    steps, b, n = xp.shape[0], xp.shape[1], weight_hh.shape[2]
    if hyper is not None and not keep:
        raise ValueError("rhn: the scaled C++ loop keeps every step")
    bufs = _loop_buffers(xp, weight_hh, keep, workspace, hyper is not None)
    ys = xp.new_empty(steps, b, n)
    h = (None,) * 3 if hyper is None else tuple(v.contiguous() for v in hyper)
    s = torch.ops.seqplat_rhn.forward(xp.contiguous(), s0.contiguous(), weight_hh.contiguous(), bias_hh.contiguous(),
                                      _contiguous(mask_h), _contiguous(mask_g), *h, *bufs[:3], ys,
                                      *(bufs[3:] if hyper is not None else (None, None)))
    return ys, s, (bufs if keep else None)


def hyper_scales(hyper: HyperScales, out: Tensor | None = None) -> Tensor:
    """Eq. H2 for every micro-layer and step: ``z [L, T, b, n]`` (into ``out`` when given)."""
    depth, steps, b, m = hyper.states.shape
    n = hyper.weight.shape[1]
    z = hyper.states.new_empty(depth, steps, b, n) if out is None else out
    torch.baddbmm(hyper.bias.unsqueeze(1), hyper.states.reshape(depth, steps * b, m), hyper.weight.transpose(1, 2),
                  out=z.view(depth, steps * b, n))
    return z

_sigmoid_backward = torch.ops.aten.sigmoid_backward.grad_input  # grad * y * (1 - y), into grad_input

def rhn_loop(xp: Tensor, s0: Tensor, weight_hh: Tensor, bias_hh: Tensor, mask_h: Tensor | None,
             mask_g: Tensor | None, keep: bool, workspace: Workspace | None = None,
             hyper: HyperScales | None = None) -> tuple[Tensor, Tensor, tuple[Tensor, ...] | None]:
    """The forward loop of eqs. R1-R4 on plain tensors (no autograd).

    ``xp [T, b, 2n]`` is the hoisted input projection ``W x_t (+ b_in)`` of micro-layer 1 *without*
    ``b^1``; ``weight_hh [L, 2n, n]``, ``bias_hh [L, 2n]``; ``mask_h [b, n]`` the (scaled) variational
    mask on the state entering every micro-layer's matmul; ``mask_g [T, L, b, n]`` the (scaled) gate
    dropout masks. With ``hyper`` the scales ``z [L, T, b, n]`` (``hyper_rhn``'s ``z^l_t``, eq. H2) scale
    both halves of ``v = s_in R^T``, in micro-layer 1 of ``v = s_in R^T + xp``: ``u = [z; z] * v + b``
    (eq. H3; so ``xp`` is ``W x_t`` alone there, and ``hyper_rhn`` folds ``b_in`` into ``b^1``).

    Returns ``ys [T, b, n]`` (``s^L_t``), ``s^L_T`` and, with ``keep``, the per-step buffers for
    :meth:`RHNRecurrence.backward` (taken from ``workspace`` when given): ``s_in [L, T, b, n]``, the
    (masked) state entering micro-layer ``l``'s matmul; ``a [L, T, b, 2n]``, ``[sigmoid(2 u_H) | t]``;
    ``e [L, T, b, n]``, ``h (* g) - s``; with ``hyper`` also ``rs [L, T, b, 2n]``, ``v``, and ``z``.

    R1 uses ``tanh(v) = 2 sigmoid(2 v) - 1``: with the H rows of the weights (or of the scales) and
    biases doubled once per call, one sigmoid over the whole ``[b, 2n]`` pre-activation gives R1 and
    R2 (torch's CPU ``tanh`` costs about three sigmoids of the same size).
    """
    steps, b = xp.shape[0], xp.shape[1]
    depth, n = weight_hh.shape[0], weight_hh.shape[2]
    scale = xp.new_ones(2 * n)
    scale[:n] = 2.0
    bias2 = bias_hh * scale  # (2 b_H ; b_T)
    def scratch(shape: tuple[int, ...]) -> Tensor:  # freed after the loop
        return workspace.take((shape,), xp)[0] if workspace is not None else xp.new_empty(shape)

    bufs = _loop_buffers(xp, weight_hh, keep, workspace, hyper is not None)
    # eq. H2: the scales of every micro-layer and step, kept for the backward
    scales = None if hyper is None else hyper_scales(hyper, bufs[4] if keep else None)
    if scales is None:
        xpb2 = torch.addcmul(bias2[0], xp, scale, out=scratch((steps, b, 2 * n)))  # layer 1: W x_t + b^1, H doubled
        u_in = [xpb2.unbind(0)]
        r_v = (weight_hh * scale[:, None]).transpose(1, 2).unbind(0)  # [n, 2n] each: (2 R_H ; R_T)^T
        z2 = None
    else:  # the doubling goes on the scales: [2 z; z] * v; xp enters v
        u_in = [[bias2[0]] * steps]
        r_v = weight_hh.transpose(1, 2).unbind(0)
        z2 = scratch((depth, steps, b, 2 * n))
        torch.mul(scales, 2.0, out=z2[..., :n])
        z2[..., n:].copy_(scales)
    u_in += [[bias2[layer]] * steps for layer in range(1, depth)]
    z2_v = None if z2 is None else [v.unbind(0) for v in z2.unbind(0)]
    ys = xp.new_empty(steps, b, n)
    s_in_buf, a_buf, e_buf = bufs[:3]
    # per-step views made once (indexing inside the loop would cost a Python call each)
    s_in_v = [v.unbind(0) for v in s_in_buf.unbind(0)]
    a_v = [v.unbind(0) for v in a_buf.unbind(0)]
    ah_v = [v.unbind(0) for v in a_buf[..., :n].unbind(0)]  # sigmoid(2 u_H)
    t_v = [v.unbind(0) for v in a_buf[..., n:].unbind(0)]  # t
    e_v = [v.unbind(0) for v in e_buf.unbind(0)]
    rs_v = None if scales is None else [v.unbind(0) for v in bufs[3].unbind(0)]
    xp_v = xp.unbind(0)
    ys_v = ys.unbind(0)
    u = xp.new_empty(b, 2 * n)  # scratch for the pre-activations: stays in cache, unlike a slice of a_buf
    s = s0
    for step in range(steps):
        k = step if keep else 0
        for layer in range(depth):
            if mask_h is None:
                s_in = s
            else:
                s_in = torch.mul(s, mask_h, out=s_in_v[layer][k])  # s^{l-1} * noise_h
            if z2_v is None:
                torch.addmm(u_in[layer][step], s_in, r_v[layer], out=u)  # R1/R2 pre-activations (2 u_H ; u_T)
            else:
                rs = torch.mm(s_in, r_v[layer], out=rs_v[layer][k])  # H3: R_l s^{l-1}
                if layer == 0:
                    rs.add_(xp_v[step])  # v = R_1 s + W x_t
                torch.addcmul(u_in[layer][step], rs, z2_v[layer][step], out=u)  # H3: [z; z] * v + b
            torch.sigmoid(u, out=a_v[layer][k])  # [sigmoid(2 u_H) | t]: R2 for the T half (R3: c = 1 - t)
            e = torch.mul(ah_v[layer][k], 2.0, out=e_v[layer][k]).sub_(1.0)  # R1: h = 2 sigmoid(2 u_H) - 1
            if mask_g is not None:
                e.mul_(mask_g[step, layer])  # Suarez: t' = t g, so h t' = (h g) t
            e.sub_(s)  # e = h (* g) - s
            if layer == depth - 1:
                s = torch.addcmul(s, t_v[layer][k], e, out=ys_v[step])  # R4: s' = h t' + s (1 - t) = s + t e
            elif mask_h is None and keep:
                s = torch.addcmul(s, t_v[layer][k], e, out=s_in_v[layer + 1][k])  # R4, kept as the next s_in
            else:
                s = torch.addcmul(s, t_v[layer][k], e)  # R4
    if workspace is not None:
        workspace.give((xpb2,) if scales is None else (z2,))
    if not keep:
        return ys, s, None
    if mask_h is None:  # the state entering micro-layer 1 is s_{t-1}: s0, then the outputs
        s_in_buf[0, 0].copy_(s0)
        s_in_buf[0, 1:].copy_(ys[:-1])
    return ys, s, bufs


def _sum_halves_of_product(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """``out[..., n] = a[..., :n] * b[..., :n] + a[..., n:] * b[..., n:]`` for ``a, b [..., 2n]`` (two passes; a
    product tensor reduced over a size-2 dim took 3x as long)."""
    n = out.shape[-1]
    torch.mul(a[..., :n], b[..., :n], out=out)
    return out.addcmul_(a[..., n:], b[..., n:])


class RHNRecurrence(torch.autograd.Function):
    """``(ys [T, b, n], s_T [b, n])`` from the hoisted input projection ``xp [T, b, 2n]`` and ``s0 [b, n]``.

    Arguments as in :func:`rhn_loop`, with ``hyper_states``, ``proj_weight`` and ``proj_bias`` the fields of its
    :class:`HyperScales` (all three or none). Gradients are returned for ``xp``, ``s0``, ``weight_hh``,
    ``bias_hh`` and those three; the masks are constants. The weight gradient of the input projection
    is then one GEMM in autograd's backward of the ``F.linear`` that made ``xp``. With ``all_layers``
    (no hidden mask) the first output is every micro-layer's output ``[L, T, b, n]`` (``hyper_rhn``
    projects each, eq. H2). With a ``workspace`` the saved buffers go back to it after the backward; a
    second backward through the same graph (``retain_graph``) still works unless another forward has
    taken them in between, which raises.
    """

    @staticmethod
    def forward(ctx: Any, xp: Tensor, s0: Tensor, weight_hh: Tensor, bias_hh: Tensor, mask_h: Tensor | None,
                mask_g: Tensor | None, workspace: Workspace | None = None, hyper_states: Tensor | None = None,
                proj_weight: Tensor | None = None, proj_bias: Tensor | None = None, all_layers: bool = False,
                backend: str = "python") -> tuple[Tensor, Tensor]:
        if all_layers and mask_h is not None:
            raise ValueError("all_layers needs mask_h=None (the kept states are the layer outputs)")
        given = [v is not None for v in (hyper_states, proj_weight, proj_bias)]
        if any(given) and not all(given):
            raise ValueError("hyper_states, proj_weight and proj_bias go together")
        hyper = HyperScales(hyper_states, proj_weight, proj_bias) if all(given) else None
        ctx.cpp = backend == "cpp"
        if ctx.cpp:
            ys, s, saved = rhn_loop_cpp(xp, s0, weight_hh, bias_hh, mask_h, mask_g, True, workspace, hyper)
        else:
            ys, s, saved = rhn_loop(xp, s0, weight_hh, bias_hh, mask_h, mask_g, True, workspace, hyper)
        ctx.buffers = saved  # not save_for_backward: the buffers are ours, nobody else writes them
        ctx.masks = (mask_h, mask_g)
        ctx.workspace, ctx.ticket, ctx.all_layers, ctx.hyper = workspace, None, all_layers, hyper is not None
        ctx.save_for_backward(weight_hh, *(hyper if hyper is not None else ()))
        if all_layers:  # outputs of micro-layers 1..L-1 are the inputs of 2..L; copies, the buffers stay ours
            return torch.cat([saved[0][1:], ys.unsqueeze(0)]), s.clone()
        return ys, s.clone()  # s is ys[-1]: return a copy so the two outputs do not alias

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dys: Tensor | None, ds_out: Tensor | None) -> tuple[Tensor | None, ...]:
        workspace: Workspace | None = ctx.workspace
        if ctx.ticket is not None and not workspace.reclaim(ctx.buffers, ctx.ticket):
            raise RuntimeError(
                "rhn: a second backward through a graph whose saved buffers a later forward reused; set "
                "cell.explicit_backward = False for this (retain_graph) use"
            )
        weight_hh, *hyper_saved = ctx.saved_tensors
        hyper = HyperScales(*hyper_saved) if ctx.hyper else None
        s_in_buf, a_buf, e_buf = ctx.buffers[:3]
        mask_h, mask_g = ctx.masks
        depth, steps, b, n = e_buf.shape
        if ctx.cpp:
            return RHNRecurrence._cpp_backward(ctx, dys, ds_out, weight_hh, hyper)
        scales = None if hyper is None else ctx.buffers[4]  # z of every micro-layer and step (eq. H2)

        def scratch(shape: tuple[int, ...]) -> Tensor:
            return workspace.take((shape,), e_buf)[0] if workspace is not None else e_buf.new_empty(shape)

        # du[l][t] = dL/du^l_t, [H | T] halves as in u (unscaled), filled step by step in reverse.
        # du[0] is dL/dxp, handed to autograd, so it is never a workspace buffer.
        du = [e_buf.new_empty(steps, b, 2 * n)]
        if depth > 1:
            du_rest = scratch((depth - 1, steps, b, 2 * n))
            du += list(du_rest.unbind(0))
        da = e_buf.new_empty(b, 2 * n)  # scratch: [dL/dh * 4 | dL/dt], the gradient sigmoid_backward takes
        da_h, da_t = da[:, :n], da[:, n:]
        # per-step views made once, as in the forward
        a_v = [v.unbind(0) for v in a_buf.unbind(0)]
        t_v = [v.unbind(0) for v in a_buf[..., n:].unbind(0)]
        e_v = [v.unbind(0) for v in e_buf.unbind(0)]
        du_v = [v.unbind(0) for v in du]
        r_v = weight_hh.unbind(0)
        g_v = None if mask_g is None else [v.unbind(0) for v in mask_g.unbind(1)]  # [L][T] of [b, n]
        if scales is not None:  # drs[l][t] = dL/d(R_l s_in) = du * [z; z]
            drs = scratch((depth, steps, b, 2 * n))
            drs_v = [v.unbind(0) for v in drs.view(depth, steps, b, 2, n).unbind(0)]
            z_v = [v.unbind(0) for v in scales.unsqueeze(3).unbind(0)]  # [b, 1, n]: broadcast over H, T
        # d_out[l][t]: the gradient arriving at micro-layer l's output from the outputs of this Function
        d_out = None if dys is None else dys if ctx.all_layers else [None] * (depth - 1) + [dys]
        ds = e_buf.new_zeros(b, n) if ds_out is None else ds_out.clone()
        for step in range(steps - 1, -1, -1):
            for layer in range(depth - 1, -1, -1):
                if d_out is not None and d_out[layer] is not None:
                    ds = ds + d_out[layer][step]  # this micro-layer's output is an output (y_t = s^L_t)
                t = t_v[layer][step]
                # R4: s' = s + t e
                torch.mul(ds, e_v[layer][step], out=da_t)  # dL/dt
                dte = ds * t  # dL/de
                ds_c = ds - dte  # dL/ds through R4 itself: e = h (* g) - s, so ds'/ds = 1 - t
                # e = h (* g) - s, then R1 as h = 2 sigmoid(2 u_H) - 1: dh/du_H = 4 sigmoid'(2 u_H)
                if g_v is None:
                    torch.mul(dte, 4.0, out=da_h)
                else:
                    torch.mul(dte, g_v[layer][step], out=da_h).mul_(4.0)
                du_t = du_v[layer][step]
                _sigmoid_backward(da, a_v[layer][step], grad_input=du_t)  # R1 (as above) and R2: t = sigmoid(u_T)
                if scales is not None:  # H3: u = [z; z] * rs + b
                    du_t = torch.mul(du_t.view(b, 2, n), z_v[layer][step], out=drs_v[layer][step]).view(b, 2 * n)
                # rs = s_in R^T: dL/ds_in = du R; s_in = s * noise_h
                if mask_h is None:
                    ds = torch.addmm(ds_c, du_t, r_v[layer])
                else:
                    ds = torch.addcmul(ds_c, du_t @ r_v[layer], mask_h)
        # weight gradients: one GEMM per micro-layer over all steps (rs = s_in R^T  =>  dR = drs^T s_in)
        d_weight = weight_hh.new_empty(weight_hh.shape)
        d_bias = weight_hh.new_empty(depth, 2 * n)
        d_scales = None if scales is None else scales.new_empty(scales.shape)
        for layer in range(depth):
            flat_du = du[layer].view(steps * b, 2 * n)
            flat_drs = flat_du if scales is None else drs[layer].view(steps * b, 2 * n)
            d_weight[layer].copy_(outer(flat_drs, s_in_buf[layer].view(steps * b, n)))
            torch.sum(flat_du, 0, out=d_bias[layer])  # b^l enters every step's u^l (b^1 through xp + b^1)
            if d_scales is not None:  # H3: dL/dz = sum over the H and T halves of du * v
                _sum_halves_of_product(du[layer], ctx.buffers[3][layer], d_scales[layer])
        # u^1_t = xp_t + b^1 + ... (dL/dxp = du^1), with scales u^1_t = [z; z] * (R s + xp_t) + b^1 (dL/dxp = drs^1)
        dxp = du[0] if scales is None else drs[0].clone()
        d_hyper = None if hyper is None else _hyper_grads(hyper, d_scales, (steps, b))
        if workspace is not None:
            if depth > 1:
                workspace.give((du_rest,))
            if scales is not None:
                workspace.give((drs,))
            ctx.ticket = workspace.give(ctx.buffers)
        return dxp, ds, d_weight, d_bias, None, None, None, *(d_hyper or (None,) * 3), None, None

    @staticmethod
    def _cpp_backward(ctx: Any, dys: Tensor | None, ds_out: Tensor | None, weight_hh: Tensor,
                      hyper: HyperScales | None) -> tuple[Tensor | None, ...]:
        """The reverse loop in ``rhn_cpu.cpp``. Without scales (rhn) the op computes the weight gradients too;
        with them (hyper_rhn) it gives the bias gradients, dL/dz and dL/ds_hyper, and the weight gradients are
        computed here."""
        workspace: Workspace | None = ctx.workspace
        s_in_buf, a_buf, e_buf = ctx.buffers[:3]
        mask_h, mask_g = ctx.masks
        depth, steps, b, n = e_buf.shape
        if dys is None:
            dys = e_buf.new_zeros((depth, steps, b, n) if ctx.all_layers else (steps, b, n))
        ds_T = e_buf.new_zeros(b, n) if ds_out is None else ds_out
        if hyper is None:
            # the loop and the weight gradients in one op: du goes where oneDNN reads it without a copy
            ds, dxp, d_weight, d_bias = torch.ops.seqplat_rhn.backward_grads(
                weight_hh.contiguous(), _contiguous(mask_h), _contiguous(mask_g), a_buf, e_buf, dys, ds_T, s_in_buf)
            if workspace is not None:
                ctx.ticket = workspace.give(ctx.buffers)
            return dxp, ds, d_weight, d_bias, None, None, None, None, None, None, None, None
        # drs = du * [z; z] of micro-layers 2..L and dz from the workspace; micro-layer 1's drs is dL/dxp (u^1 =
        # [z; z] * (R s + xp) + b^1) and d_states dL/ds_hyper, handed to autograd, so fresh tensors. The op sums du
        # and dz into the bias gradients without storing du
        shapes = ((depth - 1, steps, b, 2 * n), (depth, steps, b, n))
        scratch = workspace.take(shapes, e_buf) if workspace is not None else tuple(map(e_buf.new_empty, shapes))
        drs_rest, dz = scratch
        dxp = e_buf.new_empty(steps, b, 2 * n)
        drs = [dxp, *drs_rest.unbind(0)]
        d_states = hyper.states.new_empty(hyper.states.shape)
        ds, d_bias, d_proj_bias = torch.ops.seqplat_rhn.backward(
            weight_hh.contiguous(), _contiguous(mask_h), _contiguous(mask_g), ctx.buffers[4],
            hyper.weight.contiguous(), a_buf, e_buf, ctx.buffers[3], dys, ds_T, drs, dz, d_states)
        # weight gradients: one GEMM per micro-layer over all steps (rs = s_in R^T  =>  dR = drs^T s_in; H2:
        # z = P s_hyper + p  =>  dP = dz^T s_hyper), seqplat::outer: on AVX-512 builds without copying the factors
        flat_s = s_in_buf.view(depth, steps * b, n)
        d_weight = torch.stack([torch.ops.seqplat_rhn.outer(drs[i].view(steps * b, 2 * n), flat_s[i])
                                for i in range(depth)])
        flat_dz, flat_h = dz.view(depth, steps * b, n), hyper.states.reshape(depth, steps * b, -1)
        d_proj = torch.stack([torch.ops.seqplat_rhn.outer(flat_dz[i], flat_h[i]) for i in range(depth)])
        if workspace is not None:
            workspace.give(scratch)
            ctx.ticket = workspace.give(ctx.buffers)
        return dxp, ds, d_weight, d_bias, None, None, None, d_states, d_proj, d_proj_bias, None, None


def _hyper_grads(hyper: HyperScales, d_scales: Tensor, rows: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. H2 backwards (``z = P s_hyper + p``) from ``dL/dz [L, T, b, n]``: the gradients of ``states``,
    ``weight`` and ``bias`` of :class:`HyperScales`."""
    depth, n = d_scales.shape[0], d_scales.shape[-1]
    flat_dz = d_scales.view(depth, rows[0] * rows[1], n)
    flat_h = hyper.states.reshape(depth, rows[0] * rows[1], -1)
    d_states = torch.bmm(flat_dz, hyper.weight).view(hyper.states.shape)
    return d_states, torch.bmm(flat_dz.transpose(1, 2), flat_h), flat_dz.sum(1)
