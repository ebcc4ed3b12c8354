"""The donated tracker: the guest keeps its encryption status in memory it shares with the host.

The seed thread's other proposal ("Do you think that it's the guest that should 'donate'
memory for the bitmap instead?"): the host keeps nothing per conversion; the guest maintains a
structure in pages it has made shared and tells the host where it is with a hypercall
(KVM_HC_TESTBED_DONATE_ENC_STATUS, a testbed extension: kvm/uapi.py). The host reads it when
it needs the shared set (each query, each export) and trusts nothing in it.

The structure (little-endian; guests/lib/donate.s writes it)::

    struct enc_status {                 /* at the donated GPA, page aligned               */
            __u32 magic;                /* ENC_STATUS_MAGIC, "ENCS"                       */
            __u32 version;              /* ENC_STATUS_VERSION                             */
            __u64 generation;           /* odd while the guest is updating (a seqlock)    */
            __u32 count;                /* records in use                                 */
            __u32 capacity;             /* records the donated size holds                 */
            __u64 host_request;         /* written by the host: bytes it asks the guest   */
                                        /* to donate (0: none); see resize()              */
            struct { __u64 gfn, npages; } records[capacity];   /* the shared ranges       */
    };

Bounded by construction: the donated size is page aligned and at most `max_donation_bytes`
(the host's own record bound, `max_ranges`, in this format), the header must say
`32 + capacity * 16 <= size`, `count <= capacity` and `count <= max_ranges` (the page rounding
leaves room for a few more records than the bound) before a record is read, so the host never
reads past the donated size whatever the guest writes, its work per read is bounded too, and
its snapshot never holds more than `max_ranges` records (`memory_bound_bytes`).

Validated on every read: magic and version; capacity and count as above; every record
`npages >= 1`, inside guest memory, sorted by gfn and not overlapping the previous one
(adjacent records are merged, as the export wants them); the donated pages still shared.
A read that fails makes the tracker *invalid* with the reason (`reason`): `poisoned` is True
and stays so until `clear()` or a new donation, `shared_ranges()` is the last valid snapshot
(stale, as a poisoned list tracker's is: tracker/base.py), and a migration falls back to a
full status resync. An odd generation is not an error: the guest is between the conversion
it asked for and the update of its structure (guests/lib/donate.s brackets both), so that one
read is incomplete (`poisoned` for that read) and the next one may succeed. A guest that never ends its update
only makes every read incomplete: the migration resyncs fully each round, which is safe.

The host cannot check that the records are *true* (that a page the guest lists as private is
not shared): a guest that lies about its own pages harms only itself (a private page copied
raw is ciphertext on the target; a shared page sent through the firmware arrives private), as
with the hypercall model, where the guest can equally fail to report a conversion. KVM's
memory attributes stay authoritative for KVM itself.

set_shared/set_private record nothing: the VMM still validates every MAP_GPA_RANGE (the
attributes it sets are KVM's), but the structure is the guest's.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from testbed.errors import TestbedError
from testbed.tracker.base import DEFAULT_MAX_RANGES, SharedTracker, check_range
from testbed.tracker.export import ExportResult, export_ranges
from testbed.x86 import PAGE_SHIFT, PAGE_SIZE

#: "ENCS" as a little-endian u32
ENC_STATUS_MAGIC = 0x53434E45
ENC_STATUS_VERSION = 1
ENCS_MAGIC = 0x00
ENCS_VERSION = 0x04
ENCS_GENERATION = 0x08
ENCS_COUNT = 0x10
ENCS_CAPACITY = 0x14
ENCS_HOST_REQUEST = 0x18
ENCS_RECORDS = 0x20
ENCS_RECORD_SIZE = 16

_HEADER = struct.Struct("<IIQIIQ")
assert _HEADER.size == ENCS_RECORDS

#: Read `length` bytes at a GPA as the host (the VMM's host view); raises TestbedError.
Reader = Callable[[int, int], bytes]
#: Write bytes at a GPA as the host.
Writer = Callable[[int, bytes], None]
#: Whether a GFN is private (the VMM's knowledge: KVM's attributes, or the host view's kind).
IsPrivate = Callable[[int], bool]


class DonationRefusedError(TestbedError):
    """The donation hypercall is refused; `errno` is what the guest gets back (negated)."""

    def __init__(self, errno: int, reason: str) -> None:
        self.errno = errno
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class Region:
    """The donated memory: `size` bytes at `gpa`."""

    gpa: int
    size: int


def records_for(guest_pages: int, max_ranges: int) -> int:
    """The capacity the host requires: as many records as its own list keeps before it poisons
    (`max_ranges`), or every shared set `guest_pages` pages can have, if fewer -- at most
    ceil(guest_pages / 2) disjoint, non-adjacent ranges -- so the guest never runs out of room
    before the host's own structure would have."""
    return min(max_ranges, (guest_pages + 1) // 2)


def bytes_for(records: int) -> int:
    """The page-rounded donation that holds `records` records."""
    return (ENCS_RECORDS + records * ENCS_RECORD_SIZE + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


class DonatedTracker(SharedTracker):
    """The shared ranges as the guest's donated structure has them (module docstring)."""

    name = "donated"

    def __init__(self, guest_pages: int, max_ranges: int = DEFAULT_MAX_RANGES) -> None:
        super().__init__(guest_pages, max_ranges)
        self._region: Region | None = None
        self._read: Reader | None = None
        self._write: Writer | None = None
        self._is_private: IsPrivate | None = None
        #: sticky: why the structure was found invalid (cleared by clear() or a new donation)
        self._invalid: str | None = None
        #: the last read's transient reason (an update in progress), else None
        self._transient: str | None = None
        self._snapshot: list[tuple[int, int]] = []
        #: the structure's generation at the last valid read
        self.generation = 0
        #: MAP_GPA_RANGE conversions the VMM validated (none is recorded here)
        self.conversions = 0
        #: reads of the structure, and the bytes they read (all inside the donated region)
        self.reads = 0
        self.bytes_read = 0

    # -- the donation ---------------------------------------------------------------------
    @property
    def region(self) -> Region | None:
        """The donated memory, None before the guest donated."""
        return self._region

    @property
    def max_donation_bytes(self) -> int:
        """The largest donation the host accepts: `max_ranges` records, page-rounded."""
        return bytes_for(self._max_ranges)

    @property
    def required_bytes(self) -> int:
        """The smallest donation the host accepts for the guest's current size."""
        return bytes_for(records_for(self._guest_pages, self._max_ranges))

    def donate(self, gpa: int, size: int, read: Reader, write: Writer | None = None,
               is_private: IsPrivate | None = None) -> None:
        """Take a donation of `size` bytes at `gpa` (the hypercall's a0, a1), or raise
        DonationRefusedError with the errno the guest gets: EINVAL for a GPA or size that is not page
        aligned, an empty region, one outside guest memory or not shared, or a structure that
        fails validation now; E2BIG above max_donation_bytes; ENOSPC below required_bytes
        (then the header's host_request says how much, when `write` is given). A refused
        donation leaves any earlier one in place."""
        guest_bytes = self._guest_pages << PAGE_SHIFT
        if gpa < 0 or size < 0 or gpa % PAGE_SIZE or size % PAGE_SIZE:
            raise DonationRefusedError(22, f"donation at gpa 0x{gpa:x} of 0x{size:x} bytes: not page aligned")
        if size == 0:
            raise DonationRefusedError(22, f"donation at gpa 0x{gpa:x}: empty")
        if gpa + size > guest_bytes:
            raise DonationRefusedError(22, f"donation at gpa 0x{gpa:x} of 0x{size:x} bytes: outside guest memory "
                                      f"(0x{guest_bytes:x} bytes)")
        if size > self.max_donation_bytes:
            raise DonationRefusedError(7, f"donation of 0x{size:x} bytes: above the host's bound "
                                     f"0x{self.max_donation_bytes:x} ({self._max_ranges} records)")
        private = _first_private(is_private, gpa >> PAGE_SHIFT, size >> PAGE_SHIFT)
        if private is not None:
            raise DonationRefusedError(22, f"donation at gpa 0x{gpa:x}: gfn 0x{private:x} is private, not shared")
        required = self.required_bytes
        region = Region(gpa, size)
        if size < required:
            if write is not None:
                _write_request(write, gpa, required)
            raise DonationRefusedError(28, f"donation of 0x{size:x} bytes: the host needs 0x{required:x} "
                                      f"({records_for(self._guest_pages, self._max_ranges)} records)")
        ranges, why, _generation = self._read_structure(region, read, is_private)
        if ranges is None and why is not None and why != _UPDATING:
            raise DonationRefusedError(22, f"donated structure at gpa 0x{gpa:x}: {why}")
        self._region, self._read, self._write, self._is_private = region, read, write, is_private
        self._invalid = None
        self._transient = None
        if write is not None:
            _write_request(write, gpa, 0)  # satisfied
        self._refresh()

    # -- reading it -------------------------------------------------------------------------
    def _read_structure(self, region: Region, read: Reader,
                        is_private: IsPrivate | None) -> tuple[list[tuple[int, int]] | None, str | None, int]:
        """(merged ranges, None, generation) or (None, reason, generation); never reads outside
        `region`."""
        gpa, size = region.gpa, region.size
        private = _first_private(is_private, gpa >> PAGE_SHIFT, size >> PAGE_SHIFT)
        if private is not None:
            return None, f"the donated memory is no longer shared (gfn 0x{private:x} is private)", 0
        try:
            header = self._bounded_read(read, region, gpa, ENCS_RECORDS)
        except TestbedError as exc:
            return None, f"the donated memory is not readable: {exc}", 0
        magic, version, generation, count, capacity, _request = _HEADER.unpack(header)
        if magic != ENC_STATUS_MAGIC:
            return None, f"bad magic 0x{magic:x} (expected 0x{ENC_STATUS_MAGIC:x})", generation
        if version != ENC_STATUS_VERSION:
            return None, f"unknown version {version} (expected {ENC_STATUS_VERSION})", generation
        if generation & 1:
            # Before the size checks: growing its donation, the guest raises the capacity in
            # the header before the host has taken the larger region (guests/lib/donate.s).
            return None, _UPDATING, generation
        if ENCS_RECORDS + capacity * ENCS_RECORD_SIZE > size:
            return None, (f"capacity {capacity} records does not fit the donated 0x{size:x} bytes "
                          f"(at most {(size - ENCS_RECORDS) // ENCS_RECORD_SIZE})"), generation
        if count > capacity:
            return None, f"count {count} > capacity {capacity}", generation
        if count > self._max_ranges:
            return None, f"count {count} > the host's bound of {self._max_ranges} records", generation
        try:
            body = self._bounded_read(read, region, gpa + ENCS_RECORDS, count * ENCS_RECORD_SIZE)
        except TestbedError as exc:
            return None, f"the donated memory is not readable: {exc}", generation
        limit = self._guest_pages
        ranges: list[tuple[int, int]] = []
        prev_start = -1
        prev_end = 0
        for i, (gfn, npages) in enumerate(struct.iter_unpack("<QQ", body)):
            if npages == 0:
                return None, f"record {i}: npages 0", generation
            if gfn + npages > limit:
                return None, (f"record {i}: gfn 0x{gfn:x} + {npages} pages is outside guest memory "
                              f"(0x{limit:x} pages)"), generation
            if gfn < prev_start:
                return None, f"record {i}: gfn 0x{gfn:x} below record {i - 1}'s 0x{prev_start:x} (unsorted)", generation
            if gfn < prev_end:
                return None, (f"record {i}: gfn 0x{gfn:x} overlaps record {i - 1} "
                              f"[0x{prev_start:x}, 0x{prev_end:x})"), generation
            if ranges and gfn == prev_end:
                start, n = ranges[-1]
                ranges[-1] = (start, n + npages)  # adjacent: merged
            else:
                ranges.append((gfn, npages))
            prev_start, prev_end = gfn, gfn + npages
        return ranges, None, generation

    def _bounded_read(self, read: Reader, region: Region, gpa: int, length: int) -> bytes:
        # The one place the structure is read: the bound is checked here, not trusted to callers.
        if gpa < region.gpa or gpa + length > region.gpa + region.size:
            raise AssertionError(f"read of 0x{gpa:x}+0x{length:x} outside the donated region {region}")
        self.reads += 1
        self.bytes_read += length
        data = read(gpa, length) if length else b""
        if len(data) != length:
            raise TestbedError(f"short read of the donated memory at gpa 0x{gpa:x}: {len(data)} of {length} bytes")
        return data

    def _refresh(self) -> None:
        """Read and validate the structure now (module docstring); updates the snapshot, the
        sticky invalid reason and the transient one."""
        self._transient = None
        if self._region is None or self._read is None:
            return
        if self._invalid is not None:
            return  # sticky until clear() or a new donation
        ranges, why, generation = self._read_structure(self._region, self._read, self._is_private)
        if ranges is not None:
            self._snapshot = ranges
            self.generation = generation
        elif why == _UPDATING:
            self._transient = f"{why} (generation {generation} is odd)"
        else:
            self._invalid = why

    @property
    def reason(self) -> str | None:
        """Why the tracker cannot vouch for its ranges now (read now), or None."""
        self._refresh()
        return self._why()

    def _why(self) -> str | None:
        if self._region is None:
            return "no encryption-status structure donated"
        return self._invalid or self._transient

    @property
    def state(self) -> str:
        """What the last read found, without reading again: "none" (nothing donated yet),
        "updating" (an odd generation: read again later), "invalid" (sticky, `reason` says
        why) or "valid" (the ranges are the guest's shared set). The migration tells these
        apart (testbed/migrate/migration.py): wait or resync, retry, fall back, use."""
        if self._region is None:
            return "none"
        if self._invalid is not None:
            return "invalid"
        return "updating" if self._transient is not None else "valid"

    def read_now(self) -> str:
        """Read and validate the structure now; the resulting `state`."""
        self._refresh()
        return self.state

    @property
    def poisoned(self) -> bool:
        """True when the structure was found invalid (sticky), is being updated, or was never
        donated: the ranges are then the last valid snapshot, not the guest's shared set."""
        self._refresh()
        return self._why() is not None

    # -- SharedTracker ----------------------------------------------------------------------
    def set_shared(self, gfn: int, npages: int) -> None:
        check_range(gfn, npages, self._guest_pages)
        self.conversions += 1

    def set_private(self, gfn: int, npages: int) -> None:
        check_range(gfn, npages, self._guest_pages)
        self.conversions += 1

    def apply(self, conversions: Iterable[tuple[int, int, bool]]) -> int:
        n = 0
        for gfn, npages, _shared in conversions:
            check_range(gfn, npages, self._guest_pages)
            n += 1
        self.conversions += n
        return n

    def is_shared(self, gfn: int) -> bool:
        if type(gfn) is not int or not 0 <= gfn < self._guest_pages:
            self._reject(gfn, 1)
        self._refresh()
        return any(start <= gfn < start + n for start, n in self._snapshot)

    def shared_ranges(self) -> list[tuple[int, int]]:
        self._refresh()
        return list(self._snapshot)

    def range_count(self) -> int:
        self._refresh()
        return len(self._snapshot)

    def export(self, buf: bytearray | memoryview) -> ExportResult:
        self._refresh()
        return export_ranges(self._snapshot, buf, poisoned=self._why() is not None)

    def memory_bytes(self) -> int:
        # The host keeps the last snapshot only; the structure itself is the guest's memory.
        return sys.getsizeof(self._snapshot) + len(self._snapshot) * (
            sys.getsizeof((0, 0)) + 2 * sys.getsizeof(self._guest_pages))

    def memory_bound_bytes(self) -> int:
        # A snapshot holds at most capacity <= max_ranges records (donate() refuses more), and
        # a read's transient buffer is at most the donation.
        items = self._max_ranges
        per_list = sys.getsizeof([]) + 8 * (items + (items >> 3) + 8)
        return (per_list + items * (sys.getsizeof((0, 0)) + 2 * sys.getsizeof(self._guest_pages + 1))
                + sys.getsizeof(b"") + self.max_donation_bytes)

    def clear(self) -> None:
        """Forget the poison and the snapshot; the donation stays, and is read again next time."""
        self._invalid = None
        self._transient = None
        self._snapshot = []
        self._poisoned = False

    # -- memory hotplug ---------------------------------------------------------------------
    def _grow(self, guest_pages: int) -> None:
        """The bound rises; if the donated structure is now smaller than required_bytes, the host
        asks the guest for more by writing host_request into the header (guests/lib/donate.s
        grows its donation at its next conversion and donates again). Until then the tracker
        still answers from the smaller structure, which stays valid (its records are inside the
        old memory, so inside the new)."""
        self._guest_pages = guest_pages
        region = self._region
        if (region is not None and self._write is not None and region.size < self.required_bytes
                and _first_private(self._is_private, region.gpa >> PAGE_SHIFT, 1) is None):
            # (A header the guest made private is not written: the next read poisons the tracker.)
            _write_request(self._write, region.gpa, self.required_bytes)

    @property
    def donation_requested(self) -> int:
        """Bytes the host asked for and the guest has not yet donated (0: none)."""
        region = self._region
        if region is None or region.size >= self.required_bytes:
            return 0
        return self.required_bytes


#: _read_structure's one transient answer (the generation is odd): read again later.
_UPDATING = "update in progress"


def _first_private(is_private: IsPrivate | None, first_gfn: int, npages: int) -> int | None:
    if is_private is None:
        return None
    for gfn in range(first_gfn, first_gfn + npages):
        if is_private(gfn):
            return gfn
    return None


def _write_request(write: Writer, gpa: int, nbytes: int) -> None:
    write(gpa + ENCS_HOST_REQUEST, struct.pack("<Q", nbytes))
