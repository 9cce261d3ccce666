"""Registering a run's checkpoint in the MLflow model registry (a sqlite store) and reloading it."""

from __future__ import annotations

import contextlib

import mlflow
import pytest
from click.testing import CliRunner
from ecosystem_helpers import mlflow_uri_restored
from mlflow import MlflowClient

from seqplat import build_run_config
from seqplat.cli import main
from seqplat.core.errors import CheckpointError, SeqplatError
from seqplat.core.registry_mlflow import register_checkpoint_model, resolve_model_reference
from seqplat.core.train import evaluate_checkpoint, train


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store with two tiny char_text runs: with and without the checkpoint artifact."""
    root = tmp_path_factory.mktemp("registry")
    (root / "t.txt").write_text("abcabcabc " * 60)
    uri = f"sqlite:///{root}/mlflow.db"
    common = ["cell.name=gru", "cell.hidden_size=4", "task.name=char_text", f"task.path={root / 't.txt'}",
              "task.bptt=10", "train.steps=2", "train.eval_every=2", "train.batch_size=2", "train.eval_batch_size=2",
              f"io.output_dir={root / 'runs'}", f"tracking.tracking_uri={uri}"]
    with contextlib.chdir(root), mlflow_uri_restored():  # MLflow puts artifacts under the working folder
        with_ck = train(build_run_config(overrides=common), progress=False)
        without = train(build_run_config(overrides=[*common, "tracking.log_checkpoint=false"]), progress=False)
    return uri, with_ck, without


@pytest.fixture
def client(store, monkeypatch):
    uri = store[0]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def test_register_checkpoint_model_and_reload_it(store, client):
    _, result, _ = store
    assert register_checkpoint_model(result.run_id, "chars") == "1"
    assert register_checkpoint_model(result.run_id, "chars") == "2"  # the model exists: a new version

    version = client.get_model_version("chars", "1")
    assert version.source == f"runs:/{result.run_id}/checkpoint"
    assert version.run_id == result.run_id
    assert version.tags == {"seqplat.cell": "gru", "seqplat.task": "char_text"}
    assert version.description.startswith(f"seqplat checkpoint: gru on char_text (run {result.run_id})")

    assert resolve_model_reference("models:/chars/1") == f"runs:/{result.run_id}"
    assert resolve_model_reference("models:/chars") == f"runs:/{result.run_id}"  # the latest version
    client.set_registered_model_alias("chars", "champion", "2")
    assert resolve_model_reference("models:/chars@champion") == f"runs:/{result.run_id}"
    assert resolve_model_reference(result.run_dir) == result.run_dir  # anything else passes through

    metrics, loaded = evaluate_checkpoint(resolve_model_reference("models:/chars/2"), "test")
    assert loaded.cell["name"] == "gru" and metrics == pytest.approx(result.test_metrics)

    out = CliRunner().invoke(main, ["generate", "models:/chars/1", "--prompt", "ab", "--length", "4"])
    assert out.exit_code == 0, out.output
    assert out.output.startswith("ab") and len(out.output.rstrip("\n")) == 6


def test_registration_errors_are_one_clear_line(store, client):
    _, _, without = store
    with pytest.raises(SeqplatError, match=f"MLflow run '{without.run_id}' has no 'checkpoint' artifact to register "
                                           "as model 'm'; keep tracking.log_checkpoint=true"):
        register_checkpoint_model(without.run_id, "m")
    missing = "0123456789abcdef0123456789abcdef"
    with pytest.raises(SeqplatError, match=f"Cannot register a model from MLflow run '{missing}'"):
        register_checkpoint_model(missing, "m")
    with pytest.raises(SeqplatError, match="the model name is empty"):
        register_checkpoint_model(without.run_id, " ")
    with pytest.raises(CheckpointError, match="Model 'models:/nope/3' not found in the registry"):
        resolve_model_reference("models:/nope/3")
