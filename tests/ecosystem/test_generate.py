"""``seqplat generate``: sample text from a tiny trained char_text run."""

from __future__ import annotations

import contextlib

import pytest
from click.testing import CliRunner
from ecosystem_helpers import mlflow_uri_restored

from seqplat import build_run_config
from seqplat.cli import main
from seqplat.core.train import train

TEXT = "hello world. " * 400


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    """An LSTM that has learned the repeating text (about 10 s on one CPU thread), logged to its own store."""
    root = tmp_path_factory.mktemp("char-run")
    (root / "text.txt").write_text(TEXT)
    uri = f"sqlite:///{root}/mlflow.db"
    run = build_run_config(overrides=[
        "cell.name=lstm", "cell.hidden_size=32", "task.name=char_text", f"task.path={root / 'text.txt'}",
        "task.bptt=20", "model.embedding_size=16", "train.steps=100", "train.batch_size=8",
        "train.eval_batch_size=4", "train.lr=0.01", "train.eval_every=100", "train.log_every=50",
        f"io.output_dir={root / 'runs'}", f"tracking.tracking_uri={uri}",
    ])
    with contextlib.chdir(root), mlflow_uri_restored():  # MLflow puts artifacts under the working folder
        result = train(run, progress=False)
    assert result.valid_metrics["bpc"] < 0.5, result.valid_metrics  # the text is nearly deterministic
    return result, uri


def _generate(*args: str):
    return CliRunner().invoke(main, ["generate", *args])


def test_greedy_generation_continues_the_learned_text(char_run):
    result, uri = char_run
    out = _generate(result.run_id, "--tracking-uri", uri, "--prompt", "hello ", "--length", "27",
                    "--temperature", "0")
    assert out.exit_code == 0, out.output
    assert out.output == "hello world. hello world. hello w\n"


def test_sampling_is_seeded_and_stays_in_the_vocabulary(char_run):
    result, uri = char_run
    args = ["--prompt", "wor", "--length", "60", "--temperature", "3.0", "--tracking-uri", uri]
    a = _generate(f"runs:/{result.run_id}", *args, "--seed", "1")
    b = _generate(f"runs:/{result.run_id}", *args, "--seed", "1")
    c = _generate(f"runs:/{result.run_id}", *args, "--seed", "2")
    assert a.exit_code == 0, a.output
    assert a.output == b.output != c.output
    text = a.output.rstrip("\n")
    assert text.startswith("wor") and len(text) == 63
    assert set(text) <= set(TEXT)


def test_a_run_folder_or_checkpoint_works_without_mlflow(char_run):
    result, _ = char_run
    for ref in (result.run_dir, result.checkpoint_dir):
        out = _generate(ref, "--prompt", "world", "--length", "8", "--temperature", "0")
        assert out.exit_code == 0, out.output
        assert out.output == "world. hello \n"


def test_prompt_characters_outside_the_vocabulary_fail_on_one_line(char_run):
    result, _ = char_run
    out = _generate(result.run_dir, "--prompt", "Hello world!", "--length", "5")
    assert out.exit_code == 2
    assert out.output == (
        "Error: generate: the prompt has characters outside the model's vocabulary: '!', 'H'. "
        "Vocabulary: ' .dehlorw'.\n"
    )
    empty = _generate(result.run_dir, "--prompt", "", "--length", "5")
    assert empty.exit_code == 2 and "--prompt is empty" in empty.output


def test_runs_of_other_tasks_are_refused(seqplat_registry, tmp_path):
    run = build_run_config(overrides=[
        "cell.name=gru", "cell.hidden_size=4", "task.name=toy_parity", "train.steps=2", "train.eval_every=2",
        "tracking.enabled=false", f"io.output_dir={tmp_path}",
    ], registry=seqplat_registry)
    result = train(run, progress=False, registry=seqplat_registry)
    out = _generate(result.run_dir, "--prompt", "01", "--length", "3")
    assert out.exit_code == 2
    assert out.output.startswith(
        f"Error: generate: run '{result.run_dir}' trained task 'toy_parity', which is not a language model; "
    )
    assert len(out.output.strip().splitlines()) == 1
