"""The project's own standards, enforced: mypy --strict on the library and ruff on everything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, check=False)


def test_library_is_mypy_strict_clean() -> None:
    """mypy --strict reports no error in testbed/."""
    result = run("mypy", "--strict", "--no-error-summary", "testbed")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_is_clean() -> None:
    """ruff (the project's rule set in pyproject.toml) reports nothing in testbed/, tests/ and tools/."""
    result = run("ruff", "check", "testbed", "tests", "tools")
    assert result.returncode == 0, result.stdout + result.stderr
