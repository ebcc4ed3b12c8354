"""Dirty logging: KVM_MEM_LOG_DIRTY_PAGES, KVM_GET_DIRTY_LOG and KVM_CLEAR_DIRTY_LOG.

KVM keeps one bit per page of a memslot (memslot->dirty_bitmap, virt/kvm/kvm_main.c) while
userspace has set KVM_MEM_LOG_DIRTY_PAGES on the slot. A page's bit is set by
mark_page_dirty_in_slot(): on the guest's first write after the page was write-protected (the
write fault KVM takes, arch/x86/kvm/mmu/mmu.c fast_page_fault / mark_page_dirty), and on every
write KVM itself makes to guest memory (kvm_write_guest -> __kvm_write_guest_page ->
mark_page_dirty_in_slot: the GHCB, the PSC buffer, string I/O, an emulated write). Writes by
userspace through its own mapping are not logged.

The bitmap is also what decides write permission in stage 2: a page is writable while its bit
is set (written since the log was last collected) and write-protected while it is clear, which
is exactly the state KVM keeps in its SPTEs. Collecting the log (kvm_get_dirty_log_protect,
without KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) takes the bits, clears them, write-protects those
pages again (kvm_arch_mmu_enable_log_dirty_pt_masked) and flushes the TLBs
(kvm_flush_remote_tlbs_memslot). The hardware model reads the same bytes where the hardware
reads its NPT: `bitmap`, mutated in place and never rebound (hw/mmu.py, hw/_nativemmu.c), and
folds KVM's write-protection fault into the TLB fill that takes it (the page's bit is set and
the fill grants write), counted in `faults`.

The testbed's RAM is slot 0 and, after a memory hotplug, the slots above it; one array indexed by
GFN holds every slot's bits (the hardware reads it) and the ioctls cut each slot's part out.
KVM_MEM_LOG_DIRTY_PAGES on a guest_memfd slot is refused by KVM (check_memory_region_flags:
"Dirty logging private memory is not currently supported"); the testbed logs the private pages
of sw-protected and sev-snp VMs too, a deliberate deviation (README) that the migration model
needs.
"""

from __future__ import annotations

import errno
import mmap
from collections.abc import Callable

from testbed.hw.memory import HostMemory, frame_array, release_mapping
from testbed.kvm.ioctl import KvmIoctlError
from testbed.x86 import PAGE_SHIFT

#: include/uapi/linux/kvm.h
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1
KVM_DIRTY_LOG_MANUAL_CAPS = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET
#: KVM_USER_MEM_SLOTS on x86 (arch/x86/include/asm/kvm_host.h); the testbed's RAM is slot 0
KVM_USER_MEM_SLOTS = 32764
BITS_PER_LONG = 64

__all__ = [
    "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
    "KVM_DIRTY_LOG_INITIALLY_SET",
    "KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE",
    "KVM_MEM_LOG_DIRTY_PAGES",
    "DirtyLog",
    "DirtyMarkingMemory",
    "dirty_pages",
]


def bitmap_bytes(npages: int) -> int:
    """kvm_dirty_bitmap_bytes(): the slot's pages rounded up to whole longs, in bytes."""
    return (npages + BITS_PER_LONG - 1) // BITS_PER_LONG * (BITS_PER_LONG // 8)


def dirty_pages(bitmap: bytes, first_page: int = 0) -> list[int]:
    """The page numbers whose bits are set in a KVM dirty bitmap (bit i of byte j is page
    first_page + 8j + i: set_bit_le order)."""
    out: list[int] = []
    for j, value in enumerate(bitmap):
        bits = value
        while bits:
            low = bits & -bits
            out.append(first_page + 8 * j + low.bit_length() - 1)
            bits ^= low
    return out


class DirtyLog:
    """The RAM slot's dirty bitmap and the slot's KVM_MEM_LOG_DIRTY_PAGES flag."""

    def __init__(self, npages: int, flush: Callable[[], None] | None = None, *,
                 slots: Callable[[], dict[int, tuple[int, int]]] | None = None, nr_as_ids: int = 2) -> None:
        self.npages = npages
        #: the VM's RAM slots, id -> (GPA, bytes) (KvmVm.memslots); slot 0 covers all pages
        #: when not given. The bits live in one array indexed by GFN (the hardware's view); the
        #: ioctls cut each slot's part out of it, as KVM keeps one bitmap per memslot.
        self.slots = slots if slots is not None else (lambda: {0: (0, npages << PAGE_SHIFT)})
        #: kvm_arch_nr_memslot_as_ids(): 2 (SMM's address space) unless the VM has private
        #: memory (kvm_arch_has_private_mem: sw-protected, SNP, TDX), then 1
        self.nr_as_ids = nr_as_ids
        #: memslot->dirty_bitmap: bit per page, LSB first; shared with the hardware's fills
        #: (a sparse mapping: a 64 GiB guest's 2 MiB bitmap costs the pages that get bits)
        self.bitmap: mmap.mmap = frame_array(bitmap_bytes(npages))
        #: KVM_MEM_LOG_DIRTY_PAGES on the slot (memslot->dirty_bitmap allocated)
        self.enabled = False
        #: kvm->manual_dirty_log_protect (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2's flags)
        self.manual_protect = 0
        #: kvm_flush_remote_tlbs_memslot(): every vCPU's hardware drops its translations
        self.flush = flush if flush is not None else (lambda: None)
        #: pages marked by KVM's own writes (kvm_write_guest), for the report
        self.kvm_marks = 0

    def close(self) -> None:
        """Unmap the bitmap (the VM is closed)."""
        release_mapping(self.bitmap)

    # -- KVM_SET_USER_MEMORY_REGION2 flags ----------------------------------------------
    def set_logging(self, enabled: bool) -> None:
        """KVM_MEM_LOG_DIRTY_PAGES on or off for the slot. On: a fresh bitmap (all ones with
        KVM_DIRTY_LOG_INITIALLY_SET, kvm_prepare_memory_region / kvm_alloc_dirty_bitmap) and,
        unless initially set, every page write-protected (kvm_mmu_slot_apply_flags ->
        kvm_mmu_slot_remove_write_access) with a TLB flush. Off: the bitmap is freed and write
        protection dropped (kvm_mmu_slot_apply_flags on the flag's removal). The caller (KvmVm)
        hands the bitmap to the vCPUs' hardware and flushes their TLBs."""
        enabled = bool(enabled)
        if enabled == self.enabled:
            return
        self.enabled = enabled
        self._zero()
        if enabled and self.manual_protect & KVM_DIRTY_LOG_INITIALLY_SET:
            # bitmap_set(memslot->dirty_bitmap, 0, npages): each slot's pages only
            for base, size in self.slots().values():
                first = base >> PAGE_SHIFT
                self._set_bits(first, size >> PAGE_SHIFT, (1 << (size >> PAGE_SHIFT)) - 1)

    def _zero(self) -> None:
        self.bitmap.madvise(mmap.MADV_DONTNEED)  # reads as zeros again, pages returned

    # -- mark_page_dirty_in_slot ----------------------------------------------------------
    def mark(self, gpa: int, length: int) -> None:
        """mark_page_dirty_in_slot() for every page of [gpa, gpa + length) inside the slot
        (KVM's own writes to guest memory); nothing while logging is off."""
        if not self.enabled or length <= 0:
            return
        first = gpa >> PAGE_SHIFT
        last = min((gpa + length - 1) >> PAGE_SHIFT, self.npages - 1)
        bitmap = self.bitmap
        for gfn in range(max(first, 0), last + 1):
            bit = 1 << (gfn & 7)
            if not bitmap[gfn >> 3] & bit:
                bitmap[gfn >> 3] |= bit
                self.kvm_marks += 1

    def is_dirty(self, gfn: int) -> bool:
        """Whether `gfn`'s bit is set."""
        return 0 <= gfn < self.npages and bool(self.bitmap[gfn >> 3] >> (gfn & 7) & 1)

    # -- the ioctls -----------------------------------------------------------------------
    def _check_slot_id(self, name: str, slot: int) -> None:
        as_id, sid = slot >> 16, slot & 0xFFFF
        if slot < 0 or as_id >= self.nr_as_ids or sid >= KVM_USER_MEM_SLOTS:
            raise KvmIoctlError(name, errno.EINVAL, f"slot 0x{slot:x}: address space or slot id out of range")

    def _check_slot(self, name: str, slot: int) -> tuple[int, int]:
        """The slot's first GFN and page count; ENOENT for a slot id_to_memslot() does not find
        (none in SMM's address space 1 here) or one without a dirty_bitmap (logging off)."""
        self._check_slot_id(name, slot)
        found = self.slots().get(slot & 0xFFFF) if slot >> 16 == 0 else None
        if found is None or not self.enabled:
            raise KvmIoctlError(name, errno.ENOENT, f"slot 0x{slot:x} has no dirty bitmap "
                                "(no such memslot, or KVM_MEM_LOG_DIRTY_PAGES is not set on it)")
        return found[0] >> PAGE_SHIFT, found[1] >> PAGE_SHIFT

    def _bits(self, first: int, count: int) -> int:
        """Bits [first, first + count) of the array as an int (bit 0 = GFN first)."""
        lo, hi = first >> 3, min((first + count + 7) >> 3, len(self.bitmap))
        return (int.from_bytes(self.bitmap[lo:hi], "little") >> (first & 7)) & ((1 << count) - 1)

    def _set_bits(self, first: int, count: int, value: int) -> None:
        """Bits [first, first + count) of the array := `value`'s low bits."""
        lo, hi = first >> 3, min((first + count + 7) >> 3, len(self.bitmap))
        shift, mask = first & 7, (1 << count) - 1
        old = int.from_bytes(self.bitmap[lo:hi], "little")
        new = (old & ~(mask << shift)) | ((value & mask) << shift)
        self.bitmap[lo:hi] = new.to_bytes(hi - lo, "little")

    def get(self, slot: int = 0) -> bytes:
        """KVM_GET_DIRTY_LOG (kvm_get_dirty_log_protect): the slot's bitmap, its pages rounded up
        to whole longs (kvm_dirty_bitmap_bytes). Without manual protection the bits are taken
        and cleared and their pages write-protected again, with a TLB flush when any was set;
        with it, the bitmap is returned as it is. EINVAL for an address space or slot id out of
        range, ENOENT for no such slot or one without a bitmap (logging off)."""
        name = "KVM_GET_DIRTY_LOG"
        first, npages = self._check_slot(name, slot)
        bits = self._bits(first, npages)
        data = bits.to_bytes(bitmap_bytes(npages), "little")
        if self.manual_protect & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
            return data
        if bits:
            self._set_bits(first, npages, 0)
            self.flush()
        return data

    def clear(self, first_page: int, num_pages: int, bitmap: bytes, slot: int = 0) -> None:
        """KVM_CLEAR_DIRTY_LOG (kvm_clear_dirty_log_protect): clear the bits of
        [first_page, first_page + num_pages) set in `bitmap` (bit 0 = first_page), write-protect
        those pages again and flush. EINVAL for a first page not a multiple of 64, a range
        outside the slot, or a num_pages that is not a multiple of 64 and does not reach the
        slot's end; ENOENT for a slot without a bitmap."""
        name = "KVM_CLEAR_DIRTY_LOG"
        self._check_slot_id(name, slot)  # (KVM's order: the id, the alignment, then the slot's bitmap)
        if first_page & 63:
            raise KvmIoctlError(name, errno.EINVAL, f"first_page {first_page} is not a multiple of 64")
        slot_first, n = self._check_slot(name, slot)
        if (first_page < 0 or num_pages < 0 or first_page > n or num_pages > n - first_page
                or (num_pages < n - first_page and num_pages & 63)):
            raise KvmIoctlError(name, errno.EINVAL, f"pages [{first_page}, +{num_pages}) do not fit the slot's "
                                f"{n} pages in whole longs")
        nbytes = bitmap_bytes(num_pages)
        if len(bitmap) < nbytes:
            raise KvmIoctlError(name, errno.EFAULT, f"bitmap of {len(bitmap)} bytes, {nbytes} needed")
        count = min(nbytes * 8, n - first_page)
        mask = int.from_bytes(bitmap[:nbytes], "little") & ((1 << count) - 1)
        old = self._bits(slot_first + first_page, count) if mask else 0
        if old & mask:
            self._set_bits(slot_first + first_page, count, old & ~mask)
            self.flush()

    def enable_manual_protect(self, flags: int) -> None:
        """KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) (kvm_vm_ioctl_enable_cap_generic):
        INITIALLY_SET only together with MANUAL_PROTECT_ENABLE; other bits EINVAL."""
        allowed = KVM_DIRTY_LOG_MANUAL_CAPS if flags & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE \
            else KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
        if flags & ~allowed or flags < 0:
            raise KvmIoctlError("KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)", errno.EINVAL,
                                f"flags 0x{flags:x}")
        self.manual_protect = flags


class DirtyMarkingMemory:
    """KVM's accessors over the memslot's userspace mapping (kvm_read_guest/kvm_write_guest):
    a write marks its pages in the dirty log, as __kvm_write_guest_page() calls
    mark_page_dirty_in_slot(). Reads and the size pass through."""

    def __init__(self, memory: HostMemory, log: DirtyLog) -> None:
        self._memory = memory
        self._log = log

    @property
    def size(self) -> int:
        """Guest memory size in bytes."""
        return self._memory.size

    @property
    def capacity(self) -> int:
        """The size guest memory can grow to (memory hotplug)."""
        return self._memory.capacity

    def read(self, gpa: int, length: int) -> bytes:
        """kvm_read_guest()."""
        return self._memory.read(gpa, length)

    def write(self, gpa: int, data: bytes) -> None:
        """kvm_write_guest(): the write, then mark_page_dirty_in_slot() (only if it landed)."""
        self._memory.write(gpa, data)
        self._log.mark(gpa, len(data))
