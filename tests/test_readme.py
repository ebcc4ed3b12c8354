"""The README's Python examples run as written (from the repository root)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)


def test_readme_has_python_examples() -> None:
    """The README carries at least the run_guest and the host-API examples."""
    assert len(EXAMPLES) >= 2, EXAMPLES
    assert any("testbed.Vm(" in e for e in EXAMPLES) and any("run_guest(" in e for e in EXAMPLES)


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each ```python block of the README runs to the end without an exception."""
    monkeypatch.chdir(ROOT)
    code = compile(EXAMPLES[index], f"README.md example {index + 1}", "exec")
    exec(code, {"__name__": "__readme__"})  # the README's own code
    assert os.getcwd() == str(ROOT)
