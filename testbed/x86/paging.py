"""x86-64 4-level paging: the architectural page walk, shared by the MMU and KVM's walker.

The hardware model walks with the CPU's (plaintext, private) view of the page tables; the kvm
layer walks the same tables through the host's view, which for an SEV guest is ciphertext — so
the same function shows why KVM cannot emulate instructions of an encrypted guest.

`walk` is pure: it reads table entries through a callable and returns either a translation or
the architectural #PF error code. Accessed/dirty bits are not written back (the testbed's
guests never consult them; a deliberate simplification).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from testbed.x86 import PFERR_FETCH, PFERR_PRESENT, PFERR_RSVD, PFERR_USER, PFERR_WRITE

PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_US = 1 << 2
PTE_PS = 1 << 7
PTE_NX = 1 << 63

ACCESS_READ = 0
ACCESS_WRITE = 1
ACCESS_FETCH = 2


@dataclass(frozen=True, slots=True)
class Translation:
    """A successful walk: where `va`'s page lives and what the walk allows."""

    gpa: int  # physical address of the 4 KiB page containing va, encryption bit stripped
    writable: bool
    user: bool
    executable: bool
    encrypted: bool  # the leaf entry had the C-bit set (SEV) / the shared bit clear (TDX)


@dataclass(frozen=True, slots=True)
class PageFault:
    """A failed walk: the #PF error code the hardware would push.

    `table_gpa` is set when the walk failed because a paging-structure entry lies outside
    guest memory (no memslot): the CPU's walk then takes a nested page fault on that GPA
    instead, and KVM's own walker fails it as not present (paging_tmpl.h
    FNAME(walk_addr_generic): no visible memslot -> `goto error`, error code = the access bits).
    """

    va: int
    error_code: int
    table_gpa: int | None = None


@dataclass(frozen=True)
class PagingMode:
    """What the MMU needs to know about the VM: address width and the encryption bit.

    `enc_mask` is the C-bit (SEV) or the TDX shared bit; `enc_means_private` says which
    polarity: True for the C-bit (set = private), False for TDX (set = shared).
    """

    phys_bits: int = 52
    enc_mask: int = 0
    enc_means_private: bool = True

    @functools.cached_property
    def address_mask(self) -> int:
        """Bits of an entry that hold the next-level physical address (12 .. phys_bits-1)."""
        return ((1 << self.phys_bits) - 1) & ~0xFFF & ~self.enc_mask

    @functools.cached_property
    def reserved_mask(self) -> int:
        """Bits 51:phys_bits that must be zero in an entry (the encryption bit excepted)."""
        return (((1 << 52) - 1) & ~((1 << self.phys_bits) - 1)) & ~self.enc_mask


def walk(
    read_u64: Callable[[int], int],
    cr3: int,
    va: int,
    access: int,
    user: bool,
    mode: PagingMode,
    wp: bool = False,
    nxe: bool = True,
    mem_size: int | None = None,
) -> Translation | PageFault:
    """Walk the 4-level tables at `cr3` for `va` and check `access` (ACCESS_*) at CPL `user`.

    Supports 1 GiB and 2 MiB leaves. Rules follow SDM vol. 3 4.5-4.6: a non-present entry, a
    reserved bit, or a permission violation faults with the matching error code bits. With
    `mem_size`, an entry outside [0, mem_size) is never read: the walk fails with the access
    bits as error code and `table_gpa` naming the entry (see PageFault).
    """
    err_base = (PFERR_WRITE if access == ACCESS_WRITE else 0) | (PFERR_USER if user else 0)
    if access == ACCESS_FETCH and nxe:
        err_base |= PFERR_FETCH
    addr_mask = mode.address_mask
    rsvd = mode.reserved_mask
    enc_mask = mode.enc_mask
    table = cr3 & addr_mask
    writable = True
    usr = True
    nx = False
    level = 4
    entry = 0
    while True:
        shift = 12 + 9 * (level - 1)
        index = (va >> shift) & 0x1FF
        entry_gpa = table + index * 8
        if mem_size is not None and entry_gpa + 8 > mem_size:
            return PageFault(va, err_base, table_gpa=entry_gpa)
        entry = read_u64(entry_gpa)
        if not entry & PTE_P:
            return PageFault(va, err_base)
        leaf = level == 1 or (level in (2, 3) and bool(entry & PTE_PS))
        bad = entry & rsvd
        if leaf and level > 1:
            # Large-page address bits below the page size (other than PAT at bit 12) are reserved.
            bad |= entry & (((1 << shift) - 1) & ~0x1FFF) & addr_mask
        if level == 4 and entry & PTE_PS:
            bad |= PTE_PS
        if not nxe and entry & PTE_NX:
            bad |= PTE_NX
        if bad:
            return PageFault(va, err_base | PFERR_PRESENT | PFERR_RSVD)
        writable &= bool(entry & PTE_RW)
        usr &= bool(entry & PTE_US)
        nx |= bool(entry & PTE_NX) and nxe
        if leaf:
            break
        table = entry & addr_mask
        level -= 1
    perm_fault = (
        (user and not usr)
        or (access == ACCESS_WRITE and not writable and (user or wp))
        or (access == ACCESS_FETCH and nx)
    )
    if perm_fault:
        return PageFault(va, err_base | PFERR_PRESENT)
    page_base = entry & addr_mask & ~((1 << shift) - 1)
    gpa = page_base | (va & ((1 << shift) - 1) & ~0xFFF)
    enc_bit = bool(entry & enc_mask) if enc_mask else False
    encrypted = enc_bit if mode.enc_means_private else (not enc_bit and enc_mask != 0)
    return Translation(
        gpa=gpa,
        writable=writable or (not user and not wp),
        user=usr,
        executable=not nx,
        encrypted=encrypted,
    )
