"""Helpers shared by the tasks: seed derivation and fixed evaluation sets."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from seqplat import Batch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of labels and integers (stable across runs and platforms).

    Different tuples give unrelated seeds, so ``("train", seed, step)`` never collides with
    ``("test", data_seed)`` the way ``seed + step`` would.
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded with :func:`derive_seed` of ``parts``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def batched(make: Callable[[slice], Batch], n: int, batch_size: int) -> Iterator[Batch]:
    """``make(slice)`` for consecutive slices of ``range(n)``; the last batch may be smaller."""
    for start in range(0, n, batch_size):
        yield make(slice(start, min(n, start + batch_size)))


def one_hot(tokens: Tensor, classes: int) -> Tensor:
    """Float one-hot features ``[..., classes]`` of integer tokens."""
    return torch.nn.functional.one_hot(tokens, classes).to(torch.float32)
