"""The shared-range export format: how a tracker hands its list to migration.

The seed thread proposes that "usermode could send down a pointer to a user region and a size"
and the kernel "populate that with an array of structs containing bases and limits", plus a
poison bit. This module is that contract, shaped like KVM's sizing ioctls:

* The buffer holds an array of records, no header::

      struct shared_range {      /* 16 bytes, little-endian, packed, 8-byte aligned */
              __u64 base_gfn;    /* first shared 4 KiB frame                         */
              __u64 npages;      /* >= 1; records sorted by base_gfn, disjoint and   */
      };                         /* never adjacent (adjacent ranges are merged)      */

* All or nothing: if the whole list does not fit, nothing is written (records_written = 0)
  and size_needed_bytes says how much to allocate -- as KVM_GET_SUPPORTED_CPUID fails with
  E2BIG and reports nent. A partial list is never handed out because a VMM that ignored the
  flag would silently treat the missing tail as private. Calling with an empty buffer is the
  way to ask for the size.
* `poisoned` carries the tracker's poison bit; `complete` is the one bit a VMM may act on:
  True iff every record was written *and* the tracker is not poisoned, i.e. the buffer is
  exactly the guest's shared set. Bytes past the records are left untouched.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from testbed.errors import UsageError

#: One record: u64 base_gfn, u64 npages, little-endian.
RECORD = struct.Struct("<QQ")
RECORD_SIZE = RECORD.size  # 16


@dataclass(frozen=True)
class ExportResult:
    """What `SharedTracker.export` reports, like the fields an ioctl writes back."""

    records_written: int
    size_needed_bytes: int
    poisoned: bool
    complete: bool


def _writable_bytes(buf: bytearray | memoryview) -> memoryview:
    view = memoryview(buf)
    if view.readonly:
        raise UsageError("export buffer is read-only")
    if not view.c_contiguous:
        raise UsageError("export buffer must be C-contiguous")
    return view.cast("B")


def export_ranges(
    ranges: Sequence[tuple[int, int]], buf: bytearray | memoryview, *, poisoned: bool
) -> ExportResult:
    """Write `ranges` ([(gfn, npages)], already sorted and merged) into `buf` if they all fit."""
    view = _writable_bytes(buf)
    needed = len(ranges) * RECORD_SIZE
    if needed > len(view):
        return ExportResult(0, needed, poisoned, complete=False)
    flat = array("Q")
    for gfn, npages in ranges:
        flat.append(gfn)
        flat.append(npages)
    if sys.byteorder != "little":
        flat.byteswap()
    view[:needed] = flat.tobytes()
    return ExportResult(len(ranges), needed, poisoned, complete=not poisoned)


def decode_export(buf: bytes | bytearray | memoryview, records: int) -> list[tuple[int, int]]:
    """Read `records` records back from an export buffer (the migration target's side)."""
    view = memoryview(buf).cast("B")
    if records < 0 or records * RECORD_SIZE > len(view):
        raise UsageError(f"export buffer of {len(view)} bytes holds fewer than {records} records")
    return [RECORD.unpack_from(view, i * RECORD_SIZE) for i in range(records)]
