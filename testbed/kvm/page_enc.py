"""The seed-era page-encryption bitmap KVM keeps for KVM_HC_PAGE_ENC_STATUS.

The SEV live-migration series, v9 (Ashish Kalra, 8 Dec 2020; never merged), kept
`sev->page_enc_bmap` in the kernel: one bit per guest page, set while the page is encrypted,
every page encrypted until the guest says otherwise ("mark the page encrypted (by default)",
memset 0xff in sev_resize_page_enc_bitmap). svm_page_enc_status_hc() (08/18; modelled in
kvm/hypercall.py `page_enc_status_hc`) sets or clears bits; userspace reads them with
KVM_GET_PAGE_ENC_BITMAP (struct kvm_page_enc_bitmap: start_gfn, num_pages, a buffer of bits,
bit 0 of byte 0 the first page) and builds whatever it keeps from them. KVM's structure, not
the VMM's tracker.

Who sizes it: in v9 the hypercall never resizes it - a range past its end is dropped
(``if (sev->page_enc_bmap_size < gfn_end) goto unlock;``) - and 12/18 ("Add support for static
allocation of unified Page Encryption Bitmap") grows it to the top of the highest memslot on
each KVM_MR_CREATE (svm_commit_memory_region), so a guest cannot grow it. The seed thread
(Ashish Kalra, 7 Jan 2021) says the same: "we don't do any bitmap resize based on guest page
encryption status hypercall, the max. bitmap size is computed dynamically by walking the KVM
memslots". Earlier versions (v6, Mar 2020) called sev_resize_page_enc_bitmap(kvm, gfn_end)
from the hypercall itself, so there a guest could grow it. Deviation: the testbed sizes it
once, at VM creation, for all the RAM the VM can have (its hotplug capacity), where v9 grows it
slot by slot; either way no hypercall changes its size.
"""

from __future__ import annotations

from bitarray import bitarray

from testbed.kvm.ioctl import KvmIoctlError
from testbed.kvm.uapi import KVM_EINVAL


class PageEncBitmap:
    """`guest_pages` bits, 1 = encrypted; all encrypted at creation."""

    def __init__(self, guest_pages: int) -> None:
        self.guest_pages = guest_pages
        self._bits = bitarray(guest_pages, endian="little")
        self._bits.setall(1)

    def set_encrypted(self, gfn: int, npages: int, encrypted: bool) -> None:
        """__bitmap_set / __bitmap_clear of [gfn, gfn + npages) (the caller checked the range)."""
        self._bits[gfn:gfn + npages] = encrypted

    def get(self, start_gfn: int, num_pages: int) -> bytes:
        """KVM_GET_PAGE_ENC_BITMAP: the bits of [start_gfn, start_gfn + num_pages), packed
        little-endian (bit 0 of byte 0 = start_gfn). EINVAL for a range outside the bitmap."""
        if start_gfn < 0 or num_pages < 0 or start_gfn + num_pages > self.guest_pages:
            raise KvmIoctlError("KVM_GET_PAGE_ENC_BITMAP", KVM_EINVAL,
                                f"gfn 0x{start_gfn:x} + {num_pages} pages is outside the bitmap "
                                f"({self.guest_pages} pages)")
        return self._bits[start_gfn:start_gfn + num_pages].tobytes()
