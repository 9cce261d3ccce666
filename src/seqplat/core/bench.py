"""Throughput, FLOPs and memory of cells, measured side by side with torch's fused LSTM.

Every figure comes with its ratio to ``nn.LSTM`` at the same hidden size, batch, length and threads,
measured in the same process, and the machine's matmul peak, so numbers from a shared or different
machine stay comparable. Tokens/s counts time steps x batch per second; training is forward + backward
of ``sum(y * w)``; inference is a no-grad forward. Timings are medians of ``repeats`` rounds after ``warmup``,
the cell's and the LSTM's calls alternating round by round so that both see the same state of the machine;
in a round each runs back to back for at least 50 ms (the mean per call is its time), as training repeats a
step, so neither is timed on caches the other has just filled.

Memory: ``train_peak_mb`` is how far one training step raises the process's resident memory at its
peak (Linux; activations, gradients and workspaces, whoever holds them), beside the LSTM's
``lstm_train_peak_mb``. ``saved_mb`` is what autograd's saved-tensor hooks see the forward keep for the
backward (counted once per storage); a hand-written backward that keeps its buffers on its context
(gam_rhn, rhn, fs_rnn) is not seen there, only in ``train_peak_mb``. ``peak_rss_mb`` is the process's
peak resident memory so far (monotonic, shown for reference).
"""

from __future__ import annotations

import math
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from seqplat.core.compiling import CompiledSteps, compile_steps
from seqplat.core.cpu_memory import peak_growth_mb, reuse_freed_memory
from seqplat.core.errors import ConfigError
from seqplat.core.gemm import onednn_linear
from seqplat.core.model import build_cell


@dataclass
class BenchResult:
    name: str
    hidden: int
    batch: int
    time: int
    input_size: int
    threads: int
    train_tokens_per_s: float
    infer_tokens_per_s: float
    train_step_ms: float
    infer_step_us_per_token_row: float
    flops_per_token_train: float
    gflops_train: float
    saved_mb: float
    peak_rss_mb: float
    params: int
    lstm_train_tokens_per_s: float = 0.0
    lstm_infer_tokens_per_s: float = 0.0
    lstm_gflops_train: float = 0.0
    lstm_infer_step_us_per_token_row: float = 0.0
    train_ratio_vs_lstm: float = 0.0
    infer_ratio_vs_lstm: float = 0.0
    flop_rate_ratio_vs_lstm: float = 0.0
    matmul_peak_gflops: float = 0.0
    compile_s: float = 0.0
    compile_train_s: float = 0.0  #: of compile_s: the training graphs (forward and backward)
    compile_infer_s: float = 0.0  #: of compile_s: the no-grad graph of the inference call
    train_peak_mb: float | None = None
    lstm_train_peak_mb: float | None = None
    train_peak_ratio_vs_lstm: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: each function runs back to back for at least this long in every timed round (see _interleaved_medians)
MIN_ROUND_S = 0.05
#: ... but at most this many calls
MAX_ROUND_CALLS = 50


def _interleaved_medians(fns: list[Any], repeats: int, warmup: int, min_round_s: float = MIN_ROUND_S) -> list[float]:
    """Median time per call of each function, the functions taking turns in every round (warm-up rounds first),
    so a machine that speeds up or slows down during the run shifts all of them alike.

    In a round each function runs as many calls back to back as fill ``min_round_s`` (from its last warm-up
    call; at most :data:`MAX_ROUND_CALLS`) and its time is their mean. One call per turn would time a short
    step with caches the other function has just filled with its own data: one UnICORNN layer's training
    step at H=256, B=32 took 2.4 ms run after run, 3.3 ms right after a fused LSTM step. Training repeats the
    same step, so the rounds time it warm.
    """
    calls = [1] * len(fns)
    for _ in range(warmup):  # a warm-up round also runs each function for min_round_s (first calls are slow)
        for i, fn in enumerate(fns):
            spent, n = 0.0, 0
            while n < MAX_ROUND_CALLS and (n == 0 or spent < min_round_s):
                t0 = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - t0
                spent, n = spent + elapsed, n + 1
            calls[i] = max(1, min(MAX_ROUND_CALLS, math.ceil(min_round_s / max(elapsed, 1e-9))))
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, n, ts in zip(fns, calls, times, strict=True):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            ts.append((time.perf_counter() - t0) / n)
    return [statistics.median(ts) for ts in times]


def matmul_peak_gflops(n: int = 1024, repeats: int = 5) -> float:
    """GFLOP/s of an ``n``-cubed float32 product: the faster of ATen's ``mm`` and, on CPUs where torch has it,
    oneDNN's inner product (on an AVX-512 AMD EPYC ``mm`` ran at 227 and oneDNN at 492, and torch's fused
    LSTM, which runs on oneDNN, above the ``mm`` figure)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    fns = [lambda: torch.mm(a, b)]
    if torch.backends.mkldnn.is_available():
        w = b.t().contiguous()
        fns.append(lambda: onednn_linear(a, w))
    secs = _interleaved_medians(fns, repeats, 2)
    return 2 * n**3 / min(secs) / 1e9


class _SavedBytes:
    """Counts bytes autograd saves for backward (deduplicated by storage), for a graph never run backward.

    ``pack`` keeps nothing: handing the tensor itself back would let an output saved by its own
    ``grad_fn`` hold that graph alive (a cycle through C++ that Python's collector cannot see), and
    every benchmarked shape would leak its activations (``bench --all`` was killed for memory).
    """

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, t: torch.Tensor) -> None:
        try:
            key = t.untyped_storage().data_ptr()
            if key not in self.seen:
                self.seen.add(key)
                self.bytes += t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            pass  # tensors without a plain storage (e.g. some wrapper subclasses) are not counted

    @staticmethod
    def unpack(_: None) -> torch.Tensor:
        raise RuntimeError("seqplat bench: the saved-bytes probe graph cannot be run backward")


def set_fast_path(module: nn.Module, on: bool) -> dict[nn.Module, bool]:
    """Switch the fast path of ``module`` and every cell inside it; returns the previous settings."""
    before = {m: m.use_fast_path for m in module.modules() if hasattr(m, "use_fast_path")}
    for m in before:
        m.use_fast_path = on
    return before


class _Probe:
    """The timed calls of one module at one shape: a training step, an inference call, FLOPs and saved bytes.

    With ``compiled`` (``"model"`` or ``"step"``, see :mod:`seqplat.core.compiling`) the timed calls run
    compiled and the first calls (which compile the forward, backward and no-grad graphs) are timed into
    ``first_train_s`` (the first forward and training step) and ``first_infer_s``; FLOPs and saved bytes
    are always taken on the eager ``module``.
    """

    def __init__(self, module: nn.Module, x: torch.Tensor, times: torch.Tensor | None, compiled: str | None = None):
        self.module, self.x, self.times, self.compiled = module, x, times, compiled
        module.train()
        self.steps = compile_steps(module) if compiled == "step" else CompiledSteps()
        if compiled == "step" and not self.steps.names:
            raise ConfigError(f"--compile step: {type(module).__name__} has no step function to compile (fused and "
                              "sequence kernels keep their fast path); use --compile model")
        self.runner = torch.compile(module) if compiled == "model" else module
        start = time.perf_counter()
        self.w = torch.randn_like(self.forward())
        self.first_train_s = self.first_infer_s = 0.0
        if compiled:
            self.train_step()
            mid = time.perf_counter()
            self.infer()
            self.first_train_s, self.first_infer_s = mid - start, time.perf_counter() - mid

    def forward(self, m: nn.Module | None = None) -> torch.Tensor:
        m = self.runner if m is None else m
        if isinstance(self.module, nn.LSTM):
            return m(self.x)[0]
        return m(self.x, None, times=self.times)[0]

    def train_step(self, m: nn.Module | None = None) -> None:
        self.module.zero_grad(set_to_none=True)
        (self.forward(m) * self.w).sum().backward()

    def infer(self) -> None:  # evaluation mode, as for serving: no dropout, deterministic quantizers
        self.module.eval()
        try:
            with torch.no_grad():
                self.forward()
        finally:
            self.module.train()

    def flops(self) -> float:
        """Model FLOPs of one training step, counted on the reference path (inner cells of wrappers
        included): fused kernels hide their matmuls from the counter."""
        from torch.utils.flop_counter import FlopCounterMode

        module = self.module
        b, t, _ = self.x.shape
        counter = FlopCounterMode(display=False)
        before = set_fast_path(module, False)
        try:
            with self.steps.suspended(), counter:
                self.train_step(module)
        finally:
            for m, on in before.items():
                m.use_fast_path = on
        flops = counter.get_total_flops()
        if isinstance(module, nn.LSTM) and flops < b * t:
            # the fused kernel is opaque to the counter: count the matmuls the counter finds in the
            # reference path of the same LSTM, so both sides of every ratio count the same model. Per token:
            # forward 2*4H(D+H); backward the two weight gradients 2*4H(D+H) and the state gradient 2*4H*H
            # (the benchmark input needs no gradient, so there is no 2*4H*D for it)
            h, d = module.hidden_size, module.input_size
            flops = 2 * 4 * h * (2 * d + 3 * h) * b * t
        return float(flops)

    def train_peak_mb(self) -> float | None:
        """Peak resident growth of one training step (:func:`~seqplat.core.cpu_memory.peak_growth_mb`).

        The module goes through eval mode first, which makes cells drop buffers they keep between
        training calls (rhn's workspace), so those count as part of the step."""
        self.module.eval()
        self.module.train()
        return peak_growth_mb(self.train_step)

    def saved_mb(self) -> float:
        saved = _SavedBytes()
        with self.steps.suspended(), torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            y = self.forward(self.module)
        del y
        return saved.bytes / 2**20


def _measure(probe: _Probe, train_s: float, infer_s: float) -> dict:
    b, t, _ = probe.x.shape
    flops = probe.flops()
    # compile time: the first calls' excess over one steady training step and one inference (so the training
    # part also holds the first forward pass, small beside seconds of compiling)
    compile_train_s = max(probe.first_train_s - train_s, 0.0) if probe.compiled else 0.0
    compile_infer_s = max(probe.first_infer_s - infer_s, 0.0) if probe.compiled else 0.0
    return {
        "compile_s": compile_train_s + compile_infer_s, "compile_train_s": compile_train_s,
        "compile_infer_s": compile_infer_s, "train_tps": b * t / train_s, "infer_tps": b * t / infer_s,
        "train_s": train_s, "infer_s": infer_s, "flops_per_token": flops / (b * t), "gflops": flops / train_s / 1e9,
        "saved_mb": probe.saved_mb(), "train_peak_mb": probe.train_peak_mb(),
    }


def bench_cell(spec: dict[str, Any], hidden: int, batch: int = 32, time_steps: int = 100, input_size: int = 128,
               threads: int | None = None, repeats: int = 5, warmup: int = 2, with_lstm: bool = True,
               peak: float | None = None, registry: Any | None = None, reference: bool = False,
               quantizer: dict[str, Any] | None = None, compiled: str | None = None) -> BenchResult:
    """Benchmark one cell spec at one shape (and fused LSTM at the same shape).

    ``reference`` times the cell's plain PyTorch path (its fast path and those of its inner cells off);
    ``quantizer`` (a ``{name: ..., <options>}`` spec) is applied to the cell first, as in training;
    ``compiled`` (``"model"`` or ``"step"``) times the cell under ``torch.compile`` (default inductor
    backend) in that mode and reports the compile time in ``compile_s``; the fused LSTM beside it is never
    compiled.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    reuse_freed_memory()  # as in training
    torch.manual_seed(0)
    cell = build_cell(spec, input_size, registry)
    if quantizer is not None:
        from seqplat.core.quantize import apply_quantizer

        apply_quantizer(cell, quantizer, registry)
    if reference:
        set_fast_path(cell, False)
    x = torch.randn(batch, time_steps, input_size)
    times = torch.arange(time_steps, dtype=torch.float32).expand(batch, time_steps).contiguous() \
        if cell.uses_time else None
    from seqplat.core.train import flush_denormal

    hidden = hidden or cell.output_size  # wrapper cells without hidden_size: compare at their output width
    with flush_denormal():  # as in training
        probe = _Probe(cell, x, times, compiled)
        probes = [probe]
        if with_lstm:
            probes.append(_Probe(nn.LSTM(input_size, hidden, batch_first=True), x, None))
        # the cell's and the LSTM's calls take turns, so both see the same machine
        train_s = _interleaved_medians([p.train_step for p in probes], repeats, warmup)
        infer_s = _interleaved_medians([p.infer for p in probes], repeats, warmup)
        m = _measure(probe, train_s[0], infer_s[0])
        ml = _measure(probes[1], train_s[1], infer_s[1]) if with_lstm else None
    del probes
    res = BenchResult(
        name=spec["name"] + (f"+{quantizer['name']}" if quantizer else "") + (" (reference)" if reference else "")
        + (f" (compiled: {compiled})" if compiled else ""),
        hidden=hidden, batch=batch, time=time_steps, input_size=input_size,
        threads=torch.get_num_threads(), train_tokens_per_s=m["train_tps"], infer_tokens_per_s=m["infer_tps"],
        train_step_ms=m["train_s"] * 1e3, infer_step_us_per_token_row=m["infer_s"] / time_steps * 1e6,
        flops_per_token_train=m["flops_per_token"], gflops_train=m["gflops"], saved_mb=m["saved_mb"],
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        params=sum(p.numel() for p in cell.parameters()), compile_s=m["compile_s"],
        compile_train_s=m["compile_train_s"], compile_infer_s=m["compile_infer_s"],
        train_peak_mb=m["train_peak_mb"],
    )
    if ml is not None:
        res.lstm_train_tokens_per_s, res.lstm_infer_tokens_per_s = ml["train_tps"], ml["infer_tps"]
        res.lstm_gflops_train = ml["gflops"]
        res.lstm_infer_step_us_per_token_row = ml["infer_s"] / time_steps * 1e6
        res.train_ratio_vs_lstm = res.train_tokens_per_s / ml["train_tps"]
        res.infer_ratio_vs_lstm = res.infer_tokens_per_s / ml["infer_tps"]
        res.flop_rate_ratio_vs_lstm = res.gflops_train / max(ml["gflops"], 1e-12)
        res.lstm_train_peak_mb = ml["train_peak_mb"]
        if res.train_peak_mb is not None and ml["train_peak_mb"]:
            res.train_peak_ratio_vs_lstm = res.train_peak_mb / ml["train_peak_mb"]
    res.matmul_peak_gflops = peak if peak is not None else matmul_peak_gflops()
    return res


def with_hidden(spec: dict[str, Any], hidden: int | None, registry: Any | None = None) -> dict[str, Any]:
    """The spec with ``hidden_size`` set, if the cell has that option.

    A wrapper cell without its own ``hidden_size`` whose options hold inner cell specs (``fs_rnn``'s
    ``fast`` and ``slow``) gets the size set in each inner spec instead.
    """
    if hidden is None:
        return spec
    from seqplat.registry import get_registry

    cls = (registry or get_registry()).get("cell", spec["name"]).obj
    fields = cls.config_class.model_fields
    if "hidden_size" in fields:
        return {**spec, "hidden_size": hidden}
    defaults = cls.config_class().model_dump(mode="json")
    inner = [k for k, v in defaults.items()
             if isinstance(v, dict) and "name" in v and "hidden_size" in v]
    if not inner:
        from seqplat.core.errors import ConfigError

        raise ConfigError(f"--hidden: cell '{spec['name']}' has no hidden_size option; set its size with --set cell.*")
    out = dict(spec)
    for k in inner:
        given = spec.get(k)
        base = given if isinstance(given, dict) else defaults[k]
        out[k] = {**base, "hidden_size": hidden}
    return out
