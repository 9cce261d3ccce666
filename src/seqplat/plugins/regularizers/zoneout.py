"""Zoneout on the recurrent state (Krueger et al. 2017, arXiv:1606.01305).

Between steps each state unit keeps its previous value with probability ``p``::

    training:    d ~ Bernoulli(p) per unit, fresh every step;  s_t = d * s_{t-1} + (1 - d) * s~_t
    evaluation:  s_t = p * s_{t-1} + (1 - p) * s~_t          (the expectation of the above)

The core applies this between steps for every :class:`seqplat.StepCell` (``cell.zoneout_prob``, see
``StepCell.apply_zoneout``); this regularizer sets that option on every stacked cell. A
whole-sequence :class:`seqplat.Cell` opts in by declaring ``supports_zoneout = True`` and applying
``self.zoneout_prob`` in its own forward; a wrapper cell may instead define ``zoneout_prob`` as a
property that hands the value to its inner cells (as ``dilated_rnn`` does), which counts as opting
in when its inner cells support zoneout themselves. Any other cell is refused with a ConfigError
rather than silently ignoring the option.

The FS-RNN authors' code gives *keep* probabilities (probability of taking the new value); their
``zoneout_keep_h = 0.9`` is ``p = 0.1`` here.
"""

from __future__ import annotations

from pydantic import Field
from torch import nn

from seqplat import Cell, ConfigError, Regularizer, RegularizerConfig, StepCell

from .common import cell_name, registered_cells, top_cells


def _defines_zoneout_property(cls: type) -> bool:
    for klass in cls.__mro__:
        if klass in (Cell, StepCell, nn.Module, object):
            break
        if isinstance(vars(klass).get("zoneout_prob"), property):
            return True
    return False


def _inner_cells(cell: nn.Module) -> list[Cell]:
    """The nearest cells below ``cell`` (not ``cell`` itself)."""
    out: list[Cell] = []
    for child in cell.children():
        out.extend([child] if isinstance(child, Cell) else _inner_cells(child))
    return out


def supports_zoneout(cell: nn.Module) -> bool:
    """Whether setting ``cell.zoneout_prob`` has the documented effect.

    True for a StepCell, for a cell whose ``supports_zoneout`` attribute is true, and for a wrapper
    whose class defines ``zoneout_prob`` as a property (it passes the value on) when all its nearest
    inner cells support zoneout.
    """
    if isinstance(cell, StepCell) or bool(getattr(cell, "supports_zoneout", False)):
        return True
    if isinstance(cell, Cell) and _defines_zoneout_property(type(cell)):
        inner = _inner_cells(cell)
        return bool(inner) and all(supports_zoneout(c) for c in inner)
    return False


def _class_supports(cls: type) -> bool:
    return (isinstance(cls, type) and issubclass(cls, StepCell)) or bool(getattr(cls, "supports_zoneout", False)) \
        or _defines_zoneout_property(cls)


class ZoneoutConfig(RegularizerConfig):
    """Options of ``zoneout``."""

    prob: float = Field(0.1, ge=0.0, lt=1.0,
                        description="probability that a state unit keeps its previous value (1 - FS-RNN's keep)")


class Zoneout(Regularizer):
    """Zoneout on the state: sets zoneout_prob on every stacked cell, refusing cells that would ignore it."""

    config_class = ZoneoutConfig
    config: ZoneoutConfig

    def apply(self, model: nn.Module) -> None:
        cells = top_cells(model, "zoneout")
        for cell in cells:
            if not supports_zoneout(cell):
                raise ConfigError(
                    f"regularizers: 'zoneout' cannot apply to cell '{cell_name(cell)}': it is a whole-sequence cell "
                    "that does not expose its state between steps (not a StepCell and no supports_zoneout = True). "
                    f"Cells that support it: {registered_cells(_class_supports)}; a cell author opts in by setting "
                    "supports_zoneout = True and applying self.zoneout_prob in forward"
                )
        for cell in cells:
            cell.zoneout_prob = float(self.config.prob)
