"""Benchmarks the shared-page trackers against the intervaltree and portion packages, with plots.

For every tracker (bitmap, ranges, tree from testbed.tracker, and thin adapters over the
`intervaltree` and `portion` PyPI packages as peers), every workload of testbed.workloads and
guest sizes of 1 GiB, 64 GiB and 1 TiB, in one run:

* conversions/s -- "batch" through SharedTracker.apply (the PSC-request / log-replay path;
  the peers have no batch API, so theirs is the per-call loop) and "per call" through a loop
  of set_shared/set_private calls, the same driver for every tracker;
* is_shared ns per lookup (loop included), export time, and bytes used: memory_bytes() for
  ours, a deep sys.getsizeof walk of the peer's object graph for the peers.

Every timed figure is measured in rounds (at least five: testbed.bench.MIN_ROUNDS; lookups and
export too) on fresh trackers, with the GC off while timing (as timeit does), and every round
rests on at least testbed.bench's timer floor (1000 ticks of perf_counter, at least 20 ms:
timed_replays repeats the replay on fresh trackers until it does; a figure that cannot clear
it is a BenchError, not a number). The rounds go round-robin over the trackers, the order
reversed every other round, so that a burst of load from elsewhere hits them all, and each
figure is reported as the median of its rounds with their min-max. Results are printed as tables through the
project's escaped console (testbed/textout.py), written to OUT/results.json, and plotted to
OUT/throughput.png and OUT/memory.png (matplotlib, Agg). The seed workload `boot` has 20
conversions -- too few to time -- so it reports memory, lookups and export only.

Absolute rates on a shared machine swing by 1.5x from one second to the next. So the targets
are ratios, paired per round: on dma_churn each of our trackers' batch rounds is timed next to
its bare loop (a raw bitarray store loop for the bitmap, a plain coalescing bisect list for
ranges and tree; before it on even rounds, after it on odd ones), and the ratio is taken per
round (ranges >= 2.5/2.9x its bare loop, bitmap >= 10/16x: the old 2.5 M/s and 10 M/s over the
bare loops' speeds on the machine they were set on); tree against intervaltree is a per-round
ratio too (per call, adjacent in every round, the order alternating). Raw rates are reported,
never judged. A pairing that does not cover every round is an error, never a shorter list. A
target is judged as testbed.bench.verdict judges: met when every round meets it, missed when
every round misses it, undecided when the rounds straddle the bound or are too few -- the noise
is then wider than the distance to the target -- and the table says which.

    python tools/bench_trackers.py [--out bench-out] [--quick] [--check]

--check exits 1 when a target is missed (undecided does not fail it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, Protocol

try:
    import testbed  # noqa: F401
except ImportError:  # a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitarray import bitarray

from testbed.bench import MIN_ROUNDS, BenchError, Spread, Verdict, paired_ratios, undecided_reason, verdict
from testbed.bench import measure as floor_measure
from testbed.textout import plain_console, plain_table, styled
from testbed.tracker import (
    DEFAULT_MAX_RANGES,
    TRACKER_KINDS,
    SharedTracker,
    export_ranges,
    make_tracker,
)
from testbed.workloads import WORKLOAD_NAMES, make_workload

GIB_PAGES = 1 << 18
SIZES = {"1G": GIB_PAGES, "64G": 64 * GIB_PAGES, "1T": 1024 * GIB_PAGES}
PEERS = ("intervaltree", "portion")
TIMED_WORKLOADS = ("dma_churn", "discontiguous", "hostile")

# Reference speeds of the bare loops, measured on the project's build machine when idle; shown
# beside this run's (the speed factor), never used to judge a target.
CALIBRATION_RAW_BITARRAY = 16e6
CALIBRATION_RAW_BISECT = 2.9e6
# Targets (see the module docstring of testbed/tracker/__init__.py for the trade-offs), each a
# ratio per round to the loop measured next to it. The rate targets were set as 2.5 M/s (ranges)
# and 10 M/s (bitmap) on the build machine whose bare loops ran at the reference speeds above:
# as ratios to the bare loop paired with each round, 2.5 / 2.9 and 10 / 16.
RANGES_VS_BARE_MIN = 2.5e6 / CALIBRATION_RAW_BISECT
BITMAP_VS_BARE_MIN = 10e6 / CALIBRATION_RAW_BITARRAY
TREE_MIN_RATIO = 10.0
SEED_MEMORY_MAX = 16 * 1024


class Tracker(Protocol):
    """What the benchmark drives: SharedTracker, or a peer adapter."""

    def set_shared(self, gfn: int, npages: int) -> None: ...
    def set_private(self, gfn: int, npages: int) -> None: ...
    def is_shared(self, gfn: int) -> bool: ...
    def shared_ranges(self) -> list[tuple[int, int]]: ...


# -- peers: thin adapters, written as a user of each package would -------------------------


class IntervalTreePeer:
    """The `intervaltree` package (an augmented AVL tree of possibly overlapping intervals)."""

    name = "intervaltree"

    def __init__(self, guest_pages: int) -> None:
        from intervaltree import IntervalTree

        self.guest_pages = guest_pages
        self.tree = IntervalTree()

    def set_shared(self, gfn: int, npages: int) -> None:
        end = gfn + npages
        # Coalesce as our trackers do: absorb every interval overlapping or touching [gfn, end).
        touching = self.tree.overlap(gfn - 1, end + 1)
        if touching:
            for iv in touching:
                self.tree.remove(iv)
            gfn = min(gfn, *(iv.begin for iv in touching))
            end = max(end, *(iv.end for iv in touching))
        self.tree.addi(gfn, end)

    def set_private(self, gfn: int, npages: int) -> None:
        self.tree.chop(gfn, gfn + npages)

    def is_shared(self, gfn: int) -> bool:
        return bool(self.tree.at(gfn))

    def shared_ranges(self) -> list[tuple[int, int]]:
        return [(iv.begin, iv.end - iv.begin) for iv in sorted(self.tree)]

    def footprint(self) -> object:
        return self.tree


class PortionPeer:
    """The `portion` package (immutable unions of atomic intervals, merged on every operation)."""

    name = "portion"

    def __init__(self, guest_pages: int) -> None:
        import portion

        self.guest_pages = guest_pages
        self.p = portion
        self.iv = portion.empty()

    def set_shared(self, gfn: int, npages: int) -> None:
        self.iv = self.iv | self.p.closedopen(gfn, gfn + npages)

    def set_private(self, gfn: int, npages: int) -> None:
        self.iv = self.iv - self.p.closedopen(gfn, gfn + npages)

    def is_shared(self, gfn: int) -> bool:
        return gfn in self.iv

    def shared_ranges(self) -> list[tuple[int, int]]:
        return [(a.lower, a.upper - a.lower) for a in self.iv if not a.empty]

    def footprint(self) -> object:
        return self.iv


def deep_sizeof(root: object) -> int:
    """sys.getsizeof summed over every object reachable from `root` (types and code excluded)."""
    import types

    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)
    seen: set[int] = set()
    stack = [root]
    total = 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        stack.extend(gc.get_referents(obj))
    return total


def make(name: str, guest_pages: int) -> Tracker:
    if name == "intervaltree":
        return IntervalTreePeer(guest_pages)
    if name == "portion":
        return PortionPeer(guest_pages)
    return make_tracker(name, guest_pages=guest_pages, max_ranges=DEFAULT_MAX_RANGES)


# -- measurement ------------------------------------------------------------------------------


def drive(tracker: Tracker, ops: Sequence[tuple[int, int, bool]]) -> None:
    """The per-call driver, identical for every tracker."""
    set_shared = tracker.set_shared
    set_private = tracker.set_private
    for gfn, npages, shared in ops:
        if shared:
            set_shared(gfn, npages)
        else:
            set_private(gfn, npages)


#: The number of runs that last cleared the floor, by figure without its round: the next round
#: starts there instead of doubling up from one run again (bench.measure's scale counts multiples).
_RUNS: dict[str, int] = {}


def timed_replays(figure: str, prepare: Callable[[], Callable[[], object]], units: int) -> float:
    """Seconds per run of `figure`, resting on at least testbed.bench's timer floor (1000 ticks
    of perf_counter, at least 20 ms): bench.measure with scale = how many runs, each prepared
    by `prepare()` outside the timed part (a fresh tracker and its buffers: a replay changes
    what it replays on) and timed with the GC off, as timeit does; the figure is the sum of
    those timed parts (each well above the timer's resolution). `units` is what one run
    counts (conversions, lookups, exports). A figure that never clears the floor is a
    BenchError naming it, never a number. A figure's later rounds start at the number of runs
    its last round needed (_RUNS, keyed by the figure's name up to " (round")."""
    family = figure.split(" (round ", maxsplit=1)[0]
    base = _RUNS.get(family, 1)

    def once(scale: int) -> tuple[int, float]:
        runs = base * scale
        spent = 0.0
        gc.collect()
        gc.disable()
        try:
            for _ in range(runs):
                run = prepare()
                start = time.perf_counter()
                run()
                spent += time.perf_counter() - start
        finally:
            gc.enable()
        return runs * units, spent

    done, seconds = floor_measure(figure, once)
    _RUNS[family] = done // units
    return seconds * units / done


def time_calls(figure: str, name: str, guest_pages: int, ops: Sequence[tuple[int, int, bool]],
               last: list[Tracker]) -> float:
    """Seconds per replay of `ops` through the per-call driver on a fresh tracker `name`; the
    last tracker replayed is left in `last` (its final state is the workload's)."""

    def prepare() -> Callable[[], object]:
        tracker = make(name, guest_pages)
        last[:] = [tracker]
        return lambda: drive(tracker, ops)

    return timed_replays(figure, prepare, len(ops))


def time_batch(figure: str, name: str, guest_pages: int, ops: Sequence[tuple[int, int, bool]]) -> float:
    """Seconds per replay of `ops` through SharedTracker.apply on a fresh tracker `name`."""

    def prepare() -> Callable[[], object]:
        tracker = make_tracker(name, guest_pages=guest_pages)
        return lambda: tracker.apply(ops)

    return timed_replays(figure, prepare, len(ops))


def time_export(figure: str, tracker: Tracker, buf: bytearray) -> float:
    """Seconds per export into a pre-sized buffer; a peer pays for listing its ranges in the format."""
    if isinstance(tracker, SharedTracker):
        return timed_replays(figure, lambda: lambda: tracker.export(buf), 1)
    return timed_replays(figure, lambda: lambda: export_ranges(tracker.shared_ranges(), buf, poisoned=False), 1)


def raw_bitarray(ops: Sequence[tuple[int, int, bool]], bits: Any) -> None:
    """Bare loop: bitarray stores, no validation, no call (16 M/s on an idle build machine)."""
    for gfn, npages, shared in ops:
        if npages == 1:
            bits[gfn] = shared
        else:
            bits[gfn : gfn + npages] = shared


def time_raw_bitarray(figure: str, ops: Sequence[tuple[int, int, bool]], guest_pages: int) -> float:
    """Seconds per replay of the bare bitarray loop, each on a fresh zeroed bitarray."""

    def prepare() -> Callable[[], object]:
        bits = bitarray(guest_pages)  # allocated and zeroed outside the timed part, as a tracker is
        bits.setall(0)
        return lambda: raw_bitarray(ops, bits)

    return timed_replays(figure, prepare, len(ops))


def time_raw_bisect(figure: str, ops: Sequence[tuple[int, int, bool]]) -> float:
    """Seconds per replay of the bare bisect-list loop (it starts empty each time)."""
    return timed_replays(figure, lambda: lambda: raw_bisect(ops), len(ops))


def raw_bisect(ops: Sequence[tuple[int, int, bool]]) -> None:
    """Bare loop: a plain coalescing starts/ends list, no validation, bound or fast path."""
    starts: list[int] = []
    ends: list[int] = []
    for gfn, npages, shared in ops:
        end = gfn + npages
        if shared:
            i = bisect_left(ends, gfn)
            j = bisect_right(starts, end, i)
            if i == j:
                starts.insert(i, gfn)
                ends.insert(i, end)
            else:
                starts[i] = min(starts[i], gfn)
                ends[i] = max(ends[j - 1], end)
                del starts[i + 1 : j], ends[i + 1 : j]
        else:
            i = bisect_right(ends, gfn)
            j = bisect_left(starts, end, i)
            if i < j:
                first, last = starts[i], ends[j - 1]
                keep_s = [first] if first < gfn else []
                keep_e = [gfn] if first < gfn else []
                if last > end:
                    keep_s.append(end)
                    keep_e.append(last)
                starts[i:j] = keep_s
                ends[i:j] = keep_e


@dataclass
class Result:
    workload: str
    size: str
    guest_pages: int
    tracker: str
    conversions: int
    batch_per_s: float | None
    call_per_s: float | None
    is_shared_ns: float
    export_us: float
    bytes: int
    bound_bytes: int | None
    ranges: int
    poisoned: bool
    error: str | None = None
    #: the rate of each round (conversions/s), batch and per call, in round order
    batch_rounds: list[float] = dataclass_field(default_factory=list)
    call_rounds: list[float] = dataclass_field(default_factory=list)
    #: dma_churn, our trackers: each batch round as a ratio to its bare loop timed next to it
    #: (raw bitarray for the bitmap, raw bisect list for ranges and tree)
    batch_vs_bare_rounds: list[float] = dataclass_field(default_factory=list)
    #: a tracker with a peer (PAIRED_PEER: tree and intervaltree): its per-call rate over the
    #: peer's, per round, both timed next to each other in that round
    call_vs_peer_rounds: list[float] = dataclass_field(default_factory=list)
    #: ns per is_shared lookup and µs per export, per round (is_shared_ns, export_us: medians)
    is_shared_rounds: list[float] = dataclass_field(default_factory=list)
    export_rounds: list[float] = dataclass_field(default_factory=list)


#: portion rebuilds its immutable union on every operation -- O(n) each, O(n^2) for the hostile
#: workload -- so it runs a prefix of each workload: its rate on a steady workload is still its
#: rate, and the table shows how many conversions it ran.
PEER_PREFIX: dict[tuple[str, str | None], int] = {("portion", "hostile"): 1000, ("portion", None): 2000}
#: The peers are 30-1000x slower: they run the fewest rounds a target can be judged from.
PEER_REPEATS = MIN_ROUNDS
#: The bare loop each of our trackers' batch rounds is paired with on dma_churn.
BARE_LOOP = {"bitmap": "raw bitarray", "ranges": "raw bisect list", "tree": "raw bisect list"}
#: Our tracker whose per-call rounds are paired with a peer's (adjacent in every round).
PAIRED_PEER = {"tree": "intervaltree"}


def round_steps(trackers: Sequence[str], bare: Callable[[str], bool], index: int) -> list[tuple[str, str]]:
    """The (tracker, step) measurements of round `index`, in order: per tracker its bare loop
    (where `bare(name)`), its batch replay (ours) and its per-call replay, the trackers in the
    given order - a tracker and its PAIRED_PEER must be neighbours there - and the whole list
    reversed on odd rounds. So each batch round sits next to its bare loop (before it on even
    rounds, after it on odd ones) and tree's per-call replay next to intervaltree's, in
    alternating order."""
    for ours, peer in PAIRED_PEER.items():
        if ours in trackers and peer in trackers and abs(trackers.index(ours) - trackers.index(peer)) != 1:
            raise ValueError(f"{ours} and its peer {peer} must be neighbours in {list(trackers)}")
    steps: list[tuple[str, str]] = []
    for name in trackers:
        if bare(name):
            steps.append((name, "bare"))
        if name not in PEERS:
            steps.append((name, "batch"))
        steps.append((name, "calls"))
    return steps if index % 2 == 0 else steps[::-1]


def measure(
    workload: str,
    size: str,
    all_ops: list[tuple[int, int, bool]],
    trackers: Sequence[str],
    repeats: int,
    prefixes: dict[tuple[str, str | None], int],
    calibrate: bool = True,
) -> tuple[list[Result], dict[str, float]]:
    """Every tracker on one workload and guest size.

    The rounds go round-robin over the trackers (round_steps: round 1 of each, then round 2 of
    each..., the order reversed every other round) so that load from other processes, which
    comes and goes over seconds, falls on all of them alike. Every timed figure rests on at
    least the timer floor (timed_replays). On dma_churn (`calibrate`) each of our trackers'
    batch rounds is paired with its bare loop timed next to it, and the ratio taken per round;
    tree's per-call rounds are paired with intervaltree's the same way. The bare loops' median
    rates (conversions/s) are returned beside the results.
    """
    guest_pages = SIZES[size]
    ops: dict[str, list[tuple[int, int, bool]]] = {}
    for name in trackers:
        prefix = prefixes.get((name, workload), prefixes.get((name, None)))
        ops[name] = all_ops if prefix is None else all_ops[:prefix]
    calls: dict[str, list[float]] = {name: [] for name in trackers}
    batches: dict[str, list[float]] = {name: [] for name in trackers}
    bares: dict[str, list[float]] = {name: [] for name in trackers}
    paired: dict[str, list[float]] = {name: [] for name in trackers}
    vs_peer: dict[str, list[float]] = {name: [] for name in trackers}
    final: dict[str, Tracker] = {}
    errors: dict[str, str] = {}
    timed_workload = workload in TIMED_WORKLOADS
    calibration: dict[str, list[float]] = {"raw bitarray": [], "raw bisect list": []}

    def bare(name: str) -> bool:
        return workload == "dma_churn" and calibrate and name in BARE_LOOP

    for r in range(repeats if timed_workload else 1):
        active = [n for n in trackers if n not in errors and not (n in PEERS and r >= PEER_REPEATS)]
        for name, step in round_steps(active, bare, r) if timed_workload else [(n, "calls") for n in active]:
            if name in errors:
                continue
            figure = f"{workload}/{size}/{name} {step} (round {r + 1})"
            try:
                if not timed_workload:
                    tracker = make(name, guest_pages)
                    drive(tracker, ops[name])
                    final[name] = tracker
                elif step == "calls":
                    last: list[Tracker] = []
                    calls[name].append(time_calls(figure, name, guest_pages, ops[name], last))
                    final[name] = last[0]
                elif step == "batch":
                    batches[name].append(time_batch(figure, name, guest_pages, ops[name]))
                else:
                    loop = BARE_LOOP[name]
                    seconds = (time_raw_bitarray(figure, all_ops, guest_pages) if loop == "raw bitarray"
                               else time_raw_bisect(figure, all_ops))
                    bares[name].append(seconds)
                    calibration[loop].append(seconds)
            except BenchError:
                raise  # a figure under the timer floor is the benchmark's failure, not the tracker's
            except Exception as err:  # a crash is a result to report (the hostile target), not an abort
                errors[name] = repr(err)
        for ours, peer in PAIRED_PEER.items():  # this round's pair, if both ran in it
            if timed_workload and ours in active and peer in active and ours not in errors and peer not in errors:
                vs_peer[ours].append((len(ops[ours]) / calls[ours][-1]) / (len(ops[peer]) / calls[peer][-1]))
    for name in trackers:
        if bares[name] and name not in errors:
            paired[name] = paired_ratios([len(ops[name]) / t for t in batches[name]],
                                         [len(all_ops) / t for t in bares[name]])
    results = []
    for name in trackers:
        n = len(ops[name])
        if name in errors:
            failure = errors[name]
            results.append(Result(workload, size, guest_pages, name, n, None, None, 0, 0, 0, None, 0, False, failure))
            continue
        call_rounds = [n / t for t in calls[name]]
        batch_rounds = [n / t for t in batches[name]] or call_rounds  # a peer has no batch API: per call
        rate_call = statistics.median(call_rounds) if call_rounds else None
        rate_batch = statistics.median(batch_rounds) if batch_rounds else None
        result = state_figures(final[name], workload, size, n, rate_batch, rate_call, max(repeats, MIN_ROUNDS))
        result.call_rounds, result.batch_rounds = call_rounds, batch_rounds
        result.batch_vs_bare_rounds = paired[name]
        result.call_vs_peer_rounds = vs_peer[name]
        results.append(result)
    return results, {k: len(all_ops) / statistics.median(v) for k, v in calibration.items() if v}


def state_figures(
    tracker: Tracker, workload: str, size: str, n: int, rate_batch: float | None, rate_call: float | None,
    rounds: int,
) -> Result:
    """Lookups, export and bytes of a tracker holding a workload's final state; lookups and
    export in `rounds` rounds (at least MIN_ROUNDS), each above the timer floor."""
    guest_pages = SIZES[size]
    ranges = tracker.shared_ranges()
    # Lookups: half anywhere, half inside shared ranges; fewer for the peers (portion's are O(n)).
    rng = random.Random(7)
    ours = isinstance(tracker, SharedTracker)
    n_lookups = 20_000 if ours else 2_000
    probes = [rng.randrange(guest_pages) for _ in range(n_lookups // 2)]
    if ranges:
        picks = [ranges[rng.randrange(len(ranges))] for _ in range(n_lookups // 2)]
        probes += [g + rng.randrange(npages) for g, npages in picks]
    if isinstance(tracker, SharedTracker):
        buf = bytearray(tracker.export(bytearray()).size_needed_bytes)
        nbytes = tracker.memory_bytes()
        bound: int | None = tracker.memory_bound_bytes()
        poisoned = tracker.poisoned
        name = tracker.name
    else:
        assert isinstance(tracker, IntervalTreePeer | PortionPeer)
        buf = bytearray(len(ranges) * 16)
        nbytes = deep_sizeof(tracker.footprint())
        bound = None
        poisoned = False
        name = tracker.name
    is_shared = tracker.is_shared
    figure = f"{workload}/{size}/{name}"
    lookups = [timed_replays(f"{figure} is_shared (round {r + 1})", lambda: lambda: [is_shared(g) for g in probes],
                             len(probes)) * 1e9 / len(probes) for r in range(rounds)]
    exports = [time_export(f"{figure} export (round {r + 1})", tracker, buf) * 1e6 for r in range(rounds)]
    result = Result(
        workload, size, guest_pages, name, n, rate_batch, rate_call,
        statistics.median(lookups), statistics.median(exports), nbytes, bound, len(ranges), poisoned,
    )
    result.is_shared_rounds, result.export_rounds = lookups, exports
    return result


# -- reporting --------------------------------------------------------------------------------


def _rate(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1e6:.2f} M/s" if v >= 1e6 else f"{v / 1e3:.1f} k/s"


def _bytes(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


def find(results: list[Result], workload: str, size: str, tracker: str) -> Result:
    return next(r for r in results if (r.workload, r.size, r.tracker) == (workload, size, tracker))


@dataclass
class Check:
    """One target and its verdict (met / missed / undecided, as testbed.bench.verdict)."""

    target: str
    verdict: Verdict
    detail: str
    #: why an undecided target is undecided (testbed.bench.undecided_reason), per guest size
    reason: str | None = None

    @property
    def passed(self) -> bool:
        return self.verdict == "met"


def combine(verdicts: Sequence[Verdict]) -> Verdict:
    """A target judged per guest size: met when every size meets it, missed when one misses it."""
    if "missed" in verdicts:
        return "missed"
    return "met" if verdicts and all(v == "met" for v in verdicts) else "undecided"


def _spread_text(samples: Sequence[float], fmt: Callable[[float], str]) -> str:
    if not samples:
        return "-"
    sp = Spread.of(samples)
    return f"{fmt(sp.median)} ({fmt(sp.lo)}-{fmt(sp.hi)}, n={sp.n})"


def _spread_verdict(samples: Sequence[float], bound: float) -> Verdict:
    return verdict(Spread.of(samples), ">=", bound) if samples else "undecided"


def speed_factor(calibration: dict[str, dict[str, float]], size: str) -> float:
    """How fast this machine ran the raw bitarray loop in this run against its reference (16 M/s)."""
    raw = calibration.get(size, {}).get("raw bitarray")
    return raw / CALIBRATION_RAW_BITARRAY if raw else 1.0


def ratio_check(label: str, sizes: Sequence[str], rounds: Sequence[Sequence[float]], bound: float) -> Check:
    """A ratio target judged per guest size from its per-round ratios (combine): met / missed
    only when every round of every size agrees; when undecided, the check says why for each
    size that is (too few rounds, the spread straddles the bound, not measured)."""
    verdicts = [_spread_verdict(r, bound) for r in rounds]
    detail = ", ".join(f"{s}: {_spread_text(r, lambda v: f'{v:.2f}x')}" for s, r in zip(sizes, rounds, strict=True))
    combined = combine(verdicts)
    reasons = [f"{s}: {undecided_reason(Spread.of(r) if r else None, '>=', bound)}"
               for s, r, v in zip(sizes, rounds, verdicts, strict=True) if v == "undecided"]
    return Check(label, combined, detail, "; ".join(reasons) if combined == "undecided" else None)


def peer_ratio_rounds(ours: Result, peer: Result) -> list[float]:
    """`ours`' per-call rate over `peer`'s, per round (measured next to each other in each round
    both ran: Result.call_vs_peer_rounds). A pairing that does not cover every round the peer
    ran is an error, never a silently shorter list."""
    if len(ours.call_vs_peer_rounds) != len(peer.call_rounds):
        raise ValueError(f"{ours.tracker} vs {peer.tracker} on {ours.workload}/{ours.size}: "
                         f"{len(ours.call_vs_peer_rounds)} paired rounds for the peer's {len(peer.call_rounds)}")
    return ours.call_vs_peer_rounds


def targets(results: list[Result], sizes: list[str]) -> list[Check]:
    checks: list[Check] = []
    churn = {s: {r.tracker: r for r in results if r.workload == "dma_churn" and r.size == s} for s in sizes}
    checks.append(ratio_check(
        f"ranges batch >= {RANGES_VS_BARE_MIN:.2f}x the raw bisect list on dma_churn (paired rounds)", sizes,
        [churn[s]["ranges"].batch_vs_bare_rounds for s in sizes], RANGES_VS_BARE_MIN,
    ))
    for workload in ("boot", "dma_churn", "discontiguous"):
        mem = [find(results, workload, s, "ranges").bytes for s in sizes]
        checks.append(Check(
            f"ranges memory on {workload} <= 16 KB and independent of guest size",
            "met" if max(mem) <= SEED_MEMORY_MAX and max(mem) <= 1.1 * min(mem) else "missed",
            ", ".join(f"{s}: {m} B" for s, m in zip(sizes, mem, strict=True)),
        ))
    checks.append(ratio_check(
        f"bitmap batch >= {BITMAP_VS_BARE_MIN:.2f}x the raw bitarray loop on dma_churn (paired rounds)", sizes,
        [churn[s]["bitmap"].batch_vs_bare_rounds for s in sizes], BITMAP_VS_BARE_MIN,
    ))
    checks.append(ratio_check(
        f"tree >= {TREE_MIN_RATIO:.0f}x intervaltree on dma_churn (per call, same driver, paired rounds)", sizes,
        [peer_ratio_rounds(churn[s]["tree"], churn[s]["intervaltree"]) for s in sizes], TREE_MIN_RATIO,
    ))
    hostile = [r for r in results if r.workload == "hostile" and r.tracker in TRACKER_KINDS]
    ok = all(
        r.error is None
        and r.bound_bytes is not None
        and r.bytes <= r.bound_bytes
        and (r.poisoned == (r.tracker != "bitmap"))
        for r in hostile
    )
    detail = ", ".join(
        f"{r.tracker}@{r.size}: {_bytes(r.bytes)} of {_bytes(r.bound_bytes or 0)}"
        f"{' poisoned' if r.poisoned else ''}{' ERROR ' + r.error if r.error else ''}"
        for r in hostile
    )
    checks.append(Check("hostile: no crash, memory under the bound, list and tree poisoned",
                        "met" if ok else "missed", detail))
    return checks


def wide_console() -> Any:
    """The project's escaped console, wide enough for these tables in a file or a pipe too."""
    console = plain_console(sys.stdout)
    if not sys.stdout.isatty():
        console.width = 200  # rich assumes 80 columns when it is not a terminal
    return console


def results_table(title: str, columns: Sequence[str], results: list[Result],
                  cells: Callable[[Result], Sequence[str]]) -> Any:
    """One row per result, a section per (workload, guest size)."""
    table = plain_table(title, *columns, right=tuple(columns))
    last = None
    for r in results:
        if last is not None and (r.workload, r.size) != last:
            table.add_section()
        last = (r.workload, r.size)
        table.add_row(*cells(r))
    return table


def print_report(
    results: list[Result], sizes: list[str], checks: list[Check], calibration: dict[str, dict[str, float]]
) -> None:
    console = wide_console()
    columns = ("workload", "guest", "tracker", "conversions", "conv/s batch", "conv/s per call", "is_shared",
               "export", "bytes", "ranges", "poisoned")
    console.print(results_table("shared-page trackers (medians of the rounds, min-max)", columns, results, lambda r: (
        r.workload, r.size, r.tracker, str(r.conversions), _spread_text(r.batch_rounds, _rate),
        _spread_text(r.call_rounds, _rate),
        _spread_text(r.is_shared_rounds, lambda v: f"{v:.0f} ns"),
        _spread_text(r.export_rounds, lambda v: f"{v:.1f} µs"),
        _bytes(r.bytes), str(r.ranges), "ERROR" if r.error else ("yes" if r.poisoned else ""),
    )))

    ratios = plain_table("ratios of medians within this run (dma_churn)", "ratio", *sizes, right=tuple(sizes))
    pairs = [
        ("tree / intervaltree (per call)", "tree", "intervaltree", "call_per_s"),
        ("tree / intervaltree (tree batch)", "tree", "intervaltree", "batch_per_s"),
        ("ranges / intervaltree (batch)", "ranges", "intervaltree", "batch_per_s"),
        ("ranges / portion (batch)", "ranges", "portion", "batch_per_s"),
        ("bitmap / ranges (batch)", "bitmap", "ranges", "batch_per_s"),
        ("ranges / tree (batch)", "ranges", "tree", "batch_per_s"),
        ("ranges batch / per call", "ranges", "ranges", None),
    ]
    for label, a, b, field in pairs:
        row = [label]
        for s in sizes:
            ra, rb = find(results, "dma_churn", s, a), find(results, "dma_churn", s, b)
            if field is None:
                x, y = ra.batch_per_s, rb.call_per_s
            else:
                x, y = getattr(ra, field), getattr(rb, field)
            row.append(f"{x / y:.1f}x" if x and y else "-")
        ratios.add_row(*row)
    row = ["bitmap bytes / ranges bytes"]
    for s in sizes:
        bitmap, ranges = find(results, "dma_churn", s, "bitmap"), find(results, "dma_churn", s, "ranges")
        row.append(f"{bitmap.bytes / ranges.bytes:.0f}x")
    ratios.add_row(*row)
    console.print(ratios)

    calib = plain_table("bare loops on dma_churn, this machine, this run; paired ratios per round", "loop", *sizes,
                        right=tuple(sizes))
    for loop, reference in (("raw bitarray", CALIBRATION_RAW_BITARRAY), ("raw bisect list", CALIBRATION_RAW_BISECT)):
        figures = (_rate(calibration.get(s, {}).get(loop)) for s in sizes)
        calib.add_row(f"{loop} (reference {_rate(reference)})", *figures)
    calib.add_row("speed factor (raw bitarray / 16 M/s)", *(f"{speed_factor(calibration, s):.2f}" for s in sizes))
    for name in TRACKER_KINDS:
        calib.add_row(
            f"{name} batch / {BARE_LOOP[name]} (paired)",
            *(_spread_text(find(results, "dma_churn", s, name).batch_vs_bare_rounds, lambda v: f"{v:.2f}x")
              for s in sizes),
        )
    for ours, peer in PAIRED_PEER.items():
        calib.add_row(f"{ours} / {peer} per call (paired)",
                      *(_spread_text(find(results, "dma_churn", s, ours).call_vs_peer_rounds, lambda v: f"{v:.1f}x")
                        for s in sizes))
    console.print(calib)

    style = {"met": "green", "missed": "red", "undecided": "yellow"}
    verdicts = plain_table("targets (met / missed only when every round agrees)", "verdict", "target", "rounds")
    for check in checks:
        word = styled(check.verdict, style[check.verdict])
        if check.reason:
            word.append(f" ({check.reason})")
        verdicts.add_row(word, check.target, check.detail)
    console.print(verdicts)


def _style_axis(ax: Any, x: list[int], sizes: list[str], workload: str) -> None:
    """Log-log axes against guest size, titled by workload."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(x, sizes)
    ax.set_title(workload)
    ax.set_xlabel("guest size")
    ax.grid(True, which="both", alpha=0.3)


def _finish_figure(fig: Any, axes: Any, ncol: int, ylabel: str, title: str, note: str, path: Path) -> Path:
    """Label, legend, footnote; write the PNG and close the figure."""
    import matplotlib.pyplot as plt

    axes[0].set_ylabel(ylabel)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper right", ncol=ncol, fontsize=8)
    fig.suptitle(title, x=0.3)
    fig.text(0.01, 0.01, note, fontsize=7, color="grey")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(results: list[Result], sizes: list[str], trackers: list[str], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [SIZES[s] * 4096 for s in sizes]
    paths = []
    # Distinct markers and dashes: ranges and tree overlap on the memory plots.
    style = {
        "bitmap": ("o", "-"), "ranges": ("s", "-"), "tree": ("^", "--"),
        "intervaltree": ("D", "-."), "portion": ("v", ":"),
    }

    def label(name: str) -> str:
        return f"{name} (prefix*)" if name == "portion" else name

    note = (
        "* portion rebuilds its union on every operation (O(n) each), so it runs only a prefix of "
        "each workload (see the conversions column of the table)."
    )

    fig, axes = plt.subplots(1, len(TIMED_WORKLOADS), figsize=(5 * len(TIMED_WORKLOADS), 4.2), sharey=True)
    for ax, workload in zip(axes, TIMED_WORKLOADS, strict=True):
        for name in trackers:
            ys = [find(results, workload, s, name).batch_per_s or float("nan") for s in sizes]
            ax.plot(x, ys, marker=style[name][0], ls=style[name][1], label=label(name))
        _style_axis(ax, x, sizes, workload)
    paths.append(_finish_figure(fig, axes, len(trackers), "conversions/s (batch; peers per call)",
                                "Tracker throughput against guest size (medians)", note, out / "throughput.png"))

    fig, axes = plt.subplots(1, len(WORKLOAD_NAMES), figsize=(4.4 * len(WORKLOAD_NAMES), 4.2), sharey=True)
    for ax, workload in zip(axes, WORKLOAD_NAMES, strict=True):
        for name in trackers:
            ys = [find(results, workload, s, name).bytes or float("nan") for s in sizes]
            ax.plot(x, ys, marker=style[name][0], ls=style[name][1], label=label(name))
        if workload != "hostile":
            ax.axhline(SEED_MEMORY_MAX, color="grey", ls="--", lw=0.8)
            ax.text(x[0], SEED_MEMORY_MAX * 1.15, "16 KB", fontsize=7, color="grey")
        else:
            bound = find(results, workload, sizes[0], "ranges").bound_bytes
            if bound:
                ax.axhline(bound, color="grey", ls="--", lw=0.8)
                ax.text(x[0], bound * 1.15, f"ranges bound ({DEFAULT_MAX_RANGES} records)", fontsize=7, color="grey")
        _style_axis(ax, x, sizes, workload)
    paths.append(_finish_figure(fig, axes, len(trackers), "bytes used", "Tracker memory against guest size", note,
                                out / "memory.png"))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="output directory (default bench-out/)")
    parser.add_argument("--quick", action="store_true", help="fewer conversions and rounds")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"rounds per figure (default 7, quick {MIN_ROUNDS}; fewer than {MIN_ROUNDS} "
                             "leaves every timed target undecided)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--sizes", default=",".join(SIZES), help="guest sizes, from 1G,64G,1T")
    args = parser.parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    if not sizes or any(s not in SIZES for s in sizes):
        parser.error(f"--sizes: choose from {','.join(SIZES)}")
    repeats = args.repeats or (MIN_ROUNDS if args.quick else 7)
    if repeats < 1:
        parser.error("--repeats: at least 1")
    conversions = 10_000 if args.quick else 40_000
    prefixes = {k: v // 2 for k, v in PEER_PREFIX.items()} if args.quick else PEER_PREFIX
    trackers = [*TRACKER_KINDS, *PEERS]
    args.out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    load_before = os.getloadavg()
    results: list[Result] = []
    calibration: dict[str, dict[str, float]] = {}
    for workload in WORKLOAD_NAMES:
        for size in sizes:
            ops = list(make_workload(workload, SIZES[size], seed=1, conversions=conversions))
            case, calib = measure(workload, size, ops, trackers, repeats, prefixes)
            results.extend(case)
            if calib:
                calibration[size] = calib
            print(f"  {workload:<13} {size:>3}: {len(ops)} conversions", file=sys.stderr)
    checks = targets(results, sizes)
    print_report(results, sizes, checks, calibration)
    paths = plot(results, sizes, trackers, args.out)
    doc: dict[str, Any] = {
        "results": [asdict(r) for r in results],
        "targets": [asdict(c) for c in checks],
        "calibration": calibration,
        "loadavg": {"before": load_before, "after": os.getloadavg()},
        "conversions": conversions,
        "repeats": repeats,
        "python": sys.version.split()[0],
        "seconds": time.perf_counter() - started,
    }
    (args.out / "results.json").write_text(json.dumps(doc, indent=1))
    print(f"wrote {', '.join(str(p) for p in [*paths, args.out / 'results.json'])} "
          f"in {doc['seconds']:.0f} s", file=sys.stderr)
    return 1 if args.check and any(c.verdict == "missed" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
