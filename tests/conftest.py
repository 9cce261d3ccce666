import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

from seqplat.core.cpp_ext import extension_cache_dir

pytest_plugins = ["seqplat.testing.pytest_plugin"]

torch.set_num_threads(int(os.environ.get("SEQPLAT_TEST_THREADS", "1")))

# C++ kernels go to the user's kernel cache, not to each test's isolated SEQPLAT_CACHE: a kernel is then
# built once for the whole session (and kept for the next one) instead of in whichever test needs it first
os.environ.setdefault("SEQPLAT_EXT_CACHE", str(extension_cache_dir()))
# torch.compile's on-disk caches go to a fresh folder for each session: the tests that check a reported compile
# time must see inductor compile, not load what an earlier session left in /tmp/torchinductor_<user>
_INDUCTOR_CACHE = tempfile.mkdtemp(prefix="seqplat-tests-inductor-")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = _INDUCTOR_CACHE
_prebuild: subprocess.Popen | None = None


def pytest_sessionstart(session):
    """Build the kernels in the background on the second core (``SEQPLAT_TEST_PREBUILD=0`` turns it off).

    It is left to finish even when the session ends first: stopping it mid-build would leave torch's build
    lock in the cache, and the next session would wait on it."""
    global _prebuild
    if os.environ.get("SEQPLAT_TEST_PREBUILD", "1") != "0":
        _prebuild = subprocess.Popen([sys.executable, "-m", "seqplat.testing.prebuild"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=lambda: os.nice(5))


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_INDUCTOR_CACHE, ignore_errors=True)



@pytest.fixture(autouse=True)
def _isolate_env(monkeypatch, tmp_path):
    """Keep tests away from the user's MLflow store and cache."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("SEQPLAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("SEQPLAT_DATA"):
        return
    skip = pytest.mark.skip(reason="needs the real benchmark copies: set SEQPLAT_DATA (CI sets ../shared/data)")
    for item in items:
        if "data" in item.keywords:
            item.add_marker(skip)
