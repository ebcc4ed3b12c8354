"""The trackers in C (testbed/tracker/_native.c) behind the SharedTracker interface.

Issue 13 §2: Python timings compare interpreters, not data structures, so the structures also
exist as a kernel would write them -- a word bitmap; a sorted array of ranges with a finger
search and merge; an AVL interval tree augmented with each subtree's largest end (the kernel's
interval-tree walk finds the records a conversion touches); the last two bounded by
`max_ranges` and poisoned past it -- with the Python trackers (bitmap.py, ranges.py, tree.py) as
their reference models; tests/test_tracker_native.py proves each equal to its model on random
operation sequences, the bound and the poison included.

The extension is optional (setup.py builds it with optional=True): importing this module raises
ImportError without it, and testbed.tracker then offers no "native-*" kinds.

The C side does the cheap range test and raises a bare ValueError/TypeError/OverflowError; the
wrapper turns that into the InvalidRangeError that names the field, as the Python trackers
raise it. One deliberate difference from the reference models: the C side takes only ints,
where the Python trackers' single-page fast paths let `npages=1.0` through.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

from testbed.tracker import _native
from testbed.tracker.base import DEFAULT_MAX_RANGES, InvalidRangeError, SharedTracker, TrackerResizeError
from testbed.tracker.export import RECORD_SIZE, ExportResult, _writable_bytes

#: The C structures index pages with u64 arithmetic; a guest is at most 2**52 pages (MAXPHYADDR 64).
MAX_GUEST_PAGES = 1 << 52
#: The C tree links its nodes by u32 index (node 0 is "none"): at most this many records.
MAX_TREE_RANGES = 0x7FFF_FFFE

_BAD = (TypeError, ValueError, OverflowError)


class _NativeTracker(SharedTracker):
    """What both native trackers share: validation, batching and export around a C object."""

    _c: _native.Bitmap | _native.Ranges | _native.Tree

    def __init__(self, guest_pages: int, max_ranges: int) -> None:
        super().__init__(guest_pages, max_ranges)
        if guest_pages > MAX_GUEST_PAGES:
            raise InvalidRangeError("guest_pages", guest_pages, f"must be <= 0x{MAX_GUEST_PAGES:x} for {self.name}")

    def _grow(self, guest_pages: int) -> None:
        # Memory hotplug: the C bitmap reallocates (new pages private), the list and the tree
        # only raise their bound; the records stay (as the Python models' _grow).
        if guest_pages > MAX_GUEST_PAGES:
            raise TrackerResizeError(f"{self.name} tracker: guest_pages = 0x{guest_pages:x}: must be <= "
                                     f"0x{MAX_GUEST_PAGES:x}")
        self._c.grow(guest_pages)
        self._guest_pages = guest_pages

    def set_shared(self, gfn: int, npages: int) -> None:
        try:
            self._c.set_shared(gfn, npages)
        except _BAD:
            self._reject(gfn, npages)

    def set_private(self, gfn: int, npages: int) -> None:
        try:
            self._c.set_private(gfn, npages)
        except _BAD:
            self._reject(gfn, npages)

    def convert(self, gfn: int, npages: int, shared: bool) -> None:
        try:
            if shared:
                self._c.set_shared(gfn, npages)
            else:
                self._c.set_private(gfn, npages)
        except _BAD:
            self._reject(gfn, npages)

    def apply(self, conversions: Iterable[tuple[int, int, bool]]) -> int:
        ops: Sequence[tuple[int, int, bool]] = (
            conversions if isinstance(conversions, list | tuple) else list(conversions)
        )
        done = self._c.apply(ops)
        while done < len(ops):
            # C stopped at an entry it does not take (invalid, or not an exact 3-tuple): the
            # general path raises for the invalid one, applies anything else, and C resumes.
            gfn, npages, shared = ops[done]
            self.convert(gfn, npages, shared)
            done += 1
            rest = ops[done:]
            done += self._c.apply(rest)
        return len(ops)

    def is_shared(self, gfn: int) -> bool:
        try:
            return self._c.is_shared(gfn)
        except _BAD:
            self._reject(gfn, 1)
            raise

    def shared_ranges(self) -> list[tuple[int, int]]:
        return self._c.ranges()

    def range_count(self) -> int:
        return self._c.range_count()

    def export(self, buf: bytearray | memoryview) -> ExportResult:
        view = _writable_bytes(buf)
        records = self._c.export(view)
        needed = records * RECORD_SIZE
        poisoned = self.poisoned
        if needed > len(view):
            return ExportResult(0, needed, poisoned, complete=False)
        return ExportResult(records, needed, poisoned, complete=not poisoned)

    def memory_bytes(self) -> int:
        return sys.getsizeof(self._c)

    def clear(self) -> None:
        self._c.clear()
        self._poisoned = False

    def _snapshot_save(self) -> list[tuple[int, int]] | None:
        """testbed/snapshot.py: the C object's state, which the snapshot's walk cannot see - its
        shared ranges; None when poisoned (a poison cannot be replayed into the C object)."""
        return None if self.poisoned else self._c.ranges()

    def _snapshot_restore(self, ranges: list[tuple[int, int]]) -> None:
        """Put the shared ranges `_snapshot_save` returned back into the C object."""
        self._c.clear()
        for gfn, npages in ranges:
            self._c.set_shared(gfn, npages)


class NativeBitmapTracker(_NativeTracker):
    """One bit per page in u64 words (C); the reference model is BitmapTracker. Never poisons."""

    name = "native-bitmap"
    _c: _native.Bitmap

    def __init__(self, guest_pages: int, max_ranges: int = DEFAULT_MAX_RANGES) -> None:
        super().__init__(guest_pages, max_ranges)
        self._c = _native.Bitmap(guest_pages)

    def shared_pages(self) -> int:
        """How many pages are shared (a popcount)."""
        return self._c.shared_pages()

    def memory_bound_bytes(self) -> int:
        return sys.getsizeof(self._c)


class _BoundedNativeTracker(_NativeTracker):
    """What the list and the tree share: the poison lives in C, and the bound is max_ranges records."""

    _c: _native.Ranges | _native.Tree

    @property
    def poisoned(self) -> bool:
        return self._c.poisoned

    def memory_bound_bytes(self) -> int:
        return self._c.bound_bytes() + (sys.getsizeof(self._c) - self._c.__sizeof__())

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} guest_pages=0x{self.guest_pages:x} ranges={self.range_count()}"
            f"{' poisoned' if self.poisoned else ''}>"
        )


class NativeRangesTracker(_BoundedNativeTracker):
    """A sorted array of {start, end} records (C), bounded and poisoned; reference: RangesTracker."""

    name = "native-ranges"
    _c: _native.Ranges

    def __init__(self, guest_pages: int, max_ranges: int = DEFAULT_MAX_RANGES) -> None:
        super().__init__(guest_pages, max_ranges)
        self._c = _native.Ranges(guest_pages, max_ranges)


class NativeTreeTracker(_BoundedNativeTracker):
    """An AVL interval tree of shared ranges (C), augmented with subtree max-end, bounded and
    poisoned; reference: TreeTracker (a B+tree: the same records, bound and poison)."""

    name = "native-tree"
    _c: _native.Tree

    def __init__(self, guest_pages: int, max_ranges: int = DEFAULT_MAX_RANGES) -> None:
        super().__init__(guest_pages, max_ranges)
        if max_ranges > MAX_TREE_RANGES:
            raise InvalidRangeError("max_ranges", max_ranges, f"must be <= 0x{MAX_TREE_RANGES:x} for {self.name}")
        self._c = _native.Tree(guest_pages, max_ranges)

    @property
    def height(self) -> int:
        """Levels of the AVL tree (0 when empty)."""
        return self._c.height

    def check_invariants(self) -> None:
        """Assert the tree's invariants (order, AVL balance, the max-end augmentation, the count)."""
        self._c.check()


__all__ = ["MAX_GUEST_PAGES", "MAX_TREE_RANGES", "NativeBitmapTracker", "NativeRangesTracker", "NativeTreeTracker"]
