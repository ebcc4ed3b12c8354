"""The seed-era page-encryption bitmap: KVM keeps it (kvm/page_enc.py), the VMM reads it with
KVM_GET_PAGE_ENC_BITMAP and builds its tracker from it (vmm/page_enc.py). Over plain objects,
no Unicorn. Source: the SEV live-migration series v9 (8 Dec 2020; never merged upstream),
patch 08/18 "KVM: X86: Introduce KVM_HC_PAGE_ENC_STATUS hypercall" (svm_page_enc_status_hc()
in arch/x86/kvm/svm/sev.c, the x86.c case, Documentation/virt/kvm/hypercalls.rst), 12/18
(the bitmap sized from the memslots) and svm_get_page_enc_bitmap()."""

from __future__ import annotations

import errno

import pytest

from testbed.hw.exits import Vendor
from testbed.hw.fake import FakeVcpu
from testbed.kvm.hypercall import neg, page_enc_status_hc
from testbed.kvm.ioctl import KvmIoctlError
from testbed.kvm.page_enc import PageEncBitmap
from testbed.kvm.uapi import KVM_EINVAL, KVM_ENOSYS, KvmVmType
from testbed.kvm.vm import KvmVm
from testbed.tracker import make_tracker
from testbed.vmm.page_enc import PageEncBitmapSource

MEM = 1 << 20
PAGES = MEM >> 12


def _vm(protocol: bool = True) -> KvmVm:
    hw = FakeVcpu(Vendor.AMD, MEM)
    return KvmVm(KvmVmType.KVM_X86_SEV_VM, Vendor.AMD, hw.memory, page_enc_status_protocol=protocol)


def _source(vm: KvmVm, kind: str = "ranges", max_ranges: int = 4096) -> PageEncBitmapSource:
    return PageEncBitmapSource(vm.get_page_enc_bitmap, PAGES, make_tracker(kind, guest_pages=PAGES,
                                                                           max_ranges=max_ranges))


def test_bitmap_starts_all_encrypted_and_the_hypercall_flips_bits() -> None:
    """Every page starts encrypted; enc=0 clears the range's bits and enc=1 sets them again (__bitmap_clear/set)."""
    vm = _vm()
    assert vm.get_page_enc_bitmap(0, PAGES) == b"\xff" * (PAGES // 8)
    assert page_enc_status_hc(vm, 0x3000, 2, 0).ret == 0
    assert vm.get_page_enc_bitmap(0, 16) == bytes([0b11100111, 0xFF])
    assert page_enc_status_hc(vm, 0x4000, 1, 1).ret == 0
    assert vm.get_page_enc_bitmap(0, 8) == bytes([0b11110111])
    assert vm.get_page_enc_bitmap(3, 2) == bytes([0b10])  # bit 0 is start_gfn


ALL_ENCRYPTED = b"\xff" * (PAGES // 8)


def _bits(vm: KvmVm) -> str:
    """The bitmap as a string of 0/1, gfn 0 first."""
    return "".join(str(b >> i & 1) for b in vm.get_page_enc_bitmap(0, PAGES) for i in range(8))


def test_hypercall_follows_v9_svm_page_enc_status_hc() -> None:
    """(gpa, npages, enc) as v9 08/18 decides: npages 0 is 0, an unaligned gpa is truncated, only a wrap is
    -EINVAL, a range past the bitmap is dropped with 0, any nonzero enc sets."""
    # hypercalls.rst: "a0: the guest physical address of the start page / a1: the number of pages /
    # a2: encryption attribute ... 1: Encryption attribute is set / 0: Encryption attribute is cleared"
    cases = [  # (gpa, npages) with enc = 0, the return value, the pages left cleared (shared)
        # "if (!npages) return 0;": success, nothing changes
        (0x3000, 0, 0, []),
        # "gfn_start = gpa_to_gfn(gpa);": 0x3fff is page 3, not refused
        (0x3FFF, 1, 0, [3]),
        # "if (gfn_end <= gfn_start) return -EINVAL;": gfn_t arithmetic wraps past 2^64
        (0x5000, (1 << 64) - 5, neg(KVM_EINVAL), []),
        # "if (sev->page_enc_bmap_size < gfn_end) goto unlock; ... return 0;": dropped whole
        ((PAGES - 1) << 12, 2, 0, []),
        (PAGES << 12, 1, 0, []),
        # ending exactly at the bitmap's end is inside it
        ((PAGES - 2) << 12, 2, 0, [PAGES - 2, PAGES - 1]),
    ]
    for gpa, npages, ret, cleared in cases:
        vm = _vm()
        assert page_enc_status_hc(vm, gpa, npages, 0).ret == ret, (hex(gpa), npages)
        want = "".join("0" if gfn in cleared else "1" for gfn in range(PAGES))
        assert _bits(vm) == want, (hex(gpa), npages)
    # "if (enc) __bitmap_set(...)": enc = 2 encrypts again
    vm = _vm()
    page_enc_status_hc(vm, 0x3000, 1, 0)
    assert page_enc_status_hc(vm, 0x3000, 1, 2).ret == 0
    assert vm.get_page_enc_bitmap(0, PAGES) == ALL_ENCRYPTED


def test_hypercall_past_the_bitmap_does_not_grow_it() -> None:
    """A call past the memslot-sized bitmap leaves its size alone (v9 12/18; v6 resized it from the hypercall)."""
    vm = _vm()
    assert page_enc_status_hc(vm, (PAGES + 100) << 12, 1, 0).ret == 0
    assert vm.page_enc_bitmap.guest_pages == PAGES
    assert vm.get_page_enc_bitmap(0, PAGES) == ALL_ENCRYPTED
    with pytest.raises(KvmIoctlError):
        vm.get_page_enc_bitmap(0, PAGES + 1)


def test_hypercall_on_a_vm_that_is_not_sev_is_einval() -> None:
    """v9: "if (!sev_guest(kvm)) return -EINVAL;" - a plain AMD VM's bitmap is never touched."""
    hw = FakeVcpu(Vendor.AMD, MEM)
    vm = KvmVm(KvmVmType.KVM_X86_DEFAULT_VM, Vendor.AMD, hw.memory, page_enc_status_protocol=True)
    assert page_enc_status_hc(vm, 0x3000, 1, 0).ret == neg(KVM_EINVAL)
    assert vm.get_page_enc_bitmap(0, PAGES) == ALL_ENCRYPTED


def test_hypercall_on_intel_is_enosys() -> None:
    """v9 x86.c: "ret = -KVM_ENOSYS; if (kvm_x86_ops.page_enc_status_hc)", and VMX sets it to NULL."""
    hw = FakeVcpu(Vendor.INTEL, MEM)
    vm = KvmVm(KvmVmType.KVM_X86_DEFAULT_VM, Vendor.INTEL, hw.memory, page_enc_status_protocol=True)
    assert page_enc_status_hc(vm, 0x3000, 1, 0).ret == neg(KVM_ENOSYS)
    assert vm.get_page_enc_bitmap(0, PAGES) == ALL_ENCRYPTED


def test_get_page_enc_bitmap_refuses_what_does_not_exist() -> None:
    """EINVAL for a range outside the bitmap; ENOTTY on a KVM without the seed-era protocol."""
    with pytest.raises(KvmIoctlError) as info:
        _vm().get_page_enc_bitmap(PAGES - 1, 2)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(KvmIoctlError) as info:
        _vm(protocol=False).get_page_enc_bitmap(0, 1)
    assert info.value.errno == errno.ENOTTY


@pytest.mark.parametrize("kind", ["bitmap", "ranges", "tree"])
def test_vmm_builds_its_tracker_from_kvms_bitmap(kind: str) -> None:
    """The VMM's shared ranges are the bitmap's clear bits, merged, in its tracker kind; fetched anew each time."""
    vm = _vm()
    source = _source(vm, kind)
    assert source.shared_ranges() == []
    page_enc_status_hc(vm, 0x0, 1, 0)
    page_enc_status_hc(vm, 0x2000, 3, 0)
    page_enc_status_hc(vm, (PAGES - 2) << 12, 2, 0)
    assert source.shared_ranges() == [(0, 1), (2, 3), (PAGES - 2, 2)]
    page_enc_status_hc(vm, 0x3000, 1, 1)
    assert source.shared_ranges() == [(0, 1), (2, 1), (4, 1), (PAGES - 2, 2)]
    assert not source.poisoned


def test_vmm_tracker_bound_applies_to_the_bitmap_it_reads() -> None:
    """A bounded tracker given more ranges than its bound is poisoned; clean again once the guest merges them."""
    vm = _vm()
    source = _source(vm, "ranges", max_ranges=2)
    for gfn in range(0, 8, 2):
        page_enc_status_hc(vm, gfn << 12, 1, 0)
    source.shared_ranges()
    assert source.poisoned
    page_enc_status_hc(vm, 0, 8, 0)
    assert source.shared_ranges() == [(0, 8)] and not source.poisoned


def test_page_enc_bitmap_is_sized_by_guest_memory() -> None:
    """The bitmap has one bit per guest page, fixed at creation (no hypercall resizes it)."""
    bitmap = PageEncBitmap(PAGES)
    assert len(bitmap.get(0, PAGES)) == PAGES // 8
    with pytest.raises(KvmIoctlError):
        bitmap.get(0, PAGES + 1)


@pytest.mark.parametrize(("nr", "op_64_bit", "dispatched"), [
    (12, True, True), ((1 << 32) | 12, True, False), ((1 << 32) | 12, False, True),
])
def test_a_32_bit_callers_hypercall_is_truncated_before_the_switch(nr: int, op_64_bit: bool,
                                                                   dispatched: bool) -> None:
    """v9's kvm_emulate_hypercall() truncates nr and a0..a2 to 32 bits outside 64-bit mode before
    `switch (nr)`; in 64-bit mode nr is compared whole, so upper bits make it another (unknown)
    number: -KVM_ENOSYS, the bitmap untouched."""
    from testbed.kvm.vcpu import KvmVcpu

    hw = FakeVcpu(Vendor.AMD, MEM)
    vm = KvmVm(KvmVmType.KVM_X86_SEV_VM, Vendor.AMD, hw.memory, page_enc_status_protocol=True)
    vcpu = KvmVcpu(vm, hw)
    gpa = (0xDEAD << 32 if not op_64_bit else 0) | 0x3000
    outcome = vcpu._dispatch_hypercall(nr, gpa, 1, 0, 0, 0, op_64_bit)
    if dispatched:
        assert outcome.ret == 0 and vm.get_page_enc_bitmap(0, 8) == bytes([0b11110111])
    else:
        assert outcome.ret == neg(KVM_ENOSYS) and vm.get_page_enc_bitmap(0, 8) == b"\xff"
