"""Weight drop: DropConnect (Wan et al. 2013) on recurrent weight matrices, as in AWD-LSTM (Merity et al. 2018).

For each recurrent weight ``W`` a cell declares in ``weight_roles["recurrent"]``::

    M ~ Bernoulli(1 - p)^shape(W),   W~ = W * M / (1 - p)          (training; W~ = W in evaluation)

``M`` is drawn once per forward of the owning (top-level) cell, so every time step of a sequence
and every truncated-BPTT chunk uses one mask, and a fresh one is drawn for the next batch.

Mechanism. ``W`` is replaced through ``torch.nn.utils.parametrize`` by a :class:`DropConnect`
parametrization; the latent parameter lives at ``<module>.parametrizations.<name>.original`` (that
is its state-dict key) and keeps training. A forward pre-hook on each top-level cell draws the masks
before the cell runs, so the reference path (which reads ``W`` at every step) and fused kernels see
the same dropped weight. ``nn.LSTM``/``nn.GRU``/``nn.RNN`` keep a cache of their weights
(``_flat_weights``); at every call they compare it with the current attribute values and re-read
(re-flatten) them when they changed, which a parametrized attribute always does, so the fused kernel
runs on the dropped weight and gradients reach the latent weight. On torch versions without that
check, a pre-hook on the fused module re-reads the weights itself.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn.utils import parametrize

from seqplat import Cell, ConfigError, Regularizer, RegularizerConfig

from .common import cell_name, registered_cells, top_cells


class DropConnect(nn.Module):
    """Parametrization ``W -> W * M / (1 - p)`` with a mask drawn by :meth:`resample`.

    Identity in evaluation mode and before the first mask is drawn.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)
        #: the current mask (already divided by 1 - p); a plain attribute, never in the state dict
        self.mask: Tensor | None = None

    def resample(self, weight: Tensor) -> None:
        """Draw a fresh mask shaped like ``weight`` (training) or clear it (evaluation)."""
        if self.training and self.p > 0.0:
            keep = 1.0 - self.p
            self.mask = torch.empty_like(weight, memory_format=torch.contiguous_format).bernoulli_(keep).div_(keep)
        else:
            self.mask = None

    def forward(self, weight: Tensor) -> Tensor:
        mask = self.mask
        if not self.training or mask is None:
            return weight
        return weight * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class WeightDropConfig(RegularizerConfig):
    """Options of ``weight_drop``."""

    p: float = Field(0.5, ge=0.0, lt=1.0, description="probability of dropping each weight entry (AWD-LSTM: 0.5)")
    roles: tuple[str, ...] = Field(
        ("recurrent",), min_length=1,
        description="weight roles to drop, among those the cell declares in weight_roles (e.g. recurrent, input)")


class _Target:
    """One parametrized weight: the module that owns it, its attribute name and its DropConnect."""

    def __init__(self, module: nn.Module, attr: str, drop: DropConnect):
        self.module, self.attr, self.drop = module, attr, drop

    def resample(self) -> None:
        self.drop.resample(self.module.parametrizations[self.attr].original)  # type: ignore[union-attr,index]


def _declared(cell: nn.Module, role: str) -> tuple[str, ...]:
    roles = getattr(cell, "weight_roles", None) or {}
    return tuple(roles.get(role, ()))


def role_cells(cell: nn.Module, roles: tuple[str, ...]) -> list[Cell]:
    """The outermost cells at or below ``cell`` that declare any of ``roles`` (a wrapper cell that
    declares none contributes its inner cells)."""
    if isinstance(cell, Cell) and any(_declared(cell, r) for r in roles):
        return [cell]
    return [c for child in cell.children() for c in role_cells(child, roles)]


def _resolve(cell: Cell, pname: str, role: str) -> tuple[nn.Module, str]:
    path, _, attr = pname.rpartition(".")
    try:
        module = cell.get_submodule(path) if path else cell
        weight = getattr(module, attr)
    except AttributeError as exc:
        raise ConfigError(f"regularizers: 'weight_drop': cell '{cell_name(cell)}' declares "
                          f"weight_roles['{role}'] entry '{pname}', but it has no such tensor") from exc
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise ConfigError(f"regularizers: 'weight_drop': weight_roles['{role}'] entry '{pname}' of cell "
                          f"'{cell_name(cell)}' is not a floating-point tensor")
    return module, attr


def _refresh_flat_weights(module: nn.Module, args: Any) -> None:
    module._init_flat_weights()  # type: ignore[operator]  # torch versions that never re-read their weights


class WeightDrop(Regularizer):
    """Weight drop: DropConnect on the recurrent weights a cell declares (weight_roles), once per sequence."""

    config_class = WeightDropConfig
    config: WeightDropConfig

    def apply(self, model: nn.Module) -> None:
        roles = self.config.roles
        for top in top_cells(model, "weight_drop"):
            found = role_cells(top, roles)
            if not found:
                declared = getattr(top, "weight_roles", None) or {}
                what = f"weight_roles {sorted(declared)}" if declared else "no weight_roles"
                raise ConfigError(
                    f"regularizers: 'weight_drop' cannot apply to cell '{cell_name(top)}': it declares {what}, "
                    f"and none of the roles {list(roles)} (nor do its inner cells). Cells with recurrent weights: "
                    f"{registered_cells(lambda c: bool(getattr(c, 'weight_roles', {}).get('recurrent')))}; "
                    "a cell author declares them with weight_roles = {'recurrent': ('<parameter name>', ...)}"
                )
            targets: list[_Target] = []
            for cell in found:
                missing = [r for r in roles if not _declared(cell, r)]
                if missing:
                    raise ConfigError(
                        f"regularizers: 'weight_drop' cannot drop role(s) {missing} of cell '{cell_name(cell)}': it "
                        f"declares weight_roles {sorted(getattr(cell, 'weight_roles', {}))}; set roles to those"
                    )
                for role in roles:
                    for pname in _declared(cell, role):
                        module, attr = _resolve(cell, pname, role)
                        if any(t.module is module and t.attr == attr for t in targets) or _has_drop(module, attr):
                            raise ConfigError(f"regularizers: 'weight_drop' is applied twice to '{pname}' of cell "
                                              f"'{cell_name(cell)}'; list each role once, in one weight_drop")
                        drop = DropConnect(self.config.p)
                        parametrize.register_parametrization(module, attr, drop)
                        targets.append(_Target(module, attr, drop))
                        if isinstance(module, nn.RNNBase) and not hasattr(module, "_update_flat_weights"):
                            module.register_forward_pre_hook(_refresh_flat_weights)
            top.register_forward_pre_hook(_Resampler(targets))


def _has_drop(module: nn.Module, attr: str) -> bool:
    if not parametrize.is_parametrized(module, attr):
        return False
    return any(isinstance(p, DropConnect) for p in module.parametrizations[attr])  # type: ignore[union-attr,index]


class _Resampler:
    """Forward pre-hook of a top-level cell: one fresh mask per weight for this forward."""

    def __init__(self, targets: list[_Target]):
        self.targets = targets

    def __call__(self, module: nn.Module, args: Any) -> None:
        for t in self.targets:
            t.resample()


def dropconnects(model: nn.Module) -> list[DropConnect]:
    """Every :class:`DropConnect` parametrization in ``model``."""
    return [m for m in model.modules() if isinstance(m, DropConnect)]
