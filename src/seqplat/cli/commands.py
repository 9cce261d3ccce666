"""Built-in commands: train, evaluate, plugins, cells, tasks, recipes, regularizers, quantizers, config."""

from __future__ import annotations

import json
from typing import Any

import click

from seqplat.cli import UserError, echo_json, main, resolve, source_options
from seqplat.core.errors import ConfigError


@main.command()
@source_options
@click.option("--resume", default=None, metavar="URL",
              help="Continue a run from its folder or checkpoint URL (its stored config is used; --set may extend "
                   "train.steps).")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or ./mlflow.db).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option("--register-model", default=None, metavar="NAME",
              help="Register the best checkpoint in the MLflow model registry under NAME.")
def train(plugin, recipe, config_files, overrides, resume, tracking_uri, no_progress, register_model) -> None:
    """Train a model and log the run to MLflow.

    \b
    Examples:
      seqplat train --plugin gam_rhn
      seqplat train --recipe baselines/ptb_char_small --set train.lr=2e-3
      seqplat train --resume runs/ptb_char-lstm-20261122-101500-ab12cd
    """
    from seqplat.core.config import apply_override, validate_run
    from seqplat.core.train import release_process_group
    from seqplat.core.train import train as run_training

    if resume is not None:
        from seqplat.core.checkpoint import load_checkpoint

        data = load_checkpoint(resume).config
        for assignment in overrides:
            data = apply_override(data, assignment)
        if tracking_uri:
            data["tracking"]["tracking_uri"] = tracking_uri
        run = validate_run(data)
    else:
        extra = list(overrides) + ([f"tracking.tracking_uri={tracking_uri}"] if tracking_uri else [])
        run = resolve(plugin, recipe, config_files, tuple(extra))
    if register_model:
        run = validate_run({**run.model_dump(mode="json"),
                            "tracking": {**run.tracking.model_dump(mode="json"), "register_model": register_model}})
    try:
        result = run_training(run, resume=resume, progress=not no_progress)
    finally:
        release_process_group()  # under accelerate launch: gloo's group ended cleanly, not at exit
    click.echo(f"valid: {_fmt(result.valid_metrics)}")
    click.echo(f"test:  {_fmt(result.test_metrics)}")
    click.echo(f"parameters: {result.num_parameters:,}  steps: {result.steps}  "
               f"train tokens/s: {result.train_tokens_per_s:,.0f}  wall: {result.wall_time_s:.1f}s")
    click.echo(f"checkpoint: {result.checkpoint_dir}")
    if result.run_id:
        where = f" (logged locally to {result.tracking_uri}: the server was unreachable)" if result.tracking_uri else ""
        click.echo(f"mlflow run: {result.run_id}{where}")
    if result.registered_model:
        click.echo(f"registered model: {result.registered_model}")


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


@main.command()
@click.argument("ref", metavar="RUN_ID_OR_CHECKPOINT_URL")
@click.option("--split", type=click.Choice(["valid", "test"]), default="test", show_default=True)
@click.option("--batch-size", type=int, default=None, help="Evaluation batch size (default: the run's).")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI for run ids.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def evaluate(ref, split, batch_size, tracking_uri, as_json) -> None:
    """Rebuild a model from a logged run (id or runs:/ID) or a checkpoint URL and print its metrics."""
    if tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
    from seqplat.core.train import evaluate_checkpoint

    metrics, run = evaluate_checkpoint(ref, split, batch_size)
    if as_json:
        echo_json({"split": split, "cell": run.cell["name"], "task": run.task["name"], "metrics": metrics})
    else:
        click.echo(f"{run.cell['name']} on {run.task['name']} ({split}): {_fmt(metrics)}")


# -- plugins -------------------------------------------------------------------------------------

@main.group()
def plugins() -> None:
    """Installed plugins."""


@plugins.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins_list(as_json: bool) -> None:
    """List plugins with distribution, version, status and what they registered."""
    from seqplat.registry import get_registry

    reg = get_registry()
    rows = [info.as_dict() for info in sorted(reg.plugins.values(), key=lambda i: i.name)]
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("No plugins loaded (is SEQPLAT_LOAD_PLUGINS empty?).")
    for r in rows:
        kinds = ("cells", "tasks", "regularizers", "quantizers", "recipes")
        what = ", ".join(f"{len(r[k])} {k}" for k in kinds if r[k])
        status = "ok" if r["status"] == "ok" else f"BROKEN: {r['error']}"
        click.echo(f"{r['name']:<14} {r['distribution'] or '-'} {r['version'] or '-':<8} {status}"
                   + (f"  [{what}]" if what and r["status"] == "ok" else ""))


@plugins.command("info")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins_info(name: str, as_json: bool) -> None:
    """Show one plugin: distribution, version, hooks, and every name it registered."""
    from seqplat.registry import get_registry

    info = get_registry().get_plugin(name).as_dict()
    if as_json:
        echo_json(info)
        return
    for k in ("name", "distribution", "version", "module", "status", "error"):
        if info[k] is not None:
            click.echo(f"{k}: {info[k]}")
    click.echo(f"hooks: {', '.join(info['hooks']) or '-'}")
    for k in ("cells", "tasks", "regularizers", "quantizers", "recipes"):
        click.echo(f"{k}: {', '.join(info[k]) or '-'}")


# -- listings ------------------------------------------------------------------------------------

def _fields(model_cls: Any) -> list[dict[str, Any]]:
    out = []
    for name, f in model_cls.model_fields.items():
        default = f.get_default(call_default_factory=True)
        if hasattr(default, "model_dump"):
            default = default.model_dump(mode="json")
        out.append({"name": name, "type": _type_name(f.annotation), "default": default,
                    "description": f.description or ""})
    return out


def _type_name(t: Any) -> str:
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def _listing(kind: str, as_json: bool, options: bool) -> None:
    from seqplat.registry import get_registry

    reg = get_registry()
    rows = []
    for name in reg.names(kind):
        e = reg.get(kind, name)
        row: dict[str, Any] = {"name": name, "plugin": e.plugin, "description": e.description}
        if kind != "recipe":
            row["options"] = _fields(e.obj.config_class)
        rows.append(row)
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        click.echo(f"{r['name']:<28} {r['plugin']:<12} {r['description']}")
        if options and "options" in r:
            for o in r["options"]:
                click.echo(f"    {o['name']} ({o['type']}, default {json.dumps(o['default'])}): {o['description']}")


for _kind, _help in (("cell", "recurrent cells"), ("task", "tasks"), ("regularizer", "regularizers"),
                     ("quantizer", "quantizers"), ("recipe", "recipes (named complete runs)")):
    def _make(kind: str = _kind, help_text: str = _help) -> click.Command:
        @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
        @click.option("--options", is_flag=True, help="Show each one's config fields.")
        def cmd(as_json: bool, options: bool) -> None:
            _listing(kind, as_json, options)

        cmd.__doc__ = f"List installed {help_text}."
        return click.command(name=kind + "s")(cmd)

    main.add_command(_make())


# -- config --------------------------------------------------------------------------------------

@main.group()
def config() -> None:
    """Inspect resolved run configurations."""


@config.command("show")
@source_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (includes num_parameters).")
def config_show(plugin, recipe, config_files, overrides, as_json) -> None:
    """Print the resolved config (recipe -> --config -> --set) and the model's parameter count."""
    import torch

    from seqplat.core.model import build_model, count_parameters
    from seqplat.core.train import run_to_yaml

    run = resolve(plugin, recipe, config_files, overrides)
    torch.manual_seed(run.train.seed)
    num = count_parameters(build_model(run))
    if as_json:
        echo_json({"config": run.model_dump(mode="json"), "num_parameters": num})
    else:
        click.echo(run_to_yaml(run).rstrip())
        click.echo(f"# num_parameters: {num:,}")


@config.command("schema")
@click.option("--cell", default=None, help="Print this cell's option schema instead of the run's.")
@click.option("--task", default=None, help="Print this task's option schema instead of the run's.")
def config_schema(cell: str | None, task: str | None) -> None:
    """Print the JSON schema of the run config (or of one cell's or task's options)."""
    from seqplat.core.config import RunConfig
    from seqplat.registry import get_registry

    if cell and task:
        raise UserError("--cell and --task: give one of them")
    if cell or task:
        entry = get_registry().get("cell" if cell else "task", cell or task)
        echo_json(entry.obj.config_class.model_json_schema())
    else:
        echo_json(RunConfig.model_json_schema())


# -- bench ---------------------------------------------------------------------------------------

@main.command()
@source_options
@click.option("--hidden", "hidden", multiple=True, type=int, help="Hidden size(s) (default: the config's).")
@click.option("--batch", "batch", multiple=True, type=int, default=(32,), show_default=True, help="Batch size(s).")
@click.option("--time", "time_steps", multiple=True, type=int, default=(100,), show_default=True,
              help="Sequence length(s).")
@click.option("--input-size", type=int, default=128, show_default=True, help="Input features per step.")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
@click.option("--repeats", type=int, default=5, show_default=True)
@click.option("--warmup", type=int, default=2, show_default=True)
@click.option("--all", "all_cells", is_flag=True,
              help="Every installed cell at H in {256,1024}, B in {32,128}, T in {100,1000} (unless given).")
@click.option("--reference", is_flag=True,
              help="Time the cells' plain PyTorch reference paths (fast paths off), e.g. seqplat's own LSTM.")
@click.option("--compile", "compiled", type=click.Choice(["model", "step"]), is_flag=False, flag_value="model",
              default=None, help="Time the cell under torch.compile and report its compile time (compile_s): "
              "'model' (the default when no value is given) compiles the whole cell, 'step' only its one-step "
              "function (compile time independent of T).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--mlflow", "log_mlflow", is_flag=True, help="Also log the results as an MLflow run.")
def bench(plugin, recipe, config_files, overrides, hidden, batch, time_steps, input_size, threads, repeats, warmup,
          all_cells, reference, compiled, as_json, log_mlflow) -> None:
    """Train/inference tokens/s, FLOPs and memory of a cell, beside torch's fused LSTM, as ratios.

    \b
    Examples:
      seqplat bench --set cell.name=gru --hidden 256 --hidden 1024
      seqplat bench --recipe gam_rhn/ptb_char_1m --batch 32 --batch 128
      seqplat bench --all --json > bench.json
      seqplat bench --set cell.name=lstm --reference --batch 1
      seqplat bench --set cell.name=lstm --set quantizer.name=ternary --hidden 256
      seqplat bench --set cell.name=gru --compile --time 100 --time 200
      seqplat bench --set cell.name=rhn --compile step --time 100 --time 200
    """
    from seqplat.core.bench import bench_cell, matmul_peak_gflops, with_hidden
    from seqplat.registry import get_registry

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    peak = matmul_peak_gflops()
    quantizer = None  # a recipe's quantizer (e.g. hitnet's) is applied to its cell, as in training
    if all_cells:
        specs = [{"name": n} for n in get_registry().names("cell")]
        hidden = hidden or (256, 1024)
        if batch == (32,):
            batch = (32, 128)
        if time_steps == (100,):
            time_steps = (100, 1000)
    else:
        # only the cell and quantizer are used: the bench feeds the cell its own inputs (and timestamps to
        # cells that read them), so whether the recipe's task suits the cell does not matter here
        run = resolve(plugin, recipe, config_files, overrides, check=False)
        specs, quantizer = [run.cell], run.quantizer
    results = []
    no_step: set[str] = set()  # --all --compile step: cells with no step function to compile
    for spec in specs:
        for h in hidden or (spec.get("hidden_size"),):
            try:
                s = with_hidden(spec, h)
            except Exception as exc:  # noqa: BLE001 - --all goes on past cells without a hidden_size
                if not all_cells:
                    raise
                click.echo(f"skip {spec['name']}: {exc}", err=True)
                continue
            size = int(s.get("hidden_size") or h or 0)
            for b in batch:
                for t in time_steps:
                    if spec["name"] in no_step:
                        continue
                    try:
                        r = bench_cell(s, size, b, t, input_size, threads, repeats, warmup, peak=peak,
                                       reference=reference, quantizer=quantizer, compiled=compiled)
                    except ConfigError as exc:
                        if not all_cells or compiled != "step":
                            raise
                        click.echo(f"skip {spec['name']}: {exc}", err=True)
                        no_step.add(spec["name"])
                        continue
                    results.append(r.as_dict())
                    if not as_json:
                        # at B=1 (streaming) the time of one inference step is the figure that matters
                        step = (f"  infer step {r.infer_step_us_per_token_row:,.1f} us "
                                f"(LSTM {r.lstm_infer_step_us_per_token_row:,.1f} us)") if r.batch == 1 else ""
                        step += (f"  compile {r.compile_s:.1f} s (training {r.compile_train_s:.1f} + inference "
                                 f"{r.compile_infer_s:.1f})") if compiled else ""
                        memory = f"saved {r.saved_mb:.1f} MB"
                        if r.train_peak_mb is not None:
                            memory = (f"train peak +{r.train_peak_mb:,.0f} MB (LSTM +{r.lstm_train_peak_mb or 0:,.0f}"
                                      f" MB)  {memory}")
                        click.echo(
                            f"{r.name:<14} H={r.hidden:<5} B={r.batch:<4} T={r.time:<5} thr={r.threads} "
                            f"train {r.train_tokens_per_s:>10,.0f} tok/s ({r.train_ratio_vs_lstm:.2f}x LSTM)  "
                            f"infer {r.infer_tokens_per_s:>10,.0f} tok/s ({r.infer_ratio_vs_lstm:.2f}x)  "
                            f"{r.gflops_train:6.1f} GFLOP/s ({r.flop_rate_ratio_vs_lstm:.2f}x LSTM, "
                            f"peak {r.matmul_peak_gflops:.0f})  {memory}{step}"
                        )
    if as_json:
        echo_json(results)
    if log_mlflow:
        import mlflow

        mlflow.set_experiment("seqplat-bench")
        with mlflow.start_run(run_name="bench"):
            for i, r in enumerate(results):
                mlflow.log_metrics({k: float(v) for k, v in r.items() if isinstance(v, int | float)}, step=i)
            mlflow.log_dict(results, "bench.json")
