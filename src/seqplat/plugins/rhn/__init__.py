"""Recurrent Highway Networks (Zilly et al. 2017) and Recurrent Highway Hypernetworks (Suarez 2017).

Cells ``rhn`` and ``hyper_rhn``, the task ``ptb_char_last5`` (Suarez's non-comparable scoring), the
regularizer ``rhn_token_dropout`` (Zilly's noise_x) and the recipes in ``recipes/``. See
``docs/plugins/rhn.md``.
"""

from pathlib import Path

import seqplat

from .cell import RHNCell
from .hyper import HyperRHNCell
from .regularizers import TokenDropout
from .tasks import PTBCharLast5Task

RECIPES = Path(__file__).parent / "recipes"


@seqplat.hookimpl
def register_cells(register):
    register("rhn", RHNCell)
    register("hyper_rhn", HyperRHNCell)


@seqplat.hookimpl
def register_tasks(register):
    register("ptb_char_last5", PTBCharLast5Task)


@seqplat.hookimpl
def register_regularizers(register):
    register("rhn_token_dropout", TokenDropout)


@seqplat.hookimpl
def register_recipes(register):
    for path in sorted(RECIPES.glob("*.toml")):
        register(f"rhn/{path.stem}", path)
