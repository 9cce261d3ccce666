"""Activation regularization (AR) and temporal activation regularization (TAR), Merity et al. 2017.

With ``h`` the last cell's outputs ``[b, t, h]`` (what the head reads, before the output dropout)::

    AR  = alpha * mean(h^2)
    TAR = beta  * mean((h_t - h_{t-1})^2)       over t = 2..T of each chunk

Each is returned by ``penalty`` under its own name, so the trainer adds it to the loss and logs it
as ``train_ar`` / ``train_tar``.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from seqplat import Regularizer, RegularizerConfig


class ARConfig(RegularizerConfig):
    """Options of ``ar``."""

    alpha: float = Field(2.0, ge=0.0, description="weight of mean(h^2) in the loss (AWD-LSTM: 2)")


class TARConfig(RegularizerConfig):
    """Options of ``tar``."""

    beta: float = Field(1.0, ge=0.0, description="weight of mean((h_t - h_{t-1})^2) in the loss (AWD-LSTM: 1)")


class ActivationRegularization(Regularizer):
    """Activation regularization: alpha * mean(h^2) added to the loss, logged as train_ar."""

    config_class = ARConfig
    config: ARConfig

    def penalty(self, hidden: Tensor, raw_hidden: Tensor | None = None) -> dict[str, Tensor]:
        if self.config.alpha == 0.0:
            return {}
        return {"ar": self.config.alpha * hidden.pow(2).mean()}


class TemporalActivationRegularization(Regularizer):
    """Temporal activation regularization: beta * mean((h_t - h_{t-1})^2), logged as train_tar."""

    config_class = TARConfig
    config: TARConfig

    def penalty(self, hidden: Tensor, raw_hidden: Tensor | None = None) -> dict[str, Tensor]:
        if self.config.beta == 0.0:
            return {}
        if hidden.shape[1] < 2:
            return {"tar": hidden.new_zeros(())}
        return {"tar": self.config.beta * (hidden[:, 1:] - hidden[:, :-1]).pow(2).mean()}
