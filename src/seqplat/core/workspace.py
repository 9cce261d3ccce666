"""Buffers that a hand-written backward hands from one training call to the next.

A cell whose fast path is a ``torch.autograd.Function`` with its own backward (rhn, hyper_rhn, gam_rhn)
keeps per-step values in large buffers (``[T, b, ...]``). Allocating them afresh every call costs a page
fault per 4 KiB on first touch, which on some machines (VMs, sandboxes) is a large part of a training
step. A :class:`Workspace` (cuDNN calls it the reserve space) lets the cell reuse them: the forward
:meth:`~Workspace.take`\\ s buffers, the backward :meth:`~Workspace.give`\\ s them back once it has read
them, so two graphs alive at once get different buffers. A second backward through the same graph
(``retain_graph``) first :meth:`~Workspace.reclaim`\\ s its buffers, which fails if a later forward took
them in the meantime. Copies and pickles of a cell get an empty workspace; cells clear theirs when
switched to evaluation mode.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_Key = tuple[tuple[tuple[int, ...], ...], torch.dtype, torch.device]


class Workspace:
    """Free buffer sets, keyed by their shapes, dtype and device.

    While free, at most ``keep`` sets of each key are held, and ``limit`` sets in all (the oldest go
    first).
    """

    def __init__(self, keep: int = 2, limit: int = 12):
        self.keep, self.limit = keep, limit
        # (key, buffers, ticket): ticket[0] turns True when a later take() hands the buffers out again
        self._free: list[tuple[_Key, tuple[Tensor, ...], list[bool]]] = []

    @staticmethod
    def _key(shapes: tuple[tuple[int, ...], ...], like: Tensor) -> _Key:
        return shapes, like.dtype, like.device

    def take(self, shapes: tuple[tuple[int, ...], ...], like: Tensor) -> tuple[Tensor, ...]:
        """Free buffers of these shapes with ``like``'s dtype and device (contents undefined), or new ones."""
        key = self._key(tuple(tuple(s) for s in shapes), like)
        for i, (k, bufs, ticket) in enumerate(self._free):
            if k == key:
                del self._free[i]
                ticket[0] = True
                return bufs
        return tuple(like.new_empty(shape) for shape in shapes)

    def give(self, bufs: tuple[Tensor, ...]) -> list[bool]:
        """Return buffers taken with :meth:`take` (the oldest beyond ``keep`` / ``limit`` are dropped).
        The ticket returned says later whether someone has taken them since (see :meth:`reclaim`)."""
        key = self._key(tuple(tuple(b.shape) for b in bufs), bufs[0])
        same = [i for i, (k, _, _) in enumerate(self._free) if k == key]
        if len(same) >= self.keep:
            del self._free[same[0]]
        ticket = [False]
        self._free.append((key, bufs, ticket))
        del self._free[: -self.limit]
        return ticket

    def reclaim(self, bufs: tuple[Tensor, ...], ticket: list[bool]) -> bool:
        """Take back buffers given with :meth:`give`; False if someone has taken them since."""
        if ticket[0]:
            return False
        self._free = [entry for entry in self._free if entry[1][0] is not bufs[0]]
        return True

    def clear(self) -> None:
        """Drop every free buffer."""
        self._free.clear()

    def held(self) -> list[tuple[Tensor, ...]]:
        """The free buffer sets, oldest first."""
        return [bufs for _, bufs, _ in self._free]

    def __len__(self) -> int:
        return len(self._free)

    def __getstate__(self) -> dict[str, Any]:
        return {"keep": self.keep, "limit": self.limit, "_free": []}
