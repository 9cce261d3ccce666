"""The quantizer contract, and straight-through helpers.

Cells opt into quantization by naming *roles*:

* ``weight_roles``: ``{role: (parameter names...)}``, e.g. ``{"input": ("weight_ih_l0",),
  "recurrent": ("weight_hh_l0",)}``. A quantizer replaces those parameters through
  ``torch.nn.utils.parametrize`` so the latent full-precision weight keeps training.
* ``activation_roles``: names such as ``"gate"`` or ``"candidate"`` at which the cell calls
  ``self.quantize_activation(role, value)``; a quantizer installs a function per role in
  ``cell.activation_quantizers``. A cell whose fast path cannot quantize activations falls back to
  its reference path while any activation quantizer is installed.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn


class QuantizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def straight_through(quantized: Tensor, latent: Tensor) -> Tensor:
    """Forward ``quantized``, backward the identity to ``latent`` (STE)."""
    return quantized + (latent - latent.detach())  # bit-exact forward value, identity gradient


class Quantizer:
    """Base class; subclasses set ``config_class`` and implement ``apply``."""

    config_class: ClassVar[type[BaseModel]] = QuantizerConfig

    def __init__(self, config: BaseModel):
        self.config = config

    def apply(self, model: nn.Module) -> None:
        """Install weight parametrizations and activation quantizers on every cell of ``model``."""
        raise NotImplementedError(f"{type(self).__name__} must implement apply")

    def model_size_bytes(self, model: nn.Module) -> int:
        """Bytes of the quantized model's weights when packed."""
        return sum(p.numel() * p.element_size() for p in model.parameters())

    def export(self, model: nn.Module) -> dict[str, Tensor]:
        """Packed tensors that reproduce the quantized model (see ``seqplat export``)."""
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


def apply_quantizer(model: nn.Module, spec: dict[str, Any], registry: Any | None = None) -> Quantizer:
    from seqplat.core.config import component_config
    from seqplat.registry import get_registry

    reg = registry or get_registry()
    cls = reg.get("quantizer", spec["name"]).obj
    q = cls(component_config("quantizer", spec, reg))
    q.apply(model)
    model.quantizer = q  # type: ignore[attr-defined]
    return q


@torch.no_grad()
def distinct_values(t: Tensor) -> int:
    return int(torch.unique(t).numel())
