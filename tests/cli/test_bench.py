"""`seqplat bench`: every figure comes with its fused-LSTM counterpart from the same run."""

import json

import pytest
from click.testing import CliRunner

from seqplat.cli import main

TINY = ["--hidden", "16", "--input-size", "8", "--time", "6", "--repeats", "2", "--warmup", "1", "--threads", "1"]


def test_bench_json_reports_ratios_consistent_with_its_own_measurements():
    result = CliRunner().invoke(main, ["bench", "--set", "cell.name=gru", "--batch", "4", *TINY, "--json"])
    assert result.exit_code == 0, result.output
    (r,) = json.loads(result.output)
    assert (r["name"], r["hidden"], r["batch"], r["time"], r["threads"]) == ("gru", 16, 4, 6, 1)
    for key in ("train_tokens_per_s", "infer_tokens_per_s", "lstm_train_tokens_per_s", "lstm_infer_tokens_per_s",
                "flops_per_token_train", "gflops_train", "lstm_gflops_train", "matmul_peak_gflops", "saved_mb"):
        assert r[key] > 0, key
    assert r["train_ratio_vs_lstm"] == pytest.approx(r["train_tokens_per_s"] / r["lstm_train_tokens_per_s"])
    assert r["infer_ratio_vs_lstm"] == pytest.approx(r["infer_tokens_per_s"] / r["lstm_infer_tokens_per_s"])
    assert r["flop_rate_ratio_vs_lstm"] == pytest.approx(r["gflops_train"] / r["lstm_gflops_train"])
    if r["train_peak_mb"] is not None:  # Linux: one training step's peak resident growth, beside the LSTM's
        assert r["train_peak_mb"] >= 0 and r["lstm_train_peak_mb"] >= 0
    # per-step inference time is the inverse of the inference throughput, per sequence in the batch
    assert r["infer_step_us_per_token_row"] == pytest.approx(1e6 * r["batch"] / r["infer_tokens_per_s"], rel=1e-6)
    assert r["lstm_infer_step_us_per_token_row"] == pytest.approx(
        1e6 * r["batch"] / r["lstm_infer_tokens_per_s"], rel=1e-6)
    # a GRU computes 3/4 of an LSTM's gate matmuls: FLOPs per token are counted, not guessed
    lstm_flops = r["lstm_gflops_train"] * 1e9 / r["lstm_train_tokens_per_s"]
    assert 0.6 < r["flops_per_token_train"] / lstm_flops < 0.9


def test_bench_text_shows_per_step_time_at_batch_one():
    result = CliRunner().invoke(main, ["bench", "--set", "cell.name=lstm", "--batch", "1", "--batch", "2", *TINY])
    assert result.exit_code == 0, result.output
    b1, b2 = result.output.strip().splitlines()
    assert "B=1 " in b1 and "infer step" in b1 and "us (LSTM" in b1
    assert "B=2 " in b2 and "infer step" not in b2


def test_bench_reference_times_the_plain_path_and_counts_the_same_flops():
    args = ["bench", "--set", "cell.name=lstm", "--batch", "4", *TINY, "--json"]
    fast, ref = (json.loads(CliRunner().invoke(main, a).output)[0] for a in (args, [*args, "--reference"]))
    assert fast["name"] == "lstm" and ref["name"] == "lstm (reference)"
    # FLOPs are always counted on the reference path, so the two runs count the same model
    assert ref["flops_per_token_train"] == pytest.approx(fast["flops_per_token_train"])
    assert ref["train_tokens_per_s"] > 0 and ref["train_ratio_vs_lstm"] > 0
    # and the fused LSTM, opaque to the counter, is charged what the counter finds in that same path:
    # 2*4H(2D+3H) per token, less the state gradient of the first step (the initial state needs none)
    h, d, t = 16, 8, 6
    lstm_flops = fast["lstm_gflops_train"] * 1e9 / fast["lstm_train_tokens_per_s"]
    assert lstm_flops == pytest.approx(2 * 4 * h * (2 * d + 3 * h))
    assert ref["flops_per_token_train"] == pytest.approx(lstm_flops - 2 * 4 * h * h / t)


def test_bench_applies_the_recipe_quantizer_to_the_cell():
    result = CliRunner().invoke(main, ["bench", "--set", "cell.name=lstm", "--set", "quantizer.name=ternary",
                                       "--batch", "2", *TINY, "--json"])
    assert result.exit_code == 0, result.output
    (r,) = json.loads(result.output)
    assert r["name"] == "lstm+ternary" and r["train_ratio_vs_lstm"] > 0


def test_bench_keeps_no_tensors_alive_between_shapes():
    """Each benchmarked shape frees its activations (the saved-bytes probe once leaked its whole graph)."""
    import gc

    import torch

    from seqplat.core.bench import bench_cell

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    before = live_tensors()
    for name in ("gru", "sab"):
        bench_cell({"name": name, "hidden_size": 8}, 8, batch=2, time_steps=6, input_size=4, threads=1,
                   repeats=1, warmup=0, peak=1.0)
    assert live_tensors() == before


def test_hidden_size_reaches_the_inner_cells_of_a_wrapper_without_its_own():
    from seqplat.core.bench import with_hidden

    spec = with_hidden({"name": "fs_rnn", "slow": {"name": "gru", "hidden_size": 8}}, 24)
    assert spec["fast"]["hidden_size"] == 24 and spec["fast"]["name"] == "ln_lstm"
    assert spec["slow"] == {"name": "gru", "hidden_size": 24}
    assert with_hidden({"name": "gru"}, 12) == {"name": "gru", "hidden_size": 12}
    assert with_hidden({"name": "gru"}, None) == {"name": "gru"}


@pytest.mark.slow
def test_bench_compile_reports_the_compile_time_and_keeps_the_model_flops():
    """``--compile`` (inductor: tens of seconds on 2 cores) times the compiled cell; FLOPs are the model's."""
    args = ["bench", "--set", "cell.name=rnn", "--batch", "2", *TINY, "--json"]
    plain = CliRunner().invoke(main, args)
    compiled = CliRunner().invoke(main, [*args, "--compile"])
    assert plain.exit_code == 0 and compiled.exit_code == 0, plain.output + compiled.output
    (p,), (c,) = json.loads(plain.output), json.loads(compiled.output)
    assert c["name"] == "rnn (compiled: model)" and p["compile_s"] == 0.0
    assert c["compile_s"] > 0.5  # seconds of compiling, not the microseconds of one tiny step
    assert c["flops_per_token_train"] == p["flops_per_token_train"]
    assert c["train_tokens_per_s"] > 0 and c["train_ratio_vs_lstm"] > 0


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")  # Dynamo's own
def test_bench_compile_step_times_the_loop_around_a_compiled_step():
    """``--compile step`` compiles ln_lstm's step once; FLOPs are the eager cell's, saved bytes are measured."""
    args = ["bench", "--set", "cell.name=ln_lstm", "--batch", "2", *TINY, "--json"]
    plain = CliRunner().invoke(main, [*args, "--reference"])
    compiled = CliRunner().invoke(main, [*args, "--compile", "step"])
    assert plain.exit_code == 0 and compiled.exit_code == 0, plain.output + compiled.output
    (p,), (c,) = json.loads(plain.output), json.loads(compiled.output)
    assert c["name"] == "ln_lstm (compiled: step)" and c["compile_s"] > 0.1
    # the training graph and the no-grad graph, each compiled once and timed apart
    assert c["compile_train_s"] > 0.1 and c["compile_infer_s"] > 0.0
    assert c["compile_s"] == pytest.approx(c["compile_train_s"] + c["compile_infer_s"])
    assert p["compile_s"] == p["compile_train_s"] == p["compile_infer_s"] == 0.0
    assert c["flops_per_token_train"] == p["flops_per_token_train"]
    # Inductor's partitioner decides what to save and what to recompute, and not the same way on every machine
    # (CI runs saw 1.7% fewer and 7% more bytes than eager), so the compiled step's saved bytes are measured and of
    # the eager step's order, not equal to them.
    assert 0.5 * p["saved_mb"] < c["saved_mb"] < 2.0 * p["saved_mb"]


def test_bench_compile_step_refuses_a_cell_without_a_step_function():
    result = CliRunner().invoke(main, ["bench", "--set", "cell.name=unicornn", "--batch", "2", *TINY,
                                       "--compile", "step"])
    assert result.exit_code == 2
    assert "--compile step: UnICORNNCell has no step function to compile" in result.output
    assert "use --compile model" in result.output


def test_bench_times_a_timestamp_cell_whatever_the_recipes_task():
    """The default recipe's task (copy memory) has no timestamps; the bench feeds phased_lstm its own."""
    result = CliRunner().invoke(main, ["bench", "--set", "cell.name=phased_lstm", "--batch", "2", *TINY, "--json"])
    assert result.exit_code == 0, result.output
    (r,) = json.loads(result.output)
    assert r["name"] == "phased_lstm" and r["train_tokens_per_s"] > 0


def test_matmul_peak_takes_the_faster_of_mm_and_onednn(monkeypatch):
    import torch

    from seqplat.core import bench

    seen = []

    def fake(fns, repeats, warmup):
        for fn in fns:
            assert fn().shape == (64, 64)  # every candidate computes the same product
        seen.append(len(fns))
        return [0.004, 0.002][: len(fns)]

    monkeypatch.setattr(bench, "_interleaved_medians", fake)
    peak = bench.matmul_peak_gflops(n=64)
    fastest = 0.002 if torch.backends.mkldnn.is_available() else 0.004
    assert seen == [2 if torch.backends.mkldnn.is_available() else 1]
    assert peak == pytest.approx(2 * 64**3 / fastest / 1e9)


def test_rounds_repeat_short_calls_back_to_back():
    """A call far shorter than a round runs several times per round (warm, as in training), a long one once."""
    import time

    from seqplat.core import bench

    counts = {"short": 0, "long": 0}

    def short():
        counts["short"] += 1

    def long():
        counts["long"] += 1
        time.sleep(0.03)

    medians = bench._interleaved_medians([short, long], repeats=3, warmup=1, min_round_s=0.02)
    assert counts["long"] == 4  # one warm-up call and one per round
    assert counts["short"] == 4 * bench.MAX_ROUND_CALLS  # the warm-up round too
    assert medians[1] >= 0.03 > medians[0]
