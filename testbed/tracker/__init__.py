"""Host-side trackers of which guest pages are shared, behind one interface.

The VMM's MAP_GPA_RANGE handler records every conversion here, and live migration exports the
result. Three structures, compared in tools/bench_trackers.py:

* bitmap -- guest_pages / 8 bytes (2 MiB per 64 GiB guest, 32 MiB per 1 TiB); bounded by its
  fixed size, never poisons. The fastest per conversion.
* ranges -- ~75 bytes per shared range (2 KB under DMA churn, whatever the guest size); at most
  max_ranges records (~300 KB at the default 4096), then poisoned.
* tree -- ~80 bytes per shared range; bounded and poisoned like ranges (~1 MB bound at 4096).
  Slower than the list on short lists, faster when a hostile guest fills it to the bound.
* donated -- the guest keeps its shared ranges in memory it shares with the host and donates
  with a hypercall (tracker/donated.py); the host keeps only a validated snapshot, bounded by
  the donation (at most max_ranges records), and poisons on any invalid structure.

`DEFAULT_TRACKER` is "ranges": on the seed workloads (a boot's ~20 static ranges plus DMA
pages flipped back and forth) it is the fastest of the bounded structures and uses a few KB
whatever the guest size. The tree keeps O(log n) updates at the bound; the bitmap is the
fastest per conversion but costs memory with the guest's size.
"""

from __future__ import annotations

from testbed.errors import UsageError
from testbed.tracker.base import (
    DEFAULT_MAX_RANGES,
    Conversion,
    InvalidRangeError,
    SharedTracker,
    TrackerResizeError,
    check_range,
)
from testbed.tracker.bitmap import BitmapTracker
from testbed.tracker.donated import DonatedTracker
from testbed.tracker.export import RECORD, RECORD_SIZE, ExportResult, decode_export, export_ranges
from testbed.tracker.ranges import RangesTracker
from testbed.tracker.tree import TreeTracker

_KINDS: dict[str, type[SharedTracker]] = {
    BitmapTracker.name: BitmapTracker,
    RangesTracker.name: RangesTracker,
    TreeTracker.name: TreeTracker,
    DonatedTracker.name: DonatedTracker,
}

#: The host-side structures (bitmap, ranges, tree): what the replay and the benchmarks compare.
TRACKER_KINDS: tuple[str, ...] = tuple(k for k in _KINDS if k != DonatedTracker.name)
#: What a VM can run with (`--tracker` of run, golden, matrix, migrate): the host-side structures
#: and "donated", whose structure lives in the guest (it needs a running guest, so the replay of
#: a kernel log and the structure benchmarks leave it out).
VM_TRACKER_KINDS: tuple[str, ...] = tuple(_KINDS)
DEFAULT_TRACKER = RangesTracker.name

# The same structures in C (tracker/native.py), only when the optional extension is built. They
# are kept out of TRACKER_KINDS (the CLI's choices and the Python benchmark's set): make_tracker
# takes them by name.
_NATIVE_KINDS: dict[str, type[SharedTracker]] = {}
try:
    from testbed.tracker.native import NativeBitmapTracker, NativeRangesTracker, NativeTreeTracker
except ImportError:  # the extension is not built: the Python trackers serve alone
    pass
else:
    _NATIVE_KINDS = {
        cls.name: cls for cls in (NativeBitmapTracker, NativeRangesTracker, NativeTreeTracker)
    }

#: "native-bitmap", "native-ranges" and "native-tree" when testbed/tracker/_native.c is built, else empty.
NATIVE_TRACKER_KINDS: tuple[str, ...] = tuple(_NATIVE_KINDS)


def make_tracker(kind: str, *, guest_pages: int, max_ranges: int = DEFAULT_MAX_RANGES) -> SharedTracker:
    """A new, empty tracker of `kind` (VM_TRACKER_KINDS or NATIVE_TRACKER_KINDS) for `guest_pages` pages."""
    cls = _KINDS.get(kind) or _NATIVE_KINDS.get(kind)
    if cls is None:
        known = ", ".join((*VM_TRACKER_KINDS, *NATIVE_TRACKER_KINDS))
        raise UsageError(f"unknown tracker kind {kind!r}: expected one of {known}")
    return cls(guest_pages, max_ranges)


__all__ = [
    "DEFAULT_MAX_RANGES",
    "DEFAULT_TRACKER",
    "NATIVE_TRACKER_KINDS",
    "RECORD",
    "RECORD_SIZE",
    "TRACKER_KINDS",
    "VM_TRACKER_KINDS",
    "BitmapTracker",
    "Conversion",
    "DonatedTracker",
    "ExportResult",
    "InvalidRangeError",
    "RangesTracker",
    "SharedTracker",
    "TrackerResizeError",
    "TreeTracker",
    "check_range",
    "decode_export",
    "export_ranges",
    "make_tracker",
]
