"""HitNet (Wang et al., NeurIPS 2018): hybrid ternary quantization of recurrent cells, and its baselines."""

from pathlib import Path

import seqplat

from .config import BinaryConfig, HitNetConfig, QuantizeConfig, TernaryConfig, UniformConfig
from .export import load_export, size_report, size_summary
from .quantizer import BinaryQuantizer, HitNetQuantizer, TernaryQuantizer, UniformQuantizer

__all__ = [
    "BinaryConfig", "BinaryQuantizer", "HitNetConfig", "HitNetQuantizer", "QuantizeConfig", "TernaryConfig",
    "TernaryQuantizer", "UniformConfig", "UniformQuantizer", "load_export", "size_report", "size_summary",
]

RECIPES = Path(__file__).parent / "recipes"


@seqplat.hookimpl
def register_quantizers(register):
    register("hitnet", HitNetQuantizer)
    register("ternary", TernaryQuantizer)
    register("uniform", UniformQuantizer)
    register("binary", BinaryQuantizer)


@seqplat.hookimpl
def register_recipes(register):
    for path in sorted(RECIPES.glob("*.toml")):
        register(f"hitnet/{path.stem}", path)


@seqplat.hookimpl
def register_commands(cli):
    from .commands import export_command

    cli.add_command(export_command)
