"""pytest fixtures for seqplat plugin authors.

Enable with ``pytest_plugins = ["seqplat.testing.pytest_plugin"]`` in a ``conftest.py``.

* ``seqplat_registry`` -- a fresh registry loaded from the installed entry points plus the toy tasks,
  installed as the process-wide registry for the test and restored afterwards.
* ``register_plugin`` -- ``register_plugin(obj, name)`` adds an inline plugin (a class or module with
  ``@seqplat.hookimpl`` functions) to that registry.
* ``tiny_run`` -- ``tiny_run(cell_spec, task="toy_stream", steps=4, **overrides)`` returns a validated
  :class:`RunConfig` for a few-step CPU run with tracking off and outputs under ``tmp_path``.
* ``two_rank_run`` -- ``two_rank_run(config)`` trains a run config (a :class:`RunConfig` or a mapping)
  on two CPU processes under ``accelerate launch`` and returns rank 0's result as a dict (``run_id``,
  ``valid``, ``test``, ``history``, ``steps``, ``run_dir``); see :mod:`seqplat.testing.distributed`.
"""

from __future__ import annotations

from typing import Any

import pytest

from seqplat.registry import Registry, set_registry
from seqplat.testing.distributed import run_two_ranks
from seqplat.testing.tasks import ToyTasksPlugin


@pytest.fixture
def seqplat_registry():
    reg = Registry.from_entry_points()
    if "toy_stream" not in reg.entries["task"]:
        reg.add_plugin(ToyTasksPlugin(), "seqplat_testing_toys")
    prev = set_registry(reg)
    yield reg
    set_registry(prev)


@pytest.fixture
def register_plugin(seqplat_registry):
    def add(obj: Any, name: str):
        info = seqplat_registry.add_plugin(obj, name)
        if info.broken:
            raise AssertionError(f"plugin {name} failed to register: {info.error}")
        return info

    return add


@pytest.fixture
def tiny_run(seqplat_registry, tmp_path):
    from seqplat.core.config import apply_override, validate_run

    def make(cell: dict[str, Any] | str = "lstm", task: dict[str, Any] | str = "toy_stream", steps: int = 4,
             overrides: tuple[str, ...] = (), **sections: Any):
        data: dict[str, Any] = {
            "cell": {"name": cell} if isinstance(cell, str) else cell,
            "task": {"name": task, "bptt": 10} if task == "toy_stream"
            else ({"name": task} if isinstance(task, str) else task),
            "train": {"steps": steps, "batch_size": 4, "eval_batch_size": 4, "eval_every": steps,
                      "checkpoint_every": steps, "log_every": 1},
            "tracking": {"enabled": False},
            "io": {"output_dir": str(tmp_path / "runs")},
        }
        for k, v in sections.items():
            data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
        for o in overrides:
            data = apply_override(data, o)
        return validate_run(data, seqplat_registry)

    return make


@pytest.fixture
def two_rank_run(tmp_path):
    """``two_rank_run(config, toy_tasks=True, timeout=300, env=None) -> dict``: a two-process CPU run.

    The ranks are fresh processes: they see the installed plugins (and, with ``toy_tasks``, the toy
    tasks), not plugins added to a test's registry with ``register_plugin``. Each call works in its
    own folder under ``tmp_path``.
    """
    calls = 0

    def run(config: Any, toy_tasks: bool = True, timeout: float = 300,
            env: dict[str, str] | None = None) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        data = config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config)
        return run_two_ranks(data, tmp_path / f"two-rank-{calls}", toy_tasks=toy_tasks, timeout=timeout, env=env)

    return run
