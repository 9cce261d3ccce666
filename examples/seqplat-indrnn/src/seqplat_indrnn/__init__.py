"""seqplat-indrnn: an external seqplat plugin (its own distribution, found through the ``seqplat`` entry point).

Registers the ``indrnn`` cell (Li et al. 2018, arXiv:1803.04831), the ``indrnn_sine`` task and the
``indrnn/default`` recipe. It imports only seqplat's public API, like any third-party plugin.
"""

from pathlib import Path

import seqplat

from .cell import IndRNNCell
from .task import SineFrequencyTask

__version__ = "0.1.0"

RECIPES = Path(__file__).parent / "recipes"


@seqplat.hookimpl
def register_cells(register):
    register("indrnn", IndRNNCell)


@seqplat.hookimpl
def register_tasks(register):
    register("indrnn_sine", SineFrequencyTask)


@seqplat.hookimpl
def register_recipes(register):
    for path in sorted(RECIPES.glob("*.toml")):
        register(f"indrnn/{path.stem}", path)
