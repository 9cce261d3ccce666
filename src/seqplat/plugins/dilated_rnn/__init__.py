"""Dilated RNN (Chang et al. 2017): dilated recurrent layers around any registered cell."""

from pathlib import Path

import seqplat

from .capacity import DilatedCapacity, mean_recurrent_length, memory_capacity, recurrent_path_lengths
from .cell import DilatedRNNCell, fold_time, unfold_time
from .config import DilatedRNNConfig

__all__ = [
    "DilatedCapacity", "DilatedRNNCell", "DilatedRNNConfig", "fold_time", "mean_recurrent_length",
    "memory_capacity", "recurrent_path_lengths", "unfold_time",
]

RECIPES = Path(__file__).parent / "recipes"


@seqplat.hookimpl
def register_cells(register):
    register("dilated_rnn", DilatedRNNCell)


@seqplat.hookimpl
def register_recipes(register):
    for path in sorted(RECIPES.glob("*.toml")):
        register(f"dilated_rnn/{path.stem}", path)


@seqplat.hookimpl
def register_commands(cli):
    from .commands import dilated_info

    cli.add_command(dilated_info)
