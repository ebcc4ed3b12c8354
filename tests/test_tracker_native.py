"""The trackers in C (testbed/tracker/_native.c, wrapped by testbed/tracker/native.py) against
their reference models, the Python trackers (testbed/tracker/bitmap.py, ranges.py and tree.py)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.tracker import (
    BitmapTracker,
    InvalidRangeError,
    RangesTracker,
    SharedTracker,
    TrackerResizeError,
    TreeTracker,
    decode_export,
    make_tracker,
)

pytest.importorskip("testbed.tracker._native", reason="the optional C extension is not built")

from testbed.tracker.native import NativeBitmapTracker, NativeRangesTracker, NativeTreeTracker

PAIRS: list[tuple[type[SharedTracker], type[SharedTracker]]] = [
    (BitmapTracker, NativeBitmapTracker),
    (RangesTracker, NativeRangesTracker),
    (TreeTracker, NativeTreeTracker),
]
PAIR_IDS = ["bitmap", "ranges", "tree"]


def outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    """What a call did: its value, or the error's type and message."""
    try:
        return ("ok", fn(*args))
    except InvalidRangeError as err:
        return ("InvalidRangeError", (err.field, str(err)))


def state(t: SharedTracker) -> tuple[Any, ...]:
    """Everything observable about a tracker's records."""
    return (t.shared_ranges(), t.range_count(), t.poisoned)


# Strategies built once: a strategy built inside the draw costs more than the tracker work
# (the bounds that depend on the guest size are applied by arithmetic on a fixed draw).
_SIZE = st.sampled_from([1, 63, 64, 65, 128, 200]) | st.integers(1, 700)
_ANY = st.integers(0, 1 << 16)
_BOOL = st.booleans()
_BOUND = st.integers(1, 8)
_LOW = st.sampled_from([0, 60])
_D20 = st.integers(0, 19)
_D8 = st.integers(0, 7)
_D4 = st.integers(0, 3)
_BATCH = st.integers(0, 6)
_LENGTH = st.integers(0, 40)
_EXPORT = st.integers(0, 10)
_BAD = st.integers(0, 4)
_KIND = st.sampled_from(["shared", "shared", "private", "private", "apply", "query", "export", "clear"])


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, int, list[tuple[Any, ...]]]:
    """A guest size (word boundaries included), a small bound, and a sequence of operations:
    conversions (a few invalid), batches, queries, exports into buffers of any size, clears."""
    pages = draw(_SIZE)
    bound = draw(_BOUND)
    # DMA-churn mode: single pages flipped in a window of 8, so records meet, fill one-page gaps
    # and split all the time (on either side of the first word boundary when the guest has one).
    churn = draw(_BOOL)
    low = min(pages - 1, draw(_LOW))

    def upto(lo: int, hi: int) -> int:
        """An int in [lo, hi], from the fixed wide draw."""
        return lo + draw(_ANY) % (hi - lo + 1)

    def a_range() -> tuple[int, int]:
        if draw(_D20) == 0:  # invalid: past the end, negative, or an empty count
            return [(pages, 1), (-1, 1), (0, 0), (0, pages + 1), (pages - 1, 2)][draw(_BAD)]
        if churn and draw(_D8):
            return min(pages - 1, low + draw(_D8)), 1
        # Half the pages from a small window (crossing the first word boundary when the guest
        # is big enough), so that ranges meet, fill one-page gaps and split.
        gfn = min(pages - 1, 60 + draw(_D8) + draw(_BOOL)) if draw(_BOOL) else upto(0, pages - 1)
        npages = upto(1, min(3, pages - gfn)) if draw(_BOOL) else upto(1, pages - gfn)
        return gfn, npages

    ops: list[tuple[Any, ...]] = []
    for _ in range(draw(_LENGTH)):
        kind = draw(_KIND)
        if kind in ("shared", "private"):
            ops.append((kind, *a_range()))
        elif kind == "apply":
            ops.append((kind, [(*a_range(), draw(_BOOL)) for _ in range(draw(_BATCH))]))
        elif kind == "query":
            ops.append((kind, upto(-1, pages)))
        elif kind == "export":
            ops.append((kind, draw(_EXPORT)))
        elif draw(_D4) == 0:
            ops.append((kind,))
    return pages, bound, ops


def run(t: SharedTracker, op: tuple[Any, ...]) -> tuple[Any, ...]:
    """Apply one operation; return what it showed."""
    kind = op[0]
    if kind == "shared":
        return outcome(t.set_shared, op[1], op[2])
    if kind == "private":
        return outcome(t.set_private, op[1], op[2])
    if kind == "apply":
        return outcome(t.apply, op[1])
    if kind == "query":
        return outcome(t.is_shared, op[1])
    if kind == "export":
        buf = bytearray(b"\xa5" * (16 * op[1]))
        result = t.export(buf)
        return (result, bytes(buf), decode_export(buf, result.records_written))
    t.clear()
    return ("cleared",)


@settings(max_examples=100, deadline=None)
@given(scenario=scenarios())
def test_native_trackers_equal_their_reference_models(scenario: tuple[int, int, list[tuple[Any, ...]]]) -> None:
    """Every operation returns, raises and leaves the records (and the bound's poison) as the Python tracker does."""
    # One scenario drives all three pairs: drawing it costs more than running it.
    pages, bound, ops = scenario
    for (reference, native), name in zip(PAIRS, PAIR_IDS, strict=True):
        ref, nat = reference(pages, bound), native(pages, bound)
        for op in ops:
            assert run(nat, op) == run(ref, op), (name, op)
            assert state(nat) == state(ref), (name, op)
            if isinstance(nat, NativeTreeTracker):
                nat.check_invariants()
        assert nat.memory_bytes() <= nat.memory_bound_bytes(), name


@pytest.mark.parametrize(("reference", "native"), PAIRS, ids=PAIR_IDS)
def test_empty_and_whole_guest(reference: type[SharedTracker], native: type[SharedTracker]) -> None:
    """An empty tracker exports nothing; sharing the whole guest is one range, and clearing it empties it."""
    for pages in (1, 64, 1000, 1 << 20):
        ref, nat = reference(pages, 4), native(pages, 4)
        assert nat.shared_ranges() == [] and nat.range_count() == 0
        assert nat.export(bytearray()) == ref.export(bytearray())
        for t in (ref, nat):
            t.set_shared(0, pages)
        assert nat.shared_ranges() == ref.shared_ranges() == [(0, pages)]
        assert nat.is_shared(pages - 1) and nat.is_shared(0)
        for t in (ref, nat):
            t.set_private(0, pages)
        assert nat.shared_ranges() == [] and not nat.is_shared(pages - 1)


@pytest.mark.parametrize(("reference", "native"), PAIRS, ids=PAIR_IDS)
def test_native_grow_equals_the_reference(reference: type[SharedTracker], native: type[SharedTracker]) -> None:
    """Memory hotplug: growing keeps the records, the new pages start private and take
    conversions up to the new top, a shrink or an equal size changes nothing or is refused as
    in the model, across u64 word boundaries (the bitmap's realloc)."""
    ref, nat = reference(100, 8), native(100, 8)
    for t in (ref, nat):
        t.set_shared(60, 40)
        t.resize(100)  # the same size: nothing to do
        t.resize(130)
    assert nat.shared_ranges() == ref.shared_ranges() == [(60, 40)]
    assert not nat.is_shared(100) and not nat.is_shared(129)
    for t in (ref, nat):
        t.set_shared(99, 31)
    assert nat.shared_ranges() == ref.shared_ranges() == [(60, 70)]
    for t in (ref, nat):
        with pytest.raises(TrackerResizeError):
            t.resize(129)
        t.resize(1 << 20)
        t.set_shared((1 << 20) - 1, 1)
    assert nat.shared_ranges() == ref.shared_ranges() == [(60, 70), ((1 << 20) - 1, 1)]
    assert nat.guest_pages == ref.guest_pages == 1 << 20
    with pytest.raises(InvalidRangeError):
        nat.set_shared(1 << 20, 1)


@pytest.mark.parametrize(("reference", "native"), PAIRS, ids=PAIR_IDS)
def test_adjacent_ranges_merge(reference: type[SharedTracker], native: type[SharedTracker]) -> None:
    """Ranges that touch on either side, across a u64 word boundary or across a one-page gap, become one record."""
    ref, nat = reference(256, 8), native(256, 8)
    for gfn, npages in [(60, 4), (64, 1), (65, 63), (10, 5), (15, 1), (9, 1), (128, 1), (130, 1), (129, 1)]:
        ref.set_shared(gfn, npages)
        nat.set_shared(gfn, npages)
    assert nat.shared_ranges() == ref.shared_ranges() == [(9, 7), (60, 71)]


@pytest.mark.parametrize(("reference", "native"), PAIRS[1:], ids=PAIR_IDS[1:])
def test_native_bound_poisons_and_freezes(reference: type[SharedTracker], native: type[SharedTracker]) -> None:
    """At max_ranges records a conversion that would add one poisons the list or tree and freezes it until clear()."""
    ref, nat = reference(100, 2), native(100, 2)
    for t in (ref, nat):
        t.set_shared(10, 10)
        t.set_shared(40, 1)
        t.set_private(15, 1)  # a split past the bound: poisons, not recorded
        t.set_shared(41, 1)  # frozen: not recorded
    assert nat.poisoned and ref.poisoned
    assert nat.shared_ranges() == ref.shared_ranges() == [(10, 10), (40, 1)]
    result = nat.export(bytearray(64))
    assert result.poisoned and not result.complete and result.records_written == 2
    with pytest.raises(InvalidRangeError, match="gfn\\+npages"):
        nat.set_shared(99, 2)  # still validated when frozen
    nat.clear()
    assert not nat.poisoned and nat.shared_ranges() == []


def test_native_tree_stays_balanced_under_a_hostile_guest() -> None:
    """A guest sharing every other page in shuffled order fills the tree to its bound as the Python
    tree does; the AVL tree stays within 1.45 log2(n) levels and its max-end augmentation exact."""
    from testbed.workloads import make_workload

    pages = 1 << 18
    ops = list(make_workload("hostile", pages, seed=3, conversions=6000))
    ref, nat = TreeTracker(pages, 5000), NativeTreeTracker(pages, 5000)
    assert nat.apply(ops) == ref.apply(ops)
    assert state(nat) == state(ref) and nat.poisoned and nat.range_count() == 5000
    nat.check_invariants()
    assert nat.height <= 1.45 * math.log2(5000 + 2)
    buf = bytearray(16 * 5000)
    assert decode_export(buf, nat.export(buf).records_written) == ref.shared_ranges()
    undo = [(gfn, npages, not shared) for gfn, npages, shared in ops[:3000]]
    for t in (ref, nat):
        t.clear()
        t.apply(ops[:3000])
        t.apply(undo[::2])  # frees every other one, in the same shuffled order
    assert state(nat) == state(ref) and not nat.poisoned
    nat.check_invariants()


def test_native_tree_refuses_a_bound_past_its_node_index() -> None:
    """The C tree links nodes by u32 index: a max_ranges past that is a clear error naming the field."""
    from testbed.tracker.native import MAX_TREE_RANGES

    with pytest.raises(InvalidRangeError, match="max_ranges"):
        NativeTreeTracker(64, MAX_TREE_RANGES + 1)


def test_native_bitmap_never_poisons_and_counts_pages() -> None:
    """The native bitmap keeps every range however many there are, and counts shared pages as the model does."""
    ref, nat = BitmapTracker(1000, 1), NativeBitmapTracker(1000, 1)
    ops = [(g, 1, True) for g in range(0, 1000, 3)]
    assert nat.apply(ops) == ref.apply(ops) == len(ops)
    assert not nat.poisoned and nat.range_count() == ref.range_count() == 334
    assert nat.shared_pages() == ref.shared_pages() == 334


_SLOT = st.integers(0, 47)
_WIDE = st.integers(0, 9)
_MANY_BOUND = st.sampled_from([9, 17, 33, 1000])


@settings(max_examples=60, deadline=None)
@given(
    bound=_MANY_BOUND,
    ops=st.lists(st.tuples(_SLOT, _BOOL, _WIDE), min_size=1, max_size=120),
    far=st.lists(_SLOT, max_size=6),
)
def test_native_ranges_with_many_records_equal_the_reference(
    bound: int, ops: list[tuple[int, bool, int]], far: list[int]
) -> None:
    """With dozens of live records, the finger window's search (at both ends of the array, and
    its binary-search fallback after a far jump) and the fixed-block record moves (tails under
    and over the block, across capacity growth and after clear) give the Python tracker's records."""
    pages = 2 * 48 + 8
    ref, nat = RangesTracker(pages, bound), NativeRangesTracker(pages, bound)
    for k, (slot, shared, wide) in enumerate(ops):
        # Every other page: single pages never touch, so each shared one is a record of its own;
        # now and then a wider range merges or splits several at once.
        gfn, npages = 2 * slot, (1 if wide else 1 + 2 * (slot % 5))
        npages = min(npages, pages - gfn)
        for t in (ref, nat):
            (t.set_shared if shared else t.set_private)(gfn, npages)
        if far and k % 17 == 16:
            q = 2 * far[k % len(far)]
            assert nat.is_shared(q) == ref.is_shared(q)
        assert state(nat) == state(ref), (slot, shared, npages)
    buf = bytearray(16 * (nat.range_count() + 1))
    assert nat.export(buf) == ref.export(bytearray(len(buf)))
    assert decode_export(buf, nat.range_count()) == ref.shared_ranges()
    assert nat.memory_bytes() <= nat.memory_bound_bytes()
    nat.clear()
    nat.apply([(2 * s, 1, True) for s in range(40)])
    assert nat.shared_ranges() == [(2 * s, 1) for s in range(min(40, bound))]


def test_native_ranges_window_at_both_ends_and_long_tails() -> None:
    """Inserting and removing at index 0 and at the end of a 40-record list, and in front of a
    tail longer than the fixed block (memmove), keeps the sorted records exact."""
    nat, ref = NativeRangesTracker(1 << 12, 100), RangesTracker(1 << 12, 100)
    script = [(2 * s + 10, 1, True) for s in range(40)]  # appends: the finger rides the end
    script += [(0, 1, True), (0, 1, False), (200, 1, True), (200, 1, False)]  # both ends
    script += [(8, 1, True), (50, 1, False), (150, 1, True), (9, 1, True)]  # far jumps, merges
    script += [(11, 60, False), (11, 60, True), (12, 1, False)]  # one split, one fold of 30
    for gfn, npages, shared in script:
        for t in (ref, nat):
            (t.set_shared if shared else t.set_private)(gfn, npages)
        assert state(nat) == state(ref), (gfn, npages, shared)
    for gfn in range(0, 220):
        assert nat.is_shared(gfn) == ref.is_shared(gfn), gfn


def test_native_ranges_follows_the_reference_on_dma_churn() -> None:
    """The DMA-churn workload (the benchmark's) ends with the Python tracker's records."""
    from testbed.workloads import make_workload

    churn = list(make_workload("dma_churn", 1 << 24, seed=1, conversions=20_000))
    ref, nat = RangesTracker(1 << 24), NativeRangesTracker(1 << 24)
    ref.apply(churn)
    nat.apply(churn)
    assert state(nat) == state(ref)


def test_native_export_refuses_read_only_buffer() -> None:
    """Exporting into a read-only buffer is a clear error, as for the Python trackers."""
    from testbed.errors import UsageError

    nat = NativeRangesTracker(10, 4)
    with pytest.raises(UsageError, match="read-only"):
        nat.export(memoryview(bytes(16)))


def test_native_kinds_are_registered() -> None:
    """make_tracker builds the native trackers by name; a bad size names the field."""
    assert isinstance(make_tracker("native-bitmap", guest_pages=64), NativeBitmapTracker)
    assert isinstance(make_tracker("native-ranges", guest_pages=64, max_ranges=3), NativeRangesTracker)
    assert isinstance(make_tracker("native-tree", guest_pages=64, max_ranges=3), NativeTreeTracker)
    with pytest.raises(InvalidRangeError, match="guest_pages"):
        make_tracker("native-bitmap", guest_pages=1 << 60)


def test_python_trackers_serve_without_the_extension() -> None:
    """Without the C extension testbed.tracker imports, offers no native kinds, and the Python ones work."""
    code = (
        "import sys; sys.modules['testbed.tracker._native'] = None\n"
        "from testbed.tracker import NATIVE_TRACKER_KINDS, make_tracker\n"
        "t = make_tracker('ranges', guest_pages=8); t.set_shared(1, 2)\n"
        "print(NATIVE_TRACKER_KINDS, t.shared_ranges())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "() [(1, 2)]"


@pytest.mark.parametrize("kind", ["native-bitmap", "native-ranges", "native-tree"])
def test_a_vm_runs_with_a_native_tracker(kind: str) -> None:
    """`--tracker native-*`: the VMM records the guest's conversions in the C structure, with the
    same result as its Python model (guests/conversions.s, DMA-churn shape)."""
    from testbed.machine import GUESTS_DIR, Machine, VmOptions, build_program

    reports = {}
    for name in (kind, kind.removeprefix("native-")):
        options = VmOptions(vm_type="sev", memory=24 << 20, tracker=name, defines={"SHAPE": 1, "CHURN": 8})
        with Machine(build_program(GUESTS_DIR / "conversions.s", options), options) as machine:
            assert machine.map_gpa.tracker.name == name
            reports[name] = machine.run()
    native, python = reports[kind], reports[kind.removeprefix("native-")]
    assert native.outcome == python.outcome == "done", native.detail
    assert native.shared_ranges == python.shared_ranges and len(native.shared_ranges) > 2


MUTATING_APPLY = """
import sys
from testbed.tracker import _native

class Shrinks:
    def __init__(self, ops): self.ops = ops
    def __bool__(self):
        self.ops.clear()
        self.ops.extend((g, 1, True) for g in range(40, 60))
        return True

for make in (lambda: _native.Bitmap(64), lambda: _native.Ranges(64, 16), lambda: _native.Tree(64, 16)):
    ops = [(1, 1, True)]
    ops.append((2, 1, Shrinks(ops)))
    ops.extend((g, 1, True) for g in range(3, 30))
    tracker = make()
    print(tracker.apply(ops), tracker.ranges())
"""


def test_apply_walks_a_snapshot_of_a_list_its_entries_change() -> None:
    """An entry whose truth test (__bool__) empties and refills the list being applied cannot make
    the C loop read freed entries: apply walks the list as it was (29 entries, pages 1..29),
    checked under Python's debug allocator, which fills freed memory."""
    result = subprocess.run([sys.executable, "-c", MUTATING_APPLY], check=False, capture_output=True, text=True,
                            timeout=60, env={"PYTHONMALLOC": "debug", "PATH": ""},
                            cwd=str(Path(__file__).resolve().parent.parent))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["29 [(1, 29)]"] * 3


def test_a_refused_reinit_leaves_the_tracker_as_it_was() -> None:
    """A second __init__ that fails (no memory for 2**52 pages; a max_ranges of 0) leaves the C
    object as it was: its ranges, its bound, and usable (it once freed the bitmap and kept the
    size, then crashed on the next store)."""
    from testbed.tracker import _native

    bitmap = _native.Bitmap(64)
    bitmap.set_shared(3, 1)
    with pytest.raises(MemoryError):
        bitmap.__init__(1 << 52)
    bitmap.set_shared(5, 1)
    assert bitmap.ranges() == [(3, 1), (5, 1)]
    for tracker in (_native.Ranges(64, 8), _native.Tree(64, 8)):
        with pytest.raises(ValueError, match="max_ranges"):
            tracker.__init__(64, 0)
        for gfn in range(0, 16, 2):  # 8 ranges: at the bound kept, not poisoned by a bound of 0
            tracker.set_shared(gfn, 1)
        assert tracker.range_count() == 8
