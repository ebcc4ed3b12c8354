"""The host's shared-page tracker interface: what the VMM records about guest page state.

A confidential guest converts its pages between private (encrypted) and shared with
hypercalls (KVM_HC_MAP_GPA_RANGE, SEV's page_enc_status_hc, GHCB Page State Change, TDX
MapGPA). The host has to remember which pages are shared so that live migration can copy them
as plaintext and send the private ones through the firmware. Everything not recorded as shared
is private. Units are GFNs (4 KiB guest frame numbers) and page counts.

Three implementations sit behind `SharedTracker` (see testbed/tracker/__init__.py):
a bitmap (bounded by construction), a coalescing sorted list of ranges, and a B+tree of ranges.
The list and the tree grow with the number of *ranges*, which the guest controls, so they stop
at `max_ranges` records and become *poisoned* (the seed thread's "poison bit").

Poison semantics (ranges and tree; the bitmap never poisons):

* A conversion that would leave more than `max_ranges` records is not recorded, and sets
  `poisoned`. Poison is sticky until `clear()`.
* From then on the tracker is frozen: later conversions are still validated (bad arguments
  still raise) but change nothing. The records stay exactly the shared set as it was just
  before the first conversion that did not fit -- a stale snapshot, neither a subset nor a
  superset of the guest's current shared set (a dropped set_private leaves pages that are now
  private recorded as shared; a dropped set_shared misses pages).
* So a VMM that sees `poisoned` (in `ExportResult` too) cannot use the list for migration: it
  must treat all of guest memory as possibly shared and re-query the page state (e.g. from
  KVM's memory attributes), then `clear()` and reload. Freezing, rather than applying the
  conversions that still fit, keeps that statement simple and makes a hostile guest's later
  hypercalls cost O(1) each.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import ClassVar

from testbed.errors import TestbedError
from testbed.tracker.export import ExportResult, export_ranges

#: Records a list/tree tracker keeps before it poisons. The seeds count 15-20 static firmware
#: and MMIO ranges, one atomic DMA pool, a few DMA buffers in flight, and ~60 discontiguous
#: regions on a stock Ubuntu guest: 4096 is ~50x that, and bounds the export to 64 KiB.
DEFAULT_MAX_RANGES = 4096


#: One page-state conversion as the guest requests it: (gfn, npages, shared). A plain tuple,
#: not a NamedTuple: CPython unpacks exact tuples on a specialised fast path, and a tuple
#: subclass made the bitmap's batched loop ~35% slower.
Conversion = tuple[int, int, bool]


class InvalidRangeError(TestbedError):
    """A conversion outside guest memory or with a bad count; nothing was recorded.

    `field` names the offending argument ("gfn", "npages" or "gfn+npages"), `value` is its
    value and `limit` the bound it broke.
    """

    def __init__(self, field: str, value: object, limit: str) -> None:
        self.field = field
        self.value = value
        self.limit = limit
        shown = f"0x{value:x}" if isinstance(value, int) and not isinstance(value, bool) else repr(value)
        super().__init__(f"{field} = {shown}: {limit}")


class TrackerResizeError(TestbedError):
    """A tracker cannot follow guest memory to a new size (resize()); nothing changed."""


def check_range(gfn: object, npages: object, guest_pages: int) -> None:
    """Raise InvalidRangeError unless `npages` pages from `gfn` lie inside guest memory.

    The trackers inline the cheap form of this test on their hot paths and call here to
    report; it is also the full test (types included) for their slow paths.
    """
    # Ints only (bool included, as Python counts it): a float would sort among the ints of a
    # list tracker and then break its arithmetic and the export.
    if not isinstance(gfn, int):
        raise InvalidRangeError("gfn", gfn, "must be an int")
    if not isinstance(npages, int):
        raise InvalidRangeError("npages", npages, "must be an int")
    if gfn < 0:
        raise InvalidRangeError("gfn", gfn, "must be >= 0")
    if npages < 1:
        raise InvalidRangeError("npages", npages, "must be >= 1")
    if gfn + npages > guest_pages:
        raise InvalidRangeError("gfn+npages", gfn + npages, f"exceeds guest_pages = 0x{guest_pages:x}")


def int_bytes(values: Iterable[int], seen: set[int]) -> int:
    """sys.getsizeof of each distinct int object in `values` (by identity, via `seen`)."""
    total = 0
    for v in values:
        if id(v) not in seen:
            seen.add(id(v))
            total += sys.getsizeof(v)
    return total


class SharedTracker(ABC):
    """Which guest pages are shared; everything else is private.

    Mutators validate first (InvalidRangeError, nothing recorded) and are idempotent:
    sharing a shared page or making a private page private is a no-op.
    """

    name: ClassVar[str]

    def __init__(self, guest_pages: int, max_ranges: int) -> None:
        if type(guest_pages) is not int or guest_pages < 1:
            raise InvalidRangeError("guest_pages", guest_pages, "must be an int >= 1")
        if type(max_ranges) is not int or max_ranges < 1:
            raise InvalidRangeError("max_ranges", max_ranges, "must be an int >= 1")
        self._guest_pages = guest_pages
        self._max_ranges = max_ranges
        self._poisoned = False

    @property
    def guest_pages(self) -> int:
        """Guest memory size in pages; every GFN is below it."""
        return self._guest_pages

    @property
    def max_ranges(self) -> int:
        """The record bound (the bitmap's bound is its size; it keeps this for uniformity)."""
        return self._max_ranges

    @property
    def poisoned(self) -> bool:
        """True once a conversion was dropped: the records are a stale snapshot (module doc)."""
        return self._poisoned

    @abstractmethod
    def set_shared(self, gfn: int, npages: int) -> None:
        """Record `npages` pages from `gfn` as shared."""

    @abstractmethod
    def set_private(self, gfn: int, npages: int) -> None:
        """Record `npages` pages from `gfn` as private."""

    @abstractmethod
    def is_shared(self, gfn: int) -> bool:
        """Whether page `gfn` is recorded as shared (InvalidRangeError outside guest memory)."""

    @abstractmethod
    def shared_ranges(self) -> list[tuple[int, int]]:
        """The shared pages as [(gfn, npages)], sorted, adjacent and overlapping ranges merged."""

    @abstractmethod
    def range_count(self) -> int:
        """len(shared_ranges()), cheaper."""

    @abstractmethod
    def memory_bytes(self) -> int:
        """Bytes this structure occupies now: containers, nodes, buffers and int objects."""

    @abstractmethod
    def memory_bound_bytes(self) -> int:
        """An upper bound on memory_bytes() whatever the guest does (the hostile-guest bound)."""

    @abstractmethod
    def clear(self) -> None:
        """Forget every shared page and the poison (the VMM reloads after a re-query)."""

    def resize(self, guest_pages: int) -> None:
        """Guest memory grew to `guest_pages` pages (memory hotplug, vmm/hotplug.py): raise the
        bound, keeping every record. TrackerResizeError if this structure cannot grow, or for a
        size below the current one (hot-unplug is not modelled); nothing changes then."""
        if type(guest_pages) is not int or guest_pages < self._guest_pages:
            raise TrackerResizeError(
                f"{self.name} tracker: guest_pages = {guest_pages!r}: must be an int >= the current "
                f"0x{self._guest_pages:x} (memory only grows)")
        if guest_pages != self._guest_pages:
            self._grow(guest_pages)

    def _grow(self, guest_pages: int) -> None:
        """resize()'s work, `guest_pages` > the current size; the default cannot grow."""
        raise TrackerResizeError(f"the {self.name} tracker cannot grow with guest memory")

    def convert(self, gfn: int, npages: int, shared: bool) -> None:
        """set_shared or set_private, chosen by `shared`."""
        if shared:
            self.set_shared(gfn, npages)
        else:
            self.set_private(gfn, npages)

    def apply(self, conversions: Iterable[tuple[int, int, bool]]) -> int:
        """Apply (gfn, npages, shared) conversions in order; return how many were applied.

        This is the batched path (a GHCB Page State Change request carries up to 253 entries, a
        replayed log thousands): implementations override it with a loop that avoids a Python
        call per conversion. On an invalid conversion it raises InvalidRangeError; the ones
        before it are applied, as a PSC request stops at its first bad entry.
        """
        n = 0
        for gfn, npages, shared in conversions:
            self.convert(gfn, npages, shared)
            n += 1
        return n

    def export(self, buf: bytearray | memoryview) -> ExportResult:
        """Serialise the shared ranges into `buf` (format and too-small rule: tracker/export.py)."""
        return export_ranges(self.shared_ranges(), buf, poisoned=self._poisoned)

    def _reject(self, gfn: object, npages: object) -> None:
        """Raise the InvalidRangeError that the inlined hot-path test detected."""
        check_range(gfn, npages, self._guest_pages)
        # The inlined test is stricter than nothing only in type; be loud if they ever differ.
        raise AssertionError(f"hot-path check rejected a valid range gfn={gfn!r} npages={npages!r}")

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} guest_pages=0x{self._guest_pages:x} ranges={self.range_count()}"
            f"{' poisoned' if self._poisoned else ''}>"
        )
