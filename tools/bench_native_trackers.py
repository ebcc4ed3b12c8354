"""The six trackers -- three in Python, three in C -- on the seed workloads, with plots, in one run.

Issue 13 §2: Python timings compare interpreters, not data structures, so the structures also
exist as a kernel would write them (testbed/tracker/_native.c: a word bitmap, a sorted array of
ranges, an augmented AVL interval tree). This tool measures all six on every workload of
testbed.workloads (boot, dma_churn, discontiguous, hostile) at 1 GiB, 64 GiB and 1 TiB: ns per
conversion (batch `apply`, and a loop of per-call set_shared/set_private), ns per is_shared
query, export time and bytes. The measuring code is tools/bench_trackers.py's (`measure`: rounds
round-robin over the trackers on fresh instances, GC off, every round above testbed.bench's timer
floor - a replay of well under a millisecond is repeated on fresh trackers until the round clears
it - median and min-max of the rounds).

Then:

* the target, paired: native-ranges at >= 0.5x native-bitmap's conversion rate on dma_churn at
  64 GiB, from rounds in which the two replay the log interleaved slice by slice (1000
  conversions, the order alternating; `paired_ratio` says why), the ratio taken per round;
  met / missed only when every round agrees, else undecided (testbed.bench.verdict); and
  native-ranges' bytes <= 1 % of native-bitmap's there;
* a crossover sweep: ns per conversion against the number of live records (16 to 65536
  isolated shared pages, flipped at random), where the sorted array's O(n) moves meet the trees'
  O(log n) descents.

Tables go to stdout, results to OUT/results.json, plots (matplotlib, Agg) to PLOTS/
(docs/plots by default): native_trackers_conversion.png, native_trackers_memory.png,
native_trackers_query_export.png, native_trackers_crossover.png.

    python tools/bench_native_trackers.py [--quick] [--out bench-out/native] [--plots docs/plots]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

try:
    import testbed  # noqa: F401
except ImportError:  # a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testbed.bench import MIN_ROUNDS
from testbed.bench import measure as floor_measure
from testbed.textout import plain_table
from testbed.tracker import NATIVE_TRACKER_KINDS, TRACKER_KINDS, Conversion, make_tracker
from testbed.workloads import WORKLOAD_NAMES, make_workload


def _bench_trackers() -> Any:
    """tools/bench_trackers.py, whose measuring code this tool shares (tools/ is not a package)."""
    if "bench_trackers" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_trackers", Path(__file__).with_name("bench_trackers.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_trackers"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["bench_trackers"]


bt = _bench_trackers()

TRACKERS = (*TRACKER_KINDS, *NATIVE_TRACKER_KINDS)
RATIO_TARGET = 0.5  # native-ranges' rate / native-bitmap's on dma_churn at 64 GiB
MEMORY_TARGET = 0.01  # native-ranges' bytes / native-bitmap's there
CROSSOVER_RECORDS = (16, 64, 256, 1024, 4096, 16384, 65536)
CROSSOVER_GUEST = bt.SIZES["1T"]
STYLE = {  # Python dashed and hollow, C solid; one colour per structure
    "bitmap": ("C0", "o", "--"), "ranges": ("C1", "s", "--"), "tree": ("C2", "^", "--"),
    "native-bitmap": ("C0", "o", "-"), "native-ranges": ("C1", "s", "-"), "native-tree": ("C2", "^", "-"),
}


def ns(rate: float | None) -> float:
    """ns per conversion from conversions/s (nan when there is no rate)."""
    return 1e9 / rate if rate else float("nan")


#: Conversions per slice of the paired replay (~10-30 us of work per tracker).
PAIR_SLICE = 1000


def paired_ratio(guest_pages: int, ops: list[Conversion], rounds: int, slice_ops: int = PAIR_SLICE) -> list[float]:
    """native-ranges' conversion rate / native-bitmap's, per round. In a round both replay the
    whole log on fresh trackers, interleaved slice by slice (`slice_ops` conversions, the order
    alternating from slice to slice, GC off), and the ratio is of their summed times. A round
    replays the log as many times as it takes for each tracker's summed time to clear
    testbed.bench's timer floor (bench.measure: one replay is ~0.2-1 ms, far under it).

    Why slices: this shared machine runs in a fast or a slow state for milliseconds at a time
    (both trackers ~1.6x faster in the fast one: 12 against 19 ns for the bitmap, 19 against 30
    for the array, in one process), so timing whole replays back to back -- even best of three
    each -- often paired one tracker's fast state with the other's slow one: rounds from 0.4x to
    1.0x around a 0.63x median. Slices of a few tens of microseconds see the same state."""
    slices = [ops[k:k + slice_ops] for k in range(0, len(ops), slice_ops)]
    ratios = []
    for r in range(rounds):
        bitmap_s, ranges_s = paired_round(guest_pages, slices, r)
        ratios.append(bitmap_s / ranges_s)
    return ratios


def paired_round(guest_pages: int, slices: list[list[Conversion]], index: int) -> tuple[float, float]:
    """Round `index` of paired_ratio: (native-bitmap's, native-ranges') summed seconds over whole
    replays of the log on fresh pairs, interleaved slice by slice, until both clear the floor."""
    clock = time.perf_counter
    spent = [0.0, 0.0]

    def once(scale: int) -> tuple[int, float]:
        spent[:] = [0.0, 0.0]
        for _ in range(scale):
            pair = [make_tracker(kind, guest_pages=guest_pages) for kind in ("native-bitmap", "native-ranges")]
            gc.collect()
            gc.disable()
            try:
                for k, part in enumerate(slices):
                    first = (k + index) % 2  # 0: the bitmap first, 1: the array first
                    t0 = clock()
                    pair[first].apply(part)
                    t1 = clock()
                    pair[1 - first].apply(part)
                    t2 = clock()
                    spent[first] += t1 - t0
                    spent[1 - first] += t2 - t1
            finally:
                gc.enable()
        return scale * sum(len(part) for part in slices), min(spent)

    floor_measure(f"native-ranges vs native-bitmap on dma_churn (round {index + 1})", once)
    return spent[0], spent[1]


def crossover_ops(records: int, conversions: int, seed: int = 5) -> list[Conversion]:
    """`records` isolated shared pages (every fourth page), then random single-page flips among
    2x as many slots, so the number of live records stays near `records`."""
    rng = random.Random(seed)
    shared = set(range(0, 2 * records, 2))
    ops: list[Conversion] = [(4 * k, 1, True) for k in sorted(shared)]
    for _ in range(conversions):
        k = rng.randrange(2 * records)
        ops.append((4 * k, 1, k not in shared))
        shared ^= {k}
    return ops


def crossover_replay(name: str, records: int, setup: list[Conversion],
                     churn: list[Conversion]) -> Callable[[], Callable[[], object]]:
    """A timed_replays preparation: one tracker holding `setup` (built outside the timed part, at
    the first run), whose timed run is the churn and then its undo (the flips reversed, in reverse
    order): every conversion is a real flip at ~`records` live records, and each run ends where
    it began, so the runs can repeat on the same tracker (a fresh 1 TiB bitmap per run would
    cost more than the run). One run is 2 x len(churn) conversions."""
    undo = [(gfn, npages, not shared) for gfn, npages, shared in reversed(churn)]
    held: list[Any] = []

    def run() -> None:
        held[0].apply(churn)
        held[0].apply(undo)

    def prepare() -> Callable[[], object]:
        if not held:
            held.append(make_tracker(name, guest_pages=CROSSOVER_GUEST, max_ranges=4 * records))
            held[0].apply(setup)
        return run

    return prepare


def crossover(trackers: Sequence[str], repeats: int, conversions: int) -> dict[str, dict[int, list[float]]]:
    """ns per conversion of each tracker against the number of live records (batch, rounds)."""
    out: dict[str, dict[int, list[float]]] = {name: {} for name in trackers}
    for records in CROSSOVER_RECORDS:
        ops = crossover_ops(records, conversions)
        setup, churn = ops[:records], ops[records:]
        for r in range(repeats):
            for name in trackers if r % 2 == 0 else list(reversed(trackers)):
                seconds = bt.timed_replays(f"crossover {name} at {records} records (round {r + 1})",
                                           crossover_replay(name, records, setup, churn), 2 * len(churn))
                out[name].setdefault(records, []).append(seconds / (2 * len(churn)) * 1e9)
        print(f"  crossover {records:>6} records", file=sys.stderr)
    return out


def crossing(xs: Sequence[int], a: Sequence[float], b: Sequence[float]) -> str:
    """Where curve a (ns, lower is better) stops beating b, interpolated geometrically."""
    for k in range(1, len(xs)):
        if a[k - 1] <= b[k - 1] and a[k] > b[k]:
            # log-linear interpolation of the sign change of log(a/b)
            d0, d1 = math.log(a[k - 1] / b[k - 1]), math.log(a[k] / b[k])
            x = math.exp(math.log(xs[k - 1]) + (math.log(xs[k]) - math.log(xs[k - 1])) * d0 / (d0 - d1))
            return f"~{x:.0f} records"
    return "never" if all(p <= q for p, q in zip(a, b, strict=True)) else "always"


# -- reporting ----------------------------------------------------------------------------------


def print_tables(results: list[Any], sizes: list[str], checks: list[Any],
                 cross: dict[str, dict[int, list[float]]]) -> None:
    console = bt.wide_console()
    columns = ("workload", "guest", "tracker", "ns/conv batch", "ns/conv per call", "ns/query", "export",
               "bytes", "ranges", "poisoned")
    console.print(bt.results_table("six trackers (medians of the rounds, min-max)", columns, results, lambda r: (
        r.workload, r.size, r.tracker,
        bt._spread_text([ns(x) for x in r.batch_rounds], lambda v: f"{v:.1f}"),
        bt._spread_text([ns(x) for x in r.call_rounds], lambda v: f"{v:.0f}"),
        bt._spread_text(r.is_shared_rounds, lambda v: f"{v:.0f}"),
        bt._spread_text(r.export_rounds, lambda v: f"{v:.1f} µs"),
        bt._bytes(r.bytes), str(r.ranges),
        "ERROR" if r.error else ("yes" if r.poisoned else ""),
    )))

    sweep = plain_table("crossover: ns per conversion (batch) against live records, 1 TiB guest",
                        "records", *cross, right=("records", *cross))
    for records in CROSSOVER_RECORDS:
        sweep.add_row(str(records), *(bt._spread_text(cross[n][records], lambda v: f"{v:.0f}") for n in cross))
    console.print(sweep)
    xs = list(CROSSOVER_RECORDS)
    med = {n: [statistics.median(cross[n][x]) for x in xs] for n in cross}
    notes = plain_table("crossovers (medians)", "comparison", "where")
    for a, b in (("native-ranges", "native-tree"), ("ranges", "tree"), ("native-ranges", "tree")):
        if a in med and b in med:
            notes.add_row(f"{a} faster than {b} up to", crossing(xs, med[a], med[b]))
    console.print(notes)

    verdicts = plain_table("targets (met / missed only when every round agrees)", "verdict", "target", "rounds")
    for check in checks:
        verdicts.add_row(check.verdict + (f" ({check.reason})" if check.reason else ""), check.target, check.detail)
    console.print(verdicts)


def targets(results: list[Any], ratios: list[float]) -> list[Any]:
    checks = [bt.ratio_check(
        f"native-ranges >= {RATIO_TARGET}x native-bitmap's conversion rate on dma_churn at 64 GiB (batch, paired)",
        ["64G"], [ratios], RATIO_TARGET,
    )]
    rg = bt.find(results, "dma_churn", "64G", "native-ranges")
    bm = bt.find(results, "dma_churn", "64G", "native-bitmap")
    share = rg.bytes / bm.bytes
    checks.append(bt.Check(
        f"native-ranges memory <= {MEMORY_TARGET:.0%} of native-bitmap's on dma_churn at 64 GiB",
        "met" if share <= MEMORY_TARGET else "missed", f"{rg.bytes} B / {bm.bytes} B = {share:.3%}",
    ))
    return checks


# -- plots --------------------------------------------------------------------------------------


def plot(results: list[Any], sizes: list[str], cross: dict[str, dict[int, list[float]]], out: Path,
         note: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [bt.SIZES[s] * 4096 for s in sizes]
    paths = []

    def line(ax: Any, name: str, xs: Sequence[float], ys: Sequence[float]) -> None:
        colour, marker, dash = STYLE[name]
        ax.plot(xs, ys, color=colour, marker=marker, ls=dash, label=name,
                markerfacecolor=colour if dash == "-" else "none")

    def series(workload: str, name: str, field: str) -> list[float]:
        values = []
        for s in sizes:
            r = bt.find(results, workload, s, name)
            if field == "batch_ns":
                values.append(ns(r.batch_per_s))
            else:
                v = getattr(r, field)
                values.append(v if v else float("nan"))
        return values

    timed_workloads = [w for w in WORKLOAD_NAMES if w in bt.TIMED_WORKLOADS]
    fig, axes = plt.subplots(1, len(timed_workloads), figsize=(5 * len(timed_workloads), 4.2), sharey=True)
    for ax, workload in zip(axes, timed_workloads, strict=True):
        for name in TRACKERS:
            line(ax, name, x, series(workload, name, "batch_ns"))
        bt._style_axis(ax, x, sizes, workload)
    paths.append(bt._finish_figure(fig, axes, 6, "ns per conversion (batch apply)",
                                   "Conversion cost against guest size (medians)", note,
                                   out / "native_trackers_conversion.png"))

    fig, axes = plt.subplots(1, len(WORKLOAD_NAMES), figsize=(4.4 * len(WORKLOAD_NAMES), 4.2), sharey=True)
    for ax, workload in zip(axes, WORKLOAD_NAMES, strict=True):
        for name in TRACKERS:
            line(ax, name, x, series(workload, name, "bytes"))
        bt._style_axis(ax, x, sizes, workload)
    paths.append(bt._finish_figure(fig, axes, 6, "bytes used", "Memory against guest size", note,
                                   out / "native_trackers_memory.png"))

    fig, axes = plt.subplots(2, len(WORKLOAD_NAMES), figsize=(4.4 * len(WORKLOAD_NAMES), 7.6), sharey="row")
    for col, workload in enumerate(WORKLOAD_NAMES):
        for name in TRACKERS:
            line(axes[0][col], name, x, series(workload, name, "is_shared_ns"))
            line(axes[1][col], name, x, series(workload, name, "export_us"))
        bt._style_axis(axes[0][col], x, sizes, workload)
        bt._style_axis(axes[1][col], x, sizes, workload)
    axes[1][0].set_ylabel("export, µs")
    paths.append(bt._finish_figure(fig, [axes[0][0], *axes[1]], 6, "ns per is_shared query (loop included)",
                                   "Queries and export against guest size (medians)", note,
                                   out / "native_trackers_query_export.png"))

    fig, ax = plt.subplots(1, 1, figsize=(7, 4.6))
    xs = list(CROSSOVER_RECORDS)
    for name, by_records in cross.items():
        line(ax, name, xs, [statistics.median(by_records[r]) for r in xs])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("live records (isolated shared pages, flipped at random)")
    ax.grid(True, which="both", alpha=0.3)
    paths.append(bt._finish_figure(fig, [ax], 3, "ns per conversion (batch apply)",
                                   "Sorted array against trees: the crossover", note,
                                   out / "native_trackers_crossover.png"))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("bench-out/native"), help="results.json goes here")
    parser.add_argument("--plots", type=Path, default=Path("docs/plots"), help="PNG plots go here")
    parser.add_argument("--quick", action="store_true",
                        help="fewer conversions and rounds (about 3 min: every round clears the timer floor)")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"rounds per figure (default 7, quick {MIN_ROUNDS}; fewer than {MIN_ROUNDS} "
                             "leaves the paired target undecided)")
    parser.add_argument("--sizes", default=",".join(bt.SIZES), help="guest sizes, from 1G,64G,1T (64G is needed "
                        "for the targets)")
    args = parser.parse_args(argv)
    if not NATIVE_TRACKER_KINDS:
        print("the C extension is not built (python setup.py build_ext --inplace)", file=sys.stderr)
        return 1
    sizes = [s for s in args.sizes.split(",") if s]
    if not sizes or any(s not in bt.SIZES for s in sizes) or "64G" not in sizes:
        parser.error(f"--sizes: choose from {','.join(bt.SIZES)}, 64G included")
    repeats = args.repeats or (MIN_ROUNDS if args.quick else 7)
    if repeats < 1:
        parser.error("--repeats: at least 1")
    conversions = 10_000 if args.quick else 40_000
    args.out.mkdir(parents=True, exist_ok=True)
    args.plots.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    load_before = os.getloadavg()
    results: list[Any] = []
    for workload in WORKLOAD_NAMES:
        for size in sizes:
            ops = list(make_workload(workload, bt.SIZES[size], seed=1, conversions=conversions))
            case, _ = bt.measure(workload, size, ops, TRACKERS, repeats, {}, calibrate=False)
            results.extend(case)
            print(f"  {workload:<13} {size:>3}: {len(ops)} conversions", file=sys.stderr)
    churn = list(make_workload("dma_churn", bt.SIZES["64G"], seed=1, conversions=conversions))
    ratios = paired_ratio(bt.SIZES["64G"], churn, max(2 * repeats + 1, 11))
    cross = crossover(TRACKERS, repeats, 2_000 if args.quick else 5_000)
    checks = targets(results, ratios)
    print_tables(results, sizes, checks, cross)
    load_after = os.getloadavg()
    note = (f"One run on a shared 2-core machine (load {load_before[0]:.1f} before, {load_after[0]:.1f} after); "
            f"{conversions} conversions per workload, {repeats} rounds. Dashed: Python; solid: C.")
    paths = plot(results, sizes, cross, args.plots, note)
    doc: dict[str, Any] = {
        "results": [asdict(r) for r in results],
        "targets": [asdict(c) for c in checks],
        "ratio_rounds": ratios,
        "crossover_ns": {name: {str(k): v for k, v in by.items()} for name, by in cross.items()},
        "loadavg": {"before": load_before, "after": load_after},
        "conversions": conversions,
        "repeats": repeats,
        "python": sys.version.split()[0],
        "seconds": time.perf_counter() - started,
    }
    (args.out / "results.json").write_text(json.dumps(doc, indent=1))
    print(f"wrote {', '.join(str(p) for p in [*paths, args.out / 'results.json'])} in {doc['seconds']:.0f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
