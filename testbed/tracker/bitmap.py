"""The bitmap tracker: one bit per guest page, as the original SEV live-migration series kept.

Its size is fixed by guest memory (guest_pages / 8 bytes: 2 MiB for 64 GiB, 32 MiB for 1 TiB),
so it is bounded by construction -- the series' v9 sized it from the memslots, never from the
hypercalls (v6 still grew it from the hypercall) -- and it never poisons. It maps onto
KVM/QEMU's dirty-bitmap sync (the seed's VMM loop: "re-sync the page encryption bitmap, XOR it
to the last synced bitmap, and then re-transfer any modified pages accordingly"), and a
conversion is one bit store; the price is memory proportional to the guest and an export that
scans the whole map.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator

from bitarray import bitarray

from testbed.tracker.base import DEFAULT_MAX_RANGES, SharedTracker, check_range


def bit_runs(bits: bitarray) -> Iterator[tuple[int, int]]:
    """The runs of set bits of `bits` as (first, count), in order. bitarray.find scans in C a
    machine word at a time, so a run costs two calls however long the gap before it: ~10 ms
    over a 1 TiB guest's 32 MiB."""
    end = len(bits)
    start = bits.find(1)
    while start >= 0:
        stop = bits.find(0, start)
        if stop < 0:
            stop = end
        yield start, stop - start
        start = bits.find(1, stop) if stop < end else -1


class BitmapTracker(SharedTracker):
    """A bitarray with bit `gfn` set while page `gfn` is shared."""

    name = "bitmap"

    def __init__(self, guest_pages: int, max_ranges: int = DEFAULT_MAX_RANGES) -> None:
        super().__init__(guest_pages, max_ranges)
        self._bits = bitarray(guest_pages)
        self._bits.setall(0)

    # The hot paths test `0 <= gfn` themselves: bitarray would wrap a negative index. A gfn
    # past the end or of the wrong type bitarray refuses before storing anything; the general
    # path tests them anyway so that the error names the field.

    def set_shared(self, gfn: int, npages: int) -> None:
        if isinstance(gfn, int) and npages == 1 and 0 <= gfn < self._guest_pages:
            self._bits[gfn] = 1
        else:
            self._store_span(gfn, npages, 1)

    def set_private(self, gfn: int, npages: int) -> None:
        if isinstance(gfn, int) and npages == 1 and 0 <= gfn < self._guest_pages:
            self._bits[gfn] = 0
        else:
            self._store_span(gfn, npages, 0)

    def convert(self, gfn: int, npages: int, shared: bool) -> None:
        if isinstance(gfn, int) and npages == 1 and 0 <= gfn < self._guest_pages:
            self._bits[gfn] = bool(shared)
        else:
            self._store_span(gfn, npages, bool(shared))

    def _store_span(self, gfn: int, npages: int, value: bool | int) -> None:
        check_range(gfn, npages, self._guest_pages)
        self._bits[gfn : gfn + npages] = value

    def apply(self, conversions: Iterable[tuple[int, int, bool]]) -> int:
        # A list is walked as is; anything else is materialised once so the count is its
        # length: counting inside the loop (enumerate) costs a third of the fast path.
        ops = conversions if isinstance(conversions, list | tuple) else list(conversions)
        bits = self._bits
        limit = self._guest_pages
        gfn: object = None
        npages: object = None
        try:
            for gfn, npages, shared in ops:
                # No type test here (it costs a third of the loop): a non-int gfn either fails
                # the comparison or makes bitarray refuse the index, with TypeError, before
                # anything is stored.
                if npages == 1 and 0 <= gfn < limit:
                    bits[gfn] = bool(shared)
                else:
                    self.convert(gfn, npages, shared)
        except TypeError:
            check_range(gfn, npages, limit)  # names the field
            raise
        return len(ops)

    def is_shared(self, gfn: int) -> bool:
        if isinstance(gfn, int) and 0 <= gfn < self._guest_pages:
            return self._bits[gfn] == 1
        check_range(gfn, 1, self._guest_pages)
        raise AssertionError("not reached")

    def _runs(self) -> Iterable[tuple[int, int]]:
        return bit_runs(self._bits)

    def shared_ranges(self) -> list[tuple[int, int]]:
        return list(self._runs())

    def range_count(self) -> int:
        return sum(1 for _ in self._runs())

    def shared_pages(self) -> int:
        """How many pages are shared (a popcount)."""
        return int(self._bits.count(1))

    def memory_bytes(self) -> int:
        # bitarray's __sizeof__ includes its buffer.
        return sys.getsizeof(self._bits)

    def memory_bound_bytes(self) -> int:
        return sys.getsizeof(self._bits)

    def clear(self) -> None:
        self._bits.setall(0)
        self._poisoned = False

    def _snapshot_save(self) -> bitarray:
        """testbed/snapshot.py: the bits, which the snapshot's walk does not enter (a bitarray is
        a C buffer, not a container it knows)."""
        return self._bits.copy()

    def _snapshot_restore(self, bits: bitarray) -> None:
        """Put the bits `_snapshot_save` returned back, in place (the same bitarray object)."""
        self._bits[:] = bits

    def _grow(self, guest_pages: int) -> None:
        # Memory hotplug: the map reallocates to the new size (new pages private), as the
        # series' bitmap was resized from the memslots (it never sized itself from hypercalls).
        self._bits.extend(bitarray(guest_pages - self._guest_pages))
        self._bits[self._guest_pages :] = 0
        self._guest_pages = guest_pages
