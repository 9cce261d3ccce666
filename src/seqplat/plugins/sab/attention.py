"""The attention pieces of SAB: scorers, the sparsifier, and where the per-slot keys live.

A score ``a_{t,i} = score(h^_t, m_i)`` is written as ``scores(query(h^_t), keys(m_i))`` so that a
slot's key is computed once, when the slot is written, not at every read.

Two key stores hold the keys of the memory ring:

* :class:`DenseKeys` -- one tensor ``[b, S, d_k]`` updated out of place at each write; plain
  autograd. With the MLP scorer autograd then saves ``tanh(q + K)`` (``[b, n, d]``) at every step,
  so activation memory grows like ``T * n * d``. This is the reference path.
* :class:`BlockedKeys` -- the keys in blocks of :data:`BLOCK` slots (a write replaces one block)
  and the MLP score as a custom autograd function that saves only the query and references to the
  blocks and recomputes ``tanh`` in its backward. Same values and gradients, activation memory
  about ``T * d + (T / k_att) * BLOCK * d``. This is the fast path (tested against the reference).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["BLOCK", "BlockedKeys", "DenseKeys", "MLPScorer", "OfficialScorer", "sparse_weights"]

#: slots per key block of the fast path
BLOCK = 8


# -- scorers ---------------------------------------------------------------------------------------

class OfficialScorer(nn.Module):
    """The release's scorer ``a = w^T tanh([h; m])``, ``w ~ N(0, 0.01^2)``, no bias.

    ``tanh`` acts element-wise on the concatenation, so ``a = w_h^T tanh(h) + w_m^T tanh(m)``: the
    key of a slot is its scalar salience ``w_m^T tanh(m)``, and the query term is the same for every
    slot (it cancels against the threshold once ``|M| > k_top``).
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.weight = nn.Parameter(torch.randn(2 * hidden) * 0.01)

    def keys(self, m: Tensor) -> Tensor:
        """``m[b, n, h] -> [b, n, 1]`` per-slot salience."""
        return (torch.tanh(m) @ self.weight[self.hidden :]).unsqueeze(-1)

    def query(self, h: Tensor) -> Tensor:
        """``h[b, h] -> [b, 1]``."""
        return (torch.tanh(h) @ self.weight[: self.hidden]).unsqueeze(-1)

    def scores(self, q: Tensor, keys: Tensor) -> Tensor:
        """``q[b, 1], keys[b, n, 1] -> a[b, n]``."""
        return q + keys.squeeze(-1)


class MLPScorer(nn.Module):
    """A one-hidden-layer MLP on ``[h; m]``: ``a = v^T tanh(W_q h + W_m m + b)`` (state-dependent)."""

    def __init__(self, hidden: int, size: int):
        super().__init__()
        self.query_proj = nn.Linear(hidden, size)  # W_q, b
        self.key_proj = nn.Linear(hidden, size, bias=False)  # W_m
        self.out = nn.Linear(size, 1, bias=False)  # v

    def keys(self, m: Tensor) -> Tensor:
        """``m[b, n, h] -> [b, n, d]``."""
        return self.key_proj(m)

    def query(self, h: Tensor) -> Tensor:
        """``h[b, h] -> [b, d]``."""
        return self.query_proj(h)

    def scores(self, q: Tensor, keys: Tensor) -> Tensor:
        """``q[b, d], keys[b, n, d] -> a[b, n]``."""
        return self.out(torch.tanh(q.unsqueeze(1) + keys)).squeeze(-1)


# -- sparsifier --------------------------------------------------------------------------------------

def sparse_weights(scores: Tensor, k_top: int, sparsifier: str = "paper", small_memory: str = "softmax",
                   detach_threshold: bool = False, eps: float = 1e-7) -> tuple[Tensor, Tensor | None]:
    """Attention weights over the best slots: ``scores[b, n] -> (w[b, k'], idx[b, k'] | None)``.

    ``idx`` names the slots the weights belong to (``None``: all ``n`` slots in order, used when
    ``n <= k_top``). Ties are broken towards the lower slot index (stable sort), so the selection is
    deterministic.

    * ``paper``: ``delta`` = the (k_top+1)-th largest score; ``w = relu(a - delta) / sum relu(a - delta)``
      over the top ``k_top`` (exactly ``k_top`` non-zero weights summing to 1 unless scores tie).
    * ``official``: ``delta`` = the k_top-th largest + ``eps``; ``w = relu(a - delta) / (sum + eps)``:
      only ``k_top - 1`` non-zero weights, none at all for ``k_top = 1``.
    * ``n <= k_top``: ``softmax`` over all scores, or ``raw`` scores unnormalised (the release).
    """
    n = scores.shape[-1]
    if n <= k_top:
        if small_memory == "raw":
            return scores, None
        return torch.softmax(scores, dim=-1), None
    vals, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    if sparsifier == "paper":
        delta = vals[:, k_top : k_top + 1]
        delta = delta.detach() if detach_threshold else delta
        kept = F.relu(vals[:, :k_top] - delta)
        w = kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(kept.dtype).tiny)
    else:
        delta = vals[:, k_top - 1 : k_top] + eps
        delta = delta.detach() if detach_threshold else delta
        kept = F.relu(vals[:, :k_top] - delta)
        w = kept / (kept.sum(-1, keepdim=True) + eps)
    return w, order[:, :k_top]


# -- key stores ----------------------------------------------------------------------------------------

class DenseKeys:
    """All slot keys in one tensor ``[b, S, d_k]``; plain autograd (the reference path)."""

    def __init__(self, scorer: nn.Module, memory: Tensor):
        self.scorer = scorer
        self.keys = scorer.keys(memory)

    def scores(self, q: Tensor, n: int) -> Tensor:
        """Scores ``[b, n]`` of the first ``n`` slots."""
        return self.scorer.scores(q, self.keys[:, :n])

    def write(self, pos: int, m: Tensor) -> None:
        """Key of the slot ``pos`` now holding ``m[b, h]``."""
        idx = torch.full((1,), pos, dtype=torch.long, device=m.device)
        self.keys = self.keys.index_copy(1, idx, self.scorer.keys(m.unsqueeze(1)))


class _BlockedMLPScores(torch.autograd.Function):
    """``a[b, n] = v^T tanh(q + K[:, :n])`` with ``K = cat(blocks)``; saves no ``[b, n, d]`` tensor."""

    @staticmethod
    def forward(ctx: Any, n: int, q: Tensor, v: Tensor, *blocks: Tensor) -> Tensor:
        z = torch.tanh(q.unsqueeze(1) + torch.cat(blocks, 1)[:, :n])  # [b, n, d]
        ctx.n = n
        ctx.save_for_backward(q, v, *blocks)
        return z @ v.reshape(-1)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, v, *blocks = ctx.saved_tensors
        n = ctx.n
        z = torch.tanh(q.unsqueeze(1) + torch.cat(blocks, 1)[:, :n])  # recomputed
        g_z = grad.unsqueeze(-1) * v.reshape(1, 1, -1)  # [b, n, d]
        g_pre = g_z * (1 - z * z)
        g_q = g_pre.sum(1) if ctx.needs_input_grad[1] else None
        g_v = torch.einsum("bn,bnd->d", grad, z).reshape(v.shape) if ctx.needs_input_grad[2] else None
        g_blocks: list[Tensor | None] = []
        start = 0
        for j, blk in enumerate(blocks):
            size = blk.shape[1]
            stop = min(start + size, n)
            if not ctx.needs_input_grad[3 + j] or stop <= start:
                g_blocks.append(None)
            elif stop - start == size:
                g_blocks.append(g_pre[:, start:stop])
            else:
                g_blocks.append(torch.cat([g_pre[:, start:stop], g_pre.new_zeros(blk.shape[0], size - (stop - start),
                                                                                   blk.shape[2])], 1))
            start += size
        return (None, g_q, g_v, *g_blocks)


class BlockedKeys:
    """The MLP scorer's keys in blocks of :data:`BLOCK` slots, scored without saving ``tanh`` (fast path)."""

    def __init__(self, scorer: MLPScorer, memory: Tensor):
        self.scorer = scorer
        keys = scorer.keys(memory)
        self.blocks = list(keys.split(BLOCK, dim=1))

    def scores(self, q: Tensor, n: int) -> Tensor:
        """Scores ``[b, n]`` of the first ``n`` slots."""
        used = self.blocks[: -(-n // BLOCK)]
        return _BlockedMLPScores.apply(n, q, self.scorer.out.weight, *used)

    def write(self, pos: int, m: Tensor) -> None:
        """Key of the slot ``pos`` now holding ``m[b, h]`` (replaces one block)."""
        j, off = divmod(pos, BLOCK)
        idx = torch.full((1,), off, dtype=torch.long, device=m.device)
        self.blocks[j] = self.blocks[j].index_copy(1, idx, self.scorer.keys(m.unsqueeze(1)))
