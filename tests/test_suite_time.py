"""tools/suite_time.py: the README test command's time, interleaved against a base tree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tool_module import load_tool

ROOT = Path(__file__).resolve().parents[1]


def _tree(path: Path) -> Path:
    """A directory whose own `testbed` package is what python started there imports."""
    (path / "testbed").mkdir(parents=True)
    (path / "testbed" / "__init__.py").write_text("")
    return path


def test_runs_alternate_between_the_trees(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After one warm-up run of each, each round runs both trees, the first one alternating, so a
    drifting machine weighs on both."""
    st = load_tool("suite_time")
    log = tmp_path / "log"
    monkeypatch.setenv("SUITE_TIME_LOG", str(log))
    trees = {"this": _tree(tmp_path / "a"), "base": _tree(tmp_path / "b")}
    command = [sys.executable, "-c",
               "import os, pathlib; open(os.environ['SUITE_TIME_LOG'], 'a').write(pathlib.Path.cwd().name)"]
    results = st.measure(trees, 3, command, warmups=1)
    assert log.read_text() == "ab" + "abbaab"  # one uncounted warm-up of each first
    assert [len(runs) for runs in results.values()] == [3, 3]


def test_each_tree_runs_with_its_own_cache_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With cache_dirs every run of a tree, warm-up included, has TESTBED_CACHE_DIR set to that
    tree's directory (two assemblers' programs do not fit one cache's bound)."""
    st = load_tool("suite_time")
    log = tmp_path / "log"
    monkeypatch.setenv("SUITE_TIME_LOG", str(log))
    trees = {"this": _tree(tmp_path / "a"), "base": _tree(tmp_path / "b")}
    command = [sys.executable, "-c", "import os, pathlib; open(os.environ['SUITE_TIME_LOG'], 'a').write("
               "pathlib.Path.cwd().name + '=' + pathlib.Path(os.environ['TESTBED_CACHE_DIR']).name + ' ')"]
    st.measure(trees, 2, command, warmups=1, cache_dirs={"this": tmp_path / "ca", "base": tmp_path / "cb"})
    assert log.read_text().split() == ["a=ca", "b=cb", "a=ca", "b=cb", "b=cb", "a=ca"]


def test_cpu_counts_the_command_and_its_children() -> None:
    """A run's CPU time is its process's and its waited children's (a grandchild spinning 0.2 s shows)."""
    st = load_tool("suite_time")
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.2: pass"
    grandchild = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {spin!r}], check=True)"
    run = st.run_once(ROOT, [sys.executable, "-c", grandchild])
    assert run.cpu_s >= 0.2 and run.wall_s >= 0.2


def test_a_failing_suite_has_no_time(tmp_path: Path) -> None:
    """A run that exits non-zero stops the measurement, naming the tree and the status."""
    st = load_tool("suite_time")
    with pytest.raises(st.SuiteTimeError, match=r"exited with status 3"):
        st.run_once(tmp_path, [sys.executable, "-c", "raise SystemExit(3)"])


def test_a_tree_that_imports_another_trees_testbed_is_refused(tmp_path: Path) -> None:
    """A tree where python imports testbed from elsewhere (the installed checkout) is no tree to time."""
    st = load_tool("suite_time")
    with pytest.raises(st.SuiteTimeError, match="imports testbed from") as info:
        st.check_imports_its_own(tmp_path)
    assert str(tmp_path) in str(info.value)
    st.check_imports_its_own(ROOT)  # this checkout imports its own


@pytest.mark.parametrize(("walls", "verdict"), [
    ([27.0, 28.5, 29.9, 26.6, 30.0], "met"),
    ([31.0, 33.0, 30.5, 40.0, 35.0], "missed"),
    ([27.0, 28.5, 31.0, 26.6, 29.0], "undecided"),
    ([27.0, 28.0], "undecided"),
])
def test_the_target_verdict_follows_the_bench_rule(walls: list[float], verdict: str) -> None:
    """met only when every run is within the bound, missed when none is, undecided when they
    straddle it or there are fewer than testbed.bench.MIN_ROUNDS runs (the reason is given)."""
    st = load_tool("suite_time")
    doc = st.report({"this": [st.Run(w, 2 * w) for w in walls]}, 30.0)
    assert doc["target"]["verdict"] == verdict
    assert (doc["target"]["undecided_reason"] is None) == (verdict != "undecided")
    assert "this_vs_base" not in doc
    assert f"wall <= 30 s: {verdict}" in st.render(doc)


def test_ratios_are_taken_pair_by_pair() -> None:
    """this/base is each round's ratio, summarised as median [min - max]; CPU likewise."""
    st = load_tool("suite_time")
    doc = st.report({"this": [st.Run(9.0, 18.0), st.Run(8.0, 20.0), st.Run(12.0, 22.0)],
                     "base": [st.Run(10.0, 20.0), st.Run(10.0, 20.0), st.Run(10.0, 20.0)]})
    assert doc["this_vs_base"]["wall"] == {"median": 0.9, "min": 0.8, "max": 1.2, "n": 3}
    assert doc["this_vs_base"]["cpu"] == {"median": 1.0, "min": 0.9, "max": 1.1, "n": 3}
    assert doc["trees"]["base"]["wall_s"]["median"] == 10.0
    assert "this/base   wall 0.90x [0.80 - 1.20]" in st.render(doc)


def test_a_base_that_cannot_be_checked_out_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    """--base with a ref git does not know exits 2 naming the ref, and leaves no worktree behind."""
    st = load_tool("suite_time")

    def worktrees() -> str:
        return subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True,
                              check=True).stdout

    before = worktrees()
    assert st.main(["--base", "no-such-ref-for-suite-time", "--runs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("suite_time: base no-such-ref-for-suite-time: `git -C") and "failed" in err
    assert worktrees() == before
