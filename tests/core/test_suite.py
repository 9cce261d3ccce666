"""``seqplat suite`` end to end on a tiny inline protocol: three cells, nested MLflow runs, report, resume."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

import seqplat
import seqplat.cli.suite  # noqa: F401  (attaches `suite` until seqplat.cli imports it)
from seqplat.cli import main
from seqplat.core.errors import ConfigError
from seqplat.core.suite import protocol_cells, select_cells

TINY = {
    "description": "tiny protocol for tests",
    "task": {"name": "copy_memory", "delay": 5, "valid_size": 16, "test_size": 16},
    "train": {"steps": 4, "batch_size": 4, "eval_batch_size": 8, "eval_every": 2,
              "checkpoint_every": 4, "log_every": 1, "threads": 1},
    "tracking": {"log_checkpoint": False},
}


class TinyProtocol:
    """An inline plugin: protocol ``tinyp`` with cells lstm (baseline), gru, rnn and two decoys."""

    @staticmethod
    @seqplat.hookimpl
    def register_recipes(register):
        register("protocols/tinyp", TINY)
        register("baselines/tinyp", {"base": "protocols/tinyp", "cell": {"name": "lstm", "hidden_size": 8}})
        register("tinyq/tinyp", {"base": "protocols/tinyp", "cell": {"name": "gru", "hidden_size": 8}})
        register("tinyq/tinyp_rnn", {"base": "tinyq/tinyp", "cell": {"name": "rnn", "hidden_size": 8}})
        # named like the protocol but not on its budget (the base chain decides), directly and inherited
        register("tinyq/tinyp_other", {"cell": {"name": "rnn"}, "task": {"name": "copy_memory"}})
        register("tinyq/tinyp_other2", {"base": "tinyq/tinyp_other", "cell": {"name": "gru"}})


@pytest.fixture
def tiny_protocol(register_plugin):
    register_plugin(TinyProtocol(), "tinyq")


def test_protocol_cells_follow_the_base_chain(tiny_protocol):
    cells = protocol_cells("tinyp")
    assert [(c.cell, c.recipe) for c in cells] == [
        ("lstm", "baselines/tinyp"), ("gru", "tinyq/tinyp"), ("rnn", "tinyq/tinyp_rnn")]
    assert [c.recipe for c in select_cells(cells, ["rnn"], "tinyp")] == ["baselines/tinyp", "tinyq/tinyp_rnn"]
    with pytest.raises(ConfigError, match="--cells: gam_rhn not among protocol 'tinyp' cells"):
        select_cells(cells, ["gam_rhn"], "tinyp")
    with pytest.raises(ConfigError, match="unknown protocol 'nope'"):
        protocol_cells("nope")


def test_suite_runs_three_cells_nested_reports_and_resumes(tiny_protocol, tmp_path):
    out = tmp_path / "suite"
    runner = CliRunner()
    args = ["suite", "--protocol", "tinyp", "--seeds", "0,1", "--out", str(out), "--no-progress", "--json",
            "--in-process"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["skipped"] == []
    assert [(r["recipe"], r["seed"], r["status"]) for r in info["runs"]] == [
        (rec, seed, "finished") for rec in ("baselines/tinyp", "tinyq/tinyp", "tinyq/tinyp_rnn") for seed in (0, 1)]

    # report table: one summary row per cell with mean ± spread over the two seeds, one row per run
    report = (out / "report.md").read_text()
    summary = [line for line in report.splitlines() if line.startswith("| ") and "/6" not in line]
    for cell, recipe in (("lstm", "baselines/tinyp"), ("gru", "tinyq/tinyp"), ("rnn", "tinyq/tinyp_rnn")):
        row = next(line for line in summary if line.startswith(f"| {cell} | `{recipe}` |") and line.endswith("| 2/2 |"))
        assert row.count("±") == 5, row  # valid, test, tokens/s, memory, wall time
        runs = [line for line in summary if line.startswith(f"| {cell} | `{recipe}` | ") and "finished" in line]
        assert len(runs) == 2
        assert f"`seqplat train --recipe {recipe} --set train.seed=0`" in report
    assert "valid loss" in report and "test loss" in report
    assert "Memoryless baseline (loss): 0.8318." in report  # 10 ln 8 / (5 + 20)
    # each run records the commit it trained at; the report counts them (a rerun may mix commits)
    from seqplat.core.tracking import git_commit

    commit = git_commit()
    assert [r["commit"] for r in json.loads((out / "results.json").read_text())["runs"]] == [commit] * 6
    if commit:
        assert f"Runs trained at: {commit[:10]} (6 runs)." in report

    # plots are real PNGs
    for name in ("metric_vs_step", "metric_vs_wallclock", "tokens_per_s"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # MLflow: six children under one parent that holds the report
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    parent = client.get_run(info["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["seqplat.suite"] == "tinyp"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.run_id for r in children) == sorted(r["run_id"] for r in info["runs"])
    assert {r.data.tags["seqplat.cell"] for r in children} == {"lstm", "gru", "rnn"}
    assert {r.data.params["train.seed"] for r in children} == {"0", "1"}
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "suite")}
    assert {"suite/report.md", "suite/results.json", "suite/plots"} <= logged

    # rerun: everything finished is skipped, the same parent is reused, no new child runs
    state = json.loads((out / "suite_state.json").read_text())
    assert state["parent_run_id"] == parent.info.run_id
    again = runner.invoke(main, args)
    assert again.exit_code == 0, again.output
    info2 = json.loads(again.stdout)
    assert len(info2["skipped"]) == 6 and info2["parent_run_id"] == parent.info.run_id
    assert len(client.search_runs([parent.info.experiment_id], "")) == 7  # 6 children + parent

    # an entry left "running" (killed mid-run) resumes from its run folder's checkpoint, same MLflow run
    key = "tinyq/tinyp_rnn@seed1"
    state["entries"][key]["status"] = "running"
    (out / "suite_state.json").write_text(json.dumps(state))
    third = runner.invoke(main, args)
    assert third.exit_code == 0, third.output
    info3 = json.loads(third.stdout)
    assert key not in info3["skipped"] and len(info3["skipped"]) == 5
    resumed = next(r for r in info3["runs"] if r["recipe"] == "tinyq/tinyp_rnn" and r["seed"] == 1)
    assert resumed["status"] == "finished" and resumed["run_id"] == state["entries"][key]["run_id"]
    assert len(client.search_runs([parent.info.experiment_id], "")) == 7

    # a rerun that names fewer cells reuses the parent; its different `cells` value cannot overwrite the
    # write-once MLflow param (which made the rerun fail), so it is kept as a tag; the report lists those cells
    fewer = runner.invoke(main, [*args, "--cells", "rnn"])
    assert fewer.exit_code == 0, fewer.output
    assert [r["recipe"] for r in json.loads(fewer.stdout)["runs"]] == ["baselines/tinyp"] * 2 + ["tinyq/tinyp_rnn"] * 2
    parent = client.get_run(parent.info.run_id)
    assert parent.data.params["cells"] == "baselines/tinyp,tinyq/tinyp,tinyq/tinyp_rnn"
    assert parent.data.tags["seqplat.suite.latest.cells"] == "baselines/tinyp,tinyq/tinyp_rnn"
    assert "`tinyq/tinyp` |" not in (out / "report.md").read_text()


def test_suite_dry_run_and_bad_seeds(tiny_protocol):
    runner = CliRunner()
    res = runner.invoke(main, ["suite", "--protocol", "tinyp", "--cells", "gru", "--steps", "2", "--dry-run"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 2
    assert "seqplat train --recipe tinyq/tinyp --set train.seed=0 --set train.steps=2" in lines[1]
    bad = runner.invoke(main, ["suite", "--protocol", "tinyp", "--seeds", "a,b"])
    assert bad.exit_code == 2
    assert "--seeds: expected comma-separated integers such as 0,1,2, got 'a,b'" in bad.output


def test_suite_isolated_run_in_a_child_process(tiny_protocol, tmp_path):
    # the default --isolate trains in a fresh process from the resolved config (inline recipes work);
    # tracking off keeps the child light: the MLflow nesting is the same code path as in-process
    out = tmp_path / "iso"
    res = CliRunner().invoke(main, ["suite", "--protocol", "tinyp", "--cells", "lstm", "--out", str(out),
                                    "--steps", "2", "--set", "tracking.enabled=false", "--no-progress", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert [(r["recipe"], r["status"], r["run_id"]) for r in info["runs"]] == [("baselines/tinyp", "finished", None)]
    assert info["parent_run_id"] is None
    results = json.loads((out / "results.json").read_text())["runs"]
    assert results[0]["steps"] == 2 and results[0]["peak_memory_mb"] > 0 and results[0]["num_parameters"] > 0
    assert results[0]["command"] == ("seqplat train --recipe baselines/tinyp --set train.seed=0 "
                                     "--set tracking.enabled=false --set train.steps=2")
    assert "| lstm | `baselines/tinyp` | 0 | finished |" in (out / "report.md").read_text()


def test_suite_jobs_trains_runs_in_parallel_processes(tiny_protocol, tmp_path):
    # --jobs 2: the three runs go to two child processes at a time, all nested under one parent run,
    # every entry lands in the state file, and the report says the machine was shared
    out = tmp_path / "par"
    res = CliRunner().invoke(main, ["suite", "--protocol", "tinyp", "--out", str(out), "--steps", "2",
                                    "--jobs", "2", "--no-progress", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert sorted((r["recipe"], r["status"]) for r in info["runs"]) == [
        ("baselines/tinyp", "finished"), ("tinyq/tinyp", "finished"), ("tinyq/tinyp_rnn", "finished")]
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    for r in info["runs"]:
        assert client.get_run(r["run_id"]).data.tags["mlflow.parentRunId"] == info["parent_run_id"]
    state = json.loads((out / "suite_state.json").read_text())
    assert {k: v["status"] for k, v in state["entries"].items()} == {
        "baselines/tinyp@seed0": "finished", "tinyq/tinyp@seed0": "finished", "tinyq/tinyp_rnn@seed0": "finished"}
    assert "2 runs trained at a time (--jobs 2)" in (out / "report.md").read_text()
    bad = CliRunner().invoke(main, ["suite", "--protocol", "tinyp", "--jobs", "2", "--in-process"])
    assert bad.exit_code == 2
    assert "--jobs: parallel runs need --isolate" in bad.output


def test_leaderboard_merges_suite_reports(tiny_protocol, tmp_path):
    out = tmp_path / "lb" / "tinyp"
    runner = CliRunner()
    res = runner.invoke(main, ["suite", "--protocol", "tinyp", "--cells", "gru", "--out", str(out), "--steps", "2",
                               "--seeds", "0,1", "--in-process", "--set", "tracking.enabled=false", "--no-progress"])
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert "cores" in results["machine"] and results["commit"] is None or isinstance(results["commit"], str)
    ctx = tmp_path / "ctx.yaml"
    ctx.write_text("intro: Tiny page.\nprotocols:\n  tinyp:\n    budget: Two steps.\n"
                   "    papers:\n      tinyq/tinyp: '0.5 (the paper)'\n    notes: A note.\n  other:\n    budget: x\n")
    page_path = tmp_path / "page.md"
    res = runner.invoke(main, ["leaderboard", str(out), "--context", str(ctx), "--out", str(page_path)])
    assert res.exit_code == 0, res.output
    page = page_path.read_text()
    assert page.startswith("# Leaderboard\n\nTiny page.\n")
    assert "| [`other`](#other) | not yet measured |" in page
    assert "| [`tinyp`](#tinyp) | 4 runs |" in page
    lines = [ln for ln in page.splitlines() if ln.startswith("| lstm |") or ln.startswith("| gru |")]
    assert lines[0].startswith("| lstm | `baselines/tinyp` | - | ")  # the baseline first
    assert lines[1].startswith("| gru | `tinyq/tinyp` | 0.5 (the paper) | ")
    assert lines[1].endswith("| 2 | 0, 1 |")  # steps, seeds
    assert " ± " in lines[1]  # two seeds: mean ± spread
    assert "not in this suite run (not yet measured): `tinyq/tinyp_rnn`." in page
    assert "A note." in page and "Two steps." in page

    # runs trained at different commits (a suite resumed after an upgrade): the table names each
    commits = ["a" * 40, "a" * 40, "b" * 40, "b" * 40]
    results["runs"] = [dict(r, commit=c) for r, c in zip(results["runs"], commits, strict=True)]
    (out / "results.json").write_text(json.dumps(results))
    res = runner.invoke(main, ["leaderboard", str(out), "--context", str(ctx), "--out", str(page_path)])
    assert res.exit_code == 0, res.output
    row = next(ln for ln in page_path.read_text().splitlines() if ln.startswith("| [`tinyp`]"))
    assert "| aaaaaaaaaa (2 runs), bbbbbbbbbb (2 runs) |" in row
    assert "Runs trained" not in row  # the written column stops at the report's timestamp
    bad = runner.invoke(main, ["leaderboard", str(tmp_path / "nothing")])
    assert bad.exit_code == 2
    assert "no results.json here" in bad.output
