"""The project's own standards, enforced: mypy --strict on the library and ruff on everything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from testbed.asm import cache

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, check=False)


def mypy_cache() -> list[str]:
    """mypy's incremental cache beside the assembly cache (testbed/asm/cache.py: `mypy` next to
    its `asm`), shared by every checkout: mypy takes a module's cached result when the path
    changed but the source's hash did not, so a clean clone does not type-check the library
    from scratch (~13 s here). With the user cache off, mypy's default (.mypy_cache here)."""
    directory = cache.cache_dir()
    return [] if directory is None else ["--cache-dir", str(directory.parent / "mypy")]


def test_library_is_mypy_strict_clean() -> None:
    """mypy --strict reports no error in testbed/."""
    result = run("mypy", "--strict", "--no-error-summary", *mypy_cache(), "testbed")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_is_clean() -> None:
    """ruff (the project's rule set in pyproject.toml) reports nothing in testbed/, tests/ and tools/."""
    result = run("ruff", "check", "testbed", "tests", "tools")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_test_states_the_behaviour_it_pins() -> None:
    """Every test function in tests/ has a docstring whose summary (first paragraph) is a sentence ending in '.'."""
    import ast

    missing = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test"):
                summary = (ast.get_docstring(node) or "").split("\n\n")[0].strip()
                if not summary.endswith((".", '."', ".)", ".`")):
                    missing.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert missing == [], "tests without a one-sentence docstring: " + ", ".join(missing)
