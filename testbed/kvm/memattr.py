"""KVM memory attributes: KVM_SET_MEMORY_ATTRIBUTES and the private/shared state per GFN.

virt/kvm/kvm_main.c keeps an xarray of attributes per GFN; the only attribute x86 defines is
KVM_MEMORY_ATTRIBUTE_PRIVATE. The ioctl validates flags, attribute bits, size, alignment and
wrap-around, and is all-or-nothing. The per-GFN state is also what the stage-2 page tables
are built from, so the hardware model consults the same array (`private`) to decide whether a
guest access agrees with it (a disagreement is an NPF that KVM turns into
KVM_EXIT_MEMORY_FAULT).
"""

from __future__ import annotations

import errno
import mmap
import os

from testbed.hw.memory import release_mapping
from testbed.kvm.ioctl import KvmIoctlError
from testbed.kvm.uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE
from testbed.x86 import PAGE_SHIFT, PAGE_SIZE, U64

SUPPORTED_ATTRIBUTES = KVM_MEMORY_ATTRIBUTE_PRIVATE


def validate_attributes(address: int, size: int, attributes: int, flags: int, supported: int) -> None:
    """The checks of kvm_vm_ioctl_set_mem_attributes() (virt/kvm/kvm_main.c), in its order:
    flags must be 0, attributes within kvm_supported_mem_attributes() (`supported`: PRIVATE for
    a VM with private memory, 0 otherwise), size non-zero without wrapping, address and size
    page aligned. Each failure is EINVAL."""
    name = "KVM_SET_MEMORY_ATTRIBUTES"
    address, size = address & U64, size & U64  # struct kvm_memory_attributes: __u64 address, size
    if flags:
        raise KvmIoctlError(name, errno.EINVAL, f"flags 0x{flags:x} must be 0")
    if attributes & ~supported:
        raise KvmIoctlError(name, errno.EINVAL,
                            f"attributes 0x{attributes:x} not supported (supported: 0x{supported:x})")
    if size == 0 or address + size > U64 or address + size < address:
        raise KvmIoctlError(name, errno.EINVAL, f"address 0x{address:x} size 0x{size:x}: empty or wrapping")
    if address % PAGE_SIZE or size % PAGE_SIZE:
        raise KvmIoctlError(name, errno.EINVAL, f"address 0x{address:x} size 0x{size:x}: not page aligned")


_ALL_PRIVATE: list[tuple[int, int]] = []  # (fd, length) of the process's file of 0x01 bytes


def _all_private_file(length: int) -> int:
    """A file descriptor whose first `length` bytes are 0x01 (one per GFN: PRIVATE), made once
    per process and grown (doubling) when a larger VM needs more; it is only ever mapped
    MAP_PRIVATE, so no VM's writes reach it or another VM."""
    if _ALL_PRIVATE and _ALL_PRIVATE[-1][1] >= length:
        return _ALL_PRIVATE[-1][0]
    size = max(length, 2 * _ALL_PRIVATE[-1][1] if _ALL_PRIVATE else 1 << 16)
    fd = os.memfd_create("testbed-all-private", os.MFD_CLOEXEC)
    chunk = b"\x01" * (1 << 20)
    written = 0
    while written < size:
        written += os.write(fd, chunk[: size - written])
    _ALL_PRIVATE.append((fd, size))  # earlier, smaller files stay open: live mappings may use them
    return fd


class MemoryAttributes:
    """The attribute array of one VM (one byte per GFN: 1 = private)."""

    def __init__(self, guest_pages: int, initially_private: bool = False) -> None:
        self.guest_pages = guest_pages
        # One byte per GFN in a lazily zero-filled anonymous mapping (as KVM's xarray holds only
        # the GFNs that have attributes): a 64 GiB VM whose attributes stay 0 costs no host pages.
        # An all-private start maps a shared file of 0x01 bytes copy-on-write, so it costs host
        # pages only where an attribute changes (writing 0x01 per GFN took 20 ms at 64 GiB).
        length = max(guest_pages, 1)
        if initially_private and guest_pages:
            self.private = mmap.mmap(_all_private_file(length), length, flags=mmap.MAP_PRIVATE)
        else:
            self.private = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.updates = 0

    def close(self) -> None:
        """Unmap the attribute array and with it its file descriptor (the VM is closed)."""
        release_mapping(self.private)

    def set(self, address: int, size: int, attributes: int, flags: int = 0) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES (kvm_vm_ioctl_set_mem_attributes)."""
        validate_attributes(address, size, attributes, flags, SUPPORTED_ATTRIBUTES)
        start = address >> PAGE_SHIFT
        end = (address + size) >> PAGE_SHIFT
        value = 1 if attributes & KVM_MEMORY_ATTRIBUTE_PRIVATE else 0
        # KVM stores attributes for any GFN (no memslot check); the array covers guest RAM,
        # and GFNs beyond it have no backing to convert, so they are recorded as a no-op.
        end_in = min(end, self.guest_pages)
        if start >= end_in:
            return
        # kvm_vm_set_mem_attributes() reserves before it changes anything: all-or-nothing,
        # and an update that changes nothing returns early.
        if all(b == value for b in self.private[start:end_in]):
            return
        self.private[start:end_in] = bytes([value]) * (end_in - start)
        self.updates += 1

    def is_private(self, gfn: int) -> bool:
        """kvm_mem_is_private()."""
        return 0 <= gfn < self.guest_pages and self.private[gfn] == 1
