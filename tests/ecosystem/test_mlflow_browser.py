"""The MLflow UI as a user sees it: a tiny run, `mlflow server` on a loopback port, headless Chromium.

Marked ``browser`` (skipped by default; run with ``pytest -m browser``). Needs Debian's chromium
(``scripts/install-browser.sh``); skipped with a reason when it is missing. The screenshot is saved
as ``<tmp_path>/run.png``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest
from mlflow import MlflowClient

from seqplat.core.train import train

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--virtual-time-budget=15000"]


def _chromium() -> str:
    for candidate in (shutil.which("chromium"), "/usr/bin/chromium", shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("chromium is not installed: run scripts/install-browser.sh (Debian's chromium package)")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Text(HTMLParser):
    """The page's visible text nodes, in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        self._skip += tag in ("script", "style")

    def handle_endtag(self, tag):
        self._skip -= tag in ("script", "style") and self._skip > 0

    def handle_data(self, data):
        if not self._skip and data.strip():
            self.nodes.append(data.strip())


def _text_nodes(html: str) -> list[str]:
    parser = _Text()
    parser.feed(html)
    return parser.nodes


def _follows(nodes: list[str], key: str) -> list[str]:
    """The text nodes that come right after each occurrence of ``key``."""
    return [nodes[i + 1] for i, n in enumerate(nodes[:-1]) if n == key]


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on a free loopback port over a sqlite store in tmp_path; yields (url, store uri)."""
    store = f"sqlite:///{tmp_path}/mlflow.db"
    port = _free_port()
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed at teardown
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1", "--default-artifact-root", str(tmp_path / "artifacts")],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                log_text = (tmp_path / "server.log").read_text()
                pytest.fail(f"mlflow server exited ({proc.returncode}):\n{log_text[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as resp:  # noqa: S310 - loopback
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer /health in 180 s:\n{(tmp_path / 'server.log').read_text()}")
            time.sleep(1)
        yield url, store
    finally:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)  # the server and the workers it started, all in its own session
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


def _chromium_run(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=240, check=False)


def test_run_page_shows_params_and_metrics(mlflow_server, tiny_run, tmp_path):
    chromium = _chromium()
    url, store = mlflow_server
    run = tiny_run({"name": "gru", "hidden_size": 4}, task="toy_parity", steps=4,
                   tracking={"enabled": True, "tracking_uri": store, "run_name": "browser-check"},
                   train={"eval_every": 2, "log_every": 1})
    result = train(run, progress=False)
    client = MlflowClient(store)
    logged = client.get_run(result.run_id)
    experiment = client.get_experiment(logged.info.experiment_id)
    assert experiment.name == "toy_parity"  # runs are grouped by task
    assert {a.path for a in client.list_artifacts(result.run_id)} >= {"metrics.md", "plots", "config.yaml"}

    page = f"{url}/#/experiments/{experiment.experiment_id}/runs/{result.run_id}"
    params = {k: logged.data.params[k] for k in ("cell.name", "cell.hidden_size", "task.name", "train.steps",
                                                   "train.lr", "num_parameters")}
    metrics = logged.data.metrics
    nodes: list[str] = []
    for attempt in range(3):  # the React app fetches the run after load; retry if the budget was too short
        dom = _chromium_run(chromium, tmp_path / f"profile-dom-{attempt}", "--dump-dom", page)
        assert dom.returncode == 0, dom.stderr[-3000:]
        nodes = _text_nodes(dom.stdout)
        if all(name in nodes for name in params) and all(name in nodes for name in metrics):
            break
    (tmp_path / "run.html").write_text(dom.stdout)
    assert "browser-check" in nodes and "toy_parity" in nodes
    for name, value in params.items():
        assert value in _follows(nodes, name), f"param {name}={value} not shown; see {tmp_path / 'run.html'}"
    for name, value in metrics.items():
        shown = [float(v) for v in _follows(nodes, name) if _is_number(v)]
        assert any(v == pytest.approx(value, rel=1e-6) for v in shown), (
            f"metric {name}={value} not shown (next to it: {_follows(nodes, name)}); see {tmp_path / 'run.html'}"
        )

    shot = tmp_path / "run.png"
    snap = _chromium_run(chromium, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1400,2400", page)
    assert snap.returncode == 0, snap.stderr[-3000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
