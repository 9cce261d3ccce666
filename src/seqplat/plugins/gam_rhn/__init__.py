"""GAM-RHN (Luo & Yu 2019): the ``gam_rhn`` cell, the ``fi2010`` task and the paper's recipes.

See ``docs/plugins/gam_rhn.md``.
"""

from pathlib import Path

import seqplat

from .cell import GAMRHNCell
from .fi2010 import FI2010Task

RECIPES = Path(__file__).parent / "recipes"


@seqplat.hookimpl
def register_cells(register):
    register("gam_rhn", GAMRHNCell)


@seqplat.hookimpl
def register_tasks(register):
    register("fi2010", FI2010Task)


@seqplat.hookimpl
def register_recipes(register):
    for path in sorted(RECIPES.glob("*.toml")):
        register(f"gam_rhn/{path.stem}", path)
