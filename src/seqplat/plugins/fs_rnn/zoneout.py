"""Zoneout with separate probabilities per state tensor (Krueger et al. 2017, arXiv:1606.01305).

Zoneout regularises a recurrent state by letting each unit either take its new value or keep its
previous one. This module follows the convention of the FS-RNN authors' code, where the number
given is the probability ``keep`` that a unit takes its **new** value (so ``keep = 1`` is no
zoneout, and the zoneout rate in the paper's sense is ``1 - keep``)::

    training:    m ~ Bernoulli(keep) per unit, fresh every step;  s_t = m * s' + (1 - m) * s_{t-1}
    evaluation:  s_t = keep * s' + (1 - keep) * s_{t-1}           (the expectation of the above)

In training every unit is exactly its new or exactly its old value (the masked choice is a
``torch.where``, so no arithmetic blurs the two). The core's ``StepCell.zoneout_prob`` is the same
mechanism with one probability (of keeping the *old* value) applied to the whole state; cells that
need different probabilities for different state tensors (the LN-LSTM of FS-RNN: ``h`` and ``c``)
call :func:`zoneout` inside their step instead, and fold the core's ``zoneout_prob`` in with
:func:`combine_keep`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def combine_keep(keep: float, zoneout_prob: float) -> float:
    """Probability of taking the new value when a cell's own ``keep`` and the core's
    ``zoneout_prob`` (probability of keeping the old value) act independently."""
    return keep * (1.0 - zoneout_prob)


def zoneout(old: Tensor, new: Tensor, keep: float, training: bool) -> Tensor:
    """Mix ``new`` into ``old`` unit by unit: ``keep`` is the probability of taking the new value.

    In training a fresh Bernoulli mask picks each unit from ``new`` or ``old`` exactly; in
    evaluation the expectation ``keep * new + (1 - keep) * old`` is returned. ``keep >= 1`` returns
    ``new`` unchanged without drawing random numbers.
    """
    if keep >= 1.0:
        return new
    if training:
        take_new = torch.rand_like(new) < keep
        return torch.where(take_new, new, old)
    return keep * new + (1.0 - keep) * old
