"""The UnICORNN recurrence: a naive autograd loop and a memory-saving custom autograd function.

One layer maps pre-activations ``x[b,t,h]`` (already ``V u_t + b``) to ``y_1..y_T`` with the
symplectic Euler step of the spec (shared/papers/unicornn.md, section 2), ``delta = dt*sigmoid(c)``::

    a_t = w * y_{t-1} + x_t
    z_t = z_{t-1} - delta * (tanh(a_t) + alpha * y_{t-1})      # z first, with the old y
    y_t = y_{t-1} + delta * z_t                                # then y, with the new z

and its exact inverse (time reversal)::

    y_{t-1} = y_t - delta * z_t
    z_{t-1} = z_t + delta * (tanh(w * y_{t-1} + x_t) + alpha * y_{t-1})

* :func:`reference_scan` is the plain loop through autograd: it stores every step's state and is
  the oracle the fast paths are tested against.
* :class:`ReverseRecomputeScan` (spec section 4) keeps only the inputs and the final state
  ``(y_T, z_T)`` in its forward pass. Its backward pass walks the steps in reverse, rebuilds each
  earlier state with the inverse step, and accumulates the adjoints of ``x``, ``w``, ``delta`` and
  the initial state. Two backends run the same algorithm: ``cpp`` (``unicornn_cpu.cpp``, compiled
  at first use with ``torch.utils.cpp_extension``) and ``python`` (a PyTorch loop, any device).

``delta`` is an input of the function (the caller computes ``dt*sigmoid(c)``), so autograd chains
``grad_delta`` into ``grad_c``; ``dt`` and ``alpha`` are constants and get no gradient.

The fast path also takes the layer's dropout mask ``m[b,h]`` (shared by all steps): it returns
``m * y`` and reads ``m * grad`` as the gradient of ``y``, which saves the two passes over
``[B, T, H]`` that ``y * m`` and its backward would cost. ``y_T`` is returned without the mask.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from seqplat.core.cpp_ext import CppKernel
from seqplat.core.gemm import onednn_linear, projection_uses_onednn

log = logging.getLogger(__name__)

CPP_SOURCE = Path(__file__).with_name("unicornn_cpu.cpp")
Backend = Literal["auto", "cpp", "python"]


# -- one step and its inverse (spec section 2) ---------------------------------------------------

def unicornn_step(x_t: Tensor, y: Tensor, z: Tensor, w: Tensor, delta: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """One symplectic Euler step ``(y_{t-1}, z_{t-1}) -> (y_t, z_t)``: z first with the old y, then y."""
    a = torch.addcmul(x_t, w, y)  # a_t = w*y_{t-1} + x_t
    z = z - delta * (torch.tanh(a) + alpha * y)
    y = y + delta * z
    return y, z


def unicornn_inverse_step(x_t: Tensor, y: Tensor, z: Tensor, w: Tensor, delta: Tensor,
                          alpha: float) -> tuple[Tensor, Tensor]:
    """The exact inverse of :func:`unicornn_step`: ``(y_t, z_t) -> (y_{t-1}, z_{t-1})`` using only ``x_t``."""
    y_prev = y - delta * z
    z_prev = z + delta * (torch.tanh(torch.addcmul(x_t, w, y_prev)) + alpha * y_prev)
    return y_prev, z_prev


def reference_scan(x: Tensor, w: Tensor, delta: Tensor, y0: Tensor, z0: Tensor,
                   alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """The naive loop through autograd: ``x[b,t,h] -> (y[b,t,h], y_T[b,h], z_T[b,h])``.

    Iterates over ``x.unbind(1)`` so the backward pass stays linear in ``t`` (PERF_NOTES.md).
    """
    y, z = y0, z0
    ys = []
    for x_t in x.unbind(1):
        y, z = unicornn_step(x_t, y, z, w, delta, alpha)
        ys.append(y)
    out = torch.stack(ys, dim=1) if ys else x.new_zeros(x.shape)
    return out, y, z


# -- the reverse-recompute algorithm in PyTorch (spec section 4) ---------------------------------

def python_forward(x: Tensor, w: Tensor, delta: Tensor, y0: Tensor, z0: Tensor, alpha: float,
                   mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Forward pass without a graph: the outputs (times ``mask[b,h]`` if given) and the final state only."""
    y, z = y0, z0
    out = torch.empty_like(x)
    for t, x_t in enumerate(x.unbind(1)):
        y, z = unicornn_step(x_t, y, z, w, delta, alpha)  # the same ops as the reference: same rounding
        out[:, t] = y
    if mask is not None:
        out.mul_(mask.unsqueeze(1))
    return out, y.clone(), z.clone()


def python_backward(x: Tensor, w: Tensor, delta: Tensor, yT: Tensor, zT: Tensor, g_out: Tensor, g_yT: Tensor,
                    g_zT: Tensor, alpha: float,
                    mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Reverse pass: rebuild ``(y_{t-1}, z_{t-1})`` from ``(y_t, z_t)`` and accumulate the adjoints.

    Returns ``(grad_x, grad_w, grad_delta, grad_y0, grad_z0)``. ``ybar``/``zbar`` are the adjoints of
    the state after step ``t`` (everything downstream of it included). ``g_out`` is the gradient of
    the (masked) output.
    """
    if mask is not None:
        g_out = g_out * mask.unsqueeze(1)
    T = x.shape[1]
    y, z = yT, zT
    ybar = g_yT + g_out[:, T - 1] if T > 0 else g_yT.clone()
    zbar = g_zT
    gw = torch.zeros_like(y)
    gd = torch.zeros_like(y)
    xs = x.unbind(1)
    gs = g_out.unbind(1)
    grad_x = torch.empty_like(x)
    for t in range(T - 1, -1, -1):
        gd = gd + ybar * z                                  # y_t = y_{t-1} + delta*z_t
        zb = torch.addcmul(zbar, delta, ybar)
        y_prev = torch.addcmul(y, delta, z, value=-1.0)     # inverse step
        th = torch.tanh(torch.addcmul(xs[t], w, y_prev))
        z_prev = torch.addcmul(z, delta, th + alpha * y_prev)
        ga = -zb * delta * (1.0 - th * th)                  # adjoint of a_t
        grad_x[:, t] = ga
        gw = torch.addcmul(gw, ga, y_prev)
        gd = gd - zb * (th + alpha * y_prev)
        ybar = ybar + ga * w - (alpha * delta) * zb
        if t > 0:
            ybar = ybar + gs[t - 1]
        zbar = zb
        y, z = y_prev, z_prev
    return grad_x, gw.sum(0), gd.sum(0), ybar, zbar


# -- the C++ backend ----------------------------------------------------------------------------

KERNEL = CppKernel(CPP_SOURCE, "seqplat_unicornn_cpu", "unicornn",
                   fallback="using the PyTorch backend",
                   fix="cell.backend='cpp' needs it: install a C++ compiler and ninja, or set "
                   "cell.backend=auto or python")
load_cpp_extension = KERNEL.load  # compile at first use (cached); True when usable, strict=True raises
cpp_error = KERNEL.error  # why the kernel is unavailable, or None


resolve_backend = KERNEL.resolve  # "cpp" or "python" for a cell's backend option and an input


class ReverseRecomputeScan(torch.autograd.Function):
    """Custom autograd for one UnICORNN layer; saves ``x, w, delta, y_T, z_T`` (and the mask), no per-step state."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, delta: Tensor, y0: Tensor, z0: Tensor, alpha: float,
                backend: str, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        if backend == "cpp":
            out, yT, zT = torch.ops.seqplat_unicornn.forward(x, w, delta, y0, z0, float(alpha), mask)
        else:
            out, yT, zT = python_forward(x, w, delta, y0, z0, alpha, mask)
        ctx.save_for_backward(x, w, delta, yT, zT, mask)
        ctx.alpha = float(alpha)
        ctx.backend = backend
        return out, yT, zT

    @staticmethod
    def backward(ctx: Any, g_out: Tensor, g_yT: Tensor, g_zT: Tensor) -> tuple[Tensor | None, ...]:
        x, w, delta, yT, zT, mask = ctx.saved_tensors
        if ctx.backend == "cpp":
            gx, gw, gd, gy0, gz0, _, _ = torch.ops.seqplat_unicornn.backward(
                x, w, delta, yT, zT, g_out, g_yT, g_zT, ctx.alpha, mask
            )
        else:
            gx, gw, gd, gy0, gz0 = python_backward(x, w, delta, yT, zT, g_out, g_yT, g_zT, ctx.alpha, mask)
        needs = ctx.needs_input_grad
        return (gx if needs[0] else None, gw if needs[1] else None, gd if needs[2] else None,
                gy0 if needs[3] else None, gz0 if needs[4] else None, None, None, None)


class ProjectedScan(torch.autograd.Function):
    """One UnICORNN layer with its input projection (U1) inside, on the C++ loop: ``u [b*t, d] -> x = u V^T + b
    -> (y * mask, y_T, z_T)``.

    Used where :func:`~seqplat.core.gemm.projection` takes oneDNN (float32 on an AVX-512 CPU). The C++ backward
    returns ``grad V`` and ``grad b`` itself: on builds with the packed products it sums them batch row by batch
    row while the row's ``grad x`` is in cache, else through oneDNN's backward-weights primitive reading ``grad x``
    in place; either way without the copy of ``grad x``, the product and the bias sum that autograd's projection
    backward runs. ``grad u`` is one oneDNN product.
    """

    @staticmethod
    def forward(ctx: Any, u: Tensor, v: Tensor, b: Tensor, w: Tensor, delta: Tensor, y0: Tensor, z0: Tensor,
                alpha: float, mask: Tensor | None, batch: int) -> tuple[Tensor, Tensor, Tensor]:
        x = onednn_linear(u, v.contiguous(), b.contiguous()).view(batch, u.shape[0] // batch, -1)
        out, yT, zT = torch.ops.seqplat_unicornn.forward(x, w, delta, y0, z0, float(alpha), mask)
        ctx.save_for_backward(u, v, x, w, delta, yT, zT, mask)
        ctx.alpha = float(alpha)
        return out, yT, zT

    @staticmethod
    def backward(ctx: Any, g_out: Tensor, g_yT: Tensor, g_zT: Tensor) -> tuple[Tensor | None, ...]:
        u, v, x, w, delta, yT, zT, mask = ctx.saved_tensors
        needs = ctx.needs_input_grad
        gx, gw, gd, gy0, gz0, gv, gb = torch.ops.seqplat_unicornn.backward(
            x, w, delta, yT, zT, g_out, g_yT, g_zT, ctx.alpha, mask, u
        )
        gu = onednn_linear(gx.view(u.shape[0], -1), v.t().contiguous()) if needs[0] else None
        return (gu, gv if needs[1] else None, gb if needs[2] else None, gw if needs[3] else None,
                gd if needs[4] else None, gy0 if needs[5] else None, gz0 if needs[6] else None, None, None, None)


def projected_scan_applies(u: Tensor, v: Tensor, b: Tensor | None, backend: Backend) -> bool:
    """Whether :func:`projected_scan` runs: a bias, float32 on the oneDNN route, and the C++ loop chosen."""
    return b is not None and projection_uses_onednn(u, v) and resolve_backend(backend, u) == "cpp"


def projected_scan(u: Tensor, v: Tensor, b: Tensor, w: Tensor, delta: Tensor, y0: Tensor, z0: Tensor,
                   alpha: float, batch: int, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """:class:`ProjectedScan`: ``u`` is the layer input ``[b*t, d]`` (batch first), ``v``, ``b`` the projection
    (U1); the rest as :func:`fused_scan` (``projected_scan_applies`` must hold)."""
    return ProjectedScan.apply(u.contiguous(), v, b, w, delta, y0.contiguous(), z0.contiguous(), float(alpha),
                               _mask_rows(mask, batch, u.dtype), batch)


def fused_scan(x: Tensor, w: Tensor, delta: Tensor, y0: Tensor, z0: Tensor, alpha: float,
               backend: Backend = "auto", mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One UnICORNN layer with the reverse-recompute backward: ``(y[b,t,h] * mask[b,h], y_T, z_T)``.

    ``mask`` (no gradient) is a dropout mask shared by all steps, ``[b, h]`` or ``[b, 1, h]``.
    float16/bfloat16 inputs run the recurrence in float32 (the reconstruction is unusable in half
    precision, spec section 4) and the outputs are cast back.
    """
    low = x.dtype in (torch.float16, torch.bfloat16)
    if low:
        dtype = x.dtype
        out, yT, zT = fused_scan(x.float(), w.float(), delta.float(), y0.float(), z0.float(), alpha, backend, mask)
        return out.to(dtype), yT.to(dtype), zT.to(dtype)
    chosen = resolve_backend(backend, x)
    return ReverseRecomputeScan.apply(x, w, delta, y0, z0, float(alpha), chosen, _mask_rows(mask, x.shape[0], x.dtype))


def _mask_rows(mask: Tensor | None, batch: int, dtype: torch.dtype) -> Tensor | None:
    """A dropout mask shared by all steps (``[b, h]`` or ``[b, 1, h]``) as the kernels take it: ``[b, h]``,
    contiguous, in ``dtype``, without a gradient."""
    return None if mask is None else mask.detach().reshape(batch, -1).to(dtype).contiguous()
