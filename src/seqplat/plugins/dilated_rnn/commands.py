"""``seqplat dilated-info``: the memory-capacity figures of a run config's dilated stack."""

from __future__ import annotations

import json
from typing import Any

import click

from seqplat import ConfigError, SeqplatError, build_run_config, build_task

from .capacity import DilatedCapacity, memory_capacity
from .config import DilatedRNNConfig


def capacity_of_run(cell: dict[str, Any], seq_len: int | None) -> DilatedCapacity:
    """Figures for a resolved ``dilated_rnn`` cell spec."""
    cfg = DilatedRNNConfig.model_validate({k: v for k, v in cell.items() if k != "name"})
    dilations = cfg.layer_dilations
    window = dilations[0] if cfg.concat_outputs else 1
    return memory_capacity(dilations, seq_len=seq_len, head_window=window)


def task_sequence_length(task_spec: dict[str, Any], seed: int = 0) -> int:
    """Time steps of the task's training sequences (one batch of one row is drawn to find out)."""
    task = build_task(task_spec)
    return int(task.train_batch(0, 1, seed).inputs.shape[1])


@click.command("dilated-info")
@click.option("--recipe", default="dilated_rnn/default", show_default=True, help="recipe to read")
@click.option("--config", "config_files", multiple=True, help="config file(s) merged over the recipe")
@click.option("--set", "overrides", multiple=True, help="override, e.g. --set cell.dilations=[1,2,4]")
@click.option("--seq-len", type=click.IntRange(min=1), default=None,
              help="sequence length T (default: the task's training sequence length)")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def dilated_info(recipe: str, config_files: tuple[str, ...], overrides: tuple[str, ...],
                 seq_len: int | None, as_json: bool) -> None:
    """Print the mean recurrent length and other memory-capacity figures of a dilated_rnn config."""
    try:
        run = build_run_config(recipe=recipe, config_files=config_files, overrides=overrides)
    except ConfigError as exc:
        raise click.ClickException("\n".join(exc.lines)) from exc
    if run.cell["name"] != "dilated_rnn":
        raise click.ClickException(
            f"cell.name: '{run.cell['name']}' is not a dilated_rnn; pick a dilated_rnn recipe or "
            "--set cell.name=dilated_rnn"
        )
    note = None
    if seq_len is None:
        try:
            seq_len = task_sequence_length(run.task, run.train.seed)
        except (SeqplatError, OSError, NotImplementedError) as exc:
            note = f"sequence length unknown ({type(exc).__name__}: {exc}); pass --seq-len"
    cap = capacity_of_run(run.cell, seq_len)
    if as_json:
        click.echo(json.dumps(cap.as_dict(), indent=2))
        return
    rows = cap.rows()
    width = max(len(label) for label, _ in rows)
    click.echo(f"{recipe}: {run.cell['inner'].get('name')} x {len(cap.dilations)} layers, task {run.task['name']}")
    for label, value in rows:
        click.echo(f"  {label.ljust(width)}  {value}")
    if note:
        click.echo(f"  ({note})")
