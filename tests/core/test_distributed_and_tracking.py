import json
import os

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from seqplat.cli import main
from seqplat.core.train import train
from seqplat.testing.distributed import run_two_ranks


def test_mlflow_run_contents(tiny_run, tmp_path):
    uri = os.environ["MLFLOW_TRACKING_URI"]
    run = tiny_run({"name": "lstm", "hidden_size": 8}, steps=6, tracking={"enabled": True},
                   train={"eval_every": 3, "log_every": 2})
    res = train(run, progress=False)
    client = MlflowClient(uri)
    r = client.get_run(res.run_id)
    assert r.info.status == "FINISHED"
    assert r.data.params["cell.hidden_size"] == "8"
    assert r.data.params["train.steps"] == "6"
    assert int(r.data.params["num_parameters"]) == res.num_parameters
    assert r.data.tags["seqplat.cell"] == "lstm" and r.data.tags["seqplat.plugin.baselines"] == "0.1.0"
    assert [m.step for m in client.get_metric_history(res.run_id, "train_loss")] == [2, 4, 6]
    assert [m.step for m in client.get_metric_history(res.run_id, "valid_bpc")] == [3, 6]
    assert "test_bpc" in r.data.metrics
    arts = {a.path for a in client.list_artifacts(res.run_id)}
    assert {"config.yaml", "metrics.md", "plots", "checkpoint"} <= arts
    assert {a.path for a in client.list_artifacts(res.run_id, "plots")} == {"plots/learning_curve.png"}
    ck = {a.path for a in client.list_artifacts(res.run_id, "checkpoint")}
    assert "checkpoint/model.safetensors" in ck and "checkpoint/config.json" in ck
    exp = client.get_experiment(r.info.experiment_id)
    assert exp.name == "toy_stream"


def test_cli_train_prints_metrics_and_run_id_then_evaluate(seqplat_registry, tmp_path):
    runner = CliRunner()
    args = ["train", "--no-progress", "--set", "cell.name=gru", "--set", "cell.hidden_size=8",
            "--set", "task.name=toy_parity", "--set", "train.steps=4", "--set", "train.eval_every=2",
            "--set", f"io.output_dir={tmp_path}/runs"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "test:  loss" in result.output and "accuracy" in result.output
    run_id = [ln.split()[-1] for ln in result.output.splitlines() if ln.startswith("mlflow run:")][0]
    ev = runner.invoke(main, ["evaluate", run_id, "--json"])
    assert ev.exit_code == 0, ev.output
    data = json.loads(ev.output)
    assert data["cell"] == "gru" and 0 <= data["metrics"]["accuracy"] <= 1
    ev2 = runner.invoke(main, ["evaluate", f"runs:/{run_id}", "--split", "valid"])
    assert ev2.exit_code == 0 and "gru on toy_parity (valid)" in ev2.output


@pytest.mark.timeout(600)
def test_two_rank_cpu_run_matches_one_process(tiny_run, tmp_path):
    cfg = tiny_run({"name": "lstm", "hidden_size": 8}, steps=4, tracking={"enabled": True},
                   train={"log_every": 1, "batch_size": 8, "eval_batch_size": 8, "eval_every": 4})
    one = train(cfg.model_copy(update={"io": cfg.io.model_copy(update={"run_dir": str(tmp_path / "one")})}),
                progress=False)
    data = cfg.model_dump(mode="json")
    data["io"]["run_dir"] = str(tmp_path / "two")
    two = run_two_ranks(data, tmp_path / "work")
    one_loss = [v for _, v in one.history["train_loss"]]
    two_loss = [v for _, v in two["history"]["train_loss"]]
    assert two_loss == pytest.approx(one_loss, rel=1e-4, abs=1e-5)
    assert two["test"]["bpc"] == pytest.approx(one.test_metrics["bpc"], rel=1e-4)
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("toy_stream")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2  # one for the 1-process job, exactly one for the 2-rank job
    assert two["run_id"] in {r.info.run_id for r in runs}


def test_release_process_group_destroys_the_default_group(tmp_path):
    import torch.distributed as dist

    from seqplat.core.train import release_process_group

    release_process_group()  # no group: nothing to do
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    assert dist.is_initialized()
    release_process_group()
    assert not dist.is_initialized()
