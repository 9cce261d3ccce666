"""The quantizer functions of HitNet (Wang et al., NeurIPS 2018) and the baselines it compares against.

Every weight quantizer maps a full-precision block of weights to integer *codes* and a few per-block
*scales*; the quantized weight is ``codebook(scales)[code]``. The same two functions rebuild the
weights from an export, so a reloaded model reproduces the quantized one bit for bit.

Weights (per block, a block is a whole matrix or one gate's rows; spec §2)::

    ternary (threshold, TWN form)   Delta = threshold * mean|W|;  T = sign(W) * 1[|W| > Delta]
                                    alpha = mean(|W| over |W| > Delta);   W_q = alpha * T
    trained_ternary (Zhu et al.)    Delta = t * max|W|;  W_q = w_p if W > Delta, -w_n if W < -Delta, else 0
    bernoulli                       m = max|W|;  W_q = m * sign(W) * b,  b ~ Bernoulli(|W| / m)
    uniform (k bits, mid-rise)      m = max|W|;  W_q = m * (2i - (L-1)) / (L-1),  L = 2^k,  i = round(...)
    binary                          alpha = mean|W|;  W_q = alpha * sign(W)

Activations (spec §2): ``bernoulli`` Q_a(x) = sign(x) * b, b ~ Bernoulli(|x|) (unbiased, BTQ);
``ternary`` sign(x) * 1[|x| > threshold]; ``uniform`` k-bit rounding on [0, 1] or [-1, 1]; ``binary``.

Gradients are straight-through (spec §2 "Backward"): the forward returns exactly ``q``; the backward
passes ``scale * grad`` to the latent ``x`` (and ``grad`` to ``q``'s own graph, for trained scales).

Training reads the weights through :func:`direct_weights` where a method has a closed form
(``ternary``, ``binary``): the same values as ``lookup(codebook(...), codes)`` without the int64 codes
and the gather, which cost 7% of a fused LSTM step at H=256. Export keeps the codes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

#: bits per weight of each weight method
WEIGHT_BITS = {"ternary": 2, "trained_ternary": 2, "bernoulli": 2, "binary": 1}
#: ternary codes: 0 -> 0, 1 -> +scale, 2 -> -scale
TERNARY_SIGNS = (0.0, 1.0, -1.0)


class _StraightThrough(torch.autograd.Function):
    """``quantized`` forward; ``grad`` to ``quantized`` and ``grad_scale * grad`` to ``latent`` backward."""

    @staticmethod
    def forward(ctx: Any, quantized: Tensor, latent: Tensor, grad_scale: Tensor | float | None) -> Tensor:
        ctx.scale_is_tensor = isinstance(grad_scale, Tensor)
        ctx.scale = None if ctx.scale_is_tensor else grad_scale
        ctx.save_for_backward(grad_scale if ctx.scale_is_tensor else None)
        return quantized.view_as(quantized)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        (scale,) = ctx.saved_tensors
        scale = scale if ctx.scale_is_tensor else ctx.scale
        to_latent = None
        if ctx.needs_input_grad[1]:
            to_latent = grad if scale is None else grad * scale
        return (grad if ctx.needs_input_grad[0] else None), to_latent, None


def ste(quantized: Tensor, latent: Tensor, grad_scale: Tensor | float | None = None) -> Tensor:
    """Forward exactly ``quantized``; backward ``grad_scale * grad`` to ``latent`` (straight-through).

    ``quantized`` keeps its own graph (trained scales get their gradient through it). One autograd
    node instead of the ``q + (x - x.detach()) * scale`` idiom's three elementwise passes.
    """
    return _StraightThrough.apply(quantized, latent, grad_scale)


def weight_bits(method: str, bits: int) -> int:
    """Bits per stored code of a weight method (``bits`` is used by ``uniform``)."""
    return bits if method == "uniform" else WEIGHT_BITS[method]


def uniform_levels(bits: int, signed: bool, device: torch.device | None = None,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """The ``2**bits`` levels of a mid-rise uniform quantizer on [-1, 1] (signed) or [0, 1]."""
    n = 2**bits - 1
    i = torch.arange(n + 1, device=device, dtype=dtype)
    return (2 * i - n) / n if signed else i / n


def codebook(method: str, scales: Tensor, bits: int) -> Tensor:
    """Value of every code per block, ``[blocks, levels]``, from the per-block ``scales``."""
    if method in ("ternary", "bernoulli"):
        s = scales[:, 0]
        return torch.stack([torch.zeros_like(s), s, -s], dim=1)
    if method == "trained_ternary":
        return torch.stack([torch.zeros_like(scales[:, 0]), scales[:, 0], -scales[:, 1]], dim=1)
    if method == "binary":
        return torch.stack([scales[:, 0], -scales[:, 0]], dim=1)
    if method == "uniform":
        return scales[:, :1] * uniform_levels(bits, True, scales.device, scales.dtype)
    raise ValueError(f"unknown weight method {method!r}")


def lookup(table: Tensor, codes: Tensor) -> Tensor:
    """``table[block, code]`` for codes ``[blocks, n]`` (a gather: differentiable in ``table``)."""
    return torch.gather(table, 1, codes)


@torch.no_grad()
def weight_codes(method: str, w: Tensor, *, bits: int = 2, threshold: float = 0.7, trained_threshold: float = 0.05,
                 use_scale: bool = True, stochastic: bool = False) -> tuple[Tensor, Tensor]:
    """Codes ``[blocks, n]`` (int64) and scales ``[blocks, k]`` of weights ``w`` given as ``[blocks, n]``.

    For ``trained_ternary`` the returned scales are the TWN initial values of ``w_p, w_n``; the
    quantizer keeps learnable ones. ``stochastic`` draws the Bernoulli weights (training mode).
    """
    a = w.abs()
    if method == "ternary":
        delta = threshold * a.mean(dim=1, keepdim=True)  # Delta = 0.7 * mean|W|
        keep = a > delta
        codes = torch.where(keep, torch.where(w > 0, 1, 2), 0)
        alpha = (a * keep).sum(1) / keep.sum(1).clamp_min(1)  # mean |W| above the threshold
        scale = alpha if use_scale else torch.ones_like(alpha)
        return codes, scale.unsqueeze(1)
    if method == "trained_ternary":
        delta = trained_threshold * a.amax(dim=1, keepdim=True)
        codes = torch.where(a > delta, torch.where(w > 0, 1, 2), 0)
        pos, neg = codes == 1, codes == 2
        wp = (a * pos).sum(1) / pos.sum(1).clamp_min(1)
        wn = (a * neg).sum(1) / neg.sum(1).clamp_min(1)
        return codes, torch.stack([wp, wn], dim=1)
    if method == "bernoulli":
        m = a.amax(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
        p = a / m
        hit = torch.rand_like(p) < p if stochastic else p > 0.5
        codes = torch.where(hit, torch.where(w > 0, 1, 2), 0)
        return codes, m if use_scale else torch.ones_like(m)
    if method == "uniform":
        m = a.amax(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny) if use_scale else torch.ones_like(a[:, :1])
        n = 2**bits - 1
        codes = torch.round((torch.clamp(w / m, -1.0, 1.0) + 1.0) * (n / 2)).long().clamp_(0, n)
        return codes, m
    if method == "binary":
        codes = (w < 0).long()
        alpha = a.mean(dim=1, keepdim=True) if use_scale else torch.ones_like(a[:, :1])
        return codes, alpha
    raise ValueError(f"unknown weight method {method!r}")


@torch.no_grad()
def direct_weights(method: str, w: Tensor, *, threshold: float = 0.7, use_scale: bool = True) -> Tensor | None:
    """``W_q`` of weights ``w`` given as ``[blocks, n]``, computed without codes; ``None`` for other methods.

    Equal, value for value, to ``lookup(codebook(method, scales, bits), codes)`` of :func:`weight_codes`
    for the deterministic closed-form methods: ``ternary`` (alpha * sign(W) * 1[|W| > Delta]) and
    ``binary`` (alpha * sign(W), with 0 -> +alpha).
    """
    a = w.abs()
    if method == "ternary":
        delta = a.mean(dim=1, keepdim=True).mul_(threshold)  # Delta = 0.7 * mean|W|
        keep = (a > delta).to(w.dtype)
        if not use_scale:
            return w.sign().mul_(keep)
        alpha = (a * keep).sum(1, keepdim=True).div_(keep.sum(1, keepdim=True).clamp_min_(1))
        return w.sign().mul_(keep).mul_(alpha)
    if method == "binary":
        alpha = a.mean(dim=1, keepdim=True) if use_scale else torch.ones_like(a[:, :1])
        return torch.where(w < 0, -alpha, alpha)
    return None


def twn_statistics(sigma: float = 1.0, threshold: float = 0.7) -> dict[str, float]:
    """Closed-form TWN figures for W ~ N(0, sigma^2): Delta, zero fraction and alpha (spec §6 item 2)."""
    delta = threshold * sigma * math.sqrt(2 / math.pi)
    z = delta / sigma
    zero = math.erf(z / math.sqrt(2))
    tail = 1 - zero
    alpha = sigma * math.sqrt(2 / math.pi) * math.exp(-z * z / 2) / tail
    return {"delta": delta, "zero_fraction": zero, "alpha": alpha}


# -- activations ---------------------------------------------------------------------------------

def bernoulli_ternary(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """BTQ ``sign(x) * Bernoulli(|x|)`` (no gradient); inputs are clamped to [-1, 1] defensively."""
    with torch.no_grad():
        p = x.abs().clamp(max=1.0)
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return torch.where(u < p, torch.sign(x), torch.zeros_like(x))


def round_ternary(x: Tensor, threshold: float = 0.5) -> Tensor:
    """``sign(x) * 1[|x| > threshold]`` (no gradient): the deterministic ternary activation."""
    with torch.no_grad():
        return torch.where(x.abs() > threshold, torch.sign(x), torch.zeros_like(x))


def uniform_activation(x: Tensor, bits: int, signed: bool) -> Tensor:
    """Round ``x`` to the nearest of ``2**bits`` uniform levels on [-1, 1] or [0, 1] (no gradient)."""
    with torch.no_grad():
        n = 2**bits - 1
        if signed:
            i = torch.round((x.clamp(-1.0, 1.0) + 1.0) * (n / 2))
            return (2 * i - n) / n
        return torch.round(x.clamp(0.0, 1.0) * n) / n


def binary_activation(x: Tensor, signed: bool) -> Tensor:
    """``sign`` with 0 -> +1 on [-1, 1]; ``1[x > 0.5]`` on [0, 1] (no gradient)."""
    with torch.no_grad():
        if signed:
            return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
        return (x > 0.5).to(x.dtype)


# -- packing -------------------------------------------------------------------------------------

def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack non-negative integer codes (< 2**bits) into a flat uint8 tensor, little-endian bit order."""
    flat = codes.reshape(-1).to(torch.int64).cpu()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits")
    shifts = torch.arange(bits, dtype=torch.int64)
    bitstream = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)
    pad = (-bitstream.numel()) % 8
    bitstream = torch.cat([bitstream, bitstream.new_zeros(pad)]).view(-1, 8)
    return (bitstream << torch.arange(8, dtype=torch.int64)).sum(1).to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of :func:`pack_codes`: ``count`` int64 codes."""
    b = packed.to(torch.int64).cpu()
    bitstream = ((b.unsqueeze(1) >> torch.arange(8, dtype=torch.int64)) & 1).reshape(-1)[: count * bits]
    return (bitstream.view(count, bits) << torch.arange(bits, dtype=torch.int64)).sum(1)


def packed_bytes(numel: int, bits: int) -> int:
    """Bytes that :func:`pack_codes` needs for ``numel`` codes."""
    return (numel * bits + 7) // 8
