"""GAM-RHN recurrence with a hand-written backward (the training fast path).

Autograd on the step loop records some 70 small nodes per time step at depth 5 and does one small
weight-gradient GEMM per node and step. :class:`GAMRHNRecurrence` runs the same loop forward without
autograd, keeping the per-step values the backward needs, and its backward walks the steps in reverse
computing only the gradients that flow along the recurrence (state, memory and the per-step
pre-activations). The weight gradients are then one GEMM per matrix over all steps at once
(``inputs[T*b, k]^T @ grads[T*b, n]``), the strategy of oneDNN's and cuDNN's RNN kernels.

The math is steps (1)-(6) of :mod:`seqplat.plugins.gam_rhn.cell` in the merged form of
``GAMRHNCell.fast_forward``; every line of :meth:`GAMRHNRecurrence.backward` is the derivative of
the forward line named beside it. Tests compare it with the reference path on outputs and on every
gradient, and ``gradcheck`` it in float64.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _softmax_backward(a: Tensor, da: Tensor) -> Tensor:
    """Gradient of the logits of ``a = softmax(logits, 1)`` given ``da``."""
    return a * (da - (da * a).sum(1, keepdim=True))


class GAMRHNRecurrence(torch.autograd.Function):
    """``(ys [T, b, D], m_T [b, S, N], s_T [b, D])`` from the hoisted input projections ``xp [T, b, H+3D+N]``.

    The memory is held slot-major, ``[b, S, N]``, and the address matrices' columns are ordered to match
    (slot k of group g at column ``k*N + g``): the grouped softmax then runs over dim 1 with the groups
    contiguous, which torch computes some 10x faster than a softmax over a last dim of size S.

    ``weights`` (all transposed to ``[in, out]``): ``w_s0 [D, H+3D]``, ``w_ms [D, N]``, ``w_aw [H, SN]``,
    ``b_aw [SN]``, then for each layer ``i``: ``w_a [H, SN]``, ``b_a [SN]``, ``w_gx [N, 2D]``,
    ``w_cx [N, D]``, ``w_cs [D, D]``, ``b_c [D]``, and for ``i >= 1`` also ``w_hs [D, H+2D]``,
    ``b_hs [H+2D]``. ``mask_g [T, b, N]`` and ``mask_r [T, L, b, D]`` are the (already scaled) dropout
    masks, or None.
    """

    @staticmethod
    def forward(ctx: Any, xp: Tensor, m0: Tensor, s0: Tensor, mask_g: Tensor | None, mask_r: Tensor | None,
                dims: tuple[int, int, int, int, int], *weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h, d, n, slots, depth = dims
        w_s0, w_ms, w_aw, b_aw = weights[:4]
        layer_w = _layer_weights(weights, depth)
        b = xp.shape[1]
        m, s = m0, s0
        saved: list[dict[str, Any]] = []
        ys = []
        for t, xp_t in enumerate(xp.unbind(0)):
            rec: dict[str, Any] = {"s": s, "m": m}
            pre = torch.addmm(xp_t[:, : h + 3 * d], s, w_s0)
            h_w = pre[:, :h]  # (1)
            a_w = torch.softmax(torch.addmm(b_aw, h_w, w_aw).view(b, slots, n), dim=1)  # (2)
            r = torch.sigmoid(pre[:, h : h + d])  # (3)
            u = r * s
            m_bar = torch.tanh(torch.addmm(xp_t[:, h + 3 * d :], u, w_ms))
            mb = m_bar * mask_g[t] if mask_g is not None else m_bar
            m = torch.lerp(m, mb.unsqueeze(1), a_w)  # (4)
            rec.update(h_w=h_w, a_w=a_w, r=r, u=u, m_bar=m_bar, mb=mb, m_new=m)
            gate_s = pre[:, h + d :]
            layers = []
            for i, lw in enumerate(layer_w):  # (5)
                if i == 0:
                    h_l = h_w
                else:
                    hs = torch.addmm(lw["b_hs"], s, lw["w_hs"])
                    h_l, gate_s = hs[:, :h], hs[:, h:]
                a = torch.softmax(torch.addmm(lw["b_a"], h_l, lw["w_a"]).view(b, slots, n), dim=1)
                xr = (a * m).sum(1)
                g = torch.sigmoid(torch.addmm(gate_s, xr, lw["w_gx"]))
                r_l, z_l = g[:, :d], g[:, d:]
                rs = r_l * s
                c = torch.tanh(torch.addmm(torch.addmm(lw["b_c"], xr, lw["w_cx"]), rs, lw["w_cs"]))
                s_hat = c * mask_r[t, i] if mask_r is not None else c
                layers.append({"s_prev": s, "h_l": h_l, "a": a, "xr": xr, "g": g, "rs": rs, "c": c,
                               "s_hat": s_hat})
                s = torch.lerp(s_hat, s, z_l)
            rec["layers"] = layers
            saved.append(rec)
            ys.append(s)  # (6)
        ctx.saved = saved
        ctx.dims = dims
        ctx.masks = (mask_g, mask_r)
        ctx.save_for_backward(*weights)
        # m is kept in `saved` (the last step's m_new): return a copy so no output is held by ctx
        return torch.stack(ys), m.clone(), s

    @staticmethod
    def backward(ctx: Any, dys: Tensor, dm_out: Tensor, ds_out: Tensor) -> tuple[Tensor | None, ...]:
        h, d, n, slots, depth = ctx.dims
        weights = ctx.saved_tensors
        w_s0, w_ms, w_aw, _ = weights[:4]
        layer_w = _layer_weights(weights, depth)
        mask_g, mask_r = ctx.masks
        saved = ctx.saved
        steps = len(saved)
        b = dys.shape[1]
        ds = ds_out.clone()
        dm = dm_out.clone()
        # per-step gradients of the pre-activations, stacked for the weight GEMMs after the loop
        dxp = torch.empty(steps, b, h + 3 * d + n, dtype=dys.dtype, device=dys.device)
        d_aw = torch.empty(steps, b, n * slots, dtype=dys.dtype, device=dys.device)
        d_layers: list[dict[str, list[Tensor]]] = [{"a": [], "g": [], "c": [], "hs": []} for _ in range(depth)]
        for t in range(steps - 1, -1, -1):
            rec = saved[t]
            ds = ds + dys[t]
            dh_w = None
            dgate_s0 = None
            for i in range(depth - 1, -1, -1):
                lw, L = layer_w[i], rec["layers"][i]
                s_prev, g, c, s_hat = L["s_prev"], L["g"], L["c"], L["s_hat"]
                r_l, z_l = g[:, :d], g[:, d:]
                # s = s_hat + z (s_prev - s_hat)
                d_shat = ds * (1.0 - z_l)
                dz = ds * (s_prev - s_hat)
                ds_prev = ds * z_l
                dc = d_shat * mask_r[t, i] if mask_r is not None else d_shat
                dc = dc * (1.0 - c * c)  # c = tanh(...)
                dxr = dc @ lw["w_cx"].t()
                d_rs = dc @ lw["w_cs"].t()
                ds_prev = ds_prev + d_rs * r_l  # rs = r_l * s_prev
                dg = torch.cat([d_rs * s_prev, dz], dim=-1) * g * (1.0 - g)  # g = sigmoid(...)
                dxr = dxr + dg @ lw["w_gx"].t()
                # xr = sum_S(a * m_new)
                dxr3 = dxr.unsqueeze(1)
                dm = dm + dxr3 * L["a"]
                dla = _softmax_backward(L["a"], dxr3 * rec["m_new"]).reshape(b, n * slots)
                dh_l = dla @ lw["w_a"].t()
                d_layers[i]["a"].append(dla)
                d_layers[i]["g"].append(dg)
                d_layers[i]["c"].append(dc)
                if i == 0:
                    dh_w, dgate_s0 = dh_l, dg
                else:
                    dhs = torch.cat([dh_l, dg], dim=-1)
                    d_layers[i]["hs"].append(dhs)
                    ds_prev = ds_prev + dhs @ lw["w_hs"].t()
                ds = ds_prev
            # (4) m_new = m + a_w (mb - m)
            a_w, mb, m_old = rec["a_w"], rec["mb"], rec["m"]
            dmb = (dm * a_w).sum(1)
            da_w = dm * (mb.unsqueeze(1) - m_old)
            dm = dm * (1.0 - a_w)
            dmb = dmb * mask_g[t] if mask_g is not None else dmb
            dzm = dmb * (1.0 - rec["m_bar"] ** 2)  # m_bar = tanh(...)
            du = dzm @ w_ms.t()
            r = rec["r"]
            s_old = rec["s"]
            dr = du * s_old
            ds = ds + du * r
            dlw = _softmax_backward(a_w, da_w).reshape(b, n * slots)  # (2)
            d_aw[t] = dlw
            dh_w = dh_w + dlw @ w_aw.t()
            dpre = dxp[t]
            dpre[:, :h] = dh_w
            dpre[:, h : h + d] = dr * r * (1.0 - r)
            dpre[:, h + d : h + 3 * d] = dgate_s0
            dpre[:, h + 3 * d :] = dzm
            ds = ds + dpre[:, : h + 3 * d] @ w_s0.t()

        # weight gradients: one GEMM per matrix over all steps
        def cat(key: str, i: int | None = None) -> Tensor:
            src = [rec[key] for rec in saved] if i is None else [rec["layers"][i][key] for rec in saved]
            return torch.cat([v.reshape(b, -1) for v in src])

        def stacked(vals: list[Tensor]) -> Tensor:
            return torch.cat(vals[::-1])  # collected from the last step back

        flat = dxp.reshape(steps * b, -1)
        grads: list[Tensor | None] = [
            cat("s").t() @ flat[:, : h + 3 * d],  # w_s0
            cat("u").t() @ flat[:, h + 3 * d :],  # w_ms
            cat("h_w").t() @ d_aw.reshape(steps * b, -1),  # w_aw
            d_aw.sum((0, 1)),  # b_aw
        ]
        for i in range(depth):
            da, dg, dc = (stacked(d_layers[i][k]) for k in ("a", "g", "c"))
            xr = cat("xr", i)
            grads += [cat("h_l", i).t() @ da, da.sum(0), xr.t() @ dg, xr.t() @ dc, cat("rs", i).t() @ dc, dc.sum(0)]
            if i >= 1:
                dhs = stacked(d_layers[i]["hs"])
                grads += [cat("s_prev", i).t() @ dhs, dhs.sum(0)]
        return (dxp, dm, ds, None, None, None, *grads)


def _layer_weights(weights: tuple[Tensor, ...], depth: int) -> list[dict[str, Tensor]]:
    """Split the flat weight tuple of :class:`GAMRHNRecurrence` into one mapping per layer."""
    out, k = [], 4
    for i in range(depth):
        lw = dict(zip(("w_a", "b_a", "w_gx", "w_cx", "w_cs", "b_c"), weights[k : k + 6], strict=True))
        k += 6
        if i >= 1:
            lw["w_hs"], lw["b_hs"] = weights[k], weights[k + 1]
            k += 2
        out.append(lw)
    return out
