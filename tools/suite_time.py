"""The README's test command's time, before and after a change, on one machine.

Runs the README's test command (`python -m pytest -n auto`, its output discarded) in this
checkout and, with --base, in a base tree, interleaved (the order alternates pair by pair),
and reports each tree's wall and CPU seconds (user + sys of the command and every process it
waited for) as median [min - max], the per-pair ratio this/base, and the verdict on the
README's target (wall <= --bound s on this checkout) by testbed.bench's rule: met only when
every run is within the bound, missed when none is, undecided otherwise (or with fewer than
testbed.bench.MIN_ROUNDS runs). The machine's speed moves the absolute figures by more than
most changes do (README, "The test suite's time"); the pairs' ratio much less.

    python tools/suite_time.py [--runs N] [--warmups N] [--bound SECONDS] [--json]
    python tools/suite_time.py --base REF [--runs N]    # REF: a commit, branch or tag

The base tree is a detached `git worktree` of REF in a temporary directory, set up as
`pip install -e` leaves a checkout without installing it (its C extensions built in place, its
egg-info written where its setup.py puts it), removed afterwards. Each run starts in its
tree's root, where `python -m pytest` imports that tree's testbed: checked before the first
run. Each tree runs with its own assembly cache (TESTBED_CACHE_DIR in the temporary
directory, filled by its warm-up run): two assemblers' programs would not fit one. A run
whose tests fail stops the measurement (a failing suite has no time to compare).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testbed.bench import MIN_ROUNDS, Measurement, Spread, interleave, paired_ratios, undecided_reason, verdict

ROOT = Path(__file__).resolve().parents[1]

#: The README's test command, after its install step.
COMMAND = (sys.executable, "-m", "pytest", "-n", "auto")
#: The README's target for it, on 2 cores (issue 10).
BOUND_S = 30.0


class SuiteTimeError(Exception):
    """A tree that cannot be measured: its suite failed, or it imports another tree's testbed."""


@dataclass(frozen=True)
class Run:
    """One run of the command: its wall time and the CPU time of it and its waited children."""

    wall_s: float
    cpu_s: float


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(tree: Path, command: Sequence[str] = COMMAND, cache_dir: Path | None = None) -> Run:
    """One run of `command` in `tree` (with TESTBED_CACHE_DIR=`cache_dir` when given);
    SuiteTimeError naming the tree when it fails."""
    env = dict(os.environ)
    if cache_dir is not None:
        env["TESTBED_CACHE_DIR"] = str(cache_dir)
    cpu = _children_cpu()
    start = time.perf_counter()
    status = subprocess.run(list(command), cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            check=False).returncode
    wall = time.perf_counter() - start
    if status != 0:
        raise SuiteTimeError(f"{tree}: `{' '.join(command)}` exited with status {status}: "
                             "run it there to see the failure")
    return Run(wall, _children_cpu() - cpu)


def check_imports_its_own(tree: Path) -> None:
    """SuiteTimeError unless `python` started in `tree` imports `tree`'s testbed."""
    probe = "import pathlib, testbed; print(pathlib.Path(testbed.__file__).resolve().parents[1])"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tree, capture_output=True, text=True, check=False)
    found = out.stdout.strip()
    if out.returncode != 0 or Path(found) != tree.resolve():
        raise SuiteTimeError(f"{tree}: python started there imports testbed from {found or out.stderr.strip()!r}, "
                             "not from the tree")


def measure(trees: dict[str, Path], runs: int, command: Sequence[str] = COMMAND,
            warmups: int = 1, cache_dirs: dict[str, Path] | None = None) -> dict[str, list[Run]]:
    """`runs` runs per tree, interleaved as `testbed bench` interleaves its figures
    (bench.interleave: the order of the trees alternates from one round to the next), so a
    machine that speeds up or slows down during the measurement weighs on both. First `warmups`
    uncounted runs of each tree: a tree's first run on a cache without its assembler's programs
    assembles them all (README, "The test suite's time"). With `cache_dirs`, each tree runs
    with its own cache directory: two assemblers' programs (~650 each) do not fit one cache's
    bound (testbed/asm/cache.py MAX_ENTRIES), where each tree's runs would evict the other's
    least recently used programs and assemble them again in every measured run."""
    if runs < 1:
        raise SuiteTimeError(f"runs must be at least 1, not {runs}")
    for tree in trees.values():
        check_imports_its_own(tree)
    dirs = cache_dirs or {}
    for _ in range(warmups):
        for name, tree in trees.items():
            run_once(tree, command, dirs.get(name))
    results: dict[str, list[Run]] = {name: [] for name in trees}

    def timed(name: str) -> Measurement:
        def take() -> float:
            results[name].append(run_once(trees[name], command, dirs.get(name)))
            return results[name][-1].wall_s
        return Measurement(name, "s", take)

    interleave(runs, [[timed(name) for name in trees]])
    return results


def report(results: dict[str, list[Run]], bound: float = BOUND_S) -> dict[str, Any]:
    """Each tree's wall and CPU spread, the ratios of `this` to `base` pair by pair (when both
    were run), and the verdict on `this` tree's wall against `bound`."""
    wall_spreads = {name: Spread.of([r.wall_s for r in runs]) for name, runs in results.items()}
    out: dict[str, Any] = {"trees": {}}
    for name, runs in results.items():
        out["trees"][name] = {"wall_s": wall_spreads[name].as_dict(),
                              "cpu_s": Spread.of([r.cpu_s for r in runs]).as_dict(),
                              "runs": [[r.wall_s, r.cpu_s] for r in runs]}
    if "base" in results:
        walls = paired_ratios([r.wall_s for r in results["this"]], [r.wall_s for r in results["base"]])
        cpus = paired_ratios([r.cpu_s for r in results["this"]], [r.cpu_s for r in results["base"]])
        out["this_vs_base"] = {"wall": Spread.of(walls).as_dict(), "cpu": Spread.of(cpus).as_dict()}
    out["target"] = {"bound_s": bound, "verdict": verdict(wall_spreads["this"], "<=", bound, MIN_ROUNDS),
                     "undecided_reason": undecided_reason(wall_spreads["this"], "<=", bound, MIN_ROUNDS)}
    return out


def _spread_text(spread: dict[str, Any], unit: str) -> str:
    return f"{spread['median']:.2f}{unit} [{spread['min']:.2f} - {spread['max']:.2f}]"


def render(doc: dict[str, Any]) -> str:
    """The report as text."""
    lines = []
    for name, tree in doc["trees"].items():
        lines.append(f"{name:5s} wall {_spread_text(tree['wall_s'], ' s')}   cpu {_spread_text(tree['cpu_s'], ' s')}"
                     f"   ({tree['wall_s']['n']} runs)")
    if "this_vs_base" in doc:
        ratios = doc["this_vs_base"]
        lines.append(f"this/base   wall {_spread_text(ratios['wall'], 'x')}   cpu {_spread_text(ratios['cpu'], 'x')}")
    target = doc["target"]
    reason = f" ({target['undecided_reason']})" if target["undecided_reason"] else ""
    cores = f" on {doc['cores']} cores" if "cores" in doc else ""
    lines.append(f"target: this tree's wall <= {target['bound_s']:g} s{cores}: {target['verdict']}{reason}")
    return "\n".join(lines)


def _make_base_tree(ref: str, tree: Path) -> None:
    """A detached worktree of `ref` at `tree` as `pip install -e` leaves a checkout: its
    extensions built in place and its egg-info written where its own setup.py puts it (a root
    testbed.egg-info made pytest rewrite the whole library in each worker: README, "The test
    suite's time"), without installing it."""
    for step, where in ((["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(tree), ref], ROOT),
                        ([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], tree),
                        ([sys.executable, "setup.py", "-q", "egg_info"], tree)):
        done = subprocess.run(step, cwd=where, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SuiteTimeError(f"base {ref}: `{' '.join(step[:5])}` failed: {done.stderr.strip()[-400:]}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--base", metavar="REF", help="also time REF's tree, interleaved, and report the ratios")
    parser.add_argument("--runs", type=int, default=MIN_ROUNDS, help=f"runs per tree (default {MIN_ROUNDS})")
    parser.add_argument("--warmups", type=int, default=1, help="uncounted runs per tree first (default 1)")
    parser.add_argument("--bound", type=float, default=BOUND_S, help=f"the target, seconds (default {BOUND_S:g})")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="suite-time-") as scratch:
            base = Path(scratch) / "base"
            trees = {"this": ROOT}
            try:
                if args.base:
                    _make_base_tree(args.base, base)
                    trees["base"] = base
                caches = {name: Path(scratch) / f"cache-{name}" for name in trees}
                doc = report(measure(trees, args.runs, warmups=args.warmups, cache_dirs=caches), args.bound)
            finally:
                if args.base:  # also after a failed `worktree add`: then there is nothing to remove
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
                                   capture_output=True, check=False)
    except SuiteTimeError as exc:
        print(f"suite_time: {exc}", file=sys.stderr)
        return 2
    doc["cores"] = len(os.sched_getaffinity(0))
    print(json.dumps(doc, indent=1) if args.json else render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
