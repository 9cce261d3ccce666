"""Fast-Slow RNN (Mujika et al., NIPS 2017): the ``fs_rnn`` wrapper cell, the ``ln_lstm`` cell and recipes."""

from pathlib import Path

import seqplat

from .cell import FSRNNCell
from .ln_lstm import LNLSTMCell

RECIPES = Path(__file__).parent / "recipes"


@seqplat.hookimpl
def register_cells(register):
    register("ln_lstm", LNLSTMCell)
    register("fs_rnn", FSRNNCell)


@seqplat.hookimpl
def register_recipes(register):
    for path in sorted(RECIPES.glob("*.toml")):
        register(f"fs_rnn/{path.stem}", path)
