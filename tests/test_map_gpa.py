"""The VMM's KVM_HC_MAP_GPA_RANGE handler: the checks KVM leaves to userspace."""

from __future__ import annotations

import pytest

from testbed.kvm.uapi import KVM_EINVAL, KVM_MAP_GPA_RANGE_ENCRYPTED, KVM_MAP_GPA_RANGE_PAGE_SZ_2M
from testbed.tracker import make_tracker
from testbed.vmm.map_gpa import MapGpaHandler

PAGES = 1024


def handler(max_pages: int | None = None) -> MapGpaHandler:
    return MapGpaHandler(make_tracker("ranges", guest_pages=PAGES), PAGES, max_pages_per_call=max_pages)


def test_shared_then_private_updates_the_tracker() -> None:
    """A decrypted request shares the range; an encrypted one makes it private again."""
    h = handler()
    assert h.handle(0x10000, 4, 0) == 0
    assert h.tracker.shared_ranges() == [(0x10, 4)]
    assert h.handle(0x11000, 2, KVM_MAP_GPA_RANGE_ENCRYPTED | KVM_MAP_GPA_RANGE_PAGE_SZ_2M) == 0
    assert h.tracker.shared_ranges() == [(0x10, 1), (0x13, 1)]


@pytest.mark.parametrize(
    ("gpa", "npages", "attrs"),
    [
        (0x1000, 1, 1 << 5),  # reserved attribute bit 5
        (0x1000, 1, 1 << 63),  # reserved attribute bit 63
        (0x1000, 1, 3),  # page-size hint that is neither 4K, 2M nor 1G
        ((PAGES - 1) << 12, 2, 0),  # runs past the end of guest memory
        (PAGES << 12, 1, KVM_MAP_GPA_RANGE_ENCRYPTED),  # to private outside guest memory
    ],
)
def test_malformed_requests_are_refused_with_einval(gpa: int, npages: int, attrs: int) -> None:
    """What KVM forwards unchecked the VMM refuses, answering EINVAL (22, positive: one of the values the
    reference KVM accepts, x86.h kvm_is_valid_map_gpa_range_ret) and recording nothing."""
    h = handler()
    assert h.handle(gpa, npages, attrs) == KVM_EINVAL == 22
    assert h.tracker.shared_ranges() == []
    assert h.rejected == 1


def test_per_call_bound() -> None:
    """A request larger than the per-call bound is refused."""
    h = handler(max_pages=8)
    assert h.handle(0, 9, 0) == KVM_EINVAL
    assert h.handle(0, 8, 0) == 0


def test_to_shared_wholly_outside_guest_memory_is_accepted_and_ignored() -> None:
    """QEMU's kvm_convert_memory(): no memory region behind the range - "Ignore converting
    non-assigned region to shared" (OVMF's MapGPA of the PCI MMIO hole) - answers 0 and records
    nothing; a range only partly outside is still refused, as is to-private outside."""
    h = handler()
    assert h.handle(PAGES << 12, 16, 0) == 0 and h.handle((PAGES + 100) << 12, 1, 0) == 0
    assert h.tracker.shared_ranges() == [] and h.rejected == 0
    assert h.handle((PAGES - 1) << 12, 2, 0) == KVM_EINVAL
