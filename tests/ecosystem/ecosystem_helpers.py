"""Helpers for tests that install distributions into the running environment with pip.

Every install happens offline (``--no-index --no-deps --no-build-isolation``) from a copy of the
source in a temporary folder (pip builds in-tree, and the repository must stay clean), under a
file lock so two test sessions sharing one environment never install or remove the same
distribution at the same time.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "seqplat-indrnn"
OFFLINE = {"PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def pip(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m pip ARGS`` in this interpreter, offline; raises with pip's output on failure."""
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **OFFLINE}, check=False)
    importlib.invalidate_caches()
    if proc.returncode != 0:
        raise AssertionError(f"pip {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def install_copy(source: Path, workdir: Path) -> Path:
    """Copy ``source`` (without build leftovers) into ``workdir`` and pip-install the copy offline."""
    dest = workdir / source.name
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip("install", "--no-deps", "--no-build-isolation", "--no-index", str(dest))
    return dest


def is_installed(distribution: str) -> bool:
    importlib.invalidate_caches()
    try:
        md.distribution(distribution)
    except md.PackageNotFoundError:
        return False
    return True


def uninstall_if_installed(distribution: str) -> None:
    if is_installed(distribution):
        pip("uninstall", "-y", distribution)


@contextlib.contextmanager
def environment_lock() -> Iterator[None]:
    """An exclusive lock per Python environment, held while a test installs and uses a distribution."""
    key = hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"seqplat-pip-tests-{key}.lock"
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def mlflow_uri_restored() -> Iterator[None]:
    """Undo what training with an explicit ``tracking_uri`` leaves behind: MLflow's process-wide URI
    (and the ``MLFLOW_TRACKING_URI`` variable ``mlflow.set_tracking_uri`` also sets)."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # back to "read MLFLOW_TRACKING_URI"; also unsets the variable
        if before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = before
