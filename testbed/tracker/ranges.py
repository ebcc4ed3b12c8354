"""The ranges tracker: a sorted, coalescing list of shared ranges (the seed's "list" proposal).

Shared memory is a few contiguous ranges (15-20 static firmware/MMIO ranges, the DMA pools) and
a handful of single DMA pages flipped back and forth, so the list stays short: a conversion is
two bisects and at most one insert or delete in a list of tens of entries -- memmove of a few
hundred bytes, cheaper than rebalancing a tree (the thread's argument against an rbtree). The
memory follows the number of ranges, not the guest size, which is why the list is bounded by
`max_ranges` and poisons past it (semantics: tracker/base.py).

Representation: two parallel lists, `starts[i]` and `ends[i]` (exclusive), sorted, disjoint and
never adjacent (adjacent ranges are merged on insert). Parallel lists of ints rather than a
list of tuples: bisect runs in C over the ints directly, and an update rewrites one int instead
of building a tuple. Both lists end with a sentinel range [guest_pages + 1, guest_pages + 1)
that lies beyond every GFN and never touches a real range, so no search result needs a
bounds test -- one len() call less per conversion, ~10% of the single-page path.
"""

from __future__ import annotations

import sys
from bisect import bisect_left, bisect_right
from collections.abc import Iterable

from testbed.tracker.base import DEFAULT_MAX_RANGES, SharedTracker, check_range, int_bytes


class RangesTracker(SharedTracker):
    """Shared ranges as sorted parallel lists of starts and exclusive ends."""

    name = "ranges"

    def __init__(self, guest_pages: int, max_ranges: int = DEFAULT_MAX_RANGES) -> None:
        super().__init__(guest_pages, max_ranges)
        self._sentinel = guest_pages + 1
        self._starts: list[int] = [self._sentinel]
        self._ends: list[int] = [self._sentinel]

    # -- mutators ---------------------------------------------------------------------------
    # Each mutator tests the single-page case inline first (DMA churn is almost all single
    # pages) and falls back to the general code, which also does the full validation.

    def set_shared(self, gfn: int, npages: int) -> None:
        if type(gfn) is not int or npages != 1 or not 0 <= gfn < self._guest_pages or self._poisoned:
            self._set_shared_any(gfn, npages)
            return
        starts = self._starts
        ends = self._ends
        i = bisect_left(ends, gfn)  # first range ending at or after gfn: touches it or lies right
        s = starts[i]
        if s <= gfn:
            if ends[i] == gfn:
                # Adjacent on the left: grow it, and swallow the next range if that now touches.
                j = i + 1
                if starts[j] == gfn + 1:
                    ends[i] = ends[j]
                    del starts[j]
                    del ends[j]
                else:
                    ends[i] = gfn + 1
            return  # (or already shared)
        if s == gfn + 1:
            starts[i] = gfn  # adjacent on the right
            return
        if len(starts) > self._max_ranges:  # the sentinel is not a record
            self._poisoned = True
            return
        starts.insert(i, gfn)
        ends.insert(i, gfn + 1)

    def set_private(self, gfn: int, npages: int) -> None:
        if type(gfn) is not int or npages != 1 or not 0 <= gfn < self._guest_pages or self._poisoned:
            self._set_private_any(gfn, npages)
            return
        starts = self._starts
        ends = self._ends
        i = bisect_right(ends, gfn)  # first range ending after gfn: the only one that can hold it
        s = starts[i]
        if s > gfn:
            return  # already private
        e = ends[i]
        if s == gfn:
            if e == gfn + 1:
                del starts[i]
                del ends[i]
            else:
                starts[i] = gfn + 1
        elif e == gfn + 1:
            ends[i] = gfn
        else:
            # Punching a hole splits one range into two: the only way set_private grows the list.
            if len(starts) > self._max_ranges:
                self._poisoned = True
                return
            ends[i] = gfn
            starts.insert(i + 1, gfn + 1)
            ends.insert(i + 1, e)

    def apply(self, conversions: Iterable[tuple[int, int, bool]]) -> int:
        # The two single-page paths above, inlined: a Python call costs about as much as the
        # work, and a PSC request or a replayed log arrives as a batch. Bound methods and
        # gfn + 1 are hoisted into locals (~7% of the loop). Anything else goes through the
        # general paths; once poisoned, the rest are only validated, by convert().
        ops = conversions if isinstance(conversions, list | tuple) else list(conversions)
        it = iter(ops)
        if not self._poisoned:
            starts = self._starts
            ends = self._ends
            insert_start = starts.insert
            insert_end = ends.insert
            find_end = bisect_left
            find_after = bisect_right
            limit = self._guest_pages
            cap = self._max_ranges
            for gfn, npages, shared in it:
                if type(gfn) is not int or npages != 1 or not 0 <= gfn < limit:
                    if shared:
                        self._set_shared_any(gfn, npages)
                    else:
                        self._set_private_any(gfn, npages)
                    if self._poisoned:
                        break
                    continue
                nxt = gfn + 1
                if shared:
                    i = find_end(ends, gfn)
                    s = starts[i]
                    if s <= gfn:
                        if ends[i] == gfn:
                            j = i + 1
                            if starts[j] == nxt:
                                ends[i] = ends[j]
                                del starts[j]
                                del ends[j]
                            else:
                                ends[i] = nxt
                        continue
                    if s == nxt:
                        starts[i] = gfn
                        continue
                    if len(starts) > cap:
                        self._poisoned = True
                        break
                    insert_start(i, gfn)
                    insert_end(i, nxt)
                else:
                    i = find_after(ends, gfn)
                    s = starts[i]
                    if s > gfn:
                        continue
                    e = ends[i]
                    if s == gfn:
                        if e == nxt:
                            del starts[i]
                            del ends[i]
                        else:
                            starts[i] = nxt
                    elif e == nxt:
                        ends[i] = gfn
                    else:
                        if len(starts) > cap:
                            self._poisoned = True
                            break
                        ends[i] = gfn
                        insert_start(i + 1, nxt)
                        insert_end(i + 1, e)
        for gfn, npages, shared in it:
            self.convert(gfn, npages, shared)
        return len(ops)

    def _set_shared_any(self, gfn: int, npages: int) -> None:
        """set_shared for any valid range: merge every range touching [gfn, gfn+npages]."""
        check_range(gfn, npages, self._guest_pages)
        if self._poisoned:
            return
        starts = self._starts
        ends = self._ends
        end = gfn + npages
        i = bisect_left(ends, gfn)  # first range with end >= gfn
        j = bisect_right(starts, end, i)  # first range with start > end (the sentinel at worst)
        if i == j:
            if len(starts) > self._max_ranges:
                self._poisoned = True
                return
            starts.insert(i, gfn)
            ends.insert(i, end)
            return
        # Ranges i..j-1 overlap or touch the new one: they become one record at i.
        starts[i] = min(starts[i], gfn)
        last = ends[j - 1]
        ends[i] = last if last > end else end
        if j - i > 1:
            del starts[i + 1 : j]
            del ends[i + 1 : j]

    def _set_private_any(self, gfn: int, npages: int) -> None:
        """set_private for any valid range: trim, split or drop every range overlapping it."""
        check_range(gfn, npages, self._guest_pages)
        if self._poisoned:
            return
        starts = self._starts
        ends = self._ends
        end = gfn + npages
        i = bisect_right(ends, gfn)  # first range with end > gfn
        j = bisect_left(starts, end, i)  # first range with start >= end (the sentinel at worst)
        if i == j:
            return
        first = starts[i]
        last = ends[j - 1]
        if first < gfn and last > end:
            if j - i == 1:
                if len(starts) > self._max_ranges:
                    self._poisoned = True
                    return
                ends[i] = gfn
                starts.insert(i + 1, end)
                ends.insert(i + 1, last)
                return
            # Keep the head of range i and the tail of range j-1; drop the ones between.
            ends[i] = gfn
            starts[j - 1] = end
            del starts[i + 1 : j - 1]
            del ends[i + 1 : j - 1]
        elif first < gfn:
            ends[i] = gfn
            del starts[i + 1 : j]
            del ends[i + 1 : j]
        elif last > end:
            starts[j - 1] = end
            del starts[i : j - 1]
            del ends[i : j - 1]
        else:
            del starts[i:j]
            del ends[i:j]

    # -- queries ----------------------------------------------------------------------------

    def is_shared(self, gfn: int) -> bool:
        if type(gfn) is not int or not 0 <= gfn < self._guest_pages:
            self._reject(gfn, 1)
        i = bisect_right(self._starts, gfn) - 1
        return i >= 0 and self._ends[i] > gfn

    def shared_ranges(self) -> list[tuple[int, int]]:
        return [(s, e - s) for s, e in zip(self._starts[:-1], self._ends[:-1], strict=True)]

    def range_count(self) -> int:
        return len(self._starts) - 1

    def memory_bytes(self) -> int:
        seen: set[int] = set()
        return (
            sys.getsizeof(self._starts)
            + sys.getsizeof(self._ends)
            + int_bytes(self._starts, seen)
            + int_bytes(self._ends, seen)
        )

    def memory_bound_bytes(self) -> int:
        # A list never holds more than max_ranges + 1 items (the count is checked before every
        # insert; +1 is the sentinel), and CPython over-allocates a growing list to at most
        # n + n/8 + 6 slots. The largest int stored is the sentinel, and int size grows with
        # magnitude.
        items = self._max_ranges + 1
        per_list = sys.getsizeof([]) + 8 * (items + (items >> 3) + 8)
        return 2 * per_list + 2 * items * sys.getsizeof(self._sentinel)

    def clear(self) -> None:
        self._starts = [self._sentinel]
        self._ends = [self._sentinel]
        self._poisoned = False

    def _grow(self, guest_pages: int) -> None:
        # Memory hotplug: only the bound and the sentinel beyond it move; the records stay.
        self._guest_pages = guest_pages
        self._sentinel = guest_pages + 1
        self._starts[-1] = self._sentinel
        self._ends[-1] = self._sentinel
