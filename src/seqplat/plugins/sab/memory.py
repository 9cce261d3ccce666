"""The macro-state memory of SAB: a ring of ``S`` slots, read sparsely, written every ``k_att`` steps.

Two implementations with the same values and gradients:

* :class:`DenseMemory` (reference path) -- the memory is one tensor ``[b, S, h]``; a write is an
  out-of-place ``index_copy`` and a read indexes the selected slots. Plain autograd, but every write
  copies the whole ring and the backward of every read builds a dense ``[b, S, h]`` gradient, so the
  cost per step grows with ``S`` even though only ``k_top`` slots are read.
* :class:`ChainMemory` (fast path) -- the values live in one buffer outside autograd, written in place.
  Reads and writes are custom autograd functions linked by a chain of empty "token" tensors, one per
  write. A read's backward scatter-adds the gradient of its ``k_top`` slots into a gradient buffer
  indexed by *occupant* (which write put the value there, not which slot holds it); a write's backward
  hands its occupant's accumulated gradient to ``h_t``. The token chain makes autograd run every
  read's backward before the backward of the writes it read from, so the hand-over is complete.
  Per step this touches ``O(k_top * h)`` values instead of ``O(S * h)``.

Occupant ids: the ``S`` slots of the carried memory are occupants ``0..S-1``; the ``j``-th write of
this call is occupant ``S + j``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["ChainMemory", "DenseMemory"]


class DenseMemory:
    """The ring as one autograd tensor ``[b, S, h]`` (reference path)."""

    def __init__(self, memory: Tensor):
        self.memory = memory
        self.rows = torch.arange(memory.shape[0], device=memory.device).unsqueeze(1)  # [b, 1]

    def read(self, w: Tensor, idx: Tensor) -> Tensor:
        """``s[b, h] = sum_j w[b, j] * memory[b, idx[b, j]]``."""
        chosen = self.memory[self.rows, idx]  # [b, k, h]; advanced indexing saves no copy of the ring
        return torch.bmm(w.unsqueeze(1), chosen).squeeze(1)

    def write(self, pos: int, h: Tensor) -> None:
        """Slot ``pos`` now holds ``h[b, h]``."""
        index = torch.full((1,), pos, dtype=torch.long, device=h.device)
        self.memory = self.memory.index_copy(1, index, h.unsqueeze(1))

    def final(self) -> Tensor:
        """The ring to carry to the next chunk."""
        return self.memory


class _Chain:
    """Shared state of one forward call of :class:`ChainMemory` (values, owners, gradient buffer)."""

    def __init__(self, memory: Tensor):
        b, size, h = memory.shape
        self.values = memory.detach().clone()  # [b, S, h], written in place, outside autograd
        self.owner = torch.arange(size, device=memory.device)  # occupant id of every slot
        self.rows = torch.arange(b, device=memory.device).unsqueeze(1)
        self.occupants = size
        self.grad: Tensor | None = None  # [b, occupants, h], allocated by the first backward

    def add_grad(self, owners: Tensor, g: Tensor) -> None:
        """Accumulate ``g[b, k, h]`` into the occupants ``owners[b, k]``."""
        b, _, h = self.values.shape
        if self.grad is None:
            self.grad = g.new_zeros(b, self.occupants, h)
        flat = (self.rows * self.occupants + owners).reshape(-1)  # row-major index into [b * occupants]
        self.grad.view(-1, h).index_add_(0, flat, g.reshape(-1, h))

    def take_grad(self, first: int, count: int, like: Tensor) -> Tensor:
        """The accumulated gradient of occupants ``first .. first+count-1`` (zeroed after)."""
        if self.grad is None:
            return like.new_zeros(like.shape[0], count, like.shape[-1])
        g = self.grad[:, first : first + count].clone()
        self.grad[:, first : first + count] = 0
        return g


class _Start(torch.autograd.Function):
    """Token 0 from the carried memory; backward hands the initial occupants their gradient."""

    @staticmethod
    def forward(ctx: Any, chain: _Chain, memory: Tensor) -> Tensor:
        ctx.chain = chain
        ctx.size = memory.shape[1]
        return memory.new_zeros(())

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, _token: Tensor) -> tuple[None, Tensor]:
        chain: _Chain = ctx.chain
        return None, chain.take_grad(0, ctx.size, chain.values)


class _Write(torch.autograd.Function):
    """Slot ``pos`` <- ``h``; returns the next token. Backward: the occupant's gradient goes to ``h``."""

    @staticmethod
    def forward(ctx: Any, chain: _Chain, pos: int, token: Tensor, h: Tensor) -> Tensor:
        occupant = chain.occupants
        chain.values[:, pos] = h.detach()
        chain.owner[pos] = occupant
        chain.occupants += 1
        ctx.chain, ctx.occupant = chain, occupant
        return token.new_zeros(())

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, _token: Tensor) -> tuple[None, None, Tensor, Tensor]:
        chain: _Chain = ctx.chain
        g_h = chain.take_grad(ctx.occupant, 1, chain.values).squeeze(1)
        return None, None, _token.new_zeros(()), g_h


class _Read(torch.autograd.Function):
    """``s = sum_j w_j m_{idx_j}`` of the current values; backward scatters into the occupants."""

    @staticmethod
    def forward(ctx: Any, chain: _Chain, idx: Tensor, token: Tensor, w: Tensor) -> Tensor:
        chosen = chain.values[chain.rows, idx]  # [b, k, h], a copy (the buffer changes later)
        ctx.chain = chain
        ctx.save_for_backward(chain.owner[idx], chosen, w)
        return torch.bmm(w.unsqueeze(1), chosen).squeeze(1)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_s: Tensor) -> tuple[None, None, Tensor, Tensor | None]:
        owners, chosen, w = ctx.saved_tensors
        ctx.chain.add_grad(owners, w.unsqueeze(-1) * g_s.unsqueeze(1))
        g_w = torch.bmm(chosen, g_s.unsqueeze(-1)).squeeze(-1) if ctx.needs_input_grad[3] else None
        return None, None, g_s.new_zeros(()), g_w


class _Final(torch.autograd.Function):
    """The ring to carry on, as a differentiable output: its gradient goes to the final occupants."""

    @staticmethod
    def forward(ctx: Any, chain: _Chain, token: Tensor) -> Tensor:
        ctx.chain = chain
        ctx.save_for_backward(chain.owner.clone())
        return chain.values.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[None, Tensor]:
        (owner,) = ctx.saved_tensors
        chain: _Chain = ctx.chain
        chain.add_grad(owner.unsqueeze(0).expand(g.shape[0], -1), g)
        return None, g.new_zeros(())


class ChainMemory:
    """The ring outside autograd, with gradients routed to the occupants (fast path)."""

    def __init__(self, memory: Tensor):
        self.chain = _Chain(memory)
        self.token: Tensor = _Start.apply(self.chain, memory)

    def read(self, w: Tensor, idx: Tensor) -> Tensor:
        """``s[b, h] = sum_j w[b, j] * memory[b, idx[b, j]]``."""
        return _Read.apply(self.chain, idx, self.token, w)

    def write(self, pos: int, h: Tensor) -> None:
        """Slot ``pos`` now holds ``h[b, h]``."""
        self.token = _Write.apply(self.chain, pos, self.token, h)

    def final(self) -> Tensor:
        """The ring to carry to the next chunk."""
        return _Final.apply(self.chain, self.token)
