"""Sparse Attentive Backtracking (Ke et al., NeurIPS 2018): the ``sab`` wrapper cell and its recipes."""

from pathlib import Path

import seqplat

from .cell import SABCell

RECIPES = Path(__file__).parent / "recipes"


@seqplat.hookimpl
def register_cells(register):
    register("sab", SABCell)


@seqplat.hookimpl
def register_recipes(register):
    for path in sorted(RECIPES.glob("*.toml")):
        register(f"sab/{path.stem}", path)
