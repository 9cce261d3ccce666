import math

import pytest
import torch
from safetensors.torch import load_file

from seqplat.core.checkpoint import list_checkpoints, load_checkpoint
from seqplat.core.errors import DivergenceError
from seqplat.core.train import CompileClock, Trainer, evaluate_checkpoint, lr_at, train


def _weights(result):
    ck = load_checkpoint(result.run_dir, prefer="step")
    return ck.model_state


def test_stream_training_learns_and_reports(tiny_run):
    run = tiny_run({"name": "lstm", "hidden_size": 16}, steps=40,
                   train={"lr": 1e-2, "eval_every": 20, "checkpoint_every": 20})
    res = train(run, progress=False)
    assert res.steps == 40
    assert res.valid_metrics["bpc"] < 2.5  # unigram over 8 symbols is 3 bits
    assert set(res.test_metrics) >= {"loss", "bpc", "accuracy"}
    assert math.isclose(res.test_metrics["bpc"], res.test_metrics["loss"] / math.log(2))
    assert [s for s, _ in list_checkpoints(res.run_dir + "/checkpoints", "step")] == [20, 40]
    assert res.history["valid_bpc"][0][0] == 20.0


def test_resume_equals_uninterrupted_run_bit_for_bit(tiny_run, tmp_path):
    common = {"name": "lstm", "hidden_size": 8}
    full = train(tiny_run(common, steps=12, train={"checkpoint_every": 6, "eval_every": 6},
                          io={"run_dir": str(tmp_path / "full")}, model={"dropout": 0.0, "input_dropout": 0.2}),
                 progress=False)
    short = tiny_run(common, steps=6, train={"checkpoint_every": 6, "eval_every": 6},
                     io={"run_dir": str(tmp_path / "part")}, model={"dropout": 0.0, "input_dropout": 0.2})
    train(short, progress=False)
    resumed_cfg = short.model_copy(update={"train": short.train.model_copy(update={"steps": 12})})
    resumed = train(resumed_cfg, resume=str(tmp_path / "part"), progress=False)
    assert resumed.steps == 12
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_carried_state_is_saved_for_streams(tiny_run, tmp_path):
    res = train(tiny_run({"name": "gru", "hidden_size": 8}, steps=3, io={"run_dir": str(tmp_path / "r")}),
                progress=False)
    ck = load_checkpoint(res.run_dir, prefer="step")
    carry = ck.carry(0)
    assert carry is not None and carry[0].shape == (4, 8)


def test_classification_run_and_evaluate_checkpoint(tiny_run):
    run = tiny_run({"name": "gru", "hidden_size": 16}, task="toy_parity", steps=30,
                   train={"lr": 1e-2, "batch_size": 16, "eval_every": 10, "eval_batch_size": 64})
    res = train(run, progress=False)
    assert 0.0 <= res.test_metrics["accuracy"] <= 1.0 and "macro_f1" in res.test_metrics
    metrics, rebuilt = evaluate_checkpoint(res.checkpoint_dir)
    assert rebuilt.cell["name"] == "gru"
    assert metrics["accuracy"] == pytest.approx(res.test_metrics["accuracy"])


def _poison(trainer, at_step):
    original = trainer.task.train_batch

    def poisoned(step, bs, seed):
        batch = original(step, bs, seed)
        if step >= at_step:
            batch.inputs = torch.full_like(batch.inputs, float("nan"))
        return batch

    trainer.task.train_batch = poisoned


def test_nan_loss_stops_with_clear_message_and_keeps_last_checkpoint(tiny_run, tmp_path):
    run = tiny_run({"name": "lstm", "hidden_size": 8}, task="toy_parity", steps=6,
                   train={"checkpoint_every": 2, "eval_every": 2}, io={"run_dir": str(tmp_path / "n")})
    trainer = Trainer(run, progress=False)
    _poison(trainer, 3)
    with pytest.raises(DivergenceError, match="NaN/Inf at step 3"):
        trainer.fit()
    assert load_checkpoint(str(tmp_path / "n")).meta["step"] == 2


def test_nan_skip_keeps_training(tiny_run):
    run = tiny_run({"name": "lstm", "hidden_size": 8}, task="toy_parity", steps=4, train={"on_nan": "skip"})
    trainer = Trainer(run, progress=False)
    _poison(trainer, 2)
    before = {k: v.clone() for k, v in trainer.unwrapped.state_dict().items()}
    res = trainer.fit()
    assert res.steps == 4
    assert all(torch.isfinite(v).all() for v in trainer.unwrapped.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in trainer.unwrapped.state_dict().items())


def test_early_stopping_on_target_metric(tiny_run):
    run = tiny_run({"name": "lstm", "hidden_size": 8}, task="toy_parity", steps=100,
                   train={"eval_every": 2, "target_metric": 0.0})
    res = train(run, progress=False)
    assert res.stopped_early and res.steps == 2


@pytest.mark.parametrize(
    "kind,expected",
    [("constant", [1.0, 1.0, 1.0]), ("step", [1.0, 0.5, 0.25]), ("cosine", [1.0, 0.5, 0.0])],
    ids=["constant", "step", "cosine"],
)
def test_lr_schedules(tiny_run, kind, expected):
    run = tiny_run(steps=3, train={"lr": 1.0, "schedule": {"kind": kind, "step_size": 1, "gamma": 0.5}})
    got = [lr_at(s, run.train, 1.0) for s in range(3)]
    assert got == pytest.approx(expected, abs=1e-9)


def test_interrupt_writes_resumable_checkpoint(tiny_run, tmp_path):
    from seqplat.core.errors import TrainingInterrupted

    run = tiny_run({"name": "lstm", "hidden_size": 8}, steps=50, io={"run_dir": str(tmp_path / "i")})
    trainer = Trainer(run, progress=False)
    original = trainer.task.train_batch

    def interrupting(step, bs, seed):
        if step == 3:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGINT)
        return original(step, bs, seed)

    trainer.task.train_batch = interrupting
    with pytest.raises(TrainingInterrupted, match="resumable checkpoint"):
        trainer.fit()
    ck = load_checkpoint(str(tmp_path / "i"))
    assert ck.meta["step"] == 4


def test_checkpoint_files_are_safe_formats(tiny_run, tmp_path):
    res = train(tiny_run(steps=2, io={"run_dir": str(tmp_path / "s")}), progress=False)
    ck = list_checkpoints(res.run_dir + "/checkpoints", "step")[-1][1]
    assert load_file(ck + "/model.safetensors")
    torch.load(ck + "/state.pt", weights_only=True)


def test_compile_clock_reports_the_excess_of_the_first_steps_over_the_steady_ones():
    clock = CompileClock(warm=3)
    # compile in step 1, a recompile when the carried state arrives in step 2, then steady ~0.1 s steps
    for s in (20.0, 5.1, 0.1, 0.11):
        assert clock.add(s) is None
    assert clock.estimate() == (pytest.approx(25.2), False)  # upper bound: no steady steps yet
    assert clock.add(0.09) is None
    assert clock.add(0.1) == pytest.approx(20.0 + 5.1 + 0.1 - 3 * 0.1)
    assert clock.estimate()[1] is True
    assert clock.add(99.0) is None and clock.value == pytest.approx(24.9)  # later steps change nothing


def test_compile_clock_never_reports_a_negative_time():
    clock = CompileClock(warm=1)
    clock.add(0.1)
    assert clock.add(0.5) == 0.0
