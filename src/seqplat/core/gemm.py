"""The large products of the hand-written backwards and the hoisted input projections, on the faster of
MKL and oneDNN.

The hand-written backwards compute each weight gradient as one product over all time steps:
``a [T*b, m]^T @ b [T*b, n]``. torch runs float32 ``mm`` through MKL, which uses AVX2 but not AVX-512
on AMD CPUs: on a 2-core AVX-512 AMD EPYC (Zen 5) it ran ``[4096, 3200] x [3200, 1024]`` at about 230
GFLOP/s. oneDNN's inner-product backward-weights primitive (``torch.mkldnn_linear_backward_weights``)
takes both factors in their row layout, as the weight gradient of a linear layer: it took 0.5-0.6x of
``mm``'s time at H=256 sizes (``[1024, 3200] x [3200, 256]``: 4.6 against 8.6 ms, copies into oneDNN's
tensors included) and 0.53x at ``[4096, 3200] x [3200, 1024]`` (66 against 125 ms); below about 2^14
result elements the two were level. The C++ loops make the same choice in
``core/include/seqplat_gemm.h`` (``seqplat::outer``).

On builds with AVX-512, float32 outer products skip both libraries: ``gemm_ops.cpp`` (a small kernel built at
first use, like the plugins') runs ``seqplat::outer``'s packed register blocks, which read both factors in
their row layout. oneDNN needed both converted into its tensor type first; the packed route took
0.55-0.85x of that time at the projections' shapes (``[12800, 512]^T [12800, 128]``: 3.7 against 5.7 ms).
Without a compiler, or where the kernel is not built with AVX-512, the routes above run.

``SEQPLAT_STEP_GEMM=mm`` or ``onednn`` forces one route, as for the per-step products (``packed``: the
packed one where it is built).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch import Tensor

from seqplat.core.cpp_ext import CppKernel

#: oneDNN from this many elements of the result on (128 x 128); smaller ones were as fast on MKL
ONEDNN_MIN_OUTER = 1 << 14
#: on the MKL route, ``(b^T a)^T`` instead of ``a^T b`` when both widths reach this (1.2-1.9x on one thread)
MKL_SWAP_MIN = 512


@functools.cache
def cpu_has_avx512() -> bool:
    """Whether torch's CPU kernels run AVX-512 here (``ATEN_CPU_CAPABILITY`` can lower it)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _route() -> str:
    return os.environ.get("SEQPLAT_STEP_GEMM", "auto")


#: ``seqplat::outer`` for the Python side (the packed route); compiled at first use
KERNEL = CppKernel(Path(__file__).with_name("gemm_ops.cpp"), "seqplat_core_gemm", "core products",
                   fallback="weight gradients go through oneDNN or MKL",
                   fix="install a C++ compiler and ninja (the products then run on oneDNN or MKL)")


@functools.cache
def _packed_kernel_built() -> bool:
    """Whether the kernel loads and its outer products take the packed route (built with AVX-512 and on it)."""
    return KERNEL.load() and bool(torch.ops.seqplat_core_gemm.packed_outer())


def outer_uses_packed(a: Tensor, b: Tensor) -> bool:
    """Whether :func:`outer` takes the packed route (float32 CPU factors with unit column stride, no autograd)."""
    if _route() not in ("auto", "packed") or not cpu_has_avx512():
        return False
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 2 or t.stride(1) != 1 for t in (a, b)):
        return False
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return False  # the op has no autograd formula
    return a.shape[0] > 0 and _packed_kernel_built()


def _onednn_can_run(*tensors: Tensor) -> bool:
    """oneDNN is there, the route is not forced to ``mm``, and every tensor is float32 on the CPU."""
    if _route() == "mm" or not torch.backends.mkldnn.is_available():
        return False
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


def outer_uses_onednn(a: Tensor, b: Tensor) -> bool:
    """Whether :func:`outer` takes oneDNN for these factors."""
    if not _onednn_can_run(a, b):
        return False
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return False  # the oneDNN op has no autograd formula
    if _route() == "onednn":
        return True
    return cpu_has_avx512() and a.shape[1] * b.shape[1] >= ONEDNN_MIN_OUTER


def outer(a: Tensor, b: Tensor) -> Tensor:
    """``a^T @ b`` for ``a [rows, m]`` and ``b [rows, n]``: ``[m, n]``, summed over the rows."""
    if outer_uses_packed(a, b):
        return torch.ops.seqplat_core_gemm.outer(a, b)
    if outer_uses_onednn(a, b):
        # the weight gradient of linear(b) -> a: grad_output a [rows, m], input b [rows, n] -> [m, n]
        shape = a.new_empty(a.shape[1], b.shape[1]).to_mkldnn()
        dw = torch.mkldnn_linear_backward_weights(a.contiguous().to_mkldnn(), b.contiguous().to_mkldnn(), shape,
                                                  False)[0]
        return dw.to_dense()
    if a.shape[1] >= MKL_SWAP_MIN and b.shape[1] >= MKL_SWAP_MIN:
        return (b.t() @ a).t()
    return a.t() @ b


def onednn_linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """``x @ w^T + b`` through oneDNN's inner product (no autograd)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


class _OnednnProjection(torch.autograd.Function):
    """``x @ w^T + b`` with oneDNN in both directions: the forward and ``dx = g w`` as inner products, ``dw`` as
    :func:`outer`, ``db`` a sum over the rows."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return onednn_linear(x.contiguous(), w.contiguous(), None if b is None else b.contiguous())

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, w = ctx.saved_tensors
        g = g.contiguous()
        dx = onednn_linear(g, w.t().contiguous(), None) if ctx.needs_input_grad[0] else None
        dw = outer(g, x) if ctx.needs_input_grad[1] else None
        db = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def projection_uses_onednn(x: Tensor, w: Tensor) -> bool:
    """Whether :func:`projection` takes oneDNN (float32 CPU; on an AVX-512 CPU or when forced)."""
    return _onednn_can_run(x, w) and (_route() == "onednn" or cpu_has_avx512())


def projection(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """``x [rows, k] @ w [n, k]^T + b [n]``, differentiable: the hoisted input projection of a recurrent layer
    (all its steps' rows at once). On the oneDNN route both directions run oneDNN (MKL runs AVX2 on AMD CPUs);
    otherwise it is ``torch.addmm``."""
    if projection_uses_onednn(x, w):
        return _OnednnProjection.apply(x, w, b)
    return torch.mm(x, w.t()) if b is None else torch.addmm(b, x, w.t())


def time_major_rows(x: Tensor) -> Tensor:
    """A batch-first ``x [b, t, k]`` as the rows of all steps, time major: ``[t*b, k]`` (a copy)."""
    batch, steps, k = x.shape
    return x.transpose(0, 1).reshape(steps * batch, k)


def project_steps(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """:func:`projection` of every step of a batch-first ``x [b, t, k]``, time major: ``[t, b, n]``."""
    return projection(time_major_rows(x), w, b).view(x.shape[1], x.shape[0], -1)
