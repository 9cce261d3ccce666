"""Phased LSTM (Neil, Pfeiffer & Liu, NeurIPS 2016): the ``phased_lstm`` cell, the frequency
discrimination and N-MNIST tasks with timestamps, and the paper's recipes. Docs: docs/plugins/phased_lstm.md."""

from pathlib import Path

import seqplat

from .cell import PhasedLSTMCell
from .freq import FreqDiscriminationTask
from .nmnist import NMNISTTask

RECIPES = Path(__file__).parent / "recipes"


@seqplat.hookimpl
def register_cells(register):
    register("phased_lstm", PhasedLSTMCell)


@seqplat.hookimpl
def register_tasks(register):
    register("freq_discrimination", FreqDiscriminationTask)
    register("nmnist", NMNISTTask)


@seqplat.hookimpl
def register_recipes(register):
    for path in sorted(RECIPES.glob("*.toml")):
        register(f"phased_lstm/{path.stem}", path)
