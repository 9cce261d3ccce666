"""Training memory of the UnICORNN recurrence: reverse-recompute function vs the naive autograd loop.

Two figures per run (one training step: forward, loss on the last output, backward):

* ``saved_mb`` -- bytes the autograd graph keeps for the backward pass (every tensor saved through
  ``save_for_backward`` or by a built-in op, each storage counted once), measured with
  ``torch.autograd.graph.saved_tensors_hooks``. Exact and independent of the allocator.
* ``peak_mb`` -- the growth of the process's peak memory during the step: on CUDA
  ``torch.cuda.max_memory_allocated``; on CPU the peak resident set size (``ru_maxrss``) of a fresh
  subprocess: the kernel's peak-RSS counter (``VmHWM``) is reset just before the step and the
  figure is the peak minus the RSS before it (inputs and model already allocated, one warm-up step
  at T=8 done). It includes the step's transient buffers and gradients, so it is noisier.

Command line: ``seqplat unicornn-memory --lengths 1000,4000,16000 --hidden 32 --batch 8``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import click
import torch

from .cell import UnICORNNCell
from .config import UnICORNNConfig

IMPLS = ("fused", "naive")


def _build(hidden: int, layers: int, backend: str, device: str) -> UnICORNNCell:
    torch.manual_seed(0)
    cfg = UnICORNNConfig(hidden_size=hidden, num_layers=layers, dropout=0.0, backend=backend)  # type: ignore[arg-type]
    return UnICORNNCell(1, cfg).to(device)


def _train_step(cell: UnICORNNCell, x: torch.Tensor, impl: str) -> None:
    cell.use_fast_path = impl == "fused"
    y, _ = cell(x)
    y[:, -1].square().sum().backward()


def saved_tensor_bytes(cell: UnICORNNCell, x: torch.Tensor, impl: str) -> int:
    """Bytes of the distinct storages the autograd graph saves for one training step."""
    seen: dict[tuple[int, str], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), str(t.device))] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _train_step(cell, x, impl)
    return sum(seen.values())


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_peak_growth(step: Any) -> int:
    """Peak RSS during ``step()`` minus the RSS before it (VmHWM reset first; else ru_maxrss)."""
    if _reset_peak_rss() and _status_kib("VmRSS") is not None:
        before = _status_kib("VmRSS") or 0
        step()
        return ((_status_kib("VmHWM") or 0) - before) * 1024
    import resource  # POSIX only

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024


def measure_one(length: int, impl: str, hidden: int = 32, batch: int = 8, layers: int = 1,
                backend: str = "auto", device: str = "cpu") -> dict[str, Any]:
    """One configuration in this process. On CPU ``peak_mb`` is only meaningful in a fresh process
    (see :func:`measure`)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    torch.set_num_threads(1)
    cell = _build(hidden, layers, backend, device)
    _train_step(cell, torch.randn(batch, 8, 1, device=device), impl)  # warm-up (and C++ build/load)
    x = torch.randn(batch, length, 1, device=device)
    cell.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _train_step(cell, x, impl)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _cpu_peak_growth(lambda: _train_step(cell, x, impl))
    cell.zero_grad(set_to_none=True)
    saved = saved_tensor_bytes(cell, x, impl)
    mb = 1024 * 1024
    return {"T": length, "impl": impl, "hidden": hidden, "batch": batch, "layers": layers, "device": device,
            "input_mb": batch * length * hidden * x.element_size() / mb,
            "saved_mb": saved / mb, "peak_mb": peak / mb}


def measure(lengths: tuple[int, ...] = (1000, 4000, 16000), hidden: int = 32, batch: int = 8, layers: int = 1,
            backend: str = "auto", device: str = "cpu") -> list[dict[str, Any]]:
    """Every (length, impl) pair, each in a fresh subprocess so CPU peak figures do not mix."""
    rows = []
    for length in lengths:
        for impl in IMPLS:
            args = json.dumps([length, impl, hidden, batch, layers, backend, device])
            out = subprocess.run([sys.executable, "-m", "seqplat.plugins.unicornn.memory", args],
                                 check=True, capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`measure` rows."""
    lines = ["| T | impl | hidden | batch | layers | one [b,t,h] tensor MB | saved for backward MB | peak growth MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['T']} | {r['impl']} | {r['hidden']} | {r['batch']} | {r['layers']} | "
                     f"{r['input_mb']:.2f} | {r['saved_mb']:.2f} | {r['peak_mb']:.2f} |")
    return "\n".join(lines)


@click.command("unicornn-memory")
@click.option("--lengths", default="1000,4000,16000", show_default=True, help="comma-separated sequence lengths")
@click.option("--hidden", type=click.IntRange(min=1), default=32, show_default=True, help="oscillators per layer")
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True, help="batch size")
@click.option("--layers", type=click.IntRange(min=1), default=1, show_default=True, help="UnICORNN layers")
@click.option("--backend", type=click.Choice(["auto", "cpp", "python"]), default="auto", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda")
@click.option("--json", "as_json", is_flag=True, help="print JSON rows")
def unicornn_memory(lengths: str, hidden: int, batch: int, layers: int, backend: str, device: str,
                    as_json: bool) -> None:
    """Training memory of the UnICORNN recurrence: reverse-recompute (fused) vs the naive loop."""
    try:
        ts = tuple(int(v) for v in lengths.split(",") if v.strip())
    except ValueError as exc:
        raise click.ClickException(f"--lengths: expected comma-separated integers, got {lengths!r}") from exc
    rows = measure(ts, hidden, batch, layers, backend, device)
    click.echo(json.dumps(rows, indent=2) if as_json else format_table(rows))


if __name__ == "__main__":  # worker: one configuration, one JSON line on stdout
    length, impl, hidden, batch, layers, backend, device = json.loads(sys.argv[1])
    sys.stdout.write(json.dumps(measure_one(length, impl, hidden, batch, layers, backend, device)) + "\n")
