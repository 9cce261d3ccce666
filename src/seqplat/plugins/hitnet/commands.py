"""``seqplat export``: write a quantized run's packed weights, reload them and check the outputs match."""

from __future__ import annotations

import json
from typing import Any

import click
import torch
from torch import Tensor, nn

from seqplat import CheckpointError, ConfigError, RunConfig, SequenceModel, build_model, build_task

from .export import export_run, load_export, write_export


def probe_inputs(model: SequenceModel, run: RunConfig, batch: int = 2, steps: int = 16,
                 seed: int = 0) -> tuple[Tensor, Tensor | None]:
    """A fixed random input batch for the model's task (token ids or features, and times if used)."""
    g = torch.Generator().manual_seed(seed)
    task = build_task(run.task)
    if task.vocab_size is not None:
        x = torch.randint(0, task.vocab_size, (batch, steps), generator=g)
    else:
        x = torch.randn(batch, steps, task.input_features, generator=g)
    times = torch.rand(batch, steps, generator=g).cumsum(1) if model.uses_time else None
    return x, times


@torch.no_grad()
def outputs(model: nn.Module, x: Tensor, times: Tensor | None) -> Tensor:
    """Eval-mode outputs of ``model`` on ``x`` (a fresh evaluation: stochastic quantizers reseeded)."""
    model.eval()
    return model(x, None, times)[0]


def build_quantized(ref: str, quantizer: str | None = None) -> tuple[SequenceModel, RunConfig, str]:
    """The quantized model of a checkpoint or run (``quantizer`` quantizes a full-precision one post-training)."""
    from seqplat.core.checkpoint import load_checkpoint
    from seqplat.core.config import validate_run
    from seqplat.core.train import resolve_run_reference

    from .quantizer import load_full_precision

    url = resolve_run_reference(ref)
    ck = load_checkpoint(url, prefer="best")
    config = ck.config
    if quantizer is not None:
        if config.get("quantizer"):
            raise ConfigError(f"--quantizer: run '{ref}' is already quantized with '{config['quantizer']['name']}'; "
                              "drop --quantizer to export it as trained")
        config = {**config, "quantizer": {"name": quantizer}}
    elif not config.get("quantizer"):
        raise ConfigError(f"run '{ref}' has no quantizer: train with a quantizer (e.g. --recipe hitnet/default) or "
                          "pass --quantizer ternary to quantize its weights after training")
    else:
        config = {**config, "quantizer": {**config["quantizer"], "init_from": None}}
    run = validate_run(config)
    model = build_model(run)
    if quantizer is not None:
        load_full_precision(model, ck.url)
    else:
        try:
            model.load_state_dict(ck.model_state)
        except RuntimeError as exc:
            raise CheckpointError(f"Checkpoint '{ck.url}' does not fit the model its config describes: "
                                  f"{str(exc).splitlines()[0][:200]}") from exc
    return model, run, ck.url


def export_checkpoint(ref: str, out: str, quantizer: str | None = None) -> dict[str, Any]:
    """Export, reload and compare; returns the report (sizes in bytes, whether outputs match exactly)."""
    model, run, url = build_quantized(ref, quantizer)
    data, summary = export_run(model, run)
    write_export(out, data)
    reloaded, _, _ = load_export(out)
    x, times = probe_inputs(model, run)
    a, b = outputs(model, x, times), outputs(reloaded, x, times)
    exact = bool(torch.equal(a, b))
    return {"checkpoint": url, "out": out, "quantizer": run.quantizer["name"] if run.quantizer else None,
            "file_bytes": len(data), **summary, "outputs_equal": exact,
            "max_abs_diff": float((a - b).abs().max()) if a.numel() else 0.0}


@click.command("export")
@click.argument("ref", metavar="RUN_OR_CHECKPOINT")
@click.option("--out", required=True, metavar="FILE", help="Output safetensors file (any fsspec URL).")
@click.option("--quantizer", default=None, metavar="NAME",
              help="Quantize a full-precision run after training with this quantizer (e.g. ternary).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def export_command(ref: str, out: str, quantizer: str | None, as_json: bool) -> None:
    """Write packed quantized weights (2-bit ternary codes + scales) of a run, reload them, check the outputs.

    \b
    Examples:
      seqplat export runs/ptb_word-lstm-20261122-101500-ab12cd --out lstm.ternary.safetensors
      seqplat export RUN_ID --out fp.ternary.safetensors --quantizer ternary
    """
    report = export_checkpoint(ref, out, quantizer)
    if not report["outputs_equal"]:
        raise click.ClickException(f"reloaded export differs from the quantized model (max |diff| "
                                   f"{report['max_abs_diff']:.3g}); please report this as a bug")
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    click.echo(f"exported {report['checkpoint']} ({report['quantizer']}) -> {out}")
    q_fp, q = report["quantized_full_precision_bytes"], report["quantized_bytes"]
    click.echo(f"quantized parameters: {report['quantized_parameters']:,} of {report['parameters']:,}: "
               f"{q:,} bytes packed vs {q_fp:,} in float32 ({q_fp / max(q, 1):.1f}x smaller)")
    click.echo(f"size: {report['bytes']:,} bytes packed vs {report['full_precision_bytes']:,} bytes in float32 "
               f"({report['ratio']:.2f}x smaller); file on disk {report['file_bytes']:,} bytes")
    click.echo("reload: outputs reproduced exactly")
