"""The regularization toolbox: locked and embedding dropout, weight drop, zoneout, AR and TAR.

Regularizers ``locked_dropout``, ``embedding_dropout``, ``weight_drop``, ``zoneout``, ``ar`` and
``tar`` (usable on any model: ``--set 'regularizers=[{name: weight_drop, p: 0.5}]'``) and the recipes
in ``recipes/``. See ``docs/plugins/regularizers.md``.
"""

from pathlib import Path

import seqplat

from .activation import ActivationRegularization, TemporalActivationRegularization
from .dropout import EmbeddingDropout, LockedDropoutRegularizer
from .weight_drop import WeightDrop
from .zoneout import Zoneout

RECIPES = Path(__file__).parent / "recipes"


@seqplat.hookimpl
def register_regularizers(register):
    register("locked_dropout", LockedDropoutRegularizer)
    register("embedding_dropout", EmbeddingDropout)
    register("weight_drop", WeightDrop)
    register("zoneout", Zoneout)
    register("ar", ActivationRegularization)
    register("tar", TemporalActivationRegularization)


@seqplat.hookimpl
def register_recipes(register):
    for path in sorted(RECIPES.glob("*.toml")):
        register(f"regularizers/{path.stem}", path)
