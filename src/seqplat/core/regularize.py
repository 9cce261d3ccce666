"""The regularizer contract.

A regularizer is built from its config and then ``apply``-ed to a :class:`SequenceModel`. It may
wrap parameters (``torch.nn.utils.parametrize``), install module hooks, set a documented cell option
(``cell.zoneout_prob``) or, through ``penalty``, add loss terms computed from the last cell's
outputs. Penalties are logged as separate metrics by the trainer.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn


class RegularizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Regularizer:
    """Base class; subclasses set ``config_class`` and override ``apply`` and/or ``penalty``."""

    config_class: ClassVar[type[BaseModel]] = RegularizerConfig

    def __init__(self, config: BaseModel):
        self.config = config

    def apply(self, model: nn.Module) -> None:
        """Modify the model in place (raise ConfigError if the model's cells do not allow it)."""

    def penalty(self, hidden: Tensor, raw_hidden: Tensor | None = None) -> dict[str, Tensor]:
        """Extra loss terms from the last cell's outputs ``[b,t,h]`` (named, added to the loss)."""
        return {}


def apply_regularizers(model: nn.Module, specs: list[dict[str, Any]], registry: Any | None = None) -> None:
    from seqplat.core.config import component_config
    from seqplat.registry import get_registry

    reg = registry or get_registry()
    model.regularizers = []  # type: ignore[attr-defined]
    for spec in specs:
        cls = reg.get("regularizer", spec["name"]).obj
        r = cls(component_config("regularizer", spec, reg))
        r.apply(model)
        model.regularizers.append(r)  # type: ignore[attr-defined]
