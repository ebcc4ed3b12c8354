"""ns per conversion of the native trackers (C) against the Python ones, on DMA churn, in one run.

Issue 13 §2, first step: the trackers as a kernel would write them (testbed/tracker/_native.c)
beside their Python reference models, on the dma_churn workload of testbed.workloads at one
guest size (64 GiB by default). For each tracker: ns per conversion through apply() (the batch
path) and through a loop of set_shared/set_private calls, and memory_bytes() at the end. Rounds
go round-robin over the trackers on fresh instances with the GC off; each figure is the median
of its rounds with the min-max.

    python tools/bench_native_trackers.py [--size-gib 64] [--conversions 40000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

try:
    import testbed  # noqa: F401
except ImportError:  # a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testbed.tracker import NATIVE_TRACKER_KINDS, SharedTracker, make_tracker
from testbed.workloads import make_workload

GIB_PAGES = 1 << 18


def timed(fn: Callable[[], object]) -> float:
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    finally:
        gc.enable()


def per_call(tracker: SharedTracker, ops: Sequence[tuple[int, int, bool]]) -> None:
    set_shared = tracker.set_shared
    set_private = tracker.set_private
    for gfn, npages, shared in ops:
        if shared:
            set_shared(gfn, npages)
        else:
            set_private(gfn, npages)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size-gib", type=int, default=64)
    parser.add_argument("--conversions", type=int, default=40_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    if not NATIVE_TRACKER_KINDS:
        print("the C extension is not built (python setup.py build_ext --inplace)", file=sys.stderr)
        return 1
    pages = args.size_gib * GIB_PAGES
    ops = list(make_workload("dma_churn", pages, seed=1, conversions=args.conversions))
    kinds = ["bitmap", "ranges", *NATIVE_TRACKER_KINDS]
    batch: dict[str, list[float]] = {k: [] for k in kinds}
    calls: dict[str, list[float]] = {k: [] for k in kinds}
    memory: dict[str, int] = {}
    for _ in range(args.rounds):
        for kind in kinds:
            t = make_tracker(kind, guest_pages=pages)
            batch[kind].append(timed(lambda t=t: t.apply(ops)) / len(ops) * 1e9)
            memory[kind] = t.memory_bytes()
            t = make_tracker(kind, guest_pages=pages)
            calls[kind].append(timed(lambda t=t: per_call(t, ops)) / len(ops) * 1e9)

    def fig(xs: list[float]) -> str:
        return f"{statistics.median(xs):7.1f} ({min(xs):.1f}-{max(xs):.1f})"

    print(f"dma_churn, {args.size_gib} GiB guest, {len(ops)} conversions, {args.rounds} rounds (median, min-max)")
    print(f"{'tracker':<14} {'ns/conv batch':>22} {'ns/conv per call':>22} {'bytes':>10}")
    for kind in kinds:
        print(f"{kind:<14} {fig(batch[kind]):>22} {fig(calls[kind]):>22} {memory[kind]:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
