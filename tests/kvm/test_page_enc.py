"""The seed-era page-encryption bitmap: KVM keeps it (kvm/page_enc.py), the VMM reads it with
KVM_GET_PAGE_ENC_BITMAP and builds its tracker from it (vmm/page_enc.py). Over plain objects,
no Unicorn. Source: the 2020 SEV live-migration series (v6), svm_page_enc_status_hc() and
svm_get_page_enc_bitmap() (arch/x86/kvm/svm.c of that series; never merged upstream)."""

from __future__ import annotations

import errno

import pytest

from testbed.hw.exits import Vendor
from testbed.hw.fake import FakeVcpu
from testbed.kvm.hypercall import neg, page_enc_status_hc
from testbed.kvm.ioctl import KvmIoctlError
from testbed.kvm.page_enc import PageEncBitmap
from testbed.kvm.uapi import KVM_EINVAL, KvmVmType
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


@pytest.mark.parametrize(("gpa", "npages"), [(0x1001, 1), (0x1000, 0), ((PAGES - 1) << 12, 2)])
def test_hypercall_rejects_bad_ranges_without_touching_the_bitmap(gpa: int, npages: int) -> None:
    """An unaligned GPA, zero pages or a range past the bitmap returns -KVM_EINVAL and changes nothing."""
    vm = _vm()
    assert page_enc_status_hc(vm, gpa, npages, 0).ret == neg(KVM_EINVAL)
    assert vm.get_page_enc_bitmap(0, PAGES) == b"\xff" * (PAGES // 8)


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
    """The bitmap has one bit per guest page, fixed at creation (a guest cannot grow it)."""
    bitmap = PageEncBitmap(PAGES)
    assert len(bitmap.get(0, PAGES)) == PAGES // 8
    with pytest.raises(KvmIoctlError):
        bitmap.get(0, PAGES + 1)
