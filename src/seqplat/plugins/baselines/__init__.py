"""Baseline cells (lstm, gru, rnn) on torch's fused modules, and the yardstick recipes."""

from pathlib import Path

import seqplat

from .cells import GRUCell, LSTMCell, TanhRNNCell

RECIPES = Path(__file__).parent / "recipes"


@seqplat.hookimpl
def register_cells(register):
    register("lstm", LSTMCell)
    register("gru", GRUCell)
    register("rnn", TanhRNNCell)


@seqplat.hookimpl
def register_recipes(register):
    for path in sorted(RECIPES.glob("*.toml")):
        register(f"baselines/{path.stem}", path)
