"""Pieces shared by the ``rhn`` and ``hyper_rhn`` cells: the coupled highway micro-layer, dropout
masks and the two initialisation schemes (Zilly's TF code, Suarez's PyTorch code).

Shapes use the core legend: ``b`` batch, ``t`` time, ``d`` input features, ``n`` micro-layer width.
Pre-activations ``u`` of one micro-layer are ``[b, 2n]`` with the H (candidate) half first and the
T (transform gate) half second, as in both reference implementations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

Init = Literal["uniform", "orthogonal"]


def none_from_text(value: object) -> object:
    """Let TOML recipes (which have no null) write ``"none"`` for an optional number."""
    return None if isinstance(value, str) and value.strip().lower() in ("none", "null") else value


def highway(u: Tensor, s: Tensor, gate_mask: Tensor | None = None,
            quantize: Callable[[str, Tensor], Tensor] | None = None) -> Tensor:
    """One coupled highway micro-layer (spec §1 eqs. R1-R4; spec §3 ``highway``).

    ``h = tanh(u_H)``, ``t = sigmoid(u_T)``, ``c = 1 - t`` (coupled carry gate), then the gate
    dropout of Suarez's code acts on ``t`` only, *after* ``c`` was computed, and
    ``s' = h * t' + s * c``. Without gate dropout ``t' = t`` and this is Zilly's update.
    """
    n = s.shape[-1]
    h = torch.tanh(u[:, :n])  # eq. R1 (candidate)
    t = torch.sigmoid(u[:, n:])  # eq. R2 (transform gate)
    if quantize is not None:
        h = quantize("candidate", h)
        t = quantize("gate", t)
    c = 1.0 - t  # eq. R3: coupled carry gate
    if gate_mask is not None:
        t = t * gate_mask  # Suarez: dropout on t after c = 1 - t (t' + c != 1 in training)
    out = h * t + s * c  # eq. R4
    return out if quantize is None else quantize("hidden", out)


def highway_fast(u: Tensor, s: Tensor, gate_mask: Tensor | None) -> Tensor:
    """:func:`highway` for the fast paths: ``s + t * (h - s)`` (Zilly's form, one op fewer) when there
    is no gate dropout; the same values up to rounding."""
    if gate_mask is not None:
        return highway(u, s, gate_mask)
    n = s.shape[-1]
    return torch.addcmul(s, torch.sigmoid(u[:, n:]), torch.tanh(u[:, :n]) - s)  # eqs. R1-R4


def dropout_mask(shape: tuple[int, ...], p: float, like: Tensor) -> Tensor | None:
    """An inverted-dropout mask (entries 0 or ``1/(1-p)``), or None when ``p == 0``."""
    if p <= 0.0:
        return None
    keep = 1.0 - p
    return torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(keep).div_(keep)


def step_dropout_masks(steps: int, depth: int, batch: int, width: int, p: float, like: Tensor) -> Tensor | None:
    """Ordinary dropout masks ``[t, L, b, n]`` for every step and micro-layer of a sequence, or None
    when ``p == 0``. Drawn one ``[b, n]`` slice at a time, so they use the random stream exactly as
    ``t * L`` calls of :func:`dropout_mask` in step-then-layer order do (the reference paths)."""
    if p <= 0.0:
        return None
    keep = 1.0 - p
    masks = torch.empty((steps, depth, batch, width), dtype=like.dtype, device=like.device)
    for mask in masks.view(-1, batch, width).unbind(0):
        mask.bernoulli_(keep)
    return masks.div_(keep)


@torch.no_grad()
def init_weight_(w: Tensor, scheme: Init, scale: float) -> None:
    """A weight matrix (or a stack ``[L, out, in]`` of them): ``U(-scale, scale)`` (Zilly's TF
    code) or orthogonal per matrix (Suarez's ``utils.initWeights``)."""
    if scheme == "uniform":
        w.uniform_(-scale, scale)
        return
    mats = w.unsqueeze(0) if w.dim() == 2 else w
    for m in mats:
        nn.init.orthogonal_(m)


@torch.no_grad()
def init_bias_(b: Tensor, scheme: Init, scale: float, fan_in: int) -> None:
    """A bias: ``U(-scale, scale)`` (Zilly) or PyTorch's ``nn.Linear`` default ``U(+-1/sqrt(fan_in))``
    (Suarez's code keeps the PyTorch default for every bias)."""
    bound = scale if scheme == "uniform" else 1.0 / math.sqrt(fan_in)
    b.uniform_(-bound, bound)


@torch.no_grad()
def set_transform_bias_(bias_hh: Tensor, bias_ih: Tensor | None, value: float | None) -> None:
    """Set every micro-layer's transform-gate bias ``b_T^l`` to ``value`` (spec §1, "Init").

    ``bias_hh`` is ``[L, 2n]`` (T half second). When the input projection has its own bias (the
    Suarez layout), its T half is zeroed so that layer 1's total transform bias is exactly ``value``.
    """
    if value is None:
        return
    n = bias_hh.shape[-1] // 2
    bias_hh[:, n:].fill_(value)
    if bias_ih is not None:
        bias_ih[n:].zero_()
