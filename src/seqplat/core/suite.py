"""Comparison suites: every installed cell's recipe for one protocol, on the same budget, in one table.

A protocol ``NAME`` is a base recipe ``protocols/NAME`` (task + training budget, no cell). A *cell
recipe* of the protocol is any recipe whose ``base`` chain reaches ``protocols/NAME`` (by convention
``<plugin>/NAME`` or ``<plugin>/NAME_<variant>``); the LSTM baseline ``baselines/NAME`` is always among them. Where no
``protocols/NAME`` exists (a protocol that lives inside one plugin, such as ``freq_async``), the chains of
the recipes named exactly ``<plugin>/NAME`` serve as the anchor instead.

:func:`run_suite` trains each (recipe, seed) with the one trainer, as MLflow runs nested under one
parent run (through the ``mlflow.parentRunId`` tag), records every finished entry in
``<out>/suite_state.json`` so that a rerun skips it, and writes a report (``report.md``,
``results.json``, ``plots/*.png``) to ``out`` (any fsspec URL), also logged to the parent run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
from tqdm.auto import tqdm

from seqplat.core.config import RunConfig, build_run_config, resolve_recipe
from seqplat.core.errors import ConfigError, SeqplatError, TrainingInterrupted

log = logging.getLogger("seqplat.suite")

STATE_FILE = "suite_state.json"


@dataclass
class SuiteCell:
    """One recipe of a protocol, and the cell it trains."""

    recipe: str
    cell: str
    plugin: str


@dataclass
class SuiteEntry:
    """The outcome of one (recipe, seed) run, as stored in the state file."""

    recipe: str
    cell: str
    seed: int
    status: str = "pending"  # pending | running | finished | failed
    run_dir: str | None = None
    run_id: str | None = None
    num_parameters: int | None = None
    valid_metrics: dict[str, float] = field(default_factory=dict)
    test_metrics: dict[str, float] = field(default_factory=dict)
    train_tokens_per_s: float | None = None
    peak_memory_mb: float | None = None
    wall_time_s: float | None = None
    steps: int | None = None
    command: str = ""
    commit: str | None = None  # git commit of the code the run trained with (None: unknown)
    history: dict[str, list[list[float]]] = field(default_factory=dict)
    wall_curve: list[list[float]] = field(default_factory=list)  # [[seconds since start, primary valid]]
    error: str | None = None

    @property
    def key(self) -> str:
        return entry_key(self.recipe, self.seed)


@dataclass
class SuiteResult:
    """What :func:`run_suite` returns."""

    protocol: str
    out: str
    parent_run_id: str | None
    entries: list[SuiteEntry]
    skipped: list[str]
    report_markdown: str
    files: list[str]


def entry_key(recipe: str, seed: int) -> str:
    """The state-file key of one (recipe, seed) run."""
    return f"{recipe}@seed{seed}"


# -- choosing the cells ---------------------------------------------------------------------------

def base_chain(name: str, registry: Any) -> list[str]:
    """``name`` followed by the recipes its ``base`` chain inherits from, nearest first."""
    chain: list[str] = []
    current: str | None = name
    while current and current not in chain and current in registry.entries["recipe"]:
        chain.append(current)
        base = registry.entries["recipe"][current].obj.get("base")
        current = base if isinstance(base, str) else None
    return chain


def protocol_cells(protocol: str, registry: Any | None = None) -> list[SuiteCell]:
    """Every installed recipe that runs ``protocol``, the LSTM baseline ``baselines/<protocol>`` first.

    With a ``protocols/<protocol>`` recipe: every recipe whose base chain reaches it (by convention they
    are named ``<plugin>/<protocol>[_<variant>]``, but the chain decides). Without one: the recipes named
    ``<plugin>/<protocol>[_<variant>]`` whose chains meet the chain of one named exactly ``<plugin>/<protocol>``.
    """
    from seqplat.registry import get_registry

    reg = registry or get_registry()
    recipes = reg.entries["recipe"]
    pattern = re.compile(rf"^(?!protocols/)[^/]+/{re.escape(protocol)}(_[^/]+)?$")
    candidates = sorted(n for n in recipes if pattern.match(n))
    base = f"protocols/{protocol}"
    if base in recipes:  # any recipe on the protocol's budget, whatever its name (sab/protocol_copy_200)
        anchors = {base}
        candidates = sorted(n for n in recipes if not n.startswith("protocols/"))
    else:
        anchors = {a for n in candidates if n.split("/", 1)[1] == protocol for a in base_chain(n, reg)}
    if not anchors:
        known = sorted(n.split("/", 1)[1] for n in recipes if n.startswith("protocols/"))
        raise ConfigError(
            f"--protocol: unknown protocol '{protocol}': no recipe 'protocols/{protocol}' and no '<plugin>/{protocol}' "
            f"recipe. Known protocols: {', '.join(known) or '(none)'}."
        )
    cells = []
    for name in candidates:
        if not anchors & set(base_chain(name, reg)):
            continue
        data = resolve_recipe(name, reg)
        cell = (data.get("cell") or {}).get("name")
        if not isinstance(cell, str):
            continue  # a recipe without a cell is a budget, not a run
        cells.append(SuiteCell(recipe=name, cell=cell, plugin=recipes[name].plugin))
    cells.sort(key=lambda c: (c.recipe != f"baselines/{protocol}", c.recipe))
    return cells


def select_cells(cells: list[SuiteCell], wanted: Sequence[str] | None, protocol: str) -> list[SuiteCell]:
    """Keep the cells named in ``wanted`` (cell names or recipe names); the LSTM baseline always stays."""
    if not wanted:
        return cells
    wanted_set = {w.strip() for w in wanted if w.strip()}
    unknown = [w for w in wanted_set if not any(w in (c.cell, c.recipe) for c in cells)]
    if unknown:
        listing = ", ".join(f"{c.cell} ({c.recipe})" for c in cells)
        raise ConfigError(f"--cells: {', '.join(sorted(unknown))} not among protocol '{protocol}' cells: {listing}")
    baseline = f"baselines/{protocol}"
    return [c for c in cells if c.recipe == baseline or c.cell in wanted_set or c.recipe in wanted_set]


# -- state -------------------------------------------------------------------------------------

def load_state(out: str) -> dict[str, Any]:
    """The suite's state file under ``out`` (an empty state if none)."""
    url = posixpath.join(out, STATE_FILE)
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return {"entries": {}}
    with fs.open(path, "r") as f:
        return json.load(f)


def save_state(out: str, state: dict[str, Any]) -> None:
    """Write the state file atomically where the file system allows (temp file, then move)."""
    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    path = posixpath.join(root, STATE_FILE)
    tmp = path + ".tmp"
    with fs.open(tmp, "w") as f:
        json.dump(state, f, indent=1, default=str)
    fs.mv(tmp, path)


def _entry_from(data: dict[str, Any]) -> SuiteEntry:
    known = {f for f in SuiteEntry.__dataclass_fields__}
    return SuiteEntry(**{k: v for k, v in data.items() if k in known})


# -- MLflow ------------------------------------------------------------------------------------

def tracking_uri(run: RunConfig) -> str:
    """The MLflow store a run logs to, in the trainer's order: the config, ``MLFLOW_TRACKING_URI``, MLflow's."""
    import mlflow

    return run.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()


class _Parent:
    """The suite's parent MLflow run, driven through ``MlflowClient`` so the trainer can start its own."""

    def __init__(self, run: RunConfig, protocol: str, existing: str | None):
        from mlflow.tracking import MlflowClient

        from seqplat.core.tracking import store_lock

        uri = tracking_uri(run)
        self.experiment = run.tracking.experiment or run.task["name"]
        with store_lock(uri):  # another suite or trainer may be creating the same sqlite store right now
            self.client = MlflowClient(uri)
            exp = self.client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(self.experiment)
        self.run_id: str | None = None
        if existing:
            try:
                self.client.get_run(existing)
                self.run_id = existing
                self.client.update_run(existing, status="RUNNING")
            except Exception:  # noqa: BLE001 - a parent from another store: start a new one
                self.run_id = None
        if self.run_id is None:
            r = self.client.create_run(exp_id, run_name=f"suite-{protocol}",
                                       tags={"seqplat.suite": protocol})
            self.run_id = r.info.run_id

    def adopt(self, child_id: str) -> None:
        self.client.set_tag(child_id, "mlflow.parentRunId", self.run_id)
        self.client.set_tag(child_id, "seqplat.suite_parent", self.run_id)

    def wall_curve(self, child_id: str, key: str) -> list[list[float]]:
        """``[[seconds since the run started, value]]`` of a child's metric, from MLflow's timestamps."""
        start = self.client.get_run(child_id).info.start_time
        hist = self.client.get_metric_history(child_id, key)
        return [[(m.timestamp - start) / 1000.0, m.value] for m in sorted(hist, key=lambda m: m.step)]

    def run_commit(self, child_id: str) -> str | None:
        """The git commit a child run recorded (``mlflow.source.git.commit``), or None."""
        try:
            return self.client.get_run(child_id).data.tags.get("mlflow.source.git.commit")
        except Exception:  # a run deleted from the store: the commit stays unknown
            return None

    def finish(self, folder: str, params: dict[str, str], metrics: dict[str, float], status: str) -> None:
        logged = self.client.get_run(self.run_id).data.params
        for k, v in params.items():
            v = v[:6000]
            if k not in logged:
                self.client.log_param(self.run_id, k, v)
            elif logged[k] != v:  # MLflow params are write-once: a rerun with other --cells/--seeds goes to a tag
                self.client.set_tag(self.run_id, f"seqplat.suite.latest.{k}", v)
        for k, v in metrics.items():
            if math.isfinite(v):
                self.client.log_metric(self.run_id, k, v)
        self.client.log_artifacts(self.run_id, folder, "suite")
        self.client.set_terminated(self.run_id, status)


# -- running -------------------------------------------------------------------------------------

def _command(recipe: str, seed: int, overrides: Sequence[str]) -> str:
    parts = ["seqplat", "train", "--recipe", recipe, "--set", f"train.seed={seed}"]
    for o in overrides:
        parts += ["--set", o]
    return " ".join(shlex.quote(p) for p in parts)


def _slug(recipe: str, seed: int) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", recipe) + f"-seed{seed}"


def _has_checkpoint(run_dir: str) -> bool:
    from seqplat.core.checkpoint import list_checkpoints

    try:
        return bool(list_checkpoints(posixpath.join(run_dir, "checkpoints")))
    except (OSError, ValueError):
        return False


def run_suite(
    protocol: str,
    cells: Sequence[str] | None = None,
    seeds: Sequence[int] = (0,),
    out: str | None = None,
    overrides: Sequence[str] = (),
    steps: int | None = None,
    registry: Any | None = None,
    progress: bool = True,
    isolate: bool = False,
    jobs: int = 1,
) -> SuiteResult:
    """Train every chosen cell recipe of ``protocol`` for every seed, skipping entries already finished
    in ``<out>/suite_state.json``, then write and log the report. Returns the report and every entry.

    With ``isolate`` each run trains in a fresh Python process (see :func:`train_isolated`), so its peak
    memory is its own; the child sees only the installed plugins, not ones added to ``registry`` inline.
    ``jobs`` > 1 (isolated runs only) trains that many runs at once, each in its own process; give each
    one thread (``--set train.threads=1``) and at most one job per core, or the runs slow each other down.
    """
    from seqplat.core.train import train
    from seqplat.registry import get_registry

    reg = registry or get_registry()
    if jobs < 1:
        raise ConfigError(f"--jobs: expected a positive integer, got {jobs}")
    if jobs > 1 and not isolate:
        raise ConfigError("--jobs: parallel runs need --isolate (each run in its own process); "
                          "drop --in-process or use --jobs 1")
    chosen = select_cells(protocol_cells(protocol, reg), cells, protocol)
    if not chosen:
        raise ConfigError(f"--protocol: protocol '{protocol}' has no cell recipes installed")
    if not seeds:
        raise ConfigError("--seeds: give at least one seed, e.g. --seeds 0,1,2")
    out = (out or f"suite-{protocol}").rstrip("/")
    extra = list(overrides) + ([f"train.steps={steps}"] if steps is not None else [])
    state = load_state(out)
    if state.get("protocol") not in (None, protocol):
        raise ConfigError(f"--out: '{out}' holds a suite of protocol '{state['protocol']}', not '{protocol}'; "
                          f"choose another --out")
    state["protocol"] = protocol
    state.setdefault("entries", {})
    configs = {c.recipe: build_run_config(recipe=c.recipe, overrides=extra, registry=reg) for c in chosen}
    first = configs[chosen[0].recipe]
    parent = _Parent(first, protocol, state.get("parent_run_id")) if first.tracking.enabled else None
    if parent is not None:
        state["parent_run_id"] = parent.run_id
    save_state(out, state)

    todo = [(c, s) for c in chosen for s in seeds]
    done = [entry_key(c.recipe, s) for c, s in todo
            if state["entries"].get(entry_key(c.recipe, s), {}).get("status") == "finished"]
    bar = tqdm(total=len(todo), initial=len(done), desc=f"suite {protocol}", disable=not progress,
               dynamic_ncols=True, unit="run")
    lock = threading.Lock()
    from seqplat.core.tracking import git_commit

    code_commit = git_commit()  # once: every run of this invocation trains this checkout's code

    def save(key: str, entry: SuiteEntry) -> None:
        with lock:
            state["entries"][key] = asdict(entry)
            save_state(out, state)

    def run_one(c: SuiteCell, seed: int) -> None:
        key = entry_key(c.recipe, seed)
        previous = state["entries"].get(key, {})
        old_dir = previous.get("run_dir")
        resume = old_dir if previous.get("status") == "running" and old_dir and _has_checkpoint(old_dir) else None
        entry = SuiteEntry(recipe=c.recipe, cell=c.cell, seed=seed, status="running",
                           command=_command(c.recipe, seed, extra),
                           run_dir=resume or posixpath.join(out, "runs",
                                                            f"{_slug(c.recipe, seed)}-{uuid.uuid4().hex[:6]}"))
        run = configs[c.recipe]
        upd: dict[str, Any] = {"train": run.train.model_copy(update={"seed": seed}),
                               "io": run.io.model_copy(update={"run_dir": entry.run_dir})}
        if parent is not None:
            upd["tracking"] = run.tracking.model_copy(update={"experiment": parent.experiment})
        run = run.model_copy(update=upd)
        save(key, entry)
        try:
            result = train_isolated(run, resume) if isolate else train(run, resume=resume, registry=reg,
                                                                             progress=False)
        except SeqplatError as exc:
            if isinstance(exc, TrainingInterrupted):
                raise
            entry.status, entry.error = "failed", str(exc).splitlines()[0][:500]
            log.warning("suite %s: %s seed %d failed: %s", protocol, c.recipe, seed, entry.error)
            save(key, entry)
            with lock:
                bar.update(1)
            return
        primary = _primary_metric(run, reg)
        entry.status = "finished"
        entry.run_id = result.run_id
        entry.num_parameters = result.num_parameters
        entry.valid_metrics, entry.test_metrics = result.valid_metrics, result.test_metrics
        entry.train_tokens_per_s, entry.peak_memory_mb = result.train_tokens_per_s, result.peak_memory_mb
        entry.wall_time_s, entry.steps, entry.history = result.wall_time_s, result.steps, result.history
        entry.commit = code_commit  # the child ran this checkout's code
        if parent is not None and result.run_id:
            with lock:
                parent.adopt(result.run_id)
                entry.wall_curve = parent.wall_curve(result.run_id, f"valid_{primary}")
        save(key, entry)
        with lock:
            bar.set_postfix_str(f"{c.recipe} seed {seed} done")
            bar.update(1)

    pending = [(c, s) for c, s in todo if entry_key(c.recipe, s) not in done]
    status = "FINISHED"
    try:
        if jobs <= 1:
            for c, seed in pending:
                bar.set_postfix_str(f"{c.recipe} seed {seed}")
                run_one(c, seed)
        else:
            with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="suite") as pool:
                futures = [pool.submit(run_one, c, s) for c, s in pending]
                try:
                    for fut in as_completed(futures):
                        fut.result()
                except BaseException:
                    for fut in futures:
                        fut.cancel()
                    raise
    except (TrainingInterrupted, KeyboardInterrupt):
        status = "KILLED"
        raise
    finally:
        bar.close()
        if status == "KILLED" and parent is not None:
            parent.client.set_terminated(parent.run_id, "KILLED")

    entries = [_entry_from(state["entries"][entry_key(c.recipe, s)]) for c, s in todo
               if entry_key(c.recipe, s) in state["entries"]]
    if parent is not None:  # runs finished before entries recorded their commit: ask MLflow
        for e in entries:
            if e.status == "finished" and e.commit is None and e.run_id:
                e.commit = parent.run_commit(e.run_id)
                if e.commit:
                    save(e.key, e)
    primary, mode, baseline = _protocol_meta(first, reg)
    md = report_markdown(protocol, entries, primary, mode, baseline, seeds, isolate, jobs)
    files = write_report(out, md, entries, primary, protocol)
    if parent is not None:
        with tempfile.TemporaryDirectory() as tmp:
            fs, root = fsspec.core.url_to_fs(out)
            for rel in files:
                local = os.path.join(tmp, *rel.split("/"))
                os.makedirs(os.path.dirname(local), exist_ok=True)
                fs.get(posixpath.join(root, rel), local)
            metrics: dict[str, float] = {}
            for recipe, group in _by_recipe(entries).items():
                values = [e.test_metrics.get(primary) for e in group]
                clean = [v for v in values if v is not None]
                if clean:
                    metrics[f"{_slug(recipe, 0)[:-6]}.test_{primary}_mean"] = statistics.fmean(clean)
            params = {"protocol": protocol, "cells": ",".join(c.recipe for c in chosen),
                      "seeds": ",".join(str(s) for s in seeds), "overrides": json.dumps(extra), "out": out}
            failed = any(e.status != "finished" for e in entries)
            parent.finish(tmp, params, metrics, "FAILED" if failed else "FINISHED")
    return SuiteResult(protocol=protocol, out=out, parent_run_id=parent.run_id if parent else None,
                       entries=entries, skipped=done, report_markdown=md, files=files)


def train_isolated(run: RunConfig, resume: str | None = None) -> Any:
    """Train ``run`` in a child Python process (``python -m seqplat.core.suite SPEC``) and return its
    :class:`~seqplat.core.train.TrainResult`. Ctrl-C reaches the child too, which checkpoints and stops."""
    from seqplat.core.train import TrainResult

    with tempfile.TemporaryDirectory() as tmp:
        spec = os.path.join(tmp, "spec.json")
        result_path = os.path.join(tmp, "result.json")
        with open(spec, "w", encoding="utf-8") as f:
            json.dump({"config": run.model_dump(mode="json"), "resume": resume, "result": result_path,
                       "parent_pid": os.getpid()}, f)
        env = dict(os.environ)
        if run.tracking.enabled:
            env["MLFLOW_TRACKING_URI"] = tracking_uri(run)
        with open(os.path.join(tmp, "stderr.txt"), "w+", encoding="utf-8") as err:
            proc = subprocess.Popen([sys.executable, "-m", "seqplat.core.suite", spec], env=env,  # noqa: S603
                                    stdout=subprocess.DEVNULL, stderr=err)
            try:
                code = proc.wait()
            except KeyboardInterrupt:
                proc.wait()  # the child got the same SIGINT: let it write its checkpoint
                raise
            err.seek(0)
            tail = err.read()[-2000:]
        data = None
        if os.path.exists(result_path):
            with open(result_path, encoding="utf-8") as f:
                data = json.load(f)
    if code == 130:
        raise TrainingInterrupted(f"run of {run.cell['name']} interrupted; rerun the suite to resume it")
    if code != 0 or data is None or "error" in data:
        why = data["error"] if data and "error" in data else (tail.strip().splitlines() or [f"exit code {code}"])[-1]
        raise SeqplatError(f"training {run.cell['name']} in a child process failed: {why}")
    return TrainResult(**data)


def die_with_parent(parent_pid: int | None) -> bool:
    """Have the kernel send this process SIGTERM when its parent dies (Linux ``PR_SET_PDEATHSIG``).

    A suite killed with ``kill`` or by a crash would otherwise leave its training children running as
    orphans, still writing to the suite's folders. SIGTERM takes the trainer's usual stop path: a
    resumable checkpoint, then exit. Returns False where the platform has no such call (nothing changes).
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            return False
    except (OSError, AttributeError):
        return False
    if parent_pid is not None and os.getppid() != parent_pid:  # the parent died before the call above
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def _child_main(spec_path: str) -> int:
    """Entry point of :func:`train_isolated`'s child process."""
    import torch

    from seqplat.core.config import validate_run
    from seqplat.core.train import train

    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    die_with_parent(spec.get("parent_pid"))
    torch.set_num_threads(int(spec["config"]["train"].get("threads") or torch.get_num_threads()))
    try:
        result = train(validate_run(spec["config"]), resume=spec["resume"], progress=False)
        payload: dict[str, Any] = asdict(result)
        code = 0
    except TrainingInterrupted as exc:
        payload, code = {"error": str(exc)}, 130
    except SeqplatError as exc:
        payload, code = {"error": str(exc).splitlines()[0][:500]}, 1
    with open(spec["result"], "w", encoding="utf-8") as f:
        json.dump(payload, f, default=str)
    return code


def _primary_metric(run: RunConfig, registry: Any) -> str:
    return str(registry.get("task", run.task["name"]).obj.primary_metric)


def _protocol_meta(run: RunConfig, registry: Any) -> tuple[str, str, float | None]:
    """The task's primary metric, its direction, and its memoryless baseline (None if it has none)."""
    from seqplat.core.model import build_task

    cls = registry.get("task", run.task["name"]).obj
    baseline: float | None = None
    try:
        task = build_task(run.task, registry)
        task.prepare()
        value = task.baseline
        baseline = float(value) if value is not None else None
    except Exception as exc:  # noqa: BLE001 - the baseline is a courtesy; never lose the report over it
        log.warning("no memoryless baseline for task %s: %s", run.task["name"], exc)
    return str(cls.primary_metric), str(cls.primary_mode), baseline


# -- the report ----------------------------------------------------------------------------------

def _by_recipe(entries: list[SuiteEntry]) -> dict[str, list[SuiteEntry]]:
    groups: dict[str, list[SuiteEntry]] = {}
    for e in entries:
        groups.setdefault(e.recipe, []).append(e)
    return groups


def _mean_spread(values: list[float], digits: int) -> str:
    """``mean ± sample std (n)`` for several values, the value alone for one, ``-`` for none."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:,.{digits}f}"
    return f"{statistics.fmean(values):,.{digits}f} ± {statistics.stdev(values):,.{digits}f}"


def _trained_at(entries: list[SuiteEntry]) -> str:
    """`` Runs trained at: <commit> (n runs), ...`` when any finished run recorded its commit."""
    from seqplat.core.leaderboard import count_commits, format_commit_counts

    counts = count_commits(e.commit for e in entries if e.status == "finished")
    if not counts or set(counts) == {"unknown"}:
        return ""
    return " Runs trained at: " + format_commit_counts(counts) + "."


def report_markdown(protocol: str, entries: list[SuiteEntry], primary: str, mode: str,
                    baseline: float | None, seeds: Sequence[int], isolate: bool = False, jobs: int = 1) -> str:
    """The suite's Markdown report: a summary over seeds per recipe and one row per run."""
    from seqplat.core.tracking import git_commit

    better = "lower" if mode == "min" else "higher"
    lines = [
        f"# Suite `{protocol}`", "",
        f"Primary metric: **{primary}** ({better} is better). Seeds: {', '.join(str(s) for s in seeds)}"
        + (" (mean ± sample standard deviation over seeds)." if len(seeds) > 1 else " (one seed: no spread)."),
        f"Memoryless baseline ({primary}): {baseline:.4f}." if baseline is not None
        else "Memoryless baseline: the task defines none.",
        f"Commit: {git_commit() or 'unknown'}. Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}."
        + _trained_at(entries), "",
        "## Summary", "",
        f"| cell | recipe | params | valid {primary} | test {primary} | tokens/s | peak memory (MB) | wall time (s) "
        f"| seeds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for recipe, group in _by_recipe(entries).items():
        ok = [e for e in group if e.status == "finished"]
        params = sorted({e.num_parameters for e in ok if e.num_parameters is not None})
        lines.append(
            f"| {group[0].cell} | `{recipe}` | {', '.join(f'{p:,}' for p in params) or '-'} "
            f"| {_mean_spread([e.valid_metrics[primary] for e in ok if primary in e.valid_metrics], 4)} "
            f"| {_mean_spread([e.test_metrics[primary] for e in ok if primary in e.test_metrics], 4)} "
            f"| {_mean_spread([e.train_tokens_per_s for e in ok if e.train_tokens_per_s is not None], 0)} "
            f"| {_mean_spread([e.peak_memory_mb for e in ok if e.peak_memory_mb is not None], 0)} "
            f"| {_mean_spread([e.wall_time_s for e in ok if e.wall_time_s is not None], 1)} "
            f"| {len(ok)}/{len(group)} |"
        )
    lines += ["", "## Runs", "",
              f"| cell | recipe | seed | status | params | valid {primary} | test {primary} | tokens/s "
              f"| peak memory (MB) | wall time (s) | MLflow run | command |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for e in entries:
        fin = e.status == "finished"

        def num(v: float | None, digits: int, ok: bool = fin) -> str:
            return f"{v:,.{digits}f}" if ok and v is not None else "-"

        lines.append(
            f"| {e.cell} | `{e.recipe}` | {e.seed} | {e.status if not e.error else 'failed: ' + e.error} "
            f"| {num(e.num_parameters, 0)} | {num(e.valid_metrics.get(primary), 4)} "
            f"| {num(e.test_metrics.get(primary), 4)} | {num(e.train_tokens_per_s, 0)} | {num(e.peak_memory_mb, 0)} "
            f"| {num(e.wall_time_s, 1)} | {e.run_id or '-'} | `{e.command}` |"
        )
    lines += ["", "Plots: `plots/metric_vs_step.png`, `plots/metric_vs_wallclock.png`, `plots/tokens_per_s.png`.",
              "Peak memory is the training process's peak resident set (CUDA peak allocation on a GPU); "
              + ("each run trained in its own process." if isolate else
                 "runs shared one process (--in-process), so a run reports at least the peak of the runs before it.")
              + (f" {jobs} runs trained at a time (--jobs {jobs}), so tokens/s and wall time are those of a machine "
                 f"shared with {jobs - 1} other run(s)." if jobs > 1 else "")]
    return "\n".join(lines) + "\n"


def _plots(folder: str, entries: list[SuiteEntry], primary: str, protocol: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [e for e in entries if e.status == "finished"]
    colors = {r: f"C{i % 10}" for i, r in enumerate(_by_recipe(done))}
    names = []
    key = f"valid_{primary}"
    for fname, xlabel, curve in (
        ("metric_vs_step.png", "step", lambda e: e.history.get(key, [])),
        ("metric_vs_wallclock.png", "wall-clock seconds since the run started", lambda e: e.wall_curve or [
            [p[0] * (e.wall_time_s or 0.0) / max(e.steps or 1, 1), p[1]] for p in e.history.get(key, [])]),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for e in done:
            pts = curve(e)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, color=colors[e.recipe],
                        label=f"{e.recipe} (seed {e.seed})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(key)
        ax.set_title(f"suite {protocol}")
        if done:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(folder, fname), dpi=100)
        plt.close(fig)
        names.append(fname)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = {r: [e.train_tokens_per_s for e in g if e.train_tokens_per_s is not None]
              for r, g in _by_recipe(done).items()}
    labels = list(groups)
    means = [statistics.fmean(v) if v else 0.0 for v in groups.values()]
    errs = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in groups.values()]
    ax.bar(range(len(labels)), means, yerr=errs, color=[colors[r] for r in labels])
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("train tokens/s")
    ax.set_title(f"suite {protocol}: throughput")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "tokens_per_s.png"), dpi=100)
    plt.close(fig)
    names.append("tokens_per_s.png")
    return names


def machine() -> str:
    """One line naming this machine: CPU model and cores (or the GPU), OS and torch version."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}, {platform.system()} {platform.release()}, torch {torch.__version__}"


def write_report(out: str, markdown: str, entries: list[SuiteEntry], primary: str, protocol: str) -> list[str]:
    """Write ``report.md``, ``results.json`` and ``plots/*.png`` under ``out``; returns their relative paths."""
    from seqplat.core.tracking import git_commit

    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(posixpath.join(root, "plots"), exist_ok=True)
    with fs.open(posixpath.join(root, "report.md"), "w") as f:
        f.write(markdown)
    results = [{k: v for k, v in asdict(e).items() if k not in ("history", "wall_curve")} for e in entries]
    with fs.open(posixpath.join(root, "results.json"), "w") as f:
        json.dump({"protocol": protocol, "primary_metric": primary, "commit": git_commit(), "machine": machine(),
                   "runs": results}, f, indent=1, default=str)
    files = ["report.md", "results.json"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in _plots(tmp, entries, primary, protocol):
            fs.put(os.path.join(tmp, name), posixpath.join(root, "plots", name))
            files.append(f"plots/{name}")
    return files


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))
