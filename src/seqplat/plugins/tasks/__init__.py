"""Core tasks (synthetic long-lag tasks, language modelling, sequential MNIST) and the protocol
base recipes ``protocols/<name>`` (task + training budget of PROTOCOLS.md, no cell)."""

from pathlib import Path

import seqplat

from .language import CharTextTask, Enwik8Task, PTBCharTask, PTBWordTask, Text8Task
from .mnist import PermutedMNISTTask, SequentialMNISTTask
from .synthetic import AddingTask, CopyMemoryTask, TemporalOrderTask

PROTOCOLS = Path(__file__).parent / "recipes" / "protocols"


@seqplat.hookimpl
def register_tasks(register):
    register("copy_memory", CopyMemoryTask)
    register("adding", AddingTask)
    register("temporal_order", TemporalOrderTask)
    register("ptb_char", PTBCharTask)
    register("text8", Text8Task)
    register("enwik8", Enwik8Task)
    register("char_text", CharTextTask)
    register("ptb_word", PTBWordTask)
    register("smnist", SequentialMNISTTask)
    register("psmnist", PermutedMNISTTask)


@seqplat.hookimpl
def register_recipes(register):
    for path in sorted(PROTOCOLS.glob("*.toml")):
        register(f"protocols/{path.stem}", path)
