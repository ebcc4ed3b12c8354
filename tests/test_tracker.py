"""Tests of testbed/tracker: the three trackers against a set-of-pages reference model.

1. Random conversion sequences (Hypothesis) drive every tracker and a plain set of shared pages;
   after each step the shared ranges, single-page lookups and the poison bit must agree.
2. With a small max_ranges the list and the tree poison exactly when the reference's range
   count would exceed the bound, and then stay frozen (semantics: tracker/base.py).
3. Export round-trips, reports the size it needs, and writes nothing into a short buffer.
4. Bad arguments raise InvalidRangeError naming the field, and change nothing.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.errors import TestbedError, UsageError
from testbed.tracker import (
    DEFAULT_TRACKER,
    RECORD_SIZE,
    TRACKER_KINDS,
    InvalidRangeError,
    SharedTracker,
    TreeTracker,
    decode_export,
    make_tracker,
)

GUEST_PAGES = 64  # small, so random operations collide, merge and split often

Op = tuple[int, int, bool]

# "tree4" is a tree of fanout 4: a few dozen ranges then exercise splits, borrows, merges and
# root collapses that the default fanout of 64 reaches only with thousands.
FACTORIES: dict[str, Callable[[int, int], SharedTracker]] = {
    "bitmap": lambda pages, bound: make_tracker("bitmap", guest_pages=pages, max_ranges=bound),
    "ranges": lambda pages, bound: make_tracker("ranges", guest_pages=pages, max_ranges=bound),
    "tree": lambda pages, bound: make_tracker("tree", guest_pages=pages, max_ranges=bound),
    "tree4": lambda pages, bound: TreeTracker(pages, bound, fanout=4),
}
BOUNDED = ["ranges", "tree", "tree4"]

FAST = settings(deadline=None, max_examples=50)


class Reference:
    """The model: a set of shared pages; with a bound, frozen at the first step that exceeds it."""

    def __init__(self, max_ranges: int | None = None) -> None:
        self.pages: set[int] = set()
        self.max_ranges = max_ranges
        self.poisoned = False

    def apply(self, gfn: int, npages: int, shared: bool) -> None:
        if self.poisoned:
            return
        span = set(range(gfn, gfn + npages))
        new = self.pages | span if shared else self.pages - span
        if self.max_ranges is not None and len(ranges_of(new)) > self.max_ranges:
            self.poisoned = True
            return
        self.pages = new


def ranges_of(pages: set[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for p in sorted(pages):
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out


def _decode(blob: bytes, guest_pages: int) -> list[Op]:
    """Three bytes per conversion: gfn, a size byte (mostly 1 page), shared."""
    out: list[Op] = []
    for i in range(0, len(blob) - 2, 3):
        gfn = blob[i] % guest_pages
        npages = 1 if blob[i + 1] < 160 else 1 + blob[i + 1] % guest_pages
        out.append((gfn, min(npages, guest_pages - gfn), bool(blob[i + 2] & 1)))
    return out


def ops(guest_pages: int = GUEST_PAGES, max_size: int = 60) -> st.SearchStrategy[list[Op]]:
    """Conversion sequences of up to max_size steps, mostly single pages (the hot paths).

    Drawn as one blob per example: Hypothesis spends ~0.1 ms per draw, so drawing each field
    separately made the generator, not the trackers, dominate the test time.
    """
    return (
        st.integers(0, max_size)
        .flatmap(lambda n: st.binary(min_size=3 * n, max_size=3 * n))
        .map(lambda blob: _decode(blob, guest_pages))
    )


def check_against(tracker: SharedTracker, ref: Reference) -> None:
    expected = ranges_of(ref.pages)
    assert tracker.shared_ranges() == expected
    assert tracker.range_count() == len(expected)
    assert tracker.poisoned == ref.poisoned
    # Every page's lookup, compared as one list (an assert per page cost more than the lookups).
    is_shared, pages = tracker.is_shared, ref.pages
    got = [is_shared(gfn) for gfn in range(tracker.guest_pages)]
    want = [gfn in pages for gfn in range(tracker.guest_pages)]
    assert got == want, hex(next(gfn for gfn, (a, b) in enumerate(zip(got, want, strict=True)) if a != b))
    if isinstance(tracker, TreeTracker):
        tracker.check_invariants()


@pytest.mark.parametrize("api", ["call", "batch"])
@pytest.mark.parametrize("kind", list(FACTORIES))
@FAST
@given(sequence=ops())
def test_tracker_matches_reference_model(kind: str, api: str, sequence: list[Op]) -> None:
    """Every tracker records exactly the reference's shared pages after each conversion."""
    tracker = FACTORIES[kind](GUEST_PAGES, 1 << 20)
    ref = Reference()
    for gfn, npages, shared in sequence:
        if api == "call":
            tracker.convert(gfn, npages, shared)
        else:
            tracker.apply([(gfn, npages, shared)])  # the inlined batch paths, one step at a time
        ref.apply(gfn, npages, shared)
        check_against(tracker, ref)


@pytest.mark.parametrize("kind", list(FACTORIES))
@FAST
@given(sequence=ops(), bound=st.integers(1, 6))
def test_apply_batch_equals_single_calls(kind: str, sequence: list[Op], bound: int) -> None:
    """apply() leaves the same ranges and poison bit as the same conversions one call at a time."""
    one = FACTORIES[kind](GUEST_PAGES, bound)
    batch = FACTORIES[kind](GUEST_PAGES, bound)
    for gfn, npages, shared in sequence:
        (one.set_shared if shared else one.set_private)(gfn, npages)
    assert batch.apply(sequence) == len(sequence)
    assert batch.shared_ranges() == one.shared_ranges()
    assert batch.poisoned == one.poisoned


@pytest.mark.parametrize("kind", BOUNDED)
@FAST
@given(sequence=ops(max_size=80), bound=st.integers(1, 6))
def test_poison_set_exactly_when_reference_exceeds_bound(kind: str, sequence: list[Op], bound: int) -> None:
    """A bounded tracker poisons at the first conversion whose result needs more than max_ranges."""
    tracker = FACTORIES[kind](GUEST_PAGES, bound)
    ref = Reference(bound)
    for gfn, npages, shared in sequence:
        tracker.convert(gfn, npages, shared)
        ref.apply(gfn, npages, shared)
        # Frozen semantics: after poisoning the records stay the last state that fit.
        check_against(tracker, ref)
        assert tracker.range_count() <= bound


def test_bitmap_never_poisons() -> None:
    """The bitmap ignores max_ranges: its bound is its size."""
    tracker = make_tracker("bitmap", guest_pages=GUEST_PAGES, max_ranges=1)
    for gfn in range(0, GUEST_PAGES, 2):
        tracker.set_shared(gfn, 1)
    assert not tracker.poisoned
    assert tracker.range_count() == GUEST_PAGES // 2


@pytest.mark.parametrize("kind", BOUNDED)
def test_poisoned_tracker_is_frozen_but_still_validates(kind: str) -> None:
    """After poisoning, conversions change nothing, bad arguments still raise, clear() recovers."""
    tracker = FACTORIES[kind](GUEST_PAGES, 2)
    tracker.set_shared(0, 1)
    tracker.set_shared(10, 1)
    tracker.set_shared(20, 1)  # a third range: dropped
    assert tracker.poisoned
    assert tracker.shared_ranges() == [(0, 1), (10, 1)]
    tracker.set_private(0, 1)  # would fit, but the tracker is frozen
    tracker.set_shared(1, 1)
    assert tracker.shared_ranges() == [(0, 1), (10, 1)]
    with pytest.raises(InvalidRangeError):
        tracker.set_shared(GUEST_PAGES, 1)
    tracker.clear()
    assert not tracker.poisoned
    assert tracker.shared_ranges() == []
    tracker.set_shared(5, 3)
    assert tracker.shared_ranges() == [(5, 3)]


@pytest.mark.parametrize("kind", BOUNDED)
def test_split_by_set_private_can_poison(kind: str) -> None:
    """Punching a hole in a range at the bound poisons: splitting needs one more record."""
    tracker = FACTORIES[kind](GUEST_PAGES, 1)
    tracker.set_shared(0, 10)
    tracker.set_private(0, 1)  # trims: still one range
    tracker.set_private(9, 1)
    assert not tracker.poisoned
    tracker.set_private(4, 1)  # would split [1, 9) in two
    assert tracker.poisoned
    assert tracker.shared_ranges() == [(1, 8)]


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("kind", list(FACTORIES))
def test_adjacent_ranges_merge_and_holes_split(kind: str, batch: bool) -> None:
    """Adjacent shared pages merge into one range; a private page splits it again."""
    tracker = FACTORIES[kind](GUEST_PAGES, 16)

    def do(gfn: int, npages: int, shared: bool) -> None:
        if batch:
            tracker.apply([(gfn, npages, shared)])
        else:
            tracker.convert(gfn, npages, shared)

    do(3, 1, True)
    do(5, 1, True)
    do(4, 1, True)  # bridges [3, 4) and [5, 6)
    assert tracker.shared_ranges() == [(3, 3)]
    do(4, 1, False)
    assert tracker.shared_ranges() == [(3, 1), (5, 1)]
    do(2, 1, True)  # grows [3, 4) to the left
    do(6, 1, True)  # grows [5, 6) to the right
    assert tracker.shared_ranges() == [(2, 2), (5, 2)]
    do(0, GUEST_PAGES, True)
    assert tracker.shared_ranges() == [(0, GUEST_PAGES)]


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("kind", list(FACTORIES))
def test_shared_is_taken_by_its_truth_value(kind: str, batch: bool) -> None:
    """`shared` is a truth value for every tracker (base.py's convert tests `if shared`): 2 shares
    a page and 0 makes it private, one page or a span, batched or not."""
    tracker = FACTORIES[kind](GUEST_PAGES, 16)
    for gfn, npages in ((3, 1), (10, 4)):
        ops: list[tuple[int, int, object]] = [(gfn, npages, 2)]
        if batch:
            tracker.apply(ops)  # type: ignore[arg-type]
        else:
            tracker.convert(gfn, npages, 2)  # type: ignore[arg-type]
    assert tracker.shared_ranges() == [(3, 1), (10, 4)]
    tracker.convert(3, 1, 0)  # type: ignore[arg-type]
    assert tracker.shared_ranges() == [(10, 4)]


@pytest.mark.parametrize("kind", list(FACTORIES))
@FAST
@given(sequence=ops())
def test_export_round_trips(kind: str, sequence: list[Op]) -> None:
    """An export into a big enough buffer decodes back to shared_ranges() and is complete."""
    tracker = FACTORIES[kind](GUEST_PAGES, 1 << 20)
    tracker.apply(sequence)
    ranges = tracker.shared_ranges()
    buf = bytearray(len(ranges) * RECORD_SIZE + 7)  # slack must be left alone
    result = tracker.export(buf)
    assert result.records_written == len(ranges)
    assert result.size_needed_bytes == len(ranges) * RECORD_SIZE
    assert result.complete and not result.poisoned
    assert decode_export(buf, result.records_written) == ranges
    assert buf[result.size_needed_bytes :] == bytes(7)


@pytest.mark.parametrize("kind", list(FACTORIES))
@FAST
@given(sequence=ops(), short=st.integers(1, RECORD_SIZE * 3))
def test_export_into_short_buffer_reports_size_and_writes_nothing(
    kind: str, sequence: list[Op], short: int
) -> None:
    """A buffer too small for the whole list is left untouched and the needed size reported."""
    tracker = FACTORIES[kind](GUEST_PAGES, 1 << 20)
    tracker.apply(sequence)
    needed = tracker.range_count() * RECORD_SIZE
    size = max(0, needed - short)
    buf = bytearray(b"\xa5" * size)
    result = tracker.export(buf)
    if needed == 0:
        assert result.complete  # nothing to write fits anywhere
        return
    assert result.records_written == 0
    assert result.size_needed_bytes == needed
    assert not result.complete
    assert buf == bytearray(b"\xa5" * size)


def test_export_layout_is_little_endian_base_and_count() -> None:
    """Each record is u64 base_gfn then u64 npages, little-endian, sorted by base."""
    tracker = make_tracker("ranges", guest_pages=1 << 40)
    tracker.set_shared(0x1F018, 1)
    tracker.set_shared(0x1D767, 0x100)
    buf = bytearray(64)
    result = tracker.export(memoryview(buf))
    assert result.records_written == 2
    assert bytes(buf[:32]) == struct.pack("<4Q", 0x1D767, 0x100, 0x1F018, 1)


def test_export_accepts_a_typed_memoryview() -> None:
    """A memoryview of u64s is written by bytes like any other buffer."""
    tracker = make_tracker("tree", guest_pages=GUEST_PAGES)
    tracker.set_shared(2, 3)
    words = memoryview(bytearray(16)).cast("Q")
    assert tracker.export(words).records_written == 1
    assert decode_export(words, 1) == [(2, 3)]


@pytest.mark.parametrize("kind", BOUNDED)
def test_export_of_poisoned_tracker_is_not_complete(kind: str) -> None:
    """A poisoned tracker exports its frozen records flagged poisoned and not complete."""
    tracker = FACTORIES[kind](GUEST_PAGES, 1)
    tracker.set_shared(0, 1)
    tracker.set_shared(2, 1)
    result = tracker.export(bytearray(64))
    assert result.poisoned and not result.complete
    assert result.records_written == 1


def test_export_into_read_only_buffer_is_a_usage_error() -> None:
    """A read-only buffer is refused with a UsageError, not a crash."""
    tracker = make_tracker("ranges", guest_pages=GUEST_PAGES)
    with pytest.raises(UsageError):
        tracker.export(memoryview(bytes(32)))


BAD_ARGS = [
    (-1, 1, "gfn"),
    (0, 0, "npages"),
    (0, -3, "npages"),
    (GUEST_PAGES, 1, "gfn+npages"),
    (GUEST_PAGES - 1, 2, "gfn+npages"),
    (1.5, 1, "gfn"),
    ("3", 1, "gfn"),
    (0, 2.0, "npages"),
]


@pytest.mark.parametrize("kind", list(FACTORIES))
@pytest.mark.parametrize(("gfn", "npages", "field"), BAD_ARGS)
@pytest.mark.parametrize("shared", [True, False])
def test_invalid_range_raises_naming_the_field(
    kind: str, gfn: int, npages: int, field: str, shared: bool
) -> None:
    """A conversion outside guest memory raises InvalidRangeError naming the field; nothing changes."""
    tracker = FACTORIES[kind](GUEST_PAGES, 16)
    tracker.set_shared(8, 4)
    for call in (tracker.convert, lambda g, n, s: tracker.apply([(g, n, s)])):
        with pytest.raises(InvalidRangeError) as info:
            call(gfn, npages, shared)
        assert info.value.field == field
        assert isinstance(info.value, TestbedError)
        assert field in str(info.value)
    assert tracker.shared_ranges() == [(8, 4)]


@pytest.mark.parametrize("kind", list(FACTORIES))
@pytest.mark.parametrize("gfn", [-1, GUEST_PAGES])
def test_is_shared_outside_guest_raises(kind: str, gfn: int) -> None:
    """is_shared refuses a GFN outside guest memory rather than answering."""
    with pytest.raises(InvalidRangeError):
        FACTORIES[kind](GUEST_PAGES, 16).is_shared(gfn)


def test_make_tracker_rejects_unknown_kind() -> None:
    """An unknown tracker kind is a UsageError listing the known ones."""
    with pytest.raises(UsageError, match="bitmap"):
        make_tracker("rbtree", guest_pages=16)
    assert DEFAULT_TRACKER in TRACKER_KINDS
    assert set(TRACKER_KINDS) == {"bitmap", "ranges", "tree"}


@pytest.mark.parametrize(("pages", "bound"), [(0, 1), (16, 0)])
def test_make_tracker_rejects_bad_sizes(pages: int, bound: int) -> None:
    """A zero-page guest or a zero bound is refused."""
    with pytest.raises(InvalidRangeError):
        make_tracker("ranges", guest_pages=pages, max_ranges=bound)


@pytest.mark.parametrize("kind", TRACKER_KINDS)
def test_hostile_guest_stays_under_memory_bound(kind: str) -> None:
    """Sharing every other page poisons the list and tree, and memory stays under the bound."""
    pages = 1 << 14
    tracker = make_tracker(kind, guest_pages=pages, max_ranges=512)
    tracker.apply([(gfn, 1, True) for gfn in range(0, pages, 2)])
    assert tracker.poisoned == (kind != "bitmap")
    assert tracker.memory_bytes() <= tracker.memory_bound_bytes()
    if kind != "bitmap":
        assert tracker.range_count() == 512
        assert tracker.memory_bound_bytes() < 512 * 1024


def test_tree_stays_balanced_and_bounded() -> None:
    """A fanout-4 tree keeps its invariants and logarithmic height through growth and shrinkage."""
    tracker = TreeTracker(1 << 12, 1 << 12, fanout=4)
    for gfn in range(0, 1 << 12, 2):
        tracker.set_shared(gfn, 1)
    tracker.check_invariants()
    assert tracker.range_count() == 1 << 11
    assert tracker.height <= 11  # fanout 4, >= 2 entries per node: log2(2048)
    assert tracker.memory_bytes() <= tracker.memory_bound_bytes()
    for gfn in range(0, 1 << 12, 4):
        tracker.set_private(gfn, 1)
    tracker.check_invariants()
    tracker.set_private(0, 1 << 12)
    tracker.check_invariants()
    assert tracker.height == 0 and tracker.shared_ranges() == []


@pytest.mark.parametrize("kind", ["ranges", "tree"])
def test_list_memory_does_not_depend_on_guest_size(kind: str) -> None:
    """The same conversions cost the list and the tree the same bytes in a 1 GiB and a 1 TiB guest."""
    sizes = []
    for pages in (1 << 18, 1 << 28):
        tracker = make_tracker(kind, guest_pages=pages)
        for i in range(40):
            tracker.set_shared(0x1000 + 64 * i, 1 + i % 5)
        sizes.append(tracker.memory_bytes())
    assert sizes[0] == sizes[1]
    assert sizes[0] < 16 * 1024
