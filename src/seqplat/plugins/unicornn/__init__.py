"""UnICORNN and coRNN oscillator RNNs (Rusch & Mishra 2021), their tasks and recipes."""

from pathlib import Path

import seqplat

from .cell import CoRNNCell, UnICORNNCell
from .tasks import EigenWormsTask, IMDBTask, NoisyCIFAR10Task

RECIPES = Path(__file__).parent / "recipes"


@seqplat.hookimpl
def register_cells(register):
    register("unicornn", UnICORNNCell)
    register("cornn", CoRNNCell)


@seqplat.hookimpl
def register_tasks(register):
    register("noisy_cifar10", NoisyCIFAR10Task)
    register("eigenworms", EigenWormsTask)
    register("imdb", IMDBTask)


@seqplat.hookimpl
def register_recipes(register):
    for path in sorted(RECIPES.glob("*.toml")):
        register(f"unicornn/{path.stem}", path)


@seqplat.hookimpl
def register_commands(cli):
    from .memory import unicornn_memory

    cli.add_command(unicornn_memory)
