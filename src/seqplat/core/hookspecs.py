"""The hooks a seqplat plugin can implement.

A plugin is a module (found through the ``seqplat`` entry-point group) whose functions carry
``@seqplat.hookimpl``. Each ``register_*`` hook receives a ``register`` callback; the host validates
every call, rejects duplicate names (naming both plugins) and records which plugin registered what.
Implementations may accept fewer arguments than the spec, so the specs can grow.
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("seqplat")
hookimpl = pluggy.HookimplMarker("seqplat")


@hookspec
def register_cells(register: Any) -> None:
    """Register recurrent cells buildable by name (``--set cell.name=NAME``).

    Call ``register(name, cell_cls)`` once per cell. ``cell_cls`` subclasses
    :class:`seqplat.Cell` (or :class:`seqplat.StepCell`) and names its pydantic config model in
    the class attribute ``config_class``. Names are global; a duplicate raises
    :class:`~seqplat.core.errors.DuplicateNameError` naming both plugins.

    :param register: ``(name: str, cell: type[Cell]) -> None``

    Example::

        @seqplat.hookimpl
        def register_cells(register):
            register("phased_lstm", PhasedLSTMCell)
    """


@hookspec
def register_tasks(register: Any) -> None:
    """Register tasks: data, input encoder, head, loss and metrics.

    Call ``register(name, task_cls)`` once per task; ``task_cls`` subclasses
    :class:`seqplat.Task` and names its config model in ``config_class``.

    :param register: ``(name: str, task: type[Task]) -> None``

    Example::

        @seqplat.hookimpl
        def register_tasks(register):
            register("copy_memory", CopyMemoryTask)
    """


@hookspec
def register_regularizers(register: Any) -> None:
    """Register regularizers that wrap a model or add loss terms.

    Call ``register(name, regularizer_cls)``; the class subclasses :class:`seqplat.Regularizer`.
    Users enable them with ``--set 'regularizers=[{name: weight_drop, p: 0.5}]'``.

    :param register: ``(name: str, regularizer: type[Regularizer]) -> None``

    Example::

        @seqplat.hookimpl
        def register_regularizers(register):
            register("weight_drop", WeightDrop)
    """


@hookspec
def register_quantizers(register: Any) -> None:
    """Register quantizers that replace weights and activations at the roles cells expose.

    Call ``register(name, quantizer_cls)``; the class subclasses :class:`seqplat.Quantizer`.

    :param register: ``(name: str, quantizer: type[Quantizer]) -> None``

    Example::

        @seqplat.hookimpl
        def register_quantizers(register):
            register("hitnet", HitNetQuantizer)
    """


@hookspec
def register_recipes(register: Any) -> None:
    """Register named, complete run configurations.

    Call ``register(name, source, description="")`` where ``name`` is ``"<plugin>/<recipe>"`` and
    ``source`` is a ``dict`` or a path to a TOML/YAML/JSON file. The recipe ``<plugin>/default``
    is what ``seqplat train --plugin <plugin>`` runs.

    :param register: ``(name: str, source: dict | str | Path, description: str = "") -> None``

    Example::

        @seqplat.hookimpl
        def register_recipes(register):
            register("gam_rhn/default", Path(__file__).parent / "recipes" / "default.toml")
    """


@hookspec
def register_commands(cli: Any) -> None:
    """Add click commands to the ``seqplat`` command line.

    :param cli: the root :class:`click.Group`; call ``cli.add_command(cmd)``.

    Example::

        @seqplat.hookimpl
        def register_commands(cli):
            cli.add_command(my_command)
    """
