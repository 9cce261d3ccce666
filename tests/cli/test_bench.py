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
