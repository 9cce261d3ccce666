"""The bilinear front-end of BL-GAM-RHN (the "BL-" of the FI-2010 model).

Each input step is a window of the last ``w`` events, a ``w x F`` matrix ``X``. A bilinear layer maps
``X [r_in, c_in]`` to ``Y = act(W1 X W2 + b)`` of shape ``[r, c]``, with ``W1 [r, r_in]``,
``W2 [c_in, c]`` and a bias ``b [c]`` broadcast over rows (the authors' tframe ``Bilinear``). The
authors stack five such layers, ``20x60 -> 15x80 -> 10x100 -> 5x120`` with ReLU and dropout 0.2 after
each and a final ``5x4`` tanh layer, keep every column of ``W1`` and ``W2`` within an L2 norm of 2.5
(Keras ``max_norm(2.5, axis=0)``, applied after each update), and flatten the result (20 numbers) into
the recurrent cell.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: the authors' FI-2010 front-end: output shapes of the five bilinear layers
PAPER_SHAPES: tuple[tuple[int, int], ...] = ((20, 60), (15, 80), (10, 100), (5, 120), (5, 4))


class BilinearLayer(nn.Module):
    """``Y = W1 X W2 + b`` on ``X [..., r_in, c_in]`` (activation applied by the caller)."""

    def __init__(self, in_shape: tuple[int, int], out_shape: tuple[int, int]):
        super().__init__()
        (r_in, c_in), (r, c) = in_shape, out_shape
        self.left = nn.Parameter(nn.init.xavier_normal_(torch.empty(r, r_in)))  # W1
        self.right = nn.Parameter(nn.init.xavier_normal_(torch.empty(c_in, c)))  # W2
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x: Tensor) -> Tensor:
        return self.left @ x @ self.right + self.bias

    @torch.no_grad()
    def project_(self, max_norm: float, eps: float = 1e-7) -> None:
        """Scale every column of ``W1`` and ``W2`` whose L2 norm exceeds ``max_norm`` back onto it."""
        for w in (self.left, self.right):
            norms = w.norm(dim=0, keepdim=True)
            w.mul_(norms.clamp(max=max_norm) / (eps + norms))


class BilinearEncoder(nn.Module):
    """Windows ``[b, t, w*F]`` (events oldest first) -> bilinear stack -> ``[b, t, r_last*c_last]``.

    With ``max_norm`` set, the column norms are projected at the start of every training forward,
    i.e. right after each optimizer update, as Keras' constraint does.
    """

    def __init__(self, window: int, features: int, shapes: Sequence[Sequence[int]] = PAPER_SHAPES,
                 dropout: float = 0.2, max_norm: float | None = 2.5):
        super().__init__()
        if not shapes:
            raise ValueError("BilinearEncoder needs at least one layer shape")
        self.window, self.features = int(window), int(features)
        self.dropout, self.max_norm = float(dropout), max_norm
        dims = [(self.window, self.features)] + [(int(r), int(c)) for r, c in shapes]
        self.layers = nn.ModuleList(BilinearLayer(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.output_size = dims[-1][0] * dims[-1][1]

    def project_(self) -> None:
        """Apply the max-norm constraint to every layer now."""
        if self.max_norm is not None:
            for layer in self.layers:
                layer.project_(self.max_norm)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.project_()
        lead = x.shape[:-1]
        y = x.reshape(-1, self.window, self.features)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            y = layer(y)
            if i < last:
                y = F.dropout(torch.relu(y), self.dropout, self.training)
            else:
                y = torch.tanh(y)
        return y.reshape(*lead, self.output_size)
