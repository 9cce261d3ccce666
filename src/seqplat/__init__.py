"""seqplat: train, reproduce and compare long-memory recurrent sequence models.

The public API that plugins import: the hook markers, the cell/task/regularizer/quantizer
contracts, and the builders.
"""

from seqplat.core.cell import Cell, CellConfig, State, StepCell, ZoneoutConfig, detach_state, map_state
from seqplat.core.config import ModelConfig, RunConfig, build_run_config
from seqplat.core.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DuplicateNameError,
    PluginLoadError,
    SeqplatError,
    UnknownNameError,
)
from seqplat.core.hookspecs import hookimpl, hookspec
from seqplat.core.model import SequenceModel, build_cell, build_model, build_task, count_parameters
from seqplat.core.quantize import Quantizer, QuantizerConfig, straight_through
from seqplat.core.regularize import Regularizer, RegularizerConfig
from seqplat.core.task import Batch, LanguageModelTask, StreamLMConfig, Task, TaskConfig

__version__ = "0.1.0"

__all__ = [
    "Batch", "Cell", "CellConfig", "CheckpointError", "ConfigError", "DataError", "DuplicateNameError",
    "LanguageModelTask", "ModelConfig", "PluginLoadError", "Quantizer", "QuantizerConfig", "Regularizer",
    "RegularizerConfig", "RunConfig", "SeqplatError", "SequenceModel", "State", "StepCell", "StreamLMConfig",
    "Task", "TaskConfig", "UnknownNameError", "ZoneoutConfig", "build_cell", "build_model", "build_run_config",
    "build_task", "count_parameters", "detach_state", "hookimpl", "hookspec", "map_state", "straight_through",
]
