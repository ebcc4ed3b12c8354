"""The VMM's side of the seed-era page-encryption bitmap.

With KVM_HC_PAGE_ENC_STATUS the guest's conversions never leave the kernel: KVM keeps the
bitmap (kvm/page_enc.py) and userspace fetches it with KVM_GET_PAGE_ENC_BITMAP when it needs
the shared pages (at migration in the series; here, for the report). `PageEncBitmapSource`
does that fetch and builds the VMM's own tracker from it: shared = a clear bit.
"""

from __future__ import annotations

from collections.abc import Callable

from bitarray import bitarray

from testbed.tracker import SharedTracker
from testbed.tracker.bitmap import bit_runs


class PageEncBitmapSource:
    """The shared pages as KVM's page-encryption bitmap has them: each `shared_ranges()`
    calls `get_bitmap(0, guest_pages)` (KVM_GET_PAGE_ENC_BITMAP) and rebuilds `tracker`
    (the VMM's tracker kind, emptied first) from the clear bits."""

    def __init__(self, get_bitmap: Callable[[int, int], bytes], guest_pages: int, tracker: SharedTracker) -> None:
        self._get_bitmap = get_bitmap
        self.guest_pages = guest_pages
        self.tracker = tracker

    def sync(self) -> SharedTracker:
        """Fetch the bitmap and rebuild the tracker from it; returns the tracker."""
        bits = bitarray(endian="little")
        bits.frombytes(self._get_bitmap(0, self.guest_pages))
        del bits[self.guest_pages:]
        tracker = self.tracker
        tracker.clear()
        bits.invert()  # the bitmap's set bits are the encrypted pages
        for gfn, npages in bit_runs(bits):
            tracker.set_shared(gfn, npages)
        return tracker

    def shared_ranges(self) -> list[tuple[int, int]]:
        """The shared pages as merged (gfn, npages) ranges, fetched from KVM now."""
        return self.sync().shared_ranges()

    @property
    def poisoned(self) -> bool:
        """Whether the tracker overflowed its bound when last rebuilt."""
        return self.tracker.poisoned
