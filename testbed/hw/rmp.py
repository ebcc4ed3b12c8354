"""The SNP Reverse Map Table: who owns each 4 KiB frame, and whether the guest validated it.

One entry per frame (AMD APM vol. 2, 15.36): `assigned` (the frame belongs to the guest as
private memory: in KVM it is assigned when guest_memfd maps it private, and made shared again
when it is freed) and `validated` (set and cleared only by the guest's PVALIDATE). A private
access to an assigned but unvalidated frame raises #VC 0x404; the host cannot write an
assigned frame (with guest_memfd the host cannot even map one - hw/memory.py - so that
check guards the legacy one-frame model only). Entries are 4 KiB only: a 2 MiB PVALIDATE
reports FAIL_SIZEMISMATCH, as the hardware does against 4 KiB entries, and the guest falls
back to 4 KiB (as Linux does).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

from testbed.hw.memory import frame_array, release_mapping

PVALIDATE_SUCCESS = 0
PVALIDATE_FAIL_INPUT = 1
PVALIDATE_FAIL_SIZEMISMATCH = 6

RMP_PG_SIZE_4K = 0
RMP_PG_SIZE_2M = 1


def _clear(array: mmap.mmap, first: int, end: int) -> None:
    """Zero bytes [first, end): whole pages inside go back to the kernel (MADV_DONTNEED reads
    as zeros), so clearing a large range does not fault it in."""
    lo = (first + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1)
    hi = end & ~(mmap.PAGESIZE - 1)
    if hi - lo < mmap.PAGESIZE:
        array[first:end] = bytes(end - first)
        return
    array[first:lo] = bytes(lo - first)
    array.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    array[hi:end] = bytes(end - hi)


@dataclass(frozen=True, slots=True)
class PvalidateResult:
    """EAX and CF of one PVALIDATE."""

    eax: int
    cf: bool


# The four answers the RMP gives (one object each: PVALIDATE runs ~520 times per SNP boot).
_SIZEMISMATCH = PvalidateResult(PVALIDATE_FAIL_SIZEMISMATCH, False)
_FAIL_INPUT = PvalidateResult(PVALIDATE_FAIL_INPUT, False)
_NO_UPDATE = PvalidateResult(PVALIDATE_SUCCESS, True)
_UPDATED = PvalidateResult(PVALIDATE_SUCCESS, False)


class Rmp:
    """The RMP entries of one SNP guest's frames (the guest's GPA is the frame's own)."""

    def __init__(self, nframes: int) -> None:
        self.nframes = nframes
        # Sparse (hw/memory.py frame_array): a 64 GiB guest's entries cost what changes. The
        # Assigned bits are stored as their difference from `_base` (all frames assigned at
        # once, as SNP_LAUNCH_START does, flips the base and frees the array: no 16 MiB write).
        self._assigned_diff = frame_array(nframes)
        self._base = 0
        self.validated = frame_array(nframes)

    def close(self) -> None:
        """Unmap the entries (the machine is closed)."""
        release_mapping(self._assigned_diff)
        release_mapping(self.validated)

    def is_assigned(self, frame: int) -> bool:
        """The frame's Assigned bit."""
        return (self._assigned_diff[frame] ^ self._base) == 1

    def _set_assigned(self, first: int, end: int, assigned: bool) -> None:
        if first == 0 and end == self.nframes:
            self._base = int(assigned)
            _clear(self._assigned_diff, 0, end)
        elif int(assigned) == self._base:
            _clear(self._assigned_diff, first, end)
        else:
            self._assigned_diff[first:end] = b"\x01" * (end - first)

    def assign(self, first: int, end: int, assigned: bool) -> None:
        """RMPUPDATE by the host: (un)assign frames [first, end); either way Validated clears."""
        end = min(end, self.nframes)
        if first >= end:
            return
        self._set_assigned(first, end, assigned)
        _clear(self.validated, first, end)

    def entries(self, end: int) -> bytes:
        """The entries of frames [0, end) as one byte each: bit 0 Assigned, bit 1 Validated
        (what the host reads from the RMP table: arch/x86/virt/svm/sev.c struct rmpentry has
        both; live migration compares them round to round, testbed/migrate/migration.py)."""
        end = min(end, self.nframes)
        assigned = int.from_bytes(self._assigned_diff[:end], "little")
        if self._base:
            assigned ^= int.from_bytes(b"\x01" * end, "little")
        validated = int.from_bytes(self.validated[:end], "little")
        return (assigned | (validated << 1)).to_bytes(end, "little")

    def keep_assigned(self, first: int, end: int) -> None:
        """Frames [first, end) are assigned, Validated left as it is: a page guest_memfd never
        freed keeps its entry; a freed one was unassigned and unvalidated (assign False), and
        comes back assigned and unvalidated (sev_gmem_prepare, at its next private fault)."""
        end = min(end, self.nframes)
        if first < end:
            self._set_assigned(first, end, True)

    def launch_validate(self, first: int, end: int) -> None:
        """SNP_LAUNCH_UPDATE: measured pages enter the guest assigned and validated."""
        end = min(end, self.nframes)
        if first < end:
            self._set_assigned(first, end, True)
            self.validated[first:end] = b"\x01" * (end - first)

    def receive_assigned(self, frame: int, validated: bool) -> None:
        """SNP migration's receive: the frame is assigned, validated as the packet says."""
        self._set_assigned(frame, frame + 1, True)
        self.validated[frame] = 1 if validated else 0

    def pvalidate(self, frame: int, size: int, validate: bool) -> PvalidateResult:
        """PVALIDATE on an assigned frame (the caller handled translation and assignment)."""
        if size == RMP_PG_SIZE_2M:
            return _SIZEMISMATCH
        if size != RMP_PG_SIZE_4K or not 0 <= frame < self.nframes:
            return _FAIL_INPUT
        want = 1 if validate else 0
        if self.validated[frame] == want:
            return _NO_UPDATE  # no RMP update: CF=1
        self.validated[frame] = want
        return _UPDATED
