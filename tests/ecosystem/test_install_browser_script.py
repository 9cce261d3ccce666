"""scripts/install-browser.sh: valid bash, and a no-op when chromium is already there."""

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "install-browser.sh"


def test_script_is_valid_bash_and_executable():
    assert SCRIPT.stat().st_mode & 0o111, f"{SCRIPT} is not executable"
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_script_does_nothing_when_chromium_is_installed():
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed here; running the script would install it")
    proc = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("chromium is already installed: ")
