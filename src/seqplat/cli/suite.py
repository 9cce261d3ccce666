"""``seqplat suite``: run a comparison protocol over every installed cell and write one report."""

from __future__ import annotations

import click

from seqplat.cli import UserError, echo_json, main


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise UserError(f"--seeds: expected comma-separated integers such as 0,1,2, got {text!r}") from exc
    if not seeds or any(s < 0 for s in seeds):
        raise UserError(f"--seeds: expected non-negative integers such as 0,1,2, got {text!r}")
    return seeds


@click.command()
@click.option("--protocol", required=True, help="Protocol name, e.g. ptb_char_1m (recipes protocols/<name>).")
@click.option("--cells", default=None, metavar="A,B,...",
              help="Only these cells (cell names or recipe names); the LSTM baseline is always run.")
@click.option("--seeds", default="0", show_default=True, metavar="0,1,2", help="Seeds to run for every cell.")
@click.option("--out", default=None, metavar="DIR_OR_URL",
              help="Folder or fsspec URL for the state file, runs and report (default: suite-<protocol>).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a field in every cell's run, e.g. --set train.threads=2 (repeatable).")
@click.option("--steps", type=int, default=None, help="Shorthand for --set train.steps=N (smoke runs).")
@click.option("--isolate/--in-process", default=True, show_default=True,
              help="Train each run in a fresh process (its own peak memory; installed plugins only) or in this one.")
@click.option("--jobs", type=int, default=1, show_default=True,
              help="Train this many runs at once, each in its own process (one per core, with train.threads=1).")
@click.option("--dry-run", is_flag=True, help="List the cells and commands the suite would run, then stop.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def suite(protocol, cells, seeds, out, overrides, steps, isolate, jobs, dry_run, as_json, no_progress) -> None:
    """Train every installed cell on one protocol's budget and report them side by side.

    Runs are nested under one MLflow parent run; finished (recipe, seed) entries are recorded in
    <out>/suite_state.json and skipped when the command is run again.

    \b
    Examples:
      seqplat suite --protocol ptb_char_1m --seeds 0,1,2
      seqplat suite --protocol copy_200 --cells lstm,gam_rhn --out s3://bucket/suites/copy_200
      seqplat suite --protocol adding_400 --steps 20 --dry-run
      seqplat suite --protocol psmnist_1ep --jobs 2 --set train.threads=1
    """
    from seqplat.core.suite import _command, protocol_cells, run_suite, select_cells

    seed_list = _seeds(seeds)
    wanted = [c for c in cells.split(",")] if cells else None
    if steps is not None and steps < 1:
        raise UserError(f"--steps: expected a positive integer, got {steps}")
    if jobs < 1:
        raise UserError(f"--jobs: expected a positive integer, got {jobs}")
    if jobs > 1 and not isolate:
        raise UserError("--jobs: parallel runs need --isolate (each run in its own process); drop --in-process")
    if dry_run:
        chosen = select_cells(protocol_cells(protocol), wanted, protocol)
        extra = list(overrides) + ([f"train.steps={steps}"] if steps is not None else [])
        rows = [{"cell": c.cell, "recipe": c.recipe, "plugin": c.plugin, "seed": s,
                 "command": _command(c.recipe, s, extra)} for c in chosen for s in seed_list]
        if as_json:
            echo_json(rows)
        else:
            for r in rows:
                click.echo(f"{r['cell']:<16} {r['recipe']:<36} {r['command']}")
        return
    result = run_suite(protocol, cells=wanted, seeds=seed_list, out=out, overrides=overrides, steps=steps,
                       progress=not no_progress, isolate=isolate, jobs=jobs)
    if as_json:
        echo_json({"protocol": result.protocol, "out": result.out, "parent_run_id": result.parent_run_id,
                   "skipped": result.skipped, "files": result.files,
                   "runs": [{"recipe": e.recipe, "seed": e.seed, "status": e.status, "run_id": e.run_id}
                            for e in result.entries]})
        return
    click.echo(result.report_markdown)
    if result.skipped:
        click.echo(f"skipped (already finished): {', '.join(result.skipped)}")
    click.echo(f"report: {result.out.rstrip('/')}/report.md")
    if result.parent_run_id:
        click.echo(f"mlflow parent run: {result.parent_run_id}")


@click.command()
@click.argument("suites", nargs=-1, required=True, metavar="SUITE_DIR...")
@click.option("--context", default=None, metavar="FILE_OR_URL",
              help="YAML with the page's intro, each protocol's budget line, the papers' figures and notes.")
@click.option("--out", default=None, metavar="FILE_OR_URL", help="Write the page here (default: print it).")
def leaderboard(suites, context, out) -> None:
    """Merge the reports of several `seqplat suite` runs into one Markdown leaderboard.

    Each SUITE_DIR is the --out folder (or URL) of a suite run, one per protocol.

    \b
    Examples:
      seqplat leaderboard leaderboard/* --context docs/leaderboard.yaml --out docs/leaderboard.md
    """
    import fsspec

    from seqplat.core.leaderboard import load_context, read_suite, render

    page = render([read_suite(s) for s in suites], load_context(context))
    if out is None:
        click.echo(page, nl=False)
        return
    with fsspec.open(out, "w") as f:
        f.write(page)
    click.echo(f"leaderboard: {out} ({len(suites)} suites)")


main.add_command(suite)
main.add_command(leaderboard)
