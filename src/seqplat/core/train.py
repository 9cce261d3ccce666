"""The one training loop, on Accelerate: CPU, one GPU, or many processes under ``accelerate launch``.

Modeled on accelerate's nlp_example: one ``prepare``, ``backward``, gradient clipping, evaluation with
summed statistics reduced across processes, checkpoints, and MLflow from rank 0. Stream tasks (language
modelling) carry the detached state from one chunk to the next (truncated BPTT). Training batches are
addressed by step, so ``resume`` reproduces an uninterrupted run bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import posixpath
import resource
import signal
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
from tqdm.auto import tqdm

from seqplat.core.cell import detach_state, flatten_state, unflatten_state
from seqplat.core.checkpoint import (
    clean_temp,
    list_checkpoints,
    load_checkpoint,
    prune,
    write_checkpoint,
)
from seqplat.core.compiling import apply_compile
from seqplat.core.config import RunConfig, validate_run
from seqplat.core.cpu_memory import reuse_freed_memory
from seqplat.core.errors import CheckpointError, ConfigError, DivergenceError, TrainingInterrupted
from seqplat.core.model import build_model, build_task, count_parameters
from seqplat.core.task import Task
from seqplat.core.tracking import Tracker, flatten, git_commit

log = logging.getLogger("seqplat.train")


@dataclass
class TrainResult:
    """What a finished run reports."""

    run_id: str | None
    run_dir: str
    checkpoint_dir: str | None
    steps: int
    num_parameters: int
    valid_metrics: dict[str, float]
    test_metrics: dict[str, float]
    best_valid: float | None
    train_tokens_per_s: float
    wall_time_s: float
    peak_memory_mb: float
    history: dict[str, list[list[float]]] = field(default_factory=dict)
    stopped_early: bool = False
    tracking_uri: str | None = None
    registered_model: str | None = None


def make_optimizer(params: Any, cfg: Any) -> torch.optim.Optimizer:
    t = cfg
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    opt = torch.optim.RMSprop(params, lr=t.lr, alpha=t.rmsprop_alpha, momentum=t.momentum, eps=t.eps,
                              weight_decay=t.weight_decay)
    if t.rmsprop_initial_square_avg:
        start = t.rmsprop_initial_square_avg

        def fill_state(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            # TensorFlow 1 starts the accumulator at 1.0: create the state torch would create at zero on
            # a parameter's first step (same keys), on the parameter's device; a resumed state is kept
            for group in optimizer.param_groups:
                for p in group["params"]:
                    state = optimizer.state[p]
                    if state:
                        continue
                    state["step"] = torch.tensor(0.0)
                    state["square_avg"] = torch.full_like(p, start, memory_format=torch.preserve_format)
                    if group["momentum"] > 0:
                        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group["centered"]:
                        state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)

        opt.register_step_pre_hook(fill_state)
    return opt


def lr_at(step: int, cfg: Any, plateau_scale: float) -> float:
    """The learning rate at ``step`` (0-based) under the configured schedule."""
    s, base = cfg.schedule, cfg.lr
    warm = min(1.0, (step + 1) / s.warmup_steps) if s.warmup_steps else 1.0
    if s.kind == "constant":
        return base * warm
    if s.kind == "step":
        return base * warm * s.gamma ** (max(0, step - s.start_step) // s.step_size)
    if s.kind == "cosine":
        progress = min(1.0, step / max(1, cfg.steps - 1))
        return warm * (s.min_lr + 0.5 * (base - s.min_lr) * (1 + math.cos(math.pi * progress)))
    return max(s.min_lr, base * plateau_scale)


def peak_memory_mb() -> float:
    """Peak resident memory of this process (CUDA peak allocation when on a GPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def flush_denormal() -> Any:
    """Flush denormal floats to zero while training: tiny gradients flowing back through long sequences
    turn denormal and make CPU kernels about 10x slower. The process-wide flag is restored afterwards."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


class _StopFlag:
    """Turns SIGINT/SIGTERM into a request to checkpoint and stop at the next step boundary."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class CompileClock:
    """Compile time of a ``torch.compile``'d model, read from its training step times.

    Compilation happens inside the first calls (a second graph when the carried state first arrives), so
    the compile time is the excess of the first ``warm`` steps over ``warm`` times the median of the
    ``warm`` steps after them. With fewer steps, the whole time of the steps seen is an upper bound.
    Recompiles for evaluation (eval mode, no grad) land in the first evaluation and are not counted.
    """

    def __init__(self, warm: int = 3) -> None:
        self.warm = warm
        self.times: list[float] = []
        self.value: float | None = None

    def add(self, step_s: float) -> float | None:
        """Record one step; returns the compile time once the steady steps are in, else None."""
        if self.value is not None:
            return None
        self.times.append(step_s)
        if len(self.times) < 2 * self.warm:
            return None
        steady = statistics.median(self.times[self.warm:])
        self.value = max(sum(self.times[: self.warm]) - self.warm * steady, 0.0)
        return self.value

    def estimate(self) -> tuple[float, bool]:
        """``(seconds, exact)``: the compile time, or the upper bound while the steady steps are missing."""
        if self.value is not None:
            return self.value, True
        return sum(self.times[: self.warm]), False


class Trainer:
    """Holds the pieces of one run; ``fit`` runs it. Use :func:`train` unless you need the parts."""

    def __init__(self, run: RunConfig, resume: str | None = None, registry: Any | None = None,
                 progress: bool | None = None):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.registry = registry
        self.resume_ckpt = None
        if resume is not None:
            self.resume_ckpt = load_checkpoint(resume, prefer="step")
            if run is None:
                run = validate_run(self.resume_ckpt.config, registry)
        self.run = run
        t = run.train
        if t.threads is not None:
            torch.set_num_threads(t.threads)
        reuse_freed_memory()  # CPU: no page faults on each step's activation buffers (see cpu_memory)
        self.accelerator = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        acc = self.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        if t.batch_size % self.world:
            raise ConfigError(f"train.batch_size: {t.batch_size} is not divisible by {self.world} processes")
        self.is_main = acc.is_main_process
        self.progress = self.is_main and (progress if progress is not None else True)

        torch.manual_seed(t.seed)
        self.task: Task = build_task(run.task, registry)
        self.task.prepare()
        if self.task.stream and t.eval_batch_size % self.world:
            raise ConfigError(f"train.eval_batch_size: {t.eval_batch_size} is not divisible by {self.world} processes")
        torch.manual_seed(t.seed)
        model = build_model(run, self.task, registry)
        self.num_parameters = count_parameters(model)
        self.optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], t)
        self.model, self.optimizer = acc.prepare(model, self.optimizer)
        self.compile_clock = CompileClock() if t.compile != "off" else None
        # lazy: compiles in the first steps (see CompileClock)
        self.model = apply_compile(self.model, t.compile)

        # run folder
        if self.resume_ckpt is not None:
            ck = self.resume_ckpt.url.rstrip("/")
            self.run_dir = posixpath.dirname(posixpath.dirname(ck))
        else:
            self.run_dir = run.io.run_dir or posixpath.join(
                run.io.output_dir, f"{run.task['name']}-{run.cell['name']}-{time.strftime('%Y%m%d-%H%M%S')}-"
                f"{uuid.uuid4().hex[:6]}"
            )
        self.ckpt_root = posixpath.join(self.run_dir, "checkpoints")

        # loop state
        self.step = 0
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.plateau_scale = 1.0
        self.plateau_bad = 0
        self.plateau_decays = 0
        self.history: dict[str, list[list[float]]] = {}
        self.carry: Any = None
        self.mlflow_run_id: str | None = None
        self.tokens_seen = 0
        self.train_time = 0.0
        if self.resume_ckpt is not None:
            self._restore(self.resume_ckpt)

        self.tracker = Tracker(run.tracking, active=self.is_main,
                               buffer_url=posixpath.join(self.run_dir, "tracking-buffer.jsonl"))

    # -- helpers --------------------------------------------------------------------------------
    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def _better(self, value: float) -> bool:
        if self.best is None or not math.isfinite(self.best):
            return math.isfinite(value)
        return value < self.best if self.task.primary_mode == "min" else value > self.best

    def _report_compile(self) -> None:
        clock = self.compile_clock
        assert clock is not None
        seconds, exact = clock.estimate()
        log.info("torch.compile: %.1f s of compiling in the first %d training steps%s", seconds,
                 min(len(clock.times), clock.warm), "" if exact else " (upper bound: no steady steps to compare)")
        self.tracker.log_metrics({"compile_time_s": seconds}, self.step)

    def _record(self, name: str, step: int, value: float) -> None:
        self.history.setdefault(name, []).append([float(step), float(value)])

    def _state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "best": self.best if self.best is not None else float("nan"),
            "best_step": self.best_step if self.best_step is not None else -1,
            "bad_evals": self.bad_evals,
            "plateau": [self.plateau_scale, float(self.plateau_bad), float(self.plateau_decays)],
            "history": {k: torch.tensor(v, dtype=torch.float64) for k, v in self.history.items()},
            "tokens_seen": self.tokens_seen,
            "train_time": self.train_time,
            "mlflow_run_id": self.mlflow_run_id or "",
            "world": self.world,
        }

    def _restore(self, ck: Any) -> None:
        try:
            self.unwrapped.load_state_dict(ck.model_state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise CheckpointError(
                f"Checkpoint '{ck.url}' does not fit this model ({first[0][:200]}...); it was written for another "
                f"architecture or config."
            ) from exc
        s = ck.state
        self.optimizer.load_state_dict(s["optimizer"])
        torch.set_rng_state(s["rng_cpu"])
        if s.get("rng_cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["rng_cuda"])
        self.step = int(s["step"])
        self.best = None if math.isnan(s["best"]) else float(s["best"])
        self.best_step = None if s["best_step"] < 0 else int(s["best_step"])
        self.bad_evals = int(s["bad_evals"])
        self.plateau_scale, pb, pd = s["plateau"]
        self.plateau_bad, self.plateau_decays = int(pb), int(pd)
        self.history = {k: v.tolist() for k, v in s["history"].items()}
        self.tokens_seen = int(s["tokens_seen"])
        self.train_time = float(s["train_time"])
        self.mlflow_run_id = s["mlflow_run_id"] or None
        carry = ck.carry(0)
        if carry is not None and self.task.stream:
            per = self.run.train.batch_size // self.world
            template = self.unwrapped.initial_state(self.run.train.batch_size)
            full = unflatten_state(template, carry)
            from seqplat.core.cell import map_state

            self.carry = map_state(lambda t: t[self.rank * per : (self.rank + 1) * per].to(self.accelerator.device),
                                   full)

    def save(self, kind: str = "step") -> str | None:
        """Write a checkpoint of the current step (all processes must call it)."""
        carries = None
        if self.task.stream and self.carry is not None:
            from accelerate.utils import gather

            flat = [gather(t.contiguous()) for t in flatten_state(self.carry)]
            carries = {0: flat}
        url = None
        if self.is_main:
            model_state = self.accelerator.get_state_dict(self.model)
            meta = {"step": self.step, "kind": kind, "best": self.best, "time": time.time(),
                    "num_parameters": self.num_parameters, "mlflow_run_id": self.mlflow_run_id}
            url = write_checkpoint(self.ckpt_root, f"{kind}-{self.step:08d}", model_state, self._state_dict(),
                                   self.run.model_dump(mode="json"), meta, carries)
            prune(self.ckpt_root, kind, 1 if kind == "best" else self.run.train.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        return url

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str, max_batches: int | None = None) -> dict[str, float]:
        model = self.model
        model.eval()
        device = self.accelerator.device
        totals: dict[str, torch.Tensor] = {}
        state = None
        bs = self.run.train.eval_batch_size
        for i, batch in enumerate(self.task.eval_batches(split, bs)):  # type: ignore[arg-type]
            if max_batches is not None and i >= max_batches:
                break
            batch = batch.shard(self.rank, self.world, allow_uneven=not self.task.stream).to(device)
            if batch.inputs.shape[0] == 0:
                continue
            if not self.task.stream or batch.reset:
                state = None
            out, state = model(batch.inputs, state, batch.times)
            stats = self.task.batch_stats(out, batch)
            for k, v in stats.items():
                totals[k] = totals[k] + v if k in totals else v.clone()
        if not totals:
            raise ConfigError(f"task.name: task '{self.run.task['name']}' produced no {split} batches")
        if self.world > 1:
            totals = {k: self.accelerator.reduce(v.to(device), reduction="sum") for k, v in totals.items()}
        metrics = self.task.finalize({k: v.cpu() for k, v in totals.items()})
        metrics.update(cell_extra_metrics(self.unwrapped))
        model.train()
        return metrics

    # -- the loop --------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        run = self.run
        start_wall = time.perf_counter()
        from seqplat.core.lock import RunLock

        lock = RunLock(self.run_dir)
        with _StopFlag() as self.stop, flush_denormal():  # signals first: set-up can be interrupted cleanly
            if self.is_main:
                lock.acquire()
                clean_temp(self.ckpt_root)
            try:
                return self._fit(run, start_wall)
            finally:
                lock.release()

    def _fit(self, run: RunConfig, start_wall: float) -> TrainResult:
        tags = {"seqplat.cell": run.cell["name"], "seqplat.task": run.task["name"], "seqplat.run_dir": self.run_dir}
        reg = self.registry
        if reg is None:
            from seqplat.registry import get_registry

            reg = get_registry()
        for name, info in reg.plugins.items():
            if not info.broken:
                tags[f"seqplat.plugin.{name}"] = info.version or "unknown"
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        if run.tracking.parent_run_id:
            tags["mlflow.parentRunId"] = run.tracking.parent_run_id
        experiment = run.tracking.experiment or run.task["name"]
        self.mlflow_run_id = self.tracker.start(experiment, run.tracking.run_name, self.mlflow_run_id, tags,
                                                fallback_dir=self.run_dir) or self.mlflow_run_id
        status = "FAILED"
        try:
            if self.tracker.run_id and self.step == 0:
                params = flatten(run.model_dump(mode="json"))
                params["num_parameters"] = str(self.num_parameters)
                params.pop("description", None)
                self.tracker.log_params(params)
                self.tracker.log_text(run_to_yaml(run), "config.yaml")
            elif self.tracker.run_id:  # a resumed job continues the same MLflow run
                self.tracker.set_tags({"seqplat.resumed_at_step": str(self.step),
                                       "seqplat.previous_attempt": "interrupted or killed"})
            result = self._loop()
            result.tracking_uri = self.tracker.local_fallback
            status = "FINISHED"
            result.wall_time_s = time.perf_counter() - start_wall
            return result
        except (TrainingInterrupted, KeyboardInterrupt):
            status = "KILLED"
            raise
        finally:
            self.tracker.end(status)

    def _loop(self) -> TrainResult:
        t, acc = self.run.train, self.accelerator
        device = acc.device
        model = self.model
        model.train()
        regs = getattr(self.unwrapped, "regularizers", [])
        pbar = tqdm(total=t.steps, initial=self.step, disable=not self.progress, desc="train",
                    dynamic_ncols=True, leave=True)
        win_loss, win_n, win_tokens, win_start = 0.0, 0, 0, time.perf_counter()
        stopped_early = False
        last_valid: dict[str, float] = {}
        stop = self.stop
        while self.step < t.steps:
            if stop.signal is not None:
                url = self.save()
                pbar.close()
                raise TrainingInterrupted(
                    f"Interrupted by {stop.signal} at step {self.step}; resumable checkpoint written to {url}. "
                    f"Continue with: seqplat train --resume {self.run_dir}"
                )
            step_start = time.perf_counter()
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(self.step, t, self.plateau_scale)
            batch = self.task.train_batch(self.step, t.batch_size, t.seed).shard(self.rank, self.world).to(device)
            fresh = not self.task.stream or batch.reset or self.carry is None
            state = None if fresh else detach_state(self.carry)
            out, new_state, hidden = model(batch.inputs, state, batch.times, return_hidden=True)
            loss = self.task.loss(out, batch)
            total = loss
            penalties: dict[str, torch.Tensor] = {}
            for r in regs:
                for name, value in r.penalty(hidden).items():
                    penalties[name] = value
                    total = total + value
            finite = bool(torch.isfinite(total))
            if finite:
                acc.backward(total)
                if t.clip_value is not None:
                    acc.clip_grad_value_(model.parameters(), t.clip_value)
                if t.clip_norm is not None:
                    gnorm = acc.clip_grad_norm_(model.parameters(), t.clip_norm, norm_type=t.clip_norm_type)
                    finite = bool(torch.isfinite(torch.as_tensor(gnorm)))
                else:
                    finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters())
            if not finite:
                self.optimizer.zero_grad(set_to_none=True)
                if t.on_nan == "stop":
                    pbar.close()
                    raise DivergenceError(
                        f"Loss or gradients became NaN/Inf at step {self.step} (loss {float(loss.detach()):.4g}); "
                        f"the last good checkpoint is under {self.ckpt_root}. Lower train.lr, set train.clip_norm, "
                        f"or set train.on_nan=skip."
                    )
                log.warning("step %d: non-finite loss or gradients, batch skipped", self.step)
                self.carry = None
            else:
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.carry = detach_state(new_state) if self.task.stream else None
            self.step += 1
            n_tokens = batch.num_tokens * self.world
            self.tokens_seen += n_tokens
            step_s = time.perf_counter() - step_start
            self.train_time += step_s
            if self.compile_clock is not None and self.compile_clock.add(step_s) is not None:
                self._report_compile()
            win_loss += float(loss.detach())
            win_n += 1
            win_tokens += n_tokens
            if self.step % t.log_every == 0 or self.step == t.steps:
                elapsed = time.perf_counter() - win_start
                tps = win_tokens / max(elapsed, 1e-9)
                train_loss = win_loss / max(win_n, 1)
                if self.world > 1:  # log the global mean, comparable with a one-process run
                    train_loss = float(acc.reduce(torch.tensor(train_loss, device=device), reduction="mean"))
                lr = lr_at(self.step - 1, t, self.plateau_scale)
                metrics = {"train_loss": train_loss, "train_tokens_per_s": tps, "lr": lr}
                metrics.update({f"train_{k}": float(v.detach()) for k, v in penalties.items()})
                self._record("train_loss", self.step, train_loss)
                self.tracker.log_metrics(metrics, self.step)
                pbar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tps:,.0f}")
                win_loss, win_n, win_tokens, win_start = 0.0, 0, 0, time.perf_counter()
            pbar.update(1)

            if self.step % t.eval_every == 0 or self.step == t.steps:
                last_valid = self.evaluate("valid", t.max_eval_batches)
                value = last_valid[self.task.primary_metric]
                for k, v in last_valid.items():
                    self._record(f"valid_{k}", self.step, v)
                self.tracker.log_metrics({f"valid_{k}": v for k, v in last_valid.items()}, self.step)
                pbar.write(_fmt_metrics(f"step {self.step} valid", last_valid)) if self.progress else None
                if self._better(value):
                    self.best, self.best_step, self.bad_evals, self.plateau_bad = value, self.step, 0, 0
                    self.save("best")
                else:
                    self.bad_evals += 1
                    self.plateau_bad += 1
                    s = t.schedule
                    if s.kind == "plateau" and self.plateau_bad > s.patience and (
                        s.max_decays is None or self.plateau_decays < s.max_decays
                    ):
                        self.plateau_scale *= s.gamma
                        self.plateau_decays += 1
                        self.plateau_bad = 0
                if t.patience is not None and self.bad_evals >= t.patience:
                    stopped_early = True
                if t.target_metric is not None and (
                    value <= t.target_metric if self.task.primary_mode == "min" else value >= t.target_metric
                ):
                    stopped_early = True
            if self.step % t.checkpoint_every == 0 or self.step == t.steps or stopped_early:
                self.save()
            if stopped_early:
                break
        pbar.close()
        if self.compile_clock is not None and self.compile_clock.value is None and self.compile_clock.times:
            self._report_compile()  # too few steps for a steady state: an upper bound

        # final evaluation with the best weights
        if t.restore_best and self.best_step is not None:
            best = list_checkpoints(self.ckpt_root, "best")
            if best:
                self.unwrapped.load_state_dict(load_checkpoint(best[-1][1]).model_state)
        valid = self.evaluate("valid")
        test = self.evaluate("test")
        final = {f"final_valid_{k}": v for k, v in valid.items()} | {f"test_{k}": v for k, v in test.items()}
        tps = self.tokens_seen / max(self.train_time, 1e-9)
        final["train_tokens_per_s_mean"] = tps
        final["peak_memory_mb"] = peak_memory_mb()
        self.tracker.log_metrics(final, self.step)
        result = TrainResult(
            run_id=self.mlflow_run_id, run_dir=self.run_dir,
            checkpoint_dir=(list_checkpoints(self.ckpt_root, "best") or list_checkpoints(self.ckpt_root))[-1][1]
            if self.is_main else None,
            steps=self.step, num_parameters=self.num_parameters, valid_metrics=valid, test_metrics=test,
            best_valid=self.best, train_tokens_per_s=tps, wall_time_s=0.0, peak_memory_mb=peak_memory_mb(),
            history=self.history, stopped_early=stopped_early,
        )
        if self.is_main and self.tracker.run_id:
            self._log_reports(result)
        return result

    def _log_reports(self, result: TrainResult) -> None:
        from seqplat.core.report import learning_curve_png, metrics_markdown

        with tempfile.TemporaryDirectory() as tmp:
            png = os.path.join(tmp, "learning_curve.png")
            learning_curve_png(self.history, png, title=f"{self.run.cell['name']} on {self.run.task['name']}",
                               primary=self.task.primary_metric)
            self.tracker.log_artifact(png, "plots")
            md = os.path.join(tmp, "metrics.md")
            with open(md, "w", encoding="utf-8") as f:
                f.write(metrics_markdown(result, self.run, self.task))
            self.tracker.log_artifact(md)
            if self.run.tracking.log_checkpoint and result.checkpoint_dir:
                fs, path = fsspec.core.url_to_fs(result.checkpoint_dir)
                local = os.path.join(tmp, "checkpoint")
                fs.get(path.rstrip("/") + "/", local, recursive=True)
                self.tracker.log_artifacts(local, "checkpoint")
                name = self.run.tracking.register_model
                if name:
                    from seqplat.core.errors import SeqplatError
                    from seqplat.core.registry_mlflow import register_checkpoint_model

                    try:
                        version = register_checkpoint_model(self.tracker.run_id, name)
                    except SeqplatError as exc:
                        log.warning("model registry: %s", exc)
                    else:
                        result.registered_model = f"models:/{name}/{version}"
                        self.tracker.set_tags({"seqplat.registered_model": result.registered_model})


def _fmt_metrics(prefix: str, metrics: dict[str, float]) -> str:
    return prefix + ": " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def run_to_yaml(run: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(run.model_dump(mode="json"), sort_keys=False)


def train(run: RunConfig | None = None, resume: str | None = None, registry: Any | None = None,
          progress: bool | None = None) -> TrainResult:
    """Train ``run`` (or resume the run at ``resume``, a checkpoint or run folder URL)."""
    if run is None and resume is None:
        raise ValueError("train() needs a RunConfig or a resume URL")
    trainer = Trainer(run, resume=resume, registry=registry, progress=progress)  # type: ignore[arg-type]
    with contextlib.ExitStack():
        return trainer.fit()


def release_process_group() -> None:
    """Tear down torch.distributed's default process group if a multi-process launch created one.

    Call it once a process is done training (``seqplat train`` does). Left alone, the trainer's reference
    cycles kept the DDP model, and with it gloo's group, alive into interpreter finalization, where gloo's
    threads aborted a rank now and then after a run that had finished and saved everything ("terminate
    called without an active exception", SIGABRT: 2 of 8 two-rank test runs on a 2-core machine; destroying
    the group without collecting those cycles first still failed 4 of 12).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        import gc

        gc.collect()  # the trainer's reference cycles hold the DDP model, and the model holds the group
        torch.distributed.destroy_process_group()


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, task: Task, split: str, batch_size: int,
                   max_batches: int | None = None) -> dict[str, float]:
    """Single-process evaluation of ``model`` on a task split (carrying state on streams)."""
    model.eval()
    totals: dict[str, torch.Tensor] = {}
    state = None
    for i, batch in enumerate(task.eval_batches(split, batch_size)):  # type: ignore[arg-type]
        if max_batches is not None and i >= max_batches:
            break
        if not task.stream or batch.reset:
            state = None
        out, state = model(batch.inputs, state, batch.times)
        for k, v in task.batch_stats(out, batch).items():
            totals[k] = totals[k] + v if k in totals else v.clone()
    metrics = task.finalize(totals)
    metrics.update(cell_extra_metrics(model))
    return metrics


def cell_extra_metrics(model: torch.nn.Module) -> dict[str, float]:
    """Figures cells report about the last evaluation through ``extra_metrics()`` (e.g. Phased LSTM's
    fraction of state updates), prefixed ``layer<i>.`` when several cells are stacked."""
    cells = list(getattr(model, "cells", []))
    out: dict[str, float] = {}
    for i, cell in enumerate(cells):
        fn = getattr(cell, "extra_metrics", None)
        if callable(fn):
            for k, v in fn().items():
                out[f"layer{i}.{k}" if len(cells) > 1 else k] = float(v)
    return out


def resolve_run_reference(ref: str) -> str:
    """A checkpoint URL from a checkpoint/run folder URL, ``runs:/<id>`` or a bare MLflow run id."""
    import re

    from seqplat.core.registry_mlflow import resolve_model_reference

    ref = resolve_model_reference(ref)
    run_id = ref[len("runs:/"):].strip("/").split("/")[0] if ref.startswith("runs:/") else None
    if run_id is None and re.fullmatch(r"[0-9a-f]{32}", ref):
        run_id = ref
    if run_id is None:
        return ref
    import mlflow

    try:
        run = mlflow.get_run(run_id)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"MLflow run '{run_id}' not found in {mlflow.get_tracking_uri()}: {exc}") from exc
    run_dir = run.data.tags.get("seqplat.run_dir")
    if run_dir:
        fs, path = fsspec.core.url_to_fs(run_dir)
        best = list_checkpoints(posixpath.join(run_dir, "checkpoints"), "best") if fs.exists(path) else []
        if best:
            return best[-1][1]
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoint")
    return local


def evaluate_checkpoint(ref: str, split: str = "test", batch_size: int | None = None,
                        registry: Any | None = None) -> tuple[dict[str, float], RunConfig]:
    """Rebuild the model of a checkpoint (or logged run) and evaluate it on ``split``."""
    url = resolve_run_reference(ref)
    ck = load_checkpoint(url, prefer="best")
    run = validate_run(ck.config, registry)
    task = build_task(run.task, registry)
    task.prepare()
    model = build_model(run, task, registry)
    try:
        model.load_state_dict(ck.model_state)
    except RuntimeError as exc:
        raise CheckpointError(f"Checkpoint '{ck.url}' does not fit the model its config describes: "
                              f"{str(exc).splitlines()[0][:200]}") from exc
    with flush_denormal():
        return evaluate_model(model, task, split, batch_size or run.train.eval_batch_size), run
