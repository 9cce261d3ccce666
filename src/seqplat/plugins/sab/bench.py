"""Cost of one training step (forward + backward) as the sequence length T grows: SAB vs LSTMs.

``measure_step_cost`` times a tiny regression model (cell -> linear head on every step) and measures
the activation memory autograd keeps for the backward pass: the bytes of distinct storages saved by
the graph (parameters excluded), counted with ``torch.autograd.graph.saved_tensors_hooks``. On a CUDA
device it also reports the allocator's peak. ``python -m seqplat.plugins.sab.bench --help`` prints the
table from the command line.

Variants (``VARIANTS``):

* ``sab``: SAB (paper mode) with its fast path, ``k_att``/``k_top``/``k_trunc`` as given (the C++ loop where it
  can run);
* ``sab_python``: the same fast path in torch ops (``backend = "python"``);
* ``sab_reference``: the same cell on its plain-autograd reference path;
* ``sab_no_attention``: SAB with ``k_top = 0``, i.e. an LSTM with the same truncation (TBPTT);
* ``lstm_loop``: LSTM with full BPTT unrolled step by step in Python (the same loop as SAB's inner cell);
* ``lstm_fused``: LSTM with full BPTT on torch's fused kernel.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import click
import torch
from torch import nn

from seqplat import build_cell

__all__ = ["VARIANTS", "measure_step_cost"]

VARIANTS = ("sab", "sab_python", "sab_reference", "sab_no_attention", "lstm_loop", "lstm_fused")


def _spec(variant: str, length: int, hidden: int, k_att: int, k_top: int, k_trunc: int) -> tuple[dict[str, Any], bool]:
    """Cell spec and whether to use its fast path."""
    if variant.startswith("lstm"):
        return {"name": "lstm", "hidden_size": hidden}, variant == "lstm_fused"
    spec = {"name": "sab", "hidden_size": hidden, "k_att": k_att, "k_trunc": k_trunc,
            "k_top": 0 if variant == "sab_no_attention" else k_top, "memory_size": length // k_att + 1}
    if variant == "sab_python":
        spec["backend"] = "python"
    return spec, variant != "sab_reference"


def _saved_bytes(fn: Any, exclude: set[int]) -> tuple[Any, int]:
    """Run ``fn()``; bytes of distinct non-parameter storages autograd saved for backward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in exclude:
            seen[ptr] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def _measure(cell: nn.Module, head: nn.Module, x: torch.Tensor, target: torch.Tensor, repeats: int,
             params: set[int]) -> tuple[list[float], int, float | None]:
    """Seconds per forward+backward (after one warm-up), saved bytes, CUDA peak MB (or None)."""
    dev = x.device

    def step() -> None:
        y, _ = cell(x)
        torch.nn.functional.mse_loss(head(y), target).backward()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    step()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    y, saved = _saved_bytes(lambda: cell(x)[0], params)
    torch.nn.functional.mse_loss(head(y), target).backward()
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    return times, saved, peak


def measure_step_cost(lengths: tuple[int, ...] = (100, 200, 400, 700, 1000), variants: tuple[str, ...] = VARIANTS,
                      batch: int = 8, hidden: int = 64, input_size: int = 8, k_att: int = 2, k_top: int = 5,
                      k_trunc: int = 10, repeats: int = 3, device: str = "cpu", seed: int = 0) -> list[dict[str, Any]]:
    """One row per (variant, T): ``ms_per_step`` (median forward+backward of a whole sequence, in ms),
    ``ms_per_time_step``, ``saved_mb`` (activation memory kept for backward) and ``cuda_peak_mb``
    (CUDA only, else None)."""
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    dev = torch.device(device)
    rows = []
    for length in lengths:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, length, input_size, generator=g).to(dev)
        target = torch.randn(batch, length, 1, generator=g).to(dev)
        for variant in variants:
            torch.manual_seed(seed)
            spec, fast = _spec(variant, length, hidden, k_att, k_top, k_trunc)
            cell = build_cell(spec, input_size).to(dev)
            cell.use_fast_path = fast
            head = nn.Linear(cell.output_size, 1).to(dev)
            params = {p.untyped_storage().data_ptr() for p in [*cell.parameters(), *head.parameters()]}
            times, saved, peak = _measure(cell, head, x, target, repeats, params)
            ms = 1000 * statistics.median(times)
            rows.append({"variant": variant, "T": length, "ms_per_step": ms, "ms_per_time_step": ms / length,
                         "saved_mb": saved / 2**20, "cuda_peak_mb": peak, "batch": batch, "hidden": hidden})
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of ``measure_step_cost`` rows."""
    lines = [f"{'variant':<18}{'T':>6}{'ms/step':>11}{'ms/t':>8}{'saved MB':>10}{'cuda MB':>9}"]
    for r in rows:
        peak = "-" if r["cuda_peak_mb"] is None else f"{r['cuda_peak_mb']:.1f}"
        lines.append(f"{r['variant']:<18}{r['T']:>6}{r['ms_per_step']:>11.1f}{r['ms_per_time_step']:>8.3f}"
                     f"{r['saved_mb']:>10.2f}{peak:>9}")
    return "\n".join(lines)


@click.command()
@click.option("--lengths", default="100,200,400,700,1000", show_default=True, help="comma-separated T values")
@click.option("--variants", default=",".join(VARIANTS), show_default=True, help="comma-separated variants")
@click.option("--batch", default=8, show_default=True)
@click.option("--hidden", default=64, show_default=True)
@click.option("--k-att", default=2, show_default=True)
@click.option("--k-top", default=5, show_default=True)
@click.option("--k-trunc", default=10, show_default=True)
@click.option("--repeats", default=3, show_default=True)
@click.option("--threads", default=1, show_default=True, help="torch CPU threads")
@click.option("--device", default="cpu", show_default=True)
def main(lengths: str, variants: str, batch: int, hidden: int, k_att: int, k_top: int, k_trunc: int, repeats: int,
         threads: int, device: str) -> None:
    """Time and activation memory of one training step as T grows: SAB vs LSTMs."""
    torch.set_num_threads(threads)
    rows = measure_step_cost(tuple(int(v) for v in lengths.split(",")), tuple(variants.split(",")), batch=batch,
                             hidden=hidden, k_att=k_att, k_top=k_top, k_trunc=k_trunc, repeats=repeats,
                             device=device)
    click.echo(f"batch {batch}, hidden {hidden}, k_att {k_att}, k_top {k_top}, k_trunc {k_trunc}, "
               f"threads {threads}, device {device}")
    click.echo(format_rows(rows))


if __name__ == "__main__":
    main()
