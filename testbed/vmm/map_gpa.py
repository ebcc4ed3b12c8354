"""The VMM's KVM_HC_MAP_GPA_RANGE handler: what userspace must check that KVM does not.

KVM validates only alignment, npages != 0 and wrap-around (ABI.md 1.4); the attributes
word, memslot membership and any size bound are left to userspace. This handler rejects
reserved attribute bits (63:5) and an unknown page-size hint (stricter than QEMU, whose
kvm_handle_hc_map_gpa_range() reads only the encrypted bit: a deliberate deviation, README),
refuses ranges (partly) outside guest memory - but accepts, as QEMU's kvm_convert_memory()
does, a to-shared range wholly outside it, recording nothing - and bounds the number of pages
one call may convert. Errors go back to the guest
in `ret`, and which value depends on who reads it (the testbed's choice to answer rather than stop
the VM; QEMU never sets ret and stops the vCPU instead):
* on SEV-SNP the exits come from Page State Change requests, whose completions accept only 0,
  EINVAL or EAGAIN from userspace (kvm_is_valid_map_gpa_range_ret() in x86.h; any other value
  fails KVM_RUN with -EINVAL): the VMM answers EINVAL (22, positive);
* on TDX the exits come from the TD's MapGPA (TDG.VP.VMCALL), whose completion
  (tdx.c tdx_complete_vmcall_map_gpa) accepts the same three values in the reference tree and
  makes any non-zero value INVALID_OPERAND in 7.1: the VMM answers EINVAL (22, positive), which
  both turn into INVALID_OPERAND for the guest;
* elsewhere the exit comes from the guest's own KVM_HC_MAP_GPA_RANGE, whose completion
  (complete_hypercall_exit()) writes ret raw into RAX: the VMM answers -KVM_EINVAL, the hypercall
  ABI's error (hypercalls.rst), so the guest reads the value it expects.
An accepted conversion - explicit, or implicit after a
KVM_EXIT_MEMORY_FAULT - first sets KVM's memory attributes (KVM_SET_MEMORY_ATTRIBUTES, where
KVM_CAP_MEMORY_ATTRIBUTES offers them, as QEMU's kvm_convert_memory() does), then - on a
guest_memfd VM - discards the side the pages leave, as kvm_convert_memory() does
(accel/kvm/kvm-all.c: ram_block_discard_range() of the VMM's own pages on to-private,
ram_block_discard_guest_memfd_range(), a guest_memfd punch-hole, on to-shared), so contents
never cross a conversion; and then updates the shared-page tracker.
"""

from __future__ import annotations

from typing import Protocol

from testbed.kvm.ioctl import KvmIoctlError
from testbed.kvm.uapi import (
    KVM_CAP_MEMORY_ATTRIBUTES,
    KVM_EINVAL,
    KVM_MAP_GPA_RANGE_ENC_STAT_MASK,
    KVM_MAP_GPA_RANGE_PAGE_SZ_1G,
    KVM_MAP_GPA_RANGE_PAGE_SZ_2M,
    KVM_MAP_GPA_RANGE_PAGE_SZ_4K,
    KVM_MAP_GPA_RANGE_PAGE_SZ_MASK,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
)
from testbed.tracker import SharedTracker
from testbed.x86 import PAGE_SHIFT

MAP_GPA_RANGE_VALID_ATTRS = KVM_MAP_GPA_RANGE_PAGE_SZ_MASK | KVM_MAP_GPA_RANGE_ENC_STAT_MASK
_VALID_PAGE_SIZES = (KVM_MAP_GPA_RANGE_PAGE_SZ_4K, KVM_MAP_GPA_RANGE_PAGE_SZ_2M, KVM_MAP_GPA_RANGE_PAGE_SZ_1G)


class MemoryAttributesIoctls(Protocol):
    """The two VM ioctls the handler needs (KvmVm provides them)."""

    def check_extension(self, cap: int) -> int: ...

    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int = 0) -> None: ...


class RamDiscard(Protocol):
    """The VMM's hold on guest RAM that a conversion needs (GuestMemory provides it)."""

    def discard_shared(self, first_gfn: int, npages: int) -> None: ...

    def discard_private(self, first_gfn: int, npages: int) -> None: ...


class MapGpaHandler:
    """Validates MAP_GPA_RANGE exits and applies them to the tracker."""

    def __init__(
        self,
        tracker: SharedTracker,
        guest_pages: int,
        max_pages_per_call: int | None = None,
        vm: MemoryAttributesIoctls | None = None,
        ram: RamDiscard | None = None,
        refusal: int = KVM_EINVAL,
        refused: list[tuple[int, int, bool | None]] | None = None,
    ) -> None:
        self.tracker = tracker
        #: run->hypercall.ret for a refused request (see the module docstring)
        self.refusal = refusal
        self.guest_pages = guest_pages
        #: the per-call bound the VMM was given; None: the guest's size (it follows a hotplug)
        self._max_pages_per_call = max_pages_per_call
        # Attributes exist only where KVM offers KVM_MEMORY_ATTRIBUTE_PRIVATE; elsewhere a
        # conversion is bookkeeping in the tracker alone.
        offered = vm is not None and bool(vm.check_extension(KVM_CAP_MEMORY_ATTRIBUTES) & KVM_MEMORY_ATTRIBUTE_PRIVATE)
        self._vm = vm if offered else None
        #: guest_memfd RAM whose other side a conversion discards (None: legacy memory)
        self._ram = ram
        self.rejected = 0
        #: Fault injection: GFN ranges [start, end) whose conversion this VMM refuses (to
        #: private if the flag is True, to shared if False, both if None), so that guests'
        #: handling of a refused page-state change can be tested.
        self.refused: list[tuple[int, int, bool | None]] = list(refused or [])

    @property
    def max_pages_per_call(self) -> int:
        """The largest npages one request may convert: the bound given, else the guest's size."""
        return self._max_pages_per_call if self._max_pages_per_call is not None else self.guest_pages

    def check(self, gpa: int, npages: int, attrs: int) -> str | None:
        """Why the request is refused, or None."""
        if attrs & ~MAP_GPA_RANGE_VALID_ATTRS:
            return f"attrs 0x{attrs:x}: reserved bits 63:5 set"
        if attrs & KVM_MAP_GPA_RANGE_PAGE_SZ_MASK not in _VALID_PAGE_SIZES:
            return f"attrs 0x{attrs:x}: page-size hint {attrs & 0xF} is not 4K, 2M or 1G"
        gfn = gpa >> PAGE_SHIFT
        if gpa & 0xFFF or npages == 0:
            return f"gpa 0x{gpa:x} / npages {npages}: misaligned or empty"
        if npages > self.max_pages_per_call:
            return f"npages {npages} exceeds the per-call bound {self.max_pages_per_call}"
        if gfn + npages > self.guest_pages and not self._outside_to_shared(gfn, attrs):
            return f"gpa 0x{gpa:x} + {npages} pages is outside guest memory ({self.guest_pages} pages)"
        return None

    def _outside_to_shared(self, gfn: int, attrs: int) -> bool:
        """A to-shared request wholly outside guest memory: kvm_convert_memory() finds no memory
        region there and "ignores converting non-assigned region to shared" (OVMF maps the PCI
        MMIO hole shared this way): success, nothing to record."""
        return gfn >= self.guest_pages and not attrs & KVM_MAP_GPA_RANGE_ENC_STAT_MASK

    def handle(self, gpa: int, npages: int, attrs: int) -> int:
        """Returns the value for run->hypercall.ret: 0, or `self.refusal` when refused (see the
        module docstring)."""
        if self.check(gpa, npages, attrs) is not None:
            self.rejected += 1
            return self.refusal
        if self._outside_to_shared(gpa >> PAGE_SHIFT, attrs):
            return 0
        err = self.convert(gpa >> PAGE_SHIFT, npages, bool(attrs & KVM_MAP_GPA_RANGE_ENC_STAT_MASK))
        return self.refusal if err else 0

    def convert(self, gfn: int, npages: int, private: bool) -> int:
        """Apply a conversion (explicit or implicit): attributes first, then the tracker.

        Returns 0 or a positive KVM error number."""
        if gfn + npages > self.guest_pages:
            return KVM_EINVAL
        if self.refused and any(
            gfn < end and start < gfn + npages and to in (None, private) for start, end, to in self.refused
        ):
            self.rejected += 1
            return KVM_EINVAL
        if self._vm is not None:
            attributes = KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0
            try:
                self._vm.set_memory_attributes(gfn << PAGE_SHIFT, npages << PAGE_SHIFT, attributes)
            except KvmIoctlError:
                return KVM_EINVAL
            if self._ram is not None:
                # kvm_convert_memory(): after the attributes, discard the side left behind.
                if private:
                    self._ram.discard_shared(gfn, npages)
                else:
                    self._ram.discard_private(gfn, npages)
        if private:
            self.tracker.set_private(gfn, npages)
        else:
            self.tracker.set_shared(gfn, npages)
        return 0
