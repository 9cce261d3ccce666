import os

import pytest
import torch

pytest_plugins = ["seqplat.testing.pytest_plugin"]

torch.set_num_threads(int(os.environ.get("SEQPLAT_TEST_THREADS", "1")))


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
