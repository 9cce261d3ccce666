"""Run a training job on two CPU processes under ``accelerate launch`` (for tests and plugin authors).

``run_two_ranks(config, workdir)`` writes the config, launches
``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m seqplat.testing.distributed``
and returns rank 0's result as a dict (metrics, history, run id). With ``toy_tasks=True`` the ranks
also register the toy tasks of :mod:`seqplat.testing.tasks`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_two_ranks(config: dict[str, Any], workdir: str | Path, toy_tasks: bool = True,
                  timeout: float = 300, env: dict[str, str] | None = None) -> dict[str, Any]:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path, out_path = workdir / "run.json", workdir / "result.json"
    cfg_path.write_text(json.dumps(config))
    full_env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "seqplat.testing.distributed", str(cfg_path), str(out_path), "1" if toy_tasks else "0"]
    proc = subprocess.run(cmd, cwd=workdir, env=full_env, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"two-rank run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(out_path.read_text())


def _main(cfg_path: str, out_path: str, toy: str) -> None:
    import torch

    from seqplat.core.config import validate_run
    from seqplat.core.train import release_process_group, train
    from seqplat.registry import get_registry

    torch.set_num_threads(1)
    reg = get_registry()
    if toy == "1" and "toy_stream" not in reg.entries["task"]:
        from seqplat.testing.tasks import ToyTasksPlugin

        reg.add_plugin(ToyTasksPlugin(), "seqplat_testing_toys")
    run = validate_run(json.loads(Path(cfg_path).read_text()))
    try:
        result = train(run, progress=False)
    finally:
        release_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out_path).write_text(json.dumps({
            "run_id": result.run_id, "valid": result.valid_metrics, "test": result.test_metrics,
            "history": result.history, "steps": result.steps, "run_dir": result.run_dir,
        }))


if __name__ == "__main__":
    _main(*sys.argv[1:4])
