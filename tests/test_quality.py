"""The project's own standards, enforced: mypy --strict on the library and ruff on everything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

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
    if directory is None:
        return []
    mypy = directory.parent / "mypy"
    try:  # a cache directory that cannot be made is no cache (as for the assembly cache), not an error
        mypy.mkdir(parents=True, exist_ok=True)
    except OSError:
        return []
    return ["--cache-dir", str(mypy)] if os.access(mypy, os.W_OK) else []


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


def test_an_unusable_cache_directory_leaves_mypy_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the user cache off, or under a path that cannot be a directory, mypy keeps its
    default cache (no --cache-dir), as the assembly cache does without one; else `mypy` beside `asm`."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("TESTBED_CACHE_DIR", str(blocker / "cache"))
    assert mypy_cache() == []
    monkeypatch.setenv("TESTBED_CACHE_DIR", "off")
    assert mypy_cache() == []
    monkeypatch.setenv("TESTBED_CACHE_DIR", str(tmp_path / "c"))
    assert mypy_cache() == ["--cache-dir", str(tmp_path / "c" / "mypy")]


def test_hypothesis_is_not_assertion_rewritten(pytestconfig: pytest.Config) -> None:
    """Hypothesis loads from its installed bytecode, not rewritten from source in each worker
    (tests/conftest.py unmarks it through pytest's private hook attributes: this fails when
    a pytest release renames them)."""
    import hypothesis.core
    from _pytest.assertion.rewrite import AssertionRewritingHook

    assert not isinstance(hypothesis.core.__loader__, AssertionRewritingHook)
    rewriting = pytestconfig.getoption("assertmode") == "rewrite"
    assert isinstance(sys.modules[__name__].__loader__, AssertionRewritingHook) == rewriting


def test_an_xdist_controller_leaves_hypothesis_unrewritten(monkeypatch: pytest.MonkeyPatch) -> None:
    """A controller that only hands tests out unmarks Hypothesis too: Hypothesis's own terminal
    summary imports it there at the session's end, on the run's critical path (~0.5 s rewritten)."""
    import conftest

    hook = SimpleNamespace(_must_rewrite={"hypothesis", "testbed"}, _marked_for_rewrite_cache={"hypothesis": True})
    options = {"dist": "load", "collectonly": False}
    controller = SimpleNamespace(pluginmanager=SimpleNamespace(rewrite_hook=hook),
                                 getoption=lambda name, default=None: options.get(name, default))
    monkeypatch.delitem(sys.modules, "hypothesis")  # as in a controller, which has not imported it
    conftest.pytest_configure(controller)
    assert "hypothesis" not in sys.modules  # the controller loads no profile: it runs no test
    assert hook._must_rewrite == {"testbed"} and hook._marked_for_rewrite_cache == {}
