"""The encryption-status resync of live migration: export, XOR with the last export, re-send.

The seed thread's loop (Ashish Kalra, 7 Jan 2021): "after each memory region migration cycle
we pause live migration, re-sync the page encryption bitmap, XOR it to the last synced bitmap,
and then re-transfer any modified pages accordingly". What crosses the export interface
depends on where the status lives:

* a bitmap tracker (`bitmap`, `native-bitmap`): the bitmap itself, guest_pages / 8 bytes;
* a list or tree tracker (`ranges`, `tree`, `native-ranges`): the 16-byte records of
  testbed/tracker/export.py, all or nothing, with the poison bit;
* the seed-era KVM (`--hc-protocol page-enc-status`): KVM_GET_PAGE_ENC_BITMAP (1 = encrypted);
* the fallback when a tracker is poisoned: a full resync from KVM's memory attributes, one
  bit per page (a deviation: upstream KVM has no ioctl that reads attributes back; QEMU keeps
  its own copy of them, which is what this stands for).

`StatusExport.shared_ranges` is the decoded shared set either way, and `status_changes`
its XOR with the previous export as merged ranges - by a sweep over the two range lists, or
by a word-wise XOR of the two bitmaps, whichever the export carried.
"""

from __future__ import annotations

import mmap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bitarray import bitarray

from testbed.tracker import SharedTracker, decode_export
from testbed.tracker.bitmap import bit_runs

#: Tracker kinds whose export is the bitmap itself.
BITMAP_KINDS = frozenset({"bitmap", "native-bitmap"})

Ranges = list[tuple[int, int]]


@dataclass
class StatusExport:
    """One export of the guest's encryption status."""

    #: where it came from: "tracker", "page-enc-bitmap", "memory-attributes" (the fallback)
    source: str
    #: bytes that crossed the export interface (records, or the bitmap)
    nbytes: int
    #: seconds the export took
    seconds: float
    #: the tracker was poisoned: this export is not the guest's shared set
    poisoned: bool = False
    #: the bitmap the export carried (1 = shared), when it was one
    bits: bitarray | None = None
    #: the records the export carried, when it was a list
    ranges: Ranges | None = None

    def shared_ranges(self) -> Ranges:
        """The shared pages as sorted, merged (gfn, npages)."""
        if self.ranges is not None:
            return self.ranges
        assert self.bits is not None
        return bits_to_ranges(self.bits)

    def shared_bits(self, guest_pages: int) -> bitarray:
        """The shared pages as a bitmap (1 = shared) of `guest_pages` bits."""
        if self.bits is not None:
            return self.bits
        return ranges_to_bits(self.shared_ranges(), guest_pages)


def bits_to_ranges(bits: bitarray) -> Ranges:
    """The runs of set bits of `bits` as (first, count), in order."""
    return list(bit_runs(bits))


def ranges_to_bits(ranges: Sequence[tuple[int, int]], guest_pages: int) -> bitarray:
    """A bitmap of `guest_pages` bits with the pages of `ranges` set."""
    bits = bitarray(guest_pages, endian="little")
    bits.setall(0)
    for gfn, npages in ranges:
        bits[gfn:gfn + npages] = 1
    return bits


def xor_ranges(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]]) -> Ranges:
    """The pages in exactly one of two sorted, merged range lists, merged: a sweep over their
    boundaries, O(len(a) + len(b)) whatever the guest's size."""
    points: list[int] = []
    for gfn, npages in a:
        points.append(gfn)
        points.append(gfn + npages)
    for gfn, npages in b:
        points.append(gfn)
        points.append(gfn + npages)
    # Each boundary toggles membership of its list; the XOR is where an odd number of lists hold.
    points.sort()
    out: Ranges = []
    inside = False
    start = 0
    i = 0
    while i < len(points):
        p = points[i]
        flips = 0
        while i < len(points) and points[i] == p:
            flips += 1
            i += 1
        if flips % 2:
            if not inside:
                start = p
            elif p > start:
                if out and out[-1][0] + out[-1][1] == start:
                    out[-1] = (out[-1][0], out[-1][1] + p - start)
                else:
                    out.append((start, p - start))
            inside = not inside
    return out


def status_changes(previous: StatusExport | None, current: StatusExport, guest_pages: int) -> Ranges:
    """The pages whose encryption status differs between two exports (all shared pages of
    `current` when there is no previous one): a bitmap XOR when both carried bitmaps, a range
    sweep otherwise."""
    if previous is None:
        return current.shared_ranges()
    if (previous.bits is not None and current.bits is not None
            and previous.bits.endian == current.bits.endian and len(previous.bits) == len(current.bits)):
        return bits_to_ranges(previous.bits ^ current.bits)
    return xor_ranges(previous.shared_ranges(), current.shared_ranges())


def export_tracker(tracker: SharedTracker, kind: str) -> StatusExport:
    """The tracker's export: its bitmap for the bitmap kinds, its records otherwise (sized first
    with an empty buffer, as KVM's sizing ioctls are called; tracker/export.py)."""
    start = time.perf_counter()
    if kind in BITMAP_KINDS:
        # The bitmap itself crosses: the Python tracker's is copied as it is; the C tracker's is
        # rebuilt from its ranges (the extension hands out no buffer).
        raw = getattr(tracker, "_bits", None)
        if isinstance(raw, bitarray):
            bits = raw.copy()
        else:
            bits = ranges_to_bits(tracker.shared_ranges(), tracker.guest_pages)
        return StatusExport("tracker", (tracker.guest_pages + 7) // 8, time.perf_counter() - start,
                            poisoned=tracker.poisoned, bits=bits)
    probe = tracker.export(bytearray())
    buf = bytearray(probe.size_needed_bytes)
    result = tracker.export(buf)
    ranges = decode_export(buf, result.records_written)
    return StatusExport("tracker", result.size_needed_bytes, time.perf_counter() - start,
                        poisoned=result.poisoned, ranges=ranges)


def export_page_enc_bitmap(get_bitmap: Callable[[int, int], bytes], guest_pages: int) -> StatusExport:
    """KVM_GET_PAGE_ENC_BITMAP of all guest memory (seed-era KVM: bit set = encrypted)."""
    start = time.perf_counter()
    raw = get_bitmap(0, guest_pages)
    bits = bitarray(endian="little")
    bits.frombytes(raw)
    del bits[guest_pages:]
    bits.invert()  # 1 = shared
    return StatusExport("page-enc-bitmap", len(raw), time.perf_counter() - start, bits=bits)


def private_bits(private_bytes: bytes | mmap.mmap, guest_pages: int) -> bitarray:
    """One bit per page, 1 = private, from KVM's attribute array (one byte per GFN, 1 = private)."""
    private = bitarray(endian="little")
    private.pack(private_bytes[:guest_pages])
    return private


def export_memory_attributes(private_bytes: bytes | mmap.mmap, guest_pages: int) -> StatusExport:
    """The full resync from KVM's memory attributes (the poisoned-tracker fallback): one bit per
    page, from KVM's attribute array."""
    start = time.perf_counter()
    bits = ~private_bits(private_bytes, guest_pages)  # 1 = shared: a page is shared where its byte is 0
    return StatusExport("memory-attributes", (guest_pages + 7) // 8, time.perf_counter() - start, bits=bits)
