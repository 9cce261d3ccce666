"""Locked (variational) dropout and embedding dropout.

``locked_dropout`` (Gal & Ghahramani 2016; Merity et al. 2018, "LockedDropout") draws one Bernoulli
mask per sequence and feature and reuses it at every time step::

    m ~ Bernoulli(1 - p)^[b, 1, d],   y[b, t, d] = x[b, t, d] * m[b, 0, d] / (1 - p)

A fresh mask is drawn at every call, i.e. for every batch (every truncated-BPTT chunk of a stream).
It replaces the model's three dropout sites: after the encoder (``model.input_dropout``), between
stacked cells (``model.dropout``, one mask per layer) and before the head (``model.output_dropout``,
which sees ``[b, h]`` for last-step heads: one step, so there the mask is ordinary dropout).

``embedding_dropout`` (Gal & Ghahramani 2016, section 4; Merity et al. 2018) drops whole rows of the
embedding matrix, i.e. every occurrence of a token type in the batch, and rescales the kept rows::

    m ~ Bernoulli(1 - p)^[V],   e(w) = E[w] * m[w] / (1 - p)

Both are the identity in evaluation mode.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import Tensor, nn

from seqplat import ConfigError, Regularizer, RegularizerConfig


class LockedDropout(nn.Module):
    """Dropout with one mask per sequence shared over time: ``x[b,t,d] * m[b,1,d] / (1-p)``.

    A 2-D input ``[b, h]`` (one step) gets an ordinary ``[b, h]`` mask.
    """

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"LockedDropout: p must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0], 1, *x.shape[2:]) if x.dim() >= 3 else x.shape  # [b, 1, d] or [b, h]
        mask = x.new_empty(shape).bernoulli_(keep).div_(keep)
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LockedDropoutConfig(RegularizerConfig):
    """Options of ``locked_dropout``; a field left at None keeps the rate of the model's own dropout."""

    input: float | None = Field(
        None, ge=0.0, lt=1.0,
        description="rate after the encoder, one mask per sequence (None: model.input_dropout)")
    between: float | None = Field(
        None, ge=0.0, lt=1.0,
        description="rate between stacked cells, one mask per sequence and layer (None: model.dropout)")
    output: float | None = Field(
        None, ge=0.0, lt=1.0,
        description="rate before the head, one mask per sequence (None: model.output_dropout)")


#: (config field, model attribute)
_SITES = (("input", "input_dropout"), ("between", "dropout"), ("output", "output_dropout"))


class LockedDropoutRegularizer(Regularizer):
    """Locked (variational) dropout: one mask per sequence at the model's input, between-layer and output sites."""

    config_class = LockedDropoutConfig
    config: LockedDropoutConfig

    def apply(self, model: nn.Module) -> None:
        for field, attr in _SITES:
            current = getattr(model, attr, None)
            if not isinstance(current, nn.Module):
                raise ConfigError(f"regularizers: 'locked_dropout' needs model.{attr} (a dropout module the "
                                  f"model's forward calls); {type(model).__name__} has none")
            p = getattr(self.config, field)
            if p is None:
                p = float(getattr(current, "p", 0.0))
            setattr(model, attr, LockedDropout(p))


class EmbeddingDropoutConfig(RegularizerConfig):
    """Options of ``embedding_dropout``."""

    p: float = Field(0.1, ge=0.0, lt=1.0,
                     description="probability of dropping a whole embedding row (a token type) for one batch")


class EmbeddingDropout(Regularizer):
    """Drops whole rows of the embedding matrix, one mask over the vocabulary per batch.

    Implemented as a forward hook on the ``nn.Embedding`` encoder that multiplies each looked-up
    vector by its row's mask entry, which equals looking up in the masked matrix (the values and the
    gradients of dropped rows are zero) without copying the matrix. With ``model.tie_weights`` the
    output layer keeps using the full matrix.
    """

    config_class = EmbeddingDropoutConfig
    config: EmbeddingDropoutConfig

    def apply(self, model: nn.Module) -> None:
        encoder = getattr(model, "encoder", None)
        if not isinstance(encoder, nn.Embedding):
            raise ConfigError(
                "regularizers: 'embedding_dropout' needs a token task (an nn.Embedding encoder); this model's "
                f"encoder is {type(encoder).__name__}. Use it with a language-model task, or use locked_dropout "
                "(input) on feature inputs"
            )
        encoder.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
        p = self.config.p
        if not module.training or p == 0.0:
            return out
        keep = 1.0 - p
        rows = module.num_embeddings  # type: ignore[attr-defined]
        mask = out.new_empty(rows).bernoulli_(keep).div_(keep)  # [V]: one decision per token type
        return out * mask[args[0]].unsqueeze(-1)
