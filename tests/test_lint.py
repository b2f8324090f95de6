"""The code stays lint-clean: pycodestyle at 120 columns and ruff's pyflakes rules (F: unused
imports and names, undefined names). Short, readable code is the quality bar; running the linters
as a test keeps CI enforcing it. scripts/setup_env.sh installs both tools into the venv."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PATHS = ["core", "nodes", "bench", "tests", "scripts", "__init__.py"]


@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "pycodestyle", "--max-line-length", "120", *PATHS],
    [str(Path(sys.executable).with_name("ruff")), "check", "--select", "F", "--line-length", "120", "."],
], ids=["pycodestyle", "ruff"])
def test_lint_clean(command):
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
