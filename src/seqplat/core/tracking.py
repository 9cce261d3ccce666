"""MLflow tracking for one training job, from rank 0 only, with direct MLflow calls.

If the tracking store fails in the middle of a run, training goes on: the failed calls are written
to ``<run_dir>/tracking-buffer.jsonl`` with a warning, and the run is not lost.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import fsspec

from seqplat.core.config import TrackingConfig
from seqplat.core.errors import SeqplatError

log = logging.getLogger("seqplat.tracking")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"train.lr": "0.001", ...}`` (lists become their JSON text)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            text = json.dumps(v) if isinstance(v, list | tuple) else str(v)
            out[key] = text[:6000]
    return out


def server_problem(uri: str, timeout: float = 5.0) -> str | None:
    """None if an MLflow server answers at ``uri`` within ``timeout`` seconds, else what went wrong."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:  # noqa: S310
            return None if resp.status < 500 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        return None if exc.code < 500 else f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{type(reason).__name__}: {reason}"


def store_lock(uri: str | None) -> AbstractContextManager[Any]:
    """A lock shared by every process that opens the same local sqlite store.

    Two commands started at once on a new ``sqlite:///`` file both try to create MLflow's tables and one
    fails ("table alembic_version already exists"); creating the experiment races the same way. Holding
    ``<file>.lock`` while a store is first opened and the run created serialises exactly that part.
    Other stores (files, servers) need no lock: a null context.
    """
    if not uri or not uri.startswith("sqlite:///"):
        return nullcontext()
    from filelock import FileLock

    path = os.path.abspath(uri[len("sqlite:///"):])
    if not os.path.isdir(os.path.dirname(path)):
        return nullcontext()  # MLflow reports the missing folder itself, with the URI
    return FileLock(path + ".lock", timeout=300)


def git_commit() -> str | None:
    """The commit of the working folder's git checkout, if any."""
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


class Tracker:
    """One MLflow run; every method is a no-op when tracking is off or on ranks other than 0."""

    def __init__(self, cfg: TrackingConfig, active: bool, buffer_url: str | None = None):
        self.cfg = cfg
        self.active = active and cfg.enabled
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.buffer_url = buffer_url
        self._failed = False
        self._mlflow: Any = None
        self.local_fallback: str | None = None

    def start(self, experiment: str, run_name: str | None, resume_run_id: str | None = None,
              tags: dict[str, str] | None = None, fallback_dir: str | None = None) -> str | None:
        if not self.active:
            return None
        import mlflow

        self._mlflow = mlflow
        uri = self.cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri and uri.startswith(("http://", "https://")):
            problem = server_problem(uri)
            if problem is not None:
                if self.cfg.on_unreachable == "error" or fallback_dir is None or "://" in fallback_dir:
                    raise SeqplatError(
                        f"MLflow tracking server {uri} is unreachable ({problem}). Start it, fix --tracking-uri / "
                        f"MLFLOW_TRACKING_URI, set tracking.on_unreachable=local, or pass --set tracking.enabled=false."
                    )
                local = os.path.abspath(os.path.join(fallback_dir, "mlflow.db"))
                log.warning("MLflow server %s is unreachable (%s); logging locally to sqlite:///%s",
                            uri, problem, local)
                os.makedirs(fallback_dir, exist_ok=True)
                uri = f"sqlite:///{local}"
                self.local_fallback = uri
        if uri:
            mlflow.set_tracking_uri(uri)
        try:
            with store_lock(mlflow.get_tracking_uri()):
                exp = mlflow.get_experiment_by_name(experiment)
                self.experiment_id = exp.experiment_id if exp is not None else mlflow.create_experiment(experiment)
                if resume_run_id:
                    run = mlflow.start_run(run_id=resume_run_id)
                else:
                    run = mlflow.start_run(experiment_id=self.experiment_id, run_name=run_name, tags=tags or {})
        except Exception as exc:  # noqa: BLE001 - any store failure at start is a user-facing error
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SeqplatError(
                f"MLflow tracking store '{mlflow.get_tracking_uri()}' is not usable: {first[:300]}. "
                f"Check --tracking-uri / MLFLOW_TRACKING_URI or pass --set tracking.enabled=false."
            ) from exc
        self.run_id = run.info.run_id
        return self.run_id

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        if not self.active or self.run_id is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tracking must never kill training
            if not self._failed:
                log.warning("MLflow %s failed (%s); training continues, buffering to %s", what, exc, self.buffer_url)
                self._failed = True
            self._buffer({"call": what, "args": [a for a in args if isinstance(a, str | int | float | dict)]})

    def _buffer(self, record: dict[str, Any]) -> None:
        if self.buffer_url is None:
            return
        try:
            with fsspec.open(self.buffer_url, "a") as f:
                f.write(json.dumps(record, default=str) + "\n")
        except (OSError, ValueError):
            pass

    def log_params(self, params: dict[str, str]) -> None:
        items = list(params.items())
        for i in range(0, len(items), 90):
            self._call("log_params", self._mlflow.log_params if self._mlflow else None, dict(items[i : i + 90]))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._call("log_metrics", self._mlflow.log_metrics if self._mlflow else None,
                   {k: float(v) for k, v in metrics.items()}, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._call("set_tags", self._mlflow.set_tags if self._mlflow else None, tags)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self._call("log_artifact", self._mlflow.log_artifact if self._mlflow else None, path, artifact_path)

    def log_artifacts(self, folder: str, artifact_path: str | None = None) -> None:
        self._call("log_artifacts", self._mlflow.log_artifacts if self._mlflow else None, folder, artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self._call("log_text", self._mlflow.log_text if self._mlflow else None, text, name)

    def end(self, status: str = "FINISHED") -> None:
        if self.active and self.run_id is not None:
            try:
                self._mlflow.end_run(status=status)
            except Exception as exc:  # noqa: BLE001
                log.warning("MLflow end_run failed: %s", exc)


def iter_runs_metrics(run_id: str) -> Iterator[tuple[str, float]]:
    import mlflow

    run = mlflow.get_run(run_id)
    yield from run.data.metrics.items()
